"""``register_fake`` plus the device check every pyops kernel makes.

The fake kernel is what runs on the Meta dispatch key, and the dispatcher picks that key
whenever one argument is a meta tensor, even if the others are on the CPU. Without this
check, ``conv2d(cpu_input, meta_weight)`` would return an uninitialized tensor and an
``out=`` or in-place call would silently do nothing. The check follows the operator's
schema, so every operator registered through here gets it, with the argument names and
wording of the C++ checks (``csrc/common/checks.h``).
"""

import functools

import torch
from torch.library import register_fake as _torch_register_fake

# Arguments that may stay on the CPU whatever the device of the others (as in torch's
# optimizers, the step counts are CPU scalars next to CUDA parameters).
_CPU_ALLOWED = frozenset({"state_steps"})


def _named_tensors(name, value):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                yield f"{name}[{i}]", item


def check_one_device(op_name, arg_names, args, kwargs):
    """Raise unless every tensor argument is on the device of the first one."""
    reference = None
    for i, arg_name in enumerate(arg_names):
        value = args[i] if i < len(args) else kwargs.get(arg_name)
        for label, tensor in _named_tensors(arg_name, value):
            if arg_name in _CPU_ALLOWED and tensor.device.type == "cpu":
                continue
            if reference is None:
                reference = (label, tensor.device)
            elif tensor.device != reference[1]:
                raise RuntimeError(
                    f"{op_name}: expected {label} to be on the device of {reference[0]} "
                    f"({reference[1]}), got {tensor.device}"
                )


def register_fake(qualname):
    """``torch.library.register_fake(qualname)``, the fake kernel preceded by the device
    check (see the module docstring). Returns the undecorated function."""
    namespace, _, rest = qualname.partition("::")
    name, _, overload = rest.partition(".")
    schema = getattr(getattr(getattr(torch.ops, namespace), name), overload or "default")._schema
    arg_names = [argument.name for argument in schema.arguments]
    op_name = f"{namespace}.{name}"

    def decorator(fake):
        @functools.wraps(fake)
        def checked(*args, **kwargs):
            check_one_device(op_name, arg_names, args, kwargs)
            return fake(*args, **kwargs)

        _torch_register_fake(qualname)(checked)
        return fake

    return decorator
