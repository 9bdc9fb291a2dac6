"""Determinism (docs/DETERMINISM.md): under torch.use_deterministic_algorithms(True) every
pyops op, module and optimizer gives the same bits on every run, forward and backward, or
raises where native torch raises too; on the CPU the bits do not depend on the number of
threads either; dropout masks follow torch.manual_seed.

Ops come from pyops._samples, which has one sample per name in pyops.functional.__all__,
pyops.nn.__all__ and pyops.optim.__all__ (test_every_public_op_has_a_sample), so a new op
is covered as soon as it is exported.
"""

import os
import re

import pytest
import torch

import pyops
import pyops.functional as pf
from pyops import _samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Thread counts compared on the CPU: one thread, an even split and an uneven one.
THREAD_COUNTS = (1, 2, 3)

# CUDA sources that use atomic read-modify-writes, each with how it honours deterministic
# mode (docs/DETERMINISM.md). Empty: every CUDA reduction in pyops runs in a fixed order.
CUDA_FILES_WITH_ATOMICS = {}
_ATOMIC = re.compile(r"\b(?:atomic[A-Z]\w*|gpuAtomic\w*|fastAtomic\w*|__nv_atomic\w*|"
                     r"cuda::atomic\w*)\s*[(<]")


@pytest.fixture
def deterministic():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same_bits(a, b, what):
    """Bit-for-bit equality (tells -0.0 from 0.0 and compares NaN payloads)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    a, b = a.detach().contiguous(), b.detach().contiguous()
    if a.is_floating_point():
        a, b = a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()])
    if not torch.equal(a, b):
        differing = (a != b).sum().item()
        raise AssertionError(f"{what}: {differing} of {a.numel()} elements differ between runs")


def run(sample, seed=0):
    """{quantity: tensor} for one forward and backward of `sample` (pyops)."""
    leaves = [t.detach().clone().requires_grad_(i in sample.grad_inputs)
              for i, t in enumerate(sample.inputs)]
    if sample.random:
        torch.manual_seed(seed)
    out = sample.pyops(*leaves)
    generator = torch.Generator().manual_seed(seed + 1)
    grad_output = torch.randn(out.shape, generator=generator).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [leaves[i] for i in sample.grad_inputs], grad_output)
    results = {"output": out.detach()}
    for i, g in zip(sample.grad_inputs, grads):
        results[f"grad {sample.names[i]}"] = g
    return results


def _label(sample):
    return f"{sample.op}[{sample.variant}]" if sample.variant else sample.op


def test_every_public_op_has_a_sample():
    assert _samples.missing_samples() == {}, (
        "add a sample to pyops/_samples.py for every public op, module and optimizer")


# ---- Same bits on every run, under deterministic mode -------------------------------------

def _raises_runtime_error(fn):
    try:
        fn()
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", pf.__all__)
def test_functional_repeats_bit_for_bit(device, dtype, op, deterministic):
    # On CUDA, larger inputs: more blocks, so an order that depended on scheduling would show.
    for sample in _samples.functional_samples(dtype, device, large=device == "cuda", ops=[op]):
        try:
            first = run(sample)
        except RuntimeError as error:
            # Allowed only where torch raises too (e.g. cuBLAS without
            # CUBLAS_WORKSPACE_CONFIG): same inputs through the native twin.
            native = _raises_runtime_error(
                lambda: run(_samples.Sample(sample.op, sample.variant, sample.inputs,
                                            sample.names, sample.native, sample.native,
                                            sample.grad_inputs, random=sample.random)))
            assert native, f"{_label(sample)} raised under deterministic mode, torch did not: {error}"
            continue
        for _ in range(2):
            again = run(sample)
            for quantity, value in first.items():
                assert_same_bits(value, again[quantity], f"{_label(sample)} {quantity}")


@pytest.mark.parametrize("name", pyops.nn.__all__)
def test_module_repeats_bit_for_bit(device, name, deterministic):
    (sample,) = [s for s in _samples.module_samples(torch.float32, device) if s.name == name]
    torch.manual_seed(0)
    module = sample.make()

    def forward_backward():
        module.zero_grad(set_to_none=True)
        inputs = [t.detach().clone().requires_grad_() for t in sample.inputs]
        torch.manual_seed(1)
        out = module(*inputs)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in inputs] + [p.grad.clone() for p in module.parameters()]

    first = forward_backward()
    for _ in range(2):
        for i, (a, b) in enumerate(zip(first, forward_backward())):
            assert_same_bits(a, b, f"{name} result {i}")


def _optimizer_trajectory(config, device, dtype=torch.float32, steps=4):
    generator = torch.Generator().manual_seed(0)
    shapes = [(1031,), (64, 257)]
    params = [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]
             for _ in range(steps)]
    optimizer = getattr(pyops.optim, config.name)(params, **config.kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        optimizer.step()
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    return params + state


@pytest.mark.parametrize("config", _samples.OPTIMIZER_CONFIGS,
                         ids=lambda c: f"{c.name}-{c.variant.replace(' ', '_')}")
def test_optimizer_repeats_bit_for_bit(device, config, deterministic):
    first = _optimizer_trajectory(config, device)
    again = _optimizer_trajectory(config, device)
    for i, (a, b) in enumerate(zip(first, again)):
        assert_same_bits(a, b, f"{config.name} ({config.variant}) tensor {i}")


# ---- CPU: the same bits for any thread count ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", pf.__all__)
def test_cpu_bits_do_not_depend_on_thread_count(op, dtype, restore_threads):
    # Large samples: big enough that every CPU kernel splits its work across threads.
    for sample in _samples.functional_samples(dtype, "cpu", large=True, ops=[op]):
        results = {}
        for threads in THREAD_COUNTS:
            torch.set_num_threads(threads)
            results[threads] = run(sample)
        for quantity, single in results[1].items():
            for threads in THREAD_COUNTS[1:]:
                assert_same_bits(single, results[threads][quantity],
                                 f"{_label(sample)} {quantity}, 1 thread vs {threads}")


@pytest.mark.parametrize("config", _samples.OPTIMIZER_CONFIGS,
                         ids=lambda c: f"{c.name}-{c.variant.replace(' ', '_')}")
def test_cpu_optimizer_bits_do_not_depend_on_thread_count(config, restore_threads):
    torch.set_num_threads(1)
    single = _optimizer_trajectory(config, "cpu")
    for threads in THREAD_COUNTS[1:]:
        torch.set_num_threads(threads)
        for i, (a, b) in enumerate(zip(single, _optimizer_trajectory(config, "cpu"))):
            assert_same_bits(a, b, f"{config.name} ({config.variant}) tensor {i}, {threads} threads")


# ---- Dropout: the mask follows torch.manual_seed ---------------------------------------------

def _dropout_masks(device, seed):
    x = torch.ones(3, 5, 1037, device=device)
    torch.manual_seed(seed)
    functional = pf.dropout(x, 0.3) != 0
    in_place = pf.dropout(x.clone(), 0.3, inplace=True) != 0
    module = pyops.nn.Dropout(0.3)(x) != 0
    return functional, in_place, module


def test_dropout_mask_follows_manual_seed(device):
    first = _dropout_masks(device, seed=1234)
    again = _dropout_masks(device, seed=1234)
    other = _dropout_masks(device, seed=4321)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert 0.6 < a.float().mean().item() < 0.8  # p = 0.3 of 15555 elements dropped
    # Successive calls draw fresh masks.
    assert not torch.equal(first[0], first[1])


def test_dropout_mask_does_not_depend_on_thread_count(restore_threads):
    masks = []
    for threads in THREAD_COUNTS:
        torch.set_num_threads(threads)
        masks.append(_dropout_masks("cpu", seed=7))
    for other in masks[1:]:
        for a, b in zip(masks[0], other):
            assert torch.equal(a, b)


# ---- CUDA sources: atomics only with a deterministic path or an alert -------------------------

def _cuda_sources():
    for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in files:
            if name.endswith((".cu", ".cuh")):
                yield os.path.join(folder, name)


def test_cuda_atomics_are_listed_and_honour_deterministic_mode():
    # A static check (runs without a GPU): a kernel that adds with atomics gives results
    # that depend on scheduling, so under deterministic mode it must take another path
    # or raise through at::globalContext().alertNotDeterministic("pyops::<op>").
    sources = list(_cuda_sources())
    assert sources, "no CUDA sources found under csrc/"
    with_atomics = {}
    for path in sources:
        with open(path) as f:
            text = f.read()
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)  # comments do not count
        if _ATOMIC.search(code):
            relative = os.path.relpath(path, ROOT)
            with_atomics[relative] = code
            assert ("alertNotDeterministic" in code or "deterministicAlgorithms()" in code), (
                f"{relative} uses atomics but neither checks "
                "at::globalContext().deterministicAlgorithms() nor calls alertNotDeterministic")
    assert set(with_atomics) == set(CUDA_FILES_WITH_ATOMICS), (
        "update CUDA_FILES_WITH_ATOMICS and the table in docs/DETERMINISM.md")


def test_atomic_pattern_finds_atomics():
    # The scan above is only as good as its pattern.
    for call in ("atomicAdd(&x, 1)", "gpuAtomicAdd(p, v)", "fastAtomicAdd(a, i, n, v, true)",
                 "atomicCAS(addr, a, b)", "atomicMax(p, v)"):
        assert _ATOMIC.search(call), call
    assert not _ATOMIC.search("// no atomics, deterministic")
