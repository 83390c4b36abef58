/* Quantized-weight products for CPU: y[m][o] = sum_i x[m][i] * w[o][i] (+ bias[o]), with w kept
 * in one of tokenmill's packed formats (model/layers/quant.py) and x, y in float32.
 *
 * A weight row o holds in / group groups. Each group has a scale s and optionally a min mn, and
 * w = s * q + mn exactly as the GGUF dequantization computes it (q * s is exact in float32 for
 * every source format, so one fused multiply-add rounds once, as numpy's (d * q) + m does):
 *   bits 4: q in 0..15, two per byte; in a group of 32, byte k holds q[k] (low) and q[k + 16]
 *           (high nibble), GGML's own Q4_0/Q4_1 order; without mins, w = s (q - 8) (Q4_0);
 *   bits 8: q in -128..127 (int8), one per byte; groups of 32 or 16 (Q6_K);
 *   scales and mins are float16 (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1: the file's own values) or float32
 *   (K-quants, whose super-block scale times sub-block scale needs up to 19 bits).
 * Weights are dequantized in registers, never in memory: decode streams ~5-9 bits a weight
 * instead of 32. Activations stay float32 (no activation quantization): the oracle is
 * dequantize-then-F.linear (quant.py's reference), which the tests compare against.
 *
 * Built at run time by model/layers/kernels.py with the other kernels (-O3 -march=native): the
 * AVX-512 path, else AVX2+FMA, else plain C; the CPU the kernel was compiled on decides.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *q;  /* [out, in * bits / 8] */
    const void *scales; /* [out, in / group], float16 or float32 */
    const void *mins;   /* same shape, or NULL (mn = 0) */
    int bits, group, f32;
    long in, row_bytes, groups;
} qfmt;

static inline float ld_scale(const void *p, int f32, long i) {
    return f32 ? ((const float *)p)[i] : h2f(((const uint16_t *)p)[i]);
}

/* Group g of weight row o, dequantized into wg[group]: the reference the vector paths match. */
__attribute__((unused)) static void dequant_group(const qfmt *f, long o, long g, float *wg) {
    const uint8_t *q = f->q + o * f->row_bytes;
    float s = ld_scale(f->scales, f->f32, o * f->groups + g);
    float mn = f->mins ? ld_scale(f->mins, f->f32, o * f->groups + g) : f->bits == 4 ? -8.0f * s : 0.0f;
    if (f->bits == 4) {
        const uint8_t *b = q + g * 16;
        for (int k = 0; k < 16; k++) {
            wg[k] = __builtin_fmaf((float)(b[k] & 15), s, mn);
            wg[k + 16] = __builtin_fmaf((float)(b[k] >> 4), s, mn);
        }
    } else {
        const int8_t *b = (const int8_t *)q + g * f->group;
        for (int k = 0; k < f->group; k++) wg[k] = __builtin_fmaf((float)b[k], s, mn);
    }
}

#define MAX_MR 8 /* activation rows that share one pass over a weight row */
#define CH 16 /* groups whose scales are converted to float32 together */

/* Scales and mins of groups [g0, g0 + n) of row o (n <= CH) as float32 into s[] and m[]: m is
 * the row's mins, or -8 s for 4-bit rows stored without mins (Q4_0: w = s (q - 8), and
 * s q - 8 s is exact in float32), or 0. A CH-float buffer per weight row stays in L1. */
static inline void chunk_scales(const qfmt *f, long o, long g0, int n, float *s, float *m) {
    const long base = o * f->groups + g0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    const __mmask16 k = (__mmask16)((1u << n) - 1);
    __m512 vs = f->f32 ? _mm512_maskz_loadu_ps(k, (const float *)f->scales + base)
                       : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)f->scales + base));
    __m512 vm = _mm512_setzero_ps();
    if (f->mins)
        vm = f->f32 ? _mm512_maskz_loadu_ps(k, (const float *)f->mins + base)
                    : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)f->mins + base));
    else if (f->bits == 4)
        vm = _mm512_mul_ps(vs, _mm512_set1_ps(-8.0f));
    _mm512_storeu_ps(s, vs);
    _mm512_storeu_ps(m, vm);
