/*
 * run.c -- one-file C inference for the Llama-2 style models this project trains.
 *
 * Usage (same flags as llama2.c's run.c, plus -d):
 *   ./run model.bin [-t temperature] [-p topp] [-s seed] [-n steps] [-i "prompt"]
 *                   [-z tokenizer.bin] [-m generate] [-d 0|1]
 *
 * Model file: llama2.c's fp32 layouts, told apart by the header (no flag needed).
 * Every matrix is float32, row-major as (out, in); L = n_layers, kv_dim = dim * n_kv_heads / n_heads.
 *   version 0 ("legacy"): seven int32 header fields
 *       dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
 *     (a negative vocab_size means the classifier is stored separately), then
 *       token_embedding (vocab, dim)
 *       rms_att (L, dim)
 *       wq (L, dim, dim)   wk (L, kv_dim, dim)   wv (L, kv_dim, dim)   wo (L, dim, dim)
 *       rms_ffn (L, dim)
 *       w1 (L, hidden, dim)   w2 (L, dim, hidden)   w3 (L, hidden, dim)
 *       rms_final (dim)
 *       two unused legacy RoPE tables of seq_len*head_size/2 floats each
 *       wcls (vocab, dim)  -- only when the classifier is separate
 *   version 1: a 256-byte header: uint32 magic 0x616b3432 ("ak42"), int32 version 1, the
 *     seven int32 fields (vocab_size > 0), uint8 shared_classifier (1: wcls is the
 *     embedding), zero bytes to 256; then
 *       rms_att (L, dim), rms_ffn (L, dim), rms_final (dim), token_embedding (vocab, dim),
 *       wq, wk, wv, wo, w1, w2, w3 (shapes as above), wcls (only when not shared)
 *   version 2 (int8 Q8_0, same header plus int32 group_size after the flag) is read by
 *     runq.c, which includes this file with RUNQ defined: it shares the header checks,
 *     the tokenizer, the sampler and the command line, and brings its own model.
 * The file is memory-mapped; its size must equal exactly what the header implies.
 *
 * Tokenizer file: int32 max_token_length, then vocab_size records of
 *   { float32 score, int32 n_bytes, n_bytes bytes (no terminator) }.
 *
 * Output: text by default; with "-d 1" the generated token ids (every `next`
 * token of the generation loop, prompt tokens after BOS included) are written to
 * stdout as one line of space-separated decimal integers. The achieved speed is
 * reported on stderr either way, so stdout stays machine-readable.
 *
 * Every problem with the user's input is reported as a single line on stderr of
 * the form "run: error: ... (hint: ...)" and the program exits with status 1.
 */

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BOS_ID 1
#define UNK_ID 0
#define V0_HEADER_BYTES 28        /* seven int32 */
#define VERSIONED_HEADER_BYTES 256
/* the first uint32 of llama2.c's versioned exports ("ak42" read as little-endian) */
#define VERSIONED_MAGIC 0x616b3432u

static const char *g_prog = "run"; /* runq.c says "runq" */
static const char *MODEL_HINT = "hint: re-export with python export.py";
static const char *TOK_HINT = "hint: re-export the tokenizer with python tokenizer.py";

typedef unsigned __int128 u128;

/* ------------------------------------------------------------------------- */
/* errors and allocation                                                      */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: error: ", g_prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

/* zeroed array of `count` elements; the 128-bit product cannot overflow */
static void *alloc_array(u128 count, size_t elem, const char *what) {
    u128 bytes = count * (u128)elem;
    if (bytes == 0) bytes = elem;
    if (bytes > (u128)SIZE_MAX / 2)
        die("cannot allocate %s: %.3g bytes is more than this machine can address",
            what, (double)bytes);
    void *p = calloc(1, (size_t)bytes);
    if (p == NULL)
        die("out of memory allocating %s (%zu bytes) (hint: use a smaller model or a smaller seq_len)",
            what, (size_t)bytes);
    return p;
}

/* ------------------------------------------------------------------------- */
/* model file: header, checks, memory map (shared by run and runq)            */

typedef struct {
    int version;            /* 0 (legacy), 1 (fp32) or 2 (int8 Q8_0) */
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int head_size, kv_dim;
    int shared_classifier;
    int group_size;         /* version 2: values per quantisation group */
    size_t header_bytes;    /* 28 (version 0) or 256 */
} Config;

/* bytes of n weights quantised in groups of gs: n int8 values, then a float32 scale per group */
static u128 q_bytes(u128 n, u128 gs) { return n + 4 * (n / gs); }

/* bytes the file must hold after its header */
static u128 body_bytes(const Config *c, int with_classifier) {
    u128 dim = (u128)c->dim, hid = (u128)c->hidden_dim, L = (u128)c->n_layers;
    u128 vocab = (u128)c->vocab_size, kv = (u128)c->kv_dim;
    u128 norms = 2 * L * dim + dim; /* rms_att, rms_ffn, rms_final */
    if (c->version == 2) {
        u128 gs = (u128)c->group_size, emb = q_bytes(vocab * dim, gs);
        u128 per_layer = 2 * q_bytes(dim * dim, gs) + 2 * q_bytes(kv * dim, gs) + 3 * q_bytes(hid * dim, gs);
        return 4 * norms + emb + L * per_layer + (with_classifier ? emb : 0);
    }
    u128 floats = norms + vocab * dim + L * (2 * dim * dim + 2 * kv * dim + 3 * hid * dim);
    if (c->version == 0) floats += (u128)c->seq_len * (u128)c->head_size; /* both legacy RoPE tables */
    if (with_classifier) floats += vocab * dim;
    return 4 * floats;
}

