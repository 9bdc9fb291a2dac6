"""Sample calls of every public pyops op, module and optimizer, each with its native
PyTorch twin. Shared by the determinism and accuracy tests and by
scripts/accuracy_report.py, so that all of them cover the same ops, and fail when an op
is added to ``pyops.functional.__all__``, ``pyops.nn.__all__`` or ``pyops.optim.__all__``
without a sample here (``missing_samples``).

Inputs are drawn in float64 from a seeded CPU generator and then rounded to the dtype
under test, so a float64 reference computed from ``Sample.inputs`` (converted back to
float64) sees exactly the values the op saw.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import pyops
import pyops.functional as pf

__all__ = [
    "Sample", "ModuleSample", "OptimizerConfig", "functional_samples", "module_samples",
    "OPTIMIZER_CONFIGS", "missing_samples",
]


@dataclass(frozen=True)
class Sample:
    """One call of a pyops.functional op and the same computation in native torch.

    ``pyops`` and ``native`` take ``*inputs`` and return a tensor. ``grad_inputs`` are
    the positions of the inputs that get a gradient, ``names`` name every input.
    ``reference(inputs64, observed)``, when set, gives the exact result that belongs
    to an observed output (dropout: the same mask, computed in float64); otherwise the
    reference is ``native`` run on the inputs in float64.
    """

    op: str
    variant: str
    inputs: tuple
    names: tuple
    pyops: Callable
    native: Callable
    grad_inputs: tuple = (0,)
    reference: Callable | None = field(default=None, repr=False)
    random: bool = False  # draws from torch's generator: reseed before each call


@dataclass(frozen=True)
class ModuleSample:
    """A pyops.nn module (built by ``make``, parameters from the current seed) and an input."""

    name: str
    make: Callable
    inputs: tuple
    random: bool = False


@dataclass(frozen=True)
class OptimizerConfig:
    name: str  # the class name in pyops.optim and torch.optim
    variant: str
    kwargs: dict


# A few hyperparameter sets per optimizer: the default path and the branches that change
# the arithmetic (weight decay, momentum, nesterov, centered, amsgrad, maximize). Learning
# rates are large enough that a few steps move float16/bfloat16 parameters by many ulps.
OPTIMIZER_CONFIGS = (
    OptimizerConfig("SGD", "lr", {"lr": 0.1}),
    OptimizerConfig("SGD", "nesterov wd", {"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                           "weight_decay": 1e-2}),
    OptimizerConfig("SGD", "dampening maximize", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1,
                                                  "maximize": True}),
    OptimizerConfig("Adagrad", "lr", {"lr": 0.1}),
    OptimizerConfig("Adagrad", "decay wd", {"lr": 0.1, "lr_decay": 1e-2, "weight_decay": 1e-2,
                                            "initial_accumulator_value": 0.1}),
    OptimizerConfig("Adadelta", "lr 0.5", {"lr": 0.5}),
    OptimizerConfig("Adadelta", "rho wd maximize", {"lr": 1.0, "rho": 0.95, "weight_decay": 1e-2,
                                                    "maximize": True}),
    OptimizerConfig("RMSprop", "lr", {"lr": 0.01}),
    OptimizerConfig("RMSprop", "centered momentum wd", {"lr": 0.01, "momentum": 0.9,
                                                        "centered": True, "weight_decay": 1e-2}),
    OptimizerConfig("Adam", "lr", {"lr": 0.01}),
    OptimizerConfig("Adam", "amsgrad wd", {"lr": 0.01, "amsgrad": True, "weight_decay": 1e-2}),
    OptimizerConfig("AdamW", "lr", {"lr": 0.01}),
    OptimizerConfig("AdamW", "amsgrad", {"lr": 0.01, "amsgrad": True}),
)


class _Maker:
    """Seeded random tensors: drawn in float64 on the CPU, rounded to `dtype`, moved."""

    def __init__(self, dtype, device, seed):
        self.dtype, self.device = dtype, device
        self.generator = torch.Generator().manual_seed(seed)

    def _finish(self, values):
        return values.to(self.dtype).to(self.device)

    def normal(self, *shape, scale=1.0):
        return self._finish(torch.randn(shape, generator=self.generator, dtype=torch.float64) * scale)

    def away_from_zero(self, *shape):
        """|x| in [0.5, 2): no zeros, so a dropout mask can be read back from the output."""
        magnitude = torch.rand(shape, generator=self.generator, dtype=torch.float64) * 1.5 + 0.5
        sign = torch.randint(0, 2, shape, generator=self.generator).to(torch.float64) * 2 - 1
        return self._finish(magnitude * sign)

    def classes(self, rows, classes):
        return torch.randint(0, classes, (rows,), generator=self.generator).to(self.device)


def _fresh(fn):
    # In-place ops run on a copy, so every call sees the same input and autograd reaches
    # the leaf through the copy.
    return lambda x, *rest: fn(x.clone(), *rest)


_DROPOUT_P = 0.25


def _dropout_reference(inputs64, observed):
    # The exact result for the mask the implementation drew: kept elements scaled by
    # 1 / (1 - p). Inputs have no zeros, so a zero output is a dropped element.
    (x,) = inputs64
    kept = (observed.detach() != 0).to(torch.float64)
    return x * kept / (1.0 - _DROPOUT_P)


def _activation(name):
    return {
        "relu": torch.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "none": lambda t: t,
    }[name]


def _channel_bias(bias, dim):
    return bias.view([-1] + [1] * (dim - 2))


# Each builder returns the samples of one op: (maker, large) -> list[Sample]. `large`
# selects the report's sizes (big enough for reductions to accumulate error and for the
# CPU kernels to split work across threads); small sizes keep the tests fast. Sizes are
# not multiples of any SIMD width, so vector bodies and scalar tails both run.

def _elementwise_shape(large):
    return (64, 1031) if large else (5, 67)


def _unary(op, pyops_fn, native_fn, *, scale=3.0, inplace=False):
    def build(m, large):
        if inplace:
            pyops_fn_, native_fn_ = _fresh(pyops_fn), _fresh(native_fn)
        else:
            pyops_fn_, native_fn_ = pyops_fn, native_fn
        x = m.normal(*_elementwise_shape(large), scale=scale)
        return [Sample(op, "", (x,), ("input",), pyops_fn_, native_fn_)]
    return build


def _bias_act(m, large):
    samples = []
    conv_shape = (16, 32, 12, 12) if large else (3, 8, 5, 7)
    rows_shape = (512, 67) if large else (19, 13)
    for activation, shape in (("relu", conv_shape), ("sigmoid", conv_shape), ("tanh", rows_shape)):
        x = m.normal(*shape, scale=2.0)
        bias = m.normal(shape[1])
        act = _activation(activation)
        samples.append(Sample(
            "bias_act", f"{activation} {'NCHW' if len(shape) == 4 else 'NC'}", (x, bias),
            ("input", "bias"),
            lambda x, b, a=activation: pf.bias_act(x, b, a),
            lambda x, b, act=act: act(x + _channel_bias(b, x.dim())),
            grad_inputs=(0, 1)))
    return samples


def _conv_samples(op, m, large, activation=None):
    # (variant, input shape, weight shape, bias, stride, padding, dilation, groups)
    cases = [
        ("3x3 gemm", (8, 32, 14, 14) if large else (2, 8, 7, 7),
         (48, 32, 3, 3) if large else (12, 8, 3, 3), True, 1, 1, 1, 1),
        ("3x3 direct (seed conv1)", (16, 1, 28, 28) if large else (2, 1, 9, 9),
         (32, 1, 3, 3) if large else (6, 1, 3, 3), True, 1, 0, 1, 1),
        ("5x5 s2 d1 g2", (4, 16, 17, 17) if large else (2, 4, 11, 11),
         (24, 8, 5, 5) if large else (6, 2, 5, 5), False, 2, 2, 1, 2),
    ]
    if activation is not None:
        cases = cases[:2]
    samples = []
    for variant, x_shape, w_shape, has_bias, stride, padding, dilation, groups in cases:
        x = m.normal(*x_shape)
        w = m.normal(*w_shape, scale=(w_shape[1] * w_shape[2] * w_shape[3]) ** -0.5)
        inputs, names = (x, w), ("input", "weight")
        if has_bias:
            inputs, names = inputs + (m.normal(w_shape[0]),), names + ("bias",)
        args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

        def conv(fn, *t, args=args):
            return fn(t[0], t[1], t[2] if len(t) > 2 else None, **args)

        if activation is None:
            pyops_fn = lambda *t, conv=conv: conv(pf.conv2d, *t)  # noqa: E731
            native_fn = lambda *t, conv=conv: conv(F.conv2d, *t)  # noqa: E731
        else:
            act = _activation(activation)
            pyops_fn = lambda *t, conv=conv: conv(  # noqa: E731
                lambda *a, **k: pf.conv2d_bias_act(*a, **k, activation=activation), *t)
            native_fn = lambda *t, conv=conv, act=act: act(conv(F.conv2d, *t))  # noqa: E731
            variant = f"{activation} {variant}"
        samples.append(Sample(op, variant, inputs, names, pyops_fn, native_fn,
                              grad_inputs=tuple(range(len(inputs)))))
    return samples


def _conv2d(m, large):
    return _conv_samples("conv2d", m, large)


def _conv2d_bias_act(m, large):
    return _conv_samples("conv2d_bias_act", m, large, activation="relu")


def _conv_transpose2d(m, large):
    x = m.normal(*((8, 32, 9, 9) if large else (2, 6, 5, 5)))
    w_shape = (32, 16, 3, 3) if large else (6, 4, 3, 3)
    w = m.normal(*w_shape, scale=(w_shape[0] * 9) ** -0.5)
    b = m.normal(w_shape[1])
    args = dict(stride=2, padding=1, output_padding=1)
    return [Sample("conv_transpose2d", "3x3 s2 p1 op1", (x, w, b), ("input", "weight", "bias"),
                   lambda x, w, b: pf.conv_transpose2d(x, w, b, **args),
                   lambda x, w, b: F.conv_transpose2d(x, w, b, **args),
                   grad_inputs=(0, 1, 2))]


def _dropout(m, large):
    x = m.away_from_zero(*((64, 64, 12, 12) if large else (3, 4, 5, 7)))
    return [Sample("dropout", f"p={_DROPOUT_P}", (x,), ("input",),
                   lambda x: pf.dropout(x, _DROPOUT_P),
                   lambda x: F.dropout(x, _DROPOUT_P),
                   reference=_dropout_reference, random=True)]


def _linear_samples(op, m, large, activation=None):
    rows, inner, outer = (256, 768, 192) if large else (7, 33, 10)
    x = m.normal(rows, inner)
    w = m.normal(outer, inner, scale=inner ** -0.5)
    b = m.normal(outer)
    if activation is None:
        return [Sample(op, "", (x, w, b), ("input", "weight", "bias"), pf.linear, F.linear,
                       grad_inputs=(0, 1, 2))]
    act = _activation(activation)
    return [Sample(op, activation, (x, w, b), ("input", "weight", "bias"),
                   lambda x, w, b: pf.linear_act(x, w, b, activation),
                   lambda x, w, b: act(F.linear(x, w, b)), grad_inputs=(0, 1, 2))]


def _pool_input(m, large):
    return m.normal(*((16, 32, 24, 24) if large else (2, 3, 9, 11)))


def _max_pool2d(m, large):
    x = _pool_input(m, large)
    return [Sample("max_pool2d", "k3 s2 p1", (x,), ("input",),
                   lambda x: pf.max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1))]


def _min_pool2d(m, large):
    x = _pool_input(m, large)
    return [Sample("min_pool2d", "k3 s2 p1", (x,), ("input",),
                   lambda x: pf.min_pool2d(x, 3, 2, 1), lambda x: -F.max_pool2d(-x, 3, 2, 1))]


def _relu_max_pool2d(m, large):
    x = _pool_input(m, large)
    return [Sample("relu_max_pool2d", "k2", (x,), ("input",),
                   lambda x: pf.relu_max_pool2d(x, 2), lambda x: F.max_pool2d(torch.relu(x), 2))]


def _avg_pool2d(m, large):
    x = _pool_input(m, large)
    args = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    return [Sample("avg_pool2d", "k3 s2 p1 ceil", (x,), ("input",),
                   lambda x: pf.avg_pool2d(x, **args), lambda x: F.avg_pool2d(x, **args))]


def _log_softmax(m, large):
    rows = m.normal(*((128, 1000) if large else (6, 37)), scale=4.0)
    planes = m.normal(*((8, 10, 24, 24) if large else (2, 5, 4, 3)), scale=4.0)
    return [
        Sample("log_softmax", "dim=-1", (rows,), ("input",),
               lambda x: pf.log_softmax(x, dim=-1), lambda x: F.log_softmax(x, dim=-1)),
        Sample("log_softmax", "dim=1 of NCHW", (planes,), ("input",),
               lambda x: pf.log_softmax(x, dim=1), lambda x: F.log_softmax(x, dim=1)),
    ]


def _log_softmax_nll_loss(m, large):
    rows, classes = (512, 1000) if large else (9, 23)
    x = m.normal(rows, classes, scale=4.0)
    target = m.classes(rows, classes)
    return [Sample("log_softmax_nll_loss", "mean", (x, target), ("input", "target"),
                   pf.log_softmax_nll_loss, F.cross_entropy)]


_FUNCTIONAL_BUILDERS = {
    "relu": _unary("relu", pf.relu, F.relu),
    "relu_": _unary("relu_", pf.relu_, F.relu_, inplace=True),
    "leaky_relu": _unary("leaky_relu", lambda x: pf.leaky_relu(x, 0.2),
                         lambda x: F.leaky_relu(x, 0.2)),
    "leaky_relu_": _unary("leaky_relu_", lambda x: pf.leaky_relu_(x, 0.2),
                          lambda x: F.leaky_relu_(x, 0.2), inplace=True),
    "sigmoid": _unary("sigmoid", pf.sigmoid, torch.sigmoid, scale=4.0),
    "tanh": _unary("tanh", pf.tanh, torch.tanh, scale=2.0),
    "bias_act": _bias_act,
    "conv2d": _conv2d,
    "conv_transpose2d": _conv_transpose2d,
    "conv2d_bias_act": _conv2d_bias_act,
    "dropout": _dropout,
    "linear": lambda m, large: _linear_samples("linear", m, large),
    "linear_act": lambda m, large: _linear_samples("linear_act", m, large, activation="tanh"),
    "max_pool2d": _max_pool2d,
    "min_pool2d": _min_pool2d,
    "avg_pool2d": _avg_pool2d,
    "relu_max_pool2d": _relu_max_pool2d,
    "log_softmax": _log_softmax,
    "log_softmax_nll_loss": _log_softmax_nll_loss,
}


def functional_samples(dtype, device="cpu", *, large=False, seed=0, ops=None):
    """Samples of every op in pyops.functional.__all__ (or of `ops`), inputs in `dtype`."""
    m = _Maker(dtype, device, seed)
    samples = []
    for name in ops if ops is not None else pf.__all__:
        samples.extend(_FUNCTIONAL_BUILDERS[name](m, large))
    return samples


def module_samples(dtype, device="cpu", *, seed=0):
    """One sample per module in pyops.nn.__all__; ``make()`` builds it on `device` in `dtype`."""
    m = _Maker(dtype, device, seed)
    nn = pyops.nn

    def on(make):
        return lambda: make().to(device=device, dtype=dtype)

    image = m.normal(2, 8, 10, 10)
    return [
        ModuleSample("ReLU", on(nn.ReLU), (image,)),
        ModuleSample("LeakyReLU", on(lambda: nn.LeakyReLU(0.2)), (image,)),
        ModuleSample("Sigmoid", on(nn.Sigmoid), (image,)),
        ModuleSample("Tanh", on(nn.Tanh), (image,)),
        ModuleSample("Dropout", on(lambda: nn.Dropout(0.25)), (image,), random=True),
        ModuleSample("LogSoftmax", on(lambda: nn.LogSoftmax(dim=1)), (image,)),
        ModuleSample("Linear", on(lambda: nn.Linear(10, 6)), (image,)),
        ModuleSample("MaxPool2d", on(lambda: nn.MaxPool2d(3, 2, 1)), (image,)),
        ModuleSample("MinPool2d", on(lambda: nn.MinPool2d(3, 2, 1)), (image,)),
        ModuleSample("AvgPool2d", on(lambda: nn.AvgPool2d(3, 2, 1)), (image,)),
        ModuleSample("Conv2d", on(lambda: nn.Conv2d(8, 12, 3, padding=1)), (image,)),
        ModuleSample("ConvTranspose2d", on(lambda: nn.ConvTranspose2d(8, 4, 3, stride=2)),
                     (image,)),
        ModuleSample("Conv2dAct", on(lambda: nn.Conv2dAct(8, 12, 3, padding=1,
                                                          activation="leaky_relu")), (image,)),
        ModuleSample("LinearAct", on(lambda: nn.LinearAct(10, 6, activation="tanh")), (image,)),
        ModuleSample("ReLUMaxPool2d", on(lambda: nn.ReLUMaxPool2d(3, 2, 1)), (image,)),
    ]


def missing_samples():
    """Public ops, modules and optimizers that have no sample here: {namespace: [names]}."""
    modules = {s.name for s in module_samples(torch.float32)}
    optimizers = {c.name for c in OPTIMIZER_CONFIGS}
    missing = {
        "pyops.functional": [n for n in pf.__all__ if n not in _FUNCTIONAL_BUILDERS],
        "pyops.nn": [n for n in pyops.nn.__all__ if n not in modules],
        "pyops.optim": [n for n in pyops.optim.__all__ if n not in optimizers],
    }
    return {k: v for k, v in missing.items() if v}
