"""Pooling: max_pool2d, min_pool2d, avg_pool2d and the fused relu_max_pool2d.

Each op runs on NCHW ("nchw") and channels_last ("nhwc") inputs, forward ("fwd") and
forward then autograd's gradient of x ("fwd+bwd"). The windows: k2 (2x2, stride 2) on a mid-network
activation, and ResNet's stem pool k3s2p1 (3x3, stride 2, padding 1).

The bytes each case must move (n: elements of x, m: elements of the output), reading
and writing every tensor once:

  fwd                       read x, write y                                    n + m
  fwd+bwd                   the fwd, then read grad_output, write grad_input   2n + 2m
  indices fwd               read x, write y and int64 indices                  n + 3m
  indices fwd+bwd           the indices fwd, then read grad_output and
                            indices, write grad_input                          2n + 6m

(int64 indices are counted as 8 / itemsize elements of x's dtype each.) What routes the
gradient of max/min pooling without return_indices (torch's int64 indices, pyops's
1-byte tap offsets) is an implementation's choice and is not counted: the fewer bytes it
takes, the higher the GB/s. Native min pooling is ``-max_pool2d(-x)`` and native fused
relu + max is ``max_pool2d(relu(x))``: their extra passes are the traffic pyops saves.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as TF

import pyops.functional as F
from pyops.bench.case import Case, Scale, Traffic


@dataclass(frozen=True)
class _Window:
    name: str
    kwargs: dict  # kernel_size, stride, padding, as both max and avg pooling take them


_K2 = _Window("k2", dict(kernel_size=2))
_STEM = _Window("k3s2p1", dict(kernel_size=3, stride=2, padding=1))

# (window, input shape) per scale. The smoke shapes are odd-sized and have 19 channels:
# not a multiple of any SIMD width, so the edge and tail paths run too.
_SHAPES = {
    Scale.SMOKE: ((_K2, (2, 19, 9, 11)), (_STEM, (2, 19, 13, 15))),
    Scale.QUICK: ((_K2, (64, 64, 24, 24)), (_STEM, (8, 64, 112, 112))),
    Scale.FULL: ((_K2, (64, 64, 24, 24)), (_K2, (32, 128, 56, 56)), (_STEM, (8, 64, 112, 112)),
                 (_STEM, (32, 64, 112, 112))),
}
# The ops timed on the stem window too (min and relu+max are timed on k2 only).
_STEM_OPS = ("max_pool2d", "avg_pool2d")
_LAYOUTS = (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last))


def _native_min(x, **kwargs):
    return -TF.max_pool2d(-x, **kwargs)


def _native_relu_max(x, **kwargs):
    return TF.max_pool2d(TF.relu(x), **kwargs)


# op -> (native, pyops), each (x, **window kwargs) -> output.
_OPS = {
    "max_pool2d": (TF.max_pool2d, F.max_pool2d),
    "avg_pool2d": (TF.avg_pool2d, F.avg_pool2d),
    "min_pool2d": (_native_min, F.min_pool2d),
    "relu_max_pool2d": (_native_relu_max, F.relu_max_pool2d),
}


def _input(shape, dtype, device, memory_format, requires_grad=False):
    x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def _forward(pair, kwargs, memory_format, shape, dtype, device):
    x = _input(shape, dtype, device, memory_format)
    return tuple(partial(f, x, **kwargs) for f in pair)


def _forward_backward(pair, kwargs, memory_format, shape, dtype, device):
    x = _input(shape, dtype, device, memory_format, requires_grad=True)
    with torch.no_grad():
        # In the output's layout (randn_like keeps dense strides), as autograd would pass it.
        grad = torch.randn_like(pair[0](x, **kwargs))

    def step(forward):
        y = forward(x, **kwargs)
        return y, *torch.autograd.grad(y, x, grad)

    return tuple(partial(step, f) for f in pair)


def _indices_forward(memory_format, shape, dtype, device):
    x = _input(shape, dtype, device, memory_format)
    return tuple(partial(f, x, 2, return_indices=True) for f in (TF.max_pool2d, F.max_pool2d))


def _indices_forward_backward(memory_format, shape, dtype, device):
    x = _input(shape, dtype, device, memory_format, requires_grad=True)
    with torch.no_grad():
        grad = torch.randn_like(TF.max_pool2d(x, 2))

    def step(forward):
        y, indices = forward(x, 2, return_indices=True)
        return y, indices, *torch.autograd.grad(y, x, grad)

    return tuple(partial(step, f) for f in (TF.max_pool2d, F.max_pool2d))


def _check(dtype):
    """assert_close's defaults in float32/64. In float16/bfloat16 pyops sums the
    gradients of overlapping windows (and avg's taps) in float and rounds once, native
    may round partial sums: a few units in the last place apart. Indices compare exactly."""
    if dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        return partial(torch.testing.assert_close, rtol=16 * eps, atol=16 * eps)
    return torch.testing.assert_close


def _output_numel(shape, kwargs):
    k, s, p = kwargs["kernel_size"], kwargs.get("stride", kwargs["kernel_size"]), kwargs.get(
        "padding", 0)
    out_h, out_w = ((size + 2 * p - k) // s + 1 for size in shape[-2:])
    return shape[0] * shape[1] * out_h * out_w


def cases(scale, device, dtype):
    found = []
    check = _check(dtype)

    def add(op, variant, shape, setup, traffic):
        found.append(Case(op, variant, shape, dtype, device, traffic, setup, check=check))

    for window, shape in _SHAPES[scale]:
        n, m = torch.Size(shape).numel(), _output_numel(shape, window.kwargs)
        forward = Traffic(read={"x": n}, write={"y": m})
        forward_backward = Traffic(read={"x": n, "grad_output": m},
                                   write={"y": m, "grad_input": n})
        for op, pair in _OPS.items():
            if window is _STEM and op not in _STEM_OPS:
                continue
            for layout, memory_format in _LAYOUTS:
                add(op, f"{window.name} {layout} fwd", shape,
                    partial(_forward, pair, window.kwargs, memory_format), forward)
                add(op, f"{window.name} {layout} fwd+bwd", shape,
                    partial(_forward_backward, pair, window.kwargs, memory_format),
                    forward_backward)
        if window is _K2:
            index_elements = m * 8 // dtype.itemsize
            add("max_pool2d", "k2 nchw indices fwd", shape,
                partial(_indices_forward, torch.contiguous_format),
                Traffic(read={"x": n}, write={"y": m, "indices": index_elements}))
            add("max_pool2d", "k2 nchw indices fwd+bwd", shape,
                partial(_indices_forward_backward, torch.contiguous_format),
                Traffic(read={"x": n, "grad_output": m, "indices": index_elements},
                        write={"y": m, "indices": index_elements, "grad_input": n}))
    return found
