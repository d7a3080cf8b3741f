/* Vector helpers shared by the attention kernels (AVX-512F). */
#ifndef LWDETR_ATTENTION_COMMON_H
#define LWDETR_ATTENTION_COMMON_H
#include <immintrin.h>
#include <stdint.h>

/* e^x for x <= 88, about 1 ulp: Cody-Waite range reduction and a degree-6 minimax polynomial (the classic Cephes
 * single-precision coefficients); vscalefps applies 2^n and flushes results below the float range to 0. */
static inline __m512 exp_ps(__m512 x) {
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

static inline __mmask16 valid_lanes(int64_t j, int64_t n) {
    return (j + 16 <= n) ? (__mmask16)0xFFFF : (j >= n) ? (__mmask16)0 : (__mmask16)((1u << (n - j)) - 1u);
}

#endif
