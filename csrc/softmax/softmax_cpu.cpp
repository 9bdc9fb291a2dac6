// CPU kernels of the log-softmax family, compiled once per CPU capability (setup.py).
// Rows along the last dim (inner == 1) are reduced with SIMD along the row; other dims
// with SIMD across `inner`, where consecutive elements belong to different rows.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_loops.h"
#include "softmax/softmax.h"

namespace pyops::softmax {
inline namespace CPU_CAPABILITY {
namespace {

using at::Tensor;
using at::vec::Vectorized;
using cpu::map_range;
using Math = LogSoftmaxMath;

template <typename T>
using Acc = at::opmath_type<T>;

// Rows per parallel task so that a task touches about kGrainSize elements.
int64_t rows_per_task(int64_t row_elements) {
  return std::max<int64_t>(1, cpu::kGrainSize / std::max<int64_t>(1, row_elements));
}

// A row's log-sum-exp, max + log_sum, kept as its two terms (softmax.h says why).
template <typename A>
struct Lse {
  A max, log_sum;
};

// The last `count` (< Vectorized<Acc<T>>::size()) elements of a row as one vector in Acc,
// with `fill` in the lanes past the row's end. Rows shorter than a vector (the seed
// network's 10 classes) then run their exp in SIMD rather than through the C library's.
template <typename T>
Vectorized<Acc<T>> load_tail(const T* ptr, int64_t count, Acc<T> fill) {
  using A = Acc<T>;
  alignas(64) A lanes[Vectorized<A>::size()];
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) {
    lanes[i] = i < count ? static_cast<A>(ptr[i]) : fill;
  }
  return Vectorized<A>::loadu(lanes);
}

template <typename T>
void store_tail(T* ptr, const Vectorized<Acc<T>>& v, int64_t count) {
  alignas(64) Acc<T> lanes[Vectorized<Acc<T>>::size()];
  v.store(lanes);
  for (int64_t i = 0; i < count; ++i) ptr[i] = static_cast<T>(lanes[i]);
}

// The log-sum-exp of a contiguous row, in Acc: its max, then the sum of exp(x - max),
// all in SIMD (the row's tail as one partial vector).
template <typename T>
Lse<Acc<T>> row_lse(const T* row, int64_t size) {
  using A = Acc<T>;
  using V = Vectorized<A>;
  constexpr int64_t kStep = V::size();
  constexpr A kLowest = -std::numeric_limits<A>::infinity();
  const int64_t body = size - size % kStep, tail = size - body;
  V vmax(kLowest);  // a NaN anywhere wins, as in torch
  for (int64_t i = 0; i < body; i += kStep) {
    vmax = math::maximum(vmax, cpu::detail::load_as_opmath(row + i));
  }
  if (tail > 0) vmax = math::maximum(vmax, load_tail(row + body, tail, kLowest));
  const A max = cpu::detail::lane_reduce(vmax, [](A a, A b) { return math::maximum(a, b); });
  const V vmax_all(max);
  V vsum(A(0));
  for (int64_t i = 0; i < body; i += kStep) {
    vsum = vsum + Math::shifted_exp(cpu::detail::load_as_opmath(row + i), vmax_all);
  }
  if (tail > 0) {
    // Lanes past the end add 0 (not exp(-inf - max), which is NaN for an all -inf row).
    vsum = vsum + V::set(V(A(0)), Math::shifted_exp(load_tail(row + body, tail, kLowest), vmax_all),
                         tail);
  }
  return {max, std::log(cpu::detail::lane_sum(vsum))};
}

// Sum of a contiguous row, in Acc.
template <typename T>
Acc<T> row_sum(const T* row, int64_t size) {
  using A = Acc<T>;
  constexpr int64_t kStep = Vectorized<A>::size();
  Vectorized<A> vsum(A(0));
  int64_t i = 0;
  for (; i + kStep <= size; i += kStep) vsum = vsum + cpu::detail::load_as_opmath(row + i);
  A sum = cpu::detail::lane_sum(vsum);
  for (; i < size; ++i) sum += static_cast<A>(row[i]);
  return sum;
}

// Column blocks for the [outer, size, inner] layout with inner > 1: `body(j, width)`
// runs for j = 0, W, 2W, ... with width = Width<Vectorized<A>> (W columns at once), then
// for each remaining column with width = Width<A>.
template <typename V>
struct Width {
  using type = V;
};

template <typename T, typename Body>
void for_column_blocks_impl(int64_t inner, const Body& body) {
  using A = Acc<T>;
  constexpr int64_t kStep = Vectorized<A>::size();
  int64_t j = 0;
  for (; j + kStep <= inner; j += kStep) body(j, Width<Vectorized<A>>{});
  for (; j < inner; ++j) body(j, Width<A>{});
}

template <typename T>
Vectorized<Acc<T>> load(const T* ptr, Width<Vectorized<Acc<T>>>) {
  return cpu::detail::load_as_opmath(ptr);
}
template <typename T>
Acc<T> load(const T* ptr, Width<Acc<T>>) {
  return static_cast<Acc<T>>(*ptr);
}
template <typename T>
void store(T* ptr, const Vectorized<Acc<T>>& v, Width<Vectorized<Acc<T>>>) {
  if constexpr (std::is_same_v<T, Acc<T>>) {
    v.store(ptr);
  } else {
    alignas(64) Acc<T> lanes[Vectorized<Acc<T>>::size()];
    v.store(lanes);
    for (int64_t i = 0; i < Vectorized<Acc<T>>::size(); ++i) ptr[i] = static_cast<T>(lanes[i]);
  }
}
template <typename T>
void store(T* ptr, Acc<T> v, Width<Acc<T>>) {
  *ptr = static_cast<T>(v);
}

template <typename A>
Vectorized<A> log(const Vectorized<A>& v) {
  return v.log();
}
template <typename A, typename = std::enable_if_t<std::is_floating_point_v<A>>>
A log(A v) {
  return std::log(v);
}

template <typename T>
void log_softmax_typed(const Tensor& input, const Tensor& output, RowLayout layout) {
  using A = Acc<T>;
  const T* in = input.const_data_ptr<T>();
  T* out = output.data_ptr<T>();
  const auto [outer, size, inner] = layout;
  if (inner == 1) {
    at::parallel_for(0, outer, rows_per_task(size), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto [max, log_sum] = row_lse(in + r * size, size);
        map_range([max, log_sum](auto x) {
                    using V = decltype(x);
                    return Math::output(x, V(max), V(log_sum));
                  },
                  size, out + r * size, in + r * size);
      }
    });
    return;
  }
  // Element (k, j) of an outer slab sits at k * inner + j: the reductions over k run
  // with SIMD across j, a vector of columns at a time.
  at::parallel_for(0, outer, rows_per_task(size * inner), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const T* slab = in + o * size * inner;
      T* out_slab = out + o * size * inner;
      for_column_blocks_impl<T>(inner, [&](int64_t j, auto width) {
        using V = typename decltype(width)::type;  // Vectorized<A> or A
        V max(-std::numeric_limits<A>::infinity());
        for (int64_t k = 0; k < size; ++k) max = math::maximum(max, load(slab + k * inner + j, width));
        V sum(A(0));
        for (int64_t k = 0; k < size; ++k) {
          sum = sum + Math::shifted_exp(load(slab + k * inner + j, width), max);
        }
        const V log_sum = log(sum);
        for (int64_t k = 0; k < size; ++k) {
          store(out_slab + k * inner + j,
                Math::output(load(slab + k * inner + j, width), max, log_sum), width);
        }
      });
    }
  });
}

