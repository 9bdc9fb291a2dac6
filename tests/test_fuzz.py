"""Property fuzzing against native PyTorch: for every public function of pyops.functional,
hypothesis draws shapes, layouts (transposed, sliced, channels_last, expanded), dtypes
(float32, float64, float16, bfloat16) and arguments, valid and invalid. Either torch and
pyops both raise, or pyops gives torch's result and gradients within the dtype's
tolerance. Fused pyops ops are compared with the native compositions they replace
(native_twins.NATIVE).

For float16 and bfloat16 the tolerance is measured against a float64 run of the native
op: pyops may differ from torch by the dtype's tolerance plus torch's own error (pyops
rounds once where torch sometimes rounds intermediates).

Examples are derandomized (a fixed seed): PYOPS_FUZZ_EXAMPLES (default 60 per op, see
tests/conftest.py) sets how many each op gets, e.g. `PYOPS_FUZZ_EXAMPLES=2000 python -m
pytest tests/test_fuzz.py` for the long run. The number run is printed at the end of the
session ("pyops fuzz: N examples").
"""

import math
import re
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import pyops.functional as F
from native_twins import NATIVE

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (atol, rtol); atol is scaled by the largest magnitude of the reference tensor, so sums
# of many terms are held to their size, not to that of their (possibly cancelled) result.
TOLERANCE = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-5),
             torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# Examples run, by outcome: "compared" (both gave a result) or "raised" (both raised).
# conftest.py reports them at the end of the session.
EXAMPLES_RUN = {"compared": 0, "raised": 0}


# ---- Tensors: shape, dtype, layout and values drawn, then built afresh for each side --


