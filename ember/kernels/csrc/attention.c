/* Attention over the paged KV cache, one query row at a time, grouped query heads. Every query row of every
 * step takes this path (a decoding token, or a row of a prompt prefilled in chunks or from a cached prefix):
 * a row's keys are cut and merged the same way whatever step computes it, so a prompt gives the same bits
 * fresh, from a cached prefix, in chunks of any size, or beside any neighbours.
 *
 * Each sequence's keys are cut into chunks of CHUNK; a task is (chunk, kv head): scores, their max and
 * exp-sum, and the exp-weighted sum of values for the group's query heads. A second pass merges a
 * sequence's chunks (log-sum-exp). The cut depends on the sequence's own length only, so its output is
 * the same bits whatever shares the batch, and one long sequence keeps every thread busy (a kv head per
 * task alone gave 3 tasks to 2 threads for SmolLM2, and none for a short context). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define CHUNK 128   /* keys per task */
#define MAX_REP 16  /* query heads per kv head (ops.decode_attention_ok checks) */

typedef struct {
    const uint16_t *q, *kc, *vc;
    const int64_t *slots, *table_of;
    int64_t q_stride, s_slots, max_n, h, hkv, dh;
    float scale, softcap;
} att_args;

/* x[0 .. m) -> exp(x - max) in place; returns the max, *sum = the sum of the exps */
static float exp_sum(float *x, int64_t m, float *sum) {
    float mx = -INFINITY, s = 0.f;
    for (int64_t j = 0; j < m; j++) mx = x[j] > mx ? x[j] : mx;
    int64_t j = 0;
#ifdef EMBER_BF16_512
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= m; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(x + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    s = _mm512_reduce_add_ps(acc);
#elif defined(EMBER_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= m; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(x + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    s = hsum8(acc);
#endif
    for (; j < m; j++) {
        x[j] = fast_expf(x[j] - mx);
        s += x[j];
    }
    *sum = s;
    return mx;
}

#ifdef EMBER_BF16_512
/* v[0..15] -> one vector whose lane j is the sum of v[j]'s lanes (45 ops for 16 sums, not 16 x 8) */
static inline __m512 hsum16(const __m512 *v) {
    __m512 u[4];
    for (int gq = 0; gq < 4; gq++) {  /* per 128-bit lane L: [sum of v[4gq + i] over L's 4 floats]_i */
        const __m512 *w = v + 4 * gq;
        const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
        const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
        u[gq] = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* scores of query head rows q [dh] against 16 keys (rows kr[0..15]) -> out[0..15] (dh % 32 == 0) */
static inline void scores16(const uint16_t *q, const uint16_t *const *kr, int64_t dh, float *out) {
    __m512 d[16];
    for (int j = 0; j < 16; j++) d[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < dh; c += 32) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(q + c));
        for (int j = 0; j < 16; j++)
            d[j] = _mm512_dpbf16_ps(d[j], qv, (__m512bh)_mm512_loadu_si512((const void *)(kr[j] + c)));
    }
    _mm512_storeu_ps(out, hsum16(d));
}

/* acc[r][dh] = sum_j p[r][j] v_j over m value rows, 16 dims at a time with the REP accumulators in
 * registers (each value row converted once for all query heads) */
static inline __attribute__((always_inline)) void values(const int REP, const uint16_t *const *vr, int64_t m,
                                                         int64_t dh, float (*p)[CHUNK], float *part) {
    for (int64_t e = 0; e < dh; e += 16) {
        __m512 acc[MAX_REP];
        for (int r = 0; r < REP; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t j = 0; j < m; j++) {
            const __m512 v = bf16x16(_mm256_loadu_si256((const __m256i *)(vr[j] + e)));
            for (int r = 0; r < REP; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), v, acc[r]);
        }
        for (int r = 0; r < REP; r++) _mm512_storeu_ps(part + r * (dh + 2) + 2 + e, acc[r]);
    }
}
#elif defined(EMBER_AVX2)
/* no bf16 dot products: q in fp32 (converted once per task) times keys widened 8 at a time */
#define VEC_KEYS 8

