// The activation family's operators: schemas, argument checks, output allocation and
// autograd, written once for every device. The arithmetic is in the kernels
// (activation_cpu.cpp, activation_cuda.cu), reached through the dispatch tables.

#include <ATen/MemoryOverlap.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include "activation/activation.h"
#include "common/checks.h"
#include "common/memory.h"
#include "common/operators.h"
#include "common/registration.h"
#include "common/layout.h"

namespace pyops::activation {

DispatchTable<ForwardFn> forward_kernel("activation forward");
DispatchTable<BackwardFn> backward_kernel("activation backward");
DispatchTable<BiasForwardFn> bias_forward_kernel("bias_act forward");
DispatchTable<BiasBackwardFn> bias_backward_kernel("bias_act backward");

Activation parse_activation(c10::string_view name, const char* op_name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "leaky_relu") return Activation::LeakyRelu;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "tanh") return Activation::Tanh;
  TORCH_CHECK_VALUE(false, op_name,
                    ": expected activation to be one of 'none', 'relu', 'leaky_relu', "
                    "'sigmoid', 'tanh', got '", std::string(name), "'");
}

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::None: return "none";
    case Activation::Relu: return "relu";
    case Activation::LeakyRelu: return "leaky_relu";
    case Activation::Sigmoid: return "sigmoid";
    case Activation::Tanh: return "tanh";
  }
  return "?";
}

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- Element-wise forward: out-of-place, in-place and out= -------------------------

Tensor forward_impl(Activation act, double slope, const Tensor& self, const char* op) {
  check_floating(self, "input", op);
  Tensor input = dense(self);
  Tensor output = with_huge_pages(at::empty_like(input));
  if (input.numel() > 0) forward_kernel(input.device().type())(act, slope, input, output);
  return output;
}

void forward_inplace_impl(Activation act, double slope, const Tensor& self, const char* op) {
  check_floating(self, "input", op);
  check_writable(self, "input", op);
  if (self.numel() == 0) return;
  if (self.is_non_overlapping_and_dense()) {
    forward_kernel(self.device().type())(act, slope, self, self);
  } else {
    Tensor work = self.contiguous();
    forward_kernel(work.device().type())(act, slope, work, work);
    self.copy_(work);  // never leave the result in a dropped copy
  }
}

// Writes `result` (dense) into the user's `out`, resized like torch's out= ops.
void write_out(const Tensor& result, const Tensor& out) {
  at::native::resize_output(out, result.sizes());
  if (!out.is_same(result)) out.copy_(result);
}

void check_out(const Tensor& out, const char* out_arg, const Tensor& ref, const char* ref_arg,
               const char* op) {
  check_floating(out, out_arg, op);
  check_same_dtype(out, out_arg, ref, ref_arg, op);
  check_same_device(out, out_arg, ref, ref_arg, op);
  check_writable(out, out_arg, op);
}

void forward_out_impl(Activation act, double slope, const Tensor& self, const Tensor& out,
                      const char* op) {
  check_floating(self, "input", op);
  check_out(out, "out", self, "input", op);
  at::assert_no_partial_overlap(out, self);
  if (out.sizes() == self.sizes() && out.is_non_overlapping_and_dense()) {
    Tensor input = dense_like(self, out);
    if (out.numel() > 0) forward_kernel(out.device().type())(act, slope, input, out);
    return;
  }
  write_out(forward_impl(act, slope, self, op), out);
}

// ---- Element-wise backward ----------------------------------------------------------

void check_backward_args(const Tensor& grad_output, const Tensor& saved, const char* saved_arg,
                         const char* op) {
  check_floating(grad_output, "grad_output", op);
  check_floating(saved, saved_arg, op);
  check_same_dtype(saved, saved_arg, grad_output, "grad_output", op);
  check_same_device(saved, saved_arg, grad_output, "grad_output", op);
  check_same_shape(saved, saved_arg, grad_output, "grad_output", op);
}

Tensor backward_impl(Activation act, double slope, const Tensor& grad_output, const Tensor& saved,
                     const char* saved_arg, const char* op) {
  check_backward_args(grad_output, saved, saved_arg, op);
  Tensor saved_dense = dense(saved);
  Tensor grad = dense_like(grad_output, saved_dense);
  Tensor grad_input = with_huge_pages(at::empty_like(saved_dense));
  if (grad_input.numel() > 0) {
    backward_kernel(grad.device().type())(act, slope, grad, saved_dense, grad_input);
  }
  return grad_input;
}

