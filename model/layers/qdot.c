/* Integer products of GGUF-packed weights with 8-bit activations (the int8 activation path).
 *
 * Weights stay in the file's own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
 * Q6_K: resident bytes = the file's bytes). Each activation row is quantized once per layer input, as llama.cpp
 * does: per 32 values (xq8, for the 32-blocks) or per 256 (xq8k, for the K-quants, with sums of
 * each 16), d = max|x| / 127 and q = round(x * 127 / max|x|) (nearest, ties to even: torch.round).
 * A block's product is then an integer dot product, scaled once:
 *   32-blocks: sum_k w_k x_k = dw dx sum_k q_k xq_k + mw dx sum_k xq_k   (mw = -8 dw for Q4_0,
 *              -16 dw for Q5_0, 0 for Q8_0; Q4_1/Q5_1 carry their own min)
 *   K-quants:  integer sub-block scales multiply the integer dots inside a 256-super-block, and
 *              the mins (Q2_K, Q4_K, Q5_K; or Q3_K's -4 and Q6_K's -32 offsets) meet the
 *              activation's 16-sums, one float per block.
 * The integer dot products are AVX512-VNNI vpdpbusd/vpdpwssd (256-bit, EVEX), AVX-VNNI (VEX), or
 * AVX2 pmaddubsw + pmaddwd, else plain C; the compiler flags (model/layers/kernels.py: the CPU's
 * own, or capped with TOKENMILL_CPU_ISA) pick one. The integer sums are exact in int32; the float
 * accumulation runs block by block in file order, per activation row, so a row's result depends
 * neither on the other rows of the batch nor on the thread count (bitwise batch invariance; the
 * vector paths add 8 lanes where plain C adds one, so ISAs differ in the last bits).
 * model/layers/qdot.py holds the plain-torch reference.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

enum {
    Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
};

/* s = sum q; the panels' integer dots start from -OFF s (o8: Q4_0, o128: Q8_0) and Q4_1 adds
 * m d s (ds), so these come with the block instead of a scalar multiply and broadcast per use */
typedef struct { float d; int32_t s, o8, o128; float ds; int8_t q[32]; } xq8;
/* bsums: per 16; o32 = -32 bsums (Q6_K's offset); mpair[h] = the 32-sums of groups 2h and 2h+1 as
 * two int16s (Q4_K's mins, a vpdpwssd against the panel's min pairs) */
typedef struct { float d; int16_t bsums[16]; int32_t o32[16], mpair[4]; int8_t q[256]; } xq8k;

#define MAX_MR 4 /* activation rows that share one pass over a weight row */

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define ISA "avx512_vnni"
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#define DPWSSD(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define ISA "avx_vnni"
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#define DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA "avx2"
/* pmaddubsw saturates a pair at 32767: every caller's |u| * |s| * 2 stays below (u <= 128) */
#define DPBUSD(acc, u, s) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#define DPWSSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#else
#define ISA "plain"
#endif

const char *qx_isa(void) { return ISA; }

/* 6-bit (scale, min) j of a Q4_K/Q5_K block's 12 scale bytes (ggml's get_scale_min_k4) */
static inline void k4_scale_min(const uint8_t *q, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q2_K / Q3_K's 16 sub-block scales (and Q2_K's mins): Q2_K's byte s is scale | min << 4; Q3_K's
 * 6-bit scales are 12 packed bytes (low nibbles in bytes 0..7, high 2 bits in 8..11) minus 32 */
static inline void k23_scales(const int T, const uint8_t *b, int *sc, int *mn) {
    for (int s = 0; s < 16; s++) {
        if (T == Q2_K) {
            sc[s] = b[s] & 15;
            mn[s] = b[s] >> 4;
        } else {
            const uint8_t *p = b + 96;
            const int lo = s < 8 ? p[s] & 15 : p[s - 8] >> 4, hi = (p[8 + s % 4] >> (2 * (s / 4))) & 3;
            sc[s] = (lo | hi << 4) - 32;
            mn[s] = 0;
        }
    }
}

/* ---- activation quantization ---------------------------------------------------------------- */

/* max |v[k]|, and q[k] = v[k] * id rounded to nearest even (rintf in the default rounding mode,
 * as lrintf was): plain loops the compiler vectorizes (fmaxf and lrintf were libm calls) */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
static inline float amax_of(const float *v, int n) { /* n: a multiple of 16 */
    __m512 a = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 16) a = _mm512_max_ps(a, _mm512_abs_ps(_mm512_loadu_ps(v + k)));
    return _mm512_reduce_max_ps(a);
}

static inline int round_to(const float *v, float id, int n, int8_t *q) { /* n: a multiple of 16 */
    __m512i s = _mm512_setzero_si512();
    for (int k = 0; k < n; k += 16) { /* vcvtps2dq rounds to nearest even (MXCSR default) */
        const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + k), _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtsepi32_epi8(r));
        s = _mm512_add_epi32(s, r);
    }
    return _mm512_reduce_add_epi32(s);
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline float amax_of(const float *v, int n) { /* n: a multiple of 8; a NaN is skipped */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 8) a = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + k)), a);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
#else
static inline float amax_of(const float *v, int n) {
    float amax = 0.0f;
    for (int k = 0; k < n; k++) {
        const float a = fabsf(v[k]);
        amax = a > amax ? a : amax;
    }
    return amax;
}
#endif

#if !(defined(__AVX512F__) && defined(__AVX512BW__))
static inline int round_to(const float *v, float id, int n, int8_t *q) {
    int s = 0;
    for (int k = 0; k < n; k++) {
        const int r = (int)__builtin_rintf(v[k] * id);
        q[k] = (int8_t)r;
        s += r;
    }
    return s;
}
#endif

static void quant_q8(const float *x, long nb, xq8 *out) {
    for (long b = 0; b < nb; b++) {
        const float *v = x + b * 32;
        const float amax = amax_of(v, 32);
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        const int s = round_to(v, id, 32, out[b].q);
        out[b].d = amax / 127.0f;
        out[b].s = s;
        out[b].o8 = -8 * s;
        out[b].o128 = -128 * s;
        out[b].ds = out[b].d * (float)s;
    }
}

static void quant_q8k(const float *x, long nb, xq8k *out) {
    for (long b = 0; b < nb; b++) {
        const float *v = x + b * 256;
        const float amax = amax_of(v, 256);
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 16; j++) {
            const int s = round_to(v + 16 * j, id, 16, out[b].q + 16 * j);
            out[b].bsums[j] = (int16_t)s;
            out[b].o32[j] = -32 * s;
        }
        for (int h = 0; h < 4; h++) { /* |a 32-sum| <= 32 * 127 fits int16 */
            const uint32_t lo = (uint16_t)(out[b].bsums[4 * h] + out[b].bsums[4 * h + 1]);
            const uint32_t hi = (uint16_t)(out[b].bsums[4 * h + 2] + out[b].bsums[4 * h + 3]);
            out[b].mpair[h] = (int32_t)(lo | hi << 16);
        }
        out[b].d = amax / 127.0f;
    }
}

/* bytes of one quantized activation row of n values: 32-blocks (k = 0) or 256-blocks (k = 1) */
long qx_row_bytes(long n, int k) { return k ? n / 256 * (long)sizeof(xq8k) : n / 32 * (long)sizeof(xq8); }

/* x [m, n] rows ldx apart -> m rows of qx_row_bytes(n, k) at out; 0, or -1 on bad sizes */
int qx_quantize(const float *x, long ldx, long m, long n, int k, void *out, int nthreads) {
    const long blk = k ? 256 : 32;
    if (m < 0 || n < blk || n % blk) return -1;
    const long rb = qx_row_bytes(n, k);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * n >= 65536)
    for (long r = 0; r < m; r++) {
        if (k) quant_q8k(x + r * ldx, n / 256, (xq8k *)((char *)out + r * rb));
        else quant_q8(x + r * ldx, n / 32, (xq8 *)((char *)out + r * rb));
    }
    return 0;
}

