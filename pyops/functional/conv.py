"""The convolution family: conv2d and conv_transpose2d (twins of torch.nn.functional's)
and the fused conv2d_bias_act."""

import torch
from torch.overrides import handle_torch_function, has_torch_function

_ops = torch.ops.pyops
_conv2d = _ops.conv2d.default
_conv2d_bias_act = _ops.conv2d_bias_act.default
_conv_transpose2d = _ops.conv_transpose2d.default

__all__ = ["conv2d", "conv_transpose2d", "conv2d_bias_act"]


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _explicit_padding(input, weight, padding, stride, dilation):
    """(input, padding) with padding='valid'/'same' made explicit. 'same' with an odd
    total padding puts the extra row/column at the bottom/right, as torch does."""
    if not isinstance(padding, str):
        return input, padding
    if padding == "valid":
        return input, (0, 0)
    if padding != "same":
        raise ValueError(f"Invalid padding string {padding!r}, should be one of ['valid', 'same']")
    if any(s != 1 for s in _pair(stride)):
        raise ValueError("padding='same' is not supported for strided convolutions")
    if weight.dim() != 4:
        return input, (0, 0)  # the operator reports the bad weight
    dilation = _pair(dilation)
    before, extra = [], []
    for i in range(2):
        total = dilation[i] * (weight.shape[2 + i] - 1)
        before.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if any(extra):
        input = torch.nn.functional.pad(input, [0, extra[1], 0, extra[0]])
    return input, tuple(before)


def _batched(op, input, *args):
    # Unbatched (C, H, W) inputs run as a batch of one, as in torch.
    if isinstance(input, torch.Tensor) and input.dim() == 3:
        return op(input.unsqueeze(0), *args).squeeze(0)
    return op(input, *args)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d"""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(conv2d, (input, weight, bias), input, weight, bias=bias,
                                     stride=stride, padding=padding, dilation=dilation,
                                     groups=groups)
    if isinstance(padding, str) and isinstance(input, torch.Tensor) and input.dim() == 3:
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups).squeeze(0)
    input, padding = _explicit_padding(input, weight, padding, stride, dilation)
    return _batched(_conv2d, input, weight, bias, stride, padding, dilation, groups)


def conv2d_bias_act(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                    activation="relu", negative_slope=0.01):
    """pyops extra: ``act(conv2d(input, weight, bias, ...))`` in one operator, the bias and
    the activation applied to each output tile while it is in cache. ``activation`` is
    one of ``"relu"``, ``"leaky_relu"``, ``"sigmoid"``, ``"tanh"``, ``"none"`` (or None).
    The backward applies the activation's derivative and reduces the bias gradient in one
    pass (pyops' ``_bias_act_backward``), then computes only the convolution gradients
    needed. Equivalent to, e.g. for relu, ``F.relu(F.conv2d(input, weight, bias, ...))``.
    """
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(
            conv2d_bias_act, (input, weight, bias), input, weight, bias=bias, stride=stride,
            padding=padding, dilation=dilation, groups=groups, activation=activation,
            negative_slope=negative_slope)
    if isinstance(padding, str) and isinstance(input, torch.Tensor) and input.dim() == 3:
        return conv2d_bias_act(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                               groups, activation, negative_slope).squeeze(0)
    input, padding = _explicit_padding(input, weight, padding, stride, dilation)
    return _batched(_conv2d_bias_act, input, weight, bias, stride, padding, dilation, groups,
                    "none" if activation is None else activation, negative_slope)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """torch.nn.functional.conv_transpose2d"""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(
            conv_transpose2d, (input, weight, bias), input, weight, bias=bias, stride=stride,
            padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
    if isinstance(padding, str):
        raise ValueError(f"conv_transpose2d: padding must be an int or a tuple of ints, got {padding!r}")
    return _batched(_conv_transpose2d, input, weight, bias, stride, padding, output_padding,
                    groups, dilation)
