"""pyops under torch.autocast: convolutions and linear layers run in the autocast dtype as
their native twins do, accept the mixed dtypes autocast produces, and pass gradients back
to float32 parameters; other ops keep their inputs' dtype, as native ones do."""

import pytest
import torch
import torch.nn.functional as TF
from torch.testing import assert_close

import pyops.functional as F
import pyops.nn
from conftest import DEVICES

# torch.autocast's default lower-precision dtype per device.
AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _make(shape, device, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device).requires_grad_(requires_grad)


# (name, pyops call, native call, input shape, weight shape, bias size)
GEMM_OPS = [
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b, padding=1),
     lambda x, w, b: TF.conv2d(x, w, b, padding=1), (2, 8, 9, 10), (6, 8, 3, 3), 6),
    ("conv2d_bias_act", lambda x, w, b: F.conv2d_bias_act(x, w, b, padding=1, activation="relu"),
     lambda x, w, b: TF.relu(TF.conv2d(x, w, b, padding=1)), (2, 8, 9, 10), (6, 8, 3, 3), 6),
    ("conv_transpose2d", lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1),
     lambda x, w, b: TF.conv_transpose2d(x, w, b, stride=2, padding=1), (2, 6, 5, 4),
     (6, 4, 4, 4), 4),
    ("linear", F.linear, TF.linear, (5, 3, 12), (7, 12), 7),
    ("linear_act", lambda x, w, b: F.linear_act(x, w, b, activation="tanh"),
     lambda x, w, b: torch.tanh(TF.linear(x, w, b)), (5, 12), (7, 12), 7),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"], ids=["fp32_input", "mixed"])
@pytest.mark.parametrize("case", GEMM_OPS, ids=[c[0] for c in GEMM_OPS])
def test_gemm_ops_follow_autocast_like_native(case, input_dtype, device):
    _, op, native, xs, ws, bias_size = case
    dtype = AUTOCAST_DTYPE[device]
    results = []
    for fn in (op, native):
        x = _make(xs, device, 0)
        if input_dtype == "autocast":
            x = x.to(dtype)  # as a native layer's output inside the region comes
        w = _make(ws, device, 1, requires_grad=True)
        b = _make((bias_size,), device, 2, requires_grad=True)
        with torch.autocast(device, dtype=dtype):
            y = fn(x, w, b)
        y.float().square().sum().backward()
        results.append((y, w.grad, b.grad))
    (y, gw, gb), (y_ref, gw_ref, gb_ref) = results
    assert y.dtype == y_ref.dtype == dtype
    assert gw.dtype == gb.dtype == torch.float32  # the parameters' own dtype
    # Both round the same operands to `dtype` and accumulate in float; they differ in
    # summation order and in where the result is rounded.
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    scale = max(1.0, y_ref.float().abs().max().item())
    assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * scale)
    for g, r in ((gw, gw_ref), (gb, gb_ref)):
        assert_close(g, r, rtol=4 * tol, atol=4 * tol * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
def test_modules_run_in_the_autocast_dtype(device):
    dtype = AUTOCAST_DTYPE[device]
    conv = pyops.nn.Conv2d(3, 4, 3, padding=1).to(device)
    linear = pyops.nn.Linear(4 * 6 * 6, 5).to(device)
    x = _make((2, 3, 6, 6), device, 0)
    with torch.autocast(device, dtype=dtype):
        y = linear(pyops.nn.ReLU()(conv(x)).flatten(1))
    assert y.dtype == dtype
    y.float().sum().backward()
    assert conv.weight.grad.dtype == linear.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_other_ops_keep_their_input_dtype_like_native(device):
    dtype = AUTOCAST_DTYPE[device]
    x = _make((2, 3, 6, 6), device, 0)
    with torch.autocast(device, dtype=dtype):
        for op, native in ((F.relu, TF.relu), (lambda t: F.max_pool2d(t, 2),
                                                lambda t: TF.max_pool2d(t, 2))):
            for t in (x, x.to(dtype)):
                assert op(t).dtype == native(t).dtype == t.dtype


def test_outside_autocast_nothing_is_cast():
    x, w = _make((2, 3, 6, 6), "cpu", 0), _make((4, 3, 3, 3), "cpu", 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert F.conv2d(x, w).dtype == torch.float32
    assert F.linear(x.flatten(1), _make((5, 108), "cpu", 2)).dtype == torch.float32