/* ---- one weight row against MR activation rows: results in out[MR] -------------------------- */

#if defined(DPBUSD)
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* byte k = 0x10 where bit k of x is set (the fifth bit of a Q5_0/Q5_1 value) */
static inline __m256i bit4_of(uint32_t x) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i r = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    r = _mm256_or_si256(r, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_and_si256(_mm256_cmpeq_epi8(r, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

/* 16 packed bytes -> 32 values: low nibbles (elements 0..15), then high (16..31) */
static inline __m256i nibbles16(const uint8_t *p) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(15));
}

/* 32-blocks: unsigned values u (0..31) or, for Q8_0, |q| with the activation's sign flipped */
static inline __attribute__((always_inline)) void rows_legacy(const int MR, const int T,
                                                             const uint8_t *w, long nb,
                                                             const xq8 *x, long xs, float *out) {
    const int bs = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
    __m256 acc[MAX_MR];
    float accm[MAX_MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps(), accm[r] = 0.0f;
    for (long i = 0; i < nb; i++) {
        const uint8_t *b = w + i * bs;
        const float d = ld_h(b);
        float m = T == Q4_0 ? -8.0f * d : T == Q5_0 ? -16.0f * d : 0.0f;
        if (T == Q4_1 || T == Q5_1) m = ld_h(b + 2);
        __m256i u;
        if (T == Q4_0) u = nibbles16(b + 2);
        else if (T == Q4_1) u = nibbles16(b + 4);
        else if (T == Q8_0) u = _mm256_loadu_si256((const __m256i *)(b + 2));
        else {
            uint32_t qh;
            memcpy(&qh, b + (T == Q5_0 ? 2 : 4), 4);
            u = _mm256_or_si256(nibbles16(b + (T == Q5_0 ? 6 : 8)), bit4_of(qh));
        }
        const __m256i au = T == Q8_0 ? _mm256_sign_epi8(u, u) : u; /* |q| for Q8_0 */
        for (int r = 0; r < MR; r++) {
            const xq8 *xb = x + r * xs + i;
            __m256i xv = _mm256_loadu_si256((const __m256i *)xb->q);
            if (T == Q8_0) xv = _mm256_sign_epi8(xv, u);
            const __m256i dot = DPBUSD(_mm256_setzero_si256(), au, xv);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * xb->d), acc[r]);
            if (T != Q8_0) accm[r] = fmaf(m * xb->d, (float)xb->s, accm[r]);
        }
    }
    for (int r = 0; r < MR; r++) out[r] = hsum8(acc[r]) + accm[r];
}

/* Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins */
static inline __attribute__((always_inline)) void rows_k45(const int MR, const int T,
                                                          const uint8_t *w, long nb,
                                                          const xq8k *x, long xs, float *out) {
    const int bs = T == Q4_K ? 144 : 176;
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    __m256 acc[MAX_MR];
    float accm[MAX_MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps(), accm[r] = 0.0f;
    for (long i = 0; i < nb; i++) {
        const uint8_t *b = w + i * bs, *qs = b + (T == Q4_K ? 16 : 48);
        const float d = ld_h(b), dmin = ld_h(b + 2);
        int sc[8], mn[8];
        for (int j = 0; j < 8; j++) k4_scale_min(b + 4, j, &sc[j], &mn[j]);
        const __m256i qh = T == Q5_K ? _mm256_loadu_si256((const __m256i *)(b + 16)) : m4;
        __m256i isum[MAX_MR];
        for (int r = 0; r < MR; r++) isum[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (T == Q5_K) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4));
            }
            const __m256i slo = _mm256_set1_epi16((short)sc[2 * j]), shi = _mm256_set1_epi16((short)sc[2 * j + 1]);
            for (int r = 0; r < MR; r++) {
                const int8_t *xq = x[r * xs + i].q + 64 * j;
                const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));
                const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32)));
                isum[r] = DPWSSD(DPWSSD(isum[r], plo, slo), phi, shi);
            }
        }
        for (int r = 0; r < MR; r++) {
            const xq8k *xb = x + r * xs + i;
            int ms = 0;
            for (int j = 0; j < 8; j++) ms += mn[j] * (xb->bsums[2 * j] + xb->bsums[2 * j + 1]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * xb->d), acc[r]);
            accm[r] = fmaf(dmin * xb->d, (float)ms, accm[r]);
        }
    }
    for (int r = 0; r < MR; r++) out[r] = hsum8(acc[r]) - accm[r];
}

/* Q2_K / Q3_K: 16 sub-blocks of 16, value k of 32 h + l at bits 2 (k / 32 % 4) of qs[32 (k / 128) + l]
 * (l = k % 32); Q2_K: u = 0..3 with 4-bit scales and mins; Q3_K: u = 0..7, its third bit from
 * hmask[l] bit k / 32, signed scales and a -4 offset (w = d sc (u - 4)) that meets the 16-sums */
static inline __attribute__((always_inline)) void rows_k23(const int MR, const int T,
                                                          const uint8_t *w, long nb,
                                                          const xq8k *x, long xs, float *out) {
    const int bs = T == Q2_K ? 84 : 110;
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc[MAX_MR];
    float accm[MAX_MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps(), accm[r] = 0.0f;
    for (long i = 0; i < nb; i++) {
        const uint8_t *b = w + i * bs, *qs = b + (T == Q2_K ? 16 : 32);
        const float d = ld_h(b + (T == Q2_K ? 80 : 108));
        int sc[16], mn[16], ms[MAX_MR];
        k23_scales(T, b, sc, mn);
        const __m256i hm = T == Q3_K ? _mm256_loadu_si256((const __m256i *)b) : m3;
        __m256i isum[MAX_MR];
        for (int r = 0; r < MR; r++) {
            const xq8k *xb = x + r * xs + i;
            int off = 0;
            for (int s = 0; s < 16; s++) off += (T == Q2_K ? mn[s] : sc[s]) * xb->bsums[s];
            ms[r] = off;
            isum[r] = T == Q3_K ? _mm256_setr_epi32(-4 * off, 0, 0, 0, 0, 0, 0, 0) : _mm256_setzero_si256();
        }
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
            for (int j = 0; j < 4; j++) {
                __m256i v = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m3);
                if (T == Q3_K)
                    v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * h + j), one), 2));
                const int s0 = sc[8 * h + 2 * j], s1 = sc[8 * h + 2 * j + 1];
                const __m256i sv = _mm256_set_m128i(_mm_set1_epi16((short)s1), _mm_set1_epi16((short)s0));
                for (int r = 0; r < MR; r++) {
                    const int8_t *xq = x[r * xs + i].q + 128 * h + 32 * j;
                    const __m256i p = _mm256_maddubs_epi16(v, _mm256_loadu_si256((const __m256i *)xq));
                    isum[r] = DPWSSD(isum[r], p, sv);
                }
            }
        }
        for (int r = 0; r < MR; r++) {
            const float xd = x[r * xs + i].d;
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * xd), acc[r]);
            if (T == Q2_K) accm[r] = fmaf(ld_h(b + 82) * xd, (float)ms[r], accm[r]);
        }
    }
    for (int r = 0; r < MR; r++) out[r] = hsum8(acc[r]) - accm[r];
}

