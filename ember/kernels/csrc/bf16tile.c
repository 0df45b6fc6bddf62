/* Dense bf16 matmul on vdpbf16ps (AVX512-BF16), for F16 / BF16 checkpoints (GGUF or safetensors).
 *
 * Weights: bf16, in tiles of 16 rows like qtile.c: per tile and pair of k one 64-byte vector [16 rows][2 k],
 * the operand layout of vdpbf16ps with the rows as lanes, so one instruction does 16 rows x 2 k and a
 * decode step reads each tile front to back (the same bytes as the weight, no padding but the last tile's
 * rows). Activations: bf16 pairs (fp32 inputs rounded to bf16 once, nearest even), broadcast per row.
 * Every output element sums its k pairs in the same order, in the same CH chains, whatever the number of
 * rows in the call and the group a row lands in: a sequence's numbers do not depend on the batch it is in,
 * on how its prompt was chunked or on a cached prefix (torch's bf16 linear picks other kernels, with other
 * rounding, per shape). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#ifdef EMBER_BF16_512

int ember_bf16_available(void) { return 1; }

/* w bf16 [n, k] (k a multiple of 4: CH chains of k pairs) -> tiles [ceil(n / 16)][k / 2][16][2]; the last
 * tile's missing rows are zeros */
void ember_bf16_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *tiles) {
    const int64_t kp = k / 2, ntiles = (n + 15) / 16;
#pragma omp parallel for schedule(static) if (n * k > 262144)
    for (int64_t t = 0; t < ntiles; t++) {
        uint32_t *dst = (uint32_t *)tiles + t * kp * 16;
        for (int64_t r = 0; r < 16; r++) {
            const int64_t row = t * 16 + r;
            const uint32_t *src = (const uint32_t *)(w + row * k);  /* a pair of bf16 as one 32-bit word */
            if (row >= n)
                for (int64_t p = 0; p < kp; p++) dst[p * 16 + r] = 0;
            else
                for (int64_t p = 0; p < kp; p++) dst[p * 16 + r] = src[p];
        }
    }
}

/* the inverse, for a tied embedding or a check: tiles -> rows `ids` in fp32 [n_ids, k] */
void ember_bf16_rows_f32(const uint16_t *tiles, const int64_t *ids, int64_t n_ids, int64_t k, float *out) {
    const int64_t kp = k / 2;
#pragma omp parallel for schedule(static) if (n_ids * k > 65536)
    for (int64_t i = 0; i < n_ids; i++) {
        const uint16_t *base = tiles + (ids[i] / 16) * kp * 32 + (ids[i] % 16) * 2;
        for (int64_t p = 0; p < kp; p++) {
            out[i * k + 2 * p] = bf2f(base[p * 32]);
            out[i * k + 2 * p + 1] = bf2f(base[p * 32 + 1]);
        }
    }
}

/* Register blocks of 24 accumulators (rows x tiles x CH chains), which only decide which sums run side by
 * side, never their order: up to 3 rows (a decode step) meet NT = 4 tiles (64 weight rows: four streams from
 * DRAM, ~10 % more bandwidth at one row than two); more rows go up to 6 at a time against 2 tiles, each
 * weight vector meeting 6 rows (64-512 rows: 1.05x over 3 x 4). 1B-shape linears, 2 threads, against
 * torch's oneDNN bf16: 2.1x at 1 row, 1.6x at 8, 1.1x at 64, 0.9x at 512. CH: k pairs p, p + 1 go to two
 * chains, fixed for every call (one chain would wait on vdpbf16ps's latency at one row). */
enum { NT = 4, MR_FEW = 3, NT_MANY = 2, MR_MANY = 6, MR_MAX = 6, CH = 2 };

/* acc + w . (the bf16 pair at x, to every lane) through vdpbf16ps's own {1to16} broadcast: one broadcast
 * register shared by 4 tiles had cost a vector op per 4 dot products, and gcc 12 does not fold
 * _mm512_set1_epi32(*x) into the instruction (8-128 rows: 1.25-1.6x; the same products, the same bits) */
static inline __attribute__((always_inline)) __m512 dpbf16_bcast(__m512 acc, __m512bh w, const uint32_t *x) {
    __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
    return acc;
}

/* nt <= NT tiles (16 weight rows each) against activation rows m0 .. m0 + MR: with MR and nt constants (all
 * but a last partial group of tiles) the accumulators and weight vectors stay in registers */
