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
#define MOERAG_ABI_VERSION 3

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

/* A Gated DeltaNet token mixer (Qwen3-Next, Qwen3.5-MoE's linear-attention layers) for one
 * decode step; see native_linear.c. Ck = 2 Hk Dk + Hv Dv channels go through the convolution. */
typedef struct {
    int64_t key_heads, value_heads, key_dim, value_dim, kernel; /* Hk, Hv, Dk, Dv, the convolution's K */
    const Proj *proj; /* in_proj_qkv [Ck, H], in_proj_z [Hv Dv, H], in_proj_b [Hv, H], in_proj_a [Hv, H], out_proj [H, Hv Dv] */
    const float *conv;            /* [Ck, K] fp32 depthwise convolution weights */
    const float *dt_bias, *a_log; /* [Hv] fp32 each */
    const float *norm;            /* [Dv] fp32 (a plain weight, not offset) */
    float eps;
} LinearArgs;

/* One decoder block for moerag_blocks: x [B, hidden] += mixer(rmsnorm(x) * in_norm); x += mlp(rmsnorm(x) * post_norm).
 *
 * The mixer is attention unless `linear` is set (then a Gated DeltaNet, and every attention field
 * but in_norm is unused). Attention: q, k, v, o in attn (biases allowed); qnorm / knorm per head
 * (or NULL), or with qk_whole over all of q's (k's) heads at once, weights [N D] ([G D]) (OLMoE,
 * MiniMax-M2); then q, k and v clipped to +-clip when clip > 0 (OLMoE); RoPE on the first `rotary`
 * dims of each head (head_dim: whole heads); qgate 1: q_proj
 * gives each head D query values then D gate values, and the head's output is multiplied by
 * sigmoid(gate); sinks [N] fp32: one more logit per head that carries no value (or NULL); the
 * block's cache holds `slots` positions, and with a sliding `window` (0: none) position p lives in
 * slot p % slots (slots <= window) and the query sees the last min(pos + 1, slots) positions.
 *
 * The MLP is routed experts (none when experts is 0: a dense block) plus an optional shared MLP.
 * Routing: router [E, H] (fp32 or bf16, its bias added to the logits if any); `routing` 0 keeps
 * the top k of the softmax (renormalized if asked: the same as a softmax over the top-k logits);
 * `routing` 1 is DeepSeek-V3's: sigmoid scores, `correction` [E] added for selection only, only
 * the `topk_group` best of `n_group` groups (ranked by their two best biased scores) compete, the
 * top k weighted by their sigmoid scores (renormalized if asked), times `scaling`. fmt and group
 * describe the experts' w13 [E, 2I, H] (gate rows, then up rows), fmt2 and group2 their w2
 * [E, H, I] (GGUF's Q4_K_M keeps down in another type); inter is I; b13 [E, 2I] and b2 [E, H] fp32
 * biases or NULL; act 0 is silu(gate) * up, act 1 gpt-oss's clamped form
 * (up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g), g = gate.clamp(max=limit). `shared`
 * (gate, up, down, then a [1, H] gate whose w may be NULL; or NULL) adds down(silu(gate(x)) * up(x))
 * for every token, times sigmoid(x . shared gate) where that is given (Qwen2-MoE, Qwen3.5). */
typedef struct {
    int64_t heads, kv_heads, head_dim, experts, topk, renormalize, fmt, inter, group, fmt2, group2;
    const Proj *attn; /* q, k, v, o */
    const float *qnorm, *knorm, *in_norm, *post_norm; /* [D], [D] (or NULL), [H], [H] fp32 */
    float qk_eps, eps;
    const Proj *router; /* [E, H], fp32 or bf16 */
    const void *w13, *s13, *w2, *s2;
    int64_t hidden, rotary, qgate, window, slots, act, routing, n_group, topk_group, qk_whole;
    float alpha, limit, scaling, clip;
    const float *sinks, *b13, *b2, *correction;
    const Proj *shared;
    const LinearArgs *linear;
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

/* *count entries: Proj, its fields in declaration order, then LinearArgs, BlockArgs and their fields; *version
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

/* One decode step of a Gated DeltaNet mixer for B sequences: x [B, H] (normed) -> out [B, H];
 * conv [B, Ck, K - 1] (the last K - 1 inputs of the convolution) and state [B, Hv, Dk, Dv] fp32
 * are updated in place; see native_linear.c. */
int moerag_linear(const LinearArgs *l, int64_t b, const float *x, float *conv, float *state, float *out);

/* The decode step of n consecutive blocks at position pos: x [B, H] updated in place; kcache[i] and
 * vcache[i] are block i's caches, [B, G, slots, D] fp32 each for attention, the conv and state of
 * moerag_linear for a Gated DeltaNet; see native.c. */
int moerag_blocks(const BlockArgs *blocks, int64_t n, int64_t b, int64_t pos, float *x,
                  const float *cos, const float *sin, float *const *kcache, float *const *vcache, float scale);

#endif
