"""Linear layers: F.linear and the fused linear + bias + activation (linear_act).

The layers (input x (N, K), weight w (M, K), bias b (M)):

  seed_fc1   x 64x9216,  w 128x9216, relu    the seed network's fc1
  seed_fc2   x 64x128,   w 10x128            the seed network's fc2 (no activation)
  mlp_1024   x 4096x1024, w 1024x1024, relu  a GEMM large enough to be compute-bound

  linear       TF.linear(x, w, b) against pyops's F.linear, forward ("fwd")
  linear_act   native TF.relu(TF.linear(x, w, b)) (plain TF.linear where the layer has
               no activation) against pyops's linear_act(x, w, b, activation), forward
               and forward then ``torch.autograd.grad(y, (x, w, b), g)`` ("fwd+bwd").
               Without an activation its forward is the linear case: only its fwd+bwd.

FLOPs (a multiply-add counts 2), the measure of these GEMMs:

  fwd       F = 2 * N*M*K
  fwd+bwd   3F: the gradients of x and of w are each another F (the bias's adds and the
            activation are not counted)

Bytes, reading and writing every tensor once (the GB/s column):

  fwd       read x, w, b, write y                               NK + MK + M + NM
  fwd+bwd   the fwd, then read grad_output, write grad_input,
            grad_weight, grad_bias                              2(NK + MK + M + NM)

Native's unfused relu(linear) writes and reads y once more, and its backward one more
tensor the size of y: the traffic the fused op saves.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as TF

import pyops.functional as F
from pyops.bench.case import Case, Scale, Traffic
from pyops.bench.cases import _gemm


@dataclass(frozen=True)
class _Layer:
    name: str
    n: int  # batch
    k: int  # in features
    m: int  # out features
    activation: str | None  # "relu" or None


_FC1 = _Layer("seed_fc1", 64, 9216, 128, "relu")
_FC2 = _Layer("seed_fc2", 64, 128, 10, None)
_MLP = _Layer("mlp_1024", 4096, 1024, 1024, "relu")
# Smoke: small, odd sizes (tails run).
_LAYERS = {
    Scale.SMOKE: (_Layer("seed_fc1", 5, 33, 7, "relu"), _Layer("seed_fc2", 3, 17, 4, None)),
    Scale.QUICK: (_FC1, _FC2, _MLP),
    Scale.FULL: (_FC1, _FC2, _MLP),
}


def _native_linear_relu(x, w, b):
    return TF.relu(TF.linear(x, w, b))


def _pair(op, layer):
    """(native, pyops), each (x, w, b) -> y."""
    if op == "linear":
        return TF.linear, F.linear
    if layer.activation is None:
        return TF.linear, partial(F.linear_act, activation=None)
    return _native_linear_relu, partial(F.linear_act, activation="relu")


def _inputs(layer, dtype, device, requires_grad):
    def make(shape, scale=1.0):
        t = torch.randn(shape, dtype=dtype, device=device) * scale
        return t.requires_grad_(requires_grad)

    # Weights at 1/sqrt(fan-in), as layers are initialised: outputs of order 1.
    return (make((layer.n, layer.k)), make((layer.m, layer.k), layer.k ** -0.5),
            make((layer.m,)))


def _forward(op, layer, shape, dtype, device):
    inputs = _inputs(layer, dtype, device, requires_grad=False)
    return tuple(partial(f, *inputs) for f in _pair(op, layer))


def _forward_backward(op, layer, shape, dtype, device):
    inputs = _inputs(layer, dtype, device, requires_grad=True)
    grad = torch.randn((layer.n, layer.m), dtype=dtype, device=device)

    def step(forward):
        y = forward(*inputs)
        return y, *torch.autograd.grad(y, inputs, grad)

    return tuple(partial(step, f) for f in _pair(op, layer))


def cases(scale, device, dtype):
    found = []

    def add(op, variant, layer, setup, traffic, flops, check):
        found.append(Case(op, variant, (layer.n, layer.k), dtype, device, traffic, setup,
                          check=check, flops=flops))

    for layer in _LAYERS[scale]:
        n, k, m = layer.n, layer.k, layer.m
        forward = Traffic(read={"x": n * k, "w": m * k, "b": m}, write={"y": n * m})
        forward_backward = Traffic(
            read={"x": n * k, "w": m * k, "b": m, "grad_output": n * m},
            write={"y": n * m, "grad_input": n * k, "grad_weight": m * k, "grad_bias": m},
        )
        flops = 2 * n * m * k
        act = layer.activation or "none"
        out = f"out {m}"  # with the shape column (x: N x K), names the layer
        add("linear", f"{out} fwd", layer, partial(_forward, "linear", layer), forward, flops,
            _gemm.check(dtype))
        if layer.activation is not None:
            add("linear_act", f"{out} {act} fwd", layer,
                partial(_forward, "linear_act", layer), forward, flops, _gemm.check(dtype))
        add("linear_act", f"{out} {act} fwd+bwd", layer,
            partial(_forward_backward, "linear_act", layer), forward_backward, 3 * flops,
            _gemm.check(dtype, kinked=layer.activation is not None))
    return found