class Spec:
    """How to build one tensor argument: its logical shape, dtype, layout and values."""

    def __init__(self, shape, dtype, layout, seed, special, kind="float", high=None):
        self.shape, self.dtype, self.layout, self.seed = tuple(shape), dtype, layout, seed
        self.special, self.kind, self.high = special, kind, high

    def build(self, dtype=None):
        dtype = dtype or self.dtype
        generator = torch.Generator().manual_seed(self.seed)
        if self.kind == "index":  # class indices in [low, high)
            low, high = self.high
            return torch.randint(low, high, self.shape, generator=generator)
        shape = self.shape
        if self.layout == "expanded":
            # Size 1 along the first dim of size > 1, expanded back: a stride-0 view.
            dim = next((d for d, n in enumerate(shape) if n > 1), None)
            if dim is not None:
                base = list(shape)
                base[dim] = 1
                values = torch.randn(base, generator=generator, dtype=torch.float64)
                return self._special(values).to(dtype).expand(shape)
        values = torch.randn(self._storage_shape(), generator=generator, dtype=torch.float64)
        values = self._special(values).to(dtype)
        if self.layout == "transposed" and len(shape) >= 2:
            return values.transpose(-1, -2)
        if self.layout == "sliced" and len(shape) >= 1:
            return values[..., ::2]
        if self.layout == "channels_last" and len(shape) == 4:
            return values.contiguous(memory_format=torch.channels_last)
        return values

    def _storage_shape(self):
        shape = list(self.shape)
        if self.layout == "transposed" and len(shape) >= 2:
            shape[-1], shape[-2] = shape[-2], shape[-1]
        elif self.layout == "sliced" and len(shape) >= 1:
            shape[-1] = 2 * shape[-1]
        return shape

    def _special(self, values):
        if self.special is not None and values.numel() > 0:
            values.view(-1)[values.numel() // 2] = self.special
        return values

    def __repr__(self):
        extra = f", special={self.special}" if self.special is not None else ""
        extra += f", high={self.high}" if self.kind == "index" else ""
        return f"Spec({list(self.shape)}, {self.dtype}, {self.layout!r}, seed={self.seed}{extra})"


LAYOUTS = ["contiguous", "transposed", "sliced", "channels_last", "expanded"]


@st.composite
def tensors(draw, shape, dtype, layouts=LAYOUTS, specials=True):
    layout = draw(st.sampled_from(layouts))
    special = draw(st.sampled_from([None] * 6 + [math.nan, math.inf, -math.inf])) if specials else None
    return Spec(shape, dtype, layout, draw(st.integers(0, 2 ** 31 - 1)), special)


def dims(low=0, high=5):
    return st.integers(low, high)


# ---- One strategy per public function: its arguments, valid and invalid --------------


@st.composite
def unary(draw):
    # In place, an expanded input is refused by both (torch's internal-overlap error).
    shape = draw(st.lists(dims(), min_size=0, max_size=4))
    return dict(input=draw(tensors(shape, draw(st.sampled_from(FLOATS)))))


@st.composite
def leaky(draw):
    slope = draw(st.sampled_from([0.01, 0.2, -0.5, 0.0, 1.5]))
    return dict(draw(unary()), negative_slope=slope)


@st.composite
def bias_act_call(draw):
    dtype = draw(st.sampled_from(FLOATS))
    # At least (N, C): a 1-D input is a documented refusal (tests/test_contract.py).
    shape = draw(st.lists(dims(), min_size=2, max_size=4))
    channels = shape[1]
    # A wrong bias size, except where the native composition would broadcast it (a
    # documented pyops refusal, tests/test_contract.py).
    bias_size = channels if channels <= 1 else draw(st.sampled_from([channels] * 2 + [channels + 2]))
    return dict(input=draw(tensors(shape, dtype)),
                bias=draw(tensors([bias_size], dtype, ["contiguous", "sliced"])),
                activation=draw(st.sampled_from(["none", "relu", "leaky_relu", "sigmoid",
                                                 "tanh", None, "gelu"])),
                negative_slope=draw(st.sampled_from([0.01, -0.3])))


def _pair_or_int(values):
    return st.one_of(values, st.tuples(values, values))


def _corrupt(draw, call, corruptions):
    """One call in four gets one invalid argument (the others stay valid), so that both
    the error paths and the results are fuzzed."""
    if draw(st.integers(0, 3)) == 3:  # not 0: hypothesis draws its simplest value often
        name, value = draw(st.sampled_from(corruptions))
        call[name] = value(call) if callable(value) else value
    return call


def _extent(kernel, dilation):
    return dilation * (kernel - 1) + 1


def _pairs(draw, low, high, square):
    """A (height, width) pair of ints in [low, high]; equal ones when `square` (then
    passed as one int)."""
    first = draw(st.integers(low, high))
    return (first, first) if square else (first, draw(st.integers(low, high)))


def _arg(pair, square):
    return pair[0] if square else pair


@st.composite
def conv_call(draw, transposed=False, fused=False):
    dtype = draw(st.sampled_from(FLOATS))
    groups = draw(st.integers(1, 3))
    in_per_group, out_per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    square = draw(st.booleans())  # int arguments, or (height, width) pairs
    kernel, stride = _pairs(draw, 1, 4, square), _pairs(draw, 1, 3, square)
    dilation, padding = _pairs(draw, 1, 2, square), _pairs(draw, 0, 2, square)
    if transposed:
        # output_padding < max(stride, dilation); sizes any (the output grows).
        output_padding = _pairs(draw, 0, max(max(stride), max(dilation)) - 1, square)
        output_padding = tuple(min(o, max(s, d) - 1)
                               for o, s, d in zip(output_padding, stride, dilation))
        spatial = _pairs(draw, 1, 6, square)
        # Padding that leaves an output of at least one row and column.
        padding = tuple(min(p, ((n - 1) * s + _extent(k, d) + o - 1) // 2) for p, n, s, k, d, o
                        in zip(padding, spatial, stride, kernel, dilation, output_padding))
        weight_shape = [in_per_group * groups, out_per_group, *kernel]
    else:
        # The padded input holds at least one dilated kernel.
        spatial = [draw(st.integers(max(1, _extent(k, d) - 2 * p), 8))
                   for k, d, p in zip(kernel, dilation, padding)]
        weight_shape = [out_per_group * groups, in_per_group, *kernel]
    batch = draw(st.integers(0, 2))
    unbatched = batch == 1 and draw(st.booleans())
    input_shape = ([] if unbatched else [batch]) + [in_per_group * groups, *spatial]
    out_channels = out_per_group * groups
    call = dict(
        input=draw(tensors(input_shape, dtype, specials=False)),
        weight=draw(tensors(weight_shape, dtype, specials=False)),
        bias=draw(st.one_of(st.none(), tensors([out_channels], dtype, ["contiguous", "sliced"],
                                               specials=False))),
        stride=_arg(stride, square), padding=_arg(padding, square and padding[0] == padding[1]),
        dilation=_arg(dilation, square), groups=groups,
    )
    if transposed:
        # (An output of size 0 or less is possible: both raise, or see stricter_than_torch.)
        call["output_padding"] = output_padding if not square or len(set(output_padding)) > 1 \
            else output_padding[0]
    elif max(stride) == 1 and draw(st.integers(0, 3)) == 0:
        call["padding"] = draw(st.sampled_from(["same", "valid"]))
    if fused:
        call["activation"] = draw(st.sampled_from(["relu", "leaky_relu", "sigmoid", "tanh",
                                                   "none"]))
        call["negative_slope"] = draw(st.sampled_from([0.01, -0.3]))
    channels = input_shape[-3]
    corruptions = [
        ("groups", 0), ("groups", -1), ("stride", 0), ("dilation", 0), ("padding", -1),
        ("input", lambda c: Spec(input_shape[:-3] + [channels + 1] + input_shape[-2:], dtype,
                                 "contiguous", 0, None)),
        ("weight", lambda c: Spec([0] + weight_shape[1:], dtype, "contiguous", 0, None)),
        ("weight", lambda c: Spec(weight_shape[:2] + [9, 9], dtype, "contiguous", 0, None)),
        ("bias", lambda c: Spec([out_channels + 1], dtype, "contiguous", 0, None)),
        ("padding", "full"),
    ]
    if transposed:
        corruptions += [("output_padding", max(max(stride), max(dilation)))]
    else:
        corruptions += [("padding", "same") if max(stride) > 1 else ("stride", (1, 1, 1))]
    return _corrupt(draw, call, corruptions)


@st.composite
def pool_call(draw, kind):
    dtype = draw(st.sampled_from(FLOATS))
    square = draw(st.booleans())  # int arguments, or (height, width) pairs
    kernel = _pairs(draw, 1, 4, square)
    dilation = (1, 1) if kind == "avg" else _pairs(draw, 1, 2, square)
    padding = tuple(min(p, k // 2) for p, k in zip(_pairs(draw, 0, 2, square), kernel))
    spatial = [draw(st.integers(max(1, _extent(k, d) - 2 * p), 8))
               for k, d, p in zip(kernel, dilation, padding)]
    shape = ([draw(st.integers(0, 2))] if draw(st.booleans()) else []) + [
        draw(st.integers(1, 3)), *spatial]
    call = dict(input=draw(tensors(shape, dtype)), kernel_size=_arg(kernel, square),
                stride=draw(st.one_of(st.none(), _pair_or_int(st.integers(1, 3)))),
                padding=_arg(padding, square), ceil_mode=draw(st.booleans()))
    corruptions = [("kernel_size", 0), ("kernel_size", (2, 2, 2)), ("stride", 0), ("stride", -1),
                   ("padding", -1), ("padding", 3),
                   ("input", lambda c: Spec(shape[:-3] + [0] + shape[-2:], dtype,
                                            "contiguous", 0, None)),
                   ("input", lambda c: Spec(shape[-2:], dtype, "contiguous", 0, None))]
    if kind == "avg":
        call["count_include_pad"] = draw(st.booleans())
        call["divisor_override"] = draw(st.sampled_from([None, None, 3, -2]))
        corruptions.append(("divisor_override", 0))
    else:
        call["dilation"] = _arg(dilation, square)
        if kind in ("max", "min"):
            call["return_indices"] = draw(st.booleans())
        corruptions.append(("dilation", 0))
    call = _corrupt(draw, call, corruptions)
    if kind != "avg":
        # torch's max_pool2d backward writes out of bounds for a window wholly in the
        # padding: tests/test_contract.py checks those against another reference.
        assume(not _has_window_in_padding(call["input"].shape, call))
    return call


@st.composite
def dropout_call(draw):
    p = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0, -0.1, 1.1]))
    return dict(draw(unary()), p=p, training=draw(st.booleans()),
                inplace=draw(st.booleans()))


@st.composite
def linear_call(draw, fused=False):
    dtype = draw(st.sampled_from(FLOATS))
    in_features, out_features = draw(dims()), draw(dims())
    leading = draw(st.lists(dims(), min_size=0, max_size=3))
    given_in = draw(st.sampled_from([in_features] * 4 + [in_features + 1]))
    call = dict(input=draw(tensors(leading + [given_in], dtype)),
                weight=draw(tensors([out_features, in_features], dtype)),
                bias=draw(st.one_of(st.none(), tensors([out_features], dtype, ["contiguous",
                                                                                "sliced"]))))
    if fused:
        call["activation"] = draw(st.sampled_from(["relu", "leaky_relu", "sigmoid", "tanh",
                                                   "none", None]))
        call["negative_slope"] = draw(st.sampled_from([0.01, -0.3]))
    return call


def _has_window_in_padding(shape, call):
    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)
    kernel, padding, dilation = (pair(call[k]) for k in ("kernel_size", "padding", "dilation"))
    stride = kernel if call["stride"] is None else pair(call["stride"])
    for d in range(2):
        size, k, s, p, dil = shape[-2 + d], kernel[d], stride[d], padding[d], dilation[d]
        if min(k, s, dil) <= 0 or p < 0:
            return False  # both raise
        out = (size + 2 * p - dil * (k - 1) - 1 + (s - 1 if call["ceil_mode"] else 0)) // s + 1
        if call["ceil_mode"] and (out - 1) * s >= size + p:
            out -= 1
        for o in range(max(out, 0)):
            if all(not 0 <= o * s - p + t * dil < size for t in range(k)):
                return True
    return False


