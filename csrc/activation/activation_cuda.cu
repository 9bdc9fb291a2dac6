// CUDA kernels of the activation family. Only launch geometry and memory access live
// here; the math is activation.h's, the same functors the CPU kernels run.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "activation/activation.h"
#include "common/cuda_loops.cuh"

namespace pyops::activation {
namespace {

using at::Tensor;
using cuda::ceil_div;
using cuda::kThreadsPerBlock;
using cuda::opmath_t;
using cuda::Pack;

#define PYOPS_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// Functors rather than lambdas: device lambdas would need nvcc's --extended-lambda.
template <typename Fn>
struct ForwardOp {
  Fn fn;
  template <typename Acc>
  __device__ Acc operator()(Acc x) const {
    return fn.forward(x);
  }
};

template <typename Fn>
struct BackwardOp {
  Fn fn;
  template <typename Acc>
  __device__ Acc operator()(Acc grad, Acc saved) const {
    return fn.backward(grad, saved);
  }
};

void forward(Activation act, double slope, const Tensor& input, const Tensor& output) {
  // Custom operators get no device guard from the dispatcher; the stream and the device
  // properties used for the launch are those of the current device.
  const c10::cuda::CUDAGuard device_guard(input.device());
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_activation_forward_cuda", [&] {
    visit_activation<opmath_t<scalar_t>>(act, slope, [&](auto fn) {
      cuda::launch_map(ForwardOp<decltype(fn)>{fn}, input.numel(), output.data_ptr<scalar_t>(),
                       input.const_data_ptr<scalar_t>());
    });
  });
}

void backward(Activation act, double slope, const Tensor& grad_output, const Tensor& saved,
              const Tensor& grad_input) {
  const c10::cuda::CUDAGuard device_guard(saved.device());
  PYOPS_DISPATCH_FLOATING(saved.scalar_type(), "pyops_activation_backward_cuda", [&] {
    visit_activation<opmath_t<scalar_t>>(act, slope, [&](auto fn) {
      cuda::launch_map(BackwardOp<decltype(fn)>{fn}, saved.numel(),
                       grad_input.data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                       saved.const_data_ptr<scalar_t>());
    });
  });
}

// ---- bias_act ---------------------------------------------------------------------
// Tensors are [outer, channels, inner] flat arrays (ChannelLayout); element e belongs to
// channel (e / inner) % channels.

__device__ __forceinline__ int64_t channel_of(int64_t element, ChannelLayout layout) {
  return (layout.inner == 1 ? element : element / layout.inner) % layout.channels;
}

// Packs of N > 1 elements need every pack to hold one channel (planes: inner % N == 0)
// or N consecutive channels (channels innermost: channels % N == 0).
bool packs_fit_layout(int pack, ChannelLayout layout) {
  return layout.inner == 1 ? layout.channels % pack == 0 : layout.inner % pack == 0;
}

template <int N, typename T, typename Fn>
__global__ void bias_forward_packs_kernel(Fn fn, ChannelLayout layout, int64_t n, const T* input,
                                         const T* bias, T* output) {
  using Acc = opmath_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / N;
  // In a pack, channels advance with the element only when channels are innermost.
  const int channel_step = layout.inner == 1 ? 1 : 0;
  for (int64_t p = first; p < packs; p += stride) {
    const Pack<T, N> x = cuda::load_pack<N>(input, p);
    const int64_t channel = channel_of(p * N, layout);
    Pack<T, N> y;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Acc bias_value = static_cast<Acc>(bias[channel + k * channel_step]);
      y.values[k] = static_cast<T>(fn.forward(static_cast<Acc>(x.values[k]) + bias_value));
    }
    cuda::store_pack(output, p, y);
  }
  for (int64_t e = packs * N + first; e < n; e += stride) {
    const Acc bias_value = static_cast<Acc>(bias[channel_of(e, layout)]);
    output[e] = static_cast<T>(fn.forward(static_cast<Acc>(input[e]) + bias_value));
  }
}

