"""Swapping an existing model's torch.nn modules (and its optimizer) for their pyops
twins, in place.

A pyops module subclasses its torch twin, has the same attributes, parameters and
buffers, and overrides only ``forward``; so the swap changes each module's class and
nothing else. Parameters, buffers, hooks, ``state_dict`` keys and every reference held
elsewhere (an optimizer built before the swap, a scheduler, a parent module) stay valid.
"""

import dataclasses
import warnings

import torch

from pyops import _fuse
from pyops import nn as pyops_nn
from pyops import optim as pyops_optim

# Exact torch classes pyops serves. A subclass of one of them is left alone: its forward
# may differ from the class pyops mirrors.
MODULE_TWINS = {
    torch.nn.Conv2d: pyops_nn.Conv2d,
    torch.nn.ConvTranspose2d: pyops_nn.ConvTranspose2d,
    torch.nn.MaxPool2d: pyops_nn.MaxPool2d,
    torch.nn.AvgPool2d: pyops_nn.AvgPool2d,
    torch.nn.ReLU: pyops_nn.ReLU,
    torch.nn.LeakyReLU: pyops_nn.LeakyReLU,
    torch.nn.Sigmoid: pyops_nn.Sigmoid,
    torch.nn.Tanh: pyops_nn.Tanh,
    torch.nn.Dropout: pyops_nn.Dropout,
    torch.nn.Linear: pyops_nn.Linear,
    torch.nn.LogSoftmax: pyops_nn.LogSoftmax,
}

OPTIMIZER_TWINS = {
    torch.optim.SGD: pyops_optim.SGD,
    torch.optim.Adagrad: pyops_optim.Adagrad,
    torch.optim.Adadelta: pyops_optim.Adadelta,
    torch.optim.RMSprop: pyops_optim.RMSprop,
    torch.optim.Adam: pyops_optim.Adam,
    torch.optim.AdamW: pyops_optim.AdamW,
}

_PYOPS_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class ConversionReport:
    """What `convert` did: qualified module names, swapped or left with the reason, and
    with ``fuse=True`` the fusions made, the candidates left unfused and why, or why
    fusion was skipped altogether (``fusion_skipped``)."""

    swapped: list = dataclasses.field(default_factory=list)  # [(name, "Conv2d"), ...]
    kept: list = dataclasses.field(default_factory=list)  # [(name, "BatchNorm2d", reason)]
    fused: list = dataclasses.field(default_factory=list)  # [(["0", "1"], "Conv2dAct(relu)")]
    not_fused: list = dataclasses.field(default_factory=list)  # [(["0", "1"], reason)]
    fusion_skipped: str | None = None

    def __str__(self):
        lines = [f"pyops.convert: swapped {len(self.swapped)} module(s), kept {len(self.kept)}"]
        lines += [f"  swapped {name or '<root>'}: {kind}" for name, kind in self.swapped]
        lines += [f"  kept    {name or '<root>'}: {kind} ({why})" for name, kind, why in self.kept]
        lines += [f"  fused   {' + '.join(names)} -> {kind}" for names, kind in self.fused]
        lines += [f"  unfused {' + '.join(names)} ({why})" for names, why in self.not_fused]
        if self.fusion_skipped:
            lines.append(f"  fusion skipped: {self.fusion_skipped}")
        return "\n".join(lines)


def _why_not(module):
    """Why pyops cannot serve this module exactly, or None when it can."""
    twin = MODULE_TWINS.get(type(module))
    if twin is None:
        for torch_cls in MODULE_TWINS:
            if isinstance(module, torch_cls):
                return f"a subclass of torch.nn.{torch_cls.__name__} with its own behaviour"
        return "no pyops kernel for this module"
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if tensor.device.type not in ("cpu", "cuda"):
            return f"its tensors are on {tensor.device.type}; pyops runs on CPU and CUDA"
        if tensor.dtype not in _PYOPS_DTYPES:
            return f"its tensors are {tensor.dtype}; pyops computes in floating types"
    return None


def convert(model, fuse=False, return_report=False):
    """Swaps, in place, every module of `model` (itself included) that pyops serves for
    its pyops twin. Modules pyops cannot serve exactly are left untouched and listed; a
    warning names the ones of a type pyops supports that were still kept.

    ``fuse=False`` returns `model`. ``fuse=True`` then traces the converted model with
    torch.fx and fuses conv -> activation, linear -> activation and relu -> max-pool
    where that is exact, and returns a new ``torch.fx.GraphModule`` (named after the
    model's class) holding the fused modules: use the returned module. It shares every
    Parameter, buffer and unfused submodule with `model` (an optimizer built on `model`
    keeps working; ``state_dict`` keys are `model`'s), and `model` itself stays valid,
    converted but unfused. Where nothing fuses, `model` is returned. Where fx cannot
    trace the model (data-dependent control flow, or a forward that differs between
    train() and eval()), a warning says why and `model`, converted as with
    ``fuse=False``, is returned.

    ``return_report=True`` returns ``(result, ConversionReport)``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyops.convert: expected a torch.nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    for name, module in model.named_modules():
        if type(module).__module__ == pyops_nn.__name__:
            continue  # already pyops (a twin, or a fused module)
        has_own_compute = not list(module.children())
        reason = _why_not(module)
        if reason is None:
            module.__class__ = MODULE_TWINS[type(module)]
            report.swapped.append((name, type(module).__name__))
        elif has_own_compute:
            report.kept.append((name, type(module).__name__, reason))
    supported_but_kept = [k for k in report.kept if k[2] != "no pyops kernel for this module"]
    if supported_but_kept:
        warnings.warn("pyops.convert kept modules it cannot serve exactly:\n" + "\n".join(
            f"  {name or '<root>'}: {kind} ({why})" for name, kind, why in supported_but_kept),
            stacklevel=2)
    result = model
    if fuse:
        try:
            fused_model, report.fused, report.not_fused = _fuse.fuse(model)
        except _fuse.Untraceable as error:
            report.fusion_skipped = str(error)
            warnings.warn(f"pyops.convert(fuse=True): fusion skipped: {error}. The model was "
                          "still converted in place, as with fuse=False, and is returned "
                          "unfused.", stacklevel=2)
        else:
            result = fused_model if fused_model is not None else model
    return (result, report) if return_report else result


def convert_optimizer(optimizer):
    """Turns a torch.optim SGD, Adagrad, Adadelta, RMSprop, Adam or AdamW into its pyops
    twin in place (param groups, state, hooks and schedulers kept) and returns it."""
    twin = OPTIMIZER_TWINS.get(type(optimizer))
    if twin is None:
        if type(optimizer) in OPTIMIZER_TWINS.values():
            return optimizer
        raise TypeError(
            "pyops.convert_optimizer: expected one of torch.optim."
            f"{', '.join(c.__name__ for c in OPTIMIZER_TWINS)} (exactly), got "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        )
    torch_class = type(optimizer)
    optimizer.__class__ = twin
    try:
        optimizer._pyops_after_init()  # refuses differentiable / capturable groups
    except ValueError:
        optimizer.__class__ = torch_class  # left as it came
        raise
    return optimizer
