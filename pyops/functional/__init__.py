"""Drop-in twins of torch.nn.functional running pyops kernels: same signatures,
defaults, shapes, dtypes and results. One module per op family; pyops extras (fused
ops torch does not have) say so in their docstrings."""

from pyops.functional.activation import (  # noqa: F401
    bias_act,
    leaky_relu,
    leaky_relu_,
    relu,
    relu_,
    sigmoid,
    tanh,
)
from pyops.functional.pool import (  # noqa: F401
    avg_pool2d,
    max_pool2d,
    min_pool2d,
    relu_max_pool2d,
)

__all__ = ["relu", "relu_", "leaky_relu", "leaky_relu_", "sigmoid", "tanh", "bias_act",
           "max_pool2d", "min_pool2d", "avg_pool2d", "relu_max_pool2d"]
