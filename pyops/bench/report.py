"""The three outputs of a run: a fixed-width table, JSON and a PNG chart."""

import json
import math


def _time(seconds):
    if seconds is None:
        return ""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _num(value, spec, suffix=""):
    return "" if value is None else f"{value:{spec}}{suffix}"


# (title, width, getter). The first five name the case; error rows stop after them.
_COLUMNS = (
    ("op", 20, lambda r: r.case.op),
    ("variant", 24, lambda r: r.case.variant),
    ("shape", 12, lambda r: r.case.shape_str),
    ("dtype", 8, lambda r: r.case.dtype_name),
    ("dev", 4, lambda r: r.case.device),
    ("native", 9, lambda r: _time(r.native_s)),
    ("pyops", 9, lambda r: _time(r.pyops_s)),
    ("speed-up", 8, lambda r: _num(r.speedup, ".2f", "x")),
    ("MB", 7, lambda r: _num(r.case.bytes_moved / 1e6, ".1f")),
    ("native GB/s", 11, lambda r: _num(r.native_gbs, ".1f")),
    ("pyops GB/s", 10, lambda r: _num(r.pyops_gbs, ".1f")),
    ("% copy", 6, lambda r: _num(r.pyops_pct_of_copy, ".0f")),
    ("pyops GFLOP/s", 13, lambda r: _num(r.pyops_gflops, ".1f")),  # compute-bound cases only
)
_KEY_COLUMNS = 5


def _line(cells):
    # Text columns align left, numbers right.
    return " ".join(
        f"{cell:<{width}}" if i < _KEY_COLUMNS else f"{cell:>{width}}"
        for i, (cell, (_, width, _)) in enumerate(zip(cells, _COLUMNS))
    ).rstrip()


def table_header():
    return _line([title for title, _, _ in _COLUMNS])


def table_row(row):
    if row.error:
        key = _line([get(row) for _, _, get in _COLUMNS[:_KEY_COLUMNS]])
        return f"{key}  ERROR {row.error[:200]}"
    return _line([get(row) for _, _, get in _COLUMNS])


def machine_header(machine, copy_gbs):
    """The lines naming the machine and its measured copy bandwidth per device."""
    pyops = machine["pyops"]
    cuda = "with CUDA kernels" if pyops["cuda_kernels"] else "CPU kernels only"
    bandwidth = ", ".join(f"{device} {gbs:.1f} GB/s" for device, gbs in copy_gbs.items())
    return [
        f"pyops {pyops['pyops_version']} ({cuda}) | torch {machine['torch']}"
        f" | Python {machine['python']}",
        f"CPU: {machine['cpu']} | {machine['torch_threads']} torch threads"
        f" | pyops CPU kernels: {machine['cpu_capability']} | GPU: {machine['gpu'] or 'none'}",
        f"copy bandwidth (dst.copy_(src), read + write bytes): {bandwidth or 'not measured'}",
        "speed-up = native time / pyops time; GB/s = bytes the op must move / time;"
        " % copy = pyops GB/s / copy bandwidth",
        "pyops GFLOP/s (convolutions, GEMMs) = FLOPs the op must do"
        " (a multiply-add counts 2) / pyops time",
    ]


def summary(rows):
    """One line per device: the geometric mean speed-up of its timed cases."""
    lines = []
    for device in dict.fromkeys(r.case.device for r in rows):
        speedups = [r.speedup for r in rows if r.case.device == device and r.speedup]
        if speedups:
            mean = math.exp(sum(map(math.log, speedups)) / len(speedups))
            faster = sum(s > 1 for s in speedups)
            lines.append(
                f"{device}: geometric mean speed-up {mean:.2f}x over {len(speedups)} cases"
                f" (pyops faster in {faster})"
            )
    errors = sum(1 for r in rows if r.error)
    if errors:
        lines.append(f"{errors} case(s) failed: see ERROR rows")
    return lines


def write_json(path, machine, settings, rows):
    with open(path, "w") as f:
        json.dump(
            {"machine": machine, "settings": settings, "rows": [r.to_json() for r in rows]},
            f,
            indent=1,
        )


def write_chart(path, rows):
    """Speed-up per case as horizontal bars. Returns why it was skipped, or None."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state
        from matplotlib.ticker import FuncFormatter
    except ImportError as error:
        return f"matplotlib is not installed ({error}); `pip install matplotlib` for the chart"
    timed = [r for r in rows if r.speedup is not None]
    if not timed:
        return "no timed case"
    fig = Figure(figsize=(10, 1.2 + 0.25 * len(timed)), layout="constrained")
    ax = fig.add_subplot()
    y = range(len(timed))
    # Bars grow from 1x: right (green) where pyops is faster, left (red) where slower.
    bars = ax.barh(y, [r.speedup - 1 for r in timed], left=1,
                   color=["tab:green" if r.speedup >= 1 else "tab:red" for r in timed])
    ax.bar_label(bars, [f"{r.speedup:.2f}x" for r in timed], fontsize=7, padding=2)
    ax.margins(x=0.1)  # room for the labels
    ax.set_yticks(y, [r.case.label for r in timed], fontsize=7)
    ax.invert_yaxis()  # first case at the top, as in the table
    ax.axvline(1.0, color="black", linewidth=1)
    # Ratios: a log scale draws 2x faster and 2x slower the same length.
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}x"))
    ax.set_xlabel("speed-up (native time / pyops time), log scale")
    ax.set_title("pyops vs native PyTorch")
    fig.savefig(path, dpi=120)
    return None
