// CUDA kernels of the log-softmax family; the math is softmax.h's. Rows along the last
// dim get one block each (block-wide reductions in a fixed order); other dims get one
// thread per (outer, inner) column, so neighbouring threads read neighbouring elements.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "common/cuda_loops.cuh"
#include "common/math.h"
#include "softmax/softmax.h"

namespace pyops::softmax {
namespace {

using at::Tensor;
using cuda::kThreadsPerBlock;
using Math = LogSoftmaxMath;

struct Max {
  template <typename A>
  __device__ A operator()(A a, A b) const {
    return math::maximum(a, b);
  }
};

// A row's log-sum-exp, max + log_sum, kept as its two terms (softmax.h says why).
template <typename A>
struct Lse {
  A max, log_sum;
};

// The log-sum-exp of a contiguous row of `size`, by the whole block.
template <typename T, typename A>
__device__ Lse<A> block_row_lse(const T* row, int64_t size, A* scratch) {
  A max = -std::numeric_limits<A>::infinity();
  for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
    max = math::maximum(max, static_cast<A>(row[i]));
  }
  max = cuda::reduce_over_rows(max, scratch, threadIdx.x, blockDim.x, 0, 1, Max{});
  A sum = 0;
  for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
    sum += Math::shifted_exp(static_cast<A>(row[i]), max);
  }
  sum = cuda::sum_over_rows(sum, scratch, threadIdx.x, blockDim.x, 0, 1);
  return {max, static_cast<A>(::log(sum))};
}

template <typename T>
__global__ void log_softmax_rows_kernel(const T* input, T* output, int64_t rows, int64_t size) {
  using A = at::opmath_type<T>;
  __shared__ A scratch[kThreadsPerBlock];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = input + r * size;
    const Lse<A> lse = block_row_lse(row, size, scratch);
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
      output[r * size + i] =
          static_cast<T>(Math::output(static_cast<A>(row[i]), lse.max, lse.log_sum));
    }
  }
}

template <typename T>
__global__ void log_softmax_columns_kernel(const T* input, T* output, RowLayout layout) {
  using A = at::opmath_type<T>;
  const int64_t columns = layout.outer * layout.inner;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < columns;
       c += stride) {
    const int64_t base = (c / layout.inner) * layout.size * layout.inner + c % layout.inner;
    A max = -std::numeric_limits<A>::infinity();
    for (int64_t k = 0; k < layout.size; ++k) {
      max = math::maximum(max, static_cast<A>(input[base + k * layout.inner]));
    }
    A sum = 0;
    for (int64_t k = 0; k < layout.size; ++k) {
      sum += Math::shifted_exp(static_cast<A>(input[base + k * layout.inner]), max);
    }
    const A log_sum = ::log(sum);
    for (int64_t k = 0; k < layout.size; ++k) {
      const int64_t e = base + k * layout.inner;
      output[e] = static_cast<T>(Math::output(static_cast<A>(input[e]), max, log_sum));
    }
  }
}

template <typename T>
__global__ void log_softmax_backward_rows_kernel(const T* grad, const T* output, T* grad_input,
                                                 int64_t rows, int64_t size) {
  using A = at::opmath_type<T>;
  __shared__ A scratch[kThreadsPerBlock];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    A sum = 0;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) sum += static_cast<A>(grad[r * size + i]);
    sum = cuda::sum_over_rows(sum, scratch, threadIdx.x, blockDim.x, 0, 1);
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
      const int64_t e = r * size + i;
      grad_input[e] = static_cast<T>(
          Math::grad_input(static_cast<A>(grad[e]), static_cast<A>(output[e]), sum));
    }
  }
}

template <typename T>
__global__ void log_softmax_backward_columns_kernel(const T* grad, const T* output,
                                                    T* grad_input, RowLayout layout) {
  using A = at::opmath_type<T>;
  const int64_t columns = layout.outer * layout.inner;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < columns;
       c += stride) {
    const int64_t base = (c / layout.inner) * layout.size * layout.inner + c % layout.inner;
    A sum = 0;
    for (int64_t k = 0; k < layout.size; ++k) sum += static_cast<A>(grad[base + k * layout.inner]);
    for (int64_t k = 0; k < layout.size; ++k) {
      const int64_t e = base + k * layout.inner;
      grad_input[e] = static_cast<T>(
          Math::grad_input(static_cast<A>(grad[e]), static_cast<A>(output[e]), sum));
    }
  }
}

