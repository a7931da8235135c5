/* The interface of moerag's native CPU kernels (native.c) to engine/native.py, which loads them
 * with ctypes: the weight format codes, the structs Python fills in, the exported functions.
 *
 * engine/native.py mirrors the structs in ctypes. When it loads the library it compares
 * moerag_abi() (the ABI version; each struct's size, each field's name, offset and size) with its
 * mirrors, and moerag_format_name() with kernels/formats.py, and refuses the library on any
 * difference, so the two sides cannot drift apart silently.
 *
 * Shapes: M rows of activations, N outputs, K inputs; T tokens, K_ experts per token, H hidden,
 * I expert width; B sequences, D head dim, S_max cache positions. Arrays are row-major.
 */
#ifndef MOERAG_NATIVE_H
#define MOERAG_NATIVE_H

#include <stdint.h>

/* Bumped, with ABI_VERSION in engine/native.py, whenever an exported function or a struct below
 * changes. */
#define MOERAG_ABI_VERSION 2

/* The weight formats: each code is Format.code in kernels/formats.py and the format's row in
 * native.c's table. */
enum {
    MOERAG_FP32 = 0, MOERAG_BF16 = 1, MOERAG_INT8 = 2, MOERAG_INT4 = 3, MOERAG_FP8 = 4,
    MOERAG_Q8_0 = 5, MOERAG_Q4_K = 6, MOERAG_Q6_K = 7, MOERAG_Q4_0 = 8, MOERAG_Q5_K = 9, /* GGUF blocks */
    MOERAG_MXFP4 = 10, /* a block type too (ggml's block_mxfp4) */
    MOERAG_INT4ZP = 11,
    MOERAG_FORMATS
};

/* What the kernels that allocate scratch memory return. After MOERAG_NO_MEMORY the outputs are
 * unspecified (moerag_blocks may have written some blocks' caches and updated x). */
enum { MOERAG_OK = 0, MOERAG_NO_MEMORY = 1 };

/* One projection (of the attention block, or a router): weight layout, shapes, pointers. */
typedef struct {
    int64_t fmt, n, k, group; /* format code, N outputs, K inputs, int4 group, fp8 or GGUF block (32 for the others) */
    const void *w, *scale;    /* the weight [N, ..] and its scales (NULL when unscaled) */
    const float *bias;        /* [N] or NULL */
} Proj;

/* One decoder block of a softmax-routed MoE model for moerag_blocks; fmt and group describe the
 * experts' w13 [E, 2I, H] (gate rows, then up rows), fmt2 and group2 their w2 [E, H, I] (GGUF's
 * Q4_K_M keeps down in another type); inter is I. */
typedef struct {
    int64_t heads, kv_heads, head_dim, experts, topk, renormalize, fmt, inter, group, fmt2, group2;
    const Proj *attn; /* q, k, v, o */
    const float *qnorm, *knorm, *in_norm, *post_norm; /* [D], [D] (or NULL), [H], [H] fp32 */
    float qk_eps, eps;
    const Proj *router; /* [E, H], fp32 or bf16 */
    const void *w13, *s13, *w2, *s2;
} BlockArgs;

/* One entry of moerag_abi(): a struct ("Proj": offset 0, its size) or one of its fields
 * ("Proj.fmt": offsetof, sizeof). */
typedef struct {
    const char *name;
    int64_t offset, size;
} AbiField;

/* 1 when built with AVX2 and FMA kernels, 0 for the portable build. */
int moerag_simd(void);

/* Threads for every loop (from torch's own count). */
void moerag_set_threads(int n);

/* *count entries: Proj, its fields in declaration order, then BlockArgs and its fields; *version
 * is MOERAG_ABI_VERSION. */
const AbiField *moerag_abi(int64_t *version, int64_t *count);

/* The name of the format with this code (kernels/formats.py's Format.name), NULL past the last. */
const char *moerag_format_name(int64_t code);

/* y [M, N] = x [M, K] @ W^T. */
int moerag_gemv(int fmt, int64_t m, int64_t n, int64_t k, int64_t group, const float *x, const void *w,
                const void *scale, float *y);

/* out [T, H] = sum over k of weights [T, K_] * expert_{ids [T, K_]}(x [T, H]); see native.c. */
int moerag_moe(int fmt, int fmt2, int64_t t, int64_t topk, int64_t hidden, int64_t inter, int64_t group,
               int64_t group2, const float *x, const int64_t *ids, const float *weights, const void *w13,
               const void *s13, const void *w2, const void *s2, float *out);

/* out [N, K] fp32 = W. */
void moerag_dequantize(int fmt, int64_t n, int64_t k, int64_t group, const void *w, const void *scale, float *out);

/* out [R, N] = x [R, N] / rms(x) * w [N]. */
void moerag_rmsnorm(int64_t rows, int64_t n, const float *x, const float *w, float eps, float *out);

/* One decode step of grouped-query attention: x [B, Hx] -> out [B, Ho]; proj = {q, k, v, o};
 * caches [B, G, S_max, D] fp32; see native.c. */
int moerag_attention(int64_t b, int64_t heads, int64_t kv_heads, int64_t d, int64_t pos, int64_t smax,
                     const float *x, const Proj *proj, const float *qnorm, const float *knorm, float eps,
                     const float *cos, const float *sin, float *kcache, float *vcache, float scale, float *out);

/* The decode step of n consecutive blocks: x [B, H] updated in place, kcache[i] and vcache[i]
 * block i's caches [B, G, S_max, D]; see native.c. */
int moerag_blocks(const BlockArgs *blocks, int64_t n, int64_t b, int64_t pos, int64_t smax, float *x,
                  const float *cos, const float *sin, float *const *kcache, float *const *vcache, float scale);

#endif
