"""The dropout family: a twin of torch.nn.functional.dropout. Masks come from a
counter-based generator keyed by torch's default generator, so torch.manual_seed makes
runs reproducible; they are not torch's masks bit for bit, but follow the same law:
P(zeroed) = p, kept values scaled by 1 / (1 - p)."""

import torch
from torch.overrides import handle_torch_function, has_torch_function_unary

_dropout = torch.ops.pyops.dropout.default
_dropout_ = torch.ops.pyops.dropout_.default


def dropout(input, p=0.5, training=True, inplace=False):
    """torch.nn.functional.dropout"""
    if has_torch_function_unary(input):
        return handle_torch_function(
            dropout, (input,), input, p=p, training=training, inplace=inplace
        )
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input  # the identity, as torch returns it
    if inplace:
        _dropout_(input, p)
        return input
    return _dropout(input, p)[0]
