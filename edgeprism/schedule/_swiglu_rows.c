/* The CPU expert path: a layer's units straight from the host arena, one call, every row of the
 * arena reachable (no gather). Built at first use by edgeprism/schedule/native.py; see cpu_experts.py.
 *
 * Unit row layout (moe/kernels.py): [w1 (Ig x D) | w3 (Ig x D) | w2 (D x Ig)], fp32 or bf16.
 * Phase 1, parallel over (unit, neuron): act[i, j] = w[i] * silu(w1_j . x) * (w3_j . x)   (fp32)
 * Phase 2, parallel over output d:       y[d] = sum_i sum_j w2_i[d, j] * act[i, j]        (fp32)
 * Both phases stream the weights once, in order; accumulation is fp32 whatever the storage.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* LANES independent partial sums: the compiler turns the inner loop into several vector FMAs per
 * step, so one dot product is not serialised on one accumulator's FMA latency. */
#define LANES 32

static inline float dot_f32(const float *a, const float *x, int n) {
    float acc[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[k + l] * x[k + l];
    float s = 0.f;
    for (; k < n; k++) s += a[k] * x[k];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

static inline float dot_bf16(const uint16_t *a, const float *x, int n) {
    float acc[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += bf16_to_f32(a[k + l]) * x[k + l];
    float s = 0.f;
    for (; k < n; k++) s += bf16_to_f32(a[k]) * x[k];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

static inline float dot_any(const void *row, int bf16, int64_t offset, const float *x, int n) {
    return bf16 ? dot_bf16((const uint16_t *)row + offset, x, n) : dot_f32((const float *)row + offset, x, n);
}

/* arena: first element of row 0; rows[n]: which rows; w[n]: unit weights; x[D]; act: [n * Ig]
 * workspace; y[D] output (overwritten). */
void swiglu_rows(const void *arena, int bf16, int64_t row_numel, const int64_t *rows, const float *w, int n,
                 int D, int Ig, const float *x, float *act, float *y, int threads) {
    const int64_t esize = bf16 ? 2 : 4;
    const char *base = (const char *)arena;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < (int64_t)n * Ig; t++) {
        int i = (int)(t / Ig), j = (int)(t % Ig);
        const void *row = base + rows[i] * row_numel * esize;
        float g = dot_any(row, bf16, (int64_t)j * D, x, D);
        float u = dot_any(row, bf16, (int64_t)(Ig + j) * D, x, D);
        act[t] = w[i] * (g / (1.f + expf(-g))) * u;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int d = 0; d < D; d++) {
        float acc = 0.f;
        for (int i = 0; i < n; i++) {
            const void *row = base + rows[i] * row_numel * esize;
            acc += dot_any(row, bf16, 2 * (int64_t)Ig * D + (int64_t)d * Ig, act + (int64_t)i * Ig, Ig);
        }
        y[d] = acc;
    }
}
