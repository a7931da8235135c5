/* moerag's CPU kernels for decode: small-M products with float, int8 and int4 weights, and the
 * whole mixture-of-experts step of a few tokens in one call.
 *
 * Why C: at decode every weight is read once per token, so the step is bound by memory
 * bandwidth, and torch spends more time dispatching ~1000 tiny ops per token (and its int4 CPU
 * kernel reads only ~5 GB/s at M = 1) than reading the weights. One call per layer keeps both
 * cores streaming weights. Built by engine/native.py with the system C compiler, loaded with
 * ctypes.
 *
 * Shapes: M rows of activations (tokens), N outputs, K inputs; T tokens, S = T*TOPK slots,
 * H hidden, I expert width. Weights are row-major [N, K], one row per output:
 *   F32  float[N][K]
 *   BF16 uint16[N][K]                       (bf16 bit patterns)
 *   I8   int8[N][K], scale float[N]          w = q * scale[n]
 *   I4   uint8[N][K/2], scale bf16[N][K/G][2] = (s, z)   w = (q - 8) * s + z
 *        Packed in chunks of 32 weights (16 bytes): byte j holds weight j in its low nibble
 *        and weight 16 + j in its high nibble. G (the group) is a multiple of 32.
 * Activations are fp32. With int4 weights they are rounded to int8 per chunk of 32 (one
 * scale each, as llama.cpp's Q8_0) so the inner product runs on integer SIMD: ~0.4 % error
 * per element, far below int4's own. The sum over the TOPK slots is fp32.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(MOERAG_SCALAR)
#include <immintrin.h>
#define MOERAG_AVX2 1
#else
#define MOERAG_AVX2 0
#endif

enum { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };

int moerag_simd(void) { return MOERAG_AVX2; }

/* parallel_for(n, body, ctx) splits [0, n) into one static slice per thread, on torch's own
 * OpenMP runtime (the same libgomp.so.1, which torch loads first): a second pool of spinning
 * threads would fight torch's for the cores (measured: 40x slower on 2 cores). */
typedef void (*Body)(void *ctx, int64_t begin, int64_t end);

static int moerag_threads = 1;

static void parallel_for(int64_t n, Body body, void *ctx) {
    if (moerag_threads == 1 || n < 2) {
        body(ctx, 0, n);
        return;
    }
#pragma omp parallel num_threads(moerag_threads)
    {
        int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
        int64_t begin = n * part / parts, end = n * (part + 1) / parts;
        if (begin < end) body(ctx, begin, end);
    }
}

/* Threads for every loop here (set from Python). */
void moerag_set_threads(int n) { moerag_threads = n < 1 ? 1 : n; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One activation row, prepared for the weight format (by act_prepare). */
typedef struct {
    const float *f; /* [K] as given */
    float *even;    /* BF16: [K] each block of 16 as its 8 even then its 8 odd elements */
    int16_t *q16;   /* I8: [K] int16, one scale per chunk of 32 */
    int8_t *q8;     /* I4: [K] int8, chunk pairs interleaved (see q8_pos), one scale per group */
    float *qs;      /* I8: [K/32] scale of each chunk; I4: [K/G] scale of each group */
    float *sum;     /* I4: [K/G] sum of f over each group */
} Act;

/* Position of weight j (0..31) of chunk c in the int8 activation row: chunks are paired
 * (c, c+1) into 64 bytes [c 0..15 | c+1 0..15 | c 16..31 | c+1 16..31], so one 32-byte load
 * of packed weights (low nibbles: both chunks' 0..15) meets one 32-byte load of activations.
 * A last unpaired chunk keeps its natural order. */
static inline int64_t q8_pos(int64_t c, int64_t j, int64_t chunks) {
    if ((chunks & 1) && c == chunks - 1) return 32 * c + j;
    return 64 * (c / 2) + (j / 16) * 32 + (c % 2) * 16 + (j % 16);
}

#if MOERAG_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* max |x[i]| over n values, and their sum if `sum` is given (a serial float sum is one add
 * per 4 cycles: ~1 us per 1024 values). */
static inline float absmax(const float *x, int64_t n, float *sum) {
    int64_t i = 0;
    float m = 0.f, total = 0.f;
#if MOERAG_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v = _mm256_setzero_ps(), t = v;
    for (; i + 8 <= n; i += 8) {
        __m256 xi = _mm256_loadu_ps(x + i);
        v = _mm256_max_ps(v, _mm256_andnot_ps(sign, xi));
        t = _mm256_add_ps(t, xi);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    total = hsum8(t);
#endif
    for (; i < n; i++) {
        m = fmaxf(m, fabsf(x[i]));
        total += x[i];
    }
    if (sum) *sum = total;
    return m;
}

/* sum of x[i]^2 over n values */
static inline float sum_squares(const float *x, int64_t n) {
    int64_t i = 0;
    float total = 0.f;
#if MOERAG_AVX2
    __m256 a = _mm256_setzero_ps(), b = a;
    for (; i + 16 <= n; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        a = _mm256_fmadd_ps(x0, x0, a);
        b = _mm256_fmadd_ps(x1, x1, b);
    }
    total = hsum8(_mm256_add_ps(a, b));
#endif
    for (; i < n; i++) total += x[i] * x[i];
    return total;
}

/* out[0..15] = round-to-nearest-even(x[i] * inv), as int16 / int8 (|x * inv| <= 32767 / 127). */
static inline void round_i16(const float *x, float inv, int16_t *out) {
#if MOERAG_AVX2
    __m256 s = _mm256_set1_ps(inv);
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), s));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), s));
    _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
#else
    for (int j = 0; j < 16; j++) out[j] = (int16_t)lrintf(x[j] * inv);
#endif
}

static inline void round_i8(const float *x, float inv, int8_t *out) {
#if MOERAG_AVX2
    __m256 s = _mm256_set1_ps(inv);
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), s));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), s));
    __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8); /* 16 x int16 in order */
    _mm_storeu_si128((__m128i *)out, _mm_packs_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
#else
    for (int j = 0; j < 16; j++) out[j] = (int8_t)lrintf(x[j] * inv);
#endif
}

