"""The convolution family against native torch: values, layouts, gradients, the fused
conv + bias + activation, torch.compile, opcheck, modules and bad input."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF
from torch.testing import assert_close

import pyops
import pyops.functional as F
from conftest import DEVICES, dtype_id

# (id, input shape, weight shape, kwargs). Widths below, at and above SIMD multiples,
# batch 1, one input channel, every path of the CPU kernels (direct: stride 1 with few
# channels per group; float32 stride 1: implicit GEMM; float32 otherwise: im2col + pyops'
# GEMM when there are enough samples for the threads, im2col + ATen's GEMM below that and
# for the other dtypes; pointwise). The gemm_* cases have channel counts that leave partial
# register tiles (6 rows) and several column strips.
CONV_CASES = [
    ("seed_conv1", (3, 1, 28, 28), (8, 1, 3, 3), {}),
    ("k1", (2, 6, 7, 9), (5, 6, 1, 1), {}),
    ("k1_s2", (2, 6, 7, 9), (5, 6, 1, 1), {"stride": 2}),
    ("k3_p1", (2, 8, 17, 15), (6, 8, 3, 3), {"padding": 1}),
    ("k3_s2_p1", (1, 8, 17, 16), (6, 8, 3, 3), {"stride": 2, "padding": 1}),
    ("k5_same", (2, 3, 16, 33), (4, 3, 5, 5), {"padding": "same"}),
    ("k4_same_d2", (2, 3, 13, 12), (4, 3, 4, 2), {"padding": "same", "dilation": (2, 1)}),
    ("k7_s2_p3", (1, 3, 31, 29), (5, 3, 7, 7), {"stride": 2, "padding": 3}),
    ("k3_d2_p2", (2, 8, 15, 17), (6, 8, 3, 3), {"padding": 2, "dilation": 2}),
    ("valid", (2, 5, 9, 8), (3, 5, 3, 2), {"padding": "valid"}),
    ("asym", (1, 2, 9, 31), (3, 2, 2, 5), {"stride": (1, 2), "padding": (0, 2), "dilation": (2, 1)}),
    ("groups2", (2, 8, 11, 13), (6, 4, 3, 3), {"padding": 1, "groups": 2}),
    ("groups2_direct", (2, 4, 11, 13), (6, 2, 3, 3), {"padding": 1, "groups": 2}),
    ("depthwise", (2, 16, 19, 17), (16, 1, 3, 3), {"padding": 1, "groups": 16}),
    ("depthwise_x2", (2, 4, 12, 33), (8, 1, 5, 5), {"padding": 2, "groups": 4}),
    ("depthwise_s2", (2, 6, 13, 14), (6, 1, 3, 3), {"stride": 2, "padding": 1, "groups": 6}),
    ("out1", (2, 12, 9, 10), (1, 12, 3, 3), {"padding": 1}),
    ("kernel_fills_input", (2, 3, 5, 4), (2, 3, 5, 4), {}),
    ("big_pad", (1, 2, 3, 3), (2, 2, 1, 1), {"padding": 2}),
    ("gemm_k3_p1", (3, 20, 19, 21), (13, 20, 3, 3), {"padding": 1}),
    ("gemm_k3_s2_p1", (3, 20, 19, 21), (13, 20, 3, 3), {"stride": 2, "padding": 1}),
    ("gemm_pad_over_kernel", (2, 8, 9, 10), (7, 8, 3, 3), {"padding": 3}),
    ("gemm_groups_d2", (2, 24, 10, 11), (14, 12, 3, 3), {"padding": 1, "groups": 2, "dilation": 2}),
    ("gemm_k1", (2, 16, 9, 30), (9, 16, 1, 1), {}),
    # 64 channels per group written: pixel tiles with AVX-512 (forward and input gradient),
    # planes that end in a partial register tile, transposed block and pixel block.
    ("pixels_k3_p1", (2, 64, 9, 7), (64, 64, 3, 3), {"padding": 1}),
    ("pixels_groups2_d2", (1, 6, 13, 11), (128, 3, 3, 2), {"groups": 2, "dilation": (1, 2)}),
    # 32 channels per group: half-width pixel tiles (forward and input gradient).
    ("pixels32_k2_p1", (2, 32, 9, 10), (32, 32, 2, 2), {"padding": 1}),
    ("pixels32_groups2_d2", (1, 64, 7, 9), (64, 32, 3, 3), {"groups": 2, "dilation": 2}),
    # 3x3 stride 1 with 16+ channels each side and 512+ channel pairs: Winograd F(2x2, 3x3),
    # every pass. Odd and even output sizes, partial register tiles (26 and 22 rows), a
    # plane of several tile blocks, groups, no padding (the gradient's padding 2), padding
    # beyond the kernel (the gradient's input cropped), uneven padding.
    ("winograd_k3_p1", (2, 24, 13, 11), (26, 24, 3, 3), {"padding": 1}),
    ("winograd_even", (1, 32, 8, 10), (32, 32, 3, 3), {"padding": 1}),
    ("winograd_blocks", (1, 24, 37, 23), (23, 24, 3, 3), {"padding": 1}),
    ("winograd_groups2_valid", (1, 48, 9, 12), (44, 24, 3, 3), {"groups": 2}),
    ("winograd_pad3", (2, 32, 6, 7), (16, 32, 3, 3), {"padding": 3}),
    ("winograd_pad_01", (1, 24, 5, 9), (24, 24, 3, 3), {"padding": (0, 1)}),
    # Strides up to 2 read the input through phase planes (forward and weight gradient):
    # every phase used once (k2), taps that share a phase (k3, k4), dilation 3, stride
    # 2 on one axis only, odd and even sizes, pixel tiles. (Dilation 2 leaves a phase
    # unread: im2col, as in k3_s2_d2.)
    ("phases_k2_s2", (2, 8, 9, 10), (6, 8, 2, 2), {"stride": 2}),
    ("phases_k4_s2_p1", (2, 12, 15, 16), (9, 12, 4, 4), {"stride": 2, "padding": 1}),
    ("phases_k3_s2_d3", (2, 8, 17, 16), (7, 8, 3, 3), {"stride": 2, "dilation": 3, "padding": 2}),
    ("k3_s2_d2", (2, 8, 15, 14), (7, 8, 3, 3), {"stride": 2, "dilation": 2, "padding": 2}),
    ("phases_k3_s21", (1, 5, 11, 12), (10, 5, 3, 3), {"stride": (2, 1), "padding": (0, 1)}),
    ("phases_pixels_k3_s2_p1", (2, 64, 13, 11), (64, 64, 3, 3), {"stride": 2, "padding": 1}),
    # ... and the input gradient by phases: k >= 4 along a stride-2 axis, >= 32 channels.
    ("phases_grad_k4_s2_p1", (2, 32, 13, 12), (24, 32, 4, 4), {"stride": 2, "padding": 1}),
    ("phases_grad_k5_s2_d3", (1, 64, 21, 17), (8, 64, 5, 4),
     {"stride": (2, 1), "padding": (4, 1), "dilation": (3, 1)}),
]
ACTIVATIONS = ["relu", "leaky_relu", "sigmoid", "tanh", "none"]
NATIVE_ACTIVATION = {
    "relu": TF.relu, "leaky_relu": lambda y: TF.leaky_relu(y, 0.1), "sigmoid": torch.sigmoid,
    "tanh": torch.tanh, "none": lambda y: y,
}


def _ids(cases):
    return [c[0] for c in cases]


def make(shape, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def assert_near(actual, expected, dtype):
    """GEMM summation orders differ from torch's: tolerances scale with the magnitude."""
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3,
           torch.bfloat16: 1.6e-2}[dtype]
    assert_close(actual, expected, rtol=tol, atol=tol * scale)


