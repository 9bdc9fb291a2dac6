// CUDA kernels of the convolution family. Each pass is an implicit GEMM (no im2col
// buffer: operand tiles are gathered straight into shared memory with conv.h's index
// math), with the bias + activation epilogue (activation.h's functors) applied as the
// output tile leaves registers; depthwise convolutions (one input channel per group) use
// a direct kernel instead. Accumulation is in opmath_t (float for half and bfloat16).
// float16 and bfloat16 GEMMs run on tensor cores (wmma, sm_80 and later): 16-bit
// operands, float accumulators, the same epilogue; float32 and float64 stay on the CUDA
// cores in their own precision (no TF32, unlike cuDNN's default for float32).
//
//   pass              GEMM per group g                 M           N                K
//   forward           out = W_g . im2col(x)            out / group  batch*out_plane  patch
//   backward input    gx = W_g^T . col2im-gather(gy)   in / group   batch*in_plane   (out/group)*kh*kw
//   backward weight   gw = gy . im2col(x)^T            out / group  patch            batch*out_plane
// The weight pass has a long K and a small M x N: it is split along K over grid.z into
// a workspace whose slices are then added in a fixed order (deterministic, no atomics).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>

#include "activation/activation.h"
#include "common/cuda_loops.cuh"
#include "conv/conv.h"

