/* A whole step's decoder layers in one call: for B token rows (decode rows, prompt chunks, both),
 *   residual += h; x = RMSNorm(residual); qkv = x Wqkv^T (+b); (q/k RMSNorm;) RoPE(q, k);
 *   K/V -> paged cache;
 *   a = softmax(q K^T / sqrt(d)) V over the row's keys; h = a Wo^T;
 *   residual += h; x = RMSNorm(residual); h = (silu(x Wg^T) * x Wu^T) Wd^T
 *   (or, in a sparse MoE layer, h = the sum over the row's top-k experts of weight * that
 *   expert's SwiGLU of x, + a sigmoid-gated shared expert: moe_block)
 * for every layer, with packed weights (quant.c, float32 activations) or GGUF blocks (qdot.c,
 * int8 activations), then the final RMSNorm. At one stream a step is ~30 layers x ~60 small torch
 * ops, whose dispatch (~3 us each) costs more than reading the 4-bit weights; here it is one
 * ctypes call. Every computation of a row depends on that row alone (row-invariant kernels,
 * attention runs fixed by the row's context length), so one request gets the same bits alone,
 * batched, chunked or on a prefix hit. The torch modules (model/models/llama.py) stay the
 * reference and serve what this does not take (tensor parallelism, float weights, other
 * families); tests/model/test_fused_decode.py compares the two. Built by kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#ifdef _OPENMP
#include <omp.h>
static int thread_num(void) { return omp_get_thread_num(); }
static int omp_threads(void) { return omp_get_num_threads(); }
#else
static int thread_num(void) { return 0; }
static int omp_threads(void) { return 1; }
#endif

int qgemm(const float *x, long ldx, const uint8_t *q, const void *scales, const void *mins,
          int bits, int group, int f32, const float *bias, float *y, long ldy, long m, long in,
          long out, int nthreads);

long qx_row_bytes(long n, int k);
int qx_act_kind(int type);
int qx_quantize(const float *x, long ldx, long m, long n, int k, void *out, int nthreads);
int qx_gemm(int type, const uint8_t *w, long row_bytes, long out, long n_in, const void *xq,
            long m, float *y, long ldy, const float *bias, int nthreads);
int px_gemm(int type, const uint8_t *w, long out, long n_in, const void *xq, long m, float *y,
            long ldy, const float *bias, int nthreads);

#define MAX_PARTS 3
typedef struct { /* one linear: quant.py's QuantTensor, or (nparts > 0) qdot.py's BlockTensor */
    const uint8_t *q;
    const void *scales, *mins;
    const float *bias;
    int bits, group, f32;
    long in, out;
    int nparts;                       /* GGUF-block parts (int8 activations), stacked by rows */
    int types[MAX_PARTS], panel[MAX_PARTS]; /* GGML type; 1: px_gemm's panels, 0: file blocks */
    const uint8_t *data[MAX_PARTS];
    long rows[MAX_PARTS], row_bytes[MAX_PARTS];
} dlin;

typedef struct { /* a sparse MoE block (experts.py's FusedMoE, moe.py's SparseMoeBlock) */
    const float *router;            /* [experts, hidden] float32 */
    const dlin *gate_up, *down;     /* [experts] each: every expert's packed weights, no copies */
    const dlin *sh_gate_up, *sh_down; /* Qwen2-MoE's shared expert, or NULL */
    const float *sh_gate;           /* [hidden]: the shared expert's sigmoid gate */
    int experts, top_k, inter, norm_topk, sh_inter;
} dmoe;

typedef struct {
    dlin qkv, o, gate_up, down;
    const float *in_norm, *post_norm; /* [hidden] */
    const float *q_norm, *k_norm;     /* [head_dim] per-head RMSNorm before RoPE (Qwen3), or NULL */
    void *k_cache, *v_cache; /* [kv_heads, num_blocks, block_size, head_dim], float32 or float16 */
    const float *attn_out_norm, *ffn_out_norm; /* Gemma's norms after attention and the MLP */
    int window; /* a sliding layer's keys (Mistral, Gemma): the last `window`; 0: all */
    int rope;   /* 0: the global cos/sin, 1: the local (Gemma 3's sliding layers), -1: NoPE */
    const dmoe *moe; /* routed experts in place of gate_up/down, or NULL (dense) */
} dlayer;

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter;
    float eps;
    long num_blocks;
    int block_size;
    int kv_f16; /* 1: the KV cache holds float16 (rounded to nearest even, as torch's .half()) */
    float scale;      /* the softmax scale (1/sqrt(d); Gemma's query_pre_attn_scalar, Granite's) */
    float softcap;    /* Gemma 2's attention logit soft-cap, or 0 */
    float resid_mult; /* Granite's residual multiplier (1 elsewhere) */
    int act;          /* the gated MLP's: 0 SiLU, 1 GELU-tanh (Gemma) */
    int rot;          /* rotary dims of a head (Phi-3's partial rotary: < head_dim) */
    int experts, top_k, moe_inter; /* the widest MoE block (moe_inter: routed or shared), or 0 */
} dshape;

