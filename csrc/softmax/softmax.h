#pragma once
// The log-softmax family's math, written once for both backends. A row is the slice
// along `dim`; with m = max(row) and s = log(sum(exp(row - m))) (lse = m + s):
//   log_softmax(x) = (x - m) - s
//   backward:  grad_input = grad - exp(output) * sum(grad)
//   fused log_softmax + nll_loss, per row n with target t and weight w (the upstream
//   gradient, divided by the count of rows that are not ignored for 'mean'):
//   loss_n = s_n - (x[n, t] - m_n)      grad_input[n, c] = w * (exp(log_softmax(x)[n, c]) - [c == t])
//   the 'sum' of the row losses is accumulated in NllLossSum (double, as torch's CPU
//   nll_loss); 'mean' divides it by the count of rows not ignored (NaN when there are none).
// m and s are kept apart, as torch does: x - (m + s) would lose the low bits of the
// log-probabilities near 0 (the likely classes, whose gradients are the largest) to the
// rounding of m + s, a number of the size of the logits.

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include "common/dispatch.h"
#include "common/math.h"

namespace pyops::softmax {
inline namespace PYOPS_ISA_NAMESPACE {

struct LogSoftmaxMath {
  template <typename V>
  C10_HOST_DEVICE static V shifted_exp(V x, V max) {
    return math::exp(x - max);
  }
  // `log_sum` = log(sum of shifted_exp) over the row.
  template <typename V>
  C10_HOST_DEVICE static V output(V x, V max, V log_sum) {
    return (x - max) - log_sum;
  }
  template <typename V>
  C10_HOST_DEVICE static V grad_input(V grad, V output, V grad_sum) {
    return grad - math::exp(output) * grad_sum;
  }
  // The row's loss: lse - x_t.
  template <typename V>
  C10_HOST_DEVICE static V nll_loss(V x_target, V max, V log_sum) {
    return log_sum - (x_target - max);
  }
  // d(lse - x_t)/dx_c, scaled by the row's weight.
  template <typename V>
  C10_HOST_DEVICE static V nll_grad(V x, V max, V log_sum, V is_target, V weight) {
    return weight * (math::exp(output(x, max, log_sum)) - is_target);
  }
  // A row's weight w: the upstream gradient of its loss, 0 where the row is ignored (even
  // a NaN upstream gradient: torch leaves ignored rows' gradients at 0). `divisor` is 1,
  // or for 'mean' the count of rows not ignored, at least 1: with every row ignored the
  // mean is NaN but no row has a gradient, as in torch.
  template <typename A>
  C10_HOST_DEVICE static A nll_row_weight(A upstream, bool counted, A divisor) {
    return counted ? upstream / divisor : A(0);
  }
};

}  // namespace PYOPS_ISA_NAMESPACE

// Tensors of these kernels are contiguous, viewed as [outer, size, inner] with the
// softmax taken over `size`.
struct RowLayout {
  int64_t outer, size, inner;
};

using LogSoftmaxFn = void (*)(const at::Tensor& input, const at::Tensor& output, RowLayout);
using LogSoftmaxBackwardFn = void (*)(const at::Tensor& grad_output, const at::Tensor& output,
                                      const at::Tensor& grad_input, RowLayout);

enum class Reduction { None, Mean, Sum };

// What the row losses are summed in for 'mean' and 'sum'.
using NllLossSum = double;

// input [N, C] contiguous, target [N] int64. Writes the loss in input's dtype, per row
// ([N], 0 for ignored rows) for Reduction::None, else its 'mean' or 'sum' (0-dim), and each
// row's log-sum-exp as its two terms, lse [N, 2] = (max, log(sum(exp(x - max)))), in the
// compute type (float for half/bfloat16). The sum runs in an order that depends on the
// shape only.
using NllForwardFn = void (*)(const at::Tensor& input, const at::Tensor& target,
                              int64_t ignore_index, Reduction reduction, const at::Tensor& loss,
                              const at::Tensor& lse);
// grad_loss: the loss's gradient in input's dtype, [N] (any stride) for Reduction::None,
// else one element; lse [N, 2] as written by the forward. Row n's weight is
// LogSoftmaxMath::nll_row_weight of its upstream gradient.
using NllBackwardFn = void (*)(const at::Tensor& grad_loss, const at::Tensor& input,
                               const at::Tensor& target, const at::Tensor& lse,
                               Reduction reduction, int64_t ignore_index,
                               const at::Tensor& grad_input);

extern DispatchTable<LogSoftmaxFn> log_softmax_kernel;
extern DispatchTable<LogSoftmaxBackwardFn> log_softmax_backward_kernel;
extern DispatchTable<NllForwardFn> nll_forward_kernel;
extern DispatchTable<NllBackwardFn> nll_backward_kernel;

}  // namespace pyops::softmax
