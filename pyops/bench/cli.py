"""Command line of ``python -m pyops.bench``."""

import argparse
import dataclasses
import datetime
import os
import time

import torch

import pyops
from pyops.bench import cases as case_modules
from pyops.bench import machine, report
from pyops.bench.case import Scale
from pyops.bench.runner import run_case
from pyops.bench.timing import Policy

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _split(text):
    return [item for item in text.split(",") if item]


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m pyops.bench",
        description="Time every pyops op against its native PyTorch twin, in the same "
        "process, interleaved. Quick by default.",
    )
    p.add_argument("--full", action="store_true",
                   help=f"the whole matrix: more sizes, dtypes {','.join(_DTYPES)}")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and one short round: checks the harness end to end; "
                   "the timings mean nothing")
    p.add_argument("--op", type=_split, default=[], metavar="NAMES",
                   help="comma-separated: a family, op or family/op name selects exactly "
                   "those cases; any other text selects the family/op names containing it")
    p.add_argument("--family", type=_split, default=list(case_modules.FAMILIES),
                   metavar="NAMES", help=f"comma-separated, of {','.join(case_modules.FAMILIES)}")
    p.add_argument("--device", type=_split, default=None, metavar="NAMES",
                   help="comma-separated, of cpu,cuda (default: cpu, and cuda if available)")
    p.add_argument("--dtype", type=_split, default=None, metavar="NAMES",
                   help=f"comma-separated, of {','.join(_DTYPES)} (default: float32; "
                   "all of them with --full)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="where results.json and speedup.png go (default: %(default)s)")
    return p


def _cuda_usable():
    return torch.cuda.is_available() and pyops.build_info()["cuda_kernels"]


def _resolve(parser, args):
    """Validates the arguments; returns (scale, devices, dtypes)."""
    if args.full and args.smoke:
        parser.error("--full and --smoke exclude each other")
    scale = Scale.FULL if args.full else Scale.SMOKE if args.smoke else Scale.QUICK
    for family in args.family:
        if family not in case_modules.FAMILIES:
            parser.error(f"--family: unknown family {family!r}; known: {case_modules.FAMILIES}")
    if args.device is None:
        devices = ["cpu", "cuda"] if _cuda_usable() else ["cpu"]
        if torch.cuda.is_available() and not _cuda_usable():
            print("note: a GPU is visible but pyops was built without CUDA kernels: CPU only")
    else:
        devices = args.device
        for device in devices:
            if device not in ("cpu", "cuda"):
                parser.error(f"--device: expected cpu or cuda, got {device!r}")
        if "cuda" in devices and not _cuda_usable():
            parser.error("--device cuda: no GPU visible, or pyops built without CUDA kernels")
    names = args.dtype or (_DTYPES if args.full else ("float32",))
    for name in names:
        if name not in _DTYPES:
            parser.error(f"--dtype: expected some of {','.join(_DTYPES)}, got {name!r}")
    return scale, devices, [getattr(torch, name) for name in names]


def select(cases, tokens):
    """The cases that the --op tokens select (all of them when there is no token)."""
    if not tokens:
        return cases
    exact = {name for c in cases for name in (c.family, c.op, c.qualname)}

    def selects(token, case):
        if token in exact:
            return token in (case.family, case.op, case.qualname)
        return token in case.qualname

    return [c for c in cases if any(selects(t, c) for t in tokens)]


def _references(scale, devices, policy):
    """Each device's copy bandwidth, measured first: the 100% of every later row."""
    rows = []
    for device in devices:
        copy, relu_ = machine.reference_cases(scale, device)
        copy_row = run_case(copy, policy)
        gbs = copy_row.native_gbs
        rows += [dataclasses.replace(copy_row, copy_gbs=gbs), run_case(relu_, policy, gbs)]
    return rows


def _write_outputs(out_dir, info, settings, rows):
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    report.write_json(json_path, info, settings, rows)
    print(f"wrote {json_path}")
    png_path = os.path.join(out_dir, "speedup.png")
    skipped = report.write_chart(png_path, rows)
    print(f"PNG chart skipped: {skipped}" if skipped else f"wrote {png_path}")


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    scale, devices, dtypes = _resolve(parser, args)
    cases = select(case_modules.collect(args.family, scale, devices, dtypes), args.op)
    if args.list:
        for case in cases:
            print(f"{case.label}  [{case.traffic}]")
        return 0
    if not cases:
        parser.error("no case matches the filters (see --list)")

    started = time.perf_counter()
    policy = Policy.for_scale(scale)
    rows = _references(scale, devices, policy)
    copy_gbs = {row.case.device: row.copy_gbs for row in rows}
    info = machine.describe(devices)
    print("\n".join(report.machine_header(info, copy_gbs)))
    print()
    print(report.table_header())
    for row in rows:
        print(report.table_row(row))
    settings = {
        "finished": None,  # set at the end: a partial results.json has none
        "scale": scale.value,
        "policy": dataclasses.asdict(policy),
        "devices": devices,
        "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
        "families": args.family,
        "op_filter": args.op,
        "elapsed_s": None,
    }
    os.makedirs(args.out, exist_ok=True)
    partial_json = os.path.join(args.out, "results.json")
    for case in cases:
        row = run_case(case, policy, copy_gbs[case.device])
        print(report.table_row(row), flush=True)
        rows.append(row)
        # Rewritten after every case, so a run stopped by a time limit keeps what it measured.
        report.write_json(partial_json, info, settings, rows)

    elapsed = time.perf_counter() - started
    print()
    print("\n".join(case_modules.summaries(args.family, rows) + report.summary(rows)))
    print(f"{len(rows)} rows in {elapsed:.0f} s")
    settings["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    settings["elapsed_s"] = elapsed
    _write_outputs(args.out, info, settings, rows)
    return 1 if any(r.error for r in rows) else 0