#else
#if defined(__AVX__) && defined(__F16C__)
    if (n == CH) { /* whole chunks 8 at a time; a row's last partial chunk goes one by one */
        for (int h = 0; h < CH; h += 8) {
            const long at = base + h;
            __m256 vs = f->f32 ? _mm256_loadu_ps((const float *)f->scales + at)
                               : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)f->scales + at)));
            __m256 vm = _mm256_setzero_ps();
            if (f->mins)
                vm = f->f32 ? _mm256_loadu_ps((const float *)f->mins + at)
                            : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)f->mins + at)));
            else if (f->bits == 4)
                vm = _mm256_mul_ps(vs, _mm256_set1_ps(-8.0f));
            _mm256_storeu_ps(s + h, vs);
            _mm256_storeu_ps(m + h, vm);
        }
        return;
    }
#endif
    for (int j = 0; j < n; j++) {
        s[j] = ld_scale(f->scales, f->f32, base + j);
        m[j] = f->mins ? ld_scale(f->mins, f->f32, base + j) : f->bits == 4 ? -8.0f * s[j] : 0.0f;
    }
#endif
}

#if defined(__AVX512F__)
/* ---- AVX-512: 16 lanes; a 4-bit group is two vectors, looked up in a 16-entry table ---- */
#define W 16
typedef __m512 vf;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(v) _mm512_reduce_add_ps(v)

/* Group g of row q as GROUP / W vectors (32 / W for 4 bits). HM = 0: a 4-bit row without mins,
 * whose table is s (q - 8) with one multiply (exact, so equal to s q + (-8 s)). */
static inline __attribute__((always_inline)) void dq_group(const int BITS, const int GROUP,
                                                          const int HM, const uint8_t *q, long g,
                                                          float s, float mn, vf *out) {
    if (BITS == 4) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 iota8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
        __m512 tab = HM ? _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(mn))
                        : _mm512_mul_ps(iota8, _mm512_set1_ps(s));
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + g * 16)));
        out[0] = _mm512_permutexvar_ps(v, tab); /* uses the low 4 bits of each lane */
        out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
    } else {
        const int8_t *b = (const int8_t *)q + g * GROUP;
        __m512 vs = _mm512_set1_ps(s);
        for (int c = 0; c < GROUP / W; c++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + c * W))));
            out[c] = HM ? _mm512_fmadd_ps(v, vs, _mm512_set1_ps(mn)) : _mm512_mul_ps(v, vs);
        }
    }
}
/* Weight rows per pass for MR activation rows (32 registers: MR * NR accumulators, 2 NR
 * dequantized vectors), one accumulator per (activation row, weight row): NR chains hide the FMA
 * latency at MR = 1, and at MR = 8 each dequantized group feeds 8 rows (a batch's ALU work per
 * row and weight: 2 FMAs + 6/8 of a dequantization, against 6/4 with 4 rows a pass). */
#define NR_OF(MR) ((MR) == 1 ? 8 : (MR) <= 4 ? 4 : 2)
#define NR_MAX 8
#define NCA_OF(NC) 1
#define NCA_MAX 1
/* activation rows per pass over a tile: 8 while 8 rows of x stay in L1 (in <= 1024), else 4
 * (the x rows are reloaded for every NR weight rows, so NR = 2 doubles that traffic: measured
 * 0.88x at 16 rows through a 2048x8192 weight, 1.2x through SmolLM2's 1536x576) */
#define BLOCK_MR(in) ((in) <= 1024 ? 8 : 4)
#define TILE_ROWS 8
/* software prefetch on a tile's first pass with 4+ weight rows a pass (at 2, the 8-row passes of
 * small layers, it measured 0.94-0.99x) */
