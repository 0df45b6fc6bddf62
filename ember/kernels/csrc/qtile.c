/* Block-quantized matmul on int8 dot products (AVX512-VNNI; AMX-INT8 for many rows).
 *
 * Weights: GGUF-style blocks of 32, w = s * u + o with unsigned codes u (4..8 bits) and fp16 s, o per block.
 * They are stored in tiles of 16 rows: per (tile, block) the codes of the 16 rows in 8 groups of 4
 * consecutive k, group g = 64 bytes [row][4] once unpacked (the operand layout of vpdpbusd and of AMX's B
 * tile), packed as 4-bit nibbles, 6-bit (nibbles + a 2-bit plane) or bytes (qtile.h's layouts); s, o as
 * fp16 [tile][block][16 rows] - or [tile][block][2 halves][16 rows] with a scale per 16 (Q6_K); no o where
 * the kind is symmetric (o = -2^zexp s: Q4_0, Q5_0, Q8_0, Q6_K).
 * Activations, per row and block of 32: int8 h = round(x / d) with d = max|x| / 127 (llama.cpp's Q8_0
 * numerics, the default: one dot product per code group), or, in the exact mode (mode bit 4), also l, the
 * rounded remainder, x ~ d (h + l / 256), ~16 bits of the activation kept for twice the integer work:
 *   sum_i w_i x_i = s d * sum u h + o * sum x,   or   s d/256 * (256 sum u h + sum u l) + o * sum x.
 * Lanes are the 16 weight rows, so a block's scaling is one fmadd for 16 outputs, and every output
 * element goes through exactly the same float operations whichever kernel (gemv or AMX) and batch
 * size computes it: batched output equals single output, bit for bit. */
#pragma GCC optimize("no-fast-math")  /* the float epilogue must not be re-associated differently per kernel */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qtile.h"

#ifdef EMBER_QTILE_512

int ember_qtile_available(void) { return 1; }

/* the 8 code groups of one (tile, block) as u8 vectors (layouts: qtile.h) */
static inline __attribute__((always_inline)) void load_codes(const tiled_w *w, int64_t t, int64_t b, __m512i *u) {
    const uint8_t *p = w->codes + (t * w->nb + b) * block_bytes(w);
    if (w->bits8 && !w->narrow) {
        for (int g = 0; g < 8; g++) u[g] = _mm512_loadu_si512((const void *)(p + g * 64));
        return;
    }
    const __m512i lo = _mm512_set1_epi8(15);
    for (int c = 0; c < 4; c++) {
        const __m512i v = _mm512_loadu_si512((const void *)(p + c * 64));
        u[2 * c] = _mm512_and_si512(v, lo);
        u[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo);
    }
    if (!w->bits8) return;
    if (w->five) {  /* bit g of chunk 4 to bit 4 of group g: u | (v' & 0x10) (16-bit shifts: no bit crosses into bit 4) */
        const __m512i v = _mm512_loadu_si512((const void *)(p + 256)), b4 = _mm512_set1_epi8(0x10);
        const __m512i at[8] = {_mm512_slli_epi16(v, 4), _mm512_slli_epi16(v, 3), _mm512_slli_epi16(v, 2),
                               _mm512_slli_epi16(v, 1), v, _mm512_srli_epi16(v, 1), _mm512_srli_epi16(v, 2),
                               _mm512_srli_epi16(v, 3)};
        for (int g = 0; g < 8; g++) u[g] = _mm512_ternarylogic_epi32(u[g], at[g], b4, 0xF8);
        return;
    }
    const __m512i top = _mm512_set1_epi8(0x30);
    for (int h = 0; h < 2; h++) {  /* bits 2g, 2g + 1 of chunk 4 + h to bits 4, 5 of group 4h + g: u | (v' & 0x30) */
        const __m512i v = _mm512_loadu_si512((const void *)(p + 256 + h * 64));
        const __m512i at[4] = {_mm512_slli_epi16(v, 4), _mm512_slli_epi16(v, 2), v, _mm512_srli_epi16(v, 2)};
        for (int g = 0; g < 4; g++) u[4 * h + g] = _mm512_ternarylogic_epi32(u[4 * h + g], at[g], top, 0xF8);
    }
}

