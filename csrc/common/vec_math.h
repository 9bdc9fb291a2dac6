#pragma once
// at::vec::Vectorized overloads of the primitives in common/math.h, which includes this
// file in the per-capability CPU kernel files (*_cpu.cpp) only.

#include <ATen/cpu/vec/vec.h>

#include "common/math.h"

namespace pyops::math {
inline namespace PYOPS_ISA_NAMESPACE {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> where(const Vectorized<T>& mask, const Vectorized<T>& if_true,
                           const Vectorized<T>& if_false) {
  return Vectorized<T>::blendv(if_false, if_true, mask);
}

template <typename T>
inline Vectorized<T> exp(const Vectorized<T>& x) {
  return x.exp();
}

// As common/math.h's scalar sigmoid: e = exp(-|x|), 1 / (1 + e) or e / (1 + e).
template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(1);
  const Vectorized<T> e = x.abs().neg().exp();
  return Vectorized<T>::blendv(one, e, x < Vectorized<T>(0)) / (one + e);
}

#if defined(CPU_CAPABILITY_AVX512)
// float32 sigmoid without Sleef's exp: with it (3.3 ns a vector, 1 thread, in cache, on
// the Zen 5 machine of docs/BENCHMARKS.md, as torch's sigmoid) sigmoid and bias +
// sigmoid are compute-bound; this one takes 2.1 ns. Same form as above;
// tests/test_activation.py holds it within 2 ulp of the correctly rounded result over
// the whole float range.
inline Vectorized<float> sigmoid(const Vectorized<float>& x) {
  const __m512 v = x;
  // -|x|, floored where e underflows to 0 anyway, so -inf stays out of the range
  // reduction. max_ps returns its second operand when either is NaN: NaN propagates.
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_or_ps(v, _mm512_set1_ps(-0.f)));
  // e = 2^n * exp(r), n = round(t / ln 2), r = t - n ln 2 in [-ln2/2, ln2/2]; ln 2 split
  // in two (Cody-Waite) so that n * ln2_hi is exact.
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  // exp(r): a degree-6 polynomial fitted for relative error on [-ln2/2, ln2/2] (2.0e-9
  // before float rounding; scripts/fit_exp_polynomial.py derives it).
  constexpr float kCoefficients[] = {1.3839898e-3f, 8.375654e-3f, 4.166823e-2f, 1.6666411e-1f,
                                     4.999999e-1f, 1.f, 1.f};
  __m512 p = _mm512_set1_ps(kCoefficients[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kCoefficients[i]));
  const __m512 e = _mm512_scalef_ps(p, n);  // 2^n * p, gradual underflow included
  // A true division: on Zen 5 it is faster than a reciprocal estimate and a Newton step,
  // and it rounds once.
  const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 numerator = _mm512_mask_blend_ps(negative, _mm512_set1_ps(1.f), e);
  return _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}
#endif

template <typename T>
inline Vectorized<T> tanh(const Vectorized<T>& x) {
  return x.tanh();
}

template <typename T>
inline Vectorized<T> sqrt(const Vectorized<T>& x) {
  return x.sqrt();
}

template <typename T>
inline Vectorized<T> abs(const Vectorized<T>& x) {
  return x.abs();
}

template <typename T>
inline Vectorized<T> maximum(const Vectorized<T>& a, const Vectorized<T>& b) {
  return at::vec::maximum(a, b);  // NaN-propagating
}

}  // namespace PYOPS_ISA_NAMESPACE
}  // namespace pyops::math
