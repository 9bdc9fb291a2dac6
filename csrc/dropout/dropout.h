#pragma once
// The dropout family's math, written once for both backends: a counter-based random
// generator (Philox4x32-10: Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC'11) and the keep/scale rule. Element i draws lane i % 4 of the block
// philox(key, offset + i / 4), so a mask depends only on (key, offset, i): the same on
// any thread count, and the CPU and CUDA kernels compute the same mask for one key.

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/dispatch.h"
#include "common/isa.h"

namespace pyops::dropout {
inline namespace PYOPS_ISA_NAMESPACE {

struct Philox4x32 {
  static constexpr uint32_t kMul0 = 0xD2511F53u;
  static constexpr uint32_t kMul1 = 0xCD9E8D57u;
  static constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // key increments between rounds
  static constexpr uint32_t kWeyl1 = 0xBB67AE85u;
  static constexpr int kRounds = 10;

  // One Philox round on the counter words under the round's key words.
  C10_HOST_DEVICE C10_ALWAYS_INLINE static void round(uint32_t& x0, uint32_t& x1, uint32_t& x2, uint32_t& x3,
                                    uint32_t k0, uint32_t k1) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * x0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * x2;
    const uint32_t y0 = static_cast<uint32_t>(p1 >> 32) ^ x1 ^ k0;
    const uint32_t y2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ k1;
    x1 = static_cast<uint32_t>(p1);
    x3 = static_cast<uint32_t>(p0);
    x0 = y0;
    x2 = y2;
  }

  // Four 32-bit random numbers for one 64-bit counter under one 64-bit key.
  C10_HOST_DEVICE static void block(uint64_t counter, uint64_t key, uint32_t out[4]) {
    uint32_t x0 = static_cast<uint32_t>(counter), x1 = static_cast<uint32_t>(counter >> 32);
    uint32_t x2 = 0, x3 = 0;
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      round(x0, x1, x2, x3, k0, k1);
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    out[0] = x0;
    out[1] = x1;
    out[2] = x2;
    out[3] = x3;
  }

  // block() for the kWidth counters first, first + 1, ...: out[4 * i + lane] is lane
  // `lane` of block first + i, i.e. the draws of kWidth * 4 consecutive elements. The
  // lanes are independent, so the compiler runs the rounds on SIMD registers (CPU; the
  // round must be inlined into the `omp simd` loop for that).
  template <int kWidth>
  static void blocks(uint64_t first, uint64_t key, uint32_t out[4 * kWidth]) {
    uint32_t x0[kWidth], x1[kWidth], x2[kWidth], x3[kWidth];
    for (int i = 0; i < kWidth; ++i) {
      x0[i] = static_cast<uint32_t>(first + i);
      x1[i] = static_cast<uint32_t>((first + i) >> 32);
      x2[i] = 0;
      x3[i] = 0;
    }
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int r = 0; r < kRounds; ++r) {
#pragma omp simd
      for (int i = 0; i < kWidth; ++i) round(x0[i], x1[i], x2[i], x3[i], k0, k1);
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    for (int i = 0; i < kWidth; ++i) {
      out[4 * i] = x0[i];
      out[4 * i + 1] = x1[i];
      out[4 * i + 2] = x2[i];
      out[4 * i + 3] = x3[i];
    }
  }
};

// An element is dropped when its 32-bit draw is below `threshold` = p * 2^32, so
// P(dropped) = p (to 2^-32); kept values are scaled by 1 / (1 - p), as torch does.
template <typename Acc>
struct DropoutRule {
  uint64_t threshold;
  Acc scale;  // 0 when p == 1: everything dropped (NaN and inf inputs give NaN, as in torch)

  static DropoutRule make(double p) {
    const double scaled = p * 4294967296.0;
    return {static_cast<uint64_t>(scaled),
            p >= 1.0 ? Acc(0) : Acc(1) / static_cast<Acc>(1.0 - p)};
  }
  C10_HOST_DEVICE bool keep(uint32_t draw) const { return draw >= threshold; }
  // x * mask * scale, multiplying like torch (a dropped NaN stays NaN). Arithmetic, not a
  // select: compilers turn `kept ? scale : 0` into a branch that a random mask mispredicts
  // half the time.
  C10_HOST_DEVICE Acc apply(Acc x, bool kept) const { return x * (static_cast<Acc>(kept) * scale); }
};

}  // namespace PYOPS_ISA_NAMESPACE

// ---- Kernel entry points ------------------------------------------------------------
// Tensors are non-empty, dense with identical strides; `mask` is bool.

// output = dropout(input), mask = kept; the kernel draws its key from the device's
// default torch generator (torch.manual_seed makes runs reproducible).
using DropoutForwardFn = void (*)(const at::Tensor& input, double p, const at::Tensor& output,
                                  const at::Tensor& mask);
// grad_input = grad_output * mask * scale
using DropoutBackwardFn = void (*)(const at::Tensor& grad_output, const at::Tensor& mask,
                                   double p, const at::Tensor& grad_input);

extern DispatchTable<DropoutForwardFn> forward_kernel;
extern DispatchTable<DropoutBackwardFn> backward_kernel;

}  // namespace pyops::dropout
