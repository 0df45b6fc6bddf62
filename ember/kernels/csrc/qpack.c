/* Load-time repacking, the part of loading a GGUF model that touches every weight.
 *
 * ember_gguf_decode: raw GGUF blocks -> the canonical form of quant/gguf_blocks.py (w = q * scale + offset,
 *   u8 codes [n, k], fp32 scale and offset per group of 32, or 16 for Q6_K); the same values, bit for bit,
 *   as the PyTorch decoders there (which stay as the fallback and the reference its tests compare with).
 * ember_qtile_pack: canonical rows -> qtile.c's tiles (16 rows; per block of 32 eight groups of 4 codes,
 *   nibbles or bytes; fp16 scale / offset [tile][block][16], or [tile][block][2][16] with a scale per 16).
 * ember_gguf_pack: both in one pass, a tile of 16 rows at a time (its canonical rows stay in the cache): the
 *   load reads the file once and writes the tiles once, instead of writing and re-reading a byte per weight.
 * ember_qtile_rows_f32: tiles -> rows again, in fp32 (token embeddings, the head's exact top candidates).
 * Block layouts: ggml-quants / gguf-py quants.py. */
#pragma GCC optimize("no-fast-math")  /* the half conversions below rely on exact IEEE rounding */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qtile.h"

enum { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K };

static inline float half(uint16_t h) {  /* IEEE half -> fp32, exact */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3ffu;
    union { uint32_t u; float f; } v;
    if (e == 31) v.u = sign | 0x7f800000u | (m << 13);
    else if (e == 0) { v.f = (float)m * 5.9604644775390625e-8f; v.u |= sign; }  /* m * 2^-24 */
    else v.u = sign | ((e + 112u) << 23) | (m << 13);
    return v.f;
}

static inline float h2f(const uint8_t *p) { return half((uint16_t)(p[0] | (p[1] << 8))); }  /* little-endian */

/* 16 bytes -> 32 codes: element j is the low nibble of byte j, j + 16 the high one */
static inline void nibbles(const uint8_t *qs, uint8_t *q) {
    for (int j = 0; j < 16; j++) { q[j] = qs[j] & 15; q[j + 16] = qs[j] >> 4; }
}

/* 4-bit codes plus a fifth bit from a little-endian 32-bit field */
static inline void nibbles_hi(const uint8_t *qs, const uint8_t *qh, uint8_t *q) {
    nibbles(qs, q);
    for (int j = 0; j < 32; j++) q[j] |= (uint8_t)(((qh[j >> 3] >> (j & 7)) & 1) << 4);
}

