// The convolution family's operators: schemas, argument checks, output allocation and
// autograd, written once for every device. The arithmetic is in the kernels
// (conv_cpu.cpp, conv_cuda.cu), reached through the dispatch tables.
//
//   conv2d, conv2d_bias_act      convolution (+ bias + activation in one pass)
//   conv_transpose2d             transposed convolution (+ bias)
//   _conv2d_backward             gradients of a convolution's input, weight and bias,
//                                only those asked for by output_mask
// conv_transpose2d's backward is a conv2d and a _conv2d_backward, and the fused op's
// backward is the activation family's (_bias_act_backward / _<act>_backward) followed by
// _conv2d_backward; every step is an operator, so double backward and torch.compile see
// all of them.

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <sstream>
#include <vector>

#include "common/autocast.h"
#include "common/checks.h"
#include "common/memory.h"
#include "common/operators.h"
#include "conv/conv.h"

namespace pyops::conv {

DispatchTable<ForwardFn> forward_kernel("conv2d forward");
DispatchTable<BackwardInputFn> backward_input_kernel("conv2d backward (input)");
DispatchTable<BackwardWeightFn> backward_weight_kernel("conv2d backward (weight)");

namespace {

using activation::Activation;
using at::IntArrayRef;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Pair = std::array<int64_t, 2>;
using OptionalTensor = std::optional<Tensor>;

constexpr const char* kConv = "pyops.conv2d";
constexpr const char* kConvAct = "pyops.conv2d_bias_act";
constexpr const char* kConvT = "pyops.conv_transpose2d";
constexpr const char* kConvBackward = "pyops._conv2d_backward";

// ---- Arguments -------------------------------------------------------------------------

// An int[2] argument given as one value or two, as torch accepts.
Pair expand_pair(IntArrayRef values, const char* arg, const char* op) {
  TORCH_CHECK_VALUE(values.size() == 1 || values.size() == 2, op, ": expected ", arg,
                    " to be an int or a list of 2 ints, got ", values);
  return values.size() == 1 ? Pair{values[0], values[0]} : Pair{values[0], values[1]};
}

struct ConvArgs {
  Pair stride, padding, dilation;
  int64_t groups;
};

ConvArgs parse_args(IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                    const char* op) {
  ConvArgs a{expand_pair(stride, "stride", op), expand_pair(padding, "padding", op),
             expand_pair(dilation, "dilation", op), groups};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(a.stride[i] > 0, op, ": expected stride to be positive, got ", stride);
    TORCH_CHECK_VALUE(a.padding[i] >= 0, op, ": expected padding to be non-negative, got ",
                      padding);
    TORCH_CHECK_VALUE(a.dilation[i] > 0, op, ": expected dilation to be positive, got ",
                      dilation);
  }
  TORCH_CHECK_VALUE(groups > 0, op, ": expected groups to be positive, got ", groups);
  return a;
}

std::string shape_string(IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

void check_tensors(const Tensor& input, const Tensor& weight, const OptionalTensor& bias,
                   const char* op) {
  check_floating(input, "input", op);
  check_floating(weight, "weight", op);
  check_same_dtype(weight, "weight", input, "input", op);
  check_same_device(weight, "weight", input, "input", op);
  TORCH_CHECK(input.dim() == 4, op, ": expected a 3-D (unbatched) or 4-D (batched) input, got ",
              input.dim(), "-D input of size ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, op,
              ": expected a 4-D weight [out_channels, in_channels / groups, kH, kW]"
              " (conv_transpose2d: [in_channels, out_channels / groups, kH, kW]), got ",
              weight.dim(), "-D weight of size ", weight.sizes());
  // torch raises for a zero-size weight too (and, for no input channels, returns a
  // wrongly shaped result): an empty kernel or channel count is refused here.
  TORCH_CHECK(weight.numel() > 0, op, ": expected a weight with no zero-size dimension, got ",
              "weight of size ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    check_floating(*bias, "bias", op);
    check_same_dtype(*bias, "bias", input, "input", op);
    check_same_device(*bias, "bias", input, "input", op);
  }
}

void check_bias_size(const OptionalTensor& bias, int64_t channels, const char* op) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == channels, op, ": expected bias of shape [",
              channels, "] (the output channels), got ", bias->sizes());
}

