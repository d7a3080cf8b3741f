/*
 * Softmax attention for short heads (head_dim 16, 32, 48 or 64) on AVX-512 CPUs, float32, forward and backward.
 *
 *   out[b, i, h, :] = sum_j P[i, j] v[b, j, h, :],  P[i, :] = softmax(scale * q[b, i, h, :] . k[b, :, h, :])
 *
 * Why a kernel of our own: with head_dim 16 a general flash-attention kernel spends much of its time around tiny
 * GEMMs (K = 16) and in online-softmax bookkeeping. Here a head's keys (transposed) and values are packed once, and
 * a block of R query rows computes its whole rows of scores at once (LW-DETR's sequences, at most a few thousand
 * tokens, keep R x N scores in cache), so the softmax needs no rescaling: scores, max, exp-and-sum, then P V.
 *
 * Layout (all contiguous): qkv [batch, n, 3, heads, d] (the fused projection's output), out and dout
 * [batch, n, heads, d], lse [batch, heads, n] (log-sum-exp of each row of scaled scores, kept for the backward),
 * dqkv like qkv. Work is split over (batch, head) pairs between OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_common.h"

typedef struct {
    int64_t batch, heads, n, d, npad;
    float scale;
} shape_t;

/* dst[r, j..j+16C) = a[r, :] . bt[:, j..j+16C) for RS (<= 4) rows of a (row step a_step) and C 16-column chunks of
 * bt ([D][npad]). RS x C accumulators share each load of bt RS ways and each broadcast element of a C ways. */
