#pragma once
// Element-wise loops for the per-capability CPU kernel files (*_cpu.cpp). An `op` is a
// generic callable written once with the family's shared math; these loops call it with
// Vectorized<opmath_t<T>> for the SIMD body and with opmath_t<T> for the tail, so the
// scalar code that CUDA runs is exercised on every CPU test whose size is not a
// multiple of the SIMD width. Half and bfloat16 are computed in float.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common/isa.h"

namespace pyops::cpu {
inline namespace PYOPS_ISA_NAMESPACE {

using at::vec::Vectorized;

template <typename T>
using opmath_t = at::opmath_type<T>;

template <typename T>
constexpr bool is_reduced_float_v =
    std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// Elements per task of at::parallel_for for streaming kernels (ATen's GRAIN_SIZE).
constexpr int64_t kGrainSize = 32768;

// Non-temporal ("streaming") stores, for an output written once, in whole cache lines,
// and not read back by the kernel. A normal store to a line that is not cached first
// reads the line in; a streamed one does not, and leaves the caches to the inputs. On the
// machine of docs/BENCHMARKS.md that read is expensive: a 1-thread 16M-float out = a * b
// took 10 ms with normal stores and 3.4 ms streamed (the in-place a = max(a, 0), whose
// lines are cached when written, 1.8 ms). Below kStreamMinBytes (half that machine's
// 32 MB L3) an output may still be in cache for its consumer, and stays cached.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

// Whether vector stores to out + i * Vectorized<T>::size() (i >= 0) may stream, for an
// output of `numel` elements: float on AVX-512 (the build measured), 64-byte aligned.
template <typename T>
inline bool may_stream(const T* out, int64_t numel) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return reinterpret_cast<std::uintptr_t>(out) % 64 == 0 &&
           numel * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
  }
#endif
  (void)out;
  (void)numel;
  return false;
}

// may_stream for an output written row by row, rows of row_length elements: each row
// must start on a whole vector for all of its vector stores to be aligned.
template <typename T>
inline bool may_stream_rows(const T* out, int64_t numel, int64_t row_length) {
  return row_length % Vectorized<T>::size() == 0 && may_stream(out, numel);
}

// v.store(p), streamed where `stream` (as may_stream decided for p's tensor).
template <typename T>
inline void store_vector(T* p, const Vectorized<T>& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (stream) return _mm512_stream_ps(p, v);
  }
#endif
  v.store(p);
}

// Orders this thread's streamed stores before what follows: the end of each parallel
// task that streamed, before another thread may read its output.
inline void end_streaming() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

namespace detail {
template <typename T>
struct FloatHalves {
  Vectorized<float> lo, hi;
};

template <typename T>
inline FloatHalves<T> load_as_float(const T* ptr) {
  auto [lo, hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr));
  return {lo, hi};
}

template <typename T>
inline void store_from_float(T* ptr, const Vectorized<float>& lo, const Vectorized<float>& hi) {
  at::vec::convert_from_float<T>(lo, hi).store(ptr);
}

// Vectorized<opmath_t<T>>::size() elements from ptr, converted to opmath_t<T>.
template <typename T>
inline Vectorized<at::opmath_type<T>> load_as_opmath(const T* ptr) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    Vectorized<float> out;
    at::vec::load_to_float<T>(ptr, out);
    return out;
  } else {
    return Vectorized<T>::loadu(ptr);
  }
}

// Folds the lanes with `op`, lane by lane in order (deterministic).
template <typename V, typename Op>
inline auto lane_reduce(const V& v, const Op& op) {
  using S = typename V::value_type;
  alignas(64) S lanes[V::size()];
  v.store(lanes);
  S total = lanes[0];
  for (int i = 1; i < V::size(); ++i) total = op(total, lanes[i]);
  return total;
}

// Sum of the lanes, lane by lane in order (deterministic).
template <typename V>
inline auto lane_sum(const V& v) {
  using S = typename V::value_type;
  alignas(64) S lanes[V::size()];
  v.store(lanes);
  S total = S(0);
  for (int i = 0; i < V::size(); ++i) total += lanes[i];
  return total;
}
}  // namespace detail

