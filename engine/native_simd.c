/* The AVX2 + FMA kernels: the _avx2 twins of native_generic.c's _generic functions, which
 * native.c's PICK chooses when the compiler targets a CPU with both (-march=native).
 *
 * Activations are prepared for the integer kernels: rounded to int16 per chunk of 32 for int8
 * weights (~0.002 % error, as exact as weight-only int8), and to int8 per weight group for int4
 * ones (as llama.cpp's Q8_0: ~0.4 % error per element, far below int4's own), so the inner
 * products run on integer SIMD. Rows are read ROWS at a time where the shapes allow
 * (*_together_avx2), one at a time otherwise. fp8 meets fp32 activations unrounded; the block
 * types (native_gguf.c) round them to int8 per 32 inputs.
 *
 * Included by native.c (when MOERAG_AVX2), after native_generic.c; not compiled on its own.
 */

#include <immintrin.h>

/* Weights are prefetched this many bytes ahead of the loads: the hardware prefetcher alone left
 * the int4 MoE step waiting on memory about a third of the time (measured: 14 -> 17-20 GB/s). */
#define AHEAD 2048

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* max |x[i]| over n values, and their sum if `sum` is given (a serial float sum is one add
 * per 4 cycles: ~1 us per 1024 values). */
static inline float absmax(const float *x, int64_t n, float *sum) {
    int64_t i = 0;
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v = _mm256_setzero_ps(), t = v;
    for (; i + 8 <= n; i += 8) {
        __m256 xi = _mm256_loadu_ps(x + i);
        v = _mm256_max_ps(v, _mm256_andnot_ps(sign, xi));
        t = _mm256_add_ps(t, xi);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))), total = hsum8(t);
    for (; i < n; i++) {
        m = fmaxf(m, fabsf(x[i]));
        total += x[i];
    }
    if (sum) *sum = total;
    return m;
}

static float sum_squares_avx2(const float *x, int64_t n) {
    int64_t i = 0;
    __m256 a = _mm256_setzero_ps(), b = a;
    for (; i + 16 <= n; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        a = _mm256_fmadd_ps(x0, x0, a);
        b = _mm256_fmadd_ps(x1, x1, b);
    }
    float total = hsum8(_mm256_add_ps(a, b));
    for (; i < n; i++) total += x[i] * x[i];
    return total;
}

/* out[0..15] = round-to-nearest-even(x[i] * inv), as int16 / int8 (|x * inv| <= 32767 / 127). */
static inline void round_i16(const float *x, float inv, int16_t *out) {
    __m256 s = _mm256_set1_ps(inv);
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), s));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), s));
    _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
}

/* As round_i16, to int8; returns the sum of the 16 rounded values. */
static inline int32_t round_i8(const float *x, float inv, int8_t *out) {
    __m256 s = _mm256_set1_ps(inv);
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), s));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), s));
    __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8); /* 16 x int16 in order */
    _mm_storeu_si128((__m128i *)out, _mm_packs_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
    __m256i ab = _mm256_add_epi32(a, b);
    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(ab), _mm256_extracti128_si256(ab, 1));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xB1)));
}

/* Activation preparation: *_act_bytes_avx2 bytes of a->mem hold the prepared row. */

/* bf16: [K] fp32, each block of 16 as its 8 even then its 8 odd elements (see bf16_dot_avx2). */
static size_t bf16_act_bytes_avx2(int64_t k, int64_t group) {
    (void)group;
    return sizeof(float) * (size_t)k;
}

static void bf16_prepare_avx2(Act *a, const float *x, int64_t k, int64_t group) {
    (void)group;
    a->even = (float *)a->mem;
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        for (int j = 0; j < 8; j++) {
            a->even[i + j] = x[i + 2 * j];
            a->even[i + 8 + j] = x[i + 2 * j + 1];
        }
    for (; i < k; i++) a->even[i] = x[i];
}