/* acc (16 weight rows) += s d H + o X, or s d/256 (256 H + L) + o X in the exact mode: the one float epilogue
 * both kernels share */
static inline __attribute__((always_inline)) __m512 epilogue(__m512 acc, __m512i hsum, __m512i lsum, __m512 sv,
                                                             __m512 ov, float d, float xs, const int two) {
    const __m512 f = _mm512_cvtepi32_ps(two ? _mm512_add_epi32(_mm512_slli_epi32(hsum, 8), lsum) : hsum);
    acc = _mm512_fmadd_ps(f, _mm512_mul_ps(sv, _mm512_set1_ps(d)), acc);
    return _mm512_fmadd_ps(ov, _mm512_set1_ps(xs), acc);
}

static inline __m512 ints16(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }

/* the 16 rows' scales and offsets for (tile t, block b, half hf of `halves`): stored fp16, or d sc and
 * -(dmin m) (ks); offsets -2^zexp s where the kind is symmetric (exact: a power of two times s) */
static inline __attribute__((always_inline)) void scales16(const tiled_w *w, int64_t t, int64_t b, int hf,
                                                           int halves, __m512 *sv, __m512 *ov) {
    if (w->ks) {
        const uint16_t *d = ks_d(w, t, b);
        const int8_t *q = ks_ints(w, t, b);
        *sv = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d)), ints16(q + hf * 16));
        if (!w->zexp) {  /* -(dmin m): a sign flip of the product, as the decoder negates it */
            const __m512 dm = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + 16))), ints16(q + 16));
            *ov = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(dm), _mm512_set1_epi32((int)0x80000000u)));
        }
    } else {
        *sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->s16 + ((t * w->nb + b) * halves + hf) * 16)));
        if (!w->zexp) *ov = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->o16 + ((t * w->nb + b) * halves + hf) * 16)));
    }
    if (w->zexp) *ov = _mm512_mul_ps(*sv, _mm512_set1_ps(-(float)(1 << w->zexp)));
}

static inline void store_out(__m512 v, int64_t m, int64_t n, int64_t r0, float *y_f32, uint16_t *y_bf16) {
    const int64_t rows = n - r0 < 16 ? n - r0 : 16;
    const __mmask16 mk = (__mmask16)((1u << rows) - 1);
    if (y_f32) {
        _mm512_mask_storeu_ps(y_f32 + m * n + r0, mk, v);
        return;
    }
    float tmp[16];
    _mm512_storeu_ps(tmp, v);
    for (int64_t i = 0; i < rows; i++) y_bf16[m * n + r0 + i] = f2bf(tmp[i]);
}

/* acc + u . (4 int8 at q, to every lane), the activations read by vpdpbusd's own {1to16} broadcast: gcc 12 does
 * not fold _mm512_set1_epi32(*q) into it, and the separate vpbroadcastd costs a vector op per dot product
 * (prefill kernels 1.07-1.14x) */
static inline __attribute__((always_inline)) __m512i dpbusd_bcast(__m512i acc, __m512i u, const int32_t *q) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*q));
    return acc;
}

/* sum over groups g0 .. g0 + NG of u[g] . q[g] (4 int8 each), exact: in two chains where the caller has few
 * sums going, since one chain waits on vpdpbusd's latency */
static inline __attribute__((always_inline)) __m512i dots16(const int NG, const int CH, const __m512i *u, int g0,
                                                            const int32_t *q) {
    __m512i c[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int g = 0; g < NG; g++) c[g % CH] = dpbusd_bcast(c[g % CH], u[g0 + g], q + g);
    return CH == 2 ? _mm512_add_epi32(c[0], c[1]) : c[0];
}

