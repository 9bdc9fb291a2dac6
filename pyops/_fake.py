"""Fake (meta) kernels: shapes, dtypes and strides of every pyops operator's outputs,
so that torch.compile, FakeTensor and torch.library.opcheck can trace them."""

import torch
from torch.library import register_fake


def _like(t):
    # Same rule as the kernels: dense inputs keep their strides, others become dense in
    # their suggested memory format.
    return torch.empty_like(t)


for _name in ("relu", "sigmoid", "tanh"):
    register_fake(f"pyops::{_name}")(lambda self: _like(self))
    register_fake(f"pyops::_{_name}_backward")(lambda grad_output, result: _like(result))

register_fake("pyops::leaky_relu")(lambda self, negative_slope=0.01: _like(self))
register_fake("pyops::_leaky_relu_backward")(
    lambda grad_output, self, negative_slope, self_is_result: _like(self)
)


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


# Optimizer steps mutate their arguments in place and return nothing.
for _name in ("sgd_", "adagrad_", "adadelta_", "rmsprop_", "adam_"):
    register_fake(f"pyops::{_name}")(lambda *args, **kwargs: None)
