/* The CPU expert path: a layer's units straight from the host arena, one call, every row of the
 * arena reachable (no gather). Built at first use by edgeprism/schedule/native.py; see cpu_experts.py.
 *
 * A unit row holds w13 = [w1; w3] (2Ig x D) at byte offset off13 and w2 (D x Ig) at off2, as fp32,
 * bf16, int8 or int4 (kind 0/1/2/3; moe/kernels.py and moe/quant.py Int8Format, Int4Format).
 * int8 rows also hold one fp32 scale per output channel: s13 [2Ig] at off_s13, s2 [D] at off_s2
 * (w = q * s). int4 rows hold two nibbles a byte (low = even input k): q13 [2Ig, D/2], q2 [D, Ig/2],
 * and per group of gs inputs an fp16 scale and minimum: s13, m13 [2Ig, D/gs], s2, m2 [D, Ig/gs]
 * (w = q * s + m). An int4 dot over one group is s * sum_k q_k v_k + m * sum_k v_k, so the kernel
 * keeps its inputs deinterleaved (even k, then odd k: a byte's two nibbles meet two contiguous
 * streams) with their group sums beside them.
 * Kind 4 is int4 rows with int8 activations (llama.cpp's Q8 trick): the inputs of each dot are
 * quantized to int8 per chunk of 64 (the 32 bytes of a row that hold them) with one fp32 scale (v ~
 * d q, d = max|v| / 127, round to nearest even), and a group's dot is s * sum_c d_c sum_k q_k vq_k +
 * m * sum_c d_c sum_k vq_k: exactly the dot of the dequantized row with the dequantized inputs, in
 * integer arithmetic (maddubs or VNNI) where kind 3 converts every nibble to float.
 * Inputs (int4), one thread:             xd = x deinterleaved, xs[g] = sum of x over group g
 *          (kind 4: xq = x deinterleaved and quantized, xv its chunk scales, xs its dequantized sums)
 * Phase 1, parallel over (unit, neuron): act[i, j] = w[i] * silu(w1_j . x) * (w3_j . x)   (fp32)
 *          (int4: act stored deinterleaved per unit, then as[i, g] = its group sums; kind 4 also
 *          quantizes it per chunk, as x)
 * Phase 2, parallel over output d:       y[d] = sum_i sum_j w2_i[d, j] * act[i, j]         (fp32)
 * Both phases stream the weights once; accumulation is fp32 whatever the storage. A barrier costs
 * tens of µs on a VM whose idle threads sleep (measured on the H100 box), so the tiny steps have no
 * parallel phase of their own: the inputs are prepared by one thread, and each output sums its
 * units inside phase 2.
 */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPIN_PAUSE() _mm_pause()
#else
#define SPIN_PAUSE() ((void)0)
#endif

/* A barrier whose waiters spin (with a pause) and never sleep, for the CPU share's loop: libgomp's
 * own barrier spins only ~100 times before sleeping when it manages more threads than there are
 * CPUs (an idle pool elsewhere in the process counts), and waking a sleeping vCPU costs tens of µs
 * (the H100 box measured 44-93 µs for phases of a few µs of work). The loop's threads already spin
 * on the GPU's flags between layers, so this adds no busy time (a long wait yields now and then, in
 * case a thread of the team is not running). The last of `nth` threads to arrive
 * resets the count and then moves `gen` on (release); the others leave once they see it move
 * (acquire), so everything written before the barrier is visible after it. NULL: an OpenMP barrier. */
typedef struct {
    int arrived, gen;
} spin_barrier_t;

static void team_barrier(spin_barrier_t *b, int nth) {
    if (b == NULL) {
#pragma omp barrier
        return;
    }
    const int gen = __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == nth) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->gen, gen + 1, __ATOMIC_RELEASE);
    } else {
        unsigned spins = 0;
        while (__atomic_load_n(&b->gen, __ATOMIC_ACQUIRE) == gen) {
            SPIN_PAUSE();
            if ((++spins & 4095) == 0) sched_yield(); /* more threads than cores: let the late one run */
        }
    }
}

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t v) { return bits_to_f32((uint32_t)v << 16); }

/* IEEE half -> float by bits, where F16C is missing (read once per int4 group) */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, mant = h & 0x3ff;
    if (e == 31) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
    if (e) return bits_to_f32(sign | ((e + 112) << 23) | (mant << 13));
    float f = (float)mant * 0x1p-24f; /* zero or subnormal */
    return sign ? -f : f;
}

