"""Log-softmax and the fused log_softmax + nll_loss.

  log_softmax             over the last dim of (64, 10) (the seed network's output) and
                          (4096, 1000) (an ImageNet classifier's), and over dim 1 of
                          (64, 128, 32) (rows strided by 32: the inner > 1 path)
  log_softmax_nll_loss    native ``nll_loss(log_softmax(x, 1), t)`` against pyops's
                          fused op (mean reduction) on (64, 10) and (4096, 1000)

each forward ("fwd") and forward then autograd's gradient of x ("fwd+bwd").

The bytes each case must move (n: elements of x; t: the N int64 targets, counted as
N * 8 / itemsize elements of x's dtype), reading and writing every tensor once:

  log_softmax fwd         read x, write y                                    2n
  log_softmax fwd+bwd     the fwd, then read grad_output and y,
                          write grad_input                                   5n
  nll fwd                 read x and targets, write the loss                 n + t + 1
  nll fwd+bwd             the fwd, then read x (or anything of its size that
                          the backward needs) and write grad_input           3n + t + 1

Native's unfused nll_loss(log_softmax(x)) also writes and reads the n log-probabilities:
the traffic the fused op saves.
"""

from functools import partial

import torch
import torch.nn.functional as TF

import pyops.functional as F
from pyops.bench.case import Case, Scale, Traffic

# (shape, dim) of the log_softmax cases, and the (N, C) of the nll cases, per scale.
# Smoke: small, odd sizes (tails run).
_LOG_SOFTMAX = {
    Scale.SMOKE: (((3, 17), -1), ((2, 5, 3), 1)),
    Scale.QUICK: (((64, 10), -1), ((4096, 1000), -1), ((64, 128, 32), 1)),
    Scale.FULL: (((64, 10), -1), ((4096, 1000), -1), ((64, 128, 32), 1)),
}
_NLL = {
    Scale.SMOKE: ((5, 17),),
    Scale.QUICK: ((64, 10), (4096, 1000)),
    Scale.FULL: ((64, 10), (4096, 1000)),
}


def _native_nll(x, target):
    return TF.nll_loss(TF.log_softmax(x, 1), target)


def _log_softmax_pair(dim):
    return partial(TF.log_softmax, dim=dim), partial(F.log_softmax, dim=dim)


_NLL_PAIR = (_native_nll, F.log_softmax_nll_loss)


def _inputs(shape, dtype, device, requires_grad, nll):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    if nll:
        return x, torch.randint(shape[1], (shape[0],), device=device)
    return (x,)


def _forward(pair, nll, shape, dtype, device):
    inputs = _inputs(shape, dtype, device, False, nll)
    return tuple(partial(f, *inputs) for f in pair)


def _forward_backward(pair, nll, shape, dtype, device):
    inputs = _inputs(shape, dtype, device, True, nll)
    x = inputs[0]
    with torch.no_grad():
        grad = torch.randn_like(pair[0](*inputs))  # a scalar for the loss

    def step(forward):
        y = forward(*inputs)
        return y, *torch.autograd.grad(y, x, grad)

    return tuple(partial(step, f) for f in pair)


def _check(dtype):
    """assert_close's defaults in float32/64. pyops rounds half/bfloat16 outputs once
    from float, native sometimes rounds intermediates: a few units in the last place of
    values up to ~log(C) apart."""
    tolerance = {torch.float16: dict(rtol=4e-3, atol=1.6e-2),
                 torch.bfloat16: dict(rtol=1.6e-2, atol=6.4e-2)}.get(dtype, {})
    return partial(torch.testing.assert_close, **tolerance)


def cases(scale, device, dtype):
    found = []
    check = _check(dtype)

    def add(op, variant, shape, setup, traffic):
        found.append(Case(op, variant, shape, dtype, device, traffic, setup, check=check))

    for shape, dim in _LOG_SOFTMAX[scale]:
        n, pair = torch.Size(shape).numel(), _log_softmax_pair(dim)
        add("log_softmax", f"dim={dim} fwd", shape, partial(_forward, pair, False),
            Traffic(read={"x": n}, write={"y": n}))
        add("log_softmax", f"dim={dim} fwd+bwd", shape, partial(_forward_backward, pair, False),
            Traffic(read={"x": n, "grad_output": n, "y": n}, write={"y": n, "grad_input": n}))
    for shape in _NLL[scale]:
        n, targets = torch.Size(shape).numel(), shape[0] * 8 // dtype.itemsize
        forward_read = {"x": n, "target": targets}
        add("log_softmax_nll_loss", "mean fwd", shape, partial(_forward, _NLL_PAIR, True),
            Traffic(read=forward_read, write={"loss": 1}))
        add("log_softmax_nll_loss", "mean fwd+bwd", shape,
            partial(_forward_backward, _NLL_PAIR, True),
            Traffic(read={**forward_read, "x (bwd)": n}, write={"loss": 1, "grad_input": n}))
    return found
