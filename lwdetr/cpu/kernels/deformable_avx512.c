/*
 * Multi-scale deformable attention's sampling (Deformable DETR) on AVX-512 CPUs, float32, forward and backward.
 *
 *   out[b, q, h, :] = sum_{l, p} a[b, q, h, l, p] * bilinear(value of level l, head h; loc[b, q, h, l, p])
 *
 * bilinear as `grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)` on the location mapped to
 * the grid as 2 loc - 1: pixel x = loc_x W - 0.5, y = loc_y H - 0.5; corners outside the map contribute zero.
 *
 * Why a kernel of our own: PyTorch samples level by level with grid_sample on a channels-first copy of the values,
 * then weights and sums the samples in separate passes over [batch * heads, head_dim, queries, points] tensors,
 * and back again in the backward. Here a head's features (16 floats per vector) are read in place from the value
 * projection's token-major output, and the backward computes the value, location and weight gradients in one pass.
 *
 * Layout: value [batch, tokens, heads, D] with row (token) step value_step and batch step value_batch_step, the
 * levels one after another, row-major; loc [batch, queries, heads, levels, points, 2] (x, y); attn [batch, queries,
 * heads, levels, points]; out and dout [batch, queries, heads, D]; grad_value contiguous [batch, tokens, heads, D],
 * zero on entry. Work is split over (batch, head) pairs between OpenMP threads: in the backward each pair owns its
 * slice of grad_value, so the scatter needs no atomics.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

typedef struct {
    int64_t batch, tokens, heads, D, queries, levels, points, value_step, value_batch_step;
    const int64_t *shapes; /* [levels][2]: height, width */
} shape_t;

/* The four bilinear corners of one sampling location: token offsets (from the level's start), weights, and whether
 * each lies on the map (one outside samples zero; a corner on the map may still weigh exactly 0, yet it counts
 * in the location's gradient). */
typedef struct {
    int64_t offset[4]; /* (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1) */
    float weight[4];
    int inside[4];
    float fx, fy; /* fractional position between the corners */
} corners_t;

static inline void find_corners(float loc_x, float loc_y, int64_t height, int64_t width, corners_t *c) {
    const float x = loc_x * (float)width - 0.5f, y = loc_y * (float)height - 0.5f;
    for (int k = 0; k < 4; k++) {
        c->offset[k] = 0;
        c->weight[k] = 0.0f;
        c->inside[k] = 0;
    }
    c->fx = c->fy = 0.0f;
    /* no corner on the map otherwise (at exactly -1 the corner at 0 is, with weight 0); false for NaN too */
    if (!(x >= -1.0f && x < (float)width && y >= -1.0f && y < (float)height)) return;
    const float x0f = floorf(x), y0f = floorf(y);
    const int64_t x0 = (int64_t)x0f, y0 = (int64_t)y0f;
    const float fx = x - x0f, fy = y - y0f;
    c->fx = fx;
    c->fy = fy;
    const float wx[2] = {1.0f - fx, fx}, wy[2] = {1.0f - fy, fy};
    for (int k = 0; k < 4; k++) {
        const int64_t xc = x0 + (k & 1), yc = y0 + (k >> 1);
        if (xc >= 0 && xc < width && yc >= 0 && yc < height) {
            c->offset[k] = yc * width + xc;
            c->weight[k] = wx[k & 1] * wy[k >> 1];
            c->inside[k] = 1;
        }
    }
}

/* Index of (b, q, h, level 0, point 0) in attn (times 2 in loc). */
static inline int64_t point_base(const shape_t *sh, int64_t b, int64_t q, int64_t h) {
    return ((b * sh->queries + q) * sh->heads + h) * sh->levels * sh->points;
}

static void forward_pair(const shape_t *sh, int64_t b, int64_t h, const float *value, const float *loc,
                         const float *attn, float *out) {
    const int64_t D = sh->D, DV = D / 16;
    const float *head_value = value + b * sh->value_batch_step + h * D;
    for (int64_t q = 0; q < sh->queries; q++) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const int64_t base = point_base(sh, b, q, h);
        int64_t start = 0;
        for (int64_t l = 0; l < sh->levels; l++) {
            const int64_t height = sh->shapes[2 * l], width = sh->shapes[2 * l + 1];
            const float *level_value = head_value + start * sh->value_step;
            for (int64_t p = 0; p < sh->points; p++) {
                const int64_t i = base + l * sh->points + p;
                corners_t c;
                find_corners(loc[2 * i], loc[2 * i + 1], height, width, &c);
                for (int k = 0; k < 4; k++) {
                    if (!c.inside[k]) continue;
                    const __m512 w = _mm512_set1_ps(attn[i] * c.weight[k]);
                    const float *v = level_value + c.offset[k] * sh->value_step;
                    for (int64_t j = 0; j < DV; j++) acc[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16 * j), acc[j]);
                }
            }
            start += height * width;
        }
        float *o = out + ((b * sh->queries + q) * sh->heads + h) * D;
        for (int64_t j = 0; j < DV; j++) _mm512_storeu_ps(o + 16 * j, acc[j]);
    }
}

