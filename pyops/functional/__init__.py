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
from pyops.functional.dropout import dropout  # noqa: F401
from pyops.functional.linear import linear, linear_act  # noqa: F401
from pyops.functional.pool import (  # noqa: F401
    avg_pool2d,
    max_pool2d,
    min_pool2d,
    relu_max_pool2d,
)
from pyops.functional.softmax import log_softmax, log_softmax_nll_loss  # noqa: F401

__all__ = [
    # activation
    "relu", "relu_", "leaky_relu", "leaky_relu_", "sigmoid", "tanh", "bias_act",
    # conv
    "conv2d", "conv_transpose2d", "conv2d_bias_act",
    # dropout
    "dropout",
    # linear
    "linear", "linear_act",
    # pool
    "max_pool2d", "min_pool2d", "avg_pool2d", "relu_max_pool2d",
    # softmax
    "log_softmax", "log_softmax_nll_loss",
]