void backward_out_impl(Activation act, double slope, const Tensor& grad_output,
                       const Tensor& saved, const char* saved_arg, const Tensor& grad_input,
                       const char* op) {
  check_backward_args(grad_output, saved, saved_arg, op);
  check_out(grad_input, "grad_input", grad_output, "grad_output", op);
  at::assert_no_partial_overlap(grad_input, grad_output);
  at::assert_no_partial_overlap(grad_input, saved);
  if (grad_input.sizes() == saved.sizes() && grad_input.is_non_overlapping_and_dense()) {
    if (grad_input.numel() > 0) {
      backward_kernel(grad_input.device().type())(act, slope, dense_like(grad_output, grad_input),
                                                  dense_like(saved, grad_input), grad_input);
    }
    return;
  }
  write_out(backward_impl(act, slope, grad_output, saved, saved_arg, op), grad_input);
}

void check_leaky_backward(double slope, bool self_is_result, const char* op) {
  TORCH_CHECK(!self_is_result || slope >= 0.0, op,
              ": the backward of an in-place leaky_relu needs negative_slope >= 0 (the "
              "input is lost), got negative_slope=", slope,
              "; call the out-of-place leaky_relu instead");
}

// ---- bias_act -----------------------------------------------------------------------

// `input` brought to a layout the bias kernels walk as [outer, channels, inner].
std::pair<Tensor, ChannelLayout> channel_layout(const Tensor& self) {
  const int64_t channels = self.size(1);
  const int64_t numel = self.numel();
  const auto memory_format = self.suggest_memory_format();
  const bool channels_last = (memory_format == at::MemoryFormat::ChannelsLast ||
                              memory_format == at::MemoryFormat::ChannelsLast3d) &&
                             self.is_contiguous(memory_format);
  if (channels_last && !self.is_contiguous()) {
    return {self, ChannelLayout{channels == 0 ? 0 : numel / channels, channels, 1}};
  }
  Tensor input = self.contiguous();
  const int64_t outer = input.size(0);
  const int64_t inner = (outer == 0 || channels == 0) ? 0 : numel / (outer * channels);
  return {input, ChannelLayout{outer, channels, inner}};
}

void check_bias(const Tensor& self, const Tensor& bias, const char* op) {
  check_floating(self, "input", op);
  check_floating(bias, "bias", op);
  TORCH_CHECK(self.dim() >= 2, op, ": expected input with at least 2 dims (N, C, ...), got ",
              self.dim(), " dims of shape ", self.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == self.size(1), op,
              ": expected bias of shape [", self.size(1), "] (input.size(1)), got ",
              bias.sizes());
  check_same_dtype(bias, "bias", self, "input", op);
  check_same_device(bias, "bias", self, "input", op);
}

Tensor bias_act_impl(const Tensor& self, const Tensor& bias, c10::string_view activation,
                     double slope) {
  constexpr const char* op = "pyops.bias_act";
  check_bias(self, bias, op);
  const Activation act = parse_activation(activation, op);
  auto [input, layout] = channel_layout(self);
  Tensor output = with_huge_pages(at::empty_like(input));
  if (output.numel() > 0) {
    bias_forward_kernel(input.device().type())(act, slope, input, bias.contiguous(), output,
                                               layout);
  }
  return output;
}

std::tuple<Tensor, Tensor> bias_act_backward_impl(const Tensor& grad_output, const Tensor& saved,
                                                  const Tensor& bias,
                                                  c10::string_view activation, double slope,
                                                  bool saved_is_result) {
  constexpr const char* op = "pyops._bias_act_backward";
  check_bias(saved, bias, op);
  check_backward_args(grad_output, saved, "saved", op);
  const Activation act = parse_activation(activation, op);
  if (act == Activation::LeakyRelu) check_leaky_backward(slope, saved_is_result, op);
  auto [saved_dense, layout] = channel_layout(saved);
  Tensor grad = dense_like(grad_output, saved_dense);
  Tensor grad_input = with_huge_pages(at::empty_like(saved_dense));
  Tensor grad_bias = at::empty({bias.size(0)}, bias.options());
  if (grad_input.numel() > 0) {
    bias_backward_kernel(grad.device().type())(act, slope, saved_is_result, grad, saved_dense,
                                               bias.contiguous(), grad_input, grad_bias,
                                               layout);
  } else {
    grad_bias.zero_();
  }
  return {grad_input, grad_bias};
}

