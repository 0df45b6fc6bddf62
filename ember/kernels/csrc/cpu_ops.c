/* ember's fused CPU ops for the decode hot path: each replaces 5-20 eager PyTorch ops (~3 us each).
 *
 * Plain C over raw pointers (called through ctypes): it builds in about a second with the system
 * compiler, needs no PyTorch headers, and links the libgomp that PyTorch has already loaded, so both
 * share one OpenMP thread pool. bf16 values travel as uint16_t; math is fp32, rounded once on store.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf2f(uint16_t b) {
    union { uint32_t u; float f; } v = { (uint32_t)b << 16 };
    return v.f;
}

static inline uint16_t f2bf(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    union { float f; uint32_t u; } v = { f };
    const uint32_t rounded = v.u + 0x7fffu + ((v.u >> 16) & 1u);
    const uint32_t nan = v.u | 0x400000u;  /* NaN stays NaN (quiet); a select, so loops still vectorize */
    return (uint16_t)((((v.u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded) >> 16);
}

static inline float rms_scale(const float *x, int d, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    return 1.f / sqrtf(ss / (float)d + eps);
}

/* Residual add + RMSNorm on rows of the fp32 residual stream x [T, D] (updated in place):
 *   x += delta (bf16 or fp32, either may be NULL);  y = x / rms(x) * w  -> out_bf16 or out_f32.
 * With post_w set (Gemma's sandwich norm) the delta is normalized first: x += delta / rms(delta) * post_w. */
void ember_add_rmsnorm(float *x, const uint16_t *delta_bf16, const float *post_w, const float *w,
                       float eps, int64_t t, int64_t d, uint16_t *out_bf16, float *out_f32) {
    float *tmp = post_w ? (float *)malloc(sizeof(float) * d) : NULL;
    for (int64_t r = 0; r < t; r++) {
        float *xr = x + r * d;
        if (delta_bf16) {
            const uint16_t *dr = delta_bf16 + r * d;
            if (post_w) {
                for (int64_t i = 0; i < d; i++) tmp[i] = bf2f(dr[i]);
                float s = rms_scale(tmp, (int)d, eps);
                for (int64_t i = 0; i < d; i++) xr[i] += tmp[i] * s * post_w[i];
            } else {
                for (int64_t i = 0; i < d; i++) xr[i] += bf2f(dr[i]);
            }
        }
        float s = rms_scale(xr, (int)d, eps);
        if (out_bf16) {
            for (int64_t i = 0; i < d; i++) out_bf16[r * d + i] = f2bf(xr[i] * s * w[i]);
        } else {
            for (int64_t i = 0; i < d; i++) out_f32[r * d + i] = xr[i] * s * w[i];
        }
    }
    free(tmp);
}

/* In place on qkv [T, nq + 2 nkv, dh] bf16: optional per-head RMSNorm of q and k heads (Gemma's q/k
 * norms), rotate-half RoPE on their first 2 * half dims with cos/sin [T, half] fp32, then k and v heads
 * are stored into the head-major caches kc/vc [nkv, S, dh] at slots[t]. */
void ember_rope_store(uint16_t *qkv, int64_t t, int64_t nq, int64_t nkv, int64_t dh, int64_t half,
                      const float *cos_t, const float *sin_t, const float *q_norm, const float *k_norm,
                      float eps, uint16_t *kc, uint16_t *vc, int64_t s_slots, const int64_t *slots) {
    float buf[1024];
    if (dh > 1024) abort();
    for (int64_t r = 0; r < t; r++) {
        uint16_t *row = qkv + r * (nq + 2 * nkv) * dh;
        const float *c = cos_t + r * half, *s = sin_t + r * half;
        for (int64_t h = 0; h < nq + nkv; h++) {
            uint16_t *v = row + h * dh;
            for (int64_t i = 0; i < dh; i++) buf[i] = bf2f(v[i]);
            const float *nw = h < nq ? q_norm : k_norm;
            if (nw) {  /* the reference rounds the normed head to bf16 before rotating it */
                float sc = rms_scale(buf, (int)dh, eps);
                for (int64_t i = 0; i < dh; i++) buf[i] = bf2f(f2bf(buf[i] * sc * nw[i]));
            }
            for (int64_t i = 0; i < half; i++) {
                float x1 = buf[i], x2 = buf[i + half];
                v[i] = f2bf(x1 * c[i] - x2 * s[i]);
                v[i + half] = f2bf(x2 * c[i] + x1 * s[i]);
            }
            for (int64_t i = 2 * half; i < dh; i++) v[i] = f2bf(buf[i]);
        }
        if (!kc) continue;
        for (int64_t h = 0; h < nkv; h++) {
            memcpy(kc + (h * s_slots + slots[r]) * dh, row + (nq + h) * dh, dh * 2);
            memcpy(vc + (h * s_slots + slots[r]) * dh, row + (nq + nkv + h) * dh, dh * 2);
        }
    }
}

/* out [T, I] = act(gate) * up from gu [T, 2I] bf16; act 0: silu, 1: gelu (tanh approximation). */
void ember_act_mul(const uint16_t *gu, uint16_t *out, int64_t t, int64_t inter, int act) {
    for (int64_t r = 0; r < t; r++) {
        const uint16_t *g = gu + r * 2 * inter, *u = g + inter;
        uint16_t *o = out + r * inter;
        if (act == 0) {
#pragma omp simd
            for (int64_t i = 0; i < inter; i++) {
                float x = bf2f(g[i]);  /* torch rounds act(gate) to bf16 before the product */
                o[i] = f2bf(bf2f(f2bf(x / (1.f + expf(-x)))) * bf2f(u[i]));
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < inter; i++) {
                float x = bf2f(g[i]);
                float y = 0.5f * x * (1.f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
                o[i] = f2bf(bf2f(f2bf(y)) * bf2f(u[i]));
            }
        }
    }
}

/* Decode attention over the paged cache: one query token per sequence.
 * q: rows of stride q_stride (bf16), heads [h, dh] at the start of each row; kc/vc [hkv, S, dh];
 * slots [b, max_n] (int64, padded) and lens [b]: sequence i attends to its keys 0..lens[i]-1, or to
 * the last `window` of them. softcap > 0: scores = softcap * tanh(scores / softcap).
 * out [b, h, dh] bf16. Parallel over (sequence, kv head). */
void ember_decode_attention(const uint16_t *q, int64_t q_stride, const uint16_t *kc, const uint16_t *vc,
                            int64_t s_slots, const int64_t *slots, const int64_t *lens, int64_t max_n,
                            int64_t b, int64_t h, int64_t hkv, int64_t dh, float scale, int64_t window,
                            float softcap, uint16_t *out) {
    const int64_t rep = h / hkv;
    int64_t work = 0;
    for (int64_t i = 0; i < b; i++) work += lens[i];
#pragma omp parallel for schedule(static) if (work * h * dh > 200000)
    for (int64_t task = 0; task < b * hkv; task++) {
        const int64_t i = task / hkv, g = task % hkv;
        const int64_t n = lens[i], j0 = (window > 0 && n > window) ? n - window : 0, m = n - j0;
        float qf[16][256], acc[16][256];
        float *sc = (float *)malloc(sizeof(float) * rep * m);
        for (int64_t r = 0; r < rep; r++)
            for (int64_t e = 0; e < dh; e++) {
                qf[r][e] = bf2f(q[i * q_stride + (g * rep + r) * dh + e]);
                acc[r][e] = 0.f;
            }
        const int64_t *sl = slots + i * max_n;
        for (int64_t j = 0; j < m; j++) {
            const uint16_t *kr = kc + (g * s_slots + sl[j0 + j]) * dh;
            float kf[256];
            for (int64_t e = 0; e < dh; e++) kf[e] = bf2f(kr[e]);
            for (int64_t r = 0; r < rep; r++) {
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t e = 0; e < dh; e++) dot += qf[r][e] * kf[e];
                dot *= scale;
                if (softcap > 0.f) dot = softcap * tanhf(dot / softcap);
                sc[r * m + j] = dot;
            }
        }
        for (int64_t r = 0; r < rep; r++) {
            float mx = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < m; j++) mx = sc[r * m + j] > mx ? sc[r * m + j] : mx;
            for (int64_t j = 0; j < m; j++) {
                sc[r * m + j] = expf(sc[r * m + j] - mx);
                sum += sc[r * m + j];
            }
            for (int64_t j = 0; j < m; j++) sc[r * m + j] /= sum;
        }
        for (int64_t j = 0; j < m; j++) {
            const uint16_t *vr = vc + (g * s_slots + sl[j0 + j]) * dh;
            float vf[256];
            for (int64_t e = 0; e < dh; e++) vf[e] = bf2f(vr[e]);
            for (int64_t r = 0; r < rep; r++) {
                const float p = sc[r * m + j];
#pragma omp simd
                for (int64_t e = 0; e < dh; e++) acc[r][e] += p * vf[e];
            }
        }
        for (int64_t r = 0; r < rep; r++)
            for (int64_t e = 0; e < dh; e++) out[(i * h + g * rep + r) * dh + e] = f2bf(acc[r][e]);
        free(sc);
    }
}