static void act_prepare(Act *a, const float *x, int fmt, int64_t k, int64_t group) {
    a->f = x;
    if (fmt == BF16) {
        int64_t i = 0;
        for (; i + 16 <= k; i += 16)
            for (int j = 0; j < 8; j++) {
                a->even[i + j] = x[i + 2 * j];
                a->even[i + 8 + j] = x[i + 2 * j + 1];
            }
        for (; i < k; i++) a->even[i] = x[i];
    } else if (fmt == I8) {
        for (int64_t c = 0; c < k / 32; c++) {
            const float *xc = x + 32 * c;
            float amax = absmax(xc, 32, NULL);
            float inv = amax > 0.f ? 32767.f / amax : 0.f;
            a->qs[c] = amax / 32767.f;
            round_i16(xc, inv, a->q16 + 32 * c);
            round_i16(xc + 16, inv, a->q16 + 32 * c + 16);
        }
    } else if (fmt == I4) {
        int64_t chunks = k / 32;
        for (int64_t g = 0; g < k / group; g++) { /* one int8 scale per weight group */
            const float *xg = x + g * group;
            float sum, amax = absmax(xg, group, &sum);
            float inv = amax > 0.f ? 127.f / amax : 0.f;
            a->qs[g] = amax / 127.f;
            a->sum[g] = sum;
            for (int64_t j = 0; j < group; j += 16) /* 16 consecutive values stay together */
                round_i8(xg + j, inv, a->q8 + q8_pos((g * group + j) / 32, j % 32, chunks));
        }
    }
}

#if MOERAG_AVX2
/* Weights are prefetched this many bytes ahead of the loads: the hardware prefetcher alone left
 * the int4 MoE step waiting on memory about a third of the time (measured: 14 -> 17-20 GB/s). */
#define AHEAD 2048
#endif

static float dot_f32(const float *w, const float *x, int64_t k) {
    int64_t i = 0;
    float tail = 0.f;
#if MOERAG_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= k; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    tail = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < k; i++) tail += w[i] * x[i];
    return tail;
}

/* bf16 weights: a 32-byte load holds 16 weights; shifting each 32-bit lane left by 16 gives
 * the even ones as fp32, masking off the low half gives the odd ones (no shuffles), which meet
 * the activations prepared as even/odd halves. */
static float dot_bf16(const uint16_t *w, const Act *a, int64_t k) {
    int64_t i = 0;
    float tail = 0.f;
#if MOERAG_AVX2
    const float *x = a->even;
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= k; i += 32) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + i + 16));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, high)), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, high)), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 16 <= k; i += 16) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + i));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, high)), _mm256_loadu_ps(x + i + 8), a1);
    }
    tail = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < k; i++) tail += bf16_to_f32(w[i]) * a->f[i];
    return tail;
}

/* int8 weights meet int16 activations (one scale per chunk of 32: ~0.002 % error, so the
 * product is as exact as weight-only int8): 16 products per madd instead of 8 conversions. */
static float dot_i8(const int8_t *w, const Act *a, int64_t k) {
    int64_t c = 0, chunks = k / 32;
    float tail = 0.f;
#if MOERAG_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; c < chunks; c++) {
        const int8_t *wc = w + 32 * c;
        const int16_t *xc = a->q16 + 32 * c;
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wc));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + 16)));
        __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xc)),
                                     _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xc + 16))));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(a->qs[c]), acc);
    }
    tail = hsum8(acc);
#endif
    for (int64_t i = 32 * c; i < k; i++) tail += (float)w[i] * a->f[i];
    return tail;
}

#if MOERAG_AVX2
/* R <= 4 fp32 rows (rs elements apart; k a multiple of 8) at once, two chains each. */
static inline __attribute__((always_inline)) void dot_f32_rows(const float *w, int64_t rs, const float *x, int64_t k,
                                                                float *out, const int R) {
    __m256 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) {
        __m256 xi = _mm256_loadu_ps(x + i);
        for (int r = 0; r < R; r++) {
            const float *wr = w + r * rs + i;
            if (!(i & 15)) _mm_prefetch((const char *)wr + AHEAD, _MM_HINT_T0);
            acc[r][(i >> 3) & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(wr), xi, acc[r][(i >> 3) & 1]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));
}

/* R <= 4 bf16 rows (rs elements apart; k a multiple of 16) at once, as dot_bf16 does one. */
static inline __attribute__((always_inline)) void dot_bf16_rows(const uint16_t *w, int64_t rs, const Act *a, int64_t k,
                                                                 float *out, const int R) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        __m256 xe = _mm256_loadu_ps(a->even + i), xo = _mm256_loadu_ps(a->even + i + 8);
        for (int r = 0; r < R; r++) {
            const uint16_t *wr = w + r * rs + i;
            if (!(i & 31)) _mm_prefetch((const char *)wr + AHEAD, _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)wr);
            acc[r][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), xo, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));
}

/* R <= 4 int8 rows (rb bytes apart; k a multiple of 32) at once: each chunk's activations and
 * scale are loaded once for all R rows, whose chains are independent. */
static inline __attribute__((always_inline)) void dot_i8_rows(const int8_t *w, int64_t rb, const Act *a, int64_t k,
                                                               float *out, const int R) {
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k / 32; c++) {
        const int16_t *xc = a->q16 + 32 * c;
        __m256i x0 = _mm256_loadu_si256((const __m256i *)xc), x1 = _mm256_loadu_si256((const __m256i *)(xc + 16));
        __m256 s = _mm256_broadcast_ss(a->qs + c);
        for (int r = 0; r < R; r++) {
            const int8_t *wc = w + r * rb + 32 * c;
            _mm_prefetch((const char *)(wc + AHEAD), _MM_HINT_T0);
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wc));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + 16)));
            __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]);
}

/* Two chunks (c, c+1) of packed int4 against their int8 activations (xl: both chunks' 0..15,
 * xh: their 16..31, see q8_pos): 16 int16 sums of 4 products each ([c x8 | c+1 x8]), at most
 * 4 * 15 * 127 = 7620. */
static inline __m256i i4_mix(const uint8_t *q, __m256i xl, __m256i xh, __m256i nib) {
    __m256i b = _mm256_loadu_si256((const __m256i *)q);
    return _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(b, nib), xl),
                            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), nib), xh));
}

/* The same, loading the activations from x. */
static inline __m256i i4_pair(const uint8_t *q, const int8_t *x) {
    return i4_mix(q, _mm256_loadu_si256((const __m256i *)x), _mm256_loadu_si256((const __m256i *)(x + 32)),
                  _mm256_set1_epi8(0x0F));
}

