/* The packed matmul of qtile.c for CPUs without AVX512: AVX2 + FMA + F16C (x86-64-v3), with AVX-VNNI's
 * 256-bit vpdpbusd where the CPU has it (Alder Lake and later), else vpmaddubsw + vpmaddwd.
 *
 * Same tiles, same activation integers, same per-lane float epilogue as qtile.c, so both builds give the
 * same bits. A tile's 16 weight rows are two halves of 8 lanes (bytes 0-31 and 32-63 of each 64-byte code
 * group): both on one pass over the blocks where the registers allow, else one half, then the other from
 * cache.
 *
 * Without VNNI the int8 products are summed in int16 lanes first (vpmaddubsw: u8 x s8, pairs added), which
 * must not saturate (see sums). */
#pragma GCC optimize("no-fast-math")  /* the float epilogue must round as qtile.c's does */
#include <string.h>

#include "qtile.h"

#ifdef EMBER_QTILE_256

#if defined(__AVXVNNI__)
#define VNNI256(acc, u, h) _mm256_dpbusd_avx_epi32(acc, u, h)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)  /* the EVEX form: lets an AVX512 CPU test this path */
#define VNNI256(acc, u, h) _mm256_dpbusd_epi32(acc, u, h)
#define SIGN8 0
#else
#define SIGN8 1  /* 8-bit codes take the sign trick (sums), which wants sum h per half block */
#endif

int ember_qtile_available(void) { return 1; }
int ember_qtile_amx_built(void) { return 0; }
int ember_amx_available(void) { return 0; }

/* code group g (0..7) of weight rows 8 r8 .. 8 r8 + 7 in one (tile, block): 8 rows x 4 k, as u8 (qtile.h) */
static inline __attribute__((always_inline)) __m256i group_codes(const int CODE, const uint8_t *blk, int g, int r8) {
    if (CODE == BYTES) return _mm256_loadu_si256((const __m256i *)(blk + g * 64 + r8 * 32));
    const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + (g >> 1) * 64 + r8 * 32));
    const __m256i lo = _mm256_and_si256(g & 1 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
    if (CODE == NIBBLES) return lo;
    if (CODE == FIVE) {  /* bit g to bit 4 */
        const __m256i t = _mm256_loadu_si256((const __m256i *)(blk + 256 + r8 * 32));
        const __m256i at = g < 4 ? _mm256_slli_epi16(t, 4 - g) : g > 4 ? _mm256_srli_epi16(t, g - 4) : t;
        return _mm256_or_si256(lo, _mm256_and_si256(at, _mm256_set1_epi8(0x10)));
    }
    const __m256i t = _mm256_loadu_si256((const __m256i *)(blk + 256 + (g >> 2) * 64 + r8 * 32));
    const int sh = 2 * (g & 3);  /* bits sh, sh + 1 to bits 4, 5 */
    const __m256i at = sh < 4 ? _mm256_slli_epi16(t, 4 - sh) : sh > 4 ? _mm256_srli_epi16(t, sh - 4) : t;
    return _mm256_or_si256(lo, _mm256_and_si256(at, _mm256_set1_epi8(0x30)));
}

static inline __attribute__((always_inline)) __m256i bcast4(const int8_t *q) {  /* 4 int8 to every lane */
    return _mm256_set1_epi32(*(const int32_t *)q);
}


/* The exact int32 sums s[p][r][m] of NG code groups from g0 (8: a block; 4: half of one, a scale of Q6_K) for
 * part p of the activations (h, l), tile half r0 + r (8 rows, one per lane) and activation row m. Every bound
 * is a compile-time constant, so the loops unroll and the sums stay in registers; NH = 2 does both tile halves
 * on one broadcast of each activation group. Integer sums are exact in any order: the AVX512 build's bits. */