static inline __attribute__((always_inline)) void dot_tile(const int RS, const int C, const int D, const float *a,
                                                            int64_t a_step, const float *bt, int64_t npad, int64_t j,
                                                            float *dst) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < RS; r++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int d = 0; d < D; d++) {
        __m512 col[4];
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) col[c] = _mm512_loadu_ps(bt + d * npad + j + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < RS; r++) {
            const __m512 ad = _mm512_set1_ps(a[r * a_step + d]);
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(ad, col[c], acc[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RS; r++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) _mm512_storeu_ps(dst + r * npad + j + 16 * c, acc[r][c]);
}

/* dst[R][npad] = a[R rows] . bt over all npad columns. */
static inline __attribute__((always_inline)) void dot_rows(const int R, const int D, const float *a, int64_t a_step,
                                                            const float *bt, int64_t npad, float *dst) {
    const int RS = R < 4 ? R : 4;
    for (int r0 = 0; r0 < R; r0 += RS) {
        int64_t j = 0;
        for (; j + 64 <= npad; j += 64) dot_tile(RS, 4, D, a + r0 * a_step, a_step, bt, npad, j, dst + r0 * npad);
        const int rest = (int)((npad - j) / 16); /* the last 16-column chunks in one tile of 1 to 3 */
        if (rest == 3) dot_tile(RS, 3, D, a + r0 * a_step, a_step, bt, npad, j, dst + r0 * npad);
        else if (rest == 2) dot_tile(RS, 2, D, a + r0 * a_step, a_step, bt, npad, j, dst + r0 * npad);
        else if (rest == 1) dot_tile(RS, 1, D, a + r0 * a_step, a_step, bt, npad, j, dst + r0 * npad);
    }
}

/* out[r, :] = sum_{j < n} w[r, j] rows[j, :] / divisor[r] (or times `factor` when divisor is NULL) for R rows of
 * w ([R][npad]) and rows [n][DV*16]. */
static inline __attribute__((always_inline)) void weighted_rows(const int R, const int DV, const float *w,
                                                                 int64_t npad, const float *rows, int64_t n,
                                                                 const float *divisor, float factor, float *out,
                                                                 int64_t o_step) {
    const int D = DV * 16;
    /* two accumulators per output vector (even and odd keys) when one head vector is all there is: each FMA
     * chain then waits on its previous result every other key, not every key */
    const int S = DV == 1 ? 2 : 1;
    __m512 acc[2][8][4];
    for (int k = 0; k < S; k++)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < DV; c++) acc[k][r][c] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + S <= n; j += S) {
#pragma GCC unroll 2
        for (int k = 0; k < S; k++) {
            __m512 row[4];
            for (int c = 0; c < DV; c++) row[c] = _mm512_loadu_ps(rows + (j + k) * D + c * 16);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const __m512 wr = _mm512_set1_ps(w[r * npad + j + k]);
                for (int c = 0; c < DV; c++) acc[k][r][c] = _mm512_fmadd_ps(wr, row[c], acc[k][r][c]);
            }
        }
    }
    for (; j < n; j++) {
        __m512 row[4];
        for (int c = 0; c < DV; c++) row[c] = _mm512_loadu_ps(rows + j * D + c * 16);
        for (int r = 0; r < R; r++) {
            const __m512 wr = _mm512_set1_ps(w[r * npad + j]);
            for (int c = 0; c < DV; c++) acc[0][r][c] = _mm512_fmadd_ps(wr, row[c], acc[0][r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < DV; c++) {
            const __m512 sum = S == 2 ? _mm512_add_ps(acc[0][r][c], acc[1][r][c]) : acc[0][r][c];
            const __m512 value = divisor ? _mm512_div_ps(sum, _mm512_set1_ps(divisor[r]))
                                         : _mm512_mul_ps(sum, _mm512_set1_ps(factor));
            _mm512_storeu_ps(out + r * o_step + c * 16, value);
        }
}

/* acc[j, :] += sum_r w[r, j] rows[r, :] for every key j < n: the R rows (row step r_step) kept in registers. */
static inline __attribute__((always_inline)) void accumulate_keys(const int R, const int DV, const float *w,
                                                                   int64_t npad, const float *rows, int64_t r_step,
                                                                   int64_t n, float *acc) {
    const int D = DV * 16;
    __m512 held[8][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < DV; c++) held[r][c] = _mm512_loadu_ps(rows + r * r_step + c * 16);
    for (int64_t j = 0; j < n; j++) {
        __m512 sum[4];
        for (int c = 0; c < DV; c++) sum[c] = _mm512_loadu_ps(acc + j * D + c * 16);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512 wr = _mm512_set1_ps(w[r * npad + j]);
            for (int c = 0; c < DV; c++) sum[c] = _mm512_fmadd_ps(wr, held[r][c], sum[c]);
        }
        for (int c = 0; c < DV; c++) _mm512_storeu_ps(acc + j * D + c * 16, sum[c]);
    }
}

/* acc_t[d, j..j+16C) += sum_{r < R} a[r, d] w[r, j..j+16C) for d in [d0, d0 + 4): 4 x C accumulators, each
 * load of w shared 4 ways and each broadcast element of a C ways (the dot_tile pattern, keys along the lanes). */
static inline __attribute__((always_inline)) void accumulate_tile(const int R, const int C, const float *w,
                                                                   int64_t npad, const float *a, int64_t a_step,
                                                                   int d0, int64_t j, float *acc_t) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int dd = 0; dd < 4; dd++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) acc[dd][c] = _mm512_loadu_ps(acc_t + (d0 + dd) * npad + j + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        __m512 wr[4];
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) wr[c] = _mm512_loadu_ps(w + r * npad + j + 16 * c);
#pragma GCC unroll 4
        for (int dd = 0; dd < 4; dd++) {
            const __m512 ad = _mm512_set1_ps(a[r * a_step + d0 + dd]);
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) acc[dd][c] = _mm512_fmadd_ps(ad, wr[c], acc[dd][c]);
        }
    }
#pragma GCC unroll 4
    for (int dd = 0; dd < 4; dd++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) _mm512_storeu_ps(acc_t + (d0 + dd) * npad + j + 16 * c, acc[dd][c]);
}

/* acc_t[d, j] += sum_{r < R} a[r, d] w[r, j] for every d < D and key j < npad: acc_t is [D][npad], transposed. */
static inline __attribute__((always_inline)) void accumulate_keys_t(const int R, const int D, const float *w,
                                                                     int64_t npad, const float *a, int64_t a_step,
                                                                     float *acc_t) {
    int64_t j = 0;
    for (; j + 64 <= npad; j += 64)
        for (int d0 = 0; d0 < D; d0 += 4) accumulate_tile(R, 4, w, npad, a, a_step, d0, j, acc_t);
    const int rest = (int)((npad - j) / 16); /* the last 16-key chunks in one tile of 1 to 3 */
    for (int d0 = 0; d0 < D; d0 += 4) {
        if (rest == 3) accumulate_tile(R, 3, w, npad, a, a_step, d0, j, acc_t);
        else if (rest == 2) accumulate_tile(R, 2, w, npad, a, a_step, d0, j, acc_t);
        else if (rest == 1) accumulate_tile(R, 1, w, npad, a, a_step, d0, j, acc_t);
    }
}

