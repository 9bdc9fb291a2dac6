"""Fake kernels of the activation family."""

import torch
from pyops._fake._register import register_fake


def _like(t):
    # Same rule as the kernels: dense inputs keep their strides, others become dense in
    # their suggested memory format.
    return torch.empty_like(t)


def _returns_nothing(*args, **kwargs):
    # In-place and out= operators return nothing (torch.compile functionalizes only
    # those); their Python wrappers return the mutated tensor.
    return None


for _name in ("relu", "sigmoid", "tanh"):
    register_fake(f"pyops::{_name}")(lambda self: _like(self))
    register_fake(f"pyops::_{_name}_backward")(lambda grad_output, result: _like(result))
    for _overload in (f"{_name}_", f"{_name}.out", f"_{_name}_backward.grad_input"):
        register_fake(f"pyops::{_overload}")(_returns_nothing)

register_fake("pyops::leaky_relu")(lambda self, negative_slope=0.01: _like(self))
register_fake("pyops::_leaky_relu_backward")(
    lambda grad_output, self, negative_slope, self_is_result: _like(self)
)
for _overload in ("leaky_relu_", "leaky_relu.out", "_leaky_relu_backward.grad_input"):
    register_fake(f"pyops::{_overload}")(_returns_nothing)


def _channel_layout_like(t):
    # The bias kernels keep channels-last inputs as they are and make others contiguous.
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == ndim and not t.is_contiguous() and t.is_contiguous(memory_format=fmt):
            return torch.empty_like(t, memory_format=fmt)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@register_fake("pyops::bias_act")
def _bias_act_fake(self, bias, activation="none", negative_slope=0.01):
    torch._check(self.dim() >= 2, lambda: "pyops.bias_act: expected input with at least 2 dims")
    torch._check(
        bias.dim() == 1 and bias.shape[0] == self.shape[1],
        lambda: "pyops.bias_act: expected bias of shape [input.size(1)]",
    )
    return _channel_layout_like(self)


@register_fake("pyops::_bias_act_backward")
def _bias_act_backward_fake(grad_output, saved, bias, activation, negative_slope, saved_is_result):
    return _channel_layout_like(saved), bias.new_empty(bias.shape)
