// CPU kernels of the convolution family, compiled once per CPU capability (setup.py).
// Paths, chosen per shape and dtype (choose_path, correlation_path below; the "conv"
// bullet of docs/ARCHITECTURE.md):
//   - direct: stride-1 convolutions where a group has few input or few output channels
//     (depthwise; float32 forward passes only when they write few channels). The input
//     planes of a group are staged zero-padded with row pitch Wp; the output is computed
//     "wide" (Wp columns per row, the extra columns discarded), which turns the 2-D
//     correlation into flat 1-D loops over contiguous memory that vectorize fully
//     whatever the image width.
//   - float32, 3x3 stride 1 with enough channels per group (use_winograd): Winograd
//     F(2x2, 3x3), 16 GEMMs over transformed tiles (2.25x fewer multiplies; every pass).
//   - float32 otherwise: an implicit GEMM over the same wide rows (in tiles of output pixels x
//     channels when a group writes whole 64-channel tiles with AVX-512); stride 2 reads
//     the input as phase planes (DirectPlan), which makes every tap a shifted plane
//     again. A stride-2 input gradient is one stride-1 correlation per phase of the
//     input, where that pays (input_grad_by_phases). Otherwise im2col in column tiles
//     (col2im for the input gradient); all on pyops' register-tile GEMM (common/cpu_gemm.h).
//   - other dtypes: im2col + ATen's GEMM (the BLAS torch links), per sample and group.
// All apply bias + activation (activation.h's functors) to each output tile or plane
// right after computing it, while it is in registers or cache.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/cpu_loops.h"
#include "conv/conv.h"

namespace pyops::conv {
inline namespace CPU_CAPABILITY {
namespace {

using activation::Activation;
using activation::visit_activation;
using at::Tensor;
using at::vec::Vectorized;
using cpu::map_range;
using cpu::opmath_t;
namespace gemm = cpu::gemm;

#define PYOPS_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Splits `work` items into chunks so that tasks * chunks gives every thread a few tasks.
int64_t chunks_for(int64_t tasks, int64_t work) {
  const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  return std::clamp<int64_t>(ceil_div(wanted, std::max<int64_t>(tasks, 1)), 1,
                             std::max<int64_t>(work, 1));
}

// The direct path pays per input channel and output channel pair what GEMM amortizes;
// it wins when a group has few of either (and needs stride 1 for its flat loops).
constexpr int64_t kDirectMaxChannels = 4;
bool use_direct(int64_t in_per_group, int64_t out_per_group, int64_t stride_h, int64_t stride_w) {
  return stride_h == 1 && stride_w == 1 &&
         std::min(in_per_group, out_per_group) <= kDirectMaxChannels;
}

// ---- Epilogue ------------------------------------------------------------------------

// out[i] = act(out[i] + bias) in place.
template <typename T, typename Fn>
void finish_row_inplace(const Fn& fn, bool has_bias, opmath_t<T> bias, T* out, int64_t n) {
  if (has_bias) {
    map_range([fn, bias](auto x) { using V = decltype(x); return fn.forward(x + V(bias)); }, n,
              out, out);
  } else {
    map_range([fn](auto x) { return fn.forward(x); }, n, out, out);
  }
}

// ---- Direct path ---------------------------------------------------------------------

// A correlation of source planes (src_h x src_w) padded by pad_top/pad_left (negative:
// cropped) into out_h x out_w outputs; stride 1 unless the plan says otherwise (only the
// implicit GEMM below takes other strides).
//
// A strided plan stages each source plane as stride_h x stride_w phase planes, phase
// (a, b) holding the padded source's rows a, a + stride_h, ... and columns b, b + stride_w,
// ...: tap (kh, kw) of output (oh, ow) reads padded source element (stride_h * oh + kh *
// dilation_h, ...), which is phase ((kh * dilation_h) % stride_h, ...) at row oh +
// (kh * dilation_h) / stride_h, column ow + (kw * dilation_w) / stride_w. So every tap is
// again one phase plane shifted by a constant, as with stride 1, and the wide-row
// machinery runs unchanged, with no im2col matrix.
struct DirectPlan {
  int64_t src_h, src_w, pad_top, pad_left, out_h, out_w, kernel_h, kernel_w, dilation_h,
      dilation_w;
  int64_t stride_h = 1, stride_w = 1;
  int64_t phases() const { return stride_h * stride_w; }
  int64_t staged_h() const { return out_h + (kernel_h - 1) * dilation_h / stride_h; }
  int64_t staged_w() const { return out_w + (kernel_w - 1) * dilation_w / stride_w; }
  int64_t phase_size() const { return staged_h() * staged_w(); }
  // Wide outputs: (out_h - 1) full rows of pitch staged_w, then out_w columns. With every
  // tap's offset added, the last index read is the last of its phase plane.
  int64_t wide_len() const { return (out_h - 1) * staged_w() + out_w; }
};

// A staged plane (all its phases) is padded to a whole number of vectors past its end,
// so loops over wide outputs rounded up to whole vectors stay in bounds.
template <typename Acc>
int64_t staged_stride(const DirectPlan& p) {
  return p.phases() * p.phase_size() + Vectorized<Acc>::size();
}

// dst[i] = src[i] for i < n, converted to Acc. Rows here are short (a 28-pixel image):
// whole vectors and one masked tail beat a memmove call per row.
template <typename T, typename Acc>
void copy_row(const T* src, int64_t n, Acc* dst) {
  if constexpr (std::is_same_v<T, Acc>) {
    using Vec = Vectorized<Acc>;
    constexpr int64_t kV = Vec::size();
    int64_t i = 0;
    for (; i + kV <= n; i += kV) Vec::loadu(src + i).store(dst + i);
    if (i < n) Vec::loadu(src + i, n - i).store(dst + i, n - i);
  } else {
    std::copy(src, src + n, dst);
  }
}

// dst[j] = src[2 j] for j in [0, n): two loads and a deinterleave per vector. The loads
// stop at src[2 n - 2], the last element read (the row may end there).
template <typename T>
void copy_even(const T* src, T* dst, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t kLanes = Vec::size();
  int64_t j = 0;
  for (; j + kLanes < n; j += kLanes) {  // reads up to src[2 j + 2 kLanes - 1] <= src[2 n - 3]
    at::vec::deinterleave2(Vec::loadu(src + 2 * j), Vec::loadu(src + 2 * j + kLanes))
        .first.store(dst + j);
  }
  const int64_t tail = n - j, needed = 2 * tail - 1;  // src[2 j .. 2 n - 2]
  if (tail <= 0) return;
  const Vec low = Vec::loadu(src + 2 * j, std::min(kLanes, needed));
  const Vec high = needed > kLanes ? Vec::loadu(src + 2 * j + kLanes, needed - kLanes) : Vec(T(0));
  at::vec::deinterleave2(low, high).first.store(dst + j, tail);
}

// dst[r * pitch + c] = src[r * cols + c] for r < rows, c < cols; zero elsewhere in
// [0, total). One write per element: staging is as costly as a few taps otherwise.
template <typename T, typename Acc>
void copy_rows(const T* src, int64_t rows, int64_t cols, int64_t pitch, int64_t left, Acc* dst,
               int64_t total) {
  Acc* out = dst;
  for (int64_t r = 0; r < rows; ++r) {
    Acc* row = dst + r * pitch + left;
    std::fill(out, row, Acc(0));
    copy_row(src + r * cols, cols, row);
    out = row + cols;
  }
  std::fill(out, dst + total, Acc(0));
}

// dst[j] = src[step * j] for j in [0, n), converted to C: whole vectors for step 1
// (copy_row) and, without a conversion, for step 2 (copy_even); element by element
// otherwise.
template <typename T, typename C>
void gather_columns(const T* src, int64_t step, C* dst, int64_t n) {
  if (step == 1) return copy_row(src, n, dst);
  if constexpr (std::is_same_v<T, C>) {
    if (step == 2) return copy_even(src, dst, n);
  }
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<C>(src[step * j]);
}

// Smallest j >= 0 with step * j + first >= bound (step > 0; first, bound of any sign).
int64_t first_index_reaching(int64_t bound, int64_t first, int64_t step) {
  const int64_t gap = bound - first;
  return gap <= 0 ? 0 : ceil_div(gap, step);
}

// Stages one source plane as the plan's phase planes (one for stride 1), one after
// another, then zero slack: each staged element written once.
template <typename T, typename Acc>
void stage_plane(const T* src, const DirectPlan& p, Acc* dst) {
  const int64_t hp = p.staged_h(), wp = p.staged_w();
  for (int64_t a = 0; a < p.stride_h; ++a) {
    for (int64_t b = 0; b < p.stride_w; ++b) {
      Acc* phase = dst + (a * p.stride_w + b) * p.phase_size();
      // Staged column j reads source column stride_w * j + b - pad_left (pads may be
      // negative: cropped).
      const int64_t x_first = b - p.pad_left;
      const int64_t j0 = std::min(wp, first_index_reaching(0, x_first, p.stride_w));
      const int64_t j1 = std::clamp(first_index_reaching(p.src_w, x_first, p.stride_w), j0, wp);
      for (int64_t i = 0; i < hp; ++i) {
        Acc* row = phase + i * wp;
        const int64_t y = p.stride_h * i + a - p.pad_top;
        if (y < 0 || y >= p.src_h || j0 == j1) {
          std::fill(row, row + wp, Acc(0));
          continue;
        }
        std::fill(row, row + j0, Acc(0));
        gather_columns(src + y * p.src_w + p.stride_w * j0 + x_first, p.stride_w, row + j0,
                       j1 - j0);
        std::fill(row + j1, row + wp, Acc(0));
      }
    }
  }
  std::fill(dst + p.phases() * p.phase_size(), dst + staged_stride<Acc>(p), Acc(0));
}

// stage_plane for `count` consecutive planes of src (plane_size elements apart), each
// into its own staged_stride<Acc>(p) slot of dst.
template <typename T, typename Acc>
void stage_planes(const T* src, int64_t count, int64_t plane_size, const DirectPlan& p, Acc* dst) {
  const int64_t stride = staged_stride<Acc>(p);
  for (int64_t i = 0; i < count; ++i) stage_plane(src + i * plane_size, p, dst + i * stride);
}

// Where the vectors of wide outputs go in an output plane (out_h x out_w). Vector v holds
// wide columns [v * kV, (v + 1) * kV) (row pitch staged_w, of which the first out_w
// columns are real outputs); it is cut into runs that each lie in one output row, so a
// vector that crosses a row end is written with one masked store per row it touches,
// skipping the discarded columns, with no scalar copy. The runs depend on the plan only:
// they are worked out once per call and serve every plane and sample.
template <typename Acc>
class WideStores {
  struct Run {
    int64_t lane0;   // output index of lane 0 (lane l of the run goes to lane0 + l)
    int32_t lo, hi;  // lanes [lo, hi)
    uint32_t mask;   // bits [lo, hi)
  };

 public:
  using Vec = Vectorized<Acc>;

  explicit WideStores(const DirectPlan& p) {
    constexpr int64_t kV = Vec::size();
    const int64_t pitch = p.staged_w(), vectors = ceil_div(p.wide_len(), kV);
    first_run_.reserve(vectors + 1);
    for (int64_t v = 0; v < vectors; ++v) {
      first_run_.push_back(static_cast<int64_t>(runs_.size()));
      int64_t row = v * kV / pitch;
      // Lane l of the row that starts at lane `start` is output column l - start.
      for (int64_t start = -(v * kV % pitch); start < kV && row < p.out_h;
           start += pitch, ++row) {
        const int64_t lo = std::max<int64_t>(start, 0), hi = std::min(kV, start + p.out_w);
        if (lo < hi) {
          const uint32_t mask = ((uint32_t{1} << hi) - 1) & ~((uint32_t{1} << lo) - 1);
          runs_.push_back(Run{row * p.out_w - start, static_cast<int32_t>(lo),
                              static_cast<int32_t>(hi), mask});
        }
      }
    }
    first_run_.push_back(static_cast<int64_t>(runs_.size()));
  }

  // The runs as plain pointers, for a caller's locals: stores through an Acc* may alias
  // the members of this object (as far as the compiler knows), so a store() on the object
  // itself would reload them after every write.
  struct View {
    const Run* runs;
    const int64_t* first_run;

    // Writes the real outputs of wide vector v to `plane`.
    void store(int64_t v, const Vec& value, Acc* plane) const {
      for (const Run* run = runs + first_run[v]; run != runs + first_run[v + 1]; ++run) {
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<Acc, float> || std::is_same_v<Acc, double>) {
          // One masked store at lane 0's address, in integer arithmetic: it may lie before
          // the output. Masked-off lanes are neither written nor checked for faults.
          void* lane0 = reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(plane) +
                                                run->lane0 * static_cast<int64_t>(sizeof(Acc)));
          if constexpr (std::is_same_v<Acc, float>) {
            _mm512_mask_storeu_ps(lane0, static_cast<__mmask16>(run->mask), value);
          } else {
            _mm512_mask_storeu_pd(lane0, static_cast<__mmask8>(run->mask), value);
          }
          continue;
        }
#endif
        Acc* dst = plane + run->lane0 + run->lo;  // where lane lo goes
        if (run->lo == 0) {
          value.store(dst, static_cast<int>(run->hi));
        } else {
          Acc all[Vec::size()];
          value.store(all);
          std::copy(all + run->lo, all + run->hi, dst);
        }
      }
    }
  };

  View view() const { return View{runs_.data(), first_run_.data()}; }

 private:
  std::vector<Run> runs_;
  std::vector<int64_t> first_run_;  // vector v's runs are [first_run_[v], first_run_[v + 1])
};

// store(j, vector of wide[j, j + kV)) for wide[j] = sum_{ic, kh, kw} weights[ic, kh, kw] *
// staged[ic][j + tap offset], j a multiple of kV up to wide_len rounded up to whole
// vectors. Four vectors of outputs stay in registers across every input channel and tap.
template <typename Acc, typename Store>
void correlate_wide(const DirectPlan& p, int64_t channels, const Acc* staged, int64_t stride,
                    const Acc* weights, const Store& store) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t kV = Vec::size();
  const int64_t wp = p.staged_w(), taps = p.kernel_h * p.kernel_w;
  const int64_t len = round_up(p.wide_len(), kV);
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    if (p.kernel_w == 3 && p.dilation_w == 1) {
      // The taps of a kernel row are one load shifted by 0, 1, 2 lanes: five loads (the
      // last masked to the 2 lanes it lends) give all 12 operands of 4 output vectors,
      // shifted in registers. Unaligned loads mostly straddle cache lines and cost two
      // reads each: one per operand made the loads, not the multiply-adds, the bound.
      // The same multiply-adds in the same order as the loop below: the same bits.
      const auto shift = [](__m512 lo, __m512 hi, auto lanes) {
        return _mm512_castsi512_ps(_mm512_alignr_epi32(
            _mm512_castps_si512(hi), _mm512_castps_si512(lo), decltype(lanes)::value));
      };
      using One = std::integral_constant<int, 1>;
      using Two = std::integral_constant<int, 2>;
      for (; j + 4 * kV <= len; j += 4 * kV) {
        // Named registers, not arrays: GCC kept an array of accumulators on the stack.
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t ic = 0; ic < channels; ++ic) {
          const Acc* plane = staged + ic * stride + j;
          const Acc* w = weights + ic * taps;
          for (int64_t kh = 0; kh < p.kernel_h; ++kh, w += 3) {
            const Acc* q = plane + kh * p.dilation_h * wp;
            const __m512 w0 = _mm512_set1_ps(w[0]), w1 = _mm512_set1_ps(w[1]),
                         w2 = _mm512_set1_ps(w[2]);
            const __m512 l0 = _mm512_loadu_ps(q), l1 = _mm512_loadu_ps(q + kV),
                         l2 = _mm512_loadu_ps(q + 2 * kV), l3 = _mm512_loadu_ps(q + 3 * kV),
                         l4 = _mm512_maskz_loadu_ps(__mmask16{0x3}, q + 4 * kV);
            a0 = _mm512_fmadd_ps(w0, l0, a0);
            a0 = _mm512_fmadd_ps(w1, shift(l0, l1, One{}), a0);
            a0 = _mm512_fmadd_ps(w2, shift(l0, l1, Two{}), a0);
            a1 = _mm512_fmadd_ps(w0, l1, a1);
            a1 = _mm512_fmadd_ps(w1, shift(l1, l2, One{}), a1);
            a1 = _mm512_fmadd_ps(w2, shift(l1, l2, Two{}), a1);
            a2 = _mm512_fmadd_ps(w0, l2, a2);
            a2 = _mm512_fmadd_ps(w1, shift(l2, l3, One{}), a2);
            a2 = _mm512_fmadd_ps(w2, shift(l2, l3, Two{}), a2);
            a3 = _mm512_fmadd_ps(w0, l3, a3);
            a3 = _mm512_fmadd_ps(w1, shift(l3, l4, One{}), a3);
            a3 = _mm512_fmadd_ps(w2, shift(l3, l4, Two{}), a3);
          }
        }
        store(j, Vec(a0));
        store(j + kV, Vec(a1));
        store(j + 2 * kV, Vec(a2));
        store(j + 3 * kV, Vec(a3));
      }
    }
  }
