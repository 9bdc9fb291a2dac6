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
from pyops.functional.conv import conv2d, conv2d_bias_act, conv_transpose2d  # noqa: F401

__all__ = ["relu", "relu_", "leaky_relu", "leaky_relu_", "sigmoid", "tanh", "bias_act",
           "conv2d", "conv_transpose2d", "conv2d_bias_act"]
