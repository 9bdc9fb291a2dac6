// CUDA kernels of the pooling family. Only launch geometry and memory access live here;
// the window math is pool.h's, the same functors the CPU kernels run.
//
// Forward: one thread per output element (grid-stride), NCHW or channels-last (channel
// fastest, so neighbouring threads read neighbouring addresses).
// Backward: gather, one thread per input element, looping over the windows that contain
// it in output order: no atomics, deterministic, and each grad_input element is written
// once (no zero-fill pass).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/cuda_loops.cuh"
#include "pool/pool.h"

namespace pyops::pool {
namespace {

using at::Tensor;
using cuda::kThreadsPerBlock;
using cuda::opmath_t;

#define PYOPS_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// Output element e -> (n, c, oh, ow) in the tensor's layout.
struct Position {
  int64_t n, c, h, w;
};

__device__ __forceinline__ Position position_of(int64_t e, int64_t channels, int64_t height,
                                                int64_t width, bool channels_last) {
  Position p;
  if (channels_last) {
    p.c = e % channels;
    e /= channels;
    p.w = e % width;
    e /= width;
    p.h = e % height;
    p.n = e / height;
  } else {
    p.w = e % width;
    e /= width;
    p.h = e % height;
    e /= height;
    p.c = e % channels;
    p.n = e / channels;
  }
  return p;
}

// Element offset of (n, c, h, w) in a dense tensor of [.., height, width] planes.
__device__ __forceinline__ int64_t offset_of(int64_t n, int64_t c, int64_t h, int64_t w,
                                             int64_t channels, int64_t height, int64_t width,
                                             bool channels_last) {
  return channels_last ? ((n * height + h) * width + w) * channels + c
                       : ((n * channels + c) * height + h) * width + w;
}

template <typename T, typename Reduce, typename Index>
__global__ void arg_forward_kernel_impl(Geometry g, IndexKind kind, int64_t n_out, const T* input,
                                        T* output, Index* indices) {
  using Acc = opmath_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n_out;
       e += stride) {
    const Position o = position_of(e, g.channels, g.out_h, g.out_w, g.channels_last);
    const TapRange hr = valid_taps(o.h, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.in_h);
    const TapRange wr = valid_taps(o.w, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w);
    const int64_t ih0 = o.h * g.stride_h - g.pad_h, iw0 = o.w * g.stride_w - g.pad_w;
    Acc best = Reduce::identity();
    int64_t best_offset = hr.begin * g.kernel_w + wr.begin;
    for (int64_t kh = hr.begin; kh < hr.end; ++kh) {
      for (int64_t kw = wr.begin; kw < wr.end; ++kw) {
        const Acc v = static_cast<Acc>(input[offset_of(o.n, o.c, ih0 + kh * g.dilation_h,
                                                       iw0 + kw * g.dilation_w, g.channels,
                                                       g.in_h, g.in_w, g.channels_last)]);
        if (Reduce::replaces(v, best)) {
          best = v;
          best_offset = kh * g.kernel_w + kw;
        }
      }
    }
    const Acc result = window_is_empty(hr, wr) ? best : Reduce::finalize(best);
    output[e] = static_cast<T>(result);
    if (kind == IndexKind::Flat64) {
      const int64_t kh = best_offset / g.kernel_w, kw = best_offset - kh * g.kernel_w;
      indices[e] = static_cast<Index>((ih0 + kh * g.dilation_h) * g.in_w + iw0 + kw * g.dilation_w);
    } else if (kind != IndexKind::None) {
      bool blocked = false;
      if constexpr (Reduce::kRelu) blocked = Reduce::blocks_gradient(result);
      indices[e] = blocked ? kNoTap<Index> : static_cast<Index>(best_offset);
    }
  }
}

template <typename T, typename Reduce, typename Index>
void launch_arg_forward(const Geometry& g, IndexKind kind, const Tensor& input,
                        const Tensor& output, Index* indices) {
  const int64_t n = output.numel();
  arg_forward_kernel_impl<T, Reduce, Index>
      <<<cuda::blocks_for(n), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          g, kind, n, input.const_data_ptr<T>(), output.data_ptr<T>(), indices);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void arg_forward(ArgReduction reduction, IndexKind kind, const Geometry& g, const Tensor& input,
                 const Tensor& output, const Tensor& indices) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_pool_arg_forward_cuda", [&] {
    visit_arg_reduction<opmath_t<scalar_t>>(reduction, [&](auto reduce) {
      using Reduce = decltype(reduce);
      switch (kind) {
        case IndexKind::None:
          return launch_arg_forward<scalar_t, Reduce, uint8_t>(g, kind, input, output, nullptr);
        case IndexKind::Offset8:
          return launch_arg_forward<scalar_t, Reduce>(g, kind, input, output,
                                                      indices.data_ptr<uint8_t>());
        case IndexKind::Offset32:
          return launch_arg_forward<scalar_t, Reduce>(g, kind, input, output,
                                                      indices.data_ptr<int32_t>());
        case IndexKind::Flat64:
          return launch_arg_forward<scalar_t, Reduce>(g, kind, input, output,
                                                      indices.data_ptr<int64_t>());
      }
    });
  });
}

