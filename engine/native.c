/* moerag's CPU kernels for decode: small-M products with float, int8, int4, fp8 and block (GGUF, MXFP4)
 * weights, and the whole mixture-of-experts step of a few tokens in one call.
 *
 * Why C: at decode every weight is read once per token, so the step is bound by memory
 * bandwidth, and torch spends more time dispatching ~1000 tiny ops per token (and its int4 CPU
 * kernel reads only ~5 GB/s at M = 1) than reading the weights. One call per layer keeps both
 * cores streaming weights. Built by engine/native.py with the system C compiler, loaded with
 * ctypes.
 *
 * Files: native.h is the interface to Python (format codes, shared structs, exported functions;
 * checked when the library loads). This file is the one translation unit: it includes the
 * portable kernels (native_generic.c) and, when the CPU has AVX2 and FMA, their SIMD twins
 * (native_simd.c), then the block types' kernels, both kinds (native_gguf.c), and holds the
 * format table, the threads and the exported functions, which reach a format only through its
 * row of the table.
 *
 * Shapes: M rows of activations (tokens), N outputs, K inputs; T tokens, S = T*TOPK slots,
 * H hidden, I expert width. Weights are row-major [N, K], one row per output
 * (kernels/formats.py defines each layout):
 *   fp32  float[N][K]
 *   bf16  uint16[N][K]                       (bf16 bit patterns)
 *   int8  int8[N][K], scale float[N]          w = q * scale[n]
 *   int4  uint8[N][K/2], scale bf16[N][K/G][2] = (s, z)   w = (q - 8) * s + z
 *         Packed in chunks of 32 weights (16 bytes): byte j holds weight j in its low nibble
 *         and weight 16 + j in its high nibble. G (the group) is a multiple of 32.
 *   int4zp  as int4, scale fp16[N][K/G][2] = (s, zp)   w = (q - zp) * s   (GPTQ / AWQ checkpoints)
 *   fp8   uint8[N][K] (float8_e4m3fn bit patterns), scale float[N][ceil(K/B)]   w = q * scale[n][k / B]
 *         B (passed as the group) is any block size; a row's last block may be partial.
 *   q8_0, q4_0, q4_k, q5_k, q6_k, mxfp4   uint8[N][K / block * bytes]: GGUF blocks (ggml's layouts)
 *         with their scales inside (fp16; mxfp4's one e8m0 byte per 32); no scale tensor.
 * Activations are fp32; each format may prepare them for its kernels (the SIMD build rounds
 * them for the integer ones, see native_simd.c). The sum over the TOPK slots is fp32.
 */

#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(MOERAG_SCALAR)
#define MOERAG_AVX2 1
#else
#define MOERAG_AVX2 0
#endif

/* PICK(simd, generic): the function this build runs. A format or primitive without a SIMD twin
 * names its generic function alone. */
#if MOERAG_AVX2
#define PICK(simd, generic) simd
#else
#define PICK(simd, generic) generic
#endif

#define ROWS 4 /* the most rows a format's `rows` kernel takes at once */

typedef struct Format Format;

/* One activation row as given, and the forms of it its format's `prepare` makes (in mem). */
typedef struct {
    const float *f; /* [K] as given */
    char *mem;      /* the format's act_bytes of scratch, which the forms below point into */
    float *even;    /* bf16 (SIMD): [K] each block of 16 as its 8 even then its 8 odd elements */
    int16_t *q16;   /* int8 (SIMD): [K] int16, one scale per chunk of 32 */
    int8_t *q8;     /* int4 (SIMD): [K] int8, one scale per group */
    float *qs;      /* int8 (SIMD): [K/32] scale of each chunk; int4 (SIMD): [K/G] scale of each group */
    float *sum;     /* int4: [K/G] sum of f over each group */
    int8_t *blk8;        /* block types (SIMD): [2K] int8, one scale per 32 inputs: input order, then pairs of blocks (native_gguf.c) */
    float *blk_scale;    /* block types (SIMD): [K/32] the scale of each 32 */
    int16_t *blk_sum16;  /* block types (SIMD): [K/16] the sum of each 16 rounded values */
} Act;

/* A weight [N, K] (with its scales) in one format of the table. */
typedef struct {
    const Format *format;
    int64_t k, group;
    const void *w, *scale;
    int together; /* whether its rows go ROWS at a time (format->rows) */
} Weights;

/* A portable function whose SIMD twin replaces it in the SIMD build (so unused there). */
#define TWIN static __attribute__((unused))

#include "native_generic.c"
#if MOERAG_AVX2
#include "native_simd.c"
#endif
#include "native_gguf.c"

/* A weight format: its layout, and the kernels that read it (NULL: the format needs none).
 * Adding a format is one row of FORMATS, at its code from native.h, plus its kernels. */
struct Format {
    const char *name;           /* Format.name in kernels/formats.py */
    int block, block_bytes;     /* a weight row is K / block blocks of block_bytes bytes */
    int scale_row, scale_group; /* bytes of scales per row: scale_row + scale_group * ceil(K / G) */
    void (*dequantize)(const Weights *m, int64_t row, float *out);      /* row -> fp32 [K] */
    size_t (*act_bytes)(int64_t k, int64_t group);                      /* a prepared row's scratch */
    void (*prepare)(Act *a, const float *x, int64_t k, int64_t group); /* a's forms of x [K] */
    float (*dot)(const Weights *m, int64_t row, const Act *a);         /* one row . a */
    int (*together)(const Weights *m);                                 /* whether `rows` reads m */
    /* out[r * gap] = row (row + r * gap) . a for r < n <= ROWS, the rows read together */
    void (*rows)(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out);
};

