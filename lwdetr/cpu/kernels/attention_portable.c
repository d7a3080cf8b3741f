/*
 * Softmax attention for short heads (head_dim 16, 32, 48 or 64), float32, forward and backward, for any x86-64
 * vector width: the algorithm of attention_avx512.c written once in GCC's generic vector types, so that the compiler
 * picks the instructions for the target it is given: 8-lane AVX2 + FMA code under -mavx2 -mfma (the build for
 * AVX2-only CPUs), 16-lane AVX-512 under -mavx512f, 4-lane SSE2 with no flags. Only the register tiles depend on
 * the width (how many accumulators fit in 16 or 32 vector registers), chosen below at compile time.
 *
 *   out[b, i, h, :] = sum_j P[i, j] v[b, j, h, :],  P[i, :] = softmax(scale * q[b, i, h, :] . k[b, :, h, :])
 *
 * A head's keys (transposed) and values are packed once; a block of query rows computes whole rows of scores at
 * once (LW-DETR's sequences, at most a few thousand tokens, keep them in cache), so the softmax needs no online
 * rescaling: scores, max, exp-and-sum, then P V. PyTorch's flash attention instead runs a BLAS call per 16-feature
 * product and rescales its running sums per key block.
 *
 * Layout (all contiguous): qkv [batch, n, 3, heads, d] (the fused projection's output), out and dout
 * [batch, n, heads, d], lse [batch, heads, n] (log-sum-exp of each row of scaled scores, kept for the backward),
 * dqkv like qkv. Work is split over (batch, head) pairs between OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#define ACCUMULATORS 16 /* of 32 vector registers: the rest hold loaded rows and broadcasts */