/* Q6_K: 16 sub-blocks of 16 with int8 scales; values 0..63, offset -32 */
static inline __attribute__((always_inline)) void rows_q6k(const int MR, const uint8_t *w,
                                                          long nb, const xq8k *x, long xs,
                                                          float *out) {
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3);
    __m256 acc[MAX_MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
    for (long i = 0; i < nb; i++) {
        const uint8_t *b = w + i * 210;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = ld_h(b + 208);
        __m256i isum[MAX_MR];
        for (int r = 0; r < MR; r++) {
            const xq8k *xb = x + r * xs + i;
            int off = 0;
            for (int k = 0; k < 16; k++) off += sc[k] * xb->bsums[k];
            isum[r] = _mm256_setr_epi32(-32 * off, 0, 0, 0, 0, 0, 0, 0);
        }
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qhp = b + 128 + 32 * h;
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)qhp);
            __m256i v[4];
            v[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
            v[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
            v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
            v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
            for (int k = 0; k < 4; k++) {
                const int s0 = sc[8 * h + 2 * k], s1 = sc[8 * h + 2 * k + 1];
                const __m256i sv = _mm256_set_m128i(_mm_set1_epi16((short)s1), _mm_set1_epi16((short)s0));
                for (int r = 0; r < MR; r++) {
                    const int8_t *xq = x[r * xs + i].q + 128 * h + 32 * k;
                    const __m256i p = _mm256_maddubs_epi16(v[k], _mm256_loadu_si256((const __m256i *)xq));
                    isum[r] = DPWSSD(isum[r], p, sv);
                }
            }
        }
        for (int r = 0; r < MR; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * x[r * xs + i].d), acc[r]);
    }
    for (int r = 0; r < MR; r++) out[r] = hsum8(acc[r]);
}

#else /* ---- plain C: the same integers, the same float order per block ---- */

/* value k (0..31) of a 32-block as an unsigned integer, and the block's (d, m) */
static inline int legacy_u(const int T, const uint8_t *b, int k) {
    const uint8_t *qs = b + (T == Q4_0 ? 2 : T == Q4_1 ? 4 : T == Q5_0 ? 6 : 8);
    if (T == Q8_0) return ((const int8_t *)(b + 2))[k];
    int v = k < 16 ? qs[k] & 15 : qs[k - 16] >> 4;
    if (T == Q5_0 || T == Q5_1) {
        uint32_t qh;
        memcpy(&qh, b + (T == Q5_0 ? 2 : 4), 4);
        v |= ((qh >> k) & 1) << 4;
    }
    return v;
}

static void rows_legacy(const int MR, const int T, const uint8_t *w, long nb, const xq8 *x,
                        long xs, float *out) {
    const int bs = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
    for (int r = 0; r < MR; r++) {
        float acc = 0.0f, accm = 0.0f;
        for (long i = 0; i < nb; i++) {
            const uint8_t *b = w + i * bs;
            const xq8 *xb = x + r * xs + i;
            const float d = ld_h(b);
            float m = T == Q4_0 ? -8.0f * d : T == Q5_0 ? -16.0f * d : 0.0f;
            if (T == Q4_1 || T == Q5_1) m = ld_h(b + 2);
            int dot = 0;
            for (int k = 0; k < 32; k++) dot += legacy_u(T, b, k) * xb->q[k];
            acc = fmaf((float)dot, d * xb->d, acc);
            if (T != Q8_0) accm = fmaf(m * xb->d, (float)xb->s, accm);
        }
        out[r] = acc + accm;
    }
}

static void rows_k45(const int MR, const int T, const uint8_t *w, long nb, const xq8k *x, long xs,
                     float *out) {
    const int bs = T == Q4_K ? 144 : 176;
    for (int r = 0; r < MR; r++) {
        float acc = 0.0f, accm = 0.0f;
        for (long i = 0; i < nb; i++) {
            const uint8_t *b = w + i * bs, *qs = b + (T == Q4_K ? 16 : 48), *qh = b + 16;
            const xq8k *xb = x + r * xs + i;
            int isum = 0, ms = 0;
            for (int j = 0; j < 8; j++) {
                int sc, mn, dot = 0;
                k4_scale_min(b + 4, j, &sc, &mn);
                for (int l = 0; l < 32; l++) {
                    int v = j & 1 ? qs[32 * (j / 2) + l] >> 4 : qs[32 * (j / 2) + l] & 15;
                    if (T == Q5_K) v |= ((qh[l] >> j) & 1) << 4;
                    dot += v * xb->q[32 * j + l];
                }
                isum += sc * dot;
                ms += mn * (xb->bsums[2 * j] + xb->bsums[2 * j + 1]);
            }
            acc = fmaf((float)isum, ld_h(b) * xb->d, acc);
            accm = fmaf(ld_h(b + 2) * xb->d, (float)ms, accm);
        }
        out[r] = acc - accm;
    }
}

static void rows_k23(const int MR, const int T, const uint8_t *w, long nb, const xq8k *x, long xs,
                     float *out) {
    const int bs = T == Q2_K ? 84 : 110;
    for (int r = 0; r < MR; r++) {
        float acc = 0.0f, accm = 0.0f;
        for (long i = 0; i < nb; i++) {
            const uint8_t *b = w + i * bs, *qs = b + (T == Q2_K ? 16 : 32);
            const xq8k *xb = x + r * xs + i;
            int sc[16], mn[16], isum = 0, ms = 0;
            k23_scales(T, b, sc, mn);
            for (int s = 0; s < 16; s++) {
                int dot = T == Q3_K ? -4 * xb->bsums[s] : 0;
                for (int l = 16 * (s % 2); l < 16 * (s % 2) + 16; l++) {
                    const int h = s / 8, j = (s / 2) % 4;
                    int v = (qs[32 * h + l] >> (2 * j)) & 3;
                    if (T == Q3_K) v |= ((b[l] >> (4 * h + j)) & 1) << 2;
                    dot += v * xb->q[128 * h + 32 * j + l];
                }
                isum += sc[s] * dot;
                ms += mn[s] * xb->bsums[s];
            }
            acc = fmaf((float)isum, ld_h(b + (T == Q2_K ? 80 : 108)) * xb->d, acc);
            if (T == Q2_K) accm = fmaf(ld_h(b + 82) * xb->d, (float)ms, accm);
        }
        out[r] = acc - accm;
    }
}

static void rows_q6k(const int MR, const uint8_t *w, long nb, const xq8k *x, long xs, float *out) {
    for (int r = 0; r < MR; r++) {
        float acc = 0.0f;
        for (long i = 0; i < nb; i++) {
            const uint8_t *b = w + i * 210;
            const int8_t *sc = (const int8_t *)(b + 192);
            const xq8k *xb = x + r * xs + i;
            int isum = 0;
            for (int k = 0; k < 16; k++) isum -= 32 * sc[k] * xb->bsums[k];
            for (int h = 0; h < 2; h++)
                for (int l = 0; l < 32; l++) {
                    const uint8_t lo = b[64 * h + l], hi = b[64 * h + l + 32], qh = b[128 + 32 * h + l];
                    const int v[4] = {(lo & 15) | (qh & 3) << 4, (hi & 15) | ((qh >> 2) & 3) << 4,
                                      (lo >> 4) | ((qh >> 4) & 3) << 4, (hi >> 4) | ((qh >> 6) & 3) << 4};
                    for (int k = 0; k < 4; k++)
                        isum += sc[8 * h + 2 * k + l / 16] * v[k] * xb->q[128 * h + 32 * k + l];
                }
            acc = fmaf((float)isum, ld_h(b + 208) * xb->d, acc);
        }
        out[r] = acc;
    }
}
#endif

/* ---- the product: threads split the weight rows, MR activation rows share each pass ---------- */

/* y[r][o] = (w row o) . (x row r) (+ bias[o]) for one type and MR; x rows are xs blocks apart */
#define ROWS_FN(NAME, MR, BODY)                                                                    \
    static void NAME##_##MR(const uint8_t *w, long nb, const void *x, long xs, float *o) {       \
        BODY;                                                                                      \
    }