/* Per-thread scratch for one (batch, head) pair. */
typedef struct {
    float *kt, *vt, *kp, *vp, *dk, *dv, *s, *ds;
} scratch_t;

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
    const size_t block = sizeof(float) * (size_t)(sh->d * sh->npad);
    memset(w, 0, sizeof(*w));
    w->kt = aligned_alloc(64, block);
    w->vp = aligned_alloc(64, block);
    w->s = aligned_alloc(64, sizeof(float) * (size_t)(8 * sh->npad));
    int ok = w->kt && w->vp && w->s;
    if (backward) {
        w->vt = aligned_alloc(64, block);
        w->kp = aligned_alloc(64, block);
        w->dk = aligned_alloc(64, block);
        w->dv = aligned_alloc(64, block);
        w->ds = aligned_alloc(64, sizeof(float) * (size_t)(8 * sh->npad));
        ok = ok && w->vt && w->kp && w->dk && w->dv && w->ds;
    }
    return ok;
}

/* Transposes the 16 x 16 block held in r[0..15] (row i = r[i]) in registers: 64 shuffles instead of 256 scalar
 * stores to 16 different cache lines. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) { /* interleave pairs of rows, 32 bits at a time */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* then 64 bits */
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 16; i += 8) /* then 128-bit lanes, twice */
        for (int k = 0; k < 4; k++) {
            t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xdd);
        }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd);
    }
}

/* Transposed ([D][npad], zero padded) and row ([n][D]) copies of one head's keys or values. */
static void pack_head(const float *src, int64_t step, int64_t n, int64_t D, int64_t npad, float *transposed,
                      float *rows) {
    if (rows)
        for (int64_t j = 0; j < n; j++) memcpy(rows + j * D, src + j * step, sizeof(float) * D);
    if (!transposed) return;
    for (int64_t j0 = 0; j0 < npad; j0 += 16) /* 16 keys by 16 features at a time; keys past n become zeros */
        for (int64_t c = 0; c < D; c += 16) {
            __m512 block[16];
            for (int i = 0; i < 16; i++)
                block[i] = j0 + i < n ? _mm512_loadu_ps(src + (j0 + i) * step + c) : _mm512_setzero_ps();
            transpose16(block);
            for (int d = 0; d < 16; d++) _mm512_storeu_ps(transposed + (c + d) * npad + j0, block[d]);
        }
}

/* rows[j * step + d] = factor * acc_t[d, j] for j < n, d < D: transposed back 16 x 16 in registers. */
static void untranspose_keys(const float *acc_t, int64_t npad, int64_t n, int64_t D, float factor, float *rows,
                             int64_t step) {
    const __m512 f = _mm512_set1_ps(factor);
    for (int64_t j0 = 0; j0 < n; j0 += 16)
        for (int64_t c = 0; c < D; c += 16) {
            __m512 block[16];
            for (int d = 0; d < 16; d++) block[d] = _mm512_mul_ps(_mm512_loadu_ps(acc_t + (c + d) * npad + j0), f);
            transpose16(block);
            for (int i = 0; i < 16 && j0 + i < n; i++) _mm512_storeu_ps(rows + (j0 + i) * step + c, block[i]);
        }
}