// Output size of a convolution; checks that the dilated kernel fits the padded input.
Pair conv_output_hw(const Tensor& input, const Tensor& weight, const ConvArgs& a, const char* op) {
  Pair padded{}, extent{};
  for (int i = 0; i < 2; ++i) {
    padded[i] = checked_add(input.size(2 + i), checked_mul(2, a.padding[i], "2 * padding", op),
                            "the padded input size", op);
    extent[i] = checked_add(checked_mul(a.dilation[i], weight.size(2 + i) - 1,
                                        "the dilated kernel size", op),
                            1, "the dilated kernel size", op);
  }
  Pair out{};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(extent[i] <= padded[i], op, ": the kernel (", weight.size(2), " x ",
                weight.size(3), ", dilated: ", extent[0], " x ", extent[1],
                ") is larger than the padded input (", padded[0], " x ", padded[1], ")");
    out[i] = conv_output_size(input.size(2 + i), weight.size(2 + i), a.stride[i], a.padding[i],
                              a.dilation[i]);
  }
  return out;
}

// Checks a convolution's channels and returns its shape (forward orientation).
ConvShape conv_shape(const Tensor& input, const Tensor& weight, const ConvArgs& a,
                     const char* op) {
  const int64_t groups = a.groups;
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": given groups=", groups,
              ", expected weight to be divisible by ", groups,
              " at dimension 0 (out_channels), got weight of size ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, op, ": given groups=", groups,
              ", weight of size ", weight.sizes(), " expects input to have ",
              weight.size(1) * groups, " channels, got input of size ", input.sizes(), " with ",
              input.size(1), " channels");
  const Pair out = conv_output_hw(input, weight, a, op);
  return ConvShape{input.size(0),  input.size(1),  input.size(2),  input.size(3),
                   weight.size(0), out[0],         out[1],         weight.size(2),
                   weight.size(3), a.stride[0],    a.stride[1],    a.padding[0],
                   a.padding[1],   a.dilation[0],  a.dilation[1],  groups};
}

// Outputs are channels-last when the input or the weight is (as torch's CPU and cuDNN
// convolutions choose); pyops/_fake/conv.py applies the same rule.
bool is_channels_last(const Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}
bool use_channels_last(const Tensor& input, const Tensor& weight) {
  return is_channels_last(input) || is_channels_last(weight);
}
Tensor in_format(const Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

Tensor defined_or_empty(const OptionalTensor& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

// ---- Device implementations --------------------------------------------------------------

Tensor conv_forward_impl(const Tensor& input, const Tensor& weight, const OptionalTensor& bias,
                         IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                         int64_t groups, Activation act, double slope, const char* op) {
  check_tensors(input, weight, bias, op);
  const ConvArgs a = parse_args(stride, padding, dilation, groups, op);
  const ConvShape s = conv_shape(input, weight, a, op);
  check_bias_size(bias, s.out_channels, op);
  Tensor output = with_huge_pages(
      at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options()));
  if (output.numel() > 0) {
    forward_kernel(input.device().type())(s, input.contiguous(), weight.contiguous(),
                                          defined_or_empty(bias), act, slope, output);
  }
  return in_format(output, use_channels_last(input, weight));
}

Tensor conv2d_impl(const Tensor& input, const Tensor& weight, const OptionalTensor& bias,
                   IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
  return conv_forward_impl(input, weight, bias, stride, padding, dilation, groups,
                           Activation::None, 0.0, kConv);
}

Tensor conv2d_bias_act_impl(const Tensor& input, const Tensor& weight, const OptionalTensor& bias,
                            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                            int64_t groups, c10::string_view activation, double slope) {
  return conv_forward_impl(input, weight, bias, stride, padding, dilation, groups,
                           activation::parse_activation(activation, kConvAct), slope, kConvAct);
}

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor> conv2d_backward_impl(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, IntArrayRef stride,
    IntArrayRef padding, IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const char* op = kConvBackward;
  check_tensors(input, weight, std::nullopt, op);
  check_floating(grad_output, "grad_output", op);
  check_same_dtype(grad_output, "grad_output", input, "input", op);
  check_same_device(grad_output, "grad_output", input, "input", op);
  const ConvArgs a = parse_args(stride, padding, dilation, groups, op);
  ConvShape s = conv_shape(input, weight, a, op);
  // grad_output may cover fewer positions than the convolution produces (the backward of
  // a conv_transpose2d whose output_padding is >= its stride): the rest gets no gradient.
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.batch &&
                  grad_output.size(1) == s.out_channels && grad_output.size(2) <= s.out_h &&
                  grad_output.size(3) <= s.out_w,
              op, ": expected grad_output of size [", s.batch, ", ", s.out_channels, ", ",
              s.out_h, ", ", s.out_w, "] (the convolution's output), got ", grad_output.sizes());
  s.out_h = grad_output.size(2);
  s.out_w = grad_output.size(3);
  const bool channels_last = use_channels_last(input, weight);
  const Tensor grad = grad_output.contiguous();
  const bool no_terms = grad.numel() == 0;
  OptionalTensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    Tensor result = with_huge_pages(at::empty(input.sizes(), input.options()));
    if (no_terms) {
      result.zero_();
    } else if (result.numel() > 0) {
      backward_input_kernel(grad.device().type())(s, grad, weight.contiguous(), Tensor(),
                                                  Activation::None, 0.0, result);
    }
    grad_input = in_format(result, channels_last);
  }
  if (output_mask[1]) {
    Tensor result = at::empty(weight.sizes(), weight.options());
    if (no_terms || input.numel() == 0) {
      result.zero_();
    } else if (result.numel() > 0) {
      backward_weight_kernel(grad.device().type())(s, input.contiguous(), grad, result);
    }
    grad_weight = in_format(result, channels_last);
  }
  if (output_mask[2]) grad_bias = grad.sum({0, 2, 3});
  return {grad_input, grad_weight, grad_bias};
}