// Row losses (0 for ignored rows) into `row_loss`: the loss itself for 'none' (Out = T),
// the compute type for the sum that nll_reduce_kernel takes next.
template <typename T, typename Out>
__global__ void nll_forward_kernel_impl(const T* input, const int64_t* target, int64_t rows,
                                        int64_t classes, int64_t ignore_index, Out* row_loss,
                                        at::opmath_type<T>* lse_terms) {
  using A = at::opmath_type<T>;
  __shared__ A scratch[kThreadsPerBlock];
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const T* row = input + n * classes;
    const Lse<A> lse = block_row_lse(row, classes, scratch);
    if (threadIdx.x == 0) {
      const int64_t t = target[n];
      lse_terms[2 * n] = lse.max;
      lse_terms[2 * n + 1] = lse.log_sum;
      if (t == ignore_index) {
        row_loss[n] = Out(0);
      } else {
        CUDA_KERNEL_ASSERT(t >= 0 && t < classes && "pyops.log_softmax_nll_loss: target out of bounds");
        // Never read out of bounds, even where device asserts are compiled out.
        row_loss[n] = static_cast<Out>(
            (t >= 0 && t < classes) ? Math::nll_loss(static_cast<A>(row[t]), lse.max, lse.log_sum)
                                    : std::numeric_limits<A>::quiet_NaN());
      }
    }
  }
}

// 'mean' or 'sum' of the row losses, by one block: each thread sums a fixed stride of
// rows, then a fixed tree over the threads (deterministic).
template <typename T>
__global__ void nll_reduce_kernel(const at::opmath_type<T>* row_loss, const int64_t* target,
                                  int64_t rows, int64_t ignore_index, bool mean, T* loss) {
  __shared__ NllLossSum scratch[kThreadsPerBlock];
  NllLossSum sum = 0, counted = 0;
  for (int64_t n = threadIdx.x; n < rows; n += blockDim.x) {
    sum += static_cast<NllLossSum>(row_loss[n]);
    counted += target[n] != ignore_index ? 1 : 0;
  }
  sum = cuda::sum_over_rows(sum, scratch, threadIdx.x, blockDim.x, 0, 1);
  counted = cuda::sum_over_rows(counted, scratch, threadIdx.x, blockDim.x, 0, 1);
  // 'mean' of no counted row: 0 / 0 = NaN, as in torch.
  if (threadIdx.x == 0) *loss = static_cast<T>(mean ? sum / counted : sum);
}

// nll_row_weight's divisor for 'mean': the count of rows not ignored, at least 1.
template <typename A>
__global__ void nll_mean_divisor_kernel(const int64_t* target, int64_t rows,
                                        int64_t ignore_index, A* divisor) {
  __shared__ NllLossSum scratch[kThreadsPerBlock];
  NllLossSum counted = 0;
  for (int64_t n = threadIdx.x; n < rows; n += blockDim.x) {
    counted += target[n] != ignore_index ? 1 : 0;
  }
  counted = cuda::sum_over_rows(counted, scratch, threadIdx.x, blockDim.x, 0, 1);
  if (threadIdx.x == 0) *divisor = static_cast<A>(counted > 1 ? counted : NllLossSum(1));
}

// `divisor` is null but for 'mean'; `upstream_stride` is 0 but for 'none'.
template <typename T>
__global__ void nll_backward_kernel_impl(const T* upstream, int64_t upstream_stride,
                                         const at::opmath_type<T>* divisor, const T* input,
                                         const int64_t* target, int64_t ignore_index,
                                         const at::opmath_type<T>* lse_terms, int64_t rows,
                                         int64_t classes, T* grad_input) {
  using A = at::opmath_type<T>;
  const int64_t n_elements = rows * classes;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const A row_divisor = divisor == nullptr ? A(1) : *divisor;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n_elements;
       e += stride) {
    const int64_t n = e / classes, c = e % classes;
    const bool counted = target[n] != ignore_index;
    const A weight = Math::nll_row_weight(static_cast<A>(upstream[n * upstream_stride]), counted,
                                          row_divisor);
    const A is_target = counted && target[n] == c ? A(1) : A(0);
    grad_input[e] = static_cast<T>(Math::nll_grad(static_cast<A>(input[e]), lse_terms[2 * n],
                                                  lse_terms[2 * n + 1], is_target, weight));
  }
}