#define ROWS_ALL(NAME, BODY1, BODY2, BODY3, BODY4) \
    ROWS_FN(NAME, 1, BODY1) ROWS_FN(NAME, 2, BODY2) ROWS_FN(NAME, 3, BODY3) ROWS_FN(NAME, 4, BODY4)
#define LEG(T, MR) rows_legacy(MR, T, w, nb, (const xq8 *)x, xs, o)
#define K45(T, MR) rows_k45(MR, T, w, nb, (const xq8k *)x, xs, o)
#define K6(MR) rows_q6k(MR, w, nb, (const xq8k *)x, xs, o)
#define K23(T, MR) rows_k23(MR, T, w, nb, (const xq8k *)x, xs, o)
ROWS_ALL(q4_0, LEG(Q4_0, 1), LEG(Q4_0, 2), LEG(Q4_0, 3), LEG(Q4_0, 4))
ROWS_ALL(q4_1, LEG(Q4_1, 1), LEG(Q4_1, 2), LEG(Q4_1, 3), LEG(Q4_1, 4))
ROWS_ALL(q5_0, LEG(Q5_0, 1), LEG(Q5_0, 2), LEG(Q5_0, 3), LEG(Q5_0, 4))
ROWS_ALL(q5_1, LEG(Q5_1, 1), LEG(Q5_1, 2), LEG(Q5_1, 3), LEG(Q5_1, 4))
ROWS_ALL(q8_0, LEG(Q8_0, 1), LEG(Q8_0, 2), LEG(Q8_0, 3), LEG(Q8_0, 4))
ROWS_ALL(q2_k, K23(Q2_K, 1), K23(Q2_K, 2), K23(Q2_K, 3), K23(Q2_K, 4))
ROWS_ALL(q3_k, K23(Q3_K, 1), K23(Q3_K, 2), K23(Q3_K, 3), K23(Q3_K, 4))
ROWS_ALL(q4_k, K45(Q4_K, 1), K45(Q4_K, 2), K45(Q4_K, 3), K45(Q4_K, 4))
ROWS_ALL(q5_k, K45(Q5_K, 1), K45(Q5_K, 2), K45(Q5_K, 3), K45(Q5_K, 4))
ROWS_ALL(q6_k, K6(1), K6(2), K6(3), K6(4))

typedef void (*rows_fn)(const uint8_t *, long, const void *, long, float *);
#define TABLE(NAME) {NAME##_1, NAME##_2, NAME##_3, NAME##_4}

typedef struct {
    int type, block, bytes, k; /* GGML type id, values and bytes a block, activation kind */
    rows_fn fn[MAX_MR];
} qtype;

static const qtype TYPES[] = {
    {Q4_0, 32, 18, 0, TABLE(q4_0)}, {Q4_1, 32, 20, 0, TABLE(q4_1)},
    {Q5_0, 32, 22, 0, TABLE(q5_0)}, {Q5_1, 32, 24, 0, TABLE(q5_1)},
    {Q8_0, 32, 34, 0, TABLE(q8_0)}, {Q2_K, 256, 84, 1, TABLE(q2_k)},
    {Q3_K, 256, 110, 1, TABLE(q3_k)}, {Q4_K, 256, 144, 1, TABLE(q4_k)},
    {Q5_K, 256, 176, 1, TABLE(q5_k)}, {Q6_K, 256, 210, 1, TABLE(q6_k)},
};

static const qtype *find(int type) {
    for (unsigned i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}

/* the activation kind a weight type needs (0: 32-blocks, 1: 256-blocks), or -1 if none */
int qx_act_kind(int type) {
    const qtype *t = find(type);
    return t ? t->k : -1;
}

/* y [m, out] rows ldy apart (+ bias) = x @ w^T for w: out rows of n_in values in GGML type
 * `type` (row_bytes each) and x: m rows quantized by qx_quantize for that type's activation
 * kind. Threads split the output rows in tiles that stay in L1 while every MR-row block of x
 * passes over them. 0, or -1 for a type or size it does not take. */
int qx_gemm(int type, const uint8_t *w, long row_bytes, long out, long n_in, const void *xq,
            long m, float *y, long ldy, const float *bias, int nthreads) {
    const qtype *t = find(type);
    if (t == NULL || m < 1 || out < 1 || n_in < t->block || n_in % t->block) return -1;
    const long nb = n_in / t->block;
    if (row_bytes != nb * t->bytes) return -1;
    const long xrb = qx_row_bytes(n_in, t->k);
    long tile = 16384 / row_bytes;
    if (tile < 1) tile = 1;
    if (tile * nthreads > out) tile = (out + nthreads - 1) / nthreads;
    const long ntiles = (out + tile - 1) / tile;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long ti = 0; ti < ntiles; ti++) {
        const long o0 = ti * tile, o1 = o0 + tile < out ? o0 + tile : out;
        float res[MAX_MR];
        for (long r0 = 0; r0 < m; r0 += MAX_MR) {
            const int mr = m - r0 < MAX_MR ? (int)(m - r0) : MAX_MR;
            const char *x = (const char *)xq + r0 * xrb;
            for (long o = o0; o < o1; o++) {
                t->fn[mr - 1](w + o * row_bytes, nb, x, nb, res);
                for (int r = 0; r < mr; r++)
                    y[(r0 + r) * ldy + o] = res[r] + (bias ? bias[o] : 0.0f);
            }
        }
    }
    return 0;
}

/* ---- panels: 16 weight rows interleaved, one int32 lane per output row (AVX512-VNNI) ----------
 *
 * The row kernels above pay a float epilogue per 32-block per activation row. Here 16 weight
 * rows are repacked so that one vpdpbusd multiplies 4 values of 16 rows with the same 4
 * activation bytes (broadcast): the lanes are output rows, the integer dots need no horizontal
 * sum, and each block's scaling is one vector op for 16 outputs. Layout of a panel's super-block
 * (BK values: 32 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, 256 for Q4_K/Q6_K; P = 16 rows):
 *   d[P] float16; then m[P] float16 (Q4_1, Q5_1), or dmin[P] float16 (Q4_K);
 *   sc[NG][P] (Q4_K: u8 6-bit, Q6_K: s8) and mn[NG][P] (Q4_K) sub-block scales and mins;
 *   quants: 4-bit (Q4_0, Q4_1, Q4_K, and the low nibbles of Q5_0, Q5_1, Q6_K): for each 8
 *   values, 64 bytes, byte
 *   [row][i] = v(8p + i) | v(8p + 4 + i) << 4; 8-bit (Q8_0, as q + 128): for each 4 values, 64
 *   bytes [row][i] = v(4c + i); Q6_K's high 2 bits: for each 16 values, 64 bytes [row][i] =
 *   h(16p + i) | h(16p + 4 + i) << 2 | h(16p + 8 + i) << 4 | h(16p + 12 + i) << 6; Q5_0/Q5_1's
 *   fifth bits: for each 32 values, 64 bytes [row][i] = bit 2p of h(8p + i), bit 2p + 1 of
 *   h(8p + 4 + i) (p = 0..3).
 * Bytes per row: Q4_0 18, Q4_1 20, Q5_0 22, Q5_1 24, Q8_0 34, Q4_K 148 (file: 144), Q6_K 210:
 * the file's size.
 */
#define P 16
enum { PX_NONE = 0, PX_FMIN = 1, PX_KMIN = 2 };

typedef struct {
    int type, bk, g, bits, off, sc, min; /* sc: 0 none, 1 u8, 2 s8 */
    long bytes;                          /* a panel's super-block */
} ptype;

