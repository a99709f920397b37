/* The float vector of both kernels (server/panels.c, server/decoder.c): GCC's vector extensions, as wide as
 * -march gives (AVX-512 16 floats, AVX 8, else 4), loaded and stored unaligned. */
#ifndef LORASWAP_VECTORS_H
#define LORASWAP_VECTORS_H
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

#endif
