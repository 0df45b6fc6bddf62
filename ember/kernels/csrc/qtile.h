/* Shared by the two builds of the packed matmul: qtile.c (AVX512-VNNI, AMX) and qtile_avx2.c (AVX2, AVX-VNNI).
 * Both read the same tiles and quantize activations to the same integers, and share one float epilogue per
 * lane, so they give the same bits. */
#pragma once
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

/* Code layouts of a (tile, block): 16 rows x 32 k in 8 groups of 4 k, group g = 64 bytes [row][4] as bytes.
 *   NIBBLES (4-bit codes), 256 bytes: chunk j of 64 holds group 2j in its low nibbles, 2j + 1 in the high;
 *   FIVE (5-bit codes), 320 bytes: the low 4 bits as NIBBLES, then one chunk of the fifth bits, group g's at
 *     bit g (the same byte position as the group's code);
 *   SIX (6-bit codes), 384 bytes: the low 4 bits as NIBBLES, then 2 chunks of the top 2 bits, chunk h
 *     holding group 4h + i in bits 2i, 2i + 1 (the same byte position as the group's code);
 *   BYTES (7-8 bit codes), 512 bytes: group g at 64 g. */
enum { NIBBLES = 0, BYTES = 1, SIX = 2, FIVE = 3 };
static inline int64_t layout_bytes(int64_t layout) {
    return layout == NIBBLES ? 256 : layout == SIX ? 384 : layout == FIVE ? 320 : 512;
}

typedef struct {
    const uint8_t *codes;      /* [ntiles][nb][256, 384 or 512] */
    const uint16_t *s16, *o16; /* [ntiles][nb][16] or [ntiles][nb][2][16] */
    int bits8;                 /* codes wider than 4 bits (the FIVE, SIX or BYTES layout) */
    int sub16;                 /* a scale and offset per 16 k (two halves of 4 groups each) */
    int64_t nb;
    int narrow;                /* codes of 5-6 bits in the SIX layout (mode flag 8), or FIVE with `five` */
    int zexp;                  /* 0, or offsets o = -2^zexp s (Q4_0, Q5_0, Q8_0, Q6_K): o16 is never read */
    int ks;                    /* K-quant scales (mode bit 8), see below */
    int five;                  /* 5-bit codes in the FIVE layout (mode bit 9, with bits 0 and 3) */
} tiled_w;

/* mode bits 4-7: zexp (symmetric kinds store no offsets, which a decode step would stream for nothing) */
static inline tiled_w tiled(const uint8_t *codes, int64_t mode, const uint16_t *s16, const uint16_t *o16,
                            int64_t k) {
    const tiled_w w = {codes, s16, o16, (int)(mode & 1), (int)(mode >> 1 & 1), k / 32, (int)(mode >> 3 & 1),
                       (int)(mode >> 4 & 15), (int)(mode >> 8 & 1), (int)(mode >> 9 & 1)};
    return w;
}

/* K-quant scales (Q4_K, Q5_K, Q6_K, as the file stores them: 0.5-0.56 bits a weight, not fp16 per 32 or 16 at
 * 1-2): s16 holds fp16 d and dmin per row and super-block of 256, [ntiles][nb / 8][2][16]; o16, as int8,
 * the integer scale and min per row and block of 32 ([ntiles][nb][sc 16 | min 16]), or per 16 for Q6_K
 * ([ntiles][nb][half 0 | half 1], no mins: zexp). s = d sc, o = -(dmin m): exact fp32 products of an fp16
 * and an integer below 2^8, the numbers gguf-py's dequantizer computes. */
static inline const uint16_t *ks_d(const tiled_w *w, int64_t t, int64_t b) {
    return w->s16 + (t * (w->nb / 8) + b / 8) * 32;
}
static inline const int8_t *ks_ints(const tiled_w *w, int64_t t, int64_t b) {
    return (const int8_t *)w->o16 + (t * w->nb + b) * 32;
}

static inline int layout_of(const tiled_w *w) {
    return w->bits8 ? (w->narrow ? (w->five ? FIVE : SIX) : BYTES) : NIBBLES;
}
static inline int64_t block_bytes(const tiled_w *w) { return layout_bytes(layout_of(w)); }

/* a decode step streams the weights from DRAM once: asking 4 KiB past a block of cb bytes hides part of the
 * latency the hardware prefetcher leaves (the 168M-weight Gemma head: -12..20 %; prefetches never fault) */
#if defined(EMBER_QTILE_512) || defined(EMBER_QTILE_256)
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *blk, int64_t cb) {
    for (int64_t o = 0; o < cb; o += 64) _mm_prefetch((const char *)(blk + 4096 + o), _MM_HINT_T0);
}
#endif