/* one tile of 16 weight rows against activation rows m0 .. m0 + MR (MR <= 8, TWO: the exact mode, SUB16: a
 * scale per 16: constants per call site, so the loops unroll, the code groups stay in registers and the loop
 * has no branch) */
static inline __attribute__((always_inline)) void gemv_tile(const int MR, const int TWO, const int SUB16,
                                                            const tiled_w *w, const qact *a, int64_t t, int64_t m0,
                                                            int64_t n, int64_t k, float *y_f32, uint16_t *y_bf16) {
    __m512 acc[8];
    for (int m = 0; m < MR; m++) acc[m] = _mm512_setzero_ps();
    const int halves = SUB16 ? 2 : 1, gpart = 8 / halves;  /* code groups per scale */
    const int CH = MR * (1 + TWO) < 4 ? 2 : 1;
    const int64_t cb = block_bytes(w);
    for (int64_t b = 0; b < w->nb; b++) {
        __m512i u[8];
        prefetch_ahead(w->codes + (t * w->nb + b) * cb, cb);
        load_codes(w, t, b, u);
        for (int hf = 0; hf < halves; hf++) {
            __m512 sv, ov;
            scales16(w, t, b, hf, halves, &sv, &ov);
            for (int m = 0; m < MR; m++) {
                const int64_t q = (m0 + m) * k + b * 32 + hf * gpart * 4;
                const __m512i hs = dots16(gpart, CH, u, hf * gpart, (const int32_t *)(a->h + q));
                const __m512i ls = TWO ? dots16(gpart, CH, u, hf * gpart, (const int32_t *)(a->l + q))
                                       : _mm512_setzero_si512();
                acc[m] = epilogue(acc[m], hs, ls, sv, ov, a->d[(m0 + m) * w->nb + b],
                                  a->xs[((m0 + m) * w->nb + b) * halves + hf], TWO);
            }
        }
    }
    for (int m = 0; m < MR; m++) store_out(acc[m], m0 + m, n, t * 16, y_f32, y_bf16);
}

/* a tile with a scale per 16 (Q6_K, alone or fused) against rows m0 .. m0 + MR in the int8 mode, activations per
 * 256 (qtile.h's q8k). KS (Q6_K's own scales): per super-block the exact integer sum of sc (u - 32) h, begun at
 * hz = -32 sum h, then acc += (d dx) float(sum). Otherwise (fp16 scales) per super-block the float sum of
 * s float(sum u h) + o sum h per 16 (o = -2^zexp s where not stored: the same bits), then acc += dx sum.
 * The unroll pragmas matter: without them gcc keeps the row loops rolled and the sums in memory (-15 %). */
static inline __attribute__((always_inline)) void gemv_q8k(const int MR, const int KS, const tiled_w *w,
                                                           const qact *a, int64_t t, int64_t m0, int64_t n, int64_t k,
                                                           float *y_f32, uint16_t *y_bf16) {
    __m512 acc[8];
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) acc[m] = _mm512_setzero_ps();
    const int CH = MR < 4 ? 2 : 1;
    const int64_t cb = block_bytes(w), nsb = w->nb / 8;
    const int8_t *h = a->h + m0 * k;
    const int32_t *hz = a->hz + m0 * w->nb * 2;
    const float *xs = a->xs + m0 * w->nb * 2;
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512i isum[8];
        __m512 fsum[8];
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++) isum[m] = _mm512_setzero_si512(), fsum[m] = _mm512_setzero_ps();
        for (int64_t b = sb * 8; b < sb * 8 + 8; b++) {
            __m512i u[8];
            prefetch_ahead(w->codes + (t * w->nb + b) * cb, cb);
            load_codes(w, t, b, u);
#pragma GCC unroll 2
            for (int hf = 0; hf < 2; hf++) {
                __m512i sc = _mm512_setzero_si512();
                __m512 sv = _mm512_setzero_ps(), ov = _mm512_setzero_ps();
                if (KS) sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(ks_ints(w, t, b) + hf * 16)));
                else scales16(w, t, b, hf, 2, &sv, &ov);