Tensor conv_transpose2d_impl(const Tensor& input, const Tensor& weight, const OptionalTensor& bias,
                             IntArrayRef stride, IntArrayRef padding, IntArrayRef output_padding,
                             int64_t groups, IntArrayRef dilation) {
  const char* op = kConvT;
  check_tensors(input, weight, bias, op);
  const ConvArgs a = parse_args(stride, padding, dilation, groups, op);
  const Pair extra = expand_pair(output_padding, "output_padding", op);
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": given groups=", groups,
              ", expected weight to be divisible by ", groups,
              " at dimension 0 (in_channels), got weight of size ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(0), op, ": given groups=", groups, ", weight of size ",
              weight.sizes(), " expects input to have ", weight.size(0),
              " channels, got input of size ", input.sizes(), " with ", input.size(1),
              " channels");
  // As torch: only the batch may be empty (no input channels is a zero-size weight).
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0, op,
              ": expected input with non-zero height and width (only the batch may be empty), "
              "got input of size ", input.sizes());
  Pair out{};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(extra[i] >= 0 && (extra[i] < a.stride[i] || extra[i] < a.dilation[i]), op,
                      ": expected output_padding to be non-negative and smaller than either "
                      "stride or dilation, got output_padding=", output_padding,
                      ", stride=", stride, ", dilation=", dilation);
    // The output extent, each term checked for overflow: (in - 1) * stride
    // + dilation * (kernel - 1) + output_padding + 1 - 2 * padding.
    const int64_t grown = checked_add(
        checked_mul(input.size(2 + i) - 1, a.stride[i], "(input size - 1) * stride", op),
        checked_mul(a.dilation[i], weight.size(2 + i) - 1, "the dilated kernel size", op),
        "the output size", op);
    out[i] = checked_add(grown, extra[i] + 1, "the output size", op) -
             checked_mul(2, a.padding[i], "2 * padding", op);
  }
  // An output of zero rows or columns too: torch raises for it or returns an empty
  // tensor, depending on the batch size (the kernel it picks).
  TORCH_CHECK(out[0] > 0 && out[1] > 0, op, ": the output size ", out[0], " x ", out[1],
              " is too small (input ", shape_string(input.sizes()), ", weight ",
              shape_string(weight.sizes()), ", padding ", padding, ")");
  const int64_t out_channels = weight.size(1) * groups;
  check_bias_size(bias, out_channels, op);
  // The convolution whose input gradient this is: input <-> output swapped.
  const ConvShape s{input.size(0), out_channels,   out[0],        out[1],        input.size(1),
                    input.size(2), input.size(3),  weight.size(2), weight.size(3), a.stride[0],
                    a.stride[1],   a.padding[0],   a.padding[1],  a.dilation[0], a.dilation[1],
                    groups};
  Tensor output =
      with_huge_pages(at::empty({s.batch, out_channels, out[0], out[1]}, input.options()));
  if (output.numel() > 0) {
    backward_input_kernel(input.device().type())(s, input.contiguous(), weight.contiguous(),
                                                 defined_or_empty(bias), Activation::None, 0.0,
                                                 output);
  }
  return in_format(output, use_channels_last(input, weight));
}

