/* Shared by ember's C kernels: bf16 <-> fp32 as PyTorch rounds them. */
#pragma once
#include <math.h>
#include <stdint.h>

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

#endif