static void describe_header(char *out, size_t n, const int32_t *h) {
    snprintf(out, n, "dim=%d hidden_dim=%d n_layers=%d n_heads=%d n_kv_heads=%d vocab_size=%d seq_len=%d",
             h[0], h[1], h[2], h[3], h[4], h[5], h[6]);
}

static void print_size(char *out, size_t n, u128 v) {
    if (v <= (u128)UINT64_MAX) snprintf(out, n, "%llu", (unsigned long long)v);
    else snprintf(out, n, "%.3g", (double)v);
}

/* the versioned header's fields after the seven ints: flag, group size, then zeros */
static void read_versioned(Config *c, const unsigned char *raw, const char *path) {
    c->header_bytes = VERSIONED_HEADER_BYTES;
    if (raw[36] > 1)
        die("model file '%s' has shared_classifier flag %u in its version-%d header; it must be 0 or 1 (%s)",
            path, raw[36], c->version, MODEL_HINT);
    c->shared_classifier = raw[36];
    size_t used = 37;
    if (c->version == 2) {
        int32_t gs;
        memcpy(&gs, raw + 37, 4);
        c->group_size = gs;
        used = 41;
    }
    for (size_t i = used; i < VERSIONED_HEADER_BYTES; i++)
        if (raw[i] != 0)
            die("model file '%s' has unknown data at byte %zu of its version-%d header (not a llama2.c export, or a newer one) (%s)",
                path, i, c->version, MODEL_HINT);
}

/* the seven shape fields: all positive, heads dividing dim, an even head size */
static void check_shape(Config *c, const int32_t *h, const char *path, const char *hdr) {
    c->dim = h[0]; c->hidden_dim = h[1]; c->n_layers = h[2]; c->n_heads = h[3];
    c->n_kv_heads = h[4]; c->seq_len = h[6];
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->seq_len <= 0 || h[5] == 0 || h[5] == INT32_MIN)
        die("model file '%s' has an invalid header (%s): all sizes must be positive (vocab_size may be negative) (%s)",
            path, hdr, MODEL_HINT);
    if (c->version == 0) c->shared_classifier = h[5] > 0;
    else if (h[5] < 0)
        die("model file '%s' has an invalid header (%s): vocab_size must be positive in a version-%d file (%s)",
            path, hdr, c->version, MODEL_HINT);
    c->vocab_size = h[5] > 0 ? h[5] : -h[5];
    if (c->vocab_size < 2)
        die("model file '%s' has an invalid header (%s): vocab_size must be at least 2, token 1 is BOS (%s)",
            path, hdr, MODEL_HINT);
    if (c->dim % c->n_heads != 0)
        die("model file '%s' has an invalid header (%s): n_heads does not divide dim (%s)", path, hdr, MODEL_HINT);
    if (c->n_heads % c->n_kv_heads != 0)
        die("model file '%s' has an invalid header (%s): n_kv_heads does not divide n_heads (%s)", path, hdr, MODEL_HINT);
    c->head_size = c->dim / c->n_heads;
    if (c->head_size % 2 != 0)
        die("model file '%s' has an invalid header (%s): head size dim/n_heads=%d is odd, RoPE needs pairs (%s)",
            path, hdr, c->head_size, MODEL_HINT);
    c->kv_dim = c->head_size * c->n_kv_heads;
    /* at most 65536 values per group: a group's int32 sum of int8 products cannot overflow */
    if (c->version == 2 && (c->group_size <= 0 || c->group_size > 65536 || c->dim % c->group_size ||
                            c->hidden_dim % c->group_size))
        die("model file '%s' has group_size %d in its version-2 header; it must be in 1..65536 and divide dim and hidden_dim (%s) (%s)",
            path, c->group_size, hdr, MODEL_HINT);
}

/* the file's size must be exactly header + body; otherwise say how it differs */
static void check_size(const Config *c, uint64_t fsize, const char *path, const char *hdr) {
    u128 want = (u128)c->header_bytes + body_bytes(c, !c->shared_classifier);
    u128 other = (u128)c->header_bytes + body_bytes(c, c->shared_classifier);
    if ((u128)fsize == want) return;
    char wbuf[64];
    print_size(wbuf, sizeof wbuf, want);
    if ((u128)fsize == other)
        die("model file '%s' (%llu bytes) matches its header (%s) only %s a separate classifier, but %s says %s (%s)",
            path, (unsigned long long)fsize, hdr, c->shared_classifier ? "with" : "without",
            c->version == 0 ? "the sign of vocab_size" : "its shared_classifier flag",
            c->shared_classifier ? "it is shared" : "it is separate", MODEL_HINT);
    if ((u128)fsize < want)
        die("model file '%s' is truncated or its header is wrong: the header (%s) implies %s bytes but the file has %llu (%s)",
            path, hdr, wbuf, (unsigned long long)fsize, MODEL_HINT);
    die("model file '%s' has %llu unexpected extra bytes: the header (%s) implies %s bytes but the file has %llu (%s)",
        path, (unsigned long long)(fsize - (uint64_t)want), hdr, wbuf, (unsigned long long)fsize, MODEL_HINT);
}

/*
 * Open, check and memory-map a model file. int8: 1 for runq (version 2 only), 0 for run
 * (versions 0 and 1). Every size in the header is checked before it is used, and the
 * file size must match it exactly, so every offset into the mapping is in bounds.
 */
