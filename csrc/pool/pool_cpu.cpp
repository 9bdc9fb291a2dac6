// CPU kernels of the pooling family, compiled once per CPU capability (setup.py). Only
// loops and memory access live here; the window math is pool.h's.
//
// NCHW: parallel over planes (sample x channel); in a row of outputs whose windows lie
// wholly inside the input, kLanes consecutive outputs are reduced at once (their taps
// are `stride` elements apart: one load for stride 1, two and a deinterleave for
// stride 2, a gather otherwise); the edge outputs take the scalar path.
// Channels-last: parallel over output pixels; SIMD across channels.
// Backward: windows that tile the input write each grad_input element once; otherwise a
// scatter into a zero-filled plane (NCHW) or a gather across channels (channels-last).
// One task owns every element it writes.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec_convert.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_loops.h"
#include "pool/pool.h"

namespace pyops::pool {
inline namespace CPU_CAPABILITY {
namespace {

using at::Tensor;
using at::vec::Vectorized;

template <typename T>
using opmath_t = at::opmath_type<T>;

using cpu::kGrainSize;

#define PYOPS_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

template <typename T>
constexpr bool kReduced = !std::is_same_v<T, opmath_t<T>>;

// kLanes consecutive elements of T as Vectorized<Acc>, and back.
template <typename T>
inline Vectorized<opmath_t<T>> load_acc(const T* p) {
  if constexpr (kReduced<T>) {
    return std::get<0>(at::vec::convert_to_float<T>(
        Vectorized<T>::loadu(p, Vectorized<float>::size())));
  } else {
    return Vectorized<T>::loadu(p);
  }
}

template <typename T>
inline void store_acc(T* p, const Vectorized<opmath_t<T>>& v) {
  if constexpr (kReduced<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, Vectorized<float>::size());
  } else {
    v.store(p);
  }
}

// The channels-last gathers write a large grad_input once, in whole cache lines, and do
// not read it back: they stream it (cpu::may_stream). On the stem pool's 25.7 MB
// grad_input (1 thread), a quarter off both backwards, 6% off max and 18% off avg
// forward + backward.

// store_acc, streamed where `stream` (as cpu::may_stream_rows decided for p's tensor,
// rows being pixels).
template <typename T>
inline void store_acc_lines(T* p, const Vectorized<opmath_t<T>>& v, bool stream) {
  if constexpr (!kReduced<T>) {
    cpu::store_vector(p, v, stream);
  } else {
    store_acc(p, v);
  }
}

// Taps of kLanes consecutive outputs of one row: p[0], p[step], ..., p[(kLanes-1)*step].
// `pair_readable`: p[(kLanes-1)*step + 1] may be read too (the stride 2 path loads two
// whole vectors and keeps the even elements).
template <typename T>
inline Vectorized<opmath_t<T>> load_spaced(const T* p, int64_t step, bool pair_readable) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  if (step == 1) return load_acc(p);
  if constexpr (!kReduced<T>) {
    if (step == 2 && pair_readable) {
      return at::vec::deinterleave2(Vec::loadu(p), Vec::loadu(p + Vec::size())).first;
    }
  }
  alignas(64) Acc lanes[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) lanes[i] = static_cast<Acc>(p[i * step]);
  return Vec::loadu(lanes);
}

template <IndexKind K>
struct IndexType {
  using type = uint8_t;  // None (unused) and Offset8
};
template <>
struct IndexType<IndexKind::Offset32> {
  using type = int32_t;
};
template <>
struct IndexType<IndexKind::Flat64> {
  using type = int64_t;
};

// Outputs [lo, hi) of a row whose windows lie wholly inside [0, in_size).
TapRange interior_outputs(int64_t out_size, int64_t stride, int64_t pad, int64_t dilation,
                          int64_t kernel, int64_t in_size) {
  const int64_t lo = (pad + stride - 1) / stride;
  const int64_t last_start = in_size - 1 - (kernel - 1) * dilation + pad;
  const int64_t hi = last_start < 0 ? 0 : std::min(out_size, last_start / stride + 1);
  return {std::min(lo, hi), hi};
}

// The index of one output, as IndexKind K says; `offset` is the winning tap.
template <IndexKind K, typename Reduce, typename Acc>
inline typename IndexType<K>::type index_value(const Geometry& g, int64_t offset, Acc result,
                                               int64_t ih0, int64_t iw0) {
  using Index = typename IndexType<K>::type;
  if constexpr (K == IndexKind::Flat64) {
    const int64_t kh = offset / g.kernel_w, kw = offset - kh * g.kernel_w;
    return (ih0 + kh * g.dilation_h) * g.in_w + iw0 + kw * g.dilation_w;
  } else {
    if constexpr (Reduce::kRelu) {
      if (Reduce::blocks_gradient(result)) return kNoTap<Index>;
    }
    return static_cast<Index>(offset);
  }
}

// One output by the scalar path. `base` points at input (ih0, iw0) of the window's plane
// (NCHW) or at channel c of pixel (ih0, iw0) (channels-last); `col` and `row` are the
// element steps between input columns and rows.
template <IndexKind K, typename Reduce, typename T>
inline void arg_window_scalar(const Geometry& g, const T* base, int64_t col, int64_t row,
                              TapRange hr, TapRange wr, int64_t ih0, int64_t iw0, T* out,
                              typename IndexType<K>::type* index) {
  using Acc = opmath_t<T>;
  Acc best = Reduce::identity();
  int64_t best_offset = hr.begin * g.kernel_w + wr.begin;
  for (int64_t kh = hr.begin; kh < hr.end; ++kh) {
    const T* tap_row = base + kh * g.dilation_h * row;
    for (int64_t kw = wr.begin; kw < wr.end; ++kw) {
      const Acc v = static_cast<Acc>(tap_row[kw * g.dilation_w * col]);
      if (Reduce::replaces(v, best)) {
        best = v;
        best_offset = kh * g.kernel_w + kw;
      }
    }
  }
  const Acc result = window_is_empty(hr, wr) ? best : Reduce::finalize(best);
  *out = static_cast<T>(result);
  if constexpr (K != IndexKind::None) {
    *index = index_value<K, Reduce>(g, best_offset, result, ih0, iw0);
  }
}

// Writes the indices of kLanes outputs from the winning offsets (and results).
template <IndexKind K, typename Reduce, typename Acc>
inline void store_lane_indices(const Geometry& g, const Vectorized<Acc>& offsets,
                               const Vectorized<Acc>& results, int64_t ih0, int64_t iw0,
                               int64_t iw_step, typename IndexType<K>::type* index,
                               int64_t index_step) {
  constexpr int kLanes = Vectorized<Acc>::size();
  alignas(64) Acc offset_lanes[kLanes];
  if constexpr (K != IndexKind::Flat64) {
    // Tap offsets need no per-lane arithmetic: select kNoTap in the vector, then a plain
    // conversion loop (which the compiler vectorizes; the per-lane path did not).
    using Index = typename IndexType<K>::type;
    Vectorized<Acc> stored = offsets;
    if constexpr (Reduce::kRelu) {
      stored = math::where(Reduce::blocks_gradient(results),
                           Vectorized<Acc>(static_cast<Acc>(kNoTap<Index>)), offsets);
    }
    if constexpr (std::is_same_v<Index, uint8_t> && std::is_same_v<Acc, float>) {
      if (index_step == 1) {  // the common case: one vector conversion, a 16-byte store
        at::vec::convert<uint8_t>(stored).store(index, kLanes);
        return;
      }
    }
    stored.store(offset_lanes);
    for (int i = 0; i < kLanes; ++i) index[i * index_step] = static_cast<Index>(offset_lanes[i]);
    return;
  }
  alignas(64) Acc result_lanes[kLanes];
  offsets.store(offset_lanes);
  results.store(result_lanes);
  for (int i = 0; i < kLanes; ++i) {
    index[i * index_step] = index_value<K, Reduce>(g, static_cast<int64_t>(offset_lanes[i]),
                                                   result_lanes[i], ih0, iw0 + i * iw_step);
  }
}

// Taps at p[lane_offsets[i]] for the kLanes lanes (a hardware gather where there is one).
template <typename T>
inline Vectorized<opmath_t<T>> load_lanes(const T* p, const at::vec::int_same_size_t<opmath_t<T>>* lane_offsets) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  if constexpr (!kReduced<T>) {
    return at::vec::gather<sizeof(T)>(p, Vectorized<at::vec::int_same_size_t<Acc>>::loadu(lane_offsets));
  } else {
    alignas(64) Acc lanes[Vec::size()];
    for (int i = 0; i < Vec::size(); ++i) lanes[i] = static_cast<Acc>(p[lane_offsets[i]]);
    return Vec::loadu(lanes);
  }
}

