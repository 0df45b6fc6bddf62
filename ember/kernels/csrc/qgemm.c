/* Block-quantized matmuls on AVX512-BF16: the decode gemv straight from the codes
 * and row decoding (the layout and the bf16 code trick are described in blocks.h). The gemv uses, with X = the sum of
 * a block's x:  sum_i w_i x_i = s * D1 + 128 s * D2 + X * (o - 128 s),
 *   D1 = sum (128 + (q_i & 127)) x_i,  D2 = sum (q_i >> 7) x_i  (8-bit codes only). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "blocks.h"

int ember_qgemm_available(void) { return 1; }

#define MAXM 8

static inline __attribute__((always_inline)) void block_dot(__m512i w, __m512i top, int np, float s, const uint16_t *x, int64_t m_rows,
                             int64_t k, __m512 *acc) {
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t m = 0; m < m_rows; m++) {
        __m512i xv = _mm512_loadu_si512((const void *)(x + m * k));
        acc[m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w, (__m512bh)xv), sv, acc[m]);
        if (np == 4)
            acc[m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)top, (__m512bh)xv),
                                     _mm512_set1_ps(128.f * s), acc[m]);
    }
}

/* one output row for M activation rows; M is a constant at each call site so the accumulators stay in registers */
static inline __attribute__((always_inline)) void qgemm_row(
        const int64_t M, const uint8_t *nr, const uint32_t *pr, int np, const uint16_t *sr, const uint16_t *or_,
        const uint16_t *x, const float *xs, int64_t nb, int64_t k, float kc, float *out) {
    __m512 acc0[MAXM], acc1[MAXM], corr[MAXM];
    for (int64_t m = 0; m < M; m++) acc0[m] = acc1[m] = corr[m] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int cnt = nb - b0 < 16 ? (int)(nb - b0) : 16;
        const __mmask16 mk = (__mmask16)((1u << cnt) - 1);
        const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sr + b0));
        const __m512 ov = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, or_ + b0));
        const __m512 cv = _mm512_fnmadd_ps(_mm512_set1_ps(kc), sv, ov);  /* o - kc s per block */
        float sb[16];
        _mm512_storeu_ps(sb, sv);
        for (int64_t m = 0; m < M; m++)
            corr[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, xs + m * nb + b0), cv, corr[m]);
        for (int j = 0; j < cnt; j += 2) {
            const int64_t b = b0 + j;
            __m512i wa, wb, ta = _mm512_setzero_si512(), tb = ta;
            unpack_pair(nr + (b / 2) * 32, &wa, &wb);
            wa = finish(wa, pr ? pr + b * np : NULL, np, &ta);
            block_dot(wa, ta, np, sb[j], x + b * 32, M, k, acc0);
            if (j + 1 < cnt) {
                wb = finish(wb, pr ? pr + (b + 1) * np : NULL, np, &tb);
                block_dot(wb, tb, np, sb[j + 1], x + (b + 1) * 32, M, k, acc1);
            }
        }
    }
    for (int64_t m = 0; m < M; m++)
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0[m], acc1[m]), corr[m]));
}

/* y[m, n] = sum_k x[m, k] w[n, k] for m < M <= 8 (decode). x bf16 [M, K]; y fp32 or bf16 [M, N]. */
void ember_qgemm(const uint8_t *nib, const uint32_t *planes, int64_t np, const uint16_t *s16,
                 const uint16_t *o16, const uint16_t *x, int64_t m_rows, int64_t n, int64_t k,
                 float *y_f32, uint16_t *y_bf16) {
    const int64_t nb = k / 32, npairs = (nb + 1) / 2;
    float xs[MAXM * 512];  /* X per (row, block); K <= 16384 */
    if (m_rows > MAXM || nb > 512) abort();
    for (int64_t m = 0; m < m_rows; m++)
        for (int64_t b = 0; b < nb; b++) {
            float acc = 0.f;
            for (int j = 0; j < 32; j++) acc += bf2f(x[m * k + b * 32 + j]);
            xs[m * nb + b] = acc;
        }
    const float kc = 128.f;  /* the magic's share */
#pragma omp parallel for schedule(static) if (n * k > 65536)
    for (int64_t r = 0; r < n; r++) {
        float v[MAXM];
        const uint8_t *nr = nib + r * npairs * 32;
        const uint32_t *pr = planes ? planes + r * nb * np : NULL;
        const uint16_t *sr = s16 + r * nb, *or_ = o16 + r * nb;
        switch (m_rows) {  /* constant M per case: see qgemm_row */
#define ROW(M) case M: qgemm_row(M, nr, pr, (int)np, sr, or_, x, xs, nb, k, kc, v); break;
            ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
#undef ROW
        }
        for (int64_t m = 0; m < m_rows; m++) {
            if (y_f32) y_f32[m * n + r] = v[m]; else y_bf16[m * n + r] = f2bf(v[m]);
        }
    }
}

/* Rows [r0, r1) of the weight as bf16 [r1 - r0, K]. */
void ember_qdequant(const uint8_t *nib, const uint32_t *planes, int64_t np, const uint16_t *s16,
                    const uint16_t *o16, int64_t r0, int64_t r1, int64_t k, uint16_t *out) {
    const packed_w w = packed_view(nib, planes, np, s16, o16, k);
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) dequant_row(&w, r, out + (r - r0) * k);
}

/* Rows `rows[i]` (any order) of the weight in fp32 [n, K]: token embeddings and the head's exact
 * top-candidate recompute read the packed head this way instead of keeping a second copy. */
void ember_qrows_f32(const uint8_t *nib, const uint32_t *planes, int64_t np, const uint16_t *s16,
                     const uint16_t *o16, const int64_t *rows, int64_t n, int64_t k, float *out) {
    const int64_t nb = k / 32, npairs = (nb + 1) / 2;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = rows[i];
        for (int64_t b = 0; b < nb; b++) {
            __m512i wa, wb, ta = _mm512_setzero_si512(), tb = ta;
            unpack_pair(nib + (r * npairs + b / 2) * 32, &wa, &wb);
            __m512i w = b % 2 ? wb : wa;
            w = finish(w, planes ? planes + (r * nb + b) * np : NULL, (int)np, b % 2 ? &tb : &ta);
            __m512i v = _mm512_and_si512(w, _mm512_set1_epi16(0x7f));
            if (np == 4) v = _mm512_or_si512(v, _mm512_and_si512(b % 2 ? tb : ta, _mm512_set1_epi16(0x80)));
            /* q * s + o in two roundings, as gguf-py's dequantizers (exact for Q8_0 / Q4_0 / Q4_1) */
            const __m512 sv = _mm512_set1_ps(_cvtsh_ss(s16[r * nb + b])), ov = _mm512_set1_ps(_cvtsh_ss(o16[r * nb + b]));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)));
            _mm512_storeu_ps(out + i * k + b * 32, _mm512_add_ps(_mm512_mul_ps(lo, sv), ov));
            _mm512_storeu_ps(out + i * k + b * 32 + 16, _mm512_add_ps(_mm512_mul_ps(hi, sv), ov));
        }
    }
}
#else
int ember_qgemm_available(void) { return 0; }
void ember_qrows_f32(void) {}
void ember_qgemm(void) {}
void ember_qdequant(void) {}
#endif
