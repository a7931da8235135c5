/* The block types: GGUF's (ggml's layouts, see kernels/formats.py) q8_0, q4_0, q4_k, q5_k, q6_k, and
 * mxfp4 (ggml's block_mxfp4, also what OCP MXFP4 checkpoints are repacked into). Their weights
 * carry their own scales inside each block, so they need no scale tensor. The portable kernels
 * come first and meet the fp32 activations as they are (exact up to summation order); their AVX2
 * twins follow when the build has them, on activations rounded to int8 per 32 inputs (see
 * blocks_prepare_avx2). Included by native.c after native_generic.c and native_simd.c, whose
 * helpers (f16_at, hsum8, absmax, round_i8, AHEAD) it uses.
 */

/* One block -> fp32 out[block], each type as kernels/formats.py writes it out. */

static void q8_0_block(const uint8_t *b, float *out) {
    float d = f16_at(b);
    for (int i = 0; i < 32; i++) out[i] = d * (float)(int8_t)b[2 + i];
}

static void q4_0_block(const uint8_t *b, float *out) {
    float d = f16_at(b);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)((b[2 + j] & 15) - 8);
        out[16 + j] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

/* mxfp4's e2m1 codes (kernels/formats.py's E2M1): sign bit, 2 exponent bits, 1 mantissa bit. */
static const float E2M1[16] = {
    0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f,
};

/* An e8m0 byte as fp32, exactly: 2^(e - 127) is the byte in fp32's exponent field, but for e = 0
 * (2^-127, a subnormal). 255 (e8m0's NaN) reads as infinity: checkpoints hold none. */
