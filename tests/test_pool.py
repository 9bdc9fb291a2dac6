"""The pooling family against native torch: values, int64 indices, gradients, layouts,
min pooling against -max_pool2d(-x), the fused relu + max pooling, torch.compile, opcheck
and bad arguments."""

import pytest
import torch
import torch.nn.functional as TF
from torch.testing import assert_close

import pyops
import pyops.functional as F
from conftest import DEVICES, FLOAT_DTYPES, dtype_id

# (input shape, kernel_size, stride, padding, dilation, ceil_mode): odd sizes, kernel >
# stride, dilation, padding up to kernel/2, rows wide enough for the SIMD row path
# (stride 1, 2 and 3), ceil_mode windows that reach into (or start in) the padding, 3-D.
CASES = [
    ((2, 3, 9, 11), 3, 2, 1, 1, False),
    ((2, 3, 9, 11), 3, 2, 1, 1, True),
    ((1, 2, 10, 10), 2, None, 0, 1, False),
    ((2, 2, 7, 8), (3, 2), (2, 1), (1, 1), (2, 1), True),
    ((1, 3, 5, 5), 3, 1, 1, 1, False),
    ((1, 2, 5, 5), 2, 2, 1, 1, True),  # ceil_mode drops a window starting in the padding
    ((1, 2, 6, 7), 2, 2, 1, 1, True),  # last window reaches into the right padding
    ((2, 4, 40, 37), 2, 2, 0, 1, False),
    ((1, 2, 35, 70), 3, 1, 1, 1, False),
    ((1, 2, 20, 75), 3, 3, 1, 1, True),
    ((1, 2, 12, 80), (2, 3), (1, 2), (1, 1), (2, 2), True),
    ((3, 5, 6), 2, 1, 0, 1, False),
    ((0, 3, 6, 6), 2, 2, 0, 1, False),
]
CASE_IDS = [f"{c[0]}-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}-{'ceil' if c[5] else 'floor'}" for c in CASES]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, dtype, device, layout="contiguous", seed=0, distinct=False):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if distinct:  # no ties anywhere (gradcheck): a permutation of spaced values
        x = (torch.randperm(n, generator=g).to(torch.float64) - n / 2) / max(1, n) * 8
        x = x.reshape(shape)
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    x = x.to(dtype=dtype, device=device)
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-dense view: every other column of a wider tensor
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


# Where windows overlap, gradients are sums: pyops adds half and bfloat16 in float and
# rounds once, torch rounds after every addition.
# Inputs are ~N(0, 9): allow a couple of ulps of summands up to ~10.
GRAD_TOLERANCE = {torch.float16: dict(rtol=4e-3, atol=1e-2), torch.bfloat16: dict(rtol=3e-2, atol=8e-2)}


def assert_grad_close(actual, expected):
    assert_close(actual, expected, **GRAD_TOLERANCE.get(actual.dtype, {}))


def pool_kwargs(case, avg=False):
    _, kernel, stride, padding, dilation, ceil_mode = case
    kwargs = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
    if not avg:
        kwargs["dilation"] = dilation
    return kwargs


