/*
 * Multi-scale deformable attention's sampling (Deformable DETR), float32, forward and backward, for any x86-64
 * vector width: the algorithm of deformable_avx512.c in GCC's generic vector types, compiled for the target it is
 * given (8 lanes under -mavx2 -mfma, 16 under -mavx512f, 4 with no flags).
 *
 *   out[b, q, h, :] = sum_{l, p} a[b, q, h, l, p] * bilinear(value of level l, head h; loc[b, q, h, l, p])
 *
 * bilinear as `grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)` on the location mapped to
 * the grid as 2 loc - 1: pixel x = loc_x W - 0.5, y = loc_y H - 0.5; corners outside the map contribute zero.
 * A head's features are read in place from the value projection's token-major output, all levels and points in one
 * pass; the backward computes the value, location and weight gradients in one pass.
 *
 * Layout: value [batch, tokens, heads, D] with row (token) step value_step and batch step value_batch_step, the
 * levels one after another, row-major; loc [batch, queries, heads, levels, points, 2] (x, y); attn [batch, queries,
 * heads, levels, points]; out and dout [batch, queries, heads, D]; grad_value contiguous [batch, tokens, heads, D],
 * zero on entry. Work is split over (batch, head) pairs between OpenMP threads: in the backward each pair owns its
 * slice of grad_value, so the scatter needs no atomics.
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define MAX_VECTORS (64 / LANES) /* a head of 64 features */

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef float vf_unaligned __attribute__((vector_size(4 * LANES), aligned(4), may_alias));

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf v) { *(vf_unaligned *)p = v; }
static inline vf splat(float x) { return x - (vf){0}; } /* x - 0 is x, also for -0: one broadcast */
static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

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

/* One (batch, head) pair; DV (the head's features in vectors) a constant in each specialised copy. */
static inline __attribute__((always_inline)) void forward_pair(const int DV, const shape_t *sh, int64_t b, int64_t h,
                                                                const float *value, const float *loc,
                                                                const float *attn, float *out) {
    const float *head_value = value + b * sh->value_batch_step + h * DV * LANES;
    for (int64_t q = 0; q < sh->queries; q++) {
        vf acc[MAX_VECTORS];
        for (int j = 0; j < DV; j++) acc[j] = splat(0.0f);
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
                    const vf w = splat(attn[i] * c.weight[k]);
                    const float *v = level_value + c.offset[k] * sh->value_step;
                    for (int j = 0; j < DV; j++) acc[j] += w * load(v + LANES * j);
                }
            }
            start += height * width;
        }
        float *o = out + ((b * sh->queries + q) * sh->heads + h) * DV * LANES;
        for (int j = 0; j < DV; j++) store(o + LANES * j, acc[j]);
    }
}

static inline __attribute__((always_inline)) void backward_pair(const int DV, const shape_t *sh, int64_t b,
                                                                 int64_t h, const float *value, const float *loc,
                                                                 const float *attn, const float *dout,
                                                                 float *grad_value, float *grad_loc,
                                                                 float *grad_attn) {
    const int64_t D = DV * LANES, row = sh->heads * D;
    const float *head_value = value + b * sh->value_batch_step + h * D;
    float *head_grad = grad_value + b * sh->tokens * row + h * D;
    for (int64_t q = 0; q < sh->queries; q++) {
        const float *g = dout + ((b * sh->queries + q) * sh->heads + h) * D;
        vf grad[MAX_VECTORS];
        for (int j = 0; j < DV; j++) grad[j] = load(g + LANES * j);
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
                    vf s = grad[0] * load(v);
                    for (int j = 1; j < DV; j++) s += grad[j] * load(v + LANES * j);
                    dots[k] = hsum(s);
                    const vf w = splat(attn[i] * c.weight[k]);
                    float *dv = level_grad + c.offset[k] * row;
                    for (int j = 0; j < DV; j++) store(dv + LANES * j, load(dv + LANES * j) + w * grad[j]);
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

/* Specialised copies for each head size (16, 32, 48, 64 features). */
#define DEFINE_SIZE(D_)                                                                                            \
    static __attribute__((noinline)) void forward_pair_d##D_(const shape_t *sh, int64_t b, int64_t h,            \
                                                               const float *value, const float *loc,              \
                                                               const float *attn, float *out) {                   \
        forward_pair((D_) / LANES, sh, b, h, value, loc, attn, out);                                               \
    }                                                                                                              \
    static __attribute__((noinline)) void backward_pair_d##D_(                                                     \
        const shape_t *sh, int64_t b, int64_t h, const float *value, const float *loc, const float *attn,         \
        const float *dout, float *grad_value, float *grad_loc, float *grad_attn) {                                 \
        backward_pair((D_) / LANES, sh, b, h, value, loc, attn, dout, grad_value, grad_loc, grad_attn);            \
    }
DEFINE_SIZE(16)
DEFINE_SIZE(32)
DEFINE_SIZE(48)
DEFINE_SIZE(64)

static int check_shape(const shape_t *sh) {
    if (sh->D != 16 && sh->D != 32 && sh->D != 48 && sh->D != 64) return 0;
    if (sh->batch <= 0 || sh->heads <= 0 || sh->queries < 0 || sh->levels <= 0 || sh->points <= 0) return 0;
    int64_t tokens = 0;
    for (int64_t l = 0; l < sh->levels; l++) {
        if (sh->shapes[2 * l] <= 0 || sh->shapes[2 * l + 1] <= 0) return 0;
        tokens += sh->shapes[2 * l] * sh->shapes[2 * l + 1];
    }
    return tokens == sh->tokens;
}

/* The vector width this library was compiled for, in floats (8 for AVX2, 16 for AVX-512). */
int lwdetr_vector_lanes(void) { return LANES; }

/* Both return 0 on success, 2 for an unsupported shape. */
int lwdetr_deformable_forward(const float *value, const float *loc, const float *attn, float *out,
                              const int64_t *shapes, int64_t batch, int64_t tokens, int64_t heads, int64_t D,
                              int64_t queries, int64_t levels, int64_t points, int64_t value_step,
                              int64_t value_batch_step, int threads) {
    const shape_t sh = {batch, tokens, heads, D, queries, levels, points, value_step, value_batch_step, shapes};
    if (!check_shape(&sh)) return 2;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (int64_t pair = 0; pair < batch * heads; pair++) {
        const int64_t b = pair / heads, h = pair % heads;
        switch (D) {
            case 16: forward_pair_d16(&sh, b, h, value, loc, attn, out); break;
            case 32: forward_pair_d32(&sh, b, h, value, loc, attn, out); break;
            case 48: forward_pair_d48(&sh, b, h, value, loc, attn, out); break;
            default: forward_pair_d64(&sh, b, h, value, loc, attn, out); break;
        }
    }
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
    for (int64_t pair = 0; pair < batch * heads; pair++) {
        const int64_t b = pair / heads, h = pair % heads;
        switch (D) {
            case 16: backward_pair_d16(&sh, b, h, value, loc, attn, dout, grad_value, grad_loc, grad_attn); break;
            case 32: backward_pair_d32(&sh, b, h, value, loc, attn, dout, grad_value, grad_loc, grad_attn); break;
            case 48: backward_pair_d48(&sh, b, h, value, loc, attn, dout, grad_value, grad_loc, grad_attn); break;
            default: backward_pair_d64(&sh, b, h, value, loc, attn, dout, grad_value, grad_loc, grad_attn); break;
        }
    }
    return 0;
}
