"""Fake kernels of the pooling family: the output shapes and layouts the kernels give
(the same formulas as csrc/pool/pool_ops.cpp, which does the argument checks)."""

import torch
from torch._prims_common import suggest_memory_format
from pyops._fake._register import register_fake


def _pair(values, default=None):
    if isinstance(values, int):  # int[2] arguments may come as one int
        return (values, values)
    values = list(values)
    if not values and default is not None:
        return default
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _output_size(size, kernel, pad, stride, dilation, ceil_mode):
    # torch's pooling_output_shape, ceil_mode's last window starting inside the input or
    # its left padding.
    numerator = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _channels_last(t):
    return t.dim() == 4 and suggest_memory_format(t) == torch.channels_last


def _output(self, kernel_size, stride, padding, dilation, ceil_mode, dtype=None):
    kernel = _pair(kernel_size)
    stride = _pair(stride, kernel)
    padding, dilation = _pair(padding), _pair(dilation)
    sizes = list(self.shape)
    for d in (0, 1):
        sizes[-2 + d] = _output_size(sizes[-2 + d], kernel[d], padding[d], stride[d],
                                     dilation[d], ceil_mode)
    fmt = torch.channels_last if _channels_last(self) else torch.contiguous_format
    return self.new_empty(sizes, dtype=dtype).contiguous(memory_format=fmt)


def _offset_dtype(kernel_size):
    kh, kw = _pair(kernel_size)
    return torch.uint8 if kh * kw <= 255 else torch.int32


for _name in ("max_pool2d", "min_pool2d", "relu_max_pool2d"):
    register_fake(f"pyops::{_name}")(
        lambda self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False:
        _output(self, kernel_size, stride, padding, dilation, ceil_mode))

for _name in ("max_pool2d_with_indices", "min_pool2d_with_indices"):
    register_fake(f"pyops::{_name}")(
        lambda self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False: (
            _output(self, kernel_size, stride, padding, dilation, ceil_mode),
            _output(self, kernel_size, stride, padding, dilation, ceil_mode, torch.int64)))


@register_fake("pyops::_pool2d_with_offsets")
def _pool2d_with_offsets_fake(self, kernel_size, stride, padding, dilation, ceil_mode, reduction):
    return (_output(self, kernel_size, stride, padding, dilation, ceil_mode),
            _output(self, kernel_size, stride, padding, dilation, ceil_mode,
                    _offset_dtype(kernel_size)))


def _grad_input(grad_output, input_size, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad_output.new_empty(input_size).contiguous(memory_format=fmt)


@register_fake("pyops::_max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding,
                              dilation, ceil_mode, channels_last):
    return _grad_input(grad_output, input_size, channels_last)


@register_fake("pyops::avg_pool2d")
def _avg_pool2d_fake(self, kernel_size, stride=(), padding=0, ceil_mode=False,
                     count_include_pad=True, divisor_override=None):
    return _output(self, kernel_size, stride, padding, 1, ceil_mode)


@register_fake("pyops::_avg_pool2d_backward")
def _avg_pool2d_backward_fake(grad_output, input_size, kernel_size, stride, padding, ceil_mode,
                              count_include_pad, divisor_override, channels_last):
    return _grad_input(grad_output, input_size, channels_last)