namespace pyops::conv {
namespace {

using activation::Activation;
using activation::visit_activation;
using at::Tensor;
using cuda::ceil_div;
using cuda::opmath_t;

#define PYOPS_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// Tile of the implicit GEMM: kTileM x kTileN outputs per block of 256 threads, each
// thread a 4 x 4 micro-tile; K advances kTileK at a time through shared memory.
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kMicro = 4;
constexpr int kGemmThreads = (kTileM / kMicro) * (kTileN / kMicro);

// ---- The three GEMM problems: operand gathers and output stores -------------------------

template <typename T, typename Fn>
struct ForwardProblem {
  ConvShape s;
  const T* input;
  const T* weight;
  const T* bias;
  T* output;
  Fn fn;
  using Element = T;
  using Acc = opmath_t<T>;
  __host__ __device__ int64_t m() const { return s.out_per_group(); }
  __host__ __device__ int64_t n() const { return s.batch * s.out_plane(); }
  __host__ __device__ int64_t k() const { return s.patch_size(); }
  __device__ Acc a(int64_t g, int64_t row, int64_t kk) const {
    return static_cast<Acc>(weight[(g * s.out_per_group() + row) * s.patch_size() + kk]);
  }
  __device__ Acc b(int64_t g, int64_t kk, int64_t col) const {
    const int64_t sample = col / s.out_plane();
    const T* plane = input + (sample * s.in_channels + g * s.in_per_group()) * s.in_plane();
    return static_cast<Acc>(im2col_value(plane, s, kk, col - sample * s.out_plane()));
  }
  __device__ void store(int64_t g, int64_t /*split*/, int64_t row, int64_t col, Acc acc) const {
    const int64_t oc = g * s.out_per_group() + row;
    const int64_t sample = col / s.out_plane();
    if (bias != nullptr) acc += static_cast<Acc>(bias[oc]);
    output[(sample * s.out_channels + oc) * s.out_plane() + (col - sample * s.out_plane())] =
        static_cast<T>(fn.forward(acc));
  }
};

// Input gradient, and with bias + activation the forward of conv_transpose2d.
template <typename T, typename Fn>
struct BackwardInputProblem {
  ConvShape s;
  const T* grad_output;
  const T* weight;
  const T* bias;
  T* grad_input;
  Fn fn;
  using Element = T;
  using Acc = opmath_t<T>;
  __host__ __device__ int64_t taps() const { return s.kernel_h * s.kernel_w; }
  __host__ __device__ int64_t m() const { return s.in_per_group(); }
  __host__ __device__ int64_t n() const { return s.batch * s.in_plane(); }
  __host__ __device__ int64_t k() const { return s.out_per_group() * taps(); }
  // kk = (oc in group, kh, kw); weight[g * out_pg + oc, row, kh, kw].
  __device__ Acc a(int64_t g, int64_t row, int64_t kk) const {
    const int64_t oc = kk / taps(), tap = kk - oc * taps();
    return static_cast<Acc>(
        weight[((g * s.out_per_group() + oc) * s.in_per_group() + row) * taps() + tap]);
  }
  // The output position that reads input position col through tap kk (col2im as a gather).
  __device__ Acc b(int64_t g, int64_t kk, int64_t col) const {
    const int64_t oc = kk / taps(), tap = kk - oc * taps();
    const int64_t kh = tap / s.kernel_w, kw = tap - kh * s.kernel_w;
    const int64_t sample = col / s.in_plane(), pos = col - sample * s.in_plane();
    const int64_t ih = pos / s.in_w, iw = pos - ih * s.in_w;
    const int64_t oh = output_coord(ih, kh, s.stride_h, s.pad_h, s.dilation_h, s.out_h);
    const int64_t ow = output_coord(iw, kw, s.stride_w, s.pad_w, s.dilation_w, s.out_w);
    if (oh < 0 || ow < 0) return Acc(0);
    return static_cast<Acc>(
        grad_output[((sample * s.out_channels + g * s.out_per_group() + oc) * s.out_h + oh) *
                        s.out_w + ow]);
  }
  __device__ void store(int64_t g, int64_t /*split*/, int64_t row, int64_t col, Acc acc) const {
    const int64_t ic = g * s.in_per_group() + row;
    const int64_t sample = col / s.in_plane();
    if (bias != nullptr) acc += static_cast<Acc>(bias[ic]);
    grad_input[(sample * s.in_channels + ic) * s.in_plane() + (col - sample * s.in_plane())] =
        static_cast<T>(fn.forward(acc));
  }
};

// Weight gradient; stores K-split partial sums into workspace[split][out_channels][patch].
template <typename T>
struct BackwardWeightProblem {
  ConvShape s;
  const T* input;
  const T* grad_output;
  opmath_t<T>* workspace;
  using Element = T;
  using Acc = opmath_t<T>;
  __host__ __device__ int64_t m() const { return s.out_per_group(); }
  __host__ __device__ int64_t n() const { return s.patch_size(); }
  __host__ __device__ int64_t k() const { return s.batch * s.out_plane(); }
  __device__ Acc a(int64_t g, int64_t row, int64_t kk) const {
    const int64_t sample = kk / s.out_plane();
    return static_cast<Acc>(
        grad_output[(sample * s.out_channels + g * s.out_per_group() + row) * s.out_plane() +
                    (kk - sample * s.out_plane())]);
  }
  __device__ Acc b(int64_t g, int64_t kk, int64_t col) const {
    const int64_t sample = kk / s.out_plane();
    const T* plane = input + (sample * s.in_channels + g * s.in_per_group()) * s.in_plane();
    return static_cast<Acc>(im2col_value(plane, s, col, kk - sample * s.out_plane()));
  }
  __device__ void store(int64_t g, int64_t split, int64_t row, int64_t col, Acc acc) const {
    workspace[(split * s.out_channels + g * s.out_per_group() + row) * s.patch_size() + col] = acc;
  }
};

// What one block of either GEMM kernel computes: the tile_m x tile_n outputs from
// (row0, col0) of group g, summed over [k_begin, k_end), K split `split` of `splits`.
// grid: x over N tiles, y over M tiles, z over (group, K split).
struct BlockWork {
  int64_t g, split, row0, col0, k_begin, k_end;
};

__device__ inline BlockWork block_work(int64_t k, int64_t splits, int64_t k_per_split,
                                       int tile_m, int tile_n) {
  BlockWork w;
  w.g = blockIdx.z / splits;
  w.split = blockIdx.z - w.g * splits;
  w.row0 = static_cast<int64_t>(blockIdx.y) * tile_m;
  w.col0 = static_cast<int64_t>(blockIdx.x) * tile_n;
  w.k_begin = w.split * k_per_split;
  w.k_end = w.k_begin + k_per_split < k ? w.k_begin + k_per_split : k;
  return w;
}

template <typename Problem>
__global__ void __launch_bounds__(kGemmThreads)
    implicit_gemm_kernel(Problem p, int64_t splits, int64_t k_per_split) {
  using Acc = typename Problem::Acc;
  __shared__ Acc a_tile[kTileK][kTileM];
  __shared__ Acc b_tile[kTileK][kTileN];
  const int64_t M = p.m(), N = p.n();
  const auto [g, split, row0, col0, k_begin, k_end] =
      block_work(p.k(), splits, k_per_split, kTileM, kTileN);
  const int tid = threadIdx.x;
  const int thread_row = (tid / (kTileN / kMicro)) * kMicro;
  const int thread_col = (tid % (kTileN / kMicro)) * kMicro;
  Acc acc[kMicro][kMicro] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    // Each thread gathers kTileK * kTileM / kGemmThreads elements of each operand; zero
    // outside the matrices.
    for (int e = tid; e < kTileK * kTileM; e += kGemmThreads) {
      const int kk = e / kTileM, r = e - kk * kTileM;
      const int64_t row = row0 + r, k = k0 + kk;
      a_tile[kk][r] = (row < M && k < k_end) ? p.a(g, row, k) : Acc(0);
    }
    for (int e = tid; e < kTileK * kTileN; e += kGemmThreads) {
      const int kk = e / kTileN, c = e - kk * kTileN;
      const int64_t col = col0 + c, k = k0 + kk;
      b_tile[kk][c] = (col < N && k < k_end) ? p.b(g, k, col) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      Acc a_frag[kMicro], b_frag[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a_frag[i] = a_tile[kk][thread_row + i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) b_frag[j] = b_tile[kk][thread_col + j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += a_frag[i] * b_frag[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t row = row0 + thread_row + i, col = col0 + thread_col + j;
      if (row < M && col < N) p.store(g, split, row, col, acc[i][j]);
    }
  }
}

// ---- Tensor cores: float16 and bfloat16 ---------------------------------------------------

// Tile of the tensor-core GEMM: kMmaTileM x kMmaTileN outputs per block of 4 warps in a
// 2 x 2 grid, each warp 32 x 32 outputs as 2 x 2 wmma fragments of 16 x 16 x 16; K
// advances kMmaTileK at a time. The operands are gathered as for the CUDA-core kernel,
// stored in shared memory as 16-bit values (the gathers read 16-bit values, so nothing is
// rounded), and the float accumulators go through shared memory to the problem's
// epilogue, which then writes consecutive columns from consecutive threads.
constexpr int kMmaTileM = 64, kMmaTileN = 64, kMmaTileK = 32;
constexpr int kMmaThreads = 4 * 32;
// The first virtual architecture with bfloat16 wmma (float16's is sm_70; one bar for both).
constexpr int kMmaMinArch = 80;

template <typename T>
struct WmmaElement;  // the CUDA type wmma takes for a 16-bit T (same bits)
template <>
struct WmmaElement<at::Half> {
  using type = __half;
};
template <>
struct WmmaElement<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
constexpr bool kHasTensorCorePath =
    std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// As implicit_gemm_kernel, with the tensor-core tile (grid: block_work's).
template <typename Problem>
__global__ void __launch_bounds__(kMmaThreads)
    implicit_gemm_mma_kernel(Problem p, int64_t splits, int64_t k_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // kMmaMinArch
  namespace wmma = nvcuda::wmma;
  using T = typename Problem::Element;
  using W = typename WmmaElement<T>::type;
  static_assert(sizeof(T) == sizeof(W));
  // Shared rows padded against bank conflicts. wmma wants leading dimensions that are
  // multiples of 16 bytes and fragment pointers 32-byte aligned: each fragment starts at
  // a row that is a multiple of 16 and a column that is a multiple of 16 elements.
  constexpr int kAPitch = kMmaTileK + 8;  // a_tile[m][k], 16-bit
  constexpr int kBPitch = kMmaTileN + 8;  // b_tile[k][n], 16-bit
  constexpr int kCPitch = kMmaTileN + 4;  // c_tile[m][n], float
  constexpr int kFragment = 16;           // wmma's 16 x 16 x 16 shape
  __shared__ __align__(32) T a_tile[kMmaTileM * kAPitch];
  __shared__ __align__(32) T b_tile[kMmaTileK * kBPitch];
  __shared__ __align__(32) float c_tile[kMmaTileM * kCPitch];
  const int64_t M = p.m(), N = p.n();
  const auto [g, split, row0, col0, k_begin, k_end] =
      block_work(p.k(), splits, k_per_split, kMmaTileM, kMmaTileN);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int warp_row = (warp / 2) * 32, warp_col = (warp % 2) * 32;

  wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMmaTileK) {
    // k fastest for A (a weight row is contiguous in k), n fastest for B (output
    // positions); zero outside the matrices.
    for (int e = tid; e < kMmaTileM * kMmaTileK; e += kMmaThreads) {
      const int r = e / kMmaTileK, kk = e - r * kMmaTileK;
      const int64_t row = row0 + r, k = k0 + kk;
      a_tile[r * kAPitch + kk] = (row < M && k < k_end) ? static_cast<T>(p.a(g, row, k)) : T(0);
    }
    for (int e = tid; e < kMmaTileK * kMmaTileN; e += kMmaThreads) {
      const int kk = e / kMmaTileN, c = e - kk * kMmaTileN;
      const int64_t col = col0 + c, k = k0 + kk;
      b_tile[kk * kBPitch + c] = (col < N && k < k_end) ? static_cast<T>(p.b(g, k, col)) : T(0);
    }
    __syncthreads();
    const W* a_shared = reinterpret_cast<const W*>(a_tile);
    const W* b_shared = reinterpret_cast<const W*>(b_tile);
#pragma unroll
    for (int kk = 0; kk < kMmaTileK; kk += kFragment) {
      wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, W, wmma::row_major> a_frag[2];
      wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, W, wmma::row_major> b_frag[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a_frag[i], a_shared + (warp_row + i * kFragment) * kAPitch + kk,
                               kAPitch);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(b_frag[j], b_shared + kk * kBPitch + warp_col + j * kFragment,
                               kBPitch);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(
          c_tile + (warp_row + i * kFragment) * kCPitch + warp_col + j * kFragment, acc[i][j],
          kCPitch, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int e = tid; e < kMmaTileM * kMmaTileN; e += kMmaThreads) {
    const int r = e / kMmaTileN, c = e - r * kMmaTileN;
    const int64_t row = row0 + r, col = col0 + c;
    if (row < M && col < N) p.store(g, split, row, col, c_tile[r * kCPitch + c]);
  }
#else
  __trap();  // never launched: compiled_for_tensor_cores() checks the architecture
#endif
}

// Whether the code the current device runs for `kernel` was compiled for an
// architecture with the wmma types used: a binary built only for older archs and
// JIT-compiled from their PTX has the kernel's empty body. Asked once per device.
template <typename Kernel>
bool compiled_for_tensor_cores(Kernel* kernel) {
  static std::array<std::atomic<int8_t>, C10_COMPILE_TIME_MAX_GPUS> known{};  // 0: not asked
  const c10::DeviceIndex device = c10::cuda::current_device();
  int8_t answer = known[device].load(std::memory_order_relaxed);
  if (answer == 0) {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    answer = attributes.ptxVersion >= kMmaMinArch ? 1 : 2;
    known[device].store(answer, std::memory_order_relaxed);
  }
  return answer == 1;
}

// ---- Launch ------------------------------------------------------------------------------

// The kernel a problem runs with, and its tile: tensor cores for float16 and bfloat16
// where the device and the compiled code have them, CUDA cores otherwise.
struct GemmTiling {
  bool tensor_cores;
  int tile_m, tile_n, tile_k, threads;
};

template <typename Problem>
GemmTiling gemm_tiling() {
  if constexpr (kHasTensorCorePath<typename Problem::Element>) {
    if (at::cuda::getCurrentDeviceProperties()->major * 10 >= kMmaMinArch &&
        compiled_for_tensor_cores(implicit_gemm_mma_kernel<Problem>)) {
      return {true, kMmaTileM, kMmaTileN, kMmaTileK, kMmaThreads};
    }
  }
  return {false, kTileM, kTileN, kTileK, kGemmThreads};
}

template <typename Problem>
void launch_implicit_gemm(const Problem& p, const GemmTiling& tiling, int64_t groups,
                          int64_t splits) {
  const int64_t k_per_split = ceil_div(ceil_div(p.k(), splits), tiling.tile_k) * tiling.tile_k;
  const dim3 grid(ceil_div(p.n(), tiling.tile_n), ceil_div(p.m(), tiling.tile_m),
                  groups * splits);
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "pyops.conv2d (CUDA): too many ",
              grid.y > 65535 ? "output channels per group" : "groups", " for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if constexpr (kHasTensorCorePath<typename Problem::Element>) {
    if (tiling.tensor_cores) {
      implicit_gemm_mma_kernel<<<grid, kMmaThreads, 0, stream>>>(p, splits, k_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  implicit_gemm_kernel<<<grid, kGemmThreads, 0, stream>>>(p, splits, k_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Problem>
void launch_implicit_gemm(const Problem& p, int64_t groups) {
  launch_implicit_gemm(p, gemm_tiling<Problem>(), groups, 1);
}

// ---- Depthwise (one input channel per group): one thread per output element --------------

template <typename T, typename Fn>
__global__ void depthwise_forward_kernel(ConvShape s, const T* input, const T* weight,
                                         const T* bias, T* output, Fn fn) {
  using Acc = opmath_t<T>;
  const int64_t total = s.batch * s.out_channels * s.out_plane();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t ow = e % s.out_w, oh = (e / s.out_w) % s.out_h;
    const int64_t oc = (e / s.out_plane()) % s.out_channels, sample = e / (s.out_plane() * s.out_channels);
    const int64_t ic = oc / s.out_per_group();
    const T* plane = input + (sample * s.in_channels + ic) * s.in_plane();
    const T* w = weight + oc * s.kernel_h * s.kernel_w;
    Acc acc = bias != nullptr ? static_cast<Acc>(bias[oc]) : Acc(0);
    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
      const int64_t ih = input_coord(oh, kh, s.stride_h, s.pad_h, s.dilation_h);
      if (ih < 0 || ih >= s.in_h) continue;
      for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
        const int64_t iw = input_coord(ow, kw, s.stride_w, s.pad_w, s.dilation_w);
        if (iw < 0 || iw >= s.in_w) continue;
        acc += static_cast<Acc>(w[kh * s.kernel_w + kw]) * static_cast<Acc>(plane[ih * s.in_w + iw]);
      }
    }
    output[e] = static_cast<T>(fn.forward(acc));
  }
}

template <typename T, typename Fn>
__global__ void depthwise_backward_input_kernel(ConvShape s, const T* grad_output,
                                                const T* weight, const T* bias, T* grad_input,
                                                Fn fn) {
  using Acc = opmath_t<T>;
  const int64_t total = s.batch * s.in_channels * s.in_plane();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t iw = e % s.in_w, ih = (e / s.in_w) % s.in_h;
    const int64_t ic = (e / s.in_plane()) % s.in_channels, sample = e / (s.in_plane() * s.in_channels);
    Acc acc = bias != nullptr ? static_cast<Acc>(bias[ic]) : Acc(0);
    for (int64_t o = 0; o < s.out_per_group(); ++o) {
      const int64_t oc = ic * s.out_per_group() + o;
      const T* grad = grad_output + (sample * s.out_channels + oc) * s.out_plane();
      const T* w = weight + oc * s.kernel_h * s.kernel_w;
      for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
        const int64_t oh = output_coord(ih, kh, s.stride_h, s.pad_h, s.dilation_h, s.out_h);
        if (oh < 0) continue;
        for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
          const int64_t ow = output_coord(iw, kw, s.stride_w, s.pad_w, s.dilation_w, s.out_w);
          if (ow < 0) continue;
          acc += static_cast<Acc>(w[kh * s.kernel_w + kw]) * static_cast<Acc>(grad[oh * s.out_w + ow]);
        }
      }
    }
    grad_input[e] = static_cast<T>(fn.forward(acc));
  }
}

bool is_depthwise(const ConvShape& s) { return s.in_per_group() == 1; }

// ---- Entry points -------------------------------------------------------------------------

void forward(const ConvShape& s, const Tensor& input, const Tensor& weight, const Tensor& bias,
             Activation act, double slope, const Tensor& output) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_conv2d_forward_cuda", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    visit_activation<opmath_t<scalar_t>>(act, slope, [&](auto fn) {
      if (is_depthwise(s)) {
        const int64_t total = s.batch * s.out_channels * s.out_plane();
        depthwise_forward_kernel<<<cuda::blocks_for(total), cuda::kThreadsPerBlock, 0,
                                   at::cuda::getCurrentCUDAStream()>>>(
            s, input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
            output.data_ptr<scalar_t>(), fn);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      ForwardProblem<scalar_t, decltype(fn)> p{s, input.const_data_ptr<scalar_t>(),
                                               weight.const_data_ptr<scalar_t>(), b,
                                               output.data_ptr<scalar_t>(), fn};
      launch_implicit_gemm(p, s.groups);
    });
  });
}

