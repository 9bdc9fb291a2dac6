"""Drop-in twins of torch.nn modules: each subclasses its torch.nn twin (isinstance
holds), takes the same constructor arguments and has the same parameters, buffers and
state_dict keys; only forward runs pyops kernels."""

import torch

from pyops import functional as F

__all__ = ["ReLU", "LeakyReLU", "Sigmoid", "Tanh", "MaxPool2d", "MinPool2d", "AvgPool2d"]


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


class MaxPool2d(torch.nn.MaxPool2d):
    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MinPool2d(torch.nn.MaxPool2d):
    """Minimum pooling. torch has no twin: it subclasses torch.nn.MaxPool2d, whose
    constructor arguments, attributes and (empty) state_dict it shares, so code that
    configures or inspects pooling layers treats it alike; only forward differs."""

    def forward(self, input):
        return F.min_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    def forward(self, input):
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)