/* Q4_K / Q5_K: 12 bytes -> the 6-bit scale and min of sub-block j */
static inline void k_ints(const uint8_t *s, int j, int8_t *sc, int8_t *mn) {
    if (j < 4) { *sc = (int8_t)(s[j] & 63); *mn = (int8_t)(s[j + 4] & 63); return; }
    *sc = (int8_t)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
    *mn = (int8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
}

/* one block of `kind` -> its codes q, scales s and offsets o (per 32, per 16 for Q6_K) */
static void decode_block(int kind, const uint8_t *b, uint8_t *q, float *s, float *o) {
    switch (kind) {
    case Q4_0: s[0] = h2f(b); o[0] = -8.0f * s[0]; nibbles(b + 2, q); return;
    case Q4_1: s[0] = h2f(b); o[0] = h2f(b + 2); nibbles(b + 4, q); return;
    case Q5_0: s[0] = h2f(b); o[0] = -16.0f * s[0]; nibbles_hi(b + 6, b + 2, q); return;
    case Q5_1: s[0] = h2f(b); o[0] = h2f(b + 2); nibbles_hi(b + 8, b + 4, q); return;
    case Q8_0:
        s[0] = h2f(b); o[0] = -128.0f * s[0];
        for (int j = 0; j < 32; j++) q[j] = (uint8_t)((int8_t)b[2 + j] + 128);
        return;
    case Q4_K: case Q5_K: {  /* chunk i of 32 bytes: low nibbles = sub-block 2i, high = 2i + 1 */
        const float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t *qs = b + (kind == Q4_K ? 16 : 48), *qh = b + 16;
        for (int j = 0; j < 8; j++) {
            int8_t sc, mn;
            k_ints(b + 4, j, &sc, &mn);
            s[j] = d * (float)sc; o[j] = -(dmin * (float)mn);
            const int shift = (j & 1) * 4;
            for (int l = 0; l < 32; l++) {
                uint8_t v = (qs[(j >> 1) * 32 + l] >> shift) & 15;
                if (kind == Q5_K) v |= (uint8_t)(((qh[l] >> j) & 1) << 4);
                q[j * 32 + l] = v;
            }
        }
        return;
    }
    case Q6_K: {  /* half h: ql 64 bytes (runs 0/1 low nibbles, 2/3 high), qh 32 bytes (run r: bits 2r, 2r+1) */
        const float d = h2f(b + 208);
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 4; r++)
                for (int l = 0; l < 32; l++) {
                    const int at = r * 32 + l;
                    const uint8_t lo = (b[h * 64 + (at & 63)] >> ((at >> 6) * 4)) & 15;
                    const uint8_t hi = (b[128 + h * 32 + l] >> (2 * r)) & 3;
                    q[h * 128 + at] = (uint8_t)(lo | (hi << 4));
                }
        for (int j = 0; j < 16; j++) { s[j] = d * (float)(int8_t)b[192 + j]; o[j] = -32.0f * s[j]; }
        return;
    }
    }
}

static const int BLOCK_BYTES[] = {18, 20, 22, 24, 34, 144, 176, 210};
static const int BLOCK_ELEMS[] = {32, 32, 32, 32, 32, 256, 256, 256};
static const int BLOCK_GROUPS[] = {1, 1, 1, 1, 1, 8, 8, 16};

/* one raw row of `kind` -> its q [k], s, o [k / group] */
static void decode_row(int kind, const uint8_t *raw, int64_t k, uint8_t *q, float *s, float *o) {
    const int64_t nblk = k / BLOCK_ELEMS[kind];
    for (int64_t i = 0; i < nblk; i++)
        decode_block(kind, raw + i * BLOCK_BYTES[kind], q + i * BLOCK_ELEMS[kind], s + i * BLOCK_GROUPS[kind],
                     o + i * BLOCK_GROUPS[kind]);
}

/* raw [n][row_bytes] (row_bytes = k / elems * block bytes) -> q [n, k], s, o [n, k / group] */
void ember_gguf_decode(int64_t kind, const uint8_t *raw, int64_t n, int64_t k, uint8_t *q, float *s, float *o) {
    const int64_t groups = k / BLOCK_ELEMS[kind] * BLOCK_GROUPS[kind];
    const int64_t row_bytes = k / BLOCK_ELEMS[kind] * BLOCK_BYTES[kind];
#pragma omp parallel for schedule(static) if (n * k > 262144)
    for (int64_t r = 0; r < n; r++)
        decode_row((int)kind, raw + r * row_bytes, k, q + r * k, s + r * groups, o + r * groups);
}

static inline uint16_t f2h(float x) {  /* fp32 -> IEEE half, round to nearest even (as torch's .half()) */
    union { float f; uint32_t u; } v = { x };
    const uint32_t sign = (v.u >> 16) & 0x8000u, a = v.u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);      /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);     /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {  /* below 2^-14: a subnormal half; adding 0.5 rounds to a multiple of 2^-24 */
        v.u = a;
        v.f += 0.5f;
        return (uint16_t)(sign | (v.u - 0x3f000000u));
    }
    return (uint16_t)(sign | (((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10)));
}