static const Format FORMATS[MOERAG_FORMATS] = {
    [MOERAG_FP32] = {
        .name = "fp32", .block = 1, .block_bytes = 4,
        .dequantize = fp32_dequantize_generic,
        .dot = PICK(fp32_dot_avx2, fp32_dot_generic),
        .together = PICK(fp32_together_avx2, NULL), .rows = PICK(fp32_rows_avx2, NULL),
    },
    [MOERAG_BF16] = {
        .name = "bf16", .block = 1, .block_bytes = 2,
        .dequantize = bf16_dequantize_generic,
        .act_bytes = PICK(bf16_act_bytes_avx2, NULL), .prepare = PICK(bf16_prepare_avx2, NULL),
        .dot = PICK(bf16_dot_avx2, bf16_dot_generic),
        .together = PICK(bf16_together_avx2, NULL), .rows = PICK(bf16_rows_avx2, NULL),
    },
    [MOERAG_INT8] = {
        .name = "int8", .block = 1, .block_bytes = 1, .scale_row = 4,
        .dequantize = int8_dequantize_generic,
        .act_bytes = PICK(int8_act_bytes_avx2, NULL), .prepare = PICK(int8_prepare_avx2, NULL),
        .dot = PICK(int8_dot_avx2, int8_dot_generic),
        .together = PICK(int8_together_avx2, NULL), .rows = PICK(int8_rows_avx2, NULL),
    },
    [MOERAG_INT4] = {
        .name = "int4", .block = 2, .block_bytes = 1, .scale_group = 4,
        .dequantize = int4_dequantize_generic,
        .act_bytes = PICK(int4_act_bytes_avx2, int4_act_bytes_generic),
        .prepare = PICK(int4_prepare_avx2, int4_prepare_generic),
        .dot = PICK(int4_dot_avx2, int4_dot_generic),
        .together = PICK(int4_together_avx2, NULL), .rows = PICK(int4_rows_avx2, NULL),
    },
    [MOERAG_FP8] = {
        .name = "fp8", .block = 1, .block_bytes = 1, .scale_group = 4,
        .dequantize = fp8_dequantize_generic,
        .dot = PICK(fp8_dot_avx2, fp8_dot_generic),
        .together = PICK(fp8_together_avx2, NULL), .rows = PICK(fp8_rows_avx2, NULL),
    },
    [MOERAG_Q8_0] = {
        .name = "q8_0", .block = 32, .block_bytes = 34,
        .dequantize = q8_0_dequantize_generic,
        .act_bytes = PICK(blocks_act_bytes_avx2, NULL), .prepare = PICK(blocks_prepare_avx2, NULL),
        .dot = PICK(q8_0_dot_avx2, q8_0_dot_generic),
    },
    [MOERAG_Q4_K] = {
        .name = "q4_k", .block = 256, .block_bytes = 144,
        .dequantize = q4_k_dequantize_generic,
        .act_bytes = PICK(blocks_act_bytes_avx2, NULL), .prepare = PICK(blocks_prepare_avx2, NULL),
        .dot = PICK(q4_k_dot_avx2, q4_k_dot_generic),
    },
    [MOERAG_Q6_K] = {
        .name = "q6_k", .block = 256, .block_bytes = 210,
        .dequantize = q6_k_dequantize_generic,
        .act_bytes = PICK(blocks_act_bytes_avx2, NULL), .prepare = PICK(blocks_prepare_avx2, NULL),
        .dot = PICK(q6_k_dot_avx2, q6_k_dot_generic),
    },
    [MOERAG_Q4_0] = {
        .name = "q4_0", .block = 32, .block_bytes = 18,
        .dequantize = q4_0_dequantize_generic,
        .act_bytes = PICK(blocks_act_bytes_avx2, NULL), .prepare = PICK(blocks_prepare_avx2, NULL),
        .dot = PICK(q4_0_dot_avx2, q4_0_dot_generic),
    },
    [MOERAG_Q5_K] = {
        .name = "q5_k", .block = 256, .block_bytes = 176,
        .dequantize = q5_k_dequantize_generic,
        .act_bytes = PICK(blocks_act_bytes_avx2, NULL), .prepare = PICK(blocks_prepare_avx2, NULL),
        .dot = PICK(q5_k_dot_avx2, q5_k_dot_generic),
    },
    [MOERAG_MXFP4] = {
        .name = "mxfp4", .block = 32, .block_bytes = 17,
        .dequantize = mxfp4_dequantize_generic,
        .act_bytes = PICK(blocks_act_bytes_avx2, NULL), .prepare = PICK(blocks_prepare_avx2, NULL),
        .dot = PICK(mxfp4_dot_avx2, mxfp4_dot_generic),
        .together = PICK(mxfp4_together_avx2, NULL), .rows = PICK(mxfp4_rows_avx2, NULL),
    },
    [MOERAG_INT4ZP] = { /* int4's kernels, reading fp16 (scale, zero point) pairs (int4_group) */
        .name = "int4zp", .block = 2, .block_bytes = 1, .scale_group = 4,
        .dequantize = int4zp_dequantize_generic,
        .act_bytes = PICK(int4_act_bytes_avx2, int4_act_bytes_generic),
        .prepare = PICK(int4_prepare_avx2, int4_prepare_generic),
        .dot = PICK(int4zp_dot_avx2, int4zp_dot_generic),
        .together = PICK(int4_together_avx2, NULL), .rows = PICK(int4zp_rows_avx2, NULL),
    },
};