/* LANES independent partial sums: the compiler turns the inner loop into several vector FMAs per
 * step, so one dot product is not serialised on one accumulator's FMA latency. */
#define LANES 32
/* Software prefetch this far ahead of each row's stream: +25% (bf16) and +5-10% (fp32) read rate on
 * one core of the CI machine; a prefetch never faults, so running past a row's end is harmless. */
#define AHEAD 2048
#define PREFETCH(p) __builtin_prefetch((const char *)(p) + AHEAD)
/* int4: bytes of one group consumed per step; a group's gs/2 bytes must be a multiple (gs 64, 128) */
#define I4_LANES 16

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

/* one int4 row . v over n inputs: q [n/2] bytes, s, m [n/gs] fp16; vd = v deinterleaved [n] (even k
 * then odd k), vs [n/gs] group sums of v. The portable loop (any gs with gs/2 a multiple of
 * I4_LANES); the vector versions below take gs 64 and 128 and fall back to it otherwise. */
static inline float dot_i4_generic(const uint8_t *q, const uint16_t *s, const uint16_t *m, const float *vd,
                                   const float *vs, int n, int gs) {
    const float *ve = vd, *vo = vd + n / 2;
    const int gb = gs / 2;
    float acc[I4_LANES] = {0}, shift = 0.f;
    for (int g = 0; g < n / gs; g++) {
        const uint8_t *qg = q + (int64_t)g * gb;
        const float *eg = ve + (int64_t)g * gb, *og = vo + (int64_t)g * gb;
        float ga[I4_LANES] = {0};
        PREFETCH(qg);
        for (int b = 0; b < gb; b += I4_LANES)
            for (int l = 0; l < I4_LANES; l++) {
                uint8_t v = qg[b + l];
                ga[l] += (float)(v & 15) * eg[b + l] + (float)(v >> 4) * og[b + l];
            }
        float sg = f16_to_f32(s[g]);
        for (int l = 0; l < I4_LANES; l++) acc[l] += sg * ga[l];
        shift += f16_to_f32(m[g]) * vs[g];
    }
    for (int l = 0; l < I4_LANES; l++) shift += acc[l];
    return shift;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__) && defined(__F16C__)

/* AVX-512 (the GPU box's Xeon): 16 bytes widen to 16 dwords in one op, then as the AVX2 loop below
 * with twice the lanes: per 32 weights one widen, one and, one shift, two converts, two FMAs. */
static inline float dot_i4(const uint8_t *q, const uint16_t *s, const uint16_t *m, const float *vd,
                           const float *vs, int n, int gs) {
    const int gb = gs / 2;
    if (gb % 32) return dot_i4_generic(q, s, m, vd, vs, n, gs);
    const float *ve = vd, *vo = vd + n / 2;
    const __m512i low = _mm512_set1_epi32(15);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float shift = 0.f;
    for (int g = 0; g < n / gs; g++) {
        const uint8_t *qg = q + (int64_t)g * gb;
        const float *eg = ve + (int64_t)g * gb, *og = vo + (int64_t)g * gb;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        PREFETCH(qg);
        for (int b = 0; b < gb; b += 32) {
            __m512i t0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qg + b)));
            __m512i t1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qg + b + 16)));
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(t0, low)), _mm512_loadu_ps(eg + b), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(t0, 4)), _mm512_loadu_ps(og + b), a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(t1, low)), _mm512_loadu_ps(eg + b + 16), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(t1, 4)), _mm512_loadu_ps(og + b + 16), a3);
        }
        __m512 sg = _mm512_set1_ps(_cvtsh_ss(s[g]));
        acc0 = _mm512_fmadd_ps(sg, _mm512_add_ps(a0, a2), acc0);
        acc1 = _mm512_fmadd_ps(sg, _mm512_add_ps(a1, a3), acc1);
        shift += _cvtsh_ss(m[g]) * vs[g];
    }
    return shift + _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

/* AVX2: 8 bytes widen to 8 dwords in one op; low nibble = & 15, high = >> 4, each one convert and
 * one FMA against its contiguous input stream; four accumulators hide the FMA latency. 2x the
 * autovectorised generic loop below on the CI machine (which spends most of its time unpacking). */