/* int8: q16 [K] int16, then qs [K/32] the scale of each chunk of 32. */
static size_t int8_act_bytes_avx2(int64_t k, int64_t group) {
    (void)group;
    return sizeof(int16_t) * (size_t)k + sizeof(float) * (size_t)(k / 32);
}

static void int8_prepare_avx2(Act *a, const float *x, int64_t k, int64_t group) {
    (void)group;
    a->q16 = (int16_t *)a->mem;
    a->qs = (float *)(a->mem + sizeof(int16_t) * (size_t)k);
    for (int64_t c = 0; c < k / 32; c++) {
        const float *xc = x + 32 * c;
        float amax = absmax(xc, 32, NULL);
        float inv = amax > 0.f ? 32767.f / amax : 0.f;
        a->qs[c] = amax / 32767.f;
        round_i16(xc, inv, a->q16 + 32 * c);
        round_i16(xc + 16, inv, a->q16 + 32 * c + 16);
    }
}

/* Position of weight j (0..31) of chunk c in the int8 activation row: chunks are paired
 * (c, c+1) into 64 bytes [c 0..15 | c+1 0..15 | c 16..31 | c+1 16..31], so one 32-byte load
 * of packed weights (low nibbles: both chunks' 0..15) meets one 32-byte load of activations.
 * A last unpaired chunk keeps its natural order. */
static inline int64_t q8_pos(int64_t c, int64_t j, int64_t chunks) {
    if ((chunks & 1) && c == chunks - 1) return 32 * c + j;
    return 64 * (c / 2) + (j / 16) * 32 + (c % 2) * 16 + (j % 16);
}

/* int4: qs [K/G] the scale of each group, sum [K/G] the sum of the rounded x over each group,
 * then q8 [K] int8 with chunk pairs interleaved (q8_pos). The zero-point term (z - 8 s) sum(x)
 * takes the rounded x, as the products do: then each group computes sum((q - 8) s + z) x^, and
 * the rounding errors meet weights centred on 0. With the exact sum they met q in 0..15 instead
 * (sum q s x^ - 8 s sum x): measured on random int4 rows, twice the output error (1.0 % vs 0.5 %). */
static size_t int4_act_bytes_avx2(int64_t k, int64_t group) {
    return (size_t)k + sizeof(float) * (size_t)(2 * (k / group));
}

static void int4_prepare_avx2(Act *a, const float *x, int64_t k, int64_t group) {
    a->qs = (float *)a->mem;
    a->sum = a->qs + k / group;
    a->q8 = (int8_t *)(a->sum + k / group);
    int64_t chunks = k / 32;
    for (int64_t g = 0; g < k / group; g++) { /* one int8 scale per weight group */
        const float *xg = x + g * group;
        float amax = absmax(xg, group, NULL);
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        a->qs[g] = amax / 127.f;
        int32_t rounded = 0; /* at most 256 * 127 */
        for (int64_t j = 0; j < group; j += 16) /* 16 consecutive values stay together */
            rounded += round_i8(xg + j, inv, a->q8 + q8_pos((g * group + j) / 32, j % 32, chunks));
        a->sum[g] = (float)rounded * a->qs[g];
    }
}

/* One row at a time (shapes the *_rows kernels below do not take), any K. */

static float dot_f32_avx2(const float *w, const float *x, int64_t k) {
    int64_t i = 0;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= k; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float tail = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; i++) tail += w[i] * x[i];
    return tail;
}

static float fp32_dot_avx2(const Weights *m, int64_t row, const Act *a) {
    return dot_f32_avx2((const float *)m->w + row * m->k, a->f, m->k);
}

/* bf16 weights: a 32-byte load holds 16 weights; shifting each 32-bit lane left by 16 gives
 * the even ones as fp32, masking off the low half gives the odd ones (no shuffles), which meet
 * the activations prepared as even/odd halves. */
static float bf16_dot_avx2(const Weights *m, int64_t row, const Act *a) {
    const uint16_t *w = (const uint16_t *)m->w + row * m->k;
    const float *x = a->even;
    int64_t i = 0, k = m->k;
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
    float tail = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; i++) tail += bf16_to_f32(w[i]) * a->f[i];
    return tail;
}