// ---- Calling operators through the dispatcher -------------------------------------------

using ConvSignature = Tensor(const Tensor&, const Tensor&, const OptionalTensor&, IntArrayRef,
                             IntArrayRef, IntArrayRef, int64_t);
using ConvActSignature = Tensor(const Tensor&, const Tensor&, const OptionalTensor&, IntArrayRef,
                                IntArrayRef, IntArrayRef, int64_t, c10::string_view, double);
using ConvTSignature = Tensor(const Tensor&, const Tensor&, const OptionalTensor&, IntArrayRef,
                              IntArrayRef, IntArrayRef, int64_t, IntArrayRef);
using BackwardResult = std::tuple<OptionalTensor, OptionalTensor, OptionalTensor>;
using BackwardSignature = BackwardResult(const Tensor&, const Tensor&, const Tensor&, IntArrayRef,
                                         IntArrayRef, IntArrayRef, int64_t, std::array<bool, 3>);

Tensor call_conv2d(const Tensor& input, const Tensor& weight, const OptionalTensor& bias,
                   IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
  static auto op = op_handle<ConvSignature>("pyops::conv2d");
  return op.call(input, weight, bias, stride, padding, dilation, groups);
}

BackwardResult call_conv2d_backward(const Tensor& grad_output, const Tensor& input,
                                    const Tensor& weight, IntArrayRef stride, IntArrayRef padding,
                                    IntArrayRef dilation, int64_t groups,
                                    std::array<bool, 3> mask) {
  static auto op = op_handle<BackwardSignature>("pyops::_conv2d_backward");
  return op.call(grad_output, input, weight, stride, padding, dilation, groups, mask);
}

Tensor value_or_undefined(const OptionalTensor& t) { return t.has_value() ? *t : Tensor(); }

// grad_output * act'(result), with the activation family's operators.
Tensor call_activation_backward(Activation act, const Tensor& grad, const Tensor& result,
                                double slope) {
  using Binary = Tensor(const Tensor&, const Tensor&);
  static auto relu = op_handle<Binary>("pyops::_relu_backward");
  static auto sigmoid = op_handle<Binary>("pyops::_sigmoid_backward");
  static auto tanh = op_handle<Binary>("pyops::_tanh_backward");
  static auto leaky = op_handle<Tensor(const Tensor&, const Tensor&, double, bool)>(
      "pyops::_leaky_relu_backward");
  switch (act) {
    case Activation::Relu: return relu.call(grad, result);
    case Activation::Sigmoid: return sigmoid.call(grad, result);
    case Activation::Tanh: return tanh.call(grad, result);
    case Activation::LeakyRelu: return leaky.call(grad, result, slope, true);
    case Activation::None: return grad;
  }
  TORCH_INTERNAL_ASSERT(false);
}

std::vector<int64_t> to_vector(IntArrayRef v) { return v.vec(); }

void save_args(AutogradContext* ctx, IntArrayRef stride, IntArrayRef padding,
               IntArrayRef dilation, int64_t groups) {
  ctx->saved_data["stride"] = to_vector(stride);
  ctx->saved_data["padding"] = to_vector(padding);
  ctx->saved_data["dilation"] = to_vector(dilation);
  ctx->saved_data["groups"] = groups;
}