// Output rows and columns whose pooling window lies wholly in the padding (a window is
// empty when its row or its column is).
std::pair<std::vector<char>, std::vector<char>> empty_windows(const Geometry& g) {
  std::vector<char> rows(g.out_h), cols(g.out_w);
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const TapRange r = valid_taps(oh, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.in_h);
    rows[oh] = r.begin >= r.end;
  }
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    const TapRange r = valid_taps(ow, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w);
    cols[ow] = r.begin >= r.end;
  }
  return {std::move(rows), std::move(cols)};
}

// The outputs of a plane split for the gather paths: those whose windows lie wholly inside
// the input (`inner_out`, with their window's first input `inner_in`), and the others
// (`edge_out`), as offsets within a plane. Shared by every plane.
template <typename Lane>
struct InteriorSplit {
  std::vector<int64_t> inner_out, edge_out;
  std::vector<Lane> inner_in;
};

template <typename Lane>
InteriorSplit<Lane> split_interior(const Geometry& g) {
  const TapRange rows =
      interior_outputs(g.out_h, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.in_h);
  const TapRange cols =
      interior_outputs(g.out_w, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w);
  InteriorSplit<Lane> split;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      if (oh >= rows.begin && oh < rows.end && ow >= cols.begin && ow < cols.end) {
        split.inner_out.push_back(oh * g.out_w + ow);
        split.inner_in.push_back(static_cast<Lane>((oh * g.stride_h - g.pad_h) * g.in_w +
                                                   ow * g.stride_w - g.pad_w));
      } else {
        split.edge_out.push_back(oh * g.out_w + ow);
      }
    }
  }
  return split;
}

// NCHW planes whose rows are too short for the row path (fewer than 2 * kLanes interior
// outputs): the outputs whose windows lie wholly inside the input are reduced kLanes at a
// time across rows, reading their taps by gather; the others take the scalar path.
template <IndexKind K, typename Reduce, typename T>
void arg_forward_nchw_gather(const Geometry& g, const T* input, T* output,
                             typename IndexType<K>::type* indices) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  using Lane = at::vec::int_same_size_t<Acc>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  const InteriorSplit<Lane> split = split_interior<Lane>(g);
  const auto &inner_out = split.inner_out, &edge_out = split.edge_out;
  const auto& inner_in = split.inner_in;
  std::vector<int64_t> tap_offsets(g.kernel_h * g.kernel_w);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      tap_offsets[kh * g.kernel_w + kw] = kh * g.dilation_h * g.in_w + kw * g.dilation_w;
    }
  }
  const int64_t inner = static_cast<int64_t>(inner_out.size());
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, in_plane));
  at::parallel_for(0, g.batch * g.channels, grain, [&](int64_t begin, int64_t end) {
    alignas(64) Acc results[kLanes];
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* in = input + plane * in_plane;
      T* out = output + plane * out_plane;
      auto* index = K == IndexKind::None ? nullptr : indices + plane * out_plane;
      int64_t i = 0;
      for (; i + kLanes <= inner; i += kLanes) {
        Vec best(Reduce::identity());
        Vec offsets(Acc(0));
        for (int64_t t = 0; t < g.kernel_h * g.kernel_w; ++t) {
          const Vec v = load_lanes(in + tap_offsets[t], inner_in.data() + i);
          const auto replaces = Reduce::replaces(v, best);
          best = math::where(replaces, v, best);
          if constexpr (K != IndexKind::None) {
            offsets = math::where(replaces, Vec(static_cast<Acc>(t)), offsets);
          }
        }
        const Vec result = Reduce::finalize(best);
        alignas(64) T stored[kLanes];
        store_acc(stored, result);
        for (int64_t lane = 0; lane < kLanes; ++lane) out[inner_out[i + lane]] = stored[lane];
        if constexpr (K != IndexKind::None) {
          alignas(64) Acc offset_lanes[kLanes];
          offsets.store(offset_lanes);
          result.store(results);
          for (int64_t lane = 0; lane < kLanes; ++lane) {
            const int64_t base = inner_in[i + lane];
            index[inner_out[i + lane]] = index_value<K, Reduce>(
                g, static_cast<int64_t>(offset_lanes[lane]), results[lane], base / g.in_w,
                base % g.in_w);
          }
        }
      }
      auto scalar = [&](int64_t o) {
        const int64_t oh = o / g.out_w, ow = o % g.out_w;
        const int64_t ih0 = oh * g.stride_h - g.pad_h, iw0 = ow * g.stride_w - g.pad_w;
        arg_window_scalar<K, Reduce>(
            g, in + ih0 * g.in_w + iw0, 1, g.in_w,
            valid_taps(oh, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.in_h),
            valid_taps(ow, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w), ih0, iw0,
            out + o, index ? index + o : nullptr);
      };
      for (; i < inner; ++i) scalar(inner_out[i]);
      for (int64_t o : edge_out) scalar(o);
    }
  });
}

// The usual 2x2, stride-2 pool on NCHW float rows of even width (in_w == 2 * out_w): each
// row pair is reduced as whole vectors (deinterleave each row into its even and odd
// columns, reduce them, then the two rows), with no gathers, whatever the row length. The
// two-stage order gives the row-major rule's result and tap: the later of two taps wins
// only when greater or NaN, at each stage.
bool pairs_tile_rows(const Geometry& g) {
  return g.kernel_h == 2 && g.kernel_w == 2 && g.stride_h == 2 && g.stride_w == 2 &&
         g.pad_h == 0 && g.pad_w == 0 && g.dilation_h == 1 && g.dilation_w == 1 &&
         g.in_w == 2 * g.out_w && 2 * g.out_h <= g.in_h;
}

template <IndexKind K, typename Reduce>
void arg_forward_nchw_pairs(const Geometry& g, const float* input, float* output,
                            uint8_t* indices) {
  using Vec = Vectorized<float>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  // One row's `lanes` windows from column `ow`: the better of each column pair, and
  // whether the right column won (a lane mask).
  auto reduce_row = [&](const float* row, int64_t lanes) {
    const int64_t first = std::min<int64_t>(kLanes, 2 * lanes);
    const auto [even, odd] =
        at::vec::deinterleave2(Vec::loadu(row, first), Vec::loadu(row + kLanes, 2 * lanes - first));
    const Vec right = Reduce::replaces(odd, even);
    return std::make_pair(math::where(right, odd, even), right);
  };
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, in_plane));
  at::parallel_for(0, g.batch * g.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const float* top = input + plane * in_plane + 2 * oh * g.in_w;
        float* out = output + plane * out_plane + oh * g.out_w;
        for (int64_t ow = 0; ow < g.out_w; ow += kLanes) {
          const int64_t lanes = std::min(kLanes, g.out_w - ow);
          const auto [top_best, top_right] = reduce_row(top + 2 * ow, lanes);
          const auto [bottom_best, bottom_right] = reduce_row(top + g.in_w + 2 * ow, lanes);
          const Vec down = Reduce::replaces(bottom_best, top_best);
          const Vec result = Reduce::finalize(math::where(down, bottom_best, top_best));
          result.store(out + ow, lanes);
          if constexpr (K == IndexKind::Offset8) {
            const Vec one(1.f);
            Vec offset = math::where(down, Vec(2.f) + (bottom_right & one), top_right & one);
            if constexpr (Reduce::kRelu) {
              offset = math::where(Reduce::blocks_gradient(result),
                                   Vec(static_cast<float>(kNoTap<uint8_t>)), offset);
            }
            at::vec::convert<uint8_t>(offset).store(
                indices + plane * out_plane + oh * g.out_w + ow, lanes);
          }
        }
      }
    }
  });
}

