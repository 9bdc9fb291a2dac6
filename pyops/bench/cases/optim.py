"""Optimizers: one ``step()`` of pyops.optim.X against torch.optim.X.

Every optimizer configuration runs on three parameter layouts:

  10M         one tensor of 10,000,000 elements: pure bandwidth
  100x100K    100 tensors of 100,000: per-tensor overhead on a mid-sized list
  seed        the seed network's 8 tensors (conv1 32x1x3x3 + 32, conv2 64x32x3x3 + 64,
              fc1 128x9216 + 128, fc2 10x128 + 10; 1,199,882 elements)

Each (configuration, layout) gets one row per implementation of torch's step, the
variant's last word: ``loop`` (foreach=False, torch's single-tensor reference),
``foreach`` (foreach=True), ``fused`` (fused=True, where torch has a CPU fused kernel:
SGD, Adagrad, Adam, AdamW; CUDA adds none here) and ``compile`` (torch.compile of the
foreach step: the strongest native route where no fused kernel exists). Each row times
pyops interleaved with that implementation. The family's summary (printed after the
table) then names, per configuration and layout, torch's fastest implementation of the
run and pyops's speed-up over it, and pyops's GB/s on the 10M layout as a share of the
GB/s of torch's fused Adam on 10M: the median of the ``adam reference`` rows (native
only, timed first and last) and Adam's own fused row, as the machine drifts.

``compile`` compiles once per row in setup (torch._dynamo reset first, so rows never
share a cache) and times under ``fail_on_recompile``, so a recompile is a row error,
never a silent fall-back to eager. Compiling takes tens of seconds per optimizer on 2
cores, so the quick run compiles only Adadelta and RMSprop (the optimizers without a
fused kernel) on the 10M layout, and where torch has a fused kernel times fused only
(plus foreach on seed); --full runs every implementation on every configuration and
layout.

Traffic, per element, is what the update rule must read and write once in steady state
(a fresh state's first step reads less); in float32 each stream is 4 bytes:

  SGD (no momentum)             read param, grad; write param                      3
  SGD momentum / nesterov       + momentum_buffer read and written                 5
  Adagrad                       read param, grad, sum; write param, sum             5
  Adadelta                      read param, grad, square_avg, acc_delta;
                                write param, square_avg, acc_delta                  7
  RMSprop                       read param, grad, square_avg; write param,
                                square_avg                                          5
  RMSprop centered              + grad_avg read and written                         7
  Adam, AdamW                   read param, grad, exp_avg, exp_avg_sq; write
                                param, exp_avg, exp_avg_sq                          7
  Adam amsgrad                  + max_exp_avg_sq read and written                   9

e.g. Adam moves 7 x 4 = 28 bytes per float32 element. Grads are fixed random tensors,
set once; the optimizers only read them. Both sides start from identical params and
states; the check compares the params after one step.
"""

import math
import statistics
from dataclasses import dataclass, field
from functools import partial

import torch

import pyops.optim
from pyops.bench.case import Case, Scale, Traffic


@dataclass(frozen=True)
class _Config:
    op: str  # the table's op column: the optimizer, lower case
    option: str  # what distinguishes it from the plain configuration ("" for none)
    cls: str  # class name in torch.optim and pyops.optim
    kwargs: dict = field(default_factory=dict)
    states: tuple[str, ...] = ()  # the state tensors the rule reads and writes
    fused_devices: tuple[str, ...] = ()  # where torch has fused=True

    @property
    def name(self):
        return f"{self.op} {self.option}".strip()


_CPU_CUDA = ("cpu", "cuda")
_CONFIGS = (
    _Config("sgd", "", "SGD", {"lr": 0.01}, (), fused_devices=_CPU_CUDA),
    _Config("sgd", "momentum", "SGD", {"lr": 0.01, "momentum": 0.9},
            ("momentum_buffer",), fused_devices=_CPU_CUDA),
    _Config("sgd", "nesterov", "SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True},
            ("momentum_buffer",), fused_devices=_CPU_CUDA),
    _Config("adagrad", "", "Adagrad", {"lr": 0.01}, ("sum",), fused_devices=("cpu",)),
    _Config("adadelta", "", "Adadelta", {}, ("square_avg", "acc_delta")),
    _Config("rmsprop", "", "RMSprop", {}, ("square_avg",)),
    _Config("rmsprop", "centered", "RMSprop", {"centered": True}, ("square_avg", "grad_avg")),
    _Config("adam", "", "Adam", {}, ("exp_avg", "exp_avg_sq"), fused_devices=_CPU_CUDA),
    _Config("adam", "amsgrad", "Adam", {"amsgrad": True},
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), fused_devices=_CPU_CUDA),
    _Config("adamw", "", "AdamW", {}, ("exp_avg", "exp_avg_sq"), fused_devices=_CPU_CUDA),
)

