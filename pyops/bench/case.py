"""What a benchmark case is: the vocabulary that the family modules in cases/ use."""

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


class Scale(enum.Enum):
    """How much to measure: each family picks its sizes per scale."""

    SMOKE = "smoke"  # tiny sizes, to check the harness end to end; timings mean nothing
    QUICK = "quick"  # the default run: the sizes that matter, in minutes on 2 CPU cores
    FULL = "full"  # the whole matrix


@dataclass(frozen=True)
class Traffic:
    """The tensors an op must read and write at least once, as name -> element count.

    Their bytes are what achieved bandwidth is computed from: the minimum any
    implementation has to move, so an unfused one shows up as a lower GB/s.
    """

    read: Mapping[str, int]
    write: Mapping[str, int]

    @property
    def numel(self):
        return sum(self.read.values()) + sum(self.write.values())

    def __str__(self):
        return f"read {', '.join(self.read)}; write {', '.join(self.write)}"


# Builds the inputs of a case (shape, dtype, device) and returns the native and the pyops
# callables, each taking no argument and returning what it computed, for the check.
Setup = Callable[[tuple, torch.dtype, str], tuple[Callable, Callable | None]]


@dataclass(frozen=True)
class Case:
    """One comparison: a native PyTorch callable against its pyops twin.

    Inputs are built only when the case runs (``setup``), so listing or filtering the
    whole matrix allocates nothing. ``check`` compares the two results once, before
    timing. ``family`` is the name of the module in cases/ that declared the case; the
    collector fills it in. ``flops``, for compute-bound ops (convolutions, GEMMs), is the
    arithmetic the op must do (a multiply-add counts 2): the report adds GFLOP/s.
    """

    op: str
    variant: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    traffic: Traffic
    setup: Setup = field(repr=False, compare=False)
    # (pyops result, native result) -> None, raising if they differ.
    check: Callable = field(default=torch.testing.assert_close, repr=False, compare=False)
    family: str = ""
    flops: int | None = None

    @property
    def qualname(self):
        return f"{self.family}/{self.op}"

    @property
    def bytes_moved(self):
        return self.traffic.numel * self.dtype.itemsize

    @property
    def dtype_name(self):
        return str(self.dtype).removeprefix("torch.")

    @property
    def shape_str(self):
        return "x".join(map(str, self.shape))

    @property
    def label(self):
        return f"{self.qualname} {self.variant} {self.shape_str} {self.dtype_name} {self.device}"

    def build(self):
        return self.setup(self.shape, self.dtype, self.device)