template <IndexKind K, typename Reduce, typename T>
void arg_forward_nchw(const Geometry& g, const T* input, T* output,
                      typename IndexType<K>::type* indices) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t planes = g.batch * g.channels;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  if constexpr (std::is_same_v<T, float> &&
                (K == IndexKind::None || K == IndexKind::Offset8)) {
    if (pairs_tile_rows(g)) return arg_forward_nchw_pairs<K, Reduce>(g, input, output, indices);
  }
  const TapRange interior =
      interior_outputs(g.out_w, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w);
  // Lane offsets of the gather path are int32 for float: planes must fit.
  if (interior.end - interior.begin < 2 * kLanes && in_plane < (int64_t{1} << 31)) {
    arg_forward_nchw_gather<K, Reduce>(g, input, output, indices);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, in_plane));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* in = input + plane * in_plane;
      T* out = output + plane * out_plane;
      auto* index = K == IndexKind::None ? nullptr : indices + plane * out_plane;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const TapRange hr =
            valid_taps(oh, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.in_h);
        const int64_t ih0 = oh * g.stride_h - g.pad_h;
        auto scalar = [&](int64_t ow) {
          const int64_t iw0 = ow * g.stride_w - g.pad_w;
          const TapRange wr =
              valid_taps(ow, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w);
          arg_window_scalar<K, Reduce>(g, in + ih0 * g.in_w + iw0, 1, g.in_w, hr, wr, ih0, iw0,
                                       out + oh * g.out_w + ow,
                                       index ? index + oh * g.out_w + ow : nullptr);
        };
        int64_t ow = 0;
        for (; ow < interior.begin; ++ow) scalar(ow);
        for (; ow + kLanes <= interior.end; ow += kLanes) {
          const int64_t iw0 = ow * g.stride_w - g.pad_w;
          const bool pair_readable =
              (ow + kLanes - 1) * g.stride_w - g.pad_w + (g.kernel_w - 1) * g.dilation_w + 1 <
              g.in_w;
          Vec best(Reduce::identity());
          Vec offsets(static_cast<Acc>(hr.begin * g.kernel_w));
          for (int64_t kh = hr.begin; kh < hr.end; ++kh) {
            const T* tap_row = in + (ih0 + kh * g.dilation_h) * g.in_w + iw0;
            for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
              const Vec v = load_spaced(tap_row + kw * g.dilation_w, g.stride_w, pair_readable);
              const auto replaces = Reduce::replaces(v, best);
              best = math::where(replaces, v, best);
              if constexpr (K != IndexKind::None) {
                offsets = math::where(replaces, Vec(static_cast<Acc>(kh * g.kernel_w + kw)),
                                      offsets);
              }
            }
          }
          // Interior columns: the window is empty only where its rows are.
          const Vec result = hr.begin < hr.end ? Reduce::finalize(best) : best;
          store_acc(out + oh * g.out_w + ow, result);
          if constexpr (K != IndexKind::None) {
            store_lane_indices<K, Reduce>(g, offsets, result, ih0, iw0, g.stride_w,
                                          index + oh * g.out_w + ow, 1);
          }
        }
        for (; ow < g.out_w; ++ow) scalar(ow);
      }
    }
  });
}

template <IndexKind K, typename Reduce, typename T>
void arg_forward_channels_last(const Geometry& g, const T* input, T* output,
                               typename IndexType<K>::type* indices) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t C = g.channels;
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  const int64_t grain = std::max<int64_t>(
      1, kGrainSize / std::max<int64_t>(1, C * g.kernel_h * g.kernel_w));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t ow = pixel % g.out_w;
      const int64_t oh = (pixel / g.out_w) % g.out_h;
      const int64_t n = pixel / (g.out_w * g.out_h);
      const TapRange hr = valid_taps(oh, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.in_h);
      const TapRange wr = valid_taps(ow, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w);
      const int64_t ih0 = oh * g.stride_h - g.pad_h, iw0 = ow * g.stride_w - g.pad_w;
      // Channel 0 of input pixel (ih0, iw0), which may lie in the padding: only valid
      // taps are read.
      const T* base = input + ((n * g.in_h + ih0) * g.in_w + iw0) * C;
      T* out = output + pixel * C;
      auto* index = K == IndexKind::None ? nullptr : indices + pixel * C;
      // kBlock channel vectors at once: independent compare-and-select chains, so the
      // window's taps run at throughput rather than at the latency of one chain.
      auto reduce_block = [&](int64_t c, auto block) {
        constexpr int64_t kBlock = decltype(block)::value;
        std::array<Vec, kBlock> best, offsets;
        best.fill(Vec(Reduce::identity()));
        offsets.fill(Vec(static_cast<Acc>(hr.begin * g.kernel_w + wr.begin)));
        for (int64_t kh = hr.begin; kh < hr.end; ++kh) {
          const T* tap_row = base + kh * g.dilation_h * g.in_w * C + c;
          for (int64_t kw = wr.begin; kw < wr.end; ++kw) {
            const T* tap = tap_row + kw * g.dilation_w * C;
            const Vec tap_offset(static_cast<Acc>(kh * g.kernel_w + kw));
            for (int64_t b = 0; b < kBlock; ++b) {
              const Vec v = load_acc(tap + b * kLanes);
              const auto replaces = Reduce::replaces(v, best[b]);
              best[b] = math::where(replaces, v, best[b]);
              if constexpr (K != IndexKind::None) {
                offsets[b] = math::where(replaces, tap_offset, offsets[b]);
              }
            }
          }
        }
        for (int64_t b = 0; b < kBlock; ++b) {
          const Vec result = window_is_empty(hr, wr) ? best[b] : Reduce::finalize(best[b]);
          store_acc(out + c + b * kLanes, result);
          if constexpr (K != IndexKind::None) {
            store_lane_indices<K, Reduce>(g, offsets[b], result, ih0, iw0, 0,
                                          index + c + b * kLanes, 1);
          }
        }
      };
      int64_t c = 0;
      for (; c + 4 * kLanes <= C; c += 4 * kLanes) {
        reduce_block(c, std::integral_constant<int64_t, 4>{});
      }
      for (; c + kLanes <= C; c += kLanes) reduce_block(c, std::integral_constant<int64_t, 1>{});
      for (; c < C; ++c) {
        arg_window_scalar<K, Reduce>(g, base + c, C, g.in_w * C, hr, wr, ih0, iw0, out + c,
                                     index ? index + c : nullptr);
      }
    }
  });
}

template <IndexKind K, typename Reduce, typename T>
void arg_forward_typed(const Geometry& g, const Tensor& input, const Tensor& output,
                       const Tensor& indices) {
  using Index = typename IndexType<K>::type;
  Index* index = K == IndexKind::None ? nullptr : indices.data_ptr<Index>();
  if (g.channels_last) {
    arg_forward_channels_last<K, Reduce>(g, input.const_data_ptr<T>(), output.data_ptr<T>(),
                                         index);
  } else {
    arg_forward_nchw<K, Reduce>(g, input.const_data_ptr<T>(), output.data_ptr<T>(), index);
  }
}