static inline __attribute__((always_inline)) void tile_rows(const int MR, const int nt, const uint16_t *tile,
                                                            int64_t tstride, const uint32_t *x, int64_t m0,
                                                            int64_t kp, float *acc_out) {
    __m512 acc[MR_MAX][NT][CH];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < nt; j++)
            for (int c = 0; c < CH; c++) acc[m][j][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp; p += CH) {
        for (int c = 0; c < CH; c++) {
            __m512bh wv[NT];
            for (int j = 0; j < nt; j++) wv[j] = (__m512bh)_mm512_loadu_si512((const void *)(tile + j * tstride + (p + c) * 32));
            for (int m = 0; m < MR; m++)
                for (int j = 0; j < nt; j++) acc[m][j][c] = dpbf16_bcast(acc[m][j][c], wv[j], x + (m0 + m) * kp + p + c);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < nt; j++) {
            __m512 s = acc[m][j][0];
            for (int c = 1; c < CH; c++) s = _mm512_add_ps(s, acc[m][j][c]);
            _mm512_storeu_ps(acc_out + (j * MR_MAX + m) * 16, s);
        }
}

static void store(const float *v, int64_t m, int64_t n, int64_t r0, float *y_f32, uint16_t *y_bf16) {
    const int64_t rows = n - r0 < 16 ? n - r0 : 16;
    for (int64_t i = 0; i < rows; i++) {
        if (y_f32) y_f32[m * n + r0 + i] = v[i];
        else y_bf16[m * n + r0 + i] = f2bf(v[i]);
    }
}

/* mr rows against nj tiles (nj = NTC, a constant, or fewer in a last partial group) */
#define BF16_CASES(MR, NTC)                                                 \
    case MR: tile_rows(MR, (int)nj, tl, kp * 32, xb, m0, kp, acc); break;   \
    case MR + 8: tile_rows(MR, NTC, tl, kp * 32, xb, m0, kp, acc); break;

/* y [M, N] = x [M, K] @ W.T; x bf16 or fp32 (x_f32), y fp32 or bf16 (whichever pointer is set) */
void ember_bf16_matmul(const uint16_t *tiles, const void *x, int64_t x_f32, int64_t m_rows, int64_t n, int64_t k,
                       float *y_f32, uint16_t *y_bf16) {
    const int64_t kp = k / 2, ntiles = (n + 15) / 16;
    uint32_t *conv = NULL;
    const uint32_t *xb = (const uint32_t *)x;
    if (x_f32) {  /* round to bf16 once: every tile reads the same activations */
        conv = aligned_alloc(64, ((size_t)(m_rows * k) * 2 + 127) & ~(size_t)63);
        const float *xf = (const float *)x;
        uint16_t *dst = (uint16_t *)conv;
#pragma omp parallel for schedule(static) if (m_rows * k > 65536)
        for (int64_t i = 0; i < m_rows * k; i++) dst[i] = f2bf(xf[i]);
        xb = conv;
    }
    /* rows in blocks of MB (their bf16 activations stay in L2 while every tile passes); within a block each
     * group of NT tiles meets the rows a register block at a time, its weights read from L2 after the first */
    const int64_t MB = 64;
#pragma omp parallel if (n * k > 65536)
    for (int64_t mb = 0; mb < m_rows; mb += MB) {
        const int64_t m_end = mb + MB < m_rows ? mb + MB : m_rows;
#pragma omp for schedule(static)
        for (int64_t tt = 0; tt < (ntiles + NT - 1) / NT; tt++) {
            const int64_t t = tt * NT, nt = ntiles - t < NT ? ntiles - t : NT;  /* a last partial group */
            const uint16_t *tile = tiles + t * kp * 32;
            float acc[NT * MR_MAX * 16];
            const int few = m_rows <= MR_FEW;
            const int64_t step = few ? MR_FEW : MR_MANY, width = few ? NT : NT_MANY;
            for (int64_t m0 = mb; m0 < m_end; m0 += step) {
                const int64_t mr = m_end - m0 < step ? m_end - m0 : step;
                for (int64_t j0 = 0; j0 < nt; j0 += width) {
                    const int64_t nj = nt - j0 < width ? nt - j0 : width;
                    const uint16_t *tl = tile + j0 * kp * 32;
                    if (few) {
                        switch (mr + 8 * (nj == NT)) {
                            BF16_CASES(1, NT) BF16_CASES(2, NT) BF16_CASES(3, NT)
                            default: break;
                        }
                    } else {
                        switch (mr + 8 * (nj == NT_MANY)) {
                            BF16_CASES(1, NT_MANY) BF16_CASES(2, NT_MANY) BF16_CASES(3, NT_MANY)
                            BF16_CASES(4, NT_MANY) BF16_CASES(5, NT_MANY) BF16_CASES(6, NT_MANY)
                            default: break;
                        }
                    }
                    for (int64_t j = 0; j < nj; j++)
                        for (int64_t m = 0; m < mr; m++)
                            store(acc + (j * MR_MAX + m) * 16, m0 + m, n, (t + j0 + j) * 16, y_f32, y_bf16);
                }
            }
        }
    }
    free(conv);
}

#else
int ember_bf16_available(void) { return 0; }
void ember_bf16_pack(void) {}
void ember_bf16_rows_f32(void) {}
void ember_bf16_matmul(void) {}
#endif
