"""Fresh CPU outputs of 4 MB or more are advised to the kernel as huge-page memory
(csrc/common/memory.h): the flag must reach the output's memory mapping, stay off below
the threshold and with PYOPS_HUGE_PAGES=0, and never change a value.

Float32 outputs of 16 MB or more that a kernel writes once are stored around the caches
(non-temporal stores, csrc/common/cpu_loops.h on AVX-512): those paths must give the
values of the normal stores, aligned or not, in place or not.

The mapping's flags come from /proc/self/smaps, where MADV_HUGEPAGE shows as "hg".
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pyops.functional as P

THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGE_PAGE = 2 << 20

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists(THP_MODE_FILE),
    reason="huge-page advice is Linux-only (no /sys/kernel/mm/transparent_hugepage)",
)


def _vm_flags(address):
    """The VmFlags of the mapping holding `address` in this process."""
    start = end = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(part, 16) for part in head.split("-"))
                start, end = lo, hi
            elif head == "VmFlags:" and start <= address < end:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds address {address:#x}")


def _interior(t):
    """An address inside the 2 MB-aligned interior of `t`'s memory."""
    first = (t.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    assert first + HUGE_PAGE <= t.data_ptr() + t.nbytes, "tensor too small for the test"
    return first


LARGE = 4 << 20  # elements: 16 MB of float32
OUTPUTS = {
    "relu": lambda x: P.relu(x),
    "dropout": lambda x: P.dropout(x, 0.5, training=True),
    "log_softmax": lambda x: P.log_softmax(x.view(1024, -1), dim=1),
    "max_pool2d": lambda x: P.max_pool2d(x.view(16, 16, 128, 128), 1),
}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_large_outputs_are_advised_huge_pages(name):
    x = torch.randn(LARGE)
    out = OUTPUTS[name](x)
    assert "hg" in _vm_flags(_interior(out))


def test_backward_outputs_are_advised_huge_pages():
    x = torch.randn(LARGE, requires_grad=True)
    (grad_input,) = torch.autograd.grad(P.sigmoid(x), x, torch.ones(LARGE))
    assert "hg" in _vm_flags(_interior(grad_input))


def test_linear_output_is_advised_huge_pages():
    x, w, b = torch.randn(2048, 64), torch.randn(1024, 64), torch.randn(1024)
    out = P.linear(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b))
    assert "hg" in _vm_flags(_interior(out))


def test_values_match_native():
    x = torch.randn(LARGE)
    # sigmoid has its own float32 exp (within 2 ulp of torch's); relu is exact.
    torch.testing.assert_close(P.sigmoid(x), torch.sigmoid(x))
    torch.testing.assert_close(P.relu(x), torch.relu(x), rtol=0, atol=0)


def test_off_with_environment_variable():
    # A fresh process: the switch is read once per process.
    code = (
        "import sys, torch, pyops.functional as P\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_memory import _vm_flags, _interior\n"
        "out = P.relu(torch.randn(4 << 20))\n"
        "print('hg' in _vm_flags(_interior(out)))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYOPS_HUGE_PAGES="0")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


STREAMED = LARGE  # 16 MB of float32: the smallest output that streams


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_streamed_elementwise_outputs_match_native(offset):
    # offset 1: out= starts 4 bytes past a 64-byte boundary and cannot stream.
    x = torch.randn(STREAMED + offset)[offset:]
    grad = torch.randn(STREAMED)
    out = torch.empty(STREAMED + offset)[offset:]
    torch.testing.assert_close(P.relu(x), torch.relu(x), rtol=0, atol=0)
    torch.ops.pyops.leaky_relu.out(x, 0.1, out=out)
    torch.testing.assert_close(out, F.leaky_relu(x, 0.1), rtol=0, atol=0)
    y = torch.sigmoid(x)
    torch.ops.pyops._sigmoid_backward.grad_input(grad, y, grad_input=out)
    torch.testing.assert_close(out, torch.ops.aten.sigmoid_backward(grad, y))
    inplace = x.clone()
    P.relu(inplace, inplace=True)
    torch.testing.assert_close(inplace, torch.relu(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1024, 4096), (64, 64, 32, 32)], ids=["rows", "planes"])
def test_streamed_bias_act_matches_native(shape):
    x = torch.randn(shape, requires_grad=True)
    bias = torch.randn(shape[1], requires_grad=True)
    grad = torch.randn(shape)
    view = (-1,) + (1,) * (len(shape) - 2)
    actual = P.bias_act(x, bias, "relu")
    expected = torch.relu(x + bias.view(view))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    grad_x, grad_bias = torch.autograd.grad(actual, (x, bias), grad)
    torch.testing.assert_close(grad_x, grad * (expected > 0), rtol=0, atol=0)
    # The bias gradient sums 65536 terms of either sign, in another order than native:
    # held to the float64 sum, within float rounding of the sum of the terms' magnitudes.
    terms = (grad * (expected > 0)).double()
    dims = [d for d in range(len(shape)) if d != 1]
    error = (grad_bias.double() - terms.sum(dims)).abs()
    assert (error <= 1e-5 * terms.abs().sum(dims)).all(), error.max()
