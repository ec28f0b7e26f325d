/*
 * runq.c -- int8 inference for llama2.c's version-2 ("Q8_0") model files.
 *
 * Usage: the same as run's (make runq builds it):
 *   ./runq model_q80.bin [-t temperature] [-p topp] [-s seed] [-n steps] [-i "prompt"]
 *                        [-z tokenizer.bin] [-m generate] [-d 0|1]
 *
 * It includes run.c with RUNQ defined, so the header checks, the tokenizer, the sampler,
 * the command line and the generation loop are run.c's own (one fix lands in both);
 * only the model below is its own.
 *
 * Version-2 file (llama2.c's export.py --version 2):
 *   a 256-byte header: uint32 magic 0x616b3432 ("ak42"), int32 version 2, the seven int32
 *     dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
 *     uint8 shared_classifier, int32 group_size GS, zero bytes to 256;
 *   float32 rms_att (L, dim), rms_ffn (L, dim), rms_final (dim);
 *   then each quantised matrix (row-major (out, in)) as its int8 values followed by one
 *   float32 scale per group of GS consecutive values, a weight being q * scale:
 *     token_embedding (vocab, dim); wq of layers 0..L-1, each on its own; then every
 *     layer's wk, wv, wo, w1 (hidden, dim), w2 (dim, hidden), w3 (hidden, dim) likewise;
 *     wcls (vocab, dim) only when not shared.
 *
 * Forward pass (llama2.c's runq.c): the embedding row is dequantised; the input of every
 * matrix product is quantised the same way (per group: scale = max|x| / 127, q =
 * round(x / scale)); a product sums q_x * q_w in int32 within each group and adds
 * ival * scale_w * scale_x in float32 over the groups. RMSNorm, RoPE, attention and
 * SwiGLU are run.c's fp32 code.
 */

#define RUNQ 1
#include "run.c"

typedef struct {
    const int8_t *q; /* the mapping's int8 values */
    float *s;        /* one scale per group, copied: in the file they need not be 4-byte aligned */
} QTensor;

typedef struct {
    QTensor emb;                          /* (vocab, dim) */
    const float *rms_att, *rms_ffn;       /* (L, dim) */
    const float *rms_final;               /* (dim) */
    QTensor *wq, *wk, *wv, *wo;           /* per layer: (dim|kv_dim, dim), wo (dim, dim) */
    QTensor *w1, *w2, *w3;                /* per layer: (hidden, dim), (dim, hidden), (hidden, dim) */
    QTensor cls;                          /* (vocab, dim), emb when shared */
} QWeights;

struct Model {
    Config c;
    QWeights w;
    Buffers b;
    int16_t *xq; /* the quantised input of a product (max(dim, hidden)), int8 values held as int16 */
    float *xs;   /* its scales */
    void *map;
    size_t map_bytes;
};

/* the next quantised tensor of n values at *p */
static QTensor take_q(const char **p, size_t n, size_t gs) {
    QTensor t;
    t.q = (const int8_t *)*p;
    t.s = alloc_array((u128)(n / gs), sizeof(float), "quantisation scales");
    memcpy(t.s, *p + n, (n / gs) * sizeof(float));
    *p += n + (n / gs) * sizeof(float);
    return t;
}

static QTensor *take_layers(const char **p, size_t L, size_t n, size_t gs) {
    QTensor *t = alloc_array((u128)L, sizeof(QTensor), "the model");
    for (size_t l = 0; l < L; l++) t[l] = take_q(p, n, gs);
    return t;
}

static Model *model_load(const char *path) {
    Model *m = alloc_array(1, sizeof(Model), "the model");
    open_model(path, 1, &m->c, &m->map, &m->map_bytes);
    const Config *c = &m->c;
    /* open_model checked the file size, so every offset below lies inside the mapping */
    size_t dim = (size_t)c->dim, hid = (size_t)c->hidden_dim, L = (size_t)c->n_layers;
    size_t kv = (size_t)c->kv_dim, vocab = (size_t)c->vocab_size, gs = (size_t)c->group_size;
    const char *p = (const char *)m->map + c->header_bytes;
    QWeights *w = &m->w;
    float *norms = alloc_array((u128)(2 * L * dim + dim), sizeof(float), "the norms");
    memcpy(norms, p, (2 * L * dim + dim) * sizeof(float));
    p += (2 * L * dim + dim) * sizeof(float);
    w->rms_att = norms;
    w->rms_ffn = norms + L * dim;
    w->rms_final = norms + 2 * L * dim;
    w->emb = take_q(&p, vocab * dim, gs);
    w->wq = take_layers(&p, L, dim * dim, gs);
    w->wk = take_layers(&p, L, kv * dim, gs);
    w->wv = take_layers(&p, L, kv * dim, gs);
    w->wo = take_layers(&p, L, dim * dim, gs);
    w->w1 = take_layers(&p, L, hid * dim, gs);
    w->w2 = take_layers(&p, L, dim * hid, gs);
    w->w3 = take_layers(&p, L, hid * dim, gs);
    w->cls = c->shared_classifier ? w->emb : take_q(&p, vocab * dim, gs);
    alloc_buffers(&m->b, c);
    size_t widest = dim > hid ? dim : hid;
    m->xq = alloc_array((u128)widest, sizeof(int16_t), "activations");
    m->xs = alloc_array((u128)(widest / gs), sizeof(float), "activations");
    return m;
}