template <typename T>
void log_softmax_backward_typed(const Tensor& grad_output, const Tensor& output,
                                const Tensor& grad_input, RowLayout layout) {
  using A = Acc<T>;
  const T* g = grad_output.const_data_ptr<T>();
  const T* y = output.const_data_ptr<T>();
  T* gi = grad_input.data_ptr<T>();
  const auto [outer, size, inner] = layout;
  if (inner == 1) {
    at::parallel_for(0, outer, rows_per_task(size), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const A grad_sum = row_sum(g + r * size, size);
        map_range([grad_sum](auto grad, auto out) {
                    return Math::grad_input(grad, out, decltype(grad)(grad_sum));
                  },
                  size, gi + r * size, g + r * size, y + r * size);
      }
    });
    return;
  }
  at::parallel_for(0, outer, rows_per_task(size * inner), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t base = o * size * inner;
      for_column_blocks_impl<T>(inner, [&](int64_t j, auto width) {
        using V = typename decltype(width)::type;
        V grad_sum(A(0));
        for (int64_t k = 0; k < size; ++k) grad_sum = grad_sum + load(g + base + k * inner + j, width);
        for (int64_t k = 0; k < size; ++k) {
          const int64_t e = base + k * inner + j;
          store(gi + e, Math::grad_input(load(g + e, width), load(y + e, width), grad_sum), width);
        }
      });
    }
  });
}