static void open_model(const char *path, int int8, Config *c, void **map, size_t *map_bytes) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die("cannot open model file '%s': %s (hint: check the path, or export a model with python export.py)",
            path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0)
        die("cannot stat model file '%s': %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        die("model file '%s' is not a regular file (hint: pass the path of a .bin written by python export.py)", path);
    uint64_t fsize = (uint64_t)st.st_size;
    if (fsize < V0_HEADER_BYTES)
        die("model file '%s' is only %llu bytes, too short for the %d-byte header (%s)",
            path, (unsigned long long)fsize, V0_HEADER_BYTES, MODEL_HINT);

    unsigned char raw[VERSIONED_HEADER_BYTES] = {0};
    size_t want = fsize < VERSIONED_HEADER_BYTES ? (size_t)fsize : VERSIONED_HEADER_BYTES;
    ssize_t got = pread(fd, raw, want, 0);
    if (got != (ssize_t)want)
        die("cannot read the header of model file '%s': %s (%s)", path,
            got < 0 ? strerror(errno) : "short read", MODEL_HINT);
    uint32_t magic;
    int32_t h[7];
    memcpy(&magic, raw, 4);
    memset(c, 0, sizeof *c);
    if (magic == VERSIONED_MAGIC) {
        int32_t version;
        memcpy(&version, raw + 4, 4);
        if (version != 1 && version != 2)
            die("model file '%s' has llama2.c's magic \"ak42\" but version %d; versions 0, 1 (./run) and 2 (./runq) exist (%s)",
                path, version, MODEL_HINT);
        c->version = version;
        if (fsize < VERSIONED_HEADER_BYTES)
            die("model file '%s' is only %llu bytes, too short for the %d-byte header of a version-%d export (%s)",
                path, (unsigned long long)fsize, VERSIONED_HEADER_BYTES, version, MODEL_HINT);
        memcpy(h, raw + 8, sizeof h);
        read_versioned(c, raw, path);
    } else {
        memcpy(h, raw, sizeof h);
        c->header_bytes = V0_HEADER_BYTES;
    }
    if (int8 && c->version != 2)
        die("model file '%s' is an fp32 export (version %d): run it with ./run, or write an int8 one with python export.py --version=2",
            path, c->version);
    if (!int8 && c->version == 2)
        die("model file '%s' is an int8 export (version 2): run it with ./runq (make runq), or export version 0 or 1 for ./run",
            path);
    char hdr[256];
    describe_header(hdr, sizeof hdr, h);
    check_shape(c, h, path, hdr);
    check_size(c, fsize, path, hdr);

    void *m = mmap(NULL, (size_t)fsize, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED)
        die("cannot memory-map model file '%s': %s", path, strerror(errno));
    close(fd);
    *map = m;
    *map_bytes = (size_t)fsize;
}

/* ------------------------------------------------------------------------- */
/* activations and the forward pass's building blocks (shared)                */

typedef struct {
    float *x;       /* residual stream (dim) */
    float *xb;      /* normalised input / attention output (dim) */
    float *xb2;     /* projection output (dim) */
    float *hb;      /* ffn hidden (hidden) */
    float *hb2;     /* ffn gate partner (hidden) */
    float *q;       /* query (dim) */
    float *att;     /* attention weights (n_heads, seq_len) */
    float *logits;  /* (vocab) */
    float *k_cache; /* (L, seq_len, kv_dim) */
    float *v_cache; /* (L, seq_len, kv_dim) */
} Buffers;

static void alloc_buffers(Buffers *b, const Config *c) {
    u128 dim = (u128)c->dim, hid = (u128)c->hidden_dim, cache = (u128)c->n_layers * (u128)c->seq_len * (u128)c->kv_dim;
    b->x = alloc_array(dim, sizeof(float), "activations");
    b->xb = alloc_array(dim, sizeof(float), "activations");
    b->xb2 = alloc_array(dim, sizeof(float), "activations");
    b->hb = alloc_array(hid, sizeof(float), "activations");
    b->hb2 = alloc_array(hid, sizeof(float), "activations");
    b->q = alloc_array(dim, sizeof(float), "activations");
    b->att = alloc_array((u128)c->n_heads * (u128)c->seq_len, sizeof(float), "attention scores");
    b->logits = alloc_array((u128)c->vocab_size, sizeof(float), "logits");
    b->k_cache = alloc_array(cache, sizeof(float), "key cache");
    b->v_cache = alloc_array(cache, sizeof(float), "value cache");
}

static void free_buffers(Buffers *b) {
    free(b->x); free(b->xb); free(b->xb2); free(b->hb); free(b->hb2); free(b->q);
    free(b->att); free(b->logits); free(b->k_cache); free(b->v_cache);
}

/* out = w * x / sqrt(mean(x^2) + 1e-5) */
static void rmsnorm(float *out, const float *x, const float *w, int n) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + 1e-5f);
    for (int i = 0; i < n; i++) out[i] = w[i] * (inv * x[i]);
}

static void softmax(float *v, int n) {
    float top = v[0];
    for (int i = 1; i < n; i++) if (v[i] > top) top = v[i];
    float total = 0.0f;
    for (int i = 0; i < n; i++) { v[i] = expf(v[i] - top); total += v[i]; }
    for (int i = 0; i < n; i++) v[i] /= total;
}

/* With OpenMP, loops with fewer multiply-adds than this run on one thread: waking the
 * thread team costs more than it saves on the matrices of tiny models. Each output row
 * is always summed by one thread in the same order, so threads never change results. */
