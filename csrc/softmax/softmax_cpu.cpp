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

template <typename T>
void nll_forward_typed(const Tensor& input, const Tensor& target, int64_t ignore_index,
                       Reduction reduction, const Tensor& loss, const Tensor& lse) {
  using A = Acc<T>;
  const int64_t rows = input.size(0), classes = input.size(1);
  const T* x = input.const_data_ptr<T>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  A* terms = lse.data_ptr<A>();  // [rows, 2]: max, log_sum
  // Row n's loss (0 if ignored); writes its log-sum-exp on the way.
  auto row_loss = [&](int64_t n) -> A {
    const T* row = x + n * classes;
    const auto [max, log_sum] = row_lse(row, classes);
    terms[2 * n] = max;
    terms[2 * n + 1] = log_sum;
    if (t[n] == ignore_index) return A(0);
    TORCH_CHECK_INDEX(t[n] >= 0 && t[n] < classes, "pyops.log_softmax_nll_loss: target ", t[n],
                      " is out of bounds for ", classes, " classes (row ", n, ")");
    return Math::nll_loss(static_cast<A>(row[t[n]]), max, log_sum);
  };
  const int64_t block_rows = rows_per_task(classes);
  if (reduction == Reduction::None) {
    T* out = loss.data_ptr<T>();
    at::parallel_for(0, rows, block_rows, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) out[n] = static_cast<T>(row_loss(n));
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
      for (int64_t n = b * block_rows; n < std::min(rows, (b + 1) * block_rows); ++n) {
        sum += row_loss(n);
        counted += t[n] != ignore_index;
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
  // The row's last classes % step elements as one partial vector (load_tail says why).
  const int64_t body = classes - classes % Vectorized<A>::size(), tail = classes - body;
  at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const bool counted = t[n] != ignore_index;
      const A w = Math::nll_row_weight(static_cast<A>(upstream[n * upstream_stride]), counted,
                                       divisor);
      const A max = terms[2 * n], log_sum = terms[2 * n + 1];
      const T* row = x + n * classes;
      T* grad_row = gi + n * classes;
      const auto grad = [w, max, log_sum](auto v) {
        using V = decltype(v);
        return Math::nll_grad(v, V(max), V(log_sum), V(0), V(w));
      };
      map_range(grad, body, grad_row, row);
      if (tail > 0) store_tail(grad_row + body, grad(load_tail(row + body, tail, A(0))), tail);
      if (counted) {  // the target's own term
        TORCH_CHECK_INDEX(t[n] >= 0 && t[n] < classes,
                          "pyops._log_softmax_nll_loss_backward: target ", t[n],
                          " is out of bounds for ", classes, " classes (row ", n, ")");
        grad_row[t[n]] = static_cast<T>(
            Math::nll_grad(static_cast<A>(row[t[n]]), max, log_sum, A(1), w));
      }
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
