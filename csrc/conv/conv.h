#pragma once
// The convolution family's shared math, written once (design section 3): output-size
// arithmetic and the im2col / col2im index math, as __host__ __device__ helpers used by
// the CPU kernels (conv_cpu.cpp) and the CUDA kernels (conv_cuda.cu). The bias +
// activation epilogue is the activation family's functors (activation/activation.h).
//
// Every kernel sees a 2-D convolution in its "forward" orientation:
//   output[n, oc, oh, ow] = sum_{ic in group(oc), kh, kw}
//       weight[oc, ic - group_start, kh, kw] * input[n, ic, ih, iw],
//   ih = oh * stride_h - pad_h + kh * dilation_h  (zero outside the input), likewise iw.
// conv_transpose2d is the backward-input pass of that convolution (its output is the
// convolution's input), so the same three passes serve both operators.

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "activation/activation.h"
#include "common/dispatch.h"

namespace pyops::conv {

// Sizes of one convolution in its forward orientation (see above).
struct ConvShape {
  int64_t batch;
  int64_t in_channels, in_h, in_w;
  int64_t out_channels, out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  int64_t groups;

  C10_HOST_DEVICE int64_t in_per_group() const { return in_channels / groups; }
  C10_HOST_DEVICE int64_t out_per_group() const { return out_channels / groups; }
  // Rows of the im2col matrix of one group: (ic, kh, kw), the reduction length.
  C10_HOST_DEVICE int64_t patch_size() const { return in_per_group() * kernel_h * kernel_w; }
  C10_HOST_DEVICE int64_t out_plane() const { return out_h * out_w; }
  C10_HOST_DEVICE int64_t in_plane() const { return in_h * in_w; }
};

// Output extent of a convolution along one dimension (torch's formula); may be <= 0 when
// the kernel is larger than the padded input (the operators reject that, and check its
// terms for int64 overflow first).
C10_HOST_DEVICE constexpr int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride,
                                                   int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

// Input coordinate read by output coordinate `out` at kernel tap `k` (may fall in the
// padding: outside [0, in)).
C10_HOST_DEVICE inline int64_t input_coord(int64_t out, int64_t k, int64_t stride, int64_t pad,
                                           int64_t dilation) {
  return out * stride - pad + k * dilation;
}

// The inverse, for col2im as a gather: the output coordinate whose tap `k` reads input
// coordinate `in`, or -1 when none does (not on the stride grid, or out of range).
C10_HOST_DEVICE inline int64_t output_coord(int64_t in, int64_t k, int64_t stride, int64_t pad,
                                            int64_t dilation, int64_t out_size) {
  const int64_t shifted = in + pad - k * dilation;
  if (shifted < 0 || shifted % stride != 0) return -1;
  const int64_t out = shifted / stride;
  return out < out_size ? out : -1;
}

// Element (row, col) of the im2col matrix of one sample and group: row = (ic, kh, kw) in
// the group, col = (oh, ow). `plane` points at the group's first input channel of the
// sample. Zero in the padding.
template <typename T>
C10_HOST_DEVICE inline T im2col_value(const T* plane, const ConvShape& s, int64_t row,
                                      int64_t col) {
  const int64_t kw = row % s.kernel_w;
  const int64_t kh = (row / s.kernel_w) % s.kernel_h;
  const int64_t ic = row / (s.kernel_w * s.kernel_h);
  const int64_t ih = input_coord(col / s.out_w, kh, s.stride_h, s.pad_h, s.dilation_h);
  const int64_t iw = input_coord(col % s.out_w, kw, s.stride_w, s.pad_w, s.dilation_w);
  if (ih < 0 || ih >= s.in_h || iw < 0 || iw >= s.in_w) return T(0);
  return plane[(ic * s.in_h + ih) * s.in_w + iw];
}

// ---- Kernel entry points -------------------------------------------------------------
// Tensors handed to kernels are contiguous NCHW (weight: [out, in / groups, kh, kw]),
// non-empty, of one floating dtype and on one device; `bias` may be undefined.

// output = act(conv(input, weight) + bias)
using ForwardFn = void (*)(const ConvShape&, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias, activation::Activation, double negative_slope,
                           const at::Tensor& output);
// grad_input = act(conv^T(grad_output, weight) + bias): the gradient of conv's input, and
// with a bias and activation the forward of conv_transpose2d. `grad_input` has the
// shape of conv's input.
using BackwardInputFn = void (*)(const ConvShape&, const at::Tensor& grad_output,
                                 const at::Tensor& weight, const at::Tensor& bias,
                                 activation::Activation, double negative_slope,
                                 const at::Tensor& grad_input);
// grad_weight = the gradient of conv's weight (overwritten).
using BackwardWeightFn = void (*)(const ConvShape&, const at::Tensor& input,
                                  const at::Tensor& grad_output, const at::Tensor& grad_weight);

extern DispatchTable<ForwardFn> forward_kernel;
extern DispatchTable<BackwardInputFn> backward_input_kernel;
extern DispatchTable<BackwardWeightFn> backward_weight_kernel;

}  // namespace pyops::conv
