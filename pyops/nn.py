"""Drop-in twins of torch.nn modules: each subclasses its torch.nn twin (isinstance
holds), takes the same constructor arguments and has the same parameters, buffers and
state_dict keys; only forward runs pyops kernels."""

import torch
from torch.nn.modules.pooling import _MaxPoolNd

from pyops import functional as F

__all__ = [
    "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Dropout", "LogSoftmax", "Linear",
    "MaxPool2d", "MinPool2d", "AvgPool2d", "Conv2d", "ConvTranspose2d",
    # fused modules (pyops extras; pyops.convert(model, fuse=True) builds them)
    "Conv2dAct", "LinearAct", "ReLUMaxPool2d",
]


class ReLU(torch.nn.ReLU):
    def forward(self, input):
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, input):
        return F.sigmoid(input)


class Tanh(torch.nn.Tanh):
    def forward(self, input):
        return F.tanh(input)


class Dropout(torch.nn.Dropout):
    def forward(self, input):
        return F.dropout(input, self.p, self.training, self.inplace)


class LogSoftmax(torch.nn.LogSoftmax):
    def forward(self, input):
        return F.log_softmax(input, self.dim, _stacklevel=5)


class MaxPool2d(torch.nn.MaxPool2d):
    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MinPool2d(_MaxPoolNd):
    """Minimum pooling. torch has no twin: it shares torch.nn.MaxPool2d's base class
    (constructor arguments, attributes, repr and empty state_dict) but is not an
    instance of MaxPool2d, so code that swaps or special-cases max pooling leaves it
    alone."""

    def forward(self, input):
        return F.min_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    def forward(self, input):
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


class Linear(torch.nn.Linear):
    def forward(self, input):
        return F.linear(input, self.weight, self.bias)


class Conv2d(torch.nn.Conv2d):
    def _padded(self, input):
        """(input, padding) for the convolution: non-zero padding modes pad explicitly,
        then convolve without padding (as torch)."""
        if self.padding_mode != "zeros":
            return torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                           mode=self.padding_mode), 0
        return input, self.padding

    def _conv_forward(self, input, weight, bias):
        input, padding = self._padded(input)
        return F.conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        # torch's own helper turns output_size into the output_padding that reaches it.
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)


# Fused modules: pyops extras with no torch twin. The ones with parameters subclass their
# pyops (and so torch) layer: same constructor arguments plus the activation, same
# parameters and state_dict keys, and isinstance(m, torch.nn.Conv2d) holds, so code that
# initialises weights or builds weight-decay groups by layer type still finds them.

_FUSED_ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh")


def _checked_activation(activation):
    if activation not in _FUSED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, _FUSED_ACTIVATIONS))}, "
                         f"got {activation!r}")
    return activation


def _activation_repr(activation, negative_slope):
    if activation == "leaky_relu":
        return f"activation={activation}, negative_slope={negative_slope}"
    return f"activation={activation}"


class Conv2dAct(Conv2d):
    """pyops extra: ``activation(conv2d(input) + bias)`` in one operator
    (``pyops.functional.conv2d_bias_act``: bias and activation applied in the
    convolution's epilogue). Conv2d's arguments plus ``activation`` (``"relu"``,
    ``"leaky_relu"``, ``"sigmoid"``, ``"tanh"``) and ``negative_slope`` (leaky_relu)."""

    def __init__(self, *args, activation="relu", negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _checked_activation(activation)
        self.negative_slope = negative_slope

    @classmethod
    def fuse(cls, conv, activation, negative_slope=0.01):
        """A Conv2dAct computing ``activation(conv(input))`` that holds ``conv``'s own
        Parameter objects (built on the meta device first: no allocation, and the
        random number generator is not advanced)."""
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, device="meta", activation=activation,
                    negative_slope=negative_slope)
        fused.weight, fused.bias = conv.weight, conv.bias
        return fused.train(conv.training)

    def forward(self, input):
        input, padding = self._padded(input)
        return F.conv2d_bias_act(input, self.weight, self.bias, self.stride, padding,
                                 self.dilation, self.groups, self.activation, self.negative_slope)

    def extra_repr(self):
        return f"{super().extra_repr()}, {_activation_repr(self.activation, self.negative_slope)}"


class LinearAct(Linear):
    """pyops extra: ``activation(input @ weight.T + bias)`` in one operator
    (``pyops.functional.linear_act``: ATen's GEMM, then bias and activation in one pass).
    Linear's arguments plus ``activation`` and ``negative_slope``, as Conv2dAct."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 activation="relu", negative_slope=0.01):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = _checked_activation(activation)
        self.negative_slope = negative_slope

    @classmethod
    def fuse(cls, linear, activation, negative_slope=0.01):
        """A LinearAct computing ``activation(linear(input))`` that holds ``linear``'s
        own Parameter objects."""
        fused = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device="meta", activation=activation, negative_slope=negative_slope)
        fused.weight, fused.bias = linear.weight, linear.bias
        return fused.train(linear.training)

    def forward(self, input):
        return F.linear_act(input, self.weight, self.bias, self.activation, self.negative_slope)

    def extra_repr(self):
        return f"{super().extra_repr()}, {_activation_repr(self.activation, self.negative_slope)}"


class ReLUMaxPool2d(_MaxPoolNd):
    """pyops extra: ``max_pool2d(relu(input))`` in one pass
    (``pyops.functional.relu_max_pool2d``). MaxPool2d's arguments without
    ``return_indices``. Like MinPool2d it shares MaxPool2d's base class but is no
    MaxPool2d: code that special-cases max pooling must not miss its relu."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__(kernel_size, stride, padding, dilation, return_indices=False,
                         ceil_mode=ceil_mode)

    @classmethod
    def fuse(cls, pool):
        """The ReLUMaxPool2d computing ``pool(relu(input))`` for a MaxPool2d ``pool``
        (without return_indices)."""
        if pool.return_indices:
            raise ValueError("ReLUMaxPool2d.fuse: the pool must not return indices")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                   pool.ceil_mode).train(pool.training)

    def forward(self, input):
        return F.relu_max_pool2d(input, self.kernel_size, self.stride, self.padding,
                                 self.dilation, self.ceil_mode)
