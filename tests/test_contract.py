"""The bad-input contract (README, "Bad-input contract") for every public function of
pyops.functional, every module of pyops.nn and every optimizer of pyops.optim.

Every case runs pyops and its native twin (torch.nn.functional, torch, torch.nn,
torch.optim, or for a fused pyops op the native composition it replaces) in this process
on the same inputs, and expects one of:

- SAME: torch gives a result and pyops gives the same one: values (NaN and inf in the
  same places), dtype, shape, the tensors it writes (out=, in place), and gradients.
- LIKE_TORCH(words): whatever torch does; where torch raises, pyops raises too, with
  each of `words` in its message.
- Raises(error, words, torch): pyops raises exactly `error` (a type, or a tuple of them),
  its message holding each of `words` (the argument, what was expected, what came).
  `torch` says what torch does there, and is checked: "raises", "accepts" (a documented
  pyops refusal: e.g. integer dtypes, or a meta tensor mixed with CPU ones, where torch
  returns uninitialized data) or "any" (generated rows, whose torch outcome varies by op).

The generated rows (dtypes, devices, sparse, NaN/inf, all-meta) come from each op's valid call,
so a new op needs only its entry in FUNCTIONAL (a test fails without one).
"""

import dataclasses
import math
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as TF

import pyops
import pyops.functional as F
from native_twins import (NATIVE, as_pair, native_conv2d_zero_padded,
                          native_conv_transpose2d_cropped, native_dropout, native_min_pool2d)

# ---- Expectations -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Expect:
    kind: str  # "same", "like_torch" or "raises"
    error: type = None
    words: tuple = ()
    torch: str = "raises"


SAME = Expect("same")


def LIKE_TORCH(*words):
    return Expect("like_torch", words=words)


def Raises(error, *words, torch="raises"):
    assert torch in ("raises", "accepts", "any")
    return Expect("raises", error, words, torch)


# dtypes pyops refuses, with the name its (C++) messages give them.
BAD_DTYPES = {torch.int64: "Long", torch.int32: "Int", torch.bool: "Bool",
              torch.complex64: "ComplexFloat"}


# ---- Lazy arguments: built after seeding, once for torch and once for pyops ------------


@dataclasses.dataclass(frozen=True)
class Lazy:
    make: Callable[[], Any]


def randn(*shape, dtype=torch.float32, device="cpu"):
    return Lazy(lambda: torch.randn(shape, dtype=dtype, device=device))


def lazy(fn):
    return Lazy(fn)


def resolve(arguments):
    return {k: v.make() if isinstance(v, Lazy) else v for k, v in arguments.items()}


def replace(name, fn):
    """A transform of the resolved arguments: `name` becomes fn(its value), e.g. a view."""
    def transform(kwargs):
        kwargs[name] = fn(kwargs[name])
    return transform


# ---- Running one call on both sides and comparing -------------------------------------


@dataclasses.dataclass
class Outcome:
    error: BaseException = None
    result: Any = None
    arguments: dict = None
    grads: list = None