#endif
  for (; j + 4 * kV <= len; j += 4 * kV) {
    Vec a0(Acc(0)), a1(Acc(0)), a2(Acc(0)), a3(Acc(0));
    for (int64_t ic = 0; ic < channels; ++ic) {
      const Acc* plane = staged + ic * stride + j;
      const Acc* w = weights + ic * taps;
      for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
          const Acc* q = plane + kh * p.dilation_h * wp + kw * p.dilation_w;
          const Vec wv(w[kh * p.kernel_w + kw]);
          a0 = at::vec::fmadd(wv, Vec::loadu(q), a0);
          a1 = at::vec::fmadd(wv, Vec::loadu(q + kV), a1);
          a2 = at::vec::fmadd(wv, Vec::loadu(q + 2 * kV), a2);
          a3 = at::vec::fmadd(wv, Vec::loadu(q + 3 * kV), a3);
        }
      }
    }
    store(j, a0);
    store(j + kV, a1);
    store(j + 2 * kV, a2);
    store(j + 3 * kV, a3);
  }
  for (; j < len; j += kV) {
    Vec a(Acc(0));
    for (int64_t ic = 0; ic < channels; ++ic) {
      const Acc* plane = staged + ic * stride + j;
      const Acc* w = weights + ic * taps;
      for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
          a = at::vec::fmadd(Vec(w[kh * p.kernel_w + kw]),
                             Vec::loadu(plane + kh * p.dilation_h * wp + kw * p.dilation_w), a);
        }
      }
    }
    store(j, a);
  }
}

// output[n, oc] = act(sum over the group's input planes of the correlation + bias[oc]).
// `weights` is [out_channels, in_per_group, kh, kw] in Acc. Tasks are (sample, group,
// chunk of the group's output channels); each stages its input planes once.
template <typename T, typename Fn>
void direct_forward(const Fn& fn, const DirectPlan& p, int64_t batch, int64_t groups,
                    int64_t in_per_group, int64_t out_per_group, const T* input,
                    const opmath_t<T>* weights, const T* bias, T* output) {
  using Acc = opmath_t<T>;
  const int64_t stride = staged_stride<Acc>(p);
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t chunks = chunks_for(batch * groups, out_per_group);
  const int64_t chunk = ceil_div(out_per_group, chunks);
  const int64_t in_plane = p.src_h * p.src_w, out_plane = p.out_h * p.out_w;
  const int64_t wp = p.staged_w();
  using Vec = Vectorized<Acc>;
  constexpr int64_t kV = Vec::size();
  const WideStores<Acc> wide_stores(p);
  at::parallel_for(0, batch * groups * chunks, 1, [&](int64_t begin, int64_t end) {
    const typename WideStores<Acc>::View stores = wide_stores.view();
    std::vector<Acc> staged(in_per_group * stride);
    std::vector<Acc> wide(std::is_same_v<T, Acc> ? 0 : round_up(p.wide_len(), kV));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, ng = task / chunks, g = ng % groups, n = ng / groups;
      stage_planes(input + (n * groups + g) * in_per_group * in_plane, in_per_group, in_plane, p,
                   staged.data());
      const int64_t oc_end = std::min(out_per_group, (c + 1) * chunk);
      for (int64_t o = c * chunk; o < oc_end; ++o) {
        const int64_t oc = g * out_per_group + o;
        const Acc* w = weights + oc * in_per_group * taps;
        T* out = output + (n * groups * out_per_group + oc) * out_plane;
        const Acc b = bias ? static_cast<Acc>(bias[oc]) : Acc(0);
        if constexpr (std::is_same_v<T, Acc>) {
          // Bias + activation on each vector in registers, stored straight to its rows.
          // The view by value: through a reference its pointers are reloaded after every
          // store, which may alias them as far as the compiler knows.
          correlate_wide(p, in_per_group, staged.data(), stride, w,
                         [&, stores](int64_t j, Vec v) {
                           stores.store(j / kV, fn.forward(bias ? v + Vec(b) : v), out);
                         });
        } else {
          // Bias + activation over the whole wide buffer (full vectors, no per-row tails),
          // then the valid columns of each row are converted into the output.
          correlate_wide(p, in_per_group, staged.data(), stride, w,
                         [&](int64_t j, Vec v) { v.store(wide.data() + j); });
          finish_row_inplace<Acc>(fn, bias != nullptr, b, wide.data(),
                                  static_cast<int64_t>(wide.size()));
          for (int64_t oh = 0; oh < p.out_h; ++oh) {
            std::copy(wide.data() + oh * wp, wide.data() + oh * wp + p.out_w, out + oh * p.out_w);
          }
        }
      }
    }
  });
}

// out[c * out_stride + t] += <grads[c], shifted[t]> for kGrads gradient planes and kTaps
// taps: each vector loaded serves kGrads or kTaps multiply-adds, into kGrads * kTaps
// independent accumulators (one per tap and plane, so the sums' order is the same
// whatever the blocking). `len` is a whole number of vectors.
template <int kGrads, int kTaps, typename Acc>
void dots(const Acc* const* grads, const Acc* const* shifted, int64_t len, Acc* out,
          int64_t out_stride) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t kV = Vec::size();
  Vec acc[kGrads][kTaps];
  for (int c = 0; c < kGrads; ++c) {
    for (int t = 0; t < kTaps; ++t) acc[c][t] = Vec(Acc(0));
  }
  for (int64_t j = 0; j < len; j += kV) {
    Vec g[kGrads];
    for (int c = 0; c < kGrads; ++c) g[c] = Vec::loadu(grads[c] + j);
    for (int t = 0; t < kTaps; ++t) {
      const Vec x = Vec::loadu(shifted[t] + j);
      for (int c = 0; c < kGrads; ++c) acc[c][t] = at::vec::fmadd(g[c], x, acc[c][t]);
    }
  }
  for (int c = 0; c < kGrads; ++c) {
    for (int t = 0; t < kTaps; ++t) out[c * out_stride + t] += cpu::detail::lane_sum(acc[c][t]);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// dots<kGrads, 9> for the 9 taps of one channel under a 3x3 kernel (dilation 1): the
// taps of kernel row kh are rows[kh] shifted by 0, 1, 2 lanes, so each step loads one
// new vector per kernel row and shifts it in registers against the previous one (see
// correlate_wide: unaligned loads mostly straddle cache lines, two reads each). The same
// multiply-adds in the same order as dots: the same bits.
template <int kGrads>
void dots_3x3(const float* const* grads, const float* const* rows, int64_t len, float* out,
              int64_t out_stride) {
  constexpr int64_t kV = 16;
  const auto shift = [](__m512 lo, __m512 hi, auto lanes) {
    return _mm512_castsi512_ps(_mm512_alignr_epi32(
        _mm512_castps_si512(hi), _mm512_castps_si512(lo), decltype(lanes)::value));
  };
  // Named accumulators, not an array: GCC kept an array of them on the stack.
  const __m512 zero = _mm512_setzero_ps();
  __m512 a00 = zero, a01 = zero, a02 = zero, a03 = zero, a04 = zero, a05 = zero, a06 = zero,
         a07 = zero, a08 = zero;
  __m512 a10 = zero, a11 = zero, a12 = zero, a13 = zero, a14 = zero, a15 = zero, a16 = zero,
         a17 = zero, a18 = zero;
  __m512 cur0 = _mm512_loadu_ps(rows[0]), cur1 = _mm512_loadu_ps(rows[1]),
         cur2 = _mm512_loadu_ps(rows[2]);
  // acc_t += g * (row shifted by t lanes) for t = 0, 1, 2; `row` becomes `next`.
  const auto kernel_row = [&](__m512 g0, __m512 g1, __m512& row, __m512 next, __m512& x0,
                              __m512& x1, __m512& x2, __m512& y0, __m512& y1, __m512& y2) {
    const __m512 s1 = shift(row, next, std::integral_constant<int, 1>{});
    const __m512 s2 = shift(row, next, std::integral_constant<int, 2>{});
    x0 = _mm512_fmadd_ps(g0, row, x0);
    x1 = _mm512_fmadd_ps(g0, s1, x1);
    x2 = _mm512_fmadd_ps(g0, s2, x2);
    if constexpr (kGrads == 2) {
      y0 = _mm512_fmadd_ps(g1, row, y0);
      y1 = _mm512_fmadd_ps(g1, s1, y1);
      y2 = _mm512_fmadd_ps(g1, s2, y2);
    }
    row = next;
  };
  for (int64_t j = 0; j < len; j += kV) {
    // The last step reads only the 2 lanes it shifts in past the taps' last element.
    const __mmask16 mask = j + kV < len ? __mmask16{0xFFFF} : __mmask16{0x3};
    const __m512 g0 = _mm512_loadu_ps(grads[0] + j);
    const __m512 g1 = kGrads == 2 ? _mm512_loadu_ps(grads[kGrads - 1] + j) : zero;
    kernel_row(g0, g1, cur0, _mm512_maskz_loadu_ps(mask, rows[0] + j + kV), a00, a01, a02, a10,
               a11, a12);
    kernel_row(g0, g1, cur1, _mm512_maskz_loadu_ps(mask, rows[1] + j + kV), a03, a04, a05, a13,
               a14, a15);
    kernel_row(g0, g1, cur2, _mm512_maskz_loadu_ps(mask, rows[2] + j + kV), a06, a07, a08, a16,
               a17, a18);
  }
  const __m512 sums[2][9] = {{a00, a01, a02, a03, a04, a05, a06, a07, a08},
                             {a10, a11, a12, a13, a14, a15, a16, a17, a18}};
  for (int c = 0; c < kGrads; ++c) {
    for (int t = 0; t < 9; ++t) {
      out[c * out_stride + t] += cpu::detail::lane_sum(Vectorized<float>(sums[c][t]));
    }
  }
}
#endif

// Up to kMaxGradBlock gradient planes over a 3x3 kernel's 9 taps fill 18 accumulators
// plus the loaded vectors, within AVX-512's (and without spills, AVX2's via the compiler's
// 2-register Vectorized) budget.
constexpr int kMaxGradBlock = 2;
constexpr int64_t kMaxTapBlock = 9;

template <int kGrads, typename Acc>
void dots_taps(const Acc* const* grads, const Acc* const* shifted, int64_t count, int64_t len,
               Acc* out, int64_t out_stride) {
  for (; count >= kMaxTapBlock; count -= kMaxTapBlock, shifted += kMaxTapBlock,
                                out += kMaxTapBlock) {
    dots<kGrads, kMaxTapBlock>(grads, shifted, len, out, out_stride);
  }
  switch (count) {
    case 8: return dots<kGrads, 8>(grads, shifted, len, out, out_stride);
    case 7: return dots<kGrads, 7>(grads, shifted, len, out, out_stride);
    case 6: return dots<kGrads, 6>(grads, shifted, len, out, out_stride);
    case 5: return dots<kGrads, 5>(grads, shifted, len, out, out_stride);
    case 4: return dots<kGrads, 4>(grads, shifted, len, out, out_stride);
    case 3: return dots<kGrads, 3>(grads, shifted, len, out, out_stride);
    case 2: return dots<kGrads, 2>(grads, shifted, len, out, out_stride);
    case 1: return dots<kGrads, 1>(grads, shifted, len, out, out_stride);
    default: return;
  }
}

// grad_weight[oc, ic, kh, kw] = sum_n <grad_output[n, oc], input[n, ic] shifted by the tap>.
// grad_output planes are staged wide (pitch Wp, zero in the extra columns), so each tap
// is one flat dot product. Tasks are (group, chunk of output channels); sums are in a
// fixed order, whatever the thread count.
template <typename T>
void direct_backward_weight(const ConvShape& s, const DirectPlan& p, const T* input,
                            const T* grad_output, T* grad_weight) {
  using Acc = opmath_t<T>;
  constexpr int64_t kV = Vectorized<Acc>::size();
  const int64_t groups = s.groups, in_pg = s.in_per_group(), out_pg = s.out_per_group();
  const int64_t stride = staged_stride<Acc>(p), wp = p.staged_w();
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t len = round_up(p.wide_len(), kV);
  const int64_t chunks = chunks_for(groups, out_pg);
  const int64_t chunk = ceil_div(out_pg, chunks);
  // One input channel under a 3x3 kernel: shifted[0], [3], [6] are the kernel rows.
  [[maybe_unused]] const bool three_by_three =
      in_pg == 1 && p.kernel_h == 3 && p.kernel_w == 3 && p.dilation_w == 1;
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> staged(in_pg * stride);
    std::vector<Acc> grad_wide(kMaxGradBlock * len);
    std::vector<Acc> sums(chunk * in_pg * taps);
    // The staged input shifted by each (ic, kh, kw): the patch rows of im2col, in place.
    std::vector<const Acc*> shifted(in_pg * taps);
    for (int64_t ic = 0; ic < in_pg; ++ic) {
      for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
          shifted[(ic * p.kernel_h + kh) * p.kernel_w + kw] =
              staged.data() + ic * stride + kh * p.dilation_h * wp + kw * p.dilation_w;
        }
      }
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / chunks, c = task % chunks;
      const int64_t o_begin = c * chunk, o_end = std::min(out_pg, o_begin + chunk);
      std::fill(sums.begin(), sums.end(), Acc(0));
      for (int64_t n = 0; n < s.batch; ++n) {
        stage_planes(input + (n * s.in_channels + g * in_pg) * s.in_plane(), in_pg, s.in_plane(),
                     p, staged.data());
        for (int64_t o = o_begin; o < o_end; o += kMaxGradBlock) {
          const int block = static_cast<int>(std::min<int64_t>(kMaxGradBlock, o_end - o));
          const Acc* grads[kMaxGradBlock];
          for (int c = 0; c < block; ++c) {
            const T* go = grad_output + (n * s.out_channels + g * out_pg + o + c) * s.out_plane();
            copy_rows(go, s.out_h, s.out_w, wp, 0, grad_wide.data() + c * len, len);
            grads[c] = grad_wide.data() + c * len;
          }
          Acc* out = sums.data() + (o - o_begin) * in_pg * taps;
          static_assert(kMaxGradBlock == 2);
#if defined(CPU_CAPABILITY_AVX512)
          if constexpr (std::is_same_v<Acc, float>) {
            // With one plane the shifts, not the loads, would bound it (depthwise weight
            // gradient 0.55 -> 0.72 ms): only pairs take it.
            if (three_by_three && block == 2) {
              const float* rows[3] = {shifted[0], shifted[3], shifted[6]};
              dots_3x3<2>(grads, rows, len, out, taps);
              continue;
            }
          }
#endif
          if (block == 2) {
            dots_taps<2>(grads, shifted.data(), in_pg * taps, len, out, in_pg * taps);
          } else {
            dots_taps<1>(grads, shifted.data(), in_pg * taps, len, out, in_pg * taps);
          }
        }
      }
      T* gw = grad_weight + (g * out_pg + o_begin) * in_pg * taps;
      for (int64_t i = 0; i < (o_end - o_begin) * in_pg * taps; ++i) gw[i] = static_cast<T>(sums[i]);
    }
  });
}

