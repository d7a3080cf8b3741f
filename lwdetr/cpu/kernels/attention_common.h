/* Vector helpers shared by the attention kernels (AVX-512F). */
#ifndef LWDETR_ATTENTION_COMMON_H
#define LWDETR_ATTENTION_COMMON_H
#include <immintrin.h>
#include <stdint.h>

#define LOG2E 1.44269504088896341f

/* 2^y for finite y <= 127, within about 1e-7 relative (as exact as float32 evaluation allows): y = n + f with
 * |f| <= 1/2, 2^f from a degree-6 near-minimax polynomial (approximation error 2e-9, one multiply-add fewer than
 * the Taylor polynomial of the same accuracy), and vscalefps applies 2^n (any y below -150 flushes to 0, so no
 * clamp is needed; infinite or NaN scores give NaN, as they would in PyTorch's softmax). Callers fold log2(e) into
 * the scale they already apply, so e^x costs no extra multiply. */
static inline __m512 exp2_ps(__m512 y) {
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(1.5345811788456404e-04f); /* fitted to 2^f on [-1/2, 1/2], degree 6 .. 0 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399931422514604e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618488959696013e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328776465654e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646890593552e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472057374952e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000000554175f));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 valid_lanes(int64_t j, int64_t n) {
    return (j + 16 <= n) ? (__mmask16)0xFFFF : (j >= n) ? (__mmask16)0 : (__mmask16)((1u << (n - j)) - 1u);
}

#endif
