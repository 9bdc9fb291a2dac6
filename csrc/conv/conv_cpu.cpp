// CPU kernels of the convolution family, compiled once per CPU capability (setup.py).
// Two paths, chosen per shape (use_direct below):
//   - direct: stride-1 convolutions where a group has few input or few output channels
//     (the seed network's first layer, depthwise). The input planes of a group are staged
//     zero-padded with row pitch Wp; the output is computed "wide" (Wp columns per row,
//     the extra columns discarded), which turns the 2-D correlation into flat 1-D loops
//     over contiguous memory that vectorize fully whatever the image width.
//   - im2col + GEMM on ATen's GEMM (the BLAS torch links), per sample and group.
// Both apply bias + activation (activation.h's functors) to each output plane or sample
// right after computing it, while it is in cache.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

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
bool use_direct(int64_t in_per_group, int64_t out_per_group, int64_t stride_h, int64_t stride_w) {
  return stride_h == 1 && stride_w == 1 && std::min(in_per_group, out_per_group) <= 4;
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

// A stride-1 correlation of source planes (src_h x src_w) padded by pad_top/pad_left
// (negative: cropped) into out_h x out_w outputs.
struct DirectPlan {
  int64_t src_h, src_w, pad_top, pad_left, out_h, out_w, kernel_h, kernel_w, dilation_h,
      dilation_w;
  int64_t staged_h() const { return out_h + (kernel_h - 1) * dilation_h; }
  int64_t staged_w() const { return out_w + (kernel_w - 1) * dilation_w; }
  // Wide outputs: (out_h - 1) full rows of pitch staged_w, then out_w columns. With every
  // tap's offset added, the last index read is staged_h * staged_w - 1.
  int64_t wide_len() const { return (out_h - 1) * staged_w() + out_w; }
};

// A staged plane is padded to a whole number of vectors past its end, so loops over
// wide outputs rounded up to whole vectors stay in bounds.
template <typename Acc>
int64_t staged_stride(const DirectPlan& p) {
  return p.staged_h() * p.staged_w() + Vectorized<Acc>::size();
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
    std::copy(src + r * cols, src + (r + 1) * cols, row);  // converts to Acc
    out = row + cols;
  }
  std::fill(out, dst + total, Acc(0));
}

template <typename T, typename Acc>
void stage_plane(const T* src, const DirectPlan& p, Acc* dst) {
  // Source rows and columns that land inside the staged plane (pads may be negative).
  const int64_t y0 = std::max<int64_t>(0, -p.pad_top);
  const int64_t y1 = std::min(p.src_h, p.staged_h() - p.pad_top);
  const int64_t x0 = std::max<int64_t>(0, -p.pad_left);
  const int64_t x1 = std::min(p.src_w, p.staged_w() - p.pad_left);
  const int64_t total = staged_stride<Acc>(p);
  if (y1 <= y0 || x1 <= x0) {
    std::fill(dst, dst + total, Acc(0));
    return;
  }
  const int64_t wp = p.staged_w();
  Acc* first = dst + (y0 + p.pad_top) * wp;
  std::fill(dst, first, Acc(0));
  Acc* out = first;
  for (int64_t y = y0; y < y1; ++y) {
    Acc* row = first + (y - y0) * wp;
    Acc* begin = row + x0 + p.pad_left;
    std::fill(out, begin, Acc(0));
    std::copy(src + y * p.src_w + x0, src + y * p.src_w + x1, begin);
    out = begin + (x1 - x0);
  }
  std::fill(out, dst + total, Acc(0));
}

