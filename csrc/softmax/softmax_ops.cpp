// The log-softmax family's operators: log_softmax along any dim and the fused
// log_softmax + nll_loss, with schemas, checks, allocation and autograd written once for
// every device; the kernels are softmax_cpu.cpp and softmax_cuda.cu.

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/WrapDimUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sum.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/checks.h"
#include "common/memory.h"
#include "common/operators.h"
#include "softmax/softmax.h"

namespace pyops::softmax {

DispatchTable<LogSoftmaxFn> log_softmax_kernel("log_softmax");
DispatchTable<LogSoftmaxBackwardFn> log_softmax_backward_kernel("log_softmax backward");
DispatchTable<NllForwardFn> nll_forward_kernel("log_softmax_nll_loss");
DispatchTable<NllBackwardFn> nll_backward_kernel("log_softmax_nll_loss backward");

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

RowLayout row_layout(const Tensor& t, int64_t dim) {
  if (t.dim() == 0) return {1, 1, 1};
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return {outer, t.size(dim), inner};
}

// c10::maybe_wrap_dim (a 0-dim tensor takes dim 0 or -1), with a message that names dim.
int64_t wrap_dim(int64_t dim, const Tensor& t, const char* arg, const char* op) {
  const int64_t rank = std::max<int64_t>(t.dim(), 1);
  TORCH_CHECK_INDEX(dim >= -rank && dim < rank, op, ": Dimension out of range: expected dim in [",
                    -rank, ", ", rank - 1, "] for ", arg, " with ", t.dim(), " dims, got ", dim);
  return dim < 0 ? dim + rank : dim;
}

Tensor log_softmax_impl(const Tensor& self, int64_t dim) {
  constexpr const char* op = "pyops.log_softmax";
  check_floating(self, "input", op);
  dim = wrap_dim(dim, self, "input", op);
  Tensor input = self.contiguous();
  Tensor output = with_huge_pages(at::empty_like(input, at::MemoryFormat::Contiguous));
  if (input.numel() > 0) {
    log_softmax_kernel(input.device().type())(input, output, row_layout(input, dim));
  }
  return output;
}

Tensor log_softmax_backward_impl(const Tensor& grad_output, const Tensor& output, int64_t dim) {
  constexpr const char* op = "pyops._log_softmax_backward";
  check_floating(grad_output, "grad_output", op);
  check_floating(output, "output", op);
  check_same_dtype(output, "output", grad_output, "grad_output", op);
  check_same_device(output, "output", grad_output, "grad_output", op);
  check_same_shape(output, "output", grad_output, "grad_output", op);
  dim = wrap_dim(dim, output, "output", op);
  Tensor grad = grad_output.contiguous();
  Tensor out = output.contiguous();
  Tensor grad_input = with_huge_pages(at::empty_like(out, at::MemoryFormat::Contiguous));
  if (out.numel() > 0) {
    log_softmax_backward_kernel(out.device().type())(grad, out, grad_input, row_layout(out, dim));
  }
  return grad_input;
}

Reduction parse_reduction(c10::string_view name, const char* op) {
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  if (name == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, op, ": expected reduction to be 'mean', 'sum' or 'none', got '",
                    std::string(name), "'");
}

void check_nll_args(const Tensor& input, const Tensor& target, const char* op) {
  check_floating(input, "input", op);
  check_defined(target, "target", op);
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape (N, C), got ", input.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                   ": expected target to have dtype int64 (class indices), got ",
                   target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == input.size(0), op,
              ": expected target of shape (", input.size(0), ",) to match input ",
              input.sizes(), ", got ", target.sizes());
  check_same_device(target, "target", input, "input", op);
}

at::ScalarType compute_type(const Tensor& input) {
  return at::toOpMathType(input.scalar_type());
}