// Rows shorter than a vector (the seed network's 10 classes) are taken a vector of rows
// at a time, one row per lane: transposed into `columns` ([class][lane]), their max, sum
// of exponentials and log run in SIMD across the rows, with no reduction across lanes
// (a row at a time, a 10-element row is all tail and per-row latency). A lane sees only
// its own row, so a row's results do not depend on the rows beside it.
template <typename T>
struct ShortRows {
  using A = Acc<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kLanes = V::size();
  alignas(64) A columns[kLanes * kLanes];

  // Rows [0, count) of `rows` (count <= kLanes, classes < kLanes); other lanes read 0.
  ShortRows(const T* rows, int64_t classes, int64_t count) {
    for (int64_t c = 0; c < classes; ++c) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        columns[c * kLanes + lane] =
            lane < count ? static_cast<A>(rows[lane * classes + c]) : A(0);
      }
    }
  }
  V column(int64_t c) const { return V::loadu(columns + c * kLanes); }
  // Each lane's log-sum-exp terms: (max, log(sum(exp(x - max)))).
  std::pair<V, V> lse(int64_t classes) const {
    V max(-std::numeric_limits<A>::infinity());
    for (int64_t c = 0; c < classes; ++c) max = math::maximum(max, column(c));
    V sum(A(0));
    for (int64_t c = 0; c < classes; ++c) sum = sum + Math::shifted_exp(column(c), max);
    return {max, sum.log()};
  }
};

// A chunk of the fused kernels: at most kLanes rows, handled together.
template <typename T>
constexpr int64_t kChunkRows = ShortRows<T>::kLanes;

