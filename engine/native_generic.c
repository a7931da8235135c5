/* The portable kernels: plain C, no intrinsics. The portable build (a CPU without AVX2 and FMA,
 * or -DMOERAG_SCALAR) runs on these alone; the SIMD build (native_simd.c) takes the _avx2 twin
 * of each _generic function where there is one (see PICK in native.c) and the rest of these
 * (dequantization; attention's loop for head dims not a multiple of 8). Activations stay fp32
 * here, unrounded: the only preparation is int4's sums per group.
 *
 * Included by native.c, after Act and Weights; not compiled on its own.
 */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* An e4m3fn byte as fp32, exactly: its 7 magnitude bits moved into fp32's exponent and mantissa
 * fields read 2^(e-127) (1 + m/8) (0.m 2^-126 for e = 0, the subnormals), and 2^120 moves the
 * exponent bias from 127 to e4m3's 7. The NaN pattern (0x7f) reads 480: checkpoints hold none. */
static inline float fp8_to_f32(uint8_t b) {
    uint32_t u = (uint32_t)(b & 0x7f) << 20;
    float f;
    memcpy(&f, &u, 4);
    f *= 0x1p120f;
    return b & 0x80 ? -f : f;
}

/* An fp16 bit pattern as fp32, exactly, the same way: 2^112 moves the bias from 127 to 15.
 * Infinities and NaNs read as large finite numbers: GGUF scales hold none. */
static inline float f16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)(h & 0x7fff) << 13;
    float f;
    memcpy(&f, &u, 4);
    f *= 0x1p112f;
    return h & 0x8000 ? -f : f;
}

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

static inline int64_t fp8_blocks(int64_t k, int64_t block) { return (k + block - 1) / block; }

/* sum of x[i]^2 over n values */
TWIN float sum_squares_generic(const float *x, int64_t n) {
    float total = 0.f;
    for (int64_t i = 0; i < n; i++) total += x[i] * x[i];
    return total;
}

