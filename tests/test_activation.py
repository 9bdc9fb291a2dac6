"""The activation family against native torch: values, strides, gradients, in-place
semantics, torch.compile, opcheck and bad input."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF
from torch.testing import assert_close

import pyops
import pyops.functional as F
from conftest import DEVICES, FLOAT_DTYPES, dtype_id

# (name, pyops callable, native callable); leaky_relu slopes include 0 and a negative one.
UNARY = [
    ("relu", F.relu, TF.relu),
    ("leaky_relu", lambda x: F.leaky_relu(x), lambda x: TF.leaky_relu(x)),
    ("leaky_relu_0.2", lambda x: F.leaky_relu(x, 0.2), lambda x: TF.leaky_relu(x, 0.2)),
    ("leaky_relu_0", lambda x: F.leaky_relu(x, 0.0), lambda x: TF.leaky_relu(x, 0.0)),
    ("leaky_relu_neg", lambda x: F.leaky_relu(x, -0.5), lambda x: TF.leaky_relu(x, -0.5)),
    ("sigmoid", F.sigmoid, torch.sigmoid),
    ("tanh", F.tanh, torch.tanh),
]
UNARY_INPLACE = [
    ("relu", lambda x: F.relu(x, inplace=True), lambda x: TF.relu(x, inplace=True)),
    ("leaky_relu", lambda x: F.leaky_relu(x, 0.2, inplace=True),
     lambda x: TF.leaky_relu(x, 0.2, inplace=True)),
    ("sigmoid", lambda x: torch.ops.pyops.sigmoid_(x) or x, torch.sigmoid_),
    ("tanh", lambda x: torch.ops.pyops.tanh_(x) or x, torch.tanh_),
]
ACTIVATIONS = ["none", "relu", "leaky_relu", "sigmoid", "tanh"]

# Sizes below, at and just above multiples of every SIMD width in use (8/16 float,
# 4/8 double, 16/32 half), and one that spans several parallel tasks.
SIZES = [1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100_003]
LAYOUTS = ["contiguous", "transposed", "channels_last", "strided", "expanded"]


def _ids(cases):
    return [c[0] for c in cases]


def make_input(shape, dtype, device, layout="contiguous", specials=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "channels_last":
        x = torch.randn(2, 5, 3, 7, generator=g, dtype=torch.float64)
    elif layout == "transposed":
        x = torch.randn(shape[::-1] if isinstance(shape, tuple) else (shape, 3),
                        generator=g, dtype=torch.float64)
    elif layout == "strided":
        x = torch.randn(2 * (shape if isinstance(shape, int) else shape[0]), 3,
                        generator=g, dtype=torch.float64)
    elif layout == "expanded":
        x = torch.randn(1, shape if isinstance(shape, int) else shape[-1],
                        generator=g, dtype=torch.float64)
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = 4 * x
    if specials and x.numel() >= 8:
        flat = x.view(-1)
        flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-30])
    x = x.to(dtype=dtype, device=device)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.t() if x.dim() == 2 else x.transpose(0, -1)
    if layout == "strided":
        return x[::2]
    if layout == "expanded":
        return x.expand(4, -1)
    return x


# pyops computes half and bfloat16 in float and rounds once, where torch sometimes
# rounds intermediates: allow a couple of units in the last place between the two.
REDUCED_TOLERANCE = {torch.float16: dict(rtol=2e-3, atol=1e-3),
                     torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def assert_matches(actual, expected, exact):
    if exact:
        assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    else:
        assert_close(actual, expected, equal_nan=True, **REDUCED_TOLERANCE.get(actual.dtype, {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name,op,native", UNARY, ids=_ids(UNARY))
def test_forward_matches_native(name, op, native, size, dtype, device):
    x = make_input(size, dtype, device)
    actual, expected = op(x), native(x)
    # relu and leaky_relu are exact; sigmoid/tanh may differ in the last bit (torch
    # uses MKL's vector math for some of them).
    assert_matches(actual, expected, exact=name.startswith(("relu", "leaky")))
    # -0.0 passes through relu as in torch.
    assert torch.equal(torch.signbit(actual[~actual.isnan()]), torch.signbit(expected[~expected.isnan()]))


def _float32_grid():
    """Every 509th float32 bit pattern, NaNs dropped: 8.4M values spanning the whole
    range, subnormals and infinities included."""
    bits = torch.arange(0, 2**32, 509, dtype=torch.int64)
    x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    return x[~x.isnan()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_sigmoid_float32_within_a_few_ulp_of_the_exact_result(device, inplace):
    # pyops' float32 sigmoid has its own exp on AVX-512 (common/vec_math.h), held within
    # 2 ulp of the correctly rounded result; elsewhere its exp is ATen's (Sleef's or the
    # C library's, 1 ulp), which with the division's rounding gives up to 3. torch's own
    # is off by millions of ulp below x = -88.7, where it rounds the result to 0.
    own_exp = device == "cpu" and pyops.build_info()["cpu_capability"] == "AVX512"
    bound = 2 if own_exp else 3
    x = _float32_grid().to(device)
    exact = torch.sigmoid(x.double()).float()
    if inplace:
        actual = x.clone()
        torch.ops.pyops.sigmoid_(actual)
    else:
        actual = F.sigmoid(x)
    ulps = (actual.view(torch.int32).long() - exact.view(torch.int32).long()).abs()
    worst = int(ulps.argmax())
    assert ulps.max() <= bound, (x[worst].item(), actual[worst].item(), exact[worst].item())
    nan = torch.tensor([float("nan")] * 17, device=device)
    assert F.sigmoid(nan).isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,op,native", UNARY, ids=_ids(UNARY))
def test_forward_layouts_keep_torch_strides(name, op, native, layout, dtype, device):
    x = make_input(33, dtype, device, layout=layout)
    actual, expected = op(x), native(x)
    assert_matches(actual, expected, exact=False)
    assert actual.stride() == expected.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (2, 0, 4)], ids=str)
@pytest.mark.parametrize("name,op,native", UNARY, ids=_ids(UNARY))
def test_empty_and_scalar(name, op, native, shape, device):
    x = torch.randn(shape, device=device)
    actual = op(x)
    assert actual.shape == x.shape
    assert_matches(actual, native(x), exact=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "strided"])
@pytest.mark.parametrize("name,op,native", UNARY_INPLACE, ids=_ids(UNARY_INPLACE))
def test_inplace_matches_native_and_writes_back(name, op, native, layout, dtype, device):
    x = make_input(65, dtype, device, layout=layout)
    base_version = x._version
    expected = native(x.clone())
    result = op(x)
    assert result is x or result.data_ptr() == x.data_ptr()
    assert_matches(x, expected, exact=False)
    assert x._version > base_version  # autograd can see the mutation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,op,native", UNARY_INPLACE, ids=_ids(UNARY_INPLACE))
def test_inplace_on_expanded_raises_like_torch(name, op, native, device):
    x = torch.randn(1, 8, device=device).expand(4, 8)
    with pytest.raises(RuntimeError, match="single memory location"):
        native(x)
    with pytest.raises(RuntimeError, match="single memory location"):
        op(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", [17, 4099])
@pytest.mark.parametrize("name,op,native", UNARY, ids=_ids(UNARY))
def test_backward_matches_native(name, op, native, size, dtype, device):
    x = make_input(size, dtype, device, specials=False).requires_grad_()
    grad = make_input(size, dtype, device, specials=False, seed=1)
    (actual,) = torch.autograd.grad(op(x), x, grad)
    (expected,) = torch.autograd.grad(native(x), x, grad)
    assert_matches(actual, expected, exact=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,op,native", UNARY_INPLACE, ids=_ids(UNARY_INPLACE))
def test_inplace_backward_matches_native(name, op, native, device):
    leaf = torch.randn(5, 33, device=device, requires_grad=True)
    grad = torch.randn(5, 33, device=device)
    (actual,) = torch.autograd.grad(op(leaf * 1.5), leaf, grad)
    (expected,) = torch.autograd.grad(native(leaf * 1.5), leaf, grad)
    assert_close(actual, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_saved_result_modified_in_place_is_detected(device):
    x = torch.randn(10, device=device, requires_grad=True)
    y = F.sigmoid(x)
    torch.ops.pyops.relu_(y)  # modifies the result that sigmoid's backward needs
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_leaky_relu_backward_needs_nonnegative_slope(device):
    x = torch.randn(10, device=device, requires_grad=True).clone()
    with pytest.raises(RuntimeError, match="negative_slope >= 0"):
        F.leaky_relu(x, -0.1, inplace=True)


@pytest.mark.parametrize("device", DEVICES)
def test_out_variants(device):
    x = make_input(100, torch.float32, device, specials=False)
    for op, native in [(F.sigmoid, torch.sigmoid), (F.tanh, torch.tanh)]:
        out = torch.empty(0, device=device)
        result = op(x, out=out)
        assert result is out
        assert_close(out, native(x))
        # A non-contiguous out is written through.
        out2 = torch.empty(200, device=device)[::2]
        op(x, out=out2)
        assert_close(out2, native(x))
    with pytest.raises(RuntimeError, match="requires grad"):
        F.sigmoid(x.clone().requires_grad_(), out=torch.empty(100, device=device))


@pytest.mark.parametrize("name,op,native", UNARY, ids=_ids(UNARY))
def test_gradcheck_and_gradgradcheck(name, op, native):
    # Keep inputs away from the kinks of relu/leaky_relu, where finite differences lie.
    x = torch.randn(3, 7, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_()
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["2d", "4d", "channels_last"])
def test_bias_act_gradcheck_and_gradgradcheck(activation, layout):
    shape = (4, 3) if layout == "2d" else (2, 3, 2, 3)
    x = torch.randn(shape, dtype=torch.float64)
    x = x + 0.2 * x.sign()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    b = (0.05 * torch.randn(3, dtype=torch.float64)).requires_grad_()
    fn = lambda x, b: F.bias_act(x, b, activation, 0.2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


def test_bias_act_negative_slope_gradients():
    # A negative slope keeps the input (the result cannot tell the sign apart).
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_()
    b = (0.05 * torch.randn(5, dtype=torch.float64)).requires_grad_()
    fn = lambda x, b: F.bias_act(x, b, "leaky_relu", -0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


def native_bias_act(x, b, activation, slope=0.01):
    z = x + b.view([1, -1] + [1] * (x.dim() - 2))
    return {
        "none": lambda: z,
        "relu": lambda: torch.relu(z),
        "leaky_relu": lambda: TF.leaky_relu(z, slope),
        "sigmoid": lambda: torch.sigmoid(z),
        "tanh": lambda: torch.tanh(z),
    }[activation]()


BIAS_SHAPES = [
    ((7, 33), "contiguous"),
    ((64, 130), "contiguous"),
    ((3, 5, 17), "contiguous"),
    ((2, 6, 9, 11), "contiguous"),
    ((2, 6, 9, 11), "channels_last"),
    ((2, 6, 9, 11), "transposed"),
    ((3, 4, 2, 5, 3), "contiguous"),
    ((0, 4, 3), "contiguous"),
    ((300, 70, 2), "contiguous"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,layout", BIAS_SHAPES, ids=[f"{s}-{l}" for s, l in BIAS_SHAPES])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_matches_native(activation, shape, layout, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    b = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    xa, ba = x.clone().requires_grad_(), b.clone().requires_grad_()
    xe, be = x.clone().requires_grad_(), b.clone().requires_grad_()
    actual = F.bias_act(xa, ba, activation, 0.2)
    expected = native_bias_act(xe, be, activation, 0.2)
    # torch rounds x + b to the dtype before the activation; pyops keeps it in float.
    tol = {} if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    assert_close(actual, expected, **tol)
    if layout == "channels_last":
        assert actual.is_contiguous(memory_format=torch.channels_last)
    ga = torch.autograd.grad(actual, (xa, ba), grad)
    ge = torch.autograd.grad(expected, (xe, be), grad)
    assert_close(ga[0], ge[0], **tol)
    # The bias gradient sums many terms: compare at the precision of the sum.
    scale = grad.abs().sum() / max(1, shape[1])
    assert_close(ga[1], ge[1], rtol=tol.get("rtol", 1e-5), atol=1e-6 + tol.get("atol", 1e-5) * float(scale))


def test_bias_grad_is_deterministic_across_thread_counts():
    x = torch.randn(64, 32, 12, 12)
    b = torch.randn(32)
    g = torch.randn_like(x)
    y = F.bias_act(x, b, "relu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(torch.ops.pyops._bias_act_backward(g, y, b, "relu", 0.01, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


OPCHECK_CASES = [
    ("relu", lambda x: (x,)),
    ("sigmoid", lambda x: (x,)),
    ("tanh", lambda x: (x,)),
    ("leaky_relu", lambda x: (x, 0.2)),
    ("_relu_backward", lambda x: (torch.randn_like(x), torch.relu(x))),
    ("_sigmoid_backward", lambda x: (torch.randn_like(x), torch.sigmoid(x))),
    ("_tanh_backward", lambda x: (torch.randn_like(x), torch.tanh(x))),
    ("_leaky_relu_backward", lambda x: (torch.randn_like(x), x, 0.2, False)),
    ("bias_act", lambda x: (x, torch.randn(x.shape[1], dtype=x.dtype), "tanh", 0.01)),
    ("_bias_act_backward",
     lambda x: (torch.randn_like(x), torch.tanh(x), torch.randn(x.shape[1], dtype=x.dtype),
                "tanh", 0.01, True)),
]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name,make_args", OPCHECK_CASES, ids=_ids(OPCHECK_CASES))
def test_opcheck(name, make_args, requires_grad):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    args = make_args(x)
    if requires_grad:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args)


@pytest.mark.parametrize("name", ["relu_", "sigmoid_", "tanh_", "leaky_relu_"])
def test_opcheck_inplace(name):
    x = torch.randn(3, 4, 5)
    args = (x, 0.2) if name == "leaky_relu_" else (x,)
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args)


COMPILE_CASES = [
    ("relu", lambda x, b: F.relu(x) * 2),
    ("relu_inplace", lambda x, b: F.relu(x * 2, inplace=True)),
    ("leaky_relu", lambda x, b: F.leaky_relu(x, 0.1)),
    ("sigmoid", lambda x, b: F.sigmoid(x)),
    ("tanh", lambda x, b: F.tanh(x) + 1),
    ("bias_act", lambda x, b: F.bias_act(x, b, "relu")),
]


@pytest.mark.parametrize("name,fn", COMPILE_CASES, ids=_ids(COMPILE_CASES))
def test_torch_compile_fullgraph(name, fn):
    torch._dynamo.reset()
    x = torch.randn(4, 6, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, b)
    assert_close(out, fn(x, b))
    grads = torch.autograd.grad(out.sum(), (x, b), allow_unused=True)
    ref = torch.autograd.grad(fn(x, b).sum(), (x, b), allow_unused=True)
    for g, r in zip(grads, ref):
        assert (g is None) == (r is None)
        if g is not None:
            assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("name,op,native", UNARY, ids=_ids(UNARY))
def test_unsupported_dtype_raises_type_error(name, op, native, dtype):
    x = torch.ones(4, dtype=dtype)
    with pytest.raises(TypeError, match=r"input to have dtype float32, float64, float16 or bfloat16"):
        op(x)


def test_inplace_on_leaf_requiring_grad_raises():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.relu(x, inplace=True)


def test_sparse_input_raises():
    # The dispatcher refuses layouts pyops registers no kernel for, naming the backend.
    with pytest.raises(NotImplementedError, match="pyops::relu.*SparseCPU"):
        F.relu(torch.randn(3, 3).to_sparse())


@pytest.mark.parametrize(
    "bias,match",
    [
        (torch.randn(5), r"bias of shape \[4\]"),
        (torch.randn(4, 1), r"bias of shape \[4\]"),
        (torch.randn(4, dtype=torch.float64), "bias to have the dtype of input"),
        (torch.ones(4, dtype=torch.int64), "bias to have dtype float32"),
    ],
)
def test_bias_act_bad_bias(bias, match):
    with pytest.raises((RuntimeError, TypeError), match=match):
        F.bias_act(torch.randn(2, 4, 3), bias, "relu")


def test_bias_act_bad_arguments():
    with pytest.raises(ValueError, match="activation to be one of"):
        F.bias_act(torch.randn(2, 4), torch.randn(4), "gelu")
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        F.bias_act(torch.randn(4), torch.randn(4), "relu")


def test_backward_op_bad_arguments():
    with pytest.raises(RuntimeError, match="result to have the shape of grad_output"):
        torch.ops.pyops._relu_backward(torch.randn(3), torch.randn(4))
    with pytest.raises(TypeError, match="result to have the dtype of grad_output"):
        torch.ops.pyops._sigmoid_backward(torch.randn(3), torch.randn(3, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match="bias to be on the device of input"):
        F.bias_act(torch.randn(2, 4, device="cuda"), torch.randn(4), "relu")


MODULES = [
    (pyops.nn.ReLU, torch.nn.ReLU, {}),
    (pyops.nn.ReLU, torch.nn.ReLU, {"inplace": True}),
    (pyops.nn.LeakyReLU, torch.nn.LeakyReLU, {"negative_slope": 0.3}),
    (pyops.nn.LeakyReLU, torch.nn.LeakyReLU, {"negative_slope": 0.3, "inplace": True}),
    (pyops.nn.Sigmoid, torch.nn.Sigmoid, {}),
    (pyops.nn.Tanh, torch.nn.Tanh, {}),
]


@pytest.mark.parametrize("cls,twin,kwargs", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_modules_are_drop_in(cls, twin, kwargs):
    module, native = cls(**kwargs), twin(**kwargs)
    assert isinstance(module, twin)
    assert repr(module) == repr(native)
    assert module.state_dict().keys() == native.state_dict().keys()
    x = torch.randn(3, 40)
    assert_close(module(x.clone()), native(x.clone()))


def test_build_info():
    info = pyops.build_info()
    assert info["torch_built_against"] == torch.__version__
    assert info["cpu_capability"] in info["cpu_capabilities_compiled"]
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
    assert isinstance(info["cuda_kernels"], bool)


_CAPABILITY_SCRIPT = """
import torch, pyops, pyops.functional as F
print(pyops.build_info()["cpu_capability"])
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    x = (4 * torch.randn(1000, 67)).to(dtype)
    b = torch.randn(67).to(dtype)
    for op, native in ((F.relu, torch.relu), (F.sigmoid, torch.sigmoid), (F.tanh, torch.tanh)):
        torch.testing.assert_close(op(x), native(x))
    torch.testing.assert_close(F.bias_act(x, b, "relu"), torch.relu(x + b),
                               **({} if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)))
print("ok")
"""


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_every_compiled_cpu_capability_matches_native(capability):
    """Each compiled kernel copy runs when torch is told to use that capability."""
    if capability not in pyops.build_info()["cpu_capabilities_compiled"]:
        pytest.skip(f"{capability} kernels not compiled in this build (PYOPS_CPU_CAPABILITIES)")
    supported = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if supported not in order or order.index(capability) > order.index(supported):
        pytest.skip(f"this CPU runs at most {supported}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    run = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split()
    assert lines == [capability, "ok"], run.stdout
