#pragma once
// The activation family's math, written once (design section 3): each functor's
// `forward` and `backward` are instantiated with at::vec::Vectorized<T> and T by the CPU
// kernels (activation_cpu.cpp) and with T by the CUDA kernels (activation_cuda.cu).
//
// `backward(grad, saved)` takes what the forward saved: the result for relu, sigmoid
// and tanh (as torch does, so no input needs to be kept alive), and for leaky_relu the
// input, or the result when the slope is >= 0 (the sign test then gives the same answer).

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>

#include "common/dispatch.h"
#include "common/math.h"

namespace pyops::activation {

enum class Activation : int8_t { None, Relu, LeakyRelu, Sigmoid, Tanh };

// "none", "relu", "leaky_relu", "sigmoid", "tanh"; throws a ValueError naming the
// argument for anything else.
Activation parse_activation(c10::string_view name, const char* op_name);
const char* activation_name(Activation activation);

inline namespace PYOPS_ISA_NAMESPACE {

template <typename Acc>
struct Identity {
  template <typename V>
  C10_HOST_DEVICE V forward(V x) const {
    return x;
  }
  template <typename V>
  C10_HOST_DEVICE V backward(V grad, V /*saved*/) const {
    return grad;
  }
};

template <typename Acc>
struct Relu {
  template <typename V>
  C10_HOST_DEVICE V forward(V x) const {
    return math::where(x < V(0), V(0), x);  // NaN and -0.0 pass through, as in torch
  }
  template <typename V>
  C10_HOST_DEVICE V backward(V grad, V result) const {
    return math::where(result <= V(0), V(0), grad);  // torch's threshold_backward
  }
};

template <typename Acc>
struct LeakyRelu {
  Acc negative_slope;
  template <typename V>
  C10_HOST_DEVICE V forward(V x) const {
    return math::where(x > V(0), x, x * V(negative_slope));
  }
  template <typename V>
  C10_HOST_DEVICE V backward(V grad, V saved) const {
    return math::where(saved > V(0), grad, grad * V(negative_slope));
  }
};

template <typename Acc>
struct Sigmoid {
  template <typename V>
  C10_HOST_DEVICE V forward(V x) const {
    return math::sigmoid(x);
  }
  template <typename V>
  C10_HOST_DEVICE V backward(V grad, V result) const {
    return grad * (V(1) - result) * result;
  }
};

template <typename Acc>
struct Tanh {
  template <typename V>
  C10_HOST_DEVICE V forward(V x) const {
    return math::tanh(x);
  }
  template <typename V>
  C10_HOST_DEVICE V backward(V grad, V result) const {
    return grad * (V(1) - result * result);
  }
};

// Calls `body(functor)` with the functor of `activation`, computing in `Acc`.
template <typename Acc, typename Body>
inline void visit_activation(Activation activation, double negative_slope, const Body& body) {
  switch (activation) {
    case Activation::None:
      return body(Identity<Acc>{});
    case Activation::Relu:
      return body(Relu<Acc>{});
    case Activation::LeakyRelu:
      return body(LeakyRelu<Acc>{static_cast<Acc>(negative_slope)});
    case Activation::Sigmoid:
      return body(Sigmoid<Acc>{});
    case Activation::Tanh:
      return body(Tanh<Acc>{});
  }
}

}  // namespace PYOPS_ISA_NAMESPACE

// ---- Kernel entry points, one table per kind of pass -----------------------------
// Every tensor handed to a kernel is non-empty, of one floating dtype, on one device,
// and non-overlapping and dense with the same strides as the others, so a kernel may
// walk them as flat arrays of numel() elements.

// output = act(input)
using ForwardFn = void (*)(Activation, double negative_slope, const at::Tensor& input,
                           const at::Tensor& output);
// grad_input = act'(saved) * grad_output
using BackwardFn = void (*)(Activation, double negative_slope, const at::Tensor& grad_output,
                            const at::Tensor& saved, const at::Tensor& grad_input);

// Tensors of the bias kernels are viewed as [outer, channels, inner] in memory
// (contiguous NC*: inner = prod(sizes[2:]); channels-last: outer = N*H*W, inner = 1).
struct ChannelLayout {
  int64_t outer, channels, inner;
};
// output = act(input + bias[channel])
using BiasForwardFn = void (*)(Activation, double negative_slope, const at::Tensor& input,
                               const at::Tensor& bias, const at::Tensor& output, ChannelLayout);
// grad_input = act'(s) * grad_output with s = saved (the result) or saved + bias (the
// input); grad_bias[c] = sum of grad_input over everything but the channel.
using BiasBackwardFn = void (*)(Activation, double negative_slope, bool saved_is_result,
                                const at::Tensor& grad_output, const at::Tensor& saved,
                                const at::Tensor& bias, const at::Tensor& grad_input,
                                const at::Tensor& grad_bias, ChannelLayout);

// ---- The family's operators, called through the dispatcher (autograd included), for
// the autograd of families that use an activation as their epilogue (linear, conv).

// grad * act'(saved); `saved_is_result` as in leaky_relu's backward. Identity for none.
at::Tensor dispatch_activation_backward(Activation act, const at::Tensor& grad,
                                        const at::Tensor& saved, double negative_slope,
                                        bool saved_is_result);
// pyops::bias_act and pyops::_bias_act_backward.
at::Tensor dispatch_bias_act(const at::Tensor& input, const at::Tensor& bias, Activation act,
                             double negative_slope);
std::tuple<at::Tensor, at::Tensor> dispatch_bias_act_backward(
    const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& bias, Activation act,
    double negative_slope, bool saved_is_result);

extern DispatchTable<ForwardFn> forward_kernel;
extern DispatchTable<BackwardFn> backward_kernel;
extern DispatchTable<BiasForwardFn> bias_forward_kernel;
extern DispatchTable<BiasBackwardFn> bias_backward_kernel;

}  // namespace pyops::activation