void arg_forward(ArgReduction reduction, IndexKind kind, const Geometry& g, const Tensor& input,
                 const Tensor& output, const Tensor& indices) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_pool_arg_forward_cpu", [&] {
    visit_arg_reduction<opmath_t<scalar_t>>(reduction, [&](auto reduce) {
      using Reduce = decltype(reduce);
      switch (kind) {
        case IndexKind::None:
          return arg_forward_typed<IndexKind::None, Reduce, scalar_t>(g, input, output, indices);
        case IndexKind::Offset8:
          return arg_forward_typed<IndexKind::Offset8, Reduce, scalar_t>(g, input, output,
                                                                        indices);
        case IndexKind::Offset32:
          return arg_forward_typed<IndexKind::Offset32, Reduce, scalar_t>(g, input, output,
                                                                         indices);
        case IndexKind::Flat64:
          return arg_forward_typed<IndexKind::Flat64, Reduce, scalar_t>(g, input, output,
                                                                       indices);
      }
    });
  });
}

// ---- Max / min backward -------------------------------------------------------------------

// ---- Windows that tile the input ----------------------------------------------------------
// No padding, no dilation, stride == kernel (the usual kernel-2 pooling): every input
// element lies in at most one window, so the backward writes each grad_input element once,
// from its window's gradient or 0, instead of zero-filling grad_input and scattering into
// it (one pass over grad_input, no read-modify-write). The values are the scatter's: a sum
// of one term. `+ Acc(0)` turns a -0 gradient into the scatter's 0 + -0 = +0.

bool windows_tile(const Geometry& g) {
  return g.pad_h == 0 && g.pad_w == 0 && g.dilation_h == 1 && g.dilation_w == 1 &&
         g.stride_h == g.kernel_h && g.stride_w == g.kernel_w;
}

// Writes the grad_input rows of one row of windows: `count` windows from column 0, with
// the NCHW row pitch `in_w`. `share(ow, kh, kw)` is what input (kh, kw) of window ow gets.
// Input columns past the last window get 0. `rows` input rows are written (the last row of
// windows can be cut by the input's edge in ceil_mode).
template <typename T, typename Share>
inline void write_window_rows_scalar(const Geometry& g, T* gi_rows, int64_t rows,
                                     const Share& share) {
  for (int64_t kh = 0; kh < rows; ++kh) {
    T* gi_row = gi_rows + kh * g.in_w;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t iw0 = ow * g.kernel_w;
      const int64_t taps = std::min(g.kernel_w, g.in_w - iw0);
      for (int64_t kw = 0; kw < taps; ++kw) gi_row[iw0 + kw] = static_cast<T>(share(ow, kh, kw));
    }
    std::fill(gi_row + std::min(g.in_w, g.out_w * g.kernel_w), gi_row + g.in_w, T(0));
  }
}

// kLanes windows of width 2 starting at output column `ow` (`lanes` of them valid): their
// two taps per lane, interleaved into 2 * lanes consecutive grad_input elements.
template <typename T>
inline void store_pairs(T* gi_row, int64_t ow, int64_t lanes, const Vectorized<float>& left,
                        const Vectorized<float>& right) {
  constexpr int64_t kLanes = Vectorized<float>::size();
  const auto [low, high] = at::vec::interleave2(left, right);
  T* p = gi_row + 2 * ow;
  if (lanes == kLanes) {
    low.store(p);
    high.store(p + kLanes);
  } else if (2 * lanes <= kLanes) {
    low.store(p, 2 * lanes);
  } else {
    low.store(p);
    high.store(p + kLanes, 2 * lanes - kLanes);
  }
}

// Parallel over planes (NCHW), calling rows_of(plane, oh, gi_rows, rows) for each row of
// windows; input rows below the last row of windows get 0.
template <typename T, typename RowsOf>
void for_each_window_row_nchw(const Geometry& g, T* gi, const RowsOf& rows_of) {
  const int64_t in_plane = g.in_h * g.in_w;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, in_plane));
  at::parallel_for(0, g.batch * g.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      T* gi_plane = gi + plane * in_plane;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const int64_t ih0 = oh * g.kernel_h;
        rows_of(plane, oh, gi_plane + ih0 * g.in_w, std::min(g.kernel_h, g.in_h - ih0));
      }
      const int64_t covered = std::min(g.in_h, g.out_h * g.kernel_h);
      std::fill(gi_plane + covered * g.in_w, gi_plane + in_plane, T(0));
    }
  });
}

// Channels-last: parallel over (sample, row of windows); pixel(n, oh, ow, kh, kw, gi_pixel)
// writes the C channels of input pixel (kh, kw) of window (oh, ow). Input pixels no window
// covers get 0.
template <typename T, typename Pixel>
void for_each_window_pixel_channels_last(const Geometry& g, T* gi, const Pixel& pixel) {
  const int64_t C = g.channels;
  const int64_t row_elements = g.kernel_h * g.in_w * C;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, g.batch * g.out_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.out_h, oh = task % g.out_h;
      T* gi_sample = gi + n * g.in_h * g.in_w * C;
      const int64_t ih0 = oh * g.kernel_h;
      const int64_t rows = std::min(g.kernel_h, g.in_h - ih0);
      const int64_t covered_w = std::min(g.in_w, g.out_w * g.kernel_w);
      for (int64_t kh = 0; kh < rows; ++kh) {
        T* gi_row = gi_sample + (ih0 + kh) * g.in_w * C;
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const int64_t iw0 = ow * g.kernel_w;
          const int64_t taps = std::min(g.kernel_w, g.in_w - iw0);
          for (int64_t kw = 0; kw < taps; ++kw) {
            pixel(n, oh, ow, kh, kw, gi_row + (iw0 + kw) * C);
          }
        }
        std::fill(gi_row + covered_w * C, gi_row + g.in_w * C, T(0));
      }
      if (oh == g.out_h - 1) {  // rows below the last row of windows
        const int64_t covered_h = std::min(g.in_h, g.out_h * g.kernel_h);
        std::fill(gi_sample + covered_h * g.in_w * C, gi_sample + g.in_h * g.in_w * C, T(0));
      }
    }
  });
}

// Tap offsets (uint8 or int32) of kLanes consecutive outputs as Acc lanes (`count` < kLanes:
// the first `count` lanes hold offsets, the others anything). One vector conversion for
// float lanes; a scalar staging otherwise.
template <typename Acc, typename Index>
inline Vectorized<Acc> load_offsets(const Index* p, int64_t count = Vectorized<Acc>::size()) {
  if constexpr (std::is_same_v<Acc, float>) {
    return at::vec::convert<float>(Vectorized<Index>::loadu(p, count));
  } else {
    alignas(64) Acc lanes[Vectorized<Acc>::size()] = {};
    for (int64_t i = 0; i < count; ++i) lanes[i] = static_cast<Acc>(p[i]);
    return Vectorized<Acc>::loadu(lanes);
  }
}