#define PREFETCHES(NR, pf) ((pf) && (NR) >= 4)
#elif defined(__AVX2__) && defined(__FMA__)
/* ---- AVX2: 8 lanes; nibbles masked and converted ---- */
#define W 8
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void dq_group(const int BITS, const int GROUP,
                                                          const int HM, const uint8_t *q, long g,
                                                          float s, float mn, vf *out) {
    __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(mn); /* 4 bits, HM = 0: mn = -8 s */
    if (BITS == 4) {
        const __m256i lo4 = _mm256_set1_epi32(15);
        for (int c = 0; c < 2; c++) { /* bytes 8c..8c+7: elements 8c.. (low), 16+8c.. (high) */
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + g * 16 + 8 * c)));
            out[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, lo4)), vs, vm);
            out[c + 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), vs, vm);
        }
    } else {
        const int8_t *b = (const int8_t *)q + g * GROUP;
        for (int c = 0; c < GROUP / W; c++) {
            __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + c * W))));
            out[c] = HM ? _mm256_fmadd_ps(v, vs, vm) : _mm256_mul_ps(v, vs);
        }
    }
}
/* 16 registers: one weight row at a time, one accumulator per (activation row, vector) */
#define NR_OF(MR) 1
#define NR_MAX 1
#define NCA_OF(NC) (NC)
#define NCA_MAX (32 / W)
#define BLOCK_MR(in) MAX_MR
#define TILE_ROWS 1
#define PREFETCHES(NR, pf) 0 /* one row a pass: prefetching it measured 0.85-0.94x (-mno-avx512f) */
#endif

#ifdef W
/* MR activation rows times weight rows o..o+NR-1, for one format (BITS, GROUP, HM). Every size
 * is a literal at the call, so the loops unroll and acc[][][] lives in registers: each
 * dequantized weight vector meets MR activation rows, each activation load meets NR weight
 * rows, and NR * NCA accumulators per activation row hide the FMA latency. pf: the first pass
 * over these rows, which prefetches the next NR rows' bytes one block ahead (later passes find
 * them in cache). Decode's weights come from DRAM in small layers the hardware prefetcher
 * barely ramps up on: measured 1.23x over SmolLM2's layers at one row, 1.7x on its LM head. */
static inline __attribute__((always_inline)) void rows_blk(const int MR, const int NR,
                                                          const int NCA, const int BITS,
                                                          const int GROUP, const int HM,
                                                          const qfmt *f, long o, const float *x,
                                                          long ldx, float *y, long ldy,
                                                          const float *bias, const int pf) {
    const int NC = (BITS == 4 ? 32 : GROUP) / W;
    /* fixed sizes (NR, MR are literals only after inlining): registers, not a stack array */
    const uint8_t *q[NR_MAX];
    vf acc[MAX_MR][NR_MAX][NCA_MAX];
    float sl[NR_MAX][CH], ml[NR_MAX][CH];
    for (int n = 0; n < NR; n++) q[n] = f->q + (o + n) * f->row_bytes;
    for (int r = 0; r < MR; r++)
        for (int n = 0; n < NR; n++)
            for (int c = 0; c < NCA; c++) acc[r][n][c] = VZERO();
    for (long g0 = 0; g0 < f->groups; g0 += CH) {
        const int ng = f->groups - g0 < CH ? (int)(f->groups - g0) : CH;
        for (int n = 0; n < NR; n++) chunk_scales(f, o + n, g0, ng, sl[n], ml[n]);
        if (PREFETCHES(NR, pf))
            for (int n = 0; n < NR; n++) {
                const long at = ((o + n + NR) * f->groups + g0) * (f->f32 ? 4 : 2);
                __builtin_prefetch((const char *)f->scales + at);
                if (f->mins) __builtin_prefetch((const char *)f->mins + at);
            }
        for (int j = 0; j < ng; j++) {
            const long g = g0 + j, i = g * GROUP, at = g * GROUP * BITS / 8;
            if (PREFETCHES(NR, pf) && at % 64 == 0) /* a cache line per row every 64 bytes */
                for (int n = 0; n < NR; n++) __builtin_prefetch(q[n] + NR * f->row_bytes + at);
            vf w[NR_MAX][32 / W];
            for (int n = 0; n < NR; n++) dq_group(BITS, GROUP, HM, q[n], g, sl[n][j], ml[n][j], w[n]);
            for (int c = 0; c < NC; c++)
                for (int r = 0; r < MR; r++) {
                    vf xv = VLOAD(x + r * ldx + i + c * W);
                    for (int n = 0; n < NR; n++)
                        acc[r][n][c % NCA] = VFMA(w[n][c], xv, acc[r][n][c % NCA]);
                }
        }
    }
    for (int r = 0; r < MR; r++)
        for (int n = 0; n < NR; n++) {
            vf a = acc[r][n][0];
            for (int c = 1; c < NCA; c++) a = a + acc[r][n][c];
            y[r * ldy + o + n] = VSUM(a) + (bias ? bias[o + n] : 0.0f);
        }
}
#define BLK(MR, NR, BITS, GROUP, HM, o)                                                            \
    rows_blk(MR, NR, NCA_OF((BITS == 4 ? 32 : GROUP) / W), BITS, GROUP, HM, f, o, x, ldx, y, ldy, bias, pf)
