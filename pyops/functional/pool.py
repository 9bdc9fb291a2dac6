"""The pooling family: max_pool2d, avg_pool2d (twins of torch.nn.functional's), min_pool2d
(max_pool2d's signature and rules, minimum instead of maximum) and the fused
relu_max_pool2d (a pyops extra).

Without a gradient to record, max/min pooling computes no indices at all; with one, the
forward keeps 1-byte (or, for windows of more than 255 taps, 4-byte) tap offsets for the
backward instead of torch's int64 indices. ``return_indices=True`` returns torch's int64
indices (``h * W + w`` within the plane).
"""

import torch
from torch.overrides import handle_torch_function, has_torch_function_unary

_ops = torch.ops.pyops

# Resolved once: calling an OpOverload skips the overload lookup on every call.
_max_pool2d = _ops.max_pool2d.default
_max_pool2d_with_indices = _ops.max_pool2d_with_indices.default
_min_pool2d = _ops.min_pool2d.default
_min_pool2d_with_indices = _ops.min_pool2d_with_indices.default
_relu_max_pool2d = _ops.relu_max_pool2d.default
_avg_pool2d = _ops.avg_pool2d.default

__all__ = ["max_pool2d", "min_pool2d", "avg_pool2d", "relu_max_pool2d"]


def _stride(stride):
    # torch: stride None (or an empty tuple) means the kernel size.
    return [] if stride is None else stride


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool2d"""
    if has_torch_function_unary(input):
        return handle_torch_function(
            max_pool2d, (input,), input, kernel_size, stride=stride, padding=padding,
            dilation=dilation, ceil_mode=ceil_mode, return_indices=return_indices)
    if return_indices:
        return _max_pool2d_with_indices(input, kernel_size, _stride(stride), padding, dilation,
                                        ceil_mode)
    return _max_pool2d(input, kernel_size, _stride(stride), padding, dilation, ceil_mode)


def min_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Minimum over each window, with max_pool2d's signature and rules (padding at most
    half the kernel, dilation, ceil_mode). Equal to ``-max_pool2d(-input)``, indices
    included: among equal minima the first tap in row-major window order wins, and a NaN
    in the window wins (the last NaN's index), as max_pool2d does. ``return_indices=True``
    returns the int64 index (``h * W + w`` within the plane) of each minimum."""
    if has_torch_function_unary(input):
        return handle_torch_function(
            min_pool2d, (input,), input, kernel_size, stride=stride, padding=padding,
            dilation=dilation, ceil_mode=ceil_mode, return_indices=return_indices)
    if return_indices:
        return _min_pool2d_with_indices(input, kernel_size, _stride(stride), padding, dilation,
                                        ceil_mode)
    return _min_pool2d(input, kernel_size, _stride(stride), padding, dilation, ceil_mode)


def relu_max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """pyops extra: ``max_pool2d(relu(input), ...)`` in one pass (the two commute: the
    max is taken first and relu applied to the one value kept), with its backward.
    For the conv -> relu -> max-pool pattern. Gradients equal those of the unfused pair;
    results too (up to the sign of a zero output)."""
    if has_torch_function_unary(input):
        return handle_torch_function(
            relu_max_pool2d, (input,), input, kernel_size, stride=stride, padding=padding,
            dilation=dilation, ceil_mode=ceil_mode)
    return _relu_max_pool2d(input, kernel_size, _stride(stride), padding, dilation, ceil_mode)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """torch.nn.functional.avg_pool2d"""
    if has_torch_function_unary(input):
        return handle_torch_function(
            avg_pool2d, (input,), input, kernel_size, stride=stride, padding=padding,
            ceil_mode=ceil_mode, count_include_pad=count_include_pad,
            divisor_override=divisor_override)
    return _avg_pool2d(input, kernel_size, _stride(stride), padding, ceil_mode,
                       count_include_pad, divisor_override)