def assert_same_layout(actual, expected):
    assert actual.shape == expected.shape
    if actual.dim() == 4 and actual.numel() > 0:
        assert actual.is_contiguous(memory_format=torch.channels_last) == expected.is_contiguous(
            memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_max_pool2d_matches_native(case, layout, dtype, device):
    x = make_input(case[0], dtype, device, layout).requires_grad_()
    kwargs = pool_kwargs(case)
    out, idx = F.max_pool2d(x, return_indices=True, **kwargs)
    out_ref, idx_ref = TF.max_pool2d(x, return_indices=True, **kwargs)
    assert_close(out, out_ref, rtol=0, atol=0)
    assert torch.equal(idx, idx_ref)
    assert idx.dtype == torch.int64
    assert_same_layout(out, out_ref)
    # Without indices, with and without a gradient to record: the same values.
    assert_close(F.max_pool2d(x, **kwargs), out_ref, rtol=0, atol=0)
    with torch.no_grad():
        assert_close(F.max_pool2d(x, **kwargs), out_ref, rtol=0, atol=0)
    grad = torch.randn(out_ref.shape, dtype=torch.float64).to(dtype=dtype, device=device)
    for fn in (lambda: F.max_pool2d(x, **kwargs),
               lambda: F.max_pool2d(x, return_indices=True, **kwargs)[0]):
        (g,) = torch.autograd.grad(fn(), x, grad)
        (g_ref,) = torch.autograd.grad(out_ref, x, grad, retain_graph=True)
        assert_grad_close(g, g_ref)
        assert_same_layout(g, g_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_min_pool2d_is_negated_max_of_negated(case, layout, dtype, device):
    x = make_input(case[0], dtype, device, layout).requires_grad_()
    kwargs = pool_kwargs(case)
    out, idx = F.min_pool2d(x, return_indices=True, **kwargs)
    neg_out, idx_ref = TF.max_pool2d(-x, return_indices=True, **kwargs)
    assert_close(out, -neg_out, rtol=0, atol=0)
    assert torch.equal(idx, idx_ref)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype=dtype, device=device)
    (g,) = torch.autograd.grad(F.min_pool2d(x, **kwargs), x, grad)
    (g_ref,) = torch.autograd.grad(-neg_out, x, grad)
    assert_grad_close(g, g_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_relu_max_pool2d_matches_unfused(case, layout, dtype, device):
    x = make_input(case[0], dtype, device, layout).requires_grad_()
    kwargs = pool_kwargs(case)
    out = F.relu_max_pool2d(x, **kwargs)
    out_ref = TF.max_pool2d(TF.relu(x), **kwargs)
    assert_close(out, out_ref, rtol=0, atol=0)
    assert_same_layout(out, out_ref)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype=dtype, device=device)
    (g,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(out_ref, x, grad)
    assert_grad_close(g, g_ref)


AVG_OPTIONS = [(True, None), (False, None), (True, 3), (False, -2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("count_include_pad,divisor_override", AVG_OPTIONS)
@pytest.mark.parametrize("case", [c for c in CASES if c[4] == 1],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[4] == 1])
def test_avg_pool2d_matches_native(case, count_include_pad, divisor_override, layout, dtype,
                                   device):
    x = make_input(case[0], dtype, device, layout).requires_grad_()
    kwargs = pool_kwargs(case, avg=True)
    kwargs.update(count_include_pad=count_include_pad, divisor_override=divisor_override)
    out = F.avg_pool2d(x, **kwargs)
    out_ref = TF.avg_pool2d(x, **kwargs)
    assert_close(out, out_ref)
    assert_same_layout(out, out_ref)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype=dtype, device=device)
    (g,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(out_ref, x, grad)
    assert_grad_close(g, g_ref)
    assert_same_layout(g, g_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("channels", [7, 8, 9, 15, 16, 17, 31, 32, 33])
def test_channels_last_around_simd_widths(channels, dtype, device):
    x = make_input((2, channels, 7, 9), dtype, device, "channels_last").requires_grad_()
    grad = torch.randn(2, channels, 4, 5, dtype=torch.float64).to(dtype=dtype, device=device)
    grad = grad.contiguous(memory_format=torch.channels_last)
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    pairs = [
        (lambda t: F.max_pool2d(t, **kw), lambda t: TF.max_pool2d(t, **kw)),
        (lambda t: F.min_pool2d(t, **kw), lambda t: -TF.max_pool2d(-t, **kw)),
        (lambda t: F.relu_max_pool2d(t, **kw), lambda t: TF.max_pool2d(TF.relu(t), **kw)),
        (lambda t: F.avg_pool2d(t, **kw), lambda t: TF.avg_pool2d(t, **kw)),
    ]
    for ours, native in pairs:
        out, out_ref = ours(x), native(x)
        assert_close(out, out_ref)
        assert out.is_contiguous(memory_format=torch.channels_last)
        (g,) = torch.autograd.grad(out, x, grad)
        (g_ref,) = torch.autograd.grad(out_ref, x, grad)
        assert_grad_close(g, g_ref)
    out, idx = F.max_pool2d(x, return_indices=True, **kw)
    assert torch.equal(idx, TF.max_pool2d(x, return_indices=True, **kw)[1])


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_backward_into_a_large_grad_input(device):
    # A 16 MiB float32 grad_input: on CPU the channels-last gathers store it around the
    # caches from that size (kStreamMinBytes in pool_cpu.cpp), from every thread.
    x = make_input((4, 64, 128, 128), torch.float32, device, "channels_last").requires_grad_()
    assert x.numel() * x.element_size() >= 16 << 20
    for ours, native in ((F.max_pool2d, TF.max_pool2d), (F.avg_pool2d, TF.avg_pool2d)):
        out, out_ref = ours(x, 3, 2, 1), native(x, 3, 2, 1)
        grad = torch.randn(out_ref.shape, device=device).contiguous(
            memory_format=torch.channels_last)
        (g,) = torch.autograd.grad(out, x, grad)
        (g_ref,) = torch.autograd.grad(out_ref, x, grad)
        assert_grad_close(g, g_ref)
        assert_same_layout(g, g_ref)


def special_input(device, dtype, layout, seed):
    # Few distinct values (many ties), NaN and infinities, so that tie-breaking and NaN
    # propagation decide the results and indices.
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 2.0])
    choice = torch.randint(0, 8, (2, 17, 9, 38), generator=g)
    weights = torch.rand(choice.shape, generator=g)
    choice = torch.where(weights < 0.6, 5 + choice % 3, choice)
    x = values[choice].to(dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1),
                                    dict(kernel_size=3, stride=2, padding=1, dilation=2)],
                         ids=["k2", "k3s1p1", "k3s2p1d2"])
