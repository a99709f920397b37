/* y = x @ W.T (+ bias) for float32 inference on the CPU, W stored in panels (server/panels.py).
 *
 * A panel holds PANEL output columns of W.T as [in][PANEL], two vector registers wide: one matmul streams every
 * weight once, contiguously, and a block of up to ROWS rows of x multiplies it from registers: per input k, two
 * vector loads of the panel and one broadcast of x[m][k] per row feed 2 x rows fused multiply-adds (BLIS's
 * microkernel shape). Every output sums its products in input order, whatever the number of rows: a row's result
 * does not depend on its batch mates. GCC's vector extensions, sized to what -march=native gives: AVX-512 (32
 * registers of 16 floats) 12 rows per pass over a panel of 32 (24 accumulators), AVX2 (16 registers of 8) 6 rows over
 * a panel of 16; more rows take equal passes over the panel while it is in cache (16 rows: 8 + 8, ~5 % faster than
 * 12 + 4). Elsewhere (4-float vectors, measured slower than torch's matmuls for prefills on x86-64 without
 * AVX) panel_width() is 0: not used. Threads share the panels out (OpenMP, torch's count). */
#include <string.h>

#include "vectors.h"

#if LANES == 16
#define ROWS 12
#else
#define ROWS 6
#endif
#if LANES == 4
#define UNSUPPORTED
#endif
#define PER 2 /* vectors in one panel row */
#define PANEL (PER * LANES)

/* R rows of x (row stride `in`) times one panel [in][PANEL] -> acc[R][PER] */
#define BLOCK(R)                                                                                                      \
    static void block_##R(const float *restrict x, const float *restrict panel, long in, vec acc[][PER]) {            \
        vec sum[R][PER];                                                                                              \
        for (int m = 0; m < R; m++)                                                                                   \
            for (int v = 0; v < PER; v++) sum[m][v] = (vec){0};                                                       \
        for (long k = 0; k < in; k++) {                                                                               \
            vec w[PER];                                                                                               \
            for (int v = 0; v < PER; v++) w[v] = load(panel + k * PANEL + v * LANES);                                \
            for (int m = 0; m < R; m++) {                                                                             \
                float s = x[m * in + k];                                                                              \
                for (int v = 0; v < PER; v++) sum[m][v] += w[v] * s;                                                  \
            }                                                                                                         \
        }                                                                                                             \
        for (int m = 0; m < R; m++)                                                                                   \
            for (int v = 0; v < PER; v++) acc[m][v] = sum[m][v];                                                      \
    }

BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4) BLOCK(5) BLOCK(6)
#if ROWS > 6
BLOCK(7) BLOCK(8) BLOCK(9) BLOCK(10) BLOCK(11) BLOCK(12)
#endif

typedef void (*block_fn)(const float *restrict, const float *restrict, long, vec[][PER]);
static const block_fn BLOCKS[ROWS + 1] = {
    0, block_1, block_2, block_3, block_4, block_5, block_6,
#if ROWS > 6
    block_7, block_8, block_9, block_10, block_11, block_12,
#endif
};

/* The outputs per panel, which the weights are packed for; 0 where the kernel is not to be used. */
long panel_width(void) {
#ifdef UNSUPPORTED
    return 0;
#else
    return PANEL;
#endif
}

/* x [rows][in], panels [ceil(out / PANEL)][in][PANEL] (the last one zero-padded), bias [out] or NULL, y [rows][out] */
void panel_linear(const float *x, long rows, const float *panels, long out, long in, const float *bias, float *y,
                  int threads) {
    if (rows <= 0) return;
    long count = (out + PANEL - 1) / PANEL;
    long passes = (rows + ROWS - 1) / ROWS, per = (rows + passes - 1) / passes; /* 16 rows: 8 + 8, not 12 + 4 */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && count > 1)
    for (long p = 0; p < count; p++) {
        const float *panel = panels + p * in * PANEL;
        long first = p * PANEL, width = out - first < PANEL ? out - first : PANEL;
        float padded_bias[PANEL] = {0};
        if (bias != 0) memcpy(padded_bias, bias + first, width * sizeof(float));
        vec b[PER];
        for (int v = 0; v < PER; v++) b[v] = load(padded_bias + v * LANES);
        for (long r = 0; r < rows; r += per) {
            int n = rows - r < per ? (int)(rows - r) : (int)per;
            vec acc[ROWS][PER];
            BLOCKS[n](x + r * in, panel, in, acc);
            for (int m = 0; m < n; m++) {
                float full[PANEL];
                for (int v = 0; v < PER; v++) store(full + v * LANES, acc[m][v] + b[v]);
                memcpy(y + (r + m) * out + first, full, width * sizeof(float));
            }
        }
    }
}