static inline float e8m0_to_f32(uint8_t e) {
    uint32_t u = e ? (uint32_t)e << 23 : 0x00400000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void mxfp4_block(const uint8_t *b, float *out) {
    float s = e8m0_to_f32(b[0]);
    for (int j = 0; j < 16; j++) {
        out[j] = E2M1[b[1 + j] & 15] * s;
        out[16 + j] = E2M1[b[1 + j] >> 4] * s;
    }
}

/* Sub-block s's 6-bit scale and min from q4_k / q5_k's 12 scale bytes. */
static inline void k_scale_min(const uint8_t *q, int s, float *scale, float *min) {
    if (s < 4) {
        *scale = (float)(q[s] & 63);
        *min = (float)(q[s + 4] & 63);
    } else {
        *scale = (float)((q[s + 4] & 15) | ((q[s - 4] >> 6) << 4));
        *min = (float)((q[s + 4] >> 4) | ((q[s] >> 6) << 4));
    }
}

/* q4_k and q5_k (qh NULL for q4_k): 4 chunks of 32 qs bytes, sub-blocks 2c (low nibbles) and
 * 2c + 1 (high), w = d sc q - dmin m with q5_k's fifth bit (bit s of qh[l]) adding 16. */
static inline void k_block(const uint8_t *b, const uint8_t *qh, const uint8_t *qs, float *out) {
    float d = f16_at(b), dmin = f16_at(b + 2);
    for (int c = 0; c < 4; c++) {
        for (int half = 0; half < 2; half++) {
            int s = 2 * c + half;
            float sc, m;
            k_scale_min(b + 4, s, &sc, &m);
            float scale = d * sc, offset = dmin * m;
            for (int l = 0; l < 32; l++) {
                int q = half ? qs[32 * c + l] >> 4 : qs[32 * c + l] & 15;
                if (qh) q += ((qh[l] >> s) & 1) << 4;
                out[32 * s + l] = scale * (float)q - offset;
            }
        }
    }
}

static void q4_k_block(const uint8_t *b, float *out) { k_block(b, NULL, b + 16, out); }

static void q5_k_block(const uint8_t *b, float *out) { k_block(b, b + 16, b + 48, out); }

static void q6_k_block(const uint8_t *b, float *out) {
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16_at(b + 208);
    for (int half = 0; half < 2; half++) {
        const uint8_t *ql = b + 64 * half, *qh = b + 128 + 32 * half;
        float *y = out + 128 * half;
        for (int l = 0; l < 32; l++) {
            int q[4] = {(ql[l] & 15) | ((qh[l] & 3) << 4), (ql[32 + l] & 15) | (((qh[l] >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4), (ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4)};
            for (int i = 0; i < 4; i++) /* one scale per 16 inputs of the block */
                y[32 * i + l] = d * (float)sc[(128 * half + 32 * i + l) / 16] * (float)(q[i] - 32);
        }
    }
}

typedef void (*BlockFn)(const uint8_t *b, float *out);

/* A GGUF row: K / block blocks of `bytes` each, the scales inside (no separate scale tensor). */
static inline const uint8_t *block_row(const Weights *m, int64_t row, int block, int bytes) {
    return (const uint8_t *)m->w + row * (m->k / block) * bytes;
}

/* One row . a: each block widened to fp32 on the stack, then its dot with the activations. */
static inline float blocks_dot(const Weights *m, int64_t row, const Act *a, int block, int bytes, BlockFn widen) {
    const uint8_t *q = block_row(m, row, block, bytes);
    float w[256], total = 0.f;
    for (int64_t b = 0; b < m->k / block; b++) {
        widen(q + b * bytes, w);
        const float *x = a->f + b * block;
        float part = 0.f;
        for (int i = 0; i < block; i++) part += w[i] * x[i];
        total += part;
    }
    return total;
}

static inline void blocks_dequantize(const Weights *m, int64_t row, float *out, int block, int bytes, BlockFn widen) {
    const uint8_t *q = block_row(m, row, block, bytes);
    for (int64_t b = 0; b < m->k / block; b++) widen(q + b * bytes, out + b * block);
}

TWIN float q8_0_dot_generic(const Weights *m, int64_t row, const Act *a) {
    return blocks_dot(m, row, a, 32, 34, q8_0_block);
}

TWIN float q4_0_dot_generic(const Weights *m, int64_t row, const Act *a) {
    return blocks_dot(m, row, a, 32, 18, q4_0_block);
}

TWIN float q4_k_dot_generic(const Weights *m, int64_t row, const Act *a) {
    return blocks_dot(m, row, a, 256, 144, q4_k_block);
}

TWIN float q5_k_dot_generic(const Weights *m, int64_t row, const Act *a) {
    return blocks_dot(m, row, a, 256, 176, q5_k_block);
}

TWIN float q6_k_dot_generic(const Weights *m, int64_t row, const Act *a) {
    return blocks_dot(m, row, a, 256, 210, q6_k_block);
}

TWIN float mxfp4_dot_generic(const Weights *m, int64_t row, const Act *a) {
    return blocks_dot(m, row, a, 32, 17, mxfp4_block);
}

static void q8_0_dequantize_generic(const Weights *m, int64_t row, float *out) {
    blocks_dequantize(m, row, out, 32, 34, q8_0_block);
}

static void q4_0_dequantize_generic(const Weights *m, int64_t row, float *out) {
    blocks_dequantize(m, row, out, 32, 18, q4_0_block);
}

static void q4_k_dequantize_generic(const Weights *m, int64_t row, float *out) {
    blocks_dequantize(m, row, out, 256, 144, q4_k_block);
}

static void q5_k_dequantize_generic(const Weights *m, int64_t row, float *out) {
    blocks_dequantize(m, row, out, 256, 176, q5_k_block);
}

static void q6_k_dequantize_generic(const Weights *m, int64_t row, float *out) {
    blocks_dequantize(m, row, out, 256, 210, q6_k_block);
}

static void mxfp4_dequantize_generic(const Weights *m, int64_t row, float *out) {
    blocks_dequantize(m, row, out, 32, 17, mxfp4_block);
}

#if MOERAG_AVX2

/* The activations every block type reads (one layout for all, so q, k and v in mixed block types
 * share one prepared input): each 32 inputs rounded to int8 with one fp32 scale xs (llama.cpp's
 * Q8_0: ~0.4 % error per element, as int4's), so the inner products run on integer SIMD and each
 * block or sub-block of 32 is scaled once. blk_scale [K/32] the scales, blk_sum16 [K/16] the sum of
 * each 16 rounded values (for the offset terms: q4_0's - 8 d sum(x), mxfp4's - 12, the K-quants'
 * mins, q6_k's - 32), then blk8 [2K]: [K] in input order, then [K] in pairs of blocks (mxfp4_rows'
 * order: blocks 2j and 2j + 1 as [2j 0-15 | 2j+1 0-15 | 2j 16-31 | 2j+1 16-31]; a last odd block
 * is left out). Offsets take the rounded sums, as int4's zero term does (native_simd.c): each block
 * then computes exactly sum(w x^), the rounding errors meeting the weights themselves. The portable
 * kernels keep x in fp32, as int4's do: they are the plain reference (tests compare models with
 * transformers on them) and run where speed matters less. */
static size_t blocks_act_bytes_avx2(int64_t k, int64_t group) {
    (void)group;
    return sizeof(float) * (size_t)(k / 32) + sizeof(int16_t) * (size_t)(k / 16) + 2 * (size_t)k;
}

static void blocks_prepare_avx2(Act *a, const float *x, int64_t k, int64_t group) {
    (void)group;
    a->blk_scale = (float *)a->mem;
    a->blk_sum16 = (int16_t *)(a->blk_scale + k / 32);
    a->blk8 = (int8_t *)(a->blk_sum16 + k / 16);
    for (int64_t c = 0; c < k / 32; c++) {
        const float *xc = x + 32 * c;
        float amax = absmax(xc, 32, NULL);
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        a->blk_scale[c] = amax / 127.f;
        a->blk_sum16[2 * c] = (int16_t)round_i8(xc, inv, a->blk8 + 32 * c);
        a->blk_sum16[2 * c + 1] = (int16_t)round_i8(xc + 16, inv, a->blk8 + 32 * c + 16);
    }
    for (int64_t c = 0; c + 1 < k / 32; c += 2) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(a->blk8 + 32 * c));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(a->blk8 + 32 * c + 32));
        __m256i *pair = (__m256i *)(a->blk8 + k + 32 * c);
        _mm256_storeu_si256(pair, _mm256_permute2x128_si256(x0, x1, 0x20));
        _mm256_storeu_si256(pair + 1, _mm256_permute2x128_si256(x0, x1, 0x31));
    }
}

