// The optimizer family's operators: one mutating operator per optimizer, updating a
// whole parameter group (all tensors of one dtype and device) in one call. Schemas,
// argument checks, step counting and layout handling are written once here for every
// device; the arithmetic is in the kernels (optim_cpu.cpp, optim_cuda.cu), reached
// through the dispatch tables.

#include <ATen/MemoryOverlap.h>
#include <ATen/core/List.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/layout.h"
#include "common/registration.h"
#include "optim/optim.h"

namespace pyops::optim {

DispatchTable<SgdStepFn> sgd_kernel("sgd_ step");
DispatchTable<AdagradStepFn> adagrad_kernel("adagrad_ step");
DispatchTable<AdadeltaStepFn> adadelta_kernel("adadelta_ step");
DispatchTable<RmspropStepFn> rmsprop_kernel("rmsprop_ step");
DispatchTable<AdamStepFn> adam_kernel("adam_ step");

namespace {

using at::Tensor;
using at::TensorList;

// A list argument of an operator, with its schema name for messages.
struct NamedList {
  const char* name;
  TensorList tensors;
};

// ---- Checks --------------------------------------------------------------------------

void check_list_length(const char* op, const NamedList& list, size_t expected,
                       const char* why) {
  TORCH_CHECK_VALUE(list.tensors.size() == expected, op, ": expected ", list.name, " to hold ",
                    expected, " tensors (", why, "), got ", list.tensors.size());
}

// `t` = list[i] matches the reference param in dtype, device and shape, and is dense.
void check_like_param(const char* op, const NamedList& list, size_t i, const Tensor& param) {
  const Tensor& t = list.tensors[i];
  TORCH_CHECK_VALUE(t.defined(), op, ": expected ", list.name, "[", i, "] to be a tensor, got None");
  TORCH_CHECK_TYPE(!t.is_sparse() && t.layout() == at::kStrided, op, ": expected ", list.name,
                   "[", i, "] to be a dense (strided) tensor, got layout ", t.layout(),
                   "; pyops optimizers do not support sparse gradients");
  TORCH_CHECK_TYPE(t.scalar_type() == param.scalar_type(), op, ": expected ", list.name, "[", i,
                   "] to have the dtype of params[", i, "] (", param.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK(t.device() == param.device(), op, ": expected ", list.name, "[", i,
              "] to be on the device of params[", i, "] (", param.device(), "), got ", t.device());
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": expected ", list.name, "[", i,
              "] to have the shape of params[", i, "] ", param.sizes(), ", got ", t.sizes());
}

void check_params(const char* op, TensorList params) {
  for (const auto i : c10::irange(params.size())) {
    const Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.defined(), op, ": expected params[", i, "] to be a tensor, got None");
    TORCH_CHECK_TYPE(p.layout() == at::kStrided, op, ": expected params[", i,
                     "] to be a dense (strided) tensor, got layout ", p.layout());
    TORCH_CHECK_TYPE(is_supported_floating(p.scalar_type()), op, ": expected params[", i,
                     "] to have dtype float32, float64, float16 or bfloat16, got ",
                     p.scalar_type());
    TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), op,
                     ": expected every param to have the dtype of params[0] (",
                     params[0].scalar_type(), "), got ", p.scalar_type(), " for params[", i,
                     "]; call the operator once per dtype");
    TORCH_CHECK(p.device() == params[0].device(), op,
                ": expected every param on the device of params[0] (", params[0].device(),
                "), got ", p.device(), " for params[", i, "]; call the operator once per device");
    TORCH_CHECK(provably_non_overlapping(p), op, ": params[", i,
                "] has elements that share memory (e.g. an expanded tensor); an in-place "
                "update of it is ill-defined");
  }
}

// No two written tensors (params, states) share memory: an update would then depend on
// the order of the tensors. Dense tensors occupy [data, data + numel) exactly; the spans
// of non-dense ones may legitimately interleave with others, so they are left out.
void check_no_shared_memory(const char* op, const std::vector<NamedList>& written) {
  struct Span {
    uintptr_t begin, end;
    const char* name;
    size_t index;
  };
  std::vector<Span> spans;
  for (const NamedList& list : written) {
    for (const auto i : c10::irange(list.tensors.size())) {
      const Tensor& t = list.tensors[i];
      // Checked before anything is written: an expanded state would otherwise fail only
      // when its updated copy is written back, after the params were updated.
      TORCH_CHECK(provably_non_overlapping(t), op, ": ", list.name, "[",
                  i, "] has elements that share memory (e.g. an expanded tensor); an in-place "
                  "update of it is ill-defined");
      if (t.numel() == 0 || !t.is_non_overlapping_and_dense()) continue;
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({begin, begin + t.numel() * t.element_size(), list.name, i});
    }
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < spans.size(); ++k) {
    TORCH_CHECK(spans[k].begin >= spans[k - 1].end, op, ": ", spans[k - 1].name, "[",
                spans[k - 1].index, "] and ", spans[k].name, "[", spans[k].index,
                "] share memory; every param and optimizer state must be a separate tensor");
  }
}