template <typename T>
void nll_forward_typed(const Tensor& input, const Tensor& target, int64_t ignore_index,
                       Reduction reduction, const Tensor& loss, const Tensor& lse) {
  using A = Acc<T>;
  constexpr int64_t kChunk = kChunkRows<T>;
  const int64_t rows = input.size(0), classes = input.size(1);
  const T* x = input.const_data_ptr<T>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  A* terms = lse.data_ptr<A>();  // [rows, 2]: max, log_sum
  // Rows [first, first + count), count <= kChunk: writes their log-sum-exp terms and
  // their losses into `losses` (0 where ignored).
  auto chunk_losses = [&](int64_t first, int64_t count, A* losses) {
    alignas(64) A max[kChunk], log_sum[kChunk];
    if (classes < ShortRows<T>::kLanes) {
      const auto [vmax, vlog_sum] = ShortRows<T>(x + first * classes, classes, count).lse(classes);
      vmax.store(max);
      vlog_sum.store(log_sum);
    } else {
      for (int64_t i = 0; i < count; ++i) {
        const auto row = row_lse(x + (first + i) * classes, classes);
        max[i] = row.max;
        log_sum[i] = row.log_sum;
      }
    }
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = first + i;
      terms[2 * n] = max[i];
      terms[2 * n + 1] = log_sum[i];
      losses[i] = A(0);
      if (t[n] == ignore_index) continue;
      TORCH_CHECK_INDEX(t[n] >= 0 && t[n] < classes, "pyops.log_softmax_nll_loss: target ",
                        t[n], " is out of bounds for ", classes, " classes (row ", n, ")");
      losses[i] = Math::nll_loss(static_cast<A>(x[n * classes + t[n]]), max[i], log_sum[i]);
    }
  };
  const int64_t block_rows = rows_per_task(classes);
  if (reduction == Reduction::None) {
    T* out = loss.data_ptr<T>();
    at::parallel_for(0, rows, block_rows, [&](int64_t begin, int64_t end) {
      for (int64_t first = begin; first < end; first += kChunk) {
        const int64_t count = std::min(kChunk, end - first);
        A losses[kChunk];
        chunk_losses(first, count, losses);
        for (int64_t i = 0; i < count; ++i) out[first + i] = static_cast<T>(losses[i]);
      }
    });
    return;
  }
  // Blocks of a fixed number of rows, each summed in row order, then the blocks in
  // order: the same bits for any thread count. The seed network's batch is one block.
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  c10::SmallVector<NllLossSum, 16> block_sum(blocks);
  c10::SmallVector<int64_t, 16> block_counted(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      NllLossSum sum = 0;
      int64_t counted = 0;
      const int64_t last = std::min(rows, (b + 1) * block_rows);
      for (int64_t first = b * block_rows; first < last; first += kChunk) {
        const int64_t count = std::min(kChunk, last - first);
        A losses[kChunk];
        chunk_losses(first, count, losses);
        for (int64_t i = 0; i < count; ++i) {
          sum += losses[i];
          counted += t[first + i] != ignore_index;
        }
      }
      block_sum[b] = sum;
      block_counted[b] = counted;
    }
  });
  NllLossSum sum = 0;
  int64_t counted = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    sum += block_sum[b];
    counted += block_counted[b];
  }
  // 'mean' of no counted row: 0 / 0 = NaN, as in torch.
  *loss.data_ptr<T>() =
      static_cast<T>(reduction == Reduction::Mean ? sum / static_cast<NllLossSum>(counted) : sum);
}