#define PARALLEL_MIN_WORK 65536

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float acc = 0.0f;
    for (int j = 0; j < n; j++) acc += a[j] * b[j];
    return acc;
}

/* rotary position embedding on consecutive pairs of q (dim) and k (kv_dim) */
static void rope(float *q, float *k, int dim, int kv_dim, int hs, int pos) {
    for (int i = 0; i < dim; i += 2) {
        int within = i % hs;
        float freq = 1.0f / powf(10000.0f, (float)within / (float)hs);
        float angle = (float)pos * freq;
        float co = cosf(angle), si = sinf(angle);
        float a = q[i], bb = q[i + 1];
        q[i] = a * co - bb * si;
        q[i + 1] = a * si + bb * co;
        if (i < kv_dim) {
            a = k[i]; bb = k[i + 1];
            k[i] = a * co - bb * si;
            k[i + 1] = a * si + bb * co;
        }
    }
}

/* one query head h over cached positions 0..pos of kv head kvh; output into xb */
static void attend_head(Buffers *b, const float *kc, const float *vc, int h, int kvh, int pos,
                        int hs, int kv_dim, int seq, float sqrt_hs) {
    const float *qh = b->q + (size_t)h * hs;
    const size_t kv_off = (size_t)kvh * hs;
    float *scores = b->att + (size_t)h * seq;
    for (int t = 0; t <= pos; t++)
        scores[t] = dot(qh, kc + (size_t)t * kv_dim + kv_off, hs) / sqrt_hs; /* divide, as llama2.c */
    softmax(scores, pos + 1);
    float *out = b->xb + (size_t)h * hs;
    for (int i = 0; i < hs; i++) out[i] = 0.0f;
    for (int t = 0; t <= pos; t++) {
        const float *vt = vc + (size_t)t * kv_dim + kv_off;
        const float a = scores[t];
        for (int i = 0; i < hs; i++) out[i] += a * vt[i];
    }
}

/* causal attention of every query head into b->xb, query head h reading kv head h / group;
 * kc, vc: this layer's caches (seq_len, kv_dim) */
static void attention(Buffers *b, const Config *c, const float *kc, const float *vc, int pos) {
    const int hs = c->head_size, n_heads = c->n_heads, group = c->n_heads / c->n_kv_heads;
    const float sqrt_hs = sqrtf((float)hs);
#ifdef _OPENMP
    if ((size_t)n_heads * (size_t)(pos + 1) * (size_t)hs >= PARALLEL_MIN_WORK) {
        int h;
#pragma omp parallel for
        for (h = 0; h < n_heads; h++)
            attend_head(b, kc, vc, h, h / group, pos, hs, c->kv_dim, c->seq_len, sqrt_hs);
        return;
    }
#endif
    for (int h = 0; h < n_heads; h++)
        attend_head(b, kc, vc, h, h / group, pos, hs, c->kv_dim, c->seq_len, sqrt_hs);
}

/* SwiGLU: hb = silu(hb) * hb2, silu in llama2.c's float operations */
static void swiglu(float *hb, const float *hb2, int n) {
    for (int i = 0; i < n; i++) {
        float g = hb[i];
        g *= (1.0f / (1.0f + expf(-g)));
        hb[i] = g * hb2[i];
    }
}

/* The model behind four functions: the fp32 one below, or runq.c's int8 one. */
typedef struct Model Model;
static Model *model_load(const char *path);
static const Config *model_config(const Model *m);
static float *model_forward(Model *m, int token, int pos);
static void model_free(Model *m);

#ifndef RUNQ
/* ------------------------------------------------------------------------- */
/* the fp32 model (versions 0 and 1)                                          */

typedef struct {
    const float *tok_emb;   /* (vocab, dim) */
    const float *rms_att;   /* (L, dim) */
    const float *wq;        /* (L, dim, dim) */
    const float *wk;        /* (L, kv_dim, dim) */
    const float *wv;        /* (L, kv_dim, dim) */
    const float *wo;        /* (L, dim, dim) */
    const float *rms_ffn;   /* (L, dim) */
    const float *w1;        /* (L, hidden, dim) */
    const float *w2;        /* (L, dim, hidden) */
    const float *w3;        /* (L, hidden, dim) */
    const float *rms_final; /* (dim) */
    const float *wcls;      /* (vocab, dim) */
} Weights;

struct Model {
    Config c;
    Weights w;
    Buffers b;
    void *map;
    size_t map_bytes;
};

/* the next n floats of the mapping */
static const float *take(const float **p, size_t n) {
    const float *at = *p;
    *p += n;
    return at;
}

static Model *model_load(const char *path) {
    Model *m = alloc_array(1, sizeof(Model), "the model");
    open_model(path, 0, &m->c, &m->map, &m->map_bytes);
    const Config *c = &m->c;
    /* open_model checked the file size, so every offset below lies inside the mapping */
    size_t dim = (size_t)c->dim, hid = (size_t)c->hidden_dim, L = (size_t)c->n_layers;
    size_t kv = (size_t)c->kv_dim, vocab = (size_t)c->vocab_size;
    const float *p = (const float *)((const char *)m->map + c->header_bytes);
    Weights *w = &m->w;
    if (c->version == 0) {
        w->tok_emb = take(&p, vocab * dim);
        w->rms_att = take(&p, L * dim);
    } else { /* version 1: the norms first, then the matrices */
        w->rms_att = take(&p, L * dim);
        w->rms_ffn = take(&p, L * dim);
        w->rms_final = take(&p, dim);
        w->tok_emb = take(&p, vocab * dim);
    }
    w->wq = take(&p, L * dim * dim);
    w->wk = take(&p, L * kv * dim);
    w->wv = take(&p, L * kv * dim);
    w->wo = take(&p, L * dim * dim);
    if (c->version == 0) w->rms_ffn = take(&p, L * dim);
    w->w1 = take(&p, L * hid * dim);
    w->w2 = take(&p, L * dim * hid);
    w->w3 = take(&p, L * hid * dim);
    if (c->version == 0) {
        w->rms_final = take(&p, dim);
        p += (size_t)c->seq_len * (size_t)c->head_size; /* skip the legacy RoPE tables */
    }
    w->wcls = c->shared_classifier ? w->tok_emb : p;
    alloc_buffers(&m->b, c);
    return m;
}