static inline float dot_i4(const uint8_t *q, const uint16_t *s, const uint16_t *m, const float *vd,
                           const float *vs, int n, int gs) {
    const int gb = gs / 2;
    if (gb % I4_LANES) return dot_i4_generic(q, s, m, vd, vs, n, gs);
    const float *ve = vd, *vo = vd + n / 2;
    const __m256i low = _mm256_set1_epi32(15);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float shift = 0.f;
    for (int g = 0; g < n / gs; g++) {
        const uint8_t *qg = q + (int64_t)g * gb;
        const float *eg = ve + (int64_t)g * gb, *og = vo + (int64_t)g * gb;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        PREFETCH(qg);
        for (int b = 0; b < gb; b += I4_LANES) {
            __m256i t0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qg + b)));
            __m256i t1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qg + b + 8)));
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(t0, low)), _mm256_loadu_ps(eg + b), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(t0, 4)), _mm256_loadu_ps(og + b), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(t1, low)), _mm256_loadu_ps(eg + b + 8), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(t1, 4)), _mm256_loadu_ps(og + b + 8), a3);
        }
        __m256 sg = _mm256_set1_ps(_cvtsh_ss(s[g]));
        acc0 = _mm256_fmadd_ps(sg, _mm256_add_ps(a0, a2), acc0);
        acc1 = _mm256_fmadd_ps(sg, _mm256_add_ps(a1, a3), acc1);
        shift += _cvtsh_ss(m[g]) * vs[g];
    }
    return shift + hsum8(_mm256_add_ps(acc0, acc1));
}
#else
static inline float dot_i4(const uint8_t *q, const uint16_t *s, const uint16_t *m, const float *vd,
                           const float *vs, int n, int gs) {
    return dot_i4_generic(q, s, m, vd, vs, n, gs);
}
#endif


/* ---- int4 rows . int8 inputs (kind 4) ----
 * A row's 32 bytes at 32c (chunk c) hold inputs 64c .. 64c + 63: low nibbles the even ones, high
 * nibbles the odd ones. vq: the inputs deinterleaved (even k, then odd k) and quantized to int8 per
 * chunk, one scale for its 64 inputs (its even ones at vq[32c], its odd ones at vq[n/2 + 32c]); vd
 * [n/64] the chunks' scales; vs [n/gs] each group's sum of dequantized inputs. A chunk's dot is then
 * one integer sum, scaled once by its group's scale times its own: s_g d_c sum_k q_k vq_k. */
static inline float dot_i4q_generic(const uint8_t *q, const uint16_t *s, const uint16_t *m, const int8_t *vq,
                                    const float *vd, const float *vs, int n, int gs) {
    const int half = n / 2, per = gs / 64;
    float acc = 0.f, shift = 0.f;
    for (int c = 0; c < n / 64; c++) {
        int32_t p = 0;
        PREFETCH(q + 32 * c);
        for (int t = 0; t < 32; t++) {
            const uint8_t v = q[32 * c + t];
            p += (int32_t)(v & 15) * vq[32 * c + t] + (int32_t)(v >> 4) * vq[half + 32 * c + t];
        }
        acc += f16_to_f32(s[c / per]) * vd[c] * (float)p;
    }
    for (int g = 0; g < n / gs; g++) shift += f16_to_f32(m[g]) * vs[g];
    return acc + shift;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

/* lo . xe + hi . xo (32 unsigned bytes against 32 signed bytes, twice) -> 8 int32 partial sums: VNNI
 * where the CPU has it (the GPU box's Xeon), else maddubs (pairs into int16: at most 2 * 15 * 127;
 * the two added, 4 * 15 * 127 < 2^15, no saturation) and madd against ones. */
static inline __m256i dot2_u8s8(__m256i lo, __m256i xe, __m256i hi, __m256i xo) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xe), hi, xo);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xe), hi, xo);
#else
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo)),
                             _mm256_set1_epi16(1));
#endif
}

/* one chunk's integer dot, 8 partial sums (see dot_i4q_generic) */
static inline __m256i chunk_i4q(const uint8_t *q, const int8_t *vq, int half, int c) {
    const __m256i low = _mm256_set1_epi8(15);
    const __m256i qb = _mm256_loadu_si256((const __m256i *)(q + 32 * c));
    return dot2_u8s8(_mm256_and_si256(qb, low), _mm256_loadu_si256((const __m256i *)(vq + 32 * c)),
                     _mm256_and_si256(_mm256_srli_epi16(qb, 4), low),
                     _mm256_loadu_si256((const __m256i *)(vq + half + 32 * c)));
}