#if defined(__AVX512F__)
#include <immintrin.h>
static float dot(const float *a, const float *b, int n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static float dot(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#else
static float dot(const float *a, const float *b, int n) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#endif

/* exp(x) for a whole array in place: Cephes' expf (range reduction by ln 2, degree-6
 * polynomial, ~1 ulp) in vector registers; the softmax and SiLU of every layer need ~10^5-10^7
 * of them a step, and libm's scalar expf is ~15 cycles each. */
#if defined(__AVX512F__)
static inline __m512 vexp(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
static void exp_inplace(float *a, long n) {
    long i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(a + i, vexp(_mm512_loadu_ps(a + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(a + i, m, vexp(_mm512_maskz_loadu_ps(m, a + i)));
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 vexp(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static void exp_inplace(float *a, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(a + i, vexp(_mm256_loadu_ps(a + i)));
    for (; i < n; i++) a[i] = expf(a[i]);
}
#else
static void exp_inplace(float *a, long n) {
    for (long i = 0; i < n; i++) a[i] = expf(a[i]);
}
#endif

/* x's m rows quantized into xq for each activation kind l's parts need: act[k] (kind k's rows);
 * done[k] says which kinds were made. 0, or -1 on a type or size qdot.c does not take. */
static int quantize_for(const dlin *l, const float *x, long m, int nt, char *xq, char *act[2],
                        int done[2]) {
    act[0] = xq, act[1] = xq + m * qx_row_bytes(l->in, 0);
    done[0] = done[1] = 0;
    for (int p = 0; p < l->nparts; p++) {
        const int k = qx_act_kind(l->types[p]);
        if (k < 0) return -1;
        if (!done[k] && qx_quantize(x, l->in, m, l->in, k, act[k], nt)) return -1;
        done[k] = 1;
    }
    return 0;
}

/* y [m, out] = x W^T (+ bias) for GGUF-block parts, x already quantized (act[k]: kind k's rows) */
static int lin_parts(const dlin *l, char *const act[2], float *y, long m, int nt) {
    long at = 0;
    for (int p = 0; p < l->nparts; p++) {
        const int k = qx_act_kind(l->types[p]);
        if (k < 0) return -1;
        const float *b = l->bias ? l->bias + at : NULL;
        const int rc = l->panel[p]
            ? px_gemm(l->types[p], l->data[p], l->rows[p], l->in, act[k], m, y + at, l->out, b, nt)
            : qx_gemm(l->types[p], l->data[p], l->row_bytes[p], l->rows[p], l->in, act[k], m,
                      y + at, l->out, b, nt);
        if (rc) return -1;
        at += l->rows[p];
    }
    return 0;
}

/* y [m, out] = x W^T (+ bias); GGUF-block parts quantize x once per activation kind into xq */
static int lin(const dlin *l, const float *x, float *y, long m, int nt, char *xq) {
    if (l->nparts == 0)
        return qgemm(x, l->in, l->q, l->scales, l->mins, l->bits, l->group, l->f32, l->bias, y,
                     l->out, m, l->in, l->out, nt);
    char *act[2];
    int done[2];
    if (quantize_for(l, x, m, nt, xq, act, done)) return -1;
    return lin_parts(l, act, y, m, nt);
}

/* residual += h * mult (or = h for the first layer), x = residual / rms(residual) * w, one row
 * (mult: Granite's residual multiplier, applied before the sum as the torch norm does) */
static void add_norm(float *residual, const float *h, int add, float *x, const float *w, int n,
                     float eps, float mult) {
    for (int i = 0; i < n; i++) /* h * 1 is exact: mult 1 adds h as it is */
        residual[i] = add ? h[i] * mult + residual[i] : h[i];
    float ss = dot(residual, residual, n);
    float r = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) x[i] = w[i] * (residual[i] * r);
}

/* x = x / rms(x) * w in place, one head (Qwen3's q/k norm: RMSNorm over head_dim) */
static void head_norm(float *x, const float *w, int d, float eps) {
    float ss = dot(x, x, d);
    float r = 1.0f / sqrtf(ss / d + eps);
    for (int i = 0; i < d; i++) x[i] = w[i] * (x[i] * r);
}

/* a = act(g) * u: SiLU g / (1 + e^-g), or (act 1) GELU-tanh 0.5 g (1 + tanh(y)) written as
 * g / (1 + e^-2y), y = sqrt(2 / pi) (g + 0.044715 g^3) (within float32 rounding of torch's) */
static void gated_act(const float *g, const float *u, float *a, int n, int act) {
    if (act == 1)
        for (int i = 0; i < n; i++) a[i] = -1.5957691216057308f * (g[i] + 0.044715f * g[i] * g[i] * g[i]);
    else
        for (int i = 0; i < n; i++) a[i] = -g[i];
    exp_inplace(a, n);
    for (int i = 0; i < n; i++) a[i] = g[i] / (1.0f + a[i]) * u[i];
}

/* act [m, inter] = act(g) * u for gu rows [g | u] of 2 * inter (an expert's: SiLU) */
static void gated_rows(const float *gu, float *act, long m, int inter, int kind) {
    for (long b = 0; b < m; b++)
        gated_act(gu + b * 2L * inter, gu + b * 2L * inter + inter, act + b * (long)inter, inter,
                  kind);
}

/* x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]; cos, sin as RotaryEmbedding.cos_sin gives
 * them: [c, c] and [-s, s] */
static void rope(float *x, const float *cos, const float *sin, int d) {
    int half = d / 2;
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] + x2 * sin[i];
        x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}


/* Attention splits each row's context into runs of RUN_TOKENS keys (whole blocks) counted from
 * its first key: a run leaves, per query head, its max score, its sum of exp(score - max) and its
 * unnormalised output, and merge() combines a row's runs in order (flash-decoding). The runs and
 * their merge depend on the row's own context length only, never on the batch, the step's other
 * rows or the thread count, so a token's result is the same bits alone, batched, in a prefill
 * chunk of any size or as a decode row. Threads share out the (row, KV head, run) items; every
 * K/V byte of a run is read once by the G query heads of its KV head together. Prefetching the
 * next block measured no better with AVX-512 and ~1.1x slower with AVX2, so there is none. */
#define RUN_TOKENS 64
/* rows whose attention parts are held at once: bounds the parts at long contexts */
#define PARTS_FLOATS (4L << 20)
/* rows that go through every layer together: bounds the scratch of a long prefill chunk (a row
 * only reads K/V of earlier positions, which earlier tiles have written) */
#define ROW_TILE 256L

static int run_blocks(int bs) { return bs >= RUN_TOKENS ? 1 : RUN_TOKENS / bs; }
static long runs_of(long ctx, int bs) {
    const long nb = (ctx + bs - 1) / bs, rb = run_blocks(bs);
    return (nb + rb - 1) / rb;
}

/* float32 -> float16, rounded to nearest even (torch's .half()), overflow to inf */
static inline uint16_t f2h(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* rounds past 65504 */
    if (ax < 0x38800000) { /* a subnormal half: scale by 2^24 and round to an integer */
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));
    }
    const uint32_t r = ax + 0xfff + ((ax >> 13) & 1) - 0x38000000; /* rebias, round even */
    return (uint16_t)(sign | (r >> 13));
#endif
}

/* d values into the cache at element `at`, as float32 or float16 */
static void store_kv(void *cache, long at, const float *src, int d, int f16) {
    if (!f16) {
        memcpy((float *)cache + at, src, d * sizeof(float));
        return;
    }
    uint16_t *o = (uint16_t *)cache + at;
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= d; i += 16)
        _mm256_storeu_si256((__m256i *)(o + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < d; i++) o[i] = f2h(src[i]);
}

/* one cached row (d values) as float32 into out (float16 widened exactly) */
static inline const float *kv_row(const void *cache, long at, int d, const int F16, float *out) {
    if (!F16) return (const float *)cache + at;
    const uint16_t *h = (const uint16_t *)cache + at;
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= d; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
#elif defined(__F16C__)
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < d; i++) out[i] = h2f(h[i]);
    return out;
}

#if defined(__AVX512F__)
/* lane t = the sum of v[t]'s 16 lanes, by one fixed tree for every t: pairs within 128-bit lanes
 * (unpack ps, then pd), then across them (shuffle_f32x4); ~3 ops a dot instead of ~10 */
static inline __m512 hsum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}
#endif

/* part + g * ps = {max, sum, out[d]} of the run's query head g over its tokens from lo (a
 * sliding window's first key) on; sc: [G, tokens]; row: d floats of scratch for a widened
 * float16 row; cap: Gemma 2's soft-cap of the scaled scores, or 0 */
static inline __attribute__((always_inline)) void attend_run_t(
    const float *qrow, const void *kc, const void *vc, const int *table, int ctx, int lo, int bs,
    int d, int G, float scale, float cap, int j0, int j1, float *sc, float *part, long ps,
    float *row, const int F16, const int CC) {
    const long blk = (long)bs * d;
    const int t0 = j0 * bs > lo ? j0 * bs : lo, t1 = j1 * bs < ctx ? j1 * bs : ctx, n = t1 - t0;
#if defined(__AVX512F__)
    if (CC) { /* 16 keys at a time, their 16 dots summed in one tree */
        const int C = CC;
        for (int u = 0; u < n; u += 16) {
            const int nv = n - u < 16 ? n - u : 16; /* lanes past the run's end stay 0 */
            long at[16]; /* the keys' rows (once for all G heads), walking the block table */
            int j = (t0 + u) / bs, off = t0 + u - j * bs;
            for (int i = 0; i < nv; i++) {
                at[i] = table[j] * blk + (long)off * d;
                if (++off == bs) off = 0, j++;
            }
            for (int g = 0; g < G; g++) {
                __m512 q[16];
                for (int c = 0; c < C; c++) q[c] = _mm512_loadu_ps(qrow + g * d + c * 16);
                __m512 acc[16];
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++) {
                    acc[i] = _mm512_setzero_ps();
                    if (i < nv)
                        for (int c = 0; c < C; c++) {
                            const __m512 kv = F16 ? _mm512_cvtph_ps(_mm256_loadu_si256(
                                                        (const __m256i *)((const uint16_t *)kc + at[i] + c * 16)))
                                                  : _mm512_loadu_ps((const float *)kc + at[i] + c * 16);
                            acc[i] = _mm512_fmadd_ps(q[c], kv, acc[i]);
                        }
                }
                const __m512 v = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(sc + g * n + u, (__mmask16)((1u << nv) - 1), v);
            }
        }
    } else
#endif
        for (int j = j0; j < j1; j++) {
            const int e = (j + 1) * bs < t1 ? (j + 1) * bs : t1;
            for (int t = j * bs > t0 ? j * bs : t0; t < e; t++) {
                const float *k = kv_row(kc, table[j] * blk + (t - j * bs) * d, d, F16, row);
                for (int g = 0; g < G; g++) sc[g * n + t - t0] = dot(qrow + g * d, k, d) * scale;
            }
        }
    if (cap > 0.0f) /* tanh(s / cap) * cap, as the torch path (rare: Gemma 2 only) */
        for (long i = 0; i < (long)G * n; i++) sc[i] = tanhf(sc[i] / cap) * cap;
    for (int g = 0; g < G; g++) {
        float *sg = sc + g * n, mx = -INFINITY, sum = 0.0f;
#if defined(__AVX512F__)
        __m512 vm = _mm512_set1_ps(-INFINITY), vs = _mm512_setzero_ps();
        for (int u = 0; u < n; u += 16) {
            const __mmask16 m = n - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - u)) - 1);
            vm = _mm512_mask_max_ps(vm, m, vm, _mm512_maskz_loadu_ps(m, sg + u));
        }
        mx = _mm512_reduce_max_ps(vm);
        for (int u = 0; u < n; u += 16) {
            const __mmask16 m = n - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - u)) - 1);
            const __m512 e = vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + u), _mm512_set1_ps(mx)));
            _mm512_mask_storeu_ps(sg + u, m, e);
            vs = _mm512_mask_add_ps(vs, m, vs, e);
        }
        sum = _mm512_reduce_add_ps(vs);