/* The build's vector primitives. */
#define sum_squares PICK(sum_squares_avx2, sum_squares_generic)
#define silu_mul PICK(silu_mul_avx2, silu_mul_generic)
#define attend PICK(attend_avx2, attend_generic)

int moerag_simd(void) { return MOERAG_AVX2; }

const char *moerag_format_name(int64_t code) {
    return code >= 0 && code < MOERAG_FORMATS ? FORMATS[code].name : NULL;
}

#define STRUCT(T) {#T, 0, sizeof(T)}
#define FIELD(T, f) {#T "." #f, offsetof(T, f), sizeof(((T *)0)->f)}

static const AbiField ABI[] = {
    STRUCT(Proj), FIELD(Proj, fmt), FIELD(Proj, n), FIELD(Proj, k), FIELD(Proj, group), FIELD(Proj, w),
    FIELD(Proj, scale), FIELD(Proj, bias),
    STRUCT(LinearArgs), FIELD(LinearArgs, key_heads), FIELD(LinearArgs, value_heads), FIELD(LinearArgs, key_dim),
    FIELD(LinearArgs, value_dim), FIELD(LinearArgs, kernel), FIELD(LinearArgs, proj), FIELD(LinearArgs, conv),
    FIELD(LinearArgs, dt_bias), FIELD(LinearArgs, a_log), FIELD(LinearArgs, norm), FIELD(LinearArgs, eps),
    STRUCT(BlockArgs), FIELD(BlockArgs, heads), FIELD(BlockArgs, kv_heads), FIELD(BlockArgs, head_dim),
    FIELD(BlockArgs, experts), FIELD(BlockArgs, topk), FIELD(BlockArgs, renormalize), FIELD(BlockArgs, fmt),
    FIELD(BlockArgs, inter), FIELD(BlockArgs, group), FIELD(BlockArgs, fmt2), FIELD(BlockArgs, group2),
    FIELD(BlockArgs, attn), FIELD(BlockArgs, qnorm),
    FIELD(BlockArgs, knorm), FIELD(BlockArgs, in_norm), FIELD(BlockArgs, post_norm), FIELD(BlockArgs, qk_eps),
    FIELD(BlockArgs, eps), FIELD(BlockArgs, router), FIELD(BlockArgs, w13), FIELD(BlockArgs, s13),
    FIELD(BlockArgs, w2), FIELD(BlockArgs, s2), FIELD(BlockArgs, hidden), FIELD(BlockArgs, rotary), FIELD(BlockArgs, qgate),
    FIELD(BlockArgs, window), FIELD(BlockArgs, slots), FIELD(BlockArgs, act), FIELD(BlockArgs, routing),
    FIELD(BlockArgs, n_group), FIELD(BlockArgs, topk_group), FIELD(BlockArgs, qk_whole), FIELD(BlockArgs, alpha),
    FIELD(BlockArgs, limit), FIELD(BlockArgs, scaling), FIELD(BlockArgs, clip), FIELD(BlockArgs, sinks), FIELD(BlockArgs, b13), FIELD(BlockArgs, b2),
    FIELD(BlockArgs, correction), FIELD(BlockArgs, shared), FIELD(BlockArgs, linear),
};

const AbiField *moerag_abi(int64_t *version, int64_t *count) {
    *version = MOERAG_ABI_VERSION;
    *count = (int64_t)(sizeof ABI / sizeof ABI[0]);
    return ABI;
}

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

