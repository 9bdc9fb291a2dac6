"""The activation family: relu, leaky_relu, sigmoid, tanh (twins of
torch.nn.functional's and of torch.sigmoid / torch.tanh) and the fused bias_act."""

import torch
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_unary

_ops = torch.ops.pyops

# Resolved once: calling an OpOverload skips the overload lookup on every call. In-place
# and out= operators return nothing (so torch.compile can functionalize them): the
# wrappers return the mutated tensor, as torch does.
_relu, _relu_ = _ops.relu.default, _ops.relu_.default
_leaky_relu, _leaky_relu_ = _ops.leaky_relu.default, _ops.leaky_relu_.default
_sigmoid, _sigmoid_, _sigmoid_out = _ops.sigmoid.default, _ops.sigmoid_.default, _ops.sigmoid.out
_tanh, _tanh_, _tanh_out = _ops.tanh.default, _ops.tanh_.default, _ops.tanh.out
_bias_act = _ops.bias_act.default

ACTIVATIONS = ("none", "relu", "leaky_relu", "sigmoid", "tanh")

__all__ = [
    "relu", "relu_", "leaky_relu", "leaky_relu_", "sigmoid", "tanh", "bias_act",
]


def relu(input, inplace=False):
    """torch.nn.functional.relu"""
    if has_torch_function_unary(input):
        return handle_torch_function(relu, (input,), input, inplace=inplace)
    if inplace:
        _relu_(input)
        return input
    return _relu(input)


def relu_(input):
    """torch.nn.functional.relu_"""
    if has_torch_function_unary(input):
        return handle_torch_function(relu_, (input,), input)
    _relu_(input)
    return input


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """torch.nn.functional.leaky_relu"""
    if has_torch_function_unary(input):
        return handle_torch_function(
            leaky_relu, (input,), input, negative_slope=negative_slope, inplace=inplace
        )
    if inplace:
        _leaky_relu_(input, negative_slope)
        return input
    return _leaky_relu(input, negative_slope)


def leaky_relu_(input, negative_slope=0.01):
    """torch.nn.functional.leaky_relu_"""
    if has_torch_function_unary(input):
        return handle_torch_function(leaky_relu_, (input,), input, negative_slope=negative_slope)
    _leaky_relu_(input, negative_slope)
    return input


def sigmoid(input, *, out=None):
    """torch.sigmoid"""
    if has_torch_function_unary(input):
        return handle_torch_function(sigmoid, (input,), input, out=out)
    if out is None:
        return _sigmoid(input)
    _sigmoid_out(input, out=out)
    return out


def tanh(input, *, out=None):
    """torch.tanh"""
    if has_torch_function_unary(input):
        return handle_torch_function(tanh, (input,), input, out=out)
    if out is None:
        return _tanh(input)
    _tanh_out(input, out=out)
    return out


def bias_act(input, bias, activation="none", negative_slope=0.01):
    """pyops extra: ``act(input + bias)`` in one pass, with ``bias`` of shape ``[C]``
    broadcast along dim 1 (the channels of a conv output, the features of a linear
    output). ``activation`` is one of ``"none"``, ``"relu"``, ``"leaky_relu"``,
    ``"sigmoid"``, ``"tanh"`` (or ``None``). The backward computes the input and bias
    gradients in one pass too. Equivalent to, e.g. for a 4-D input and relu,
    ``torch.relu(input + bias.view(1, -1, 1, 1))``.
    """
    if has_torch_function((input, bias)):
        return handle_torch_function(
            bias_act, (input, bias), input, bias, activation=activation,
            negative_slope=negative_slope,
        )
    return _bias_act(input, bias, "none" if activation is None else activation, negative_slope)