static inline __attribute__((always_inline)) void sums(const int MR, const int TWO, const int CODE, const int NH,
                                                       const int NG, const uint8_t *blk, int r0, int g0,
                                                       const int8_t *qh, const int8_t *ql, int64_t k,
                                                       const int32_t *hs, int64_t nb, __m256i s[2][2][4]) {
    const int P = 1 + TWO;
#ifdef VNNI256
    /* two chains per sum where there are few sums: vpdpbusd's latency, not its throughput, bounds one chain */
    const int CH = MR * P * NH < 4 ? 2 : 1;
    __m256i c[2][2][2][4];
    for (int ch = 0; ch < CH; ch++)
        for (int p = 0; p < P; p++)
            for (int r = 0; r < NH; r++)
                for (int m = 0; m < MR; m++) c[ch][p][r][m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int g = g0; g < g0 + NG; g++) {
        __m256i u[2];
        for (int r = 0; r < NH; r++) u[r] = group_codes(CODE, blk, g, r0 + r);
        for (int m = 0; m < MR; m++)
            for (int p = 0; p < P; p++) {
                const __m256i a = bcast4((p ? ql : qh) + m * k + g * 4);
                for (int r = 0; r < NH; r++) c[g % CH][p][r][m] = VNNI256(c[g % CH][p][r][m], u[r], a);
            }
    }
    for (int p = 0; p < P; p++)
        for (int r = 0; r < NH; r++)
            for (int m = 0; m < MR; m++)
                s[p][r][m] = CH == 2 ? _mm256_add_epi32(c[0][p][r][m], c[1][p][r][m]) : c[0][p][r][m];
#else
    /* vpmaddubsw adds two u8 x s8 products into an int16 lane, saturating: |a| <= 128, so nibbles (<= 3840 a
     * lane) sum over 8 groups in int16, bytes < 64 (<= 16128) over 2, and wider bytes split into nibbles */
    const __m256i one = _mm256_set1_epi16(1), nib = _mm256_set1_epi8(15);
    if (CODE == BYTES && !TWO) {
        /* the int8 mode's |h| <= 127 allows llama.cpp's sign trick for 8-bit codes: q = u - 128 as int8, |q| times
         * h with q's sign in vpmaddubsw (a lane <= 2 * 128 * 127, no saturation), widened every group: one
         * multiply per group where nibbles take two (1.2x); sum u h = sum q h + 128 sum h, the same integers */
        __m256i c[2][4];
        for (int r = 0; r < NH; r++)
            for (int m = 0; m < MR; m++) c[r][m] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int g = g0; g < g0 + NG; g++) {
            __m256i q[2], aq[2];
            for (int r = 0; r < NH; r++) {
                q[r] = _mm256_xor_si256(group_codes(CODE, blk, g, r0 + r), _mm256_set1_epi8((char)0x80));
                aq[r] = _mm256_abs_epi8(q[r]);
            }
            for (int m = 0; m < MR; m++) {
                const __m256i a = bcast4(qh + m * k + g * 4);
                for (int r = 0; r < NH; r++)
                    c[r][m] = _mm256_add_epi32(c[r][m], _mm256_madd_epi16(_mm256_maddubs_epi16(aq[r], _mm256_sign_epi8(a, q[r])), one));
            }
        }
        for (int m = 0; m < MR; m++) {
            const int32_t *hm = hs + m * nb * 2;  /* sum h per half block of row m */
            const __m256i hz = _mm256_set1_epi32((NG == 8 ? hm[0] + hm[1] : hm[g0 / 4]) * 128);
            for (int r = 0; r < NH; r++) s[0][r][m] = _mm256_add_epi32(c[r][m], hz);
        }
        return;
    }
    __m256i lo[2][2][4], hi[2][2][4];
    for (int p = 0; p < P; p++)
        for (int r = 0; r < NH; r++)
            for (int m = 0; m < MR; m++) lo[p][r][m] = hi[p][r][m] = s[p][r][m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int g = g0; g < g0 + NG; g++) {
        __m256i u[2], uh[2];
        for (int r = 0; r < NH; r++) {
            u[r] = group_codes(CODE, blk, g, r0 + r);
            if (CODE == BYTES) {
                uh[r] = _mm256_and_si256(_mm256_srli_epi16(u[r], 4), nib);
                u[r] = _mm256_and_si256(u[r], nib);
            }
        }
        for (int m = 0; m < MR; m++)
            for (int p = 0; p < P; p++) {
                const __m256i a = bcast4((p ? ql : qh) + m * k + g * 4);
                for (int r = 0; r < NH; r++) {
                    lo[p][r][m] = _mm256_add_epi16(lo[p][r][m], _mm256_maddubs_epi16(u[r], a));
                    if (CODE == BYTES) hi[p][r][m] = _mm256_add_epi16(hi[p][r][m], _mm256_maddubs_epi16(uh[r], a));
                    if ((CODE == SIX || CODE == FIVE) && g % 2) {  /* two groups summed: widen to int32 */
                        s[p][r][m] = _mm256_add_epi32(s[p][r][m], _mm256_madd_epi16(lo[p][r][m], one));
                        lo[p][r][m] = _mm256_setzero_si256();
                    }
                }
            }
    }
    for (int p = 0; p < P; p++)
        for (int r = 0; r < NH; r++)
            for (int m = 0; m < MR; m++) {
                if (CODE == NIBBLES) s[p][r][m] = _mm256_madd_epi16(lo[p][r][m], one);
                if (CODE == BYTES)
                    s[p][r][m] = _mm256_add_epi32(_mm256_madd_epi16(lo[p][r][m], one),
                                                  _mm256_madd_epi16(hi[p][r][m], _mm256_set1_epi16(16)));
            }