/* ---- block-quantized matmul (GGUF-style codes kept packed) -------------------------------------------
 * A weight row is blocks of 32: w_i = s * q_i + o with q_i in 0 .. 2^bits - 1 (bits 4..8). Storage:
 * nibbles in pairs of blocks (32 bytes: byte j holds block 2i's code j in its low nibble and block 2i+1's
 * in its high one, so one widening load yields both blocks' 32 codes), one uint32 bit plane per code bit
 * above 4 (bit i = bit 4+p of q_i), and fp16 s and o per block: 20 bytes per block for 4-bit codes.
 *
 * The trick that makes it fast: for 0 <= v < 128 the bf16 bit pattern of 128 + v is 0x4300 | v, so a
 * code becomes a bf16 operand with one OR, and AVX512-BF16's vdpbf16ps does 32 multiply-adds per
 * instruction against bf16 activations, accumulating in fp32. With X = sum of a block's x:
 *   sum_i w_i x_i = s * D1 + 128 s * D2 + X * (o - 128 s),
 *   D1 = sum (128 + (q_i & 127)) x_i,  D2 = sum (q_i >> 7) x_i  (8-bit codes only; 0 and 1 are exact
 *   in bf16, 0x0000 and 0x3f80, so bit 7 needs no magic and adds no cancellation). */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

