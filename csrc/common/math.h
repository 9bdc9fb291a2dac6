#pragma once
// The primitives that the shared math of every family is written in. Each shared-math
// function is a template over `V`, instantiated with:
//   - a scalar T on CUDA (T = float for half/bfloat16) and for the CPU tails;
//   - at::vec::Vectorized<T> for the CPU SIMD body (overloads in common/vec_math.h).
// Comparisons yield `bool` for scalars and a lane mask for vectors; `where` takes either.
// The shared math calls these qualified (math::exp), so every overload must be declared
// before it: the per-capability CPU files get the Vectorized ones from the include below.

#include <c10/macros/Macros.h>

#include <cmath>

#include "common/isa.h"

namespace pyops::math {
inline namespace PYOPS_ISA_NAMESPACE {

template <typename T>
C10_HOST_DEVICE inline T where(bool condition, T if_true, T if_false) {
  return condition ? if_true : if_false;
}

template <typename T>
C10_HOST_DEVICE inline T exp(T x) {
  return std::exp(x);
}

template <typename T>
C10_HOST_DEVICE inline T tanh(T x) {
  return std::tanh(x);
}

template <typename T>
C10_HOST_DEVICE inline T sqrt(T x) {
  return std::sqrt(x);
}

template <typename T>
C10_HOST_DEVICE inline T abs(T x) {
  return std::abs(x);
}

// 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0, e = exp(-|x|): e cannot overflow
// (torch's 1 / (1 + exp(-x)) rounds every result below 1e-38, x < -88.7 in float, to 0),
// and one division rounds once where a reciprocal times e would round twice.
template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  const T e = exp(-abs(x));
  return (x < T(0) ? e : T(1)) / (T(1) + e);
}

template <typename T>
C10_HOST_DEVICE inline T maximum(T a, T b) {
  // NaN-propagating, like torch.maximum.
  return (a != a || a > b) ? a : b;
}

}  // namespace PYOPS_ISA_NAMESPACE
}  // namespace pyops::math

#if defined(CPU_CAPABILITY)
#include "common/vec_math.h"
#endif