#endif
}

static inline __m256 ints8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }

/* qtile.c's scales16 for the 8 rows of tile half r8 */
static inline __attribute__((always_inline)) void scales8(const tiled_w *w, int64_t t, int64_t b, int hf, int halves,
                                                          int r8, __m256 *sv, __m256 *ov) {
    if (w->ks) {
        const uint16_t *d = ks_d(w, t, b) + r8 * 8;
        const int8_t *q = ks_ints(w, t, b) + r8 * 8;
        *sv = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d)), ints8(q + hf * 16));
        if (!w->zexp) {
            const __m256 dm = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + 16))), ints8(q + 16));
            *ov = _mm256_xor_ps(dm, _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)));
        }
    } else {
        const int64_t at = ((t * w->nb + b) * halves + hf) * 16 + r8 * 8;
        *sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->s16 + at)));
        if (!w->zexp) *ov = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->o16 + at)));
    }
    if (w->zexp) *ov = _mm256_mul_ps(*sv, _mm256_set1_ps(-(float)(1 << w->zexp)));
}

static inline void store_out8(__m256 v, int64_t m, int64_t n, int64_t r0, float *y_f32, uint16_t *y_bf16) {
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    for (int64_t i = 0; i < 8 && r0 + i < n; i++) {
        if (y_f32) y_f32[m * n + r0 + i] = tmp[i];
        else y_bf16[m * n + r0 + i] = f2bf(tmp[i]);
    }
}

/* one tile of 16 weight rows against activation rows m0 .. m0 + MR (MR <= 4; TWO: the exact mode; CODE: the
 * code layout, qtile.h; SUB16: a scale per 16 k), all constants here so that nothing branches per block */
static inline __attribute__((always_inline)) void tile_kernel(const int MR, const int TWO, const int CODE,
                                                              const int SUB16, const tiled_w *w, const qact *a,
                                                              int64_t t, int64_t m0, int64_t n, int64_t k,
                                                              float *y_f32, uint16_t *y_bf16) {
    /* both tile halves on one pass over the blocks, except where the exact mode's two activation parts leave too
     * few registers (8-bit codes, 4 rows, int8 mode: 1.35x over one half, on 16 registers, despite spills) */
    const int NH = !TWO || MR * (CODE == BYTES ? 4 : 2) <= 4 ? 2 : 1;
    const int halves = SUB16 ? 2 : 1;
    const int64_t cb = layout_bytes(CODE);
    for (int r0 = 0; r0 < 2; r0 += NH) {  /* with NH = 1 the second half re-reads the tile from cache */
        __m256 acc[2][4];
        for (int r = 0; r < NH; r++)
            for (int m = 0; m < MR; m++) acc[r][m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < w->nb; b++) {
            const uint8_t *blk = w->codes + (t * w->nb + b) * cb;
            if (r0 == 0)
                prefetch_ahead(blk, cb);
            const int8_t *qh = a->h + m0 * k + b * 32, *ql = TWO ? a->l + m0 * k + b * 32 : NULL;
            const int32_t *hs = a->hs ? a->hs + (m0 * w->nb + b) * 2 : NULL;
            for (int hf = 0; hf < halves; hf++) {
                __m256i s[2][2][4];
                sums(MR, TWO, CODE, NH, 8 / halves, blk, r0, hf * 4, qh, ql, k, hs, w->nb, s);
                for (int r = 0; r < NH; r++) {
                    __m256 sv, ov;
                    scales8(w, t, b, hf, halves, r0 + r, &sv, &ov);
                    for (int m = 0; m < MR; m++) {  /* qtile.c's epilogue, 8 lanes */
                        const __m256i hs = s[0][r][m];
                        const __m256 f = _mm256_cvtepi32_ps(TWO ? _mm256_add_epi32(_mm256_slli_epi32(hs, 8), s[1][r][m]) : hs);
                        const int64_t ab = (m0 + m) * w->nb + b;
                        acc[r][m] = _mm256_fmadd_ps(f, _mm256_mul_ps(sv, _mm256_set1_ps(a->d[ab])), acc[r][m]);
                        acc[r][m] = _mm256_fmadd_ps(ov, _mm256_set1_ps(a->xs[ab * halves + hf]), acc[r][m]);
                    }
                }
            }
        }
        for (int r = 0; r < NH; r++)
            for (int m = 0; m < MR; m++) store_out8(acc[r][m], m0 + m, n, t * 16 + (r0 + r) * 8, y_f32, y_bf16);
    }
}