/* one tile: canonical rows q [rows, k], s, o [rows, k / group] (rows <= 16: the tile's first rows) ->
 * codes [nb][layout_bytes] (qtile.h), s16, o16 [nb][per][16] (per = 2 when sub16: a group-32 scale then appears in both
 * halves); missing rows get zero codes, scales and offsets. */
static void pack_tile(const uint8_t *q, const float *s, const float *o, int64_t rows, int64_t k, int64_t group,
                      int64_t layout, int64_t sub16, uint8_t *codes, uint16_t *s16, uint16_t *o16) {
    const int64_t nb = k / 32, per = sub16 ? 2 : 1, groups = k / group;
    const int64_t cb = layout_bytes(layout);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *c = codes + b * cb;
        uint16_t *ss = s16 + b * per * 16, *oo = o16 + b * per * 16;
        for (int r = 0; r < 16; r++) {
            if (r >= rows) {
                for (int g = 0; g < cb / 64; g++) memset(c + g * 64 + r * 4, 0, 4);
                for (int h = 0; h < per; h++) ss[h * 16 + r] = oo[h * 16 + r] = 0;
                continue;
            }
            const uint8_t *u = q + r * k + b * 32;
            for (int h = 0; h < per; h++) {  /* half h of the block is group (b * 32 + h * 16) / group */
                const int64_t at = r * groups + (b * 32 + h * 16) / group;
                ss[h * 16 + r] = f2h(s[at]);
                oo[h * 16 + r] = f2h(o[at]);
            }
            if (layout == BYTES) {
                for (int g = 0; g < 8; g++) memcpy(c + g * 64 + r * 4, u + g * 4, 4);
                continue;
            }
            for (int j = 0; j < 4; j++)  /* chunk j: group 2j in the low nibbles, 2j + 1 in the high */
                for (int i = 0; i < 4; i++)
                    c[j * 64 + r * 4 + i] = (uint8_t)((u[8 * j + i] & 15) | (u[8 * j + 4 + i] & 15) << 4);
            if (layout == FIVE)  /* chunk 4: bit 4 of group g at bit g */
                for (int i = 0; i < 4; i++) {
                    uint8_t top = 0;
                    for (int g = 0; g < 8; g++) top |= (uint8_t)((u[g * 4 + i] >> 4 & 1) << g);
                    c[256 + r * 4 + i] = top;
                }
            if (layout == SIX)  /* chunk 4 + h: bits 4-5 of group 4h + g at bits 2g */
                for (int h = 0; h < 2; h++)
                    for (int i = 0; i < 4; i++) {
                        uint8_t top = 0;
                        for (int g = 0; g < 4; g++) top |= (uint8_t)((u[(4 * h + g) * 4 + i] >> 4 & 3) << (2 * g));
                        c[256 + h * 64 + r * 4 + i] = top;
                    }
        }
    }
}

/* The load's fast path for the commonest kinds: raw rows straight to a tile's code bytes, 32-bit words at a
 * time, without the canonical form in between (a byte per weight written, then read back per nibble: ~3 ns a
 * weight, 11 s of an 8B Q4_K_M load). A word holds a code group (4 codes of one row, one per byte); nibbles
 * chunk j = group 2j | group 2j + 1 << 4, the 2-bit planes of SIX 4 groups << 0, 2, 4, 6 (no carries:
 * each byte's value fits). Same bytes as pack_tile. */
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static int fast_kind(int64_t kind, int64_t layout) {
    return ((kind == Q4_0 || kind == Q4_1 || kind == Q4_K) && layout == NIBBLES) || (kind == Q6_K && layout == SIX);
}

