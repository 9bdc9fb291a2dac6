#!/usr/bin/env python3
"""Numerical agreement report: pyops and native PyTorch, each against a float64 reference.

For every op in pyops.functional.__all__ (its output and the gradient of each
differentiable input) and every optimizer configuration in pyops._samples (a few steps),
in float32, float16, bfloat16 and float64, this computes

    error = max |result - reference| / max |reference|, in units of the dtype's eps

for pyops and for native torch, where the reference is native torch run in float64 on
the same (dtype-rounded) inputs, on the CPU; each side's worst over a few input draws.
For optimizers the scale is how far the reference moved the parameters (max |p_ref - p_0|),
so the error of the update is not hidden under the parameters' own size.

    python scripts/accuracy_report.py                      # rewrites docs/ACCURACY.md
    python scripts/accuracy_report.py --device cuda --output /tmp/ACCURACY-cuda.md
    python scripts/accuracy_report.py --small --check      # what tests/test_accuracy.py runs

pyops must be importable (installed, or `PYTHONPATH=.` after an in-place build). The
script rewrites the part of the output file below MARKER and keeps the hand-written text
above it. ``--check`` exits with status 1 when pyops is less accurate than native anywhere
(``Row.within_bounds``). tests/test_accuracy.py imports this file and runs the same
comparison on small shapes.
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

import pyops
from pyops import _samples

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# pyops may be at most RATIO_BOUND times less accurate than native, or below the floor
# (in eps units of the dtype), whichever is larger. The floor covers results that are
# right to the last few bits either way (a different rounding of one intermediate). In
# float64 the reference *is* native float64 (native's error is exactly 0), so the floor
# there bounds how far a different but equally valid summation order may go.
RATIO_BOUND = 2.0
FLOOR_EPS = {torch.float32: 4.0, torch.float16: 4.0, torch.bfloat16: 4.0, torch.float64: 1024.0}
OPTIMIZER_STEPS = 5
# Seeds of the inputs (and of the gradients, offset) of each draw; the default report takes
# the worst of three draws.
DEFAULT_SEEDS = 3
_GRAD_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Row:
    op: str
    variant: str
    quantity: str  # "output", "grad input", "params after N steps", ...
    dtype: torch.dtype
    pyops_error: float  # in eps units of dtype
    native_error: float

    @property
    def ratio(self):
        if self.native_error == 0.0:
            return 1.0 if self.pyops_error == 0.0 else math.inf
        return self.pyops_error / self.native_error

    @property
    def within_bounds(self):
        return self.pyops_error <= max(RATIO_BOUND * self.native_error, FLOOR_EPS[self.dtype])


def eps(dtype):
    return torch.finfo(dtype).eps


def normalized_error(result, reference, scale, dtype):
    """max |result - reference| / scale, in eps units of `dtype` (inf for a NaN)."""
    diff = (result.detach().cpu().to(torch.float64) - reference.detach().cpu()).abs()
    if diff.numel() == 0:
        return 0.0
    worst = diff.max().item()
    if math.isnan(worst):
        return math.inf
    scale = float(scale)
    return (worst / scale if scale > 0 else worst) / eps(dtype)


def _max_abs(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


# ---- Functional ops ------------------------------------------------------------------------

def _call(fn, inputs, grad_positions, grad_output, seed, random):
    """fn(*inputs) and the gradients of the inputs at grad_positions for grad_output."""
    leaves = [t.detach().clone().requires_grad_(i in grad_positions) for i, t in enumerate(inputs)]
    if random:
        torch.manual_seed(seed)
    out = fn(*leaves)
    if grad_output is None:  # first call: only the shape is needed
        return out, None
    grads = torch.autograd.grad(out, [leaves[i] for i in grad_positions], grad_output)
    return out.detach(), grads


def _reference(sample, observed):
    inputs64 = [t.detach().cpu().to(torch.float64) if t.is_floating_point() else t.cpu()
                for t in sample.inputs]
    leaves = [t.requires_grad_(i in sample.grad_inputs) for i, t in enumerate(inputs64)]
    if sample.reference is not None:
        out = sample.reference(leaves, observed.cpu())
    else:
        out = sample.native(*leaves)
    return out, leaves


def sample_rows(sample, dtype, seed=0):
    """Rows (output and each gradient) of one functional sample in `dtype`."""
    probe, _ = _call(sample.pyops, sample.inputs, (), None, seed, sample.random)
    generator = torch.Generator().manual_seed(_GRAD_SEED_OFFSET + seed)
    grad_output = torch.randn(probe.shape, generator=generator, dtype=torch.float64)
    grad_output = grad_output.to(dtype).to(probe.device)

    errors = {}
    for impl in ("pyops", "native"):
        out, grads = _call(getattr(sample, impl), sample.inputs, sample.grad_inputs, grad_output,
                           seed, sample.random)
        ref_out, leaves = _reference(sample, out)
        ref_grads = torch.autograd.grad(ref_out, [leaves[i] for i in sample.grad_inputs],
                                        grad_output.cpu().to(torch.float64))
        errors[impl] = [normalized_error(out, ref_out, _max_abs(ref_out), dtype)] + [
            normalized_error(g, r, _max_abs(r), dtype) for g, r in zip(grads, ref_grads)]
    quantities = ["output"] + [f"grad {sample.names[i]}" for i in sample.grad_inputs]
    return [Row(sample.op, sample.variant, q, dtype, p, n)
            for q, p, n in zip(quantities, errors["pyops"], errors["native"])]


# ---- Optimizers ----------------------------------------------------------------------------

def _optimizer_run(cls, kwargs, params0, grads, dtype, device):
    params = [p.detach().to(device=device, dtype=dtype).clone() for p in params0]
    optimizer = cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=device, dtype=dtype)
        optimizer.step()
    return params


def optimizer_rows(config, dtype, device="cpu", *, steps=OPTIMIZER_STEPS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # 17,479 elements: cheap to update, and enough that the largest error is a steady
    # statistic (with a few hundred, one element's rounding of a tiny state decides it).
    shapes = [(1031,), (64, 257)]

    def draw(shape, scale):
        # Rounded to dtype, so that the float64 reference starts from the same values.
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    params0 = [draw(s, 0.1) for s in shapes]
    grads = [[draw(s, 0.1) for s in shapes] for _ in range(steps)]
    reference = _optimizer_run(getattr(torch.optim, config.name), config.kwargs, params0, grads,
                               torch.float64, "cpu")
    moved = max(_max_abs(r - p0.to(torch.float64)) for r, p0 in zip(reference, params0))
    errors = {}
    for impl, module in (("pyops", pyops.optim), ("native", torch.optim)):
        result = _optimizer_run(getattr(module, config.name), config.kwargs, params0, grads,
                                dtype, device)
        errors[impl] = max(normalized_error(p, r, moved, dtype) for p, r in zip(result, reference))
    return [Row(f"optim.{config.name}", config.variant, f"params after {steps} steps", dtype,
                errors["pyops"], errors["native"])]


# ---- The whole table -----------------------------------------------------------------------

def worst_over_seeds(rows_per_seed):
    """One row per (op, variant, quantity, dtype): the largest error of each side over
    the draws. A single draw's maximum error is noisy (one unlucky element); the worst of
    a few draws is a steadier estimate of what each implementation can be off by."""
    worst = {}
    for rows in rows_per_seed:
        for r in rows:
            key = (r.op, r.variant, r.quantity, r.dtype)
            if key not in worst:
                worst[key] = r
            else:
                w = worst[key]
                worst[key] = Row(r.op, r.variant, r.quantity, r.dtype,
                                 max(w.pyops_error, r.pyops_error),
                                 max(w.native_error, r.native_error))
    return list(worst.values())


def collect(device="cpu", dtypes=DTYPES, *, large=True, ops=None, optimizers=True, seeds=(0,)):
    """Every row: each functional op (or those in `ops`) and optimizer config, each dtype,
    the worst error of each side over the inputs drawn with each of `seeds`."""
    rows_per_seed = []
    for seed in seeds:
        rows = []
        for dtype in dtypes:
            for sample in _samples.functional_samples(dtype, device, large=large, seed=seed,
                                                      ops=ops):
                rows.extend(sample_rows(sample, dtype, seed))
            if optimizers:
                for config in _samples.OPTIMIZER_CONFIGS:
                    rows.extend(optimizer_rows(config, dtype, device, seed=seed))
        rows_per_seed.append(rows)
    return worst_over_seeds(rows_per_seed)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _fmt(value):
    if value == 0.0:
        return "0"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def _fmt_ratio(row):
    if row.native_error == 0.0 and row.pyops_error == 0.0:
        return "exact"
    if row.native_error == 0.0:
        return "n/a" if row.dtype == torch.float64 else "inf"
    if math.isinf(row.native_error) and not math.isinf(row.pyops_error):
        return "native inf"
    return f"{row.ratio:.2f}"


# Where the generated part of docs/ACCURACY.md begins: the text above it is written by
# hand (findings, explanations) and kept when the script rewrites the file.
MARKER = "<!-- Generated by scripts/accuracy_report.py from here on: do not edit below. -->"


def render_markdown(rows, *, device, command, seconds, seeds):
    """The generated part of docs/ACCURACY.md: how it was run, the worst ratios, every row."""
    finite = [r for r in rows if r.native_error > 0 and not math.isinf(r.native_error)]
    by_ratio = sorted(finite, key=lambda r: r.ratio, reverse=True)
    failing = [r for r in rows if not r.within_bounds]
    info = pyops.build_info()
    header = "| op | variant | quantity | dtype | pyops error | native error | ratio |"
    rule = "| --- | --- | --- | --- | ---: | ---: | ---: |"
    lines = [
        MARKER,
        "",
        "## How this table was made",
        "",
        "For each op and dtype: the maximum error of pyops and of native torch against native",
        "torch run in float64 on the same dtype-rounded inputs (on the CPU), as",
        "",
        "    error = max |result - reference| / max |reference|   in units of the dtype's eps",
        "",
        "(eps: 1.19e-07 float32, 9.77e-04 float16, 7.81e-03 bfloat16, 2.22e-16 float64), the",
        f"worst of {seeds} input draws for each side. Gradients use one random `grad_output`",
        f"(rounded to the dtype) for both. Optimizers run {OPTIMIZER_STEPS} steps on the same",
        "parameters and gradients (17,479 elements); their error is scaled by how far the",
        "reference moved the parameters (max |p_ref - p_0|) instead of max |p_ref|. Dropout's",
        "reference is the exact result for the mask each implementation drew. `ratio` = pyops",
        "error / native error (below 1: pyops is the more accurate). In float64 the reference",
        "is native itself: native's error is 0 and the pyops column is its distance from native.",
        "",
        f"Bound (`--check`, `tests/test_accuracy.py`): pyops error <= max({RATIO_BOUND:g} x native"
        " error, floor), floor = "
        + ", ".join(f"{FLOOR_EPS[d]:g} eps ({_dtype_name(d)})" for d in DTYPES) + ".",
        "",
        f"Run: `{command}` on {device} ({platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, pyops CPU kernels {info['cpu_capability']}, "
        f"{datetime.date.today().isoformat()}, {seconds:.0f} s: {len(rows)} rows, "
        f"{len(failing)} outside the bound.",
        "",
        "## Worst ratios",
        "",
        header,
        rule,
    ]
    lines += [_table_line(r) for r in by_ratio[:12]]
    lines += ["", "## Every op", "", header, rule]
    lines += [_table_line(r) for r in rows]
    return "\n".join(lines) + "\n"


_DEFAULT_PREAMBLE = "# Numerical agreement: pyops and native PyTorch against a float64 reference\n\n"


def write_report(path, generated):
    """Replaces the generated part of `path`, keeping the hand-written text above MARKER."""
    preamble = _DEFAULT_PREAMBLE
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        if MARKER in text:
            preamble = text[:text.index(MARKER)]
    with open(path, "w") as f:
        f.write(preamble + generated)


def _table_line(r):
    flag = "" if r.within_bounds else " **(outside bound)**"
    return (f"| {r.op} | {r.variant} | {r.quantity} | {_dtype_name(r.dtype)} | "
            f"{_fmt(r.pyops_error)} | {_fmt(r.native_error)} | {_fmt_ratio(r)}{flag} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", action="append", choices=[_dtype_name(d) for d in DTYPES],
                        help="repeat to select several (default: all)")
    parser.add_argument("--op", action="append", help="functional op to include (default: all)")
    parser.add_argument("--no-optimizers", action="store_true")
    parser.add_argument("--small", action="store_true", help="the tests' small shapes")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help="input draws per op; each side's worst error over them is shown")
    parser.add_argument("--output", default=os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "ACCURACY.md"))
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if pyops is less accurate than native beyond the bound")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else list(DTYPES)
    start = time.perf_counter()
    rows = collect(args.device, dtypes, large=not args.small, ops=args.op,
                   optimizers=not args.no_optimizers, seeds=range(args.seeds))
    seconds = time.perf_counter() - start
    command = "python scripts/accuracy_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(args.output, render_markdown(rows, device=args.device, command=command.strip(),
                                              seconds=seconds, seeds=args.seeds))
    failing = [r for r in rows if not r.within_bounds]
    print(f"{len(rows)} rows in {seconds:.1f} s, written to {args.output}; "
          f"{len(failing)} outside the bound")
    for r in failing:
        print("  " + _table_line(r))
    return 1 if args.check and failing else 0


if __name__ == "__main__":
    sys.exit(main())