/* Lanes 0..n-1 set (n <= 8), for masked loads of a last partial group of 8 blocks. */
static inline __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The activation scales of blocks c..c+7 (lanes past n zero). */
static inline __m256 act_scales(const Act *a, int64_t c, int n) {
    return n == 8 ? _mm256_loadu_ps(a->blk_scale + c) : _mm256_maskload_ps(a->blk_scale + c, lanes_below(n));
}

/* The rounded sums of blocks c..c+7 of 32 inputs, as fp32 (lanes past n zero): each int32 of
 * blk_sum16 is a block's two 16-sums. */
static inline __m256 act_sums(const Act *a, int64_t c, int n) {
    const int *at = (const int *)(a->blk_sum16 + 2 * c);
    __m256i pairs = n == 8 ? _mm256_loadu_si256((const __m256i *)at) : _mm256_maskload_epi32(at, lanes_below(n));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* The fp16 at the start of each of n <= 8 blocks `bytes` apart, as fp32 (lanes past n zero). Eight
 * scalar loads: a gather was 1.5x slower on Zen 4. */
static inline __m256 f16_heads(const uint8_t *b, int bytes, int n) {
    uint16_t h[8];
    for (int i = 0; i < 8; i++) {
        h[i] = 0;
        if (i < n) memcpy(h + i, b + i * bytes, 2);
    }
    return _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], (short)h[4], (short)h[5],
                                          (short)h[6], (short)h[7]));
}

/* The fp16 at p as fp32, with F16C's conversion (f16_at's arithmetic costs a dozen instructions). */
static inline float f16c_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* sum(q x) for 32 unsigned q <= 63 against int8 x, as 8 int32 lanes (lanes 0-3: inputs 0-15; each
 * maddubs pair sum <= 2 * 63 * 127). */
static inline __m256i dot_u8(__m256i q, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
}

static inline __m256i nibbles_low(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
static inline __m256i nibbles_high(__m256i v) {
    return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
}

/* A 32-input block's 16 bytes of nibbles as 32 bytes in input order: low nibbles (inputs 0-15),
 * then high (16-31): the 16 bytes in both halves, the upper half shifted by 4 (one variable shift
 * instead of a shift and an insert). */
static inline __m256i nibbles32(const uint8_t *qs) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return nibbles_low(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)));
}

/* One row at a time but for mxfp4 (mxfp4_rows): reading four rows per activation load, as int4_rows
 * does, measured up to 20 % slower and never faster for these kernels (one thread on weights in L2,
 * two on 256 MiB from memory): they are bound by their instructions, not by loads, and four rows
 * want more registers than there are. */

/* The blocks of 32 inputs (q8_0, q4_0): eight blocks' scales at a time, as one vector,
 * times the activations' (scale lane i = d_i xs_i); each block's integer products scaled once. */

