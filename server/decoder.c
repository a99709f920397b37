/* One decode step (one new token per row) of a Llama-like decoder's layers, float32, on the CPU (server/fused.py).
 *
 * Each layer is what transformers computes with SDPA attention: RMS norm, q/k/v (+ bias), rotary embedding, this
 * step's keys and values written into the cache at column `width`, attention of the new token over the row's valid
 * columns (grouped-query heads), o, residual, RMS norm, SiLU-gated MLP, residual; every projection multiplied by
 * the panel kernel (server/panels.c) and its rows' LoRA pairs added (each row its slot's pair, ranks zero-padded,
 * B already scaled). Per row everything is computed in a fixed order, whatever its batch mates: a row's numbers do
 * not depend on them. Intermediate buffers are the caller's (`scratch`), nothing is allocated here. */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vectors.h"

void panel_linear(const float *x, long rows, const float *panels, long out, long in, const float *bias, float *y,
                  int threads);

typedef struct {
    const float *panels;  /* the weight in panels (server/panels.py) */
    const float *bias;    /* [out] or NULL */
    const float *lora_A;  /* [slots][rank][in], NULL where no adapter has a pair here */
    const float *lora_Bt; /* (B * scale)^T [slots][rank][out] */
    long rank, in, out;
} Projection;

typedef struct {
    const float *input_norm, *post_norm; /* [hidden] */
    Projection q, k, v, o, gate, up, down;
    float *keys, *values; /* [rows][kv_heads][capacity][head_dim] */
} Layer;

typedef struct {
    long hidden, heads, kv_heads, head_dim, intermediate, capacity;
    float eps, scaling;
} Shape;

/* a . b over n floats: LANES partial sums, then those in lane order */
static float dot(const float *a, const float *b, long n) {
    vec acc = {0};
    long i = 0;
    for (; i + LANES <= n; i += LANES) acc += load(a + i) * load(b + i);
    float lanes[LANES], sum = 0;
    store(lanes, acc);
    for (int l = 0; l < LANES; l++) sum += lanes[l];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* y [rows][out] = x [rows][in] W^T + bias + per row (x A_s^T) B_s^T for the row's slot s */
static void project(const Projection *p, const float *x, long rows, const long *slots, float *y, int threads) {
    panel_linear(x, rows, p->panels, p->out, p->in, p->bias, y, threads);
    if (p->lora_A == 0) return;
    for (long m = 0; m < rows; m++) {
        const float *A = p->lora_A + slots[m] * p->rank * p->in;
        const float *Bt = p->lora_Bt + slots[m] * p->rank * p->out;
        float *row = y + m * p->out;
        for (long r = 0; r < p->rank; r++) {
            float low = dot(x + m * p->in, A + r * p->in, p->in);
            const float *b = Bt + r * p->out;
            for (long o = 0; o < p->out; o++) row[o] += low * b[o];
        }
    }
}

static void rms_norm(const float *x, const float *weight, long rows, long n, float eps, float *y) {
    for (long m = 0; m < rows; m++) {
        const float *in = x + m * n;
        float squares = 0;
        for (long i = 0; i < n; i++) squares += in[i] * in[i];
        float scale = 1.0f / sqrtf(squares / (float)n + eps);
        for (long i = 0; i < n; i++) y[m * n + i] = weight[i] * (in[i] * scale);
    }
}

/* x [heads][head_dim] of one row, rotated in place: x cos + rotate_half(x) sin */
static void rotate(float *x, long heads, long head_dim, const float *cos, const float *sin) {
    long half = head_dim / 2;
    float turned[head_dim];
    for (long h = 0; h < heads; h++) {
        float *head = x + h * head_dim;
        for (long d = 0; d < half; d++) turned[d] = -head[d + half];
        for (long d = half; d < head_dim; d++) turned[d] = head[d - half];
        for (long d = 0; d < head_dim; d++) head[d] = head[d] * cos[d] + turned[d] * sin[d];
    }
}

/* out [rows][heads][head_dim]: each query head over its KV head's columns 0..columns-1 where mask is 1;
 * scores [threads][columns] */
static void attend(const Shape *s, const Layer *layer, const float *q, const long *mask, long rows, long columns,
                   float *out, float *scores, int threads) {
    long groups = s->heads / s->kv_heads, hd = s->head_dim, items = rows * s->heads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long item = 0; item < items; item++) {
        long m = item / s->heads, h = item % s->heads, g = h / groups;
#ifdef _OPENMP
        float *score = scores + (long)omp_get_thread_num() * columns;
#else
        float *score = scores;
#endif
        const float *query = q + item * hd;
        const float *keys = layer->keys + (m * s->kv_heads + g) * s->capacity * hd;
        const float *values = layer->values + (m * s->kv_heads + g) * s->capacity * hd;
        const long *valid = mask + m * columns;
        float top = -INFINITY;
        for (long c = 0; c < columns; c++) {
            if (!valid[c]) continue;
            score[c] = dot(query, keys + c * hd, hd) * s->scaling;
            if (score[c] > top) top = score[c];
        }
        float total = 0, *o = out + item * hd;
        for (long d = 0; d < hd; d++) o[d] = 0;
        for (long c = 0; c < columns; c++) {
            if (!valid[c]) continue;
            float weight = expf(score[c] - top);
            total += weight;
            const float *v = values + c * hd;
            for (long d = 0; d < hd; d++) o[d] += weight * v[d];
        }
        for (long d = 0; d < hd; d++) o[d] /= total;
    }
}

