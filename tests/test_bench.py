"""The benchmark harness (python -m pyops.bench), end to end on tiny cases. Speed is
never asserted here (design section 5): only that the suite runs, checks and reports."""

import json
import sys

import pytest
import torch

from pyops.bench import Case, Scale, Traffic, cli, report, run_case
from pyops.bench.cases import collect
from pyops.bench.timing import Policy

_ROW_FIELDS = {
    "family", "op", "variant", "shape", "dtype", "device", "traffic", "bytes_moved",
    "checked", "error", "native_s", "pyops_s", "speedup", "native_gbs", "pyops_gbs",
    "copy_gbs", "native_pct_of_copy", "pyops_pct_of_copy", "native_rounds_s",
    "pyops_rounds_s", "flops", "native_gflops", "pyops_gflops",
}


def test_smoke_run_writes_checked_rows(tmp_path, capsys):
    status = cli.main(["--smoke", "--device", "cpu", "--op", "relu,bias_act",
                       "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "speed-up" in out

    result = json.loads((tmp_path / "results.json").read_text())
    assert result["machine"]["torch_threads"] == torch.get_num_threads()
    assert "cpu_capability" in result["machine"]["pyops"]
    rows = result["rows"]
    assert all(set(row) == _ROW_FIELDS for row in rows)

    references = [r for r in rows if r["family"] == "reference"]
    assert [r["op"] for r in references] == ["copy_", "relu_"]
    assert references[0]["native_gbs"] == pytest.approx(references[0]["copy_gbs"])

    cases = [r for r in rows if r["family"] != "reference"]
    assert {r["op"] for r in cases} == {"relu", "bias_act"}  # "relu" is exact: no leaky_relu
    assert {r["variant"] for r in cases if r["op"] == "relu"} == {
        "fwd", "fwd kernel in-place", "bwd autograd", "bwd kernel grad_input=", "fwd per-call",
    }
    for row in cases:
        assert row["error"] is None and row["checked"], row
        assert row["native_s"] > 0 and row["pyops_s"] > 0
        assert row["speedup"] == pytest.approx(row["native_s"] / row["pyops_s"])
        assert row["bytes_moved"] > 0 and row["pyops_pct_of_copy"] > 0
    relu_fwd = next(r for r in cases if r["op"] == "relu" and r["variant"] == "fwd")
    n = relu_fwd["shape"][0]
    assert relu_fwd["traffic"] == {"read": {"x": n}, "write": {"y": n}}
    assert relu_fwd["bytes_moved"] == 2 * n * 4


def _case(pyops_result):
    x = torch.arange(8.0)
    return Case("double", "fwd", (8,), torch.float32, "cpu",
                Traffic(read={"x": 8}, write={"y": 8}),
                lambda shape, dtype, device: (lambda: x * 2, lambda: pyops_result(x)),
                family="test")


def test_a_mismatch_is_reported_and_not_timed():
    row = run_case(_case(lambda x: x * 2 + 1), Policy.for_scale(Scale.SMOKE))
    assert not row.checked
    assert row.error.startswith("AssertionError")
    assert row.native_s is None and row.pyops_s is None


def test_a_match_is_timed():
    row = run_case(_case(lambda x: x + x), Policy.for_scale(Scale.SMOKE))
    assert row.checked and row.error is None
    assert row.speedup is not None


def test_op_filter_exact_names_then_substrings():
    cases = collect(["activation"], Scale.SMOKE, ["cpu"], [torch.float32])
    ops = lambda tokens: {c.op for c in cli.select(cases, tokens)}  # noqa: E731
    assert ops(["relu"]) == {"relu"}
    assert ops(["leaky"]) == {"leaky_relu"}
    assert ops(["elu"]) == {"relu", "leaky_relu"}
    assert ops(["activation/tanh", "bias_act"]) == {"tanh", "bias_act"}
    assert ops(["activation"]) == ops([]) == {"relu", "leaky_relu", "sigmoid", "tanh", "bias_act"}


def test_list_prints_every_case_of_the_full_matrix(capsys):
    assert cli.main(["--list", "--device", "cpu", "--full"]) == 0
    lines = capsys.readouterr().out.splitlines()
    dtypes = {line.split("  [")[0].split()[-2] for line in lines}
    assert dtypes == {"float32", "float64", "float16", "bfloat16"}
    assert all("[read " in line for line in lines)


def test_the_chart_is_skipped_with_a_reason_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    assert "matplotlib is not installed" in report.write_chart(tmp_path / "chart.png", [])


def test_pool_smoke_run_checks_every_case(tmp_path):
    assert cli.main(["--smoke", "--device", "cpu", "--family", "pool",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    cases = [r for r in rows if r["family"] == "pool"]
    assert {r["op"] for r in cases} == {"max_pool2d", "min_pool2d", "avg_pool2d",
                                        "relu_max_pool2d"}
    variants = {r["variant"] for r in cases}
    assert {"k2 nhwc fwd+bwd", "k3s2p1 nchw fwd", "k2 nchw indices fwd+bwd"} <= variants
    for row in cases:
        assert row["error"] is None and row["checked"], row


def test_optim_smoke_run_checks_every_row(tmp_path, capsys):
    status = cli.main(["--smoke", "--device", "cpu", "--family", "optim", "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "pyops vs torch's fastest step" in out  # the family's summary
    rows = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"]
            if r["family"] == "optim"]
    reference = [r for r in rows if r["variant"].startswith("reference")]
    assert len(reference) == 2 and all(r["native_gbs"] > 0 for r in reference)
    assert rows[0] is reference[0] and rows[-1] is reference[1]  # first and last
    cases = [r for r in rows if r not in reference]
    assert {r["op"] for r in cases} == {"sgd", "adagrad", "adadelta", "rmsprop", "adam", "adamw"}
    assert {r["variant"].split()[-1] for r in cases} == {"loop", "foreach", "fused"}
    for row in cases:
        assert row["error"] is None and row["checked"], row
        assert row["speedup"] > 0 and row["pyops_gbs"] > 0
    adam = next(r for r in cases if r["op"] == "adam" and r["variant"].endswith("fused"))
    n = adam["shape"][0]
    assert adam["bytes_moved"] == 7 * n * 4  # param, grad, exp_avg, exp_avg_sq read; 3 written


def _smoke_rows(tmp_path, family):
    assert cli.main(["--smoke", "--device", "cpu", "--family", family,
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    cases = [r for r in rows if r["family"] == family]
    for row in cases:
        assert row["error"] is None and row["checked"], row
    return cases


def test_conv_smoke_run_checks_every_case_and_reports_gflops(tmp_path):
    cases = _smoke_rows(tmp_path, "conv")
    assert {r["op"] for r in cases} == {"conv2d", "conv_transpose2d", "conv2d_bias_act"}
    assert {"depthwise fwd+bwd", "up_x2 fwd", "resnet_3x3 relu fwd+bwd"} <= {
        r["variant"] for r in cases}
    for row in cases:
        assert row["flops"] > 0 and row["pyops_gflops"] > 0
    # seed_conv1 smoke: x 2x1x9x11, w 5x1x3x3 -> y 2x5x7x9, 9 multiply-adds per output.
    forward = next(r for r in cases if r["variant"] == "seed_conv1 fwd")
    assert forward["flops"] == 2 * (2 * 5 * 7 * 9) * 9
    assert next(r for r in cases if r["variant"] == "seed_conv1 fwd+bwd")["flops"] == (
        3 * forward["flops"])


def test_dropout_smoke_run_checks_every_case(tmp_path):
    cases = _smoke_rows(tmp_path, "dropout")
    assert {r["variant"] for r in cases} == {"p0.25 fwd", "p0.25 fwd+bwd", "p0.5 fwd",
                                            "p0.5 fwd+bwd"}


def test_softmax_smoke_run_checks_every_case(tmp_path):
    cases = _smoke_rows(tmp_path, "softmax")
    assert {(r["op"], r["variant"]) for r in cases} >= {
        ("log_softmax", "dim=1 fwd+bwd"), ("log_softmax_nll_loss", "mean fwd+bwd")}


def test_linear_smoke_run_checks_every_case(tmp_path):
    cases = _smoke_rows(tmp_path, "linear")
    assert {r["op"] for r in cases} == {"linear", "linear_act"}
    assert all(r["flops"] > 0 for r in cases)


def test_seed_network_smoke_run_checks_the_steps(tmp_path):
    assert cli.main(["--smoke", "--device", "cpu", "--family", "seed",
                     "--out", str(tmp_path)]) == 0
    rows = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"]
            if r["family"] == "seed"]
    assert [r["variant"] for r in rows] == ["train step adadelta", "train step adadelta fused"]
    for row in rows:
        assert row["error"] is None and row["checked"] and row["speedup"] > 0
