/* Shared by ember's C kernels: bf16 <-> fp32 as PyTorch rounds them. */
#pragma once
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
