"""Dropout (training=True): torch.nn.functional.dropout against pyops's.

The inputs: the seed network's two dropouts, on (64, 64, 12, 12) with p = 0.25 (after
the pooling) and on (64, 128) with p = 0.5 (after fc1), and a 16M-element tensor with
p = 0.5 (with p = 0.25 too in --full), which streams from memory. Each runs forward
("fwd") and forward then autograd's gradient of x ("fwd+bwd").

The bytes each case must move (n: elements of x), reading and writing every tensor once:

  fwd       read x, write y                                      2n
  fwd+bwd   the fwd, then read grad_output, write grad_input     4n

How the backward knows the mask (native keeps a bool mask, n bytes written then read;
pyops may regenerate it from its generator's key) is an implementation's choice and is
not counted: the fewer bytes it takes, the higher the GB/s.

The check cannot compare values: the two draw different masks. It checks instead that
each zeroes a share of the elements within 5 standard deviations of p, and that pyops
keeps the other elements as x / (1 - p) (and its gradient as grad_output / (1 - p) where
y was kept, 0 elsewhere). For it the timed callables return their inputs as well as
their results: returning a reference costs nothing.
"""

import math
from functools import partial

import torch
import torch.nn.functional as TF

import pyops.functional as F
from pyops.bench.case import Case, Scale, Traffic

_M = 1 << 24
# (shape, p) per scale. Smoke: small, and not a multiple of any SIMD width (tails run).
_SHAPES = {
    Scale.SMOKE: (((2, 3, 5, 7), 0.25), ((4099,), 0.5)),
    Scale.QUICK: (((64, 64, 12, 12), 0.25), ((64, 128), 0.5), ((_M,), 0.5)),
    Scale.FULL: (((64, 64, 12, 12), 0.25), ((64, 128), 0.5), ((_M,), 0.25), ((_M,), 0.5)),
}


def _pair(p):
    return (partial(TF.dropout, p=p, training=True), partial(F.dropout, p=p, training=True))


def _forward(p, shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    return tuple((lambda f=f: (f(x), x)) for f in _pair(p))


def _forward_backward(p, shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(shape, dtype=dtype, device=device)

    def step(forward):
        y = forward(x)
        (grad_input,) = torch.autograd.grad(y, x, grad)
        return y, x, grad_input, grad

    return tuple(partial(step, f) for f in _pair(p))


def _assert_zeroed_share(y, x, p, who):
    # Counted where x is not 0 itself (randn may round a tiny value to 0 in float16).
    nonzero = x != 0
    n = int(nonzero.sum())
    share = int(((y == 0) & nonzero).sum()) / n
    bound = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(share - p) <= bound, f"{who} zeroed {share:.4f} of {n}, expected {p} +- {bound:.4f}"


def _scaled(t, p):
    # pyops scales in float (double for float64) and rounds once to the dtype.
    compute = torch.float64 if t.dtype == torch.float64 else torch.float32
    return (t.detach().to(compute) / (1 - p)).to(t.dtype)


def _check(p):
    def check(actual, expected):  # (y, x[, grad_input, grad_output]) of pyops, of native
        _assert_zeroed_share(expected[0], expected[1], p, "native")
        y, x = actual[0].detach(), actual[1].detach()
        _assert_zeroed_share(y, x, p, "pyops")
        kept = y != 0
        torch.testing.assert_close(y[kept], _scaled(x[kept], p))
        if len(actual) > 2:
            grad_input, grad = actual[2], actual[3]
            torch.testing.assert_close(grad_input[kept], _scaled(grad[kept], p))
            assert not grad_input[~kept].any(), "pyops: a gradient where y was dropped"

    return check


def cases(scale, device, dtype):
    found = []
    for shape, p in _SHAPES[scale]:
        n = torch.Size(shape).numel()
        check = _check(p)
        found.append(Case("dropout", f"p{p} fwd", shape, dtype, device,
                          Traffic(read={"x": n}, write={"y": n}), partial(_forward, p),
                          check=check))
        found.append(Case("dropout", f"p{p} fwd+bwd", shape, dtype, device,
                          Traffic(read={"x": n, "grad_output": n},
                                  write={"y": n, "grad_input": n}),
                          partial(_forward_backward, p), check=check))
    return found
