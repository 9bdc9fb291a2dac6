"""Quick conv timings, native torch vs pyops, interleaved in one process (ratios matter:
the machine is noisy). Usage: python scripts/bench_conv.py [--threads 2] [--filter name]"""

import argparse

import torch
import torch.nn.functional as TF
from torch.utils import benchmark

import pyops.functional as F

# name, input shape, weight shape, kwargs, transposed
CASES = [
    ("seed_conv1", (64, 1, 28, 28), (32, 1, 3, 3), {}, False),
    ("seed_conv2", (64, 32, 26, 26), (64, 32, 3, 3), {}, False),
    ("resnet_3x3", (8, 64, 56, 56), (64, 64, 3, 3), {"padding": 1}, False),
    ("depthwise_3x3", (8, 64, 56, 56), (64, 1, 3, 3), {"padding": 1, "groups": 64}, False),
    ("transposed_x2", (8, 64, 28, 28), (64, 32, 4, 4), {"stride": 2, "padding": 1}, True),
]


def timeit(fn, min_run_time):
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_run_time).median * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--filter", default="")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'case':<16}{'pass':<14}{'native ms':>10}{'pyops ms':>10}{'speed-up':>10}")
    for name, xs, ws, kw, transposed in CASES:
        if args.filter not in name:
            continue
        x = torch.randn(xs, requires_grad=True)
        w = torch.randn(ws, requires_grad=True) / (ws[1] * ws[2] * ws[3]) ** 0.5
        w = w.detach().requires_grad_()
        out_channels = ws[1] * kw.get("groups", 1) if transposed else ws[0]
        b = torch.randn(out_channels, requires_grad=True)
        native_op = TF.conv_transpose2d if transposed else TF.conv2d
        pyops_op = F.conv_transpose2d if transposed else F.conv2d
        passes = {
            "forward": (lambda: native_op(x, w, b, **kw), lambda: pyops_op(x, w, b, **kw)),
        }
        g = torch.randn_like(native_op(x, w, b, **kw))

        def backward(op, act=None):
            def run():
                y = op(x, w, b, **kw)
                if act is not None:
                    y = act(y)
                torch.autograd.grad(y, (x, w, b), g)
            return run

        passes["fwd+bwd"] = (backward(native_op), backward(pyops_op))
        if not transposed:
            with torch.no_grad():
                passes["conv+relu fwd"] = (
                    lambda: TF.relu(TF.conv2d(x, w, b, **kw)),
                    lambda: F.conv2d_bias_act(x, w, b, activation="relu", **kw))
            passes["conv+relu f+b"] = (
                backward(native_op, TF.relu),
                lambda: torch.autograd.grad(F.conv2d_bias_act(x, w, b, activation="relu", **kw),
                                            (x, w, b), g))
        for pass_name, (native, ours) in passes.items():
            with torch.no_grad() if pass_name.endswith("fwd") or pass_name == "forward" else torch.enable_grad():
                native(), ours()  # warm-up
                t_native = timeit(native, args.min_run_time)
                t_ours = timeit(ours, args.min_run_time)
            print(f"{name:<16}{pass_name:<14}{t_native:>10.2f}{t_ours:>10.2f}{t_native / t_ours:>10.2f}")


if __name__ == "__main__":
    main()