def test_ties_nan_and_inf_like_native(kwargs, layout, dtype, device):
    x = special_input(device, dtype, layout, seed=1)
    out, idx = F.max_pool2d(x, return_indices=True, **kwargs)
    out_ref, idx_ref = TF.max_pool2d(x, return_indices=True, **kwargs)
    assert out.isnan().any() and (out == float("inf")).any()  # the case is exercised
    assert_close(out, out_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, idx_ref)
    # Values of min_pool2d are -max_pool2d(-x) exactly, indices as max_pool2d's on -x.
    mout, midx = F.min_pool2d(x, return_indices=True, **kwargs)
    nout, nidx = TF.max_pool2d(-x, return_indices=True, **kwargs)
    assert_close(mout, -nout, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(midx, nidx)
    # The gradient goes where the indices point (the compact offsets of the no-indices
    # path included).
    xr = x.clone().requires_grad_()
    grad = torch.arange(out.numel(), dtype=dtype, device=device).reshape(out.shape) % 7 + 1
    for ours, native in [(lambda t: F.max_pool2d(t, **kwargs), lambda t: TF.max_pool2d(t, **kwargs)),
                         (lambda t: F.min_pool2d(t, **kwargs), lambda t: -TF.max_pool2d(-t, **kwargs)),
                         (lambda t: F.relu_max_pool2d(t, **kwargs),
                          lambda t: TF.max_pool2d(TF.relu(t), **kwargs))]:
        (g,) = torch.autograd.grad(ours(xr), xr, grad)
        (g_ref,) = torch.autograd.grad(native(xr), xr, grad)
        assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_large_window_uses_int32_offsets(device):
    # 16 x 17 = 272 taps do not fit the 1-byte offsets.
    x = make_input((2, 3, 33, 35), torch.float32, device).requires_grad_()
    kwargs = dict(kernel_size=(16, 17), stride=(5, 6), padding=(8, 3))
    offsets = torch.ops.pyops._pool2d_with_offsets(x.detach(), [16, 17], [5, 6], [8, 3], [1, 1],
                                                   False, "max")[1]
    assert offsets.dtype == torch.int32
    out, out_ref = F.max_pool2d(x, **kwargs), TF.max_pool2d(x, **kwargs)
    assert_close(out, out_ref, rtol=0, atol=0)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), x)
    assert_grad_close(g, g_ref)