/* scratch: at least decoder_scratch(...) floats */
long decoder_scratch(const Shape *s, long rows, long columns, int threads) {
    long qo = rows * s->heads * s->head_dim, kv = rows * s->kv_heads * s->head_dim;
    return rows * s->hidden * 2 + qo * 2 + kv * 2 + rows * s->intermediate * 2 + (long)threads * columns;
}

/* hidden [rows][hidden] (in place: the residual stream), cos/sin [rows][head_dim], slots [rows], mask
 * [rows][width + 1] (1 = a real token, this step's column included), the caches have room at column `width` */
void decoder_step(const Shape *s, const Layer *layers, long n_layers, long rows, float *hidden, const float *cos,
                  const float *sin, const long *slots, const long *mask, long width, float *scratch, int threads) {
    long hd = s->head_dim, columns = width + 1;
    float *normed = scratch, *mixed = normed + rows * s->hidden;
    float *q = mixed + rows * s->hidden, *attn = q + rows * s->heads * hd;
    float *k = attn + rows * s->heads * hd, *v = k + rows * s->kv_heads * hd;
    float *gate = v + rows * s->kv_heads * hd, *up = gate + rows * s->intermediate;
    float *scores = up + rows * s->intermediate;
    for (long l = 0; l < n_layers; l++) {
        const Layer *layer = layers + l;
        rms_norm(hidden, layer->input_norm, rows, s->hidden, s->eps, normed);
        project(&layer->q, normed, rows, slots, q, threads);
        project(&layer->k, normed, rows, slots, k, threads);
        project(&layer->v, normed, rows, slots, v, threads);
        for (long m = 0; m < rows; m++) {
            rotate(q + m * s->heads * hd, s->heads, hd, cos + m * hd, sin + m * hd);
            rotate(k + m * s->kv_heads * hd, s->kv_heads, hd, cos + m * hd, sin + m * hd);
            for (long g = 0; g < s->kv_heads; g++) {
                long at = ((m * s->kv_heads + g) * s->capacity + width) * hd;
                memcpy(layer->keys + at, k + (m * s->kv_heads + g) * hd, hd * sizeof(float));
                memcpy(layer->values + at, v + (m * s->kv_heads + g) * hd, hd * sizeof(float));
            }
        }
        attend(s, layer, q, mask, rows, columns, attn, scores, threads);
        project(&layer->o, attn, rows, slots, mixed, threads);
        for (long i = 0; i < rows * s->hidden; i++) hidden[i] += mixed[i];
        rms_norm(hidden, layer->post_norm, rows, s->hidden, s->eps, normed);
        project(&layer->gate, normed, rows, slots, gate, threads);
        project(&layer->up, normed, rows, slots, up, threads);
        for (long i = 0; i < rows * s->intermediate; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        project(&layer->down, gate, rows, slots, mixed, threads);
        for (long i = 0; i < rows * s->hidden; i++) hidden[i] += mixed[i];
    }
}
