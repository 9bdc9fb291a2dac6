"""The dropout family: the law of the masks, scaling, reproducibility, gradients,
in-place semantics, torch.compile, opcheck and bad input."""

import math

import pytest
import torch
import torch.nn.functional as TF
from torch.testing import assert_close

import pyops
import pyops.functional as F
from conftest import DEVICES, FLOAT_DTYPES, dtype_id


def scale_of(p, dtype):
    # pyops scales in the compute type (float for half/bfloat16).
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return 1 / torch.tensor(1 - p, dtype=compute)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_mask_law_and_scaling(p, dtype, device):
    n = 1 << 20
    x = (torch.rand(n, device=device) + 0.5).to(dtype)  # no zeros of its own
    y = F.dropout(x, p)
    zeroed = (y == 0).double().mean().item()
    # Five standard deviations of a binomial fraction.
    assert abs(zeroed - p) < 5 * math.sqrt(p * (1 - p) / n), zeroed
    kept = y != 0
    expected = (x[kept].to(scale_of(p, dtype).dtype) * scale_of(p, dtype).to(device)).to(dtype)
    assert_close(y[kept], expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_runs_repeat_and_calls_differ(device):
    x = torch.randn(4097, device=device)
    torch.manual_seed(1)
    a, b = F.dropout(x, 0.5), F.dropout(x, 0.5)
    torch.manual_seed(1)
    a2, b2 = F.dropout(x, 0.5), F.dropout(x, 0.5)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b)


def test_masks_do_not_depend_on_thread_count():
    x = torch.randn(300_001)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            torch.manual_seed(3)
            results.append(F.dropout(x, 0.3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("device", DEVICES)
def test_identity_cases_and_extremes(device):
    x = torch.randn(10, device=device)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    assert torch.equal(F.dropout(x, 1.0), torch.zeros_like(x))
    special = torch.tensor([float("nan"), float("inf"), 1.0], device=device)
    # A dropped NaN or inf gives NaN, as torch's input * mask does.
    assert F.dropout(special, 1.0)[:2].isnan().all()
    assert F.dropout(special, 1.0)[:2].isnan().all() == TF.dropout(special, 1.0)[:2].isnan().all()


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_probability_raises_like_torch(p):
    x = torch.randn(4)
    with pytest.raises(ValueError, match="between 0 and 1"):
        TF.dropout(x, p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(x, p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        torch.ops.pyops.dropout(x, p)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype_raises(dtype):
    with pytest.raises(TypeError, match="input to have dtype float32"):
        F.dropout(torch.ones(4, dtype=dtype), 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_gradient_is_the_mask_scaled(dtype, device):
    x = torch.randn(3, 1000, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 1000, device=device, dtype=dtype)
    y, mask = torch.ops.pyops.dropout(x, 0.4)
    assert mask.dtype == torch.bool and not mask.requires_grad
    (grad,) = torch.autograd.grad(y, x, g)
    scale = scale_of(0.4, dtype).to(device)
    expected = (g.to(scale.dtype) * mask.to(scale.dtype) * scale).to(dtype)
    assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "strided"])
def test_layouts(layout, device):
    base = torch.randn(4, 6, 5, 7, device=device)
    x = {"contiguous": base, "transposed": base.transpose(1, 3),
         "channels_last": base.to(memory_format=torch.channels_last), "strided": base[:, ::2]}[layout]
    y = F.dropout(x, 0.5)
    kept = y != 0
    assert_close(y[kept], x[kept] * 2)
    assert y.stride() == TF.dropout(x, 0.5).stride()
    # In place on the same layout writes through (non-dense views too).
    z = x.clone() if layout != "strided" else base.clone()[:, ::2]
    before = z.clone()
    assert F.dropout(z, 0.5, inplace=True) is z
    kept = z != 0
    assert 0 < kept.sum() < z.numel()
    assert_close(z[kept], before[kept] * 2)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_autograd(device):
    leaf = torch.randn(2000, device=device, requires_grad=True)
    h = leaf * 1.0
    version = h._version
    out = F.dropout(h, 0.5, inplace=True)
    assert out is h and h._version > version
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert torch.equal(grad, (out != 0).float() * 2)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.dropout(leaf, 0.5, inplace=True)


def test_empty():
    assert F.dropout(torch.randn(0, 3), 0.5).shape == (0, 3)


def _seeded_dropout(x):
    torch.manual_seed(0)  # the same mask on every call: gradcheck calls it many times
    return F.dropout(x, 0.3)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_seeded_dropout, (x,))
    assert torch.autograd.gradgradcheck(_seeded_dropout, (x,))


def test_opcheck():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    # The forward is random: compare what does not depend on the draw.
    for op in (torch.ops.pyops.dropout.default, torch.ops.pyops.dropout_.default):
        args = (x.detach().clone() if op is torch.ops.pyops.dropout_.default else x, 0.3)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                     "test_faketensor"))
    mask = torch.rand(3, 8) > 0.3
    torch.library.opcheck(torch.ops.pyops._dropout_backward.default, (torch.randn(3, 8), mask, 0.3))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(64, 100, requires_grad=True)
    fn = torch.compile(lambda x: F.dropout(x * 2, 0.5), fullgraph=True, backend="aot_eager")
    y = fn(x)
    kept = y != 0
    assert 0.4 < kept.float().mean() < 0.6
    assert_close(y[kept], 4 * x[kept])
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert_close(grad, kept.float() * 4)


def test_module_is_drop_in():
    module, native = pyops.nn.Dropout(0.3), torch.nn.Dropout(0.3)
    assert isinstance(module, torch.nn.Dropout)
    assert repr(module) == repr(native)
    x = torch.randn(100)
    module.eval()
    assert module(x) is x
    module.train()
    assert ((module(x) == 0).sum() > 0)