/* Forward of R query rows: out rows and (if lse) their log-sum-exp. */
static inline __attribute__((always_inline)) void forward_rows(const int R, const int DV, const shape_t *sh,
                                                                const float *q, int64_t step, const scratch_t *w,
                                                                float *out, int64_t o_step, float *lse) {
    const int64_t n = sh->n, npad = sh->npad, full = n / 16 * 16; /* keys in whole 16-lane chunks */
    dot_rows(R, DV * 16, q, step, w->kt, npad, w->s);
    const __m512 scale2 = _mm512_set1_ps(sh->scale * LOG2E); /* e^(scale s) = 2^(scale log2(e) s) */
    float sums[8];
    for (int r = 0; r < R; r++) {
        float *s = w->s + r * npad;
        /* four running maxima: one would wait on the previous max's latency at every chunk */
        __m512 maxima[4];
        for (int k = 0; k < 4; k++) maxima[k] = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 64 <= full; j += 64)
            for (int k = 0; k < 4; k++) maxima[k] = _mm512_max_ps(maxima[k], _mm512_loadu_ps(s + j + 16 * k));
        for (; j < full; j += 16) maxima[0] = _mm512_max_ps(maxima[0], _mm512_loadu_ps(s + j));
        __m512 row_max = _mm512_max_ps(_mm512_max_ps(maxima[0], maxima[1]), _mm512_max_ps(maxima[2], maxima[3]));
        if (full < n) row_max = _mm512_mask_max_ps(row_max, valid_lanes(full, n), row_max, _mm512_loadu_ps(s + full));
        const float shift = _mm512_reduce_max_ps(row_max) * sh->scale;
        const __m512 shift2 = _mm512_set1_ps(shift * LOG2E);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < npad; j += 16) { /* lanes past n (only in the last chunk) become 0 */
            __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), scale2, shift2));
            if (j >= full) e = _mm512_maskz_mov_ps(valid_lanes(j, n), e);
            _mm512_storeu_ps(s + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        sums[r] = _mm512_reduce_add_ps(sum);
        if (lse) lse[r] = shift + logf(sums[r]);
    }
    weighted_rows(R, DV, w->s, npad, w->vp, n, sums, 1.0f, out, o_step);
}

/* Where dk and dv accumulate over the blocks of query rows: transposed ([D][npad], keys along the lanes) for head
 * size 16, where the per-key form ([n][D]) has one vector per key and waits on loads and chains of FMAs (backward
 * of a 1600-token layer 12-19 % faster); per key for the larger heads, where it measured 3-7 % faster. */
#define KEYS_TRANSPOSED(DV) ((DV) == 1)

/* Backward of R query rows: their dq rows, and their share of every key's dk and value's dv (accumulated). */
static inline __attribute__((always_inline)) void backward_rows(const int R, const int DV, const shape_t *sh,
                                                                 const float *q, int64_t step, const float *o,
                                                                 const float *dout, int64_t o_step, const float *lse,
                                                                 const scratch_t *w, float *dq) {
    const int64_t n = sh->n, npad = sh->npad, D = DV * 16, full = n / 16 * 16;
    dot_rows(R, D, q, step, w->kt, npad, w->s);      /* raw scores */
    dot_rows(R, D, dout, o_step, w->vt, npad, w->ds); /* dP = dout v^T */
    const __m512 scale2 = _mm512_set1_ps(sh->scale * LOG2E);
    for (int r = 0; r < R; r++) {
        float delta = 0.0f; /* sum_j P dP = dout . out */
        for (int64_t d = 0; d < D; d++) delta += dout[r * o_step + d] * o[r * o_step + d];
        const __m512 shift2 = _mm512_set1_ps(lse[r] * LOG2E), delta_v = _mm512_set1_ps(delta);
        float *s = w->s + r * npad, *ds = w->ds + r * npad;
        for (int64_t j = 0; j < npad; j += 16) {
            __m512 p = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), scale2, shift2));
            if (j >= full) p = _mm512_maskz_mov_ps(valid_lanes(j, n), p); /* lanes past n (last chunk only) */
            _mm512_storeu_ps(s + j, p);
            /* gradient of the raw score over `scale`: P (dP - delta); dq and dk take the factor at the end */
            _mm512_storeu_ps(ds + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(ds + j), delta_v)));
        }
    }
    weighted_rows(R, DV, w->ds, npad, w->kp, n, NULL, sh->scale, dq, step); /* dq = scale dS k */
    if (KEYS_TRANSPOSED(DV)) {
        accumulate_keys_t(R, D, w->ds, npad, q, step, w->dk);      /* dk^T += q^T dS */
        accumulate_keys_t(R, D, w->s, npad, dout, o_step, w->dv); /* dv^T += dout^T P */
        return;
    }
    /* four rows per pass over the keys: with eight, the eight row pointers do not fit the registers beside
     * the held rows and each key's chain of eight dependent FMAs stalls */
    const int RA = R < 4 ? R : 4;
    for (int r0 = 0; r0 < R; r0 += RA) {
        accumulate_keys(RA, DV, w->ds + r0 * npad, npad, q + r0 * step, step, n, w->dk); /* dk += dS^T q */
        accumulate_keys(RA, DV, w->s + r0 * npad, npad, dout + r0 * o_step, o_step, n, w->dv); /* dv += P^T dout */
    }
}

