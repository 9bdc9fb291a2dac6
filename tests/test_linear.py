"""The linear family against native torch: F.linear and the fused linear + bias +
activation, values, gradients, opcheck, torch.compile, bad input."""

import pytest
import torch
import torch.nn.functional as TF
from torch.testing import assert_close

import pyops
import pyops.functional as F
from conftest import DEVICES, FLOAT_DTYPES, dtype_id

ACTIVATIONS = ["none", "relu", "leaky_relu", "sigmoid", "tanh"]
NATIVE_ACT = {
    "none": lambda z, s: z,
    "relu": lambda z, s: torch.relu(z),
    "leaky_relu": lambda z, s: TF.leaky_relu(z, s),
    "sigmoid": lambda z, s: torch.sigmoid(z),
    "tanh": lambda z, s: torch.tanh(z),
}
# GEMMs sum in different orders; half/bfloat16 round the pre-activation differently.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: {},
             torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
SHAPES = [((64, 9216), 128), ((5, 7), 3), ((2, 3, 17), 33), ((0, 4), 6), ((16,), 10)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,out_features", SHAPES, ids=str)
@pytest.mark.parametrize("activation,slope", [(a, 0.2) for a in ACTIVATIONS] + [("leaky_relu", -0.3)])
def test_linear_act_matches_native(activation, slope, shape, out_features, bias, dtype, device):
    if dtype == torch.float16 and device == "cpu" and shape[-1] > 1000:
        pytest.skip("torch's CPU half GEMM on 64x9216 is too slow for the suite")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(out_features, shape[-1], generator=g) / shape[-1] ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(out_features, generator=g).to(device=device, dtype=dtype) if bias else None
    leaves_a = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    leaves_e = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    actual = F.linear_act(*leaves_a, activation=activation, negative_slope=slope)
    expected = NATIVE_ACT[activation](TF.linear(*leaves_e), slope)
    tol = TOLERANCE[dtype]
    assert_close(actual, expected, **tol)
    grad = torch.randn(expected.shape, generator=g).to(device=device, dtype=dtype)
    inputs_a = [t for t in leaves_a if t is not None]
    inputs_e = [t for t in leaves_e if t is not None]
    for ga, ge in zip(torch.autograd.grad(actual, inputs_a, grad),
                      torch.autograd.grad(expected, inputs_e, grad)):
        scale = max(1.0, ge.abs().max().item()) if ge.numel() else 1.0
        rtol, atol = tol.get("rtol", 1e-7), tol.get("atol", 1e-7) * scale
        if dtype in (torch.float16, torch.bfloat16) and activation in ("relu", "leaky_relu"):
            # A pre-activation within rounding of 0 may take the other side of the kink
            # in one of the two: a few gradient entries then differ by a whole term.
            far = ~torch.isclose(ga, ge, rtol=rtol, atol=atol)
            assert far.sum() <= 1e-4 * far.numel(), f"{int(far.sum())} of {far.numel()} differ"
        else:
            assert_close(ga, ge, rtol=rtol, atol=atol)


def test_plain_linear_is_torch_linear():
    x, w, b = torch.randn(64, 300), torch.randn(70, 300), torch.randn(70)
    assert torch.equal(F.linear(x, w, b), TF.linear(x, w, b))
    assert torch.equal(F.linear(x, w), TF.linear(x, w))


@pytest.mark.parametrize("activation,slope", [(a, 0.2) for a in ACTIVATIONS] + [("leaky_relu", -0.3)])
def test_gradcheck_and_gradgradcheck(activation, slope):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: F.linear_act(x, w, b, activation, slope)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: F.linear_act(x, w, None, activation, slope), (x, w))


def test_bad_arguments():
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) == 5"):
        F.linear(torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match=r"bias of shape \[3\]"):
        F.linear(torch.randn(2, 5), torch.randn(3, 5), torch.randn(4))
    with pytest.raises(RuntimeError, match="weight of shape"):
        F.linear(torch.randn(2, 5), torch.randn(5))
    with pytest.raises(TypeError, match="weight to have the dtype of input"):
        F.linear(torch.randn(2, 5), torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation to be one of"):
        F.linear_act(torch.randn(2, 5), torch.randn(3, 5), None, "gelu")


def test_opcheck():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for activation in ("none", "relu", "tanh"):
        torch.library.opcheck(torch.ops.pyops.linear_act.default, (x, w, b, activation, 0.01))
    torch.library.opcheck(torch.ops.pyops.linear_act.default, (x, w, None, "leaky_relu", -0.2))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(8, 6, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    fn = lambda x, w, b: F.linear_act(x, w, b, "relu").sum() + F.linear(x, w).sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, w, b), fn(x, w, b))
    for g, r in zip(torch.autograd.grad(compiled(x, w, b), (x, w, b)),
                    torch.autograd.grad(fn(x, w, b), (x, w, b))):
        assert_close(g, r)


def test_module_is_drop_in():
    torch.manual_seed(0)
    module = pyops.nn.Linear(20, 7)
    torch.manual_seed(0)
    native = torch.nn.Linear(20, 7)
    assert isinstance(module, torch.nn.Linear) and repr(module) == repr(native)
    assert module.state_dict().keys() == native.state_dict().keys()
    x = torch.randn(3, 20)
    assert torch.equal(module(x), native(x))
