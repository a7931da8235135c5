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

/* o [D] = softmax(q k^T * scale, sink) v for one query head over s positions of its key head's
 * caches k, v [S, D], one position at a time with the build's fp32 dot product; p [S] is scratch.
 * The softmax also holds `sink`, a logit that carries no value (gpt-oss; -INFINITY: none). */
static inline void attend_positions(const float *q, const float *k, const float *v, int64_t s, int64_t d, float scale,
                                    float sink, float *p, float *o, DotF32 dot) {
    float top = sink, total = 0.f;
    for (int64_t t = 0; t < s; t++) {
        p[t] = dot(k + t * d, q, d) * scale;
        top = fmaxf(top, p[t]);
    }
    for (int64_t t = 0; t < s; t++) total += (p[t] = expf(p[t] - top));
    total += expf(sink - top); /* 0 without a sink */
    for (int64_t c = 0; c < d; c++) o[c] = 0.f;
    for (int64_t t = 0; t < s; t++) {
        float w = p[t] / total;
        for (int64_t c = 0; c < d; c++) o[c] += w * v[t * d + c];
    }
}

TWIN void attend_generic(const float *q, const float *k, const float *v, int64_t s, int64_t d, float scale,
                         float sink, float *p, float *o) {
    attend_positions(q, k, v, s, d, scale, sink, p, o, dot_f32_generic);
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

/* One weight group's (scale, zero) pair as w = (q - o) s + z: int4 stores bf16 (s, z) with o = 8,
 * int4zp fp16 (s, o) with z = 0. `zp` picks the layout (a constant once inlined), so int4 and
 * int4zp share every kernel below and differ only here. */
typedef struct {
    float s, o, z;
} Group;

static inline Group int4_group(const uint16_t *sz, int zp) {
    if (zp) return (Group){f16_to_f32(sz[0]), f16_to_f32(sz[1]), 0.f};
    return (Group){bf16_to_f32(sz[0]), 8.f, bf16_to_f32(sz[1])};
}

/* w = (q - o) s + z: sum_c s_c sum(q x) + sum_g (z_g - o_g s_g) sum_g(x). */
static inline float int4_dot(const Weights *m, int64_t row, const Act *a, int zp) {
    int64_t k = m->k, group = m->group;
    const uint8_t *q = (const uint8_t *)m->w + row * (k / 2);
    const uint16_t *sz = (const uint16_t *)m->scale + row * (k / group) * 2;
    float total = 0.f, offset = 0.f;
    for (int64_t g = 0; g < k / group; g++) {
        Group p = int4_group(sz + 2 * g, zp);
        offset += (p.z - p.o * p.s) * a->sum[g];
    }
    for (int64_t c = 0; c < k / 32; c++) {
        float s = int4_group(sz + 2 * (32 * c / group), zp).s, part = 0.f;
        for (int j = 0; j < 16; j++) {
            part += (float)(q[16 * c + j] & 15) * a->f[32 * c + j];
            part += (float)(q[16 * c + j] >> 4) * a->f[32 * c + 16 + j];
        }
        total += s * part;
    }
    return total + offset;
}

TWIN float int4_dot_generic(const Weights *m, int64_t row, const Act *a) { return int4_dot(m, row, a, 0); }
TWIN float int4zp_dot_generic(const Weights *m, int64_t row, const Act *a) { return int4_dot(m, row, a, 1); }

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

/* (q - o) s + z as the reference computes it (kernels/formats.py): the same fp32 values. */
static inline void int4_dequantize(const Weights *m, int64_t row, float *out, int zp) {
    int64_t k = m->k, group = m->group;
    const uint8_t *q = (const uint8_t *)m->w + row * (k / 2);
    const uint16_t *sz = (const uint16_t *)m->scale + row * (k / group) * 2;
    for (int64_t c = 0; c < k / 32; c++) {
        Group p = int4_group(sz + 2 * (32 * c / group), zp);
        for (int j = 0; j < 16; j++) {
            out[32 * c + j] = ((float)(q[16 * c + j] & 15) - p.o) * p.s + p.z;
            out[32 * c + 16 + j] = ((float)(q[16 * c + j] >> 4) - p.o) * p.s + p.z;
        }
    }
}

static void int4_dequantize_generic(const Weights *m, int64_t row, float *out) { int4_dequantize(m, row, out, 0); }
static void int4zp_dequantize_generic(const Weights *m, int64_t row, float *out) { int4_dequantize(m, row, out, 1); }

static void fp8_dequantize_generic(const Weights *m, int64_t row, float *out) {
    int64_t k = m->k, block = m->group;
    const uint8_t *q = (const uint8_t *)m->w + row * k;
    const float *s = (const float *)m->scale + row * fp8_blocks(k, block);
    for (int64_t i = 0; i < k; i++) out[i] = fp8_to_f32(q[i]) * s[i / block];
}