static const Config *model_config(const Model *m) { return &m->c; }

static void free_layers(QTensor *t, int L) {
    for (int l = 0; l < L; l++) free(t[l].s);
    free(t);
}

static void model_free(Model *m) {
    QWeights *w = &m->w;
    int L = m->c.n_layers;
    free_layers(w->wq, L); free_layers(w->wk, L); free_layers(w->wv, L); free_layers(w->wo, L);
    free_layers(w->w1, L); free_layers(w->w2, L); free_layers(w->w3, L);
    if (!m->c.shared_classifier) free(w->cls.s);
    free(w->emb.s);
    free((void *)w->rms_att);
    free_buffers(&m->b);
    free(m->xq); free(m->xs);
    if (m->map) munmap(m->map, m->map_bytes);
    free(m);
}

/* x (n) -> q, s: per group of gs values, scale = max|x| / 127 and q = round(x / scale)
 * (a group of zeros gets scale 0 and q 0, where llama2.c would divide by zero). The int8
 * values are kept as int16, the width the products below multiply in. */
static void quantize(int16_t *restrict q, float *restrict s, const float *restrict x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        float wmax = 0.0f;
        for (int i = 0; i < gs; i++) {
            float v = fabsf(xg[i]);
            if (v > wmax) wmax = v;
        }
        const float scale = wmax / 127.0f;
        s[g] = scale;
        for (int i = 0; i < gs; i++)
            q[(size_t)g * gs + i] = scale > 0.0f ? (int16_t)(int8_t)roundf(xg[i] / scale) : 0;
    }
}

/* The int32 sum of group g's products (exact), the term (float)sum * scale_w * scale_x,
 * and the row's sum of terms: llama2.c's arithmetic. The AVX2 path (x86-64 with
 * -march=native) computes the same exact group sums eight groups at a time; the terms'
 * float sum may then be taken in another order. */
static float qrow_scalar(const int8_t *restrict w, const float *restrict ws, const int16_t *restrict x,
                         const float *restrict xs, int n, int gs) {
    float acc = 0.0f;
    for (int j = 0, g = 0; j < n; j += gs, g++) {
        int32_t ival = 0;
        for (int k = 0; k < gs; k++) ival += (int32_t)x[j + k] * (int32_t)w[j + k];
        acc += (float)ival * ws[g] * xs[g];
    }
    return acc;
}

#ifdef __AVX2__
#include <immintrin.h>

/* eight int32 vectors -> the vector of their eight horizontal sums, in order */
static inline __m256i hsum8(const __m256i *v) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* the products of one group (gs a multiple of 16) as 8 int32 partial sums */
static inline __m256i group_dot(const int8_t *w, const int16_t *x, int gs) {
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < gs; k += 16) {
        __m256i wk = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wk, _mm256_loadu_si256((const __m256i *)(x + k))));
    }
    return acc;
}

/* G: the group size, a constant where it is known so the loops unroll */
#define DEFINE_QROW_AVX2(NAME, G)                                                                  \
    static float NAME(const int8_t *restrict w, const float *restrict ws, const int16_t *restrict x,  \
                      const float *restrict xs, int n, int gs) {                                     \
        (void)gs;                                                                                     \
        const int ng = n / (G);                                                                       \
        float acc = 0.0f;                                                                             \
        int g = 0;                                                                                    \
        for (; g + 8 <= ng; g += 8) {                                                                 \
            __m256i v[8];                                                                             \
            for (int i = 0; i < 8; i++) v[i] = group_dot(w + (size_t)(g + i) * (G), x + (size_t)(g + i) * (G), (G)); \
            float t[8];                                                                               \
            _mm256_storeu_ps(t, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hsum8(v)), _mm256_loadu_ps(ws + g)), \
                                              _mm256_loadu_ps(xs + g)));                              \
            for (int i = 0; i < 8; i++) acc += t[i];                                                  \
        }                                                                                             \
        if (g < ng) acc += qrow_scalar(w + (size_t)g * (G), ws + g, x + (size_t)g * (G), xs + g, n - g * (G), (G)); \
        return acc;                                                                                   \
    }
