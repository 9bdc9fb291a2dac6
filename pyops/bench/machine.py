"""The machine the numbers belong to, and its measured memory bandwidth."""

import os
import platform

import torch

import pyops
from pyops.bench.case import Case, Scale, Traffic

# Large enough to stream from memory rather than from the last-level cache.
_REFERENCE_NUMEL = {Scale.SMOKE: 1 << 16, Scale.QUICK: 1 << 25, Scale.FULL: 1 << 25}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(devices):
    info = pyops.build_info()
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": info["cpu_capability"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
        "pyops": info,
    }


def _copy(shape, dtype, device):
    src = torch.randn(shape, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), None


def _native_relu_(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    return (lambda: torch.relu_(x)), None


def reference_cases(scale, device):
    """Native-only rows that bound what a memory-bound op can reach on this device:
    a plain copy (its GB/s is the device's copy bandwidth, the 100% of the report) and
    torch's own in-place relu_."""
    n = _REFERENCE_NUMEL[scale]
    traffic = Traffic(read={"src": n}, write={"dst": n})
    return [
        Case("copy_", "reference dst.copy_(src)", (n,), torch.float32, device, traffic, _copy,
             family="reference"),
        Case("relu_", "reference in-place", (n,), torch.float32, device,
             Traffic(read={"x": n}, write={"x": n}), _native_relu_, family="reference"),
    ]
