#pragma once
// The optimizer family's update rules, written once (design section 3). Each rule is a
// functor templated on the compute type `Acc` (float for float32/float16/bfloat16,
// double for float64) whose operator() is instantiated with at::vec::Vectorized<Acc>
// for the CPU SIMD body (optim_cpu.cpp) and with Acc for the CPU tail and for CUDA
// (optim_cuda.cu).
//
// The arithmetic follows torch.optim's single-tensor implementations step by step, in
// the same order (torch 2.14, torch/optim/*.py `_single_tensor_*`), so that results
// agree with torch to rounding; half and bfloat16 are computed in float and rounded
// once per step instead of after every torch op.
//
// A rule updates one element: `param` and the optimizer states in place, from `grad`.
// States are numbered per rule (kStates of them); a state the options leave unused
// (e.g. SGD without momentum) is never read or written by the rule. Scalars that depend
// on the tensor's step count (bias corrections, the decayed Adagrad lr, ...) are
// computed on the host in double, as torch computes them in Python floats, and passed
// as the rule's `PerTensor` value.

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <array>
#include <cmath>
#include <vector>

#include "common/dispatch.h"
#include "common/math.h"

namespace pyops::optim {

// ---- Host-side options, as the operators receive them ---------------------------------

struct SgdOptions {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};
struct SgdTensorScalars {
  bool momentum_buffer_is_new;  // torch starts the buffer as a copy of the gradient
};

struct AdagradOptions {
  double lr, lr_decay, weight_decay, eps;
  bool maximize;
};
struct AdagradTensorScalars {
  double clr;  // lr / (1 + (step - 1) * lr_decay)
};

struct AdadeltaOptions {
  double lr, rho, eps, weight_decay;
  bool maximize;
};

struct RmspropOptions {
  double lr, alpha, eps, weight_decay, momentum;
  bool centered, maximize;
};

struct AdamOptions {
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled_weight_decay;
};
struct AdamTensorScalars {
  double step_size;              // lr / (1 - beta1^step)
  double bias_correction2_sqrt;  // (1 - beta2^step) ** 0.5
};

struct NoTensorScalars {};

inline namespace PYOPS_ISA_NAMESPACE {

// torch.lerp's formula (ATen/native/Lerp.h): the weight is a host scalar, so the branch
// is uniform over the tensor.
template <typename V, typename Acc>
C10_HOST_DEVICE inline V lerp(V start, V end, Acc weight) {
  return (weight < Acc(0.5) && weight > Acc(-0.5)) ? start + V(weight) * (end - start)
                                                   : end - (end - start) * V(Acc(1) - weight);
}

// grad with maximize and L2 weight decay applied (grad.add(param, alpha=weight_decay)).
template <typename V, typename Acc>
C10_HOST_DEVICE inline V effective_grad(V grad, V param, bool maximize, Acc weight_decay) {
  if (maximize) grad = -grad;
  if (weight_decay != Acc(0)) grad = grad + V(weight_decay) * param;
  return grad;
}

// ---- SGD: states {momentum_buffer} ----------------------------------------------------
template <typename Acc>
struct SgdRule {
  static constexpr int kStates = 1;
  using Options = SgdOptions;
  using TensorScalars = SgdTensorScalars;
  struct PerTensor {
    bool momentum_buffer_is_new;
  };

  Acc neg_lr, momentum, one_minus_dampening, weight_decay;
  bool use_momentum, nesterov, maximize;

  explicit SgdRule(const Options& o)
      : neg_lr(static_cast<Acc>(-o.lr)),
        momentum(static_cast<Acc>(o.momentum)),
        one_minus_dampening(static_cast<Acc>(1.0 - o.dampening)),
        weight_decay(static_cast<Acc>(o.weight_decay)),
        use_momentum(o.momentum != 0.0),
        nesterov(o.nesterov),
        maximize(o.maximize) {}
  static PerTensor per_tensor(const TensorScalars& s) { return {s.momentum_buffer_is_new}; }
  bool uses_state(int /*state*/) const { return use_momentum; }

  template <typename V>
  C10_HOST_DEVICE void operator()(const PerTensor& t, V& param, V grad, V* state) const {
    grad = effective_grad(grad, param, maximize, weight_decay);
    if (use_momentum) {
      V& buffer = state[0];
      buffer = t.momentum_buffer_is_new
                   ? grad
                   : buffer * V(momentum) + V(one_minus_dampening) * grad;
      grad = nesterov ? grad + V(momentum) * buffer : buffer;
    }
    param = param + V(neg_lr) * grad;
  }
};

// ---- Adagrad: states {sum} ------------------------------------------------------------
template <typename Acc>
struct AdagradRule {
  static constexpr int kStates = 1;
  using Options = AdagradOptions;
  using TensorScalars = AdagradTensorScalars;
  struct PerTensor {
    Acc neg_clr;
  };

  Acc weight_decay, eps;
  bool maximize;

  explicit AdagradRule(const Options& o)
      : weight_decay(static_cast<Acc>(o.weight_decay)),
        eps(static_cast<Acc>(o.eps)),
        maximize(o.maximize) {}
  static PerTensor per_tensor(const TensorScalars& s) { return {static_cast<Acc>(-s.clr)}; }
  bool uses_state(int /*state*/) const { return true; }

  template <typename V>
  C10_HOST_DEVICE void operator()(const PerTensor& t, V& param, V grad, V* state) const {
    grad = effective_grad(grad, param, maximize, weight_decay);
    V& sum = state[0];
    sum = sum + grad * grad;
    const V std_dev = math::sqrt(sum) + V(eps);
    param = param + V(t.neg_clr) * grad / std_dev;  // addcdiv: self + value * t1 / t2
  }
};

// ---- Adadelta: states {square_avg, acc_delta} -----------------------------------------
template <typename Acc>
struct AdadeltaRule {
  static constexpr int kStates = 2;
  using Options = AdadeltaOptions;
  using TensorScalars = NoTensorScalars;
  struct PerTensor {};

  Acc neg_lr, rho, one_minus_rho, eps, weight_decay;
  bool maximize;

  explicit AdadeltaRule(const Options& o)
      : neg_lr(static_cast<Acc>(-o.lr)),
        rho(static_cast<Acc>(o.rho)),
        one_minus_rho(static_cast<Acc>(1.0 - o.rho)),
        eps(static_cast<Acc>(o.eps)),
        weight_decay(static_cast<Acc>(o.weight_decay)),
        maximize(o.maximize) {}
  static PerTensor per_tensor(const TensorScalars&) { return {}; }
  bool uses_state(int /*state*/) const { return true; }

  template <typename V>
  C10_HOST_DEVICE void operator()(const PerTensor&, V& param, V grad, V* state) const {
    grad = effective_grad(grad, param, maximize, weight_decay);
    V& square_avg = state[0];
    V& acc_delta = state[1];
    square_avg = square_avg * V(rho) + V(one_minus_rho) * grad * grad;
    const V std_dev = math::sqrt(square_avg + V(eps));
    const V delta = math::sqrt(acc_delta + V(eps)) / std_dev * grad;
    acc_delta = acc_delta * V(rho) + V(one_minus_rho) * delta * delta;
    param = param + V(neg_lr) * delta;
  }
};

// ---- RMSprop: states {square_avg, grad_avg, momentum_buffer} --------------------------
template <typename Acc>
struct RmspropRule {
  static constexpr int kStates = 3;
  using Options = RmspropOptions;
  using TensorScalars = NoTensorScalars;
  struct PerTensor {};

  Acc neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  bool centered, use_momentum, maximize;

  explicit RmspropRule(const Options& o)
      : neg_lr(static_cast<Acc>(-o.lr)),
        alpha(static_cast<Acc>(o.alpha)),
        one_minus_alpha(static_cast<Acc>(1.0 - o.alpha)),
        eps(static_cast<Acc>(o.eps)),
        weight_decay(static_cast<Acc>(o.weight_decay)),
        momentum(static_cast<Acc>(o.momentum)),
        centered(o.centered),
        use_momentum(o.momentum > 0.0),
        maximize(o.maximize) {}
  static PerTensor per_tensor(const TensorScalars&) { return {}; }
  bool uses_state(int state) const {
    return state == 0 || (state == 1 && centered) || (state == 2 && use_momentum);
  }

  template <typename V>
  C10_HOST_DEVICE void operator()(const PerTensor&, V& param, V grad, V* state) const {
    grad = effective_grad(grad, param, maximize, weight_decay);
    V& square_avg = state[0];
    square_avg = square_avg * V(alpha) + V(one_minus_alpha) * grad * grad;
    V avg;
    if (centered) {
      V& grad_avg = state[1];
      grad_avg = lerp(grad_avg, grad, one_minus_alpha);
      avg = math::sqrt(square_avg + V(Acc(-1)) * grad_avg * grad_avg);
    } else {
      avg = math::sqrt(square_avg);
    }
    avg = avg + V(eps);
    if (use_momentum) {
      V& buffer = state[2];
      buffer = buffer * V(momentum) + grad / avg;
      param = param + V(neg_lr) * buffer;
    } else {
      param = param + V(neg_lr) * grad / avg;
    }
  }
};

// ---- Adam / AdamW: states {exp_avg, exp_avg_sq, max_exp_avg_sq} -----------------------
template <typename Acc>
struct AdamRule {
  static constexpr int kStates = 3;
  using Options = AdamOptions;
  using TensorScalars = AdamTensorScalars;
  struct PerTensor {
    Acc neg_step_size, bias_correction2_sqrt;
  };

  Acc one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor;
  bool amsgrad, maximize, decoupled_weight_decay;

  explicit AdamRule(const Options& o)
      : one_minus_beta1(static_cast<Acc>(1.0 - o.beta1)),
        beta2(static_cast<Acc>(o.beta2)),
        one_minus_beta2(static_cast<Acc>(1.0 - o.beta2)),
        eps(static_cast<Acc>(o.eps)),
        weight_decay(static_cast<Acc>(o.decoupled_weight_decay ? 0.0 : o.weight_decay)),
        decay_factor(static_cast<Acc>(1.0 - o.lr * o.weight_decay)),  // AdamW: param *= this
        amsgrad(o.amsgrad),
        maximize(o.maximize),
        decoupled_weight_decay(o.decoupled_weight_decay && o.weight_decay != 0.0) {}
  static PerTensor per_tensor(const TensorScalars& s) {
    return {static_cast<Acc>(-s.step_size), static_cast<Acc>(s.bias_correction2_sqrt)};
  }
  bool uses_state(int state) const { return state < 2 || amsgrad; }

  template <typename V>
  C10_HOST_DEVICE void operator()(const PerTensor& t, V& param, V grad, V* state) const {
    if (decoupled_weight_decay) param = param * V(decay_factor);
    grad = effective_grad(grad, param, maximize, weight_decay);  // weight_decay 0 for AdamW
    V& exp_avg = state[0];
    V& exp_avg_sq = state[1];
    exp_avg = lerp(exp_avg, grad, one_minus_beta1);
    exp_avg_sq = exp_avg_sq * V(beta2) + V(one_minus_beta2) * grad * grad;
    V second_moment = exp_avg_sq;
    if (amsgrad) {
      V& max_exp_avg_sq = state[2];
      max_exp_avg_sq = math::maximum(max_exp_avg_sq, exp_avg_sq);
      second_moment = max_exp_avg_sq;
    }
    const V denom = math::sqrt(second_moment) / V(t.bias_correction2_sqrt) + V(eps);
    param = param + V(t.neg_step_size) * exp_avg / denom;
  }
};

}  // namespace PYOPS_ISA_NAMESPACE

// ---- Kernel entry points ---------------------------------------------------------------
// A group handed to a kernel: params, grads and `states[k]` (empty when the rule leaves
// state k unused) are lists of the same length; every tensor of one index has the same
// shape, dtype, device and strides, is non-overlapping and dense, and is not empty, so
// kernels walk them as flat arrays of numel() elements. All share one dtype and device.
template <int kStates>
struct TensorGroup {
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::array<std::vector<at::Tensor>, kStates> states;
};

template <typename Options, typename TensorScalars, int kStates>
using StepFn = void (*)(const Options&, const TensorGroup<kStates>&,
                        const std::vector<TensorScalars>&);

using SgdStepFn = StepFn<SgdOptions, SgdTensorScalars, 1>;
using AdagradStepFn = StepFn<AdagradOptions, AdagradTensorScalars, 1>;
using AdadeltaStepFn = StepFn<AdadeltaOptions, NoTensorScalars, 2>;
using RmspropStepFn = StepFn<RmspropOptions, NoTensorScalars, 3>;
using AdamStepFn = StepFn<AdamOptions, AdamTensorScalars, 3>;

extern DispatchTable<SgdStepFn> sgd_kernel;
extern DispatchTable<AdagradStepFn> adagrad_kernel;
extern DispatchTable<AdadeltaStepFn> adadelta_kernel;
extern DispatchTable<RmspropStepFn> rmsprop_kernel;
extern DispatchTable<AdamStepFn> adam_kernel;

}  // namespace pyops::optim
