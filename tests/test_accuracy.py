"""pyops is not less accurate than native torch: scripts/accuracy_report.py's comparison
(each against a float64 reference computed on the CPU) on small shapes, on each device, for every op in
pyops.functional.__all__ and every optimizer configuration in pyops._samples, in every
dtype. The bound is the script's: pyops error <= max(2 x native error, a few eps), each
side's error the worst over the same few input draws."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import pyops.functional as pf
from pyops import _samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_report():
    spec = importlib.util.spec_from_file_location(
        "accuracy_report", os.path.join(ROOT, "scripts", "accuracy_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()
SEEDS = range(report.DEFAULT_SEEDS)  # the worst of a few draws, as the report takes
DTYPES = pytest.mark.parametrize("dtype", report.DTYPES,
                                 ids=lambda d: str(d).removeprefix("torch."))


def _assert_within_bounds(rows):
    assert rows
    outside = [report._table_line(r) for r in rows if not r.within_bounds]
    assert not outside, "pyops less accurate than native:\n" + "\n".join(outside)


@DTYPES
@pytest.mark.parametrize("op", pf.__all__)
def test_functional_is_as_accurate_as_native(device, op, dtype):
    rows = report.collect(device, [dtype], large=False, ops=[op], optimizers=False, seeds=SEEDS)
    _assert_within_bounds(rows)
    assert {r.quantity for r in rows} >= {"output"}


@DTYPES
@pytest.mark.parametrize("config", _samples.OPTIMIZER_CONFIGS,
                         ids=lambda c: f"{c.name}-{c.variant.replace(' ', '_')}")
def test_optimizer_is_as_accurate_as_native(device, config, dtype):
    _assert_within_bounds(report.worst_over_seeds(
        report.optimizer_rows(config, dtype, device, seed=seed) for seed in SEEDS))


def test_errors_are_in_eps_units():
    reference = torch.tensor([4.0, -2.0, 1.0], dtype=torch.float64)
    one_ulp_at_max = reference.clone()
    one_ulp_at_max[0] = 4.0 * (1 + torch.finfo(torch.bfloat16).eps)
    assert report.normalized_error(one_ulp_at_max.to(torch.bfloat16), reference, 4.0,
                                   torch.bfloat16) == pytest.approx(1.0)
    assert report.normalized_error(reference.to(torch.float32), reference, 4.0, torch.float32) == 0
    nan = reference.clone()
    nan[1] = float("nan")
    assert report.normalized_error(nan, reference, 4.0, torch.float64) == float("inf")


def test_a_less_accurate_kernel_is_caught():
    # The flaw this comparison found in conv2d_bias_act's bfloat16 GEMM path: the GEMM
    # output rounded to bfloat16 before the bias and relu, which turns pre-activations near
    # 0 into zeros or flips their sign, and with them relu's gradient mask. The bound must
    # flag such a kernel, or it checks nothing.
    sample = _samples.functional_samples(torch.bfloat16, ops=["conv2d_bias_act"], large=True)[0]
    assert sample.variant == "relu 3x3 gemm"

    def rounded_before_bias(x, w, b):
        return torch.relu(F.conv2d(x, w, padding=1) + b.view(1, -1, 1, 1))

    flawed = _samples.Sample(sample.op, "flawed", sample.inputs, sample.names,
                             rounded_before_bias, sample.native, sample.grad_inputs)
    rows = report.sample_rows(flawed, torch.bfloat16)
    assert any(not r.within_bounds for r in rows), [report._table_line(r) for r in rows]


def test_script_writes_the_table_below_the_hand_written_text(tmp_path):
    output = tmp_path / "ACCURACY.md"
    output.write_text("# Accuracy\n\nFindings written by hand.\n\n" + report.MARKER + "\nold table\n")
    status = report.main(["--small", "--seeds", "1", "--dtype", "float32", "--op", "relu",
                          "--op", "linear", "--no-optimizers", "--check", "--output", str(output)])
    assert status == 0
    text = output.read_text()
    assert text.startswith("# Accuracy\n\nFindings written by hand.\n\n" + report.MARKER)
    assert "old table" not in text
    assert "| relu |  | output | float32 |" in text
    assert "| linear |  | grad weight | float32 |" in text
