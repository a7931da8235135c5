/* The Gated DeltaNet mixer's decode step (Qwen3-Next, Qwen3.5-MoE): included by native.c after its
 * products, threads and helpers. See LinearArgs in native.h and engine/models/qwen3_next.py.
 *
 * Shapes: B sequences, H hidden, Hk / Hv key / value heads, Dk / Dv their dims, K the convolution's
 * kernel, Ck = 2 Hk Dk + Hv Dv convolved channels (q, then k, then v). Each sequence's projections
 * go into one row of W = Ck + Hv Dv + 2 Hv floats: qkv | z | b | a.
 *
 * The step is bound by reading the projections' weights; next come the recurrent states
 * [Hv, Dk, Dv] fp32 (256 KB a sequence at 16 x 64 x 64, 2 MB at 32 x 128 x 128), each read and
 * written once: a value head's tile is read once for both of its products with k and q, then
 * updated while still in cache (delta_columns). Three parallel regions: the input projections'
 * rows, the (sequence, key head) pairs (convolution, then the rule for their value heads), the
 * output projection's rows.
 */

#define LINEAR_INPUTS 4 /* in_proj_qkv, in_proj_z, in_proj_b, in_proj_a: all read x */

typedef struct {
    const LinearArgs *l;
    int64_t b, ck, nz, width, per; /* per: value heads per key head */
    const Acts *xa[LINEAR_INPUTS]; /* x prepared for each input projection (shared when prepared alike) */
    Acts own[LINEAR_INPUTS], oa;
    float *conv, *state, *proj, *o, *out; /* proj [B, W]; o [B, Hv Dv], out_proj's input */
} LinearJob;

static void linear_in(void *ctx, int64_t begin, int64_t end) { /* the four input projections' rows in one loop */
    const LinearJob *j = ctx;
    for (int64_t row = begin, next; row < end; row = next) { /* one projection's rows at a time */
        int64_t p = 0, first = 0; /* the projection of `row`, and its first row in W */
        while (row >= first + j->l->proj[p].n) first += j->l->proj[p++].n;
        next = min64(end, first + j->l->proj[p].n);
        proj_rows(&j->l->proj[p], row - first, next - row, j->xa[p]->acts, j->b, j->proj + row, j->width);
    }
}

static inline float silu(float x) { return x / (1.f + expf(-x)); }

/* Channels [c, c + n) of sequence i through the causal convolution and SiLU, in place in its proj
 * row; each channel's last K - 1 inputs (conv [Ck, K - 1]) shift by the new one as they are read
 * (a shift loop of its own compiles to a memmove call per channel). */
static void convolve(const LinearJob *j, int64_t i, int64_t c, int64_t n) {
    int64_t kernel = j->l->kernel;
    float *x = j->proj + i * j->width + c;
    for (int64_t ch = 0; ch < n; ch++) {
        float *past = j->conv + (i * j->ck + c + ch) * (kernel - 1), now = x[ch];
        const float *w = j->l->conv + (c + ch) * kernel;
        float y = w[kernel - 1] * now;
        for (int64_t t = 0; t < kernel - 1; t++) {
            y += w[t] * past[t];
            past[t] = t + 2 < kernel ? past[t + 1] : now;
        }
        x[ch] = y;
    }
    for (int64_t ch = 0; ch < n; ch++) x[ch] = silu(x[ch]); /* independent: their latencies overlap */
}

/* v [n] scaled to unit length as the reference kernels do (x * rsqrt(|x|^2 + 1e-6)), then by `scale`. */
static void unit(float *v, int64_t n, float scale) {
    float s = scale / sqrtf(sum_squares(v, n) + 1e-6f);
    for (int64_t t = 0; t < n; t++) v[t] *= s;
}

#define STATE_COLUMNS 32 /* columns of a state the rule keeps in registers: 2 AVX-512 or 4 AVX2 vectors a sum */