// ---- im2col + GEMM path ----------------------------------------------------------------
// The columns (output positions oh * out_w + ow) of a sample are cut into tiles whose
// im2col block fits in L2, so the block is still in cache when the GEMM reads it, and
// the GEMM's result tile when the epilogue reads it.

int64_t column_tile(int64_t patch_size, int64_t columns, int64_t element_bytes) {
  constexpr int64_t kL2Budget = 384 * 1024;  // bytes of im2col block, under half of L2
  const int64_t tile = std::max<int64_t>(64, kL2Budget / (element_bytes * std::max<int64_t>(1, patch_size)));
  return std::min(columns, round_up(tile, 16));
}

// Calls body(row, oh, ow_begin, ow_end, col_offset) for the runs of columns [begin, end)
// that lie in one output row, col_offset being the run's first column minus `begin`.
template <typename Body>
void for_each_run(const ConvShape& s, int64_t begin, int64_t end, const Body& body) {
  for (int64_t c = begin; c < end;) {
    const int64_t oh = c / s.out_w, ow = c % s.out_w;
    const int64_t ow_end = std::min(s.out_w, ow + (end - c));
    body(oh, ow, ow_end, c - begin);
    c += ow_end - ow;
  }
}

// Input columns [lo, hi) of output row positions that read inside the input row, for
// kernel column kw (conv.h's index math solved for ow).
std::pair<int64_t, int64_t> inside_columns(const ConvShape& s, int64_t kw) {
  const int64_t iw0 = input_coord(0, kw, s.stride_w, s.pad_w, s.dilation_w);
  const int64_t lo = std::min(s.out_w, std::max<int64_t>(0, ceil_div(-iw0, s.stride_w)));
  const int64_t hi = std::max(lo, std::min(s.out_w, ceil_div(s.in_w - iw0, s.stride_w)));
  return {lo, hi};
}

// dst[2 j] += src[j] for j in [0, n), the adjoint of copy_even: each pair of dst vectors
// gets src interleaved with zeros added (x + 0 is x: the accumulators start at +0, so
// none is -0), and only dst[0 .. 2 n - 2] is read or written.
template <typename T>
void add_to_even(const T* src, T* dst, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t kLanes = Vec::size();
  int64_t j = 0;
  for (; j + kLanes < n; j += kLanes) {
    const auto [low, high] = at::vec::interleave2(Vec::loadu(src + j), Vec(T(0)));
    (Vec::loadu(dst + 2 * j) + low).store(dst + 2 * j);
    (Vec::loadu(dst + 2 * j + kLanes) + high).store(dst + 2 * j + kLanes);
  }
  const int64_t tail = n - j, needed = 2 * tail - 1;
  if (tail <= 0) return;
  const auto [low, high] = at::vec::interleave2(Vec::loadu(src + j, tail), Vec(T(0)));
  const int64_t low_count = std::min(kLanes, needed);
  (Vec::loadu(dst + 2 * j, low_count) + low).store(dst + 2 * j, low_count);
  if (needed > kLanes) {
    (Vec::loadu(dst + 2 * j + kLanes, needed - kLanes) + high)
        .store(dst + 2 * j + kLanes, needed - kLanes);
  }
}

// col[row, j] = im2col value of column begin + j, for one sample and group, converted to
// col's type; `ld` is the row stride of col.
template <typename T, typename C>
void im2col(const T* plane, const ConvShape& s, int64_t begin, int64_t end, C* col, int64_t ld) {
  for (int64_t row = 0; row < s.patch_size(); ++row) {
    const int64_t kw = row % s.kernel_w, kh = (row / s.kernel_w) % s.kernel_h;
    const int64_t ic = row / (s.kernel_w * s.kernel_h);
    const int64_t iw0 = input_coord(0, kw, s.stride_w, s.pad_w, s.dilation_w);
    const auto [lo, hi] = inside_columns(s, kw);
    for_each_run(s, begin, end, [&](int64_t oh, int64_t ow0, int64_t ow1, int64_t offset) {
      C* dst = col + row * ld + offset - ow0;  // dst[ow] for ow in [ow0, ow1)
      const int64_t ih = input_coord(oh, kh, s.stride_h, s.pad_h, s.dilation_h);
      if (ih < 0 || ih >= s.in_h) {
        std::fill(dst + ow0, dst + ow1, C(0));
        return;
      }
      const T* src = plane + (ic * s.in_h + ih) * s.in_w + iw0;
      const int64_t a = std::clamp(lo, ow0, ow1), b = std::clamp(hi, a, ow1);
      std::fill(dst + ow0, dst + a, C(0));
      gather_columns(src + a * s.stride_w, s.stride_w, dst + a, b - a);
      std::fill(dst + b, dst + ow1, C(0));
    });
  }
}

// plane += col2im(col) for columns [begin, end): the adjoint of im2col.
template <typename T>
void col2im_add(const T* col, int64_t ld, const ConvShape& s, int64_t begin, int64_t end,
                T* plane) {
  for (int64_t row = 0; row < s.patch_size(); ++row) {
    const int64_t kw = row % s.kernel_w, kh = (row / s.kernel_w) % s.kernel_h;
    const int64_t ic = row / (s.kernel_w * s.kernel_h);
    const int64_t iw0 = input_coord(0, kw, s.stride_w, s.pad_w, s.dilation_w);
    const auto [lo, hi] = inside_columns(s, kw);
    for_each_run(s, begin, end, [&](int64_t oh, int64_t ow0, int64_t ow1, int64_t offset) {
      const int64_t ih = input_coord(oh, kh, s.stride_h, s.pad_h, s.dilation_h);
      if (ih < 0 || ih >= s.in_h) return;
      const T* src = col + row * ld + offset - ow0;
      T* dst = plane + (ic * s.in_h + ih) * s.in_w + iw0;
      const int64_t a = std::clamp(lo, ow0, ow1), b = std::clamp(hi, a, ow1);
      if (s.stride_w == 1) {
        for (int64_t ow = a; ow < b; ++ow) dst[ow] = dst[ow] + src[ow];
      } else if (s.stride_w == 2 && b > a) {
        add_to_even(src + a, dst + 2 * a, b - a);
      } else {
        for (int64_t ow = a; ow < b; ++ow) dst[ow * s.stride_w] = dst[ow * s.stride_w] + src[ow];
      }
    });
  }
}

bool is_pointwise(const ConvShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_h == 0 && s.pad_w == 0;
}

// A rows x cols matrix view of memory with row stride ld (no copy).
template <typename T>
Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t ld,
              const at::TensorOptions& options) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
}

// Runs body(begin, end) over `tasks`: in parallel when there are enough of them for every
// thread, otherwise serially, so that each GEMM itself runs multi-threaded.
template <typename Body>
void for_each_task(int64_t tasks, const Body& body) {
  if (tasks >= at::get_num_threads()) {
    at::parallel_for(0, tasks, 1, body);
  } else {
    body(0, tasks);
  }
}

// The GEMMs run in Acc (float for half and bfloat16; the operands are converted as they
// are gathered), so that sums over taps and channels, the bias and the activation all see
// the unrounded result, which is rounded to T once, as torch's convolutions do. Rounding
// the GEMM's output to bfloat16 before adding the bias would turn small pre-activations
// into exact zeros or flip their sign, and with them relu's gradient mask.

// Whether the GEMM reads the input through an im2col buffer: all but pointwise
// convolutions of Acc data, whose input plane already is the k x columns matrix.
template <typename T, typename Acc>
bool gathers_columns(const ConvShape& s) {
  return !(std::is_same_v<T, Acc> && is_pointwise(s));
}

// The im2col block of columns [c0, c0 + width) of one sample's group as a k x width Acc
// matrix: the input plane itself for a pointwise convolution of Acc data, otherwise
// gathered (and converted) into `col`.
template <typename T, typename Acc>
Tensor im2col_block(const ConvShape& s, const T* plane, int64_t c0, int64_t width, Acc* col,
                    const at::TensorOptions& acc_options) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (!gathers_columns<T, Acc>(s)) {
      return matrix(plane + c0, s.patch_size(), width, s.out_plane(), acc_options);
    }
  }
  im2col(plane, s, c0, c0 + width, col, width);
  return matrix(col, s.patch_size(), width, width, acc_options);
}

// `count` elements of `src` as Acc: `src` itself when T is Acc, else converted into `buffer`.
template <typename T, typename Acc>
const Acc* as_acc(const T* src, int64_t count, std::vector<Acc>& buffer) {
  if constexpr (std::is_same_v<T, Acc>) {
    return src;
  } else {
    buffer.resize(count);
    at::vec::convert(src, buffer.data(), count);
    return buffer.data();
  }
}

// dst[i] = act(src[i] + bias) (bias and act optional), rounded to T once. `src` may be
// overwritten; it may be `dst` itself when T is Acc.
template <typename T, typename Acc, typename Fn>
void finish_row(const Fn& fn, bool epilogue, bool has_bias, Acc bias, Acc* src, T* dst,
                int64_t n) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (!epilogue) {
      if (src != dst) std::copy(src, src + n, dst);
    } else if (has_bias) {
      map_range([fn, bias](auto x) { using V = decltype(x); return fn.forward(x + V(bias)); }, n,
                dst, src);
    } else {
      map_range([fn](auto x) { return fn.forward(x); }, n, dst, src);
    }
  } else {
    if (epilogue) finish_row_inplace<Acc>(fn, has_bias, bias, src, n);
    at::vec::convert(src, dst, n);
  }
}

// Tasks are (sample, column tile); each does every group of its tile.
template <typename T, typename Fn>
void gemm_forward(const Fn& fn, const ConvShape& s, const Tensor& input, const Tensor& weight,
                  const T* bias, const Tensor& output) {
  using Acc = opmath_t<T>;
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane();
  const int64_t tile = column_tile(k, cols, sizeof(Acc));
  const int64_t tiles = ceil_div(cols, tile);
  const Tensor weight_acc = weight.to(acc_options.dtype()).contiguous();
  const T* in = input.const_data_ptr<T>();
  const Acc* w = weight_acc.const_data_ptr<Acc>();
  T* out = output.data_ptr<T>();
  for_each_task(s.batch * tiles, [&](int64_t begin, int64_t end) {
    std::vector<Acc> col(gathers_columns<T, Acc>(s) ? k * tile : 0);
    std::vector<Acc> result(out_pg * tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, c0 = (task % tiles) * tile;
      const int64_t width = std::min(tile, cols - c0);
      for (int64_t g = 0; g < s.groups; ++g) {
        const T* plane = in + (n * s.in_channels + g * in_pg) * s.in_plane();
        Tensor result_g = matrix(result.data(), out_pg, width, width, acc_options);
        at::mm_out(result_g, matrix(w + g * out_pg * k, out_pg, k, k, acc_options),
                   im2col_block(s, plane, c0, width, col.data(), acc_options));
        for (int64_t o = 0; o < out_pg; ++o) {
          const int64_t oc = g * out_pg + o;
          finish_row(fn, true, bias != nullptr, bias ? static_cast<Acc>(bias[oc]) : Acc(0),
                     result.data() + o * width, out + (n * s.out_channels + oc) * cols + c0,
                     width);
        }
      }
    }
  });
}