static const ptype PTYPES[] = {
    {Q4_0, 32, 32, 4, 8, 0, PX_NONE, 2 * P + 32 * P / 2},
    {Q4_1, 32, 32, 4, 0, 0, PX_FMIN, 4 * P + 32 * P / 2},
    {Q5_0, 32, 32, 5, 16, 0, PX_NONE, 2 * P + 32 * P / 2 + 32 * P / 8},
    {Q5_1, 32, 32, 5, 0, 0, PX_FMIN, 4 * P + 32 * P / 2 + 32 * P / 8},
    {Q8_0, 32, 32, 8, 128, 0, PX_NONE, 2 * P + 32 * P},
    {Q4_K, 256, 32, 4, 0, 1, PX_KMIN, 4 * P + 16 * P + 256 * P / 2},
    {Q6_K, 256, 16, 6, 32, 2, PX_NONE, 2 * P + 16 * P + 256 * P / 2 + 256 * P / 4},
};

static const ptype *pfind(int type) {
    for (unsigned i = 0; i < sizeof(PTYPES) / sizeof(PTYPES[0]); i++)
        if (PTYPES[i].type == type) return &PTYPES[i];
    return NULL;
}

/* one value of a file block row as (unsigned value, its group's scale sc and min mn, block d/dm) */
static void file_value(int type, const uint8_t *b, int k, int *v, int *sc, int *mn) {
    *sc = 1, *mn = 0;
    if (type == Q4_0 || type == Q4_1) {
        const uint8_t *qs = b + (type == Q4_0 ? 2 : 4);
        *v = k < 16 ? qs[k] & 15 : qs[k - 16] >> 4;
    } else if (type == Q5_0 || type == Q5_1) {
        const uint8_t *qh = b + (type == Q5_0 ? 2 : 4), *qs = qh + 4;
        *v = (k < 16 ? qs[k] & 15 : qs[k - 16] >> 4) | ((qh[k / 8] >> (k % 8)) & 1) << 4;
    } else if (type == Q8_0) {
        *v = ((const int8_t *)(b + 2))[k] + 128;
    } else if (type == Q4_K) {
        const int j = k / 32, l = k % 32;
        *v = j & 1 ? b[16 + 32 * (j / 2) + l] >> 4 : b[16 + 32 * (j / 2) + l] & 15;
        k4_scale_min(b + 4, j, sc, mn);
    } else { /* Q6_K */
        const int h = k / 128, kk = k % 128, quad = kk / 32, l = kk % 32;
        const uint8_t lo = b[64 * h + l + (quad & 1) * 32], qh = b[128 + 32 * h + l];
        *v = (quad < 2 ? lo & 15 : lo >> 4) | ((qh >> (2 * quad)) & 3) << 4;
        *sc = ((const int8_t *)(b + 192))[8 * h + 2 * quad + l / 16];
    }
}

/* bytes of the panel form of `rows` rows of n_in values, or -1 if the type has none */
long px_bytes(int type, long rows, long n_in) {
    const ptype *t = pfind(type);
    if (t == NULL || n_in % t->bk) return -1;
    return (rows + P - 1) / P * (n_in / t->bk) * t->bytes;
}

/* raw: rows of the file's blocks (row_bytes each) -> out: px_bytes() of panels (zero-padded) */
int px_pack(int type, const uint8_t *raw, long row_bytes, long rows, long n_in, uint8_t *out,
            int nthreads) {
    const ptype *t = pfind(type);
    const qtype *f = find(type);
    if (t == NULL || f == NULL || n_in % t->bk || row_bytes != n_in / f->block * f->bytes) return -1;
    const long nsb = n_in / t->bk, npanels = (rows + P - 1) / P, ng = t->bk / t->g;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long pn = 0; pn < npanels; pn++)
        for (long s = 0; s < nsb; s++) {
            uint8_t *o = out + (pn * nsb + s) * t->bytes;
            memset(o, 0, t->bytes);
            uint16_t *d = (uint16_t *)o, *m = d + P;
            uint8_t *sc = o + (t->min ? 4 : 2) * P, *mn = sc + ng * P;
            uint8_t *q = t->sc ? (t->min == PX_KMIN ? mn + ng * P : sc + ng * P) : sc;
            uint8_t *qh = q + t->bk * P / 2;
            for (int r = 0; r < P; r++) {
                const long row = pn * P + r;
                if (row >= rows) break; /* zero rows: d = 0 */
                /* the file block holding values [s bk, s bk + bk) (one block, or bk / 32 for legacy) */
                const uint8_t *b = raw + row * row_bytes + s * (t->bk / f->block) * f->bytes;
                memcpy(&d[r], type == Q6_K ? b + 208 : b, 2);
                if (t->min) memcpy(&m[r], b + 2, 2);
                for (int k = 0; k < t->bk; k++) {
                    int v, s_, mn_;
                    file_value(type, b, k, &v, &s_, &mn_);
                    if (t->sc) sc[(k / t->g) * P + r] = (uint8_t)s_;
                    if (t->min == PX_KMIN) mn[(k / t->g) * P + r] = (uint8_t)mn_;
                    if (t->bits == 8) q[(k / 4) * 4 * P + r * 4 + k % 4] = (uint8_t)v;
                    else {
                        const int p = k / 8, i = k % 8;
                        q[p * 4 * P + r * 4 + i % 4] |= (uint8_t)((v & 15) << (i < 4 ? 0 : 4));
                        if (t->bits == 5)
                            qh[r * 4 + i % 4] |= (uint8_t)(((v >> 4) & 1) << (2 * p + (i >= 4)));
                        if (t->bits == 6) {
                            const int pp = k / 16, j = k % 16;
                            qh[pp * 4 * P + r * 4 + j % 4] |= (uint8_t)(((v >> 4) & 3) << (2 * (j / 4)));
                        }
                    }
                }
            }
        }
    return 0;
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define PX 1
#define PMR 8 /* activation rows per pass over a panel */
#ifndef PX_KC
#define PX_KC 1024 /* values of K per pass (px_gemm) */
#endif

/* 16 rows x MR activation rows over one panel; y[r][0..16) written with ldy (valid: nrows).
 * Every vector op here shares two ports with vpdpbusd, so the epilogue is kept short: integer dots
 * start from the activation block's -OFF sum (a broadcast load, no ALU op), a K-quant sub-block's
 * integer scale is applied in float (vcvtdq2ps + FMA, exact: |sc dot| < 2^24; vpmulld is two µops),
 * and the activation-side sums come precomputed with the block (xq8, xq8k). */