int ember_qgemm_available(void) { return 1; }

#define MAXM 8

/* codes of blocks 2i and 2i+1 from their 32 nibble bytes, as 32 words each */
static inline void unpack_pair(const uint8_t *nib, __m512i *wa, __m512i *wb) {
    __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)nib));
    *wa = _mm512_and_si512(w, _mm512_set1_epi16(15));
    *wb = _mm512_srli_epi16(w, 4);
}

/* add the bit planes (bits 4..6), set the bf16 magic; bit 7 (8-bit codes) goes to *top */
static inline __m512i finish(__m512i w, const uint32_t *pl, int np, __m512i *top) {
    for (int p = 0; p < np && p < 3; p++)
        w = _mm512_mask_add_epi16(w, (__mmask32)pl[p], w, _mm512_set1_epi16((short)(16 << p)));
    const __m512i magic = _mm512_set1_epi16(0x4300);
    if (np == 4) *top = _mm512_maskz_mov_epi16((__mmask32)pl[3], _mm512_set1_epi16(0x3f80));  /* bf16 1.0 */
    return _mm512_or_si512(w, magic);
}

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

static inline void store_block(__m512i w, __m512i top, int np, float s, float o, uint16_t *out) {
    /* back from 0x4300 | v to v (+ 128 for bit 7), then w = s v + o in fp32, rounded once to bf16 */
    __m512i v = _mm512_and_si512(w, _mm512_set1_epi16(0x7f));
    if (np == 4) v = _mm512_or_si512(v, _mm512_and_si512(top, _mm512_set1_epi16(0x80)));  /* 0x3f80 & 0x80 */
    const __m512 sv = _mm512_set1_ps(s), ov = _mm512_set1_ps(o);
    __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v))), sv, ov);
    __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1))), sv, ov);
    _mm512_storeu_si512((void *)out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

/* Rows [r0, r1) of the weight as bf16 [r1 - r0, K]: for prefill, where a bf16 matmul (AMX) wins. */
void ember_qdequant(const uint8_t *nib, const uint32_t *planes, int64_t np, const uint16_t *s16,
                    const uint16_t *o16, int64_t r0, int64_t r1, int64_t k, uint16_t *out) {
    const int64_t nb = k / 32, npairs = (nb + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t b = 0; b < nb; b += 2) {
            __m512i wa, wb, ta = _mm512_setzero_si512(), tb = ta;
            const uint32_t *pl = planes ? planes + (r * nb + b) * np : NULL;
            unpack_pair(nib + (r * npairs + b / 2) * 32, &wa, &wb);
            wa = finish(wa, pl, (int)np, &ta);
            store_block(wa, ta, (int)np, _cvtsh_ss(s16[r * nb + b]), _cvtsh_ss(o16[r * nb + b]),
                        out + (r - r0) * k + b * 32);
            if (b + 1 < nb) {
                wb = finish(wb, pl ? pl + np : NULL, (int)np, &tb);
                store_block(wb, tb, (int)np, _cvtsh_ss(s16[r * nb + b + 1]), _cvtsh_ss(o16[r * nb + b + 1]),
                            out + (r - r0) * k + (b + 1) * 32);
            }
        }
    }
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
