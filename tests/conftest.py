import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

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


# Property fuzzing (tests/test_fuzz.py): derandomized, so every run draws the same
# examples; PYOPS_FUZZ_EXAMPLES sets how many per op (the long run: 2000).
FUZZ_EXAMPLES = int(os.environ.get("PYOPS_FUZZ_EXAMPLES", "60"))
settings.register_profile(
    "pyops", derandomize=True, database=None, deadline=None, max_examples=FUZZ_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True)
settings.load_profile("pyops")


def pytest_terminal_summary(terminalreporter):
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and sum(fuzz.EXAMPLES_RUN.values()):
        runs = fuzz.EXAMPLES_RUN
        terminalreporter.write_line(
            f"pyops fuzz: {runs['compared'] + runs['raised']} examples run, "
            f"{runs['compared']} compared with torch, {runs['raised']} raised by both "
            f"(PYOPS_FUZZ_EXAMPLES={FUZZ_EXAMPLES} per op)")


# ---- Slow tests -------------------------------------------------------------------------
# Tests marked `slow` (tensors of more than 2**31 elements: minutes and many GiB) run only
# with --run-slow or PYOPS_RUN_SLOW=1; CI sets the variable.

def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (PYOPS_RUN_SLOW=1 does the same)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("PYOPS_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or PYOPS_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