/* a[i] = silu(g[i]) * u[i] */
TWIN void silu_mul_generic(const float *g, const float *u, float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

static float dot_f32_generic(const float *w, const float *x, int64_t k) {
    float total = 0.f;
    for (int64_t i = 0; i < k; i++) total += w[i] * x[i];
    return total;
}

typedef float (*DotF32)(const float *w, const float *x, int64_t k);

/* o [D] = softmax(q k^T * scale) v for one query head over s positions of its key head's caches
 * k, v [S, D], one position at a time with the build's fp32 dot product; p [S] is scratch. */
static inline void attend_positions(const float *q, const float *k, const float *v, int64_t s, int64_t d, float scale,
                                    float *p, float *o, DotF32 dot) {
    float top = -INFINITY, total = 0.f;
    for (int64_t t = 0; t < s; t++) {
        p[t] = dot(k + t * d, q, d) * scale;
        top = fmaxf(top, p[t]);
    }
    for (int64_t t = 0; t < s; t++) total += (p[t] = expf(p[t] - top));
    for (int64_t c = 0; c < d; c++) o[c] = 0.f;
    for (int64_t t = 0; t < s; t++) {
        float w = p[t] / total;
        for (int64_t c = 0; c < d; c++) o[c] += w * v[t * d + c];
    }
}

TWIN void attend_generic(const float *q, const float *k, const float *v, int64_t s, int64_t d, float scale, float *p,
                         float *o) {
    attend_positions(q, k, v, s, d, scale, p, o, dot_f32_generic);
}

/* Row `row` of each format against fp32 activations (see the layouts in native.c). */

TWIN float fp32_dot_generic(const Weights *m, int64_t row, const Act *a) {
    return dot_f32_generic((const float *)m->w + row * m->k, a->f, m->k);
}

TWIN float bf16_dot_generic(const Weights *m, int64_t row, const Act *a) {
    const uint16_t *w = (const uint16_t *)m->w + row * m->k;
    float total = 0.f;
    for (int64_t i = 0; i < m->k; i++) total += bf16_to_f32(w[i]) * a->f[i];
    return total;
}

TWIN float int8_dot_generic(const Weights *m, int64_t row, const Act *a) {
    const int8_t *w = (const int8_t *)m->w + row * m->k;
    float total = 0.f;
    for (int64_t i = 0; i < m->k; i++) total += (float)w[i] * a->f[i];
    return total * ((const float *)m->scale)[row];
}

/* int4 activations: the sum of x over each weight group [K/G], for the zero points. */
TWIN size_t int4_act_bytes_generic(int64_t k, int64_t group) { return sizeof(float) * (size_t)(k / group); }

TWIN void int4_prepare_generic(Act *a, const float *x, int64_t k, int64_t group) {
    a->sum = (float *)a->mem;
    for (int64_t g = 0; g < k / group; g++) {
        float total = 0.f;
        for (int64_t i = 0; i < group; i++) total += x[g * group + i];
        a->sum[g] = total;
    }
}

/* w = (q - 8) s + z: sum_c s_c sum(q x) + sum_g (z_g - 8 s_g) sum_g(x). */
TWIN float int4_dot_generic(const Weights *m, int64_t row, const Act *a) {
    int64_t k = m->k, group = m->group;
    const uint8_t *q = (const uint8_t *)m->w + row * (k / 2);
    const uint16_t *sz = (const uint16_t *)m->scale + row * (k / group) * 2;
    float total = 0.f, offset = 0.f;
    for (int64_t g = 0; g < k / group; g++) {
        float s = bf16_to_f32(sz[2 * g]), z = bf16_to_f32(sz[2 * g + 1]);
        offset += (z - 8.f * s) * a->sum[g];
    }
    for (int64_t c = 0; c < k / 32; c++) {
        float s = bf16_to_f32(sz[2 * (32 * c / group)]), part = 0.f;
        for (int j = 0; j < 16; j++) {
            part += (float)(q[16 * c + j] & 15) * a->f[32 * c + j];
            part += (float)(q[16 * c + j] >> 4) * a->f[32 * c + 16 + j];
        }
        total += s * part;
    }
    return total + offset;
}

/* fp8: each block's products summed, then scaled once: sum_b s_b sum_{i in b} q_i x_i. */
TWIN float fp8_dot_generic(const Weights *m, int64_t row, const Act *a) {
    int64_t k = m->k, block = m->group, blocks = fp8_blocks(k, block);
    const uint8_t *q = (const uint8_t *)m->w + row * k;
    const float *s = (const float *)m->scale + row * blocks;
    float total = 0.f;
    for (int64_t b = 0; b < blocks; b++) {
        float part = 0.f;
        for (int64_t i = b * block; i < k && i < (b + 1) * block; i++) part += fp8_to_f32(q[i]) * a->f[i];
        total += part * s[b];
    }
    return total;
}

/* Row `row` of each format as fp32, out [K]. */

static void fp32_dequantize_generic(const Weights *m, int64_t row, float *out) {
    memcpy(out, (const float *)m->w + row * m->k, sizeof(float) * (size_t)m->k);
}

static void bf16_dequantize_generic(const Weights *m, int64_t row, float *out) {
    const uint16_t *w = (const uint16_t *)m->w + row * m->k;
    for (int64_t i = 0; i < m->k; i++) out[i] = bf16_to_f32(w[i]);
}

static void int8_dequantize_generic(const Weights *m, int64_t row, float *out) {
    const int8_t *w = (const int8_t *)m->w + row * m->k;
    float s = ((const float *)m->scale)[row];
    for (int64_t i = 0; i < m->k; i++) out[i] = (float)w[i] * s;
}

static void int4_dequantize_generic(const Weights *m, int64_t row, float *out) {
    int64_t k = m->k, group = m->group;
    const uint8_t *q = (const uint8_t *)m->w + row * (k / 2);
    const uint16_t *sz = (const uint16_t *)m->scale + row * (k / group) * 2;
    for (int64_t c = 0; c < k / 32; c++) {
        float s = bf16_to_f32(sz[2 * (32 * c / group)]), z = bf16_to_f32(sz[2 * (32 * c / group) + 1]);
        float base = z - 8.f * s;
        for (int j = 0; j < 16; j++) {
            out[32 * c + j] = (float)(q[16 * c + j] & 15) * s + base;
            out[32 * c + 16 + j] = (float)(q[16 * c + j] >> 4) * s + base;
        }
    }
}

static void fp8_dequantize_generic(const Weights *m, int64_t row, float *out) {
    int64_t k = m->k, block = m->group;
    const uint8_t *q = (const uint8_t *)m->w + row * k;
    const float *s = (const float *)m->scale + row * fp8_blocks(k, block);
    for (int64_t i = 0; i < k; i++) out[i] = fp8_to_f32(q[i]) * s[i / block];
}

/* GGUF blocks (ggml's layouts, see kernels/formats.py): one block -> fp32 out[block]. */

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

