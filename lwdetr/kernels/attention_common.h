/* Vector helpers shared by the attention kernels (AVX-512F). */
#ifndef LWDETR_ATTENTION_COMMON_H
#define LWDETR_ATTENTION_COMMON_H
#include <immintrin.h>
#include <stdint.h>

#define LOG2E 1.44269504088896341f

/* 2^y for y <= 127, about 1 ulp: y = n + f with |f| <= 1/2, 2^f from its degree-7 Taylor polynomial (truncation
 * error below 1e-8 relative), and vscalefps applies 2^n (results below the float range flush to 0). Callers fold
 * log2(e) into the scale they already apply, so e^x costs no extra multiply. */
static inline __m512 exp2_ps(__m512 y) {
    y = _mm512_max_ps(y, _mm512_set1_ps(-150.0f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(1.5252733804059838e-05f); /* ln(2)^k / k!, k = 7 .. 0 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428441e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821576e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 valid_lanes(int64_t j, int64_t n) {
    return (j + 16 <= n) ? (__mmask16)0xFFFF : (j >= n) ? (__mmask16)0 : (__mmask16)((1u << (n - j)) - 1u);
}

#endif