/* row r of a tile: its raw row -> the code bytes of every block (codes: the tile's [nb][layout bytes]) */
static void fast_codes(int kind, const uint8_t *raw, int64_t k, int r, uint8_t *codes) {
    const int64_t nb = k / 32, cb = kind == Q6_K ? 384 : 256;
    const uint32_t m4 = 0x0F0F0F0Fu, m2 = 0x03030303u;
    for (int64_t b = 0; b < nb; b++) {
        uint32_t w[8], t[8];
        uint8_t *c = codes + b * cb + r * 4;
        if (kind == Q4_0 || kind == Q4_1) {  /* q[l] = qs[l] & 15, q[l + 16] = qs[l] >> 4 */
            const uint8_t *qs = raw + b * BLOCK_BYTES[kind] + (kind == Q4_0 ? 2 : 4);
            for (int g = 0; g < 4; g++) { const uint32_t x = rd32(qs + 4 * g); w[g] = x & m4; w[g + 4] = x >> 4 & m4; }
        } else if (kind == Q4_K) {  /* sub-block b % 8: the low (even) or high (odd) nibbles of its pair's 32 bytes */
            const uint8_t *qs = raw + (b / 8) * 144 + 16 + (b % 8 / 2) * 32;
            const int sh = 4 * (b & 1);
            for (int g = 0; g < 8; g++) w[g] = rd32(qs + 4 * g) >> sh & m4;
        } else {  /* Q6_K: block b % 8 = half h, run j: low nibbles of ql, 2 bits of qh (decode_block's indexing) */
            const uint8_t *blk = raw + (b / 8) * 210;
            const int h = (int)(b % 8 / 4), j = (int)(b % 4);
            for (int g = 0; g < 8; g++) {
                w[g] = rd32(blk + h * 64 + (j & 1) * 32 + 4 * g) >> (4 * (j >> 1)) & m4;
                t[g] = rd32(blk + 128 + h * 32 + 4 * g) >> (2 * j) & m2;
            }
            for (int hh = 0; hh < 2; hh++)
                wr32(c + 256 + hh * 64, t[4 * hh] | t[4 * hh + 1] << 2 | t[4 * hh + 2] << 4 | t[4 * hh + 3] << 6);
        }
        for (int j = 0; j < 4; j++) wr32(c + j * 64, w[2 * j] | w[2 * j + 1] << 4);
    }
}

/* the fast path's scales for Q4_0 / Q4_1 (fp16 s, o per block, as pack_tile rounds decode_block's floats) */
static void fast_scales(int kind, const uint8_t *raw, int64_t k, int r, uint16_t *s16, uint16_t *o16) {
    for (int64_t b = 0; b < k / 32; b++) {
        const uint8_t *blk = raw + b * BLOCK_BYTES[kind];
        const float s = h2f(blk), o = kind == Q4_0 ? -8.0f * s : h2f(blk + 2);
        s16[b * 16 + r] = f2h(s);
        o16[b * 16 + r] = f2h(o);
    }
}

/* canonical q [n, k], s, o [n, k / group] (group 32 or 16) -> codes [T][nb][layout_bytes], s16, o16
 * [T][nb][per][16]; rows past n of the last tile are zeros */
void ember_qtile_pack(const uint8_t *q, const float *s, const float *o, int64_t n, int64_t k, int64_t group,
                      int64_t layout, int64_t sub16, uint8_t *codes, uint16_t *s16, uint16_t *o16) {
    const int64_t nb = k / 32, tiles = (n + 15) / 16, per = sub16 ? 2 : 1, groups = k / group;
#pragma omp parallel for schedule(static) if (n * k > 262144)
    for (int64_t t = 0; t < tiles; t++)
        pack_tile(q + t * 16 * k, s + t * 16 * groups, o + t * 16 * groups, n - t * 16 < 16 ? n - t * 16 : 16, k,
                  group, layout, sub16, codes + t * nb * layout_bytes(layout), s16 + t * nb * per * 16,
                  o16 + t * nb * per * 16);
}

