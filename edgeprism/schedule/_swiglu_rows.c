/* The CPU expert path: a layer's units straight from the host arena, one call, every row of the
 * arena reachable (no gather). Built at first use by edgeprism/schedule/native.py; see cpu_experts.py.
 *
 * A unit row holds w13 = [w1; w3] (2Ig x D) at byte offset off13 and w2 (D x Ig) at off2, as fp32,
 * bf16 or int8 (kind 0/1/2; moe/kernels.py and moe/quant.py Int8Format). int8 rows also hold one fp32
 * scale per output channel: s13 [2Ig] at off_s13, s2 [D] at off_s2 (w = q * s).
 * Phase 1, parallel over (unit, neuron): act[i, j] = w[i] * silu(w1_j . x) * (w3_j . x)   (fp32)
 * Phase 2, parallel over (unit, output):  part[i, d] = sum_j w2_i[d, j] * act[i, j]        (fp32)
 * Phase 3, parallel over output d:       y[d] = sum_i part[i, d]
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
/* Software prefetch this far ahead of each row's stream: +25% (bf16) and +5-10% (fp32) read rate on
 * one core of the CI machine; a prefetch never faults, so running past a row's end is harmless. */
#define AHEAD 2048
#define PREFETCH(p) __builtin_prefetch((const char *)(p) + AHEAD)

static inline float dot_f32(const float *a, const float *x, int n) {
    float acc[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES) {
        PREFETCH(a + k);
        PREFETCH(a + k + LANES / 2);
        for (int l = 0; l < LANES; l++) acc[l] += a[k + l] * x[k + l];
    }
    float s = 0.f;
    for (; k < n; k++) s += a[k] * x[k];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

static inline float dot_bf16(const uint16_t *a, const float *x, int n) {
    float acc[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES) {
        PREFETCH(a + k);
        for (int l = 0; l < LANES; l++) acc[l] += bf16_to_f32(a[k + l]) * x[k + l];
    }
    float s = 0.f;
    for (; k < n; k++) s += bf16_to_f32(a[k]) * x[k];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

static inline float dot_i8(const int8_t *a, const float *x, int n) {
    float acc[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES) {
        PREFETCH(a + k);
        for (int l = 0; l < LANES; l++) acc[l] += (float)a[k + l] * x[k + l];
    }
    float s = 0.f;
    for (; k < n; k++) s += (float)a[k] * x[k];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* row . x over n elements of a row of `kind`, starting at element `at` of the part at `part` */
static inline float dot_any(const char *part, int kind, int64_t at, const float *x, int n) {
    if (kind == 0) return dot_f32((const float *)part + at, x, n);
    if (kind == 1) return dot_bf16((const uint16_t *)part + at, x, n);
    return dot_i8((const int8_t *)part + at, x, n);
}

/* arena: row 0; rows[n]: which rows; w[n]: unit weights; x[D]; work: [n * (Ig + D)] workspace; y[D]
 * output. One parallel region, three static loops (barriers between): every thread streams one
 * contiguous stretch of rows in each phase, and every output is summed by one thread in one order
 * (the result does not depend on the thread count). */
void swiglu_rows(const char *arena, int kind, int64_t row_bytes, int64_t off13, int64_t off2, int64_t off_s13,
                 int64_t off_s2, const int64_t *rows, const float *w, int n, int D, int Ig, const float *x,
                 float *work, float *y, int threads) {
    float *act = work, *part = work + (int64_t)n * Ig;
#pragma omp parallel num_threads(threads)
    {
        /* phase 1: act[i, j] = w[i] * silu(w1_j . x) * (w3_j . x) */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < (int64_t)n * Ig; t++) {
            int i = (int)(t / Ig), j = (int)(t % Ig);
            const char *row = arena + rows[i] * row_bytes;
            float g = dot_any(row + off13, kind, (int64_t)j * D, x, D);
            float u = dot_any(row + off13, kind, (int64_t)(Ig + j) * D, x, D);
            if (kind == 2) {
                const float *s13 = (const float *)(row + off_s13);
                g *= s13[j];
                u *= s13[Ig + j];
            }
            act[t] = w[i] * (g / (1.f + expf(-g))) * u;
        }
        /* phase 2: part[i, d] = w2_i[d, :] . act[i, :] */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < (int64_t)n * D; t++) {
            int i = (int)(t / D), d = (int)(t % D);
            const char *row = arena + rows[i] * row_bytes;
            float p = dot_any(row + off2, kind, (int64_t)d * Ig, act + (int64_t)i * Ig, Ig);
            part[t] = kind == 2 ? p * ((const float *)(row + off_s2))[d] : p;
        }
        /* phase 3: y[d] = sum_i part[i, d] */
#pragma omp for schedule(static)
        for (int d = 0; d < D; d++) {
            float acc = 0.f;
            for (int i = 0; i < n; i++) acc += part[(int64_t)i * D + d];
            y[d] = acc;
        }
    }
}