static inline __attribute__((always_inline)) void panel(const int MR, const ptype *t, const int T,
                                                       const uint8_t *w, long nsb, const void *x,
                                                       long xrb, float *y, long ldy, int nrows,
                                                       const float *bias, int more, int half) {
    (void)half; /* one pass covers the 16 rows */
    const int BK = T == Q4_0 || T == Q4_1 || T == Q5_0 || T == Q5_1 || T == Q8_0 ? 32 : 256;
    const int G = T == Q6_K ? 16 : 32, NG = BK / G;
    const int BITS = T == Q8_0 ? 8 : T == Q6_K ? 6 : T == Q5_0 || T == Q5_1 ? 5 : 4;
    const int SC = T == Q4_K || T == Q6_K;
    const int MIN = T == Q4_1 || T == Q5_1 ? PX_FMIN : T == Q4_K ? PX_KMIN : PX_NONE;
    const __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
    const xq8 *x8[PMR];
    const xq8k *xk[PMR];
    for (int r = 0; r < MR; r++) {
        x8[r] = (const xq8 *)((const char *)x + r * xrb);
        xk[r] = (const xq8k *)((const char *)x + r * xrb);
    }
    const __mmask16 k = (__mmask16)((1u << nrows) - 1);
    __m512 acc[PMR]; /* more: y holds the sums of the earlier super-blocks (px_gemm's K chunks) */
    for (int r = 0; r < MR; r++) acc[r] = more ? _mm512_maskz_loadu_ps(k, y + r * ldy) : _mm512_setzero_ps();
    for (long s = 0; s < nsb; s++) {
        const uint8_t *o = w + s * t->bytes;
        const uint8_t *scp = o + (MIN ? 4 : 2) * P, *mnp = scp + NG * P;
        const uint8_t *q = SC ? (MIN == PX_KMIN ? mnp + NG * P : scp + NG * P) : scp;
        const uint8_t *qh = q + BK * P / 2;
        __m512 facc[PMR]; /* K-quants: sum over sub-blocks of sc_g dot_g, in float */
        __m512i dot[PMR];
#pragma GCC unroll 16
        for (int g = 0; g < NG; g++) {
            for (int r = 0; r < MR; r++) {
                if (T == Q4_0) dot[r] = _mm512_set1_epi32(x8[r][s].o8);
                else if (T == Q5_0) dot[r] = _mm512_set1_epi32(2 * x8[r][s].o8); /* -16 s */
                else if (T == Q8_0) dot[r] = _mm512_set1_epi32(x8[r][s].o128);
                else if (T == Q6_K) dot[r] = _mm512_set1_epi32(xk[r][s].o32[g]);
                else dot[r] = _mm512_setzero_si512();
            }
#pragma GCC unroll 8
            for (int c = 0; c < G / 4; c += (BITS == 8 ? 1 : 2)) {
                const int k = g * G + 4 * c; /* first value of this chunk (pair) in the block */
                __m512i v0, v1 = _mm512_setzero_si512();
                if (BITS == 8) v0 = _mm512_loadu_si512(q + (k / 4) * 4 * P);
                else {
                    const __m512i b = _mm512_loadu_si512(q + (k / 8) * 4 * P);
                    v0 = _mm512_and_si512(b, m4);
                    v1 = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
                    if (BITS == 5) { /* bits 2p and 2p + 1 of the block's plane to bit 4 */
                        const __m512i h = _mm512_loadu_si512(qh), p10 = _mm512_set1_epi8(0x10);
                        const int p = k / 8;
                        const __m512i h0 = p == 0 ? _mm512_slli_epi16(h, 4) : p == 1 ? _mm512_slli_epi16(h, 2)
                                         : p == 2 ? h : _mm512_srli_epi16(h, 2);
                        const __m512i h1 = p == 0 ? _mm512_slli_epi16(h, 3) : p == 1 ? _mm512_slli_epi16(h, 1)
                                         : p == 2 ? _mm512_srli_epi16(h, 1) : _mm512_srli_epi16(h, 3);
                        v0 = _mm512_ternarylogic_epi32(v0, h0, p10, 0xF8);
                        v1 = _mm512_ternarylogic_epi32(v1, h1, p10, 0xF8);
                    }
                    if (BITS == 6) {
                        const __m512i h = _mm512_loadu_si512(qh + (k / 16) * 4 * P);
                        const int sh = 2 * ((k % 16) / 4); /* this pair's first chunk */
                        /* bits (sh, sh+1) and (sh+2, sh+3) of h to bits 4-5: one shift (none
                         * for v0 when sh = 4), then v | (h' & 0x30) in one vpternlogd */
                        const __m512i h0 = sh == 0 ? _mm512_slli_epi16(h, 4) : h;
                        const __m512i h1 = sh == 0 ? _mm512_slli_epi16(h, 2) : _mm512_srli_epi16(h, 2);
                        v0 = _mm512_ternarylogic_epi32(v0, h0, m30, 0xF8);
                        v1 = _mm512_ternarylogic_epi32(v1, h1, m30, 0xF8);
                    }
                }
                for (int r = 0; r < MR; r++) {
                    const int8_t *xq = BK == 32 ? x8[r][s].q : xk[r][s].q;
                    int32_t a0, a1;
                    memcpy(&a0, xq + k, 4);
                    dot[r] = _mm512_dpbusd_epi32(dot[r], v0, _mm512_set1_epi32(a0));
                    if (BITS != 8) {
                        memcpy(&a1, xq + k + 4, 4);
                        dot[r] = _mm512_dpbusd_epi32(dot[r], v1, _mm512_set1_epi32(a1));
                    }
                }
            }
            if (SC) { /* facc += sc_g dot_g */
                const __m128i sb = _mm_loadu_si128((const __m128i *)(scp + g * P));
                const __m512 scf = _mm512_cvtepi32_ps(T == Q6_K ? _mm512_cvtepi8_epi32(sb) : _mm512_cvtepu8_epi32(sb));
                for (int r = 0; r < MR; r++)
                    facc[r] = g ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), scf, facc[r])
                                : _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), scf);
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)o));
        const __m512 m = MIN ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(o + 2 * P))) : d;
        __m512i mnpair[4]; /* Q4_K: lanes (mn_2h, mn_2h+1) of each row as int16s */
        if (MIN == PX_KMIN)
            for (int h = 0; h < NG / 2; h++)
                mnpair[h] = _mm512_or_si512(
                    _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mnp + 2 * h * P))),
                    _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mnp + (2 * h + 1) * P))), 16));
        for (int r = 0; r < MR; r++) {
            const float dx = BK == 32 ? x8[r][s].d : xk[r][s].d;
            const __m512 sum = SC ? facc[r] : _mm512_cvtepi32_ps(dot[r]);
            acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[r]);
            if (MIN == PX_FMIN) /* + m dx xsum */
                acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x8[r][s].ds), acc[r]);
            else if (MIN == PX_KMIN) { /* - dmin dx sum_g mn_g xsum_g, two groups a vpdpwssd */
                __m512i ms = _mm512_setzero_si512();
                for (int h = 0; h < NG / 2; h++)
                    ms = _mm512_dpwssd_epi32(ms, mnpair[h], _mm512_set1_epi32(xk[r][s].mpair[h]));
                acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), _mm512_mul_ps(m, _mm512_set1_ps(dx)), acc[r]);
            }
        }
    }
    if (bias == NULL) { /* no + 0.0f: a partial sum goes back exactly as it is */
        for (int r = 0; r < MR; r++) _mm512_mask_storeu_ps(y + r * ldy, k, acc[r]);
        return;
    }
    const __m512 bv = _mm512_maskz_loadu_ps(k, bias);
    for (int r = 0; r < MR; r++) _mm512_mask_storeu_ps(y + r * ldy, k, _mm512_add_ps(acc[r], bv));
}

#define PANEL_WIDE_CASES(CASE, T) CASE(4, T) CASE(5, T) CASE(6, T) CASE(7, T)
#elif defined(DPBUSD) && defined(__F16C__)
/* ---- AVX-VNNI / AVX2 panels: the same 16-row panels as two 8-row halves (ymm lanes) -----------
 *
 * A panel chunk's 64 bytes hold rows 0-7 in their first 32 and rows 8-15 in the next 32, so a
 * half is a ymm load at +32 half; its d, scales and mins are the 8 entries at row 8 half. With
 * AVX-VNNI the dots are vpdpbusd as above. AVX2 has no vpdpbusd: pmaddubsw pairs are summed in
 * int16 for as long as they cannot overflow (4-bit values: one 32-group, |sum| <= 16 * 15 * 127;
 * 5- and 6-bit: one pair of chunks, <= 4 * 63 * 127) and widened once by pmaddwd; Q8_0
 * multiplies |q| with the activation's sign flipped (its q + 128 would saturate a pair). The
 * integers are the same, and so is the float epilogue, lane for lane: these panels give the
 * AVX-512 panels' bits. */