void check_steps(const char* op, TensorList steps, const Tensor& param0) {
  for (const auto i : c10::irange(steps.size())) {
    const Tensor& s = steps[i];
    TORCH_CHECK_VALUE(s.defined(), op, ": expected state_steps[", i, "] to be a tensor, got None");
    TORCH_CHECK_VALUE(s.numel() == 1, op, ": expected state_steps[", i,
                      "] to hold one step count, got shape ", s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op,
                     ": expected state_steps[", i, "] to have dtype float32 or float64, got ",
                     s.scalar_type());
    TORCH_CHECK(s.is_cpu() || s.device() == param0.device(), op, ": expected state_steps[", i,
                "] on the CPU or on the params' device (", param0.device(), "), got ",
                s.device());
  }
}

// ---- Step counts -----------------------------------------------------------------------

// Adds one to every step count (torch does `step_t += 1` before the update) and returns
// the new counts. CPU counts are updated in place without a dispatcher round trip each;
// counts kept on an accelerator (as torch's fused/capturable optimizers keep them) are
// read back, which synchronizes.
std::vector<double> increment_steps(TensorList steps) {
  std::vector<double> counts(steps.size());
  for (const auto i : c10::irange(steps.size())) {
    const Tensor& s = steps[i];
    if (s.is_cpu()) {
      if (s.scalar_type() == at::kFloat) {
        float* count = s.data_ptr<float>();
        *count += 1.0f;
        counts[i] = *count;
      } else {
        double* count = s.data_ptr<double>();
        *count += 1.0;
        counts[i] = *count;
      }
    } else {
      s.add_(1);
      counts[i] = s.item<double>();
    }
  }
  return counts;
}

// ---- Running a kernel ------------------------------------------------------------------

// `t` is dense and its element i sits at the same offset as `like`'s (a dense tensor of
// the same shape): strides agree on every dim of size > 1 (size-1 dims never move).
bool same_memory_order(const Tensor& t, const Tensor& like) {
  if (!t.is_non_overlapping_and_dense()) return false;
  for (const auto d : c10::irange(t.dim())) {
    if (t.size(d) > 1 && t.stride(d) != like.stride(d)) return false;
  }
  return true;
}