DEFINE_QROW_AVX2(qrow_avx2_32, 32)
DEFINE_QROW_AVX2(qrow_avx2_64, 64)
DEFINE_QROW_AVX2(qrow_avx2_any, gs)
#endif

typedef float (*QRow)(const int8_t *, const float *, const int16_t *, const float *, int, int);

/* y (rows) = W (rows, cols) . x (cols), x given quantised (xq, xs) */
static void qmatvec(float *restrict y, const QTensor *W, const int16_t *xq, const float *xs, int rows, int cols, int gs) {
#ifdef __AVX2__
    const QRow row = gs == 32 ? qrow_avx2_32 : gs == 64 ? qrow_avx2_64 : gs % 16 == 0 ? qrow_avx2_any : qrow_scalar;
#else
    const QRow row = qrow_scalar;
#endif
    const size_t per_row = (size_t)cols / (size_t)gs;
#ifdef _OPENMP
    if ((size_t)rows * (size_t)cols >= PARALLEL_MIN_WORK) {
        int r;
#pragma omp parallel for
        for (r = 0; r < rows; r++)
            y[r] = row(W->q + (size_t)r * cols, W->s + (size_t)r * per_row, xq, xs, cols, gs);
        return;
    }
#endif
    for (int r = 0; r < rows; r++)
        y[r] = row(W->q + (size_t)r * cols, W->s + (size_t)r * per_row, xq, xs, cols, gs);
}

static float *model_forward(Model *m, int token, int pos) {
    const Config *c = &m->c;
    const QWeights *w = &m->w;
    Buffers *b = &m->b;
    const int gs = c->group_size;
    const size_t dim = (size_t)c->dim, kv_dim = (size_t)c->kv_dim;

    const size_t row = (size_t)token * dim; /* the embedding row, dequantised */
    for (size_t i = 0; i < dim; i++) b->x[i] = w->emb.q[row + i] * w->emb.s[(row + i) / gs];

    for (size_t l = 0; l < (size_t)c->n_layers; l++) {
        const size_t cache_off = l * (size_t)c->seq_len * kv_dim;
        float *k = b->k_cache + cache_off + (size_t)pos * kv_dim; /* write k, v straight into the cache */
        float *v = b->v_cache + cache_off + (size_t)pos * kv_dim;

        rmsnorm(b->xb, b->x, w->rms_att + l * dim, c->dim);
        quantize(m->xq, m->xs, b->xb, c->dim, gs);
        qmatvec(b->q, &w->wq[l], m->xq, m->xs, c->dim, c->dim, gs);
        qmatvec(k, &w->wk[l], m->xq, m->xs, c->kv_dim, c->dim, gs);
        qmatvec(v, &w->wv[l], m->xq, m->xs, c->kv_dim, c->dim, gs);
        rope(b->q, k, c->dim, c->kv_dim, c->head_size, pos);
        attention(b, c, b->k_cache + cache_off, b->v_cache + cache_off, pos);
        quantize(m->xq, m->xs, b->xb, c->dim, gs);
        qmatvec(b->xb2, &w->wo[l], m->xq, m->xs, c->dim, c->dim, gs);
        for (size_t i = 0; i < dim; i++) b->x[i] += b->xb2[i];

        rmsnorm(b->xb, b->x, w->rms_ffn + l * dim, c->dim);
        quantize(m->xq, m->xs, b->xb, c->dim, gs);
        qmatvec(b->hb, &w->w1[l], m->xq, m->xs, c->hidden_dim, c->dim, gs);
        qmatvec(b->hb2, &w->w3[l], m->xq, m->xs, c->hidden_dim, c->dim, gs);
        swiglu(b->hb, b->hb2, c->hidden_dim);
        quantize(m->xq, m->xs, b->hb, c->hidden_dim, gs);
        qmatvec(b->xb, &w->w2[l], m->xq, m->xs, c->dim, c->hidden_dim, gs);
        for (size_t i = 0; i < dim; i++) b->x[i] += b->xb[i];
    }

    rmsnorm(b->x, b->x, w->rms_final, c->dim);
    quantize(m->xq, m->xs, b->x, c->dim, gs);
    qmatvec(b->logits, &w->cls, m->xq, m->xs, c->vocab_size, c->dim, gs);
    return b->logits;
}

int main(int argc, char **argv) {
    g_prog = "runq";
    return run_main(argc, argv);
}