#define PX 1
#define PX_HALVES 2
#define PMR 4 /* 16 ymm registers: 4 rows' sums, dots and float sums, the weights, the activation */
#ifndef PX_KC
#define PX_KC 1024
#endif

static inline __attribute__((always_inline)) void panel(const int MR, const ptype *t, const int T,
                                                       const uint8_t *w, long nsb, const void *x,
                                                       long xrb, float *y, long ldy, int nrows,
                                                       const float *bias, int more, int half) {
    const int BK = T == Q4_0 || T == Q4_1 || T == Q5_0 || T == Q5_1 || T == Q8_0 ? 32 : 256;
    const int G = T == Q6_K ? 16 : 32, NG = BK / G;
    const int BITS = T == Q8_0 ? 8 : T == Q6_K ? 6 : T == Q5_0 || T == Q5_1 ? 5 : 4;
    const int SC = T == Q4_K || T == Q6_K;
    const int MIN = T == Q4_1 || T == Q5_1 ? PX_FMIN : T == Q4_K ? PX_KMIN : PX_NONE;
    const int hb = 32 * half, hr = 8 * half; /* this half's bytes of a 64-byte chunk, first row */
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
#ifndef __AVXVNNI__
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    const xq8 *x8[PMR];
    const xq8k *xk[PMR];
    for (int r = 0; r < MR; r++) {
        x8[r] = (const xq8 *)((const char *)x + r * xrb);
        xk[r] = (const xq8k *)((const char *)x + r * xrb);
    }
    const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 acc[PMR];
    for (int r = 0; r < MR; r++) acc[r] = more ? _mm256_maskload_ps(y + r * ldy, k) : _mm256_setzero_ps();
    for (long s = 0; s < nsb; s++) {
        const uint8_t *o = w + s * t->bytes;
        const uint8_t *scp = o + (MIN ? 4 : 2) * P, *mnp = scp + NG * P;
        const uint8_t *q = SC ? (MIN == PX_KMIN ? mnp + NG * P : scp + NG * P) : scp;
        const uint8_t *qh = q + BK * P / 2;
        __m256 facc[PMR];
        __m256i dot[PMR], s16[PMR];
#pragma GCC unroll 16
        for (int g = 0; g < NG; g++) {
            for (int r = 0; r < MR; r++) {
                if (T == Q4_0) dot[r] = _mm256_set1_epi32(x8[r][s].o8);
                else if (T == Q5_0) dot[r] = _mm256_set1_epi32(2 * x8[r][s].o8); /* -16 s */
#ifdef __AVXVNNI__
                else if (T == Q8_0) dot[r] = _mm256_set1_epi32(x8[r][s].o128);
#endif
                else if (T == Q6_K) dot[r] = _mm256_set1_epi32(xk[r][s].o32[g]);
                else dot[r] = _mm256_setzero_si256();
            }
#pragma GCC unroll 8
            for (int c = 0; c < G / 4; c += (BITS == 8 ? 1 : 2)) {
                const int kk = g * G + 4 * c;
                __m256i v0, v1 = _mm256_setzero_si256(), sq = _mm256_setzero_si256();
                if (BITS == 8) {
                    v0 = _mm256_loadu_si256((const __m256i *)(q + (kk / 4) * 4 * P + hb));
#ifndef __AVXVNNI__
                    sq = _mm256_xor_si256(v0, _mm256_set1_epi8((char)0x80)); /* q */
                    v0 = _mm256_abs_epi8(sq);
#endif
                } else {
                    const __m256i b = _mm256_loadu_si256((const __m256i *)(q + (kk / 8) * 4 * P + hb));
                    v0 = _mm256_and_si256(b, m4);
                    v1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
                    if (BITS == 5) { /* bits 2p and 2p + 1 of the block's plane to bit 4 */
                        const __m256i h = _mm256_loadu_si256((const __m256i *)(qh + hb)), p10 = _mm256_set1_epi8(0x10);
                        const int p = kk / 8;
                        const __m256i h0 = p == 0 ? _mm256_slli_epi16(h, 4) : p == 1 ? _mm256_slli_epi16(h, 2)
                                         : p == 2 ? h : _mm256_srli_epi16(h, 2);
                        const __m256i h1 = p == 0 ? _mm256_slli_epi16(h, 3) : p == 1 ? _mm256_slli_epi16(h, 1)
                                         : p == 2 ? _mm256_srli_epi16(h, 1) : _mm256_srli_epi16(h, 3);
                        v0 = _mm256_or_si256(v0, _mm256_and_si256(h0, p10));
                        v1 = _mm256_or_si256(v1, _mm256_and_si256(h1, p10));
                    }
                    if (BITS == 6) {
                        const __m256i h = _mm256_loadu_si256((const __m256i *)(qh + (kk / 16) * 4 * P + hb));
                        const int sh = 2 * ((kk % 16) / 4);
                        const __m256i h0 = sh == 0 ? _mm256_slli_epi16(h, 4) : h;
                        const __m256i h1 = sh == 0 ? _mm256_slli_epi16(h, 2) : _mm256_srli_epi16(h, 2);
                        v0 = _mm256_or_si256(v0, _mm256_and_si256(h0, m30));
                        v1 = _mm256_or_si256(v1, _mm256_and_si256(h1, m30));
                    }
                }
                (void)sq;
                for (int r = 0; r < MR; r++) {
                    const int8_t *xq = BK == 32 ? x8[r][s].q : xk[r][s].q;
                    int32_t a0, a1 = 0;
                    memcpy(&a0, xq + kk, 4);
                    if (BITS != 8) memcpy(&a1, xq + kk + 4, 4);
                    const __m256i x0 = _mm256_set1_epi32(a0), x1 = _mm256_set1_epi32(a1);
#ifdef __AVXVNNI__
                    dot[r] = DPBUSD(dot[r], v0, x0);
                    if (BITS != 8) dot[r] = DPBUSD(dot[r], v1, x1);
#else
                    if (BITS == 8)
                        dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_maddubs_epi16(v0, _mm256_sign_epi8(x0, sq)), ones));
                    else {
                        const __m256i p2 = _mm256_add_epi16(_mm256_maddubs_epi16(v0, x0), _mm256_maddubs_epi16(v1, x1));
                        if (BITS != 4) dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p2, ones));
                        else s16[r] = c ? _mm256_add_epi16(s16[r], p2) : p2;
                    }
#endif
                }
            }
#ifndef __AVXVNNI__
            if (BITS == 4)
                for (int r = 0; r < MR; r++) dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(s16[r], ones));
#endif
            if (SC) {
                const __m128i sb = _mm_loadl_epi64((const __m128i *)(scp + g * P + hr));
                const __m256 scf = _mm256_cvtepi32_ps(T == Q6_K ? _mm256_cvtepi8_epi32(sb) : _mm256_cvtepu8_epi32(sb));
                for (int r = 0; r < MR; r++)
                    facc[r] = g ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), scf, facc[r])
                                : _mm256_mul_ps(_mm256_cvtepi32_ps(dot[r]), scf);
            }
        }
        (void)s16;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o + 2 * hr)));
        const __m256 m = MIN ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o + 2 * P + 2 * hr))) : d;
        __m256i mnpair[4];
        if (MIN == PX_KMIN)
            for (int h = 0; h < NG / 2; h++)
                mnpair[h] = _mm256_or_si256(
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mnp + 2 * h * P + hr))),
                    _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mnp + (2 * h + 1) * P + hr))), 16));
        for (int r = 0; r < MR; r++) {
            const float dx = BK == 32 ? x8[r][s].d : xk[r][s].d;
            const __m256 sum = SC ? facc[r] : _mm256_cvtepi32_ps(dot[r]);
            acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[r]);
            if (MIN == PX_FMIN)
                acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x8[r][s].ds), acc[r]);
            else if (MIN == PX_KMIN) {
                __m256i ms = _mm256_setzero_si256();
                for (int h = 0; h < NG / 2; h++)
                    ms = DPWSSD(ms, mnpair[h], _mm256_set1_epi32(xk[r][s].mpair[h]));
                acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_mul_ps(m, _mm256_set1_ps(dx)), acc[r]);
            }
        }
    }
    if (bias == NULL) {
        for (int r = 0; r < MR; r++) _mm256_maskstore_ps(y + r * ldy, k, acc[r]);
        return;
    }
    const __m256 bv = _mm256_maskload_ps(bias, k);
    for (int r = 0; r < MR; r++) _mm256_maskstore_ps(y + r * ldy, k, _mm256_add_ps(acc[r], bv));
}

