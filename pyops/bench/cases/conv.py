"""Convolutions: conv2d, conv_transpose2d and the fused conv2d_bias_act (relu).

The layers (input x, weight w, bias b; what was scripts/bench_conv.py):

  seed_conv1   x 64x1x28x28,  w 32x1x3x3                      the seed network's conv1
  seed_conv2   x 64x32x26x26, w 64x32x3x3                     the seed network's conv2
  resnet_3x3   x 8x64x56x56,  w 64x64x3x3, padding 1          a ResNet stage-1 conv
  depthwise    x 8x64x56x56,  w 64x1x3x3, padding 1, groups 64
  up_x2        x 8x64x28x28,  w 64x32x4x4, stride 2, padding 1: conv_transpose2d, 28 -> 56

Each runs forward ("fwd") and forward then ``torch.autograd.grad(y, (x, w, b), g)``
("fwd+bwd"); the conv2d layers also as ``relu(conv2d(x, w, b))`` against pyops's
``conv2d_bias_act(..., activation="relu")``, forward and forward+backward.

FLOPs (a multiply-add counts 2), the measure of these compute-bound ops:

  fwd       F = 2 * N*Cout*Hout*Wout * Cin/groups * kh*kw. A transposed convolution is
            the input gradient of the convolution from its output back to its input:
            F = 2 * N*Cin*Hin*Win * Cout/groups * kh*kw.
  fwd+bwd   3F: the gradients of the input and of the weight are each another F (the
            bias's adds and relu are not counted).

Bytes, reading and writing every tensor once (the GB/s column; small next to the FLOPs):

  fwd       read x, w, b, write y
  fwd+bwd   the fwd, then read grad_output, write grad_input, grad_weight, grad_bias

Native's unfused relu(conv2d) writes and reads y once more, and its backward one more
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
    x: tuple  # N, Cin, H, W
    w: tuple  # conv2d: Cout, Cin/groups, kh, kw; conv_transpose2d: Cin, Cout/groups, kh, kw
    kwargs: dict  # stride, padding, groups
    transposed: bool = False

    @property
    def out_channels(self):
        return self.w[1] * self.kwargs.get("groups", 1) if self.transposed else self.w[0]

    def output_shape(self):
        s, p = self.kwargs.get("stride", 1), self.kwargs.get("padding", 0)
        k = self.w[2:]
        if self.transposed:
            hw = ((n - 1) * s - 2 * p + kk for n, kk in zip(self.x[2:], k))
        else:
            hw = ((n + 2 * p - kk) // s + 1 for n, kk in zip(self.x[2:], k))
        return (self.x[0], self.out_channels, *hw)

    def flops(self):
        # w[1] * kh * kw products per element of the convolution's output side (y for
        # conv2d, x for conv_transpose2d): see the module's docstring.
        side = self.x if self.transposed else self.output_shape()
        return 2 * torch.Size(side).numel() * torch.Size(self.w[1:]).numel()


_SEED1 = _Layer("seed_conv1", (64, 1, 28, 28), (32, 1, 3, 3), {})
_SEED2 = _Layer("seed_conv2", (64, 32, 26, 26), (64, 32, 3, 3), {})
_RESNET = _Layer("resnet_3x3", (8, 64, 56, 56), (64, 64, 3, 3), {"padding": 1})
_DEPTHWISE = _Layer("depthwise", (8, 64, 56, 56), (64, 1, 3, 3), {"padding": 1, "groups": 64})
_UP = _Layer("up_x2", (8, 64, 28, 28), (64, 32, 4, 4), {"stride": 2, "padding": 1},
             transposed=True)

# Smoke: the same kinds of layer, tiny and odd-sized (tails and edges run).
_LAYERS = {
    Scale.SMOKE: (
        _Layer("seed_conv1", (2, 1, 9, 11), (5, 1, 3, 3), {}),
        _Layer("resnet_3x3", (2, 3, 9, 11), (5, 3, 3, 3), {"padding": 1}),
        _Layer("depthwise", (2, 6, 9, 11), (6, 1, 3, 3), {"padding": 1, "groups": 6}),
        _Layer("up_x2", (2, 4, 5, 6), (4, 3, 4, 4), {"stride": 2, "padding": 1},
               transposed=True),
    ),
    Scale.QUICK: (_SEED1, _SEED2, _RESNET, _DEPTHWISE, _UP),
    Scale.FULL: (_SEED1, _SEED2, _RESNET, _DEPTHWISE, _UP),
}


def _native_conv_relu(x, w, b, **kwargs):
    return TF.relu(TF.conv2d(x, w, b, **kwargs))


def _pyops_conv_relu(x, w, b, **kwargs):
    return F.conv2d_bias_act(x, w, b, activation="relu", **kwargs)


def _pair(layer, fused):
    """(native, pyops), each (x, w, b, **kwargs) -> y."""
    if fused:
        return _native_conv_relu, _pyops_conv_relu
    if layer.transposed:
        return TF.conv_transpose2d, F.conv_transpose2d
    return TF.conv2d, F.conv2d


def _inputs(layer, dtype, device, requires_grad):
    def make(shape, scale=1.0):
        t = torch.randn(shape, dtype=dtype, device=device) * scale
        return t.requires_grad_(requires_grad)

    # Weights at 1/sqrt(fan-in), as layers are initialised: outputs of order 1.
    fan_in = torch.Size(layer.w[1:]).numel()
    return make(layer.x), make(layer.w, fan_in ** -0.5), make((layer.out_channels,))


def _forward(layer, fused, shape, dtype, device):
    x, w, b = _inputs(layer, dtype, device, requires_grad=False)
    return tuple(partial(f, x, w, b, **layer.kwargs) for f in _pair(layer, fused))


def _forward_backward(layer, fused, shape, dtype, device):
    x, w, b = _inputs(layer, dtype, device, requires_grad=True)
    grad = torch.randn(layer.output_shape(), dtype=dtype, device=device)

    def step(forward):
        y = forward(x, w, b, **layer.kwargs)
        return y, *torch.autograd.grad(y, (x, w, b), grad)

    return tuple(partial(step, f) for f in _pair(layer, fused))


def cases(scale, device, dtype):
    found = []

    def add(op, variant, layer, setup, traffic, flops, check):
        found.append(Case(op, variant, layer.x, dtype, device, traffic, setup, check=check,
                          flops=flops))

    for layer in _LAYERS[scale]:
        n_x, n_w = torch.Size(layer.x).numel(), torch.Size(layer.w).numel()
        n_b, n_y = layer.out_channels, torch.Size(layer.output_shape()).numel()
        forward = Traffic(read={"x": n_x, "w": n_w, "b": n_b}, write={"y": n_y})
        forward_backward = Traffic(
            read={"x": n_x, "w": n_w, "b": n_b, "grad_output": n_y},
            write={"y": n_y, "grad_input": n_x, "grad_weight": n_w, "grad_bias": n_b},
        )
        flops = layer.flops()
        variants = [(False, "conv_transpose2d" if layer.transposed else "conv2d", "")]
        if not layer.transposed:
            variants.append((True, "conv2d_bias_act", "relu "))
        for fused, op, act in variants:
            add(op, f"{layer.name} {act}fwd", layer, partial(_forward, layer, fused), forward,
                flops, _gemm.check(dtype))
            add(op, f"{layer.name} {act}fwd+bwd", layer,
                partial(_forward_backward, layer, fused), forward_backward, 3 * flops,
                _gemm.check(dtype, kinked=fused))
    return found