/* int8 weights meet int16 activations: 16 products per madd instead of 8 conversions. */
static float int8_dot_avx2(const Weights *m, int64_t row, const Act *a) {
    const int8_t *w = (const int8_t *)m->w + row * m->k;
    int64_t c = 0, k = m->k, chunks = k / 32;
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
    float tail = hsum8(acc);
    for (int64_t i = 32 * c; i < k; i++) tail += (float)w[i] * a->f[i];
    return tail * ((const float *)m->scale)[row];
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

/* Eight (scale, zero point) fp16 pairs, one a 32-bit lane, as fp32 s and o, exactly: the scales'
 * and the zero points' halves gathered apart, then one F16C conversion each. */
static inline void f16_pairs8(__m256i words, __m256 *s, __m256 *o) {
    const __m256i apart = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    __m256i v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(words, apart), 0xD8); /* [s0..s7 | o0..o7] */
    *s = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
    *o = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
}

/* Eight groups' scales s and offsets z - o s (w = q s + offset) from their 32-bit (scale, zero)
 * words, as int4_group reads one: int4's bf16 (s, z), o = 8 (a shift and a mask split them);
 * int4zp's fp16 (s, o), z = 0. */
static inline __attribute__((always_inline)) __m256 group_scales8(__m256i words, int zp, __m256 *offset) {
    if (zp) {
        __m256 s, o;
        f16_pairs8(words, &s, &o);
        *offset = _mm256_fnmadd_ps(o, s, _mm256_setzero_ps());
        return s;
    }
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
    __m256 z = _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32((int)0xFFFF0000u)));
    *offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s, z);
    return s;
}

/* Activations carry one int8 scale per weight group, so a group's products add up in int16
 * (<= 4 pairs = 30480 for G <= 256) and are scaled once: w = (q - o) s + z gives
 * sum_g s_g xs_g sum(q xq) + (z_g - o_g s_g) sum(x). Only group 32 comes here (larger groups go
 * ROWS rows at a time, see int4_together_avx2): one scale per chunk, lanes [c | c+1]; eight
 * groups' scales at a time as in int4_rows. `zp`: int4zp's scales (group_scales8). */
static inline __attribute__((always_inline)) float int4_dot_any(const Weights *m, int64_t row, const Act *a, int zp) {
    int64_t k = m->k, group = m->group, chunks = k / 32, groups = k / group;
    const uint8_t *q = (const uint8_t *)m->w + row * (k / 2);
    const uint16_t *sz = (const uint16_t *)m->scale + row * groups * 2;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc = _mm256_setzero_ps(), offs = _mm256_setzero_ps();
    int64_t c = 0;
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
        __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(groups - g0 < 8 ? groups - g0 : 8)), lane);
        __m256 offset, s = group_scales8(_mm256_maskload_epi32((const int *)(sz + 2 * g0), live), zp, &offset);
        __m256 xsum = _mm256_maskload_ps(a->sum + g0, live), xs = _mm256_maskload_ps(a->qs + g0, live);
        offs = _mm256_fmadd_ps(offset, xsum, offs);
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
        total += (float)(v[0] + v[1] + v[2] + v[3]) * int4_group(sz + 2 * c, zp).s * a->qs[c];
    }
    return total;
}

static float int4_dot_avx2(const Weights *m, int64_t row, const Act *a) { return int4_dot_any(m, row, a, 0); }
static float int4zp_dot_avx2(const Weights *m, int64_t row, const Act *a) { return int4_dot_any(m, row, a, 1); }

/* 8 e4m3fn bytes as fp32 / 2^120 (fp8_to_f32 without its last multiply): sign-extended to 32 bits
 * and shifted left by 20, a byte's sign lands in bit 31 and its magnitude in the exponent and
 * mantissa fields; the mask clears the sign's copies in bits 27..30. Three instructions for 8
 * weights; the 2^120 goes into the block's scale. */
