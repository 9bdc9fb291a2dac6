"""The log-softmax family: a twin of torch.nn.functional.log_softmax and the fused
log_softmax + nll_loss (a pyops extra, the seed network's output and loss)."""

import warnings

import torch
from torch.overrides import (
    handle_torch_function,
    has_torch_function_unary,
    has_torch_function_variadic,
)

_log_softmax = torch.ops.pyops.log_softmax.default
_log_softmax_nll_loss = torch.ops.pyops.log_softmax_nll_loss.default


def _implicit_dim(ndim, stacklevel):
    # torch's legacy rule for dim=None, with its deprecation warning.
    warnings.warn(
        "Implicit dimension choice for log_softmax has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """torch.nn.functional.log_softmax"""
    if has_torch_function_unary(input):
        return handle_torch_function(
            log_softmax, (input,), input, dim=dim, _stacklevel=_stacklevel, dtype=dtype
        )
    if dim is None:
        dim = _implicit_dim(input.dim(), _stacklevel)
    if dtype is not None:
        input = input.to(dtype)
    return _log_softmax(input, dim)


def log_softmax_nll_loss(input, target, reduction="mean", ignore_index=-100):
    """pyops extra: ``nll_loss(log_softmax(input, 1), target)`` in one pass per row,
    forward and backward (what ``torch.nn.functional.cross_entropy`` computes without
    class weights or label smoothing). ``input`` is (N, C) or (C,), ``target`` holds class
    indices (int64) of shape (N,) or (); ``reduction`` is 'mean', 'sum' or 'none'. The
    backward keeps each row's log-sum-exp (as its max and the log of its sum of
    exponentials) instead of the (N, C) log-probabilities.
    """
    # The seed network's loss takes microseconds: keep the Python around the call thin.
    if has_torch_function_variadic(input, target):
        return handle_torch_function(
            log_softmax_nll_loss, (input, target), input, target, reduction=reduction,
            ignore_index=ignore_index,
        )
    if target.dim() == 0 and input.dim() == 1:  # unbatched, as torch accepts
        loss = _log_softmax_nll_loss(input.unsqueeze(0), target.unsqueeze(0), reduction,
                                     ignore_index)[0]
        return loss.squeeze(0) if reduction == "none" else loss
    return _log_softmax_nll_loss(input, target, reduction, ignore_index)[0]
