/* y = x @ W.T (+ bias) for float32 inference on the CPU, W stored in panels (server/panels.py).
 *
 * A panel holds 32 output columns of W.T as [in][32]: one matmul streams every weight once, contiguously, and a
 * block of up to ROWS rows of x multiplies it from registers: per input k, two vector loads of the panel and one
 * broadcast of x[m][k] per row feed 2 x rows fused multiply-adds (BLIS's microkernel shape). Every output sums its
 * products in input order, whatever the number of rows: a row's result does not depend on its batch mates.
 * GCC's vector extensions: AVX-512 where -march=native has it (12 rows x 2 vectors = 24 of 32 registers), else
 * narrower vectors with fewer rows per block. Threads share the panels out (OpenMP, torch's thread count). */
#include <string.h>

#define PANEL 32
#if defined(__AVX512F__)
#define ROWS 12
#else
#define ROWS 3
#endif

typedef float vec __attribute__((vector_size(64)));  /* 16 floats: one panel row is two of these */

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* R rows of x (row stride `in`) times one panel [in][32] -> acc[R][2] */
#define BLOCK(R)                                                                                                      \
    static void block_##R(const float *restrict x, const float *restrict panel, long in, vec acc[][2]) {              \
        vec sum[R][2];                                                                                                \
        for (int m = 0; m < R; m++) sum[m][0] = sum[m][1] = (vec){0};                                                 \
        for (long k = 0; k < in; k++) {                                                                               \
            vec w0 = load(panel + k * PANEL), w1 = load(panel + k * PANEL + 16);                                      \
            for (int m = 0; m < R; m++) {                                                                             \
                float s = x[m * in + k];                                                                              \
                sum[m][0] += w0 * s;                                                                                  \
                sum[m][1] += w1 * s;                                                                                  \
            }                                                                                                         \
        }                                                                                                             \
        for (int m = 0; m < R; m++) {                                                                                 \
            acc[m][0] = sum[m][0];                                                                                    \
            acc[m][1] = sum[m][1];                                                                                    \
        }                                                                                                             \
    }

BLOCK(1) BLOCK(2) BLOCK(3)
#if ROWS > 3
BLOCK(4) BLOCK(5) BLOCK(6) BLOCK(7) BLOCK(8) BLOCK(9) BLOCK(10) BLOCK(11) BLOCK(12)
#endif

typedef void (*block_fn)(const float *restrict, const float *restrict, long, vec[][2]);
static const block_fn BLOCKS[ROWS + 1] = {
    0, block_1, block_2, block_3,
#if ROWS > 3
    block_4, block_5, block_6, block_7, block_8, block_9, block_10, block_11, block_12,
#endif
};

/* x [rows][in], panels [ceil(out / 32)][in][32] (the last one zero-padded), bias [out] or NULL, y [rows][out] */
void panel_linear(const float *x, long rows, const float *panels, long out, long in, const float *bias, float *y,
                  int threads) {
    long count = (out + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && count > 1)
    for (long p = 0; p < count; p++) {
        const float *panel = panels + p * in * PANEL;
        long first = p * PANEL, width = out - first < PANEL ? out - first : PANEL;
        vec b0 = (vec){0}, b1 = (vec){0};
        if (bias != 0) {
            float padded[PANEL] = {0};
            memcpy(padded, bias + first, width * sizeof(float));
            b0 = load(padded);
            b1 = load(padded + 16);
        }
        for (long r = 0; r < rows; r += ROWS) {
            int n = rows - r < ROWS ? (int)(rows - r) : ROWS;
            vec acc[ROWS][2];
            BLOCKS[n](x + r * in, panel, in, acc);
            for (int m = 0; m < n; m++) {
                float *target = y + (r + m) * out + first;
                if (width == PANEL) {
                    store(target, acc[m][0] + b0);
                    store(target + 16, acc[m][1] + b1);
                } else {
                    float full[PANEL];
                    store(full, acc[m][0] + b0);
                    store(full + 16, acc[m][1] + b1);
                    memcpy(target, full, width * sizeof(float));
                }
            }
        }
    }
}