template <IndexKind K, typename T>
void arg_backward_tiled(const Geometry& g, const T* go, const typename IndexType<K>::type* idx,
                        T* gi) {
  using Acc = opmath_t<T>;
  using Index = typename IndexType<K>::type;
  const int64_t C = g.channels;
  if (!g.channels_last) {
    for_each_window_row_nchw(g, gi, [&](int64_t plane, int64_t oh, T* gi_rows, int64_t rows) {
      const T* go_row = go + (plane * g.out_h + oh) * g.out_w;
      const Index* idx_row = idx + (plane * g.out_h + oh) * g.out_w;
      if constexpr (std::is_same_v<T, float>) {
        if (g.kernel_w == 2 && g.in_w >= 2 * g.out_w) {
          using Vec = Vectorized<float>;
          constexpr int64_t kLanes = Vec::size();
          for (int64_t kh = 0; kh < rows; ++kh) {
            T* gi_row = gi_rows + kh * g.in_w;
            const Vec left_tap(static_cast<float>(kh * 2)), right_tap(static_cast<float>(kh * 2 + 1));
            for (int64_t ow = 0; ow < g.out_w; ow += kLanes) {
              const int64_t lanes = std::min(kLanes, g.out_w - ow);
              const Vec grad = Vec::loadu(go_row + ow, lanes) + Vec(0.f);
              const Vec offset = load_offsets<float>(idx_row + ow, lanes);
              store_pairs(gi_row, ow, lanes, Vec::blendv(Vec(0.f), grad, offset == left_tap),
                          Vec::blendv(Vec(0.f), grad, offset == right_tap));
            }
            std::fill(gi_row + 2 * g.out_w, gi_row + g.in_w, 0.f);
          }
          return;
        }
      }
      write_window_rows_scalar(g, gi_rows, rows, [&](int64_t ow, int64_t kh, int64_t kw) {
        return static_cast<int64_t>(idx_row[ow]) == kh * g.kernel_w + kw
                   ? static_cast<Acc>(go_row[ow]) + Acc(0)
                   : Acc(0);
      });
    });
    return;
  }
  for_each_window_pixel_channels_last(
      g, gi, [&](int64_t n, int64_t oh, int64_t ow, int64_t kh, int64_t kw, T* gi_pixel) {
        const int64_t o = ((n * g.out_h + oh) * g.out_w + ow) * C;
        const Index tap = static_cast<Index>(kh * g.kernel_w + kw);
        using Vec = Vectorized<Acc>;
        constexpr int64_t kLanes = Vec::size();
        const Vec tap_lanes(static_cast<Acc>(tap));
        int64_t c = 0;
        for (; c + kLanes <= C; c += kLanes) {  // branch-free: taps win at random
          const Vec grad = load_acc(go + o + c) + Vec(Acc(0));
          store_acc(gi_pixel + c,
                    Vec::blendv(Vec(Acc(0)), grad, load_offsets<Acc>(idx + o + c) == tap_lanes));
        }
        for (; c < C; ++c) {
          gi_pixel[c] = idx[o + c] == tap ? static_cast<T>(static_cast<Acc>(go[o + c]) + Acc(0))
                                          : T(0);
        }
      });
}

inline void check_position(const Geometry& g, int64_t position) {
  TORCH_CHECK(position >= 0 && position < g.in_h * g.in_w,
              "pyops._max_pool2d_backward: index ", position, " is outside the input plane of ",
              g.in_h, "x", g.in_w);
}

// Raises on a tap offset that names no tap of the window (and is not kNoTap), once
// up front, so that the scatter below only maps offsets to positions.
template <typename Index>
void check_offsets(const Geometry& g, const Index* idx, int64_t count) {
  // Compares and an OR in Index's own unsigned type (a negative int32 becomes >= taps),
  // no early exit: the loop vectorizes. (A bool accumulator or a short-circuit test kept
  // it byte by byte: a fifth of the channels-last stem backward's time.)
  using Unsigned = std::make_unsigned_t<Index>;
  const auto taps = static_cast<Unsigned>(g.kernel_h * g.kernel_w);  // fits: see IndexKind
  constexpr auto none = static_cast<Unsigned>(kNoTap<Index>);
  auto invalid = [taps](Index v) {
    const auto u = static_cast<Unsigned>(v);
    return static_cast<Unsigned>((u >= taps) & (u != none));
  };
  std::atomic<bool> found{false};
  at::parallel_for(0, count, 4 * kGrainSize, [&](int64_t begin, int64_t end) {
    Unsigned any = 0;
    for (int64_t i = begin; i < end; ++i) any |= invalid(idx[i]);
    if (any != 0) found = true;
  });
  if (!found) return;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(!invalid(idx[i]), "pyops._max_pool2d_backward: index ",
                static_cast<int64_t>(idx[i]), " is not a tap offset of a ", g.kernel_h, "x",
                g.kernel_w, " window");
  }
}

// Scatter into a zero-filled grad_input, per plane (NCHW) or per sample and block of 64
// channels (channels-last), so that one task owns every element it writes. A gather
// (each grad_input element summing the windows that hold it, as the CUDA kernel does)
// measured 2-6x slower here: its indexed loads cost more than the scatter's one
// read-modify-write per output. Sums run in output order (deterministic).
// The channels-last backward scatters: tasks of (sample, block of 64 channels), so no two
// threads write one grad_input element. Each task zeroes its slice of grad_input, then
// `scatter(n, c0, c1, gi_sample)` adds the gradients of channels [c0, c1) of sample n.
template <typename T, typename Scatter>
void scatter_channels_last(const Geometry& g, T* gi, const Scatter& scatter) {
  const int64_t C = g.channels, in_plane = g.in_h * g.in_w;
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t c0 = (task % blocks) * kBlock, c1 = std::min(C, c0 + kBlock);
      T* gi_sample = gi + n * in_plane * C;
      for (int64_t p = 0; p < in_plane; ++p) {
        std::fill(gi_sample + p * C + c0, gi_sample + p * C + c1, T(0));
      }
      scatter(n, c0, c1, gi_sample);
    }
  });
}

// ---- Channels-last backward of overlapping windows: a gather ----------------------------
// Each input pixel sums, kLanes channels at a time, the gradients of the windows that hold
// it, in output order (the scatter's order: the same bits), and is written once: no zero
// fill and no read-modify-write. Vectorized across channels, this beats the scatter; the
// NCHW gather (indexed loads per element) does not, so NCHW keeps the scatter.

// (window, tap) pairs along one dimension: the outputs whose window holds input index i,
// in increasing order, with the tap of each that lands on i.
struct WindowTap {
  int64_t window, tap;
};

std::vector<std::vector<WindowTap>> windows_holding(int64_t in_size, int64_t out_size,
                                                    int64_t stride, int64_t pad,
                                                    int64_t dilation, int64_t kernel) {
  std::vector<std::vector<WindowTap>> holding(in_size);
  for (int64_t o = 0; o < out_size; ++o) {
    const TapRange taps = valid_taps(o, stride, pad, dilation, kernel, in_size);
    for (int64_t t = taps.begin; t < taps.end; ++t) {
      holding[o * stride - pad + t * dilation].push_back({o, t});
    }
  }
  return holding;
}

// Parallel over (sample, input row); `pixel(n, ih, iw, rows, cols, gi_pixel)` writes the C
// channels of one input pixel from the windows rows x cols that hold it.
template <typename T, typename Pixel>
void gather_channels_last(const Geometry& g, T* gi, const Pixel& pixel) {
  const auto rows = windows_holding(g.in_h, g.out_h, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h);
  const auto cols = windows_holding(g.in_w, g.out_w, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w);
  const int64_t C = g.channels;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, g.in_w * C));
  at::parallel_for(0, g.batch * g.in_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.in_h, ih = task % g.in_h;
      T* gi_row = gi + task * g.in_w * C;
      for (int64_t iw = 0; iw < g.in_w; ++iw) pixel(n, rows[ih], cols[iw], gi_row + iw * C);
    }
    cpu::end_streaming();  // the pixels may stream (store_acc_lines)
  });
}

