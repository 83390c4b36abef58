/* Grammar bitmasks (llguidance's int32 words, bit j%32 of word j/32 allows token j) applied to
 * logits as they are: no bool [rows, vocab] mask is unpacked. bitmask_argmax picks a greedy
 * row's best allowed token without writing anything; bitmask_apply writes a row's logits with
 * the forbidden tokens at -inf. Token j is allowed iff its bit is set and j < limit, where
 * limit = min(vocab, 32 * words) (a padded LM head's extra columns are never allowed).
 * model/bitmask.py holds the plain-torch reference these are tested against. Built by kernels.py.
 */
#include <math.h>
#include <stdint.h>

/* Tokens per bitmask word: the loops below vectorize over a word's 32 lanes. */
#define LANES 32

/* The first allowed index of the largest allowed value: torch.argmax of the masked row (a NaN
 * counts as the largest, the first one wins; an all -inf row gives 0, as torch does). Unmasked
 * rows use numpy's argmax (bitmask.py). */
static long row_argmax(const float *x, long limit, const uint32_t *m) {
    float lane[LANES]; /* lane b: the best of indices 32 w + b, first seen in word at[b] */
    int32_t at[LANES];
    int nan = 0;
    for (int b = 0; b < LANES; b++) lane[b] = -INFINITY, at[b] = -1;
    long full = limit / LANES, rem = limit % LANES;
    for (long w = 0; w < full; w++) {
        uint32_t bits = m[w];
        if (!bits) continue;
        const float *xw = x + w * LANES;
        for (int b = 0; b < LANES; b++) {
            float v = ((bits >> b) & 1u) ? xw[b] : -INFINITY;
            int gt = v > lane[b];
            nan |= v != v;
            lane[b] = gt ? v : lane[b];
            at[b] = gt ? (int32_t)w : at[b];
        }
    }
    uint32_t tail = rem ? m[full] & ((1u << rem) - 1u) : 0u;
    for (long b = 0; b < rem; b++) {
        float v = ((tail >> b) & 1u) ? x[full * LANES + b] : -INFINITY;
        int gt = v > lane[b];
        nan |= v != v;
        lane[b] = gt ? v : lane[b];
        at[b] = gt ? (int32_t)full : at[b];
    }
    if (nan) {
        for (long j = 0; j < limit; j++)
            if (((m[j / LANES] >> (j % LANES)) & 1u) && x[j] != x[j]) return j;
    }
    float best = -INFINITY;
    for (int b = 0; b < LANES; b++) best = lane[b] > best ? lane[b] : best;
    if (best == -INFINITY) return 0;
    long arg = limit;
    for (int b = 0; b < LANES; b++) {
        long j = (long)at[b] * LANES + b;
        if (lane[b] == best && j < arg) arg = j;
    }
    return arg;
}

/* out[r] = argmax of row rows[r] of x [*, ld] under mask row r [n, words]. */
void bitmask_argmax(const float *x, long ld, long vocab, const int32_t *mask, long words,
                    const int64_t *rows, long n, int64_t *out, int nthreads) {
    long limit = words * LANES < vocab ? words * LANES : vocab;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > 1 && nthreads > 1)
    for (long r = 0; r < n; r++)
        out[r] = row_argmax(x + rows[r] * ld, limit, (const uint32_t *)(mask + r * words));
}

/* dst row rows[r] = src row rows[r] with the tokens mask row r forbids at -inf (src, dst [*, ld];
 * they may be the same buffer). */
void bitmask_apply(const float *src, float *dst, long ld, long vocab, const int32_t *mask,
                   long words, const int64_t *rows, long n, int nthreads) {
    long limit = vocab < words * LANES ? vocab : words * LANES;
    long full = limit / LANES, rem = limit % LANES;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > 1 && nthreads > 1)
    for (long r = 0; r < n; r++) {
        const float *x = src + rows[r] * ld;
        float *y = dst + rows[r] * ld;
        const uint32_t *m = (const uint32_t *)(mask + r * words);
        for (long w = 0; w < full; w++) {
            uint32_t bits = m[w];
            const float *xw = x + w * LANES;
            float *yw = y + w * LANES;
            for (int b = 0; b < LANES; b++) yw[b] = ((bits >> b) & 1u) ? xw[b] : -INFINITY;
        }
        uint32_t tail = rem ? m[full] : 0u;
        for (long b = 0; b < rem; b++)
            y[full * LANES + b] = ((tail >> b) & 1u) ? x[full * LANES + b] : -INFINITY;
        for (long j = limit; j < vocab; j++) y[j] = -INFINITY;
    }
}
