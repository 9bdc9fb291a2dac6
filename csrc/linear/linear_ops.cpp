// The linear family: y = act(x W^T + b). The GEMM is ATen's (the BLAS / cuBLAS torch
// links); the bias and activation are the activation family's fused epilogue, applied in
// place on the GEMM output (one pass), and the backward computes the pre-activation
// gradient and the bias gradient in one pass too. The family has no kernels of its own.

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "activation/activation.h"
#include "common/autocast.h"
#include "common/checks.h"
#include "common/memory.h"
#include "common/operators.h"

namespace pyops::linear {
namespace {

using activation::Activation;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "pyops.linear_act";

void check_args(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias) {
  check_floating(input, "input", kOp);
  check_floating(weight, "weight", kOp);
  TORCH_CHECK(input.dim() >= 1, kOp, ": expected input with at least 1 dim, got a scalar");
  TORCH_CHECK(weight.dim() == 2, kOp, ": expected weight of shape (out_features, in_features), got ",
              weight.sizes());
  TORCH_CHECK(input.size(-1) == weight.size(1), kOp, ": expected input.size(-1) == ",
              weight.size(1), " (weight.size(1), in_features), got input of shape ",
              input.sizes());
  check_same_dtype(weight, "weight", input, "input", kOp);
  check_same_device(weight, "weight", input, "input", kOp);
  if (bias.has_value() && bias->defined()) {
    check_floating(*bias, "bias", kOp);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp,
                ": expected bias of shape [", weight.size(0), "] (out_features), got ",
                bias->sizes());
    check_same_dtype(*bias, "bias", input, "input", kOp);
    check_same_device(*bias, "bias", input, "input", kOp);
  }
}

// `t` (..., features) as a matrix (rows, features). Not reshape({-1, features}): with
// zero features the row count cannot be inferred.
Tensor as_matrix(const Tensor& t, int64_t features) {
  const auto sizes = t.sizes();
  return t.reshape({c10::multiply_integers(sizes.begin(), sizes.end() - 1), features});
}

std::vector<int64_t> output_shape(const Tensor& input, const Tensor& weight) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = weight.size(0);
  return shape;
}

// What the activation's backward needs saved: the result, or (a negative leaky slope,
// whose result cannot tell the sign) the pre-activation GEMM output.
bool saves_result(Activation act, double slope) {
  return act != Activation::LeakyRelu || slope >= 0.0;
}

// Half and bfloat16 add the bias inside the GEMM, before its float result is rounded, as
// torch's linear does. Rounding the GEMM output first and adding the bias after would
// lose the low bits of pre-activations near 0 (where x W^T and -b nearly cancel): the
// values whose sign decides relu's gradient. In float and double the two orders round
// the same way, and the fused epilogue saves a pass.
bool bias_in_gemm(const Tensor& input) {
  return at::isReducedFloatingType(input.scalar_type());
}

// x W^T, plus `bias` inside the GEMM when it is defined, into a fresh output.
Tensor gemm(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  Tensor y = with_huge_pages(at::empty({x.size(0), weight.size(0)}, x.options()));
  return bias.defined() ? at::addmm_out(y, bias, x, weight.t()) : at::mm_out(y, x, weight.t());
}

using LinearActSignature = Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                  c10::string_view, double);

// The device implementation (real tensors only: it calls the epilogue kernel directly).
Tensor linear_act_impl(const Tensor& input, const Tensor& weight,
                       const c10::optional<Tensor>& bias_opt, c10::string_view activation_name,
                       double slope) {
  check_args(input, weight, bias_opt);
  const Activation act = activation::parse_activation(activation_name, kOp);
  const Tensor bias = bias_opt.value_or(Tensor());
  const Tensor x = as_matrix(input, input.size(-1));
  Tensor y;
  if (act == Activation::None || bias_in_gemm(input)) {
    // Exactly torch's linear: the bias rides in the GEMM (beta = 1); then the activation
    // in place.
    y = gemm(x, weight, bias);
    if (act != Activation::None && y.numel() > 0) {
      activation::forward_kernel(y.device().type())(act, slope, y, y);
    }
  } else {
    // Bias and activation in place on the fresh GEMM output: one pass.
    y = gemm(x, weight, Tensor());
    if (y.numel() > 0) {
      const auto device = y.device().type();
      if (bias.defined()) {
        activation::bias_forward_kernel(device)(act, slope, y, bias.contiguous(), y,
                                                {y.size(0), y.size(1), 1});
      } else {
        activation::forward_kernel(device)(act, slope, y, y);
      }
    }
  }
  return y.view(output_shape(input, weight));
}