static const Config *model_config(const Model *m) { return &m->c; }

static void model_free(Model *m) {
    free_buffers(&m->b);
    if (m->map) munmap(m->map, m->map_bytes);
    free(m);
}

/* y (rows) = W (rows, cols) . x (cols); the inner loop is kept plain for the vectoriser */
static void matvec(float *restrict y, const float *restrict W, const float *restrict x, int rows, int cols) {
#ifdef _OPENMP
    if ((size_t)rows * (size_t)cols >= PARALLEL_MIN_WORK) {
        int r;
#pragma omp parallel for
        for (r = 0; r < rows; r++) y[r] = dot(W + (size_t)r * (size_t)cols, x, cols);
        return;
    }
#endif
    for (int r = 0; r < rows; r++) y[r] = dot(W + (size_t)r * (size_t)cols, x, cols);
}

static float *model_forward(Model *m, int token, int pos) {
    const Config *c = &m->c;
    const Weights *w = &m->w;
    Buffers *b = &m->b;
    const size_t dim = (size_t)c->dim, hid = (size_t)c->hidden_dim, kv_dim = (size_t)c->kv_dim;

    memcpy(b->x, w->tok_emb + (size_t)token * dim, dim * sizeof(float));

    for (size_t l = 0; l < (size_t)c->n_layers; l++) {
        const size_t cache_off = l * (size_t)c->seq_len * kv_dim;
        float *k = b->k_cache + cache_off + (size_t)pos * kv_dim; /* write k, v straight into the cache */
        float *v = b->v_cache + cache_off + (size_t)pos * kv_dim;

        rmsnorm(b->xb, b->x, w->rms_att + l * dim, c->dim);
        matvec(b->q, w->wq + l * dim * dim, b->xb, c->dim, c->dim);
        matvec(k, w->wk + l * kv_dim * dim, b->xb, c->kv_dim, c->dim);
        matvec(v, w->wv + l * kv_dim * dim, b->xb, c->kv_dim, c->dim);
        rope(b->q, k, c->dim, c->kv_dim, c->head_size, pos);
        attention(b, c, b->k_cache + cache_off, b->v_cache + cache_off, pos);
        matvec(b->xb2, w->wo + l * dim * dim, b->xb, c->dim, c->dim);
        for (size_t i = 0; i < dim; i++) b->x[i] += b->xb2[i];

        rmsnorm(b->xb, b->x, w->rms_ffn + l * dim, c->dim);
        matvec(b->hb, w->w1 + l * hid * dim, b->xb, c->hidden_dim, c->dim);
        matvec(b->hb2, w->w3 + l * hid * dim, b->xb, c->hidden_dim, c->dim);
        swiglu(b->hb, b->hb2, c->hidden_dim);
        matvec(b->xb, w->w2 + l * dim * hid, b->hb, c->dim, c->hidden_dim);
        for (size_t i = 0; i < dim; i++) b->x[i] += b->xb[i];
    }

    rmsnorm(b->x, b->x, w->rms_final, c->dim);
    matvec(b->logits, w->wcls, b->x, c->vocab_size, c->dim);
    return b->logits;
}
#endif /* RUNQ */

/* ------------------------------------------------------------------------- */
/* tokenizer                                                                  */

typedef struct {
    char **text;   /* piece bytes, NUL-terminated copies */
    int *len;      /* piece lengths (pieces may in principle contain NUL) */
    float *score;
    int *sorted;   /* ids ordered by (bytes, id) for binary search */
    int n;
    int longest;   /* longest piece actually present */
} Tokenizer;

static const Tokenizer *g_sort_tok; /* qsort has no context argument */

static int cmp_bytes(const char *a, int la, const char *b, int lb) {
    int k = la < lb ? la : lb;
    int r = memcmp(a, b, (size_t)k);
    if (r != 0) return r;
    return (la > lb) - (la < lb);
}

static int cmp_ids(const void *pa, const void *pb) {
    int a = *(const int *)pa, b = *(const int *)pb;
    int r = cmp_bytes(g_sort_tok->text[a], g_sort_tok->len[a], g_sort_tok->text[b], g_sort_tok->len[b]);
    if (r != 0) return r;
    return (a > b) - (a < b);
}

static void read_exact(FILE *f, void *dst, size_t n, const char *path, const char *what) {
    if (fread(dst, 1, n, f) != n)
        die("tokenizer file '%s' is truncated: it ends inside %s (%s)", path, what, TOK_HINT);
}