def conv_args(case, dtype=torch.float32, device="cpu", bias=True, requires_grad=False):
    _, xs, ws, kwargs = case
    x = make(xs, dtype, device, 0, requires_grad)
    w = make(ws, dtype, device, 1, requires_grad)
    b = make((ws[0],), dtype, device, 2, requires_grad) if bias else None
    return x, w, b, kwargs


def grads_of(fn, inputs, seed=3, upstream=None):
    out = fn()
    if upstream is None:
        upstream = make(out.shape, out.dtype, out.device, seed)
    wanted = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, wanted, upstream)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_ids(CONV_CASES))
def test_conv2d_matches_native(case, bias, device):
    x, w, b, kwargs = conv_args(case, device=device, bias=bias, requires_grad=True)
    out, grads = grads_of(lambda: F.conv2d(x, w, b, **kwargs), (x, w, b))
    ref, ref_grads = grads_of(lambda: TF.conv2d(x, w, b, **kwargs), (x, w, b))
    assert out.shape == ref.shape and out.stride() == ref.stride()
    assert_near(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_near(g, r, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[0] in
                                  ("seed_conv1", "k3_p1", "depthwise", "k7_s2_p3", "groups2",
                                   "pixels_k3_p1", "pixels_groups2_d2")],
                         ids=lambda c: c[0])
