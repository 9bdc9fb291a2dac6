"""Fake kernels of the log-softmax family."""

import torch
from pyops._fake._register import register_fake


@register_fake("pyops::log_softmax")
def _log_softmax_fake(self, dim):
    return torch.empty_like(self, memory_format=torch.contiguous_format)


@register_fake("pyops::_log_softmax_backward")
def _log_softmax_backward_fake(grad_output, output, dim):
    return torch.empty_like(output, memory_format=torch.contiguous_format)


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@register_fake("pyops::log_softmax_nll_loss")
def _nll_fake(input, target, reduction="mean", ignore_index=-100):
    torch._check(input.dim() == 2, lambda: "pyops.log_softmax_nll_loss: expected input (N, C)")
    rows = input.shape[0]
    loss = input.new_empty((rows,) if reduction == "none" else ())
    # Each row's log-sum-exp as its two terms: (max, log(sum(exp(x - max)))).
    return loss, input.new_empty((rows, 2), dtype=_compute_dtype(input.dtype))


@register_fake("pyops::_log_softmax_nll_loss_backward")
def _nll_backward_fake(grad_loss, input, target, lse, reduction, ignore_index):
    return torch.empty_like(input, memory_format=torch.contiguous_format)