def _floating(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _first_tensor(result):
    if isinstance(result, (tuple, list)):
        return result[0] if result else None
    return result


def run(fn, arguments, transforms=(), grad=True, seed=0):
    """fn(**arguments) after seeding; with `grad`, floating leaf arguments require grad
    and the gradients of a seeded random upstream gradient are computed."""
    torch.manual_seed(seed)
    kwargs = resolve(arguments)
    for transform in transforms:
        transform(kwargs)
    leaves = []
    if grad:
        for value in kwargs.values():
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if _floating(t) and t.is_leaf and not t.requires_grad:
                    t.requires_grad_()
                    leaves.append(t)
    outcome = Outcome(arguments=kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations torch warns about, on both sides
            outcome.result = fn(**kwargs)
            out = _first_tensor(outcome.result)
            if (leaves and isinstance(out, torch.Tensor) and out.requires_grad
                    and out.device.type != "meta"):
                torch.manual_seed(seed + 1)
                upstream = torch.randn(out.shape, dtype=out.dtype)
                grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
                outcome.grads = [torch.zeros_like(x) if g is None else g
                                 for x, g in zip(leaves, grads)]
    except Exception as error:  # noqa: BLE001  (any Python exception is an outcome)
        outcome.error = error
    return outcome


_TOLERANCES = {torch.float64: dict(rtol=1e-7, atol=1e-7), torch.float32: dict(rtol=1e-4, atol=1e-4),
               torch.float16: dict(rtol=2e-3, atol=1e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def assert_same_tensor(actual, expected, what):
    assert isinstance(actual, torch.Tensor) == isinstance(expected, torch.Tensor), what
    if not isinstance(expected, torch.Tensor):
        assert actual == expected, what
        return
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.device.type == "meta":
        return
    # Behaviour, not precision (the family tests check that): loose float tolerances,
    # but NaN and inf must sit where torch has them.
    tolerance = _TOLERANCES.get(expected.dtype, {})
    torch.testing.assert_close(actual.detach(), expected.detach(), equal_nan=True,
                               msg=lambda m: f"{what}: {m}", **tolerance)


def assert_same(mine, native, what):
    if isinstance(native, (tuple, list)):
        assert isinstance(mine, (tuple, list)) and len(mine) == len(native), what
        for i, (a, b) in enumerate(zip(mine, native)):
            assert_same(a, b, f"{what}[{i}]")
    elif isinstance(native, dict):
        assert mine.keys() == native.keys(), what
        for k in native:
            assert_same(mine[k], native[k], f"{what}.{k}")
    else:
        assert_same_tensor(mine, native, what)


def _describe(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def check(expect, mine, native):
    """Hold pyops' outcome `mine` and torch's `native` to the expectation."""
    if expect.kind == "raises":
        errors = expect.error if isinstance(expect.error, tuple) else (expect.error,)
        assert mine.error is not None, f"pyops did not raise {expect.error}"
        assert type(mine.error) in errors, f"pyops raised {_describe(mine.error)}"
        message = str(mine.error)
        for word in expect.words:
            assert word in message, f"{word!r} not in pyops' message: {message}"
        if expect.torch == "raises":
            assert native.error is not None, "torch accepts this case: the row should say so"
        elif expect.torch == "accepts":
            assert native.error is None, f"torch raises here: {_describe(native.error)}"
        return
    if native.error is not None:
        assert expect.kind == "like_torch", f"torch raises here: {_describe(native.error)}"
        assert mine.error is not None, (
            f"torch raises {_describe(native.error)}, pyops returns a result")
        message = str(mine.error)
        for word in expect.words:
            assert word in message, f"{word!r} not in pyops' message: {message}"
        return
    assert mine.error is None, (
        f"pyops raised {_describe(mine.error)} where torch gives a result")
    assert_same(mine.result, native.result, "result")
    # What was written: out= and in-place arguments (and nothing else changed).
    for name, value in native.arguments.items():
        if isinstance(value, torch.Tensor):
            assert_same_tensor(mine.arguments[name], value, f"argument {name} after the call")
    assert (mine.grads is None) == (native.grads is None), "gradients"
    if native.grads is not None:
        for i, (a, b) in enumerate(zip(mine.grads, native.grads)):
            assert_same_tensor(a, b, f"gradient {i}")


# ---- pyops.functional: one valid call per public function ------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    """A public function's valid call; its native twin is native_twins.NATIVE[name]."""

    valid: dict  # a valid call, by argument name (Lazy tensors)
    inplace: bool = False  # mutates its input: no gradients, in-place rules apply
    # Overrides for the NaN/inf rows. Convolutions take no padding there: where an inf or
    # NaN weight meets the zero padding, torch's answer depends on its kernel (see
    # native_conv2d_zero_padded); rows of their own cover padding.
    nonfinite: dict = dataclasses.field(default_factory=dict)


def _target(n, classes):
    return lazy(lambda: torch.randint(0, classes, (n,)))


_CONV = dict(input=randn(2, 4, 7, 8), weight=randn(6, 4, 3, 3), bias=randn(6), stride=1,
             padding=1, dilation=1, groups=1)
_CONV_T = dict(input=randn(2, 4, 5, 6), weight=randn(4, 3, 3, 3), bias=randn(3), stride=2,
               padding=1, output_padding=1, groups=1, dilation=1)
_POOL = dict(input=randn(2, 3, 7, 8), kernel_size=3, stride=2, padding=1, dilation=1,
             ceil_mode=False)

FUNCTIONAL = {
    "relu": Op(dict(input=randn(2, 5, 6))),
    "relu_": Op(dict(input=randn(2, 5, 6)), inplace=True),
    "leaky_relu": Op(dict(input=randn(2, 5, 6), negative_slope=0.2)),
    "leaky_relu_": Op(dict(input=randn(2, 5, 6), negative_slope=0.2), inplace=True),
    "sigmoid": Op(dict(input=randn(2, 5, 6))),
    "tanh": Op(dict(input=randn(2, 5, 6))),
    "bias_act": Op(dict(input=randn(2, 4, 5), bias=randn(4), activation="relu")),
    "conv2d": Op(_CONV, nonfinite=dict(padding=0)),
    "conv_transpose2d": Op(_CONV_T, nonfinite=dict(padding=0)),
    "conv2d_bias_act": Op(dict(_CONV, activation="relu"), nonfinite=dict(padding=0)),
    "dropout": Op(dict(input=randn(4, 50), p=0.5, training=True)),
    "linear": Op(dict(input=randn(3, 5), weight=randn(4, 5), bias=randn(4))),
    "linear_act": Op(dict(input=randn(3, 5), weight=randn(4, 5), bias=randn(4),
                          activation="tanh")),
    "max_pool2d": Op(_POOL),
    "min_pool2d": Op(_POOL),
    "avg_pool2d": Op(dict(input=randn(2, 3, 7, 8), kernel_size=3, stride=2, padding=1)),
    "relu_max_pool2d": Op(_POOL),
    "log_softmax": Op(dict(input=randn(3, 7), dim=1)),
    "log_softmax_nll_loss": Op(dict(input=randn(4, 6), target=_target(4, 6))),
}


def test_every_public_function_has_a_contract_entry():
    missing = sorted(set(F.__all__) - set(FUNCTIONAL))
    assert not missing, f"add these to FUNCTIONAL in tests/test_contract.py: {missing}"
    missing = sorted(set(F.__all__) - set(NATIVE))
    assert not missing, f"add their native twins to NATIVE in tests/native_twins.py: {missing}"
    assert set(FUNCTIONAL) <= set(F.__all__)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    name: str
    expect: Expect
    overrides: dict = dataclasses.field(default_factory=dict)
    transforms: tuple = ()
    grad: bool = None  # default: gradients unless the op works in place
    native: Callable = None  # default: the op's native twin

    @property
    def id(self):
        return f"{self.op}-{self.name}"


def _floating_arguments(op):
    torch.manual_seed(0)
    values = resolve(op.valid)
    return [k for k, v in values.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _tensor_arguments(op):
    torch.manual_seed(0)
    values = resolve(op.valid)
    return [k for k, v in values.items() if isinstance(v, torch.Tensor)]


def _to(dtype=None, device=None):
    return lambda t: t.to(dtype=dtype, device=device)


def _with_values(*values):
    """A copy of a tensor with `values` (NaN, inf) written at flat elements 0, 7, 14, ..."""
    def transform(t):
        t = t.clone()
        flat = t.view(-1)
        for i, v in enumerate(values):
            flat[(7 * i) % flat.numel()] = v
        return t
    return transform


def generated_cases():
    """Rows derived from each op's valid call: wrong dtypes for every floating argument,
    another argument's dtype, meta tensors mixed with CPU ones, everything on meta,
    NaN and inf in every floating argument."""
    cases = []
    for name, op in FUNCTIONAL.items():
        floating = _floating_arguments(op)
        tensors = _tensor_arguments(op)
        cases.append(Case(name, "valid", SAME))
        for arg in floating:
            for dtype, given in BAD_DTYPES.items():
                cases.append(Case(name, f"{arg}-{given}", Raises(
                    TypeError, arg, "float32, float64, float16 or bfloat16", given, torch="any"),
                    transforms=(replace(arg, _to(dtype)),)))
        # Layouts pyops has no kernels for: the dispatcher refuses them, naming the layout
        # (or, under autograd, a C++ check does first).
        cases.append(Case(name, f"{floating[0]}-sparse", Raises(
            (NotImplementedError, TypeError), "Sparse", torch="any"),
            transforms=(replace(floating[0], lambda t: t.to_sparse()),)))
        for arg in floating[1:]:
            cases.append(Case(name, f"{arg}-float64", Raises(
                TypeError, arg, f"dtype of {floating[0]} (Float)", "Double", torch="any"),
                transforms=(replace(arg, _to(torch.float64)),)))
        if len(tensors) > 1:
            for arg in tensors:
                # The first argument on meta makes the others the odd ones out.
                named = tensors[1] if arg == tensors[0] else arg
                cases.append(Case(name, f"{arg}-meta", Raises(
                    RuntimeError, named, "device", "meta", "cpu", torch="any"),
                    transforms=(replace(arg, _to(device="meta")),)))
        cases.append(Case(name, "all-meta", SAME, transforms=tuple(
            replace(arg, _to(device="meta")) for arg in tensors)))
        for arg in floating:
            for label, values in (("nan", (math.nan,)), ("inf", (math.inf, -math.inf)),
                                  ("nan-inf", (math.nan, math.inf, -math.inf))):
                cases.append(Case(name, f"{arg}-{label}", SAME, dict(op.nonfinite),
                                  transforms=(replace(arg, _with_values(*values)),)))
    return cases


def _expanded(*shape):
    return lazy(lambda: torch.randn(1).expand(*shape))


def _out_overlapping_input(kwargs):
    """input and out: views of one buffer that partly overlap."""
    base = torch.randn(10)
    kwargs.update(input=base[:8], out=base[2:])


def _out_is_input(kwargs):
    kwargs["out"] = kwargs["input"]


def _requires_grad(kwargs):
    kwargs["input"].requires_grad_()


def _self_overlapping():
    """A 4 x 4 view of 10 elements whose rows overlap (not expanded: no zero stride)."""
    return lazy(lambda: torch.randn(10).as_strided((4, 4), (2, 1)))


def _gapped():
    """A 3 x 3 view with gaps between its rows: strided, but no element shared."""
    return lazy(lambda: torch.randn(20).as_strided((3, 3), (5, 2)))


def _leaf_view(*shape):
    return lazy(lambda: torch.randn(*shape, requires_grad=True)[..., :-1])


_T = lambda t: t.transpose(-1, -2)  # noqa: E731  (a non-contiguous view)
_CL = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731


def _activation_cases():
    cases = []
    for op in ("relu", "leaky_relu", "sigmoid", "tanh"):
        cases += [
            Case(op, "scalar", SAME, dict(input=randn())),
            Case(op, "empty", SAME, dict(input=randn(0))),
            Case(op, "empty-inner", SAME, dict(input=randn(2, 0, 3))),
            Case(op, "transposed", SAME, transforms=(replace("input", _T),)),
            Case(op, "expanded", SAME, dict(input=_expanded(3, 4, 5))),
            Case(op, "channels-last", SAME, dict(input=randn(2, 3, 4, 5)),
                 transforms=(replace("input", _CL),)),
        ]
    for op, kwargs in (("relu_", {}), ("leaky_relu_", {}), ("relu", {"inplace": True}),
                       ("leaky_relu", {"inplace": True})):
        tag = "inplace-" if kwargs else ""
        cases += [
            Case(op, f"{tag}transposed", SAME, dict(kwargs), (replace("input", _T),), grad=False),
            Case(op, f"{tag}empty", SAME, dict(kwargs, input=randn(0)), grad=False),
            Case(op, f"{tag}expanded", Raises(RuntimeError, "single memory location"),
                 dict(kwargs, input=_expanded(3, 4)), grad=False),
            # torch applies the op again to elements its loop already wrote.
            Case(op, f"{tag}self-overlapping", Raises(RuntimeError, "input", "share memory",
                                                      "strides [2, 1]", torch="accepts"),
                 dict(kwargs, input=_self_overlapping()), grad=False),
            Case(op, f"{tag}gapped-view", SAME, dict(kwargs, input=_gapped()), grad=False),
            Case(op, f"{tag}leaf-requires-grad", Raises(RuntimeError, "leaf Variable"),
                 dict(kwargs), grad=True),
            Case(op, f"{tag}view-of-leaf", Raises(RuntimeError, "view of a leaf Variable"),
                 dict(kwargs, input=_leaf_view(3, 4)), grad=False),
        ]
    for op in ("leaky_relu", "leaky_relu_"):
        grad = op == "leaky_relu"
        for slope in (-0.5, 0.0, math.nan, math.inf, 1e30):
            cases.append(Case(op, f"slope={slope}", SAME, dict(negative_slope=slope), grad=grad))
        cases.append(Case(op, "slope=str", Raises(RuntimeError, "negative_slope", "float", "str"),
                          dict(negative_slope="0.1"), grad=grad))
    for op in ("sigmoid", "tanh"):
        out = lambda *shape, dtype=torch.float32, device="cpu": dict(  # noqa: E731
            out=lazy(lambda: torch.empty(*shape, dtype=dtype, device=device)))
        cases += [
            Case(op, "out", SAME, out(2, 5, 6), grad=False),
            Case(op, "out-transposed", SAME, out(2, 6, 5), (replace("out", _T),), grad=False),
            Case(op, "out-channels-last", SAME, dict(input=randn(2, 3, 4, 5), **out(2, 3, 4, 5)),
                 (replace("out", _CL),), grad=False),
            # torch resizes an out of another shape (with a deprecation warning).
            Case(op, "out-resized", SAME, out(7), grad=False),
            Case(op, "out-empty", SAME, out(0), grad=False),
            Case(op, "out-is-input", SAME, transforms=(_out_is_input,), grad=False),
            Case(op, "out-overlaps-input", Raises(RuntimeError, "single memory location"),
                 transforms=(_out_overlapping_input,), grad=False),
            Case(op, "out-expanded", Raises(RuntimeError, "single memory location"),
                 dict(out=_expanded(2, 5, 6)), grad=False),
            Case(op, "out-self-overlapping", Raises(RuntimeError, "out", "share memory",
                                                    torch="accepts"),
                 dict(input=randn(4, 4), out=_self_overlapping()), grad=False),
            Case(op, "out-gapped-view", SAME, dict(input=randn(3, 3), out=_gapped()),
                 grad=False),
            Case(op, "out-Long", Raises(TypeError, "out", "float32", "Long"),
                 out(2, 5, 6, dtype=torch.int64), grad=False),
            Case(op, "out-float64", Raises(TypeError, "out", "dtype of input (Float)", "Double",
                                           torch="accepts"),
                 out(2, 5, 6, dtype=torch.float64), grad=False),
            Case(op, "out-meta", Raises(RuntimeError, "out", "device", "meta", "cpu"),
                 out(2, 5, 6, device="meta"), grad=False),
            Case(op, "out-cpu-input-meta", Raises(RuntimeError, "out", "device", "meta", "cpu",
                                                  torch="any"),
                 dict(input=randn(2, 5, 6, device="meta"), **out(2, 5, 6)), grad=False),
            Case(op, "out-input-requires-grad", Raises(RuntimeError, "self", "requires grad"),
                 out(2, 5, 6), (_requires_grad,), grad=False),
        ]
    cases += [
        Case("bias_act", "bias-size", Raises(RuntimeError, "bias", "[4]", "[5]"),
             dict(bias=randn(5))),
        Case("bias_act", "bias-2d", Raises(RuntimeError, "bias", "[4]", "[4, 1]",
                                          torch="accepts"), dict(bias=randn(4, 1))),
        Case("bias_act", "input-1d", Raises(RuntimeError, "input", "at least 2 dims", "[4]",
                                           torch="accepts"), dict(input=randn(4))),
        Case("bias_act", "activation=gelu", Raises(ValueError, "activation", "gelu"),
             dict(activation="gelu")),
        Case("bias_act", "empty-batch", SAME, dict(input=randn(0, 4, 5))),
        Case("bias_act", "no-channels", SAME, dict(input=randn(2, 0, 5), bias=randn(0))),
        Case("bias_act", "channels-last", SAME, dict(input=randn(2, 4, 3, 5)),
             (replace("input", _CL),)),
        Case("bias_act", "expanded-input", SAME, dict(input=_expanded(2, 4, 5))),
        Case("bias_act", "strided-bias", SAME, dict(bias=lazy(lambda: torch.randn(8)[::2]))),
    ] + [Case("bias_act", f"activation={a}", SAME, dict(activation=a, negative_slope=-0.3))
         for a in ("none", None, "leaky_relu", "sigmoid", "tanh")]
    return cases


def _conv_cases():
    c, ct, ca = "conv2d", "conv_transpose2d", "conv2d_bias_act"
    huge = 2 ** 62
    cases = []
    for op in (c, ca):
        cases += [
            Case(op, "input-2d", Raises(RuntimeError, "input", "3-D (unbatched) or 4-D", "2-D"),
                 dict(input=randn(7, 8))),
            Case(op, "input-5d", Raises(RuntimeError, "input", "3-D (unbatched) or 4-D", "5-D"),
                 dict(input=randn(1, 2, 4, 7, 8))),
            Case(op, "weight-3d", Raises(RuntimeError, "weight", "4-D", "3-D"),
                 dict(weight=randn(6, 4, 3))),
            Case(op, "channels", Raises(RuntimeError, "input", "4 channels", "5 channels"),
                 dict(input=randn(2, 5, 7, 8))),
            Case(op, "groups-divide", Raises(RuntimeError, "groups=4", "weight", "divisible"),
                 dict(weight=randn(6, 1, 3, 3), groups=4)),
            Case(op, "groups=0", Raises(ValueError, "groups", "positive", "0"), dict(groups=0)),
            Case(op, "groups=-1", Raises(ValueError, "groups", "positive", "-1"), dict(groups=-1)),
            Case(op, "stride=0", Raises(ValueError, "stride", "positive", "0"), dict(stride=0)),
            Case(op, "stride=-1", Raises(ValueError, "stride", "positive", "-1"), dict(stride=-1)),
            Case(op, "stride-3-ints", Raises(ValueError, "stride", "2 ints", "[1, 1, 1]"),
                 dict(stride=(1, 1, 1))),
            Case(op, "stride-float", Raises(RuntimeError, "stride", "int", "float"),
                 dict(stride=1.5)),
            Case(op, "padding=-1", Raises(ValueError, "padding", "non-negative", "-1"),
                 dict(padding=-1)),
            Case(op, "dilation=0", Raises(ValueError, "dilation", "positive", "0"),
                 dict(dilation=0)),
            Case(op, "kernel-too-large", Raises(RuntimeError, "kernel", "larger than the padded "
                                                "input (2 x 2)"),
                 dict(input=randn(1, 4, 2, 2), padding=0)),
            Case(op, "input-height-0", Raises(RuntimeError, "kernel", "padded input (2 x 10)"),
                 dict(input=randn(2, 4, 0, 8))),
            Case(op, "weight-no-out-channels", Raises(RuntimeError, "weight", "zero-size",
                                                      "[0, 4, 3, 3]"),
                 dict(weight=randn(0, 4, 3, 3), bias=None)),
            # torch returns a result with 0 output channels here instead of 6.
            Case(op, "no-input-channels", Raises(RuntimeError, "weight", "zero-size",
                                                 "[6, 0, 3, 3]", torch="accepts"),
                 dict(input=randn(2, 0, 7, 8), weight=randn(6, 0, 3, 3))),
            Case(op, "weight-kernel-0", Raises(RuntimeError, "weight", "zero-size",
                                               "[6, 4, 0, 3]"),
                 dict(weight=randn(6, 4, 0, 3))),
            Case(op, "huge-padding", Raises(ValueError, "padding", "int64"),
                 dict(padding=huge)),
            Case(op, "huge-dilation", Raises(ValueError, "dilated kernel size", "int64"),
                 dict(dilation=huge)),
            Case(op, "huge-expanded-kernel", Raises(RuntimeError, "kernel", "larger"),
                 dict(weight=lazy(lambda: torch.randn(1, 1, 1, 1).expand(6, 4, 2 ** 40, 3)))),
            Case(op, "huge-stride", SAME, dict(stride=huge)),
            Case(op, "padding=same-strided", Raises(ValueError, "padding='same'", "strided"),
                 dict(padding="same", stride=2)),
            Case(op, "padding=full", Raises(ValueError, "padding", "full"), dict(padding="full")),
            Case(op, "bias-size", Raises(RuntimeError, "bias", "[6]", "[5]"), dict(bias=randn(5))),
            Case(op, "bias-2d", Raises(RuntimeError, "bias", "[6]", "[1, 6]"),
                 dict(bias=randn(1, 6))),
            Case(op, "padding=same", SAME, dict(padding="same")),
            Case(op, "padding=same-even-dilated", SAME,
                 dict(padding="same", weight=randn(6, 4, 2, 4), dilation=(3, 1))),
            Case(op, "padding=valid", SAME, dict(padding="valid")),
            Case(op, "no-bias", SAME, dict(bias=None)),
            Case(op, "empty-batch", SAME, dict(input=randn(0, 4, 7, 8))),
            # torch skips its dilation check when the batch is empty.
            Case(op, "empty-batch-dilation=0", Raises(ValueError, "dilation", "positive", "0",
                                                      torch="accepts"),
                 dict(input=randn(0, 4, 7, 8), dilation=0)),
            Case(op, "unbatched", SAME, dict(input=randn(4, 7, 8))),
            Case(op, "unbatched-same", SAME, dict(input=randn(4, 7, 8), padding="same")),
            Case(op, "channels-last", SAME, transforms=(replace("input", _CL),)),
            Case(op, "transposed-weight", SAME, transforms=(replace("weight", _T),)),
            Case(op, "expanded-input", SAME, dict(input=_expanded(2, 4, 7, 8))),
            Case(op, "expanded-weight", SAME, dict(weight=_expanded(6, 4, 3, 3))),
            Case(op, "groups=2", SAME, dict(weight=randn(6, 2, 3, 3), groups=2)),
            Case(op, "depthwise", SAME, dict(weight=randn(4, 1, 3, 3), bias=randn(4), groups=4)),
        ]
    # Inf and NaN with padding (the generated rows take none): as torch computes them on
    # the explicitly padded input (conv2d, where a non-finite weight meets the padding),
    # or without padding then cropped (conv_transpose2d, whose input and weight both meet
    # the cropped outputs' zero gradient). A non-finite conv2d input is as torch.
    for op, padded in ((c, native_conv2d_zero_padded), (ca, native_conv2d_zero_padded),
                       (ct, native_conv_transpose2d_cropped)):
        for arg in ("input", "weight"):
            for label, values in (("nan", (math.nan,)), ("inf", (math.inf, -math.inf))):
                native = None if (op, arg) in ((c, "input"), (ca, "input")) else padded
                cases.append(Case(op, f"{arg}-{label}-padded", SAME, native=native,
                                  transforms=(replace(arg, _with_values(*values)),)))
    cases += [
        Case(ca, "activation=gelu", Raises(ValueError, "activation", "gelu"),
             dict(activation="gelu")),
    ] + [Case(ca, f"activation={a}", SAME, dict(activation=a, negative_slope=-0.3))
         for a in ("none", None, "leaky_relu", "sigmoid", "tanh")]
    cases += [
        Case(ct, "output-padding-too-large", Raises(
            ValueError, "output_padding", "smaller than either stride or dilation", "[2, 2]"),
            dict(output_padding=2)),
        Case(ct, "output-padding=-1", Raises(ValueError, "output_padding", "non-negative"),
             dict(output_padding=-1)),
        Case(ct, "padding=-1", Raises(ValueError, "padding", "non-negative", "-1"),
             dict(padding=-1)),
        Case(ct, "padding=same", Raises(ValueError, "padding", "same"), dict(padding="same")),
        Case(ct, "stride=0", Raises(ValueError, "stride", "positive", "0"), dict(stride=0)),
        Case(ct, "dilation=0", Raises(ValueError, "dilation", "positive", "0"), dict(dilation=0)),
        Case(ct, "groups=0", Raises(ValueError, "groups", "positive", "0"), dict(groups=0)),
        Case(ct, "groups-divide", Raises(RuntimeError, "groups=3", "divisible"), dict(groups=3)),
        Case(ct, "channels", Raises(RuntimeError, "input", "4 channels", "5 channels"),
             dict(input=randn(2, 5, 5, 6))),
        Case(ct, "input-2d", Raises(RuntimeError, "input", "3-D (unbatched) or 4-D", "2-D"),
             dict(input=randn(5, 6))),
        Case(ct, "weight-3d", Raises(RuntimeError, "weight", "4-D", "3-D"),
             dict(weight=randn(4, 3, 3))),
        Case(ct, "output-too-small", Raises(RuntimeError, "output size", "too small"),
             dict(weight=randn(4, 3, 1, 1), padding=5, output_padding=0)),
        Case(ct, "input-height-0", Raises(RuntimeError, "input", "non-zero height and width",
                                         "[2, 4, 0, 6]"), dict(input=randn(2, 4, 0, 6))),
        Case(ct, "weight-no-out-channels", Raises(RuntimeError, "weight", "zero-size",
                                                  "[4, 0, 3, 3]"),
             dict(weight=randn(4, 0, 3, 3), bias=None)),
        Case(ct, "no-input-channels", Raises(RuntimeError, "weight", "zero-size",
                                             "[0, 3, 3, 3]"),
             dict(input=randn(2, 0, 5, 6), weight=randn(0, 3, 3, 3))),
        Case(ct, "huge-stride", Raises(ValueError, "stride", "int64"), dict(stride=2 ** 62)),
        Case(ct, "huge-dilation", Raises(ValueError, "dilated kernel size", "int64"),
             dict(dilation=2 ** 62)),
        Case(ct, "huge-padding", Raises(ValueError, "padding", "int64"), dict(padding=2 ** 62)),
        Case(ct, "bias-size", Raises(RuntimeError, "bias", "[3]", "[5]"), dict(bias=randn(5))),
        Case(ct, "empty-batch", SAME, dict(input=randn(0, 4, 5, 6))),
        # torch skips these checks when the batch is empty.
        Case(ct, "empty-batch-output-padding-too-large", Raises(
            ValueError, "output_padding", "smaller than either stride or dilation",
            torch="accepts"), dict(input=randn(0, 4, 5, 6), output_padding=2)),
        # torch returns an empty tensor for a 0 x 0 output with a batch of 2, and raises
        # with a batch of 1 (its kernels differ): pyops raises.
        Case(ct, "output-size-0", Raises(RuntimeError, "output size 0 x 0", "too small",
                                         torch="accepts"),
             dict(input=randn(2, 4, 4, 4), weight=randn(4, 3, 1, 1), stride=1, padding=2,
                  output_padding=0)),
        Case(ct, "empty-batch-output-too-small", Raises(
            RuntimeError, "output size", "too small", torch="accepts"),
            dict(input=randn(0, 4, 1, 2), weight=randn(4, 3, 1, 1), stride=1, padding=(0, 1),
                 output_padding=0)),
        Case(ct, "unbatched", SAME, dict(input=randn(4, 5, 6))),
        Case(ct, "groups=2", SAME, dict(weight=randn(4, 2, 3, 3), bias=randn(4), groups=2)),
        Case(ct, "dilation=2", SAME, dict(dilation=2, output_padding=0)),
        Case(ct, "channels-last", SAME, transforms=(replace("input", _CL),)),
        Case(ct, "expanded-input", SAME, dict(input=_expanded(2, 4, 5, 6))),
        Case(ct, "no-bias", SAME, dict(bias=None)),
    ]
    return cases


def _linear_cases():
    cases = []
    for op in ("linear", "linear_act"):
        cases += [
            Case(op, "input-scalar", Raises(RuntimeError, "input", "at least 1 dim", "scalar"),
                 dict(input=randn())),
            Case(op, "weight-1d", Raises(RuntimeError, "weight", "(out_features, in_features)",
                                         "[5]", torch="accepts"),
                 dict(weight=randn(5), bias=None)),
            Case(op, "weight-3d", Raises(RuntimeError, "weight", "(out_features, in_features)",
                                         "[4, 5, 1]"), dict(weight=randn(4, 5, 1))),
            Case(op, "in-features", Raises(RuntimeError, "input.size(-1) == 5", "[3, 6]"),
                 dict(input=randn(3, 6))),
            Case(op, "bias-size", Raises(RuntimeError, "bias", "[4]", "[5]"), dict(bias=randn(5))),
            # torch broadcasts the bias; pyops takes it as (out_features,) only.
            Case(op, "bias-broadcast", Raises(RuntimeError, "bias", "[4]", "[1]",
                                              torch="accepts"), dict(bias=randn(1))),
            Case(op, "bias-2d", Raises(RuntimeError, "bias", "[4]", "[1, 4]", torch="accepts"),
                 dict(bias=randn(1, 4))),
            Case(op, "no-in-features", SAME, dict(input=randn(3, 0), weight=randn(4, 0))),
            Case(op, "no-out-features", SAME, dict(weight=randn(0, 5), bias=randn(0))),
            Case(op, "empty-batch", SAME, dict(input=randn(0, 5))),
            Case(op, "empty-everything", SAME, dict(input=randn(0, 0), weight=randn(0, 0),
                                                    bias=randn(0))),
            Case(op, "input-1d", SAME, dict(input=randn(5))),
            Case(op, "input-4d", SAME, dict(input=randn(2, 3, 2, 5))),
            Case(op, "no-bias", SAME, dict(bias=None)),
            Case(op, "transposed-input", SAME, dict(input=randn(5, 3)),
                 (replace("input", _T),)),
            Case(op, "transposed-weight", SAME, dict(weight=randn(5, 4)),
                 (replace("weight", _T),)),
            Case(op, "expanded-input", SAME, dict(input=_expanded(3, 5))),
        ]
    cases += [
        Case("linear_act", "activation=gelu", Raises(ValueError, "activation", "gelu"),
             dict(activation="gelu")),
    ] + [Case("linear_act", f"activation={a}", SAME, dict(activation=a, negative_slope=-0.3))
         for a in ("none", None, "relu", "leaky_relu", "sigmoid")]
    return cases


def _pool_cases():
    cases = []
    for op in ("max_pool2d", "min_pool2d", "avg_pool2d", "relu_max_pool2d"):
        cases += [
            Case(op, "kernel=0", Raises(RuntimeError, "kernel_size", "greater than zero", "(0, 0)"),
                 dict(kernel_size=0)),
            Case(op, "kernel=-1", Raises(RuntimeError, "kernel_size", "greater than zero"),
                 dict(kernel_size=-1)),
            Case(op, "kernel-3-ints", Raises(RuntimeError, "kernel_size", "tuple of two ints",
                                             "[2, 2, 2]"), dict(kernel_size=(2, 2, 2))),
            Case(op, "kernel-float", Raises(RuntimeError, "kernel_size", "int", "float"),
                 dict(kernel_size=2.5)),
            Case(op, "huge-kernel", Raises(RuntimeError, "kernel_size", "at most 2147483647"),
                 dict(kernel_size=2 ** 40)),
            Case(op, "huge-stride", Raises(RuntimeError, "stride", "at most 2147483647"),
                 dict(stride=2 ** 40)),
            Case(op, "huge-padding", Raises(RuntimeError, "padding", "at most 2147483647"),
                 dict(padding=2 ** 62)),
            Case(op, "stride=0", Raises(RuntimeError, "stride", "zero", "(0, 0)"), dict(stride=0)),
            Case(op, "stride=-1", Raises(RuntimeError, "stride", "greater than zero"),
                 dict(stride=-1)),
            Case(op, "padding=-1", Raises(RuntimeError, "padding", "non-negative"),
                 dict(padding=-1)),
            Case(op, "padding-over-half", Raises(RuntimeError, "pad", "half"),
                 dict(kernel_size=2, padding=2)),
            Case(op, "output-too-small", Raises(RuntimeError, "input size", "output size",
                                                "too small"),
                 dict(input=randn(1, 1, 2, 2), padding=0)),
            Case(op, "input-2d", Raises(RuntimeError, "input", "3D", "4D", "2D"),
                 dict(input=randn(7, 8))),
            Case(op, "input-5d", Raises(RuntimeError, "input", "3D", "4D", "5D"),
                 dict(input=randn(1, 2, 3, 7, 8))),
            Case(op, "no-channels", Raises(RuntimeError, "input", "non-zero", "[2, 0, 7, 8]"),
                 dict(input=randn(2, 0, 7, 8))),
            Case(op, "height-0", Raises(RuntimeError, "input", "non-zero", "[2, 3, 0, 8]"),
                 dict(input=randn(2, 3, 0, 8))),
            Case(op, "empty-batch", SAME, dict(input=randn(0, 3, 7, 8))),
            Case(op, "unbatched", SAME, dict(input=randn(3, 7, 8))),
            Case(op, "channels-last", SAME, transforms=(replace("input", _CL),)),
            Case(op, "transposed", SAME, transforms=(replace("input", _T),)),
            Case(op, "expanded", SAME, dict(input=_expanded(2, 3, 7, 8))),
            Case(op, "ceil-mode", SAME, dict(ceil_mode=True)),
            Case(op, "stride=None", SAME, dict(stride=None)),
            Case(op, "rectangular", SAME, dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0))),
        ]
        if op != "avg_pool2d":
            cases += [
                Case(op, "dilation=0", Raises(RuntimeError, "dilation", "greater than zero"),
                     dict(dilation=0)),
                Case(op, "dilation=2", SAME, dict(dilation=2)),
            ]
        if op in ("max_pool2d", "min_pool2d"):
            cases += [Case(op, "return-indices", SAME, dict(return_indices=True)),
                      Case(op, "return-indices-empty", SAME,
                           dict(return_indices=True, input=randn(0, 3, 7, 8)))]
    # Windows wholly in the padding (the dilation steps over the input), NCHW with short
    # and with long rows (the scalar, gather and row kernels), and channels-last.
    for op, reduce in (("max_pool2d", "max"), ("min_pool2d", "min"),
                       ("relu_max_pool2d", "relu_max")):
        for label, shape, layout in (("short-rows", (2, 3, 1, 6), ()),
                                     ("long-rows", (1, 2, 1, 80), ()),
                                     ("columns", (1, 2, 9, 1), ()),
                                     ("channels-last", (2, 20, 1, 5), (replace("input", _CL),))):
            cases.append(Case(op, f"window-in-padding-{label}", SAME, dict(
                input=randn(*shape), kernel_size=2, stride=None, padding=1, dilation=2),
                layout, native=_padded_pool(reduce)))
    cases += [
        Case("avg_pool2d", "divisor=0", Raises(RuntimeError, "divisor_override", "not zero"),
             dict(divisor_override=0)),
        Case("avg_pool2d", "divisor=-3", SAME, dict(divisor_override=-3)),
        Case("avg_pool2d", "exclude-pad", SAME, dict(count_include_pad=False)),
        Case("avg_pool2d", "exclude-pad-ceil", SAME, dict(count_include_pad=False,
                                                          ceil_mode=True)),
    ]
    return cases


def _padded_pool(reduce):
    """torch's max pooling of the input padded explicitly with the reduction's identity (no
    padding argument): a window wholly in the padding gives -inf (+inf for min) and passes
    no gradient. The reference for such windows, where torch's own max_pool2d backward
    writes out of bounds (it corrupts memory), so it cannot be called."""
    def native(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        sign = -1.0 if reduce == "min" else 1.0
        x = TF.relu(input) if reduce == "relu_max" else input
        ph, pw = as_pair(padding)
        x = TF.pad(sign * x, (pw, pw, ph, ph), value=-math.inf)
        return sign * TF.max_pool2d(x, kernel_size, stride, 0, dilation, ceil_mode)
    return native


def _dropout_cases():
    d = "dropout"
    return [
        Case(d, "p=-0.1", Raises(ValueError, "probability", "between 0 and 1", "-0.1"),
             dict(p=-0.1)),
        Case(d, "p=1.5", Raises(ValueError, "probability", "between 0 and 1", "1.5"), dict(p=1.5)),
        Case(d, "p=nan", Raises(ValueError, "probability", "nan"), dict(p=math.nan)),
        Case(d, "p=1", SAME, dict(p=1.0)),
        Case(d, "p=1-nan", SAME, dict(p=1.0), (replace("input", _with_values(math.nan)),)),
        Case(d, "p=0", SAME, dict(p=0.0)),
        Case(d, "eval", SAME, dict(training=False)),
        Case(d, "eval-Long", SAME, dict(training=False, input=lazy(lambda: torch.ones(3).long()))),
        Case(d, "empty", SAME, dict(input=randn(0, 3))),
        Case(d, "scalar", SAME, dict(input=randn())),
        Case(d, "transposed", SAME, transforms=(replace("input", _T),)),
        Case(d, "inplace", SAME, dict(inplace=True), grad=False),
        Case(d, "inplace-transposed", SAME, dict(inplace=True), (replace("input", _T),),
             grad=False),
        Case(d, "inplace-nan", SAME, dict(inplace=True),
             (replace("input", _with_values(math.nan, math.inf)),), grad=False),
        Case(d, "inplace-expanded", Raises(RuntimeError, "single memory location"),
             dict(inplace=True, input=_expanded(3, 4)), grad=False),
        Case(d, "inplace-self-overlapping", Raises(RuntimeError, "input", "share memory",
                                                   torch="accepts"),
             dict(inplace=True, input=_self_overlapping()), grad=False),
        Case(d, "inplace-gapped-view", SAME, dict(inplace=True, input=_gapped()), grad=False),
        Case(d, "inplace-leaf-requires-grad", Raises(RuntimeError, "leaf Variable"),
             dict(inplace=True), grad=True),
    ]


def _softmax_cases():
    ls, nll = "log_softmax", "log_softmax_nll_loss"
    return [
        Case(ls, "dim=2", Raises(IndexError, "Dimension out of range", "dim in [-2, 1]",
                                 "got 2"), dict(dim=2)),
        Case(ls, "dim=-3", Raises(IndexError, "Dimension out of range", "dim in [-2, 1]",
                                  "got -3"), dict(dim=-3)),
        Case(ls, "dim=0", SAME, dict(dim=0)),
        Case(ls, "dim=-1", SAME, dict(dim=-1)),
        Case(ls, "dim=None", SAME, dict(dim=None)),
        Case(ls, "scalar", SAME, dict(input=randn(), dim=0)),
        Case(ls, "empty-rows", SAME, dict(input=randn(0, 7))),
        Case(ls, "empty-dim", SAME, dict(input=randn(3, 0))),
        Case(ls, "5d", SAME, dict(input=randn(2, 3, 1, 2, 4), dim=2)),
        Case(ls, "transposed", SAME, transforms=(replace("input", _T),)),
        Case(ls, "expanded", SAME, dict(input=_expanded(3, 7))),
        Case(ls, "dtype=float64", SAME, dict(dtype=torch.float64)),
        Case(ls, "Long-input-dtype=float32", SAME,
             dict(input=lazy(lambda: torch.arange(6).view(2, 3)), dtype=torch.float32), grad=False),
        Case(ls, "all-inf-row", SAME, transforms=(replace("input", lambda t: t.index_fill(
            0, torch.tensor([1]), -math.inf)),)),
        Case(nll, "target-out-of-bounds", Raises(IndexError, "target", "6", "out of bounds"),
             dict(target=lazy(lambda: torch.tensor([0, 6, 1, 2])))),
        Case(nll, "target=-1", Raises(IndexError, "target", "-1", "out of bounds"),
             dict(target=lazy(lambda: torch.tensor([0, -1, 1, 2])))),
        Case(nll, "target-Int", Raises(TypeError, "target", "int64", "Int"),
             dict(target=lazy(lambda: torch.tensor([0, 1, 1, 2], dtype=torch.int32)))),
        Case(nll, "target-Float", Raises(TypeError, "target", "int64", "Float"),
             dict(target=lazy(lambda: torch.tensor([0.0, 1, 1, 2])))),
        Case(nll, "target-length", Raises(RuntimeError, "target", "(4,)", "[3]"),
             dict(target=_target(3, 6))),
        Case(nll, "target-2d", Raises(RuntimeError, "target", "(4,)", "[4, 1]"),
             dict(target=lazy(lambda: torch.zeros(4, 1, dtype=torch.long)))),
        # torch also takes (N, C, d1, ...) inputs; the fused op takes (N, C) or (C,).
        Case(nll, "input-3d", Raises(RuntimeError, "input", "(N, C)", "[4, 6, 2]",
                                     torch="accepts"),
             dict(input=randn(4, 6, 2), target=lazy(lambda: torch.zeros(4, 2, dtype=torch.long)))),
        Case(nll, "reduction=avg", Raises(ValueError, "reduction", "avg"), dict(reduction="avg")),
        Case(nll, "no-classes", Raises(IndexError, "target", "out of bounds", "0 classes"),
             dict(input=randn(4, 0), target=lazy(lambda: torch.zeros(4, dtype=torch.long)))),
        Case(nll, "reduction=sum", SAME, dict(reduction="sum")),
        Case(nll, "reduction=none", SAME, dict(reduction="none")),
        Case(nll, "ignore-index", SAME, dict(target=lazy(lambda: torch.tensor([0, -100, 5, 2])))),
        Case(nll, "ignore-index=1", SAME, dict(ignore_index=1,
                                               target=lazy(lambda: torch.tensor([1, 1, 5, 2])))),
        Case(nll, "all-ignored", SAME, dict(target=lazy(lambda: torch.full((4,), -100)))),
        Case(nll, "all-ignored-no-classes", SAME,
             dict(input=randn(4, 0), target=lazy(lambda: torch.full((4,), -100)))),
        Case(nll, "empty-batch", SAME, dict(input=randn(0, 6), target=_target(0, 6))),
        Case(nll, "empty-batch-sum", SAME, dict(input=randn(0, 6), target=_target(0, 6),
                                                reduction="sum")),
        Case(nll, "unbatched", SAME, dict(input=randn(6), target=lazy(lambda: torch.tensor(3)))),
        Case(nll, "transposed", SAME, dict(input=randn(6, 4)), (replace("input", _T),)),
        Case(nll, "float16", SAME, dict(input=randn(4, 6, dtype=torch.float16))),
        Case(nll, "-inf-at-target", SAME, dict(target=lazy(lambda: torch.tensor([0, 1, 2, 3]))),
             (replace("input", lambda t: t.index_put((torch.tensor([1]), torch.tensor([1])),
                                                     torch.tensor(-math.inf))),)),
    ]


FUNCTIONAL_CASES = (generated_cases() + _activation_cases() + _conv_cases() + _linear_cases()
                    + _pool_cases() + _dropout_cases() + _softmax_cases())


@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=lambda case: case.id)
def test_functional(case):
    op = FUNCTIONAL[case.op]
    arguments = {**op.valid, **case.overrides}
    grad = (not op.inplace) if case.grad is None else case.grad
    mine = run(getattr(F, case.op), arguments, case.transforms, grad)
    native = run(case.native or NATIVE[case.op], arguments, case.transforms, grad)
    check(case.expect, mine, native)


# ---- pyops.nn: every module against its torch.nn twin -----------------------------------


class NativeMinPool2d(torch.nn.MaxPool2d):
    """torch has no min pooling: -max_pool2d(-x), with MaxPool2d's arguments."""

    def forward(self, input):
        return native_min_pool2d(input, self.kernel_size, self.stride, self.padding,
                                 self.dilation, self.ceil_mode, self.return_indices)


class NativeDropout(torch.nn.Dropout):
    def forward(self, input):
        return native_dropout(input, self.p, self.training, self.inplace)


_NATIVE_ACTIVATIONS = {
    "relu": lambda y, slope: torch.relu(y), "leaky_relu": torch.nn.functional.leaky_relu,
    "sigmoid": lambda y, slope: torch.sigmoid(y), "tanh": lambda y, slope: torch.tanh(y),
    "none": lambda y, slope: y,
}


class _ThenActivation:
    """Mixed in before a torch module: its forward followed by the activation, in torch."""

    def __init__(self, *args, activation="relu", negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation, self.negative_slope = activation, negative_slope

    def forward(self, input):
        return _NATIVE_ACTIVATIONS[self.activation](super().forward(input), self.negative_slope)


class NativeConv2dAct(_ThenActivation, torch.nn.Conv2d):
    """The fused module's composition in torch: activation(conv2d(x))."""


class NativeLinearAct(_ThenActivation, torch.nn.Linear):
    """The fused module's composition in torch: activation(linear(x))."""


class NativeReLUMaxPool2d(torch.nn.MaxPool2d):
    def forward(self, input):
        return super().forward(torch.relu(input))


@dataclasses.dataclass(frozen=True)
class Module:
    native: type
    kwargs: dict  # constructor arguments
    input: tuple  # shape of a valid input
    parametrized: bool = False


MODULES = {
    "ReLU": Module(torch.nn.ReLU, {}, (2, 3, 4)),
    "LeakyReLU": Module(torch.nn.LeakyReLU, dict(negative_slope=0.2), (2, 3, 4)),
    "Sigmoid": Module(torch.nn.Sigmoid, {}, (2, 3, 4)),
    "Tanh": Module(torch.nn.Tanh, {}, (2, 3, 4)),
    "Dropout": Module(NativeDropout, dict(p=0.3), (4, 30)),
    "LogSoftmax": Module(torch.nn.LogSoftmax, dict(dim=1), (3, 5)),
    "Linear": Module(torch.nn.Linear, dict(in_features=5, out_features=4), (3, 5), True),
    "MaxPool2d": Module(torch.nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1),
                        (2, 3, 7, 8)),
    "MinPool2d": Module(NativeMinPool2d, dict(kernel_size=3, stride=2, padding=1),
                        (2, 3, 7, 8)),
    "AvgPool2d": Module(torch.nn.AvgPool2d, dict(kernel_size=3, stride=2, padding=1),
                        (2, 3, 7, 8)),
    "Conv2d": Module(torch.nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3,
                                           padding=1), (2, 3, 7, 8), True),
    "ConvTranspose2d": Module(torch.nn.ConvTranspose2d, dict(in_channels=3, out_channels=4,
                                                             kernel_size=3, stride=2),
                              (2, 3, 5, 6), True),
    "Conv2dAct": Module(NativeConv2dAct, dict(in_channels=3, out_channels=4, kernel_size=3,
                                              padding=1, activation="leaky_relu",
                                              negative_slope=0.2), (2, 3, 7, 8), True),
    "LinearAct": Module(NativeLinearAct, dict(in_features=5, out_features=4, activation="tanh"),
                        (3, 5), True),
    "ReLUMaxPool2d": Module(NativeReLUMaxPool2d, dict(kernel_size=3, stride=2, padding=1),
                            (2, 3, 7, 8)),
}


def test_every_module_has_a_contract_entry():
    missing = sorted(set(pyops.nn.__all__) - set(MODULES))
    assert not missing, f"add these to MODULES in tests/test_contract.py: {missing}"


@dataclasses.dataclass(frozen=True)
class ModuleCase:
    module: str
    name: str
    expect: Expect
    input: Callable = None  # builds the input; default: randn of the valid shape
    kwargs: dict = dataclasses.field(default_factory=dict)  # constructor overrides
    prepare: Callable = None  # (module, input) -> input, e.g. moving one to meta
    grad: bool = True

    @property
    def id(self):
        return f"{self.module}-{self.name}"


def run_module(cls, case, spec):
    """Build cls(**kwargs) (weights seeded), call it on the case's input; gradients of the
    input and the parameters as in run()."""
    torch.manual_seed(0)
    outcome = Outcome(arguments={})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cls(**{**spec.kwargs, **case.kwargs})
            torch.manual_seed(1)
            x = case.input() if case.input else torch.randn(spec.input)
            if case.prepare:
                x = case.prepare(module, x)
            leaves = list(module.parameters())
            if case.grad and _floating(x) and x.is_leaf:
                x.requires_grad_()
                leaves.insert(0, x)
            outcome.arguments = {"input": x}
            outcome.result = module(x)
            out = _first_tensor(outcome.result)
            if (case.grad and out.requires_grad and out.device.type != "meta"):
                torch.manual_seed(2)
                upstream = torch.randn(out.shape, dtype=out.dtype)
                grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
                outcome.grads = [torch.zeros_like(p) if g is None else g
                                 for p, g in zip(leaves, grads)]
    except Exception as error:  # noqa: BLE001
        outcome.error = error
    return outcome


def _module_to_meta(module, x):
    module.to("meta")
    return x


def _input_to_meta(module, x):
    return x.to("meta")


def _all_to_meta(module, x):
    module.to("meta")
    return x.to("meta")


def _module_cases():
    cases = []
    for name, spec in MODULES.items():
        rank = len(spec.input)
        cases.append(ModuleCase(name, "valid", SAME))
        for dtype, given in BAD_DTYPES.items():
            cases.append(ModuleCase(name, f"input-{given}", Raises(
                TypeError, "input", "float32, float64, float16 or bfloat16", given, torch="any"),
                input=lambda dtype=dtype, spec=spec: torch.ones(spec.input).to(dtype)))
        for other in range(6):
            if other != rank:
                shape = (spec.input * 2)[:other] if other <= rank else (1,) * (other - rank) + spec.input
                cases.append(ModuleCase(name, f"rank-{other}", LIKE_TORCH("input"),
                                        input=lambda shape=shape: torch.randn(shape)))
        batch_empty = (0,) + spec.input[1:]
        cases += [
            ModuleCase(name, "empty-batch", LIKE_TORCH("input"),
                       input=lambda shape=batch_empty: torch.randn(shape)),
            ModuleCase(name, "nan-inf", SAME, input=lambda spec=spec: _with_values(
                math.nan, math.inf, -math.inf)(torch.randn(spec.input))),
            ModuleCase(name, "transposed", SAME, input=lambda spec=spec: torch.randn(
                spec.input[:-2] + spec.input[:-3:-1]).transpose(-1, -2)),
            ModuleCase(name, "float64", SAME, kwargs=dict(dtype=torch.float64)
                       if spec.parametrized else {},
                       input=lambda spec=spec: torch.randn(spec.input, dtype=torch.float64)),
            ModuleCase(name, "all-meta", SAME, prepare=_all_to_meta),
        ]
        if spec.parametrized:
            cases += [
                ModuleCase(name, "input-meta", Raises(RuntimeError, "device", "meta", "cpu",
                                                      torch="any"), prepare=_input_to_meta),
                ModuleCase(name, "module-meta", Raises(RuntimeError, "device", "meta", "cpu",
                                                       torch="any"), prepare=_module_to_meta),
                ModuleCase(name, "input-float64", Raises(TypeError, "weight", "dtype of input",
                                                         "Float"),
                           input=lambda spec=spec: torch.randn(spec.input, dtype=torch.float64)),
            ]
    for name in ("ReLU", "LeakyReLU", "Dropout"):
        cases += [
            ModuleCase(name, "inplace", SAME, kwargs=dict(inplace=True), grad=False),
            ModuleCase(name, "inplace-leaf-requires-grad", Raises(RuntimeError, "leaf Variable"),
                       kwargs=dict(inplace=True)),
            ModuleCase(name, "inplace-expanded", Raises(RuntimeError, "single memory location"),
                       kwargs=dict(inplace=True), grad=False,
                       input=lambda: torch.randn(1).expand(3, 4)),
        ]
    cases += [
        ModuleCase("Dropout", "eval", SAME, prepare=lambda m, x: (m.eval(), x)[1]),
        ModuleCase("LogSoftmax", "dim=None", SAME, kwargs=dict(dim=None)),
        ModuleCase("LogSoftmax", "dim=5", LIKE_TORCH("dim in [-2, 1]", "got 5"),
                   kwargs=dict(dim=5)),
        ModuleCase("MaxPool2d", "kernel=0", LIKE_TORCH("kernel_size", "greater than zero"),
                   kwargs=dict(kernel_size=0)),
        ModuleCase("MinPool2d", "return-indices", SAME, kwargs=dict(return_indices=True)),
        ModuleCase("AvgPool2d", "divisor=0", LIKE_TORCH("divisor_override"),
                   kwargs=dict(divisor_override=0)),
        ModuleCase("Conv2d", "padding=same", SAME, kwargs=dict(padding="same", kernel_size=4)),
        ModuleCase("Conv2d", "reflect", SAME, kwargs=dict(padding_mode="reflect")),
        ModuleCase("Conv2d", "circular-groups", SAME, kwargs=dict(
            in_channels=4, out_channels=6, groups=2, padding_mode="circular"),
            input=lambda: torch.randn(2, 4, 7, 8)),
        ModuleCase("Conv2d", "channels", LIKE_TORCH("input", "3 channels", "5 channels"),
                   input=lambda: torch.randn(2, 5, 7, 8)),
        ModuleCase("ConvTranspose2d", "channels", LIKE_TORCH("input", "3 channels", "5 channels"),
                   input=lambda: torch.randn(2, 5, 5, 6)),
        ModuleCase("Linear", "in-features", LIKE_TORCH("input.size(-1) == 5"),
                   input=lambda: torch.randn(3, 6)),
    ]
    return cases


@pytest.mark.parametrize("case", _module_cases(), ids=lambda case: case.id)
def test_module(case):
    spec = MODULES[case.module]
    mine = run_module(getattr(pyops.nn, case.module), case, spec)
    native = run_module(spec.native, case, spec)
    check(case.expect, mine, native)


# Invalid constructor arguments: the constructors are torch's own (pyops modules only
# override forward), so both raise the same error, naming the argument.
BAD_CONSTRUCTORS = [
    ("Conv2d", dict(in_channels=4, out_channels=4, kernel_size=3, groups=0), "groups"),
    ("Conv2d", dict(in_channels=4, out_channels=4, kernel_size=3, groups=3), "in_channels"),
    ("Conv2d", dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", stride=2),
     "padding='same'"),
    ("Conv2d", dict(in_channels=4, out_channels=4, kernel_size=3, padding="full"), "padding"),
    ("Conv2d", dict(in_channels=4, out_channels=4, kernel_size=3, padding_mode="mirror"),
     "padding_mode"),
    ("ConvTranspose2d", dict(in_channels=4, out_channels=4, kernel_size=3,
                             padding_mode="reflect"), "padding mode"),
    ("ConvTranspose2d", dict(in_channels=4, out_channels=4, kernel_size=3, groups=3),
     "in_channels"),
    ("Dropout", dict(p=1.5), "probability"),
    ("Dropout", dict(p=-0.5), "probability"),
    ("Linear", dict(in_features=-1, out_features=3), "negative dimension"),
]


@pytest.mark.parametrize("name,kwargs,word", BAD_CONSTRUCTORS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_CONSTRUCTORS)])
def test_module_constructor(name, kwargs, word):
    with pytest.raises(Exception) as native:
        getattr(torch.nn, name)(**kwargs)
    with pytest.raises(type(native.value)) as mine:
        getattr(pyops.nn, name)(**kwargs)
    assert str(mine.value) == str(native.value) and word in str(mine.value)


# ---- pyops.optim: every optimizer against its torch.optim twin ---------------------------

OPTIMIZERS = {
    "SGD": dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=0.01),
    "Adadelta": dict(lr=0.5, weight_decay=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.01),
    "Adam": dict(lr=0.01, weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01),
}