// ---- Calling the operators through the dispatcher ------------------------------------
// Autograd kernels call the operators (not the *_impl functions) so that fake tensors,
// functionalization and double backward see every step.

Tensor call_forward(Activation act, const Tensor& self, double slope) {
  using Unary = Tensor(const Tensor&);
  static auto relu = op_handle<Unary>("pyops::relu");
  static auto sigmoid = op_handle<Unary>("pyops::sigmoid");
  static auto tanh = op_handle<Unary>("pyops::tanh");
  static auto leaky_relu = op_handle<Tensor(const Tensor&, double)>("pyops::leaky_relu");
  switch (act) {
    case Activation::Relu: return relu.call(self);
    case Activation::Sigmoid: return sigmoid.call(self);
    case Activation::Tanh: return tanh.call(self);
    case Activation::LeakyRelu: return leaky_relu.call(self, slope);
    case Activation::None: break;
  }
  TORCH_INTERNAL_ASSERT(false, "no forward operator for activation none");
}

void call_forward_(Activation act, const Tensor& self, double slope) {
  using Unary = void(const Tensor&);
  static auto relu = op_handle<Unary>("pyops::relu_");
  static auto sigmoid = op_handle<Unary>("pyops::sigmoid_");
  static auto tanh = op_handle<Unary>("pyops::tanh_");
  static auto leaky_relu = op_handle<void(const Tensor&, double)>("pyops::leaky_relu_");
  switch (act) {
    case Activation::Relu: return relu.call(self);
    case Activation::Sigmoid: return sigmoid.call(self);
    case Activation::Tanh: return tanh.call(self);
    case Activation::LeakyRelu: return leaky_relu.call(self, slope);
    case Activation::None: break;
  }
  TORCH_INTERNAL_ASSERT(false, "no in-place operator for activation none");
}

// grad_output * act'(saved); `saved_is_result` as in the leaky_relu backward.
Tensor call_backward(Activation act, const Tensor& grad, const Tensor& saved, double slope,
                     bool saved_is_result) {
  using Binary = Tensor(const Tensor&, const Tensor&);
  static auto relu = op_handle<Binary>("pyops::_relu_backward");
  static auto sigmoid = op_handle<Binary>("pyops::_sigmoid_backward");
  static auto tanh = op_handle<Binary>("pyops::_tanh_backward");
  static auto leaky_relu =
      op_handle<Tensor(const Tensor&, const Tensor&, double, bool)>("pyops::_leaky_relu_backward");
  switch (act) {
    case Activation::Relu: return relu.call(grad, saved);
    case Activation::Sigmoid: return sigmoid.call(grad, saved);
    case Activation::Tanh: return tanh.call(grad, saved);
    case Activation::LeakyRelu: return leaky_relu.call(grad, saved, slope, saved_is_result);
    case Activation::None: return grad;
  }
  TORCH_INTERNAL_ASSERT(false);
}

// d/d(saved) of grad * act'(saved), contracted with `upstream`; undefined where it is 0.
Tensor second_derivative_term(Activation act, const Tensor& upstream, const Tensor& grad,
                              const Tensor& saved) {
  switch (act) {
    case Activation::Sigmoid: return upstream * grad * (1 - 2 * saved);  // (y(1-y))' = 1-2y
    case Activation::Tanh: return -2 * upstream * grad * saved;         // (1-y^2)'  = -2y
    default: return Tensor();  // piecewise-constant derivatives
  }
}

// ---- Autograd -------------------------------------------------------------------------

struct ForwardFunction : torch::autograd::Function<ForwardFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& self, int64_t act_id, double slope) {
    const auto act = static_cast<Activation>(act_id);
    Tensor result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = call_forward(act, self, slope);
    }
    // The result where it tells the input's sign (see activation.h), else the input.
    const bool save_result = act != Activation::LeakyRelu || slope >= 0.0;
    ctx->save_for_backward({save_result ? result : self});
    ctx->saved_data["act"] = act_id;
    ctx->saved_data["slope"] = slope;
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const Tensor saved = ctx->get_saved_variables()[0];
    // The saved value stands in for the input: the derivative is the same (see activation.h).
    return {call_backward(act, grads[0], saved, ctx->saved_data["slope"].toDouble(), false),
            Tensor(), Tensor()};
  }
};