/* raw GGUF rows of `kind` [n][row bytes] -> tiles, as decode then pack would write them, a tile at a time */
void ember_gguf_pack(int64_t kind, const uint8_t *raw, int64_t n, int64_t k, int64_t layout, int64_t sub16,
                     uint8_t *codes, uint16_t *s16, uint16_t *o16) {
    const int64_t nb = k / 32, tiles = (n + 15) / 16, per = sub16 ? 2 : 1;
    const int64_t group = BLOCK_ELEMS[kind] / BLOCK_GROUPS[kind], groups = k / group;
    const int64_t row_bytes = k / BLOCK_ELEMS[kind] * BLOCK_BYTES[kind];
#pragma omp parallel if (n * k > 262144)
    {
        uint8_t *q = malloc((size_t)(16 * k));
        float *s = malloc(sizeof(float) * (size_t)(16 * groups)), *o = malloc(sizeof(float) * (size_t)(16 * groups));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t rows = n - t * 16 < 16 ? n - t * 16 : 16;
            if ((kind == Q4_0 || kind == Q4_1) && layout == NIBBLES && rows == 16) {  /* fast_codes + fast_scales */
                for (int r = 0; r < 16; r++) {
                    fast_codes((int)kind, raw + (t * 16 + r) * row_bytes, k, r, codes + t * nb * layout_bytes(layout));
                    fast_scales((int)kind, raw + (t * 16 + r) * row_bytes, k, r, s16 + t * nb * 16, o16 + t * nb * 16);
                }
                continue;
            }
            for (int64_t r = 0; r < rows; r++)
                decode_row((int)kind, raw + (t * 16 + r) * row_bytes, k, q + r * k, s + r * groups, o + r * groups);
            pack_tile(q, s, o, rows, k, group, layout, sub16, codes + t * nb * layout_bytes(layout),
                      s16 + t * nb * per * 16, o16 + t * nb * per * 16);
        }
        free(q);
        free(s);
        free(o);
    }
}

/* raw Q4_K / Q5_K / Q6_K rows [n][row bytes] -> tiles with K-quant scales (qtile.h's ks): the codes as
 * ember_gguf_pack writes them; d16 [T][k / 256][2][16] fp16 d, dmin; ints [T][k / 32][32] scales and mins */
void ember_gguf_pack_ks(int64_t kind, const uint8_t *raw, int64_t n, int64_t k, int64_t layout, uint8_t *codes,
                        uint16_t *d16, int8_t *ints) {
    const int64_t nb = k / 32, nsb = k / 256, tiles = (n + 15) / 16, row_bytes = nsb * BLOCK_BYTES[kind];
    const int64_t sub16 = kind == Q6_K, per = sub16 ? 2 : 1, group = 256 / BLOCK_GROUPS[kind], groups = k / group;
#pragma omp parallel if (n * k > 262144)
    {
        uint8_t *q = malloc((size_t)(16 * k));
        float *s = malloc(sizeof(float) * (size_t)(16 * groups)), *o = malloc(sizeof(float) * (size_t)(16 * groups));
        uint16_t *scratch = malloc(sizeof(uint16_t) * (size_t)(nb * per * 16));  /* pack_tile's fp16 scales: unused */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t rows = n - t * 16 < 16 ? n - t * 16 : 16;
            if (fast_kind(kind, layout) && rows == 16) {
                for (int r = 0; r < 16; r++)
                    fast_codes((int)kind, raw + (t * 16 + r) * row_bytes, k, r, codes + t * nb * layout_bytes(layout));
            } else {
                for (int64_t r = 0; r < rows; r++)
                    decode_row((int)kind, raw + (t * 16 + r) * row_bytes, k, q + r * k, s + r * groups, o + r * groups);
                pack_tile(q, s, o, rows, k, group, layout, sub16, codes + t * nb * layout_bytes(layout), scratch, scratch);
            }
            uint16_t *dt = d16 + t * nsb * 32;
            int8_t *it = ints + t * nb * 32;
            memset(dt, 0, sizeof(uint16_t) * (size_t)(nsb * 32));
            memset(it, 0, (size_t)(nb * 32));
            for (int64_t r = 0; r < rows; r++)
                for (int64_t j = 0; j < nsb; j++) {
                    const uint8_t *b = raw + (t * 16 + r) * row_bytes + j * BLOCK_BYTES[kind];
                    if (kind == Q6_K) {
                        dt[j * 32 + r] = (uint16_t)(b[208] | b[209] << 8);
                        for (int i = 0; i < 16; i++) it[(j * 8 + i / 2) * 32 + (i % 2) * 16 + r] = (int8_t)b[192 + i];
                        continue;
                    }
                    dt[j * 32 + r] = (uint16_t)(b[0] | b[1] << 8);
                    dt[j * 32 + 16 + r] = (uint16_t)(b[2] | b[3] << 8);
                    for (int i = 0; i < 8; i++) k_ints(b + 4, i, &it[(j * 8 + i) * 32 + r], &it[(j * 8 + i) * 32 + 16 + r]);
                }
        }
        free(q);
        free(s);
        free(o);
        free(scratch);
    }
}