/* One specialised (fully unrolled) copy of the per-head code for each head size: R rows per block, DV vectors. */
#define DEFINE_HEAD(D_, R, DV)                                                                                        \
    static __attribute__((noinline)) void forward_head_d##D_(const shape_t *sh, const float *q, const float *k,     \
                                                               const float *v, int64_t step, float *out,            \
                                                               int64_t o_step, float *lse, const scratch_t *w) {    \
        pack_head(k, step, sh->n, D_, sh->npad, w->kt, NULL);                                                        \
        pack_head(v, step, sh->n, D_, sh->npad, NULL, w->vp);                                                        \
        int64_t i = 0;                                                                                               \
        for (; i + R <= sh->n; i += R)                                                                               \
            forward_rows(R, DV, sh, q + i * step, step, w, out + i * o_step, o_step, lse ? lse + i : NULL);         \
        for (; i < sh->n; i++)                                                                                       \
            forward_rows(1, DV, sh, q + i * step, step, w, out + i * o_step, o_step, lse ? lse + i : NULL);         \
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
            backward_rows(R, DV, sh, q + i * step, step, o + i * o_step, dout + i * o_step, o_step, lse + i, w,     \
                          dq + i * step);                                                                            \
        for (; i < n; i++)                                                                                           \
            backward_rows(1, DV, sh, q + i * step, step, o + i * o_step, dout + i * o_step, o_step, lse + i, w,     \
                          dq + i * step);                                                                            \
        if (KEYS_TRANSPOSED(DV)) {                                                                                   \
            untranspose_keys(w->dk, sh->npad, n, D_, sh->scale, dk, step);                                           \
            untranspose_keys(w->dv, sh->npad, n, D_, 1.0f, dv, step);                                                \
            return;                                                                                                  \
        }                                                                                                            \
        for (int64_t j = 0; j < n; j++) {                                                                            \
            for (int64_t d = 0; d < D_; d++) dk[j * step + d] = w->dk[j * D_ + d] * sh->scale;                      \
            memcpy(dv + j * step, w->dv + j * D_, sizeof(float) * D_);                                               \
        }                                                                                                            \
    }
DEFINE_HEAD(16, 8, 1)
DEFINE_HEAD(32, 8, 2)
DEFINE_HEAD(48, 4, 3)
DEFINE_HEAD(64, 4, 4)

static int check_shape(shape_t *sh, int64_t batch, int64_t heads, int64_t n, int64_t d, float scale) {
    if (d != 16 && d != 32 && d != 48 && d != 64) return 0;
    if (batch <= 0 || heads <= 0 || n <= 0) return 0;
    *sh = (shape_t){batch, heads, n, d, (n + 15) / 16 * 16, scale};
    return 1;
}

static int clamp_threads(int threads, int64_t pairs) {
    if (threads < 1) threads = 1;
    return threads > pairs ? (int)pairs : threads;
}

/* The work of one (batch, head) pair, given the per-thread scratch. */
typedef void (*pair_job_t)(const void *args, const shape_t *sh, int64_t pair, const scratch_t *w);

/* Runs `job` on every (batch, head) pair, split between OpenMP threads, each with its own scratch. The parallel
 * region runs on PyTorch's own OpenMP runtime (this library links against the libgomp already loaded), so its
 * threads are the ones still spinning after the previous PyTorch op, not competitors for the same cores.
 * Returns 0, or 1 when scratch memory could not be allocated. */
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
