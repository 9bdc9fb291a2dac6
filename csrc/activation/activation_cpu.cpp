// CPU kernels of the activation family, compiled once per CPU capability (setup.py).
// Only the loops live here; the math is activation.h's.

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "activation/activation.h"
#include "common/cpu_loops.h"

namespace pyops::activation {
inline namespace CPU_CAPABILITY {
namespace {

using at::Tensor;
using cpu::map_range_accumulate;
using cpu::map_range_streaming;
using cpu::opmath_t;
using cpu::parallel_map;

#define PYOPS_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

void forward(Activation act, double slope, const Tensor& input, const Tensor& output) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_activation_forward_cpu", [&] {
    visit_activation<opmath_t<scalar_t>>(act, slope, [&](auto fn) {
      parallel_map([fn](auto x) { return fn.forward(x); }, input.numel(),
                   output.data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>());
    });
  });
}

void backward(Activation act, double slope, const Tensor& grad_output, const Tensor& saved,
              const Tensor& grad_input) {
  PYOPS_DISPATCH_FLOATING(saved.scalar_type(), "pyops_activation_backward_cpu", [&] {
    visit_activation<opmath_t<scalar_t>>(act, slope, [&](auto fn) {
      parallel_map([fn](auto grad, auto s) { return fn.backward(grad, s); }, saved.numel(),
                   grad_input.data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                   saved.const_data_ptr<scalar_t>());
    });
  });
}

// Rows per task so that a task streams about kGrainSize elements.
int64_t rows_per_task(int64_t row_length) {
  return std::max<int64_t>(1, cpu::kGrainSize / std::max<int64_t>(1, row_length));
}

void bias_forward(Activation act, double slope, const Tensor& input, const Tensor& bias,
                  const Tensor& output, ChannelLayout layout) {
  const auto [outer, channels, inner] = layout;
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_bias_act_forward_cpu", [&] {
    using Acc = opmath_t<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    // In place (out == in) the lines are cached when written: no streaming.
    const bool stream = out != in && cpu::may_stream_rows(out, outer * channels * inner,
                                                          inner == 1 ? channels : inner);
    visit_activation<Acc>(act, slope, [&](auto fn) {
      if (inner == 1) {  // channels innermost: a row is one position, bias is a vector
        at::parallel_for(0, outer, rows_per_task(channels), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            map_range_streaming(
                stream, [fn](auto x, auto bias_value) { return fn.forward(x + bias_value); },
                channels, out + row * channels, in + row * channels, b);
          }
          if (stream) cpu::end_streaming();
        });
      } else {  // a row is one (sample, channel) plane, bias is a scalar
        at::parallel_for(0, outer * channels, rows_per_task(inner), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const Acc bias_value = static_cast<Acc>(b[row % channels]);
            map_range_streaming(stream,
                                [fn, bias_value](auto x) {
                                  using V = decltype(x);
                                  return fn.forward(x + V(bias_value));
                                },
                                inner, out + row * inner, in + row * inner);
          }
          if (stream) cpu::end_streaming();
        });
      }
    });
  });
}

// out[c] = sum of partial[r][c] over the rows r in order, read row by row: summed column by
// column, the 8 KB stride between a column's terms missed the cache on every one (16% of
// the backward of a 4096 x 1024 linear output).
template <typename Sum, typename T>
void store_column_sums(const Sum* partial, int64_t rows, int64_t columns, T* out) {
  std::vector<Sum> total(columns, Sum(0));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) total[c] += partial[r * columns + c];
  }
  for (int64_t c = 0; c < columns; ++c) out[c] = static_cast<T>(total[c]);
}