// Tasks are samples (the tiles of a sample overlap in the input gradient).
template <typename T, typename Fn>
void gemm_backward_input(const Fn& fn, const ConvShape& s, const Tensor& grad_output,
                         const Tensor& weight, const T* bias, const Tensor& grad_input) {
  using Acc = opmath_t<T>;
  constexpr bool kInPlace = std::is_same_v<T, Acc>;  // sum straight into grad_input
  const auto acc_options = grad_output.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane(), in_plane = s.in_plane();
  const int64_t tile = column_tile(k, cols, sizeof(Acc));
  const bool pointwise = is_pointwise(s);
  const Tensor weight_acc = weight.to(acc_options.dtype()).contiguous();
  const T* go = grad_output.const_data_ptr<T>();
  const Acc* w = weight_acc.const_data_ptr<Acc>();
  T* gi = grad_input.data_ptr<T>();
  const bool epilogue = bias != nullptr || !std::is_same_v<Fn, activation::Identity<Acc>>;
  for_each_task(s.batch, [&](int64_t begin, int64_t end) {
    std::vector<Acc> col(pointwise ? 0 : k * tile);
    std::vector<Acc> grad_buffer;
    std::vector<Acc> sum_buffer(kInPlace ? 0 : in_pg * in_plane);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < s.groups; ++g) {
        T* plane = gi + (n * s.in_channels + g * in_pg) * in_plane;
        Acc* sum = nullptr;
        if constexpr (kInPlace) {
          sum = plane;
        } else {
          sum = sum_buffer.data();
        }
        const Tensor weight_t = matrix(w + g * out_pg * k, out_pg, k, k, acc_options).t();
        const Acc* grad =
            as_acc(go + (n * s.out_channels + g * out_pg) * cols, out_pg * cols, grad_buffer);
        if (pointwise) {  // the gradient is weight_g^T @ grad_output[n, g] itself
          Tensor result = matrix(sum, k, cols, cols, acc_options);
          at::mm_out(result, weight_t, matrix(grad, out_pg, cols, cols, acc_options));
        } else {
          std::fill(sum, sum + in_pg * in_plane, Acc(0));
          for (int64_t c0 = 0; c0 < cols; c0 += tile) {
            const int64_t width = std::min(tile, cols - c0);
            Tensor result = matrix(col.data(), k, width, width, acc_options);
            at::mm_out(result, weight_t, matrix(grad + c0, out_pg, width, cols, acc_options));
            col2im_add(col.data(), width, s, c0, c0 + width, sum);
          }
        }
        if (epilogue || !kInPlace) {
          for (int64_t i = 0; i < in_pg; ++i) {
            const int64_t ic = g * in_pg + i;
            finish_row(fn, epilogue, bias != nullptr, bias ? static_cast<Acc>(bias[ic]) : Acc(0),
                       sum + i * in_plane, plane + i * in_plane, in_plane);
          }
        }
      }
    }
  });
}

// Samples per partial sum of the weight gradient: the batch is cut into at most this many
// fixed ranges, whatever the number of threads, so the sums (and their rounding) are the
// same for any thread count.
constexpr int64_t kWeightGradRanges = 8;

// grad_weight_g = sum_n grad_output[n, g] @ im2col(input[n, g])^T. The batch is cut into
// at most kWeightGradRanges ranges, each summing into its own buffer (in Acc), in
// parallel; the buffers are then added in range order.
template <typename T>
void gemm_backward_weight(const ConvShape& s, const Tensor& input, const Tensor& grad_output,
                          const Tensor& grad_weight) {
  using Acc = opmath_t<T>;
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane();
  const int64_t tile = column_tile(k, cols, sizeof(Acc));
  const T* in = input.const_data_ptr<T>();
  const T* go = grad_output.const_data_ptr<T>();
  const int64_t ranges = std::min<int64_t>(s.batch, kWeightGradRanges);
  Tensor partial = at::zeros({ranges, s.out_channels, k}, acc_options);
  auto body = [&](int64_t begin, int64_t end) {
    std::vector<Acc> col(gathers_columns<T, Acc>(s) ? k * tile : 0);
    std::vector<Acc> grad_buffer;
    for (int64_t r = begin; r < end; ++r) {
      Acc* sums = partial.data_ptr<Acc>() + r * s.out_channels * k;
      for (int64_t n = r * s.batch / ranges; n < (r + 1) * s.batch / ranges; ++n) {
        for (int64_t g = 0; g < s.groups; ++g) {
          const T* plane = in + (n * s.in_channels + g * in_pg) * s.in_plane();
          const Acc* grad =
              as_acc(go + (n * s.out_channels + g * out_pg) * cols, out_pg * cols, grad_buffer);
          Tensor sum_g = matrix(sums + g * out_pg * k, out_pg, k, k, acc_options);
          for (int64_t c0 = 0; c0 < cols; c0 += tile) {
            const int64_t width = std::min(tile, cols - c0);
            const Tensor grad_tile = matrix(grad + c0, out_pg, width, cols, acc_options);
            at::addmm_out(sum_g, sum_g, grad_tile,
                          im2col_block(s, plane, c0, width, col.data(), acc_options).t());
          }
        }
      }
    }
  };
  for_each_task(ranges, body);
  grad_weight.view({s.out_channels, k}).copy_(partial.sum(0));
}

// dst[c * ldd + q] = src[q * lds + c] for q < pixels (at most 16), c < 16.
inline void transpose_16(const float* src, int64_t lds, int64_t pixels, float* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r[16];
  for (int q = 0; q < 16; ++q) r[q] = _mm512_loadu_ps(src + std::min<int64_t>(q, pixels - 1) * lds);
  // Pairs, then quads within each 128-bit lane; then the lanes themselves.
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0x44);
    b[4 * i + 1] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0xEE);
    b[4 * i + 2] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0x44);
    b[4 * i + 3] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0xEE);
  }
  // b[4 * i + j], 128-bit lane l, holds channel 4 * l + j of pixels 4 * i .. 4 * i + 3.
  const __mmask16 mask = static_cast<__mmask16>((uint32_t{1} << pixels) - 1);
  for (int j = 0; j < 4; ++j) {
    const __m512 even0 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0x88);
    const __m512 odd0 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0xDD);
    const __m512 even1 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0x88);
    const __m512 odd1 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0xDD);
    const __m512 rows[4] = {_mm512_shuffle_f32x4(even0, even1, 0x88),
                            _mm512_shuffle_f32x4(odd0, odd1, 0x88),
                            _mm512_shuffle_f32x4(even0, even1, 0xDD),
                            _mm512_shuffle_f32x4(odd0, odd1, 0xDD)};
    for (int l = 0; l < 4; ++l) _mm512_mask_storeu_ps(dst + (4 * l + j) * ldd, mask, rows[l]);
  }
#else
  for (int64_t c = 0; c < 16; ++c) {
    for (int64_t q = 0; q < pixels; ++q) dst[c * ldd + q] = src[q * lds + c];
  }
#endif
}

// dst[j * ldd + o] = src[o * lds + j] for o < rows, j < cols: 16 x 16 blocks through
// registers, the last cols % 16 columns element by element. The weight gradients
// transpose grad_output chunks into the GEMM's B with it (element by element this cost a
// third as much as the GEMM itself).
inline void transpose_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                           int64_t ldd) {
  const int64_t whole = cols / 16 * 16;
  for (int64_t j0 = 0; j0 < whole; j0 += 16) {
    for (int64_t o0 = 0; o0 < rows; o0 += 16) {
      transpose_16(src + o0 * lds + j0, lds, std::min<int64_t>(16, rows - o0), dst + j0 * ldd + o0,
                   ldd);
    }
  }
  for (int64_t o = 0; o < rows; ++o) {
    for (int64_t j = whole; j < cols; ++j) dst[j * ldd + o] = src[o * lds + j];
  }
}

// ---- float32: im2col + pyops' register-blocked GEMM (common/cpu_gemm.h) ----------------
// The same tiling as above, but the GEMM is single-threaded and hands each register tile
// to the epilogue: the forward writes act(tile + bias) straight into the output, with no
// result buffer in between. Tasks are (sample, tile) units; no output element depends on
// how they are split between threads.

using gemm::Vec;
constexpr int64_t kStrip = gemm::tile_cols(gemm::kMaxVecs);

// A column tile that is a whole number of the widest register tiles, so that only a
// sample's last tile has a ragged strip.
int64_t strip_tile(int64_t patch_size, int64_t columns) {
  const int64_t tile = column_tile(patch_size, columns, sizeof(float));
  return tile >= columns ? columns : std::max(kStrip, tile / kStrip * kStrip);
}

template <typename Fn>
void sgemm_forward(const Fn& fn, const ConvShape& s, const float* in, const float* w,
                   const float* bias, float* out) {
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane();
  const int64_t tile = strip_tile(k, cols);
  const int64_t tiles = ceil_div(cols, tile);
  const bool pointwise = is_pointwise(s);
  at::parallel_for(0, s.batch * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> col(pointwise ? 0 : k * round_up(tile, kStrip));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, c0 = (task % tiles) * tile;
      const int64_t width = std::min(tile, cols - c0);
      const int64_t ld = round_up(width, kStrip);  // im2col rows padded: no ragged strip copy
      for (int64_t g = 0; g < s.groups; ++g) {
        const float* plane = in + (n * s.in_channels + g * in_pg) * s.in_plane();
        if (!pointwise) im2col(plane, s, c0, c0 + width, col.data(), ld);
        float* dst = out + (n * s.out_channels + g * out_pg) * cols + c0;
        const float* bias_g = bias ? bias + g * out_pg : nullptr;
        gemm::gemm_tiles(
            out_pg, width, k, w + g * out_pg * k, gemm::StridedRows{k},
            pointwise ? plane + c0 : col.data(), gemm::StridedRows{pointwise ? cols : ld},
            /*b_padded=*/!pointwise,
            [&](const auto& acc, int64_t row0, int rows, int64_t col0, int64_t ncols) {
              gemm::store_tile(acc, rows, ncols, dst + row0 * cols + col0, cols,
                               [&](int i, Vec v) {
                                 return fn.forward(bias_g ? v + Vec(bias_g[row0 + i]) : v);
                               });
            });
      }
    }
  });
}

template <typename Fn>
void sgemm_backward_input(const Fn& fn, const ConvShape& s, const float* go, const Tensor& weight,
                          const float* bias, float* gi) {
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane(), in_plane = s.in_plane();
  const int64_t tile = strip_tile(k, cols);
  const bool pointwise = is_pointwise(s);
  // weight_g^T, [k, out_pg] per group, so that its rows are the A rows of the GEMM.
  const Tensor weight_t = weight.view({s.groups, out_pg, k}).transpose(1, 2).contiguous();
  const float* wt = weight_t.const_data_ptr<float>();
  const bool epilogue = bias != nullptr || !std::is_same_v<Fn, activation::Identity<float>>;
  const auto keep = [](int, Vec v) { return v; };
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> col(pointwise ? 0 : k * tile);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < s.groups; ++g) {
        float* plane = gi + (n * s.in_channels + g * in_pg) * in_plane;
        const float* wt_g = wt + g * k * out_pg;
        const float* grad = go + (n * s.out_channels + g * out_pg) * cols;
        if (pointwise) {  // the gradient is weight_g^T @ grad_output[n, g] itself
          gemm::gemm_tiles(k, cols, out_pg, wt_g, gemm::StridedRows{out_pg}, grad,
                           gemm::StridedRows{cols}, false,
                           [&](const auto& acc, int64_t row0, int rows, int64_t col0,
                               int64_t ncols) {
                             gemm::store_tile(acc, rows, ncols, plane + row0 * cols + col0, cols,
                                              keep);
                           });
          continue;
        }
        std::fill(plane, plane + in_pg * in_plane, 0.f);
        for (int64_t c0 = 0; c0 < cols; c0 += tile) {
          const int64_t width = std::min(tile, cols - c0);
          gemm::gemm_tiles(k, width, out_pg, wt_g, gemm::StridedRows{out_pg}, grad + c0,
                           gemm::StridedRows{cols}, false,
                           [&](const auto& acc, int64_t row0, int rows, int64_t col0,
                               int64_t ncols) {
                             gemm::store_tile(acc, rows, ncols, col.data() + row0 * width + col0,
                                              width, keep);
                           });
          col2im_add(col.data(), width, s, c0, c0 + width, plane);
        }
      }
      if (epilogue) {
        for (int64_t ic = 0; ic < s.in_channels; ++ic) {
          finish_row_inplace<float>(fn, bias != nullptr, bias ? bias[ic] : 0.f,
                                    gi + (n * s.in_channels + ic) * in_plane, in_plane);
        }
      }
    }
  });
}

// grad_weight_g^T [k, out_pg] = sum_n im2col(input[n, g]) @ grad_output[n, g]^T: the im2col
// rows are the GEMM's A rows as they are, and the (small) grad_output tile is transposed
// into B. Fixed batch ranges as in gemm_backward_weight: the same bits for any thread count.
void sgemm_backward_weight(const ConvShape& s, const float* in, const float* go,
                           const Tensor& grad_weight) {
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane();
  const int64_t tile = strip_tile(k, cols);
  const bool pointwise = is_pointwise(s);
  const int64_t ldb = round_up(out_pg, kStrip);
  const int64_t ranges = std::min<int64_t>(s.batch, kWeightGradRanges);
  Tensor partial = at::zeros({ranges, s.groups, k, out_pg}, grad_weight.options());
  float* partial_data = partial.data_ptr<float>();
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> col(pointwise ? 0 : k * tile);
    std::vector<float> grad_t(tile * ldb, 0.f);  // padding columns stay zero
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t n = r * s.batch / ranges; n < (r + 1) * s.batch / ranges; ++n) {
        for (int64_t g = 0; g < s.groups; ++g) {
          const float* plane = in + (n * s.in_channels + g * in_pg) * s.in_plane();
          const float* grad = go + (n * s.out_channels + g * out_pg) * cols;
          float* sums = partial_data + (r * s.groups + g) * k * out_pg;
          for (int64_t c0 = 0; c0 < cols; c0 += tile) {
            const int64_t width = std::min(tile, cols - c0);
            if (!pointwise) im2col(plane, s, c0, c0 + width, col.data(), width);
            transpose_rows(grad + c0, cols, out_pg, width, grad_t.data(), ldb);
            gemm::gemm_tiles(k, out_pg, width, pointwise ? plane + c0 : col.data(),
                             gemm::StridedRows{pointwise ? cols : width}, grad_t.data(),
                             gemm::StridedRows{ldb}, /*b_padded=*/true,
                             [&](const auto& acc, int64_t row0, int rows, int64_t col0,
                                 int64_t ncols) {
                               gemm::accumulate_tile(acc, rows, ncols,
                                                     sums + row0 * out_pg + col0, out_pg);
                             });
          }
        }
      }
    }
  });
  // [ranges, groups, k, out_pg] -> [groups, out_pg, k] = grad_weight's [out_channels, k].
  grad_weight.view({s.groups, out_pg, k}).copy_(partial.sum(0).transpose(1, 2));
}