#elif defined(__AVX__)
#define LANES 8
#define ACCUMULATORS 12 /* of 16 */
#else
#define LANES 4
#define ACCUMULATORS 12 /* of 16 */
#endif

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef float vf_unaligned __attribute__((vector_size(4 * LANES), aligned(4), may_alias));

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf v) { *(vf_unaligned *)p = v; }
static inline vf splat(float x) { return x - (vf){0}; } /* x - 0 is x, also for -0 (x + 0 is not): one broadcast */
/* a > b ? a : b per lane (a compare and a blend) */
static inline vf vmax(vf a, vf b) {
    const vi a_wins = a > b;
    return (vf)((a_wins & (vi)a) | (~a_wins & (vi)b));
}
static inline vi lane_index(void) {
    vi index;
    for (int i = 0; i < LANES; i++) index[i] = i;
    return index;
}
/* Lane permutations that swap halves, then quarters, ...: a horizontal sum or max in log2(LANES) steps. */
#if LANES == 16
static const vi SWAPS[] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                           {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                           {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                           {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
#elif LANES == 8
static const vi SWAPS[] = {{4, 5, 6, 7, 0, 1, 2, 3}, {2, 3, 0, 1, 6, 7, 4, 5}, {1, 0, 3, 2, 5, 4, 7, 6}};
#else
static const vi SWAPS[] = {{2, 3, 0, 1}, {1, 0, 3, 2}};
#endif
#define STEPS ((int)(sizeof(SWAPS) / sizeof(SWAPS[0])))
static inline float hmax(vf v) {
    for (int k = 0; k < STEPS; k++) v = vmax(v, __builtin_shuffle(v, SWAPS[k]));
    return v[0];
}
static inline float hsum(vf v) {
    for (int k = 0; k < STEPS; k++) v += __builtin_shuffle(v, SWAPS[k]);
    return v[0];
}

#define LOG2E 1.44269504088896341f

/* 2^y for y <= 0 (softmax terms), within 2.2e-7 relative: y = n + f with |f| <= 1/2, 2^f from a degree-5
 * polynomial fitted to it on [-1/2, 1/2] (relative error 7.5e-8 before float32 rounding; one multiply-add fewer than
 * the degree-6 fit of attention_common.h, and a common relative error cancels in the softmax's normalisation), 2^n
 * written into the exponent field. Adding 1.5 * 2^23 + 127 rounds y to an integer and leaves n + 127 in the low
 * bits of the sum, which a shift moves into the exponent field. y below -127 gives 0 (the true value is below
 * 2^-126, which no softmax sum notices); NaN stays NaN. */
static inline vf exp2_v(vf y) {
    const vf magic = splat(12582912.0f + 127.0f);
    for (int i = 0; i < LANES; i++) y[i] = y[i] < -127.0f ? -127.0f : y[i]; /* a compare and a blend; NaN kept */
    const vf shifted = y + magic;
    const vf n = shifted - magic, f = y - n;
    vf p = splat(1.3276446843519807e-03f);
    p = p * f + 9.675533510744572e-03f;
    p = p * f + 5.550713092088699e-02f;
    p = p * f + 2.4022120237350464e-01f;
    p = p * f + 6.931469440460205e-01f;
    p = p * f + 1.0000001192092896f;
    return p * (vf)((vi)shifted << 23); /* n = -127 gives the bits of 0.0f */
}

typedef struct {
    int64_t batch, heads, n, d, npad; /* npad: n rounded up to whole vectors */
    float scale;
} shape_t;

/* The score tiles: SCORE_ROWS rows of q by SCORE_CHUNKS vectors of keys, all in accumulators. */
#ifndef SCORE_ROWS
#define SCORE_ROWS 4
#endif
#ifndef SCORE_CHUNKS
#define SCORE_CHUNKS (ACCUMULATORS / SCORE_ROWS)
#endif

/* dst[r, j..j+C*LANES) = a[r, :] . bt[:, j..j+C*LANES) for RS (<= 4) rows of a (row step a_step) and C vectors of
 * columns of bt ([D][npad]): each load of bt is shared by RS rows, each broadcast element of a by C vectors. */
static inline __attribute__((always_inline)) void dot_tile(const int RS, const int C, const int D, const float *a,
                                                            int64_t a_step, const float *bt, int64_t npad, int64_t j,
                                                            float *dst) {
    vf acc[SCORE_ROWS][SCORE_CHUNKS];
    for (int r = 0; r < RS; r++)
        for (int c = 0; c < C; c++) acc[r][c] = splat(0.0f);
#pragma GCC unroll 16
    for (int d = 0; d < D; d++) {
        vf col[SCORE_CHUNKS];
        for (int c = 0; c < C; c++) col[c] = load(bt + d * npad + j + LANES * c);
        for (int r = 0; r < RS; r++) {
            const vf ad = splat(a[r * a_step + d]);
            for (int c = 0; c < C; c++) acc[r][c] += ad * col[c];
        }
    }
    for (int r = 0; r < RS; r++)
        for (int c = 0; c < C; c++) store(dst + r * npad + j + LANES * c, acc[r][c]);
}

/* dst[R][npad] = a[R rows] . bt over all npad columns: tiles of SCORE_ROWS rows, then one of the rows left. */
static inline __attribute__((always_inline)) void dot_row_tiles(const int RS, const int D, const float *a,
                                                                 int64_t a_step, const float *bt, int64_t npad,
                                                                 float *dst) {
    int64_t j = 0;
    for (; j + SCORE_CHUNKS * LANES <= npad; j += SCORE_CHUNKS * LANES) dot_tile(RS, SCORE_CHUNKS, D, a, a_step, bt, npad, j, dst);
    for (; j < npad; j += LANES) dot_tile(RS, 1, D, a, a_step, bt, npad, j, dst);
}

static inline __attribute__((always_inline)) void dot_rows(const int R, const int D, const float *a, int64_t a_step,
                                                            const float *bt, int64_t npad, float *dst) {
    int r0 = 0;
    for (; r0 + SCORE_ROWS <= R; r0 += SCORE_ROWS) dot_row_tiles(SCORE_ROWS, D, a + r0 * a_step, a_step, bt, npad, dst + r0 * npad);
    if (R % SCORE_ROWS) dot_row_tiles(R % SCORE_ROWS, D, a + r0 * a_step, a_step, bt, npad, dst + r0 * npad);
}

/* out[r, :G*LANES] = sum_{j < n} w[r, j] rows[j, :G*LANES] / divisor[r] (or times `factor` when divisor is NULL)
 * for R rows of w ([R][npad]); rows has row step D. R x G accumulators, two sets (even and odd keys) when G is 1, so
 * that each chain of FMAs waits on its previous result every other key. */
static inline __attribute__((always_inline)) void weighted_rows(const int R, const int G, const float *w,
                                                                 int64_t npad, const float *rows, int64_t D,
                                                                 int64_t n, const float *divisor, float factor,
                                                                 float *out, int64_t o_step) {
    const int S = G == 1 ? 2 : 1;
    vf acc[2][ACCUMULATORS][4];
    for (int k = 0; k < S; k++)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < G; c++) acc[k][r][c] = splat(0.0f);
    int64_t j = 0;
    for (; j + S <= n; j += S)
        for (int k = 0; k < S; k++) {
            vf row[4];
            for (int c = 0; c < G; c++) row[c] = load(rows + (j + k) * D + c * LANES);
            for (int r = 0; r < R; r++) {
                const vf wr = splat(w[r * npad + j + k]);
                for (int c = 0; c < G; c++) acc[k][r][c] += wr * row[c];
            }
        }
    for (; j < n; j++) {
        vf row[4];
        for (int c = 0; c < G; c++) row[c] = load(rows + j * D + c * LANES);
        for (int r = 0; r < R; r++) {
            const vf wr = splat(w[r * npad + j]);
            for (int c = 0; c < G; c++) acc[0][r][c] += wr * row[c];
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < G; c++) {
            const vf sum = S == 2 ? acc[0][r][c] + acc[1][r][c] : acc[0][r][c];
            store(out + r * o_step + c * LANES, divisor ? sum / divisor[r] : sum * factor);
        }
}

/* acc[j, :G*LANES] += sum_r w[r, j] rows[r, :G*LANES] for every key j < n: the R rows (row step r_step) held in
 * registers; acc has row step D. */
static inline __attribute__((always_inline)) void accumulate_keys(const int R, const int G, const float *w,
                                                                   int64_t npad, const float *rows, int64_t r_step,
                                                                   int64_t n, float *acc, int64_t D) {
    vf held[ACCUMULATORS][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < G; c++) held[r][c] = load(rows + r * r_step + c * LANES);
    for (int64_t j = 0; j < n; j++) {
        vf sum[4];
        for (int c = 0; c < G; c++) sum[c] = load(acc + j * D + c * LANES);
        for (int r = 0; r < R; r++) {
            const vf wr = splat(w[r * npad + j]);
            for (int c = 0; c < G; c++) sum[c] += wr * held[r][c];
        }
        for (int c = 0; c < G; c++) store(acc + j * D + c * LANES, sum[c]);
    }
}

/* Per-thread scratch for one (batch, head) pair. */
typedef struct {
    float *kt, *vt, *kp, *vp, *dk, *dv, *s, *ds;
} scratch_t;

#define MAX_BLOCK 16 /* query rows per block, at most */

static void free_scratch(scratch_t *w) {
    free(w->kt);
    free(w->vt);
    free(w->kp);
    free(w->vp);
    free(w->dk);
    free(w->dv);
    free(w->s);
    free(w->ds);
}

static int alloc_scratch(scratch_t *w, const shape_t *sh, int backward) {
    const size_t block = sizeof(float) * (size_t)(sh->d * sh->npad), rows = sizeof(float) * MAX_BLOCK * sh->npad;
    memset(w, 0, sizeof(*w));
    w->kt = aligned_alloc(64, block);
    w->vp = aligned_alloc(64, block);
    w->s = aligned_alloc(64, rows);
    int ok = w->kt && w->vp && w->s;
    if (backward) {
        w->vt = aligned_alloc(64, block);
        w->kp = aligned_alloc(64, block);
        w->dk = aligned_alloc(64, block);
        w->dv = aligned_alloc(64, block);
        w->ds = aligned_alloc(64, rows);
        ok = ok && w->vt && w->kp && w->dk && w->dv && w->ds;
    }
    return ok;
}

/* Transposed ([D][npad], keys past n zero) and row ([n][D]) copies of one head's keys or values. Plain loops: a
 * head packs n * D floats, against n * n * D multiply-adds of the products. */
static void pack_head(const float *src, int64_t step, int64_t n, int64_t D, int64_t npad, float *transposed,
                      float *rows) {
    if (rows)
        for (int64_t j = 0; j < n; j++) memcpy(rows + j * D, src + j * step, sizeof(float) * D);
    if (!transposed) return;
    for (int64_t d = 0; d < D; d++) {
        for (int64_t j = 0; j < n; j++) transposed[d * npad + j] = src[j * step + d];
        for (int64_t j = n; j < npad; j++) transposed[d * npad + j] = 0.0f;
    }
}

/* Turns R rows of raw scores into exp(scale s - max), zero past n; returns each row's sum in sums and (if lse) its
 * log-sum-exp. */
static inline __attribute__((always_inline)) void softmax_rows(const int R, const shape_t *sh, float *scores,
                                                                float *sums, float *lse) {
    const int64_t n = sh->n, npad = sh->npad, full = n / LANES * LANES; /* keys in whole vectors */
    const vf scale2 = splat(sh->scale * LOG2E); /* e^(scale s) = 2^(scale log2(e) s) */
    for (int r = 0; r < R; r++) {
        float *s = scores + r * npad;
        vf maxima[4]; /* four running maxima: one would wait on the previous max at every vector */
        for (int k = 0; k < 4; k++) maxima[k] = splat(-INFINITY);
        int64_t j = 0;
        for (; j + 4 * LANES <= full; j += 4 * LANES)
            for (int k = 0; k < 4; k++) maxima[k] = vmax(load(s + j + LANES * k), maxima[k]);
        for (; j < full; j += LANES) maxima[0] = vmax(load(s + j), maxima[0]);
        float row_max = hmax(vmax(vmax(maxima[0], maxima[1]), vmax(maxima[2], maxima[3])));
        for (; j < n; j++) row_max = s[j] > row_max ? s[j] : row_max;
        const float shift = row_max * sh->scale;
        const vf shift2 = splat(shift * LOG2E);
        vf sum = splat(0.0f);
        for (j = 0; j < npad; j += LANES) {
            vf e = exp2_v(load(s + j) * scale2 - shift2);
            if (j >= full) e = (vf)((vi)e & (lane_index() < (int32_t)(n - j))); /* padding lanes (last vector only) become 0 */
            store(s + j, e);
            sum += e;
        }
        const float total = hsum(sum);
        sums[r] = total;
        if (lse) lse[r] = shift + logf(total);
    }
}

/* The products with the values (or keys) of R rows of weights: column groups of G vectors, RW rows per pass (R x G
 * within the accumulators), then one pass of the rows left. */
#define VALUE_PASSES(R, RW, PASS)                          \
    do {                                                   \
        int r0 = 0;                                        \
        for (; r0 + (RW) <= (R); r0 += (RW)) PASS((RW));   \
        if ((R) % (RW)) PASS((R) % (RW));                  \
    } while (0)

/* Forward of R query rows: out rows and (if lse) their log-sum-exp. */
static inline __attribute__((always_inline)) void forward_rows(const int R, const int D, const int G, const int RW,
                                                                const shape_t *sh, const float *q, int64_t step,
                                                                const scratch_t *w, float *out, int64_t o_step,
                                                                float *lse) {
    float sums[MAX_BLOCK];
    dot_rows(R, D, q, step, w->kt, sh->npad, w->s);
    softmax_rows(R, sh, w->s, sums, lse);
#define FORWARD_PASS(ROWS)                                                                                     \
    for (int c0 = 0; c0 < D; c0 += G * LANES)                                                                  \
        weighted_rows(ROWS, G, w->s + r0 * sh->npad, sh->npad, w->vp + c0, D, sh->n, sums + r0, 1.0f,           \
                      out + r0 * o_step + c0, o_step)
    VALUE_PASSES(R, RW, FORWARD_PASS);
#undef FORWARD_PASS
}

/* Backward of R query rows: their dq rows, and their share of every key's dk and value's dv (accumulated). */
static inline __attribute__((always_inline)) void backward_rows(const int R, const int D, const int G, const int RW,
                                                                 const shape_t *sh, const float *q, int64_t step,
                                                                 const float *o, const float *dout, int64_t o_step,
                                                                 const float *lse, const scratch_t *w, float *dq) {
    const int64_t n = sh->n, npad = sh->npad;
    dot_rows(R, D, q, step, w->kt, npad, w->s);       /* raw scores */
    dot_rows(R, D, dout, o_step, w->vt, npad, w->ds); /* dP = dout v^T */
    const vf scale2 = splat(sh->scale * LOG2E);
    for (int r = 0; r < R; r++) {
        float delta = 0.0f; /* sum_j P dP = dout . out */
        for (int64_t d = 0; d < D; d++) delta += dout[r * o_step + d] * o[r * o_step + d];
        const vf shift2 = splat(lse[r] * LOG2E), delta_v = splat(delta);
        float *s = w->s + r * npad, *ds = w->ds + r * npad;
        for (int64_t j = 0; j < npad; j += LANES) {
            const vf p = exp2_v(load(s + j) * scale2 - shift2);
            store(s + j, p);
            /* gradient of the raw score over `scale`: P (dP - delta); dq and dk take the factor at the end */
            store(ds + j, p * (load(ds + j) - delta_v));
        }
        for (int64_t j = n; j < npad; j++) s[j] = ds[j] = 0.0f; /* padding keys */
    }
#define BACKWARD_PASS(ROWS)                                                                                    \
    for (int c0 = 0; c0 < D; c0 += G * LANES) {                                                                \
        /* dq = scale dS k; dk += dS^T q; dv += P^T dout */                                                     \
        weighted_rows(ROWS, G, w->ds + r0 * npad, npad, w->kp + c0, D, n, NULL, sh->scale, dq + r0 * step + c0, \
                      step);                                                                                   \
        accumulate_keys(ROWS, G, w->ds + r0 * npad, npad, q + r0 * step + c0, step, n, w->dk + c0, D);          \
        accumulate_keys(ROWS, G, w->s + r0 * npad, npad, dout + r0 * o_step + c0, o_step, n, w->dv + c0, D);    \
    }
    VALUE_PASSES(R, RW, BACKWARD_PASS);
#undef BACKWARD_PASS
}

/* One specialised (fully unrolled) copy of the per-head code for each head size: blocks of R query rows, then blocks
 * of SCORE_ROWS for the rows left (a 100-token window: 8 x 12 + 4), values summed G vectors and RW rows at a time.
 * The forward's last SCORE_ROWS block may overlap the one before it (recomputing a few rows, writing the same
 * results), so no row runs alone; the backward, which accumulates, runs the last few rows one by one. */
#define DEFINE_HEAD(D_, R, G, RW)                                                                                     \
    static __attribute__((noinline)) void forward_head_d##D_(const shape_t *sh, const float *q, const float *k,     \
                                                               const float *v, int64_t step, float *out,            \
                                                               int64_t o_step, float *lse, const scratch_t *w) {    \
        const int64_t n = sh->n;                                                                                     \
        pack_head(k, step, n, D_, sh->npad, w->kt, NULL);                                                            \
        pack_head(v, step, n, D_, sh->npad, NULL, w->vp);                                                            \
        int64_t i = 0;                                                                                               \
        for (; i + R <= n; i += R)                                                                                   \
            forward_rows(R, D_, G, RW, sh, q + i * step, step, w, out + i * o_step, o_step, lse ? lse + i : NULL);   \
        for (; i + SCORE_ROWS <= n; i += SCORE_ROWS)                                                                 \
            forward_rows(SCORE_ROWS, D_, G, RW, sh, q + i * step, step, w, out + i * o_step, o_step,                 \
                         lse ? lse + i : NULL);                                                                      \
        if (i < n && n >= SCORE_ROWS) {                                                                              \
            i = n - SCORE_ROWS;                                                                                      \
            forward_rows(SCORE_ROWS, D_, G, RW, sh, q + i * step, step, w, out + i * o_step, o_step,                 \
                         lse ? lse + i : NULL);                                                                      \
        }                                                                                                            \
        for (; i < n && n < SCORE_ROWS; i++)                                                                         \
            forward_rows(1, D_, G, RW, sh, q + i * step, step, w, out + i * o_step, o_step, lse ? lse + i : NULL);   \
    }                                                                                                                \
    static __attribute__((noinline)) void backward_head_d##D_(                                                       \
        const shape_t *sh, const float *q, const float *k, const float *v, int64_t step, const float *o,            \
        const float *dout, int64_t o_step, const float *lse, const scratch_t *w, float *dq, float *dk, float *dv) { \
        const int64_t n = sh->n;                                                                                     \
        pack_head(k, step, n, D_, sh->npad, w->kt, w->kp);                                                           \
        pack_head(v, step, n, D_, sh->npad, w->vt, NULL);                                                            \
        memset(w->dk, 0, sizeof(float) * sh->npad * D_);                                                             \
        memset(w->dv, 0, sizeof(float) * sh->npad * D_);                                                             \
        int64_t i = 0;                                                                                               \
        for (; i + R <= n; i += R)                                                                                   \
            backward_rows(R, D_, G, RW, sh, q + i * step, step, o + i * o_step, dout + i * o_step, o_step, lse + i, \
                          w, dq + i * step);                                                                         \
        for (; i + SCORE_ROWS <= n; i += SCORE_ROWS)                                                                 \
            backward_rows(SCORE_ROWS, D_, G, RW, sh, q + i * step, step, o + i * o_step, dout + i * o_step, o_step, \
                          lse + i, w, dq + i * step);                                                                \
        for (; i < n; i++)                                                                                           \
            backward_rows(1, D_, G, RW, sh, q + i * step, step, o + i * o_step, dout + i * o_step, o_step, lse + i, \
                          w, dq + i * step);                                                                         \
        for (int64_t j = 0; j < n; j++)                                                                              \
            for (int64_t d = 0; d < D_; d++) {                                                                       \
                dk[j * step + d] = w->dk[j * D_ + d] * sh->scale;                                                    \
                dv[j * step + d] = w->dv[j * D_ + d];                                                                \
            }                                                                                                        \
    }

/* Per head size: query rows per block, vectors per column group and rows per pass over the values (rows x vectors,
 * twice that for one vector, within the accumulators). Measured on the AVX2 build (/ 1600 keys, head size 16): */
#if LANES == 16
#ifndef TILES_16
#define TILES_16 8, 1, 8
#endif
#ifndef TILES_32
#define TILES_32 8, 2, 8
#endif
#ifndef TILES_48
#define TILES_48 4, 3, 4
#endif
#ifndef TILES_64
#define TILES_64 4, 4, 4
#endif
#elif LANES == 8
#ifndef TILES_16
#define TILES_16 12, 2, 6
#endif
#ifndef TILES_32
#define TILES_32 12, 2, 6
#endif
#ifndef TILES_48
#define TILES_48 12, 3, 4
#endif
#ifndef TILES_64
#define TILES_64 12, 4, 3
#endif
#else
#ifndef TILES_16
#define TILES_16 12, 4, 3
#endif
#ifndef TILES_32
#define TILES_32 12, 4, 3
#endif
#ifndef TILES_48
#define TILES_48 12, 4, 3
#endif
#ifndef TILES_64
#define TILES_64 12, 4, 3
#endif
#endif
#define DEFINE_HEAD_TILED(...) DEFINE_HEAD(__VA_ARGS__)
DEFINE_HEAD_TILED(16, TILES_16)
DEFINE_HEAD_TILED(32, TILES_32)
DEFINE_HEAD_TILED(48, TILES_48)
DEFINE_HEAD_TILED(64, TILES_64)

static int check_shape(shape_t *sh, int64_t batch, int64_t heads, int64_t n, int64_t d, float scale) {
    if (d != 16 && d != 32 && d != 48 && d != 64) return 0;
    if (batch <= 0 || heads <= 0 || n <= 0) return 0;
    *sh = (shape_t){batch, heads, n, d, (n + LANES - 1) / LANES * LANES, scale};
    return 1;
}

static int clamp_threads(int threads, int64_t pairs) {
    if (threads < 1) threads = 1;
    return threads > pairs ? (int)pairs : threads;
}

typedef void (*pair_job_t)(const void *args, const shape_t *sh, int64_t pair, const scratch_t *w);

/* Runs `job` on every (batch, head) pair, split between OpenMP threads, each with its own scratch: PyTorch's own
 * OpenMP runtime (this library links against the libgomp already loaded), so its threads are the ones still
 * spinning after the previous PyTorch op. Returns 0, or 1 when scratch memory could not be allocated. */
static int for_each_pair(const shape_t *sh, int threads, int backward, pair_job_t job, const void *args) {
    const int64_t pairs = sh->batch * sh->heads;
    int failed = 0;
#pragma omp parallel num_threads(clamp_threads(threads, pairs)) reduction(| : failed)
    {
        scratch_t w;
        if (!alloc_scratch(&w, sh, backward)) failed = 1;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; pair++)
            if (!failed) job(args, sh, pair, &w);
        free_scratch(&w);
    }
    return failed;
}