// The offsets of windows cut by the input's edge may name a tap in the padding, which the
// gather would silently drop: raise as the scatter does. (Offsets >= the tap count are
// caught by check_offsets; a whole window's taps are all valid.)
template <typename Index>
void check_edge_offsets_channels_last(const Geometry& g, const Index* idx) {
  using Unsigned = std::make_unsigned_t<Index>;
  // inside[offset + 1]: whether tap `offset` of the window at hand lies in the input;
  // kNoTap (+ 1 = 0) passes. A table, not a division per element.
  std::vector<uint8_t> inside(g.kernel_h * g.kernel_w + 1);
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const TapRange hr = valid_taps(oh, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.in_h);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const TapRange wr = valid_taps(ow, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w);
      const bool whole = hr.begin == 0 && hr.end == g.kernel_h && wr.begin == 0 && wr.end == g.kernel_w;
      if (whole || window_is_empty(hr, wr)) continue;  // an empty window passes nothing
      inside[0] = 1;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          inside[kh * g.kernel_w + kw + 1] =
              kh >= hr.begin && kh < hr.end && kw >= wr.begin && kw < wr.end;
        }
      }
      for (int64_t n = 0; n < g.batch; ++n) {
        const Index* p = idx + ((n * g.out_h + oh) * g.out_w + ow) * g.channels;
        uint8_t all_inside = 1;
        // (check_offsets passed: every offset is kNoTap or below the tap count.)
        for (int64_t c = 0; c < g.channels; ++c) {
          all_inside &= inside[static_cast<Unsigned>(static_cast<Unsigned>(p[c]) + 1)];
        }
        if (all_inside) continue;
        for (int64_t c = 0; c < g.channels; ++c) {
          TORCH_CHECK(inside[static_cast<Unsigned>(static_cast<Unsigned>(p[c]) + 1)],
                      "pyops._max_pool2d_backward: index ", static_cast<int64_t>(p[c]),
                      " names a tap outside the input plane of ", g.in_h, "x", g.in_w);
        }
      }
    }
  }
}

template <IndexKind K, typename T>
void arg_backward_gather_channels_last(const Geometry& g, const T* go,
                                       const typename IndexType<K>::type* idx, T* gi) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kLanes = Vec::size();
  check_edge_offsets_channels_last(g, idx);
  const int64_t C = g.channels;
  const bool stream = cpu::may_stream_rows(gi, g.batch * g.in_h * g.in_w * C, C);
  gather_channels_last(g, gi, [&](int64_t n, const std::vector<WindowTap>& rows,
                                  const std::vector<WindowTap>& cols, T* gi_pixel) {
    // kBlock channel vectors at once: independent sums (as the forward's reduce_block).
    auto gather_block = [&](int64_t c, auto block) {
      constexpr int64_t kBlock = decltype(block)::value;
      std::array<Vec, kBlock> sum;
      sum.fill(Vec(Acc(0)));
      for (const WindowTap& r : rows) {
        for (const WindowTap& w : cols) {
          const int64_t o = ((n * g.out_h + r.window) * g.out_w + w.window) * C + c;
          const Vec tap(static_cast<Acc>(r.tap * g.kernel_w + w.tap));
          for (int64_t b = 0; b < kBlock; ++b) {
            const Vec hit = load_offsets<Acc>(idx + o + b * kLanes) == tap;
            sum[b] = sum[b] + (load_acc(go + o + b * kLanes) & hit);
          }
        }
      }
      for (int64_t b = 0; b < kBlock; ++b) {
        store_acc_lines(gi_pixel + c + b * kLanes, sum[b], stream);
      }
    };
    int64_t c = 0;
    for (; c + 4 * kLanes <= C; c += 4 * kLanes) {
      gather_block(c, std::integral_constant<int64_t, 4>{});
    }
    for (; c + kLanes <= C; c += kLanes) gather_block(c, std::integral_constant<int64_t, 1>{});
    for (; c < C; ++c) {
      Acc sum(0);
      for (const WindowTap& r : rows) {
        for (const WindowTap& w : cols) {
          const int64_t o = ((n * g.out_h + r.window) * g.out_w + w.window) * C + c;
          if (static_cast<int64_t>(idx[o]) == r.tap * g.kernel_w + w.tap) {
            sum += static_cast<Acc>(go[o]);
          }
        }
      }
      gi_pixel[c] = static_cast<T>(sum);
    }
  });
}

template <IndexKind K, typename T>
void arg_backward_typed(const Geometry& g, const Tensor& grad_output, const Tensor& indices,
                        const Tensor& grad_input) {
  using Acc = opmath_t<T>;
  using Index = typename IndexType<K>::type;
  const T* go = grad_output.const_data_ptr<T>();
  const Index* idx = indices.const_data_ptr<Index>();
  T* gi = grad_input.data_ptr<T>();
  if constexpr (K != IndexKind::Flat64) {
    check_offsets(g, idx, indices.numel());
    // (torch's int64 indices may name any input element: they keep the checked scatter.)
    if (windows_tile(g)) return arg_backward_tiled<K>(g, go, idx, gi);
    if (g.channels_last) return arg_backward_gather_channels_last<K>(g, go, idx, gi);
  }
  // Position of each tap relative to its window's first (possibly padded) input.
  std::vector<int64_t> tap_delta(g.kernel_h * g.kernel_w);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      tap_delta[kh * g.kernel_w + kw] = kh * g.dilation_h * g.in_w + kw * g.dilation_w;
    }
  }
  // The input position (ih * in_w + iw) that output (oh, ow) routes to, -1 for none.
  auto routed = [&](Index value, int64_t oh, int64_t ow) -> int64_t {
    if constexpr (K == IndexKind::Flat64) {
      return value;
    } else {
      if (value == kNoTap<Index>) return -1;
      return (oh * g.stride_h - g.pad_h) * g.in_w + ow * g.stride_w - g.pad_w + tap_delta[value];
    }
  };
  // Outputs whose window lies wholly in the padding pass no gradient (window_is_empty),
  // whatever index the forward stored for them.
  const auto [empty_row, empty_col] = empty_windows(g);
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  if (!g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, in_plane));
    at::parallel_for(0, g.batch * g.channels, grain, [&](int64_t begin, int64_t end) {
      // Reduced precision accumulates in float, rounding once.
      std::vector<Acc> buffer(kReduced<T> ? in_plane : 0);
      for (int64_t plane = begin; plane < end; ++plane) {
        T* gi_plane = gi + plane * in_plane;
        Acc* acc = kReduced<T> ? buffer.data() : reinterpret_cast<Acc*>(gi_plane);
        std::fill(acc, acc + in_plane, Acc(0));
        const T* go_plane = go + plane * out_plane;
        const Index* idx_plane = idx + plane * out_plane;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          if (empty_row[oh]) continue;
          for (int64_t ow = 0; ow < g.out_w; ++ow) {
            if (empty_col[ow]) continue;
            const int64_t o = oh * g.out_w + ow;
            const int64_t position = routed(idx_plane[o], oh, ow);
            if (K != IndexKind::Flat64 && position == -1) continue;
            check_position(g, position);
            acc[position] += static_cast<Acc>(go_plane[o]);
          }
        }
        if constexpr (kReduced<T>) {
          for (int64_t i = 0; i < in_plane; ++i) gi_plane[i] = static_cast<T>(acc[i]);
        }
      }
    });
    return;
  }
  // torch's int64 indices (offsets took the gather above).
  const int64_t C = g.channels;
  scatter_channels_last(g, gi, [&](int64_t n, int64_t c0, int64_t c1, T* gi_sample) {
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      if (empty_row[oh]) continue;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        if (empty_col[ow]) continue;
        const int64_t o = ((n * g.out_h + oh) * g.out_w + ow) * C;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t position = routed(idx[o + c], oh, ow);
          if (K != IndexKind::Flat64 && position == -1) continue;
          check_position(g, position);
          T& target = gi_sample[position * C + c];
          target = static_cast<T>(static_cast<Acc>(target) + static_cast<Acc>(go[o + c]));
        }
      }
    }
  });
}

void arg_backward(IndexKind kind, const Geometry& g, const Tensor& grad_output,
                  const Tensor& indices, const Tensor& grad_input) {
  PYOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "pyops_pool_arg_backward_cpu", [&] {
    switch (kind) {
      case IndexKind::Offset8:
        return arg_backward_typed<IndexKind::Offset8, scalar_t>(g, grad_output, indices,
                                                                grad_input);
      case IndexKind::Offset32:
        return arg_backward_typed<IndexKind::Offset32, scalar_t>(g, grad_output, indices,
                                                                 grad_input);
      case IndexKind::Flat64:
        return arg_backward_typed<IndexKind::Flat64, scalar_t>(g, grad_output, indices,
                                                               grad_input);
      case IndexKind::None:
        TORCH_CHECK(false, "pyops._max_pool2d_backward: indices are required");
    }
  });
}