struct InplaceFunction : torch::autograd::Function<InplaceFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& self, int64_t act_id, double slope) {
    const auto act = static_cast<Activation>(act_id);
    if (act == Activation::LeakyRelu) {
      check_leaky_backward(slope, /*self_is_result=*/true, "pyops.leaky_relu_");
    }
    {
      at::AutoDispatchBelowAutograd guard;  // still through ADInplaceOrView: bumps the version
      call_forward_(act, self, slope);
    }
    ctx->mark_dirty({self});
    ctx->save_for_backward({self});
    ctx->saved_data["act"] = act_id;
    ctx->saved_data["slope"] = slope;
    return self;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const Tensor result = ctx->get_saved_variables()[0];
    return {call_backward(act, grads[0], result, ctx->saved_data["slope"].toDouble(), true),
            Tensor(), Tensor()};
  }
};

struct BackwardFunction : torch::autograd::Function<BackwardFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& grad, const Tensor& saved,
                        int64_t act_id, double slope, bool saved_is_result) {
    const auto act = static_cast<Activation>(act_id);
    Tensor grad_input;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_input = call_backward(act, grad, saved, slope, saved_is_result);
    }
    ctx->save_for_backward({grad, saved});
    ctx->saved_data["act"] = act_id;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["saved_is_result"] = saved_is_result;
    return grad_input;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const auto saved_vars = ctx->get_saved_variables();
    const Tensor& upstream = grads[0];
    if (!upstream.defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    return {call_backward(act, upstream, saved_vars[1], ctx->saved_data["slope"].toDouble(),
                          ctx->saved_data["saved_is_result"].toBool()),
            second_derivative_term(act, upstream, saved_vars[0], saved_vars[1]), Tensor(),
            Tensor(), Tensor()};
  }
};

std::vector<int64_t> non_channel_dims(int64_t dim) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < dim; ++d) {
    if (d != 1) dims.push_back(d);
  }
  return dims;
}

Tensor broadcast_channel(const Tensor& per_channel, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = -1;
  return per_channel.view(shape);
}

std::tuple<Tensor, Tensor> call_bias_act_backward(const Tensor& grad, const Tensor& saved,
                                                  const Tensor& bias, Activation act, double slope,
                                                  bool saved_is_result) {
  static auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                        c10::string_view, double, bool)>(
      "pyops::_bias_act_backward");
  return op.call(grad, saved, bias, activation_name(act), slope, saved_is_result);
}

struct BiasActFunction : torch::autograd::Function<BiasActFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const Tensor& bias,
                        c10::string_view activation, double slope) {
    static auto op = op_handle<Tensor(const Tensor&, const Tensor&, c10::string_view, double)>(
        "pyops::bias_act");
    const Activation act = parse_activation(activation, "pyops.bias_act");
    Tensor result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(self, bias, activation, slope);
    }
    const bool save_result = act != Activation::LeakyRelu || slope >= 0.0;
    ctx->save_for_backward({save_result ? result : self, bias});
    ctx->saved_data["act"] = static_cast<int64_t>(act);
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["saved_is_result"] = save_result;
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const auto saved_vars = ctx->get_saved_variables();
    const Tensor& grad = grads[0];
    if (act == Activation::None) {  // d(x + b): the gradient itself, and its channel sums
      return {grad, grad.sum(non_channel_dims(grad.dim())), Tensor(), Tensor()};
    }
    auto [grad_input, grad_bias] =
        call_bias_act_backward(grad, saved_vars[0], saved_vars[1], act,
                               ctx->saved_data["slope"].toDouble(),
                               ctx->saved_data["saved_is_result"].toBool());
    return {grad_input, grad_bias, Tensor(), Tensor()};
  }
};

