// CPU kernels of the pooling family, compiled once per CPU capability (setup.py). Only
// loops and memory access live here; the window math is pool.h's.
//
// NCHW: parallel over planes (sample x channel); in a row of outputs whose windows lie
// wholly inside the input, kLanes consecutive outputs are reduced at once (their taps
// are `stride` elements apart: one load for stride 1, two and a deinterleave for
// stride 2, a gather otherwise); the edge outputs take the scalar path.
// Channels-last: parallel over output pixels; SIMD across channels.
// Backward: zero-filled grad_input, then a scatter per plane (NCHW) or per sample and
// block of channels (channels-last): one task owns every element it writes.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec_convert.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>
#include <vector>

#include "pool/pool.h"

namespace pyops::pool {
inline namespace CPU_CAPABILITY {
namespace {

using at::Tensor;
using at::vec::Vectorized;

template <typename T>
using opmath_t = at::opmath_type<T>;

constexpr int64_t kGrainSize = 32768;  // elements per parallel task, as ATen

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
  const TapRange rows =
      interior_outputs(g.out_h, g.stride_h, g.pad_h, g.dilation_h, g.kernel_h, g.in_h);
  const TapRange cols =
      interior_outputs(g.out_w, g.stride_w, g.pad_w, g.dilation_w, g.kernel_w, g.in_w);
  // Shared by every plane: interior outputs, their windows' first input, the others.
  std::vector<int64_t> inner_out, edge_out;
  std::vector<Lane> inner_in;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      if (oh >= rows.begin && oh < rows.end && ow >= cols.begin && ow < cols.end) {
        inner_out.push_back(oh * g.out_w + ow);
        inner_in.push_back(static_cast<Lane>((oh * g.stride_h - g.pad_h) * g.in_w +
                                             ow * g.stride_w - g.pad_w));
      } else {
        edge_out.push_back(oh * g.out_w + ow);
      }
    }
  }
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

template <IndexKind K, typename Reduce, typename T>
void arg_forward_nchw(const Geometry& g, const T* input, T* output,
                      typename IndexType<K>::type* indices) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t planes = g.batch * g.channels;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
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
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes) {
        Vec best(Reduce::identity());
        Vec offsets(static_cast<Acc>(hr.begin * g.kernel_w + wr.begin));
        for (int64_t kh = hr.begin; kh < hr.end; ++kh) {
          const T* tap_row = base + kh * g.dilation_h * g.in_w * C + c;
          for (int64_t kw = wr.begin; kw < wr.end; ++kw) {
            const Vec v = load_acc(tap_row + kw * g.dilation_w * C);
            const auto replaces = Reduce::replaces(v, best);
            best = math::where(replaces, v, best);
            if constexpr (K != IndexKind::None) {
              offsets = math::where(replaces, Vec(static_cast<Acc>(kh * g.kernel_w + kw)),
                                    offsets);
            }
          }
        }
        const Vec result = window_is_empty(hr, wr) ? best : Reduce::finalize(best);
        store_acc(out + c, result);
        if constexpr (K != IndexKind::None) {
          store_lane_indices<K, Reduce>(g, offsets, result, ih0, iw0, 0, index + c, 1);
        }
      }
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

inline void check_position(const Geometry& g, int64_t position) {
  TORCH_CHECK(position >= 0 && position < g.in_h * g.in_w,
              "pyops._max_pool2d_backward: index ", position, " is outside the input plane of ",
              g.in_h, "x", g.in_w);
}

// Raises on a tap offset that names no tap of the window (and is not kNoTap), once
// up front, so that the scatter below only maps offsets to positions.
template <typename Index>
void check_offsets(const Geometry& g, const Index* idx, int64_t count) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  auto invalid = [&](Index v) {
    return v != kNoTap<Index> && (static_cast<int64_t>(v) < 0 || static_cast<int64_t>(v) >= taps);
  };
  std::atomic<bool> found{false};
  at::parallel_for(0, count, 4 * kGrainSize, [&](int64_t begin, int64_t end) {
    bool any = false;  // no early exit: the loop vectorizes
    for (int64_t i = begin; i < end; ++i) any |= invalid(idx[i]);
    if (any) found = true;
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

template <IndexKind K, typename T>
void arg_backward_typed(const Geometry& g, const Tensor& grad_output, const Tensor& indices,
                        const Tensor& grad_input) {
  using Acc = opmath_t<T>;
  using Index = typename IndexType<K>::type;
  const T* go = grad_output.const_data_ptr<T>();
  const Index* idx = indices.const_data_ptr<Index>();
  T* gi = grad_input.data_ptr<T>();
  if constexpr (K != IndexKind::Flat64) check_offsets(g, idx, indices.numel());
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

// grad_input[tap] += grad_output / divisor for every tap of every window, as torch does.
template <typename T>
void avg_backward_typed(const Geometry& g, bool count_include_pad, int64_t divisor_override,
                        const Tensor& grad_output, const Tensor& grad_input) {
  using Acc = opmath_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kLanes = Vec::size();
  const T* go = grad_output.const_data_ptr<T>();
  T* gi = grad_input.data_ptr<T>();
  // Outputs whose window lies wholly in the padding pass no gradient (window_is_empty),
  // whatever index the forward stored for them.
  const auto [empty_row, empty_col] = empty_windows(g);
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  if (!g.channels_last) {
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
    return;
  }
  const int64_t C = g.channels;
  scatter_channels_last(g, gi, [&](int64_t n, int64_t c0, int64_t c1, T* gi_sample) {
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      const AvgSpan hs = avg_span(oh, g.stride_h, g.pad_h, g.kernel_h, g.in_h);
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const AvgSpan ws = avg_span(ow, g.stride_w, g.pad_w, g.kernel_w, g.in_w);
        const int64_t divisor = avg_divisor(hs, ws, count_include_pad, divisor_override);
        if (divisor == 0) continue;
        const T* go_pixel = go + ((n * g.out_h + oh) * g.out_w + ow) * C;
        const Acc divisor_value = static_cast<Acc>(divisor);
        for (int64_t ih = hs.begin; ih < hs.end; ++ih) {
          for (int64_t iw = ws.begin; iw < ws.end; ++iw) {
            T* target = gi_sample + (ih * g.in_w + iw) * C;
            int64_t c = c0;
            for (; c + kLanes <= c1; c += kLanes) {
              store_acc(target + c, load_acc(target + c) + load_acc(go_pixel + c) /
                                                                Vec(divisor_value));
            }
            for (; c < c1; ++c) {
              target[c] = static_cast<T>(static_cast<Acc>(target[c]) +
                                         static_cast<Acc>(go_pixel[c]) / divisor_value);
            }
          }
        }
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