/* A block's weights times its 32 int8 activations x, as 16 int16 sums of adjacent pairs (lanes 0-7:
 * inputs 0-15). */
typedef __m256i (*Pairs32)(const uint8_t *b, __m256i x);

/* q8_0's signed weights: maddubs takes unsigned x signed, so |w| meets x with w's sign (each sum
 * <= 2 * 127 * 127). */
static inline __m256i q8_0_pairs(const uint8_t *b, __m256i x) {
    __m256i w = _mm256_loadu_si256((const __m256i *)(b + 2));
    return _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

/* q4_0's q in 0..15, the - 8 an offset (each sum <= 2 * 15 * 127). */
static inline __m256i q4_0_pairs(const uint8_t *b, __m256i x) { return _mm256_maddubs_epi16(nibbles32(b + 2), x); }

/* Four blocks' (or sub-blocks') pair sums m[0..3] (each sum of four <= 32767) as 8 fp32 lanes
 * [b0 b1 b2 b3] (inputs 0-15) then [b0 b1 b2 b3] (16-31): two horizontal adds and one conversion
 * for four, to meet a scale vector holding the four blocks' scales in both halves. */
static inline __m256 quad_sums(const __m256i m[4]) {
    __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(m[0], m[1]), _mm256_hadd_epi16(m[2], m[3]));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(h, _mm256_set1_epi16(1)));
}

/* acc[0] + acc[1] += n <= 8 consecutive blocks (block c on, `bytes` apart) against the
 * activations, block i scaled by d_i xs_i, and *off += d_i xs_i sum(x^)_i when the type has an
 * offset. A compile-time n unrolls it. With `quads` (four blocks' pair sums fit in int16: q4_0),
 * a full group goes four blocks at a time through quad_sums, one FMA for four (measured
 * +12-16 %). Else each block is converted and scaled on its own, two accumulators for independent
 * FMA chains. */
static inline __attribute__((always_inline)) void blocks32(const uint8_t *q, int64_t c, const Act *a, int bytes,
                                                           __m256 (*heads)(const uint8_t *, int, int), int offset,
                                                           Pairs32 pairs, int quads, __m256 acc[2], __m256 *off,
                                                           const int n) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *x = a->blk8 + 32 * c;
    float scale[8] __attribute__((aligned(32))); /* broadcast from memory: a load, not a shuffle (+12 %) */
    __m256 sc = _mm256_mul_ps(heads(q + bytes * c, bytes, n), act_scales(a, c, n));
    _mm256_store_ps(scale, sc);
    if (offset) *off = _mm256_fmadd_ps(sc, act_sums(a, c, n), *off);
    if (quads && (n == 8 || n == 4)) {
        for (int g = 0; g < 2; g++) { /* blocks 4g..4g+3, their scales in both halves */
            if (g == 1 && n == 4) break;
            const uint8_t *b = q + bytes * (c + 4 * g);
            _mm_prefetch((const char *)b + AHEAD, _MM_HINT_T0); /* four blocks are 68-72 bytes: two lines */
            _mm_prefetch((const char *)b + AHEAD + 64, _MM_HINT_T0);
            __m256i m[4];
            for (int i = 0; i < 4; i++)
                m[i] = pairs(b + bytes * i, _mm256_loadu_si256((const __m256i *)(x + 32 * (4 * g + i))));
            acc[g] = _mm256_fmadd_ps(quad_sums(m), _mm256_permute2f128_ps(sc, sc, g ? 0x11 : 0x00), acc[g]);
        }
        return;
    }
    for (int i = 0; i < n; i++) {
        const uint8_t *b = q + bytes * (c + i);
        if (bytes > 32 || !(i & 1)) _mm_prefetch((const char *)b + AHEAD, _MM_HINT_T0); /* every line */
        __m256i m = pairs(b, _mm256_loadu_si256((const __m256i *)(x + 32 * i)));
        __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(m, ones));
        acc[i & 1] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(scale + i), acc[i & 1]);
    }
}

/* One row of a 32-input block type . a: sum_i d_i xs_i sum(q x^)_i (d_i from heads()), plus
 * offset * sum_i d_i xs_i sum(x^)_i (q4_0: w = d (q - 8), offset -8). */
