/* Block-quantized matmul on AMX (Intel Sapphire Rapids and later): prefill chunks and many decoding
 * streams at once, at the cost of about one gemv whatever the number of rows.
 *
 * Each thread takes 16 weight rows at a time, turns their codes into bf16 operands in a slab that stays
 * in L1/L2, and multiplies it with every activation row through AMX tiles (one tdpbf16ps: 16 x 16 x 32
 * multiply-adds), scaling each block's sums in fp32. The weight is read from memory once per call.
 * Every output element is computed the same way whatever M is and wherever its row sits in the batch,
 * so a sequence's numbers never depend on its batch neighbours (batched output equals single output).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#include "blocks.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out the AMX register state only on request (once per process, for all its threads) */
int ember_amx_available(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tmm0-3: accumulators C [16 weight rows][16 activation rows] fp32 for up to 4 groups of 16 activation
 * rows; tmm4: weights A [16 rows][32 k] bf16; tmm5-7: activations B [16 k pairs][16 rows][2] bf16.
 * The tile configuration is per thread, so every thread of the parallel region sets it. */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* activations x bf16 [M, K] -> B tiles xt[block][tile] of 16 k pairs x 16 rows (1 KiB each), zero past M */
static uint32_t *pack_activations(const uint16_t *x, int64_t m_rows, int64_t k, int64_t mtiles) {
    const int64_t nb = k / 32;
    uint32_t *xt = aligned_alloc(64, (size_t)(nb * mtiles) * 1024);
    const uint32_t *x32 = (const uint32_t *)x;  /* a uint32 is a pair of neighbouring k */
#pragma omp parallel for schedule(static) if (m_rows * k > 65536)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t t = 0; t < mtiles; t++) {
            uint32_t *dst = xt + (b * mtiles + t) * 256;
            for (int64_t i = 0; i < 16; i++) {
                const int64_t m = t * 16 + i;
                for (int p = 0; p < 16; p++) dst[p * 16 + i] = m < m_rows ? x32[m * (k / 2) + b * 16 + p] : 0;
            }
        }
    return xt;
}

/* C [16 weight rows][16 activation rows] (a tile, or accumulators stored) -> y [M, N] at rows t*16..,
 * columns r0 .. r0 + rows: each activation row gathers its column of C */
static void store_tile(const float *c, int64_t t, int64_t m_rows, int64_t n, int64_t r0, int64_t rows,
                       float *y_f32, uint16_t *y_bf16) {
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    const __mmask16 mk = (__mmask16)((1u << rows) - 1);
    for (int64_t i = 0; i < 16 && t * 16 + i < m_rows; i++) {
        const __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32((int)i)), c, 4);
        const int64_t at = (t * 16 + i) * n + r0;
        if (y_f32) _mm512_mask_storeu_ps(y_f32 + at, mk, v);
        else _mm256_mask_storeu_epi16(y_bf16 + at, mk, (__m256i)_mm512_cvtneps_pbh(v));
    }
}

/* The slab holds the codes as bf16 128 + q (one OR each, see blocks.h), bit 7 of 8-bit codes
 * in a second slab as bf16 0 / 128. Per block, a tile product gives D = sum (128 + q) x for 16 x 16
 * (weight row, activation row) pairs, and y += s D + (o - 128 s) X with X the block's sum of x. */
static void build_codes(const packed_w *w, int64_t row, uint16_t *codes, uint16_t *top, float *s, float *o) {
    const int64_t nb = w->nb;
    for (int64_t b = 0; b < nb; b += 2) {
        __m512i wa, wb, ta, tb;
        const uint32_t *pl = w->planes ? w->planes + (row * nb + b) * w->np : NULL;
        unpack_pair(w->nib + (row * w->npairs + b / 2) * 32, &wa, &wb);
        _mm512_storeu_si512(codes + b * 32, finish(wa, pl, w->np, &ta));
        if (top) _mm512_storeu_si512(top + b * 32, _mm512_maskz_mov_epi16((__mmask32)pl[3], _mm512_set1_epi16(0x4300)));
        if (b + 1 < nb) {
            _mm512_storeu_si512(codes + (b + 1) * 32, finish(wb, pl ? pl + w->np : NULL, w->np, &tb));
            if (top) _mm512_storeu_si512(top + (b + 1) * 32,
                                         _mm512_maskz_mov_epi16((__mmask32)pl[w->np + 3], _mm512_set1_epi16(0x4300)));
        }
    }
    for (int64_t b = 0; b < nb; b += 16) {  /* scales and offsets - 128 s in fp32 */
        const __mmask16 mk = (__mmask16)(nb - b >= 16 ? 0xffff : (1u << (nb - b)) - 1);
        const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, w->s16 + row * nb + b));
        const __m512 ov = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, w->o16 + row * nb + b));
        _mm512_mask_storeu_ps(s + b, mk, sv);
        _mm512_mask_storeu_ps(o + b, mk, _mm512_fnmadd_ps(_mm512_set1_ps(128.f), sv, ov));
    }
}

/* acc[r] (over 16 activation rows) += s[r] D[r] + o[r] X for one block's tile product D */
static inline __attribute__((always_inline)) void scale_block(__m512 *acc, const float *d, __m512 xs,
                                                              const float *s, const float *o, int64_t nb) {
    for (int r = 0; r < 16; r++) {
        acc[r] = _mm512_fmadd_ps(_mm512_load_ps(d + r * 16), _mm512_set1_ps(s[r * nb]), acc[r]);
        acc[r] = _mm512_fmadd_ps(xs, _mm512_set1_ps(o[r * nb]), acc[r]);
    }
}

