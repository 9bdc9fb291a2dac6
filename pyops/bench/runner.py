"""Runs one case: build its inputs, check pyops against native, time both."""

import statistics
from dataclasses import dataclass, replace

import torch

from pyops.bench.case import Case
from pyops.bench.timing import time_interleaved


@dataclass(frozen=True)
class Row:
    """The result of one case. Everything derivable from the timings is a property."""

    case: Case
    native_rounds_s: tuple[float, ...] = ()
    pyops_rounds_s: tuple[float, ...] = ()
    checked: bool = False  # pyops matched native (case.check) before any timing
    error: str | None = None
    copy_gbs: float | None = None  # the device's measured copy bandwidth

    @property
    def native_s(self):
        return statistics.median(self.native_rounds_s) if self.native_rounds_s else None

    @property
    def pyops_s(self):
        return statistics.median(self.pyops_rounds_s) if self.pyops_rounds_s else None

    @property
    def speedup(self):
        if self.native_s is None or self.pyops_s is None:
            return None
        return self.native_s / self.pyops_s

    def _gbs(self, seconds):
        return None if seconds is None else self.case.bytes_moved / seconds / 1e9

    @property
    def native_gbs(self):
        return self._gbs(self.native_s)

    @property
    def pyops_gbs(self):
        return self._gbs(self.pyops_s)

    def _gflops(self, seconds):
        flops = self.case.flops
        return None if seconds is None or flops is None else flops / seconds / 1e9

    @property
    def native_gflops(self):
        return self._gflops(self.native_s)

    @property
    def pyops_gflops(self):
        return self._gflops(self.pyops_s)

    def _pct_of_copy(self, gbs):
        return None if gbs is None or not self.copy_gbs else 100 * gbs / self.copy_gbs

    @property
    def native_pct_of_copy(self):
        return self._pct_of_copy(self.native_gbs)

    @property
    def pyops_pct_of_copy(self):
        return self._pct_of_copy(self.pyops_gbs)

    def to_json(self):
        case = self.case
        return {
            "family": case.family,
            "op": case.op,
            "variant": case.variant,
            "shape": list(case.shape),
            "dtype": case.dtype_name,
            "device": case.device,
            "traffic": {"read": dict(case.traffic.read), "write": dict(case.traffic.write)},
            "bytes_moved": case.bytes_moved,
            "checked": self.checked,
            "error": self.error,
            "native_s": self.native_s,
            "pyops_s": self.pyops_s,
            "speedup": self.speedup,
            "native_gbs": self.native_gbs,
            "pyops_gbs": self.pyops_gbs,
            "copy_gbs": self.copy_gbs,
            "native_pct_of_copy": self.native_pct_of_copy,
            "pyops_pct_of_copy": self.pyops_pct_of_copy,
            "flops": case.flops,
            "native_gflops": self.native_gflops,
            "pyops_gflops": self.pyops_gflops,
            "native_rounds_s": list(self.native_rounds_s),
            "pyops_rounds_s": list(self.pyops_rounds_s),
        }


def run_case(case, policy, copy_gbs=None):
    """Returns the case's Row. A failure (setup, mismatch) becomes the row's ``error``,
    so that one broken case does not hide the others' results."""
    row = Row(case, copy_gbs=copy_gbs)
    torch.manual_seed(0)
    try:
        native, pyops_fn = case.build()
        if pyops_fn is None:  # a reference row: native only
            (native_rounds,) = time_interleaved([native], policy)
            return replace(row, native_rounds_s=native_rounds)
        # Once, before any timing: a fast wrong answer is not a result.
        case.check(pyops_fn(), native())
        native_rounds, pyops_rounds = time_interleaved([native, pyops_fn], policy)
    except Exception as error:  # noqa: BLE001  (reported in the row, never swallowed)
        message = " ".join(str(error).split())  # one line, for the table
        return replace(row, error=f"{type(error).__name__}: {message}")
    return replace(row, checked=True, native_rounds_s=native_rounds, pyops_rounds_s=pyops_rounds)