/* R <= 4 rows at once (groups >= 64; rows rb bytes and sb scale pairs apart): each activation
 * load serves all R rows, whose chains are independent. Eight groups at a time: their (scale,
 * zero) pairs are one 32-byte load, split by a shift and a mask into fp32 s and z, and the
 * offsets (z - 8 s) sum(x) start each row's sum. */
static inline __attribute__((always_inline)) void dot_i4_rows(const uint8_t *q, int64_t rb, const uint16_t *sz,
                                                               int64_t sb, int64_t k, int64_t group, const Act *a,
                                                               float *out, const int R) {
    int64_t groups = k / group;
    const __m256i ones = _mm256_set1_epi16(1), high = _mm256_set1_epi32((int)0xFFFF0000u), nib = _mm256_set1_epi8(0x0F);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[4], sc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    int64_t c = 0;
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
        __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(groups - g0 < 8 ? groups - g0 : 8)), lane);
        __m256 xsum = _mm256_maskload_ps(a->sum + g0, live), xs = _mm256_maskload_ps(a->qs + g0, live);
        for (int r = 0; r < R; r++) {
            __m256i w = _mm256_maskload_epi32((const int *)(sz + r * sb + 2 * g0), live);
            __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            acc[r] = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.f), s, _mm256_castsi256_ps(_mm256_and_si256(w, high))), xsum, acc[r]);
            sc[r] = _mm256_mul_ps(s, xs);
        }
        for (int64_t g = g0; g < groups && g < g0 + 8; g++) {
            __m256i t[4];
            for (int r = 0; r < R; r++) t[r] = _mm256_setzero_si256();
            if (group % 128 == 0) { /* two pairs (one cache line of each row) per step */
                for (int64_t end = c + group / 32; c < end; c += 4) {
                    const int8_t *x = a->q8 + 32 * c;
                    __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 32));
                    __m256i x2 = _mm256_loadu_si256((const __m256i *)(x + 64)), x3 = _mm256_loadu_si256((const __m256i *)(x + 96));
                    for (int r = 0; r < R; r++) {
                        const uint8_t *w = q + r * rb + 16 * c;
                        _mm_prefetch((const char *)(w + AHEAD), _MM_HINT_T0);
                        t[r] = _mm256_add_epi16(t[r], _mm256_add_epi16(i4_mix(w, x0, x1, nib), i4_mix(w + 32, x2, x3, nib)));
                    }
                }
            } else { /* group 64: one pair */
                const int8_t *x = a->q8 + 32 * c;
                __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 32));
                for (int r = 0; r < R; r++) {
                    const uint8_t *w = q + r * rb + 16 * c;
                    if (!(c & 3)) _mm_prefetch((const char *)(w + AHEAD), _MM_HINT_T0);
                    t[r] = _mm256_add_epi16(t[r], i4_mix(w, x0, x1, nib));
                }
                c += 2;
            }
            __m256i at = _mm256_set1_epi32((int)(g - g0));
            for (int r = 0; r < R; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(t[r], ones)), _mm256_permutevar8x32_ps(sc[r], at), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]);
}
#endif

/* Activations carry one int8 scale per weight group, so a group's products add up in int16
 * (<= 4 pairs = 30480 for G <= 256) and are scaled once: w = (q - 8) s + z gives
 * sum_g s_g xs_g sum(q xq) + (z_g - 8 s_g) sum(x). */
static float dot_i4(const uint8_t *q, const uint16_t *sz, int64_t k, int64_t group, const Act *a) {
    int64_t chunks = k / 32, groups = k / group;
#if MOERAG_AVX2
    const __m256i ones = _mm256_set1_epi16(1), high = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    /* Only group 32 comes here (larger groups go four rows at a time, see rows_together): one
     * scale per chunk, lanes [c | c+1]; eight groups' scales at a time as in dot_i4_rows. */
    __m256 acc = _mm256_setzero_ps(), offs = _mm256_setzero_ps();
    int64_t c = 0;
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
        __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(groups - g0 < 8 ? groups - g0 : 8)), lane);
        __m256i words = _mm256_maskload_epi32((const int *)(sz + 2 * g0), live);
        __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16)), z = _mm256_castsi256_ps(_mm256_and_si256(words, high));
        __m256 xsum = _mm256_maskload_ps(a->sum + g0, live), xs = _mm256_maskload_ps(a->qs + g0, live);
        offs = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.f), s, z), xsum, offs);
        __m256 scale = _mm256_mul_ps(s, xs);
        for (; c + 1 < chunks && c + 1 < g0 + 8; c += 2) {
            __m256i at = _mm256_set_m128i(_mm_set1_epi32((int)(c + 1 - g0)), _mm_set1_epi32((int)(c - g0)));
            __m256i p = _mm256_madd_epi16(i4_pair(q + 16 * c, a->q8 + 32 * c), ones);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(scale, at), acc);
        }
    }
    float total = hsum8(_mm256_add_ps(acc, offs));
    if (c < chunks) { /* one unpaired chunk (group 32, odd chunk count), natural order */
        const __m128i nib = _mm_set1_epi8(0x0F), one = _mm_set1_epi16(1);
        __m128i b = _mm_loadu_si128((const __m128i *)(q + 16 * c));
        __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
        __m128i x0 = _mm_loadu_si128((const __m128i *)(a->q8 + 32 * c));
        __m128i x1 = _mm_loadu_si128((const __m128i *)(a->q8 + 32 * c + 16));
        __m128i p = _mm_madd_epi16(_mm_add_epi16(_mm_maddubs_epi16(lo, x0), _mm_maddubs_epi16(hi, x1)), one);
        int32_t v[4];
        _mm_storeu_si128((__m128i *)v, p);
        total += (float)(v[0] + v[1] + v[2] + v[3]) * bf16_to_f32(sz[2 * c]) * a->qs[c];
    }
    return total;
