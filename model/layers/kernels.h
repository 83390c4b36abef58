/* Pieces every CPU kernel file shares (model/layers/kernels.py compiles them together). */
#ifndef TOKENMILL_KERNELS_H
#define TOKENMILL_KERNELS_H
#include <stdint.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) { /* IEEE half -> float, subnormals included */
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, f = h & 0x3ff, u;
    if (e == 0) {
        if (f == 0) u = s;
        else { e = 113; while (!(f & 0x400)) { f <<= 1; e--; } u = s | (e << 23) | ((f & 0x3ff) << 13); }
    } else if (e == 31) u = s | 0x7f800000 | (f << 13);
    else u = s | ((e + 112) << 23) | (f << 13);
    float out; memcpy(&out, &u, 4); return out;
}
#endif

/* a little-endian float16 at p (GGUF blocks are unaligned) */
static inline float ld_h(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h2f(h);
}

#endif