// ---- float32: implicit GEMM over wide rows -------------------------------------------
// In the direct path's wide coordinates (DirectPlan: planes staged zero-padded with row
// pitch wp, output (oh, ow) at wide column oh * wp + ow), the im2col row of tap (ic, kh, kw)
// is the staged plane of ic shifted by kh * dilation_h * wp + kw * dilation_w. The GEMM
// reads those rows in place through a table of offsets: no im2col matrix is written or
// read back. The price is the wp - out_w discarded columns of each wide row.

// The forward and the weight gradient read the input through phase planes (DirectPlan)
// for strides up to 2 where some tap reads each phase: staging a phase no tap reads (a 1x1
// kernel, an even dilation) costs a pass for nothing, and such shapes take im2col (1x1,
// stride 2: forward 0.62 -> 0.88 ms through phases, 1 thread). The input gradient's
// correlation form (input_grad_plan) exists for stride 1 only.
bool taps_read_every_phase(int64_t stride, int64_t kernel, int64_t dilation) {
  return stride == 1 || (stride == 2 && kernel >= 2 && dilation % 2 == 1);
}
bool implicit_gemm_reads_input(const ConvShape& s) {
  return taps_read_every_phase(s.stride_h, s.kernel_h, s.dilation_h) &&
         taps_read_every_phase(s.stride_w, s.kernel_w, s.dilation_w);
}
bool implicit_gemm_writes_input_grad(const ConvShape& s) {
  return s.stride_h == 1 && s.stride_w == 1;
}

// Offsets of the taps (ic, kh, kw) of `channels` staged planes, in im2col row order: the
// tap's phase plane (DirectPlan) shifted by its row and column.
std::vector<int64_t> tap_offsets(const DirectPlan& p, int64_t channels, int64_t plane_stride) {
  std::vector<int64_t> offsets;
  offsets.reserve(channels * p.kernel_h * p.kernel_w);
  for (int64_t ic = 0; ic < channels; ++ic) {
    for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
      const int64_t y = kh * p.dilation_h;
      for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
        const int64_t x = kw * p.dilation_w;
        const int64_t phase = (y % p.stride_h) * p.stride_w + x % p.stride_w;
        offsets.push_back(ic * plane_stride + phase * p.phase_size() +
                          y / p.stride_h * p.staged_w() + x / p.stride_w);
      }
    }
  }
  return offsets;
}

// Writes the real outputs among the wide columns of a register tile that starts at wide
// column col0, through op(row, vector); row i goes to the output plane out + i * out_plane.
// `stores` by value, for the reason given at WideStores::View.
template <typename TileT, typename Op>
void store_wide(const TileT& acc, int rows, int64_t col0, int64_t cols,
                WideStores<float>::View stores, int64_t out_plane, float* out, const Op& op) {
  constexpr int64_t kV = gemm::kVec;
  constexpr int vecs = sizeof(acc.v[0]) / sizeof(Vec);
  for (int v = 0; v < vecs && v * kV < cols; ++v) {
    for (int i = 0; i < rows; ++i) stores.store(col0 / kV + v, op(i, acc.v[i][v]), out + i * out_plane);
  }
}

// output = act(conv(input) + bias) of a plan; `weights` is [groups * out_pg,
// in_pg * kh * kw]. Tasks are (sample, group, chunk of whole register-tile row blocks of
// output channels), so that a batch of one still uses every thread; each task stages its
// input planes. An output row's value does not depend on the chunking.
template <typename Fn>
void implicit_forward(const Fn& fn, const DirectPlan& p, int64_t batch, int64_t groups,
                      int64_t in_pg, int64_t out_pg, const float* input, const float* weights,
                      const float* bias, float* output) {
  const int64_t k = in_pg * p.kernel_h * p.kernel_w;
  const int64_t stride = staged_stride<float>(p);
  const int64_t in_plane = p.src_h * p.src_w, out_plane = p.out_h * p.out_w;
  const int64_t row_blocks = ceil_div(out_pg, gemm::kRows);
  const int64_t chunks = chunks_for(batch * groups, row_blocks);
  const int64_t chunk_rows = ceil_div(row_blocks, chunks) * gemm::kRows;
  const std::vector<int64_t> offsets = tap_offsets(p, in_pg, stride);
  const WideStores<float> wide_stores(p);
  at::parallel_for(0, batch * groups * chunks, 1, [&](int64_t begin, int64_t end) {
    const WideStores<float>::View stores = wide_stores.view();
    // A last ragged strip of register tiles reads up to kStrip columns past the wide
    // outputs: the next plane, or for the last one this zero slack, so the GEMM reads B
    // in place (copying the strip cost a k x kStrip copy per task: 73 KB per sample of
    // seed conv2).
    std::vector<float> staged(in_pg * stride + kStrip);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ng = task / chunks, g = ng % groups;
      const int64_t o0 = (task % chunks) * chunk_rows, o1 = std::min(out_pg, o0 + chunk_rows);
      if (o0 >= o1) continue;
      // (n, g) planes are consecutive
      stage_planes(input + ng * in_pg * in_plane, in_pg, in_plane, p, staged.data());
      float* out = output + (ng * out_pg + o0) * out_plane;
      const float* bias_o = bias ? bias + g * out_pg + o0 : nullptr;
      gemm::gemm_tiles(o1 - o0, p.wide_len(), k, weights + (g * out_pg + o0) * k,
                       gemm::StridedRows{k}, staged.data(), gemm::TableRows{offsets.data()},
                       /*b_padded=*/true,
                       [&](const auto& acc, int64_t row0, int rows, int64_t col0, int64_t cols) {
                         store_wide(acc, rows, col0, cols, stores, out_plane,
                                    out + row0 * out_plane,
                                    [&](int i, Vec v) {
                                      return fn.forward(bias_o ? v + Vec(bias_o[row0 + i]) : v);
                                    });
                       });
    }
  });
}

// ---- float32: implicit GEMM over output pixels ----------------------------------------
// The transposed orientation of implicit_forward: a register tile is kRows output pixels x
// whole vectors of output channels. Each step broadcasts one staged input value per pixel
// (at the tap's offset from the pixel's wide column) and loads a row of the weights laid
// out [k, out_pg]. The pixels are the real outputs only, so no discarded wide column is
// computed, and the channels fill whole tiles when out_pg is a multiple of the tile width:
// the wide rows computed 13% of seed conv2's products for nothing (26 wide columns per 24
// outputs, 66 rows for 64 channels) and 7% of ResNet's 3x3 (58 per 56). The price is a
// transpose: tiles land [pixel][channel] in a small buffer, whose 16 x 16 blocks are
// transposed into the NCHW output (a few percent of the time; seed conv2 + bias + relu
// forward about 7.1 -> 6.2 ms, ResNet's 3x3 8.0 -> 7.8 ms, 1 thread). The same
// multiply-adds in the same order as implicit_forward: the same bits.

// Pixels per buffered block: whole register tiles (kRows) and whole transposed blocks.
constexpr int64_t kPixelBlock = 48;
static_assert(kPixelBlock % gemm::kRows == 0 && kPixelBlock % 16 == 0);

// Vectors per pixel tile for out_pg channels, 0 where pixel tiles do not fit: out_pg in
// whole widest tiles, or exactly one half-width tile (32 channels: the seed conv2's input
// gradient, whose 32 rows filled the wide path's 6-row tiles 89% full and ran at a third
// of the GEMM's peak; 9.5 -> 7.6 ms, 1 thread). The 16 x 16 transpose is AVX-512's.
int pixel_tile_vecs(int64_t out_pg) {
  if (gemm::kVec != 16) return 0;
  if (out_pg % gemm::tile_cols(gemm::kMaxVecs) == 0) return gemm::kMaxVecs;
  return out_pg == gemm::tile_cols(gemm::kMaxVecs / 2) ? gemm::kMaxVecs / 2 : 0;
}
bool use_pixel_tiles(int64_t out_pg) { return pixel_tile_vecs(out_pg) != 0; }

// Row r of the pixel-major A: output pixel pixel0 + r of a plane, at its wide column.
struct PixelRows {
  int64_t pixel0, out_w, wp;
  int64_t operator()(int64_t r) const {
    const int64_t q = pixel0 + r;
    return q / out_w * wp + q % out_w;
  }
};

// implicit_forward's result, in pixel tiles (use_pixel_tiles(out_pg)). `weights_t` is
// [groups, k, out_pg]. Tasks are (sample, group, chunk of pixel blocks).
template <typename Fn>
void implicit_forward_pixels(const Fn& fn, const DirectPlan& p, int64_t batch, int64_t groups,
                             int64_t in_pg, int64_t out_pg, const float* input,
                             const float* weights_t, const float* bias, float* output) {
  const int64_t k = in_pg * p.kernel_h * p.kernel_w;
  const int64_t stride = staged_stride<float>(p);
  const int64_t in_plane = p.src_h * p.src_w, out_plane = p.out_h * p.out_w;
  const int64_t blocks = ceil_div(out_plane, kPixelBlock);
  const int64_t chunks = chunks_for(batch * groups, blocks);
  const int64_t chunk_blocks = ceil_div(blocks, chunks);
  const std::vector<int64_t> offsets = tap_offsets(p, in_pg, stride);
  const int tile_vecs = pixel_tile_vecs(out_pg);
  at::parallel_for(0, batch * groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> staged(in_pg * stride);
    std::vector<float> tiles(kPixelBlock * out_pg);  // [pixel][channel]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ng = task / chunks, g = ng % groups;
      const int64_t b0 = (task % chunks) * chunk_blocks, b1 = std::min(blocks, b0 + chunk_blocks);
      if (b0 >= b1) continue;
      // (n, g) planes are consecutive
      stage_planes(input + ng * in_pg * in_plane, in_pg, in_plane, p, staged.data());
      float* out = output + ng * out_pg * out_plane;
      const float* bias_g = bias ? bias + g * out_pg : nullptr;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t q0 = blk * kPixelBlock, pixels = std::min(kPixelBlock, out_plane - q0);
        const auto store_tile = [&](const auto& acc, int64_t row0, int rows, int64_t col0,
                                    int64_t) {
          constexpr int vecs = sizeof(acc.v[0]) / sizeof(Vec);
          for (int v = 0; v < vecs; ++v) {
            const int64_t c = col0 + v * gemm::kVec;
            float* dst = tiles.data() + row0 * out_pg + c;
            if (bias_g) {
              const Vec b = Vec::loadu(bias_g + c);
              for (int i = 0; i < rows; ++i) fn.forward(acc.v[i][v] + b).store(dst + i * out_pg);
            } else {
              for (int i = 0; i < rows; ++i) fn.forward(acc.v[i][v]).store(dst + i * out_pg);
            }
          }
        };
        const auto multiply = [&](auto vecs) {
          gemm::gemm_tiles_with<decltype(vecs)::value>(
              pixels, out_pg, k, staged.data(), PixelRows{q0, p.out_w, p.staged_w()},
              weights_t + g * k * out_pg, gemm::StridedRows{out_pg}, /*b_padded=*/true,
              store_tile, gemm::TableCols{offsets.data()});
        };
        if (tile_vecs == gemm::kMaxVecs) {
          multiply(std::integral_constant<int, gemm::kMaxVecs>{});
        } else {
          multiply(std::integral_constant<int, gemm::kMaxVecs / 2>{});
        }
        for (int64_t q = 0; q < pixels; q += 16) {
          for (int64_t c = 0; c < out_pg; c += 16) {
            transpose_16(tiles.data() + q * out_pg + c, out_pg, std::min<int64_t>(16, pixels - q),
                         out + c * out_plane + q0 + q, out_plane);
          }
        }
      }
    }
  });
}

// ---- float32, 3x3 stride 1: Winograd F(2x2, 3x3) -----------------------------------------
// A 3x3 stride-1 correlation computes each 2x2 block of outputs (a "tile") from the 4x4
// input patch d under it as Y = A^T [(G w G^T) .* (B^T d B)] A (Lavin and Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2015): 16 multiplies per input/output
// channel pair and tile instead of the direct sum's 36. Summed over input channels, the
// 16 elementwise products are 16 independent GEMMs, U[xi] [out_pg x in_pg] @ V[xi]
// [in_pg x tiles], on pyops' register-tile GEMM. B^T, G and A^T hold only 0, +-1 and
// +-1/2, so the transforms are additions (and exact halvings), and the result differs
// from the direct sum's by rounding only (docs/ACCURACY.md).
//
// Tiles are numbered like wide outputs: tile (ty, tx) is column ty * tws + tx of a tile
// grid with tws = tw + 1 columns per row, the extra one computed and dropped. A block's
// tile rows of one input plane are staged zero-padded as two row phases (padded rows
// 2r and 2r + 1) of pitch 2 * tws, so the patch rows of consecutive tiles are consecutive
// pairs of columns: each patch row of a vector of tiles is two loads and a deinterleave.
// Staged per block and channel, the rows stay in L1 for the transform (staging whole
// planes, 860 KB per sample of ResNet's 3x3, cost 12% of the time).
//
// Where an input or weight is inf or NaN, the transforms' differences can turn what the
// direct sum makes +-inf into NaN; so a call whose sums are not all finite is recomputed
// by the implicit GEMM, which pairs the products as a direct convolution does.

// Tiles per block: the block's V and M stay in L2 (16 x 64 channels x 64 tiles x 4 bytes
// = 256 KB each), and the block is one strip of the widest register tile.
constexpr int64_t kWinogradBlock = 64;

// Channels per group on each side, and channel pairs, below which the transforms cost
// more than the GEMMs save (1 thread, 8x16x56x56 -> 16: forward a tie, weight gradient
// 0.80 -> 0.98 ms; from 24 -> 24 channels on, every pass gained).
constexpr int64_t kWinogradMinChannels = 16;
constexpr int64_t kWinogradMinChannelPairs = 512;

// Where Winograd replaces the implicit GEMM: a 3x3, stride-1, dilation-1 correlation with
// enough channels for the 16 GEMMs to outweigh the transforms.
bool use_winograd(const DirectPlan& p, int64_t in_pg, int64_t out_pg) {
  return p.kernel_h == 3 && p.kernel_w == 3 && p.dilation_h == 1 && p.dilation_w == 1 &&
         p.stride_h == 1 && p.stride_w == 1 && std::min(in_pg, out_pg) >= kWinogradMinChannels &&
         in_pg * out_pg >= kWinogradMinChannelPairs;
}