#else
    /* Portable path: float activations, the same weights. */
    float total = 0.f, offset = 0.f;
    for (int64_t g = 0; g < groups; g++) {
        float s = bf16_to_f32(sz[2 * g]), z = bf16_to_f32(sz[2 * g + 1]);
        offset += (z - 8.f * s) * a->sum[g];
    }
    for (int64_t c = 0; c < chunks; c++) {
        float s = bf16_to_f32(sz[2 * (32 * c / group)]), part = 0.f;
        for (int j = 0; j < 16; j++) {
            part += (float)(q[16 * c + j] & 15) * a->f[32 * c + j];
            part += (float)(q[16 * c + j] >> 4) * a->f[32 * c + 16 + j];
        }
        total += s * part;
    }
    return total + offset;
#endif
}

typedef struct {
    int fmt;
    int64_t k, group;
    const void *w, *scale;
} Weights;

static inline float row_dot(const Weights *m, int64_t row, const Act *a) {
    switch (m->fmt) {
        case F32: return dot_f32((const float *)m->w + row * m->k, a->f, m->k);
        case BF16: return dot_bf16((const uint16_t *)m->w + row * m->k, a, m->k);
        case I8: return dot_i8((const int8_t *)m->w + row * m->k, a, m->k) * ((const float *)m->scale)[row];
        default:
            return dot_i4((const uint8_t *)m->w + row * (m->k / 2),
                          (const uint16_t *)m->scale + row * (m->k / m->group) * 2, m->k, m->group, a);
    }
}

#define ROWS 4 /* the most rows one dot_rows call takes */

/* Whether dot_rows reads the rows of m ROWS at a time (SIMD build; int4 groups >= 64, and k a
 * whole number of the other kernels' steps: 32 int8, 16 bf16, 8 fp32 weights). */
static inline int rows_together(const Weights *m) {
    if (!MOERAG_AVX2) return 0;
    switch (m->fmt) {
        case F32: return m->k % 8 == 0;
        case BF16: return m->k % 16 == 0;
        case I8: return m->k % 32 == 0;
        default: return m->group >= 64;
    }
}

/* out[r * gap] = row (row + r * gap) of m . a for r < n <= ROWS: the rows together when
 * rows_together (dot_*_rows), else one at a time. */