#else
/* ---- plain C: one group at a time through a small buffer ---- */
#define BLOCK_MR(in) MAX_MR
#define TILE_ROWS 1
#define NR_OF(MR) 1
static void rows_blk_c(const int MR, const qfmt *f, long o, const float *x, long ldx, float *y,
                       long ldy, const float *bias) {
    float acc[MAX_MR] = {0}, w[32];
    for (long g = 0; g < f->groups; g++) {
        dequant_group(f, o, g, w);
        for (int r = 0; r < MR; r++)
            for (int k = 0; k < f->group; k++) acc[r] += w[k] * x[r * ldx + g * f->group + k];
    }
    for (int r = 0; r < MR; r++) y[r * ldy + o] = acc[r] + (bias ? bias[o] : 0.0f);
}
#define BLK(MR, NR, BITS, GROUP, HM, o) rows_blk_c(MR, f, o, x, ldx, y, ldy, bias)
#endif

/* one function per (format, MR): the only runtime switch is here, outside the loops */
#define ROWS_FN(BITS, GROUP, HM, MR)                                                               \
    static void rows_##BITS##_##GROUP##_##HM##_##MR(const qfmt *f, long o0, long o1,              \
                                                    const float *x, long ldx, float *y, long ldy, \
                                                    const float *bias, int pf) {                  \
        long o = o0;                                                                               \
        if (NR_OF(MR) > 1)                                                                         \
            for (; o + NR_OF(MR) <= o1; o += NR_OF(MR)) BLK(MR, NR_OF(MR), BITS, GROUP, HM, o);    \
        for (; o < o1; o++) BLK(MR, 1, BITS, GROUP, HM, o);                                        \
    }
#define ROWS_FMT(BITS, GROUP, HM)                                                                  \
    ROWS_FN(BITS, GROUP, HM, 1) ROWS_FN(BITS, GROUP, HM, 2) ROWS_FN(BITS, GROUP, HM, 3)            \
    ROWS_FN(BITS, GROUP, HM, 4) ROWS_FN(BITS, GROUP, HM, 5) ROWS_FN(BITS, GROUP, HM, 6)            \
    ROWS_FN(BITS, GROUP, HM, 7) ROWS_FN(BITS, GROUP, HM, 8)
ROWS_FMT(4, 32, 0)
ROWS_FMT(4, 32, 1)
ROWS_FMT(8, 32, 0)
ROWS_FMT(8, 32, 1)
ROWS_FMT(8, 16, 0)
ROWS_FMT(8, 16, 1)

typedef void (*rows_fn)(const qfmt *, long, long, const float *, long, float *, long, const float *,
                        int);