struct BiasActBackwardFunction : torch::autograd::Function<BiasActBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& saved,
                               const Tensor& bias, c10::string_view activation, double slope,
                               bool saved_is_result) {
    const Activation act = parse_activation(activation, "pyops._bias_act_backward");
    std::tuple<Tensor, Tensor> result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = call_bias_act_backward(grad, saved, bias, act, slope, saved_is_result);
    }
    ctx->save_for_backward({grad, saved, bias});
    ctx->saved_data["act"] = static_cast<int64_t>(act);
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["saved_is_result"] = saved_is_result;
    return {std::get<0>(result), std::get<1>(result)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const auto saved_vars = ctx->get_saved_variables();
    const Tensor &grad = saved_vars[0], &saved = saved_vars[1], &bias = saved_vars[2];
    // grad_bias is the channel sum of grad_input, so both upstream gradients meet on
    // grad_input's space.
    Tensor upstream = grads[0];
    if (grads[1].defined()) {
      Tensor from_bias = broadcast_channel(grads[1], saved.dim()).expand_as(saved);
      upstream = upstream.defined() ? upstream + from_bias : from_bias;
    }
    if (!upstream.defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const bool saved_is_result = ctx->saved_data["saved_is_result"].toBool();
    const double slope = ctx->saved_data["slope"].toDouble();
    Tensor pre_or_result = saved_is_result ? saved : saved + broadcast_channel(bias, saved.dim());
    return {call_backward(act, upstream, pre_or_result, slope, false),
            saved_is_result ? second_derivative_term(act, upstream, grad, saved) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---- Kernels the dispatcher calls ------------------------------------------------------

template <Activation A>
struct Named;
template <> struct Named<Activation::Relu> { static constexpr const char* op = "pyops.relu"; };
template <> struct Named<Activation::Sigmoid> { static constexpr const char* op = "pyops.sigmoid"; };
template <> struct Named<Activation::Tanh> { static constexpr const char* op = "pyops.tanh"; };

template <Activation A>
Tensor unary(const Tensor& self) {
  return forward_impl(A, 0.0, self, Named<A>::op);
}
template <Activation A>
void unary_(const Tensor& self) {
  forward_inplace_impl(A, 0.0, self, Named<A>::op);
}
template <Activation A>
void unary_out(const Tensor& self, const Tensor& out) {
  forward_out_impl(A, 0.0, self, out, Named<A>::op);
}
template <Activation A>
Tensor unary_backward(const Tensor& grad_output, const Tensor& result) {
  return backward_impl(A, 0.0, grad_output, result, "result", Named<A>::op);
}
template <Activation A>
void unary_backward_out(const Tensor& grad_output, const Tensor& result,
                        const Tensor& grad_input) {
  backward_out_impl(A, 0.0, grad_output, result, "result", grad_input, Named<A>::op);
}

constexpr const char* kLeaky = "pyops.leaky_relu";
Tensor leaky_relu(const Tensor& self, double slope) {
  return forward_impl(Activation::LeakyRelu, slope, self, kLeaky);
}
void leaky_relu_(const Tensor& self, double slope) {
  forward_inplace_impl(Activation::LeakyRelu, slope, self, kLeaky);
}
void leaky_relu_out(const Tensor& self, double slope, const Tensor& out) {
  forward_out_impl(Activation::LeakyRelu, slope, self, out, kLeaky);
}
Tensor leaky_relu_backward(const Tensor& grad_output, const Tensor& self, double slope,
                           bool self_is_result) {
  check_leaky_backward(slope, self_is_result, kLeaky);
  return backward_impl(Activation::LeakyRelu, slope, grad_output, self, "self", kLeaky);
}
void leaky_relu_backward_out(const Tensor& grad_output, const Tensor& self, double slope,
                             bool self_is_result, const Tensor& grad_input) {
  check_leaky_backward(slope, self_is_result, kLeaky);
  backward_out_impl(Activation::LeakyRelu, slope, grad_output, self, "self", grad_input,
                           kLeaky);
}

// Autograd-key kernels. Without a gradient to record they go straight to the device
// kernel: small-tensor speed is decided by per-call overhead.

template <Activation A>
Tensor unary_autograd(const Tensor& self) {
  if (!any_requires_grad({&self})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(A, self, 0.0);
  }
  return ForwardFunction::apply(self, static_cast<int64_t>(A), 0.0);
}
// In-place operators return nothing (torch.compile functionalizes only those); autograd
// still rebases the history of `self` onto the new node through mark_dirty.
template <Activation A>
void unary_autograd_(const Tensor& self) {
  if (!any_requires_grad({&self})) {
    at::AutoDispatchBelowAutograd guard;
    call_forward_(A, self, 0.0);
    return;
  }
  InplaceFunction::apply(self, static_cast<int64_t>(A), 0.0);
}
template <Activation A>
Tensor unary_backward_autograd(const Tensor& grad_output, const Tensor& result) {
  if (!any_requires_grad({&grad_output, &result})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_backward(A, grad_output, result, 0.0, false);
  }
  return BackwardFunction::apply(grad_output, result, static_cast<int64_t>(A), 0.0, false);
}

Tensor leaky_relu_autograd(const Tensor& self, double slope) {
  if (!any_requires_grad({&self})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(Activation::LeakyRelu, self, slope);
  }
  return ForwardFunction::apply(self, static_cast<int64_t>(Activation::LeakyRelu), slope);
}
void leaky_relu_autograd_(const Tensor& self, double slope) {
  if (!any_requires_grad({&self})) {
    at::AutoDispatchBelowAutograd guard;
    call_forward_(Activation::LeakyRelu, self, slope);
    return;
  }
  InplaceFunction::apply(self, static_cast<int64_t>(Activation::LeakyRelu), slope);
}
Tensor leaky_relu_backward_autograd(const Tensor& grad_output, const Tensor& self, double slope,
                                    bool self_is_result) {
  if (!any_requires_grad({&grad_output, &self})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_backward(Activation::LeakyRelu, grad_output, self, slope, self_is_result);
  }
  return BackwardFunction::apply(grad_output, self, static_cast<int64_t>(Activation::LeakyRelu),
                                 slope, self_is_result);
}

Tensor bias_act_autograd(const Tensor& self, const Tensor& bias, c10::string_view activation,
                         double slope) {
  if (!any_requires_grad({&self, &bias})) {
    static auto op = op_handle<Tensor(const Tensor&, const Tensor&, c10::string_view, double)>(
        "pyops::bias_act");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(self, bias, activation, slope);
  }
  return BiasActFunction::apply(self, bias, activation, slope);
}

std::tuple<Tensor, Tensor> bias_act_backward_autograd(const Tensor& grad_output,
                                                      const Tensor& saved, const Tensor& bias,
                                                      c10::string_view activation, double slope,
                                                      bool saved_is_result) {
  if (!any_requires_grad({&grad_output, &saved, &bias})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_bias_act_backward(grad_output, saved, bias,
                                  parse_activation(activation, "pyops._bias_act_backward"), slope,
                                  saved_is_result);
  }
  auto outputs =
      BiasActBackwardFunction::apply(grad_output, saved, bias, activation, slope, saved_is_result);
  return {outputs[0], outputs[1]};
}

}  // namespace

Tensor dispatch_activation_backward(Activation act, const Tensor& grad, const Tensor& saved,
                                    double slope, bool saved_is_result) {
  return call_backward(act, grad, saved, slope, saved_is_result);
}

Tensor dispatch_bias_act(const Tensor& input, const Tensor& bias, Activation act, double slope) {
  static auto op = op_handle<Tensor(const Tensor&, const Tensor&, c10::string_view, double)>(
      "pyops::bias_act");
  return op.call(input, bias, activation_name(act), slope);
}

std::tuple<Tensor, Tensor> dispatch_bias_act_backward(const Tensor& grad, const Tensor& saved,
                                                      const Tensor& bias, Activation act,
                                                      double slope, bool saved_is_result) {
  return call_bias_act_backward(grad, saved, bias, act, slope, saved_is_result);
}

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  for (const char* name : {"relu", "sigmoid", "tanh"}) {
    const std::string n(name);
    m.def((n + "(Tensor self) -> Tensor").c_str());
    m.def((n + "_(Tensor(a!) self) -> ()").c_str());
    m.def((n + ".out(Tensor self, *, Tensor(a!) out) -> ()").c_str());
    m.def(("_" + n + "_backward(Tensor grad_output, Tensor result) -> Tensor").c_str());
    m.def(("_" + n + "_backward.grad_input(Tensor grad_output, Tensor result, *, "
           "Tensor(a!) grad_input) -> ()").c_str());
  }
  m.def("leaky_relu(Tensor self, float negative_slope=0.01) -> Tensor");
  m.def("leaky_relu_(Tensor(a!) self, float negative_slope=0.01) -> ()");
  m.def("leaky_relu.out(Tensor self, float negative_slope=0.01, *, Tensor(a!) out) -> ()");
  m.def("_leaky_relu_backward(Tensor grad_output, Tensor self, float negative_slope, "
        "bool self_is_result) -> Tensor");
  m.def("_leaky_relu_backward.grad_input(Tensor grad_output, Tensor self, float negative_slope, "
        "bool self_is_result, *, Tensor(a!) grad_input) -> ()");
  m.def("bias_act(Tensor self, Tensor bias, str activation=\"none\", "
        "float negative_slope=0.01) -> Tensor");
  m.def("_bias_act_backward(Tensor grad_output, Tensor saved, Tensor bias, str activation, "
        "float negative_slope, bool saved_is_result) -> (Tensor grad_input, Tensor grad_bias)");
}

// One device-generic implementation serves CPU and CUDA; the dispatch tables pick the
// kernel.
#define PYOPS_ACTIVATION_DEVICE_IMPLS(m)                                                   \
  m.impl("relu", unary<Activation::Relu>);                                                 \
  m.impl("relu_", unary_<Activation::Relu>);                                               \
  m.impl("relu.out", unary_out<Activation::Relu>);                                         \
  m.impl("_relu_backward", unary_backward<Activation::Relu>);                              \
  m.impl("_relu_backward.grad_input", unary_backward_out<Activation::Relu>);               \
  m.impl("sigmoid", unary<Activation::Sigmoid>);                                           \
  m.impl("sigmoid_", unary_<Activation::Sigmoid>);                                         \
  m.impl("sigmoid.out", unary_out<Activation::Sigmoid>);                                   \
  m.impl("_sigmoid_backward", unary_backward<Activation::Sigmoid>);                        \
  m.impl("_sigmoid_backward.grad_input", unary_backward_out<Activation::Sigmoid>);         \
  m.impl("tanh", unary<Activation::Tanh>);                                                 \
  m.impl("tanh_", unary_<Activation::Tanh>);                                               \
  m.impl("tanh.out", unary_out<Activation::Tanh>);                                         \
  m.impl("_tanh_backward", unary_backward<Activation::Tanh>);                              \
  m.impl("_tanh_backward.grad_input", unary_backward_out<Activation::Tanh>);               \
  m.impl("leaky_relu", leaky_relu);                                                        \
  m.impl("leaky_relu_", leaky_relu_);                                                      \
  m.impl("leaky_relu.out", leaky_relu_out);                                                \
  m.impl("_leaky_relu_backward", leaky_relu_backward);                                     \
  m.impl("_leaky_relu_backward.grad_input", leaky_relu_backward_out);                      \
  m.impl("bias_act", bias_act_impl);                                                       \
  m.impl("_bias_act_backward", bias_act_backward_impl)

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  PYOPS_ACTIVATION_DEVICE_IMPLS(m);
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  PYOPS_ACTIVATION_DEVICE_IMPLS(m);
}

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("relu", unary_autograd<Activation::Relu>);
  m.impl("relu_", unary_autograd_<Activation::Relu>);
  m.impl("_relu_backward", unary_backward_autograd<Activation::Relu>);
  m.impl("sigmoid", unary_autograd<Activation::Sigmoid>);
  m.impl("sigmoid_", unary_autograd_<Activation::Sigmoid>);
  m.impl("_sigmoid_backward", unary_backward_autograd<Activation::Sigmoid>);
  m.impl("tanh", unary_autograd<Activation::Tanh>);
  m.impl("tanh_", unary_autograd_<Activation::Tanh>);
  m.impl("_tanh_backward", unary_backward_autograd<Activation::Tanh>);
  m.impl("leaky_relu", leaky_relu_autograd);
  m.impl("leaky_relu_", leaky_relu_autograd_);
  m.impl("_leaky_relu_backward", leaky_relu_backward_autograd);
  m.impl("bias_act", bias_act_autograd);
  m.impl("_bias_act_backward", bias_act_backward_autograd);
  for (const char* out_op : {"relu.out", "sigmoid.out", "tanh.out", "leaky_relu.out",
                             "_relu_backward.grad_input", "_sigmoid_backward.grad_input",
                             "_tanh_backward.grad_input", "_leaky_relu_backward.grad_input"}) {
    m.impl(out_op, not_differentiable_kernel());
  }
}

TORCH_LIBRARY_IMPL(pyops, ADInplaceOrView, m) {
  for (const char* mutating_op :
       {"relu_", "sigmoid_", "tanh_", "leaky_relu_", "relu.out", "sigmoid.out", "tanh.out",
        "leaky_relu.out", "_relu_backward.grad_input", "_sigmoid_backward.grad_input",
        "_tanh_backward.grad_input", "_leaky_relu_backward.grad_input"}) {
    m.impl(mutating_op, bump_version_kernel());
  }
}

}  // namespace pyops::activation
