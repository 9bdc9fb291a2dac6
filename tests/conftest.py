import pytest
import torch

import pyops  # noqa: F401  (registers the operators)

_NO_CUDA = "no CUDA device visible (CUDA tests run through scripts/gpu_check.sh on a GPU machine)"
_NO_CUDA_KERNELS = "this pyops build has no CUDA kernels (PYOPS_CUDA=0)"


def _cuda_param():
    if not torch.cuda.is_available():
        reason = _NO_CUDA
    elif not pyops.build_info()["cuda_kernels"]:
        reason = _NO_CUDA_KERNELS
    else:
        return pytest.param("cuda", id="cuda")
    return pytest.param("cuda", id="cuda", marks=pytest.mark.skip(reason=reason))


DEVICES = [pytest.param("cpu", id="cpu"), _cuda_param()]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")
