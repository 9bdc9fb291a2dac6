// CPU kernels of the dropout family, compiled once per CPU capability (setup.py).

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>

#include "dropout/dropout.h"

namespace pyops::dropout {
inline namespace CPU_CAPABILITY {
namespace {

using at::Tensor;

// Philox blocks (of 4 elements) per parallel task, and per batch of blocks computed
// side by side (one AVX-512 register of counters).
constexpr int64_t kBlocksPerTask = 4096;
constexpr int kBatch = 16;

uint64_t draw_key() {
  auto* generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
      std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(generator->mutex_);
  return generator->random64();
}

void forward(const Tensor& input, double p, const Tensor& output, const Tensor& mask) {
  const uint64_t key = draw_key();
  const int64_t n = input.numel();
  const int64_t blocks = (n + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "pyops_dropout_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto rule = DropoutRule<Acc>::make(p);
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    bool* kept = mask.data_ptr<bool>();
    at::parallel_for(0, blocks, kBlocksPerTask, [&](int64_t begin, int64_t end) {
      uint32_t draws[4 * kBatch];
      for (int64_t block = begin; block < end; block += kBatch) {
        Philox4x32::blocks<kBatch>(static_cast<uint64_t>(block), key, draws);
        const int64_t first = block * 4;
        const int64_t count = std::min<int64_t>({4 * kBatch, 4 * (end - block), n - first});
        const scalar_t* in_e = in + first;
        scalar_t* out_e = out + first;
        bool* kept_e = kept + first;
        // Two simple loops (compare; multiply by the mask) that GCC vectorizes, where their
        // fusion stays scalar. _Pragma: this is inside a macro argument.
        _Pragma("omp simd") for (int64_t e = 0; e < count; ++e) kept_e[e] = rule.keep(draws[e]);
        _Pragma("omp simd") for (int64_t e = 0; e < count; ++e) {
          out_e[e] = static_cast<scalar_t>(rule.apply(static_cast<Acc>(in_e[e]), kept_e[e]));
        }
      }
    });
  });
}

void backward(const Tensor& grad_output, const Tensor& mask, double p, const Tensor& grad_input) {
  const int64_t n = grad_output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "pyops_dropout_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto rule = DropoutRule<Acc>::make(p);
    const scalar_t* grad = grad_output.const_data_ptr<scalar_t>();
    const bool* kept = mask.const_data_ptr<bool>();
    scalar_t* out = grad_input.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4 * kBlocksPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // a select and a multiply: GCC vectorizes it
        out[i] = static_cast<scalar_t>(rule.apply(static_cast<Acc>(grad[i]), kept[i]));
      }
    });
  });
}

}  // namespace

PYOPS_REGISTER_CPU_KERNEL(forward_kernel, &forward);
PYOPS_REGISTER_CPU_KERNEL(backward_kernel, &backward);

}  // namespace CPU_CAPABILITY
}  // namespace pyops::dropout