static void load_tokenizer(Tokenizer *t, const char *path, int vocab_size) {
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        die("cannot open tokenizer file '%s': %s (hint: pass -z path/to/tokenizer.bin, or create it with python tokenizer.py)",
            path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode))
        die("tokenizer file '%s' is not a regular file (hint: pass -z path/to/tokenizer.bin)", path);
    uint64_t fsize = (uint64_t)st.st_size;

    int32_t max_len;
    read_exact(f, &max_len, 4, path, "the max_token_length header");
    if (max_len <= 0 || (uint64_t)max_len > fsize)
        die("tokenizer file '%s' has an invalid max_token_length %d (%s)", path, max_len, TOK_HINT);

    t->n = vocab_size;
    t->text = alloc_array((unsigned)vocab_size, sizeof(char *), "tokenizer pieces");
    t->len = alloc_array((unsigned)vocab_size, sizeof(int), "tokenizer pieces");
    t->score = alloc_array((unsigned)vocab_size, sizeof(float), "tokenizer scores");
    t->sorted = alloc_array((unsigned)vocab_size, sizeof(int), "tokenizer index");
    t->longest = 1;

    uint64_t offset = 4;
    for (int i = 0; i < vocab_size; i++) {
        char what[64];
        snprintf(what, sizeof what, "record %d", i);
        float score;
        int32_t n;
        if (offset == fsize)
            die("tokenizer file '%s' has only %d tokens but the model's vocab_size is %d (hint: use the tokenizer the model was trained with, or re-export it with python tokenizer.py)",
                path, i, vocab_size);
        read_exact(f, &score, 4, path, what);
        read_exact(f, &n, 4, path, what);
        offset += 8;
        if (n < 0 || n > max_len)
            die("tokenizer file '%s' has an invalid length %d for token %d (max_token_length is %d) (%s)",
                path, n, i, max_len, TOK_HINT);
        if ((uint64_t)n > fsize - offset)
            die("tokenizer file '%s' is truncated: token %d needs %d bytes but only %llu remain (%s)",
                path, i, n, (unsigned long long)(fsize - offset), TOK_HINT);
        t->text[i] = alloc_array((unsigned)n + 1, 1, "a tokenizer piece");
        read_exact(f, t->text[i], (size_t)n, path, what);
        offset += (uint64_t)n;
        t->len[i] = n;
        t->score[i] = score;
        if (n > t->longest) t->longest = n;
        t->sorted[i] = i;
    }
    if (offset != fsize) /* llama2.c ignores records beyond vocab_size; they mean another vocabulary's file */
        die("tokenizer file '%s' holds more than the model's %d tokens (%llu bytes left after them): it belongs to a model of another vocabulary (hint: use the tokenizer the model was trained with, or re-export it with python tokenizer.py)",
            path, vocab_size, (unsigned long long)(fsize - offset));
    fclose(f);

    g_sort_tok = t;
    qsort(t->sorted, (size_t)vocab_size, sizeof(int), cmp_ids);
    g_sort_tok = NULL;
}

static void free_tokenizer(Tokenizer *t) {
    if (t->text) for (int i = 0; i < t->n; i++) free(t->text[i]);
    free(t->text); free(t->len); free(t->score); free(t->sorted);
}

/* id of the piece equal to s[0..n); among duplicate pieces the lowest id; -1 if absent */
static int find_piece(const Tokenizer *t, const char *s, int n) {
    int lo = 0, hi = t->n; /* first sorted index whose piece is >= s */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int id = t->sorted[mid];
        if (cmp_bytes(t->text[id], t->len[id], s, n) < 0) lo = mid + 1;
        else hi = mid;
    }
    if (lo < t->n) {
        int id = t->sorted[lo];
        if (cmp_bytes(t->text[id], t->len[id], s, n) == 0) return id;
    }
    return -1;
}

/* byte fallback: byte b is token b+3 (sentencepiece's layout); unknown if the vocab is too small */
static int byte_token(const Tokenizer *t, unsigned char b) {
    int id = (int)b + 3;
    return id < t->n ? id : UNK_ID;
}

/*
 * Encode text as llama2.c does: BOS, then (for non-empty text) the piece " " as a
 * dummy prefix, then one token per UTF-8 codepoint (a lead byte plus up to three
 * continuation bytes) or, for codepoints not in the vocab, one byte-fallback token
 * per byte; then repeatedly merge the adjacent pair whose concatenation is a piece
 * with the highest score (first such pair on ties, scores must exceed -1e10).
 * `out` needs room for strlen(text) + 2 ids. Returns the number of ids.
 */