@st.composite
def log_softmax_call(draw):
    dtype = draw(st.sampled_from(FLOATS))
    shape = draw(st.lists(dims(), min_size=0, max_size=4))
    dim = draw(st.integers(-len(shape) - 1, len(shape)))
    call = dict(input=draw(tensors(shape, dtype)), dim=dim)
    if draw(st.integers(0, 3)) == 0:
        call["dtype"] = draw(st.sampled_from(FLOATS))
    return call


@st.composite
def nll_call(draw):
    dtype = draw(st.sampled_from(FLOATS))
    batch, classes = draw(st.integers(0, 5)), draw(st.integers(1, 6))
    unbatched = draw(st.integers(0, 4)) == 0
    ignore_index = draw(st.sampled_from([-100, 0, 2]))
    # Mostly valid class indices; sometimes one out of bounds, sometimes ignored rows.
    low, high = draw(st.sampled_from([(0, classes)] * 4 + [(-1, classes + 1), (-100, -99)]))
    target_shape = [] if unbatched else [batch]
    target = Spec(target_shape, torch.int64, "contiguous", draw(st.integers(0, 2 ** 31 - 1)),
                  None, kind="index", high=(low, high))
    return dict(input=draw(tensors(([] if unbatched else [batch]) + [classes], dtype)),
                target=target, reduction=draw(st.sampled_from(["mean", "sum", "none", "avg"])),
                ignore_index=ignore_index)