/* Four chunks at a time: four independent integer dots (no float work per chunk), their partial sums
 * folded into one int32 each by three horizontal adds, then one convert and one FMA against the four
 * chunks' scales s_g d_c. Per 32 bytes: a load, three ops to split the nibbles, two integer dots and
 * a share of the fold, where scaling each chunk's partial sums in float (the first version) was
 * compute-bound at ~4 GB/s a core. */
static inline float dot_i4q(const uint8_t *q, const uint16_t *s, const uint16_t *m, const int8_t *vq,
                            const float *vd, const float *vs, int n, int gs) {
    const int half = n / 2, C = n / 64, per = gs / 64, G = n / gs;
    __m128 acc = _mm_setzero_ps();
    int c = 0;
    for (; c + 4 <= C; c += 4) {
        PREFETCH(q + 32 * c);
        PREFETCH(q + 32 * c + 64);
        const __m256i p0 = chunk_i4q(q, vq, half, c), p1 = chunk_i4q(q, vq, half, c + 1);
        const __m256i p2 = chunk_i4q(q, vq, half, c + 2), p3 = chunk_i4q(q, vq, half, c + 3);
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
        const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        __m128 sc;
        if (per == 1) {
            sc = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(s + c)));
        } else if (per == 2) { /* groups of 128: scales a, b -> a a b b */
            int32_t two;
            memcpy(&two, s + c / 2, sizeof two);
            const __m128 ab = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
            sc = _mm_unpacklo_ps(ab, ab);
        } else {
            sc = _mm_setr_ps(_cvtsh_ss(s[c / per]), _cvtsh_ss(s[(c + 1) / per]), _cvtsh_ss(s[(c + 2) / per]),
                             _cvtsh_ss(s[(c + 3) / per]));
        }
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(t), _mm_mul_ps(sc, _mm_loadu_ps(vd + c)), acc);
    }
    acc = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
    float sum = _mm_cvtss_f32(_mm_add_ss(acc, _mm_movehdup_ps(acc)));
    for (; c < C; c++) { /* the last n/64 mod 4 chunks */
        const __m256i p = chunk_i4q(q, vq, half, c);
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
        sum += _cvtsh_ss(s[c / per]) * vd[c] * (float)_mm_cvtsi128_si32(t);
    }
    __m128 sh = _mm_setzero_ps();
    int g = 0;
    for (; g + 4 <= G; g += 4)
        sh = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(m + g))), _mm_loadu_ps(vs + g), sh);
    sh = _mm_add_ps(sh, _mm_movehl_ps(sh, sh));
    float shift = _mm_cvtss_f32(_mm_add_ss(sh, _mm_movehdup_ps(sh)));
    for (; g < G; g++) shift += _cvtsh_ss(m[g]) * vs[g];
    return sum + shift;
}
#else
static inline float dot_i4q(const uint8_t *q, const uint16_t *s, const uint16_t *m, const int8_t *vq,
                            const float *vd, const float *vs, int n, int gs) {
    return dot_i4q_generic(q, s, m, vq, vd, vs, n, gs);
}
#endif

/* One chunk of 64 inputs: ve[0], ve[stride], ... and vo[0], vo[stride], ... (32 each: its even and
 * odd inputs) -> qe[0..31], qo[0..31] int8 against one scale d (v ~ d q, d = max |v| / 127; 0 for a
 * zero chunk), rounding to nearest even; returns d and sets *qsum = sum of the 64 q */
static inline float quant64(const float *ve, const float *vo, int stride, int8_t *qe, int8_t *qo, int32_t *qsum) {
    float amax = 0.f;
    for (int t = 0; t < 32; t++) amax = fmaxf(amax, fmaxf(fabsf(ve[t * stride]), fabsf(vo[t * stride])));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int t = 0; t < 32; t++) {
        const int32_t e = (int32_t)nearbyintf(ve[t * stride] * id), o = (int32_t)nearbyintf(vo[t * stride] * id);
        qe[t] = (int8_t)e;
        qo[t] = (int8_t)o;
        sum += e + o;
    }
    *qsum = sum;
    return d;
}