def test_conv2d_bias_act_matches_conv_then_activation(case, activation, device):
    x, w, b, kwargs = conv_args(case, device=device, requires_grad=True)
    slope = {"negative_slope": 0.1} if activation == "leaky_relu" else {}
    out, grads = grads_of(lambda: F.conv2d_bias_act(x, w, b, activation=activation, **slope,
                                                     **kwargs), (x, w, b))
    native = NATIVE_ACTIVATION[activation]
    ref, ref_grads = grads_of(lambda: native(TF.conv2d(x, w, b, **kwargs)), (x, w, b))
    assert_near(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_near(g, r, torch.float32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_conv2d_bias_act_without_bias_and_negative_slope(bias):
    case = CONV_CASES[3]
    x, w, b, kwargs = conv_args(case, bias=bias, requires_grad=True)
    for activation, slope in (("relu", 0.01), ("leaky_relu", -0.5)):
        out, grads = grads_of(
            lambda: F.conv2d_bias_act(x, w, b, activation=activation, negative_slope=slope,
                                      **kwargs), (x, w, b))
        act = TF.relu if activation == "relu" else (lambda y: TF.leaky_relu(y, slope))
        ref, ref_grads = grads_of(lambda: act(TF.conv2d(x, w, b, **kwargs)), (x, w, b))
        assert_near(out, ref, torch.float32)
        for g, r in zip(grads, ref_grads):
            assert_near(g, r, torch.float32)


# (id, input shape, weight shape [in, out / groups, kh, kw], kwargs)
CONV_T_CASES = [
    ("k3", (2, 4, 7, 6), (4, 3, 3, 3), {}),
    ("k4_s2_p1_doubling", (2, 6, 7, 8), (6, 3, 4, 4), {"stride": 2, "padding": 1}),
    ("k3_s2_out_pad", (1, 4, 5, 6), (4, 2, 3, 3), {"stride": 2, "padding": 1, "output_padding": 1}),
    ("k1", (2, 5, 4, 9), (5, 3, 1, 1), {}),
    ("groups2_d2", (2, 4, 6, 5), (4, 3, 3, 3), {"groups": 2, "dilation": 2, "padding": 1}),
    ("depthwise", (2, 8, 9, 17), (8, 1, 3, 3), {"groups": 8, "padding": 1}),
    ("out_pad_below_dilation", (1, 2, 5, 5), (2, 3, 3, 3), {"dilation": 2, "output_padding": 1}),
    # 32 output channels, k4 s2: the forward runs by phases (a stride-1 correlation each).
    ("phases_k4_s2_p1_32", (2, 16, 7, 6), (16, 32, 4, 4), {"stride": 2, "padding": 1}),
    ("phases_k4_s2_out_pad", (1, 8, 5, 6), (8, 64, 4, 4),
     {"stride": 2, "padding": 2, "output_padding": 1}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CONV_T_CASES, ids=_ids(CONV_T_CASES))
def test_conv_transpose2d_matches_native(case, bias, device):
    _, xs, ws, kwargs = case
    x = make(xs, device=device, requires_grad=True)
    w = make(ws, device=device, seed=1, requires_grad=True)
    b = make((ws[1] * kwargs.get("groups", 1),), device=device, seed=2,
             requires_grad=True) if bias else None
    out, grads = grads_of(lambda: F.conv_transpose2d(x, w, b, **kwargs), (x, w, b))
    ref, ref_grads = grads_of(lambda: TF.conv_transpose2d(x, w, b, **kwargs), (x, w, b))
    assert out.shape == ref.shape
    assert_near(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_near(g, r, torch.float32)


# With CUDA, float16 and bfloat16 GEMMs run on tensor cores (sm_80+): the gemm_* and
# pixels_* cases give them several K steps, partial 64 x 64 tiles, groups and a split-K
# weight gradient.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[0] in
                                  ("seed_conv1", "k3_s2_p1", "depthwise", "k1", "gemm_k3_p1",
                                   "gemm_groups_d2", "pixels_k3_p1")],
                         ids=lambda c: c[0])
def test_dtypes_match_native(case, dtype, device):
    x, w, b, kwargs = conv_args(case, dtype=dtype, device=device, requires_grad=True)
    out, grads = grads_of(lambda: F.conv2d_bias_act(x, w, b, activation="tanh", **kwargs),
                          (x, w, b))
    # Reference in float64 rounded to the dtype: torch's own low-precision CPU conv is the
    # less accurate one.
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref, ref_grads = grads_of(lambda: torch.tanh(TF.conv2d(x64, w64, b64, **kwargs)),
                              (x64, w64, b64))
    assert out.dtype == dtype
    assert_near(out, ref.to(dtype), dtype)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert_near(g, r.to(dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("case", [c for c in CONV_T_CASES if c[0] in
                                  ("k4_s2_p1_doubling", "groups2_d2")], ids=lambda c: c[0])
def test_conv_transpose2d_dtypes_match_native(case, dtype, device):
    _, xs, ws, kwargs = case
    x = make(xs, dtype, device, 0, requires_grad=True)
    w = make(ws, dtype, device, 1, requires_grad=True)
    b = make((ws[1] * kwargs.get("groups", 1),), dtype, device, 2, requires_grad=True)
    out, grads = grads_of(lambda: F.conv_transpose2d(x, w, b, **kwargs), (x, w, b))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref, ref_grads = grads_of(lambda: TF.conv_transpose2d(x64, w64, b64, **kwargs),
                              (x64, w64, b64))
    assert out.dtype == dtype
    assert_near(out, ref.to(dtype), dtype)
    for g, r in zip(grads, ref_grads):
        assert_near(g, r.to(dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["input_channels_last", "weight_channels_last",
                                    "both_channels_last", "non_contiguous"])
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[0] in
                                  ("seed_conv1", "k3_p1", "depthwise")], ids=lambda c: c[0])
def test_memory_formats_follow_torch(case, layout, device):
    x, w, b, kwargs = conv_args(case, device=device)
    if layout in ("input_channels_last", "both_channels_last"):
        x = x.to(memory_format=torch.channels_last)
    if layout in ("weight_channels_last", "both_channels_last"):
        w = w.to(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        x = torch.cat([x, x], dim=3)[..., ::2]
    x.requires_grad_()
    w.requires_grad_()
    out, grads = grads_of(lambda: F.conv2d(x, w, b, **kwargs), (x, w))
    ref, ref_grads = grads_of(lambda: TF.conv2d(x, w, b, **kwargs), (x, w))
    assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(
        memory_format=torch.channels_last)
    assert out.is_contiguous() == ref.is_contiguous()
    assert_near(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_near(g, r, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_input(device):
    x = make((3, 10, 11), device=device)
    w = make((4, 3, 3, 3), device=device, seed=1)
    assert_near(F.conv2d(x, w, padding="same"), TF.conv2d(x, w, padding="same"), torch.float32)
    assert_near(F.conv2d_bias_act(x, w, None, padding=1, activation="relu"),
                TF.relu(TF.conv2d(x, w, padding=1)), torch.float32)
    wt = make((3, 2, 3, 3), device=device, seed=1)
    assert_near(F.conv_transpose2d(x, wt, stride=2), TF.conv_transpose2d(x, wt, stride=2),
                torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = make((0, 3, 8, 8), device=device, requires_grad=True)
    w = make((4, 3, 3, 3), device=device, seed=1, requires_grad=True)
    out = F.conv2d(x, w, padding=1)
    assert out.shape == TF.conv2d(x, w, padding=1).shape
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))


# ---- Gradients in float64 ------------------------------------------------------------------

GRADCHECK_CASES = [
    ("direct", (2, 2, 5, 6), (3, 2, 3, 3), {"padding": 1}),
    ("gemm_strided", (2, 6, 6, 5), (5, 6, 3, 2), {"stride": 2, "padding": (1, 0), "dilation": (1, 2)}),
    ("depthwise", (1, 4, 5, 5), (4, 1, 3, 3), {"padding": 1, "groups": 4}),
    ("groups", (1, 6, 5, 4), (4, 3, 1, 2), {"groups": 2}),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=_ids(GRADCHECK_CASES))
def test_conv2d_gradcheck_and_gradgradcheck(case):
    x, w, b, kwargs = conv_args(case, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: F.conv2d(x, w, b, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_conv2d_bias_act_gradcheck(activation):
    x, w, b, kwargs = conv_args(GRADCHECK_CASES[1], dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: F.conv2d_bias_act(x, w, b, activation=activation, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    if activation in ("sigmoid", "tanh"):
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("case", CONV_T_CASES[1:3] + CONV_T_CASES[4:5], ids=lambda c: c[0])
def test_conv_transpose2d_gradcheck_and_gradgradcheck(case):
    _, xs, ws, kwargs = case
    x = make((1, *xs[1:]), torch.float64, requires_grad=True)
    w = make(ws, torch.float64, seed=1, requires_grad=True)
    b = make((ws[1] * kwargs.get("groups", 1),), torch.float64, seed=2, requires_grad=True)
    fn = lambda x, w, b: F.conv_transpose2d(x, w, b, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_backward_computes_only_the_requested_gradients():
    x, w, b, kwargs = conv_args(CONV_CASES[3], requires_grad=True)
    g = make((2, 6, 17, 15), seed=5)
    gi, gw, gb = torch.ops.pyops._conv2d_backward(g, x, w, [1, 1], [1, 1], [1, 1], 1,
                                                  [False, True, False])
    assert gi is None and gb is None
    assert_near(gw, torch.autograd.grad(TF.conv2d(x, w, b, padding=1), w, g)[0], torch.float32)


def test_grad_weight_does_not_depend_on_thread_count():
    # Direct path: sums in a fixed order per output channel.
    x, w, b, kwargs = conv_args(CONV_CASES[0], requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.autograd.grad(F.conv2d(x, w, b).sum(), (w, b)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])


def test_winograd_does_not_depend_on_thread_count():
    # Tile blocks and batch ranges are fixed by the shape; batch 1 splits a plane's
    # blocks between threads.
    for name in ("winograd_blocks", "winograd_groups2_valid"):
        case = next(c for c in CONV_CASES if c[0] == name)
        x, w, b, kwargs = conv_args(case, requires_grad=True)
        threads = torch.get_num_threads()
        results = []
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(grads_of(lambda: F.conv2d(x, w, b, **kwargs), (x, w, b)))
        finally:
            torch.set_num_threads(threads)
        for out, grads in results[1:]:
            assert torch.equal(out, results[0][0])
            assert all(torch.equal(g, r) for g, r in zip(grads, results[0][1]))


# ---- opcheck and torch.compile --------------------------------------------------------------

def _opcheck_cases():
    x, w, b, _ = conv_args(GRADCHECK_CASES[0], dtype=torch.float64)
    xt = make((2, 3, 4, 5), torch.float64)
    wt = make((3, 2, 3, 3), torch.float64, seed=1)
    g = make((2, 3, 5, 6), torch.float64, seed=4)
    return [
        ("conv2d", torch.ops.pyops.conv2d.default, (x, w, b, [1, 1], [1, 1], [1, 1], 1)),
        ("conv2d_cl", torch.ops.pyops.conv2d.default,
         (x.to(memory_format=torch.channels_last), w, None, [2, 1], [0, 1], [1, 1], 1)),
        ("conv2d_bias_act", torch.ops.pyops.conv2d_bias_act.default,
         (x, w, b, [1, 1], [1, 1], [1, 1], 1, "sigmoid", 0.01)),
        ("conv_transpose2d", torch.ops.pyops.conv_transpose2d.default,
         (xt, wt, make((2,), torch.float64), [2, 2], [1, 1], [1, 0], 1, [1, 1])),
        ("_conv2d_backward", torch.ops.pyops._conv2d_backward.default,
         (g, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True])),
        ("_conv2d_backward_masked", torch.ops.pyops._conv2d_backward.default,
         (g, x, w, [1, 1], [1, 1], [1, 1], 1, [False, True, False])),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=_ids(_opcheck_cases()))
def test_opcheck(name, op, args, requires_grad):
    if requires_grad:
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a
                     for a in args)
    torch.library.opcheck(op, args)


COMPILE_CASES = [
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b, padding=1) * 2),
    ("conv2d_same", lambda x, w, b: F.conv2d(x, w, None, padding="same")),
    ("conv2d_bias_act", lambda x, w, b: F.conv2d_bias_act(x, w, b, 1, 1, 1, 1, "relu")),
    ("conv_transpose2d", lambda x, w, b: F.conv_transpose2d(x, w.transpose(0, 1), None, 2)),
]


@pytest.mark.parametrize("name,fn", COMPILE_CASES, ids=_ids(COMPILE_CASES))
def test_torch_compile_fullgraph(name, fn):
    torch._dynamo.reset()
    x = make((2, 4, 7, 6), requires_grad=True)
    w = make((4, 4, 3, 3), seed=1, requires_grad=True)
    b = make((4,), seed=2, requires_grad=True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b)
    assert_near(out, fn(x, w, b), torch.float32)
    grads = torch.autograd.grad(out.sum(), (x, w, b), allow_unused=True)
    ref = torch.autograd.grad(fn(x, w, b).sum(), (x, w, b), allow_unused=True)
    for g, r in zip(grads, ref):
        assert (g is None) == (r is None)
        if g is not None:
            assert_near(g, r, torch.float32)


# ---- Modules ----------------------------------------------------------------------------

MODULES = [
    (pyops.nn.Conv2d, torch.nn.Conv2d, dict(in_channels=4, out_channels=3, kernel_size=3)),
    (pyops.nn.Conv2d, torch.nn.Conv2d,
     dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2, bias=False)),
    (pyops.nn.Conv2d, torch.nn.Conv2d,
     dict(in_channels=4, out_channels=4, kernel_size=(3, 2), padding="same", dilation=2)),
] + [
    (pyops.nn.Conv2d, torch.nn.Conv2d,
     dict(in_channels=4, out_channels=2, kernel_size=3, padding=(1, 2), padding_mode=mode))
    for mode in ("reflect", "replicate", "circular")
] + [
    (pyops.nn.Conv2d, torch.nn.Conv2d,
     dict(in_channels=4, out_channels=2, kernel_size=4, padding="same", padding_mode="reflect")),
    (pyops.nn.ConvTranspose2d, torch.nn.ConvTranspose2d,
     dict(in_channels=4, out_channels=2, kernel_size=3, stride=2, padding=1, output_padding=1)),
    (pyops.nn.ConvTranspose2d, torch.nn.ConvTranspose2d,
     dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, bias=False)),
]


@pytest.mark.parametrize("cls,twin,kwargs", MODULES, ids=[str(i) for i in range(len(MODULES))])
def test_modules_are_drop_in(cls, twin, kwargs):
    torch.manual_seed(0)
    module = cls(**kwargs)
    native = twin(**kwargs)
    assert isinstance(module, twin)
    assert repr(module) == repr(native)
    assert module.state_dict().keys() == native.state_dict().keys()
    native.load_state_dict(module.state_dict())
    x = make((2, 4, 9, 10), requires_grad=True)
    out, ref = module(x), native(x)
    assert_near(out, ref, torch.float32)
    g = make(ref.shape, seed=7)
    for a, r in zip(torch.autograd.grad(out, [x, *module.parameters()], g),
                    torch.autograd.grad(ref, [x, *native.parameters()], g)):
        assert_near(a, r, torch.float32)


def test_conv_transpose2d_module_output_size():
    torch.manual_seed(0)
    module = pyops.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    native = torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    native.load_state_dict(module.state_dict())
    x = make((1, 3, 5, 6))
    for size in [(9, 11), (10, 12), [1, 2, 10, 11]]:
        assert_near(module(x, output_size=size), native(x, output_size=size), torch.float32)
    with pytest.raises(ValueError):
        module(x, output_size=(20, 20))


# ---- Bad input: clear errors, where torch raises too --------------------------------------

BAD_CONV = [
    ("channels_mismatch", (2, 3, 8, 8), (4, 2, 3, 3), {}, r"expects input to have 2 channels"),
    ("groups_mismatch", (2, 4, 8, 8), (3, 2, 3, 3), {"groups": 2}, r"weight to be divisible by 2"),
    ("weight_rank", (2, 3, 8, 8), (4, 3, 3), {}, r"4-D weight"),
    ("input_rank", (3, 8), (4, 3, 3, 3), {}, r"3-D \(unbatched\) or 4-D"),
    ("kernel_too_large", (1, 3, 4, 4), (2, 3, 5, 5), {}, r"larger than the padded input \(4 x 4\)"),
    ("stride_0", (1, 3, 8, 8), (2, 3, 3, 3), {"stride": 0}, r"stride to be positive"),
    ("negative_padding", (1, 3, 8, 8), (2, 3, 3, 3), {"padding": -1}, r"padding to be non-negative"),
    ("dilation_0", (1, 3, 8, 8), (2, 3, 3, 3), {"dilation": 0}, r"dilation to be positive"),
    ("groups_0", (1, 3, 8, 8), (2, 3, 3, 3), {"groups": 0}, r"groups to be positive"),
    ("same_strided", (1, 3, 8, 8), (2, 3, 3, 3), {"padding": "same", "stride": 2}, r"strided"),
    ("bad_padding_string", (1, 3, 8, 8), (2, 3, 3, 3), {"padding": "full"}, r"Invalid padding string"),
]


@pytest.mark.parametrize("name,xs,ws,kwargs,match", BAD_CONV, ids=_ids(BAD_CONV))
def test_bad_conv_arguments_raise_like_torch(name, xs, ws, kwargs, match):
    x, w = torch.randn(xs), torch.randn(ws)
    with pytest.raises((RuntimeError, ValueError)):
        TF.conv2d(x, w, **kwargs)
    with pytest.raises((RuntimeError, ValueError), match=match):
        F.conv2d(x, w, **kwargs)


def test_bad_bias_dtype_and_activation():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"bias of shape \[2\]"):
        F.conv2d(x, w, torch.randn(3))
    with pytest.raises(TypeError, match="weight to have the dtype of input"):
        F.conv2d(x, w.double())
    with pytest.raises(TypeError, match="input to have dtype float32"):
        F.conv2d(x.long(), w.long())
    with pytest.raises(ValueError, match="activation to be one of"):
        F.conv2d_bias_act(x, w, None, activation="gelu")


def test_bad_conv_transpose_arguments():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="output_padding"):
        F.conv_transpose2d(x, w, stride=2, output_padding=2)
    with pytest.raises(RuntimeError):
        TF.conv_transpose2d(torch.randn(1, 3, 5, 5), w)
    with pytest.raises(RuntimeError, match="expects input to have 4 channels"):
        F.conv_transpose2d(torch.randn(1, 3, 5, 5), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match="weight to be on the device of input"):
        F.conv2d(torch.randn(1, 3, 8, 8, device="cuda"), torch.randn(2, 3, 3, 3))


_CAPABILITY_SCRIPT = """
import torch, pyops, pyops.functional as F, torch.nn.functional as TF
torch.manual_seed(0)
for xs, ws, kw in (((2, 1, 19, 21), (5, 1, 3, 3), {}), ((2, 8, 9, 33), (8, 1, 3, 3), dict(padding=1, groups=8)),
                   ((2, 6, 9, 10), (4, 6, 3, 3), dict(stride=2)),
                   ((1, 24, 9, 11), (22, 24, 3, 3), dict(padding=1))):
    x, w = torch.randn(xs, requires_grad=True), torch.randn(ws, requires_grad=True)
    out, ref = F.conv2d_bias_act(x, w, None, activation="relu", **kw), TF.relu(TF.conv2d(x, w, **kw))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, r in zip(torch.autograd.grad(out.sum(), (x, w)), torch.autograd.grad(ref.sum(), (x, w))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-3)
print(pyops.build_info()["cpu_capability"])
"""


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_every_compiled_cpu_capability_matches_native(capability):
    """Each compiled kernel copy (the SIMD widths of the direct path) runs correctly."""
    if capability not in pyops.build_info()["cpu_capabilities_compiled"]:
        pytest.skip(f"{capability} kernels not compiled in this build (PYOPS_CPU_CAPABILITIES)")
    order = ["DEFAULT", "AVX2", "AVX512"]
    if order.index(capability) > order.index(torch.backends.cpu.get_cpu_capability().upper()
                                             if torch.backends.cpu.get_cpu_capability().upper()
                                             in order else "DEFAULT"):
        pytest.skip(f"this CPU does not support {capability}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT], env=env, cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == capability


@pytest.mark.parametrize("upstream", ["finite", "non_finite"])
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[0].startswith("winograd")],
                         ids=lambda c: c[0])
def test_non_finite_values_propagate_like_torch(case, upstream):
    """inf and NaN come out where torch's convolution puts them. Winograd's transforms
    subtract inputs, which would turn some +-inf sums into NaN; its callers recompute such
    calls by the implicit GEMM. (With inf in grad_output, the implicit GEMM's weight
    gradient multiplies it by the input's zero padding, NaN where torch's is +-inf:
    docs/ACCURACY.md. So that case checks the output and input gradient only.)"""
    x, w, b, kwargs = conv_args(case, requires_grad=True)
    with torch.no_grad():
        x.view(-1)[[3, 40, 41, x.numel() // 2]] = torch.tensor([float("inf"), float("inf"),
                                                                 float("-inf"), float("nan")])
    g = make(TF.conv2d(x, w, b, **kwargs).shape, seed=3)
    if upstream == "non_finite":
        g.view(-1)[[5, g.numel() // 3]] = torch.tensor([float("inf"), float("nan")])
    wrt = (x, w) if upstream == "finite" else (x,)
    out, grads = grads_of(lambda: F.conv2d(x, w, b, **kwargs), wrt, upstream=g)
    ref, ref_grads = grads_of(lambda: TF.conv2d(x, w, b, **kwargs), wrt, upstream=g)
    for a, r in zip((out.detach(), *grads), (ref.detach(), *ref_grads)):
        assert torch.equal(a.isnan(), r.isnan()) and torch.equal(a.isinf(), r.isinf())
        assert torch.equal(a[r.isinf()], r[r.isinf()])
        assert_near(a[r.isfinite()], r[r.isfinite()], torch.float32)