#define TABLE(BITS, GROUP, HM)                                                                     \
    {rows_##BITS##_##GROUP##_##HM##_1, rows_##BITS##_##GROUP##_##HM##_2,                           \
     rows_##BITS##_##GROUP##_##HM##_3, rows_##BITS##_##GROUP##_##HM##_4,                           \
     rows_##BITS##_##GROUP##_##HM##_5, rows_##BITS##_##GROUP##_##HM##_6,                           \
     rows_##BITS##_##GROUP##_##HM##_7, rows_##BITS##_##GROUP##_##HM##_8}
static const rows_fn ROWS[6][MAX_MR] = {TABLE(4, 32, 0), TABLE(4, 32, 1), TABLE(8, 32, 0),
                                        TABLE(8, 32, 1), TABLE(8, 16, 0), TABLE(8, 16, 1)};

static void rows_mr(int mr, const qfmt *f, long o0, long o1, const float *x, long ldx, float *y,
                    long ldy, const float *bias, int pf) {
    int k = (f->bits == 4 ? 0 : f->group == 32 ? 2 : 4) + (f->mins ? 1 : 0);
    ROWS[k][mr - 1](f, o0, o1, x, ldx, y, ldy, bias, pf);
}

static int check(int bits, int group, long in) {
    if (bits == 4 && group != 32) return -1;
    if (bits != 4 && bits != 8) return -1;
    if (group != 16 && group != 32) return -1;
    if (in < group || in % group) return -1;
    return 0;
}

static qfmt make(const uint8_t *q, const void *scales, const void *mins, int bits, int group,
                 int f32, long in) {
    qfmt f = {q, scales, mins, bits, group, f32, in, in * bits / 8, in / group};
    return f;
}

/* x: [m, in] rows ldx apart; y: [m, out] rows ldy apart; bias or NULL. 0, or -1 for a format or
 * size it does not take. Threads split the output rows in tiles whose packed bytes stay in L1
 * while every block of MAX_MR activation rows passes over them. */
int qgemm(const float *x, long ldx, const uint8_t *q, const void *scales, const void *mins,
          int bits, int group, int f32, const float *bias, float *y, long ldy, long m, long in,
          long out, int nthreads) {
    if (m < 1 || out < 1 || check(bits, group, in)) return -1;
    qfmt f = make(q, scales, mins, bits, group, f32, in);
    long per_row = f.row_bytes + f.groups * (f32 ? 4 : 2) * (mins ? 2 : 1);
    long tile = 16384 / per_row / TILE_ROWS * TILE_ROWS;
    if (tile < TILE_ROWS) tile = TILE_ROWS;
    if (tile * nthreads > out) tile = ((out + nthreads - 1) / nthreads + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    long ntiles = (out + tile - 1) / tile;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long t = 0; t < ntiles; t++) {
        long o0 = t * tile, o1 = o0 + tile < out ? o0 + tile : out;
        const long block = BLOCK_MR(in);
        for (long r0 = 0; r0 < m; r0 += block) {
            int mr = m - r0 < block ? (int)(m - r0) : (int)block;
            rows_mr(mr, &f, o0, o1, x + r0 * ldx, ldx, y + r0 * ldy, ldy, bias, r0 == 0);
        }
    }
    return 0;
}

/* Rows [0, rows) dequantized into w [rows, in] float32: the prefill path hands w to a float GEMM. */
int qdequant(const uint8_t *q, const void *scales, const void *mins, int bits, int group, int f32,
             float *w, long rows, long in, int nthreads) {
    if (rows < 1 || check(bits, group, in)) return -1;
    qfmt f = make(q, scales, mins, bits, group, f32, in);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < rows; o++) {
#ifdef W
        const uint8_t *q = f.q + o * f.row_bytes;
        const int n_vec = (bits == 4 ? 32 : group) / W;
        float sl[CH], ml[CH];
        for (long g0 = 0; g0 < f.groups; g0 += CH) { /* the values dequant_group gives, W at a time */
            const int ng = f.groups - g0 < CH ? (int)(f.groups - g0) : CH;
            chunk_scales(&f, o, g0, ng, sl, ml);
            for (int j = 0; j < ng; j++) {
                const long g = g0 + j;
                vf v[32 / W];
                if (bits == 4) dq_group(4, 32, 1, q, g, sl[j], ml[j], v);
                else if (group == 32) dq_group(8, 32, 1, q, g, sl[j], ml[j], v);
                else dq_group(8, 16, 1, q, g, sl[j], ml[j], v);
                for (int c = 0; c < n_vec; c++) VSTORE(w + o * in + g * group + c * W, v[c]);
            }
        }
#else
        for (long g = 0; g < f.groups; g++) dequant_group(&f, o, g, w + o * in + g * group);
#endif
    }
    return 0;
}