#else
        for (int t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
        for (int t = 0; t < n; t++) sg[t] -= mx;
        exp_inplace(sg, n);
        for (int t = 0; t < n; t++) sum += sg[t];
#endif
        part[g * ps] = mx;
        part[g * ps + 1] = sum;
    }
#if defined(__AVX512F__)
    if (CC) { /* one head's d outputs stay in registers (the sums run over t in order, as below) */
        const int C = CC;
        for (int g = 0; g < G; g++) {
            __m512 acc[16];
            for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
            for (int j = j0; j < j1; j++) {
                const int e = (j + 1) * bs < t1 ? (j + 1) * bs : t1;
                for (int t = j * bs > t0 ? j * bs : t0; t < e; t++) {
                    const long at = table[j] * blk + (t - j * bs) * d;
                    const __m512 p = _mm512_set1_ps(sc[g * n + t - t0]);
                    for (int c = 0; c < C; c++) {
                        const __m512 vv = F16 ? _mm512_cvtph_ps(_mm256_loadu_si256(
                                                    (const __m256i *)((const uint16_t *)vc + at + c * 16)))
                                              : _mm512_loadu_ps((const float *)vc + at + c * 16);
                        acc[c] = _mm512_fmadd_ps(p, vv, acc[c]);
                    }
                }
            }
            for (int c = 0; c < C; c++) _mm512_storeu_ps(part + g * ps + 2 + c * 16, acc[c]);
        }
        return;
    }