static inline __attribute__((always_inline)) float dot32(const Weights *m, int64_t row, const Act *a, int bytes,
                                                         __m256 (*heads)(const uint8_t *, int, int), float offset,
                                                         Pairs32 pairs, int quads) {
    const uint8_t *q = block_row(m, row, 32, bytes);
    int64_t blocks = m->k / 32, c = 0;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, off = _mm256_setzero_ps();
    for (; c + 8 <= blocks; c += 8) blocks32(q, c, a, bytes, heads, offset != 0.f, pairs, quads, acc, &off, 8);
    if (c + 4 <= blocks) { /* a compile-time half group too: at K = 384 (12 blocks) the tail was half the time */
        blocks32(q, c, a, bytes, heads, offset != 0.f, pairs, quads, acc, &off, 4);
        c += 4;
    }
    if (c < blocks) blocks32(q, c, a, bytes, heads, offset != 0.f, pairs, quads, acc, &off, (int)(blocks - c));
    return hsum8(_mm256_fmadd_ps(off, _mm256_set1_ps(offset), _mm256_add_ps(acc[0], acc[1])));
}

static float q8_0_dot_avx2(const Weights *m, int64_t row, const Act *a) {
    return dot32(m, row, a, 34, f16_heads, 0.f, q8_0_pairs, 0);
}

static float q4_0_dot_avx2(const Weights *m, int64_t row, const Act *a) {
    return dot32(m, row, a, 18, f16_heads, -8.f, q4_0_pairs, 1);
}

/* mxfp4, ROWS rows at a time: twice an e2m1 value is an integer in -12..12 (ggml's idea), here read
 * plus 12 (0..24, unsigned as the integer products want their first operand) from a table by one
 * byte shuffle; the - 12 is an offset like q4_0's - 8, and a block's scale 2^(e - 128). Blocks go in
 * pairs: one 32-byte register holds two blocks' nibbles, so their low and their high nibbles are
 * one mask each and meet the activations' pair order (blocks_prepare_avx2), and the pair's products
 * are converted and scaled together. At K = 384 and 1024 (12 and 32 blocks a row) shuffles bound
 * the kernel (measured on Zen 4, weights in L2, cycles a row at K = 384 / 1024 / 4096: 50 / 96 /
 * 304 with a block a register, its nibbles broadcast and shifted apart, four blocks summed by
 * horizontal adds; 36 / 75 / 270 in pairs), and reading the rows together shares the activations'
 * loads, scales and sums among them. */

static const int8_t E2M1_2X[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0}; /* 2 e2m1 + 12 */

/* A block's 16 bytes of nibbles as its 32 weights' 2 e2m1 + 12, in input order (a last odd block). */
static inline __m256i mxfp4_codes(const uint8_t *qs) {
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_2X)), nibbles32(qs));
}

/* sum(q x) of a pair of blocks as 8 int32 lanes (0-3 the first block, 4-7 the second): lo / hi their
 * low / high nibbles' codes, x0 / x1 the activations they meet (each pair sum <= 2 * 24 * 127, the
 * two halves' sum fits int16). */
static inline __m256i pair_dot(__m256i lo, __m256i x0, __m256i hi, __m256i x1) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x0), hi, x1);
#else
    __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
    return _mm256_madd_epi16(sums, _mm256_set1_epi16(1));
#endif
}

/* xs_i 2^(e_i - 128) for the e8m0 bytes e_i at the start of n <= 8 blocks 17 bytes apart, xs the
 * activations' scales (lanes past n zero in xs). */
static inline __m256 mxfp4_scales(const uint8_t *b, __m256 xs, int n) {
#if defined(__AVX512VBMI__) && defined(__AVX512VL__)
    /* the 8 bytes picked from 128 by one byte permute, not eight scalar loads and inserts; masked
     * loads stay inside the row's last blocks */
    int len = n == 8 ? 128 : 17 * (n - 1) + 1;
    __mmask64 lo = len >= 64 ? ~0ull : (1ull << len) - 1, hi = len > 64 ? ~0ull >> (128 - len) : 0;
    const __m512i at = _mm512_castsi128_si512(_mm_setr_epi8(0, 17, 34, 51, 68, 85, 102, 119, 0, 0, 0, 0, 0, 0, 0, 0));
    __m512i bytes = _mm512_permutex2var_epi8(_mm512_maskz_loadu_epi8(lo, b), at, _mm512_maskz_loadu_epi8(hi, b + 64));
    __m256i e = _mm256_cvtepu8_epi32(_mm512_castsi512_si128(bytes));
    return _mm256_scalef_ps(xs, _mm256_cvtepi32_ps(_mm256_sub_epi32(e, _mm256_set1_epi32(128)))); /* exact */
#else
    /* e - 1 in fp32's exponent field, but for e < 2 (subnormals: 0x200000 << e); lanes past n zeroed
     * before the product, as a subnormal operand costs a microcode assist (K = 384: 1.4x the row) */
    __m256i e = _mm256_setr_epi32(b[0], n > 1 ? b[17] : 0, n > 2 ? b[34] : 0, n > 3 ? b[51] : 0, n > 4 ? b[68] : 0,
                                  n > 5 ? b[85] : 0, n > 6 ? b[102] : 0, n > 7 ? b[119] : 0);
    __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    __m256i tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
    __m256i bits = _mm256_blendv_epi8(tiny, normal, _mm256_cmpgt_epi32(e, _mm256_set1_epi32(1)));
    return _mm256_mul_ps(_mm256_and_ps(_mm256_castsi256_ps(bits), _mm256_castsi256_ps(lanes_below(n))), xs);
#endif
}