std::tuple<Tensor, Tensor> nll_impl(const Tensor& self, const Tensor& target_arg,
                                    c10::string_view reduction_name, int64_t ignore_index) {
  constexpr const char* op = "pyops.log_softmax_nll_loss";
  check_nll_args(self, target_arg, op);
  const Reduction reduction = parse_reduction(reduction_name, op);
  Tensor input = self.contiguous();
  Tensor target = target_arg.contiguous();
  const int64_t rows = input.size(0);
  // The kernel writes the loss itself, reduced ('mean', 'sum') in a fixed order.
  Tensor loss = reduction == Reduction::None ? at::empty({rows}, input.options())
                                             : at::empty({}, input.options());
  Tensor lse = at::empty({rows, 2}, input.options().dtype(compute_type(input)));
  if (input.numel() > 0) {
    nll_forward_kernel(input.device().type())(input, target, ignore_index, reduction, loss, lse);
    return {loss, lse};
  }
  // No classes: every target that is not ignored is out of bounds (torch raises too).
  const Tensor counted = at::ne(target, ignore_index);
  if (rows > 0 && counted.any().item<bool>()) {
    const int64_t row = at::nonzero(counted)[0][0].item<int64_t>();
    TORCH_CHECK_INDEX(false, op, ": target ", target[row].item<int64_t>(),
                      " is out of bounds for 0 classes (row ", row, ")");
  }
  // Every row ignored, or none at all: the mean is 0 / 0, as in torch.
  loss.fill_(reduction == Reduction::Mean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
  lse.fill_(-std::numeric_limits<double>::infinity());
  return {loss, lse};
}

Tensor nll_backward_impl(const Tensor& grad_loss, const Tensor& self, const Tensor& target_arg,
                         const Tensor& lse, c10::string_view reduction_name,
                         int64_t ignore_index) {
  constexpr const char* op = "pyops._log_softmax_nll_loss_backward";
  check_nll_args(self, target_arg, op);
  check_floating(grad_loss, "grad_loss", op);
  check_same_device(grad_loss, "grad_loss", self, "input", op);
  const Reduction reduction = parse_reduction(reduction_name, op);
  Tensor input = self.contiguous();
  Tensor target = target_arg.contiguous();
  const at::ScalarType acc = compute_type(input);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == input.size(0) && lse.size(1) == 2 &&
                  lse.scalar_type() == acc,
              op, ": expected lse of shape (", input.size(0), ", 2) and dtype ", acc, ", got ",
              lse.sizes(), " ", lse.scalar_type());
  check_same_device(lse, "lse", self, "input", op);
  if (reduction == Reduction::None) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == input.size(0), op,
                ": expected grad_loss of shape (", input.size(0), ",) for reduction='none', got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": expected grad_loss of one element for reduction='",
                std::string(reduction_name), "', got shape ", grad_loss.sizes());
  }
  // The kernel reads grad_loss in input's dtype, through its stride (autograd hands
  // 'none' losses that were summed an expanded gradient).
  const Tensor upstream = grad_loss.scalar_type() == input.scalar_type()
                              ? grad_loss
                              : grad_loss.to(input.scalar_type());
  // input is contiguous: at::empty, one dispatch fewer than empty_like.
  Tensor grad_input = with_huge_pages(at::empty(input.sizes(), input.options()));
  if (input.numel() > 0) {
    nll_backward_kernel(input.device().type())(upstream, input, target, lse.contiguous(),
                                               reduction, ignore_index, grad_input);
  }
  return grad_input;
}

Tensor call_log_softmax_backward(const Tensor& grad, const Tensor& output, int64_t dim) {
  static auto op =
      op_handle<Tensor(const Tensor&, const Tensor&, int64_t)>("pyops::_log_softmax_backward");
  return op.call(grad, output, dim);
}

struct LogSoftmaxFunction : torch::autograd::Function<LogSoftmaxFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& self, int64_t dim) {
    static auto op = op_handle<Tensor(const Tensor&, int64_t)>("pyops::log_softmax");
    Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      output = op.call(self, dim);
    }
    ctx->save_for_backward({output});
    ctx->saved_data["dim"] = dim;
    return output;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_log_softmax_backward(grads[0], ctx->get_saved_variables()[0],
                                      ctx->saved_data["dim"].toInt()),
            Tensor()};
  }
};

// grad_input = g - exp(y) * sum(g): linear in g; in y through exp(y).
struct LogSoftmaxBackwardFunction : torch::autograd::Function<LogSoftmaxBackwardFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& grad, const Tensor& output,
                        int64_t dim) {
    Tensor grad_input;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_input = call_log_softmax_backward(grad, output, dim);
    }
    ctx->save_for_backward({grad, output});
    ctx->saved_data["dim"] = dim;
    return grad_input;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const Tensor& upstream = grads[0];
    const Tensor probabilities = at::exp(saved[1]);
    const bool scalar = saved[1].dim() == 0;
    auto sum_along = [&](const Tensor& t) { return scalar ? t : t.sum(dim, /*keepdim=*/true); };
    return {upstream - sum_along(upstream * probabilities),
            -upstream * probabilities * sum_along(saved[0]), Tensor()};
  }
};