// The tile grid of a correlation plan: th x tw real tiles, tws per row.
struct WinogradTiles {
  int64_t th, tw;
  int64_t tws() const { return tw + 1; }
  int64_t count() const { return (th - 1) * tws() + tw; }  // up to the last real tile
  int64_t pitch() const { return 2 * tws(); }              // of a staged row
};
WinogradTiles winograd_tiles(const DirectPlan& p) {
  return {ceil_div(p.out_h, 2), ceil_div(p.out_w, 2)};
}

// The most tile rows a block of tiles spans (one that starts at a row's last tile).
int64_t winograd_max_block_rows(const WinogradTiles& tiles) {
  return ceil_div(kWinogradBlock, tiles.tws()) + 1;
}

// The staged rows of tiles [t0, t0 + width): row phases of tile rows ty0 .. ty1 + 1.
struct WinogradRows {
  int64_t ty0, rows;
  int64_t phase_size(const WinogradTiles& tiles) const { return rows * tiles.pitch(); }
};
WinogradRows winograd_rows(const WinogradTiles& tiles, int64_t t0, int64_t width) {
  const int64_t ty0 = t0 / tiles.tws(), ty1 = (t0 + width - 1) / tiles.tws();
  return {ty0, ty1 - ty0 + 2};
}

// Elements of the staging buffer: the most rows a block stages (its tile rows and the
// one below), and slack for the last vector of tiles, whose patch columns 2 and 3 are two
// vectors loaded from staged column 2 t + 2: up to 2 kV - 2 elements past the rows.
int64_t winograd_staging_size(const WinogradTiles& tiles) {
  const int64_t rows = winograd_max_block_rows(tiles) + 1;
  return 2 * rows * tiles.pitch() + 3 * Vec::size();
}

// Stages `rows` (WinogradRows) of one input plane of the correlation p: row phase a,
// row r holds padded row 2 (rows.ty0 + r) + a, columns [0, pitch), zero outside the
// source; then zero slack up to `size`.
void winograd_stage_rows(const float* src, const DirectPlan& p, const WinogradTiles& tiles,
                         const WinogradRows& rows, int64_t size, float* dst) {
  const int64_t pitch = tiles.pitch();
  const int64_t j0 = std::clamp<int64_t>(p.pad_left, 0, pitch);
  const int64_t j1 = std::clamp<int64_t>(p.pad_left + p.src_w, j0, pitch);
  for (int64_t a = 0; a < 2; ++a) {
    for (int64_t r = 0; r < rows.rows; ++r) {
      float* row = dst + a * rows.phase_size(tiles) + r * pitch;
      const int64_t y = 2 * (rows.ty0 + r) + a - p.pad_top;
      if (y < 0 || y >= p.src_h) {
        std::fill(row, row + pitch, 0.f);
        continue;
      }
      std::fill(row, row + j0, 0.f);
      copy_row(src + y * p.src_w + (j0 - p.pad_left), j1 - j0, row + j0);
      std::fill(row + j1, row + pitch, 0.f);
    }
  }
  std::fill(dst + 2 * rows.phase_size(tiles), dst + size, 0.f);
}

// Elements between consecutive matrices V[xi] (of `channels` rows): one cache line more
// than the matrix, so that the 16 rows the input transform writes for one channel do not
// map to one L1 set, as they would 16 KB (a multiple of 4 KB) apart (the transform then
// took twice as long).
int64_t winograd_xi_stride(int64_t channels) { return channels * kWinogradBlock + 16; }

// Elements between the products of consecutive output channels, M[oc] = [16][tiles]; a
// line more than needed, for the same reason.
constexpr int64_t kWinogradProductStride = 16 * kWinogradBlock + 16;

// U[g][xi][oc][ic] = (G w[g * out_pg + oc][ic] G^T)[xi] for weights [groups * out_pg, in_pg,
// 3, 3] (dense), computed in double and rounded once.
Tensor winograd_weights(const Tensor& weights, int64_t groups, int64_t in_pg, int64_t out_pg) {
  Tensor u = at::empty({groups, 16, out_pg, in_pg}, weights.options());
  const float* w = weights.const_data_ptr<float>();
  float* dst = u.data_ptr<float>();
  at::parallel_for(0, groups * out_pg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t go = begin; go < end; ++go) {
      const int64_t g = go / out_pg, oc = go % out_pg;
      for (int64_t ic = 0; ic < in_pg; ++ic) {
        const float* k = w + (go * in_pg + ic) * 9;
        double gk[4][3];  // G w
        for (int c = 0; c < 3; ++c) {
          const double top = k[c], mid = k[3 + c], bottom = k[6 + c];
          gk[0][c] = top;
          gk[1][c] = (top + mid + bottom) / 2;
          gk[2][c] = (top - mid + bottom) / 2;
          gk[3][c] = bottom;
        }
        for (int r = 0; r < 4; ++r) {  // (G w) G^T
          const double left = gk[r][0], mid = gk[r][1], right = gk[r][2];
          const double row[4] = {left, (left + mid + right) / 2, (left - mid + right) / 2, right};
          for (int c = 0; c < 4; ++c) {
            dst[((g * 16 + r * 4 + c) * out_pg + oc) * in_pg + ic] = static_cast<float>(row[c]);
          }
        }
      }
    }
  });
  return u;
}

// Asks for the source rows that winograd_stage_rows will read, one plane ahead: the rows
// of consecutive channels are 4 KB and more apart, a pattern the hardware prefetchers do
// not follow (1 thread, ResNet's 3x3 forward 6.9 -> 5.8 ms). The rows of a plane are one
// contiguous range. An asm statement, as GCC 12 compiled __builtin_prefetch and
// _mm_prefetch to nothing here.
void prefetch_rows(const float* plane, const DirectPlan& p, const WinogradRows& rows) {
  const int64_t y0 = std::clamp<int64_t>(2 * rows.ty0 - p.pad_top, 0, p.src_h);
  const int64_t y1 = std::clamp<int64_t>(2 * (rows.ty0 + rows.rows) - p.pad_top, y0, p.src_h);
  const char* begin = reinterpret_cast<const char*>(plane + y0 * p.src_w);
  const char* end = reinterpret_cast<const char*>(plane + y1 * p.src_w);
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  for (const char* line = begin; line < end; line += 64) {
    asm volatile("prefetcht0 %0" : : "m"(*line));
  }
#else
  (void)begin, (void)end;
#endif
}

// V[xi][ic][t - t0] = (B^T d B)[xi] for tiles t in [t0, t0 + width) rounded up to whole
// vectors, from `channels` input planes of the correlation p (in_plane apart); `staged`
// holds winograd_staging_size elements.
void winograd_input_tiles(const DirectPlan& p, const WinogradTiles& tiles, const float* input,
                          int64_t channels, int64_t in_plane, int64_t t0, int64_t width,
                          float* staged, float* v) {
  constexpr int64_t kV = Vec::size();
  const WinogradRows block_rows = winograd_rows(tiles, t0, width);
  const int64_t pitch = tiles.pitch(), phase = block_rows.phase_size(tiles);
  const int64_t xi_stride = winograd_xi_stride(channels);
  // Patch row i of tile t starts at rows[i] + 2 (t - first): padded row 2 ty + i.
  const float* rows[4] = {staged, staged + phase, staged + pitch, staged + phase + pitch};
  const int64_t first = block_rows.ty0 * tiles.tws();
  for (int64_t ic = 0; ic < channels; ++ic) {
    if (ic + 1 < channels) prefetch_rows(input + (ic + 1) * in_plane, p, block_rows);
    winograd_stage_rows(input + ic * in_plane, p, tiles, block_rows,
                        winograd_staging_size(tiles), staged);
    float* v_ic = v + ic * kWinogradBlock;
    for (int64_t t = 0; t < width; t += kV) {
      Vec r[4][4];  // d B: row i of the patches times B
      for (int i = 0; i < 4; ++i) {
        const float* src = rows[i] + 2 * (t0 + t - first);
        const auto [d0, d1] = at::vec::deinterleave2(Vec::loadu(src), Vec::loadu(src + kV));
        const auto [d2, d3] =
            at::vec::deinterleave2(Vec::loadu(src + 2), Vec::loadu(src + 2 + kV));
        r[i][0] = d0 - d2;
        r[i][1] = d1 + d2;
        r[i][2] = d2 - d1;
        r[i][3] = d1 - d3;
      }
      for (int c = 0; c < 4; ++c) {  // B^T (d B)
        (r[0][c] - r[2][c]).store(v_ic + (0 * 4 + c) * xi_stride + t);
        (r[1][c] + r[2][c]).store(v_ic + (1 * 4 + c) * xi_stride + t);
        (r[2][c] - r[1][c]).store(v_ic + (2 * 4 + c) * xi_stride + t);
        (r[1][c] - r[3][c]).store(v_ic + (3 * 4 + c) * xi_stride + t);
      }
    }
  }
}

// The outputs of tiles [t0, t0 + width) from their products M[oc][xi][t - t0]:
// out[oc] = act(A^T M A + bias[oc]), written into the output planes (p's out_h x out_w).
// Returns the lane-wise sum of every A^T M A times zero: not zero iff one is inf or NaN.
template <typename Fn>
Vec winograd_output_tiles(const Fn& fn, const DirectPlan& p, const WinogradTiles& tiles,
                          const float* m, int64_t channels, int64_t t0, int64_t width,
                          const float* bias, float* out) {
  constexpr int64_t kV = Vec::size();
  const int64_t tws = tiles.tws(), out_plane = p.out_h * p.out_w;
  const Vec zero(0.f);
  Vec non_finite(0.f);
  // Row `dst` of a tile row's outputs: its tiles' left and right columns, interleaved.
  const auto store_row = [&](const Vec& left, const Vec& right, float* dst, int64_t count) {
    const auto [lo, hi] = at::vec::interleave2(left, right);
    if (count >= 2 * kV) {
      lo.store(dst);
      hi.store(dst + kV);
    } else if (count > kV) {
      lo.store(dst);
      hi.store(dst + kV, static_cast<int>(count - kV));
    } else {
      lo.store(dst, static_cast<int>(count));
    }
  };
  for (int64_t oc = 0; oc < channels; ++oc) {
    const float* m_oc = m + oc * kWinogradProductStride;
    float* out_oc = out + oc * out_plane;
    const Vec b(bias ? bias[oc] : 0.f);
    for (int64_t ty = t0 / tws; ty * tws < t0 + width; ++ty) {
      const int64_t row_t = ty * tws;
      const int64_t tx_end = std::min(t0 + width, row_t + tiles.tw) - row_t;
      for (int64_t tx = std::max(t0, row_t) - row_t; tx < tx_end; tx += kV) {
        const int count = static_cast<int>(std::min(kV, tx_end - tx));
        const float* m_t = m_oc + row_t + tx - t0;
        Vec s0[4], s1[4];  // M A: row i of the products times A
        for (int i = 0; i < 4; ++i) {
          Vec mi[4];
          for (int c = 0; c < 4; ++c) {
            const float* src = m_t + (i * 4 + c) * kWinogradBlock;
            mi[c] = count == kV ? Vec::loadu(src) : Vec::loadu(src, count);
          }
          s0[i] = mi[0] + mi[1] + mi[2];
          s1[i] = mi[1] - mi[2] - mi[3];
        }
        const Vec y00 = s0[0] + s0[1] + s0[2], y01 = s1[0] + s1[1] + s1[2];
        const Vec y10 = s0[1] - s0[2] - s0[3], y11 = s1[1] - s1[2] - s1[3];
        non_finite = at::vec::fmadd(y00 + y01 + y10 + y11, zero, non_finite);
        const int64_t oy = 2 * ty, ox = 2 * tx;
        const int64_t columns = std::min(2 * int64_t{count}, p.out_w - ox);
        float* dst = out_oc + oy * p.out_w + ox;
        store_row(fn.forward(y00 + b), fn.forward(y01 + b), dst, columns);
        if (oy + 1 < p.out_h) {
          store_row(fn.forward(y10 + b), fn.forward(y11 + b), dst + p.out_w, columns);
        }
      }
    }
  }
  return non_finite;
}

// implicit_correlation's result by Winograd (use_winograd(p, ...)); `weights` [groups *
// out_pg, in_pg * 9], dense. Tasks are (sample, group, chunk of tile blocks), as in
// implicit_forward_pixels. Returns false, with the output partly written, where some sum
// is not finite.
template <typename Fn>
bool winograd_correlation(const Fn& fn, const DirectPlan& p, int64_t batch, int64_t groups,
                          int64_t in_pg, int64_t out_pg, const float* input, const Tensor& weights,
                          const float* bias, float* output) {
  const WinogradTiles tiles = winograd_tiles(p);
  const int64_t in_plane = p.src_h * p.src_w, out_plane = p.out_h * p.out_w;
  const int64_t blocks = ceil_div(tiles.count(), kWinogradBlock);
  const int64_t chunks = chunks_for(batch * groups, blocks);
  const int64_t chunk_blocks = ceil_div(blocks, chunks);
  const int64_t xi_stride = winograd_xi_stride(in_pg);
  const Tensor u = winograd_weights(weights, groups, in_pg, out_pg);
  const float* u_data = u.const_data_ptr<float>();
  std::atomic<bool> all_finite_sums{true};
  at::parallel_for(0, batch * groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> staged(winograd_staging_size(tiles));
    // Zeroed once: the GEMM reads whole register-tile strips of V, past a last block's
    // tiles (their products are never stored), and these must not be NaN or subnormal.
    std::vector<float> v(16 * xi_stride, 0.f);
    std::vector<float> m(out_pg * kWinogradProductStride);
    Vec non_finite(0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ng = task / chunks, g = ng % groups;
      const int64_t b0 = (task % chunks) * chunk_blocks, b1 = std::min(blocks, b0 + chunk_blocks);
      if (b0 >= b1) continue;
      const float* in = input + ng * in_pg * in_plane;  // (n, g) planes are consecutive
      const float* u_g = u_data + g * 16 * out_pg * in_pg;
      const float* bias_g = bias ? bias + g * out_pg : nullptr;
      float* out = output + ng * out_pg * out_plane;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t t0 = blk * kWinogradBlock;
        const int64_t width = std::min(kWinogradBlock, tiles.count() - t0);
        winograd_input_tiles(p, tiles, in, in_pg, in_plane, t0, width, staged.data(), v.data());
        for (int64_t xi = 0; xi < 16; ++xi) {
          float* m_xi = m.data() + xi * kWinogradBlock;
          gemm::gemm_tiles(out_pg, width, in_pg, u_g + xi * out_pg * in_pg,
                           gemm::StridedRows{in_pg}, v.data() + xi * xi_stride,
                           gemm::StridedRows{kWinogradBlock}, /*b_padded=*/true,
                           [&](const auto& acc, int64_t row0, int rows, int64_t col0,
                               int64_t cols) {
                             gemm::store_tile(acc, rows, cols,
                                              m_xi + row0 * kWinogradProductStride + col0,
                                              kWinogradProductStride,
                                              [](int, Vec x) { return x; });
                           });
        }
        non_finite = non_finite + winograd_output_tiles(fn, p, tiles, m.data(), out_pg, t0,
                                                        width, bias_g, out);
      }
    }
    if (cpu::detail::lane_sum(non_finite) != 0.f) all_finite_sums = false;  // NaN != 0
  });
  return all_finite_sums;
}