/* Rows `rows[i]` (any order) in fp32 [n, K], q * s + o in gguf-py's two roundings (Q6_K, which gguf-py
 * computes as (q - 32) * s, may differ in the last bit): token embeddings and the head's exact
 * top-candidate recompute read the packed head itself. */
__attribute__((optimize("fp-contract=off")))  /* q * s + o in two roundings, as the reference computes it */
void ember_qtile_rows_f32(const uint8_t *codes, int64_t mode, const uint16_t *s16, const uint16_t *o16,
                          const int64_t *rows, int64_t n, int64_t k, float *out) {
    const tiled_w w = tiled(codes, mode, s16, o16, k);
    const int64_t nb = w.nb, halves = w.sub16 ? 2 : 1, zexp = w.zexp, layout = layout_of(&w), cb = block_bytes(&w);
#pragma omp parallel for schedule(static) if (n * k > 65536)
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = rows[i] / 16, r = rows[i] % 16;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t at = t * nb + b;
            uint8_t q[32];  /* row r's 32 codes of this block: 8 groups of 4, nibble or byte */
            for (int g = 0; g < 8; g++)
                for (int kk = 0; kk < 4; kk++)
                    q[g * 4 + kk] = layout == BYTES ? codes[at * cb + g * 64 + r * 4 + kk]
                                   : (uint8_t)((codes[at * cb + (g / 2) * 64 + r * 4 + kk] >> (4 * (g % 2)) & 15)
                                               | (layout == SIX ? (codes[at * cb + 256 + (g / 4) * 64 + r * 4 + kk]
                                                                   >> (2 * (g % 4)) & 3) << 4 : 0)
                                               | (layout == FIVE ? (codes[at * cb + 256 + r * 4 + kk] >> g & 1) << 4 : 0));
            float *dst = out + i * k + b * 32;
            for (int hh = 0; hh < 2; hh++) {  /* one scale per 32, or one per 16 */
                const int64_t si = (at * halves + (halves == 2 ? hh : 0)) * 16 + r;
                float s, o;
                if (w.ks) {  /* qtile.h: d sc and -(dmin m) */
                    const uint16_t *d = ks_d(&w, t, b);
                    const int8_t *q8 = ks_ints(&w, t, b);
                    s = half(d[r]) * (float)q8[(halves == 2 ? hh : 0) * 16 + r];
                    o = zexp ? 0.f : -(half(d[16 + r]) * (float)q8[16 + r]);
                } else {
                    s = half(s16[si]);
                    o = zexp ? 0.f : half(o16[si]);
                }
                if (zexp) o = -(float)(1 << zexp) * s;
                for (int j = 0; j < 16; j++) dst[hh * 16 + j] = (float)q[hh * 16 + j] * s + o;
            }
        }
    }
}