static void backward_pair(const shape_t *sh, int64_t b, int64_t h, const float *value, const float *loc,
                          const float *attn, const float *dout, float *grad_value, float *grad_loc,
                          float *grad_attn) {
    const int64_t D = sh->D, DV = D / 16, row = sh->heads * D;
    const float *head_value = value + b * sh->value_batch_step + h * D;
    float *head_grad = grad_value + b * sh->tokens * row + h * D;
    for (int64_t q = 0; q < sh->queries; q++) {
        const float *g = dout + ((b * sh->queries + q) * sh->heads + h) * D;
        __m512 grad[4];
        for (int64_t j = 0; j < DV; j++) grad[j] = _mm512_loadu_ps(g + 16 * j);
        const int64_t base = point_base(sh, b, q, h);
        int64_t start = 0;
        for (int64_t l = 0; l < sh->levels; l++) {
            const int64_t height = sh->shapes[2 * l], width = sh->shapes[2 * l + 1];
            const float *level_value = head_value + start * sh->value_step;
            float *level_grad = head_grad + start * row;
            for (int64_t p = 0; p < sh->points; p++) {
                const int64_t i = base + l * sh->points + p;
                corners_t c;
                find_corners(loc[2 * i], loc[2 * i + 1], height, width, &c);
                float dots[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* dout . value at each corner (0 outside the map) */
                for (int k = 0; k < 4; k++) {
                    if (!c.inside[k]) continue;
                    const float *v = level_value + c.offset[k] * sh->value_step;
                    __m512 s = _mm512_mul_ps(grad[0], _mm512_loadu_ps(v));
                    for (int64_t j = 1; j < DV; j++) s = _mm512_fmadd_ps(grad[j], _mm512_loadu_ps(v + 16 * j), s);
                    dots[k] = _mm512_reduce_add_ps(s);
                    const __m512 w = _mm512_set1_ps(attn[i] * c.weight[k]);
                    float *dv = level_grad + c.offset[k] * row;
                    for (int64_t j = 0; j < DV; j++)
                        _mm512_storeu_ps(dv + 16 * j, _mm512_fmadd_ps(w, grad[j], _mm512_loadu_ps(dv + 16 * j)));
                }
                grad_attn[i] = c.weight[0] * dots[0] + c.weight[1] * dots[1] + c.weight[2] * dots[2] +
                               c.weight[3] * dots[3];
                const float fx = c.fx, fy = c.fy;
                const float dx = (1.0f - fy) * (dots[1] - dots[0]) + fy * (dots[3] - dots[2]);
                const float dy = (1.0f - fx) * (dots[2] - dots[0]) + fx * (dots[3] - dots[1]);
                grad_loc[2 * i] = attn[i] * (float)width * dx;
                grad_loc[2 * i + 1] = attn[i] * (float)height * dy;
            }
            start += height * width;
        }
    }
}

static int check_shape(const shape_t *sh) {
    if (sh->D % 16 || sh->D < 16 || sh->D > 64) return 0;
    if (sh->batch <= 0 || sh->heads <= 0 || sh->queries < 0 || sh->levels <= 0 || sh->points <= 0) return 0;
    int64_t tokens = 0;
    for (int64_t l = 0; l < sh->levels; l++) {
        if (sh->shapes[2 * l] <= 0 || sh->shapes[2 * l + 1] <= 0) return 0;
        tokens += sh->shapes[2 * l] * sh->shapes[2 * l + 1];
    }
    return tokens == sh->tokens;
}

/* Both return 0 on success, 2 for an unsupported shape. */
int lwdetr_deformable_forward(const float *value, const float *loc, const float *attn, float *out,
                              const int64_t *shapes, int64_t batch, int64_t tokens, int64_t heads, int64_t D,
                              int64_t queries, int64_t levels, int64_t points, int64_t value_step,
                              int64_t value_batch_step, int threads) {
    const shape_t sh = {batch, tokens, heads, D, queries, levels, points, value_step, value_batch_step, shapes};
    if (!check_shape(&sh)) return 2;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (int64_t pair = 0; pair < batch * heads; pair++)
        forward_pair(&sh, pair / heads, pair % heads, value, loc, attn, out);
    return 0;
}

int lwdetr_deformable_backward(const float *value, const float *loc, const float *attn, const float *dout,
                               float *grad_value, float *grad_loc, float *grad_attn, const int64_t *shapes,
                               int64_t batch, int64_t tokens, int64_t heads, int64_t D, int64_t queries,
                               int64_t levels, int64_t points, int64_t value_step, int64_t value_batch_step,
                               int threads) {
    const shape_t sh = {batch, tokens, heads, D, queries, levels, points, value_step, value_batch_step, shapes};
    if (!check_shape(&sh)) return 2;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (int64_t pair = 0; pair < batch * heads; pair++)
        backward_pair(&sh, pair / heads, pair % heads, value, loc, attn, dout, grad_value, grad_loc, grad_attn);
    return 0;
}