struct SavedArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};
SavedArgs load_args(AutogradContext* ctx) {
  return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
}

// ---- Autograd ---------------------------------------------------------------------------

// conv2d and conv2d_bias_act (act = None for conv2d). The activation's derivative is
// taken from the result, so the pre-activation is never kept (leaky_relu with a negative
// slope, whose result does not tell the sign of its input, is not fused under autograd).
struct ConvFunction : torch::autograd::Function<ConvFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const OptionalTensor& bias, IntArrayRef stride, IntArrayRef padding,
                        IntArrayRef dilation, int64_t groups, int64_t act_id, double slope) {
    const auto act = static_cast<Activation>(act_id);
    Tensor result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (act == Activation::None) {
        result = call_conv2d(input, weight, bias, stride, padding, dilation, groups);
      } else {
        static auto op = op_handle<ConvActSignature>("pyops::conv2d_bias_act");
        result = op.call(input, weight, bias, stride, padding, dilation, groups,
                         activation::activation_name(act), slope);
      }
    }
    const Tensor b = value_or_undefined(bias);
    ctx->save_for_backward({input, weight, b, act == Activation::None ? Tensor() : result});
    save_args(ctx, stride, padding, dilation, groups);
    ctx->saved_data["act"] = act_id;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["has_bias"] = b.defined();
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &result = saved[3];
    const SavedArgs a = load_args(ctx);
    const auto act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const double slope = ctx->saved_data["slope"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool want_bias = has_bias && ctx->needs_input_grad(2);
    Tensor grad = grads[0], grad_bias;
    if (act != Activation::None) {
      if (has_bias) {  // the pre-activation gradient and its channel sums in one pass
        static auto op = op_handle<std::tuple<Tensor, Tensor>(
            const Tensor&, const Tensor&, const Tensor&, c10::string_view, double, bool)>(
            "pyops::_bias_act_backward");
        std::tie(grad, grad_bias) =
            op.call(grad, result, bias, activation::activation_name(act), slope, true);
        if (!want_bias) grad_bias = Tensor();
      } else {
        grad = call_activation_backward(act, grad, result, slope);
      }
    }
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   want_bias && act == Activation::None};
    Tensor grad_input, grad_weight;
    if (mask[0] || mask[1] || mask[2]) {
      auto [gi, gw, gb] = call_conv2d_backward(grad, input, weight, a.stride, a.padding,
                                               a.dilation, a.groups, mask);
      grad_input = value_or_undefined(gi);
      grad_weight = value_or_undefined(gw);
      if (mask[2]) grad_bias = value_or_undefined(gb);
    }
    return {grad_input, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(),
            Tensor(),   Tensor(),    Tensor()};
  }
};