void backward_input(const ConvShape& s, const Tensor& grad_output, const Tensor& weight,
                    const Tensor& bias, Activation act, double slope, const Tensor& grad_input) {
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  PYOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "pyops_conv2d_backward_input_cuda", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    visit_activation<opmath_t<scalar_t>>(act, slope, [&](auto fn) {
      if (is_depthwise(s)) {
        const int64_t total = s.batch * s.in_channels * s.in_plane();
        depthwise_backward_input_kernel<<<cuda::blocks_for(total), cuda::kThreadsPerBlock, 0,
                                          at::cuda::getCurrentCUDAStream()>>>(
            s, grad_output.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
            grad_input.data_ptr<scalar_t>(), fn);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      BackwardInputProblem<scalar_t, decltype(fn)> p{s, grad_output.const_data_ptr<scalar_t>(),
                                                     weight.const_data_ptr<scalar_t>(), b,
                                                     grad_input.data_ptr<scalar_t>(), fn};
      launch_implicit_gemm(p, s.groups);
    });
  });
}

void backward_weight(const ConvShape& s, const Tensor& input, const Tensor& grad_output,
                     const Tensor& grad_weight) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_conv2d_backward_weight_cuda", [&] {
    using Acc = opmath_t<scalar_t>;
    BackwardWeightProblem<scalar_t> p{s, input.const_data_ptr<scalar_t>(),
                                      grad_output.const_data_ptr<scalar_t>(), nullptr};
    // Enough K splits for about one wave of blocks, each split at least a few tiles long
    // (a wave counted by threads: the tensor-core kernel's registers may allow fewer).
    const GemmTiling tiling = gemm_tiling<decltype(p)>();
    const int64_t blocks =
        ceil_div(p.n(), tiling.tile_n) * ceil_div(p.m(), tiling.tile_m) * s.groups;
    const int64_t splits = std::clamp<int64_t>(
        std::min(ceil_div(cuda::resident_blocks(tiling.threads), blocks),
                 ceil_div(p.k(), 8 * tiling.tile_k)),
        1, std::max<int64_t>(1, 65535 / s.groups));
    Tensor workspace = at::empty({splits, s.out_channels, s.patch_size()},
                                 input.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    p.workspace = workspace.mutable_data_ptr<Acc>();
    launch_implicit_gemm(p, tiling, s.groups, splits);
    const int64_t n = s.out_channels * s.patch_size();
    // grad_weight = the splits' partial sums, added in split order.
    cuda::launch_sum_rows_in_order(p.workspace, splits, n, grad_weight.data_ptr<scalar_t>(),
                                   at::cuda::getCurrentCUDAStream());
  });
}

}  // namespace

PYOPS_REGISTER_CUDA_KERNEL(forward_kernel, &forward);
PYOPS_REGISTER_CUDA_KERNEL(backward_input_kernel, &backward_input);
PYOPS_REGISTER_CUDA_KERNEL(backward_weight_kernel, &backward_weight);

}  // namespace pyops::conv
