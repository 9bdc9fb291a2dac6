"""Interleaved timing of callables with torch.utils.benchmark."""

import math
from dataclasses import dataclass

import torch
from torch.utils import benchmark

from pyops.bench.case import Scale


@dataclass(frozen=True)
class Policy:
    rounds: int  # measurement rounds per callable; the result is their median
    min_measurement_s: float  # each measurement repeats the call until it lasts this long

    @staticmethod
    def for_scale(scale):
        return _POLICIES[scale]


_POLICIES = {
    Scale.SMOKE: Policy(rounds=1, min_measurement_s=0.001),
    Scale.QUICK: Policy(rounds=7, min_measurement_s=0.05),
    Scale.FULL: Policy(rounds=11, min_measurement_s=0.2),
}


def _timer(fn):
    # Timer's default timer synchronises the accelerator around each measurement. Its
    # default num_threads is 1: pass ours, or every CPU op would run single-threaded.
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def _calls_per_measurement(timer, min_s):
    # Grows the call count tenfold until a measurement is long enough to extrapolate
    # from; the calls made here double as the warm-up.
    number = 1
    while True:
        total = timer.timeit(number).median * number
        if total >= min_s / 5:
            return max(1, math.ceil(number * min_s / max(total, 1e-9)))
        number *= 10


def time_interleaved(fns, policy):
    """Per-call seconds of each callable, one tuple of ``policy.rounds`` values each.

    The callables are measured in turn within every round, in alternating order, so
    that drift in the machine's state (clocks, other processes, caches) hits them alike.
    """
    timers = [_timer(fn) for fn in fns]
    numbers = [_calls_per_measurement(t, policy.min_measurement_s) for t in timers]
    rounds = [[] for _ in fns]
    for r in range(policy.rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            rounds[i].append(timers[i].timeit(numbers[i]).median)
    return [tuple(r) for r in rounds]