template <typename T>
void nll_backward_typed(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                        const Tensor& lse, Reduction reduction, int64_t ignore_index,
                        const Tensor& grad_input) {
  using A = Acc<T>;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = kChunkRows<T>;
  const int64_t rows = input.size(0), classes = input.size(1);
  const T* x = input.const_data_ptr<T>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const A* terms = lse.const_data_ptr<A>();  // [rows, 2]: max, log_sum
  const T* upstream = grad_loss.const_data_ptr<T>();
  // One upstream gradient for 'mean' and 'sum', one per row (any stride) for 'none'.
  const int64_t upstream_stride = reduction == Reduction::None ? grad_loss.stride(0) : 0;
  A divisor = 1;
  if (reduction == Reduction::Mean) {
    int64_t counted = 0;
    for (int64_t n = 0; n < rows; ++n) counted += t[n] != ignore_index;
    divisor = static_cast<A>(std::max<int64_t>(counted, 1));
  }
  T* gi = grad_input.data_ptr<T>();
  // Long rows: the last classes % step elements as one partial vector (load_tail).
  const int64_t body = classes - classes % V::size(), tail = classes - body;
  // Rows [first, first + count), count <= kChunk.
  auto chunk_grad = [&](int64_t first, int64_t count) {
    // Per lane: the row's weight, log-sum-exp terms and logit of its target (0 past
    // `count`, and for ignored rows, whose weight is 0).
    alignas(64) A weight[kChunk] = {}, max[kChunk] = {}, log_sum[kChunk] = {},
                  x_target[kChunk] = {};
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = first + i;
      const bool counted = t[n] != ignore_index;
      weight[i] = Math::nll_row_weight(static_cast<A>(upstream[n * upstream_stride]), counted,
                                       divisor);
      max[i] = terms[2 * n];
      log_sum[i] = terms[2 * n + 1];
      if (!counted) continue;
      TORCH_CHECK_INDEX(t[n] >= 0 && t[n] < classes,
                        "pyops._log_softmax_nll_loss_backward: target ", t[n],
                        " is out of bounds for ", classes, " classes (row ", n, ")");
      x_target[i] = static_cast<A>(x[n * classes + t[n]]);
    }
    // The target's own term of each row.
    alignas(64) A grad_target[kChunk];
    Math::nll_grad(V::loadu(x_target), V::loadu(max), V::loadu(log_sum), V(A(1)),
                   V::loadu(weight))
        .store(grad_target);
    if (classes < ShortRows<T>::kLanes) {
      ShortRows<T> tile(x + first * classes, classes, count);
      const V vmax = V::loadu(max), vlog_sum = V::loadu(log_sum), vweight = V::loadu(weight);
      for (int64_t c = 0; c < classes; ++c) {
        Math::nll_grad(tile.column(c), vmax, vlog_sum, V(A(0)), vweight)
            .store(tile.columns + c * ShortRows<T>::kLanes);
      }
      for (int64_t i = 0; i < count; ++i) {
        T* grad_row = gi + (first + i) * classes;
        for (int64_t c = 0; c < classes; ++c) {
          grad_row[c] = static_cast<T>(tile.columns[c * ShortRows<T>::kLanes + i]);
        }
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        const T* row = x + (first + i) * classes;
        T* grad_row = gi + (first + i) * classes;
        const auto grad = [w = weight[i], m = max[i], s = log_sum[i]](auto v) {
          using W = decltype(v);
          return Math::nll_grad(v, W(m), W(s), W(0), W(w));
        };
        map_range(grad, body, grad_row, row);
        if (tail > 0) store_tail(grad_row + body, grad(load_tail(row + body, tail, A(0))), tail);
      }
    }
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = first + i;
      if (t[n] != ignore_index) gi[n * classes + t[n]] = static_cast<T>(grad_target[i]);
    }
  };
  at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += kChunk) {
      chunk_grad(first, std::min(kChunk, end - first));
    }
  });
}

#define PYOPS_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

void log_softmax(const Tensor& input, const Tensor& output, RowLayout layout) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_log_softmax_cpu",
                          [&] { log_softmax_typed<scalar_t>(input, output, layout); });
}

void log_softmax_backward(const Tensor& grad_output, const Tensor& output,
                          const Tensor& grad_input, RowLayout layout) {
  PYOPS_DISPATCH_FLOATING(output.scalar_type(), "pyops_log_softmax_backward_cpu", [&] {
    log_softmax_backward_typed<scalar_t>(grad_output, output, grad_input, layout);
  });
}

void nll_forward(const Tensor& input, const Tensor& target, int64_t ignore_index,
                 Reduction reduction, const Tensor& loss, const Tensor& lse) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_log_softmax_nll_cpu", [&] {
    nll_forward_typed<scalar_t>(input, target, ignore_index, reduction, loss, lse);
  });
}

void nll_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                  const Tensor& lse, Reduction reduction, int64_t ignore_index,
                  const Tensor& grad_input) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_log_softmax_nll_backward_cpu", [&] {
    nll_backward_typed<scalar_t>(grad_loss, input, target, lse, reduction, ignore_index,
                                 grad_input);
  });
}

}  // namespace

PYOPS_REGISTER_CPU_KERNEL(log_softmax_kernel, &log_softmax);
PYOPS_REGISTER_CPU_KERNEL(log_softmax_backward_kernel, &log_softmax_backward);
PYOPS_REGISTER_CPU_KERNEL(nll_forward_kernel, &nll_forward);
PYOPS_REGISTER_CPU_KERNEL(nll_backward_kernel, &nll_backward);

}  // namespace CPU_CAPABILITY
}  // namespace pyops::softmax