// wide[j] = sum_{ic, kh, kw} weights[ic, kh, kw] * staged[ic][j + tap offset], for j up to
// wide_len rounded up to whole vectors. Four vectors of outputs stay in registers across
// every input channel and tap.
template <typename Acc>
void correlate_wide(const DirectPlan& p, int64_t channels, const Acc* staged, int64_t stride,
                    const Acc* weights, Acc* wide) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t kV = Vec::size();
  const int64_t wp = p.staged_w(), taps = p.kernel_h * p.kernel_w;
  const int64_t len = round_up(p.wide_len(), kV);
  int64_t j = 0;
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
    a0.store(wide + j);
    a1.store(wide + j + kV);
    a2.store(wide + j + 2 * kV);
    a3.store(wide + j + 3 * kV);
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
    a.store(wide + j);
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
  at::parallel_for(0, batch * groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> staged(in_per_group * stride);
    std::vector<Acc> wide(round_up(p.wide_len(), Vectorized<Acc>::size()));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, ng = task / chunks, g = ng % groups, n = ng / groups;
      const T* src = input + (n * groups + g) * in_per_group * in_plane;
      for (int64_t ic = 0; ic < in_per_group; ++ic) {
        stage_plane(src + ic * in_plane, p, staged.data() + ic * stride);
      }
      const int64_t oc_end = std::min(out_per_group, (c + 1) * chunk);
      for (int64_t o = c * chunk; o < oc_end; ++o) {
        const int64_t oc = g * out_per_group + o;
        correlate_wide(p, in_per_group, staged.data(), stride, weights + oc * in_per_group * taps,
                       wide.data());
        T* out = output + (n * groups * out_per_group + oc) * out_plane;
        // Bias + activation over the whole wide buffer (full vectors, no per-row tails),
        // then the valid columns of each row are copied out.
        const Acc b = bias ? static_cast<Acc>(bias[oc]) : Acc(0);
        finish_row_inplace<Acc>(fn, bias != nullptr, b, wide.data(),
                                static_cast<int64_t>(wide.size()));
        for (int64_t oh = 0; oh < p.out_h; ++oh) {
          std::copy(wide.data() + oh * wp, wide.data() + oh * wp + p.out_w, out + oh * p.out_w);
        }
      }
    }
  });
}

// out[t] += <grad, shifted[t]> for kCount taps, each gradient vector loaded once.
// `len` is a whole number of vectors.
template <int kCount, typename Acc>
void dots(const Acc* grad, const Acc* const* shifted, int64_t len, Acc* out) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t kV = Vec::size();
  Vec acc[kCount];
  for (int t = 0; t < kCount; ++t) acc[t] = Vec(Acc(0));
  for (int64_t j = 0; j < len; j += kV) {
    const Vec g = Vec::loadu(grad + j);
    for (int t = 0; t < kCount; ++t) acc[t] = at::vec::fmadd(g, Vec::loadu(shifted[t] + j), acc[t]);
  }
  for (int t = 0; t < kCount; ++t) out[t] += cpu::detail::lane_sum(acc[t]);
}

