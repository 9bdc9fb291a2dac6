"""Drop-in twins of torch.optim's SGD, Adagrad, Adadelta, RMSprop, Adam and AdamW whose
step is one fused pyops operator call per parameter group (per device and dtype).

Each class subclasses its torch.optim twin (so ``isinstance(opt, torch.optim.Adam)``
holds, LR schedulers, ZeroRedundancyOptimizer and checkpoint tooling treat it as the
torch class, and the constructor, its argument checks, defaults, ``__setstate__`` and
``state_dict`` are torch's own) and replaces only ``step``. The per-parameter state has
torch's keys, shapes and dtypes, with ``step`` a CPU scalar tensor as in torch's
default (non-fused, non-capturable) implementation, so a ``state_dict`` moves both ways
between ``torch.optim.X`` and ``pyops.optim.X``.

Implementation flags: ``foreach`` and ``fused`` are accepted and change nothing (pyops
always runs its fused kernel, which gives torch's results); ``differentiable=True`` and
``capturable=True`` are not supported and raise ValueError. AMP's GradScaler unscales
the gradients itself before ``step`` (pyops does not take ``grad_scale``/``found_inf``).
"""

import torch

from pyops import _C  # noqa: F401  (the operators must be registered)

_ops = torch.ops.pyops
_sgd_, _adagrad_ = _ops.sgd_.default, _ops.adagrad_.default
_adadelta_, _rmsprop_, _adam_ = _ops.adadelta_.default, _ops.rmsprop_.default, _ops.adam_.default

__all__ = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"]


def _scalar_dtype():
    # The dtype torch gives a non-fused optimizer's `step` tensor.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _new_step():
    return torch.tensor(0.0, dtype=_scalar_dtype())


def _to_float(value):
    """A hyperparameter given as a float or a one-element tensor (lr, betas, ...)."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


class _FusedStep:
    """The step shared by every pyops optimizer; subclasses define `_update(group,
    params)`, which initializes missing state lazily as torch does and calls the
    optimizer's operator once for `params` (all of one device and dtype)."""

    def _pyops_after_init(self):
        # torch's fused twins let GradScaler pass grad_scale/found_inf to step; pyops
        # lets GradScaler unscale the gradients and skip steps itself instead.
        self._step_supports_amp_scaling = False
        for group in self.param_groups:
            self._check_flags(group)

    def _check_flags(self, group):
        name = f"pyops.optim.{type(self).__name__}"
        if group.get("differentiable", False):
            raise ValueError(
                f"{name}: differentiable=True is not supported: the fused pyops update "
                "records no autograd graph; use torch.optim for differentiable optimizers"
            )
        if group.get("capturable", False):
            raise ValueError(
                f"{name}: capturable=True is not supported: pyops keeps the step count on "
                "the CPU and computes bias corrections on the host (no CUDA graph capture)"
            )

    def _buckets(self, group, group_index):
        """The params of `group` that have a gradient, by (device, dtype), in order."""
        buckets = {}
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"pyops.optim.{type(self).__name__} does not support sparse gradients "
                    f"(param {i} of param group {group_index} has a sparse grad); use "
                    "torch.optim.SparseAdam or a dense gradient"
                )
            buckets.setdefault((p.device, p.dtype), []).append(p)
        return buckets.values()

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group_index, group in enumerate(self.param_groups):
                self._check_flags(group)
                for params in self._buckets(group, group_index):
                    self._update(group, params)
        return loss


def _zeros_like(p):
    return torch.zeros_like(p, memory_format=torch.preserve_format)


class SGD(_FusedStep, torch.optim.SGD):
    __doc__ = "pyops twin of :class:`torch.optim.SGD`.\n\n" + (torch.optim.SGD.__doc__ or "")

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        self._pyops_after_init()

    def _update(self, group, params):
        momentum = _to_float(group["momentum"])
        buffers, is_new = [], []
        if momentum != 0:
            for p in params:
                buffer = self.state[p].get("momentum_buffer")
                is_new.append(buffer is None)
                # torch starts the buffer as a copy of the (decayed) gradient: the kernel
                # fills a new buffer that way.
                buffers.append(torch.empty_like(p, memory_format=torch.preserve_format)
                               if buffer is None else buffer)
        _sgd_(params, [p.grad for p in params], buffers, is_new,
              lr=_to_float(group["lr"]), momentum=momentum,
              dampening=_to_float(group["dampening"]),
              weight_decay=_to_float(group["weight_decay"]), nesterov=group["nesterov"],
              maximize=group["maximize"])
        for p, buffer, new in zip(params, buffers, is_new):
            if new:  # recorded only once filled
                self.state[p]["momentum_buffer"] = buffer


