"""The log-softmax family against native torch: log_softmax along every dim and the
fused log_softmax + nll_loss, values, gradients, opcheck, torch.compile, bad input."""

import pytest
import torch
import torch.nn.functional as TF
from torch.testing import assert_close

import pyops
import pyops.functional as F
from conftest import DEVICES, FLOAT_DTYPES, dtype_id

# pyops rounds half/bfloat16 outputs once from float, torch sometimes differently: one
# ulp apart in y, and the backward g - exp(y) * sum(g) scales that by sum(g) (~30 for
# rows of 1000). Both stay as far from a float64 reference as each other.
REDUCED_TOLERANCE = {torch.float16: dict(rtol=4e-3, atol=1.6e-2),
                     torch.bfloat16: dict(rtol=1.6e-2, atol=6.4e-2)}

# Rows below, at and above the SIMD widths; inner > 1 for every dim but the last.
SHAPES = [(7,), (3, 16), (5, 17), (2, 3, 33), (64, 10), (4, 1000), (2, 5, 4, 3), (0, 4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_log_softmax_every_dim_matches_native(shape, dtype, device):
    x = (3 * torch.randn(shape)).to(device=device, dtype=dtype)
    for dim in range(-len(shape), len(shape)):
        x_a = x.clone().requires_grad_()
        x_e = x.clone().requires_grad_()
        actual, expected = F.log_softmax(x_a, dim), TF.log_softmax(x_e, dim)
        tol = REDUCED_TOLERANCE.get(dtype, {})
        assert_close(actual, expected, **tol)
        grad = torch.randn(shape).to(device=device, dtype=dtype)
        assert_close(torch.autograd.grad(actual, x_a, grad)[0],
                     torch.autograd.grad(expected, x_e, grad)[0], **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_log_softmax_special_values(device):
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("nan"), 0.0, 1.0],
                      [float("-inf")] * 3, [1e30, -1e30, 0.0]], device=device)
    assert_close(F.log_softmax(x, 1), TF.log_softmax(x, 1), equal_nan=True)


def test_log_softmax_noncontiguous_scalar_and_dtype_argument():
    x = torch.randn(6, 8).t()
    assert_close(F.log_softmax(x, 0), TF.log_softmax(x, 0))
    s = torch.tensor(2.5)
    assert_close(F.log_softmax(s, 0), TF.log_softmax(s, 0))
    half = torch.randn(4, 9).half()
    assert_close(F.log_softmax(half, 1, dtype=torch.float32),
                 TF.log_softmax(half, 1, dtype=torch.float32))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        F.log_softmax(torch.randn(3, 4))


def test_log_softmax_gradcheck_and_gradgradcheck():
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    for dim in (0, 1, 2):
        assert torch.autograd.gradcheck(lambda t: F.log_softmax(t, dim), (x,))
        assert torch.autograd.gradgradcheck(lambda t: F.log_softmax(t, dim), (x,))


def native_nll(x, target, reduction, ignore_index):
    return TF.nll_loss(TF.log_softmax(x, 1), target, reduction=reduction,
                       ignore_index=ignore_index)