/* Layers with a scale per 16 (Q6_K, alone or fused with other kinds) in the int8 mode take activations per 256,
 * as llama.cpp's Q8_K, where a scale per 16 would cost two float epilogues per block: with Q6_K's own integer
 * scales (ks) a super-block's sum of sc (u - 32) h is an exact integer (|.| < 2^28) and one float step per
 * super-block remains (prefill 1.4-1.6x); with fp16 scales the activation scale leaves the per-16 step. */
static inline int q8k(const tiled_w *w, int two) {  /* Q6_K's codes: SIX, or BYTES when fused with 8-bit ones */
    return !two && w->sub16 && w->nb % 8 == 0 && w->bits8 && !w->five;
}

typedef struct {  /* quantized activations */
    int8_t *h, *l;  /* [M, K]; l only in the exact mode (NULL otherwise) */
    float *d, *xs;  /* [M, nb]: d (d / 256 in the exact mode); sum of x per block ([M, nb, 2]: per half with sub16) */
    int32_t *hz;    /* q8k: d is [M, K / 256]; per half [M, nb, 2], hz = -2^zexp sum h (the dot products' start) or
                     * xs = sum h (no d: it is applied per super-block) */
    int32_t *hs;    /* the AVX2 build without VNNI, int8 mode: sum h per half [M, nb, 2] (8-bit codes' sign trick) */
} qact;

/* C11 aligned_alloc wants a size that is a multiple of the alignment (macOS returns NULL otherwise) */
static inline void *alloc64(size_t n) { return aligned_alloc(64, (n + 127) & ~(size_t)63); }

static inline qact qact_alloc(int64_t m_pad, int64_t k, int two, int q8k, int hs) {
    const int64_t nb = k / 32;
    qact a = {alloc64((size_t)(m_pad * k)), two ? alloc64((size_t)(m_pad * k)) : NULL,
              alloc64((size_t)(m_pad * nb) * 4), alloc64((size_t)(m_pad * nb) * 8),
              q8k ? alloc64((size_t)(m_pad * nb) * 8) : NULL, hs ? alloc64((size_t)(m_pad * nb) * 8) : NULL};
    return a;
}

static inline void release(qact *a) {
    free(a->h);
    free(a->l);  /* NULL outside the exact mode: free(NULL) is a no-op */
    free(a->d);
    free(a->xs);
    free(a->hz);
    free(a->hs);
}

/* gemv(): every tile against the activation rows in groups of <= 4 (<= 8 on AVX512: 32 vector registers
 * hold 8 accumulators beside the 8 code groups, and each tile block's codes are unpacked once per 8 rows),
 * calling ROWS(MR, TWO, w, a, t, m0, n, k, y_f32, y_bf16), each build's register-blocked kernel, with MR and
 * the mode as constants per call site (the accumulators stay in registers, the loop has no branch). A row's
 * numbers do not depend on its group: integer block sums, then the same float epilogue per row. */
#define EMBER_GEMV_CASE(ROWS, MR)                                                                              \
    case MR: ROWS(MR, 0, w, a, t, m0, n, k, y_f32, y_bf16); break;                                             \
    case MR + 8: ROWS(MR, 1, w, a, t, m0, n, k, y_f32, y_bf16); break;
#define EMBER_GEMV_CASES_4(ROWS) \
    EMBER_GEMV_CASE(ROWS, 1) EMBER_GEMV_CASE(ROWS, 2) EMBER_GEMV_CASE(ROWS, 3) EMBER_GEMV_CASE(ROWS, 4)
#define EMBER_GEMV_CASES_8(ROWS) \
    EMBER_GEMV_CASES_4(ROWS) EMBER_GEMV_CASE(ROWS, 5) EMBER_GEMV_CASE(ROWS, 6) EMBER_GEMV_CASE(ROWS, 7) \
    EMBER_GEMV_CASE(ROWS, 8)

/* NAME(...): ROWS on every tile, GROUP (4 or 8) rows per register block */
#define EMBER_DEFINE_GEMV(NAME, ROWS, GROUP)                                                                   \
    static void NAME(const tiled_w *w, const qact *a, int64_t m_rows, int64_t n, int64_t k, float *y_f32,      \
                     uint16_t *y_bf16) {                                                                       \
        const int64_t ntiles = (n + 15) / 16;                                                                  \
        const int two = a->l != NULL;                                                                          \
        _Pragma("omp parallel for schedule(static) if (n * k > 65536)")                                        \
        for (int64_t t = 0; t < ntiles; t++)                                                                   \
            for (int64_t m0 = 0; m0 < m_rows; m0 += GROUP) {                                                   \
                switch ((m_rows - m0 < GROUP ? m_rows - m0 : GROUP) + 8 * two) {                               \
                    EMBER_GEMV_CASES_##GROUP(ROWS)                                                             \
                    default: break;                                                                            \
                }                                                                                              \
            }                                                                                                  \
    }