void bias_forward(Activation act, double slope, const Tensor& input, const Tensor& bias,
                  const Tensor& output, ChannelLayout layout) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_bias_act_forward_cuda", [&] {
    constexpr int kPack = cuda::pack_size<scalar_t>();
    const int64_t n = input.numel();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    const bool packed =
        packs_fit_layout(kPack, layout) && cuda::all_aligned(cuda::kAccessBytes, in, out);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    visit_activation<opmath_t<scalar_t>>(act, slope, [&](auto fn) {
      if (packed) {
        bias_forward_packs_kernel<kPack>
            <<<cuda::blocks_for(ceil_div(n, kPack)), kThreadsPerBlock, 0, stream>>>(
                fn, layout, n, in, b, out);
      } else {
        bias_forward_packs_kernel<1>
            <<<cuda::blocks_for(n), kThreadsPerBlock, 0, stream>>>(fn, layout, n, in, b, out);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The backward runs in two deterministic steps (no atomics, so grad_bias is the same
// on every run): the first kernel writes grad_input and, per block, the sums of the
// grad_input values it wrote, one per channel, into partial[slice][channel]; the second
// adds up each channel's partial sums in slice order. Sums are kept in opmath_t (float
// for half, bfloat16 and float; double for double) and add grad_input as stored, so
// grad_bias is the channel sum of the returned grad_input.

template <typename T, typename Fn>
struct BiasBackwardArgs {
  Fn fn;
  bool saved_is_result;
  ChannelLayout layout;
  const T* grad_output;
  const T* saved;
  const T* bias;
  T* grad_input;
  opmath_t<T>* partial;  // [slices, channels]
};

// grad_input[e] for element e of `channel`, rounded to T as it is stored.
template <typename T, typename Fn>
__device__ __forceinline__ T bias_backward_value(const BiasBackwardArgs<T, Fn>& a, T grad,
                                                 T saved, int64_t channel) {
  using Acc = opmath_t<T>;
  const Acc s = a.saved_is_result
                    ? static_cast<Acc>(saved)
                    : static_cast<Acc>(saved) + static_cast<Acc>(a.bias[channel]);
  return static_cast<T>(a.fn.backward(static_cast<Acc>(grad), s));
}

// Channels innermost (inner == 1): the tensor is `outer` rows of `channels`. A block is
// blockDim.x columns x blockDim.y rows of threads (blockDim.y a power of two):
// threadIdx.x walks channels (consecutive threads read consecutive addresses),
// threadIdx.y walks rows; block (x, slice) covers the channels
// [x * blockDim.x, x * blockDim.x + blockDim.x) and every gridDim.y-th group of
// blockDim.y rows.
template <typename T, typename Fn>
__global__ void __launch_bounds__(kThreadsPerBlock)
    bias_backward_rows_kernel(BiasBackwardArgs<T, Fn> a) {
  using Acc = opmath_t<T>;
  __shared__ Acc scratch[kThreadsPerBlock];
  const int64_t channels = a.layout.channels;
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  Acc sum = 0;
  if (channel < channels) {
    const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
         row < a.layout.outer; row += row_stride) {
      const int64_t e = row * channels + channel;
      const T g = bias_backward_value(a, a.grad_output[e], a.saved[e], channel);
      a.grad_input[e] = g;
      sum += static_cast<Acc>(g);
    }
  }
  sum = cuda::sum_over_rows<Acc>(sum, scratch, threadIdx.y, blockDim.y, threadIdx.x, blockDim.x);
  if (threadIdx.y == 0 && channel < channels) a.partial[blockIdx.y * channels + channel] = sum;
}

// Planes (inner > 1): row (o, c) of `inner` elements belongs to channel c. Channel c's
// elements, in packs of N (inner % N == 0), are numbered q = o * packs_per_row + i;
// block (c, slice) takes every gridDim.y-th group of blockDim.x consecutive packs, so
// consecutive threads read consecutive addresses and a single sample's planes still
// spread over many blocks.
template <int N, typename T, typename Fn>
__global__ void __launch_bounds__(kThreadsPerBlock)
    bias_backward_planes_kernel(BiasBackwardArgs<T, Fn> a) {
  using Acc = opmath_t<T>;
  __shared__ Acc scratch[kThreadsPerBlock];
  const auto [outer, channels, inner] = a.layout;
  const int64_t channel = blockIdx.x;
  const int64_t packs_per_row = inner / N;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  Acc sum = 0;
  for (int64_t q = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
       q < outer * packs_per_row; q += stride) {
    const int64_t o = q / packs_per_row;
    const int64_t p = (o * channels + channel) * packs_per_row + (q - o * packs_per_row);
    const Pack<T, N> grad = cuda::load_pack<N>(a.grad_output, p);
    const Pack<T, N> saved = cuda::load_pack<N>(a.saved, p);
    Pack<T, N> result;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      result.values[k] = bias_backward_value(a, grad.values[k], saved.values[k], channel);
      sum += static_cast<Acc>(result.values[k]);
    }
    cuda::store_pack(a.grad_input, p, result);
  }
  sum = cuda::sum_over_rows<Acc>(sum, scratch, threadIdx.x, kThreadsPerBlock, 0, 1);
  if (threadIdx.x == 0) a.partial[blockIdx.y * channels + channel] = sum;
}

// Slices per channel block (gridDim.y): enough blocks for one full wave, but never more
// than `max_slices`, the number that gives every block work.
int64_t slices_for(int64_t blocks_per_slice, int64_t max_slices) {
  constexpr int64_t kMaxGridY = 65535;
  const int64_t wanted = ceil_div(cuda::resident_blocks(), blocks_per_slice);
  return std::clamp<int64_t>(std::min(wanted, max_slices), 1, kMaxGridY);
}

// Threads across channels in the rows kernel: a warp's width when channels fill it,
// otherwise the next power of two, so that few lanes idle.
int columns_for(int64_t channels) {
  int columns = 1;
  while (columns < 32 && columns < channels) columns *= 2;
  return columns;
}

template <typename T, typename Fn>
void launch_bias_backward(BiasBackwardArgs<T, Fn> args, T* grad_bias, const Tensor& like) {
  const auto [outer, channels, inner] = args.layout;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto workspace_options =
      like.options().dtype(c10::CppTypeToScalarType<opmath_t<T>>::value);
  Tensor partial;
  int64_t slices = 0;
  if (inner == 1) {
    const int columns = columns_for(channels);
    const int rows = kThreadsPerBlock / columns;
    const int64_t column_blocks = ceil_div(channels, columns);
    slices = slices_for(column_blocks, ceil_div(outer, rows));
    partial = at::empty({slices, channels}, workspace_options);
    args.partial = partial.mutable_data_ptr<opmath_t<T>>();
    bias_backward_rows_kernel<<<dim3(column_blocks, slices), dim3(columns, rows), 0, stream>>>(
        args);
  } else {
    constexpr int kPack = cuda::pack_size<T>();
    const bool packed = inner % kPack == 0 &&
                        cuda::all_aligned(cuda::kAccessBytes, args.grad_output, args.saved,
                                          args.grad_input);
    const int pack = packed ? kPack : 1;
    slices = slices_for(channels, ceil_div(outer * (inner / pack), kThreadsPerBlock));
    partial = at::empty({slices, channels}, workspace_options);
    args.partial = partial.mutable_data_ptr<opmath_t<T>>();
    const dim3 grid(channels, slices);
    if (packed) {
      bias_backward_planes_kernel<kPack><<<grid, kThreadsPerBlock, 0, stream>>>(args);
    } else {
      bias_backward_planes_kernel<1><<<grid, kThreadsPerBlock, 0, stream>>>(args);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::launch_sum_rows_in_order(args.partial, slices, channels, grad_bias, stream);
  // `partial` goes back to the caching allocator, which orders its reuse on this stream.
}

void bias_backward(Activation act, double slope, bool saved_is_result, const Tensor& grad_output,
                   const Tensor& saved, const Tensor& bias, const Tensor& grad_input,
                   const Tensor& grad_bias, ChannelLayout layout) {
  const c10::cuda::CUDAGuard device_guard(saved.device());
  PYOPS_DISPATCH_FLOATING(saved.scalar_type(), "pyops_bias_act_backward_cuda", [&] {
    visit_activation<opmath_t<scalar_t>>(act, slope, [&](auto fn) {
      BiasBackwardArgs<scalar_t, decltype(fn)> args{fn,
                                                    saved_is_result,
                                                    layout,
                                                    grad_output.const_data_ptr<scalar_t>(),
                                                    saved.const_data_ptr<scalar_t>(),
                                                    bias.const_data_ptr<scalar_t>(),
                                                    grad_input.data_ptr<scalar_t>(),
                                                    nullptr};
      launch_bias_backward(args, grad_bias.data_ptr<scalar_t>(), grad_input);
    });
  });
}

}  // namespace

PYOPS_REGISTER_CUDA_KERNEL(forward_kernel, &forward);
PYOPS_REGISTER_CUDA_KERNEL(backward_kernel, &backward);
PYOPS_REGISTER_CUDA_KERNEL(bias_forward_kernel, &bias_forward);
PYOPS_REGISTER_CUDA_KERNEL(bias_backward_kernel, &bias_backward);

}  // namespace pyops::activation
