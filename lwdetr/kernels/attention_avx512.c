/*
 * Softmax attention for short heads (head_dim a multiple of 16, at most 64) on AVX-512 CPUs, float32.
 *
 * out[b, i, h, :] = sum_j softmax_j(scale * q[b, i, h, :] . k[b, j, h, :]) v[b, j, h, :]
 *
 * Why a kernel of our own: with head_dim 16 a general flash-attention kernel spends most of its time around tiny
 * GEMMs (K = 16) and in its online-softmax bookkeeping. Here a head's keys (transposed) and values are packed once,
 * a block of R query rows computes its full row of scores at once (the sequences are short enough to keep
 * R x N scores in cache), so the softmax needs no rescaling: scores, one max, one exp-and-sum pass, then P V.
 * Each 16-wide key chunk of K^T is loaded once per R rows, each value row once per R rows.
 *
 * Layout: q, k, v, out are addressed by element strides (batch, token, head); the head's features are contiguous.
 * Work is split over (batch, head) pairs between `threads` OpenMP threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *q, *k, *v;
    float *out;
    int64_t batch, heads, n, d;
    int64_t q_strides[3], k_strides[3], v_strides[3], o_strides[3]; /* batch, token, head */
    float scale;
} problem_t;

/* e^x for x <= 0, about 1 ulp: Cody-Waite range reduction and a degree-6 minimax polynomial (the classic Cephes
 * single-precision coefficients); vscalefps applies 2^n and flushes below the float range to 0. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
    poly = _mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r);
    poly = _mm512_add_ps(poly, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(poly, n);
}

/* Raw scores q k^T of RS (<= 4) query rows against C 16-key chunks starting at key j. RS x C accumulators share
 * each key load RS ways and each broadcast query feature C ways. */
static inline __attribute__((always_inline)) void score_tile(const int RS, const int C, const int D, const float *q,
                                                              int64_t q_step, const float *kt, int64_t npad,
                                                              int64_t j, float *scores) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < RS; r++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int d = 0; d < D; d++) {
        __m512 kd[4];
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) kd[c] = _mm512_loadu_ps(kt + d * npad + j + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < RS; r++) {
            const __m512 qd = _mm512_set1_ps(q[r * q_step + d]);
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(qd, kd[c], acc[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RS; r++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) _mm512_storeu_ps(scores + r * npad + j + 16 * c, acc[r][c]);
}

/* R query rows of one head against all n keys. kt: [DV*16][npad] (keys transposed, zero padded); vp: [n][DV*16];
 * scores: scratch of R * npad floats. */
static inline __attribute__((always_inline)) void rows_block(
    const int R, const int DV, const float *q, int64_t q_step, const float *kt, const float *vp, int64_t n,
    int64_t npad, float scale, float *scores, float *out, int64_t o_step) {
    const int D = DV * 16;
    const int RS = R < 4 ? R : 4;
    const __mmask16 tail = (n % 16) ? (__mmask16)((1u << (n % 16)) - 1u) : (__mmask16)0xFFFF;
    /* raw scores q k^T */
    for (int r0 = 0; r0 < R; r0 += RS) {
        int64_t j = 0;
        for (; j + 64 <= npad; j += 64) score_tile(RS, 4, D, q + r0 * q_step, q_step, kt, npad, j, scores + r0 * npad);
        for (; j < npad; j += 16) score_tile(RS, 1, D, q + r0 * q_step, q_step, kt, npad, j, scores + r0 * npad);
    }

    /* per row: the maximum, then the unnormalised probabilities exp(scale * (s - max)) and their sum */
    const __m512 scale_v = _mm512_set1_ps(scale);
    float row_sum[8];
    for (int r = 0; r < R; r++) {
        float *s = scores + r * npad;
        __m512 row_max = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < npad; j += 16) {
            const __mmask16 valid = (j + 16 > n) ? tail : (__mmask16)0xFFFF;
            row_max = _mm512_mask_max_ps(row_max, valid, row_max, _mm512_loadu_ps(s + j));
        }
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(row_max) * scale);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < npad; j += 16) {
            const __mmask16 valid = (j + 16 > n) ? tail : (__mmask16)0xFFFF;
            const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), scale_v, shift);
            const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive(x));
            _mm512_storeu_ps(s + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        row_sum[r] = _mm512_reduce_add_ps(sum);
    }

    /* out = (P V) / sum */
    __m512 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < DV; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 vj[4];
        for (int c = 0; c < DV; c++) vj[c] = _mm512_loadu_ps(vp + j * D + c * 16);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512 pr = _mm512_set1_ps(scores[r * npad + j]);
            for (int c = 0; c < DV; c++) acc[r][c] = _mm512_fmadd_ps(pr, vj[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++) {
        const __m512 total = _mm512_set1_ps(row_sum[r]);
        for (int c = 0; c < DV; c++) _mm512_storeu_ps(out + r * o_step + c * 16, _mm512_div_ps(acc[r][c], total));
    }
}

