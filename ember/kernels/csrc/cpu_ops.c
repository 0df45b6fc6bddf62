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

#ifdef EMBER_BF16_512
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
#elif defined(EMBER_AVX2)
static inline void act_mul8(const uint16_t *g, const uint16_t *u, uint16_t *o, int act) {  /* act_mul16, 8 lanes */
    const __m256 x = bf16x8(_mm_loadu_si128((const __m128i *)g));
    __m256 z = _mm256_sub_ps(_mm256_setzero_ps(), x);
    if (act == 1)
        z = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216f),
                          _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
    const __m256 y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp256(z)));
    const __m256 uv = bf16x8(_mm_loadu_si128((const __m128i *)u));
    _mm_storeu_si128((__m128i *)o, f2bf8(_mm256_mul_ps(bf16x8(f2bf8(y)), uv)));
}
#endif

/* out [T, I] = act(gate) * up from gu [T, 2I] bf16; act 0: silu, 1: gelu (tanh approximation). */
void ember_act_mul(const uint16_t *gu, uint16_t *out, int64_t t, int64_t inter, int act) {
#pragma omp parallel for schedule(static) if (t * inter > 16384)
    for (int64_t r = 0; r < t; r++) {
        const uint16_t *g = gu + r * 2 * inter, *u = g + inter;
        uint16_t *o = out + r * inter;
        int64_t i = 0;
#ifdef EMBER_BF16_512
        for (; i + 16 <= inter; i += 16) act_mul16(g + i, u + i, o + i, act);
#elif defined(EMBER_AVX2)
        for (; i + 8 <= inter; i += 8) act_mul8(g + i, u + i, o + i, act);
#endif
        for (; i < inter; i++) {
            const float x = bf2f(g[i]);
            const float z = act == 0 ? -x : -1.5957691216f * (x + 0.044715f * x * x * x);
            o[i] = f2bf(bf2f(f2bf(x / (1.f + fast_expf(z)))) * bf2f(u[i]));
        }
    }
}

/* which vector code this build runs (kernels/__init__.py ISAS): 0 plain C, 1 AVX2, 2 AVX2 + AVX-VNNI,
 * 3 AVX512-VNNI + BF16 (the caller adds AMX when the OS grants it), 5 AVX512-VNNI without BF16 */
int ember_isa(void) {
#if defined(EMBER_QTILE_512) && defined(EMBER_BF16_512)
    return 3;
#elif defined(EMBER_QTILE_512)
    return 5;
#elif defined(EMBER_QTILE_256) && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
    return 2;
#elif defined(EMBER_QTILE_256)
    return 1;
#else
    return 0;
#endif
}
