#pragma once
// Bringing operands to one dense memory layout, so kernels can walk flat arrays.

#include <ATen/core/Tensor.h>

namespace pyops {

// `t` itself when it is non-overlapping and dense (any permutation of its dims),
// otherwise a copy in its suggested memory format.
inline at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(t.suggest_memory_format());
}

// `t` laid out exactly like `like` (same strides), copying only when it is not.
inline at::Tensor dense_like(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && t.is_non_overlapping_and_dense()) return t;
  at::Tensor copy = at::empty_like(like, t.options());
  copy.copy_(t);
  return copy;
}

}  // namespace pyops