def test_every_optimizer_has_a_contract_entry():
    missing = sorted(set(pyops.optim.__all__) - set(OPTIMIZERS))
    assert not missing, f"add these to OPTIMIZERS in tests/test_contract.py: {missing}"


def _two_params():
    return [torch.randn(3, 4), torch.randn(5)]


@dataclasses.dataclass(frozen=True)
class OptimCase:
    optimizer: str
    name: str
    expect: Expect
    kwargs: dict = dataclasses.field(default_factory=dict)  # constructor overrides
    params: Callable = _two_params  # the params' data
    grads: Callable = None  # params -> grads; default: seeded randn_like
    between: Callable = None  # (optimizer, params) after the first step: e.g. a mutation
    steps: int = 3

    @property
    def id(self):
        return f"{self.optimizer}-{self.name}"


def run_optimizer(cls, case):
    """Seeded params and grads; `steps` steps (case.between after the first). The result
    is the params and every state tensor afterwards."""
    torch.manual_seed(0)
    outcome = Outcome(arguments={})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params = [p.requires_grad_() if p.is_leaf else p for p in case.params()]
            optimizer = cls(params, **{**OPTIMIZERS[case.optimizer], **case.kwargs})
            for step in range(case.steps):
                torch.manual_seed(10 + step)
                grads = (case.grads(params) if case.grads
                         else [torch.randn(p.shape, dtype=p.dtype) for p in params])
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
                if step == 0 and case.between:
                    case.between(optimizer, params)
            state = optimizer.state_dict()["state"]
            outcome.result = ([p.detach() for p in params],
                              {f"{i}.{k}": v for i, s in state.items() for k, v in s.items()})
    except Exception as error:  # noqa: BLE001
        outcome.error = error
    return outcome