/* row . x over n elements of a row of `kind` 0-2, starting at element `at` of the part at `part` */
static inline float dot_any(const char *part, int kind, int64_t at, const float *x, int n) {
    if (kind == 0) return dot_f32((const float *)part + at, x, n);
    if (kind == 1) return dot_bf16((const uint16_t *)part + at, x, n);
    return dot_i8((const int8_t *)part + at, x, n);
}

/* where input k of an n-vector sits once deinterleaved (even k, then odd k) */
static inline int64_t deinterleaved(int64_t k, int n) { return (k & 1) * (n / 2) + k / 2; }

/* Floats of workspace `swiglu_rows` needs for n units. */
int64_t swiglu_rows_work(int kind, int n, int D, int Ig, int gs) {
    int64_t base = (int64_t)n * Ig; /* act */
    if (kind == 4) /* xq (int8), xv, xs; aq (int8), av, as */
        return base + D / 4 + D / 64 + D / gs + (int64_t)n * Ig / 4 + (int64_t)n * Ig / 64 + (int64_t)n * (Ig / gs);
    return kind == 3 ? base + D + D / gs + (int64_t)n * (Ig / gs) : base;
}

/* Where each buffer sits in the workspace (swiglu_rows_work's order). */
typedef struct {
    float *act;  /* [n, Ig] fp32 activations (int4: deinterleaved per unit) */
    float *xd;   /* kind 3: x deinterleaved [D] */
    int8_t *xq;  /* kind 4: x deinterleaved and quantized [D] */
    float *xv;   /* kind 4: x's chunk scales [D / 64] */
    float *xs;   /* int4: x's group sums [D / gs] */
    int8_t *aq;  /* kind 4: act quantized [n * Ig] */
    float *av;   /* kind 4: act's chunk scales [n * Ig / 64] */
    float *as;   /* int4: act's group sums [n, Ig / gs] */
} work_t;

static work_t work_layout(int kind, int n, int D, int Ig, int gs, float *work) {
    const int int4 = kind >= 3, q8 = kind == 4;
    work_t b;
    b.act = work;
    b.xd = work + (int64_t)n * Ig;
    b.xq = (int8_t *)b.xd;
    b.xv = b.xd + D / 4;
    b.xs = q8 ? b.xv + D / 64 : b.xd + D;
    float *after_xs = b.xs + (int4 ? D / gs : 0);
    b.aq = (int8_t *)after_xs;
    b.av = after_xs + (q8 ? (int64_t)n * Ig / 4 : 0);
    b.as = q8 ? b.av + (int64_t)n * Ig / 64 : after_xs;
    return b;
}

/* The inputs' side of int4 dots, serially (D values: microseconds): kind 3 deinterleaves x (even k,
 * then odd k) and sums each group; kind 4 also quantizes it per chunk of 64 inputs (chunk c: x[64c ..
 * 64c + 63], its even inputs to xq[32c], its odd ones to xq[D/2 + 32c]) and sums the dequantized
 * values per group. Other kinds read x as it is. */
static void prepare_inputs(int kind, const float *x, int D, int gs, work_t b) {
    if (kind == 4) {
        for (int g = 0; g < D / gs; g++) {
            float sum = 0.f;
            for (int c = g * (gs / 64); c < (g + 1) * (gs / 64); c++) {
                int32_t qs;
                const float d = quant64(x + 64 * c, x + 64 * c + 1, 2, b.xq + 32 * c, b.xq + D / 2 + 32 * c, &qs);
                b.xv[c] = d;
                sum += d * (float)qs;
            }
            b.xs[g] = sum;
        }
    } else if (kind == 3) {
        for (int g = 0; g < D / gs; g++) {
            float sum = 0.f;
            for (int k = g * gs; k < (g + 1) * gs; k++) {
                b.xd[deinterleaved(k, D)] = x[k];
                sum += x[k];
            }
            b.xs[g] = sum;
        }
    }
}

/* For the tests: `rounds` rounds in which every thread adds 1 to a shared count, meets the others at
 * a team_barrier, and checks that the whole round's additions are there. Returns the failed checks
 * (0 for a barrier that works). */