static inline __m256 fp8x8(const uint8_t *q) {
    __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32((int)0x87F00000u)));
}

/* fp8 weights meet the fp32 activations as they are (no preparation); any K and block. */
static float fp8_dot_avx2(const Weights *m, int64_t row, const Act *a) {
    int64_t k = m->k, block = m->group, blocks = fp8_blocks(k, block);
    const uint8_t *q = (const uint8_t *)m->w + row * k;
    const float *s = (const float *)m->scale + row * blocks;
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.f;
    for (int64_t b = 0; b < blocks; b++) {
        int64_t i = b * block, end = i + block < k ? i + block : k;
        __m256 part = _mm256_setzero_ps();
        for (; i + 8 <= end; i += 8) part = _mm256_fmadd_ps(fp8x8(q + i), _mm256_loadu_ps(a->f + i), part);
        float rest = 0.f;
        for (; i < end; i++) rest += fp8_to_f32(q[i]) * a->f[i];
        acc = _mm256_fmadd_ps(part, _mm256_set1_ps(s[b] * 0x1p120f), acc);
        tail += rest * s[b];
    }
    return hsum8(acc) + tail;
}

/* R <= ROWS rows at once, each kernel a compile-time R (the *_rows_avx2 functions switch on the
 * count): each activation load serves all R rows, whose accumulator chains are independent. */

/* fp32 rows rs elements apart, k a multiple of 8; two chains each. */
static inline __attribute__((always_inline)) void fp32_rows(const float *w, int64_t rs, const float *x, int64_t k,
                                                            float *out, const int R) {
    __m256 acc[ROWS][2];
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

/* bf16 rows rs elements apart, k a multiple of 16, as bf16_dot_avx2 does one. */
static inline __attribute__((always_inline)) void bf16_rows(const uint16_t *w, int64_t rs, const Act *a, int64_t k,
                                                            float *out, const int R) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[ROWS][2];
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

/* int8 rows rb bytes apart, k a multiple of 32: each chunk's activations and scale are loaded
 * once for all R rows. */
static inline __attribute__((always_inline)) void int8_rows(const int8_t *w, int64_t rb, const Act *a, int64_t k,
                                                            float *out, const int R) {
    __m256 acc[ROWS];
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

/* int4 rows (groups >= 64) rb bytes and sb scale pairs apart. Eight groups at a time: their
 * (scale, zero) pairs are one 32-byte load, read into fp32 s and offsets by group_scales8 (`zp`:
 * int4zp's), and the offsets (z - o s) sum(x) start each row's sum. */
static inline __attribute__((always_inline)) void int4_rows(const uint8_t *q, int64_t rb, const uint16_t *sz, int64_t sb,
                                                            int64_t k, int64_t group, const Act *a, float *out,
                                                            const int R, const int zp) {
    int64_t groups = k / group;
    const __m256i ones = _mm256_set1_epi16(1), nib = _mm256_set1_epi8(0x0F);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[ROWS], sc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    int64_t c = 0;
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
        __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(groups - g0 < 8 ? groups - g0 : 8)), lane);
        __m256 xsum = _mm256_maskload_ps(a->sum + g0, live), xs = _mm256_maskload_ps(a->qs + g0, live);
        for (int r = 0; r < R; r++) {
            __m256 offset, s = group_scales8(_mm256_maskload_epi32((const int *)(sz + r * sb + 2 * g0), live), zp, &offset);
            acc[r] = _mm256_fmadd_ps(offset, xsum, acc[r]);
            sc[r] = _mm256_mul_ps(s, xs);
        }
        for (int64_t g = g0; g < groups && g < g0 + 8; g++) {
            __m256i t[ROWS];
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

/* fp8 rows rb bytes and sb scales apart, k and the block multiples of 8: per block, two chains a
 * row, scaled once at the block's end (with fp8x8's 2^120). */
static inline __attribute__((always_inline)) void fp8_rows(const uint8_t *q, int64_t rb, const float *s, int64_t sb,
                                                           const float *x, int64_t k, int64_t block, float *out,
                                                           const int R) {
    __m256 acc[ROWS], part[ROWS][2];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0, i = 0; i < k; b++) {
        int64_t end = i + block < k ? i + block : k;
        for (int r = 0; r < R; r++) part[r][0] = part[r][1] = _mm256_setzero_ps();
        for (; i + 16 <= end; i += 16) { /* 16 a step: a chain index that was not a constant kept the
                                          * chains in memory, each FMA waiting on a store (now +35 %) */
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            for (int r = 0; r < R; r++) {
                const uint8_t *wr = q + r * rb + i;
                if ((i & 63) < 16) _mm_prefetch((const char *)wr + AHEAD, _MM_HINT_T0);
                part[r][0] = _mm256_fmadd_ps(fp8x8(wr), x0, part[r][0]);
                part[r][1] = _mm256_fmadd_ps(fp8x8(wr + 8), x1, part[r][1]);
            }
        }
        if (i < end) { /* the block's last 8 */
            __m256 x0 = _mm256_loadu_ps(x + i);
            for (int r = 0; r < R; r++) part[r][0] = _mm256_fmadd_ps(fp8x8(q + r * rb + i), x0, part[r][0]);
            i += 8;
        }
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_add_ps(part[r][0], part[r][1]), _mm256_set1_ps(s[r * sb + b] * 0x1p120f), acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]);
}