#pragma GCC unroll 8
                for (int m = 0; m < MR; m++) {
                    const int32_t *q = (const int32_t *)(h + m * k + b * 32 + hf * 16);
                    const int64_t ab = (m * w->nb + b) * 2 + hf;
                    __m512i c[2] = {KS ? _mm512_set1_epi32(hz[ab]) : _mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 4
                    for (int g = 0; g < 4; g++)
                        c[g % CH] = dpbusd_bcast(c[g % CH], u[hf * 4 + g], q + g);
                    const __m512i dot = CH == 2 ? _mm512_add_epi32(c[0], c[1]) : c[0];
                    if (KS) {
                        isum[m] = _mm512_add_epi32(isum[m], _mm512_mullo_epi32(dot, sc));
                    } else {
                        fsum[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, fsum[m]);
                        fsum[m] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xs[ab]), fsum[m]);
                    }
                }
            }
        }
        const __m512 dw = KS ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ks_d(w, t, sb * 8))) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++) {
            const __m512 dx = _mm512_set1_ps(a->d[(m0 + m) * nsb + sb]);
            acc[m] = KS ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_mul_ps(dw, dx), acc[m])
                        : _mm512_fmadd_ps(fsum[m], dx, acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) store_out(acc[m], m0 + m, n, t * 16, y_f32, y_bf16);
}

static inline __attribute__((always_inline)) void gemv_rows(const int MR, const int TWO, const tiled_w *w,
                                                            const qact *a, int64_t t, int64_t m0, int64_t n,
                                                            int64_t k, float *y_f32, uint16_t *y_bf16) {
    if (w->sub16) gemv_tile(MR, TWO, 1, w, a, t, m0, n, k, y_f32, y_bf16);
    else gemv_tile(MR, TWO, 0, w, a, t, m0, n, k, y_f32, y_bf16);
}

EMBER_DEFINE_GEMV(gemv, gemv_rows, 8)

static inline __attribute__((always_inline)) void q8k_rows(const int MR, const int TWO, const tiled_w *w, const qact *a,
                                                           int64_t t, int64_t m0, int64_t n, int64_t k, float *y_f32,
                                                           uint16_t *y_bf16) {
    if (TWO) return;  /* the int8 mode only: no exact-mode copies compiled */
    if (w->ks) gemv_q8k(MR, 1, w, a, t, m0, n, k, y_f32, y_bf16);
    else gemv_q8k(MR, 0, w, a, t, m0, n, k, y_f32, y_bf16);
}

EMBER_DEFINE_GEMV(gemv_q8k_all, q8k_rows, 8)

static inline __m512 load16(const void *x, int x_f32, int64_t at) {  /* 16 activations, bf16 or fp32, as fp32 */
    return x_f32 ? _mm512_loadu_ps((const float *)x + at) : bf16x16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + at)));
}

/* qtile.h's q8k: per row and super-block d = max|x| / 127, h = round(x / d); per 16, hz = -2^zexp sum h (Q6_K's
 * own scales: the dot products' start) and xs = sum h (fp16 scales: the offsets') */
static void quantize_q8k(const void *x, int x_f32, int64_t m_rows, int64_t k, int zexp, qact *a) {
    const int64_t nb = k / 32, nsb = k / 256;
#pragma omp parallel for schedule(static) if (m_rows * k > 65536)
    for (int64_t i = 0; i < m_rows * nsb; i++) {
        const int64_t at = i / nsb * k + i % nsb * 256;
        __m512 v[16], mx = _mm512_setzero_ps();
        for (int j = 0; j < 16; j++) mx = _mm512_max_ps(mx, _mm512_abs_ps(v[j] = load16(x, x_f32, at + j * 16)));
        const float amax = _mm512_reduce_max_ps(mx);
        a->d[i] = amax / 127.f;
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        for (int j = 0; j < 16; j++) {
            const __m512i h = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], inv));  /* round to nearest even */
            _mm_storeu_si128((__m128i *)(a->h + at + j * 16), _mm512_cvtepi32_epi8(h));
            const int hs = _mm512_reduce_add_epi32(h), at16 = (i / nsb * nb + i % nsb * 8) * 2 + j;
            a->hz[at16] = -hs * (1 << zexp);
            a->xs[at16] = (float)hs;
        }
    }
}