def _set_group(**values):
    def between(optimizer, params):
        optimizer.param_groups[0].update(values)
    return between


def _set_first_state(fn):
    """Replaces the first tensor state (other than step) of params[0] by fn(it)."""
    def between(optimizer, params):
        state = optimizer.state[params[0]]
        key = next(k for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor))
        state[key] = fn(state[key])
    return between


def _with_nan_inf(tensors):
    return [_with_values(math.nan, math.inf, -math.inf)(t) for t in tensors]


# Invalid hyperparameters at construction: torch's own checks run (pyops optimizers
# subclass torch's), so both raise ValueError naming the hyperparameter.
BAD_HYPERPARAMETERS = {
    "SGD": [(dict(lr=-0.1), "learning rate"), (dict(momentum=-0.5), "momentum"),
            (dict(weight_decay=-1.0), "weight_decay"), (dict(lr=0.1, nesterov=True, momentum=0),
                                                        "Nesterov"),
            (dict(nesterov=True, dampening=0.5), "Nesterov")],
    "Adagrad": [(dict(lr=-0.1), "learning rate"), (dict(lr_decay=-1.0), "lr_decay"),
                (dict(weight_decay=-1.0), "weight_decay"), (dict(eps=-1e-10), "epsilon"),
                (dict(initial_accumulator_value=-1.0), "initial_accumulator_value")],
    "Adadelta": [(dict(lr=-0.1), "learning rate"), (dict(rho=1.5), "rho"), (dict(rho=-0.1), "rho"),
                 (dict(eps=-1e-6), "epsilon"), (dict(weight_decay=-1.0), "weight_decay")],
    "RMSprop": [(dict(lr=-0.1), "learning rate"), (dict(alpha=-0.1), "alpha"),
                (dict(eps=-1e-8), "epsilon"), (dict(momentum=-0.5), "momentum"),
                (dict(weight_decay=-1.0), "weight_decay")],
    "Adam": [(dict(lr=-0.1), "learning rate"), (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
             (dict(betas=(0.9, -0.1)), "beta parameter at index 1"), (dict(eps=-1e-8), "epsilon"),
             (dict(weight_decay=-1.0), "weight_decay"), (dict(lr=math.nan), "learning rate"),
             (dict(lr=torch.tensor([0.1, 0.2])), "lr must be 1-element")],
    "AdamW": [(dict(lr=-0.1), "learning rate"), (dict(betas=(0.9, 1.0)), "beta parameter at index 1"),
              (dict(eps=-1e-8), "epsilon"), (dict(weight_decay=-1.0), "weight_decay")],
}

# Hyperparameters changed in param_groups after construction, which torch does not check
# again: pyops steps as torch does, or refuses the values its update rule is not defined
# for (torch then divides by zero or grows without bound).
MUTATIONS = {
    "SGD": [("lr=-0.1", dict(lr=-0.1), SAME), ("momentum=-0.5", dict(momentum=-0.5), SAME),
            ("dampening=2", dict(dampening=2.0), SAME), ("weight_decay=-1", dict(weight_decay=-1.0), SAME),
            ("nesterov-dampening", dict(nesterov=True, dampening=0.5), Raises(
                ValueError, "nesterov=True requires momentum > 0 and dampening == 0",
                "dampening=0.5", torch="accepts")),
            ("nesterov-no-momentum", dict(nesterov=True, momentum=0.0), Raises(
                ValueError, "nesterov=True requires momentum > 0", "momentum=0", torch="accepts"))],
    "Adagrad": [("lr=-0.1", dict(lr=-0.1), SAME), ("eps=0", dict(eps=0.0), SAME),
                ("lr_decay=-2", dict(lr_decay=-2.0), SAME)],
    "Adadelta": [("lr=-0.1", dict(lr=-0.1), SAME), ("eps=-1e-3", dict(eps=-1e-3), SAME),
                 ("rho=2", dict(rho=2.0), Raises(ValueError, "rho", "in [0, 1]", "2",
                                                 torch="accepts"))],
    "RMSprop": [("lr=-0.1", dict(lr=-0.1), SAME), ("alpha=2", dict(alpha=2.0), SAME),
                ("momentum=-0.5", dict(momentum=-0.5), SAME)],
    "Adam": [("lr=-0.1", dict(lr=-0.1), SAME), ("eps=0", dict(eps=0.0), SAME),
             ("weight_decay=-1", dict(weight_decay=-1.0), SAME),
             ("beta1=1.5", dict(betas=(1.5, 0.999)), Raises(ValueError, "beta1", "in [0, 1)",
                                                            "1.5", torch="accepts")),
             ("beta2=1", dict(betas=(0.9, 1.0)), Raises(ValueError, "beta2", "in [0, 1)", "1",
                                                        torch="accepts")),
             ("beta1=-0.5", dict(betas=(-0.5, 0.999)), Raises(ValueError, "beta1", "in [0, 1)",
                                                              "-0.5", torch="accepts"))],
    "AdamW": [("lr=-0.1", dict(lr=-0.1), SAME),
              ("beta2=1", dict(betas=(0.9, 1.0)), Raises(ValueError, "beta2", "in [0, 1)", "1",
                                                         torch="accepts"))],
}


def _optimizer_cases():
    cases = []
    for name in OPTIMIZERS:
        cases.append(OptimCase(name, "valid", SAME))
        for i, (kwargs, word) in enumerate(BAD_HYPERPARAMETERS[name]):
            cases.append(OptimCase(name, f"constructor-{i}", Raises(ValueError, word),
                                   kwargs=kwargs))
        for label, values, expect in MUTATIONS[name]:
            cases.append(OptimCase(name, f"mutated-{label}", expect, between=_set_group(**values)))
        sparse_ok = name in ("SGD", "Adagrad")  # torch's sparse support; pyops refuses
        cases += [
            OptimCase(name, "sparse-grad", Raises(
                RuntimeError, "sparse", "param 0 of param group 0",
                torch="accepts" if sparse_ok else "raises"),
                kwargs=dict(weight_decay=0.0),  # torch's sparse paths take none
                grads=lambda params: [torch.randn(p.shape).to_sparse() for p in params]),
            OptimCase(name, "nan-inf-grads", SAME,
                      grads=lambda params: _with_nan_inf(torch.randn(p.shape) for p in params)),
            OptimCase(name, "nan-inf-params", SAME, params=lambda: _with_nan_inf(_two_params())),
            OptimCase(name, "lr=0", SAME, kwargs=dict(lr=0.0)),
            OptimCase(name, "empty-param", SAME, params=lambda: [torch.randn(0), torch.randn(4)]),
            OptimCase(name, "scalar-param", SAME, params=lambda: [torch.randn(())]),
            OptimCase(name, "no-grad", SAME, grads=lambda params: [None, torch.randn(5)]),
            OptimCase(name, "transposed-param", SAME,
                      params=lambda: [torch.randn(4, 3).t(), torch.randn(5)]),
            OptimCase(name, "strided-param", SAME,
                      params=lambda: [torch.randn(3, 8)[:, ::2], torch.randn(5)]),
            OptimCase(name, "channels-last-param", SAME, params=lambda: [
                torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)]),
            OptimCase(name, "expanded-grad", SAME, grads=lambda params: [
                torch.randn(1).expand(p.shape) for p in params]),
            OptimCase(name, "transposed-grad", SAME, grads=lambda params: [
                torch.randn(4, 3).t(), torch.randn(5)]),
            OptimCase(name, "float64-params", SAME,
                      params=lambda: [t.double() for t in _two_params()]),
            OptimCase(name, "complex-param", Raises(TypeError, "params[0]", "float32",
                                                    "ComplexFloat", torch="accepts"),
                      params=lambda: [torch.randn(3, dtype=torch.complex64)],
                      grads=lambda params: [torch.randn(3, dtype=torch.complex64)]),
            OptimCase(name, "expanded-param", Raises(RuntimeError, "params[0]", "share memory"),
                      params=lambda: [torch.randn(1).expand(3)]),
            OptimCase(name, "self-overlapping-param", Raises(
                RuntimeError, "params[0]", "share memory", torch="any"),
                params=lambda: [torch.randn(10).as_strided((4, 4), (2, 1))]),
            OptimCase(name, "gapped-param", SAME,
                      params=lambda: [torch.randn(20).as_strided((3, 3), (5, 2))]),
            OptimCase(name, "overlapping-params", Raises(
                RuntimeError, "params[0]", "params[1]", "share memory", torch="accepts"),
                params=lambda: (lambda base: [base[:6], base[3:]])(torch.randn(10)),
                grads=lambda params: [torch.randn(6), torch.randn(7)]),
            OptimCase(name, "meta-params", LIKE_TORCH("meta"),
                      params=lambda: [torch.randn(3, device="meta")],
                      grads=lambda params: [torch.randn(3, device="meta")]),
            # torch's SGD runs a momentum buffer on meta (its other optimizers raise).
            OptimCase(name, "state-on-meta", Raises(RuntimeError, "[0]", "device", "meta", "cpu",
                                                    torch="any" if name == "SGD" else "raises"),
                      between=_set_first_state(lambda t: t.to("meta"))),
            OptimCase(name, "state-shape", Raises(RuntimeError, "[0]", "shape", "[3, 4]", "[12]"),
                      between=_set_first_state(lambda t: t.reshape(-1).clone())),
            OptimCase(name, "state-expanded", Raises(RuntimeError, "[0]", "share memory"),
                      between=_set_first_state(lambda t: t[:1, :1].expand(3, 4))),
            OptimCase(name, "state-float64", Raises(TypeError, "[0]", "dtype of params[0]",
                                                    "Double", torch="any"),
                      between=_set_first_state(lambda t: t.double())),
        ]
        if name != "SGD":
            cases.append(OptimCase(name, "step-Long", Raises(
                TypeError, "state_steps[0]", "float32 or float64", "Long", torch="accepts"),
                between=lambda optimizer, params: optimizer.state[params[0]].update(
                    step=torch.tensor(1))))
    return cases


@pytest.mark.parametrize("case", _optimizer_cases(), ids=lambda case: case.id)
def test_optimizer(case):
    mine = run_optimizer(getattr(pyops.optim, case.optimizer), case)
    native = run_optimizer(getattr(torch.optim, case.optimizer), case)
    check(case.expect, mine, native)