_SEED_NETWORK = ((32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 9216), (128,),
                 (10, 128), (10,))
# Layout name -> parameter shapes.
_LAYOUTS = {
    Scale.SMOKE: {"4099": ((4099,),), "33+1000+4099": ((33,), (1000,), (4099,))},
    Scale.QUICK: {"10M": ((10_000_000,),), "100x100K": ((100_000,),) * 100,
                  "seed": _SEED_NETWORK},
}
_LAYOUTS[Scale.FULL] = _LAYOUTS[Scale.QUICK]
_BANDWIDTH_LAYOUT = "10M"  # where GB/s is compared with torch's fused Adam
_IMPLEMENTATIONS = ("loop", "foreach", "fused", "compile")
_NATIVE_FLAGS = {"loop": {"foreach": False}, "foreach": {"foreach": True},
                 "fused": {"fused": True}, "compile": {"foreach": True}}
# Steps both sides take in setup, so that the compiled step's first compile (no state
# yet) and its recompile (with state) happen before the check and the timing.
_COMPILE_WARMUP_STEPS = 2
_REFERENCE = next(c for c in _CONFIGS if c.cls == "Adam" and not c.option)  # torch fused Adam


def _implementations(config, layout, scale, device):
    """torch's implementations that the case's rows compare with. --full: every one.
    Quick keeps to a few minutes on 2 cores: where torch has a fused kernel, fused (its
    fastest CPU route) and, on the seed layout only, foreach (cheap there, and the one
    that could compete with fused on small tensors); elsewhere loop and foreach, plus
    compile (tens of seconds to build) on 10M. Smoke never compiles."""
    fused = device in config.fused_devices
    for impl in _IMPLEMENTATIONS:
        if impl == "fused" and not fused:
            continue
        if scale is not Scale.FULL and fused and impl != "fused" and not (
                impl == "foreach" and layout in ("seed", *_LAYOUTS[Scale.SMOKE])):
            continue
        if scale is not Scale.FULL and impl == "compile" and (
                scale is Scale.SMOKE or layout != _BANDWIDTH_LAYOUT):
            continue
        yield impl


def _params(starts, grads):
    params = [torch.nn.Parameter(start.clone()) for start in starts]
    for param, grad in zip(params, grads):
        param.grad = grad
    return params


def _returning_params(step, params):
    def run():
        step()
        return params

    return run


def _compiled_step(optimizer):
    torch._dynamo.reset()  # a fresh cache per row: no recompile limit reached across rows

    @torch.compile
    def step():
        optimizer.step()

    return step


def _setup(config, impl, shapes, _shape, dtype, device):
    """(native, pyops): each takes one step from identical params and states and
    returns its params."""
    starts = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    native_params = _params(starts, grads)
    native_opt = getattr(torch.optim, config.cls)(native_params, **config.kwargs,
                                                  **_NATIVE_FLAGS[impl])
    pyops_params = _params(starts, grads)
    pyops_opt = getattr(pyops.optim, config.cls)(pyops_params, **config.kwargs)
    native_step = native_opt.step
    if impl == "compile":
        compiled = _compiled_step(native_opt)
        for _ in range(_COMPILE_WARMUP_STEPS):
            compiled()
            pyops_opt.step()

        def native_step():
            with torch.compiler.set_stance("fail_on_recompile"):
                compiled()

    return _returning_params(native_step, native_params), _returning_params(pyops_opt.step,
                                                                           pyops_params)


def _reference_setup(shapes, _shape, dtype, device):
    native, _ = _setup(_REFERENCE, "fused", shapes, _shape, dtype, device)
    return native, None


