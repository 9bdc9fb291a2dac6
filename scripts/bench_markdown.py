#!/usr/bin/env python3
"""Turns a `python -m pyops.bench` results.json into the Markdown table the README shows.

    python scripts/bench_markdown.py bench-results/results.json > table.md
"""

import json
import sys


def _time(seconds):
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def main(path):
    with open(path) as f:
        results = json.load(f)
    machine, settings = results["machine"], results["settings"]
    info = machine["pyops"]
    print(f"Measured {settings['finished'][:10]} with `python -m pyops.bench` "
          f"({settings['scale']}, {', '.join(settings['dtypes'])}) on: {machine['cpu']}, "
          f"{machine['torch_threads']} torch threads, pyops CPU kernels {machine['cpu_capability']}, "
          f"torch {machine['torch']}, GPU: {machine['gpu'] or 'none'}. Speed-up = native time / "
          "pyops time, interleaved in one run (medians of 7 rounds).\n")
    print("| family | op | variant | shape | native | pyops | speed-up | pyops GB/s | pyops GFLOP/s |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in results["rows"]:
        if row["speedup"] is None:
            continue
        shape = "x".join(map(str, row["shape"]))
        gflops = f"{row['pyops_gflops']:.1f}" if row.get("pyops_gflops") else ""
        print(f"| {row['family']} | {row['op']} | {row['variant']} | {shape} | "
              f"{_time(row['native_s'])} | {_time(row['pyops_s'])} | {row['speedup']:.2f}x | "
              f"{row['pyops_gbs']:.1f} | {gflops} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-results/results.json")