static inline void dot_rows(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
#if MOERAG_AVX2
    if (m->fmt == I8 && rows_together(m)) {
        const int8_t *w = (const int8_t *)m->w + row * m->k;
        float v[ROWS];
        switch (n) {
            case 4: dot_i8_rows(w, gap * m->k, a, m->k, v, 4); break;
            case 3: dot_i8_rows(w, gap * m->k, a, m->k, v, 3); break;
            case 2: dot_i8_rows(w, gap * m->k, a, m->k, v, 2); break;
            default: dot_i8_rows(w, gap * m->k, a, m->k, v, 1);
        }
        for (int64_t r = 0; r < n; r++) out[r * gap] = v[r] * ((const float *)m->scale)[row + r * gap];
        return;
    }
    if ((m->fmt == BF16 || m->fmt == F32) && rows_together(m)) {
        float v[ROWS];
#define ROWS_OF(KERNEL, T, X)                                                     \
    switch (n) {                                                                  \
        case 4: KERNEL((const T *)m->w + row * m->k, gap * m->k, X, m->k, v, 4); break; \
        case 3: KERNEL((const T *)m->w + row * m->k, gap * m->k, X, m->k, v, 3); break; \
        case 2: KERNEL((const T *)m->w + row * m->k, gap * m->k, X, m->k, v, 2); break; \
        default: KERNEL((const T *)m->w + row * m->k, gap * m->k, X, m->k, v, 1);       \
    }
        if (m->fmt == BF16) {
            ROWS_OF(dot_bf16_rows, uint16_t, a)
        } else {
            ROWS_OF(dot_f32_rows, float, a->f)
        }
#undef ROWS_OF
        for (int64_t r = 0; r < n; r++) out[r * gap] = v[r];
        return;
    }
    if (m->fmt == I4 && rows_together(m)) {
        int64_t rb = m->k / 2, sb = 2 * (m->k / m->group);
        const uint8_t *q = (const uint8_t *)m->w + row * rb;
        const uint16_t *sz = (const uint16_t *)m->scale + row * sb;
        rb *= gap;
        sb *= gap;
        float v[ROWS];
        switch (n) {
            case 4: dot_i4_rows(q, rb, sz, sb, m->k, m->group, a, v, 4); break;
            case 3: dot_i4_rows(q, rb, sz, sb, m->k, m->group, a, v, 3); break;
            case 2: dot_i4_rows(q, rb, sz, sb, m->k, m->group, a, v, 2); break;
            default: dot_i4_rows(q, rb, sz, sb, m->k, m->group, a, v, 1);
        }
        for (int64_t r = 0; r < n; r++) out[r * gap] = v[r];
        return;
    }
#endif
    for (int64_t r = 0; r < n; r++) out[r * gap] = row_dot(m, row + r * gap, a);
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Rows [first, first + count) of matrix m in blocks for dot_rows. Read ROWS rows at a time
 * (rows_together): as ROWS sequential streams, block b holding rows first + b + {0, q, 2q, ...}
 * (q = count / ROWS), then the count % ROWS left over in one block. ROWS neighbouring rows a block
 * instead start ROWS short streams every block, which the hardware prefetcher does not follow:
 * int4 GEMV from DRAM on 2 cores, rows of 512 B, measured 16 -> 26 GB/s (mean of 8 alternations);
 * int8 rows four at a time were 10-20 % slower than one at a time that way, 20-30 % faster this
 * way. Rows read one at a time go in order (measured 5-10 % slower as four streams). */
typedef struct {
    int64_t row, gap, n;
} RowBlock;

static inline int64_t row_blocks(int64_t count) { return count / ROWS + (count % ROWS != 0); }

static inline RowBlock row_block(const Weights *m, int64_t first, int64_t count, int64_t b) {
    int64_t q = count / ROWS;
    if (!rows_together(m)) return (RowBlock){first + ROWS * b, 1, min64(ROWS, count - ROWS * b)};
    if (b < q) return (RowBlock){first + b, q, ROWS};
    return (RowBlock){first + ROWS * q, 1, count - ROWS * q};
}

/* Prepared activations for `rows` rows of width k: one block of memory, carved per format. */
typedef struct {
    Act *acts;
    char *mem;
} Acts;

static Acts acts_new(int fmt, int64_t rows, int64_t k, int64_t group) {
    size_t per = 0; /* bytes per row */
    if (fmt == BF16) per = sizeof(float) * (size_t)k;
    if (fmt == I8) per = sizeof(int16_t) * (size_t)k + sizeof(float) * (size_t)(k / 32);
    if (fmt == I4) per = (size_t)k + sizeof(float) * (size_t)(2 * (k / group));
    per = (per + 63) & ~(size_t)63;
    Acts b = {calloc((size_t)rows, sizeof(Act)), per ? malloc(per * (size_t)rows) : NULL};
    for (int64_t r = 0; r < rows && per; r++) {
        char *m = b.mem + per * (size_t)r;
        if (fmt == BF16) b.acts[r].even = (float *)m;
        if (fmt == I8) {
            b.acts[r].q16 = (int16_t *)m;
            b.acts[r].qs = (float *)(m + sizeof(int16_t) * (size_t)k);
        }
        if (fmt == I4) {
            b.acts[r].qs = (float *)m;
            b.acts[r].sum = b.acts[r].qs + k / group;
            b.acts[r].q8 = (int8_t *)(b.acts[r].sum + k / group);
        }
    }
    return b;
}

static void acts_free(Acts *b) {
    free(b->acts);
    free(b->mem);
}

typedef struct {
    const Weights *wt;
    const Acts *xa;
    int64_t m, n;
    float *y;
} GemvJob;

static void gemv_rows(void *ctx, int64_t begin, int64_t end) {
    const GemvJob *j = ctx;
    for (int64_t b = 0; b < row_blocks(end - begin); b++) {
        RowBlock r = row_block(j->wt, begin, end - begin, b);
        for (int64_t i = 0; i < j->m; i++) dot_rows(j->wt, r.row, r.gap, r.n, &j->xa->acts[i], j->y + i * j->n + r.row);
    }
}

/* y[M, N] = x[M, K] @ W^T. */
void moerag_gemv(int fmt, int64_t m, int64_t n, int64_t k, int64_t group, const float *x, const void *w,
                 const void *scale, float *y) {
    Weights wt = {fmt, k, group, w, scale};
    Acts xa = acts_new(fmt, m, k, group);
    for (int64_t i = 0; i < m; i++) act_prepare(&xa.acts[i], x + i * k, fmt, k, group);
    GemvJob job = {&wt, &xa, m, n, y};
    if (n * k * m < (1 << 14)) gemv_rows(&job, 0, n); /* too small to be worth a second thread */
    else parallel_for(n, gemv_rows, &job);
    acts_free(&xa);
}

static inline size_t weight_bytes(int fmt, int64_t n, int64_t k) {
    switch (fmt) {
        case F32: return (size_t)(n * k) * 4;
        case BF16: return (size_t)(n * k) * 2;
        case I8: return (size_t)(n * k);
        default: return (size_t)(n * k) / 2;
    }
}

static inline size_t scale_bytes(int fmt, int64_t n, int64_t k, int64_t group) {
    if (fmt == I8) return (size_t)n * 4;
    if (fmt == I4) return (size_t)(n * (k / group)) * 4;
    return 0;
}

static inline const void *offset(const void *p, size_t bytes, int64_t e) {
    return p == NULL ? NULL : (const char *)p + bytes * (size_t)e;
}

typedef struct {
    int fmt;
    int64_t topk, hidden, inter, width, group, runs;
    const int64_t *ids, *order, *starts;
    const float *weights;
    const void *w13, *s13, *w2, *s2;
    size_t b13, c13, b2, c2;
    Acts *xa, *aa;
    float *h, *act, *y, *out; /* y [S, H]: each slot's expert output, by sorted position */
} MoeJob;

/* Rows [begin, end) of the runs' expert matrices laid end to end (each `rows` long), the
 * products of every slot in the run: gate+up rows against the token (down = 0), or down rows
 * against the slot's activation (down = 1). out[p * rows + row], p the slot's sorted position. */
static void moe_rows(const MoeJob *j, int64_t begin, int64_t end, int down) {
    int64_t rows = down ? j->hidden : j->width, k = down ? j->inter : j->hidden;
    const void *w = down ? j->w2 : j->w13, *s = down ? j->s2 : j->s13;
    size_t wb = down ? j->b2 : j->b13, sb = down ? j->c2 : j->c13;
    float *out = down ? j->y : j->h;
    for (int64_t idx = begin, next; idx < end; idx = next) { /* one run's rows at a time */
        int64_t r = idx / rows, e = j->ids[j->order[j->starts[r]]];
        Weights wt = {j->fmt, k, j->group, offset(w, wb, e), offset(s, sb, e)};
        next = min64(end, (r + 1) * rows);
        for (int64_t b = 0; b < row_blocks(next - idx); b++) {
            RowBlock rb = row_block(&wt, idx - r * rows, next - idx, b);
            for (int64_t p = j->starts[r]; p < j->starts[r + 1]; p++) {
                const Act *a = down ? &j->aa->acts[p] : &j->xa->acts[j->order[p] / j->topk];
                dot_rows(&wt, rb.row, rb.gap, rb.n, a, out + p * rows + rb.row);
            }
        }
    }
}

static void moe_up(void *ctx, int64_t begin, int64_t end) { moe_rows(ctx, begin, end, 0); }

#if MOERAG_AVX2
/* exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), r = x - n ln2, with
 * Cephes' degree-6 polynomial (~1 ulp). Below -64 it returns 0: e^-64 ~ 1.6e-28 is invisible
 * next to the largest term (1), and no denormal products follow in p v. */
static inline __m256 exp8(__m256 x) {
    __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-64.f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-64.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), live);
}
#endif

/* a[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u; with e = e^-|g| <= 1 (exp8), silu(g) is g / (1 + e)
 * for g >= 0 and g e / (1 + e) below. */
static void silu_mul(const float *g, const float *u, float *a, int64_t n) {
    int64_t i = 0;
#if MOERAG_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_or_ps(x, sign)); /* e^-|x| */
        __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), x); /* sign bit set: x e */
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

static void moe_act(void *ctx, int64_t begin, int64_t end) { /* silu(gate) * up, prepared for down */
    MoeJob *j = ctx;
    for (int64_t p = begin; p < end; p++) {
        const float *h = j->h + p * j->width;
        float *a = j->act + p * j->inter;
        silu_mul(h, h + j->inter, a, j->inter);
        act_prepare(&j->aa->acts[p], a, j->fmt, j->inter, j->group);
    }
}