static inline __m256 hsum8x8(const __m256 *v) {  /* lane j = the sum of v[j]'s lanes */
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* scores of one query head qf [dh] fp32 against 8 keys (rows kr[0..7]) -> out[0..7] (dh % 8 == 0) */
static inline void scores8(const float *qf, const uint16_t *const *kr, int64_t dh, float *out) {
    __m256 d[8];
    for (int j = 0; j < 8; j++) d[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dh; c += 8) {
        const __m256 qv = _mm256_loadu_ps(qf + c);
        for (int j = 0; j < 8; j++)
            d[j] = _mm256_fmadd_ps(qv, bf16x8(_mm_loadu_si128((const __m128i *)(kr[j] + c))), d[j]);
    }
    _mm256_storeu_ps(out, hsum8x8(d));
}

static inline __attribute__((always_inline)) void values(const int REP, const uint16_t *const *vr, int64_t m,
                                                         int64_t dh, float (*p)[CHUNK], float *part) {
    for (int64_t e = 0; e < dh; e += 8) {
        __m256 acc[MAX_REP];
        for (int r = 0; r < REP; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t j = 0; j < m; j++) {
            const __m256 v = bf16x8(_mm_loadu_si128((const __m128i *)(vr[j] + e)));
            for (int r = 0; r < REP; r++) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(p[r][j]), v, acc[r]);
        }
        for (int r = 0; r < REP; r++) _mm256_storeu_ps(part + r * (dh + 2) + 2 + e, acc[r]);
    }
}
#endif

/* keys [j0, j1) of sequence i, kv head g -> per query head r: part[r] = {max, sum, acc[dh]} (unnormalized) */
static void chunk_task(const att_args *a, int64_t i, int64_t g, int64_t j0, int64_t j1, float *part) {
    const int64_t rep = a->h / a->hkv, dh = a->dh, m = j1 - j0;
    float sc[MAX_REP][CHUNK];
    const uint16_t *kr[CHUNK + 16], *vr[CHUNK];
    const int64_t *sl = a->slots + (a->table_of ? a->table_of[i] : i) * a->max_n;
    for (int64_t j = 0; j < m; j++) {
        kr[j] = a->kc + (g * a->s_slots + sl[j0 + j]) * dh;
        vr[j] = a->vc + (g * a->s_slots + sl[j0 + j]) * dh;
    }
    for (int64_t j = m; j < CHUNK + 16; j++) kr[j] = kr[0];  /* a ragged last 16 reads key 0 again, unused */
    const uint16_t *qr = a->q + i * a->q_stride + g * rep * dh;
#ifdef EMBER_BF16_512
    const int vec = dh % 32 == 0;
#elif defined(EMBER_AVX2)
    const int vec = dh % 8 == 0;
    float qf[256];  /* ops.decode_attention_ok: dh <= 256 */
#else
    const int vec = 0;
#endif
    for (int64_t r = 0; r < rep; r++) {  /* scores, then their max and exp-sum */
        const uint16_t *q = qr + r * dh;
        for (int64_t j = 0; j < m; j += 16) {
            float s16[16];
#ifdef EMBER_BF16_512
            if (vec) scores16(q, kr + j, dh, s16);
#elif defined(EMBER_AVX2)
            if (vec) {
                if (j == 0)
                    for (int64_t e = 0; e < dh; e++) qf[e] = bf2f(q[e]);
                scores8(qf, kr + j, dh, s16);
                if (j + 8 < m) scores8(qf, kr + j + 8, dh, s16 + 8);
            }
#endif
            for (int64_t jj = 0; jj < 16 && j + jj < m; jj++) {
                float dot = 0.f;
                if (vec) {
                    dot = s16[jj];
                } else {
                    for (int64_t e = 0; e < dh; e++) dot += bf2f(q[e]) * bf2f(kr[j + jj][e]);
                }
                dot *= a->scale;
                if (a->softcap > 0.f) dot = a->softcap * tanhf(dot / a->softcap);
                sc[r][j + jj] = dot;
            }
        }
        part[r * (dh + 2)] = exp_sum(sc[r], m, &part[r * (dh + 2) + 1]);
    }
#if defined(EMBER_BF16_512) || defined(EMBER_AVX2)
    if (dh % 16 == 0) {
        switch (rep) {  /* constant trip counts keep the accumulators in registers */
            case 1: values(1, vr, m, dh, sc, part); return;
            case 2: values(2, vr, m, dh, sc, part); return;
            case 3: values(3, vr, m, dh, sc, part); return;
            case 4: values(4, vr, m, dh, sc, part); return;
            case 6: values(6, vr, m, dh, sc, part); return;
            case 7: values(7, vr, m, dh, sc, part); return;
            case 8: values(8, vr, m, dh, sc, part); return;
            default: values((int)rep, vr, m, dh, sc, part); return;
        }
    }
#endif
    for (int64_t r = 0; r < rep; r++)
        for (int64_t e = 0; e < dh; e++) {
            float acc = 0.f;
            for (int64_t j = 0; j < m; j++) acc += sc[r][j] * bf2f(vr[j][e]);
            part[r * (dh + 2) + 2 + e] = acc;
        }
}

