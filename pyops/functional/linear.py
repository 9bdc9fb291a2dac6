"""The linear family: a twin of torch.nn.functional.linear and the fused
linear + bias + activation (a pyops extra)."""

import torch
from torch.overrides import handle_torch_function, has_torch_function

_linear_act = torch.ops.pyops.linear_act.default


def linear(input, weight, bias=None):
    """torch.nn.functional.linear"""
    if has_torch_function((input, weight, bias) if bias is not None else (input, weight)):
        return handle_torch_function(linear, (input, weight, bias), input, weight, bias=bias)
    return _linear_act(input, weight, bias, "none", 0.01)


def linear_act(input, weight, bias=None, activation="relu", negative_slope=0.01):
    """pyops extra: ``act(input @ weight.T + bias)``: the GEMM is ATen's, the bias and the
    activation one pass over its output; the backward computes the pre-activation and
    bias gradients in one pass. ``activation`` is one of ``"none"``, ``"relu"``,
    ``"leaky_relu"``, ``"sigmoid"``, ``"tanh"`` (or ``None``).
    """
    args = (input, weight, bias) if bias is not None else (input, weight)
    if has_torch_function(args):
        return handle_torch_function(
            linear_act, args, input, weight, bias=bias, activation=activation,
            negative_slope=negative_slope,
        )
    return _linear_act(input, weight, bias, "none" if activation is None else activation,
                       negative_slope)