// ---- Average pooling -----------------------------------------------------------------------

// NCHW planes whose rows are too short for the row path (as arg_forward_nchw_gather):
// windows wholly inside the input, kLanes at a time across rows, taps read by gather; they
// all share the divisor kernel_h * kernel_w (or the override). The others are scalar.
template <typename T, typename Scalar>
void avg_forward_nchw_gather(const Geometry& g, int64_t divisor_override, const T* input,
                             T* output, const Scalar& scalar) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  using Lane = at::vec::int_same_size_t<Acc>;
  using Reduce = AvgReduce<Acc>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  // Average pooling has no dilation: its geometry's is 1.
  const InteriorSplit<Lane> split = split_interior<Lane>(g);
  const auto &inner_out = split.inner_out, &edge_out = split.edge_out;
  const auto& inner_in = split.inner_in;
  const Acc divisor = static_cast<Acc>(divisor_override != 0 ? divisor_override
                                                             : g.kernel_h * g.kernel_w);
  const int64_t inner = static_cast<int64_t>(inner_out.size());
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, in_plane));
  at::parallel_for(0, g.batch * g.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* in = input + plane * in_plane;
      T* out = output + plane * out_plane;
      int64_t i = 0;
      for (; i + kLanes <= inner; i += kLanes) {
        Vec sum(Acc(0));
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
          for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
            sum = Reduce::accumulate(sum, load_lanes(in + kh * g.in_w + kw, inner_in.data() + i));
          }
        }
        alignas(64) T stored[kLanes];
        store_acc(stored, Reduce::finalize(sum, divisor));
        for (int64_t lane = 0; lane < kLanes; ++lane) out[inner_out[i + lane]] = stored[lane];
      }
      for (; i < inner; ++i) scalar(in, inner_out[i], out);
      for (int64_t o : edge_out) scalar(in, o, out);
    }
  });
}

template <typename T>
void avg_forward_typed(const Geometry& g, bool count_include_pad, int64_t divisor_override,
                       const Tensor& input, const Tensor& output) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  using Reduce = AvgReduce<Acc>;
  constexpr int64_t kLanes = Vec::size();
  const T* in_data = input.const_data_ptr<T>();
  T* out_data = output.data_ptr<T>();
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  // One output by the scalar path; `col`/`row` as in arg_window_scalar.
  auto scalar = [&](const T* base, int64_t col, int64_t row, AvgSpan hs, AvgSpan ws, T* out) {
    const int64_t divisor = avg_divisor(hs, ws, count_include_pad, divisor_override);
    if (divisor == 0) {
      *out = T(0);
      return;
    }
    Acc sum(0);
    for (int64_t ih = hs.begin; ih < hs.end; ++ih) {
      for (int64_t iw = ws.begin; iw < ws.end; ++iw) {
        sum = Reduce::accumulate(sum, static_cast<Acc>(base[ih * row + iw * col]));
      }
    }
    *out = static_cast<T>(Reduce::finalize(sum, static_cast<Acc>(divisor)));
  };
  if (!g.channels_last) {
    const TapRange interior = interior_outputs(g.out_w, g.stride_w, g.pad_w, 1, g.kernel_w, g.in_w);
    // Lane offsets of the gather path are int32 for float: planes must fit.
    if (interior.end - interior.begin < 2 * kLanes && g.in_h * g.in_w < (int64_t{1} << 31)) {
      avg_forward_nchw_gather(g, divisor_override, in_data, out_data,
                              [&](const T* in, int64_t o, T* out) {
                                const int64_t oh = o / g.out_w, ow = o % g.out_w;
                                scalar(in, 1, g.in_w,
                                       avg_span(oh, g.stride_h, g.pad_h, g.kernel_h, g.in_h),
                                       avg_span(ow, g.stride_w, g.pad_w, g.kernel_w, g.in_w),
                                       out + o);
                              });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, in_plane));
    at::parallel_for(0, g.batch * g.channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const T* in = in_data + plane * in_plane;
        T* out = out_data + plane * out_plane;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const AvgSpan hs = avg_span(oh, g.stride_h, g.pad_h, g.kernel_h, g.in_h);
          auto one = [&](int64_t ow) {
            scalar(in, 1, g.in_w, hs, avg_span(ow, g.stride_w, g.pad_w, g.kernel_w, g.in_w),
                   out + oh * g.out_w + ow);
          };
          int64_t ow = 0;
          for (; ow < interior.begin; ++ow) one(ow);
          for (; ow + kLanes <= interior.end; ow += kLanes) {
            // Interior windows share one divisor along the row.
            const int64_t divisor =
                avg_divisor(hs, avg_span(ow, g.stride_w, g.pad_w, g.kernel_w, g.in_w),
                            count_include_pad, divisor_override);
            if (divisor == 0) break;  // an empty row: the scalar path writes zeros
            const int64_t iw0 = ow * g.stride_w - g.pad_w;
            const bool pair_readable =
                (ow + kLanes - 1) * g.stride_w - g.pad_w + g.kernel_w < g.in_w;
            Vec sum(Acc(0));
            for (int64_t ih = hs.begin; ih < hs.end; ++ih) {
              const T* tap_row = in + ih * g.in_w + iw0;
              for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
                sum = Reduce::accumulate(sum, load_spaced(tap_row + kw, g.stride_w, pair_readable));
              }
            }
            store_acc(out + oh * g.out_w + ow, Reduce::finalize(sum, static_cast<Acc>(divisor)));
          }
          for (; ow < g.out_w; ++ow) one(ow);
        }
      }
    });
    return;
  }
  const int64_t C = g.channels;
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  const int64_t grain =
      std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, C * g.kernel_h * g.kernel_w));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t ow = pixel % g.out_w;
      const int64_t oh = (pixel / g.out_w) % g.out_h;
      const int64_t n = pixel / (g.out_w * g.out_h);
      const AvgSpan hs = avg_span(oh, g.stride_h, g.pad_h, g.kernel_h, g.in_h);
      const AvgSpan ws = avg_span(ow, g.stride_w, g.pad_w, g.kernel_w, g.in_w);
      const int64_t divisor = avg_divisor(hs, ws, count_include_pad, divisor_override);
      const T* sample = in_data + n * in_plane * C;
      T* out = out_data + pixel * C;
      int64_t c = 0;
      if (divisor != 0) {
        for (; c + kLanes <= C; c += kLanes) {
          Vec sum(Acc(0));
          for (int64_t ih = hs.begin; ih < hs.end; ++ih) {
            for (int64_t iw = ws.begin; iw < ws.end; ++iw) {
              sum = Reduce::accumulate(sum, load_acc(sample + (ih * g.in_w + iw) * C + c));
            }
          }
          store_acc(out + c, Reduce::finalize(sum, static_cast<Acc>(divisor)));
        }
      }
      for (; c < C; ++c) scalar(sample + c, C, g.in_w * C, hs, ws, out + c);
    }
  });
}

void avg_forward(const Geometry& g, bool count_include_pad, int64_t divisor_override,
                 const Tensor& input, const Tensor& output) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_avg_pool_forward_cpu", [&] {
    avg_forward_typed<scalar_t>(g, count_include_pad, divisor_override, input, output);
  });
}