#endif
    for (int g = 0; g < G; g++)
        for (int i = 0; i < d; i++) part[g * ps + 2 + i] = 0.0f;
    for (int j = j0; j < j1; j++) {
        const int e = (j + 1) * bs < t1 ? (j + 1) * bs : t1;
        for (int t = j * bs > t0 ? j * bs : t0; t < e; t++) {
            const float *vr = kv_row(vc, table[j] * blk + (t - j * bs) * d, d, F16, row);
            for (int g = 0; g < G; g++) {
                const float p = sc[g * n + t - t0];
                float *o = part + g * ps + 2;
                for (int i = 0; i < d; i++) o[i] += p * vr[i];
            }
        }
    }
}

static void attend_run(const float *qrow, const void *kc, const void *vc, const int *table,
                       int ctx, int lo, int bs, int d, int G, float scale, float cap, int j0,
                       int j1, float *sc, float *part, long ps, float *row, int f16) {
#define RUN(F16, CC) \
    attend_run_t(qrow, kc, vc, table, ctx, lo, bs, d, G, scale, cap, j0, j1, sc, part, ps, row, F16, CC)
#if defined(__AVX512F__) /* head sizes 64, 128 and 256 with the loops over d unrolled */
    if (d == 64) f16 ? RUN(1, 4) : RUN(0, 4);
    else if (d == 128) f16 ? RUN(1, 8) : RUN(0, 8);
    else if (d == 256) f16 ? RUN(1, 16) : RUN(0, 16);
    else
#endif
        f16 ? RUN(1, 0) : RUN(0, 0);
#undef RUN
}