typedef struct {
    const float *qkv, *out, *dout, *lse;
    float *result, *result_lse; /* forward: out and lse (may be NULL); backward: dqkv */
} tensors_t;

static void forward_pair(const void *args, const shape_t *sh, int64_t pair, const scratch_t *w) {
    const tensors_t *t = args;
    const int64_t d = sh->d, heads = sh->heads, step = 3 * heads * d, o_step = heads * d;
    const int64_t b = pair / heads, h = pair % heads;
    const float *q = t->qkv + b * sh->n * step + h * d, *k = q + heads * d, *v = q + 2 * heads * d;
    float *o = t->result + b * sh->n * o_step + h * d;
    float *l = t->result_lse ? t->result_lse + pair * sh->n : NULL;
    switch (d) {
        case 16: forward_head_d16(sh, q, k, v, step, o, o_step, l, w); break;
        case 32: forward_head_d32(sh, q, k, v, step, o, o_step, l, w); break;
        case 48: forward_head_d48(sh, q, k, v, step, o, o_step, l, w); break;
        default: forward_head_d64(sh, q, k, v, step, o, o_step, l, w); break;
    }
}

static void backward_pair(const void *args, const shape_t *sh, int64_t pair, const scratch_t *w) {
    const tensors_t *t = args;
    const int64_t d = sh->d, heads = sh->heads, step = 3 * heads * d, o_step = heads * d;
    const int64_t b = pair / heads, h = pair % heads;
    const float *q = t->qkv + b * sh->n * step + h * d, *k = q + heads * d, *v = q + 2 * heads * d;
    const float *o = t->out + b * sh->n * o_step + h * d, *go = t->dout + b * sh->n * o_step + h * d;
    float *dq = t->result + b * sh->n * step + h * d, *dk = dq + heads * d, *dv = dq + 2 * heads * d;
    const float *l = t->lse + pair * sh->n;
    switch (d) {
        case 16: backward_head_d16(sh, q, k, v, step, o, go, o_step, l, w, dq, dk, dv); break;
        case 32: backward_head_d32(sh, q, k, v, step, o, go, o_step, l, w, dq, dk, dv); break;
        case 48: backward_head_d48(sh, q, k, v, step, o, go, o_step, l, w, dq, dk, dv); break;
        default: backward_head_d64(sh, q, k, v, step, o, go, o_step, l, w, dq, dk, dv); break;
    }
}

/* The vector width this library was compiled for, in floats (8 for AVX2, 16 for AVX-512). */
int lwdetr_vector_lanes(void) { return LANES; }

/* Both return 0 on success, 1 when scratch memory could not be allocated, 2 for an unsupported shape. */
int lwdetr_attention_forward(const float *qkv, float *out, float *lse, int64_t batch, int64_t heads, int64_t n,
                             int64_t d, float scale, int threads) {
    shape_t sh;
    if (!check_shape(&sh, batch, heads, n, d, scale)) return 2;
    const tensors_t t = {qkv, NULL, NULL, NULL, out, lse};
    return for_each_pair(&sh, threads, 0, forward_pair, &t);
}

int lwdetr_attention_backward(const float *qkv, const float *out, const float *dout, const float *lse, float *dqkv,
                              int64_t batch, int64_t heads, int64_t n, int64_t d, float scale, int threads) {
    shape_t sh;
    if (!check_shape(&sh, batch, heads, n, d, scale)) return 2;
    const tensors_t t = {qkv, out, dout, lse, dqkv, NULL};
    return for_each_pair(&sh, threads, 1, backward_pair, &t);
}