STRATEGIES = {
    "relu": unary(),
    "relu_": unary(),
    "leaky_relu": leaky(),
    "leaky_relu_": leaky(),
    "sigmoid": unary(),
    "tanh": unary(),
    "bias_act": bias_act_call(),
    "conv2d": conv_call(),
    "conv_transpose2d": conv_call(transposed=True),
    "conv2d_bias_act": conv_call(fused=True),
    "dropout": dropout_call(),
    "linear": linear_call(),
    "linear_act": linear_call(fused=True),
    "max_pool2d": pool_call("max"),
    "min_pool2d": pool_call("min"),
    "avg_pool2d": pool_call("avg"),
    "relu_max_pool2d": pool_call("relu_max"),
    "log_softmax": log_softmax_call(),
    "log_softmax_nll_loss": nll_call(),
}

INPLACE = {"relu_", "leaky_relu_"}


def test_every_public_function_has_a_strategy():
    missing = sorted(set(F.__all__) - set(STRATEGIES))
    assert not missing, f"add a strategy to STRATEGIES in tests/test_fuzz.py for: {missing}"
    missing = sorted(set(F.__all__) - set(NATIVE))
    assert not missing, f"add their native twins to NATIVE in tests/native_twins.py: {missing}"


# ---- Running both sides -----------------------------------------------------------------


def _build(call, dtype=None):
    """Fresh tensors for one call; `dtype` upcasts every floating tensor (the reference)."""
    return {k: v.build(dtype if v.kind == "float" else None) if isinstance(v, Spec) else v
            for k, v in call.items()}


def _run(fn, kwargs, grad):
    """(result, grads) or the exception raised. Gradients of every floating tensor
    argument, for one seeded upstream gradient of the first output."""
    torch.manual_seed(0)  # dropout's mask: the same draw on both sides
    leaves = []
    if grad:
        for value in kwargs.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                leaf = value.detach().requires_grad_()
                leaves.append(leaf)
        it = iter(leaves)
        kwargs = {k: next(it) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn(**kwargs)
            out = result[0] if isinstance(result, tuple) else result
            grads = None
            if leaves and out.requires_grad:
                upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64).to(out.dtype)
                grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
                grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
            return result, grads
    except Exception as error:  # noqa: BLE001  (any Python exception is an outcome)
        return error


