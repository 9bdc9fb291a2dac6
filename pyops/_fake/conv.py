"""Fake kernels of the convolution family (the shape and layout rules of conv_ops.cpp)."""

import torch
from torch._prims_common import suggest_memory_format
from pyops._fake._register import register_fake


def _pair(values):
    values = list(values)
    return values * 2 if len(values) == 1 else values


def _channels_last(t):
    return t.dim() == 4 and suggest_memory_format(t) == torch.channels_last


def _new(shape, input, weight):
    # Outputs are channels-last when the input or the weight is.
    fmt = torch.channels_last if _channels_last(input) or _channels_last(weight) else torch.contiguous_format
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)


def _conv_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_fake(input, weight, bias, stride, padding, dilation, groups):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    torch._check(input.dim() == 4 and weight.dim() == 4,
                 lambda: "pyops.conv2d: expected a 4-D input and a 4-D weight")
    torch._check(input.shape[1] == weight.shape[1] * groups,
                 lambda: "pyops.conv2d: input channels do not match weight.size(1) * groups")
    out = [_conv_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
           for i in range(2)]
    return _new((input.shape[0], weight.shape[0], *out), input, weight)


@register_fake("pyops::conv2d")
def _conv2d_fake(input, weight, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    return _conv_fake(input, weight, bias, stride, padding, dilation, groups)


@register_fake("pyops::conv2d_bias_act")
def _conv2d_bias_act_fake(input, weight, bias, stride=(1,), padding=(0,), dilation=(1,), groups=1,
                          activation="relu", negative_slope=0.01):
    return _conv_fake(input, weight, bias, stride, padding, dilation, groups)


@register_fake("pyops::conv_transpose2d")
def _conv_transpose2d_fake(input, weight, bias=None, stride=(1,), padding=(0,),
                           output_padding=(0,), groups=1, dilation=(1,)):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    output_padding = _pair(output_padding)
    torch._check(input.dim() == 4 and weight.dim() == 4,
                 lambda: "pyops.conv_transpose2d: expected a 4-D input and a 4-D weight")
    out = [(input.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
           + dilation[i] * (weight.shape[2 + i] - 1) + output_padding[i] + 1 for i in range(2)]
    return _new((input.shape[0], weight.shape[1] * groups, *out), input, weight)


@register_fake("pyops::_conv2d_backward")
def _conv2d_backward_fake(grad_output, input, weight, stride, padding, dilation, groups,
                          output_mask):
    return (_new(input.shape, input, weight) if output_mask[0] else None,
            _new(weight.shape, input, weight) if output_mask[1] else None,
            grad_output.new_empty((weight.shape[0],)) if output_mask[2] else None)
