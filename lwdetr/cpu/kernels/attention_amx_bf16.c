/*
 * Softmax attention forward for bfloat16 inputs with head_dim 16 on CPUs with AMX (Sapphire Rapids and later).
 *
 * Both products run on the AMX tile unit: scores for 16 query rows x 16 keys in one TDPBF16PS (bf16 products,
 * float32 sums), P V for 16 rows x 32 keys in another. The softmax stays in float32 on AVX-512, which is then the
 * bulk of the work; the probabilities are rounded to bf16 only as the left factor of P V (as PyTorch's bf16
 * attention does), and the output once, at the end.
 *
 * Layout (contiguous): qkv [batch, n, 3, heads, 16] and out [batch, n, heads, 16], both bf16.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "attention_common.h"

#define D 16
#define ROWS 16 /* query rows per block: one tile */

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

/* tmm0: scores (16 rows x 16 keys, fp32); tmm1: 16 query rows (16 bf16); tmm2: 16 keys as 8 feature pairs;
 * tmm3: P V accumulator (16 rows x 16 features, fp32); tmm4: 16 rows of P over 32 keys (bf16); tmm5: 32 value rows
 * as 16 key pairs. */
static void configure_tiles(void) {
    tile_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    const uint8_t rows[6] = {16, 16, 8, 16, 16, 16};
    const uint16_t colsb[6] = {64, 2 * D, 64, 4 * D, 64, 4 * D};
    for (int t = 0; t < 6; t++) {
        cfg.rows[t] = rows[t];
        cfg.colsb[t] = colsb[t];
    }
    _tile_loadconfig(&cfg);
}

/* One block of 16 query rows (q rows `step` elements apart; rows past `valid` are zero in the copy used). */
static void block(const uint16_t *q, int64_t step, int64_t valid, int64_t n, int64_t npad, float scale,
                  const uint32_t *kt2, const uint32_t *v2, float *s, uint16_t *pb, uint16_t *qpad, uint16_t *out,
                  int64_t o_step) {
    if (valid < ROWS) { /* a partial last block: load its rows from a zero-padded copy */
        memset(qpad, 0, sizeof(uint16_t) * ROWS * D);
        for (int64_t r = 0; r < valid; r++) memcpy(qpad + r * D, q + r * step, sizeof(uint16_t) * D);
        q = qpad;
        step = D;
    }
    _tile_loadd(1, q, step * sizeof(uint16_t));
    for (int64_t j = 0; j < npad; j += 16) {
        _tile_zero(0);
        _tile_loadd(2, kt2 + j, npad * sizeof(uint32_t));
        _tile_dpbf16ps(0, 1, 2);
        _tile_stored(0, s + j, npad * sizeof(float));
    }
    const __m512 scale2 = _mm512_set1_ps(scale * LOG2E); /* e^(scale s) = 2^(scale log2(e) s) */
    float sums[ROWS];
    for (int r = 0; r < ROWS; r++) {
        const float *sr = s + r * npad;
        __m512 row_max = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16)
            row_max = _mm512_mask_max_ps(row_max, valid_lanes(j, n), row_max, _mm512_loadu_ps(sr + j));
        const __m512 shift2 = _mm512_set1_ps(_mm512_reduce_max_ps(row_max) * scale * LOG2E);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < npad; j += 16) {
            const __m512 e = _mm512_maskz_mov_ps(valid_lanes(j, n),
                                                 exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), scale2, shift2)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pb + r * npad + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        sums[r] = _mm512_reduce_add_ps(sum);
    }
    _tile_zero(3);
    for (int64_t m = 0; m < npad; m += 32) {
        _tile_loadd(4, pb + m, npad * sizeof(uint16_t));
        _tile_loadd(5, v2 + (m / 2) * D, D * sizeof(uint32_t));
        _tile_dpbf16ps(3, 4, 5);
    }
    float acc[ROWS * D];
    _tile_stored(3, acc, D * sizeof(float));
    for (int64_t r = 0; r < valid; r++) {
        const __m512 value = _mm512_div_ps(_mm512_loadu_ps(acc + r * D), _mm512_set1_ps(sums[r]));
        _mm256_storeu_si256((__m256i *)(out + r * o_step), (__m256i)_mm512_cvtneps_pbh(value));
    }
}

/* Keys as feature pairs per key ([8][npad]), values as key pairs per feature ([npad/2][16]), zero padded. */
static void pack(const uint16_t *k, const uint16_t *v, int64_t step, int64_t n, int64_t npad, uint32_t *kt2,
                 uint32_t *v2) {
    memset(kt2, 0, sizeof(uint32_t) * (D / 2) * npad);
    memset(v2, 0, sizeof(uint32_t) * (npad / 2) * D);
    for (int64_t j = 0; j < n; j++) {
        for (int64_t e = 0; e < D / 2; e++) memcpy(kt2 + e * npad + j, k + j * step + 2 * e, sizeof(uint32_t));
        uint16_t *half = (uint16_t *)(v2 + (j / 2) * D) + (j % 2);
        for (int64_t d = 0; d < D; d++) half[2 * d] = v[j * step + d];
    }
}

/* Whether this process may use the AMX tile registers (Linux asks each process to request them, once: the grant
 * lasts for the process, so the answer is kept). */
int lwdetr_amx_available(void) {
    static int granted = -1;
    if (granted < 0)
        granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return granted;
}

/* Returns 0 on success, 1 when scratch memory could not be allocated, 2 for an unsupported shape, 3 without AMX. */
int lwdetr_attention_forward_amx(const uint16_t *qkv, uint16_t *out, int64_t batch, int64_t heads, int64_t n,
                                 int64_t d, float scale, int threads) {
    if (d != D || batch <= 0 || heads <= 0 || n <= 0) return 2;
    if (!lwdetr_amx_available()) return 3;
    const int64_t npad = (n + 31) / 32 * 32, pairs = batch * heads, step = 3 * heads * D, o_step = heads * D;
    if (threads < 1) threads = 1;
    if (threads > pairs) threads = (int)pairs;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        uint32_t *kt2 = aligned_alloc(64, sizeof(uint32_t) * (size_t)(D / 2 * npad));
        uint32_t *v2 = aligned_alloc(64, sizeof(uint32_t) * (size_t)(D * npad / 2));
        float *s = aligned_alloc(64, sizeof(float) * (size_t)(ROWS * npad));
        uint16_t *pb = aligned_alloc(64, sizeof(uint16_t) * (size_t)(ROWS * npad));
        uint16_t *qpad = aligned_alloc(64, sizeof(uint16_t) * ROWS * D);
        if (!kt2 || !v2 || !s || !pb || !qpad) failed = 1;
        if (!failed) configure_tiles();
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            if (failed) continue;
            const int64_t b = p / heads, h = p % heads;
            const uint16_t *q = qkv + b * n * step + h * D;
            uint16_t *o = out + b * n * o_step + h * D;
            pack(q + heads * D, q + 2 * heads * D, step, n, npad, kt2, v2);
            for (int64_t i = 0; i < n; i += ROWS) {
                const int64_t valid = n - i < ROWS ? n - i : ROWS;
                block(q + i * step, step, valid, n, npad, scale, kt2, v2, s, pb, qpad, o + i * o_step, o_step);
            }
        }
        if (!failed) _tile_release();
        free(kt2);
        free(v2);
        free(s);
        free(pb);
        free(qpad);
    }
    return failed;
}