def _tensors(result):
    return list(result) if isinstance(result, tuple) else [result]


def assert_close_to_torch(mine, native, reference, what, computed_in=None):
    """`mine` matches torch's `native` (same dtype): same shape, dtype, NaN and inf, and
    finite values within the tolerance of the dtype they were computed in (their own, or
    `computed_in` where lower) of the float64 `reference`, plus torch's own error there."""
    assert mine.shape == native.shape and mine.dtype == native.dtype, (
        f"{what}: {mine.dtype}{list(mine.shape)} != {native.dtype}{list(native.shape)}")
    if not native.is_floating_point():  # indices
        assert torch.equal(mine, native), f"{what}: indices differ"
        return
    atol, rtol = max(TOLERANCE[native.dtype], TOLERANCE.get(computed_in, (0.0, 0.0)))
    mine, native = mine.detach().double(), native.detach().double()
    reference = reference.detach().double()
    assert torch.equal(mine.isnan(), native.isnan()), f"{what}: NaN in other places than torch"
    infinite = native.isinf()
    assert torch.equal(mine.isinf(), infinite) and torch.equal(mine[infinite], native[infinite]), (
        f"{what}: inf in other places than torch")
    finite = native.isfinite() & reference.isfinite()
    if not finite.any():
        return
    ref, got, theirs = reference[finite], mine[finite], native[finite]
    allowed = atol * max(1.0, ref.abs().max().item()) + rtol * ref.abs() + (theirs - ref).abs()
    error = (got - ref).abs()
    worst = (error - allowed).argmax()
    assert (error <= allowed).all(), (
        f"{what}: pyops {got[worst].item()}, torch {theirs[worst].item()}, "
        f"float64 {ref[worst].item()}")


def _dtype_of(call):
    specs = [v for v in call.values() if isinstance(v, Spec) and v.kind == "float"]
    return specs[0].dtype if specs else torch.float32


def stricter_than_torch(name, call, error):
    """pyops raises where torch gives a result, as the README's bad-input contract says
    (and tests/test_contract.py checks): torch skips some of its convolution checks when
    the batch is empty (dilation, output_padding, the output size), and returns an empty
    tensor or raises for a transposed convolution's output of size 0 depending on the
    batch size. pyops checks its arguments whatever the batch."""
    message = str(error)
    if not name.startswith("conv") or not message.startswith(f"pyops.{name}: "):
        return False
    size = re.search(r"the output size (-?\d+) x (-?\d+)", message)
    if size and 0 in (int(size[1]), int(size[2])):
        return True
    return call["input"].shape[:1] == (0,)


def check_against_native(name, call):
    grad = name not in INPLACE and not call.get("inplace", False)
    mine = _run(getattr(F, name), _build(call), grad)
    native = _run(NATIVE[name], _build(call), grad)
    if isinstance(native, Exception) or isinstance(mine, Exception):
        both = isinstance(native, Exception) and isinstance(mine, Exception)
        assert both or stricter_than_torch(name, call, mine), (
            f"torch: {native!r:.300}\npyops: {mine!r:.300}")
        EXAMPLES_RUN["raised"] += 1
        return
    EXAMPLES_RUN["compared"] += 1
    computed_in = call.get("dtype")  # log_softmax(dtype=): computed in that dtype
    reference = native
    if _dtype_of(call) != torch.float64:
        reference = _run(NATIVE[name], _build(call, torch.float64), grad)
        assert not isinstance(reference, Exception), f"float64 reference raised {reference!r}"
    for i, (a, b, r) in enumerate(zip(_tensors(mine[0]), _tensors(native[0]),
                                      _tensors(reference[0]))):
        assert_close_to_torch(a, b, r, f"result {i}", computed_in)
    assert (mine[1] is None) == (native[1] is None), "gradients"
    if native[1] is not None:
        for i, (a, b, r) in enumerate(zip(mine[1], native[1], reference[1])):
            assert_close_to_torch(a, b, r, f"gradient {i}", computed_in)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_matches_native(name):
    @given(call=STRATEGIES[name])
    def fuzz(call):
        check_against_native(name, call)

    fuzz()
