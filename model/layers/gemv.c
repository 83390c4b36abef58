/* Few-row float32 GEMV for CPU decode: y[m][o] = sum_i x[m][i] * w[o][i] (+ bias[o]).
 *
 * Decode multiplies one (or a few) activation rows by every weight matrix, so it is bound by
 * reading the weights from memory once. Each thread streams a contiguous range of weight rows
 * and keeps the x rows in L1; on the 2-core test machine this reads ~30 GB/s where oneDNN's
 * GEMV reads ~20 GB/s. Compiled at run time by model/layers/kernels.py (-O3 -march=native
 * -fopenmp) and linked against the OpenMP runtime torch already loaded (same libgomp.so.1).
 * torch's F.linear is the oracle: tests/model/test_gemv.py compares the two.
 */
#include <stddef.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* one x row: eight independent accumulators hide the FMA latency */
static float dot1(const float *restrict r, const float *restrict x, long in) {
    __m256 a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
    long i = 0;
    for (; i + 64 <= in; i += 64)
        for (int k = 0; k < 8; k++)
            a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 8 * k), _mm256_loadu_ps(x + i + 8 * k), a[k]);
    for (; i + 8 <= in; i += 8) a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i), a[0]);
    for (int k = 1; k < 8; k++) a[0] = _mm256_add_ps(a[0], a[k]);
    float s = hsum(a[0]);
    for (; i < in; i++) s += r[i] * x[i];
    return s;
}

/* M x rows share each weight load; M is a compile-time constant so acc stays in registers */
#define DOT_ROWS(M)                                                                          \
    static void dot##M(const float *restrict r, const float *restrict x, long ldx, long in,  \
                       float *restrict out, long ldy) {                                     \
        __m256 acc[M];                                                                       \
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();                            \
        long i = 0;                                                                          \
        for (; i + 8 <= in; i += 8) {                                                        \
            __m256 wv = _mm256_loadu_ps(r + i);                                              \
            for (int m = 0; m < M; m++)                                                      \
                acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + i), acc[m]);      \
        }                                                                                    \
        for (int m = 0; m < M; m++) {                                                        \
            float s = hsum(acc[m]);                                                          \
            for (long j = i; j < in; j++) s += r[j] * x[m * ldx + j];                        \
            out[m * ldy] = s;                                                                \
        }                                                                                    \
    }
#else
static float dot1(const float *restrict r, const float *restrict x, long in) {
    float a[8] = {0};
    long i = 0;
    for (; i + 8 <= in; i += 8)
        for (int k = 0; k < 8; k++) a[k] += r[i + k] * x[i + k];
    float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    for (; i < in; i++) s += r[i] * x[i];
    return s;
}

#define DOT_ROWS(M)                                                                          \
    static void dot##M(const float *restrict r, const float *restrict x, long ldx, long in,  \
                       float *restrict out, long ldy) {                                     \
        for (int m = 0; m < M; m++) out[m * ldy] = dot1(r, x + m * ldx, in);                 \
    }
#endif

DOT_ROWS(2)

/* the largest m gemv() takes: from 3 rows on, oneDNN's GEMM is as fast or faster (measured) */
#define MAX_ROWS 2
int gemv_max_rows(void) { return MAX_ROWS; }

/* x: [m, in] rows ldx apart; w: [out, in] contiguous; y: [m, out] rows ldy apart; bias or NULL */
int gemv(const float *x, long ldx, const float *w, const float *bias, float *y, long ldy,
         long m, long in, long out, int nthreads) {
    if (m < 1 || m > MAX_ROWS || in < 1 || out < 1) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        const float *r = w + o * in;
        if (m == 1)
            y[o] = dot1(r, x, in);
        else
            dot2(r, x, ldx, in, y + o, ldy);
        if (bias)
            for (long k = 0; k < m; k++) y[k * ldy + o] += bias[o];
    }
    return 0;
}