#define PANEL_WIDE_CASES(CASE, T) /* PMR 4: cases 1-3 and the default */
#endif

#ifdef PX
/* panel() for a run-time row count mr <= PMR, each MR its own unrolled copy */
#define PANEL_CASE(MR, T) \
    case MR: panel(MR, t, T, w, nsb, x, xrb, y, ldy, nrows, bias, more, half); break;
#define PANEL_FN(NAME, T)                                                                          \
    static void NAME(int mr, const ptype *t, const uint8_t *w, long nsb, const void *x, long xrb, \
                     float *y, long ldy, int nrows, const float *bias, int more, int half) {       \
        switch (mr) {                                                                              \
            PANEL_CASE(1, T) PANEL_CASE(2, T) PANEL_CASE(3, T) PANEL_WIDE_CASES(PANEL_CASE, T)     \
        default: panel(PMR, t, T, w, nsb, x, xrb, y, ldy, nrows, bias, more, half); break;         \
        }                                                                                          \
    }
PANEL_FN(panel_q4_0, Q4_0)
PANEL_FN(panel_q4_1, Q4_1)
PANEL_FN(panel_q5_0, Q5_0)
PANEL_FN(panel_q5_1, Q5_1)
PANEL_FN(panel_q8_0, Q8_0)
PANEL_FN(panel_q4_k, Q4_K)
PANEL_FN(panel_q6_k, Q6_K)
#endif

/* 1 where this build multiplies `type` in panels (px_pack + px_gemm), else 0 (qx_gemm serves) */
int px_supported(int type) {
#ifdef PX
    return pfind(type) != NULL;
#else
    (void)type;
    return 0;
#endif
}

/* y [m, out] (ldy, + bias) = x @ w^T for w in panels (px_pack) and x from qx_quantize */
int px_gemm(int type, const uint8_t *w, long out, long n_in, const void *xq, long m, float *y,
            long ldy, const float *bias, int nthreads) {
#ifdef PX
    const ptype *t = pfind(type);
    if (t == NULL || m < 1 || out < 1 || n_in % t->bk) return -1;
    const long nsb = n_in / t->bk, npanels = (out + P - 1) / P;
    const long xrb = qx_row_bytes(n_in, t->bk == 256);
    void (*fn)(int, const ptype *, const uint8_t *, long, const void *, long, float *, long, int,
               const float *, int, int) = type == Q4_0 ? panel_q4_0 : type == Q4_1 ? panel_q4_1
                                : type == Q5_0 ? panel_q5_0 : type == Q5_1 ? panel_q5_1
                                : type == Q8_0 ? panel_q8_0 : type == Q4_K ? panel_q4_k : panel_q6_k;
    /* K in chunks of PX_KC values, so that a panel's chunk and PMR activation rows of it stay in
     * L1 while every row block passes (a 16 x 8192 Q6_K panel alone is 107 KiB), and while the
     * second 8-row half passes where there are halves; a row's sum is carried through y between
     * chunks, so its bits do not depend on the chunking */
#ifdef PX_HALVES
    const long kc = PX_KC / t->bk > 0 ? PX_KC / t->bk : 1;
    const int halves = PX_HALVES, hp = P / PX_HALVES;
#else
    const long kc = m > PMR ? (PX_KC / t->bk > 0 ? PX_KC / t->bk : 1) : nsb;
    const int halves = 1, hp = P;
#endif
    const long xb = t->bk == 256 ? (long)sizeof(xq8k) : (long)sizeof(xq8);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long pn = 0; pn < npanels; pn++) {
        const int nrows = out - pn * P < P ? (int)(out - pn * P) : P;
        for (long s0 = 0; s0 < nsb; s0 += kc) {
            const long ns = nsb - s0 < kc ? nsb - s0 : kc;
            const float *b = bias && s0 + ns == nsb ? bias + pn * P : NULL;
            for (int h = 0; h < halves && nrows > h * hp; h++) {
                const int hr = nrows - h * hp < hp ? nrows - h * hp : hp;
                for (long r0 = 0; r0 < m; r0 += PMR) {
                    const int mr = m - r0 < PMR ? (int)(m - r0) : PMR;
                    fn(mr, t, w + (pn * nsb + s0) * t->bytes, ns, (const char *)xq + r0 * xrb + s0 * xb,
                       xrb, y + r0 * ldy + pn * P + h * hp, ldy, hr, b ? b + h * hp : NULL, s0 > 0, h);
                }
            }
        }
    }
    return 0;
#else
    (void)type, (void)w, (void)out, (void)n_in, (void)xq, (void)m, (void)y, (void)ldy, (void)bias,
        (void)nthreads;
    return -1;
#endif
}

/* Rows `ids` of a panel-packed weight, dequantized into out [n, n_in] float32: the values
 * gguf-py's dequantization gives (every product is exact in float32, so the order is free).
 * Embedding lookups read a tied embedding's rows here instead of keeping the file's blocks. */
int px_rows(int type, const uint8_t *w, long rows, long n_in, const long *ids, long n, float *out) {
    const ptype *t = pfind(type);
    if (t == NULL || n_in % t->bk) return -1;
    const long nsb = n_in / t->bk, ng = t->bk / t->g;
    for (long i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= rows) return -1;
        const long pn = ids[i] / P, r = ids[i] % P;
        for (long s = 0; s < nsb; s++) {
            const uint8_t *o = w + (pn * nsb + s) * t->bytes;
            const uint8_t *sc = o + (t->min ? 4 : 2) * P, *mn = sc + ng * P;
            const uint8_t *q = t->sc ? (t->min == PX_KMIN ? mn + ng * P : sc + ng * P) : sc;
            const uint8_t *qh = q + t->bk * P / 2;
            const float d = ld_h(o + 2 * r), m = t->min ? ld_h(o + 2 * P + 2 * r) : 0.0f;
            float *y = out + i * n_in + s * t->bk;
            for (int k = 0; k < t->bk; k++) {
                int v;
                if (t->bits == 8) v = q[(k / 4) * 4 * P + r * 4 + k % 4];
                else {
                    v = (q[(k / 8) * 4 * P + r * 4 + k % 4] >> (k % 8 < 4 ? 0 : 4)) & 15;
                    if (t->bits == 6) v |= ((qh[(k / 16) * 4 * P + r * 4 + k % 4] >> (2 * ((k % 16) / 4))) & 3) << 4;
                    if (t->bits == 5) v |= ((qh[r * 4 + k % 4] >> (2 * (k / 8) + (k % 8 >= 4))) & 1) << 4;
                }
                const int g = k / t->g;
                if (type == Q4_K) y[k] = d * (float)sc[g * P + r] * (float)v - m * (float)mn[g * P + r];
                else if (type == Q6_K) y[k] = d * (float)(int8_t)sc[g * P + r] * (float)(v - 32);
                else if (type == Q4_1 || type == Q5_1) y[k] = d * (float)v + m;
                else y[k] = d * (float)(v - t->off);
            }
        }
    }
    return 0;
}