# Rows shorter than a SIMD vector run a vector of rows at a time (the seed network's
# (64, 10)); the others a row at a time: classes just below, at and above a vector's
# 8 / 16 lanes, row counts that leave a partial group.
NLL_SHAPES = [(64, 10), (7, 33), (1, 1), (130, 1000), (17, 15), (33, 16), (19, 7), (5, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows,classes", NLL_SHAPES)
def test_log_softmax_nll_loss_matches_native(rows, classes, reduction, dtype, device):
    x = (3 * torch.randn(rows, classes)).to(device=device, dtype=dtype)
    target = torch.randint(0, classes, (rows,), device=device)
    target[::5] = -100  # ignored rows
    x_a, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    actual = F.log_softmax_nll_loss(x_a, target, reduction)
    expected = native_nll(x_e, target, reduction, -100)
    tol = REDUCED_TOLERANCE.get(dtype, {})
    assert_close(actual, expected, equal_nan=True, **tol)
    grad = torch.rand_like(expected)
    assert_close(torch.autograd.grad(actual, x_a, grad)[0],
                 torch.autograd.grad(expected, x_e, grad)[0], **tol)


def test_log_softmax_nll_loss_unbatched_and_all_ignored():
    x = torch.randn(10)
    t = torch.tensor(3)
    assert_close(F.log_softmax_nll_loss(x, t), TF.cross_entropy(x, t))
    x2 = torch.randn(4, 5)
    ignored = torch.full((4,), -100)
    assert_close(F.log_softmax_nll_loss(x2, ignored), TF.cross_entropy(x2, ignored),
                 equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_log_softmax_nll_loss_none_takes_any_gradient_stride(device):
    # loss.sum() hands the per-row losses an expanded (stride 0) gradient.
    x = torch.randn(20, 6, device=device)
    t = torch.randint(0, 6, (20,), device=device)
    t[3] = -100
    x_a, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.log_softmax_nll_loss(x_a, t, "none").sum().backward()
    native_nll(x_e, t, "none", -100).sum().backward()
    assert_close(x_a.grad, x_e.grad)
    strided = torch.randn(40, device=device)[::2]
    assert_close(torch.autograd.grad(F.log_softmax_nll_loss(x_a, t, "none"), x_a, strided)[0],
                 torch.autograd.grad(native_nll(x_e, t, "none", -100), x_e, strided)[0])


def test_log_softmax_nll_loss_ignored_rows_get_no_gradient():
    # Even a NaN upstream gradient leaves an ignored row's gradient at 0, as in torch.
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, -100, 2, 3])
    grad = torch.tensor([1.0, float("nan"), 2.0, 0.5])
    actual = torch.autograd.grad(F.log_softmax_nll_loss(x, t, "none"), x, grad)[0]
    expected = torch.autograd.grad(native_nll(x, t, "none", -100), x, grad)[0]
    assert_close(actual, expected)
    assert actual[1].eq(0).all()


def test_log_softmax_nll_loss_has_no_double_backward():
    x = torch.randn(3, 4, requires_grad=True)
    loss = F.log_softmax_nll_loss(x, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_log_softmax_nll_loss_backward_checks_grad_loss():
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])
    loss, lse = torch.ops.pyops.log_softmax_nll_loss(x, t, "none", -100)
    backward = torch.ops.pyops._log_softmax_nll_loss_backward
    with pytest.raises(RuntimeError, match=r"grad_loss of shape \(4,\)"):
        backward(torch.ones(3), x, t, lse, "none", -100)
    with pytest.raises(RuntimeError, match="grad_loss of one element"):
        backward(torch.ones(4), x, t, lse, "mean", -100)
    with pytest.raises(IndexError, match="target 9 is out of bounds for 5 classes"):
        backward(torch.ones(()), x, torch.tensor([0, 9, 2, 3]), lse, "sum", -100)
    # A gradient of another dtype is taken in input's.
    assert_close(backward(torch.ones((), dtype=torch.float64), x, t, lse, "mean", -100),
                 backward(torch.ones(()), x, t, lse, "mean", -100))


@pytest.mark.parametrize("classes", [10, 1000])
def test_log_softmax_nll_loss_bits_do_not_depend_on_thread_count(classes):
    # Enough rows for several parallel tasks; the loss is summed over blocks of rows
    # whose size depends on the shape only.
    rows = 40_000 // classes * 10
    x = 3 * torch.randn(rows, classes)
    t = torch.randint(0, classes, (rows,))
    t[::7] = -100
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            x_a = x.clone().requires_grad_()
            mean = F.log_softmax_nll_loss(x_a, t)
            results.append((mean, F.log_softmax_nll_loss(x, t, "none"),
                            torch.autograd.grad(mean, x_a)[0]))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)
    assert_close(results[0][0], native_nll(x, t, "mean", -100))


def test_log_softmax_nll_loss_gradcheck():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 2, 1, 1])
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda v: F.log_softmax_nll_loss(v, t, reduction), (x,))


def test_log_softmax_nll_loss_bad_input():
    x = torch.randn(4, 5)
    with pytest.raises(IndexError, match="target 7 is out of bounds for 5 classes"):
        F.log_softmax_nll_loss(x, torch.tensor([0, 7, 1, 2]))
    with pytest.raises(TypeError, match="target to have dtype int64"):
        F.log_softmax_nll_loss(x, torch.tensor([0.0, 1, 1, 2]))
    with pytest.raises(RuntimeError, match=r"target of shape \(4,\)"):
        F.log_softmax_nll_loss(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction to be 'mean', 'sum' or 'none'"):
        F.log_softmax_nll_loss(x, torch.tensor([0, 1, 1, 2]), "avg")
    with pytest.raises(RuntimeError, match=r"input of shape \(N, C\)"):
        F.log_softmax_nll_loss(torch.randn(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="input to have dtype float32"):
        F.log_softmax(torch.ones(3, dtype=torch.int64), 0)
    with pytest.raises(IndexError, match="out of range"):
        F.log_softmax(torch.randn(3, 4), 2)


def test_opcheck():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.pyops.log_softmax.default, (x, 1))
    y = TF.log_softmax(x.detach(), 1)
    torch.library.opcheck(torch.ops.pyops._log_softmax_backward.default,
                          (torch.randn_like(y).requires_grad_(), y.requires_grad_(), 1))
    x2 = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, 2, -100, 4, 5])
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(torch.ops.pyops.log_softmax_nll_loss.default,
                              (x2, t, reduction, -100))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(8, 10, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    fn = lambda x: F.log_softmax_nll_loss(x * 2, t) + F.log_softmax(x, 1).sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), fn(x))
    assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(fn(x), x)[0])


def test_module_is_drop_in():
    module, native = pyops.nn.LogSoftmax(1), torch.nn.LogSoftmax(1)
    assert isinstance(module, torch.nn.LogSoftmax) and repr(module) == repr(native)
    x = torch.randn(5, 7)
    assert_close(module(x), native(x))