/* Blocks c..c+n-1 (c even, n <= 8; a compile-time n unrolls it) of R rows rb bytes apart: acc[r] +=
 * each block's sum(q x^) d xs, off[r] += d xs sum(x^) per block. */
static inline __attribute__((always_inline)) void mxfp4_group(const uint8_t *q, int64_t rb, int64_t k, int64_t c,
                                                              const Act *a, __m256 acc[][2], __m256 *off, const int R,
                                                              const int n) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_2X));
    __m256 xs = act_scales(a, c, n), xsum = act_sums(a, c, n), scale[ROWS];
    for (int r = 0; r < R; r++) {
        const uint8_t *b = q + r * rb + 17 * c;
        for (int at = 0; at < 17 * n; at += 64) _mm_prefetch((const char *)b + AHEAD + at, _MM_HINT_T0);
        scale[r] = mxfp4_scales(b, xs, n);
        off[r] = _mm256_fmadd_ps(scale[r], xsum, off[r]);
    }
    int i = 0;
    for (; i + 2 <= n; i += 2) {
        const int8_t *x = a->blk8 + k + 32 * (c + i);
        __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 32));
        __m256i at = _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1); /* the pair's scales */
        for (int r = 0; r < R; r++) {
            const uint8_t *b = q + r * rb + 17 * (c + i) + 1;
            __m256i w = _mm256_loadu2_m128i((const __m128i *)(b + 17), (const __m128i *)b);
#if defined(__GFNI__) /* w >> 4 per byte as one GF(2) bit-matrix map, not a shift and a mask (measured -4 %) */
            __m256i high = _mm256_gf2p8affine_epi64_epi8(w, _mm256_set1_epi64x(0x1020408000000000ll), 0);
#else
            __m256i high = nibbles_high(w);
#endif
            __m256i lo = _mm256_shuffle_epi8(table, nibbles_low(w)), hi = _mm256_shuffle_epi8(table, high);
            __m256 p = _mm256_cvtepi32_ps(pair_dot(lo, x0, hi, x1));
            acc[r][i / 2 % 2] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(scale[r], at), acc[r][i / 2 % 2]);
        }
    }
    if (i < n) { /* a row's last odd block, in input order */
        __m256i x = _mm256_loadu_si256((const __m256i *)(a->blk8 + 32 * (c + i)));
        for (int r = 0; r < R; r++) {
            __m256 p = _mm256_cvtepi32_ps(dot_u8(mxfp4_codes(q + r * rb + 17 * (c + i) + 1), x));
            acc[r][0] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(scale[r], _mm256_set1_epi32(i)), acc[r][0]);
        }
    }
}

/* out[r] = row r . a for R rows rb bytes apart, the first at q. */
static inline __attribute__((always_inline)) void mxfp4_rows(const uint8_t *q, int64_t rb, int64_t k, const Act *a,
                                                             float *out, const int R) {
    __m256 acc[ROWS][2], off[ROWS];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = off[r] = _mm256_setzero_ps();
    int64_t blocks = k / 32, c = 0;
    for (; c + 8 <= blocks; c += 8) mxfp4_group(q, rb, k, c, a, acc, off, R, 8);
    if (c + 4 <= blocks) { /* a compile-time half group too: K = 384 is 12 blocks */
        mxfp4_group(q, rb, k, c, a, acc, off, R, 4);
        c += 4;
    }
    if (c < blocks) mxfp4_group(q, rb, k, c, a, acc, off, R, (int)(blocks - c));
    for (int r = 0; r < R; r++)
        out[r] = hsum8(_mm256_fmadd_ps(off[r], _mm256_set1_ps(-12.f), _mm256_add_ps(acc[r][0], acc[r][1])));
}