void moerag_set_threads(int n) { moerag_threads = n < 1 ? 1 : n; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* malloc whose NULL always means out of memory (0 bytes get a block too). */
static void *allocate(size_t bytes) { return malloc(bytes ? bytes : 1); }

static Weights as_weights(const Format *f, int64_t k, int64_t group, const void *w, const void *scale) {
    Weights m = {f, k, group, w, scale, 0};
    m.together = m.format->together != NULL && m.format->together(&m);
    return m;
}

/* Bytes of an [N, K] weight, and of its scales: the stride between experts. */
static inline size_t weight_bytes(const Format *f, int64_t n, int64_t k) {
    return (size_t)n * (size_t)(k / f->block) * (size_t)f->block_bytes;
}

static inline size_t scale_bytes(const Format *f, int64_t n, int64_t k, int64_t group) {
    return (size_t)n * (size_t)(f->scale_row + f->scale_group * ((k + group - 1) / group));
}

/* out[r * gap] = row (row + r * gap) of m . a for r < n <= ROWS: the rows together when
 * m.together, else one at a time. */
static inline void dot_rows(const Weights *m, int64_t row, int64_t gap, int64_t n, const Act *a, float *out) {
    if (m->together) {
        m->format->rows(m, row, gap, n, a, out);
        return;
    }
    for (int64_t r = 0; r < n; r++) out[r * gap] = m->format->dot(m, row + r * gap, a);
}

/* Rows [first, first + count) of matrix m in blocks for dot_rows. Read ROWS rows at a time
 * (m.together): as ROWS sequential streams, block b holding rows first + b + {0, q, 2q, ...}
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
    if (!m->together) return (RowBlock){first + ROWS * b, 1, min64(ROWS, count - ROWS * b)};
    if (b < q) return (RowBlock){first + b, q, ROWS};
    return (RowBlock){first + ROWS * q, 1, count - ROWS * q};
}

/* Prepared activation rows, their scratch in one block. */
typedef struct {
    Act *acts;
    char *mem;
} Acts;

/* Room for `rows` rows of width k: the format's act_bytes per row (rounded up to 64). Returns 0
 * when out of memory; acts_free either way (a zeroed Acts frees too). */
static int acts_new(Acts *b, const Format *f, int64_t rows, int64_t k, int64_t group) {
    size_t per = f->act_bytes ? (f->act_bytes(k, group) + 63) & ~(size_t)63 : 0; /* bytes per row */
    b->acts = allocate(sizeof(Act) * (size_t)rows);
    b->mem = per ? allocate(per * (size_t)rows) : NULL;
    if (!b->acts || (per && !b->mem)) return 0;
    for (int64_t r = 0; r < rows; r++) b->acts[r].mem = per ? b->mem + per * (size_t)r : NULL;
    return 1;
}

static void acts_free(Acts *b) {
    free(b->acts);
    free(b->mem);
}

static inline void prepare(const Format *f, Act *a, const float *x, int64_t k, int64_t group) {
    a->f = x;
    if (f->prepare) f->prepare(a, x, k, group);
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
int moerag_gemv(int fmt, int64_t m, int64_t n, int64_t k, int64_t group, const float *x, const void *w,
                const void *scale, float *y) {
    Weights wt = as_weights(&FORMATS[fmt], k, group, w, scale);
    Acts xa = {0};
    int ok = acts_new(&xa, wt.format, m, k, group);
    if (ok) {
        for (int64_t i = 0; i < m; i++) prepare(wt.format, &xa.acts[i], x + i * k, k, group);
        GemvJob job = {&wt, &xa, m, n, y};
        if (n * k * m < (1 << 14)) gemv_rows(&job, 0, n); /* too small to be worth a second thread */
        else parallel_for(n, gemv_rows, &job);
    }
    acts_free(&xa);
    return ok ? MOERAG_OK : MOERAG_NO_MEMORY;
}

static inline const void *offset(const void *p, size_t bytes, int64_t e) {
    return p == NULL ? NULL : (const char *)p + bytes * (size_t)e;
}

typedef struct {
    const Format *format, *format2; /* w13's, w2's */
    int64_t topk, hidden, inter, width, group, group2, runs, kind;
    float alpha, limit; /* kind 1 (gpt-oss's activation): see BlockArgs.act */
    const float *bias13, *bias2; /* [E, 2I], [E, H] or NULL */
    const int64_t *ids;
    int64_t *order, *starts; /* slots sorted by expert (stable); run r: order[starts[r]..starts[r+1]) */
    const float *weights;
    const void *w13, *s13, *w2, *s2;
    size_t b13, c13, b2, c2; /* bytes of one expert's w13, s13, w2, s2 */
    Acts xa, aa;
    float *h, *act, *y, *out; /* h [S, 2I], act [S, I], y [S, H]: each slot's, by sorted position */
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
        Weights wt = as_weights(down ? j->format2 : j->format, k, down ? j->group2 : j->group, offset(w, wb, e),
                                offset(s, sb, e));
        next = min64(end, (r + 1) * rows);
        for (int64_t b = 0; b < row_blocks(next - idx); b++) {
            RowBlock rb = row_block(&wt, idx - r * rows, next - idx, b);
            for (int64_t p = j->starts[r]; p < j->starts[r + 1]; p++) {
                const Act *a = down ? &j->aa.acts[p] : &j->xa.acts[j->order[p] / j->topk];
                dot_rows(&wt, rb.row, rb.gap, rb.n, a, out + p * rows + rb.row);
            }
        }
    }
}

static void moe_up(void *ctx, int64_t begin, int64_t end) { moe_rows(ctx, begin, end, 0); }

/* gpt-oss's activation: a [I] = (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit). */
static void clamped_glu(const float *g, const float *u, float *a, int64_t n, float alpha, float limit) {
    for (int64_t i = 0; i < n; i++) {
        float gi = fminf(g[i], limit), ui = fminf(fmaxf(u[i], -limit), limit);
        a[i] = (ui + 1.f) * gi / (1.f + expf(-alpha * gi));
    }
}

static void moe_act(void *ctx, int64_t begin, int64_t end) { /* (bias,) activation, prepared for down */
    MoeJob *j = ctx;
    for (int64_t p = begin; p < end; p++) {
        float *h = j->h + p * j->width, *a = j->act + p * j->inter;
        if (j->bias13) {
            const float *bias = j->bias13 + j->ids[j->order[p]] * j->width;
            for (int64_t i = 0; i < j->width; i++) h[i] += bias[i];
        }
        if (j->kind)
            clamped_glu(h, h + j->inter, a, j->inter, j->alpha, j->limit);
        else
            silu_mul(h, h + j->inter, a, j->inter);
        prepare(j->format2, &j->aa.acts[p], a, j->inter, j->group2);
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
        if (j->bias2) {
            const float *bias = j->bias2 + j->ids[slot] * j->hidden;
            for (int64_t row = begin; row < end; row++) o[row] += w * bias[row];
        }
    }
}

/* j->order and j->starts: the slots sorted by expert (stable), cut into runs of one expert. */
static void group_slots(MoeJob *j, int64_t slots) {
    const int64_t *ids = j->ids;
    int64_t *order = j->order;
    for (int64_t i = 0; i < slots; i++) {
        int64_t at = i;
        while (at > 0 && ids[order[at - 1]] > ids[i]) {
            order[at] = order[at - 1];
            at--;
        }
        order[at] = i;
    }
    j->runs = 0;
    for (int64_t p = 0; p < slots; p++)
        if (p == 0 || ids[order[p]] != ids[order[p - 1]]) j->starts[j->runs++] = p;
    j->starts[j->runs] = slots;
}

/* out[T, H] = sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]) for the experts j describes
 * (formats, shapes, weights, biases, activation; see moerag_moe), each expert's weights read once. */
static int run_moe(MoeJob j, int64_t t, const float *x, float *out) {
    int64_t slots = t * j.topk;
    j.order = allocate(sizeof(int64_t) * (size_t)slots);
    j.starts = allocate(sizeof(int64_t) * (size_t)(slots + 1));
    j.h = allocate(sizeof(float) * (size_t)(slots * j.width));
    j.act = allocate(sizeof(float) * (size_t)(slots * j.inter));
    j.y = allocate(sizeof(float) * (size_t)(slots * j.hidden));
    j.out = out;
    int ok = j.order && j.starts && j.h && j.act && j.y && acts_new(&j.xa, j.format, t, j.hidden, j.group) &&
             acts_new(&j.aa, j.format2, slots, j.inter, j.group2);
    if (ok) {
        group_slots(&j, slots);
        for (int64_t i = 0; i < t; i++) prepare(j.format, &j.xa.acts[i], x + i * j.hidden, j.hidden, j.group);
        memset(out, 0, sizeof(float) * (size_t)(t * j.hidden));
        parallel_for(j.runs * j.width, moe_up, &j);
        parallel_for(slots, moe_act, &j);
        parallel_for(j.runs * j.hidden, moe_down, &j);
        parallel_for(j.hidden, moe_sum, &j);
    }
    acts_free(&j.aa);
    acts_free(&j.xa);
    free(j.y);
    free(j.act);
    free(j.h);
    free(j.starts);
    free(j.order);
    return ok ? MOERAG_OK : MOERAG_NO_MEMORY;
}

/* The experts' description for run_moe: w13 [E, 2I, H] (gate rows, then up rows) in fmt (group),
 * w2 [E, H, I] in fmt2 (group2), routed by ids / weights [T, K]; no biases, silu(gate) * up. */
static MoeJob moe_job(int fmt, int fmt2, int64_t topk, int64_t hidden, int64_t inter, int64_t group, int64_t group2,
                      const int64_t *ids, const float *weights, const void *w13, const void *s13, const void *w2,
                      const void *s2) {
    const Format *f = &FORMATS[fmt], *f2 = &FORMATS[fmt2];
    int64_t width = 2 * inter;
    return (MoeJob){
        .format = f, .format2 = f2, .topk = topk, .hidden = hidden, .inter = inter, .width = width,
        .group = group, .group2 = group2, .ids = ids, .weights = weights, .w13 = w13, .s13 = s13, .w2 = w2,
        .s2 = s2, .b13 = weight_bytes(f, width, hidden), .c13 = scale_bytes(f, width, hidden, group),
        .b2 = weight_bytes(f2, hidden, inter), .c2 = scale_bytes(f2, hidden, inter, group2),
    };
}

/* out[T, H] = sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]), each expert
 * down(silu(gate(x)) * up(x)) with w13 [E, 2I, H] (gate rows, then up rows) in fmt (group),
 * w2 [E, H, I] in fmt2 (group2). Slots are grouped by expert so each selected expert's weights
 * are read once. */
int moerag_moe(int fmt, int fmt2, int64_t t, int64_t topk, int64_t hidden, int64_t inter, int64_t group,
               int64_t group2, const float *x, const int64_t *ids, const float *weights, const void *w13,
               const void *s13, const void *w2, const void *s2, float *out) {
    MoeJob j = moe_job(fmt, fmt2, topk, hidden, inter, group, group2, ids, weights, w13, s13, w2, s2);
    return run_moe(j, t, x, out);
}

/* out[N, K] fp32 = the weights W, for products with many rows (prefill) done by torch. */
typedef struct {
    Weights m;
    float *out;
} DequantJob;

static void dequantize_rows(void *ctx, int64_t begin, int64_t end) {
    const DequantJob *j = ctx;
    for (int64_t row = begin; row < end; row++) j->m.format->dequantize(&j->m, row, j->out + row * j->m.k);
}

void moerag_dequantize(int fmt, int64_t n, int64_t k, int64_t group, const void *w, const void *scale, float *out) {
    DequantJob job = {as_weights(&FORMATS[fmt], k, group, w, scale), out};
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

/* Rows [first, first + count) of p . a (+ bias) for each of the b activations: out + i * stride
 * holds activation i's, from row `first` on. */
static void proj_rows(const Proj *p, int64_t first, int64_t count, const Act *acts, int64_t b, float *out, int64_t stride) {
    Weights wt = as_weights(&FORMATS[p->fmt], p->k, p->group, p->w, p->scale);
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

/* Per-head RMSNorm (optional, fp32 weight [D]) then the half-split rotation of the first `rotary`
 * dims by (cos, sin) [rotary]; the others pass through (partial RoPE). */
static void norm_rotate(float *v, int64_t d, int64_t rotary, const float *norm, float eps, const float *cos,
                        const float *sin) {
    if (norm) {
        float inv = 1.f / sqrtf(sum_squares(v, d) / (float)d + eps);
        for (int64_t i = 0; i < d; i++) v[i] = v[i] * inv * norm[i];
    }
    int64_t half = rotary / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

typedef struct {
    const BlockArgs *a; /* heads, rotary, qgate, sinks, window: see BlockArgs */
    const Proj *pq, *pk, *pv, *po;
    int64_t b, d, pos, slots, nq, nkv, qstride, width, s;
    const float *cos, *sin;
    float scale;
    float *kcache, *vcache, *qkv, *att, *probs, *out; /* qkv [B, q | k | v], att [B, N*D], probs [B, N, S] */
    Acts xa, oa;
} AttnJob;

static void attn_qkv(void *ctx, int64_t begin, int64_t end) { /* q, k and v rows in one loop */
    const AttnJob *j = ctx;
    int64_t nq = j->pq->n;
    for (int64_t row = begin, next; row < end; row = next) { /* one projection's rows at a time */
        const Proj *p = row < nq ? j->pq : row < nq + j->nkv ? j->pk : j->pv;
        int64_t first = row < nq ? 0 : row < nq + j->nkv ? nq : nq + j->nkv; /* p's first row */
        next = min64(end, first + p->n);
        proj_rows(p, row - first, next - row, j->xa.acts, j->b, j->qkv + row, j->width);
    }
}

static void attn_rotate(void *ctx, int64_t begin, int64_t end) { /* norm + rotate; k, v into the cache */
    const AttnJob *j = ctx;
    const BlockArgs *a = j->a;
    int64_t all = a->heads + a->kv_heads, nq = j->pq->n;
    for (int64_t hb = begin; hb < end; hb++) {
        int64_t i = hb / all, h = hb % all;
        float *row = j->qkv + i * j->width;
        const float *qnorm = a->qk_whole ? NULL : a->qnorm, *knorm = a->qk_whole ? NULL : a->knorm; /* normed whole */
        if (h < a->heads) {
            norm_rotate(row + h * j->qstride, j->d, a->rotary, qnorm, a->qk_eps, j->cos, j->sin);
            continue;
        }
        int64_t g = h - a->heads, slot = a->window ? j->pos % j->slots : j->pos; /* a window's cache is a ring */
        float *k = row + nq + g * j->d, *v = row + nq + j->nkv + g * j->d;
        norm_rotate(k, j->d, a->rotary, knorm, a->qk_eps, j->cos, j->sin);
        size_t at = (size_t)(((i * a->kv_heads + g) * j->slots + slot) * j->d);
        memcpy(j->kcache + at, k, sizeof(float) * (size_t)j->d);
        memcpy(j->vcache + at, v, sizeof(float) * (size_t)j->d);
    }
}

/* q and k RMS-normed over all their heads at once (qk_whole), then q, k and v clipped (clip > 0):
 * per sequence, before the heads are rotated. */
static void attn_whole(const AttnJob *j) {
    const BlockArgs *a = j->a;
    int64_t nq = j->pq->n;
    for (int64_t i = 0; i < j->b; i++) {
        float *row = j->qkv + i * j->width;
        if (a->qk_whole) {
            moerag_rmsnorm(1, nq, row, a->qnorm, a->qk_eps, row);
            moerag_rmsnorm(1, j->nkv, row + nq, a->knorm, a->qk_eps, row + nq);
        }
        if (a->clip > 0.f)
            for (int64_t c = 0; c < j->width; c++) row[c] = fminf(fmaxf(row[c], -a->clip), a->clip);
    }
}

static void attn_heads(void *ctx, int64_t begin, int64_t end) { /* each query head over its key head */
    const AttnJob *j = ctx;
    const BlockArgs *a = j->a;
    int64_t d = j->d;
    for (int64_t hb = begin; hb < end; hb++) {
        int64_t i = hb / a->heads, h = hb % a->heads, g = h / (a->heads / a->kv_heads);
        size_t cache = (size_t)((i * a->kv_heads + g) * j->slots) * (size_t)d; /* key head g's [slots, D] */
        const float *q = j->qkv + i * j->width + h * j->qstride;
        float *o = j->att + i * j->nq + h * d;
        attend(q, j->kcache + cache, j->vcache + cache, j->s, d, j->scale, a->sinks ? a->sinks[h] : -INFINITY,
               j->probs + hb * j->s, o);
        if (a->qgate) /* the head's gate values follow its query values */
            for (int64_t c = 0; c < d; c++) o[c] /= 1.f + expf(-q[d + c]);
    }
}

static void attn_out(void *ctx, int64_t begin, int64_t end) {
    const AttnJob *j = ctx;
    proj_rows(j->po, begin, end - begin, j->oa.acts, j->b, j->out + begin, j->po->n);
}

/* One decode step of a block's attention (BlockArgs' attention fields) for B sequences, each with
 * one new token at position `pos`: q, k, v = x W^T (+ bias); optional q/k RMSNorm per head;
 * rotation of the first `rotary` dims; k, v into the caches [B, G, slots, D] (at pos % slots with a
 * window); softmax(q k^T * scale, sink) v over the positions the cache holds; the sigmoid gate if
 * any; then o_proj. x [B, Hx] is the normed layer input; out [B, Ho]. q, k and v share one format. */
static int attention(const BlockArgs *a, int64_t b, int64_t pos, const float *x, const float *cos, const float *sin,
                     float *kcache, float *vcache, float scale, float *out) {
    const Proj *proj = a->attn;
    int64_t d = a->head_dim, nq = a->heads * d, nkv = a->kv_heads * d, hx = proj[0].k;
    const Format *fx = &FORMATS[proj[0].fmt], *fo = &FORMATS[proj[3].fmt];
    int64_t seen = a->window ? min64(pos + 1, a->slots) : pos + 1; /* the positions the cache holds */
    AttnJob j = {
        .a = a, .pq = &proj[0], .pk = &proj[1], .pv = &proj[2], .po = &proj[3], .b = b, .d = d, .pos = pos,
        .slots = a->slots, .nq = nq, .nkv = nkv, .qstride = a->qgate ? 2 * d : d, .width = proj[0].n + 2 * nkv,
        .s = seen, .cos = cos, .sin = sin, .scale = scale, .kcache = kcache, .vcache = vcache, .out = out,
        .qkv = allocate(sizeof(float) * (size_t)(b * (proj[0].n + 2 * nkv))),
        .att = allocate(sizeof(float) * (size_t)(b * nq)),
        .probs = allocate(sizeof(float) * (size_t)(b * a->heads * seen)),
    };
    int ok = j.qkv && j.att && j.probs && acts_new(&j.xa, fx, b, hx, proj[0].group) &&
             acts_new(&j.oa, fo, b, nq, proj[3].group);
    if (ok) {
        for (int64_t i = 0; i < b; i++) prepare(fx, &j.xa.acts[i], x + i * hx, hx, proj[0].group);
        parallel_for(j.width, attn_qkv, &j);
        attn_whole(&j);
        parallel_for(b * (a->heads + a->kv_heads), attn_rotate, &j);
        parallel_for(b * a->heads, attn_heads, &j);
        for (int64_t i = 0; i < b; i++) prepare(fo, &j.oa.acts[i], j.att + i * nq, nq, proj[3].group);
        parallel_for(proj[3].n, attn_out, &j);
    }
    acts_free(&j.oa);
    acts_free(&j.xa);
    free(j.probs);
    free(j.att);
    free(j.qkv);
    return ok ? MOERAG_OK : MOERAG_NO_MEMORY;
}

/* One decode step of grouped-query attention over whole heads, without sinks, gates or windows
 * (attention() above): caches [B, G, S_max, D]. */
int moerag_attention(int64_t b, int64_t heads, int64_t kv_heads, int64_t d, int64_t pos, int64_t smax,
                     const float *x, const Proj *proj, const float *qnorm, const float *knorm, float eps,
                     const float *cos, const float *sin, float *kcache, float *vcache, float scale, float *out) {
    BlockArgs a = {.heads = heads, .kv_heads = kv_heads, .head_dim = d, .attn = proj, .qnorm = qnorm,
                   .knorm = knorm, .qk_eps = eps, .rotary = d, .slots = smax};
    return attention(&a, b, pos, x, cos, sin, kcache, vcache, scale, out);
}

#include "native_linear.c"

/* logits [B, E] -> for each row the topk largest softmax probabilities (ties: lowest id first),
 * their ids [B, topk] and weights [B, topk] (fp32; renormalized to sum 1 if asked). */
static void route(float *logits, int64_t b, int64_t e, int64_t topk, int renormalize, float *weights, int64_t *ids) {
    for (int64_t i = 0; i < b; i++) {
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
        if (renormalize)
            for (int64_t s = 0; s < topk; s++) weights[i * topk + s] /= kept;
    }
}

/* The index of the largest v[j] over j < n not in taken [count] (ties: lowest first), -1 if none. */
static int64_t best_of(const float *v, int64_t n, const int64_t *taken, int64_t count) {
    int64_t best = -1;
    for (int64_t j = 0; j < n; j++) {
        int seen = 0;
        for (int64_t c = 0; c < count && !seen; c++) seen = taken[c] == j;
        if (!seen && (best < 0 || v[j] > v[best])) best = j;
    }
    return best;
}

/* DeepSeek-V3's routing (BlockArgs.routing 1) of logits [B, E] in place -> ids, weights [B, topk];
 * scratch holds E + n_group floats. engine/routing.py's sigmoid_grouped_topk is the reference. */
static void route_grouped(const BlockArgs *k, float *logits, int64_t b, float *scratch, float *weights, int64_t *ids) {
    int64_t e = k->experts, topk = k->topk, groups = k->n_group > 1 ? k->n_group : 1, per = e / groups;
    float *choice = scratch, *group_score = scratch + e;
    int64_t kept[64]; /* the groups kept, at most 64 a token (more are refused by the backend) */
    for (int64_t i = 0; i < b; i++) {
        float *score = logits + i * e, total = 0.f;
        for (int64_t j = 0; j < e; j++) {
            score[j] = 1.f / (1.f + expf(-score[j]));
            choice[j] = score[j] + k->correction[j];
        }
        if (groups > 1) {
            for (int64_t g = 0; g < groups; g++) { /* the sum of the group's two best */
                int64_t first = best_of(choice + g * per, per, NULL, 0), second = best_of(choice + g * per, per, &first, 1);
                group_score[g] = choice[g * per + first] + (second < 0 ? 0.f : choice[g * per + second]);
            }
            for (int64_t c = 0; c < k->topk_group; c++) kept[c] = best_of(group_score, groups, kept, c);
            for (int64_t g = 0; g < groups; g++) {
                int in = 0;
                for (int64_t c = 0; c < k->topk_group && !in; c++) in = kept[c] == g;
                if (!in)
                    for (int64_t j = g * per; j < (g + 1) * per; j++) choice[j] = -INFINITY;
            }
        }
        int64_t *chosen = ids + i * topk;
        for (int64_t s = 0; s < topk; s++) {
            chosen[s] = best_of(choice, e, chosen, s);
            total += weights[i * topk + s] = score[chosen[s]];
        }
        for (int64_t s = 0; s < topk; s++)
            weights[i * topk + s] = (k->renormalize ? weights[i * topk + s] / (total + 1e-20f) : weights[i * topk + s]) *
                                    k->scaling;
    }
}

/* y [B, N] = x [B, K] p^T (+ p's bias). */
static int project(const Proj *p, int64_t b, const float *x, float *y) {
    int status = moerag_gemv((int)p->fmt, b, p->n, p->k, p->group, x, p->w, p->scale, y);
    if (status == MOERAG_OK && p->bias)
        for (int64_t i = 0; i < b; i++)
            for (int64_t r = 0; r < p->n; r++) y[i * p->n + r] += p->bias[r];
    return status;
}

/* y [B, H] += [sigmoid(h . gate) *] down(silu(h gate_proj^T) * (h up_proj^T)): a dense MLP (a shared
 * expert: DeepSeek, GLM; gated: Qwen2-MoE, Qwen3.5); shared = {gate_proj, up_proj, down_proj, gate
 * [1, H] or one whose w is NULL}. */
static int shared_expert(const Proj *shared, int64_t b, const float *h, float *y) {
    int64_t width = shared[0].n, hidden = shared[2].n;
    float *g = allocate(sizeof(float) * (size_t)(b * width)), *u = allocate(sizeof(float) * (size_t)(b * width));
    float *d = allocate(sizeof(float) * (size_t)(b * hidden)), *s = allocate(sizeof(float) * (size_t)b);
    int status = g && u && d && s ? MOERAG_OK : MOERAG_NO_MEMORY;
    if (status == MOERAG_OK) status = project(&shared[0], b, h, g);
    if (status == MOERAG_OK) status = project(&shared[1], b, h, u);
    if (status == MOERAG_OK) {
        silu_mul(g, u, g, b * width);
        status = project(&shared[2], b, g, d);
    }
    if (status == MOERAG_OK && shared[3].w) status = project(&shared[3], b, h, s);
    if (status == MOERAG_OK)
        for (int64_t i = 0; i < b; i++) {
            float gate = shared[3].w ? 1.f / (1.f + expf(-s[i])) : 1.f;
            for (int64_t r = 0; r < hidden; r++) y[i * hidden + r] += gate * d[i * hidden + r];
        }
    free(s);
    free(d);
    free(u);
    free(g);
    return status;
}

/* y [B, H] = the routed experts of h [B, H] (see BlockArgs): route, then run_moe. */
static int routed_experts(const BlockArgs *k, int64_t b, const float *h, float *y) {
    int64_t hidden = k->router->k, e = k->experts, topk = k->topk;
    float *logits = allocate(sizeof(float) * (size_t)(b * e + e + k->n_group));
    float *weights = allocate(sizeof(float) * (size_t)(b * topk));
    int64_t *ids = allocate(sizeof(int64_t) * (size_t)(b * topk));
    int status = logits && weights && ids ? MOERAG_OK : MOERAG_NO_MEMORY;
    if (status == MOERAG_OK) status = project(k->router, b, h, logits);
    if (status == MOERAG_OK) {
        if (k->routing)
            route_grouped(k, logits, b, logits + b * e, weights, ids);
        else
            route(logits, b, e, topk, (int)k->renormalize, weights, ids);
        MoeJob job = moe_job((int)k->fmt, (int)k->fmt2, topk, hidden, k->inter, k->group, k->group2, ids, weights,
                             k->w13, k->s13, k->w2, k->s2);
        job.bias13 = k->b13;
        job.bias2 = k->b2;
        job.kind = k->act;
        job.alpha = k->alpha;
        job.limit = k->limit;
        status = run_moe(job, b, h, y);
    }
    free(ids);
    free(weights);
    free(logits);
    return status;
}

/* One decoder block at decode, in one call (see BlockArgs):
 *   x += mixer(rmsnorm(x) * w_in);  h = rmsnorm(x) * w_post;  x += experts(h) + shared(h).
 * x [B, H] is updated in place; kcache / vcache are the mixer's caches. The pieces are the
 * functions above. */
static int decode_block(const BlockArgs *k, int64_t b, int64_t pos, float *x, const float *cos, const float *sin,
                        float *kcache, float *vcache, float scale) {
    int64_t hidden = k->hidden;
    float *h = allocate(sizeof(float) * (size_t)(b * hidden)), *y = allocate(sizeof(float) * (size_t)(b * hidden));
    int status = h && y ? MOERAG_OK : MOERAG_NO_MEMORY;
    if (status == MOERAG_OK) {
        moerag_rmsnorm(b, hidden, x, k->in_norm, k->eps, h);
        status = k->linear ? linear_step(k->linear, b, h, kcache, vcache, y)
                           : attention(k, b, pos, h, cos, sin, kcache, vcache, scale, y);
    }
    if (status == MOERAG_OK) {
        for (int64_t i = 0; i < b * hidden; i++) x[i] += y[i];
        moerag_rmsnorm(b, hidden, x, k->post_norm, k->eps, h);
        if (k->experts)
            status = routed_experts(k, b, h, y);
        else
            memset(y, 0, sizeof(float) * (size_t)(b * hidden));
    }
    if (status == MOERAG_OK && k->shared) status = shared_expert(k->shared, b, h, y);
    if (status == MOERAG_OK)
        for (int64_t i = 0; i < b * hidden; i++) x[i] += y[i];
    free(y);
    free(h);
    return status;
}

/* The decode step of n consecutive blocks (decode_block each; x [B, H] updated in place), with
 * each block's own fp32 caches: one call per token for the whole stack. */
int moerag_blocks(const BlockArgs *blocks, int64_t n, int64_t b, int64_t pos, float *x, const float *cos,
                  const float *sin, float *const *kcache, float *const *vcache, float scale) {
    int status = MOERAG_OK;
    for (int64_t i = 0; i < n && status == MOERAG_OK; i++)
        status = decode_block(&blocks[i], b, pos, x, cos, sin, kcache[i], vcache[i], scale);
    return status;
}
