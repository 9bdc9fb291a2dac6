"""Drop-in twins of torch.nn modules: each subclasses its torch.nn twin (isinstance
holds), takes the same constructor arguments and has the same parameters, buffers and
state_dict keys; only forward runs pyops kernels."""

import torch
from torch.nn.modules.pooling import _MaxPoolNd

from pyops import functional as F

__all__ = [
    "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Dropout", "LogSoftmax", "Linear",
    "MaxPool2d", "MinPool2d", "AvgPool2d", "Conv2d", "ConvTranspose2d",
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
    def _conv_forward(self, input, weight, bias):
        # Non-zero padding modes pad explicitly, then convolve without padding (as torch).
        if self.padding_mode != "zeros":
            padded = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                             mode=self.padding_mode)
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        # torch's own helper turns output_size into the output_padding that reaches it.
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)