int64_t swiglu_barrier_check(int threads, int rounds) {
    spin_barrier_t bar = {0, 0};
    int64_t count = 0, bad = 0;
#pragma omp parallel num_threads(threads)
    {
        const int nth = omp_get_num_threads();
        for (int r = 0; r < rounds; r++) {
            __atomic_add_fetch(&count, 1, __ATOMIC_RELAXED);
            team_barrier(&bar, nth);
            if (__atomic_load_n(&count, __ATOMIC_RELAXED) < (int64_t)(r + 1) * nth) __atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
        }
    }
    return bad;
}

/* arena: row 0; rows[n]: which rows; w[n]: unit weights; x[D]; work: [swiglu_rows_work(...)]
 * workspace, its inputs prepared (prepare_inputs); y[D] output; gs: int4 group size (ignored by other
 * kinds). Run by every thread of an enclosing parallel region (its `omp for`s bind to that region):
 * swiglu_rows opens one per call, swiglu_token_loop one per token. Loops are shared in chunks of rows
 * (swiglu_set_chunk), with a barrier after each phase, and every output is summed by one thread in
 * one order (the result does not depend on the thread count or the schedule). The barriers are
 * `bar`'s (team_barrier; NULL = OpenMP's).
 * phase_ns (may be NULL): the first thread adds each phase's time, barrier to barrier, to
 * phase_ns[1..3] = gate/up, activations, down (phase_ns[0], the inputs, is its caller's). */
static void swiglu_team(const char *arena, int kind, int64_t row_bytes, int64_t off13, int64_t off2, int64_t off_s13,
                        int64_t off_s2, int64_t off_m13, int64_t off_m2, const int64_t *rows, const float *w, int n,
                        int D, int Ig, int gs, const float *x, work_t b, float *y, int64_t *phase_ns,
                        spin_barrier_t *bar) {
    const int nth = omp_get_num_threads();
    const int int4 = kind >= 3, q8 = kind == 4;
    const int timed = phase_ns != NULL && omp_get_thread_num() == 0;
    int64_t t_phase = timed ? now_ns() : 0;
#define PHASE_DONE(k)                                                                                                \
    do {                                                                                                               \
        if (timed) {                                                                                                   \
            const int64_t t_now = now_ns();                                                                            \
            phase_ns[k] += t_now - t_phase;                                                                            \
            t_phase = t_now;                                                                                           \
        }                                                                                                              \
    } while (0)
    float *act = b.act, *as = b.as, *av = b.av;
    int8_t *aq = b.aq;
    /* phase 1: act[i, j] = w[i] * silu(w1_j . x) * (w3_j . x) */
#pragma omp for schedule(runtime) nowait
    for (int64_t t = 0; t < (int64_t)n * Ig; t++) {
        int i = (int)(t / Ig), j = (int)(t % Ig);
        const char *row = arena + rows[i] * row_bytes;
        float g, u;
        if (int4) {
            const uint8_t *q = (const uint8_t *)(row + off13);
            const uint16_t *s = (const uint16_t *)(row + off_s13), *m = (const uint16_t *)(row + off_m13);
            int64_t G = D / gs;
            if (q8) {
                g = dot_i4q(q + (int64_t)j * (D / 2), s + j * G, m + j * G, b.xq, b.xv, b.xs, D, gs);
                u = dot_i4q(q + (int64_t)(Ig + j) * (D / 2), s + (Ig + j) * G, m + (Ig + j) * G, b.xq, b.xv, b.xs, D,
                            gs);
            } else {
                g = dot_i4(q + (int64_t)j * (D / 2), s + j * G, m + j * G, b.xd, b.xs, D, gs);
                u = dot_i4(q + (int64_t)(Ig + j) * (D / 2), s + (Ig + j) * G, m + (Ig + j) * G, b.xd, b.xs, D, gs);
            }
        } else {
            g = dot_any(row + off13, kind, (int64_t)j * D, x, D);
            u = dot_any(row + off13, kind, (int64_t)(Ig + j) * D, x, D);
        }
        if (kind == 2) {
            const float *s13 = (const float *)(row + off_s13);
            g *= s13[j];
            u *= s13[Ig + j];
        }
        act[int4 ? (int64_t)i * Ig + deinterleaved(j, Ig) : t] = w[i] * (g / (1.f + expf(-g))) * u;
    }
    team_barrier(bar, nth);
    PHASE_DONE(1);
    /* phase 1b (int4): as[i, g] = sum of group g of unit i's act (kind 4: quantized per chunk, as x) */
    if (int4) {
        const int G = Ig / gs, gb = gs / 2;
#pragma omp for schedule(runtime) nowait
        for (int64_t t = 0; t < (int64_t)n * G; t++) {
            const int64_t i = t / G, g = t % G;
            float sum = 0.f;
            if (q8) { /* the group's chunks: 32 inputs from each half of unit i's deinterleaved act */
                for (int64_t c = g * (gs / 64); c < (g + 1) * (gs / 64); c++) {
                    const int64_t e = i * Ig + 32 * c, o = e + Ig / 2;
                    int32_t qs;
                    const float d = quant64(act + e, act + o, 1, aq + e, aq + o, &qs);
                    av[i * (Ig / 64) + c] = d;
                    sum += d * (float)qs;
                }
            } else {
                const float *a = act + i * Ig + g * gb;
                for (int k = 0; k < gb; k++) sum += a[k] + a[Ig / 2 + k];
            }
            as[t] = sum;
        }
        team_barrier(bar, nth);
        PHASE_DONE(2);
    }
    /* phase 2: y[d] = sum_i w2_i[d, :] . act[i, :], the units in order */
#pragma omp for schedule(runtime) nowait
    for (int d = 0; d < D; d++) {
        float acc = 0.f;
        for (int i = 0; i < n; i++) {
            const char *row = arena + rows[i] * row_bytes;
            float p;
            if (int4) {
                const int64_t G = Ig / gs;
                const uint8_t *q = (const uint8_t *)(row + off2) + (int64_t)d * (Ig / 2);
                const uint16_t *s = (const uint16_t *)(row + off_s2) + d * G, *m = (const uint16_t *)(row + off_m2) + d * G;
                p = q8 ? dot_i4q(q, s, m, aq + (int64_t)i * Ig, av + (int64_t)i * (Ig / 64), as + i * G, Ig, gs)
                       : dot_i4(q, s, m, act + (int64_t)i * Ig, as + i * G, Ig, gs);
            } else {
                p = dot_any(row + off2, kind, (int64_t)d * Ig, act + (int64_t)i * Ig, Ig);
                if (kind == 2) p *= ((const float *)(row + off_s2))[d];
            }
            acc += p;
        }
        y[d] = acc;
    }
    team_barrier(bar, nth);
    PHASE_DONE(3);
#undef PHASE_DONE
}

