"""Drop-in twins of torch.nn modules: each subclasses its torch.nn twin (isinstance
holds), takes the same constructor arguments and has the same parameters, buffers and
state_dict keys; only forward runs pyops kernels."""

import torch

from pyops import functional as F

__all__ = ["ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Dropout", "LogSoftmax"]


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
