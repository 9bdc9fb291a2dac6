#pragma once
// CUDA building blocks shared by every family's *_cuda.cu files: launch geometry,
// 16-byte packed memory access, an element-wise launcher and a deterministic block sum.
// An element-wise `op` is a functor with a __device__ call operator written with the
// family's shared math; it is called with opmath_t<T> values (float for half and
// bfloat16), as the CPU loops (common/cpu_loops.h) call it in their tails.
// Conventions (design section 7): kernels run on at::cuda::getCurrentCUDAStream(),
// index with 64-bit integers, are never launched for empty tensors, and every launch is
// checked with C10_CUDA_KERNEL_LAUNCH_CHECK().

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace pyops::cuda {

template <typename T>
using opmath_t = at::opmath_type<T>;

constexpr int kThreadsPerBlock = 256;
// The widest single load/store (LDG.128/STG.128).
constexpr int kAccessBytes = 16;

// Elements of T moved by one 16-byte access.
template <typename T>
constexpr int pack_size() {
  return sizeof(T) >= kAccessBytes ? 1 : static_cast<int>(kAccessBytes / sizeof(T));
}

// N consecutive elements loaded or stored by a single instruction; a pointer to one must
// be aligned to its size.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T values[N];
};

// Pack p of the array at `base`: elements [p * N, p * N + N). Loading into a value (not
// binding a reference to memory) is what makes the compiler emit one 16-byte load.
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* base, int64_t p) {
  return reinterpret_cast<const Pack<T, N>*>(base)[p];
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t p, const Pack<T, N>& pack) {
  reinterpret_cast<Pack<T, N>*>(base)[p] = pack;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename... T>
bool all_aligned(int64_t bytes, const T*... pointers) {
  return ((reinterpret_cast<std::uintptr_t>(pointers) % bytes == 0) && ...);
}

// Blocks that the current device keeps resident at once (one full wave): grid-stride
// loops launched with more would only queue blocks that do the same work later.
inline int64_t resident_blocks(int threads_per_block = kThreadsPerBlock) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int per_sm = std::max(1, props->maxThreadsPerMultiProcessor / threads_per_block);
  return static_cast<int64_t>(props->multiProcessorCount) * per_sm;
}

// Blocks for a grid-stride loop over `items` work items, one per thread: enough to give
// every thread one item, at most one full wave.
inline int64_t blocks_for(int64_t items, int threads_per_block = kThreadsPerBlock) {
  return std::clamp<int64_t>(ceil_div(items, threads_per_block), 1,
                             resident_blocks(threads_per_block));
}

// Combines `value` over the threads of a block that share a column, in a fixed tree order,
// so the result does not depend on scheduling. The block is viewed as rows x columns
// threads (`rows` a power of two); every thread of the block must call this (it
// synchronizes), and every thread gets its column's result. `scratch` is shared memory
// for rows * columns values.
template <typename Acc, typename Combine>
__device__ Acc reduce_over_rows(Acc value, Acc* scratch, int row, int rows, int column,
                                int columns, Combine combine) {
  scratch[row * columns + column] = value;
  __syncthreads();
  for (int half = rows / 2; half > 0; half /= 2) {
    if (row < half) {
      scratch[row * columns + column] =
          combine(scratch[row * columns + column], scratch[(row + half) * columns + column]);
    }
    __syncthreads();
  }
  const Acc result = scratch[column];
  __syncthreads();  // the scratch may be reused right after
  return result;
}

struct Plus {
  template <typename Acc>
  __device__ Acc operator()(Acc a, Acc b) const {
    return a + b;
  }
};

template <typename Acc>
__device__ Acc sum_over_rows(Acc value, Acc* scratch, int row, int rows, int column,
                             int columns) {
  return reduce_over_rows(value, scratch, row, rows, column, columns, Plus{});
}

// out[i] = sum over p of parts[p * n + i], added in p order: the deterministic second
// stage of a reduction whose first stage wrote one row of partial sums per block/split.
template <typename T>
__global__ void sum_rows_in_order_kernel(const opmath_t<T>* parts, int64_t rows, int64_t n,
                                         T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  opmath_t<T> total = 0;
  for (int64_t row = 0; row < rows; ++row) total += parts[row * n + i];
  out[i] = static_cast<T>(total);
}

template <typename T>
void launch_sum_rows_in_order(const opmath_t<T>* parts, int64_t rows, int64_t n, T* out,
                              cudaStream_t stream) {
  sum_rows_in_order_kernel<T><<<ceil_div(n, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(
      parts, rows, n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace detail {

template <int N, typename T, typename Op, typename... In>
__device__ __forceinline__ Pack<T, N> map_pack(const Op& op, Pack<In, N>... in) {
  Pack<T, N> out;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    out.values[k] = static_cast<T>(op(static_cast<opmath_t<T>>(in.values[k])...));
  }
  return out;
}

// out[i] = op(in[i]...): pack p covers elements [p * N, p * N + N); the n % N elements
// after the last whole pack are done one by one. No __restrict__: in-place callers pass
// out == in.
template <int N, typename T, typename Op, typename... In>
__global__ void map_kernel(Op op, int64_t n, T* out, const In*... in) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / N;
  for (int64_t p = first; p < packs; p += stride) {
    store_pack(out, p, map_pack<N, T>(op, load_pack<N>(in, p)...));
  }
  for (int64_t i = packs * N + first; i < n; i += stride) {
    out[i] = static_cast<T>(op(static_cast<opmath_t<T>>(in[i])...));
  }
}

}  // namespace detail

// out[i] = op(in[i]...) for i in [0, n), all arrays of one dtype T, computed in
// opmath_t<T>. Uses 16-byte accesses when every pointer allows them (a tensor's data
// pointer may be offset into its storage), single elements otherwise.
template <typename T, typename Op, typename... In>
void launch_map(const Op& op, int64_t n, T* out, const In*... in) {
  static_assert((std::is_same_v<T, In> && ...), "inputs and output share one dtype");
  if (n <= 0) return;
  constexpr int kPack = pack_size<T>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (all_aligned(kAccessBytes, out, in...)) {
    detail::map_kernel<kPack><<<blocks_for(ceil_div(n, kPack)), kThreadsPerBlock, 0, stream>>>(
        op, n, out, in...);
  } else {
    detail::map_kernel<1><<<blocks_for(n), kThreadsPerBlock, 0, stream>>>(op, n, out, in...);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pyops::cuda