GRADCHECK_CASES = [
    ((2, 3, 7, 8), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), "contiguous"),
    ((1, 2, 6, 9), dict(kernel_size=(2, 3), stride=1, padding=(1, 1)), "channels_last"),
    ((2, 6), dict(kernel_size=2), "3d"),
]


@pytest.mark.parametrize("shape,kwargs,layout", GRADCHECK_CASES, ids=["4d", "channels_last", "3d"])
@pytest.mark.parametrize("op", ["max", "min", "relu_max", "avg"])
def test_gradcheck(op, shape, kwargs, layout):
    shape = (3,) + shape + (7,) if layout == "3d" else shape
    x = make_input(shape, torch.float64, "cpu", layout, distinct=True)
    if op == "relu_max":  # keep away from relu's kink
        x = x + 0.05 * x.sign()
    x.requires_grad_()
    fn = {
        "max": lambda t: F.max_pool2d(t, **kwargs),
        "min": lambda t: F.min_pool2d(t, **kwargs),
        "relu_max": lambda t: F.relu_max_pool2d(t, **kwargs),
        "avg": lambda t: F.avg_pool2d(t, **kwargs),
    }[op]
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def _opcheck_cases():
    x = make_input((2, 3, 7, 8), torch.float64, "cpu")
    common = ([3], [2], [1], [1], True)
    grad = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    offsets = torch.ops.pyops._pool2d_with_offsets(x, *common, "max")[1]
    indices = torch.ops.pyops.max_pool2d_with_indices(x, *common)[1]
    return [
        ("max_pool2d", (x, *common)),
        ("min_pool2d", (x, *common)),
        ("relu_max_pool2d", (x, *common)),
        ("max_pool2d_with_indices", (x, *common)),
        ("min_pool2d_with_indices", (x, *common)),
        ("_pool2d_with_offsets", (x, *common, "relu_max")),
        ("_max_pool2d_backward", (grad, offsets, [2, 3, 7, 8], *common, False)),
        ("_max_pool2d_backward", (grad, indices, [2, 3, 7, 8], *common, False)),
        ("avg_pool2d", (x, [3], [2], [1], True, False, None)),
        ("_avg_pool2d_backward", (grad, [2, 3, 7, 8], [3], [2], [1], True, True, 5, False)),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("index", range(10))
def test_opcheck(index, requires_grad):
    name, args = _opcheck_cases()[index]
    if requires_grad:
        if not args[0].is_floating_point():
            pytest.skip("integer arguments cannot require grad")
        args = (args[0].clone().requires_grad_(),) + args[1:]
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args)


def test_opcheck_channels_last():
    x = make_input((2, 5, 7, 8), torch.float32, "cpu", "channels_last")
    torch.library.opcheck(torch.ops.pyops.max_pool2d.default, (x, [2], [], [0], [1], False))
    torch.library.opcheck(torch.ops.pyops.avg_pool2d.default, (x, [3], [2], [1], True, True, None))


COMPILE_CASES = [
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, 2, 1) * 2),
    ("max_pool2d_indices", lambda x: F.max_pool2d(x, 2, return_indices=True)[0]),
    ("min_pool2d", lambda x: F.min_pool2d(x, 3, 1, 1, dilation=2)),
    ("min_pool2d_indices", lambda x: F.min_pool2d(x, 2, return_indices=True)[0]),
    ("relu_max_pool2d", lambda x: F.relu_max_pool2d(x, 2) + 1),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)),
]


