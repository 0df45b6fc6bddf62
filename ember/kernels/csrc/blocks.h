/* ember's packed weight layout for GGUF-style block codes, and the AVX512 helpers that unpack it.
 *
 * A weight row is blocks of 32: w_i = s * q_i + o with q_i in 0 .. 2^bits - 1 (bits 4..8). Storage:
 * nibbles in pairs of blocks (32 bytes: byte j holds block 2i's code j in its low nibble and block 2i+1's
 * in its high one, so one widening load yields both blocks' 32 codes), one uint32 bit plane per code bit
 * above 4 (bit i = bit 4+p of q_i), and fp16 s and o per block: 20 bytes per block for 4-bit codes.
 *
 * The trick that makes the codes cheap: for 0 <= v < 128 the bf16 bit pattern of 128 + v is 0x4300 | v,
 * so a code becomes a bf16 operand with one OR (finish below); bit 7 of 8-bit codes is kept apart as bf16
 * 0 or 1 (0x0000 / 0x3f80), exact and free of cancellation. */
#pragma once
#include <stdint.h>
#include <immintrin.h>

typedef struct {  /* one packed weight [N, K]: see the layout above */
    const uint8_t *nib;       /* [N, ceil(K/64), 32] */
    const uint32_t *planes;   /* [N, K/32, np] or NULL */
    int np;                   /* bit planes per block (0 for 4-bit codes) */
    const uint16_t *s16, *o16; /* fp16 [N, K/32] */
    int64_t nb, npairs;       /* blocks per row, nibble block pairs per row */
} packed_w;

static inline packed_w packed_view(const uint8_t *nib, const uint32_t *planes, int64_t np, const uint16_t *s16,
                                   const uint16_t *o16, int64_t k) {
    packed_w w = {nib, planes, (int)np, s16, o16, k / 32, (k / 32 + 1) / 2};
    return w;
}

/* codes of blocks 2i and 2i+1 from their 32 nibble bytes, as 32 words each */
static inline void unpack_pair(const uint8_t *nib, __m512i *wa, __m512i *wb) {
    __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)nib));
    *wa = _mm512_and_si512(w, _mm512_set1_epi16(15));
    *wb = _mm512_srli_epi16(w, 4);
}

/* add the bit planes (bits 4..6), set the bf16 magic; bit 7 (8-bit codes) goes to *top */
static inline __m512i finish(__m512i w, const uint32_t *pl, int np, __m512i *top) {
    for (int p = 0; p < np && p < 3; p++)
        w = _mm512_mask_add_epi16(w, (__mmask32)pl[p], w, _mm512_set1_epi16((short)(16 << p)));
    const __m512i magic = _mm512_set1_epi16(0x4300);
    if (np == 4) *top = _mm512_maskz_mov_epi16((__mmask32)pl[3], _mm512_set1_epi16(0x3f80));  /* bf16 1.0 */
    return _mm512_or_si512(w, magic);
}

static inline void store_block(__m512i w, __m512i top, int np, float s, float o, uint16_t *out) {
    /* back from 0x4300 | v to v (+ 128 for bit 7), then w = s v + o in fp32, rounded once to bf16 */
    __m512i v = _mm512_and_si512(w, _mm512_set1_epi16(0x7f));
    if (np == 4) v = _mm512_or_si512(v, _mm512_and_si512(top, _mm512_set1_epi16(0x80)));  /* 0x3f80 & 0x80 */
    const __m512 sv = _mm512_set1_ps(s), ov = _mm512_set1_ps(o);
    __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v))), sv, ov);
    __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1))), sv, ov);
    _mm512_storeu_si512((void *)out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}


/* weight row r as bf16 [K] (w = s q + o in fp32, rounded once) */
static inline void dequant_row(const packed_w *w, int64_t r, uint16_t *out) {
    const int64_t nb = w->nb;
    for (int64_t b = 0; b < nb; b += 2) {
        __m512i wa, wb, ta = _mm512_setzero_si512(), tb = ta;
        const uint32_t *pl = w->planes ? w->planes + (r * nb + b) * w->np : NULL;
        unpack_pair(w->nib + (r * w->npairs + b / 2) * 32, &wa, &wb);
        wa = finish(wa, pl, w->np, &ta);
        store_block(wa, ta, w->np, _cvtsh_ss(w->s16[r * nb + b]), _cvtsh_ss(w->o16[r * nb + b]), out + b * 32);
        if (b + 1 < nb) {
            wb = finish(wb, pl ? pl + w->np : NULL, w->np, &tb);
            store_block(wb, tb, w->np, _cvtsh_ss(w->s16[r * nb + b + 1]), _cvtsh_ss(w->o16[r * nb + b + 1]),
                        out + (b + 1) * 32);
        }
    }
}