static void moe_down(void *ctx, int64_t begin, int64_t end) { moe_rows(ctx, begin, end, 1); }

static void moe_sum(void *ctx, int64_t begin, int64_t end) { /* out = sum of weighted slots, fp32 */
    MoeJob *j = ctx;
    int64_t slots = j->starts[j->runs];
    for (int64_t p = 0; p < slots; p++) {
        int64_t slot = j->order[p];
        float w = j->weights[slot], *o = j->out + (slot / j->topk) * j->hidden;
        const float *y = j->y + p * j->hidden;
        for (int64_t row = begin; row < end; row++) o[row] += w * y[row];
    }
}

/* out[T, H] = sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]), each expert
 * down(silu(gate(x)) * up(x)) with w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
 * Slots are grouped by expert so each selected expert's weights are read once. */
void moerag_moe(int fmt, int64_t t, int64_t topk, int64_t hidden, int64_t inter, int64_t group, const float *x,
                const int64_t *ids, const float *weights, const void *w13, const void *s13, const void *w2,
                const void *s2, float *out) {
    int64_t slots = t * topk, width = 2 * inter;
    int64_t *order = malloc(sizeof(int64_t) * (size_t)slots);        /* slots sorted by expert (stable) */
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(slots + 1)); /* run r: order[starts[r]..starts[r+1]) */
    for (int64_t i = 0; i < slots; i++) {
        int64_t j = i;
        while (j > 0 && ids[order[j - 1]] > ids[i]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    int64_t runs = 0;
    for (int64_t p = 0; p < slots; p++)
        if (p == 0 || ids[order[p]] != ids[order[p - 1]]) starts[runs++] = p;
    starts[runs] = slots;

    Acts xa = acts_new(fmt, t, hidden, group), aa = acts_new(fmt, slots, inter, group);
    for (int64_t i = 0; i < t; i++) act_prepare(&xa.acts[i], x + i * hidden, fmt, hidden, group);
    MoeJob job = {
        fmt, topk, hidden, inter, width, group, runs, ids, order, starts, weights, w13, s13, w2, s2,
        weight_bytes(fmt, width, hidden), scale_bytes(fmt, width, hidden, group),
        weight_bytes(fmt, hidden, inter), scale_bytes(fmt, hidden, inter, group), &xa, &aa,
        malloc(sizeof(float) * (size_t)(slots * width)), /* h [S, 2I] by sorted position */
        malloc(sizeof(float) * (size_t)(slots * inter)), /* act [S, I] */
        malloc(sizeof(float) * (size_t)(slots * hidden)), /* y [S, H] */
        out,
    };
    memset(out, 0, sizeof(float) * (size_t)(t * hidden));
    parallel_for(runs * width, moe_up, &job);
    parallel_for(slots, moe_act, &job);
    parallel_for(runs * hidden, moe_down, &job);
    parallel_for(hidden, moe_sum, &job);
    acts_free(&aa);
    acts_free(&xa);
    free(job.y);
    free(job.act);
    free(job.h);
    free(starts);
    free(order);
}

/* out[N, K] fp32 = the weights W, for products with many rows (prefill) done by torch. */
typedef struct {
    int fmt;
    int64_t k, group;
    const void *w, *scale;
    float *out;
} DequantJob;

static void dequantize_rows(void *ctx, int64_t begin, int64_t end) {
    const DequantJob *j = ctx;
    int fmt = j->fmt;
    int64_t k = j->k, group = j->group;
    const void *w = j->w, *scale = j->scale;
    float *out = j->out;
    for (int64_t row = begin; row < end; row++) {
        float *o = out + row * k;
        if (fmt == F32) {
            memcpy(o, (const float *)w + row * k, sizeof(float) * (size_t)k);
        } else if (fmt == BF16) {
            const uint16_t *r = (const uint16_t *)w + row * k;
            for (int64_t i = 0; i < k; i++) o[i] = bf16_to_f32(r[i]);
        } else if (fmt == I8) {
            const int8_t *r = (const int8_t *)w + row * k;
            float s = ((const float *)scale)[row];
            for (int64_t i = 0; i < k; i++) o[i] = (float)r[i] * s;
        } else {
            const uint8_t *r = (const uint8_t *)w + row * (k / 2);
            const uint16_t *sz = (const uint16_t *)scale + row * (k / group) * 2;
            for (int64_t c = 0; c < k / 32; c++) {
                float s = bf16_to_f32(sz[2 * (32 * c / group)]), z = bf16_to_f32(sz[2 * (32 * c / group) + 1]);
                float base = z - 8.f * s;
                for (int j = 0; j < 16; j++) {
                    o[32 * c + j] = (float)(r[16 * c + j] & 15) * s + base;
                    o[32 * c + 16 + j] = (float)(r[16 * c + j] >> 4) * s + base;
                }
            }
        }
    }
}

void moerag_dequantize(int fmt, int64_t n, int64_t k, int64_t group, const void *w, const void *scale, float *out) {
    DequantJob job = {fmt, k, group, w, scale, out};
    parallel_for(n, dequantize_rows, &job);
}

/* out[R, N] = x / rms(x) * w, each row over its N values (fp32 weights). */
void moerag_rmsnorm(int64_t rows, int64_t n, const float *x, const float *w, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float inv = 1.f / sqrtf(sum_squares(xr, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) out[r * n + i] = xr[i] * inv * w[i];
    }
}

/* One projection of the attention block: a weight in any format above, an optional fp32 bias. */
typedef struct {
    int64_t fmt, n, k, group;
    const void *w, *scale;
    const float *bias; /* [N] or NULL */
} Proj;

/* Rows [first, first + count) of p . a (+ bias) for each of the b activations: out + i * stride
 * holds activation i's, from row `first` on. */
static void proj_rows(const Proj *p, int64_t first, int64_t count, const Act *acts, int64_t b, float *out, int64_t stride) {
    Weights wt = {(int)p->fmt, p->k, p->group, p->w, p->scale};
    for (int64_t blk = 0; blk < row_blocks(count); blk++) {
        RowBlock r = row_block(&wt, first, count, blk);
        for (int64_t i = 0; i < b; i++) {
            float *o = out + i * stride + (r.row - first);
            dot_rows(&wt, r.row, r.gap, r.n, &acts[i], o);
            if (p->bias)
                for (int64_t t = 0; t < r.n; t++) o[t * r.gap] += p->bias[r.row + t * r.gap];
        }
    }
}

/* Per-head RMSNorm (optional, fp32 weight [D]) then the half-split rotation by (cos, sin) [D]. */
static void norm_rotate(float *v, int64_t d, const float *norm, float eps, const float *cos, const float *sin) {
    if (norm) {
        float inv = 1.f / sqrtf(sum_squares(v, d) / (float)d + eps);
        for (int64_t i = 0; i < d; i++) v[i] = v[i] * inv * norm[i];
    }
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

typedef struct {
    const Proj *pq, *pk, *pv, *po;
    int64_t b, heads, kv_heads, d, pos, smax, nq, nkv, width, s;
    const float *qnorm, *knorm, *cos, *sin;
    float eps, scale;
    float *kcache, *vcache, *qkv, *att, *probs, *out;
    Acts *xa, *oa;
} AttnJob;

static void attn_qkv(void *ctx, int64_t begin, int64_t end) { /* q, k and v rows in one loop */
    const AttnJob *j = ctx;
    for (int64_t row = begin, next; row < end; row = next) { /* one projection's rows at a time */
        const Proj *p = row < j->nq ? j->pq : row < j->nq + j->nkv ? j->pk : j->pv;
        int64_t first = row < j->nq ? 0 : row < j->nq + j->nkv ? j->nq : j->nq + j->nkv; /* p's first row */
        next = min64(end, first + p->n);
        proj_rows(p, row - first, next - row, j->xa->acts, j->b, j->qkv + row, j->width);
    }
}

static void attn_rotate(void *ctx, int64_t begin, int64_t end) { /* norm + rotate; k, v into the cache */
    const AttnJob *j = ctx;
    int64_t all = j->heads + j->kv_heads;
    for (int64_t hb = begin; hb < end; hb++) {
        int64_t i = hb / all, h = hb % all;
        float *row = j->qkv + i * j->width;
        if (h < j->heads) {
            norm_rotate(row + h * j->d, j->d, j->qnorm, j->eps, j->cos, j->sin);
            continue;
        }
        int64_t g = h - j->heads;
        float *k = row + j->nq + g * j->d, *v = row + j->nq + j->nkv + g * j->d;
        norm_rotate(k, j->d, j->knorm, j->eps, j->cos, j->sin);
        size_t at = (size_t)(((i * j->kv_heads + g) * j->smax + j->pos) * j->d);
        memcpy(j->kcache + at, k, sizeof(float) * (size_t)j->d);
        memcpy(j->vcache + at, v, sizeof(float) * (size_t)j->d);
    }
}

#if MOERAG_AVX2

/* The dot products of q [D] with 8 consecutive rows of k [8, D] (D a multiple of 8), in order. */
static inline __m256 dots8(const float *k, const float *q, int64_t d) {
    __m256 a[8];
    for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) {
        __m256 qc = _mm256_loadu_ps(q + c);
        for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(k + r * d + c), qc, a[r]);
    }
    __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3])); /* [0 1 2 3 | 0 1 2 3] halves */
    __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