// The bias gradient is reduced in a fixed order (per row or per fixed block of rows,
// then in index order), so results do not depend on the number of threads; partial sums
// are kept in ATen's CPU accumulation type (double for float), as torch.sum does.
void bias_backward(Activation act, double slope, bool saved_is_result, const Tensor& grad_output,
                   const Tensor& saved, const Tensor& bias, const Tensor& grad_input,
                   const Tensor& grad_bias, ChannelLayout layout) {
  const auto [outer, channels, inner] = layout;
  PYOPS_DISPATCH_FLOATING(saved.scalar_type(), "pyops_bias_act_backward_cpu", [&] {
    using Acc = opmath_t<scalar_t>;
    using Sum = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* s = saved.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    const bool stream = gi != g && gi != s &&
                        cpu::may_stream_rows(gi, outer * channels * inner,
                                             inner == 1 ? channels : inner);
    visit_activation<Acc>(act, slope, [&](auto fn) {
      if (inner == 1) {
        const int64_t block_rows = rows_per_task(channels);
        const int64_t blocks = (outer + block_rows - 1) / block_rows;
        std::vector<Sum> partial(blocks * channels, Sum(0));
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          // Runs of kRowsPerAccSum rows are summed in Acc (float for float: SIMD wide),
          // then the runs and the blocks in Sum (double). A block holds kGrainSize /
          // channels rows, hundreds for a narrow layer: summed in float alone, its error
          // would grow with that count.
          constexpr int64_t kRowsPerAccSum = 32;
          std::vector<Acc> run_sum(channels);
          for (int64_t block = begin; block < end; ++block) {
            std::fill(run_sum.begin(), run_sum.end(), Acc(0));
            Acc* acc = run_sum.data();
            Sum* total = partial.data() + block * channels;
            const int64_t row_begin = block * block_rows;
            const int64_t row_end = std::min(outer, row_begin + block_rows);
            for (int64_t row = row_begin; row < row_end; ++row) {
              const int64_t offset = row * channels;
              if (saved_is_result) {
                map_range_accumulate(stream,
                                     [fn](auto grad, auto y) { return fn.backward(grad, y); },
                                     channels, gi + offset, acc, g + offset, s + offset);
              } else {
                map_range_accumulate(stream,
                                     [fn](auto grad, auto x, auto bias_value) {
                                       return fn.backward(grad, x + bias_value);
                                     },
                                     channels, gi + offset, acc, g + offset, s + offset, b);
              }
              if ((row - row_begin + 1) % kRowsPerAccSum == 0 || row + 1 == row_end) {
                for (int64_t c = 0; c < channels; ++c) {
                  total[c] += static_cast<Sum>(acc[c]);
                  acc[c] = Acc(0);
                }
              }
            }
          }
          if (stream) cpu::end_streaming();
        });
        store_column_sums(partial.data(), blocks, channels, gb);
      } else {
        std::vector<Sum> row_sums(outer * channels);
        at::parallel_for(0, outer * channels, rows_per_task(inner), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const int64_t offset = row * inner;
            if (saved_is_result) {
              row_sums[row] = map_range_streaming<true>(
                  stream, [fn](auto grad, auto y) { return fn.backward(grad, y); }, inner,
                  gi + offset, g + offset, s + offset);
            } else {
              const Acc bias_value = static_cast<Acc>(b[row % channels]);
              row_sums[row] = map_range_streaming<true>(
                  stream,
                  [fn, bias_value](auto grad, auto x) {
                    using V = decltype(x);
                    return fn.backward(grad, x + V(bias_value));
                  },
                  inner, gi + offset, g + offset, s + offset);
            }
          }
          if (stream) cpu::end_streaming();
        });
        store_column_sums(row_sums.data(), outer, channels, gb);
      }
    });
  });
}

}  // namespace

PYOPS_REGISTER_CPU_KERNEL(forward_kernel, &forward);
PYOPS_REGISTER_CPU_KERNEL(backward_kernel, &backward);
PYOPS_REGISTER_CPU_KERNEL(bias_forward_kernel, &bias_forward);
PYOPS_REGISTER_CPU_KERNEL(bias_backward_kernel, &bias_backward);

}  // namespace CPU_CAPABILITY
}  // namespace pyops::activation
