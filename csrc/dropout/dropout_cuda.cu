// CUDA kernels of the dropout family: the generator and the keep rule are dropout.h's,
// so a mask drawn here equals the CPU kernel's for the same key.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>

#include "common/cuda_loops.cuh"
#include "dropout/dropout.h"

namespace pyops::dropout {
namespace {

using at::Tensor;

// One thread per Philox block of 4 elements, grid-stride.
template <typename T>
__global__ void dropout_kernel(DropoutRule<at::opmath_type<T>> rule, uint64_t key,
                               uint64_t counter_offset, int64_t n, const T* input, T* output,
                               bool* kept) {
  using Acc = at::opmath_type<T>;
  const int64_t blocks = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       block < blocks; block += stride) {
    uint32_t draws[4];
    Philox4x32::block(counter_offset + static_cast<uint64_t>(block), key, draws);
    const int64_t first = block * 4;
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = first + lane;
      if (i < n) {
        const bool keep = rule.keep(draws[lane]);
        kept[i] = keep;
        output[i] = static_cast<T>(rule.apply(static_cast<Acc>(input[i]), keep));
      }
    }
  }
}

template <typename T>
__global__ void dropout_backward_kernel(DropoutRule<at::opmath_type<T>> rule, int64_t n,
                                        const T* grad, const bool* kept, T* grad_input) {
  using Acc = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    grad_input[i] = static_cast<T>(rule.apply(static_cast<Acc>(grad[i]), kept[i]));
  }
}

void forward(const Tensor& input, double p, const Tensor& output, const Tensor& mask) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t n = input.numel();
  const int64_t blocks = (n + 3) / 4;
  uint64_t key, offset;
  {
    // The key and a fresh counter range come from torch's CUDA generator, so
    // torch.manual_seed / torch.cuda.manual_seed make runs reproducible.
    auto* generator = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(generator->mutex_);
    std::tie(key, offset) = generator->philox_engine_inputs(static_cast<uint64_t>(blocks));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "pyops_dropout_cuda", [&] {
    const auto rule = DropoutRule<at::opmath_type<scalar_t>>::make(p);
    dropout_kernel<scalar_t><<<cuda::blocks_for(blocks), cuda::kThreadsPerBlock, 0,
                               at::cuda::getCurrentCUDAStream()>>>(
        rule, key, offset, n, input.const_data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
        mask.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward(const Tensor& grad_output, const Tensor& mask, double p, const Tensor& grad_input) {
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  const int64_t n = grad_output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "pyops_dropout_backward_cuda", [&] {
    const auto rule = DropoutRule<at::opmath_type<scalar_t>>::make(p);
    dropout_backward_kernel<scalar_t><<<cuda::blocks_for(n), cuda::kThreadsPerBlock, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        rule, n, grad_output.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
        grad_input.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

PYOPS_REGISTER_CUDA_KERNEL(forward_kernel, &forward);
PYOPS_REGISTER_CUDA_KERNEL(backward_kernel, &backward);

}  // namespace pyops::dropout