struct LinearActFunction : torch::autograd::Function<LinearActFunction> {
  // `bias_opt` stays optional: an undefined Tensor argument would count as a variable.
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const c10::optional<Tensor>& bias_opt, c10::string_view activation_name,
                        double slope) {
    const Activation act = activation::parse_activation(activation_name, kOp);
    check_args(input, weight, bias_opt);
    const Tensor bias = bias_opt.value_or(Tensor());
    const bool saved_is_result = saves_result(act, slope);
    Tensor result, act_saved;
    {
      // Everything below autograd and through the dispatcher (fake tensors included).
      at::AutoDispatchBelowADInplaceOrView guard;
      if (saved_is_result) {
        static auto op = op_handle<LinearActSignature>("pyops::linear_act");
        result = op.call(input, weight, bias_opt, activation_name, slope);
        act_saved = result;
      } else {
        // A negative leaky slope: the backward needs the pre-activation (bias included,
        // added in the GEMM), kept apart.
        const Tensor x = as_matrix(input, input.size(-1));
        act_saved = bias.defined() ? at::addmm(bias, x, weight.t()) : at::mm(x, weight.t());
        static auto leaky = op_handle<Tensor(const Tensor&, double)>("pyops::leaky_relu");
        result = leaky.call(act_saved, slope).view(output_shape(input, weight));
      }
    }
    // The input and the result themselves (not views made here, which would have no
    // history): double backward differentiates through them.
    ctx->save_for_backward({input, weight, bias, act_saved});
    ctx->saved_data["act"] = static_cast<int64_t>(act);
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["saved_is_result"] = saved_is_result;
    ctx->saved_data["input_sizes"] = input.sizes().vec();
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &weight = saved[1], &bias = saved[2];
    const Tensor x = as_matrix(saved[0], weight.size(1));
    const Tensor act_saved = as_matrix(saved[3], weight.size(0));
    const auto act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const double slope = ctx->saved_data["slope"].toDouble();
    const bool saved_is_result = ctx->saved_data["saved_is_result"].toBool();
    Tensor grad = as_matrix(grads[0], weight.size(0));
    // The gradient before the activation, and the bias gradient, in one pass.
    Tensor grad_z, grad_bias;
    if (act == Activation::None) {
      grad_z = grad;
      if (bias.defined()) grad_bias = grad.sum(0);
    } else if (bias.defined() && saved_is_result) {
      std::tie(grad_z, grad_bias) =
          activation::dispatch_bias_act_backward(grad, act_saved, bias, act, slope, true);
    } else {
      // The result, or the pre-activation (bias included) for a negative slope.
      grad_z = activation::dispatch_activation_backward(act, grad, act_saved, slope, false);
      if (bias.defined()) grad_bias = grad_z.sum(0);
    }
    Tensor grad_input, grad_weight;
    if (ctx->needs_input_grad(0)) {
      grad_input = grad_z.mm(weight).view(ctx->saved_data["input_sizes"].toIntVector());
    }
    if (ctx->needs_input_grad(1)) grad_weight = grad_z.t().mm(x);
    // needs_input_grad counts tensor inputs only: an absent bias has no index.
    const bool bias_grad = bias.defined() && ctx->needs_input_grad(2);
    return {grad_input, grad_weight, bias_grad ? grad_bias : Tensor(), Tensor(), Tensor()};
  }
};

Tensor linear_act_autograd(const Tensor& input, const Tensor& weight,
                           const c10::optional<Tensor>& bias, c10::string_view activation_name,
                           double slope) {
  const Tensor& bias_tensor = bias.has_value() ? *bias : Tensor();
  if (!any_requires_grad({&input, &weight, &bias_tensor})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<LinearActSignature>("pyops::linear_act");
    return op.call(input, weight, bias, activation_name, slope);
  }
  return LinearActFunction::apply(input, weight, bias, activation_name, slope);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("linear_act(Tensor input, Tensor weight, Tensor? bias=None, str activation=\"none\", "
        "float negative_slope=0.01) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("linear_act", linear_act_impl);
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("linear_act", linear_act_impl);
}

constexpr char kLinearActName[] = "pyops::linear_act";

// Linear layers run in the autocast dtype, as torch's do (common/autocast.h).
TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) {
  m.impl("linear_act",
         lower_precision_autocast<c10::DeviceType::CPU, LinearActSignature, kLinearActName>);
}

TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) {
  m.impl("linear_act",
         lower_precision_autocast<c10::DeviceType::CUDA, LinearActSignature, kLinearActName>);
}

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("linear_act", linear_act_autograd);
}

}  // namespace pyops::linear
