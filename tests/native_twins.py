"""The native twin of every public function of pyops.functional: its torch.nn.functional
(or torch) counterpart, or for a pyops extra the native composition it fuses. Shared by
test_contract.py and test_fuzz.py."""

import torch
import torch.nn.functional as TF

_ACTIVATIONS = {
    "none": lambda x, slope: x,
    None: lambda x, slope: x,
    "relu": lambda x, slope: TF.relu(x),
    "leaky_relu": lambda x, slope: TF.leaky_relu(x, slope),
    "sigmoid": lambda x, slope: torch.sigmoid(x),
    "tanh": lambda x, slope: torch.tanh(x),
}


def native_bias_act(input, bias, activation="none", negative_slope=0.01):
    shape = (1, -1) + (1,) * (input.dim() - 2)
    return _ACTIVATIONS[activation](input + bias.view(shape), negative_slope)


def native_conv2d_bias_act(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                           activation="relu", negative_slope=0.01):
    out = TF.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _ACTIVATIONS[activation](out, negative_slope)


def as_pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def native_conv2d_zero_padded(input, weight, bias=None, stride=1, padding=0, dilation=1,
                              groups=1, activation="none", negative_slope=0.01):
    """torch's conv2d of the explicitly zero-padded input. Where an inf or NaN weight tap
    meets the padding, 0 * inf = NaN: what the zero-padded definition gives, what pyops
    and torch's im2col kernels compute; torch's oneDNN kernels skip the padding there, so
    torch's own answer for `padding=` depends on the kernel it picks."""
    ph, pw = as_pair(padding)
    out = TF.conv2d(TF.pad(input, (pw, pw, ph, ph)), weight, bias, stride, 0, dilation, groups)
    return _ACTIVATIONS[activation](out, negative_slope)


def native_conv_transpose2d_cropped(input, weight, bias=None, stride=1, padding=0,
                                    output_padding=0, groups=1, dilation=1):
    """torch's conv_transpose2d without padding, cropped: the transposed twin of
    native_conv2d_zero_padded (the cropped outputs get a zero gradient, and 0 * inf)."""
    out = TF.conv_transpose2d(input, weight, bias, stride, 0, output_padding, groups, dilation)
    ph, pw = as_pair(padding)
    return out[..., ph:out.shape[-2] - ph, pw:out.shape[-1] - pw]


def native_linear_act(input, weight, bias=None, activation="relu", negative_slope=0.01):
    return _ACTIVATIONS[activation](TF.linear(input, weight, bias), negative_slope)


def native_min_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                      return_indices=False):
    out = TF.max_pool2d(-input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                        return_indices=return_indices)
    return (-out[0], out[1]) if return_indices else -out


def native_relu_max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1,
                           ceil_mode=False):
    return TF.max_pool2d(TF.relu(input), kernel_size, stride, padding, dilation,
                         ceil_mode=ceil_mode)


def native_log_softmax_nll_loss(input, target, reduction="mean", ignore_index=-100):
    return TF.cross_entropy(input, target, reduction=reduction, ignore_index=ignore_index)


def native_dropout(input, p=0.5, training=True, inplace=False):
    """torch's dropout, input * (mask / (1 - p)) in the input's dtype (so a dropped NaN
    stays NaN), with pyops' mask: pyops draws masks from its own counter-based generator,
    which torch's masks cannot be compared with element by element."""
    with torch.random.fork_rng(devices=[]):
        TF.dropout(torch.zeros(1), p, training)  # torch's checks of p
    if not input.is_floating_point():
        return TF.dropout(input, p, training, inplace)  # torch's own answer
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0:
        noise = torch.zeros((), dtype=input.dtype, device=input.device)
    else:
        keep = torch.ops.pyops.dropout(input.detach(), p)[1]
        noise = keep.to(input.dtype).div_(1.0 - p)
    return input.mul_(noise) if inplace else input * noise


NATIVE = {
    "relu": TF.relu,
    "relu_": TF.relu_,
    "leaky_relu": TF.leaky_relu,
    "leaky_relu_": TF.leaky_relu_,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "bias_act": native_bias_act,
    "conv2d": TF.conv2d,
    "conv_transpose2d": TF.conv_transpose2d,
    "conv2d_bias_act": native_conv2d_bias_act,
    "dropout": native_dropout,
    "linear": TF.linear,
    "linear_act": native_linear_act,
    "max_pool2d": TF.max_pool2d,
    "min_pool2d": native_min_pool2d,
    "avg_pool2d": TF.avg_pool2d,
    "relu_max_pool2d": native_relu_max_pool2d,
    "log_softmax": TF.log_softmax,
    "log_softmax_nll_loss": native_log_softmax_nll_loss,
}