static float mxfp4_dot_avx2(const Weights *m, int64_t row, const Act *a) {
    float v;
    mxfp4_rows(block_row(m, row, 32, 17), 0, m->k, a, &v, 1);
    return v;
}

/* Rows together for short rows, where AVX-512VL gives 32 vector registers (measured, weights in L2:
 * four rows 17 % faster than one at K = 384, 6 % at 1024, 8 % slower at 4096; with AVX2's 16
 * registers four rows' accumulators spill, 5-15 % slower at every K). */
static int mxfp4_together_avx2(const Weights *m) {
#if defined(__AVX512VL__)
    return m->k < 2048;
#else
    (void)m;
    return 0;
#endif
}

static void mxfp4_rows_avx2(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
    const uint8_t *q = block_row(m, row, 32, 17);
    int64_t rb = gap * (m->k / 32) * 17;
    float v[ROWS];
    switch (n) {
        case 4: mxfp4_rows(q, rb, m->k, a, v, 4); break;
        case 3: mxfp4_rows(q, rb, m->k, a, v, 3); break;
        case 2: mxfp4_rows(q, rb, m->k, a, v, 2); break;
        default: mxfp4_rows(q, rb, m->k, a, v, 1);
    }
    for (int64_t r = 0; r < n; r++) out[r * gap] = v[r];
}

/* Every cache line of a K-quant block, AHEAD bytes on: one prefetch per block (144-210 bytes) left
 * 2-3 lines of it to the hardware prefetcher, which kept Q4_K / Q6_K rows at a third of memory speed. */
static inline void prefetch_block(const uint8_t *b, int bytes) {
    for (int at = 0; at < bytes; at += 64) _mm_prefetch((const char *)b + AHEAD + at, _MM_HINT_T0);
}

/* q4_k / q5_k's 8 6-bit scales (*sc) and mins (*mn) from their 12 bytes (kernels/formats.py's
 * _k_scales), as fp32: sub-blocks 0-3 the low 6 bits of bytes 0-3 and 4-7; 4-7 a nibble of bytes
 * 8-11 with the top 2 bits of bytes 0-3 and 4-7 above it. Four sub-blocks a 32-bit word. */
static inline void k_scales_mins(const uint8_t *q, __m256 *sc, __m256 *mn) {
    uint32_t w[3];
    memcpy(w, q, 12);
    uint32_t six = 0x3f3f3f3fu, low = 0x0f0f0f0fu, two = 0x03030303u;
    uint32_t s_lo = w[0] & six, m_lo = w[1] & six;
    uint32_t s_hi = (w[2] & low) | ((w[0] >> 6) & two) << 4, m_hi = ((w[2] >> 4) & low) | ((w[1] >> 6) & two) << 4;
    __m128i v = _mm_setr_epi32((int)s_lo, (int)s_hi, (int)m_lo, (int)m_hi);
    *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
}

/* q4_k and q5_k (qh_at 0 for q4_k), as k_block: sub-blocks 2c and 2c + 1 from qs chunk c.
 * w = d sc q - dmin mn: sum d sc xs sum(q x^) per sub-block, less sum dmin mn xs sum(x^) per block.
 * Sub-blocks 0-3 and 4-7 go four at a time (quad_sums: q <= 31, so four pair sums <= 31496). */