/* x [M, K] (bf16 or fp32) -> h (and l in the exact mode), d, block sums; rows padded with zeros up to m_pad */
static qact quantize(const void *x, int x_f32, int64_t m_rows, int64_t m_pad, int64_t k, const tiled_w *w, int two) {
    const int64_t nb = k / 32;
    const int sub16 = w->sub16;
    qact a = qact_alloc(m_pad, k, two, q8k(w, two), 0);
    memset(a.h + m_rows * k, 0, (size_t)((m_pad - m_rows) * k));
    if (q8k(w, two)) {
        quantize_q8k(x, x_f32, m_rows, k, w->zexp, &a);
        return a;
    }
    if (two) memset(a.l + m_rows * k, 0, (size_t)((m_pad - m_rows) * k));
#pragma omp parallel for schedule(static) if (m_rows * k > 65536)
    for (int64_t i = 0; i < m_rows * nb; i++) {
        const int64_t m = i / nb, b = i % nb, at = m * k + b * 32;
        const __m512 v[2] = {load16(x, x_f32, at), load16(x, x_f32, at + 16)};
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        a.d[i] = two ? amax / 127.f / 256.f : amax / 127.f;
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        int qsum[2];
        for (int j = 0; j < 2; j++) {
            const __m512 t = _mm512_mul_ps(v[j], inv);
            const __m512i h = _mm512_cvtps_epi32(t);  /* round to nearest even */
            _mm_storeu_si128((__m128i *)(a.h + at + j * 16), _mm512_cvtepi32_epi8(h));
            if (!two) {
                qsum[j] = _mm512_reduce_add_epi32(h);
                continue;
            }
            const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(h)), _mm512_set1_ps(256.f));
            __m512i l = _mm512_cvtps_epi32(r);
            l = _mm512_min_epi32(_mm512_max_epi32(l, _mm512_set1_epi32(-128)), _mm512_set1_epi32(127));
            _mm_storeu_si128((__m128i *)(a.l + at + j * 16), _mm512_cvtepi32_epi8(l));
        }
        /* the offset term's o * sum(x), per block (per half with sub16): exact sums in the exact mode; in the int8
         * mode the sums of the quantized x^, so the result is exactly W x^ (exact sums there let the rounding
         * error meet the uncentred codes instead of the centred weights: ~4x its variance, perplexity +1.5 %) */
        if (two && sub16) {  /* v[0], v[1]: the block's two halves */
            a.xs[2 * i] = _mm512_reduce_add_ps(v[0]);
            a.xs[2 * i + 1] = _mm512_reduce_add_ps(v[1]);
        } else if (two) {
            a.xs[i] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
        } else if (sub16) {
            a.xs[2 * i] = (float)qsum[0] * a.d[i];
            a.xs[2 * i + 1] = (float)qsum[1] * a.d[i];
        } else {
            a.xs[i] = (float)(qsum[0] + qsum[1]) * a.d[i];
        }
    }
    return a;
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out the AMX register state only on request (once per process, for all its threads) */
int ember_amx_available(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tmm0/1: C int32 [16 activation rows][16 weight rows] for h and l; tmm2/3: A = h, l [16 rows][32 k];
 * tmm4: B = one block's codes [8 groups][16 rows][4]; with a scale per 16, tmm5/6: A halves [16][16 k],
 * tmm7: B half [4 groups][16 rows][4]. Configured per thread. */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {16, 16, 16, 16, 8, 16, 16, 4}, colsb[8] = {64, 64, 32, 32, 64, 16, 16, 64};
    for (int t = 0; t < 8; t++) {
        c.rows[t] = (uint8_t)rows[t];
        c.colsb[t] = (uint16_t)colsb[t];
    }
    _tile_loadconfig(&c);
}