// Checks every list, then hands the non-empty tensors to the kernel, each index with
// its param, grad and states in one dense layout. Where they are not (a non-dense
// param, or states whose strides differ from the param's), the kernel updates dense
// copies that are written back afterwards: never a dropped copy.
template <int K, typename Fn, typename Options, typename Scalars>
void run_kernel(const char* op, const DispatchTable<Fn>& table, const Options& options,
                const NamedList& params, const NamedList& grads,
                const std::array<NamedList, K>& states, const std::array<bool, K>& used,
                const std::vector<Scalars>& scalars) {
  TensorGroup<K> group;
  std::vector<Scalars> kept_scalars;
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (user's tensor, updated copy)
  for (const auto i : c10::irange(params.tensors.size())) {
    const Tensor& param = params.tensors[i];
    if (param.numel() == 0) continue;
    bool same_layout = param.is_non_overlapping_and_dense();
    for (const auto k : c10::irange(K)) {
      if (used[k]) same_layout = same_layout && same_memory_order(states[k].tensors[i], param);
    }
    Tensor work_param = param;
    if (!same_layout) {
      work_param = param.contiguous();
      write_back.emplace_back(param, work_param);
    }
    for (const auto k : c10::irange(K)) {
      if (!used[k]) continue;
      Tensor state = states[k].tensors[i];
      if (!same_layout) {
        Tensor copy = state.contiguous();
        write_back.emplace_back(state, copy);
        state = copy;
      }
      group.states[k].push_back(std::move(state));
    }
    const Tensor& grad = grads.tensors[i];
    group.grads.push_back(same_memory_order(grad, work_param) ? grad : dense_like(grad, work_param));
    group.params.push_back(std::move(work_param));
    kept_scalars.push_back(scalars[i]);
  }
  if (!group.params.empty()) table(group.params[0].device().type())(options, group, kept_scalars);
  for (auto& [target, updated] : write_back) {
    if (!target.is_same(updated)) target.copy_(updated);
  }
}

// Common checks of every optimizer operator. `used[k]`: whether state list k is read.
template <int K>
void check_group(const char* op, const NamedList& params, const NamedList& grads,
                 const std::array<NamedList, K>& states, const std::array<bool, K>& used,
                 const NamedList* steps) {
  const size_t n = params.tensors.size();
  check_params(op, params.tensors);
  check_list_length(op, grads, n, "one per param");
  for (const auto i : c10::irange(n)) check_like_param(op, grads, i, params.tensors[i]);
  std::vector<NamedList> written{params};
  for (const auto k : c10::irange(K)) {
    if (!used[k]) {
      check_list_length(op, states[k], 0, "the options given do not use this state");
      continue;
    }
    check_list_length(op, states[k], n, "one per param");
    for (const auto i : c10::irange(n)) check_like_param(op, states[k], i, params.tensors[i]);
    written.push_back(states[k]);
  }
  if (steps != nullptr) {
    check_list_length(op, *steps, n, "one per param");
    if (n > 0) check_steps(op, steps->tensors, params.tensors[0]);
  }
  check_no_shared_memory(op, written);
}

template <template <typename> class Rule, int K = Rule<double>::kStates>
std::array<bool, K> used_states(const typename Rule<double>::Options& options) {
  const Rule<double> rule(options);
  std::array<bool, K> used{};
  for (const auto k : c10::irange(K)) used[k] = rule.uses_state(k);
  return used;
}

void check_hyperparameter(const char* op, const char* name, double value, bool valid,
                          const char* expected) {
  TORCH_CHECK_VALUE(valid, op, ": expected ", name, " ", expected, ", got ", value);
}

// ---- Operators -------------------------------------------------------------------------

void sgd_(TensorList params, TensorList grads, TensorList momentum_buffers,
          const c10::List<bool>& momentum_buffer_is_new, double lr, double momentum,
          double dampening, double weight_decay, bool nesterov, bool maximize) {
  constexpr const char* op = "pyops.sgd_";
  const SgdOptions options{lr, momentum, dampening, weight_decay, nesterov, maximize};
  const auto used = used_states<SgdRule>(options);
  const NamedList p{"params", params}, g{"grads", grads};
  const std::array<NamedList, 1> states{NamedList{"momentum_buffers", momentum_buffers}};
  check_group<1>(op, p, g, states, used, nullptr);
  TORCH_CHECK_VALUE(momentum_buffer_is_new.size() == (used[0] ? params.size() : 0), op,
                    ": expected momentum_buffer_is_new to hold one flag per momentum buffer (",
                    used[0] ? params.size() : 0, "), got ", momentum_buffer_is_new.size());
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0), op,
                    ": nesterov=True requires momentum > 0 and dampening == 0, got momentum=",
                    momentum, ", dampening=", dampening);
  std::vector<SgdTensorScalars> scalars(params.size(), SgdTensorScalars{false});
  if (used[0]) {
    for (const auto i : c10::irange(params.size())) {
      scalars[i].momentum_buffer_is_new = momentum_buffer_is_new.get(i);
    }
  }
  run_kernel<1>(op, sgd_kernel, options, p, g, states, used, scalars);
}

void adagrad_(TensorList params, TensorList grads, TensorList state_sums,
              TensorList state_steps, double lr, double lr_decay, double weight_decay,
              double eps, bool maximize) {
  constexpr const char* op = "pyops.adagrad_";
  const AdagradOptions options{lr, lr_decay, weight_decay, eps, maximize};
  const auto used = used_states<AdagradRule>(options);
  const NamedList p{"params", params}, g{"grads", grads}, steps{"state_steps", state_steps};
  const std::array<NamedList, 1> states{NamedList{"state_sums", state_sums}};
  check_group<1>(op, p, g, states, used, &steps);
  const std::vector<double> counts = increment_steps(state_steps);
  std::vector<AdagradTensorScalars> scalars(params.size());
  for (const auto i : c10::irange(params.size())) {
    scalars[i].clr = lr / (1 + (counts[i] - 1) * lr_decay);
  }
  run_kernel<1>(op, adagrad_kernel, options, p, g, states, used, scalars);
}

void adadelta_(TensorList params, TensorList grads, TensorList square_avgs,
               TensorList acc_deltas, TensorList state_steps, double lr, double rho,
               double eps, double weight_decay, bool maximize) {
  constexpr const char* op = "pyops.adadelta_";
  check_hyperparameter(op, "rho", rho, rho >= 0.0 && rho <= 1.0, "in [0, 1]");
  const AdadeltaOptions options{lr, rho, eps, weight_decay, maximize};
  const auto used = used_states<AdadeltaRule>(options);
  const NamedList p{"params", params}, g{"grads", grads}, steps{"state_steps", state_steps};
  const std::array<NamedList, 2> states{NamedList{"square_avgs", square_avgs},
                                        NamedList{"acc_deltas", acc_deltas}};
  check_group<2>(op, p, g, states, used, &steps);
  increment_steps(state_steps);  // Adadelta's update does not depend on the count
  run_kernel<2>(op, adadelta_kernel, options, p, g, states, used,
                std::vector<NoTensorScalars>(params.size()));
}