static inline float k_dot(const Weights *m, int64_t row, const Act *a, int bytes, int qh_at, int qs_at) {
    const uint8_t *b = block_row(m, row, 256, bytes);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, off = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < m->k / 256; blk++, b += bytes) {
        prefetch_block(b, bytes);
        __m256 sc, mn, xs = act_scales(a, 8 * blk, 8);
        k_scales_mins(b + 4, &sc, &mn);
        __m256 scale = _mm256_mul_ps(_mm256_mul_ps(sc, xs), _mm256_set1_ps(f16c_at(b)));
        __m256 xsum = _mm256_mul_ps(xs, act_sums(a, 8 * blk, 8));
        off = _mm256_fmadd_ps(_mm256_mul_ps(mn, _mm256_set1_ps(f16c_at(b + 2))), xsum, off);
        __m256i qh = qh_at ? _mm256_loadu_si256((const __m256i *)(b + qh_at)) : _mm256_setzero_si256();
        const int8_t *x = a->blk8 + 256 * blk;
        __m256i pairs[8];
        for (int c = 0; c < 4; c++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(b + qs_at + 32 * c));
            for (int half = 0; half < 2; half++) {
                int s = 2 * c + half;
                __m256i w = half ? nibbles_high(v) : nibbles_low(v);
                if (qh_at) { /* the fifth bit: bit s of each qh byte moved to bit 4, as 16 */
                    __m256i h = s < 4 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - s))
                                      : _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s - 4));
                    w = _mm256_or_si256(w, _mm256_and_si256(h, _mm256_set1_epi8(16)));
                }
                pairs[s] = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)(x + 32 * s)));
            }
        }
        acc[0] = _mm256_fmadd_ps(quad_sums(pairs), _mm256_permute2f128_ps(scale, scale, 0x00), acc[0]);
        acc[1] = _mm256_fmadd_ps(quad_sums(pairs + 4), _mm256_permute2f128_ps(scale, scale, 0x11), acc[1]);
    }
    return hsum8(_mm256_add_ps(acc[0], acc[1])) - hsum8(off);
}

static float q4_k_dot_avx2(const Weights *m, int64_t row, const Act *a) { return k_dot(m, row, a, 144, 0, 16); }
static float q5_k_dot_avx2(const Weights *m, int64_t row, const Act *a) { return k_dot(m, row, a, 176, 16, 48); }

/* Bits 2j, 2j + 1 of each byte of h, moved to bits 4-5 (q6_k's high bits of its j-th quarter). */
static inline __m256i crumb(__m256i h, int j) {
    return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * j), _mm256_set1_epi8(3)), 4);
}

/* q6_k: per half, inputs l, l + 32, l + 64, l + 96 from ql[l], ql[32 + l] (low, then high
 * nibbles) with 2 bits of qh[l] each on top; w = d sc (q - 32), one sc per 16 inputs, so chunk j
 * of 32 takes sc[2j] on its int32 lanes 0-3 (inputs 0-15) and sc[2j + 1] on 4-7. The offset,
 * - 32 d sum_j xs_j (sc[2j] S[2j] + sc[2j + 1] S[2j + 1]) with S the rounded 16-sums, is one madd. */
static float q6_k_dot_avx2(const Weights *m, int64_t row, const Act *a) {
    const uint8_t *b = block_row(m, row, 256, 210);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, off = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < m->k / 256; blk++, b += 210) {
        prefetch_block(b, 210);
        __m128i sc8 = _mm_loadu_si128((const __m128i *)(b + 192));
        __m256 xd = _mm256_mul_ps(act_scales(a, 8 * blk, 8), _mm256_set1_ps(f16c_at(b + 208))); /* d xs_j */
        __m256i sums = _mm256_loadu_si256((const __m256i *)(a->blk_sum16 + 16 * blk));
        off = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8), sums)), xd, off);
        const int8_t *x = a->blk8 + 256 * blk;
        for (int half = 0; half < 2; half++) {
            /* lane l: d sc[8 half + l] xs[4 half + l / 2] */
            __m256i pairs = _mm256_add_epi32(_mm256_set1_epi32(4 * half), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
            __m256 scale = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8 * half))),
                                         _mm256_permutevar8x32_ps(xd, pairs));
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(b + 64 * half));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(b + 64 * half + 32));
            __m256i h = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * half));
            __m256i q[4] = {
                _mm256_or_si256(nibbles_low(v0), crumb(h, 0)), _mm256_or_si256(nibbles_low(v1), crumb(h, 1)),
                _mm256_or_si256(nibbles_high(v0), crumb(h, 2)), _mm256_or_si256(nibbles_high(v1), crumb(h, 3)),
            };
            for (int i = 0; i < 4; i++) {
                int j = 2 * i; /* lanes 0-3 take sc[2i], 4-7 sc[2i + 1] */
                __m256i pick = _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1);
                __m256i xi = _mm256_loadu_si256((const __m256i *)(x + 128 * half + 32 * i));
                __m256 p = _mm256_cvtepi32_ps(dot_u8(q[i], xi));
                acc[i & 1] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(scale, pick), acc[i & 1]);
            }
        }
    }
    return hsum8(_mm256_add_ps(acc[0], acc[1])) - 32.f * hsum8(off);
}

#endif