/* gemv_q8k's numbers on AMX: the same sums per super-block in the same order, the same float step (tiles 5, 7) */
static void amx_q8k(const tiled_w *w, const qact *a, const uint8_t *codes, int64_t t, int64_t mt, int64_t m_rows,
                    int64_t n, int64_t k, int32_t *c, float *y_f32, uint16_t *y_bf16) {
    const int64_t nb = w->nb, nsb = nb / 8, rows = m_rows - mt * 16 < 16 ? m_rows - mt * 16 : 16;
    __m512 acc[16], fsum[16];
    __m512i isum[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        for (int i = 0; i < 16; i++) isum[i] = _mm512_setzero_si512(), fsum[i] = _mm512_setzero_ps();
        for (int64_t b = sb * 8; b < sb * 8 + 8; b++)
            for (int hf = 0; hf < 2; hf++) {
                _tile_zero(0);
                _tile_loadd(7, codes + b * 512 + hf * 256, 64);
                _tile_loadd(5, a->h + mt * 16 * k + b * 32 + hf * 16, k);
                _tile_dpbsud(0, 5, 7);
                _tile_stored(0, c, 64);
                __m512i sc = _mm512_setzero_si512();
                __m512 sv = _mm512_setzero_ps(), ov = _mm512_setzero_ps();
                if (w->ks) sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(ks_ints(w, t, b) + hf * 16)));
                else scales16(w, t, b, hf, 2, &sv, &ov);
                for (int i = 0; i < rows; i++) {
                    const int64_t ab = ((mt * 16 + i) * nb + b) * 2 + hf;
                    __m512i dot = _mm512_load_si512((const void *)(c + i * 16));
                    if (w->ks) {
                        dot = _mm512_add_epi32(dot, _mm512_set1_epi32(a->hz[ab]));
                        isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(dot, sc));
                    } else {
                        fsum[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, fsum[i]);
                        fsum[i] = _mm512_fmadd_ps(ov, _mm512_set1_ps(a->xs[ab]), fsum[i]);
                    }
                }
            }
        const __m512 dw = w->ks ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ks_d(w, t, sb * 8))) : _mm512_setzero_ps();
        for (int i = 0; i < rows; i++) {
            const __m512 dx = _mm512_set1_ps(a->d[(mt * 16 + i) * nsb + sb]);
            acc[i] = w->ks ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(dw, dx), acc[i])
                           : _mm512_fmadd_ps(fsum[i], dx, acc[i]);
        }
    }
    for (int i = 0; i < rows; i++) store_out(acc[i], mt * 16 + i, n, t * 16, y_f32, y_bf16);
}