template <typename Acc>
void dots_any(const Acc* grad, const Acc* const* shifted, int64_t count, int64_t len, Acc* out) {
  constexpr int64_t kMax = 8;
  for (; count >= kMax; count -= kMax, shifted += kMax, out += kMax) {
    dots<kMax>(grad, shifted, len, out);
  }
  switch (count) {
    case 7: return dots<7>(grad, shifted, len, out);
    case 6: return dots<6>(grad, shifted, len, out);
    case 5: return dots<5>(grad, shifted, len, out);
    case 4: return dots<4>(grad, shifted, len, out);
    case 3: return dots<3>(grad, shifted, len, out);
    case 2: return dots<2>(grad, shifted, len, out);
    case 1: return dots<1>(grad, shifted, len, out);
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
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> staged(in_pg * stride);
    std::vector<Acc> grad_wide(len);
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
        const T* src = input + (n * s.in_channels + g * in_pg) * s.in_plane();
        for (int64_t ic = 0; ic < in_pg; ++ic) {
          stage_plane(src + ic * s.in_plane(), p, staged.data() + ic * stride);
        }
        for (int64_t o = o_begin; o < o_end; ++o) {
          const T* go = grad_output + (n * s.out_channels + g * out_pg + o) * s.out_plane();
          copy_rows(go, s.out_h, s.out_w, wp, 0, grad_wide.data(), len);
          dots_any(grad_wide.data(), shifted.data(), in_pg * taps, len,
                   sums.data() + (o - o_begin) * in_pg * taps);
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

// col[row, j] = im2col value of column begin + j, for one sample and group; `ld` is the
// row stride of col.
template <typename T>
void im2col(const T* plane, const ConvShape& s, int64_t begin, int64_t end, T* col, int64_t ld) {
  for (int64_t row = 0; row < s.patch_size(); ++row) {
    const int64_t kw = row % s.kernel_w, kh = (row / s.kernel_w) % s.kernel_h;
    const int64_t ic = row / (s.kernel_w * s.kernel_h);
    const int64_t iw0 = input_coord(0, kw, s.stride_w, s.pad_w, s.dilation_w);
    const auto [lo, hi] = inside_columns(s, kw);
    for_each_run(s, begin, end, [&](int64_t oh, int64_t ow0, int64_t ow1, int64_t offset) {
      T* dst = col + row * ld + offset - ow0;  // dst[ow] for ow in [ow0, ow1)
      const int64_t ih = input_coord(oh, kh, s.stride_h, s.pad_h, s.dilation_h);
      if (ih < 0 || ih >= s.in_h) {
        std::fill(dst + ow0, dst + ow1, T(0));
        return;
      }
      const T* src = plane + (ic * s.in_h + ih) * s.in_w + iw0;
      const int64_t a = std::clamp(lo, ow0, ow1), b = std::clamp(hi, a, ow1);
      std::fill(dst + ow0, dst + a, T(0));
      if (s.stride_w == 1) {
        std::copy(src + a, src + b, dst + a);
      } else {
        for (int64_t ow = a; ow < b; ++ow) dst[ow] = src[ow * s.stride_w];
      }
      std::fill(dst + b, dst + ow1, T(0));
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

// Tasks are (sample, column tile); each does every group of its tile.
template <typename T, typename Fn>
void gemm_forward(const Fn& fn, const ConvShape& s, const Tensor& input, const Tensor& weight,
                  const T* bias, const Tensor& output) {
  using Acc = opmath_t<T>;
  const auto options = input.options();
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane();
  const int64_t tile = column_tile(k, cols, sizeof(T));
  const int64_t tiles = ceil_div(cols, tile);
  const bool pointwise = is_pointwise(s);
  const T* in = input.const_data_ptr<T>();
  const T* w = weight.const_data_ptr<T>();
  T* out = output.data_ptr<T>();
  for_each_task(s.batch * tiles, [&](int64_t begin, int64_t end) {
    std::vector<T> col(pointwise ? 0 : k * tile);
    std::vector<T> result(out_pg * tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, c0 = (task % tiles) * tile;
      const int64_t width = std::min(tile, cols - c0);
      for (int64_t g = 0; g < s.groups; ++g) {
        const T* plane = in + (n * s.in_channels + g * in_pg) * s.in_plane();
        if (!pointwise) im2col(plane, s, c0, c0 + width, col.data(), width);
        Tensor result_g = matrix(result.data(), out_pg, width, width, options);
        at::mm_out(result_g, matrix(w + g * out_pg * k, out_pg, k, k, options),
                   pointwise ? matrix(plane + c0, k, width, cols, options)
                             : matrix(col.data(), k, width, width, options));
        for (int64_t o = 0; o < out_pg; ++o) {
          const int64_t oc = g * out_pg + o;
          const Acc b = bias ? static_cast<Acc>(bias[oc]) : Acc(0);
          T* dst = out + (n * s.out_channels + oc) * cols + c0;
          const T* src = result.data() + o * width;
          if (bias) {
            map_range([fn, b](auto x) { using V = decltype(x); return fn.forward(x + V(b)); },
                      width, dst, src);
          } else {
            map_range([fn](auto x) { return fn.forward(x); }, width, dst, src);
          }
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
  const auto options = grad_output.options();
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane(), in_plane = s.in_plane();
  const int64_t tile = column_tile(k, cols, sizeof(T));
  const bool pointwise = is_pointwise(s);
  const T* go = grad_output.const_data_ptr<T>();
  const T* w = weight.const_data_ptr<T>();
  T* gi = grad_input.data_ptr<T>();
  const bool epilogue = bias != nullptr || !std::is_same_v<Fn, activation::Identity<Acc>>;
  for_each_task(s.batch, [&](int64_t begin, int64_t end) {
    std::vector<T> col(pointwise ? 0 : k * tile);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < s.groups; ++g) {
        T* plane = gi + (n * s.in_channels + g * in_pg) * in_plane;
        const Tensor weight_t = matrix(w + g * out_pg * k, out_pg, k, k, options).t();
        const T* grad = go + (n * s.out_channels + g * out_pg) * cols;
        if (pointwise) {  // the gradient is weight_g^T @ grad_output[n, g] itself
          Tensor result = matrix(plane, k, cols, cols, options);
          at::mm_out(result, weight_t, matrix(grad, out_pg, cols, cols, options));
          continue;
        }
        std::fill(plane, plane + in_pg * in_plane, T(0));
        for (int64_t c0 = 0; c0 < cols; c0 += tile) {
          const int64_t width = std::min(tile, cols - c0);
          Tensor result = matrix(col.data(), k, width, width, options);
          at::mm_out(result, weight_t, matrix(grad + c0, out_pg, width, cols, options));
          col2im_add(col.data(), width, s, c0, c0 + width, plane);
        }
      }
      if (epilogue) {
        for (int64_t ic = 0; ic < s.in_channels; ++ic) {
          finish_row_inplace<T>(fn, bias != nullptr, bias ? static_cast<Acc>(bias[ic]) : Acc(0),
                                gi + (n * s.in_channels + ic) * in_plane, in_plane);
        }
      }
    }
  });
}

// grad_weight_g = sum_n grad_output[n, g] @ im2col(input[n, g])^T. The batch is cut into
// one fixed range per thread, each summing into its own buffer (in opmath); the buffers
// are then added in range order.
template <typename T>
void gemm_backward_weight(const ConvShape& s, const Tensor& input, const Tensor& grad_output,
                          const Tensor& grad_weight) {
  using Acc = opmath_t<T>;
  const auto options = input.options();
  const auto acc_options = options.dtype(c10::CppTypeToScalarType<Acc>::value);
  const int64_t in_pg = s.in_per_group(), out_pg = s.out_per_group(), k = s.patch_size();
  const int64_t cols = s.out_plane();
  const int64_t tile = column_tile(k, cols, sizeof(T));
  const bool pointwise = is_pointwise(s);
  const T* in = input.const_data_ptr<T>();
  const T* go = grad_output.const_data_ptr<T>();
  const int64_t ranges = std::min<int64_t>(s.batch, at::get_num_threads());
  Tensor partial = at::zeros({ranges, s.out_channels, k}, acc_options);
  auto body = [&](int64_t begin, int64_t end) {
    std::vector<T> col(pointwise ? 0 : k * tile);
    for (int64_t r = begin; r < end; ++r) {
      Acc* sums = partial.data_ptr<Acc>() + r * s.out_channels * k;
      for (int64_t n = r * s.batch / ranges; n < (r + 1) * s.batch / ranges; ++n) {
        for (int64_t g = 0; g < s.groups; ++g) {
          const T* plane = in + (n * s.in_channels + g * in_pg) * s.in_plane();
          const T* grad = go + (n * s.out_channels + g * out_pg) * cols;
          Tensor sum_g = matrix(sums + g * out_pg * k, out_pg, k, k, acc_options);
          for (int64_t c0 = 0; c0 < cols; c0 += tile) {
            const int64_t width = std::min(tile, cols - c0);
            if (!pointwise) im2col(plane, s, c0, c0 + width, col.data(), width);
            const Tensor grad_tile = matrix(grad + c0, out_pg, width, cols, options);
            const Tensor col_t = pointwise ? matrix(plane + c0, k, width, cols, options).t()
                                           : matrix(col.data(), k, width, width, options).t();
            if constexpr (std::is_same_v<T, Acc>) {
              at::addmm_out(sum_g, sum_g, grad_tile, col_t);
            } else {
              sum_g.add_(at::mm(grad_tile, col_t));  // reduced precision: sum in float
            }
          }
        }
      }
    }
  };
  if (ranges > 1) {
    at::parallel_for(0, ranges, 1, body);
  } else {
    body(0, ranges);
  }
  grad_weight.view({s.out_channels, k}).copy_(partial.sum(0));
}

// ---- Entry points ------------------------------------------------------------------------

// The direct path's backward passes run their flat loops over padded planes: they also
// multiply the zero padding of one operand by values of the other that no term of the
// convolution pairs (the input under the gradient's padding columns, the flipped kernel
// over the gradient's border). Zero times a finite value adds nothing; zero times inf or
// NaN would leak NaN where the convolution has none. Such operands take the im2col
// path, which multiplies only the pairs the convolution defines.
bool all_finite(const Tensor& t) {
  return at::isfinite(t).all().item<bool>();
}

DirectPlan forward_plan(const ConvShape& s) {
  return DirectPlan{s.in_h,     s.in_w,     s.pad_h,      s.pad_w,      s.out_h,
                    s.out_w,    s.kernel_h, s.kernel_w, s.dilation_h, s.dilation_w};
}

void forward(const ConvShape& s, const Tensor& input, const Tensor& weight, const Tensor& bias,
             Activation act, double slope, const Tensor& output) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_conv2d_forward_cpu", [&] {
    using Acc = opmath_t<scalar_t>;
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    visit_activation<Acc>(act, slope, [&](auto fn) {
      if (use_direct(s.in_per_group(), s.out_per_group(), s.stride_h, s.stride_w)) {
        const Tensor w = weight.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
        direct_forward<scalar_t>(fn, forward_plan(s), s.batch, s.groups, s.in_per_group(),
                                 s.out_per_group(), input.const_data_ptr<scalar_t>(),
                                 w.const_data_ptr<Acc>(), b, output.data_ptr<scalar_t>());
      } else {
        gemm_forward<scalar_t>(fn, s, input, weight, b, output);
      }
    });
  });
}

void backward_input(const ConvShape& s, const Tensor& grad_output, const Tensor& weight,
                    const Tensor& bias, Activation act, double slope, const Tensor& grad_input) {
  PYOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "pyops_conv2d_backward_input_cpu", [&] {
    using Acc = opmath_t<scalar_t>;
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    visit_activation<Acc>(act, slope, [&](auto fn) {
      if (use_direct(s.out_per_group(), s.in_per_group(), s.stride_h, s.stride_w) &&
          all_finite(weight)) {
        // With stride 1 the input gradient is a correlation of grad_output with the
        // flipped kernel, channels swapped within each group, padded by
        // dilation * (kernel - 1) - pad (negative: cropped).
        const Tensor w = weight.to(c10::CppTypeToScalarType<Acc>::value)
                             .view({s.groups, s.out_per_group(), s.in_per_group(), s.kernel_h,
                                    s.kernel_w})
                             .transpose(1, 2)
                             .flip({3, 4})
                             .contiguous();
        const DirectPlan plan{s.out_h,
                              s.out_w,
                              s.dilation_h * (s.kernel_h - 1) - s.pad_h,
                              s.dilation_w * (s.kernel_w - 1) - s.pad_w,
                              s.in_h,
                              s.in_w,
                              s.kernel_h,
                              s.kernel_w,
                              s.dilation_h,
                              s.dilation_w};
        direct_forward<scalar_t>(fn, plan, s.batch, s.groups, s.out_per_group(),
                                 s.in_per_group(), grad_output.const_data_ptr<scalar_t>(),
                                 w.const_data_ptr<Acc>(), b, grad_input.data_ptr<scalar_t>());
      } else {
        gemm_backward_input<scalar_t>(fn, s, grad_output, weight, b, grad_input);
      }
    });
  });
}

void backward_weight(const ConvShape& s, const Tensor& input, const Tensor& grad_output,
                     const Tensor& grad_weight) {
  PYOPS_DISPATCH_FLOATING(input.scalar_type(), "pyops_conv2d_backward_weight_cpu", [&] {
    if (use_direct(s.in_per_group(), s.out_per_group(), s.stride_h, s.stride_w) &&
        all_finite(input)) {
      direct_backward_weight<scalar_t>(s, forward_plan(s), input.const_data_ptr<scalar_t>(),
                                       grad_output.const_data_ptr<scalar_t>(),
                                       grad_weight.data_ptr<scalar_t>());
    } else {
      gemm_backward_weight<scalar_t>(s, input, grad_output, grad_weight);
    }
  });
}

}  // namespace

PYOPS_REGISTER_CPU_KERNEL(forward_kernel, &forward);
PYOPS_REGISTER_CPU_KERNEL(backward_input_kernel, &backward_input);
PYOPS_REGISTER_CPU_KERNEL(backward_weight_kernel, &backward_weight);

}  // namespace CPU_CAPABILITY
}  // namespace pyops::conv