int64_t row_blocks(int64_t rows) { return std::min<int64_t>(rows, 65535); }

#define PYOPS_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

void log_softmax(const Tensor& input, const Tensor& output, RowLayout layout) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_log_softmax_cuda", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    if (layout.inner == 1) {
      log_softmax_rows_kernel<<<row_blocks(layout.outer), kThreadsPerBlock, 0, stream>>>(
          in, out, layout.outer, layout.size);
    } else {
      log_softmax_columns_kernel<<<cuda::blocks_for(layout.outer * layout.inner),
                                   kThreadsPerBlock, 0, stream>>>(in, out, layout);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void log_softmax_backward(const Tensor& grad_output, const Tensor& output,
                          const Tensor& grad_input, RowLayout layout) {
  const c10::cuda::CUDAGuard device_guard(output.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PYOPS_DISPATCH_FLOATING(output.scalar_type(), "pyops_log_softmax_backward_cuda", [&] {
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* y = output.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    if (layout.inner == 1) {
      log_softmax_backward_rows_kernel<<<row_blocks(layout.outer), kThreadsPerBlock, 0, stream>>>(
          g, y, gi, layout.outer, layout.size);
    } else {
      log_softmax_backward_columns_kernel<<<cuda::blocks_for(layout.outer * layout.inner),
                                            kThreadsPerBlock, 0, stream>>>(g, y, gi, layout);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void nll_forward(const Tensor& input, const Tensor& target, int64_t ignore_index,
                 Reduction reduction, const Tensor& loss, const Tensor& lse) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = input.size(0), classes = input.size(1);
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_log_softmax_nll_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    if (reduction == Reduction::None) {
      nll_forward_kernel_impl<<<row_blocks(rows), kThreadsPerBlock, 0, stream>>>(
          x, t, rows, classes, ignore_index, loss.data_ptr<scalar_t>(), lse.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const Tensor row_loss = at::empty({rows}, lse.options());
    nll_forward_kernel_impl<<<row_blocks(rows), kThreadsPerBlock, 0, stream>>>(
        x, t, rows, classes, ignore_index, row_loss.data_ptr<A>(), lse.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nll_reduce_kernel<<<1, kThreadsPerBlock, 0, stream>>>(
        row_loss.const_data_ptr<A>(), t, rows, ignore_index, reduction == Reduction::Mean,
        loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void nll_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                  const Tensor& lse, Reduction reduction, int64_t ignore_index,
                  const Tensor& grad_input) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = input.size(0), classes = input.size(1);
  const int64_t upstream_stride = reduction == Reduction::None ? grad_loss.stride(0) : 0;
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_log_softmax_nll_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t* t = target.const_data_ptr<int64_t>();
    Tensor divisor;
    if (reduction == Reduction::Mean) {
      divisor = at::empty({}, lse.options());
      nll_mean_divisor_kernel<<<1, kThreadsPerBlock, 0, stream>>>(t, rows, ignore_index,
                                                                   divisor.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    nll_backward_kernel_impl<<<cuda::blocks_for(rows * classes), kThreadsPerBlock, 0, stream>>>(
        grad_loss.const_data_ptr<scalar_t>(), upstream_stride,
        divisor.defined() ? divisor.const_data_ptr<A>() : nullptr,
        input.const_data_ptr<scalar_t>(), t, ignore_index, lse.const_data_ptr<A>(), rows,
        classes, grad_input.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

PYOPS_REGISTER_CUDA_KERNEL(log_softmax_kernel, &log_softmax);
PYOPS_REGISTER_CUDA_KERNEL(log_softmax_backward_kernel, &log_softmax_backward);
PYOPS_REGISTER_CUDA_KERNEL(nll_forward_kernel, &nll_forward);
PYOPS_REGISTER_CUDA_KERNEL(nll_backward_kernel, &nll_backward);

}  // namespace pyops::softmax
