// The pooling family's operators: schemas, argument checks (torch's rules and, where
// they say the same thing, torch's words), output allocation and autograd, written once
// for every device. The arithmetic is in the kernels (pool_cpu.cpp, pool_cuda.cu).
//
// Operators:
//   max_pool2d, min_pool2d, relu_max_pool2d          -> output (no indices computed
//                                                       unless autograd needs them)
//   max_pool2d_with_indices, min_pool2d_with_indices -> (output, torch's int64 indices)
//   avg_pool2d                                       -> output
//   _pool2d_with_offsets   private: (output, tap offsets within the window, uint8 or
//                          int32), what the autograd kernels call and save
//   _max_pool2d_backward   routes grad_output by tap offsets or int64 indices
//   _avg_pool2d_backward

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/memory.h"
#include "common/operators.h"
#include "pool/pool.h"

namespace pyops::pool {

DispatchTable<ArgForwardFn> arg_forward_kernel("pool arg forward");
DispatchTable<ArgBackwardFn> arg_backward_kernel("pool arg backward");
DispatchTable<AvgForwardFn> avg_forward_kernel("avg_pool forward");
DispatchTable<AvgBackwardFn> avg_backward_kernel("avg_pool backward");

namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- Arguments ------------------------------------------------------------------------

struct Pair {
  int64_t h, w;
};

// int[2] arguments: one int (broadcast by the schema) or two; `allow_empty` for stride,
// whose empty default means "the kernel size", as in torch.
Pair pair_arg(IntArrayRef values, const char* arg, const char* op, const char* hint) {
  TORCH_CHECK(values.size() == 1 || values.size() == 2, op, ": ", arg, " must ", hint,
              ", got ", values);
  return values.size() == 1 ? Pair{values[0], values[0]} : Pair{values[0], values[1]};
}

struct PoolArgs {
  Pair kernel, stride, padding, dilation;
  bool ceil_mode;
};

PoolArgs parse_args(IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                    IntArrayRef dilation, bool ceil_mode, const char* op) {
  PoolArgs a;
  a.kernel = pair_arg(kernel_size, "kernel_size", op, "either be a single int, or a tuple of two ints");
  a.stride = stride.empty()
                 ? a.kernel
                 : pair_arg(stride, "stride", op,
                            "either be omitted, a single int, or a tuple of two ints");
  a.padding = pair_arg(padding, "padding", op, "either be a single int, or a tuple of two ints");
  a.dilation = pair_arg(dilation, "dilation", op, "either be a single int, or a tuple of two ints");
  a.ceil_mode = ceil_mode;
  // torch converts these to int and raises beyond its range; the bound also keeps the
  // window arithmetic below far from int64 overflow.
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  for (auto [arg, pair] : {std::pair{"kernel_size", a.kernel}, std::pair{"stride", a.stride},
                           std::pair{"padding", a.padding}, std::pair{"dilation", a.dilation}}) {
    TORCH_CHECK(pair.h <= kMax && pair.w <= kMax, op, ": ", arg, " must be at most ", kMax,
                " (a 32-bit int, as in torch), got ", arg, "=(", pair.h, ", ", pair.w, ")");
  }
  TORCH_CHECK(a.kernel.h > 0 && a.kernel.w > 0, op,
              ": kernel_size should be greater than zero, but got kernel_size=(", a.kernel.h,
              ", ", a.kernel.w, ")");
  TORCH_CHECK(a.stride.h != 0 && a.stride.w != 0, op,
              ": stride should not be zero, but got stride=(", a.stride.h, ", ", a.stride.w, ")");
  TORCH_CHECK(a.stride.h > 0 && a.stride.w > 0, op,
              ": stride should be greater than zero, but got stride=(", a.stride.h, ", ",
              a.stride.w, ")");
  TORCH_CHECK(a.dilation.h > 0 && a.dilation.w > 0, op,
              ": dilation should be greater than zero, but got dilation=(", a.dilation.h, ", ",
              a.dilation.w, ")");
  TORCH_CHECK(a.padding.h >= 0 && a.padding.w >= 0, op,
              ": pad must be non-negative, but got padding=(", a.padding.h, ", ", a.padding.w,
              ")");
  for (auto [pad, kernel, dil] : {std::tuple{a.padding.h, a.kernel.h, a.dilation.h},
                                  std::tuple{a.padding.w, a.kernel.w, a.dilation.w}}) {
    TORCH_CHECK(pad <= ((kernel - 1) * dil + 1) / 2, op,
                ": pad should be at most half of effective kernel size, but got pad=", pad,
                ", kernel_size=", kernel, " and dilation=", dil);
    // torch also requires half the kernel itself (what its pooling shape check says).
    TORCH_CHECK(pad <= kernel / 2, op,
                ": pad should be smaller than or equal to half of kernel size, but got pad=",
                pad, ", kernel_size=", kernel);
  }
  return a;
}

// torch's pooling_output_shape: floor or ceil division, and in ceil_mode the last window
// must start inside the input or its left padding.
int64_t output_size(int64_t in, int64_t kernel, int64_t pad, int64_t stride, int64_t dilation,
                    bool ceil_mode, const char* op) {
  // The arguments are at most 2^31 - 1 (parse_args); only `in` (the size of a possibly
  // expanded tensor) can bring the sum near the int64 limit.
  const int64_t numerator = checked_add(in, 2 * pad, "the padded input size", op) -
                            dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (numerator >= 0 ? numerator / stride : -((-numerator + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

bool is_channels_last(const Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// Geometry of input sizes [N, C, H, W] or [C, H, W].
Geometry make_geometry(IntArrayRef sizes, const PoolArgs& a, bool channels_last,
                       const char* op) {
  const int64_t dim = static_cast<int64_t>(sizes.size());
  TORCH_CHECK(dim == 3 || dim == 4, op,
              ": expected input to be a 3D (C, H, W) or 4D (N, C, H, W) tensor, got ", dim,
              "D of shape ", sizes);
  TORCH_CHECK(sizes[dim - 3] != 0 && sizes[dim - 2] != 0 && sizes[dim - 1] != 0, op,
              ": expected input with non-zero channels, height and width (only the batch "
              "may be empty), got shape ", sizes);
  Geometry g;
  g.batch = dim == 4 ? sizes[0] : 1;
  g.channels = sizes[dim - 3];
  g.in_h = sizes[dim - 2];
  g.in_w = sizes[dim - 1];
  g.kernel_h = a.kernel.h;
  g.kernel_w = a.kernel.w;
  g.stride_h = a.stride.h;
  g.stride_w = a.stride.w;
  g.pad_h = a.padding.h;
  g.pad_w = a.padding.w;
  g.dilation_h = a.dilation.h;
  g.dilation_w = a.dilation.w;
  g.out_h = output_size(g.in_h, g.kernel_h, g.pad_h, g.stride_h, g.dilation_h, a.ceil_mode, op);
  g.out_w = output_size(g.in_w, g.kernel_w, g.pad_w, g.stride_w, g.dilation_w, a.ceil_mode, op);
  g.channels_last = channels_last;
  TORCH_CHECK(g.out_h >= 1 && g.out_w >= 1, op, ": Given input size: (", g.channels, "x",
              g.in_h, "x", g.in_w, "). Calculated output size: (", g.channels, "x", g.out_h,
              "x", g.out_w, "). Output size is too small");
  return g;
}

std::vector<int64_t> output_sizes(IntArrayRef input_sizes, const Geometry& g) {
  std::vector<int64_t> sizes(input_sizes.begin(), input_sizes.end());
  sizes[sizes.size() - 2] = g.out_h;
  sizes[sizes.size() - 1] = g.out_w;
  return sizes;
}

at::MemoryFormat memory_format(const Geometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The input in the layout its kernels walk, with its geometry.
std::pair<Tensor, Geometry> prepare_input(const Tensor& self, const PoolArgs& a, const char* op) {
  check_floating(self, "input", op);
  const bool channels_last = is_channels_last(self);
  Geometry g = make_geometry(self.sizes(), a, channels_last, op);
  return {self.contiguous(memory_format(g)), g};
}

Tensor empty_output(IntArrayRef sizes, const Geometry& g, const at::TensorOptions& options) {
  return with_huge_pages(at::empty(sizes, options.memory_format(memory_format(g))));
}

ArgReduction parse_reduction(c10::string_view name, const char* op) {
  if (name == "max") return ArgReduction::Max;
  if (name == "min") return ArgReduction::Min;
  if (name == "relu_max") return ArgReduction::ReluMax;
  TORCH_CHECK_VALUE(false, op, ": expected reduction to be 'max', 'min' or 'relu_max', got '",
                    std::string(name), "'");
}

const char* reduction_name(ArgReduction r) {
  switch (r) {
    case ArgReduction::Max: return "max";
    case ArgReduction::Min: return "min";
    case ArgReduction::ReluMax: return "relu_max";
  }
  return "?";
}

// ---- Device-generic implementations -------------------------------------------------------

std::tuple<Tensor, Tensor> arg_pool(const Tensor& self, const PoolArgs& a, ArgReduction reduction,
                                    IndexKind kind, const char* op) {
  auto [input, g] = prepare_input(self, a, op);
  const auto sizes = output_sizes(self.sizes(), g);
  Tensor output = empty_output(sizes, g, input.options());
  Tensor indices;
  if (kind != IndexKind::None) {
    const auto index_dtype = kind == IndexKind::Offset8    ? at::kByte
                             : kind == IndexKind::Offset32 ? at::kInt
                                                           : at::kLong;
    indices = empty_output(sizes, g, input.options().dtype(index_dtype));
  }
  if (output.numel() > 0) {
    arg_forward_kernel(input.device().type())(reduction, kind, g, input, output, indices);
  }
  return {output, indices};
}

IndexKind offset_kind(const PoolArgs& a) {
  return offsets_fit_uint8(a.kernel.h, a.kernel.w) ? IndexKind::Offset8 : IndexKind::Offset32;
}

template <ArgReduction R>
struct Named;
template <> struct Named<ArgReduction::Max> { static constexpr const char* op = "pyops.max_pool2d"; };
template <> struct Named<ArgReduction::Min> { static constexpr const char* op = "pyops.min_pool2d"; };
template <> struct Named<ArgReduction::ReluMax> { static constexpr const char* op = "pyops.relu_max_pool2d"; };

template <ArgReduction R>
Tensor pool_no_indices(const Tensor& self, IntArrayRef kernel_size, IntArrayRef stride,
                       IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  const char* op = Named<R>::op;
  const PoolArgs a = parse_args(kernel_size, stride, padding, dilation, ceil_mode, op);
  return std::get<0>(arg_pool(self, a, R, IndexKind::None, op));
}

template <ArgReduction R>
std::tuple<Tensor, Tensor> pool_with_indices(const Tensor& self, IntArrayRef kernel_size,
                                             IntArrayRef stride, IntArrayRef padding,
                                             IntArrayRef dilation, bool ceil_mode) {
  const char* op = Named<R>::op;
  const PoolArgs a = parse_args(kernel_size, stride, padding, dilation, ceil_mode, op);
  return arg_pool(self, a, R, IndexKind::Flat64, op);
}

std::tuple<Tensor, Tensor> pool_with_offsets(const Tensor& self, IntArrayRef kernel_size,
                                             IntArrayRef stride, IntArrayRef padding,
                                             IntArrayRef dilation, bool ceil_mode,
                                             c10::string_view reduction) {
  constexpr const char* op = "pyops._pool2d_with_offsets";
  const PoolArgs a = parse_args(kernel_size, stride, padding, dilation, ceil_mode, op);
  return arg_pool(self, a, parse_reduction(reduction, op), offset_kind(a), op);
}

// Checks shared by the backward operators; returns the geometry of the forward.
Geometry backward_geometry(const Tensor& grad_output, IntArrayRef input_size, const PoolArgs& a,
                           bool channels_last, const char* op) {
  check_floating(grad_output, "grad_output", op);
  TORCH_CHECK(!channels_last || input_size.size() == 4, op,
              ": channels_last needs a 4D input_size, got ", input_size);
  Geometry g = make_geometry(input_size, a, channels_last, op);
  const auto expected = output_sizes(input_size, g);
  TORCH_CHECK(grad_output.sizes() == IntArrayRef(expected), op,
              ": expected grad_output of shape ", IntArrayRef(expected),
              " (the pooling output of input_size ", input_size, "), got ", grad_output.sizes());
  return g;
}

Tensor max_pool_backward(const Tensor& grad_output, const Tensor& indices, IntArrayRef input_size,
                         IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                         IntArrayRef dilation, bool ceil_mode, bool channels_last) {
  constexpr const char* op = "pyops._max_pool2d_backward";
  const PoolArgs a = parse_args(kernel_size, stride, padding, dilation, ceil_mode, op);
  const Geometry g = backward_geometry(grad_output, input_size, a, channels_last, op);
  check_defined(indices, "indices", op);
  check_same_shape(indices, "indices", grad_output, "grad_output", op);
  check_same_device(indices, "indices", grad_output, "grad_output", op);
  IndexKind kind;
  switch (indices.scalar_type()) {
    case at::kByte: kind = IndexKind::Offset8; break;
    case at::kInt: kind = IndexKind::Offset32; break;
    case at::kLong: kind = IndexKind::Flat64; break;
    default:
      TORCH_CHECK_TYPE(false, op, ": expected indices of dtype uint8 or int32 (tap offsets "
                       "within the window) or int64 (torch's indices), got ",
                       indices.scalar_type());
  }
  const at::MemoryFormat fmt = memory_format(g);
  Tensor grad = grad_output.contiguous(fmt);
  Tensor index = indices.contiguous(fmt);
  Tensor grad_input =
      with_huge_pages(at::empty(input_size, grad.options().memory_format(fmt)));
  if (grad_input.numel() > 0) {
    arg_backward_kernel(grad.device().type())(kind, g, grad, index, grad_input);
  }
  return grad_input;
}

void check_divisor(std::optional<int64_t> divisor_override, const char* op) {
  TORCH_CHECK(!divisor_override.has_value() || divisor_override.value() != 0, op,
              ": divisor_override must be not zero (None means the window size)");
}

Tensor avg_pool(const Tensor& self, IntArrayRef kernel_size, IntArrayRef stride,
                IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                std::optional<int64_t> divisor_override) {
  constexpr const char* op = "pyops.avg_pool2d";
  const PoolArgs a = parse_args(kernel_size, stride, padding, {1}, ceil_mode, op);
  check_divisor(divisor_override, op);
  auto [input, g] = prepare_input(self, a, op);
  Tensor output = empty_output(output_sizes(self.sizes(), g), g, input.options());
  if (output.numel() > 0) {
    avg_forward_kernel(input.device().type())(g, count_include_pad, divisor_override.value_or(0),
                                              input, output);
  }
  return output;
}

Tensor avg_pool_backward(const Tensor& grad_output, IntArrayRef input_size,
                         IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                         bool ceil_mode, bool count_include_pad,
                         std::optional<int64_t> divisor_override, bool channels_last) {
  constexpr const char* op = "pyops._avg_pool2d_backward";
  const PoolArgs a = parse_args(kernel_size, stride, padding, {1}, ceil_mode, op);
  check_divisor(divisor_override, op);
  const Geometry g = backward_geometry(grad_output, input_size, a, channels_last, op);
  const at::MemoryFormat fmt = memory_format(g);
  Tensor grad = grad_output.contiguous(fmt);
  Tensor grad_input =
      with_huge_pages(at::empty(input_size, grad.options().memory_format(fmt)));
  if (grad_input.numel() > 0) {
    avg_backward_kernel(grad.device().type())(g, count_include_pad, divisor_override.value_or(0),
                                              grad, grad_input);
  }
  return grad_input;
}

// ---- Calling the operators through the dispatcher -------------------------------------------
// Autograd kernels call operators (not the *_impl functions above) so that fake tensors
// and torch.compile see every step.

using ArgPoolSignature = Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef,
                                bool);
using ArgPoolIndicesSignature = std::tuple<Tensor, Tensor>(const Tensor&, IntArrayRef, IntArrayRef,
                                                           IntArrayRef, IntArrayRef, bool);

Tensor call_max_pool_backward(const Tensor& grad, const Tensor& indices, IntArrayRef input_size,
                              IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                              IntArrayRef dilation, bool ceil_mode, bool channels_last) {
  static auto op = op_handle<Tensor(const Tensor&, const Tensor&, IntArrayRef, IntArrayRef,
                                    IntArrayRef, IntArrayRef, IntArrayRef, bool, bool)>(
      "pyops::_max_pool2d_backward");
  return op.call(grad, indices, input_size, kernel_size, stride, padding, dilation, ceil_mode,
                 channels_last);
}

// ---- Autograd -----------------------------------------------------------------------------

// Max, min and relu-max pooling. With `with_indices` the forward computes torch's int64
// indices (return_indices=True) and the backward routes by them; otherwise it computes
// tap offsets (1 or 4 bytes each) only because autograd needs them.
struct ArgPoolFunction : torch::autograd::Function<ArgPoolFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& self, IntArrayRef kernel_size,
                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                               bool ceil_mode, int64_t reduction, bool with_indices) {
    const auto r = static_cast<ArgReduction>(reduction);
    std::tuple<Tensor, Tensor> result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (with_indices) {
        static auto max_op = op_handle<ArgPoolIndicesSignature>("pyops::max_pool2d_with_indices");
        static auto min_op = op_handle<ArgPoolIndicesSignature>("pyops::min_pool2d_with_indices");
        result = (r == ArgReduction::Min ? min_op : max_op)
                     .call(self, kernel_size, stride, padding, dilation, ceil_mode);
      } else {
        static auto op = op_handle<std::tuple<Tensor, Tensor>(
            const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, bool,
            c10::string_view)>("pyops::_pool2d_with_offsets");
        result = op.call(self, kernel_size, stride, padding, dilation, ceil_mode,
                         reduction_name(r));
      }
    }
    const Tensor& indices = std::get<1>(result);
    ctx->mark_non_differentiable({indices});
    ctx->save_for_backward({indices});
    ctx->saved_data["input_size"] = self.sizes().vec();
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["channels_last"] = is_channels_last(self);
    return {std::get<0>(result), indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor indices = ctx->get_saved_variables()[0];
    auto& d = ctx->saved_data;
    Tensor grad_input;
    if (grads[0].defined()) {
      grad_input = call_max_pool_backward(
          grads[0], indices, d["input_size"].toIntVector(), d["kernel_size"].toIntVector(),
          d["stride"].toIntVector(), d["padding"].toIntVector(), d["dilation"].toIntVector(),
          d["ceil_mode"].toBool(), d["channels_last"].toBool());
    }
    return {grad_input, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The input position (h * in_w + w within the plane) each output routes its gradient to,
// and where it routes none (fused relu); from tap offsets or torch's int64 indices.
std::pair<Tensor, Tensor> routed_positions(const Tensor& indices, IntArrayRef input_size,
                                           const PoolArgs& a) {
  if (indices.scalar_type() == at::kLong) return {indices, indices.lt(0)};
  const int64_t in_w = input_size.back();
  const int64_t out_h = indices.size(-2), out_w = indices.size(-1);
  const Tensor blocked =
      indices.scalar_type() == at::kByte ? indices.eq(kNoTap<uint8_t>) : indices.eq(kNoTap<int32_t>);
  const Tensor offsets = indices.to(at::kLong);
  const Tensor kh = offsets.div(a.kernel.w, "floor"), kw = offsets.remainder(a.kernel.w);
  const auto long_options = offsets.options();
  const Tensor oh = at::arange(out_h, long_options).view({out_h, 1});
  const Tensor ow = at::arange(out_w, long_options).view({1, out_w});
  const Tensor ih = oh * a.stride.h - a.padding.h + kh * a.dilation.h;
  const Tensor iw = ow * a.stride.w - a.padding.w + kw * a.dilation.w;
  return {at::where(blocked, 0, ih * in_w + iw), blocked};
}

// _max_pool2d_backward is linear in grad_output: its own backward gathers the incoming
// gradient at the positions the indices name (double backward of max/min pooling).
struct MaxPoolBackwardFunction : torch::autograd::Function<MaxPoolBackwardFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& grad_output, const Tensor& indices,
                        IntArrayRef input_size, IntArrayRef kernel_size, IntArrayRef stride,
                        IntArrayRef padding, IntArrayRef dilation, bool ceil_mode,
                        bool channels_last) {
    Tensor result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = call_max_pool_backward(grad_output, indices, input_size, kernel_size, stride,
                                      padding, dilation, ceil_mode, channels_last);
    }
    ctx->save_for_backward({indices});
    ctx->saved_data["input_size"] = input_size.vec();
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(9);
    if (!grads[0].defined()) return result;
    const Tensor indices = ctx->get_saved_variables()[0];
    auto& d = ctx->saved_data;
    const auto input_size = d["input_size"].toIntVector();
    const PoolArgs a = parse_args(d["kernel_size"].toIntVector(), d["stride"].toIntVector(),
                                  d["padding"].toIntVector(), d["dilation"].toIntVector(), false,
                                  "pyops._max_pool2d_backward");
    auto [positions, blocked] = routed_positions(indices, input_size, a);
    const Tensor gathered = grads[0].flatten(-2).gather(-1, positions.flatten(-2)).view(
        indices.sizes());
    result[0] = at::where(blocked, 0, gathered);
    return result;
  }
};

struct AvgPoolFunction : torch::autograd::Function<AvgPoolFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& self, IntArrayRef kernel_size,
                        IntArrayRef stride, IntArrayRef padding, bool ceil_mode,
                        bool count_include_pad, std::optional<int64_t> divisor_override) {
    static auto op = op_handle<Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool,
                                      bool, std::optional<int64_t>)>("pyops::avg_pool2d");
    Tensor result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(self, kernel_size, stride, padding, ceil_mode, count_include_pad,
                       divisor_override);
    }
    ctx->saved_data["input_size"] = self.sizes().vec();
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["count_include_pad"] = count_include_pad;
    ctx->saved_data["divisor_override"] = divisor_override.value_or(0);
    ctx->saved_data["channels_last"] = is_channels_last(self);
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

using AvgBackwardSignature = Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef,
                                    IntArrayRef, bool, bool, std::optional<int64_t>, bool);

// The backward of average pooling is linear in grad_output; its own backward is the
// forward pooling of the incoming gradient (double backward).
struct AvgPoolBackwardFunction : torch::autograd::Function<AvgPoolBackwardFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& grad_output, IntArrayRef input_size,
                        IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                        bool ceil_mode, bool count_include_pad,
                        std::optional<int64_t> divisor_override, bool channels_last) {
    static auto op = op_handle<AvgBackwardSignature>("pyops::_avg_pool2d_backward");
    Tensor result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(grad_output, input_size, kernel_size, stride, padding, ceil_mode,
                       count_include_pad, divisor_override, channels_last);
    }
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["count_include_pad"] = count_include_pad;
    ctx->saved_data["divisor_override"] = divisor_override.value_or(0);
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool,
                                      bool, std::optional<int64_t>)>("pyops::avg_pool2d");
    auto& d = ctx->saved_data;
    const int64_t divisor = d["divisor_override"].toInt();
    Tensor grad;
    if (grads[0].defined()) {
      grad = op.call(grads[0], d["kernel_size"].toIntVector(), d["stride"].toIntVector(),
                     d["padding"].toIntVector(), d["ceil_mode"].toBool(),
                     d["count_include_pad"].toBool(),
                     divisor == 0 ? std::nullopt : std::optional<int64_t>(divisor));
    }
    return {grad,     Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor call_avg_pool_backward(const Tensor& grad, IntArrayRef input_size, IntArrayRef kernel_size,
                              IntArrayRef stride, IntArrayRef padding, bool ceil_mode,
                              bool count_include_pad, std::optional<int64_t> divisor_override,
                              bool channels_last) {
  static auto op = op_handle<AvgBackwardSignature>("pyops::_avg_pool2d_backward");
  return op.call(grad, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override, channels_last);
}

variable_list AvgPoolFunction::backward(AutogradContext* ctx, variable_list grads) {
  auto& d = ctx->saved_data;
  if (!grads[0].defined()) return variable_list(7);
  const int64_t divisor = d["divisor_override"].toInt();
  return {call_avg_pool_backward(grads[0], d["input_size"].toIntVector(),
                                 d["kernel_size"].toIntVector(), d["stride"].toIntVector(),
                                 d["padding"].toIntVector(), d["ceil_mode"].toBool(),
                                 d["count_include_pad"].toBool(),
                                 divisor == 0 ? std::nullopt : std::optional<int64_t>(divisor),
                                 d["channels_last"].toBool()),
          Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
}

// ---- Autograd-key kernels ---------------------------------------------------------------
// Without a gradient to record they go straight to the device kernel, computing no
// indices at all.

template <ArgReduction R>
Tensor pool_autograd(const Tensor& self, IntArrayRef kernel_size, IntArrayRef stride,
                     IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  if (!any_requires_grad({&self})) {
    static auto op = op_handle<ArgPoolSignature>(
        R == ArgReduction::Max   ? "pyops::max_pool2d"
        : R == ArgReduction::Min ? "pyops::min_pool2d"
                                 : "pyops::relu_max_pool2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(self, kernel_size, stride, padding, dilation, ceil_mode);
  }
  return ArgPoolFunction::apply(self, kernel_size, stride, padding, dilation, ceil_mode,
                                static_cast<int64_t>(R), false)[0];
}

template <ArgReduction R>
std::tuple<Tensor, Tensor> pool_with_indices_autograd(const Tensor& self, IntArrayRef kernel_size,
                                                      IntArrayRef stride, IntArrayRef padding,
                                                      IntArrayRef dilation, bool ceil_mode) {
  if (!any_requires_grad({&self})) {
    static auto op = op_handle<ArgPoolIndicesSignature>(
        R == ArgReduction::Min ? "pyops::min_pool2d_with_indices" : "pyops::max_pool2d_with_indices");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(self, kernel_size, stride, padding, dilation, ceil_mode);
  }
  auto outputs = ArgPoolFunction::apply(self, kernel_size, stride, padding, dilation, ceil_mode,
                                        static_cast<int64_t>(R), true);
  return {outputs[0], outputs[1]};
}

std::tuple<Tensor, Tensor> pool_with_offsets_autograd(const Tensor& self, IntArrayRef kernel_size,
                                                      IntArrayRef stride, IntArrayRef padding,
                                                      IntArrayRef dilation, bool ceil_mode,
                                                      c10::string_view reduction) {
  const ArgReduction r = parse_reduction(reduction, "pyops._pool2d_with_offsets");
  if (!any_requires_grad({&self})) {
    static auto op = op_handle<std::tuple<Tensor, Tensor>(
        const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, bool,
        c10::string_view)>("pyops::_pool2d_with_offsets");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(self, kernel_size, stride, padding, dilation, ceil_mode, reduction);
  }
  auto outputs = ArgPoolFunction::apply(self, kernel_size, stride, padding, dilation, ceil_mode,
                                        static_cast<int64_t>(r), false);
  return {outputs[0], outputs[1]};
}

Tensor max_pool_backward_autograd(const Tensor& grad_output, const Tensor& indices,
                                  IntArrayRef input_size, IntArrayRef kernel_size,
                                  IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                  bool ceil_mode, bool channels_last) {
  if (!any_requires_grad({&grad_output})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_max_pool_backward(grad_output, indices, input_size, kernel_size, stride, padding,
                                  dilation, ceil_mode, channels_last);
  }
  return MaxPoolBackwardFunction::apply(grad_output, indices, input_size, kernel_size, stride,
                                        padding, dilation, ceil_mode, channels_last);
}

Tensor avg_pool_autograd(const Tensor& self, IntArrayRef kernel_size, IntArrayRef stride,
                         IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                         std::optional<int64_t> divisor_override) {
  if (!any_requires_grad({&self})) {
    static auto op = op_handle<Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool,
                                      bool, std::optional<int64_t>)>("pyops::avg_pool2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(self, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override);
  }
  return AvgPoolFunction::apply(self, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                divisor_override);
}

Tensor avg_pool_backward_autograd(const Tensor& grad_output, IntArrayRef input_size,
                                  IntArrayRef kernel_size, IntArrayRef stride,
                                  IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                                  std::optional<int64_t> divisor_override, bool channels_last) {
  if (!any_requires_grad({&grad_output})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_avg_pool_backward(grad_output, input_size, kernel_size, stride, padding,
                                  ceil_mode, count_include_pad, divisor_override, channels_last);
  }
  return AvgPoolBackwardFunction::apply(grad_output, input_size, kernel_size, stride, padding,
                                        ceil_mode, count_include_pad, divisor_override,
                                        channels_last);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  const std::string args =
      "(Tensor self, int[2] kernel_size, int[2] stride=[], int[2] padding=0, int[2] dilation=1, "
      "bool ceil_mode=False)";
  for (const char* name : {"max_pool2d", "min_pool2d"}) {
    m.def((std::string(name) + args + " -> Tensor").c_str());
    m.def((std::string(name) + "_with_indices" + args + " -> (Tensor, Tensor)").c_str());
  }
  m.def(("relu_max_pool2d" + args + " -> Tensor").c_str());
  m.def("_pool2d_with_offsets(Tensor self, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode, str reduction) -> (Tensor output, Tensor offsets)");
  m.def("_max_pool2d_backward(Tensor grad_output, Tensor indices, int[] input_size, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, "
        "bool channels_last) -> Tensor");
  m.def("avg_pool2d(Tensor self, int[2] kernel_size, int[2] stride=[], int[2] padding=0, "
        "bool ceil_mode=False, bool count_include_pad=True, int? divisor_override=None) -> Tensor");
  m.def("_avg_pool2d_backward(Tensor grad_output, int[] input_size, int[2] kernel_size, "
        "int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, "
        "int? divisor_override, bool channels_last) -> Tensor");
}

#define PYOPS_POOL_DEVICE_IMPLS(m)                                                        \
  m.impl("max_pool2d", pool_no_indices<ArgReduction::Max>);                               \
  m.impl("min_pool2d", pool_no_indices<ArgReduction::Min>);                               \
  m.impl("relu_max_pool2d", pool_no_indices<ArgReduction::ReluMax>);                      \
  m.impl("max_pool2d_with_indices", pool_with_indices<ArgReduction::Max>);                \
  m.impl("min_pool2d_with_indices", pool_with_indices<ArgReduction::Min>);                \
  m.impl("_pool2d_with_offsets", pool_with_offsets);                                      \
  m.impl("_max_pool2d_backward", max_pool_backward);                                      \
  m.impl("avg_pool2d", avg_pool);                                                         \
  m.impl("_avg_pool2d_backward", avg_pool_backward)

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  PYOPS_POOL_DEVICE_IMPLS(m);
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  PYOPS_POOL_DEVICE_IMPLS(m);
}

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("max_pool2d", pool_autograd<ArgReduction::Max>);
  m.impl("min_pool2d", pool_autograd<ArgReduction::Min>);
  m.impl("relu_max_pool2d", pool_autograd<ArgReduction::ReluMax>);
  m.impl("max_pool2d_with_indices", pool_with_indices_autograd<ArgReduction::Max>);
  m.impl("min_pool2d_with_indices", pool_with_indices_autograd<ArgReduction::Min>);
  m.impl("_pool2d_with_offsets", pool_with_offsets_autograd);
  m.impl("_max_pool2d_backward", max_pool_backward_autograd);
  m.impl("avg_pool2d", avg_pool_autograd);
  m.impl("_avg_pool2d_backward", avg_pool_backward_autograd);
}

}  // namespace pyops::pool