bool all_finite(const Tensor& t);  // with the entry points below

// The weight gradient of the same correlation: Y = A^T [U .* V] A with U = G w G^T makes
// dU[xi] = sum over tiles of (A dY A^T)[xi] * V[xi], and dw = G^T dU G. Per block and xi,
// dU^T [in_pg x out_pg] += V [in_pg x tiles] @ Q^T [tiles x out_pg]: the register-tile
// GEMM again, with Q^T computed from grad_output transposed to [pixel][channel], so that
// a tile's 16 values are whole vectors of channels. Samples are summed in the fixed batch
// ranges of the other weight-gradient paths, each range in order: the same bits for any
// thread count.

// Elements between the matrices Q^T[xi] ([tiles][ldq]), a line more than their size for
// the reason given at winograd_xi_stride.
int64_t winograd_qt_stride(int64_t ldq) { return kWinogradBlock * ldq + 16; }

// Q^T[xi][t - t0][oc] = (A dY A^T)[xi] of tiles t in [t0, t0 + width), dY the tile's 2x2
// block of grad_output (zero past the plane's edges, and for the dropped tile of each
// row). `go_t` holds grad_output's rows from 2 * ty0 on as [pixel][ldq].
void winograd_grad_output_tiles(const DirectPlan& p, const WinogradTiles& tiles,
                                const float* go_t, int64_t ty0, int64_t ldq, int64_t t0,
                                int64_t width, float* qt) {
  constexpr int64_t kV = Vec::size();
  const int64_t xi_stride = winograd_qt_stride(ldq);
  const Vec zero(0.f);
  for (int64_t t = t0; t < t0 + width; ++t) {
    float* q_t = qt + (t - t0) * ldq;
    const int64_t ty = t / tiles.tws(), tx = t % tiles.tws();
    if (tx == tiles.tw) {
      for (int64_t xi = 0; xi < 16; ++xi) {
        std::fill(q_t + xi * xi_stride, q_t + xi * xi_stride + ldq, 0.f);
      }
      continue;
    }
    const int64_t oy = 2 * ty, ox = 2 * tx;
    const bool right = ox + 1 < p.out_w, below = oy + 1 < p.out_h;
    const float* top = go_t + ((oy - 2 * ty0) * p.out_w + ox) * ldq;
    const float* bottom = top + p.out_w * ldq;
    for (int64_t c = 0; c < ldq; c += kV) {
      const Vec g00 = Vec::loadu(top + c), g01 = right ? Vec::loadu(top + ldq + c) : zero;
      const Vec g10 = below ? Vec::loadu(bottom + c) : zero;
      const Vec g11 = right && below ? Vec::loadu(bottom + ldq + c) : zero;
      // A dY, column by column
      const Vec h[4][2] = {{g00, g01}, {g00 + g10, g01 + g11}, {g00 - g10, g01 - g11},
                           {zero - g10, zero - g11}};
      for (int i = 0; i < 4; ++i) {  // (A dY) A^T
        float* q = q_t + i * 4 * xi_stride + c;
        h[i][0].store(q);
        (h[i][0] + h[i][1]).store(q + xi_stride);
        (h[i][0] - h[i][1]).store(q + 2 * xi_stride);
        (zero - h[i][1]).store(q + 3 * xi_stride);
      }
    }
  }
}

// grad_weight of a 3x3 stride-1 convolution (use_winograd(forward plan, ...)). Returns
// false, writing nothing, where some sum is not finite.
bool winograd_backward_weight(const ConvShape& s, const DirectPlan& p, const float* input,
                              const float* grad_output, const Tensor& grad_weight) {
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group();
  const int64_t in_plane = s.in_plane(), out_plane = s.out_plane();
  const WinogradTiles tiles = winograd_tiles(p);
  const int64_t blocks = ceil_div(tiles.count(), kWinogradBlock);
  const int64_t ldq = round_up(out_pg, kStrip);  // Q^T's row: whole register-tile strips
  const int64_t xi_stride = winograd_xi_stride(in_pg);
  // grad_output rows a block's tiles read: two per tile row
  const int64_t max_rows = 2 * winograd_max_block_rows(tiles);
  const int64_t ranges = std::min<int64_t>(s.batch, kWeightGradRanges);
  // dU^T per range and group: [16][in_pg][ldq]
  Tensor partial = at::zeros({ranges, s.groups, 16, in_pg, ldq}, grad_weight.options());
  float* partial_data = partial.data_ptr<float>();
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> staged(winograd_staging_size(tiles));
    std::vector<float> v(16 * xi_stride, 0.f);
    std::vector<float> go_t(max_rows * s.out_w * ldq, 0.f);  // padding columns stay zero
    std::vector<float> qt(16 * winograd_qt_stride(ldq));
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t n = r * s.batch / ranges; n < (r + 1) * s.batch / ranges; ++n) {
        for (int64_t g = 0; g < s.groups; ++g) {
          const float* in = input + (n * s.in_channels + g * in_pg) * in_plane;
          const float* grad = grad_output + (n * s.out_channels + g * out_pg) * out_plane;
          float* sums = partial_data + (r * s.groups + g) * 16 * in_pg * ldq;
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t t0 = blk * kWinogradBlock;
            const int64_t width = std::min(kWinogradBlock, tiles.count() - t0);
            // the block's tile rows: rows.rows - 1 of them (winograd_rows stages one more)
            const WinogradRows rows = winograd_rows(tiles, t0, width);
            const int64_t oy0 = 2 * rows.ty0;
            const int64_t oy1 = std::min(s.out_h, oy0 + 2 * (rows.rows - 1));
            transpose_rows(grad + oy0 * s.out_w, out_plane, out_pg, (oy1 - oy0) * s.out_w,
                           go_t.data(), ldq);
            winograd_grad_output_tiles(p, tiles, go_t.data(), rows.ty0, ldq, t0, width,
                                       qt.data());
            winograd_input_tiles(p, tiles, in, in_pg, in_plane, t0, width, staged.data(),
                                 v.data());
            for (int64_t xi = 0; xi < 16; ++xi) {
              float* sums_xi = sums + xi * in_pg * ldq;
              gemm::gemm_tiles(in_pg, out_pg, width, v.data() + xi * xi_stride,
                               gemm::StridedRows{kWinogradBlock},
                               qt.data() + xi * winograd_qt_stride(ldq), gemm::StridedRows{ldq},
                               /*b_padded=*/true,
                               [&](const auto& acc, int64_t row0, int rows, int64_t col0,
                                   int64_t cols) {
                                 gemm::accumulate_tile(acc, rows, cols,
                                                       sums_xi + row0 * ldq + col0, ldq);
                               });
            }
          }
        }
      }
    }
  });
  const Tensor total = partial.sum(0);  // [groups, 16, in_pg, ldq], ranges in order
  if (!all_finite(total)) return false;
  const float* du = total.const_data_ptr<float>();
  // dw = G^T dU G, in double, rounded once
  constexpr double kG[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  float* dw = grad_weight.data_ptr<float>();
  at::parallel_for(0, s.groups * out_pg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t go = begin; go < end; ++go) {
      const int64_t g = go / out_pg, oc = go % out_pg;
      for (int64_t ic = 0; ic < in_pg; ++ic) {
        double u[4][4];
        for (int xi = 0; xi < 16; ++xi) {
          u[xi / 4][xi % 4] = du[((g * 16 + xi) * in_pg + ic) * ldq + oc];
        }
        for (int a = 0; a < 3; ++a) {
          for (int b = 0; b < 3; ++b) {
            double sum = 0;
            for (int i = 0; i < 4; ++i) {
              for (int j = 0; j < 4; ++j) sum += kG[i][a] * u[i][j] * kG[j][b];
            }
            dw[(go * in_pg + ic) * 9 + a * 3 + b] = static_cast<float>(sum);
          }
        }
      }
    }
  });
  return true;
}

// The correlation of implicit_forward (`weights` [groups * out_pg, k], dense), in
// pixel tiles where use_pixel_tiles says they fit.
template <typename Fn>
void implicit_correlation(const Fn& fn, const DirectPlan& p, int64_t batch, int64_t groups,
                          int64_t in_pg, int64_t out_pg, const float* input, const Tensor& weights,
                          const float* bias, float* output) {
  if (use_winograd(p, in_pg, out_pg) &&
      winograd_correlation(fn, p, batch, groups, in_pg, out_pg, input, weights, bias, output)) {
    return;
  }
  if (use_pixel_tiles(out_pg)) {
    const int64_t k = in_pg * p.kernel_h * p.kernel_w;
    const Tensor weights_t = weights.view({groups, out_pg, k}).transpose(1, 2).contiguous();
    implicit_forward_pixels(fn, p, batch, groups, in_pg, out_pg, input,
                            weights_t.const_data_ptr<float>(), bias, output);
  } else {
    implicit_forward(fn, p, batch, groups, in_pg, out_pg, input, weights.const_data_ptr<float>(),
                     bias, output);
  }
}

// ---- float32, stride 2: the input gradient by phases -------------------------------------
// With stride s, input position ih = s * q + r - pad (r in [0, s)) receives only the taps k
// with k * dilation = r (mod s), each from output position q - (k * dilation - r) / s. So
// each phase (r_h, r_w) of the input gradient is a stride-1 correlation of grad_output with
// that phase's taps, flipped, channels swapped: implicit_correlation on a plan of its own,
// into a phase buffer then interleaved into grad_input. Each element is summed once, in
// registers, with bias + activation in the epilogue, where col2im adds every tap's product
// into memory; and no product is computed for a tap that does not reach the element.
// Used where input_grad_by_phases says it pays.

// One axis of one phase.
struct PhaseAxis {
  std::vector<int64_t> taps;  // the phase's kernel indices, last first (the flipped order)
  int64_t first_q = 0;        // the first q whose position s * q + r - pad is inside
  int64_t count = 0;          // the phase's positions inside [0, in_size)
  int64_t pad = 0;            // the correlation plan's padding of grad_output
};

PhaseAxis phase_axis(int64_t r, int64_t stride, int64_t kernel, int64_t dilation, int64_t pad,
                     int64_t in_size) {
  PhaseAxis axis;
  for (int64_t k = kernel - 1; k >= 0; --k) {
    if (k * dilation % stride == r) axis.taps.push_back(k);
  }
  axis.first_q = first_index_reaching(0, r - pad, stride);
  axis.count = std::max<int64_t>(0, first_index_reaching(in_size, r - pad, stride) - axis.first_q);
  // Tap a (spaced by dilation in the flipped order) of output i must read grad_output
  // position first_q + i - (taps[a] * dilation - r) / stride = i + a * dilation - pad.
  axis.pad = (axis.taps.front() * dilation - r) / stride - axis.first_q;
  return axis;
}

// Where the phases pay (1 thread, measured): every phase at least 2 taps along a strided
// axis and at least 32 written channels (pixel tiles). conv_transpose2d k4 s2, 64 -> 32
// channels on 28x28: 3.84 -> 2.24 ms, 64 -> 64: 6.56 -> 4.22 ms; but 3 written channels
// (the 7x7 stem's input gradient) 2.9 -> 4.8 ms, and one-tap phases (3x3, stride 2, ResNet's
// 128 -> 64 input gradient) 5.5 -> 6.1 ms, where col2im stays.
bool input_grad_by_phases(const ConvShape& s) {
  const auto axis_pays = [](int64_t stride, int64_t kernel) { return stride == 1 || kernel >= 4; };
  return (s.stride_h == 2 || s.stride_w == 2) && implicit_gemm_reads_input(s) &&
         axis_pays(s.stride_h, s.kernel_h) && axis_pays(s.stride_w, s.kernel_w) &&
         s.in_per_group() >= 32;
}

template <typename Fn>
void phases_backward_input(const Fn& fn, const ConvShape& s, const float* go,
                           const Tensor& weight, const float* bias, float* gi) {
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group();
  const float* w = weight.const_data_ptr<float>();
  for (int64_t rh = 0; rh < s.stride_h; ++rh) {
    const PhaseAxis ah = phase_axis(rh, s.stride_h, s.kernel_h, s.dilation_h, s.pad_h, s.in_h);
    for (int64_t rw = 0; rw < s.stride_w; ++rw) {
      const PhaseAxis aw = phase_axis(rw, s.stride_w, s.kernel_w, s.dilation_w, s.pad_w, s.in_w);
      if (ah.count == 0 || aw.count == 0) continue;
      const int64_t th = static_cast<int64_t>(ah.taps.size());
      const int64_t tw = static_cast<int64_t>(aw.taps.size());
      // [groups * in_pg, out_pg * th * tw]: the phase's taps, flipped, channels swapped.
      Tensor phase_weight = at::empty({s.groups * in_pg, out_pg * th * tw}, weight.options());
      float* pw = phase_weight.data_ptr<float>();
      for (int64_t g = 0; g < s.groups; ++g) {
        for (int64_t ic = 0; ic < in_pg; ++ic) {
          for (int64_t oc = 0; oc < out_pg; ++oc) {
            const float* w_pair =
                w + ((g * out_pg + oc) * in_pg + ic) * s.kernel_h * s.kernel_w;
            float* dst = pw + ((g * in_pg + ic) * out_pg + oc) * th * tw;
            for (int64_t a = 0; a < th; ++a) {
              for (int64_t b = 0; b < tw; ++b) {
                dst[a * tw + b] = w_pair[ah.taps[a] * s.kernel_w + aw.taps[b]];
              }
            }
          }
        }
      }
      const DirectPlan plan{s.out_h, s.out_w,  ah.pad,       aw.pad,      ah.count,
                            aw.count, th,      tw,           s.dilation_h, s.dilation_w};
      Tensor phase = at::empty({s.batch, s.in_channels, ah.count, aw.count}, weight.options());
      implicit_correlation(fn, plan, s.batch, s.groups, out_pg, in_pg, go, phase_weight, bias,
                           phase.data_ptr<float>());
      // grad_input[.., s * (first_q + i) + r - pad, ..] = phase[.., i, ..]
      const float* src = phase.const_data_ptr<float>();
      const int64_t phase_plane = ah.count * aw.count, in_plane = s.in_plane();
      const int64_t row0 = s.stride_h * ah.first_q + rh - s.pad_h;
      const int64_t col0 = s.stride_w * aw.first_q + rw - s.pad_w;
      at::parallel_for(0, s.batch * s.in_channels, 16, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          for (int64_t i = 0; i < ah.count; ++i) {
            const float* src_row = src + plane * phase_plane + i * aw.count;
            float* dst = gi + plane * in_plane + (row0 + s.stride_h * i) * s.in_w + col0;
            for (int64_t j = 0; j < aw.count; ++j) dst[s.stride_w * j] = src_row[j];
          }
        }
      });
    }
  }
}