// Output rows (or columns) whose windows may hold input row `i` at some tap: those with
// o * stride - pad <= i <= o * stride - pad + (kernel - 1) * dilation.
__device__ __forceinline__ TapRange outputs_touching(int64_t i, int64_t stride, int64_t pad,
                                                     int64_t dilation, int64_t kernel,
                                                     int64_t out_size) {
  const int64_t span = (kernel - 1) * dilation;
  const int64_t lowest = i + pad - span;  // o * stride >= lowest
  int64_t begin = lowest <= 0 ? 0 : (lowest + stride - 1) / stride;
  int64_t end = (i + pad) / stride + 1;
  end = end < out_size ? end : out_size;
  return {begin, end < begin ? begin : end};
}

template <typename T, typename Index>
__global__ void arg_backward_kernel_impl(Geometry g, IndexKind kind, int64_t n_in,
                                         const T* grad_output, const Index* indices,
                                         T* grad_input) {
  using Acc = opmath_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n_in;
       e += stride) {
    const Position i = position_of(e, g.channels, g.in_h, g.in_w, g.channels_last);
    const TapRange rows =
        outputs_touching(i.h, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.out_h);
    const TapRange cols =
        outputs_touching(i.w, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.out_w);
    Acc sum = 0;
    for (int64_t oh = rows.begin; oh < rows.end; ++oh) {
      const int64_t dh = i.h - (oh * g.stride_h - g.pad_h);
      if (dh % g.dilation_h != 0) continue;
      for (int64_t ow = cols.begin; ow < cols.end; ++ow) {
        const int64_t dw = i.w - (ow * g.stride_w - g.pad_w);
        if (dw % g.dilation_w != 0) continue;
        const int64_t o = offset_of(i.n, i.c, oh, ow, g.channels, g.out_h, g.out_w,
                                    g.channels_last);
        const int64_t chosen = static_cast<int64_t>(indices[o]);
        const int64_t mine = kind == IndexKind::Flat64
                                 ? i.h * g.in_w + i.w
                                 : (dh / g.dilation_h) * g.kernel_w + dw / g.dilation_w;
        if (chosen == mine) sum += static_cast<Acc>(grad_output[o]);
      }
    }
    grad_input[e] = static_cast<T>(sum);
  }
}

template <typename T, typename Index>
void launch_arg_backward(const Geometry& g, IndexKind kind, const Tensor& grad_output,
                         const Tensor& indices, const Tensor& grad_input) {
  const int64_t n = grad_input.numel();
  arg_backward_kernel_impl<T, Index>
      <<<cuda::blocks_for(n), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          g, kind, n, grad_output.const_data_ptr<T>(), indices.const_data_ptr<Index>(),
          grad_input.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void arg_backward(IndexKind kind, const Geometry& g, const Tensor& grad_output,
                  const Tensor& indices, const Tensor& grad_input) {
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  PYOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "pyops_pool_arg_backward_cuda", [&] {
    switch (kind) {
      case IndexKind::Offset8:
        return launch_arg_backward<scalar_t, uint8_t>(g, kind, grad_output, indices, grad_input);
      case IndexKind::Offset32:
        return launch_arg_backward<scalar_t, int32_t>(g, kind, grad_output, indices, grad_input);
      case IndexKind::Flat64:
        return launch_arg_backward<scalar_t, int64_t>(g, kind, grad_output, indices, grad_input);
      case IndexKind::None:
        TORCH_CHECK(false, "pyops._max_pool2d_backward: indices are required");
    }
  });
}

// ---- Average pooling -------------------------------------------------------------------------