#endif

static void attn_heads(void *ctx, int64_t begin, int64_t end) { /* each query head over its key head */
    const AttnJob *j = ctx;
    int64_t d = j->d, s = j->s;
    for (int64_t hb = begin; hb < end; hb++) {
        int64_t i = hb / j->heads, h = hb % j->heads, g = h / (j->heads / j->kv_heads);
        const float *q = j->qkv + i * j->width + h * d;
        const float *kc = j->kcache + (size_t)((i * j->kv_heads + g) * j->smax) * (size_t)d;
        const float *vc = j->vcache + (size_t)((i * j->kv_heads + g) * j->smax) * (size_t)d;
        float *p = j->probs + hb * s, top = -INFINITY, total = 0.f;
        float *o = j->att + i * j->nq + h * d;
        int64_t t = 0;
#if MOERAG_AVX2
        if (d % 8 == 0) { /* scores 8 positions at a time, vector exp, then o 8 channels at a time */
            __m256 scale = _mm256_set1_ps(j->scale), vtop = _mm256_set1_ps(-INFINITY);
            for (; t + 8 <= s; t += 8) {
                __m256 v = _mm256_mul_ps(dots8(kc + t * d, q, d), scale);
                _mm256_storeu_ps(p + t, v);
                vtop = _mm256_max_ps(vtop, v);
            }
            for (int r = 0; r < 8; r++) top = fmaxf(top, ((float *)&vtop)[r]);
            for (int64_t u = t; u < s; u++) top = fmaxf(top, p[u] = dot_f32(kc + u * d, q, d) * j->scale);
            __m256 sum = _mm256_setzero_ps();
            for (t = 0; t + 8 <= s; t += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(top)));
                _mm256_storeu_ps(p + t, e);
                sum = _mm256_add_ps(sum, e);
            }
            total = hsum8(sum);
            for (; t < s; t++) total += (p[t] = expf(p[t] - top));
            __m256 inv = _mm256_set1_ps(1.f / total);
            int64_t c = 0;
            for (; c + 64 <= d; c += 64) { /* 64 channels in registers: each value row read once per pass */
                __m256 acc[8];
                for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
                for (int64_t u = 0; u < s; u++) {
                    __m256 pu = _mm256_set1_ps(p[u]);
                    for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(pu, _mm256_loadu_ps(vc + u * d + c + 8 * r), acc[r]);
                }
                for (int r = 0; r < 8; r++) _mm256_storeu_ps(o + c + 8 * r, _mm256_mul_ps(acc[r], inv));
            }
            for (; c < d; c += 8) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t u = 0; u < s; u++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[u]), _mm256_loadu_ps(vc + u * d + c), acc);
                _mm256_storeu_ps(o + c, _mm256_mul_ps(acc, inv));
            }
            continue;
        }
#endif
        for (; t < s; t++) {
            p[t] = dot_f32(kc + t * d, q, d) * j->scale;
            top = fmaxf(top, p[t]);
        }
        for (t = 0; t < s; t++) total += (p[t] = expf(p[t] - top));
        for (int64_t c = 0; c < d; c++) o[c] = 0.f;
        for (t = 0; t < s; t++) {
            float w = p[t] / total;
            for (int64_t c = 0; c < d; c++) o[c] += w * vc[t * d + c];
        }
    }
}