/* Columns [0, w) (w <= STATE_COLUMNS) of one token of the gated delta rule on a value head's state
 * s [Dk, Dv] (row stride dv; s, v and o start at the first column), d = exp(g), qk = q . k:
 *   s <- d s;  u = beta (v - k^T s);  s <- s + k u^T;  o = q^T s = d q^T s_old + qk u.
 * The first loop reads the columns once for both k^T s and q^T s, summed in registers (w is a
 * constant where it is inlined), the second updates them while they are still in L1: the state
 * crosses memory once. */
static inline __attribute__((always_inline)) void delta_columns(float *restrict s, const float *restrict q,
                                                                const float *restrict k, const float *restrict v,
                                                                float d, float beta, float qk, int64_t dk,
                                                                int64_t dv, int64_t w, float *restrict o) {
    float ks[STATE_COLUMNS] = {0}, qs[STATE_COLUMNS] = {0};
    for (int64_t r = 0; r < dk; r++)
        for (int64_t c = 0; c < w; c++) {
            ks[c] += k[r] * s[r * dv + c];
            qs[c] += q[r] * s[r * dv + c];
        }
    for (int64_t c = 0; c < w; c++) {
        ks[c] = beta * (v[c] - d * ks[c]); /* now u */
        o[c] = d * qs[c] + qk * ks[c];
    }
    for (int64_t r = 0; r < dk; r++)
        for (int64_t c = 0; c < w; c++) s[r * dv + c] = d * s[r * dv + c] + k[r] * ks[c];
}

/* One token of the gated delta rule on one value head's state s [Dk, Dv]: delta_columns on each
 * STATE_COLUMNS columns, then on the rest. */
static void delta_rule(float *s, const float *q, const float *k, const float *v, float d, float beta, int64_t dk,
                       int64_t dv, float *o) {
    float qk = 0.f;
    for (int64_t r = 0; r < dk; r++) qk += q[r] * k[r];
    int64_t c = 0;
    for (; c + STATE_COLUMNS <= dv; c += STATE_COLUMNS)
        delta_columns(s + c, q, k, v + c, d, beta, qk, dk, dv, STATE_COLUMNS, o + c);
    if (c < dv) delta_columns(s + c, q, k, v + c, d, beta, qk, dk, dv, dv - c, o + c);
}

/* torch's softplus (linear above 20). */
static inline float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

/* One value head h of sequence i, its q and k (key head h / per) convolved: its rates, the delta rule
 * on its state, then RMSNorm over Dv (plain weight) times silu(z), into o. */
static void value_head(const LinearJob *j, int64_t i, int64_t h) {
    const LinearArgs *l = j->l;
    int64_t dk = l->key_dim, dv = l->value_dim, nk = l->key_heads * dk, hb = i * l->value_heads + h;
    const float *row = j->proj + i * j->width; /* qkv | z | b | a, qkv convolved */
    const float *q = row + h / j->per * dk, *k = q + nk, *v = row + 2 * nk + h * dv, *z = row + j->ck + h * dv;
    float beta = 1.f / (1.f + expf(-row[j->ck + j->nz + h]));
    float rate = -expf(l->a_log[h]) * softplus(row[j->ck + j->nz + l->value_heads + h] + l->dt_bias[h]);
    float *o = j->o + i * j->nz + h * dv;
    delta_rule(j->state + hb * dk * dv, q, k, v, expf(rate), beta, dk, dv, o);
    float inv = 1.f / sqrtf(sum_squares(o, dv) / (float)dv + l->eps);
    for (int64_t c = 0; c < dv; c++) o[c] *= inv * l->norm[c];
    silu_mul(z, o, o, dv);
}

/* Each (sequence, key head): the convolution of its q and k channels (then unit-normed, q scaled by
 * Dk^-1/2) and of its value heads' v channels, then those value heads. One parallel region for all
 * of it: on a shared machine every region's barrier waits for a descheduled thread. */