class Adagrad(_FusedStep, torch.optim.Adagrad):
    __doc__ = "pyops twin of :class:`torch.optim.Adagrad`.\n\n" + (torch.optim.Adagrad.__doc__ or "")

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None):
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps,
                         foreach, maximize=maximize, differentiable=differentiable, fused=fused)
        self._pyops_after_init()

    def _update(self, group, params):
        sums, steps = [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step()
                # As torch: the optimizer's default, not the group's, initializes `sum`.
                state["sum"] = torch.full_like(p, self.defaults["initial_accumulator_value"],
                                               memory_format=torch.preserve_format)
            sums.append(state["sum"])
            steps.append(state["step"])
        _adagrad_(params, [p.grad for p in params], sums, steps, lr=_to_float(group["lr"]),
                  lr_decay=_to_float(group["lr_decay"]),
                  weight_decay=_to_float(group["weight_decay"]), eps=_to_float(group["eps"]),
                  maximize=group["maximize"])


class Adadelta(_FusedStep, torch.optim.Adadelta):
    __doc__ = "pyops twin of :class:`torch.optim.Adadelta`.\n\n" + (torch.optim.Adadelta.__doc__ or "")

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False):
        super().__init__(params, lr, rho, eps, weight_decay, foreach, capturable=capturable,
                         maximize=maximize, differentiable=differentiable)
        self._pyops_after_init()

    def _update(self, group, params):
        square_avgs, acc_deltas, steps = [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step()
                state["square_avg"] = _zeros_like(p)
                state["acc_delta"] = _zeros_like(p)
            square_avgs.append(state["square_avg"])
            acc_deltas.append(state["acc_delta"])
            steps.append(state["step"])
        _adadelta_(params, [p.grad for p in params], square_avgs, acc_deltas, steps,
                   lr=_to_float(group["lr"]), rho=_to_float(group["rho"]),
                   eps=_to_float(group["eps"]), weight_decay=_to_float(group["weight_decay"]),
                   maximize=group["maximize"])


class RMSprop(_FusedStep, torch.optim.RMSprop):
    __doc__ = "pyops twin of :class:`torch.optim.RMSprop`.\n\n" + (torch.optim.RMSprop.__doc__ or "")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable,
                         foreach, maximize, differentiable)
        self._pyops_after_init()

    def _update(self, group, params):
        momentum, centered = _to_float(group["momentum"]), group["centered"]
        square_avgs, grad_avgs, buffers, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step()
                state["square_avg"] = _zeros_like(p)
            # Created when first needed (torch creates them with the state only).
            if momentum > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = _zeros_like(p)
            if centered and "grad_avg" not in state:
                state["grad_avg"] = _zeros_like(p)
            square_avgs.append(state["square_avg"])
            steps.append(state["step"])
            if momentum > 0:
                buffers.append(state["momentum_buffer"])
            if centered:
                grad_avgs.append(state["grad_avg"])
        _rmsprop_(params, [p.grad for p in params], square_avgs, grad_avgs, buffers, steps,
                  lr=_to_float(group["lr"]), alpha=_to_float(group["alpha"]),
                  eps=_to_float(group["eps"]), weight_decay=_to_float(group["weight_decay"]),
                  momentum=momentum, centered=centered, maximize=group["maximize"])


class _AdamUpdate:
    def _update(self, group, params):
        amsgrad = group["amsgrad"]
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step()
                state["exp_avg"] = _zeros_like(p)
                state["exp_avg_sq"] = _zeros_like(p)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = _zeros_like(p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        beta1, beta2 = group["betas"]
        _adam_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
               lr=_to_float(group["lr"]), beta1=_to_float(beta1), beta2=_to_float(beta2),
               weight_decay=_to_float(group["weight_decay"]), eps=_to_float(group["eps"]),
               amsgrad=amsgrad, maximize=group["maximize"],
               decoupled_weight_decay=group["decoupled_weight_decay"])


class Adam(_AdamUpdate, _FusedStep, torch.optim.Adam):
    __doc__ = "pyops twin of :class:`torch.optim.Adam`.\n\n" + (torch.optim.Adam.__doc__ or "")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._pyops_after_init()


class AdamW(_AdamUpdate, _FusedStep, torch.optim.AdamW):
    __doc__ = "pyops twin of :class:`torch.optim.AdamW`.\n\n" + (torch.optim.AdamW.__doc__ or "")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._pyops_after_init()