/* How the phases' loops are shared: chunk 0 = static (one contiguous stretch a thread), else dynamic
 * in chunks of `chunk` iterations, so a thread the OS or hypervisor preempts delays its chunk, not a
 * whole stretch that every other thread then waits for at the barrier. Either way each output is
 * computed by one thread in one order: results do not depend on the schedule or the thread count. */
static int loop_chunk = 0;
void swiglu_set_chunk(int chunk) { loop_chunk = chunk > 0 ? chunk : 0; }
static void apply_schedule(void) {
    if (loop_chunk) omp_set_schedule(omp_sched_dynamic, loop_chunk);
    else omp_set_schedule(omp_sched_static, 0);
}

void swiglu_rows(const char *arena, int kind, int64_t row_bytes, int64_t off13, int64_t off2, int64_t off_s13,
                 int64_t off_s2, int64_t off_m13, int64_t off_m2, const int64_t *rows, const float *w, int n,
                 int D, int Ig, int gs, const float *x, float *work, float *y, int threads) {
    apply_schedule();
    const work_t b = work_layout(kind, n, D, Ig, gs, work);
    prepare_inputs(kind, x, D, gs, b);
#pragma omp parallel num_threads(threads)
    swiglu_team(arena, kind, row_bytes, off13, off2, off_s13, off_s2, off_m13, off_m2, rows, w, n, D, Ig, gs, x, b,
                y, NULL, NULL);
}

