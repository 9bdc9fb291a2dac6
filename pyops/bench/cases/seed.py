"""The seed network's training step (DESIGN.md): forward, nll loss, backward and
Adadelta(lr=0.5) at batch 64 on 28x28 inputs, dropout on. Native: the torch model and
torch.optim.Adadelta. pyops: a copy of the same model swapped with pyops.convert and its
optimizer with pyops.convert_optimizer; the "fused" row converts with fuse=True (conv ->
relu and linear -> relu become single pyops operators).

FLOPs per step (multiply-add = 2): forward conv1 2*64*32*26*26*9 = 24.9M, conv2
2*64*64*24*24*32*9 = 1.36G, fc1 2*64*9216*128 = 151M, fc2 2*64*128*10; the backward twice
that: about 4.6 GFLOP. Traffic: the input batch, and the optimizer's pass over the 1.2M
parameters (read param, grad, square_avg, acc_delta; write param, square_avg, acc_delta).

The check: before timing, both models in eval mode (dropout off) give the same log
probabilities; the timed steps (which diverge through their dropout masks) must give
finite losses.
"""

import copy
import functools
import math

import torch
from torch import nn

import pyops
from pyops.bench.case import Case, Scale, Traffic

_BATCH = {Scale.SMOKE: 4, Scale.QUICK: 64, Scale.FULL: 64}


def seed_network():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10), nn.LogSoftmax(dim=1),
    )


def _setup(shape, dtype, device, fuse):
    torch.manual_seed(0)
    native = seed_network().to(device=device, dtype=dtype)
    converted = copy.deepcopy(native)
    native_opt = torch.optim.Adadelta(native.parameters(), lr=0.5)
    converted_opt = torch.optim.Adadelta(converted.parameters(), lr=0.5)
    converted = pyops.convert(converted, fuse=fuse)
    pyops.convert_optimizer(converted_opt)
    x = torch.randn(shape, dtype=dtype, device=device)
    target = torch.randint(0, 10, (shape[0],), device=device)
    with torch.no_grad():
        native.eval(), converted.eval()
        torch.testing.assert_close(converted(x), native(x), rtol=1e-4, atol=1e-4)
        native.train(), converted.train()

    def step(model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.nll_loss(model(x), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return (lambda: step(native, native_opt)), (lambda: step(converted, converted_opt))


def _check(actual, expected):
    assert math.isfinite(float(actual)) and math.isfinite(float(expected)), (actual, expected)


def cases(scale, device, dtype):
    if dtype != torch.float32:
        return []  # the seed network trains in float32
    batch = _BATCH[scale]
    params = sum(p.numel() for p in seed_network().parameters())
    forward_flops = 2 * batch * (32 * 26 * 26 * 9 + 64 * 24 * 24 * 32 * 9 + 9216 * 128 + 128 * 10)
    traffic = Traffic(read={"input": batch * 28 * 28, "param": params, "grad": params,
                            "square_avg": params, "acc_delta": params},
                      write={"param": params, "square_avg": params, "acc_delta": params})
    return [Case("seed_network", f"train step adadelta{' fused' if fuse else ''}",
                 (batch, 1, 28, 28), dtype, device, traffic,
                 functools.partial(_setup, fuse=fuse), check=_check, flops=3 * forward_flops)
            for fuse in (False, True)]