static void amx(const tiled_w *w, const qact *a, int64_t m_rows, int64_t n, int64_t k, float *y_f32,
                uint16_t *y_bf16) {
    const int64_t ntiles = (n + 15) / 16, mtiles = (m_rows + 15) / 16, nb = w->nb;
#pragma omp parallel if (n * k > 65536)
    {
        configure_tiles();
        uint8_t *slab = layout_of(w) == BYTES ? NULL : aligned_alloc(64, (size_t)nb * 512);  /* codes as bytes */
        int32_t c[2][256] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ntiles; t++) {
            const uint8_t *codes = w->codes + t * nb * 512;
            if (slab) {
                for (int64_t b = 0; b < nb; b++) {
                    __m512i u[8];
                    load_codes(w, t, b, u);
                    for (int g = 0; g < 8; g++) _mm512_store_si512((void *)(slab + b * 512 + g * 64), u[g]);
                }
                codes = slab;
            }
            for (int64_t mt = 0; mt < mtiles; mt++) {
                if (q8k(w, a->l != NULL)) {
                    amx_q8k(w, a, codes, t, mt, m_rows, n, k, c[0], y_f32, y_bf16);
                    continue;
                }
                __m512 acc[16];
                for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
                const int halves = w->sub16 ? 2 : 1, two = a->l != NULL;
                for (int64_t b = 0; b < nb; b++)
                    for (int hf = 0; hf < halves; hf++) {
                        _tile_zero(0);
                        _tile_zero(1);  /* stays zero outside the exact mode: the epilogue ignores it then */
                        if (w->sub16) {  /* k 16 hf .. 16 hf + 15 of the block: its own scale */
                            _tile_loadd(7, codes + b * 512 + hf * 256, 64);
                            _tile_loadd(5, a->h + mt * 16 * k + b * 32 + hf * 16, k);
                            _tile_dpbsud(0, 5, 7);
                            if (two) {
                                _tile_loadd(6, a->l + mt * 16 * k + b * 32 + hf * 16, k);
                                _tile_dpbsud(1, 6, 7);
                            }
                        } else {
                            _tile_loadd(4, codes + b * 512, 64);
                            _tile_loadd(2, a->h + mt * 16 * k + b * 32, k);
                            _tile_dpbsud(0, 2, 4);
                            if (two) {
                                _tile_loadd(3, a->l + mt * 16 * k + b * 32, k);
                                _tile_dpbsud(1, 3, 4);
                            }
                        }
                        _tile_stored(0, c[0], 64);
                        _tile_stored(1, c[1], 64);
                        __m512 sv, ov;
                        scales16(w, t, b, hf, halves, &sv, &ov);
                        for (int i = 0; i < 16 && mt * 16 + i < m_rows; i++) {
                            const int64_t m = mt * 16 + i;
                            acc[i] = epilogue(acc[i], _mm512_load_si512((const void *)(c[0] + i * 16)),
                                              _mm512_load_si512((const void *)(c[1] + i * 16)), sv, ov,
                                              a->d[m * nb + b], a->xs[(m * nb + b) * halves + hf], two);
                        }
                    }
                for (int i = 0; i < 16 && mt * 16 + i < m_rows; i++) store_out(acc[i], mt * 16 + i, n, t * 16, y_f32, y_bf16);
            }
        }
        free(slab);
        _tile_release();
    }
}
#define HAVE_AMX_INT8 1
#endif

/* y[m, n] = sum_k x[m, k] w[n, k]. x bf16 or fp32 [M, K]; y fp32 or bf16 [M, N]. use_amx: take AMX-INT8
 * (when built with it; the caller checks the OS grants it) - the result is the same either way. */
void ember_qtile_matmul(const uint8_t *codes, int64_t mode, const uint16_t *s16, const uint16_t *o16,
                        const void *x, int64_t x_f32, int64_t m_rows, int64_t n, int64_t k, float *y_f32,
                        uint16_t *y_bf16, int64_t use_amx) {
    const tiled_w w = tiled(codes, mode, s16, o16, k);
    const int two = (int)(mode >> 2 & 1);  /* the exact two-part activations */
#ifdef HAVE_AMX_INT8
    if (use_amx) {
        qact a = quantize(x, (int)x_f32, m_rows, (m_rows + 15) / 16 * 16, k, &w, two);
        amx(&w, &a, m_rows, n, k, y_f32, y_bf16);
        release(&a);
        return;
    }
#endif
    (void)use_amx;
    qact a = quantize(x, (int)x_f32, m_rows, m_rows, k, &w, two);
    (q8k(&w, two) ? gemv_q8k_all : gemv)(&w, &a, m_rows, n, k, y_f32, y_bf16);
    release(&a);
}

#ifdef HAVE_AMX_INT8
int ember_qtile_amx_built(void) { return 1; }
#else
int ember_qtile_amx_built(void) { return 0; }
int ember_amx_available(void) { return 0; }
#endif
#elif !defined(EMBER_QTILE_256)  /* neither build: packed weights take PyTorch's int4 kernel instead */
int ember_amx_available(void) { return 0; }
int ember_qtile_available(void) { return 0; }
int ember_qtile_amx_built(void) { return 0; }
void ember_qtile_matmul(void) {}
#endif