/* qtile.c's gemv_q8k (a scale per 16 in the int8 mode, activations per 256; KS: Q6_K's own scales) on 8-lane
 * halves: the same sums per super-block in the same order, the same float step */
static inline __attribute__((always_inline)) void tile_q8k(const int MR, const int CODE, const int KS,
                                                           const tiled_w *w, const qact *a, int64_t t, int64_t m0,
                                                           int64_t n, int64_t k, float *y_f32, uint16_t *y_bf16) {
    const int NH = 2;  /* both tile halves on one pass at every row count: 1.2x (4 rows) - 1.4x (64) over one */
    const int64_t cb = layout_bytes(CODE), nb = w->nb, nsb = nb / 8;
    for (int r0 = 0; r0 < 2; r0 += NH) {
        __m256 acc[2][4];
        for (int r = 0; r < NH; r++)
            for (int m = 0; m < MR; m++) acc[r][m] = _mm256_setzero_ps();
        for (int64_t sb = 0; sb < nsb; sb++) {
            __m256i isum[2][4];
            __m256 fsum[2][4];
            for (int r = 0; r < NH; r++)
                for (int m = 0; m < MR; m++) isum[r][m] = _mm256_setzero_si256(), fsum[r][m] = _mm256_setzero_ps();
            for (int64_t b = sb * 8; b < sb * 8 + 8; b++) {
                const uint8_t *blk = w->codes + (t * nb + b) * cb;
                if (r0 == 0)
                    prefetch_ahead(blk, cb);
                for (int hf = 0; hf < 2; hf++) {
                    __m256i s[2][2][4];
                    sums(MR, 0, CODE, NH, 4, blk, r0, hf * 4, a->h + m0 * k + b * 32, NULL, k,
                         a->hs ? a->hs + (m0 * nb + b) * 2 : NULL, nb, s);
                    for (int r = 0; r < NH; r++) {
                        __m256i sc = _mm256_setzero_si256();
                        __m256 sv = _mm256_setzero_ps(), ov = _mm256_setzero_ps();
                        if (KS) sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(ks_ints(w, t, b) + hf * 16 + (r0 + r) * 8)));
                        else scales8(w, t, b, hf, 2, r0 + r, &sv, &ov);
                        for (int m = 0; m < MR; m++) {
                            const int64_t ab = ((m0 + m) * nb + b) * 2 + hf;
                            if (KS) {
                                const __m256i dot = _mm256_add_epi32(s[0][r][m], _mm256_set1_epi32(a->hz[ab]));
                                isum[r][m] = _mm256_add_epi32(isum[r][m], _mm256_mullo_epi32(dot, sc));
                            } else {
                                fsum[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0][r][m]), sv, fsum[r][m]);
                                fsum[r][m] = _mm256_fmadd_ps(ov, _mm256_set1_ps(a->xs[ab]), fsum[r][m]);
                            }
                        }
                    }
                }
            }
            for (int r = 0; r < NH; r++) {
                const __m256 dw = KS ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ks_d(w, t, sb * 8) + (r0 + r) * 8)))
                                     : _mm256_setzero_ps();
                for (int m = 0; m < MR; m++) {
                    const __m256 dx = _mm256_set1_ps(a->d[(m0 + m) * nsb + sb]);
                    acc[r][m] = KS ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][m]), _mm256_mul_ps(dw, dx), acc[r][m])
                                   : _mm256_fmadd_ps(fsum[r][m], dx, acc[r][m]);
                }
            }
        }
        for (int r = 0; r < NH; r++)
            for (int m = 0; m < MR; m++) store_out8(acc[r][m], m0 + m, n, t * 16 + (r0 + r) * 8, y_f32, y_bf16);
    }
}