/* out[d] = the softmax-weighted sum of one head's nparts runs (d + 2 floats each, in order) */
static void merge(const float *part, long nparts, int d, float *out) {
    const long stride = d + 2;
    float mx = -INFINITY, sum = 0.0f;
    for (long r = 0; r < nparts; r++) mx = part[r * stride] > mx ? part[r * stride] : mx;
    for (int i = 0; i < d; i++) out[i] = 0.0f;
    for (long r = 0; r < nparts; r++) {
        const float *pr = part + r * stride;
        const float w = expf(pr[0] - mx);
        sum += pr[1] * w;
        for (int i = 0; i < d; i++) out[i] += w * pr[2 + i];
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < d; i++) out[i] *= inv;
}

static long tile_rows(long B) { return B < ROW_TILE ? B : ROW_TILE; }

/* floats of one row's attention parts, and the rows whose parts are held at once */
static long row_parts(const dshape *s, long max_ctx) {
    return (long)s->heads * runs_of(max_ctx, s->block_size) * (s->head_dim + 2);
}
static long parts_rows_of(const dshape *s, long B, long max_ctx) {
    const long r = PARTS_FLOATS / row_parts(s, max_ctx);
    return r < 1 ? 1 : r > tile_rows(B) ? tile_rows(B) : r;
}

/* floats of the int8 activation scratch a tile's rows need (both block kinds of the widest input:
 * ~3.1 bytes a value, of 4) */
static long xq_floats(const dshape *s) {
    long widest = s->inter > s->hidden ? s->inter : s->hidden;
    if ((long)s->heads * s->head_dim > widest) widest = (long)s->heads * s->head_dim;
    return widest > s->moe_inter ? widest : s->moe_inter;
}

/* floats of the MoE scratch for T rows: probabilities, weights, ids and grouping, every (row,
 * choice)'s expert output, the layer input's int8 rows; then each thread's own: gathered rows
 * (float and int8), an expert's SwiGLU and its int8 rows for down */
static long moe_thread_floats(const dshape *s, long T) {
    return T * (4L * s->moe_inter + 2L * s->hidden);
}
static long moe_floats(const dshape *s, long T, int nthreads) {
    if (s->experts < 1) return 0;
    const long E = s->experts, K = s->top_k, H = s->hidden;
    return T * (E + 4 * K) + 3 * (E + 1) + T * K * H + T * H +
           (long)nthreads * moe_thread_floats(s, T);
}

/* scratch floats decode_layers needs for B rows and contexts up to max_ctx */
long decode_scratch(const dshape *s, long B, long max_ctx, int nthreads) {
    const long T = tile_rows(B), d = s->head_dim;
    long qkv = (long)(s->heads + 2 * s->kv_heads) * d;
    long group = s->heads / s->kv_heads;
    const long parts = parts_rows_of(s, B, max_ctx) * row_parts(s, max_ctx);
    return T * (s->hidden + qkv + (long)s->heads * d + 3L * s->inter) + T * xq_floats(s) +
           (long)nthreads * (group * run_blocks(s->block_size) * s->block_size + d) + /* runs */
           parts + moe_floats(s, T, nthreads);
}

