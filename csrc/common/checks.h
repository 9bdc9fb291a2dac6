#pragma once
// Argument checks shared by every family. Each message names the operator, the
// argument, what was expected and what came (design section 7).

#include <ATen/core/Tensor.h>

#include <c10/util/Exception.h>

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