static inline __attribute__((always_inline)) void gemv_tile(const int MR, const int TWO, const tiled_w *w,
                                                            const qact *a, int64_t t, int64_t m0, int64_t n,
                                                            int64_t k, float *y_f32, uint16_t *y_bf16) {
#define EMBER_TILE(C, S) tile_kernel(MR, TWO, C, S, w, a, t, m0, n, k, y_f32, y_bf16)
    switch (layout_of(w) * 2 + w->sub16) {
        case NIBBLES * 2: EMBER_TILE(NIBBLES, 0); break;
        case NIBBLES * 2 + 1: EMBER_TILE(NIBBLES, 1); break;
        case SIX * 2: EMBER_TILE(SIX, 0); break;
        case SIX * 2 + 1: EMBER_TILE(SIX, 1); break;
        case FIVE * 2: EMBER_TILE(FIVE, 0); break;
        case FIVE * 2 + 1: EMBER_TILE(FIVE, 1); break;
        case BYTES * 2: EMBER_TILE(BYTES, 0); break;
        default: EMBER_TILE(BYTES, 1); break;
    }
#undef EMBER_TILE
}

EMBER_DEFINE_GEMV(gemv, gemv_tile, 4)

static inline __attribute__((always_inline)) void q8k_tile(const int MR, const int TWO, const tiled_w *w,
                                                           const qact *a, int64_t t, int64_t m0, int64_t n,
                                                           int64_t k, float *y_f32, uint16_t *y_bf16) {
    if (TWO) return;  /* the int8 mode only: no exact-mode copies compiled */
#define EMBER_Q8K(C) \
    (w->ks ? tile_q8k(MR, C, 1, w, a, t, m0, n, k, y_f32, y_bf16) : tile_q8k(MR, C, 0, w, a, t, m0, n, k, y_f32, y_bf16))
    if (layout_of(w) == SIX) EMBER_Q8K(SIX);  /* or BYTES: qtile.h's q8k */
    else EMBER_Q8K(BYTES);
#undef EMBER_Q8K
}

EMBER_DEFINE_GEMV(gemv_q8k, q8k_tile, 4)

/* 4 x 8 int32 (each in int8 range) -> 32 int8 in order */
static inline __m256i pack8x4(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static inline __m256 load8(const void *x, int x_f32, int64_t at) {  /* 8 activations, bf16 or fp32, as fp32 */
    return x_f32 ? _mm256_loadu_ps((const float *)x + at) : bf16x8(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + at)));
}

/* qtile.c's quantize_q8k, bit for bit: per row and super-block d = max|x| / 127; per 16 hz or xs */
static void quantize_q8k(const void *x, int x_f32, int64_t m_rows, int64_t k, int zexp, qact *a) {
    const int64_t nb = k / 32, nsb = k / 256;
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
#pragma omp parallel for schedule(static) if (m_rows * k > 65536)
    for (int64_t i = 0; i < m_rows * nsb; i++) {
        const int64_t at = i / nsb * k + i % nsb * 256;
        __m256 v[32], mx = _mm256_setzero_ps();
        for (int j = 0; j < 32; j++) mx = _mm256_max_ps(mx, _mm256_and_ps(v[j] = load8(x, x_f32, at + j * 8), abs));
        const float amax = hmax8(mx);
        a->d[i] = amax / 127.f;
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        for (int j = 0; j < 32; j += 4) {
            __m256i h[4];
            for (int e = 0; e < 4; e++) h[e] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j + e], inv));  /* nearest even */
            _mm256_storeu_si256((__m256i *)(a->h + at + j * 8), pack8x4(h[0], h[1], h[2], h[3]));
            for (int e = 0; e < 2; e++) {
                const int hs = hsum8i(_mm256_add_epi32(h[2 * e], h[2 * e + 1]));
                const int64_t at16 = (i / nsb * nb + i % nsb * 8) * 2 + j / 2 + e;
                a->hz[at16] = -hs * (1 << zexp);
                if (a->hs) a->hs[at16] = hs;
                a->xs[at16] = (float)hs;
            }
        }
    }
}