/* att [B, heads * d] for one layer, rows a sub-tile at a time (parts: [row][head][run]) */
static void attention(const dlayer *L, const dshape *s, const float *qkv, long qkv_n, long B,
                      const int *ctx_lens, const int *tables, const int *row_seq, int max_blocks,
                      long max_runs, float scale, long cache_head, float *scores, float *parts,
                      long parts_rows, int nthreads, float *att) {
    const int d = s->head_dim, nh = s->heads, nkv = s->kv_heads, G = nh / nkv, bs = s->block_size;
    const long stride = d + 2, rb = run_blocks(bs), row_parts = nh * max_runs * stride;
    /* a sliding layer's row sees keys [lo, ctx): the runs before lo's are skipped (a run is
     * still counted from key 0, so the row's runs depend on its own context alone) */
#define LO(b) (L->window > 0 && ctx_lens[b] > L->window ? ctx_lens[b] - L->window : 0)
#define FIRST_RUN(b) (LO(b) / bs / rb)
    for (long r0 = 0; r0 < B; r0 += parts_rows) {
        const long r1 = r0 + parts_rows < B ? r0 + parts_rows : B;
        long units = 0;
        for (long b = r0; b < r1; b++) units += (long)nkv * (runs_of(ctx_lens[b], bs) - FIRST_RUN(b));
#pragma omp parallel num_threads(nthreads)
        {
            const int th = thread_num(), nth = omp_threads();
            const long u0 = units * th / nth, u1 = units * (th + 1) / nth;
            float *sc = scores + (long)th * (G * rb * bs + d), *row = sc + G * rb * bs;
            const long es = s->kv_f16 ? 2 : 4; /* bytes a cached value */
            long u = 0;
            for (long b = r0; b < r1 && u < u1; b++) {
                const long nr = runs_of(ctx_lens[b], bs), nb = (ctx_lens[b] + bs - 1) / bs;
                const int *table = tables + (long)row_seq[b] * max_blocks;
                for (int kh = 0; kh < nkv && u < u1; kh++)
                    for (long r = FIRST_RUN(b); r < nr; r++, u++) {
                        if (u < u0) continue;
                        if (u >= u1) break;
                        const long j1 = (r + 1) * rb < nb ? (r + 1) * rb : nb;
                        attend_run(qkv + b * qkv_n + (long)kh * G * d,
                                   (const char *)L->k_cache + kh * cache_head * es,
                                   (const char *)L->v_cache + kh * cache_head * es, table,
                                   ctx_lens[b], LO(b), bs, d, G, scale, s->softcap, (int)(r * rb), (int)j1, sc,
                                   parts + (b - r0) * row_parts + ((long)kh * G * max_runs + r) * stride,
                                   max_runs * stride, row, s->kv_f16);
                    }
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (long bh = r0 * nh; bh < r1 * nh; bh++) {
                const long b = bh / nh, h = bh % nh, first = FIRST_RUN(b);
                merge(parts + (b - r0) * row_parts + (h * max_runs + first) * stride,
                      runs_of(ctx_lens[b], bs) - first, d, att + bh * d);
            }
        }
    }
#undef FIRST_RUN
#undef LO
}

/* Routing of B rows x [B, H], as experts.py's FusedMoE.route: logits = x Wr^T in float32 (one
 * dot a logit), softmax, the top_k probabilities in descending order (equal ones: the lower
 * expert id first, as route's stable sort), renormalized to sum to 1 where norm_topk says.
 * p [B, experts]: the probabilities; ids, wts [B, top_k]. Every row is its own. 0, or -1. */
int moe_route(const float *router, int experts, int top_k, int norm_topk, const float *x, long B,
              int H, float *p, int *ids, float *wts, int nthreads) {
    const int E = experts, K = top_k;
    if (E < 1 || K < 1 || K > E) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (B * E * (long)H >= 262144)
    for (long be = 0; be < B * E; be++)
        p[be] = dot(x + be / E * H, router + be % E * (long)H, H);
    for (long b = 0; b < B; b++) {
        float *pb = p + b * E, mx = pb[0], sum = 0.0f;
        for (int e = 1; e < E; e++) mx = pb[e] > mx ? pb[e] : mx;
        for (int e = 0; e < E; e++) pb[e] -= mx;
        exp_inplace(pb, E);
        for (int e = 0; e < E; e++) sum += pb[e];
        for (int e = 0; e < E; e++) pb[e] /= sum;
        int *id = ids + b * K;
        float *w = wts + b * K, tot = 0.0f;
        for (int j = 0; j < K; j++) { /* strict >: of equal ones the lowest id not yet taken */
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= id[i] == e;
                if (!taken && (best < 0 || pb[e] > pb[best])) best = e;
            }
            id[j] = best, w[j] = pb[best];
        }
        if (norm_topk) {
            for (int j = 0; j < K; j++) tot += w[j];
            for (int j = 0; j < K; j++) w[j] /= tot;
        }
    }
    return 0;
}

/* gu [n, 2 inter] = expert rows tok[0..n) through its gate_up: int8 rows gathered from the
 * layer input's quantized rows (act, kinds done), or float rows gathered from x into xe */
static int expert_gate_up(const dlin *l, const float *x, char *const act[2], const int done[2],
                          const int *tok, long n, long T, float *xe, char *xqg, float *gu, int nt) {
    const long H = l->in;
    if (l->nparts == 0) {
        for (long i = 0; i < n; i++) memcpy(xe + i * H, x + tok[i] * H, H * sizeof(float));
        return qgemm(xe, H, l->q, l->scales, l->mins, l->bits, l->group, l->f32, l->bias, gu,
                     l->out, n, H, l->out, nt);
    }
    char *g[2] = {xqg, xqg + T * qx_row_bytes(H, 0)};
    for (int k = 0; k < 2; k++) {
        if (!done[k]) continue;
        const long rb = qx_row_bytes(H, k);
        for (long i = 0; i < n; i++) memcpy(g[k] + i * rb, act[k] + tok[i] * rb, rb);
    }
    return lin_parts(l, g, gu, n, nt);
}

/* expert e's rows tok[0..n) -> out [n, H]: gate_up (int8 rows gathered from act, or float rows
 * from x), SwiGLU, down; ts: moe_thread_floats of scratch */
static int expert_rows(const dmoe *M, const dshape *s, int e, const float *x, char *const act[2],
                       const int done[2], const int *tok, long n, long T, float *ts, float *out,
                       int nt) {
    const long mi = s->moe_inter, H = s->hidden;
    float *gu = ts, *a = gu + 2 * T * mi, *xe = a + T * mi;
    char *xqg = (char *)(xe + T * H), *xqd = xqg + T * H * sizeof(float);
    if (expert_gate_up(&M->gate_up[e], x, act, done, tok, n, T, xe, xqg, gu, nt)) return -1;
    gated_rows(gu, a, n, M->inter, 0);
    return lin(&M->down[e], a, out, n, nt, xqd);
}

