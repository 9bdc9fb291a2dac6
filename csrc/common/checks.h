#pragma once
// Argument checks shared by every family. Each message names the operator, the
// argument, what was expected and what came (design section 7).

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace pyops {

inline bool is_supported_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_defined(const at::Tensor& t, const char* arg, const char* op) {
  TORCH_CHECK_VALUE(t.defined(), op, ": expected ", arg, " to be a tensor, got None");
}

// A defined, strided tensor of float32, float64, float16 or bfloat16.
inline void check_floating(const at::Tensor& t, const char* arg, const char* op) {
  check_defined(t, arg, op);
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": expected ", arg,
                   " to be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK_TYPE(is_supported_floating(t.scalar_type()), op, ": expected ", arg,
                   " to have dtype float32, float64, float16 or bfloat16, got ",
                   t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* arg, const at::Tensor& ref,
                             const char* ref_arg, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": expected ", arg,
                   " to have the dtype of ", ref_arg, " (", ref.scalar_type(), "), got ",
                   t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* arg, const at::Tensor& ref,
                              const char* ref_arg, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", arg,
              " to be on the device of ", ref_arg, " (", ref.device(), "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& t, const char* arg, const at::Tensor& ref,
                             const char* ref_arg, const char* op) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": expected ", arg, " to have the shape of ",
              ref_arg, " ", ref.sizes(), ", got ", t.sizes());
}

// Whether the elements of `t` provably sit at distinct addresses: with its dims of size
// > 1 sorted by stride, each stride exceeds the span of the dims before it. True of every
// dense tensor and of every view made from one by slicing, narrowing or permuting;
// false for expanded tensors, overlapping as_strided or unfold views (and for rare
// non-overlapping as_strided layouts, which then get an error rather than a guess).
inline bool provably_non_overlapping(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) return true;  // no elements
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // largest offset reached by the dims so far
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += stride * (size - 1);
  }
  return true;
}

// A tensor that an in-place or out= operator writes. pyops computes it from a copy of
// the input and writes each element once, where torch's loops would read their own
// earlier writes: a tensor whose elements may share memory would give an answer that
// depends on the order of the writes, so it is refused (expanded ones with torch's own
// error).
inline void check_writable(const at::Tensor& t, const char* arg, const char* op) {
  at::assert_no_internal_overlap(t);
  TORCH_CHECK(provably_non_overlapping(t), op, ": ", arg,
              " may have elements that share memory (sizes ", t.sizes(), ", strides ",
              t.strides(), "); writing it in place would depend on the order of the writes, "
              "clone() it first");
}

// Arithmetic on size arguments (tensor sizes, strides, paddings, dilations) that raises
// instead of wrapping: huge arguments, or sizes of expanded tensors, must give an error
// and never signed overflow (undefined behaviour).
inline int64_t checked_add(int64_t a, int64_t b, const char* what, const char* op) {
  int64_t result = 0;
  TORCH_CHECK_VALUE(!__builtin_add_overflow(a, b, &result), op, ": ", what,
                    " does not fit in int64 (", a, " + ", b, ")");
  return result;
}

inline int64_t checked_mul(int64_t a, int64_t b, const char* what, const char* op) {
  int64_t result = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &result), op, ": ", what,
                    " does not fit in int64 (", a, " * ", b, ")");
  return result;
}

}  // namespace pyops