/* Whether a weight's rows go ROWS at a time: K a whole number of the kernel's steps (8 fp32,
 * 16 bf16, 32 int8 weights); int4 and int4zp groups of 64 and more; fp8 K and block multiples of 8. */
static int fp32_together_avx2(const Weights *m) { return m->k % 8 == 0; }
static int bf16_together_avx2(const Weights *m) { return m->k % 16 == 0; }
static int int8_together_avx2(const Weights *m) { return m->k % 32 == 0; }
static int int4_together_avx2(const Weights *m) { return m->group >= 64; }
static int fp8_together_avx2(const Weights *m) { return m->k % 8 == 0 && m->group % 8 == 0; }

/* out[r * gap] = row (row + r * gap) of m . a for r < n <= ROWS, the rows together. */

static void fp32_rows_avx2(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
    const float *w = (const float *)m->w + row * m->k;
    float v[ROWS];
    switch (n) {
        case 4: fp32_rows(w, gap * m->k, a->f, m->k, v, 4); break;
        case 3: fp32_rows(w, gap * m->k, a->f, m->k, v, 3); break;
        case 2: fp32_rows(w, gap * m->k, a->f, m->k, v, 2); break;
        default: fp32_rows(w, gap * m->k, a->f, m->k, v, 1);
    }
    for (int64_t r = 0; r < n; r++) out[r * gap] = v[r];
}

static void bf16_rows_avx2(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
    const uint16_t *w = (const uint16_t *)m->w + row * m->k;
    float v[ROWS];
    switch (n) {
        case 4: bf16_rows(w, gap * m->k, a, m->k, v, 4); break;
        case 3: bf16_rows(w, gap * m->k, a, m->k, v, 3); break;
        case 2: bf16_rows(w, gap * m->k, a, m->k, v, 2); break;
        default: bf16_rows(w, gap * m->k, a, m->k, v, 1);
    }
    for (int64_t r = 0; r < n; r++) out[r * gap] = v[r];
}

static void int8_rows_avx2(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
    const int8_t *w = (const int8_t *)m->w + row * m->k;
    float v[ROWS];
    switch (n) {
        case 4: int8_rows(w, gap * m->k, a, m->k, v, 4); break;
        case 3: int8_rows(w, gap * m->k, a, m->k, v, 3); break;
        case 2: int8_rows(w, gap * m->k, a, m->k, v, 2); break;
        default: int8_rows(w, gap * m->k, a, m->k, v, 1);
    }
    for (int64_t r = 0; r < n; r++) out[r * gap] = v[r] * ((const float *)m->scale)[row + r * gap];
}