template <typename T>
__global__ void avg_forward_kernel_impl(Geometry g, bool count_include_pad,
                                        int64_t divisor_override, int64_t n_out, const T* input,
                                        T* output) {
  using Acc = opmath_t<T>;
  using Reduce = AvgReduce<Acc>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n_out;
       e += stride) {
    const Position o = position_of(e, g.channels, g.out_h, g.out_w, g.channels_last);
    const AvgSpan hs = avg_span(o.h, g.stride_h, g.pad_h, g.kernel_h, g.in_h);
    const AvgSpan ws = avg_span(o.w, g.stride_w, g.pad_w, g.kernel_w, g.in_w);
    const int64_t divisor = avg_divisor(hs, ws, count_include_pad, divisor_override);
    if (divisor == 0) {
      output[e] = static_cast<T>(0);
      continue;
    }
    Acc sum = 0;
    for (int64_t ih = hs.begin; ih < hs.end; ++ih) {
      for (int64_t iw = ws.begin; iw < ws.end; ++iw) {
        sum = Reduce::accumulate(sum, static_cast<Acc>(input[offset_of(
                                          o.n, o.c, ih, iw, g.channels, g.in_h, g.in_w,
                                          g.channels_last)]));
      }
    }
    output[e] = static_cast<T>(Reduce::finalize(sum, static_cast<Acc>(divisor)));
  }
}

template <typename T>
__global__ void avg_backward_kernel_impl(Geometry g, bool count_include_pad,
                                         int64_t divisor_override, int64_t n_in,
                                         const T* grad_output, T* grad_input) {
  using Acc = opmath_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n_in;
       e += stride) {
    const Position i = position_of(e, g.channels, g.in_h, g.in_w, g.channels_last);
    const TapRange rows = outputs_touching(i.h, g.stride_h, g.pad_h, 1, g.kernel_h, g.out_h);
    const TapRange cols = outputs_touching(i.w, g.stride_w, g.pad_w, 1, g.kernel_w, g.out_w);
    Acc sum = 0;
    for (int64_t oh = rows.begin; oh < rows.end; ++oh) {
      const AvgSpan hs = avg_span(oh, g.stride_h, g.pad_h, g.kernel_h, g.in_h);
      if (i.h < hs.begin || i.h >= hs.end) continue;  // beyond ceil_mode's clipped window
      for (int64_t ow = cols.begin; ow < cols.end; ++ow) {
        const AvgSpan ws = avg_span(ow, g.stride_w, g.pad_w, g.kernel_w, g.in_w);
        if (i.w < ws.begin || i.w >= ws.end) continue;
        const int64_t divisor = avg_divisor(hs, ws, count_include_pad, divisor_override);
        const int64_t o = offset_of(i.n, i.c, oh, ow, g.channels, g.out_h, g.out_w,
                                    g.channels_last);
        sum += static_cast<Acc>(grad_output[o]) / static_cast<Acc>(divisor);
      }
    }
    grad_input[e] = static_cast<T>(sum);
  }
}

void avg_forward(const Geometry& g, bool count_include_pad, int64_t divisor_override,
                 const Tensor& input, const Tensor& output) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_avg_pool_forward_cuda", [&] {
    const int64_t n = output.numel();
    avg_forward_kernel_impl<scalar_t>
        <<<cuda::blocks_for(n), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
            g, count_include_pad, divisor_override, n, input.const_data_ptr<scalar_t>(),
            output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void avg_backward(const Geometry& g, bool count_include_pad, int64_t divisor_override,
                  const Tensor& grad_output, const Tensor& grad_input) {
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  PYOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "pyops_avg_pool_backward_cuda", [&] {
    const int64_t n = grad_input.numel();
    avg_backward_kernel_impl<scalar_t>
        <<<cuda::blocks_for(n), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
            g, count_include_pad, divisor_override, n, grad_output.const_data_ptr<scalar_t>(),
            grad_input.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

PYOPS_REGISTER_CUDA_KERNEL(arg_forward_kernel, &arg_forward);
PYOPS_REGISTER_CUDA_KERNEL(arg_backward_kernel, &arg_backward);
PYOPS_REGISTER_CUDA_KERNEL(avg_forward_kernel, &avg_forward);
PYOPS_REGISTER_CUDA_KERNEL(avg_backward_kernel, &avg_backward);

}  // namespace pyops::pool
