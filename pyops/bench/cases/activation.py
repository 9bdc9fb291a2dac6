"""Activations: relu, leaky_relu, sigmoid, tanh, and the fused bias_act.

The bytes each case must move (n: elements of x, C: elements of the bias), reading and
writing every tensor once:

  fwd, fwd kernel, fwd per-call   read x, write y (x itself, in place)       2n
  bwd autograd, bwd kernel        read grad_output and y (x for leaky_relu),
                                  write grad_input                           3n
  bias_act fwd                    read x and bias, write y                   2n + C
  bias_act fwd+bwd                the fwd, then read grad_output and y,
                                  write grad_input and grad_bias             5n + 2C

Native's unfused ``act(x + bias)`` also writes and reads an n-element temporary, and its
backward reads grad_input once more to sum grad_bias: the traffic that fusion saves.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

import pyops.functional as pf
from pyops.bench.case import Case, Scale, Traffic

aten, ops = torch.ops.aten, torch.ops.pyops
SLOPE = 0.01  # leaky_relu's negative slope (torch's default)

_NUMEL = {
    Scale.SMOKE: (4099,),  # not a multiple of any SIMD width: the tails run too
    Scale.QUICK: (1 << 24,),
    Scale.FULL: (1 << 20, 1 << 24, 1 << 26),
}
# The outputs of a convolution (N, C, H, W) and of a linear layer (N, features).
_BIAS_ACT_SHAPES = {
    Scale.SMOKE: ((2, 3, 4, 5), (8, 16)),
    Scale.QUICK: ((64, 64, 24, 24), (4096, 1024)),
    Scale.FULL: ((64, 32, 26, 26), (64, 64, 24, 24), (64, 128), (4096, 1024)),
}
# Small enough that the cost of a call (dispatch, allocation) is most of the time.
_PER_CALL_NUMEL = 4096
_PER_CALL_OPS = ("relu", "sigmoid")


@dataclass(frozen=True)
class _Activation:
    name: str
    native: Callable  # the public torch function, x -> y
    pyops: Callable  # its pyops.functional twin
    kernel: str  # how the forward-kernel case writes: "in-place" or "out="
    # (x, buf), writing buf. In-place kernels work on buf, which starts as a copy of x.
    native_kernel: Callable
    pyops_kernel: Callable
    # (grad_output, saved, grad_input), writing grad_input; saved is y, or x if saves_input.
    native_backward: Callable
    pyops_backward: Callable
    saves_input: bool = False


_ACTIVATIONS = (
    _Activation(
        "relu", F.relu, pf.relu, "in-place",
        lambda x, buf: torch.relu_(buf),
        lambda x, buf: ops.relu_(buf),
        lambda g, y, buf: aten.threshold_backward.grad_input(g, y, 0, grad_input=buf),
        lambda g, y, buf: ops._relu_backward.grad_input(g, y, grad_input=buf),
    ),
    # Applied in place over and over, leaky_relu would scale the negative values down
    # into denormals, which are slow on CPU and would dominate the timing: out= instead.
    _Activation(
        "leaky_relu", partial(F.leaky_relu, negative_slope=SLOPE),
        partial(pf.leaky_relu, negative_slope=SLOPE), "out=",
        lambda x, buf: aten.leaky_relu.out(x, SLOPE, out=buf),
        lambda x, buf: ops.leaky_relu.out(x, SLOPE, out=buf),
        lambda g, x, buf: aten.leaky_relu_backward.grad_input(g, x, SLOPE, False, grad_input=buf),
        lambda g, x, buf: ops._leaky_relu_backward.grad_input(g, x, SLOPE, False, grad_input=buf),
        saves_input=True,
    ),
    # Repeated in place, sigmoid converges to its fixed point and tanh towards 0 (never
    # into denormals): the values drift, the work per call does not.
    _Activation(
        "sigmoid", torch.sigmoid, pf.sigmoid, "in-place",
        lambda x, buf: torch.sigmoid_(buf),
        lambda x, buf: ops.sigmoid_(buf),
        lambda g, y, buf: aten.sigmoid_backward.grad_input(g, y, grad_input=buf),
        lambda g, y, buf: ops._sigmoid_backward.grad_input(g, y, grad_input=buf),
    ),
    _Activation(
        "tanh", torch.tanh, pf.tanh, "in-place",
        lambda x, buf: torch.tanh_(buf),
        lambda x, buf: ops.tanh_(buf),
        lambda g, y, buf: aten.tanh_backward.grad_input(g, y, grad_input=buf),
        lambda g, y, buf: ops._tanh_backward.grad_input(g, y, grad_input=buf),
    ),
)


def _randn(shape, dtype, device, requires_grad=False):
    return torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)


# Setups: each builds the inputs once and returns (native, pyops) zero-argument callables.


def _forward(act, shape, dtype, device):
    x = _randn(shape, dtype, device)
    return partial(act.native, x), partial(act.pyops, x)


def _returning_buffer(kernel, *args):
    # pyops's in-place and out= operators return nothing (as torch.compile wants them
    # to); the check needs what they wrote: the buffer, their last argument.
    def run():
        kernel(*args)
        return args[-1]

    return run


def _forward_kernel(act, shape, dtype, device):
    x = _randn(shape, dtype, device)
    return (
        _returning_buffer(act.native_kernel, x, x.clone()),
        _returning_buffer(act.pyops_kernel, x, x.clone()),
    )


def _backward_autograd(act, shape, dtype, device):
    x = _randn(shape, dtype, device, requires_grad=True)
    grad = _randn(shape, dtype, device)

    def backward_of(forward):
        return partial(torch.autograd.grad, forward(x), x, grad, retain_graph=True)

    return backward_of(act.native), backward_of(act.pyops)


def _backward_kernel(act, shape, dtype, device):
    x = _randn(shape, dtype, device)
    saved = x if act.saves_input else act.native(x)
    grad = _randn(shape, dtype, device)
    return (
        _returning_buffer(act.native_backward, grad, saved, torch.empty_like(x)),
        _returning_buffer(act.pyops_backward, grad, saved, torch.empty_like(x)),
    )


def _bias_act_pair(act, ndim):
    """(native, pyops) callables (x, bias) -> act(x + bias), bias along dim 1."""
    view = (1, -1) + (1,) * (ndim - 2)
    return (
        lambda x, bias: act.native(x + bias.view(view)),
        lambda x, bias: pf.bias_act(x, bias, act.name, SLOPE),
    )


def _bias_act_forward(act, shape, dtype, device):
    x, bias = _randn(shape, dtype, device), _randn(shape[1], dtype, device)
    return tuple(partial(f, x, bias) for f in _bias_act_pair(act, len(shape)))


def _bias_act_forward_backward(act, shape, dtype, device):
    x = _randn(shape, dtype, device, requires_grad=True)
    bias = _randn(shape[1], dtype, device, requires_grad=True)
    grad = _randn(shape, dtype, device)

    def step(forward):
        y = forward(x, bias)
        return (y, *torch.autograd.grad(y, (x, bias), grad))

    return tuple(partial(step, f) for f in _bias_act_pair(act, len(shape)))


def _check(dtype, summed=None):
    """How a case compares pyops's result with native's.

    Elementwise: assert_close's defaults, except in float16 and bfloat16, where native
    rounds to the dtype what pyops keeps in float32 (the unfused x + bias; on CPU, the
    products of float16 sigmoid's backward), so results differ by a few units in the
    last place. A bias gradient sums ``summed`` terms of magnitude ~1 in another order
    than native: in float32/64 that moves it by up to ~eps * summed; in float16/bfloat16
    the terms themselves differ by an ulp or so, adding up like a random walk, to
    ~eps * sqrt(summed). Tight enough still to catch a wrong kernel (wrong function,
    slope or broadcast, a skipped tail).
    """
    eps = torch.finfo(dtype).eps
    reduced = dtype in (torch.float16, torch.bfloat16)
    elementwise = {"rtol": 16 * eps, "atol": 16 * eps} if reduced else {}
    if summed is None:
        return partial(torch.testing.assert_close, **elementwise)
    sum_atol = eps * (4 * math.sqrt(summed) if reduced else summed)

    def check(actual, expected):  # (y, grad_input, grad_bias): _bias_act_forward_backward
        torch.testing.assert_close(actual[:2], expected[:2], **elementwise)
        torch.testing.assert_close(actual[2], expected[2], rtol=16 * eps, atol=sum_atol)

    return check


def _unary(n):
    return Traffic(read={"x": n}, write={"y": n})


def cases(scale, device, dtype):
    found = []

    def add(op, variant, shape, setup, traffic, check=_check(dtype)):
        found.append(Case(op, variant, shape, dtype, device, traffic, setup, check=check))

    for act in _ACTIVATIONS:
        saved = "x" if act.saves_input else "y"
        for n in _NUMEL[scale]:
            backward = Traffic(read={"grad_output": n, saved: n}, write={"grad_input": n})
            add(act.name, "fwd", (n,), partial(_forward, act), _unary(n))
            add(act.name, f"fwd kernel {act.kernel}", (n,), partial(_forward_kernel, act),
                Traffic(read={"x": n}, write={"x" if act.kernel == "in-place" else "out": n}))
            add(act.name, "bwd autograd", (n,), partial(_backward_autograd, act), backward)
            add(act.name, "bwd kernel grad_input=", (n,), partial(_backward_kernel, act), backward)
    for act in _ACTIVATIONS:
        for shape in _BIAS_ACT_SHAPES[scale]:
            n, c = torch.Size(shape).numel(), shape[1]
            forward = Traffic(read={"x": n, "bias": c}, write={"y": n})
            forward_backward = Traffic(
                read={"x": n, "bias": c, "grad_output": n, "y": n},
                write={"y": n, "grad_input": n, "grad_bias": c},
            )
            add("bias_act", f"{act.name} fwd", shape, partial(_bias_act_forward, act), forward)
            add("bias_act", f"{act.name} fwd+bwd", shape,
                partial(_bias_act_forward_backward, act), forward_backward,
                check=_check(dtype, summed=n // c))
    for act in _ACTIVATIONS:
        if act.name in _PER_CALL_OPS:
            n = _PER_CALL_NUMEL
            add(act.name, "fwd per-call", (n,), partial(_forward, act), _unary(n))
    return found