// Windows that tile the input (windows_tile): each grad_input element is its window's
// grad_output / divisor, written once; the divisor of a window cut by the input's edge
// (ceil_mode) counts the taps inside.
template <typename T>
void avg_backward_tiled(const Geometry& g, int64_t divisor_override, const T* go, T* gi) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kLanes = Vec::size();
  // With no padding, count_include_pad does not change a divisor.
  std::vector<Acc> col_taps(g.out_w);
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    col_taps[ow] = static_cast<Acc>(std::min(g.kernel_w, g.in_w - ow * g.kernel_w));
  }
  auto divisor = [&](int64_t oh, int64_t ow) -> Acc {
    if (divisor_override != 0) return static_cast<Acc>(divisor_override);
    return static_cast<Acc>(std::min(g.kernel_h, g.in_h - oh * g.kernel_h)) * col_taps[ow];
  };
  const int64_t C = g.channels;
  if (!g.channels_last) {
    for_each_window_row_nchw(g, gi, [&](int64_t plane, int64_t oh, T* gi_rows, int64_t rows) {
      const T* go_row = go + (plane * g.out_h + oh) * g.out_w;
      if constexpr (std::is_same_v<T, float>) {
        if (g.kernel_w == 2 && g.in_w >= 2 * g.out_w) {
          // `rows`, the window rows inside the input, is divisor()'s row factor.
          for (int64_t ow = 0; ow < g.out_w; ow += kLanes) {
            const int64_t lanes = std::min(kLanes, g.out_w - ow);
            const Vec divisors =
                divisor_override != 0
                    ? Vec(static_cast<Acc>(divisor_override))
                    : Vec(static_cast<Acc>(rows)) * Vec::loadu(col_taps.data() + ow, lanes);
            const Vec share = Vec::loadu(go_row + ow, lanes) / divisors + Vec(0.f);
            for (int64_t kh = 0; kh < rows; ++kh) {
              store_pairs(gi_rows + kh * g.in_w, ow, lanes, share, share);
            }
          }
          for (int64_t kh = 0; kh < rows; ++kh) {
            std::fill(gi_rows + kh * g.in_w + 2 * g.out_w, gi_rows + (kh + 1) * g.in_w, 0.f);
          }
          return;
        }
      }
      write_window_rows_scalar(g, gi_rows, rows, [&](int64_t ow, int64_t, int64_t) {
        return static_cast<Acc>(go_row[ow]) / divisor(oh, ow) + Acc(0);
      });
    });
    return;
  }
  for_each_window_pixel_channels_last(
      g, gi, [&](int64_t n, int64_t oh, int64_t ow, int64_t, int64_t, T* gi_pixel) {
        const T* go_pixel = go + ((n * g.out_h + oh) * g.out_w + ow) * C;
        const Acc window_divisor = divisor(oh, ow);
        int64_t c = 0;
        for (; c + kLanes <= C; c += kLanes) {
          store_acc(gi_pixel + c, load_acc(go_pixel + c) / Vec(window_divisor) + Vec(Acc(0)));
        }
        for (; c < C; ++c) {
          gi_pixel[c] = static_cast<T>(static_cast<Acc>(go_pixel[c]) / window_divisor + Acc(0));
        }
      });
}

// Channels-last, overlapping windows: the gather (gather_channels_last), each window's
// share grad_output / divisor summed in output order.
template <typename T>
void avg_backward_gather_channels_last(const Geometry& g, bool count_include_pad,
                                       int64_t divisor_override, const T* go, T* gi) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kLanes = Vec::size();
  std::vector<Acc> divisors(g.out_h * g.out_w);
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const AvgSpan hs = avg_span(oh, g.stride_h, g.pad_h, g.kernel_h, g.in_h);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      divisors[oh * g.out_w + ow] = static_cast<Acc>(
          avg_divisor(hs, avg_span(ow, g.stride_w, g.pad_w, g.kernel_w, g.in_w),
                      count_include_pad, divisor_override));
    }
  }
  const int64_t C = g.channels;
  const bool stream = cpu::may_stream_rows(gi, g.batch * g.in_h * g.in_w * C, C);
  gather_channels_last(g, gi, [&](int64_t n, const std::vector<WindowTap>& rows,
                                  const std::vector<WindowTap>& cols, T* gi_pixel) {
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      Vec sum(Acc(0));
      for (const WindowTap& r : rows) {
        for (const WindowTap& w : cols) {
          const int64_t window = r.window * g.out_w + w.window;
          sum = sum + load_acc(go + (n * g.out_h * g.out_w + window) * C + c) /
                          Vec(divisors[window]);
        }
      }
      store_acc_lines(gi_pixel + c, sum, stream);
    }
    for (; c < C; ++c) {
      Acc sum(0);
      for (const WindowTap& r : rows) {
        for (const WindowTap& w : cols) {
          const int64_t window = r.window * g.out_w + w.window;
          sum += static_cast<Acc>(go[(n * g.out_h * g.out_w + window) * C + c]) / divisors[window];
        }
      }
      gi_pixel[c] = static_cast<T>(sum);
    }
  });
}

// grad_input[tap] += grad_output / divisor for every tap of every window, as torch does.
template <typename T>
void avg_backward_typed(const Geometry& g, bool count_include_pad, int64_t divisor_override,
                        const Tensor& grad_output, const Tensor& grad_input) {
  using Acc = opmath_t<T>;
  const T* go = grad_output.const_data_ptr<T>();
  T* gi = grad_input.data_ptr<T>();
  if (windows_tile(g)) return avg_backward_tiled(g, divisor_override, go, gi);
  if (g.channels_last) {
    return avg_backward_gather_channels_last(g, count_include_pad, divisor_override, go, gi);
  }
  // NCHW: the scatter, per plane.
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, in_plane));
  at::parallel_for(0, g.batch * g.channels, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> buffer(kReduced<T> ? in_plane : 0);
    std::vector<Acc> row_share(g.out_w);
    std::vector<AvgSpan> col_spans(g.out_w);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      col_spans[ow] = avg_span(ow, g.stride_w, g.pad_w, g.kernel_w, g.in_w);
    }
    for (int64_t plane = begin; plane < end; ++plane) {
      T* gi_plane = gi + plane * in_plane;
      Acc* acc = kReduced<T> ? buffer.data() : reinterpret_cast<Acc*>(gi_plane);
      std::fill(acc, acc + in_plane, Acc(0));
      const T* go_plane = go + plane * out_plane;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const AvgSpan hs = avg_span(oh, g.stride_h, g.pad_h, g.kernel_h, g.in_h);
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const int64_t divisor =
              avg_divisor(hs, col_spans[ow], count_include_pad, divisor_override);
          row_share[ow] = divisor == 0 ? Acc(0)
                                       : static_cast<Acc>(go_plane[oh * g.out_w + ow]) /
                                             static_cast<Acc>(divisor);
        }
        for (int64_t ih = hs.begin; ih < hs.end; ++ih) {
          Acc* acc_row = acc + ih * g.in_w;
          for (int64_t ow = 0; ow < g.out_w; ++ow) {
            const Acc share = row_share[ow];
            for (int64_t iw = col_spans[ow].begin; iw < col_spans[ow].end; ++iw) {
              acc_row[iw] += share;
            }
          }
        }
      }
      if constexpr (kReduced<T>) {
        for (int64_t i = 0; i < in_plane; ++i) gi_plane[i] = static_cast<T>(acc[i]);
      }
    }
  });
}

void avg_backward(const Geometry& g, bool count_include_pad, int64_t divisor_override,
                  const Tensor& grad_output, const Tensor& grad_input) {
  PYOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "pyops_avg_pool_backward_cpu", [&] {
    avg_backward_typed<scalar_t>(g, count_include_pad, divisor_override, grad_output,
                                 grad_input);
  });
}

}  // namespace

PYOPS_REGISTER_CPU_KERNEL(arg_forward_kernel, &arg_forward);
PYOPS_REGISTER_CPU_KERNEL(arg_backward_kernel, &arg_backward);
PYOPS_REGISTER_CPU_KERNEL(avg_forward_kernel, &avg_forward);
PYOPS_REGISTER_CPU_KERNEL(avg_backward_kernel, &avg_backward);

}  // namespace CPU_CAPABILITY
}  // namespace pyops::pool
