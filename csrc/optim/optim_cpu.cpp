// CPU kernels of the optimizer family, compiled once per CPU capability (setup.py).
// One parallel region per optimizer step: the elements of all tensors of the group are
// cut into (tensor, chunk) work items and split across at::parallel_for's threads. The
// math is optim.h's, called with Vectorized<Acc> for the SIMD body and Acc for the tail.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "common/cpu_loops.h"
#include "optim/optim.h"

namespace pyops::optim {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using cpu::opmath_t;

// Elements per work item. Chunk boundaries depend only on the tensor sizes, never on
// the number of threads, so which elements take the SIMD body and which the scalar
// tail (whose rounding may differ by an FMA contraction) is reproducible.
constexpr int64_t kChunkElements = 16384;

template <typename T, int K>
struct TensorPointers {
  T* param;
  const T* grad;
  std::array<T*, K> state;  // nullptr: a state the rule does not use
};

// Applies `rule` to elements [begin, end) of one tensor.
template <typename T, int K, typename Rule>
void update_range(const Rule& rule, const typename Rule::PerTensor& scalars,
                  const TensorPointers<T, K>& ptr, int64_t begin, int64_t end) {
  using Acc = opmath_t<T>;
  using AccVec = Vectorized<Acc>;
  int64_t i = begin;
  if constexpr (cpu::is_reduced_float_v<T>) {
    // One Vectorized<T> holds two Vectorized<float> worth of elements.
    constexpr int64_t kStep = Vectorized<T>::size();
    for (; i + kStep <= end; i += kStep) {
      auto [param_lo, param_hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr.param + i));
      auto [grad_lo, grad_hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr.grad + i));
      AccVec state_lo[K], state_hi[K];
      for (int k = 0; k < K; ++k) {
        if (ptr.state[k] != nullptr) {
          std::tie(state_lo[k], state_hi[k]) =
              at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr.state[k] + i));
        } else {
          state_lo[k] = state_hi[k] = AccVec(Acc(0));
        }
      }
      rule(scalars, param_lo, grad_lo, state_lo);
      rule(scalars, param_hi, grad_hi, state_hi);
      at::vec::convert_from_float<T>(param_lo, param_hi).store(ptr.param + i);
      for (int k = 0; k < K; ++k) {
        if (ptr.state[k] != nullptr) {
          at::vec::convert_from_float<T>(state_lo[k], state_hi[k]).store(ptr.state[k] + i);
        }
      }
    }
  } else {
    constexpr int64_t kStep = AccVec::size();
    for (; i + kStep <= end; i += kStep) {
      AccVec param = AccVec::loadu(ptr.param + i);
      AccVec grad = AccVec::loadu(ptr.grad + i);
      AccVec state[K];
      for (int k = 0; k < K; ++k) {
        state[k] = ptr.state[k] != nullptr ? AccVec::loadu(ptr.state[k] + i) : AccVec(Acc(0));
      }
      rule(scalars, param, grad, state);
      param.store(ptr.param + i);
      for (int k = 0; k < K; ++k) {
        if (ptr.state[k] != nullptr) state[k].store(ptr.state[k] + i);
      }
    }
  }
  for (; i < end; ++i) {
    Acc param = static_cast<Acc>(ptr.param[i]);
    Acc state[K];
    for (int k = 0; k < K; ++k) {
      state[k] = ptr.state[k] != nullptr ? static_cast<Acc>(ptr.state[k][i]) : Acc(0);
    }
    rule(scalars, param, static_cast<Acc>(ptr.grad[i]), state);
    ptr.param[i] = static_cast<T>(param);
    for (int k = 0; k < K; ++k) {
      if (ptr.state[k] != nullptr) ptr.state[k][i] = static_cast<T>(state[k]);
    }
  }
}

template <template <typename> class Rule, int K, typename Options, typename TensorScalars>
void step(const Options& options, const TensorGroup<K>& group,
          const std::vector<TensorScalars>& tensor_scalars) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, group.params[0].scalar_type(), "pyops_optimizer_step_cpu", [&] {
        using Acc = opmath_t<scalar_t>;
        const Rule<Acc> rule(options);
        const size_t num_tensors = group.params.size();

        std::vector<TensorPointers<scalar_t, K>> pointers(num_tensors);
        std::vector<typename Rule<Acc>::PerTensor> scalars(num_tensors);
        struct WorkItem {
          int64_t tensor, begin, end;
        };
        std::vector<WorkItem> items;
        int64_t total_elements = 0;
        for (size_t t = 0; t < num_tensors; ++t) {
          auto& ptr = pointers[t];
          ptr.param = group.params[t].template data_ptr<scalar_t>();
          ptr.grad = group.grads[t].template const_data_ptr<scalar_t>();
          for (int k = 0; k < K; ++k) {
            ptr.state[k] = group.states[k].empty()
                               ? nullptr
                               : group.states[k][t].template data_ptr<scalar_t>();
          }
          scalars[t] = Rule<Acc>::per_tensor(tensor_scalars[t]);
          const int64_t numel = group.params[t].numel();
          for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
            items.push_back({static_cast<int64_t>(t), begin, std::min(numel, begin + kChunkElements)});
          }
          total_elements += numel;
        }

        auto run_items = [&](int64_t first, int64_t last) {
          for (int64_t w = first; w < last; ++w) {
            const WorkItem& item = items[w];
            update_range<scalar_t, K>(rule, scalars[item.tensor], pointers[item.tensor],
                                      item.begin, item.end);
          }
        };
        const auto num_items = static_cast<int64_t>(items.size());
        if (total_elements < cpu::kGrainSize) {
          run_items(0, num_items);  // too little work to wake other threads
        } else {
          at::parallel_for(0, num_items, 1, run_items);
        }
      });
}

}  // namespace

PYOPS_REGISTER_CPU_KERNEL(sgd_kernel, (&step<SgdRule, 1, SgdOptions, SgdTensorScalars>));
PYOPS_REGISTER_CPU_KERNEL(adagrad_kernel,
                          (&step<AdagradRule, 1, AdagradOptions, AdagradTensorScalars>));
PYOPS_REGISTER_CPU_KERNEL(adadelta_kernel,
                          (&step<AdadeltaRule, 2, AdadeltaOptions, NoTensorScalars>));
PYOPS_REGISTER_CPU_KERNEL(rmsprop_kernel, (&step<RmspropRule, 3, RmspropOptions, NoTensorScalars>));
PYOPS_REGISTER_CPU_KERNEL(adam_kernel, (&step<AdamRule, 3, AdamOptions, AdamTensorScalars>));

}  // namespace CPU_CAPABILITY
}  // namespace pyops::optim