static void linear_heads(void *ctx, int64_t begin, int64_t end) {
    const LinearJob *j = ctx;
    const LinearArgs *l = j->l;
    int64_t dk = l->key_dim, nk = l->key_heads * dk, width = j->per * l->value_dim; /* width: g's v channels */
    for (int64_t u = begin; u < end; u++) {
        int64_t i = u / l->key_heads, g = u % l->key_heads;
        float *q = j->proj + i * j->width + g * dk;
        convolve(j, i, g * dk, dk);
        convolve(j, i, nk + g * dk, dk);
        convolve(j, i, 2 * nk + g * width, width);
        unit(q, dk, 1.f / sqrtf((float)dk));
        unit(q + nk, dk, 1.f);
        for (int64_t h = g * j->per; h < (g + 1) * j->per; h++) value_head(j, i, h);
    }
}

static void linear_out(void *ctx, int64_t begin, int64_t end) {
    const LinearJob *j = ctx;
    const Proj *p = &j->l->proj[LINEAR_INPUTS];
    proj_rows(p, begin, end - begin, j->oa.acts, j->b, j->out + begin, p->n);
}

/* j->xa: x [B, H] prepared for each input projection, once per way of preparing it (the format's
 * prepare and the group: int4 quantization may leave b and a float). 0 when out of memory. */
static int linear_prepare(LinearJob *j, const float *x) {
    const Proj *proj = j->l->proj;
    int64_t hidden = proj[0].k;
    for (int p = 0; p < LINEAR_INPUTS; p++) {
        const Format *f = &FORMATS[proj[p].fmt];
        int same = -1; /* an earlier projection whose prepared x this one reads */
        for (int e = 0; e < p && same < 0; e++) {
            const Format *fe = &FORMATS[proj[e].fmt];
            if (fe->prepare == f->prepare && fe->act_bytes == f->act_bytes && proj[e].group == proj[p].group) same = e;
        }
        if (same >= 0) {
            j->xa[p] = j->xa[same];
            continue;
        }
        if (!acts_new(&j->own[p], f, j->b, hidden, proj[p].group)) return 0;
        for (int64_t i = 0; i < j->b; i++) prepare(f, &j->own[p].acts[i], x + i * hidden, hidden, proj[p].group);
        j->xa[p] = &j->own[p];
    }
    return 1;
}

/* One decode step of a Gated DeltaNet mixer; see native.h. x [B, H] (normed) -> out [B, H]:
 * the input projections; the convolution (its conv [B, Ck, K - 1] shifted by the new inputs) with
 * SiLU; q and k unit-normed (q scaled by Dk^-1/2); beta = sigmoid(b), g = -exp(A_log) softplus(a +
 * dt_bias); the gated delta rule on state [B, Hv, Dk, Dv] (value head h reads key head h / (Hv / Hk));
 * RMSNorm times silu(z); out_proj. */
static int linear_step(const LinearArgs *l, int64_t b, const float *x, float *conv, float *state, float *out) {
    const Proj *po = &l->proj[LINEAR_INPUTS];
    int64_t ck = l->proj[0].n, nz = l->value_heads * l->value_dim;
    LinearJob j = {
        .l = l, .b = b, .ck = ck, .nz = nz, .width = ck + nz + 2 * l->value_heads,
        .per = l->value_heads / l->key_heads, .conv = conv, .state = state, .out = out,
        .proj = allocate(sizeof(float) * (size_t)(b * (ck + nz + 2 * l->value_heads))),
        .o = allocate(sizeof(float) * (size_t)(b * nz)),
    };
    const Format *fo = &FORMATS[po->fmt];
    int ok = j.proj && j.o && linear_prepare(&j, x) && acts_new(&j.oa, fo, b, nz, po->group);
    if (ok) {
        parallel_for(j.width, linear_in, &j);
        parallel_for(b * l->key_heads, linear_heads, &j);
        for (int64_t i = 0; i < b; i++) prepare(fo, &j.oa.acts[i], j.o + i * nz, nz, po->group);
        parallel_for(po->n, linear_out, &j);
    }
    acts_free(&j.oa);
    for (int p = 0; p < LINEAR_INPUTS; p++) acts_free(&j.own[p]);
    free(j.o);
    free(j.proj);
    return ok ? MOERAG_OK : MOERAG_NO_MEMORY;
}

int moerag_linear(const LinearArgs *l, int64_t b, const float *x, float *conv, float *state, float *out) {
    return linear_step(l, b, x, conv, state, out);
}