Tensor log_softmax_autograd(const Tensor& self, int64_t dim) {
  if (!any_requires_grad({&self})) {
    static auto op = op_handle<Tensor(const Tensor&, int64_t)>("pyops::log_softmax");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(self, dim);
  }
  return LogSoftmaxFunction::apply(self, dim);
}

Tensor log_softmax_backward_autograd(const Tensor& grad, const Tensor& output, int64_t dim) {
  if (!any_requires_grad({&grad, &output})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_log_softmax_backward(grad, output, dim);
  }
  return LogSoftmaxBackwardFunction::apply(grad, output, dim);
}

using NllSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::string_view,
                                                int64_t);

c10::string_view reduction_name(Reduction reduction) {
  switch (reduction) {
    case Reduction::None: return "none";
    case Reduction::Sum: return "sum";
    case Reduction::Mean: break;
  }
  return "mean";
}

using NllBackwardSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    c10::string_view, int64_t);

// The Function's one output is the loss; lse, which has no gradient, leaves through
// `lse_out` (fewer outputs for autograd to wrap, and no zeros for lse's gradient).
struct NllFunction : torch::autograd::Function<NllFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& target,
                        c10::string_view reduction, int64_t ignore_index, Tensor* lse_out) {
    static auto op = op_handle<NllSignature>("pyops::log_softmax_nll_loss");
    std::tuple<Tensor, Tensor> result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(input, target, reduction, ignore_index);
    }
    *lse_out = std::get<1>(result);
    ctx->save_for_backward({input, target, *lse_out});
    // Saved as an enum, not a string: no allocation per call.
    ctx->saved_data["reduction"] =
        static_cast<int64_t>(parse_reduction(reduction, "pyops.log_softmax_nll_loss"));
    ctx->saved_data["ignore_index"] = ignore_index;
    return std::get<0>(result);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<NllBackwardSignature>("pyops::_log_softmax_nll_loss_backward");
    const auto saved = ctx->get_saved_variables();
    const auto reduction = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
    return {op.call(grads[0], saved[0], saved[1], saved[2], reduction_name(reduction),
                    ctx->saved_data["ignore_index"].toInt()),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> nll_autograd(const Tensor& input, const Tensor& target,
                                        c10::string_view reduction, int64_t ignore_index) {
  if (!any_requires_grad({&input})) {
    static auto op = op_handle<NllSignature>("pyops::log_softmax_nll_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, target, reduction, ignore_index);
  }
  Tensor lse;
  Tensor loss = NllFunction::apply(input, target, reduction, ignore_index, &lse);
  return {loss, lse};
}

// The fused loss has no double backward: a backward that would record one raises.
Tensor nll_backward_autograd(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                             const Tensor& lse, c10::string_view reduction,
                             int64_t ignore_index) {
  TORCH_CHECK(!any_requires_grad({&grad_loss, &input, &lse}),
              "pyops.log_softmax_nll_loss has no double backward: its backward was called with "
              "grad mode on and an argument that requires grad (create_graph=True?); use "
              "torch.nn.functional.cross_entropy where a second derivative is needed");
  static auto op = op_handle<NllBackwardSignature>("pyops::_log_softmax_nll_loss_backward");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_loss, input, target, lse, reduction, ignore_index);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("log_softmax(Tensor self, int dim) -> Tensor");
  m.def("_log_softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");
  // Returns the loss and each row's log-sum-exp (what the backward needs instead of the
  // whole log-probability tensor), as its two terms: lse[n] = (max, log(sum(exp(x - max)))).
  m.def("log_softmax_nll_loss(Tensor input, Tensor target, str reduction=\"mean\", "
        "int ignore_index=-100) -> (Tensor loss, Tensor lse)");
  m.def("_log_softmax_nll_loss_backward(Tensor grad_loss, Tensor input, Tensor target, "
        "Tensor lse, str reduction, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("log_softmax", log_softmax_impl);
  m.impl("_log_softmax_backward", log_softmax_backward_impl);
  m.impl("log_softmax_nll_loss", nll_impl);
  m.impl("_log_softmax_nll_loss_backward", nll_backward_impl);
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("log_softmax", log_softmax_impl);
  m.impl("_log_softmax_backward", log_softmax_backward_impl);
  m.impl("log_softmax_nll_loss", nll_impl);
  m.impl("_log_softmax_nll_loss_backward", nll_backward_impl);
}

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("log_softmax", log_softmax_autograd);
  m.impl("_log_softmax_backward", log_softmax_backward_autograd);
  m.impl("log_softmax_nll_loss", nll_autograd);
  m.impl("_log_softmax_nll_loss_backward", nll_backward_autograd);
}

}  // namespace pyops::softmax