/* h [B, H] = the MoE block of post-norm rows x [B, H] (T: the tile's rows, ms: moe_floats of
 * scratch, xq: the int8 scratch). Route; group the (row, choice) pairs by expert (in row, choice
 * order); each active expert's rows in one gate_up and one down call, threads taking whole
 * experts when there are enough of them (the same calls either way: the same bits); then each
 * row's k outputs weighted and summed in rank order (choice 0, 1, ...), never in the batch's
 * order; the shared expert's sigmoid-gated output added last, as moe.py's SparseMoeBlock. */
static int moe_block(const dmoe *M, const dshape *s, const float *x, float *h, long B, long T,
                     float *ms, char *xq, int nt) {
    const int E = M->experts, K = M->top_k, H = s->hidden;
    float *p = ms, *wts = p + T * E;
    int *ids = (int *)(wts + T * K), *slot = ids + T * K, *tok = slot + T * K;
    int *count = tok + T * K, *start = count + E + 1, *active = start + E + 1;
    float *eo = (float *)(active + E + 1);
    char *xqa = (char *)(eo + T * K * H);
    float *ts = (float *)(xqa + T * H * sizeof(float)); /* per thread: moe_thread_floats */
    const long tsn = moe_thread_floats(s, T);
    if (moe_route(M->router, E, K, M->norm_topk, x, B, H, p, ids, wts, nt)) return -1;
    for (int e = 0; e <= E; e++) count[e] = 0;
    for (long i = 0; i < B * K; i++) count[ids[i]]++;
    start[0] = 0;
    int na = 0;
    for (int e = 0; e < E; e++) {
        start[e + 1] = start[e] + count[e];
        if (count[e]) active[na++] = e;
        count[e] = 0;
    }
    for (long i = 0; i < B * K; i++) {
        slot[i] = start[ids[i]] + count[ids[i]]++;
        tok[slot[i]] = (int)(i / K);
    }
    char *act[2] = {xqa, xqa};
    int done[2] = {0, 0}, err = 0;
    if (M->gate_up[0].nparts && quantize_for(&M->gate_up[0], x, B, nt, xqa, act, done)) return -1;
    if (nt > 1 && na >= nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(| : err)
        for (int i = 0; i < na; i++) {
            const int e = active[i];
            err |= expert_rows(M, s, e, x, act, done, tok + start[e], start[e + 1] - start[e], T,
                               ts + thread_num() * tsn, eo + (long)start[e] * H, 1);
        }
    } else
        for (int i = 0; i < na; i++) {
            const int e = active[i];
            err |= expert_rows(M, s, e, x, act, done, tok + start[e], start[e + 1] - start[e], T,
                               ts, eo + (long)start[e] * H, nt);
        }
    if (err) return -1;
    for (long b = 0; b < B; b++) {
        float *o = h + b * H;
        for (int j = 0; j < K; j++) {
            const float *ej = eo + (long)slot[b * K + j] * H, wj = wts[b * K + j];
            if (j == 0)
                for (int i = 0; i < H; i++) o[i] = ej[i] * wj;
            else
                for (int i = 0; i < H; i++) o[i] += ej[i] * wj;
        }
    }
    if (M->sh_gate_up == NULL) return 0;
    float *gu = ts, *a = gu + 2 * T * s->moe_inter, *sh = a + T * s->moe_inter;
    if (lin(M->sh_gate_up, x, gu, B, nt, xq)) return -1;
    gated_rows(gu, a, B, M->sh_inter, 0);
    if (lin(M->sh_down, a, sh, B, nt, xq)) return -1;
    for (long b = 0; b < B; b++) {
        const float g = 1.0f / (1.0f + expf(-dot(x + b * H, M->sh_gate, H)));
        for (int i = 0; i < H; i++) h[b * H + i] += g * sh[b * H + i];
    }
    return 0;
}