// _conv2d_backward: gi = conv^T(g, w), gw = wgrad(x, g), gb = sum(g). Its own gradients
// are convolutions again (bilinear in (g, w) and (x, g)).
struct ConvBackwardFunction : torch::autograd::Function<ConvBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& input,
                               const Tensor& weight, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask) {
    BackwardResult result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = call_conv2d_backward(grad, input, weight, stride, padding, dilation, groups, mask);
    }
    ctx->save_for_backward({grad, input, weight});
    save_args(ctx, stride, padding, dilation, groups);
    ctx->saved_data["mask"] = c10::List<bool>({mask[0], mask[1], mask[2]});
    // Only the computed gradients are outputs of the node (autograd takes no undefined
    // outputs); backward maps them back by the mask.
    variable_list outputs;
    for (const OptionalTensor& t : {std::get<0>(result), std::get<1>(result), std::get<2>(result)}) {
      if (t.has_value()) outputs.push_back(*t);
    }
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &grad = saved[0], &input = saved[1], &weight = saved[2];
    const SavedArgs a = load_args(ctx);
    const auto mask = ctx->saved_data["mask"].toBoolList();
    Tensor upstream[3];
    for (size_t i = 0, next = 0; i < 3; ++i) {
      if (mask[i]) upstream[i] = grads[next++];
    }
    const Tensor &up_input = upstream[0], &up_weight = upstream[1], &up_bias = upstream[2];
    Tensor d_grad, d_input, d_weight;
    auto accumulate = [](Tensor& into, const Tensor& term) {
      if (term.defined()) into = into.defined() ? into.add(term) : term;
    };
    // The convolution's output covers at least grad's positions; keep those.
    auto crop = [&](const Tensor& t) {
      return t.narrow(2, 0, grad.size(2)).narrow(3, 0, grad.size(3));
    };
    if (up_input.defined()) {
      if (ctx->needs_input_grad(0)) {
        accumulate(d_grad, crop(call_conv2d(up_input, weight, std::nullopt, a.stride, a.padding,
                                            a.dilation, a.groups)));
      }
      if (ctx->needs_input_grad(2)) {
        accumulate(d_weight, value_or_undefined(std::get<1>(call_conv2d_backward(
                                 grad, up_input, weight, a.stride, a.padding, a.dilation,
                                 a.groups, {false, true, false}))));
      }
    }
    if (up_weight.defined()) {
      if (ctx->needs_input_grad(0)) {
        accumulate(d_grad, crop(call_conv2d(input, up_weight, std::nullopt, a.stride, a.padding,
                                            a.dilation, a.groups)));
      }
      if (ctx->needs_input_grad(1)) {
        accumulate(d_input, value_or_undefined(std::get<0>(call_conv2d_backward(
                                grad, input, up_weight, a.stride, a.padding, a.dilation,
                                a.groups, {true, false, false}))));
      }
    }
    if (up_bias.defined() && ctx->needs_input_grad(0)) {
      accumulate(d_grad, up_bias.view({1, -1, 1, 1}).expand_as(grad));
    }
    return {d_grad, d_input, d_weight, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// conv_transpose2d: the input gradient is a conv2d of the output gradient, the weight
// gradient a _conv2d_backward with the roles of input and output swapped.
struct ConvTransposeFunction : torch::autograd::Function<ConvTransposeFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const OptionalTensor& bias, IntArrayRef stride, IntArrayRef padding,
                        IntArrayRef output_padding, int64_t groups, IntArrayRef dilation) {
    static auto op = op_handle<ConvTSignature>("pyops::conv_transpose2d");
    Tensor result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(input, weight, bias, stride, padding, output_padding, groups, dilation);
    }
    ctx->save_for_backward({input, weight});
    save_args(ctx, stride, padding, dilation, groups);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &grad = grads[0];
    const SavedArgs a = load_args(ctx);
    Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_input = call_conv2d(grad, weight, std::nullopt, a.stride, a.padding, a.dilation,
                               a.groups);
      // output_padding >= stride (allowed when < dilation) leaves extra rows: crop them.
      grad_input = grad_input.narrow(2, 0, input.size(2)).narrow(3, 0, input.size(3));
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = value_or_undefined(std::get<1>(call_conv2d_backward(
          input, grad, weight, a.stride, a.padding, a.dilation, a.groups, {false, true, false})));
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = grad.sum({0, 2, 3});
    }
    return {grad_input, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---- Autograd-key kernels --------------------------------------------------------------
// Without a gradient to record they go straight below autograd.

Tensor conv2d_autograd(const Tensor& input, const Tensor& weight, const OptionalTensor& bias,
                       IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                       int64_t groups) {
  const Tensor b = value_or_undefined(bias);
  if (!any_requires_grad({&input, &weight, &b})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_conv2d(input, weight, bias, stride, padding, dilation, groups);
  }
  return ConvFunction::apply(input, weight, bias, stride, padding, dilation, groups,
                             static_cast<int64_t>(Activation::None), 0.0);
}

Tensor conv2d_bias_act_autograd(const Tensor& input, const Tensor& weight,
                                const OptionalTensor& bias, IntArrayRef stride,
                                IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                c10::string_view activation, double slope) {
  const Activation act = activation::parse_activation(activation, kConvAct);
  const Tensor b = value_or_undefined(bias);
  if (!any_requires_grad({&input, &weight, &b})) {
    static auto op = op_handle<ConvActSignature>("pyops::conv2d_bias_act");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, stride, padding, dilation, groups, activation, slope);
  }
  if (act == Activation::LeakyRelu && slope < 0.0) {
    static auto leaky = op_handle<Tensor(const Tensor&, double)>("pyops::leaky_relu");
    return leaky.call(call_conv2d(input, weight, bias, stride, padding, dilation, groups), slope);
  }
  return ConvFunction::apply(input, weight, bias, stride, padding, dilation, groups,
                             static_cast<int64_t>(act), slope);
}