/* One (batch, head) pair: pack K^T and V, then walk the query rows in blocks of R. */
static inline __attribute__((always_inline)) void one_head(const int R, const int DV, const problem_t *p,
                                                            int64_t b, int64_t h, float *kt, float *vp,
                                                            float *scores) {
    const int64_t n = p->n, D = DV * 16, npad = (n + 15) / 16 * 16;
    const float *q = p->q + b * p->q_strides[0] + h * p->q_strides[2];
    const float *k = p->k + b * p->k_strides[0] + h * p->k_strides[2];
    const float *v = p->v + b * p->v_strides[0] + h * p->v_strides[2];
    float *out = p->out + b * p->o_strides[0] + h * p->o_strides[2];
    memset(kt, 0, sizeof(float) * D * npad);
    for (int64_t j = 0; j < n; j++) {
        const float *kj = k + j * p->k_strides[1];
        for (int64_t d = 0; d < D; d++) kt[d * npad + j] = kj[d];
        memcpy(vp + j * D, v + j * p->v_strides[1], sizeof(float) * D);
    }
    int64_t i = 0;
    for (; i + R <= n; i += R)
        rows_block(R, DV, q + i * p->q_strides[1], p->q_strides[1], kt, vp, n, npad, p->scale, scores,
                   out + i * p->o_strides[1], p->o_strides[1]);
    for (; i < n; i++)
        rows_block(1, DV, q + i * p->q_strides[1], p->q_strides[1], kt, vp, n, npad, p->scale, scores,
                   out + i * p->o_strides[1], p->o_strides[1]);
}

/* One specialised (hence fully unrolled) copy of the per-head code for each supported head size. */
#define DEFINE_HEAD(NAME, R, DV)                                                                                      \
    static __attribute__((noinline)) void NAME(const problem_t *p, int64_t b, int64_t h, float *kt, float *vp,       \
                                               float *scores) {                                                       \
        one_head(R, DV, p, b, h, kt, vp, scores);                                                                     \
    }
DEFINE_HEAD(head_d16, 8, 1)
DEFINE_HEAD(head_d32, 8, 2)
DEFINE_HEAD(head_d48, 4, 3)
DEFINE_HEAD(head_d64, 4, 4)

/* Returns 0 on success, 1 when scratch memory could not be allocated, 2 for an unsupported head size. */
int lwdetr_attention_f32(const float *q, const float *k, const float *v, float *out, int64_t batch, int64_t heads,
                         int64_t n, int64_t d, const int64_t *strides, float scale, int threads) {
    if (d <= 0 || d > 64 || d % 16 || n <= 0) return 2;
    problem_t p = {q, k, v, out, batch, heads, n, d, {0}, {0}, {0}, {0}, scale};
    for (int i = 0; i < 3; i++) {
        p.q_strides[i] = strides[i];
        p.k_strides[i] = strides[3 + i];
        p.v_strides[i] = strides[6 + i];
        p.o_strides[i] = strides[9 + i];
    }
    const int64_t pairs = batch * heads, npad = (n + 15) / 16 * 16;
    if (threads < 1) threads = 1;
    if (threads > pairs) threads = (int)pairs;
    int failed = 0;
    /* Torch's own OpenMP runtime runs this region (the library links against it), so its worker threads are the
     * ones already spinning after the previous PyTorch op rather than competitors for the same cores. */
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *kt = aligned_alloc(64, sizeof(float) * (size_t)(d * npad));
        float *vp = aligned_alloc(64, sizeof(float) * (size_t)(d * npad));
        float *scores = aligned_alloc(64, sizeof(float) * (size_t)(8 * npad));
        if (!kt || !vp || !scores) failed = 1;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; pair++) {
            if (failed) continue;
            const int64_t b = pair / heads, h = pair % heads;
            switch (d) {
                case 16: head_d16(&p, b, h, kt, vp, scores); break;
                case 32: head_d32(&p, b, h, kt, vp, scores); break;
                case 48: head_d48(&p, b, h, kt, vp, scores); break;
                default: head_d64(&p, b, h, kt, vp, scores); break;
            }
        }
        free(kt);
        free(vp);
        free(scores);
    }
    return failed;
}
