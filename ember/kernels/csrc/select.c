/* Row-wise top-k and argmax over fp32 logits [rows, n]: torch's CPU topk / argmax take ~1.4 / 1.1 ms for
 * 16 rows of a 49k vocabulary here; a vectorized pass that only looks closer at values above the current
 * k-th best reads each row once. Rows with a NaN are left to the caller (return value 0). */
#include <math.h>
#include <stdint.h>

#include "common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* insert (v, i) into the descending list vals/idx of length k (v beats the last entry) */
static inline void insert(float *vals, int64_t *idx, int64_t k, float v, int64_t i) {
    int64_t j = k - 1;
    while (j > 0 && vals[j - 1] < v) {  /* equal values keep the earlier index first, as torch does */
        vals[j] = vals[j - 1];
        idx[j] = idx[j - 1];
        j--;
    }
    vals[j] = v;
    idx[j] = i;
}

/* vals/idx [rows, k], best first. Returns 1, or 0 when a row holds NaN (nothing written is to be used). */
int ember_topk_rows(const float *x, int64_t rows, int64_t n, int64_t k, float *vals, int64_t *idx) {
    int ok = 1;
#pragma omp parallel for schedule(static) if (rows * n > 65536) reduction(& : ok)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *v = vals + r * k;
        int64_t *ix = idx + r * k;
        for (int64_t j = 0; j < k; j++) {
            v[j] = -INFINITY;
            ix[j] = -1;
        }
        int nan = 0;  /* found in the same pass (a NaN never enters the list: comparisons with it are false) */
        int64_t i = 0;
        for (; i < k && i < n; i++) {  /* a growing list: the first k */
            nan |= isnan(xr[i]);
            insert(v, ix, i + 1, xr[i], i);
        }
#if defined(__AVX512F__)
        __mmask16 nans = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 xv = _mm512_loadu_ps(xr + i);
            nans |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
            __mmask16 m = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(v[k - 1]), _CMP_GT_OQ);
            while (m) {  /* rare once the list has filled with large values */
                const int j = __builtin_ctz(m);
                if (xr[i + j] > v[k - 1]) insert(v, ix, k, xr[i + j], i + j);
                m &= m - 1;
            }
        }
        nan |= nans != 0;
#elif defined(EMBER_AVX2)
        __m256 nans = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 xv = _mm256_loadu_ps(xr + i);
            nans = _mm256_or_ps(nans, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(xv, _mm256_set1_ps(v[k - 1]), _CMP_GT_OQ));
            while (m) {
                const int j = __builtin_ctz(m);
                if (xr[i + j] > v[k - 1]) insert(v, ix, k, xr[i + j], i + j);
                m &= m - 1;
            }
        }
        nan |= _mm256_movemask_ps(nans) != 0;
#endif
        for (; i < n; i++) {
            nan |= isnan(xr[i]);
            if (xr[i] > v[k - 1]) insert(v, ix, k, xr[i], i);
        }
        if (nan) ok = 0;
    }
    return ok;
}

/* idx [rows]: the first index of each row's maximum. Returns 0 when a row holds NaN. */
int ember_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *idx) {
    int ok = 1;
#pragma omp parallel for schedule(static) if (rows * n > 65536) reduction(& : ok)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float best = -INFINITY;
        int nan = 0;
        int64_t i = 0, at = 0;
#if defined(__AVX512F__)
        __m512 mx = _mm512_set1_ps(-INFINITY);
        __mmask16 nans = 0;
        for (; i + 16 <= n; i += 16) {  /* the maximum and any NaN in one pass */
            const __m512 xv = _mm512_loadu_ps(xr + i);
            nans |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
            mx = _mm512_max_ps(mx, xv);
        }
        nan = nans != 0;
        best = _mm512_reduce_max_ps(mx);
#elif defined(EMBER_AVX2)
        __m256 mx = _mm256_set1_ps(-INFINITY), nans = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 xv = _mm256_loadu_ps(xr + i);
            nans = _mm256_or_ps(nans, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
            mx = _mm256_max_ps(mx, xv);
        }
        nan = _mm256_movemask_ps(nans) != 0;
        best = hmax8(mx);
#endif
        for (; i < n; i++) {
            nan |= isnan(xr[i]);
            best = xr[i] > best ? xr[i] : best;
        }
        if (nan) {
            ok = 0;
            continue;
        }
#if defined(__AVX512F__)
        for (; at + 16 <= n; at += 16) {  /* the first occurrence, 16 at a time */
            const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + at), _mm512_set1_ps(best), _CMP_EQ_OQ);
            if (m) {
                at += __builtin_ctz(m);
                break;
            }
        }
#elif defined(EMBER_AVX2)
        for (; at + 8 <= n; at += 8) {
            const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xr + at), _mm256_set1_ps(best), _CMP_EQ_OQ));
            if (m) {
                at += __builtin_ctz((unsigned)m);
                break;
            }
        }
#endif
        while (at < n - 1 && xr[at] != best) at++;  /* the tail (found above: stops at once) */
        idx[r] = at;
    }
    return ok;
}

/* Structured outputs: x[rows[r], t] = -inf wherever bit t of bits[r] (one int32 word per 32 tokens) is 0, so a
 * constrained row keeps only the tokens its grammar allows. Word-level fast paths: a grammar step allows
 * either a few tokens (words of 0) or nearly all of them (inside a string: words of ~0). */
void ember_mask_rows(float *x, int64_t n, const int64_t *rows, int64_t nrows, const int32_t *bits, int64_t words) {
    for (int64_t r = 0; r < nrows; r++) {
        float *xr = x + rows[r] * n;
        const uint32_t *b = (const uint32_t *)(bits + r * words);
        for (int64_t w = 0; w < words && w * 32 < n; w++) {
            uint32_t word = b[w];
            if (word == 0xFFFFFFFFu)
                continue;
            int64_t end = w * 32 + 32 < n ? 32 : n - w * 32;
            float *xw = xr + w * 32;
            if (word == 0) {
                for (int64_t j = 0; j < end; j++)
                    xw[j] = -INFINITY;
                continue;
            }
            for (int64_t j = 0; j < end; j++)
                if (!((word >> j) & 1u))
                    xw[j] = -INFINITY;
        }
    }
}