@pytest.mark.parametrize("name,fn", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_torch_compile_fullgraph(name, fn):
    torch._dynamo.reset()
    x = make_input((2, 3, 9, 10), torch.float32, "cpu", distinct=True).requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_close(out, fn(x))
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(fn(x).sum(), x)
    assert_grad_close(g, g_ref)


BAD_ARGUMENTS = [
    (dict(kernel_size=0, stride=1), "kernel_size should be greater than zero"),
    (dict(kernel_size=-2, stride=1), "kernel_size should be greater than zero"),
    (dict(kernel_size=2, stride=0), "stride should not be zero"),
    (dict(kernel_size=2, stride=-1), "stride should be greater than zero"),
    (dict(kernel_size=2, padding=-1), "pad must be non-negative"),
    (dict(kernel_size=2, padding=2), "pad should be at most half of effective kernel size"),
    (dict(kernel_size=3, padding=2, dilation=2), "pad should be smaller than or equal to half"),
    (dict(kernel_size=7), "Output size is too small"),
    (dict(kernel_size=(2, 2, 2)), "kernel_size must either be a single int, or a tuple of two"),
    (dict(kernel_size=2, stride=(1, 1, 1)), "stride must either be omitted"),
    (dict(kernel_size=2, dilation=0), "dilation should be greater than zero"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
@pytest.mark.parametrize("name", ["max_pool2d", "min_pool2d", "relu_max_pool2d", "avg_pool2d"])
def test_bad_arguments_raise_like_torch(name, kwargs, match):
    x = torch.randn(2, 3, 5, 5)
    if name == "avg_pool2d":
        if "dilation" in kwargs:
            pytest.skip("avg_pool2d has no dilation")
        if "effective" in match:  # without dilation, torch's second check words it so
            match = "pad should be"
    native = getattr(TF, "max_pool2d" if name != "avg_pool2d" else "avg_pool2d")
    with pytest.raises(RuntimeError):
        native(x, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        getattr(F, name)(x, **kwargs)


@pytest.mark.parametrize("name", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("shape", [(5, 5), (1, 1, 5, 5, 5), (2, 0, 5, 5), (2, 3, 5, 0)], ids=str)
def test_bad_input_shapes_raise_like_torch(name, shape):
    x = torch.randn(shape)
    with pytest.raises((RuntimeError, IndexError)):  # torch's avg_pool2d of 2-D: IndexError
        getattr(TF, name)(x, 2)
    with pytest.raises(RuntimeError, match=r"expected input (to be a 3D|with non-zero)"):
        getattr(F, name)(x, 2)


def test_bad_divisor_and_dtype():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError):
        TF.avg_pool2d(x, 2, divisor_override=0)
    with pytest.raises(RuntimeError, match="divisor_override must be not zero"):
        F.avg_pool2d(x, 2, divisor_override=0)
    # pyops supports floating dtypes only (docs/ARCHITECTURE.md).
    with pytest.raises(TypeError, match="input to have dtype float32"):
        F.max_pool2d(torch.ones(1, 2, 4, 4, dtype=torch.int32), 2)


def test_backward_op_bad_arguments():
    grad = torch.randn(1, 2, 2, 2)
    with pytest.raises(RuntimeError, match="expected grad_output of shape"):
        torch.ops.pyops._max_pool2d_backward(grad, torch.zeros(1, 2, 2, 2, dtype=torch.uint8),
                                             [1, 2, 6, 6], [2], [2], [0], [1], False, False)
    with pytest.raises(TypeError, match="expected indices of dtype uint8 or int32"):
        torch.ops.pyops._max_pool2d_backward(grad, torch.zeros(1, 2, 2, 2), [1, 2, 4, 4], [2],
                                             [2], [0], [1], False, False)
    # An index outside the input raises instead of writing out of bounds.
    with pytest.raises(RuntimeError, match="outside the input plane"):
        torch.ops.pyops._max_pool2d_backward(grad, torch.full((1, 2, 2, 2), 99, dtype=torch.int64),
                                             [1, 2, 4, 4], [2], [2], [0], [1], False, False)
    with pytest.raises(RuntimeError, match="is not a tap offset"):
        torch.ops.pyops._max_pool2d_backward(grad, torch.full((1, 2, 2, 2), 9, dtype=torch.uint8),
                                             [1, 2, 4, 4], [2], [2], [0], [1], False, False)


def test_no_indices_without_grad_and_compact_offsets_with_grad():
    x = torch.randn(2, 3, 8, 8)
    out, offsets = torch.ops.pyops._pool2d_with_offsets(x, [2], [2], [0], [1], False, "max")
    assert offsets.dtype == torch.uint8 and offsets.shape == out.shape
    # Offsets name the tap within the window: kh * kernel_w + kw.
    _, idx = TF.max_pool2d(x, 2, return_indices=True)
    oh = torch.arange(4).view(4, 1)
    ow = torch.arange(4).view(1, 4)
    kh, kw = offsets.long() // 2, offsets.long() % 2
    assert torch.equal((2 * oh + kh) * 8 + 2 * ow + kw, idx)


MODULES = [
    (pyops.nn.MaxPool2d, torch.nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1)),
    (pyops.nn.MaxPool2d, torch.nn.MaxPool2d, dict(kernel_size=2, return_indices=True)),
    (pyops.nn.AvgPool2d, torch.nn.AvgPool2d,
     dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    (pyops.nn.AvgPool2d, torch.nn.AvgPool2d, dict(kernel_size=2, divisor_override=3)),
]


@pytest.mark.parametrize("cls,twin,kwargs", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_modules_are_drop_in(cls, twin, kwargs):
    module, native = cls(**kwargs), twin(**kwargs)
    assert isinstance(module, twin)
    assert repr(module) == repr(native)
    assert module.state_dict().keys() == native.state_dict().keys()
    x = torch.randn(2, 3, 9, 10)
    out, ref = module(x), native(x)
    if isinstance(ref, tuple):
        assert torch.equal(out[1], ref[1])
        out, ref = out[0], ref[0]
    assert_close(out, ref)


def test_min_pool_module():
    module = pyops.nn.MinPool2d(3, stride=2, padding=1, return_indices=True)
    assert not isinstance(module, torch.nn.MaxPool2d)
    assert repr(module).replace("Min", "Max") == repr(torch.nn.MaxPool2d(3, 2, 1, return_indices=True))
    x = torch.randn(2, 3, 9, 10)
    out, idx = module(x)
    ref, ref_idx = TF.max_pool2d(-x, 3, 2, 1, return_indices=True)
    assert_close(out, -ref)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    x = make_input((4, 8, 17, 19), torch.float32, device, distinct=True).requires_grad_()
    grads = []
    for _ in range(2):
        for fn in (lambda t: F.max_pool2d(t, 3, 1, 1), lambda t: F.avg_pool2d(t, 3, 1, 1)):
            grads.append(torch.autograd.grad(fn(x).sum(), x)[0])
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])


def test_backward_op_rejects_offsets_naming_padding_taps():
    # Window (0, 0) of a 3x3, stride 2, padding 1 pool covers padding at taps 0-3 and 6: an
    # offset naming one must raise, not pass a gradient to nowhere (both layouts: NCHW
    # scatters, channels-last gathers).
    grad = torch.randn(1, 16, 2, 2)
    offsets = torch.full((1, 16, 2, 2), 4, dtype=torch.uint8)
    offsets[0, 3, 0, 0] = 0
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with pytest.raises(RuntimeError, match="outside the input plane"):
            torch.ops.pyops._max_pool2d_backward(
                grad.contiguous(memory_format=fmt), offsets.contiguous(memory_format=fmt),
                [1, 16, 4, 4], [3], [2], [1], [1], False, channels_last)