static inline __attribute__((always_inline)) void int4_rows_any(const Weights *m, int64_t row, int64_t gap, int64_t n,
                                                                const Act *a, float *out, const int zp) {
    int64_t rb = m->k / 2, sb = 2 * (m->k / m->group); /* one row's bytes, scale pairs */
    const uint8_t *q = (const uint8_t *)m->w + row * rb;
    const uint16_t *sz = (const uint16_t *)m->scale + row * sb;
    float v[ROWS];
    switch (n) {
        case 4: int4_rows(q, gap * rb, sz, gap * sb, m->k, m->group, a, v, 4, zp); break;
        case 3: int4_rows(q, gap * rb, sz, gap * sb, m->k, m->group, a, v, 3, zp); break;
        case 2: int4_rows(q, gap * rb, sz, gap * sb, m->k, m->group, a, v, 2, zp); break;
        default: int4_rows(q, gap * rb, sz, gap * sb, m->k, m->group, a, v, 1, zp);
    }
    for (int64_t r = 0; r < n; r++) out[r * gap] = v[r];
}

static void int4_rows_avx2(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
    int4_rows_any(m, row, gap, n, a, out, 0);
}

static void int4zp_rows_avx2(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
    int4_rows_any(m, row, gap, n, a, out, 1);
}

static void fp8_rows_avx2(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
    int64_t sb = fp8_blocks(m->k, m->group); /* one row's scales */
    const uint8_t *q = (const uint8_t *)m->w + row * m->k;
    const float *s = (const float *)m->scale + row * sb;
    float v[ROWS];
    switch (n) {
        case 4: fp8_rows(q, gap * m->k, s, gap * sb, a->f, m->k, m->group, v, 4); break;
        case 3: fp8_rows(q, gap * m->k, s, gap * sb, a->f, m->k, m->group, v, 3); break;
        case 2: fp8_rows(q, gap * m->k, s, gap * sb, a->f, m->k, m->group, v, 2); break;
        default: fp8_rows(q, gap * m->k, s, gap * sb, a->f, m->k, m->group, v, 1);
    }
    for (int64_t r = 0; r < n; r++) out[r * gap] = v[r];
}

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

/* a[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u; with e = e^-|g| <= 1 (exp8), silu(g) is g / (1 + e)
 * for g >= 0 and g e / (1 + e) below. */
static void silu_mul_avx2(const float *g, const float *u, float *a, int64_t n) {
    int64_t i = 0;
    const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_or_ps(x, sign)); /* e^-|x| */
        __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), x); /* sign bit set: x e */
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

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

/* attend_generic's o [D] for D a multiple of 8: scores 8 positions at a time, vector exp, then o 8
 * channels at a time (other D: one position at a time). */
static void attend_avx2(const float *q, const float *kc, const float *vc, int64_t s, int64_t d, float scale,
                        float sink, float *p, float *o) {
    if (d % 8) {
        attend_positions(q, kc, vc, s, d, scale, sink, p, o, dot_f32_avx2);
        return;
    }
    __m256 vscale = _mm256_set1_ps(scale), vtop = _mm256_set1_ps(-INFINITY);
    float top = sink, total;
    int64_t t = 0;
    for (; t + 8 <= s; t += 8) {
        __m256 v = _mm256_mul_ps(dots8(kc + t * d, q, d), vscale);
        _mm256_storeu_ps(p + t, v);
        vtop = _mm256_max_ps(vtop, v);
    }
    for (int r = 0; r < 8; r++) top = fmaxf(top, ((float *)&vtop)[r]);
    for (int64_t u = t; u < s; u++) top = fmaxf(top, p[u] = dot_f32_avx2(kc + u * d, q, d) * scale);
    __m256 sum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= s; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(top)));
        _mm256_storeu_ps(p + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    total = hsum8(sum) + expf(sink - top); /* a sink adds to the softmax's sum alone */
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
}
