/* A whole decode step's decoder layers in one call: for B sequences with one new token each,
 *   residual += h; x = RMSNorm(residual); qkv = x Wqkv^T (+b); RoPE(q, k); K/V -> paged cache;
 *   a = softmax(q K^T / sqrt(d)) V over each sequence's blocks; h = a Wo^T;
 *   residual += h; x = RMSNorm(residual); h = (silu(x Wg^T) * x Wu^T) Wd^T
 * for every layer, with the packed weights of quant.c, then the final RMSNorm. At one stream the
 * step is ~30 layers x ~60 small torch ops, and their dispatch (~3 us each) costs more than
 * reading the 4-bit weights; here it is one ctypes call. The torch modules (model/llama.py) stay
 * the reference and serve every other step (prefill chunks, mixed batches, tensor parallelism,
 * float weights); tests/model/test_fused_decode.py compares the two. Built with quant.c by
 * kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
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

typedef struct {
    dlin qkv, o, gate_up, down;
    const float *in_norm, *post_norm; /* [hidden] */
    float *k_cache, *v_cache;         /* [kv_heads, num_blocks, block_size, head_dim] */
} dlayer;

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter;
    float eps;
    long num_blocks;
    int block_size;
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

/* y [m, out] = x W^T (+ bias); GGUF-block parts quantize x once per activation kind into xq */
static int lin(const dlin *l, const float *x, float *y, long m, int nt, char *xq) {
    if (l->nparts == 0)
        return qgemm(x, l->in, l->q, l->scales, l->mins, l->bits, l->group, l->f32, l->bias, y,
                     l->out, m, l->in, l->out, nt);
    char *act[2] = {xq, xq + m * qx_row_bytes(l->in, 0)};
    int done[2] = {0, 0};
    long at = 0;
    for (int p = 0; p < l->nparts; p++) {
        const int k = qx_act_kind(l->types[p]);
        if (k < 0) return -1;
        if (!done[k] && qx_quantize(x, l->in, m, l->in, k, act[k], nt)) return -1;
        done[k] = 1;
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

/* residual += h (or = h for the first layer), x = residual / rms(residual) * w, one row */
static void add_norm(float *residual, const float *h, int add, float *x, const float *w, int n,
                     float eps) {
    for (int i = 0; i < n; i++) residual[i] = add ? residual[i] + h[i] : h[i];
    float ss = dot(residual, residual, n);
    float r = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) x[i] = w[i] * (residual[i] * r);
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


/* Attention is split into equal runs of (sequence, KV head, block) units, one run per thread:
 * every K/V byte is read once (by the G query heads of its KV head together) and both threads
 * work even at one sequence. A run leaves, per query head, its max score, its sum of
 * exp(score - max) and its unnormalised output; merge() combines a head's runs (flash-decoding).
 * Per-head work items instead left SmolLM2's 9 heads at 5:4 and read K/V ~1.3x. Prefetching the
 * next block measured no better with AVX-512 and ~1.1x slower with AVX2, so there is none. */

/* part + g * ps = {max, sum, out[d]} of the run's query head g over its tokens; sc: [G, tokens] */
static void attend_run(const float *qrow, const float *kc, const float *vc, const int *table,
                       int ctx, int bs, int d, int G, float scale, int j0, int j1, float *sc,
                       float *part, long ps) {
    const long blk = (long)bs * d;
    const int t0 = j0 * bs, t1 = j1 * bs < ctx ? j1 * bs : ctx, n = t1 - t0;
    for (int j = j0; j < j1; j++) {
        const float *k = kc + table[j] * blk;
        const int e = (j + 1) * bs < t1 ? (j + 1) * bs : t1;
        for (int t = j * bs; t < e; t++)
            for (int g = 0; g < G; g++)
                sc[g * n + t - t0] = dot(qrow + g * d, k + (t - j * bs) * d, d) * scale;
    }
    for (int g = 0; g < G; g++) {
        float *sg = sc + g * n, mx = -INFINITY, sum = 0.0f;
        for (int t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
        for (int t = 0; t < n; t++) sg[t] -= mx;
        exp_inplace(sg, n);
        for (int t = 0; t < n; t++) sum += sg[t];
        part[g * ps] = mx;
        part[g * ps + 1] = sum;
    }
#if defined(__AVX512F__)
    if (d % 16 == 0 && G * (d / 16) <= 16) { /* the G outputs stay in registers */
        const int C = d / 16;
        __m512 acc[16];
        for (int i = 0; i < G * C; i++) acc[i] = _mm512_setzero_ps();
        for (int j = j0; j < j1; j++) {
            const float *v = vc + table[j] * blk;
            const int e = (j + 1) * bs < t1 ? (j + 1) * bs : t1;
            for (int t = j * bs; t < e; t++) {
                const float *vr = v + (t - j * bs) * d;
                for (int c = 0; c < C; c++) {
                    const __m512 vv = _mm512_loadu_ps(vr + c * 16);
                    for (int g = 0; g < G; g++)
                        acc[g * C + c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * n + t - t0]), vv,
                                                         acc[g * C + c]);
                }
            }
        }
        for (int g = 0; g < G; g++)
            for (int c = 0; c < C; c++) _mm512_storeu_ps(part + g * ps + 2 + c * 16, acc[g * C + c]);
        return;
    }
#endif
    for (int g = 0; g < G; g++)
        for (int i = 0; i < d; i++) part[g * ps + 2 + i] = 0.0f;
    for (int j = j0; j < j1; j++) {
        const float *v = vc + table[j] * blk;
        const int e = (j + 1) * bs < t1 ? (j + 1) * bs : t1;
        for (int t = j * bs; t < e; t++)
            for (int g = 0; g < G; g++) {
                const float p = sc[g * n + t - t0], *vr = v + (t - j * bs) * d;
                float *o = part + g * ps + 2;
                for (int i = 0; i < d; i++) o[i] += p * vr[i];
            }
    }
}

/* out[d] = the softmax-weighted sum of one head's parts (d + 2 floats each, stride apart; a
 * NaN max marks a thread without a run on this head) */
static void merge(const float *part, int nparts, long stride, int d, float *out) {
    float mx = -INFINITY, sum = 0.0f;
    for (int r = 0; r < nparts; r++)
        if (!isnan(part[r * stride])) mx = part[r * stride] > mx ? part[r * stride] : mx;
    for (int i = 0; i < d; i++) out[i] = 0.0f;
    for (int r = 0; r < nparts; r++) {
        const float *pr = part + r * stride;
        if (isnan(pr[0])) continue;
        const float w = expf(pr[0] - mx);
        sum += pr[1] * w;
        for (int i = 0; i < d; i++) out[i] += w * pr[2 + i];
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < d; i++) out[i] *= inv;
}

/* scratch floats decode_layers needs for B rows and contexts up to max_ctx */
long decode_scratch(const dshape *s, long B, long max_ctx, int nthreads) {
    long qkv = (long)(s->heads + 2 * s->kv_heads) * s->head_dim;
    long group = s->heads / s->kv_heads;
    long widest = s->inter > s->hidden ? s->inter : s->hidden;
    if ((long)s->heads * s->head_dim > widest) widest = (long)s->heads * s->head_dim;
    return B * (s->hidden + qkv + (long)s->heads * s->head_dim + 3L * s->inter) +
           B * widest + /* int8 activations, both block kinds: ~2.4 bytes a value */
           (long)nthreads * group * max_ctx + /* scores of a run */
           B * s->heads * (long)nthreads * (s->head_dim + 2); /* each run's parts */
}

/* att [B, heads * d] for one layer: runs split the (sequence, KV head, block) units evenly
 * among the threads; a head's parts sit at [b][h][thread] */
static void attention(const dlayer *L, const dshape *s, const float *qkv, long qkv_n, long B,
                      const int *ctx_lens, const int *tables, int max_blocks, long max_ctx,
                      float scale, long cache_head, float *scores, float *parts, int nthreads,
                      float *att) {
    const int d = s->head_dim, nh = s->heads, nkv = s->kv_heads, G = nh / nkv, bs = s->block_size;
    const long stride = d + 2;
    long units = 0;
    for (long b = 0; b < B; b++) units += (long)nkv * ((ctx_lens[b] + bs - 1) / bs);
    for (long i = 0; i < B * nh * (long)nthreads; i++) parts[i * stride] = NAN; /* no run */
#pragma omp parallel num_threads(nthreads)
    {
        const int th = thread_num(), nth = omp_threads();
        const long u0 = units * th / nth, u1 = units * (th + 1) / nth;
        long u = 0;
        float *sc = scores + (long)th * G * max_ctx;
        for (long b = 0; b < B && u < u1; b++) {
            const int nb = (ctx_lens[b] + bs - 1) / bs;
            for (int kh = 0; kh < nkv && u < u1; kh++, u += nb) {
                const long lo = u0 > u ? u0 - u : 0, hi = u1 - u < nb ? u1 - u : nb;
                if (lo >= hi) continue;
                attend_run(qkv + b * qkv_n + (long)kh * G * d, L->k_cache + kh * cache_head,
                           L->v_cache + kh * cache_head, tables + b * max_blocks, ctx_lens[b], bs,
                           d, G, scale, (int)lo, (int)hi, sc,
                           parts + ((b * nh + (long)kh * G) * nthreads + th) * stride,
                           nthreads * stride);
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (long bh = 0; bh < B * nh; bh++)
            merge(parts + bh * nthreads * stride, nthreads, stride, d, att + bh * d);
    }
}

/* h [B, hidden]: in, the embeddings; out, the final norm's output (final_norm [hidden]).
 * residual [B, hidden]: scratch. cos/sin [B, head_dim]. slots [B]. ctx_lens [B] (including this
 * token). tables [B, max_blocks]. 0 on success, -1 on bad sizes. */
int decode_layers(int n_layers, const dlayer *layers, const float *final_norm, const dshape *s,
                  float *h, float *residual,
                  long B, const float *cos, const float *sin, const long *slots,
                  const int *ctx_lens, const int *tables, int max_blocks, float *scratch,
                  long max_ctx, int nthreads) {
    const int d = s->head_dim, nh = s->heads, nkv = s->kv_heads, H = s->hidden;
    const long qkv_n = (long)(nh + 2 * nkv) * d;
    float *x = scratch, *qkv = x + B * H, *att = qkv + B * qkv_n, *gu = att + B * (long)nh * d;
    float *act = gu + B * 2L * s->inter, *scores = act + B * (long)s->inter;
    float *parts = scores + (long)nthreads * (nh / nkv) * max_ctx;
    char *xq = (char *)(parts + B * nh * (long)nthreads * (d + 2));
    const float scale = 1.0f / sqrtf((float)d);
    const long cache_head = s->num_blocks * s->block_size * d; /* floats per KV head */
    for (long b = 0; b < B; b++)
        if (ctx_lens[b] < 1 || ctx_lens[b] > max_ctx ||
            ctx_lens[b] > (long)max_blocks * s->block_size)
            return -1;
    for (int li = 0; li < n_layers; li++) {
        const dlayer *L = &layers[li];
        for (long b = 0; b < B; b++)
            add_norm(residual + b * H, h + b * H, li > 0, x + b * H, L->in_norm, H, s->eps);
        if (lin(&L->qkv, x, qkv, B, nthreads, xq)) return -1;
        for (long b = 0; b < B; b++) {
            float *row = qkv + b * qkv_n;
            for (int hh = 0; hh < nh + nkv; hh++) rope(row + hh * d, cos + b * d, sin + b * d, d);
            for (int kh = 0; kh < nkv; kh++) {
                long at = kh * cache_head + slots[b] * d;
                memcpy(L->k_cache + at, row + (nh + kh) * d, d * sizeof(float));
                memcpy(L->v_cache + at, row + (nh + nkv + kh) * d, d * sizeof(float));
            }
        }
        attention(L, s, qkv, qkv_n, B, ctx_lens, tables, max_blocks, max_ctx, scale, cache_head,
                  scores, parts, nthreads, att);
        if (lin(&L->o, att, h, B, nthreads, xq)) return -1;
        for (long b = 0; b < B; b++)
            add_norm(residual + b * H, h + b * H, 1, x + b * H, L->post_norm, H, s->eps);
        if (lin(&L->gate_up, x, gu, B, nthreads, xq)) return -1;
        for (long b = 0; b < B; b++) {
            const float *g = gu + b * 2L * s->inter, *u = g + s->inter;
            float *a = act + b * (long)s->inter;
            for (int i = 0; i < s->inter; i++) a[i] = -g[i];
            exp_inplace(a, s->inter);
            for (int i = 0; i < s->inter; i++) a[i] = g[i] / (1.0f + a[i]) * u[i];
        }
        if (lin(&L->down, act, h, B, nthreads, xq)) return -1;
    }
    for (long b = 0; b < B; b++)
        add_norm(residual + b * H, h + b * H, n_layers > 0, x + b * H, final_norm, H, s->eps);
    memcpy(h, x, B * H * sizeof(float));
    return 0;
}
