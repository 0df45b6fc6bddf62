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

#include "common.h"

/* exp(x) to ~1 ulp in plain arithmetic, so `omp simd` loops vectorize it (libm's expf is a call):
 * x = k ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^k put into the exponent bits. */
static inline float fast_expf(float x) {
    x = fminf(fmaxf(x, -87.3f), 88.7f);
    const float k = floorf(x * 1.44269504f + 0.5f);
    const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  /* ln2 in two parts (Cody-Waite) */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r * r + r) + 1.f;
    union { uint32_t u; float f; } two_k = { (uint32_t)((int32_t)k + 127) << 23 };
    return p * two_k.f;
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

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

static inline __m512 exp512(__m512 x) {  /* fast_expf, 16 lanes (gcc does not vectorize the scalar one) */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
    const __m512i two_k = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(two_k));
}

static inline __m512 bf16x16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

/* 16 outputs act(g) * u, act(g) rounded to bf16 first as torch does */
static inline void act_mul16(const uint16_t *g, const uint16_t *u, uint16_t *o, int act) {
    const __m512 x = bf16x16(_mm256_loadu_si256((const __m256i *)g));
    __m512 z = _mm512_sub_ps(_mm512_setzero_ps(), x);  /* silu: x / (1 + exp(-x)) */
    if (act == 1)  /* gelu (tanh): x / (1 + exp(-2 z)), z = 0.79788456 (x + 0.044715 x^3) */
        z = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216f),
                          _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
    const __m512 y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(z)));
    const __m512 yr = bf16x16((__m256i)_mm512_cvtneps_pbh(y));
    const __m512 uv = bf16x16(_mm256_loadu_si256((const __m256i *)u));
    _mm256_storeu_si256((__m256i *)o, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(yr, uv)));
}
#endif

/* out [T, I] = act(gate) * up from gu [T, 2I] bf16; act 0: silu, 1: gelu (tanh approximation). */
void ember_act_mul(const uint16_t *gu, uint16_t *out, int64_t t, int64_t inter, int act) {
#pragma omp parallel for schedule(static) if (t * inter > 16384)
    for (int64_t r = 0; r < t; r++) {
        const uint16_t *g = gu + r * 2 * inter, *u = g + inter;
        uint16_t *o = out + r * inter;
        int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        for (; i + 16 <= inter; i += 16) act_mul16(g + i, u + i, o + i, act);
#endif
        for (; i < inter; i++) {
            const float x = bf2f(g[i]);
            const float z = act == 0 ? -x : -1.5957691216f * (x + 0.044715f * x * x * x);
            o[i] = f2bf(bf2f(f2bf(x / (1.f + fast_expf(z)))) * bf2f(u[i]));
        }
    }
}

/* in place over x[0 .. m) */
static void softmax(float *x, int64_t m) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < m; j++) mx = x[j] > mx ? x[j] : mx;
    int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= m; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(x + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; j < m; j++) {
        x[j] = fast_expf(x[j] - mx);
        sum += x[j];
    }
    const float inv = 1.f / sum;
    for (j = 0; j < m; j++) x[j] *= inv;
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
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        if (dh % 32 == 0) {  /* bf16 dot products straight from the cache rows, fp32 sums */
            const uint16_t *qr = q + i * q_stride + g * rep * dh;
            for (int64_t j = 0; j < m; j++) {
                const uint16_t *kr = kc + (g * s_slots + sl[j0 + j]) * dh;
                for (int64_t r = 0; r < rep; r++) {
                    __m512 d = _mm512_setzero_ps();
                    for (int64_t c = 0; c < dh; c += 32)
                        d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_loadu_si512((const void *)(qr + r * dh + c)),
                                             (__m512bh)_mm512_loadu_si512((const void *)(kr + c)));
                    float dot = _mm512_reduce_add_ps(d) * scale;
                    if (softcap > 0.f) dot = softcap * tanhf(dot / softcap);
                    sc[r * m + j] = dot;
                }
            }
            for (int64_t r = 0; r < rep; r++) softmax(sc + r * m, m);
            for (int64_t j = 0; j < m; j++) {
                const uint16_t *vr = vc + (g * s_slots + sl[j0 + j]) * dh;
                for (int64_t c = 0; c < dh; c += 16) {
                    const __m512 v = bf16x16(_mm256_loadu_si256((const __m256i *)(vr + c)));
                    for (int64_t r = 0; r < rep; r++)
                        _mm512_storeu_ps(&acc[r][c], _mm512_fmadd_ps(_mm512_set1_ps(sc[r * m + j]), v,
                                                                     _mm512_loadu_ps(&acc[r][c])));
                }
            }
        } else
#endif
        {
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
            for (int64_t r = 0; r < rep; r++) softmax(sc + r * m, m);
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
        }
        for (int64_t r = 0; r < rep; r++)
            for (int64_t e = 0; e < dh; e++) out[(i * h + g * rep + r) * dh + e] = f2bf(acc[r][e]);
        free(sc);
    }
}