// grad_weight_g^T [k, out_pg] = sum_n (implicit im2col of input[n, g]) @ grad_output[n, g]^T,
// in chunks of whole output rows: each chunk of grad_output is transposed into B, and the
// reduction runs over the real columns of each wide row only (a discarded column pairs
// input values that no term of the convolution pairs: 0 * inf would leak NaN). Batch
// ranges and their order as in sgemm_backward_weight.
void implicit_backward_weight(const ConvShape& s, const DirectPlan& p, const float* input,
                              const float* grad_output, const Tensor& grad_weight) {
  constexpr int64_t kChunk = 256;  // reduced columns per B block (kChunk x ldb floats)
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t stride = staged_stride<float>(p), wp = p.staged_w();
  const int64_t in_plane = s.in_plane(), out_plane = s.out_plane();
  const int64_t ldb = round_up(out_pg, kStrip);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunk / s.out_w);
  const std::vector<int64_t> offsets = tap_offsets(p, in_pg, stride);
  const int64_t ranges = std::min<int64_t>(s.batch, kWeightGradRanges);
  Tensor partial = at::zeros({ranges, s.groups, k, out_pg}, grad_weight.options());
  float* partial_data = partial.data_ptr<float>();
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> staged(in_pg * stride);
    std::vector<float> grad_t(rows_per_chunk * s.out_w * ldb, 0.f);  // padding stays zero
    std::vector<gemm::Run> runs(rows_per_chunk);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t n = r * s.batch / ranges; n < (r + 1) * s.batch / ranges; ++n) {
        for (int64_t g = 0; g < s.groups; ++g) {
          stage_planes(input + (n * s.in_channels + g * in_pg) * in_plane, in_pg, in_plane, p,
                       staged.data());
          const float* grad = grad_output + (n * s.out_channels + g * out_pg) * out_plane;
          float* sums = partial_data + (r * s.groups + g) * k * out_pg;
          for (int64_t oh0 = 0; oh0 < s.out_h; oh0 += rows_per_chunk) {
            const int64_t chunk_rows = std::min(rows_per_chunk, s.out_h - oh0);
            const int64_t columns = chunk_rows * s.out_w;  // contiguous in each grad plane
            transpose_rows(grad + oh0 * s.out_w, out_plane, out_pg, columns, grad_t.data(), ldb);
            for (int64_t row = 0; row < chunk_rows; ++row) {
              runs[row] = gemm::Run{(oh0 + row) * wp, s.out_w};
            }
            gemm::gemm_tiles_runs(k, out_pg, staged.data(), gemm::TableRows{offsets.data()},
                                  runs.data(), chunk_rows, grad_t.data(), ldb,
                                  [&](const auto& acc, int64_t row0, int rows, int64_t col0,
                                      int64_t ncols) {
                                    gemm::accumulate_tile(acc, rows, ncols,
                                                          sums + row0 * out_pg + col0, out_pg);
                                  });
          }
        }
      }
    }
  });
  grad_weight.view({s.groups, out_pg, k}).copy_(partial.sum(0).transpose(1, 2));
}

// ---- Entry points ------------------------------------------------------------------------

// The direct path's backward passes and the stride-1 input-gradient paths run over padded
// planes: they also multiply the zero padding of one operand by values of the other that
// no term of the convolution pairs (the input under the gradient's padding columns, the
// flipped kernel over the gradient's border). Zero times a finite value adds nothing; zero
// times inf or NaN would leak NaN where the convolution has none. Such operands take a
// path that multiplies only the pairs the convolution defines.
// x * 0 is 0 for finite x and NaN for inf or NaN: one read of `t`, no temporaries (an
// at::isfinite(t).all() costs several passes and allocations, as much as the backward of
// a depthwise layer). `t` is dense.
bool all_finite(const Tensor& t) {
  bool finite = true;
  PYOPS_DISPATCH_FLOATING(t.scalar_type(), "pyops_conv_all_finite", [&] {
    using Acc = opmath_t<scalar_t>;
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    std::atomic<bool> seen_non_finite{false};
    at::parallel_for(0, t.numel(), cpu::kGrainSize, [&](int64_t begin, int64_t end) {
      // Four independent vector sums: one scalar sum is a chain of dependent adds (as
      // costly as a depthwise layer's weight gradient for its input).
      using Vec = Vectorized<Acc>;
      constexpr int64_t kV = Vec::size();
      Vec z0(Acc(0)), z1(Acc(0)), z2(Acc(0)), z3(Acc(0));
      const Vec zero(Acc(0));
      int64_t i = begin;
      if constexpr (std::is_same_v<scalar_t, Acc>) {
        for (; i + 4 * kV <= end; i += 4 * kV) {
          z0 = at::vec::fmadd(Vec::loadu(data + i), zero, z0);
          z1 = at::vec::fmadd(Vec::loadu(data + i + kV), zero, z1);
          z2 = at::vec::fmadd(Vec::loadu(data + i + 2 * kV), zero, z2);
          z3 = at::vec::fmadd(Vec::loadu(data + i + 3 * kV), zero, z3);
        }
      }
      Acc zero_if_finite = cpu::detail::lane_sum((z0 + z1) + (z2 + z3));
      for (; i < end; ++i) zero_if_finite += static_cast<Acc>(data[i]) * Acc(0);
      if (zero_if_finite != Acc(0)) seen_non_finite = true;  // NaN compares unequal
    });
    finite = !seen_non_finite;
  });
  return finite;
}

DirectPlan forward_plan(const ConvShape& s) {
  return DirectPlan{s.in_h,       s.in_w,       s.pad_h,    s.pad_w,    s.out_h,    s.out_w,
                    s.kernel_h,   s.kernel_w,   s.dilation_h, s.dilation_w, s.stride_h,
                    s.stride_w};
}

// The path of one pass. `in_pg`/`out_pg` are the channels per group as the pass reads
// and writes them (swapped for the input gradient). It depends on the shape and dtype
// only, not on the thread count, so neither do the result's bits.
enum class Path { kDirect, kImplicitGemm, kPackedGemm, kAtenGemm };

// `implicit`: whether the implicit GEMM serves this pass of this shape.
template <typename T>
Path choose_path(const ConvShape& s, int64_t in_pg, int64_t out_pg, bool implicit) {
  if (use_direct(in_pg, out_pg, s.stride_h, s.stride_w)) return Path::kDirect;
  if constexpr (std::is_same_v<T, float>) {
    return implicit ? Path::kImplicitGemm : Path::kPackedGemm;
  }
  return Path::kAtenGemm;
}

// The path of a pass that is a correlation writing out_pg channels per group: the forward
// and the input gradient. The direct path computes one written channel at a time, one
// load of the staged input per multiply-add; the implicit GEMM computes kRows written
// channels per register tile from each load. So with float32 and more written channels
// than use_direct's bound, the GEMM wins even over few read channels (the seed network's
// conv1, 1 -> 32 channels: forward 0.46 -> 0.39 ms, 1 thread).
template <typename T>
Path correlation_path(const ConvShape& s, int64_t in_pg, int64_t out_pg, bool implicit) {
  if (std::is_same_v<T, float> && implicit && out_pg > kDirectMaxChannels) {
    return Path::kImplicitGemm;
  }
  return choose_path<T>(s, in_pg, out_pg, implicit);
}

// With stride 1 the input gradient is a correlation of grad_output with the flipped
// kernel, channels swapped within each group, padded by dilation * (kernel - 1) - pad
// (negative: cropped). These are that correlation's weights, [groups * in_pg, out_pg, kh, kw].
template <typename Acc>
Tensor flipped_weights(const ConvShape& s, const Tensor& weight) {
  return weight.to(c10::CppTypeToScalarType<Acc>::value)
      .view({s.groups, s.out_per_group(), s.in_per_group(), s.kernel_h, s.kernel_w})
      .transpose(1, 2)
      .flip({3, 4})
      .contiguous();
}

DirectPlan input_grad_plan(const ConvShape& s) {
  return DirectPlan{s.out_h,
                    s.out_w,
                    s.dilation_h * (s.kernel_h - 1) - s.pad_h,
                    s.dilation_w * (s.kernel_w - 1) - s.pad_w,
                    s.in_h,
                    s.in_w,
                    s.kernel_h,
                    s.kernel_w,
                    s.dilation_h,
                    s.dilation_w};
}

void forward(const ConvShape& s, const Tensor& input, const Tensor& weight, const Tensor& bias,
             Activation act, double slope, const Tensor& output) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_conv2d_forward_cpu", [&] {
    using Acc = opmath_t<scalar_t>;
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const Path path = correlation_path<scalar_t>(s, s.in_per_group(), s.out_per_group(),
                                                 implicit_gemm_reads_input(s));
    visit_activation<Acc>(act, slope, [&](auto fn) {
      if (path == Path::kDirect) {
        const Tensor w = weight.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
        direct_forward<scalar_t>(fn, forward_plan(s), s.batch, s.groups, s.in_per_group(),
                                 s.out_per_group(), input.const_data_ptr<scalar_t>(),
                                 w.const_data_ptr<Acc>(), b, output.data_ptr<scalar_t>());
      } else if (path == Path::kAtenGemm) {
        gemm_forward<scalar_t>(fn, s, input, weight, b, output);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        const float* in = input.const_data_ptr<float>();
        const float* w = weight.const_data_ptr<float>();
        if (path == Path::kImplicitGemm) {
          implicit_correlation(fn, forward_plan(s), s.batch, s.groups, s.in_per_group(),
                               s.out_per_group(), in, weight, b, output.data_ptr<float>());
        } else {
          sgemm_forward(fn, s, in, w, b, output.data_ptr<float>());
        }
      }
    });
  });
}

void backward_input(const ConvShape& s, const Tensor& grad_output, const Tensor& weight,
                    const Tensor& bias, Activation act, double slope, const Tensor& grad_input) {
  PYOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "pyops_conv2d_backward_input_cpu", [&] {
    using Acc = opmath_t<scalar_t>;
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    Path path = correlation_path<scalar_t>(
        s, s.out_per_group(), s.in_per_group(),
        implicit_gemm_writes_input_grad(s) || input_grad_by_phases(s));
    if ((path == Path::kDirect || path == Path::kImplicitGemm) && !all_finite(weight)) {
      path = std::is_same_v<scalar_t, float> ? Path::kPackedGemm : Path::kAtenGemm;
    }
    visit_activation<Acc>(act, slope, [&](auto fn) {
      if (path == Path::kDirect) {
        const Tensor w = flipped_weights<Acc>(s, weight);
        direct_forward<scalar_t>(fn, input_grad_plan(s), s.batch, s.groups, s.out_per_group(),
                                 s.in_per_group(), grad_output.const_data_ptr<scalar_t>(),
                                 w.const_data_ptr<Acc>(), b, grad_input.data_ptr<scalar_t>());
      } else if (path == Path::kAtenGemm) {
        gemm_backward_input<scalar_t>(fn, s, grad_output, weight, b, grad_input);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        if (path == Path::kImplicitGemm && !implicit_gemm_writes_input_grad(s)) {
          phases_backward_input(fn, s, grad_output.const_data_ptr<float>(), weight, b,
                                grad_input.data_ptr<float>());
        } else if (path == Path::kImplicitGemm) {
          const Tensor w = flipped_weights<float>(s, weight);
          implicit_correlation(fn, input_grad_plan(s), s.batch, s.groups, s.out_per_group(),
                               s.in_per_group(), grad_output.const_data_ptr<float>(), w, b,
                               grad_input.data_ptr<float>());
        } else {
          sgemm_backward_input(fn, s, grad_output.const_data_ptr<float>(), weight, b,
                               grad_input.data_ptr<float>());
        }
      }
    });
  });
}

void backward_weight(const ConvShape& s, const Tensor& input, const Tensor& grad_output,
                     const Tensor& grad_weight) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_conv2d_backward_weight_cpu", [&] {
    const bool implicit = implicit_gemm_reads_input(s);
    Path path = choose_path<scalar_t>(s, s.in_per_group(), s.out_per_group(), implicit);
    if (path == Path::kDirect && !all_finite(input)) {
      path = !std::is_same_v<scalar_t, float> ? Path::kAtenGemm
             : implicit                      ? Path::kImplicitGemm
                                             : Path::kPackedGemm;
    }
    if (path == Path::kDirect) {
      direct_backward_weight<scalar_t>(s, forward_plan(s), input.const_data_ptr<scalar_t>(),
                                       grad_output.const_data_ptr<scalar_t>(),
                                       grad_weight.data_ptr<scalar_t>());
    } else if (path == Path::kAtenGemm) {
      gemm_backward_weight<scalar_t>(s, input, grad_output, grad_weight);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      const float* in = input.const_data_ptr<float>();
      const float* go = grad_output.const_data_ptr<float>();
      if (path == Path::kImplicitGemm) {
        const DirectPlan p = forward_plan(s);
        if (use_winograd(p, s.in_per_group(), s.out_per_group()) &&
            winograd_backward_weight(s, p, in, go, grad_weight)) {
          return;
        }
        implicit_backward_weight(s, p, in, go, grad_weight);
      } else {
        sgemm_backward_weight(s, in, go, grad_weight);
      }
    }
  });
}

}  // namespace

PYOPS_REGISTER_CPU_KERNEL(forward_kernel, &forward);
PYOPS_REGISTER_CPU_KERNEL(backward_input_kernel, &backward_input);
PYOPS_REGISTER_CPU_KERNEL(backward_weight_kernel, &backward_weight);

}  // namespace CPU_CAPABILITY
}  // namespace pyops::conv