/* x [M, K] (bf16 or fp32) -> the integers, scales and block sums of qtile.c's quantize, bit for bit */
static qact quantize(const void *x, int x_f32, int64_t m_rows, int64_t k, const tiled_w *w, int two) {
    const int64_t nb = k / 32;
    const int sub16 = w->sub16;
    qact a = qact_alloc(m_rows, k, two, q8k(w, two), SIGN8 && !two && layout_of(w) == BYTES);
    if (q8k(w, two)) {
        quantize_q8k(x, x_f32, m_rows, k, w->zexp, &a);
        return a;
    }
#pragma omp parallel for schedule(static) if (m_rows * k > 65536)
    for (int64_t i = 0; i < m_rows * nb; i++) {
        const int64_t m = i / nb, b = i % nb, at = m * k + b * 32;
        __m256 v[4];  /* x[0..8), [8..16), [16..24), [24..32): qtile.c's v[0] = v[0..1], v[1] = v[2..3] */
        for (int j = 0; j < 4; j++) v[j] = load8(x, x_f32, at + j * 8);
        const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        const float amax = hmax8(_mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                                               _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs))));
        a.d[i] = two ? amax / 127.f / 256.f : amax / 127.f;
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i h[4], l[4];
        for (int j = 0; j < 4; j++) {
            const __m256 tq = _mm256_mul_ps(v[j], inv);
            h[j] = _mm256_cvtps_epi32(tq);  /* round to nearest even */
            const __m256 r = _mm256_mul_ps(_mm256_sub_ps(tq, _mm256_cvtepi32_ps(h[j])), _mm256_set1_ps(256.f));
            l[j] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(-128)), _mm256_set1_epi32(127));
        }
        /* qtile.c's block sums: exact in the exact mode (_mm512_reduce_add_ps halves first: the upper 8 lanes
         * plus the lower 8), of the quantized x^ in the int8 mode */
        if (two && sub16) {
            a.xs[2 * i] = hsum8(_mm256_add_ps(v[1], v[0]));
            a.xs[2 * i + 1] = hsum8(_mm256_add_ps(v[3], v[2]));
        } else if (two) {
            a.xs[i] = hsum8(_mm256_add_ps(_mm256_add_ps(v[1], v[3]), _mm256_add_ps(v[0], v[2])));
        } else {
            const int s0 = hsum8i(_mm256_add_epi32(h[0], h[1])), s1 = hsum8i(_mm256_add_epi32(h[2], h[3]));
            if (a.hs) a.hs[2 * i] = s0, a.hs[2 * i + 1] = s1;
            if (sub16) {
                a.xs[2 * i] = (float)s0 * a.d[i];
                a.xs[2 * i + 1] = (float)s1 * a.d[i];
            } else {
                a.xs[i] = (float)(s0 + s1) * a.d[i];
            }
        }
        _mm256_storeu_si256((__m256i *)(a.h + at), pack8x4(h[0], h[1], h[2], h[3]));
        if (two) _mm256_storeu_si256((__m256i *)(a.l + at), pack8x4(l[0], l[1], l[2], l[3]));
    }
    return a;
}

/* y[m, n] = sum_k x[m, k] w[n, k]; the signature of qtile.c's (use_amx: there is no AMX here) */
void ember_qtile_matmul(const uint8_t *codes, int64_t mode, const uint16_t *s16, const uint16_t *o16,
                        const void *x, int64_t x_f32, int64_t m_rows, int64_t n, int64_t k, float *y_f32,
                        uint16_t *y_bf16, int64_t use_amx) {
    (void)use_amx;
    const tiled_w w = tiled(codes, mode, s16, o16, k);
    const int two = (int)(mode >> 2 & 1);  /* the exact two-part activations */
    qact a = quantize(x, (int)x_f32, m_rows, k, &w, two);
    (q8k(&w, two) ? gemv_q8k : gemv)(&w, &a, m_rows, n, k, y_f32, y_bf16);
    release(&a);
}
#endif