/* Rows [0, B) of one tile through every layer, then the final norm (see decode_layers). */
static int tile_layers(int n_layers, const dlayer *layers, const float *final_norm,
                       const dshape *s, float *h, float *residual, long B, const float *cos,
                       const float *sin, const float *cos_l, const float *sin_l,
                       const long *slots, const int *ctx_lens, const int *tables,
                       const int *row_seq, int max_blocks, float *scratch, long max_runs,
                       long parts_rows, int nthreads) {
    const int d = s->head_dim, nh = s->heads, nkv = s->kv_heads, H = s->hidden;
    const long qkv_n = (long)(nh + 2 * nkv) * d, T = tile_rows(B);
    float *x = scratch, *qkv = x + T * H, *att = qkv + T * qkv_n, *gu = att + T * (long)nh * d;
    float *act = gu + T * 2L * s->inter, *scores = act + T * (long)s->inter;
    float *parts = scores + (long)nthreads * ((nh / nkv) * run_blocks(s->block_size) * s->block_size + d);
    char *xq = (char *)(parts + parts_rows * nh * max_runs * (d + 2));
    float *ms = (float *)xq + T * xq_floats(s); /* the MoE scratch */
    const float scale = s->scale, m = s->resid_mult;
    const int rot = s->rot;
    const long cache_head = s->num_blocks * s->block_size * d; /* floats per KV head */
    for (int li = 0; li < n_layers; li++) {
        const dlayer *L = &layers[li];
        for (long b = 0; b < B; b++)
            add_norm(residual + b * H, h + b * H, li > 0, x + b * H, L->in_norm, H, s->eps, m);
        if (lin(&L->qkv, x, qkv, B, nthreads, xq)) return -1;
        for (long b = 0; b < B; b++) {
            float *row = qkv + b * qkv_n;
            if (L->q_norm)
                for (int hh = 0; hh < nh + nkv; hh++)
                    head_norm(row + hh * d, hh < nh ? L->q_norm : L->k_norm, d, s->eps);
            if (L->rope >= 0) { /* the first rot dims of each q/k head turn (the rest: partial rotary) */
                const float *c = (L->rope ? cos_l : cos) + b * rot, *sn = (L->rope ? sin_l : sin) + b * rot;
                for (int hh = 0; hh < nh + nkv; hh++) rope(row + hh * d, c, sn, rot);
            }
            for (int kh = 0; kh < nkv; kh++) {
                const long at = kh * cache_head + slots[b] * d;
                store_kv(L->k_cache, at, row + (nh + kh) * d, d, s->kv_f16);
                store_kv(L->v_cache, at, row + (nh + nkv + kh) * d, d, s->kv_f16);
            }
        }
        attention(L, s, qkv, qkv_n, B, ctx_lens, tables, row_seq, max_blocks, max_runs, scale,
                  cache_head, scores, parts, parts_rows, nthreads, att);
        if (lin(&L->o, att, h, B, nthreads, xq)) return -1;
        for (long b = 0; b < B; b++) {
            if (L->attn_out_norm) head_norm(h + b * H, L->attn_out_norm, H, s->eps);
            add_norm(residual + b * H, h + b * H, 1, x + b * H, L->post_norm, H, s->eps, m);
        }
        if (L->moe) {
            if (moe_block(L->moe, s, x, h, B, T, ms, xq, nthreads)) return -1;
        } else {
            if (lin(&L->gate_up, x, gu, B, nthreads, xq)) return -1;
            gated_rows(gu, act, B, s->inter, s->act);
            if (lin(&L->down, act, h, B, nthreads, xq)) return -1;
        }
        if (L->ffn_out_norm)
            for (long b = 0; b < B; b++) head_norm(h + b * H, L->ffn_out_norm, H, s->eps);
    }
    for (long b = 0; b < B; b++)
        add_norm(residual + b * H, h + b * H, n_layers > 0, x + b * H, final_norm, H, s->eps, m);
    memcpy(h, x, B * H * sizeof(float));
    return 0;
}

/* Any step's rows (decode rows, prefill chunks, both) through every layer; every per-row
 * computation depends on that row alone, so the step's make-up changes no bits.
 * h [B, hidden]: in, the embeddings; out, the final norm's output (final_norm [hidden]).
 * residual [B, hidden]: scratch. cos/sin [B, rot]; cos_l/sin_l: the same for Gemma 3's sliding
 * layers (else the global ones again). slots [B]. ctx_lens [B]: keys row b sees (its position
 * + 1; its own K/V and its sequence's earlier rows are written first).
 * row_seq [B]: row b's sequence, its block table at tables [row_seq[b], max_blocks]. Rows go
 * ROW_TILE at a time, in order. 0 on success, -1 on bad sizes. */
int decode_layers(int n_layers, const dlayer *layers, const float *final_norm, const dshape *s,
                  float *h, float *residual, long B, const float *cos, const float *sin,
                  const float *cos_l, const float *sin_l, const long *slots, const int *ctx_lens,
                  const int *tables, const int *row_seq, int max_blocks, float *scratch,
                  long max_ctx, int nthreads) {
    const int H = s->hidden;
    for (long b = 0; b < B; b++)
        if (ctx_lens[b] < 1 || ctx_lens[b] > max_ctx ||
            ctx_lens[b] > (long)max_blocks * s->block_size || row_seq[b] < 0)
            return -1;
    for (int li = 0; li < n_layers; li++) {
        const dmoe *M = layers[li].moe;
        if (M && (M->experts > s->experts || M->top_k > s->top_k || M->top_k > M->experts ||
                  M->top_k < 1 || M->inter > s->moe_inter || M->sh_inter > s->moe_inter ||
                  M->gate_up[0].in != H))
            return -1;
    }
    const long max_runs = runs_of(max_ctx, s->block_size);
    const long parts_rows = parts_rows_of(s, B, max_ctx);
    for (long r0 = 0; r0 < B; r0 += ROW_TILE) {
        const long n = B - r0 < ROW_TILE ? B - r0 : ROW_TILE;
        if (tile_layers(n_layers, layers, final_norm, s, h + r0 * H, residual + r0 * H, n,
                        cos + r0 * s->rot, sin + r0 * s->rot, cos_l + r0 * s->rot,
                        sin_l + r0 * s->rot, slots + r0, ctx_lens + r0, tables,
                        row_seq + r0, max_blocks, scratch, max_runs, parts_rows, nthreads))
            return -1;
    }
    return 0;
}