static void attn_out(void *ctx, int64_t begin, int64_t end) {
    const AttnJob *j = ctx;
    proj_rows(j->po, begin, end - begin, j->oa->acts, j->b, j->out + begin, j->po->n);
}

/* One decode step of grouped-query attention for B sequences, each with one new token at
 * position `pos`: q, k, v = x W^T (+ bias); optional q/k RMSNorm per head; rotation; k, v into
 * the caches [B, G, S_max, D]; softmax(q k^T * scale) v over positions 0..pos; then o_proj.
 * x [B, Hx] is the normed layer input; out [B, Ho]. proj = {q, k, v, o}. */
void moerag_attention(int64_t b, int64_t heads, int64_t kv_heads, int64_t d, int64_t pos, int64_t smax,
                      const float *x, const Proj *proj, const float *qnorm, const float *knorm, float eps,
                      const float *cos, const float *sin, float *kcache, float *vcache, float scale, float *out) {
    int64_t nq = heads * d, nkv = kv_heads * d, hx = proj[0].k;
    Acts xa = acts_new((int)proj[0].fmt, b, hx, proj[0].group);
    Acts oa = acts_new((int)proj[3].fmt, b, nq, proj[3].group);
    for (int64_t i = 0; i < b; i++) act_prepare(&xa.acts[i], x + i * hx, (int)proj[0].fmt, hx, proj[0].group);
    AttnJob j = {
        &proj[0], &proj[1], &proj[2], &proj[3], b, heads, kv_heads, d, pos, smax, nq, nkv, nq + 2 * nkv, pos + 1,
        qnorm, knorm, cos, sin, eps, scale, kcache, vcache,
        malloc(sizeof(float) * (size_t)(b * (nq + 2 * nkv))), /* qkv [B, q | k | v] */
        malloc(sizeof(float) * (size_t)(b * nq)),              /* att [B, N*D] */
        malloc(sizeof(float) * (size_t)(b * heads * (pos + 1))), /* probs [B, N, S] */
        out, &xa, &oa,
    };
    parallel_for(j.width, attn_qkv, &j);
    parallel_for(b * (heads + kv_heads), attn_rotate, &j);
    parallel_for(b * heads, attn_heads, &j);
    for (int64_t i = 0; i < b; i++) act_prepare(&oa.acts[i], j.att + i * nq, (int)proj[3].fmt, nq, proj[3].group);
    parallel_for(proj[3].n, attn_out, &j);
    acts_free(&oa);
    acts_free(&xa);
    free(j.probs);
    free(j.att);
    free(j.qkv);
}

/* One decoder block of a softmax-routed MoE model (Qwen3-MoE, Mixtral) at decode, in one call:
 *   x += attention(rmsnorm(x) * w_in);  h = rmsnorm(x) * w_post;
 *   weights, ids = top-k of softmax(h router^T) (fp32; renormalized if asked);  x += moe(h).
 * x [B, H] is updated in place. The pieces are the functions above. */
typedef struct {
    int64_t heads, kv_heads, head_dim, experts, topk, renormalize, fmt, inter, group;
    const Proj *attn; /* q, k, v, o */
    const float *qnorm, *knorm, *in_norm, *post_norm;
    float qk_eps, eps;
    const Proj *router; /* [E, H], float */
    const void *w13, *s13, *w2, *s2;
} Block;

void moerag_block(const Block *k, int64_t b, int64_t pos, int64_t smax, float *x, const float *cos, const float *sin,
                  float *kcache, float *vcache, float scale) {
    int64_t hidden = k->router->k, e = k->experts, topk = k->topk;
    float *h = malloc(sizeof(float) * (size_t)(b * hidden));
    float *y = malloc(sizeof(float) * (size_t)(b * hidden));
    float *logits = malloc(sizeof(float) * (size_t)(b * e));
    float *weights = malloc(sizeof(float) * (size_t)(b * topk));
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)(b * topk));

    moerag_rmsnorm(b, hidden, x, k->in_norm, k->eps, h);
    moerag_attention(b, k->heads, k->kv_heads, k->head_dim, pos, smax, h, k->attn, k->qnorm, k->knorm, k->qk_eps, cos,
                     sin, kcache, vcache, scale, y);
    for (int64_t i = 0; i < b * hidden; i++) x[i] += y[i];
    moerag_rmsnorm(b, hidden, x, k->post_norm, k->eps, h);
    moerag_gemv((int)k->router->fmt, b, e, hidden, 32, h, k->router->w, NULL, logits);
    for (int64_t i = 0; i < b; i++) { /* softmax, then the k largest (ties: lowest id first) */
        float *l = logits + i * e, top = -INFINITY, total = 0.f, kept = 0.f;
        for (int64_t j = 0; j < e; j++) top = fmaxf(top, l[j]);
        for (int64_t j = 0; j < e; j++) total += (l[j] = expf(l[j] - top));
        for (int64_t s = 0; s < topk; s++) {
            int64_t best = 0;
            for (int64_t j = 1; j < e; j++)
                if (l[j] > l[best]) best = j;
            ids[i * topk + s] = best;
            weights[i * topk + s] = l[best] / total;
            kept += l[best] / total;
            l[best] = -1.f; /* probabilities are >= 0: never chosen again */
        }
        if (k->renormalize)
            for (int64_t s = 0; s < topk; s++) weights[i * topk + s] /= kept;
    }
    moerag_moe((int)k->fmt, b, topk, hidden, k->inter, k->group, h, ids, weights, k->w13, k->s13, k->w2, k->s2, y);
    for (int64_t i = 0; i < b * hidden; i++) x[i] += y[i];
    free(ids);
    free(weights);
    free(logits);
    free(y);
    free(h);
}

/* The decode step of n consecutive blocks (moerag_block each; x [B, H] updated in place), with
 * each block's own fp32 caches: one call per token for the whole stack. */
void moerag_blocks(const Block *blocks, int64_t n, int64_t b, int64_t pos, int64_t smax, float *x, const float *cos,
                   const float *sin, float *const *kcache, float *const *vcache, float scale) {
    for (int64_t i = 0; i < n; i++)
        moerag_block(&blocks[i], b, pos, smax, x, cos, sin, kcache[i], vcache[i], scale);
}