static void slab_codes(const packed_w *w, const uint32_t *xt, const float *xsum, int64_t m_rows, int64_t mtiles,
                       int64_t n, int64_t k, int64_t r0, int64_t rows, uint16_t *slab, uint16_t *top,
                       float *sc, float *y_f32, uint16_t *y_bf16) {
    const int64_t nb = w->nb;
    float *oc = sc + 16 * nb;  /* sc, oc: [16 rows][nb] */
    for (int64_t r = 0; r < 16; r++) {
        if (r < rows) {
            build_codes(w, r0 + r, slab + r * k, top ? top + r * k : NULL, sc + r * nb, oc + r * nb);
            continue;
        }
        memset(slab + r * k, 0, (size_t)k * 2);  /* missing rows of the last tile: zero codes and scales */
        if (top) memset(top + r * k, 0, (size_t)k * 2);
        memset(sc + r * nb, 0, (size_t)nb * 4);
        memset(oc + r * nb, 0, (size_t)nb * 4);
    }
    float c[2][256] __attribute__((aligned(64)));
    for (int64_t t = 0; t < mtiles; t++) {
        __m512 acc[16];
        for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
        /* two blocks per step on separate tiles (C 0/1, codes 4/6, x 5/7, bit 7: 2/3), so their tile
         * products overlap: a tile register is not renamed, reusing one waits for its last reader */
        for (int64_t b = 0; b < nb; b += 2) {
            const int pair = b + 1 < nb;
            const uint32_t *xb = xt + (b * mtiles + t) * 256;
            _tile_zero(0);
            _tile_loadd(4, slab + b * 32, k * 2);
            _tile_loadd(5, xb, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (top) { _tile_loadd(2, top + b * 32, k * 2); _tile_dpbf16ps(0, 2, 5); }
            if (pair) {
                _tile_zero(1);
                _tile_loadd(6, slab + (b + 1) * 32, k * 2);
                _tile_loadd(7, xb + mtiles * 256, 64);
                _tile_dpbf16ps(1, 6, 7);
                if (top) { _tile_loadd(3, top + (b + 1) * 32, k * 2); _tile_dpbf16ps(1, 3, 7); }
            }
            _tile_stored(0, c[0], 64);
            scale_block(acc, c[0], _mm512_load_ps(xsum + (b * mtiles + t) * 16), sc + b, oc + b, nb);
            if (pair) {
                _tile_stored(1, c[1], 64);
                scale_block(acc, c[1], _mm512_load_ps(xsum + ((b + 1) * mtiles + t) * 16), sc + b + 1, oc + b + 1, nb);
            }
        }
        for (int r = 0; r < 16; r++) _mm512_store_ps(c[0] + r * 16, acc[r]);
        store_tile(c[0], t, m_rows, n, r0, rows, y_f32, y_bf16);
    }
}

/* per (block, activation tile): the sums of x over the block, for the code path's offset term */
static float *block_sums(const uint16_t *x, int64_t m_rows, int64_t k, int64_t mtiles) {
    const int64_t nb = k / 32;
    float *xs = aligned_alloc(64, (size_t)(nb * mtiles) * 64);
    for (int64_t b = 0; b < nb; b++)
        for (int64_t m = 0; m < mtiles * 16; m++) {
            float acc = 0.f;
            if (m < m_rows)
                for (int j = 0; j < 32; j++) acc += bf2f(x[m * k + b * 32 + j]);
            xs[(b * mtiles + m / 16) * 16 + m % 16] = acc;
        }
    return xs;
}

/* y[m, n] = sum_k x[m, k] w[n, k] for any M. x bf16 [M, K]; y fp32 or bf16 [M, N]. */
void ember_qgemm_amx(const uint8_t *nib, const uint32_t *planes, int64_t np, const uint16_t *s16,
                     const uint16_t *o16, const uint16_t *x, int64_t m_rows, int64_t n, int64_t k,
                     float *y_f32, uint16_t *y_bf16) {
    const packed_w w = packed_view(nib, planes, np, s16, o16, k);
    const int64_t nb = w.nb, mtiles = (m_rows + 15) / 16, ntiles = (n + 15) / 16;
    uint32_t *xt = pack_activations(x, m_rows, k, mtiles);
    float *xsum = block_sums(x, m_rows, k, mtiles);
#pragma omp parallel if (n * k > 65536)
    {
        configure_tiles();
        const int two = np == 4;
        uint16_t *slab = aligned_alloc(64, (size_t)(16 * k) * 2 * (two ? 2 : 1));  /* 16 weight rows, bf16 */
        float *sc = aligned_alloc(64, (size_t)(nb * 16) * 8 + 64);  /* scales, offsets: [2][16][nb] */
#pragma omp for schedule(static)
        for (int64_t nt = 0; nt < ntiles; nt++) {
            const int64_t r0 = nt * 16, rows = n - r0 < 16 ? n - r0 : 16;
            slab_codes(&w, xt, xsum, m_rows, mtiles, n, k, r0, rows, slab, two ? slab + 16 * k : NULL, sc,
                       y_f32, y_bf16);
        }
        free(slab);
        free(sc);
        _tile_release();
    }
    free(xt);
    free(xsum);
}
#else
int ember_amx_available(void) { return 0; }
void ember_qgemm_amx(void) {}
#endif
