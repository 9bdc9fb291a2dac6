"""pyops: fused CUDA kernels and vectorized CPU kernels for PyTorch, drop-in for
torch.nn.functional, torch.nn and torch.optim."""

from pyops._loader import load_extension

_C = load_extension()  # registers torch.ops.pyops.* before the Python side builds on them

from pyops import _fake  # noqa: E402,F401  (fake/meta kernels for torch.compile)
from pyops import functional, nn, optim  # noqa: E402
from pyops._convert import convert, convert_optimizer  # noqa: E402

__version__ = _C.version


def build_info():
    """What this installation of pyops was built with, and what it runs.

    Returns a dict: pyops version, the torch version it was built against and the one
    running, whether CUDA kernels were compiled and for which archs, the CPU kernel
    copies compiled and the one in use.
    """
    import torch

    return {
        "pyops_version": _C.version,
        "torch_built_against": _C.torch_version,
        "torch_running": torch.__version__,
        "cuda_kernels": bool(_C.cuda),
        "cuda_archs": [a for a in _C.cuda_archs.replace(";", " ").split() if a],
        "cpu_capabilities_compiled": _C.cpu_capabilities_compiled.split(","),
        "cpu_capability": _C.cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
    }


__all__ = ["build_info", "convert", "convert_optimizer", "functional", "nn", "optim", "__version__"]
