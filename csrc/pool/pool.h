#pragma once
// The pooling family's math, written once (design section 3): the window reductions
// (max, min, max followed by relu, mean) and the window geometry. The CPU kernels
// (pool_cpu.cpp) instantiate the reductions with at::vec::Vectorized<Acc> (SIMD across
// output columns of a plane, or across channels for channels-last) and with Acc for
// the tails; the CUDA kernels (pool_cuda.cu) with Acc.
//
// Window taps are visited in row-major order (kernel row kh outer, column kw inner),
// the order torch visits them; a tap is named by its offset kh * kernel_w + kw within
// the window. The "arg" reductions keep the best value and its offset.

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

#include "activation/activation.h"
#include "common/dispatch.h"
#include "common/math.h"

namespace pyops::pool {

// Kernels get every size and option already checked and resolved (stride defaulted to
// the kernel, the output size computed as torch does).
struct Geometry {
  int64_t batch, channels;
  int64_t in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool channels_last;  // tensors are [N, H, W, C] in memory, otherwise [N, C, H, W]
};

// The window taps along one dimension that fall inside the input: [begin, end).
struct TapRange {
  int64_t begin, end;
};

C10_HOST_DEVICE inline TapRange valid_taps(int64_t out_index, int64_t stride, int64_t pad,
                                           int64_t dilation, int64_t kernel, int64_t in_size) {
  const int64_t start = out_index * stride - pad;
  const int64_t begin = start < 0 ? (-start + dilation - 1) / dilation : 0;
  int64_t end = start >= in_size ? 0 : (in_size - start + dilation - 1) / dilation;
  end = end < kernel ? end : kernel;
  return {begin, end < begin ? begin : end};
}

// A window can lie wholly in the padding (a dilation larger than the input steps over
// it). It reduces nothing: its result is the reduction's identity (-inf for max, as
// torch's max_pool2d and max_pool2d(relu(x)) give; +inf for min), and it passes no
// gradient, whatever index it stores (torch's int64 index for it names no tap of it).
C10_HOST_DEVICE inline bool window_is_empty(const TapRange& h, const TapRange& w) {
  return h.begin >= h.end || w.begin >= w.end;
}

// Average pooling's window along one dimension (no dilation), as torch computes it: the
// taps [begin, end) inside the input, and the window length counting the padding that
// the window covers (but not beyond it, which ceil_mode can reach).
struct AvgSpan {
  int64_t begin, end, padded_length;
};

C10_HOST_DEVICE inline AvgSpan avg_span(int64_t out_index, int64_t stride, int64_t pad,
                                        int64_t kernel, int64_t in_size) {
  const int64_t start = out_index * stride - pad;
  const int64_t padded_end = start + kernel < in_size + pad ? start + kernel : in_size + pad;
  const int64_t begin = start > 0 ? start : 0;
  const int64_t end = padded_end < in_size ? padded_end : in_size;
  return {begin, end, padded_end - start};
}

// The divisor of one average window: divisor_override, else the padded or the inside
// area. An empty window (possible only in ceil_mode's last window) gives 0: output 0.
C10_HOST_DEVICE inline int64_t avg_divisor(const AvgSpan& h, const AvgSpan& w,
                                           bool count_include_pad, int64_t divisor_override) {
  if (h.begin >= h.end || w.begin >= w.end) return 0;
  if (divisor_override != 0) return divisor_override;
  return count_include_pad ? h.padded_length * w.padded_length
                           : (h.end - h.begin) * (w.end - w.begin);
}

enum class ArgReduction : int8_t { Max, Min, ReluMax };

inline namespace PYOPS_ISA_NAMESPACE {

// Max pooling's rule, torch's: a tap replaces the best so far when it is greater or NaN.
// So a NaN in the window wins (the last NaN's offset is kept), and among equal values
// the first tap in row-major order is kept. An all -inf window keeps its first tap.
template <typename Acc>
struct MaxReduce {
  static constexpr bool kRelu = false;
  C10_HOST_DEVICE static Acc identity() { return -std::numeric_limits<Acc>::infinity(); }
  template <typename V>
  C10_HOST_DEVICE static auto replaces(const V& candidate, const V& best) {
    return (candidate > best) | (candidate != candidate);
  }
  template <typename V>
  C10_HOST_DEVICE static V finalize(const V& best) {
    return best;
  }
};

// Min pooling: max pooling of -x, negated, tap for tap (same ties, same NaN rule).
template <typename Acc>
struct MinReduce {
  static constexpr bool kRelu = false;
  C10_HOST_DEVICE static Acc identity() { return std::numeric_limits<Acc>::infinity(); }
  template <typename V>
  C10_HOST_DEVICE static auto replaces(const V& candidate, const V& best) {
    return (candidate < best) | (candidate != candidate);
  }
  template <typename V>
  C10_HOST_DEVICE static V finalize(const V& best) {
    return best;
  }
};

// relu(max_pool(x)) == max_pool(relu(x)): the max first, relu on the one value kept.
// Where relu clamps, no gradient flows (relu's backward is 0 where result <= 0): the
// kernels then store kNoTap instead of the offset.
template <typename Acc>
struct ReluMaxReduce : MaxReduce<Acc> {
  static constexpr bool kRelu = true;
  template <typename V>
  C10_HOST_DEVICE static V finalize(const V& best) {
    return activation::Relu<Acc>{}.forward(best);
  }
  template <typename V>
  C10_HOST_DEVICE static auto blocks_gradient(const V& result) {
    return result <= V(0);
  }
};

// Mean pooling: the taps' sum in row-major order, divided once, as torch does.
template <typename Acc>
struct AvgReduce {
  template <typename V>
  C10_HOST_DEVICE static V accumulate(const V& sum, const V& tap) {
    return sum + tap;
  }
  template <typename V>
  C10_HOST_DEVICE static V finalize(const V& sum, Acc divisor) {
    return sum / V(divisor);
  }
};

// Calls body(Reduce<Acc>{}) for the reduction.
template <typename Acc, typename Body>
inline void visit_arg_reduction(ArgReduction reduction, const Body& body) {
  switch (reduction) {
    case ArgReduction::Max: return body(MaxReduce<Acc>{});
    case ArgReduction::Min: return body(MinReduce<Acc>{});
    case ArgReduction::ReluMax: return body(ReluMaxReduce<Acc>{});
  }
}

}  // namespace PYOPS_ISA_NAMESPACE

// ---- Indices ---------------------------------------------------------------------------
// The arg reductions write, per output element, one of:
//  - nothing (no gradient needed: torch always computes int64 indices, pyops does not);
//  - the tap offset within the window, as uint8 when kernel_h * kernel_w <= 255, else
//    int32 (what autograd saves: 1 or 4 bytes instead of 8), kNoTap where no gradient
//    flows (fused relu);
//  - torch's int64 index ih * in_w + iw within the plane (return_indices=True).
enum class IndexKind : int8_t { None, Offset8, Offset32, Flat64 };

template <typename Index>
constexpr Index kNoTap = static_cast<Index>(-1);  // 255 for uint8, -1 for int32

inline bool offsets_fit_uint8(int64_t kernel_h, int64_t kernel_w) {
  return kernel_h * kernel_w <= 255;
}

// ---- Kernel entry points -----------------------------------------------------------------
// Tensors are non-empty and dense in the layout Geometry::channels_last names; input and
// output share a floating dtype; indices, when defined, have the output's shape and
// layout and the dtype of `kind`.

// output = reduction over each window; indices as `kind` says (undefined for None).
using ArgForwardFn = void (*)(ArgReduction, IndexKind, const Geometry&, const at::Tensor& input,
                              const at::Tensor& output, const at::Tensor& indices);
// grad_input (zero-filled by the kernel) = grad_output routed to the taps `indices` name.
using ArgBackwardFn = void (*)(IndexKind, const Geometry&, const at::Tensor& grad_output,
                               const at::Tensor& indices, const at::Tensor& grad_input);
using AvgForwardFn = void (*)(const Geometry&, bool count_include_pad, int64_t divisor_override,
                              const at::Tensor& input, const at::Tensor& output);
using AvgBackwardFn = void (*)(const Geometry&, bool count_include_pad, int64_t divisor_override,
                               const at::Tensor& grad_output, const at::Tensor& grad_input);

extern DispatchTable<ArgForwardFn> arg_forward_kernel;
extern DispatchTable<ArgBackwardFn> arg_backward_kernel;
extern DispatchTable<AvgForwardFn> avg_forward_kernel;
extern DispatchTable<AvgBackwardFn> avg_backward_kernel;

}  // namespace pyops::pool
