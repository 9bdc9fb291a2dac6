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