static int encode(const Tokenizer *t, const char *text, int *out) {
    int n = 0;
    out[n++] = BOS_ID;
    if (text[0] != '\0') {
        int sp = find_piece(t, " ", 1);
        out[n++] = sp >= 0 ? sp : byte_token(t, ' ');
    }
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    while (s[i] != '\0') {
        size_t start = i, len = 1;
        while (len < 4 && (s[start + len] & 0xC0) == 0x80) len++;
        i = start + len;
        int id = find_piece(t, (const char *)s + start, (int)len);
        if (id >= 0) {
            out[n++] = id;
        } else {
            for (size_t j = 0; j < len; j++) out[n++] = byte_token(t, s[start + j]);
        }
    }

    char *pair = alloc_array((unsigned)(2 * t->longest + 1), 1, "merge buffer");
    for (;;) {
        float best = -1e10f;
        int best_at = -1, best_id = -1;
        for (int k = 0; k + 1 < n; k++) {
            int a = out[k], b = out[k + 1];
            memcpy(pair, t->text[a], (size_t)t->len[a]);
            memcpy(pair + t->len[a], t->text[b], (size_t)t->len[b]);
            int id = find_piece(t, pair, t->len[a] + t->len[b]);
            if (id >= 0 && t->score[id] > best) {
                best = t->score[id];
                best_at = k;
                best_id = id;
            }
        }
        if (best_at < 0) break;
        out[best_at] = best_id;
        memmove(out + best_at + 1, out + best_at + 2, (size_t)(n - best_at - 2) * sizeof(int));
        n--;
    }
    free(pair);
    return n;
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/*
 * Write the text of `token` following `prev`: a leading space is dropped right after
 * BOS, "<0xXX>" pieces become that raw byte, and a single-byte result is written only
 * if it is printable or whitespace.
 */
static void emit_piece(const Tokenizer *t, int prev, int token) {
    const char *p = t->text[token];
    int n = t->len[token];
    if (prev == BOS_ID && n > 0 && p[0] == ' ') { p++; n--; }
    unsigned char raw;
    if (n == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>' &&
        hexval(p[3]) >= 0 && hexval(p[4]) >= 0) {
        raw = (unsigned char)(hexval(p[3]) * 16 + hexval(p[4]));
        p = (const char *)&raw;
        n = 1;
    }
    if (n == 0) return;
    if (n == 1 && !(isprint((unsigned char)p[0]) || isspace((unsigned char)p[0]))) return;
    fwrite(p, 1, (size_t)n, stdout);
}

/* ------------------------------------------------------------------------- */
/* sampler                                                                    */
/*
 * Reproducible sampling, mirrored exactly by the Python side:
 *   rng: uint64 state = seed (nonzero); xorshift64*:
 *     state ^= state >> 12; state ^= state << 25; state ^= state >> 27;
 *     u32 = (state * 0x2545F4914F6CDD1D) >> 32
 *   f32 = (u32 >> 8) / 16777216.0f      (24 random bits in [0, 1))
 *   temperature 0: argmax, the first index on ties; no random number is drawn.
 *   otherwise: logits /= temperature; softmax (max subtracted, expf, normalised);
 *     coin = f32() (exactly one draw per sampled token), then
 *     topp <= 0 or topp >= 1: first i whose running sum of probs exceeds coin
 *                             (n-1 if rounding leaves none);
 *     else (nucleus): keep ids with prob >= (1-topp)/(n-1), sort by prob descending,
 *       take the shortest prefix whose sum exceeds topp (all kept if none does),
 *       r = coin * sum(prefix), return the first id of the prefix whose running
 *       sum exceeds r (the prefix's last id if rounding leaves none).
 */

typedef struct {
    float prob;
    int id;
} Cand;

typedef struct {
    float temperature, topp;
    uint64_t state;
    Cand *cands;
} Sampler;

static uint32_t rng_u32(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (uint32_t)((*s * 0x2545F4914F6CDD1Dull) >> 32);
}

static float rng_f32(uint64_t *s) {
    return (float)(rng_u32(s) >> 8) / 16777216.0f;
}

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (v[i] > v[best]) best = i;
    return best;
}

static int pick_multinomial(const float *p, int n, float coin) {
    float run = 0.0f;
    for (int i = 0; i < n; i++) {
        run += p[i];
        if (coin < run) return i;
    }
    return n - 1;
}

static int by_prob_desc(const void *a, const void *b) {
    float pa = ((const Cand *)a)->prob, pb = ((const Cand *)b)->prob;
    return (pa < pb) - (pa > pb);
}

static int pick_nucleus(const float *p, int n, float topp, Cand *cands, float coin) {
    const float cutoff = (1.0f - topp) / (float)(n - 1);
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] >= cutoff) { cands[m].prob = p[i]; cands[m].id = i; m++; }
    }
    if (m == 0) return argmax(p, n); /* cannot happen: the largest prob is >= 1/n > cutoff */
    qsort(cands, (size_t)m, sizeof(Cand), by_prob_desc);
    float mass = 0.0f;
    int last = m - 1;
    for (int i = 0; i < m; i++) {
        mass += cands[i].prob;
        if (mass > topp) { last = i; break; }
    }
    const float r = coin * mass;
    float run = 0.0f;
    for (int i = 0; i <= last; i++) {
        run += cands[i].prob;
        if (r < run) return cands[i].id;
    }
    return cands[last].id;
}

static int sample(Sampler *s, float *logits, int n) {
    if (s->temperature == 0.0f) return argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= s->temperature;
    softmax(logits, n);
    float coin = rng_f32(&s->state);
    if (s->topp <= 0.0f || s->topp >= 1.0f) return pick_multinomial(logits, n, coin);
    return pick_nucleus(logits, n, s->topp, s->cands, coin);
}

/* ------------------------------------------------------------------------- */
/* command line                                                               */

static void usage(const char *problem) {
    if (problem) fprintf(stderr, "%s: error: %s\n", g_prog, problem);
    fprintf(stderr, "Usage:   %s <checkpoint> [options]\n"
            "Example: %s model.bin -n 256 -i \"Once upon a time\"\n", g_prog, g_prog);
    fputs("Options:\n"
          "  -t <float>  temperature in [0,inf), default 1.0 (0 = greedy)\n"
          "  -p <float>  top-p (nucleus) sampling in [0,1], default 0.9 (0 or 1 = off)\n"
          "  -s <int>    random seed, default time(NULL) (0 also means time)\n"
          "  -n <int>    number of steps to run, default 256 (0 = seq_len)\n"
          "  -i <string> input prompt\n"
          "  -z <string> tokenizer path, default tokenizer.bin\n"
          "  -m <string> mode: generate (the only mode)\n"
          "  -d <int>    1 = print the generated token ids instead of text, default 0\n",
          stderr);
    exit(1);
}