/* q: b rows of stride q_stride (bf16), heads [h, dh] at the start of each row; kc/vc [hkv, S, dh];
 * slots: padded slot tables [*, max_n] (int64); row i reads table table_of[i] (NULL: table i) and attends
 * to its keys 0..lens[i]-1, or to the last `window` of them. softcap > 0: scores = softcap * tanh(scores /
 * softcap). out [b, h, dh] bf16. */
void ember_decode_attention(const uint16_t *q, int64_t q_stride, const uint16_t *kc, const uint16_t *vc,
                            int64_t s_slots, const int64_t *slots, const int64_t *table_of, const int64_t *lens,
                            int64_t max_n, int64_t b, int64_t h, int64_t hkv, int64_t dh, float scale,
                            int64_t window, float softcap, uint16_t *out) {
    const att_args a = {q, kc, vc, slots, table_of, q_stride, s_slots, max_n, h, hkv, dh, scale, softcap};
    const int64_t rep = h / hkv, stride = rep * (dh + 2);  /* floats per (chunk, kv head) */
    int64_t *first = malloc(sizeof(int64_t) * (b + 1)), *start = malloc(sizeof(int64_t) * b);
    first[0] = 0;  /* sequence i's chunks are first[i] .. first[i + 1] - 1 */
    for (int64_t i = 0; i < b; i++) {
        start[i] = (window > 0 && lens[i] > window) ? lens[i] - window : 0;
        const int64_t m = lens[i] - start[i];
        first[i + 1] = first[i] + (m > 0 ? (m + CHUNK - 1) / CHUNK : 1);
    }
    const int64_t chunks = first[b];
    int64_t work = 0;
    for (int64_t i = 0; i < b; i++) work += (lens[i] - start[i]) * h * dh;
    float *parts = malloc(sizeof(float) * chunks * hkv * stride);
#pragma omp parallel if (chunks * hkv > 1 && work > 131072)  /* below, a fork costs what it saves */
    {
        int64_t i = 0;  /* each thread's tasks go in order: the owning sequence only moves forward */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < chunks * hkv; task++) {
            const int64_t c = task / hkv, g = task % hkv;
            while (first[i + 1] <= c) i++;
            const int64_t j0 = start[i] + (c - first[i]) * CHUNK;
            const int64_t j1 = j0 + CHUNK < lens[i] ? j0 + CHUNK : lens[i];
            chunk_task(&a, i, g, j0, j1, parts + task * stride);
        }
#pragma omp for schedule(static)
        for (int64_t sg = 0; sg < b * hkv; sg++) {  /* merge: out = sum_c e^(max_c - M) acc_c / (same for sums) */
            const int64_t s = sg / hkv, g = sg % hkv;
            for (int64_t r = 0; r < rep; r++) {
                float mx = -INFINITY, sum = 0.f, acc[512];
                for (int64_t c = first[s]; c < first[s + 1]; c++) {
                    const float pm = parts[(c * hkv + g) * stride + r * (dh + 2)];
                    mx = pm > mx ? pm : mx;
                }
                for (int64_t e = 0; e < dh; e++) acc[e] = 0.f;
                for (int64_t c = first[s]; c < first[s + 1]; c++) {
                    const float *p = parts + (c * hkv + g) * stride + r * (dh + 2);
                    const float w = p[1] > 0.f ? fast_expf(p[0] - mx) : 0.f;  /* an empty chunk adds nothing */
                    sum += w * p[1];
                    for (int64_t e = 0; e < dh; e++) acc[e] += w * p[2 + e];
                }
                const float inv = sum > 0.f ? 1.f / sum : 0.f;  /* no keys at all: zeros */
                for (int64_t e = 0; e < dh; e++) out[(s * h + g * rep + r) * dh + e] = f2bf(acc[e] * inv);
            }
        }
    }
    free(parts);
    free(first);
    free(start);
}