/* ---- the CPU share of zero-copy decode (cache/cpu_share.py): one token's MoE layers, in order ----
 *
 * The GPU's decode graph publishes layer l as a record of `rec` floats in pub[l]: x [D], then per unit
 * position a = 0..A-1 the host row (as a float, exact below 2^24) and its weight (0 = not the CPU's).
 * Its last step writes gpu_flag[l] = seq (the data copies land before that write: one copy engine,
 * in stream order). This loop waits for the flag, computes the layer's CPU units into y[l] [D] and
 * releases cpu_flag[l] = seq, which a kernel of the graph polls before adding y[l] to the layer's
 * output. Waits are spins with a pause (the GPU answers within microseconds); a wait longer than
 * timeout_ns gives up and returns -1 - l, so a broken graph never hangs this thread; gpu_flag[l] = -seq
 * (the host, after a failed run) returns -1 - n_layers. wait_ns[l] and
 * busy_ns[l] get the time spent waiting for layer l and computing it; phase_ns[0..3] accumulate the
 * compute's phases over the token (the rows and inputs, then swiglu_team's). Returns CPU units computed. */

int64_t swiglu_token_loop(const int32_t *gpu_flag, int32_t *cpu_flag, int32_t seq, int n_layers,
                          const float *pub, int64_t rec, int A, float *y, const int64_t *arenas, int kind,
                          int64_t row_bytes, int64_t off13, int64_t off2, int64_t off_s13, int64_t off_s2,
                          int64_t off_m13, int64_t off_m2, int D, int Ig, int gs, float *work, int64_t *rows,
                          float *w, int threads, int64_t timeout_ns, int64_t *wait_ns, int64_t *busy_ns,
                          int64_t *phase_ns) {
    /* One parallel region for the whole token: every thread polls the GPU's flag itself, so none has
     * to be woken per layer (a fork/join, or a sleeping team's wake-up, costs more than a small
     * layer's compute). `code`: 0, or the first reason to stop, seen by all threads at a barrier. */
    int64_t computed = 0, code = 0;
    int n_units = 0;
    spin_barrier_t bar = {0, 0};
    apply_schedule();
#pragma omp parallel num_threads(threads)
    {
        const int master = omp_get_thread_num() == 0, nth = omp_get_num_threads();
        for (int l = 0; l < n_layers; l++) {
            int64_t t0 = now_ns();
            unsigned spins = 0;
            for (;;) {
                int32_t f = __atomic_load_n(&gpu_flag[l], __ATOMIC_ACQUIRE);
                if (f == seq) break;
                int64_t stop = 0;
                if (f == -seq) stop = -1 - (int64_t)n_layers; /* the host aborted the token */
                else if ((++spins & 1023) == 0 && now_ns() - t0 > timeout_ns) stop = -1 - (int64_t)l;
                if (stop) {
                    int64_t none = 0;
                    __atomic_compare_exchange_n(&code, &none, stop, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
                }
                if (__atomic_load_n(&code, __ATOMIC_ACQUIRE)) break;
                SPIN_PAUSE();
            }
            team_barrier(&bar, nth);
            /* no thread changes `code` before every thread has read it: the next place it can be set
             * is the next layer's poll, behind the barrier that ends the `single` below */
            if (__atomic_load_n(&code, __ATOMIC_ACQUIRE)) break;
            int64_t t1 = now_ns();
            const float *p = pub + (int64_t)l * rec, *x = p, *units = p + D;
            float *yl = y + (int64_t)l * D;
#pragma omp single nowait
            {
                int n = 0;
                for (int a = 0; a < A; a++) {
                    float wa = units[2 * a + 1];
                    if (wa != 0.f) {
                        rows[n] = (int64_t)units[2 * a];
                        w[n++] = wa;
                    }
                }
                if (!n) memset(yl, 0, sizeof(float) * D);
                else prepare_inputs(kind, x, D, gs, work_layout(kind, n, D, Ig, gs, work));
                n_units = n;
            }
            team_barrier(&bar, nth); /* every thread sees n_units, rows, w and the prepared inputs */
            const int n = n_units;
            if (master) phase_ns[0] += now_ns() - t1;
            if (n)
                swiglu_team((const char *)arenas[l], kind, row_bytes, off13, off2, off_s13, off_s2, off_m13, off_m2,
                            rows, w, n, D, Ig, gs, x, work_layout(kind, n, D, Ig, gs, work), yl, phase_ns,
                            &bar); /* ends with a barrier: y is complete */
            if (master) {
                computed += n;
                __atomic_store_n(&cpu_flag[l], seq, __ATOMIC_RELEASE);
                wait_ns[l] = t1 - t0;
                busy_ns[l] = now_ns() - t1;
            }
        }
    }
    return code ? code : computed;
}