namespace detail {
// out[i] = op(in[i]...) for i in [0, n), on this thread, handing each result (before
// rounding to T) to observe(i, result): a Vectorized<opmath_t<T>> for the SIMD body, in
// index order, then an opmath_t<T> per tail element. `stream`: the vector stores stream
// (may_stream(out, ...) said so, and out is not an input).
template <typename T, typename Op, typename Observe, typename... In>
inline void map_range_observed(bool stream, const Op& op, int64_t n, T* out,
                               const Observe& observe, const In*... in) {
  static_assert((std::is_same_v<T, In> && ...), "inputs and output share one dtype");
  using Acc = opmath_t<T>;
  int64_t i = 0;
  if constexpr (is_reduced_float_v<T>) {
    constexpr int64_t kStep = Vectorized<T>::size(), kHalf = Vectorized<Acc>::size();
    for (; i + kStep <= n; i += kStep) {
      std::tuple<FloatHalves<In>...> loaded{load_as_float(in + i)...};
      auto lo = std::apply([&](const auto&... h) { return op(h.lo...); }, loaded);
      auto hi = std::apply([&](const auto&... h) { return op(h.hi...); }, loaded);
      observe(i, lo);
      observe(i + kHalf, hi);
      store_from_float(out + i, lo, hi);
    }
  } else {
    constexpr int64_t kStep = Vectorized<T>::size();
    for (; i + kStep <= n; i += kStep) {
      auto result = op(Vectorized<T>::loadu(in + i)...);
      observe(i, result);
      store_vector(out + i, result, stream);
    }
  }
  for (; i < n; ++i) {
    Acc result = op(static_cast<Acc>(in[i])...);
    observe(i, result);
    out[i] = static_cast<T>(result);
  }
}
}  // namespace detail

// out[i] = op(in[i]...) for i in [0, n), on this thread. When `Sum` is true, returns
// the sum of the op's results (in opmath_t<T>, before rounding to T): the vectors
// lane-wise, their lanes in order, then the tail. `stream` as for map_range_observed.
template <bool Sum = false, typename T, typename Op, typename... In>
inline opmath_t<T> map_range_streaming(bool stream, const Op& op, int64_t n, T* out,
                                       const In*... in) {
  using Acc = opmath_t<T>;
  Vectorized<Acc> vsum(Acc(0));
  Acc sum(0);
  bool lanes_folded = false;
  detail::map_range_observed(
      stream, op, n, out,
      [&](int64_t, const auto& result) {
        if constexpr (!Sum) {
          return;
        } else if constexpr (std::is_same_v<std::decay_t<decltype(result)>, Acc>) {
          if (!lanes_folded) sum = detail::lane_sum(vsum);  // the tail comes last
          lanes_folded = true;
          sum += result;
        } else {
          vsum = vsum + result;
        }
      },
      in...);
  if constexpr (Sum) {
    if (!lanes_folded) sum = detail::lane_sum(vsum);
  }
  return sum;
}

template <bool Sum = false, typename T, typename Op, typename... In>
inline opmath_t<T> map_range(const Op& op, int64_t n, T* out, const In*... in) {
  return map_range_streaming<Sum>(false, op, n, out, in...);
}

// out[i] = op(in[i]...) and sums[i] += that result (in opmath_t<T>, before rounding to
// T), for i in [0, n), on this thread: a column-wise reduction (a bias gradient over the
// rows of a channels-last tensor) folded into the pass that writes the rows. `stream` as
// for map_range_observed.
template <typename T, typename Op, typename... In>
inline void map_range_accumulate(bool stream, const Op& op, int64_t n, T* out,
                                 opmath_t<T>* sums, const In*... in) {
  using Acc = opmath_t<T>;
  detail::map_range_observed(
      stream, op, n, out,
      [sums](int64_t i, const auto& result) {
        if constexpr (std::is_same_v<std::decay_t<decltype(result)>, Acc>) {
          sums[i] += result;
        } else {
          (Vectorized<Acc>::loadu(sums + i) + result).store(sums + i);
        }
      },
      in...);
}

// map_range over [0, n), split across at::parallel_for's threads. Tasks start at
// multiples of the SIMD step, so only the last n % step elements take the scalar tail,
// whatever the number of threads: the vector and scalar versions of a function (exp in
// sigmoid and tanh) may differ in the last bit, and which one computes an element must
// not depend on the thread count.
// A large output that is not also an input streams (may_stream). In place, the lines are
// cached when written, and streaming them made relu_ on 16M floats 10% slower.
template <typename T, typename Op, typename... In>
inline void parallel_map(const Op& op, int64_t n, T* out, const In*... in) {
  constexpr int64_t kStep = Vectorized<T>::size();
  const int64_t steps = (n + kStep - 1) / kStep;
  const bool stream = may_stream(out, n) && ((static_cast<const T*>(out) != in) && ...);
  at::parallel_for(0, steps, kGrainSize / kStep, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kStep, last = std::min(n, end * kStep);
    map_range_streaming(stream, op, last - first, out + first, (in + first)...);
    if (stream) end_streaming();
  });
}

}  // namespace PYOPS_ISA_NAMESPACE
}  // namespace pyops::cpu