void rmsprop_(TensorList params, TensorList grads, TensorList square_avgs,
              TensorList grad_avgs, TensorList momentum_buffers, TensorList state_steps,
              double lr, double alpha, double eps, double weight_decay, double momentum,
              bool centered, bool maximize) {
  constexpr const char* op = "pyops.rmsprop_";
  const RmspropOptions options{lr, alpha, eps, weight_decay, momentum, centered, maximize};
  const auto used = used_states<RmspropRule>(options);
  const NamedList p{"params", params}, g{"grads", grads}, steps{"state_steps", state_steps};
  const std::array<NamedList, 3> states{NamedList{"square_avgs", square_avgs},
                                        NamedList{"grad_avgs", grad_avgs},
                                        NamedList{"momentum_buffers", momentum_buffers}};
  check_group<3>(op, p, g, states, used, &steps);
  increment_steps(state_steps);  // RMSprop's update does not depend on the count
  run_kernel<3>(op, rmsprop_kernel, options, p, g, states, used,
                std::vector<NoTensorScalars>(params.size()));
}

void adam_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
           TensorList max_exp_avg_sqs, TensorList state_steps, double lr, double beta1,
           double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
           bool decoupled_weight_decay) {
  constexpr const char* op = "pyops.adam_";
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  const AdamOptions options{lr, beta1, beta2, weight_decay, eps,
                            amsgrad, maximize, decoupled_weight_decay};
  const auto used = used_states<AdamRule>(options);
  const NamedList p{"params", params}, g{"grads", grads}, steps{"state_steps", state_steps};
  const std::array<NamedList, 3> states{NamedList{"exp_avgs", exp_avgs},
                                        NamedList{"exp_avg_sqs", exp_avg_sqs},
                                        NamedList{"max_exp_avg_sqs", max_exp_avg_sqs}};
  check_group<3>(op, p, g, states, used, &steps);
  const std::vector<double> counts = increment_steps(state_steps);
  std::vector<AdamTensorScalars> scalars(params.size());
  for (const auto i : c10::irange(params.size())) {
    // As torch computes them, in Python floats (double).
    const double bias_correction1 = 1 - std::pow(beta1, counts[i]);
    const double bias_correction2 = 1 - std::pow(beta2, counts[i]);
    scalars[i].step_size = lr / bias_correction1;
    scalars[i].bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
  }
  run_kernel<3>(op, adam_kernel, options, p, g, states, used, scalars);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "bool[] momentum_buffer_is_new, *, float lr, float momentum, float dampening, "
        "float weight_decay, bool nesterov, bool maximize) -> ()");
  m.def("adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
        "Tensor(c!)[] state_steps, *, float lr, float lr_decay, float weight_decay, float eps, "
        "bool maximize) -> ()");
  m.def("adadelta_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
        "Tensor(c!)[] acc_deltas, Tensor(d!)[] state_steps, *, float lr, float rho, float eps, "
        "float weight_decay, bool maximize) -> ()");
  m.def("rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
        "Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, *, "
        "float lr, float alpha, float eps, float weight_decay, float momentum, bool centered, "
        "bool maximize) -> ()");
  m.def("adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, "
        "float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
        "bool maximize, bool decoupled_weight_decay) -> ()");
}

#define PYOPS_OPTIM_DEVICE_IMPLS(m) \
  m.impl("sgd_", sgd_);             \
  m.impl("adagrad_", adagrad_);     \
  m.impl("adadelta_", adadelta_);   \
  m.impl("rmsprop_", rmsprop_);     \
  m.impl("adam_", adam_)

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  PYOPS_OPTIM_DEVICE_IMPLS(m);
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  PYOPS_OPTIM_DEVICE_IMPLS(m);
}

// Sparse gradients reach the same implementation, whose check rejects them by name.
TORCH_LIBRARY_IMPL(pyops, SparseCPU, m) {
  PYOPS_OPTIM_DEVICE_IMPLS(m);
}

TORCH_LIBRARY_IMPL(pyops, SparseCUDA, m) {
  PYOPS_OPTIM_DEVICE_IMPLS(m);
}

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  for (const char* name : {"sgd_", "adagrad_", "adadelta_", "rmsprop_", "adam_"}) {
    m.impl(name, not_differentiable_kernel());
  }
}

TORCH_LIBRARY_IMPL(pyops, ADInplaceOrView, m) {
  for (const char* name : {"sgd_", "adagrad_", "adadelta_", "rmsprop_", "adam_"}) {
    m.impl(name, bump_version_kernel());
  }
}

}  // namespace pyops::optim