/* finite by the bits of the double: -ffast-math (make run) assumes no NaN/Inf and folds
 * isfinite() to true, but it cannot reason about integer bit patterns */
static int finite_bits(double v) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return ((u >> 52) & 0x7ff) != 0x7ff;
}

static double parse_float(const char *flag, const char *s) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !finite_bits(v)) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s expects a number, got '%.80s'", flag, s);
        usage(msg);
    }
    return v;
}

static long long parse_int(const char *flag, const char *s) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0') {
        char msg[160];
        snprintf(msg, sizeof msg, "%s expects an integer, got '%.80s'", flag, s);
        usage(msg);
    }
    return v;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int run_main(int argc, char **argv) {
    const char *model_path = NULL, *tok_path = "tokenizer.bin", *prompt = "", *mode = "generate";
    double temperature = 1.0, topp = 0.9;
    long long seed = 0, steps = 256, ids_mode = 0;

    if (argc < 2) usage(NULL);
    model_path = argv[1];
    if (model_path[0] == '-') usage("the first argument must be the model file");
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (strlen(flag) != 2 || flag[0] != '-') {
            char msg[160];
            snprintf(msg, sizeof msg, "unexpected argument '%.80s'", flag);
            usage(msg);
        }
        if (i + 1 >= argc) {
            char msg[64];
            snprintf(msg, sizeof msg, "%s needs a value", flag);
            usage(msg);
        }
        const char *val = argv[i + 1];
        switch (flag[1]) {
        case 't': temperature = parse_float(flag, val); break;
        case 'p': topp = parse_float(flag, val); break;
        case 's': seed = parse_int(flag, val); break;
        case 'n': steps = parse_int(flag, val); break;
        case 'i': prompt = val; break;
        case 'z': tok_path = val; break;
        case 'm': mode = val; break;
        case 'd': ids_mode = parse_int(flag, val); break;
        default: {
            char msg[64];
            snprintf(msg, sizeof msg, "unknown option %s", flag);
            usage(msg);
        }
        }
    }
    if (strcmp(mode, "generate") != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "unsupported mode '%.80s' (only 'generate' is available)", mode);
        usage(msg);
    }
    if (ids_mode != 0 && ids_mode != 1) usage("-d expects 0 or 1");
    /* llama2.c's fix-ups, kept, but said */
    if (temperature < 0.0) {
        fprintf(stderr, "run: warning: -t %g is negative; using 0 (greedy), as llama2.c does\n", temperature);
        temperature = 0.0;
    }
    if (topp < 0.0 || topp > 1.0) {
        fprintf(stderr, "run: warning: -p %g is outside [0, 1]; using 0.9, as llama2.c does\n", topp);
        topp = 0.9;
    }

    Model *model = model_load(model_path);
    const Config *mc = model_config(model);
    const int vocab = mc->vocab_size;

    Tokenizer tok;
    memset(&tok, 0, sizeof tok);
    load_tokenizer(&tok, tok_path, vocab);

    if (steps < 0) fprintf(stderr, "run: warning: -n %lld is negative; using seq_len %d, as llama2.c does\n",
                           steps, mc->seq_len);
    if (steps <= 0 || steps > mc->seq_len) steps = mc->seq_len;

    Sampler sampler;
    sampler.temperature = (float)temperature;
    sampler.topp = (float)topp;
    /* as llama2.c: the seed is taken modulo 2^64, and 0 means "use the clock" */
    sampler.state = (uint64_t)seed;
    if (sampler.state == 0) sampler.state = (uint64_t)time(NULL);
    sampler.cands = alloc_array((unsigned)vocab, sizeof(Cand), "sampler buffer");

    int *prompt_ids = alloc_array((unsigned __int128)strlen(prompt) + 3, sizeof(int), "prompt tokens");
    int n_prompt = encode(&tok, prompt, prompt_ids);
    if (n_prompt > steps) /* llama2.c cuts it without a word: say so, and where */
        fprintf(stderr, "run: warning: the prompt is %d tokens (BOS included) but -n %lld steps (at most seq_len %d) "
                "leave room for %lld of them: it is cut there and nothing is generated\n",
                n_prompt, steps, mc->seq_len, steps);
    int *generated = alloc_array((unsigned __int128)steps, sizeof(int), "output tokens");
    int n_generated = 0;

    double t0 = now_seconds();
    int token = prompt_ids[0];
    int pos = 0;
    while (pos < steps) {
        float *logits = model_forward(model, token, pos);
        int next = pos < n_prompt - 1 ? prompt_ids[pos + 1] : sample(&sampler, logits, vocab);
        pos++;
        if (next == BOS_ID) break;
        if (ids_mode) {
            generated[n_generated++] = next;
        } else {
            emit_piece(&tok, token, next);
            fflush(stdout);
        }
        token = next;
    }
    double elapsed = now_seconds() - t0;

    if (ids_mode) {
        for (int i = 0; i < n_generated; i++) printf(i ? " %d" : "%d", generated[i]);
    }
    putchar('\n');
    fflush(stdout);
    if (pos > 0 && elapsed > 0.0)
        fprintf(stderr, "achieved tok/s: %f\n", (double)pos / elapsed);

    free(generated);
    free(prompt_ids);
    free(sampler.cands);
    free_tokenizer(&tok);
    model_free(model);
    return 0;
}

#ifndef RUNQ
int main(int argc, char **argv) { return run_main(argc, argv); }
#endif
