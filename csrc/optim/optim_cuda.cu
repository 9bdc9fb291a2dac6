// CUDA kernels of the optimizer family: a multi-tensor apply. The tensors of a group
// are cut into chunks of kChunkElements; each CUDA block updates one chunk. Pointers,
// sizes and per-tensor scalars of up to kMaxTensors tensors and the (tensor, chunk) of
// up to kMaxBlocks blocks travel in the kernel's arguments, so a step over N tensors
// takes about ceil(N / kMaxTensors) launches and no device-side metadata buffer. The
// math is optim.h's, computed in Acc (float for half and bfloat16).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "optim/optim.h"

namespace pyops::optim {
namespace {

constexpr int kThreadsPerBlock = 512;
constexpr int64_t kChunkElements = 65536;
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
// CUDA limits a kernel's arguments to 4 KiB.
constexpr size_t kMaxKernelArgBytes = 4000;

template <typename T, typename PerTensor, int K>
struct LaunchMetadata {
  T* params[kMaxTensors];
  const T* grads[kMaxTensors];
  T* states[K][kMaxTensors];  // nullptr: a state the rule does not use
  int64_t numel[kMaxTensors];
  PerTensor scalars[kMaxTensors];
  int16_t block_tensor[kMaxBlocks];  // which tensor slot block b updates
  int32_t block_chunk[kMaxBlocks];   // and which chunk of it
};

template <typename T, typename Rule, int K>
__global__ void __launch_bounds__(kThreadsPerBlock)
    multi_tensor_update(LaunchMetadata<T, typename Rule::PerTensor, K> meta, Rule rule) {
  using Acc = at::opmath_type<T>;
  const int slot = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t numel = meta.numel[slot];
  const int64_t end = begin + kChunkElements < numel ? begin + kChunkElements : numel;
  T* param = meta.params[slot];
  const T* grad = meta.grads[slot];
  T* states[K];
#pragma unroll
  for (int k = 0; k < K; ++k) states[k] = meta.states[k][slot];
  const typename Rule::PerTensor scalars = meta.scalars[slot];

  for (int64_t i = begin + threadIdx.x; i < end; i += kThreadsPerBlock) {
    Acc p = static_cast<Acc>(param[i]);
    Acc state[K];
#pragma unroll
    for (int k = 0; k < K; ++k) state[k] = states[k] != nullptr ? static_cast<Acc>(states[k][i]) : Acc(0);
    rule(scalars, p, static_cast<Acc>(grad[i]), state);
    param[i] = static_cast<T>(p);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (states[k] != nullptr) states[k][i] = static_cast<T>(state[k]);
    }
  }
}

template <template <typename> class Rule, int K, typename Options, typename TensorScalars>
void step(const Options& options, const TensorGroup<K>& group,
          const std::vector<TensorScalars>& tensor_scalars) {
  const c10::cuda::CUDAGuard device_guard(group.params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, group.params[0].scalar_type(), "pyops_optimizer_step_cuda", [&] {
        using Acc = at::opmath_type<scalar_t>;
        using RuleT = Rule<Acc>;
        using Metadata = LaunchMetadata<scalar_t, typename RuleT::PerTensor, K>;
        static_assert(sizeof(Metadata) + sizeof(RuleT) <= kMaxKernelArgBytes,
                      "kernel arguments over CUDA's 4 KiB limit: lower kMaxTensors/kMaxBlocks");
        const RuleT rule(options);
        Metadata meta;
        int slots = 0;
        int blocks = 0;
        auto launch = [&] {
          if (blocks == 0) return;
          multi_tensor_update<scalar_t, RuleT, K>
              <<<blocks, kThreadsPerBlock, 0, stream>>>(meta, rule);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          blocks = 0;
        };
        auto fill_slot = [&](int slot, size_t t) {
          meta.params[slot] = group.params[t].template data_ptr<scalar_t>();
          meta.grads[slot] = group.grads[t].template const_data_ptr<scalar_t>();
          for (int k = 0; k < K; ++k) {
            meta.states[k][slot] = group.states[k].empty()
                                       ? nullptr
                                       : group.states[k][t].template data_ptr<scalar_t>();
          }
          meta.numel[slot] = group.params[t].numel();
          meta.scalars[slot] = RuleT::per_tensor(tensor_scalars[t]);
        };
        for (size_t t = 0; t < group.params.size(); ++t) {
          int slot = slots++;
          fill_slot(slot, t);
          const int64_t chunks = (meta.numel[slot] + kChunkElements - 1) / kChunkElements;
          for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            meta.block_tensor[blocks] = static_cast<int16_t>(slot);
            meta.block_chunk[blocks] = static_cast<int32_t>(chunk);
            ++blocks;
            if (blocks == kMaxBlocks) {
              launch();
              // A tensor whose chunks continue keeps a slot (slot 0) in the next launch.
              if (chunk + 1 < chunks) {
                slot = 0;
                fill_slot(0, t);
                slots = 1;
              } else {
                slots = 0;
              }
            }
          }
          if (slots == kMaxTensors) {
            launch();
            slots = 0;
          }
        }
        launch();
      });
}

}  // namespace

PYOPS_REGISTER_CUDA_KERNEL(sgd_kernel, (&step<SgdRule, 1, SgdOptions, SgdTensorScalars>));
PYOPS_REGISTER_CUDA_KERNEL(adagrad_kernel,
                           (&step<AdagradRule, 1, AdagradOptions, AdagradTensorScalars>));
PYOPS_REGISTER_CUDA_KERNEL(adadelta_kernel,
                           (&step<AdadeltaRule, 2, AdadeltaOptions, NoTensorScalars>));
PYOPS_REGISTER_CUDA_KERNEL(rmsprop_kernel,
                           (&step<RmspropRule, 3, RmspropOptions, NoTensorScalars>));
PYOPS_REGISTER_CUDA_KERNEL(adam_kernel, (&step<AdamRule, 3, AdamOptions, AdamTensorScalars>));

}  // namespace pyops::optim
