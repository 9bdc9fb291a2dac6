"""Fake kernels of the dropout family."""

import torch
from pyops._fake._register import register_fake


@register_fake("pyops::dropout")
def _dropout_fake(input, p):
    return torch.empty_like(input), torch.empty_like(input, dtype=torch.bool)


@register_fake("pyops::dropout_")
def _dropout_inplace_fake(input, p):
    return torch.empty_like(input, dtype=torch.bool)


@register_fake("pyops::_dropout_backward")
def _dropout_backward_fake(grad_output, mask, p):
    return torch.empty_like(mask, dtype=grad_output.dtype)