def _traffic(config, n):
    streams = ("param", *config.states)
    return Traffic(read={s: n for s in (*streams[:1], "grad", *streams[1:])},
                   write={s: n for s in streams})


def _variant(config, layout, impl):
    return " ".join(w for w in (config.option, layout, impl) if w)


def cases(scale, device, dtype):
    layouts = _LAYOUTS[scale]
    found = []
    reference_layout = _BANDWIDTH_LAYOUT if _BANDWIDTH_LAYOUT in layouts else next(iter(layouts))
    shapes = layouts[reference_layout]
    n = sum(math.prod(s) for s in shapes)
    reference = [Case("adam", f"reference {reference_layout} torch fused {when}", (n,), dtype,
                      device, _traffic(_REFERENCE, n), partial(_reference_setup, shapes))
                 for when in ("first", "last")]
    found.append(reference[0])
    for config in _CONFIGS:
        for layout, shapes in layouts.items():
            n = sum(math.prod(s) for s in shapes)
            # Uniform lists show as (tensors, elements each); others as total elements.
            shape = (len(shapes), math.prod(shapes[0])) if len(set(shapes)) == 1 and len(
                shapes) > 1 else (n,)
            for impl in _implementations(config, layout, scale, device):
                found.append(Case(config.op, _variant(config, layout, impl), shape, dtype,
                                  device, _traffic(config, n),
                                  partial(_setup, config, impl, shapes)))
    # Timed first and last: the machine drifts over the run, so the summary compares
    # with the median of torch's fused Adam over the run, not one moment of it.
    found.append(reference[1])
    return found


def _layout_of(row):
    variant = row.case.variant.split()
    return variant[-2]


def summary(rows):
    """Per configuration and layout: torch's fastest implementation in this run and
    pyops's speed-up over it (measured interleaved in that row), the speed-ups over the
    others, and on the bandwidth layout pyops's GB/s as a share of torch's fused Adam's."""
    rows = [r for r in rows if r.case.family == "optim"]
    references = [r for r in rows if r.case.variant.startswith("reference")]
    # torch's fused Adam on the bandwidth layout: the reference rows and Adam's fused row.
    adam_fused = [r for r in references if r.native_gbs] + [
        r for r in rows if r.case.op == "adam" and r.case.variant == f"{_BANDWIDTH_LAYOUT} fused"
        and r.native_gbs]
    reference_gbs = statistics.median(r.native_gbs for r in adam_fused) if adam_fused else None
    groups = {}
    for row in rows:
        if row in references:
            continue
        option = row.case.variant.split()[:-2]
        key = (row.case.op, " ".join(option), _layout_of(row), row.case.device,
               row.case.dtype_name)
        groups.setdefault(key, []).append(row)
    lines = ["optim: pyops vs torch's fastest step in this run (speed-up = fastest native time"
             " / pyops time, measured interleaved in that row)"]
    if reference_gbs:
        lines.append(f"  reference: torch fused Adam {references[0].case.variant.split()[1]}:"
                     f" median {reference_gbs:.1f} GB/s over {len(adam_fused)} rows ("
                     + ", ".join(f"{r.native_gbs:.1f}" for r in adam_fused) + ")")
    for (op, option, layout, device, dtype), group in groups.items():
        name = f"{op} {option}".strip()
        timed = [r for r in group if r.speedup is not None]
        if not timed:
            lines.append(f"  {name:18} {layout:9} {device} {dtype}: no timed row")
            continue
        fastest = min(timed, key=lambda r: r.native_s)
        others = ", ".join(f"{r.case.variant.split()[-1]} {r.speedup:.2f}x" for r in timed)
        pyops_s = fastest.pyops_s  # from the same row as the ratio, so the figures agree
        line = (f"  {name:18} {layout:9} {device} {dtype}: fastest torch "
                f"{fastest.case.variant.split()[-1]:7} {fastest.native_s * 1e3:8.2f} ms,"
                f" pyops {pyops_s * 1e3:7.2f} ms -> {fastest.speedup:5.2f}x  ({others})")
        if layout == _BANDWIDTH_LAYOUT and reference_gbs:
            gbs = fastest.case.bytes_moved / pyops_s / 1e9
            line += f"; pyops {gbs:.1f} GB/s = {100 * gbs / reference_gbs:.0f}% of fused Adam"
        lines.append(line)
    return lines