Tensor conv_transpose2d_autograd(const Tensor& input, const Tensor& weight,
                                 const OptionalTensor& bias, IntArrayRef stride,
                                 IntArrayRef padding, IntArrayRef output_padding, int64_t groups,
                                 IntArrayRef dilation) {
  const Tensor b = value_or_undefined(bias);
  if (!any_requires_grad({&input, &weight, &b})) {
    static auto op = op_handle<ConvTSignature>("pyops::conv_transpose2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, stride, padding, output_padding, groups, dilation);
  }
  return ConvTransposeFunction::apply(input, weight, bias, stride, padding, output_padding,
                                      groups, dilation);
}

BackwardResult conv2d_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                        const Tensor& weight, IntArrayRef stride,
                                        IntArrayRef padding, IntArrayRef dilation,
                                        int64_t groups, std::array<bool, 3> mask) {
  if (!any_requires_grad({&grad_output, &input, &weight})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups,
                                mask);
  }
  auto outputs = ConvBackwardFunction::apply(grad_output, input, weight, stride, padding,
                                             dilation, groups, mask);
  OptionalTensor result[3];
  for (size_t i = 0, next = 0; i < 3; ++i) {
    if (mask[i]) result[i] = outputs[next++];
  }
  return {result[0], result[1], result[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, "
        "int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor");
  m.def("conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, int[2] stride=1, "
        "int[2] padding=0, int[2] dilation=1, int groups=1, str activation=\"relu\", "
        "float negative_slope=0.01) -> Tensor");
  m.def("conv_transpose2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, "
        "int[2] padding=0, int[2] output_padding=0, int groups=1, int[2] dilation=1) -> Tensor");
  m.def("_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) "
        "-> (Tensor? grad_input, Tensor? grad_weight, Tensor? grad_bias)");
}

#define PYOPS_CONV_DEVICE_IMPLS(m)                      \
  m.impl("conv2d", conv2d_impl);                        \
  m.impl("conv2d_bias_act", conv2d_bias_act_impl);      \
  m.impl("conv_transpose2d", conv_transpose2d_impl);    \
  m.impl("_conv2d_backward", conv2d_backward_impl)

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  PYOPS_CONV_DEVICE_IMPLS(m);
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  PYOPS_CONV_DEVICE_IMPLS(m);
}

constexpr char kConv2dName[] = "pyops::conv2d";
constexpr char kConv2dBiasActName[] = "pyops::conv2d_bias_act";
constexpr char kConvTranspose2dName[] = "pyops::conv_transpose2d";

// Convolutions run in the autocast dtype, as torch's do (common/autocast.h).
#define PYOPS_CONV_AUTOCAST_IMPLS(m, device)                                                    \
  m.impl("conv2d", lower_precision_autocast<device, ConvSignature, kConv2dName>);               \
  m.impl("conv2d_bias_act", lower_precision_autocast<device, ConvActSignature,                  \
                                                     kConv2dBiasActName>);                      \
  m.impl("conv_transpose2d", lower_precision_autocast<device, ConvTSignature, kConvTranspose2dName>)

TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) {
  PYOPS_CONV_AUTOCAST_IMPLS(m, c10::DeviceType::CPU);
}

TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) {
  PYOPS_CONV_AUTOCAST_IMPLS(m, c10::DeviceType::CUDA);
}

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("conv2d", conv2d_autograd);
  m.impl("conv2d_bias_act", conv2d_bias_act_autograd);
  m.impl("conv_transpose2d", conv_transpose2d_autograd);
  m.impl("_conv2d_backward", conv2d_backward_autograd);
}

}  // namespace pyops::conv
