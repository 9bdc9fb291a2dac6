"""Resource safety (issue 7): indexing past 2**31 elements, no memory growth over many
calls, correct results from several Python threads at once, and the GIL released while
pyops kernels run.

The per-op cases below cover every name in ``pyops.functional.__all__`` and every
optimizer in ``pyops.optim.__all__``; a new op without a case fails
``test_every_functional_op_has_a_case``.
"""

import gc
import os
import random
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import pyops
import pyops.functional as P

# ---- One small call of every functional op --------------------------------------------
# name -> (make(generator) -> inputs, pyops call, torch reference or None). Float inputs
# require grad; the reference is None where results are random (dropout).


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen).requires_grad_()


def _image(gen):
    return (_randn(gen, 2, 4, 12, 12),)


def _conv_inputs(gen):
    return _randn(gen, 2, 3, 10, 10), _randn(gen, 8, 3, 3, 3), _randn(gen, 8)


def _conv_transpose_inputs(gen):
    return _randn(gen, 2, 8, 5, 5), _randn(gen, 8, 3, 3, 3), _randn(gen, 3)


def _linear_inputs(gen):
    return _randn(gen, 8, 32), _randn(gen, 16, 32), _randn(gen, 16)


def _rows(gen):
    return (_randn(gen, 16, 40),)


def _logits_and_targets(gen):
    return _randn(gen, 16, 10), torch.randint(0, 10, (16,), generator=gen)


CASES = {
    "relu": (_rows, P.relu, F.relu),
    "relu_": (_rows, lambda x: P.relu_(x.clone()), lambda x: F.relu_(x.clone())),
    "leaky_relu": (_rows, lambda x: P.leaky_relu(x, 0.1), lambda x: F.leaky_relu(x, 0.1)),
    "leaky_relu_": (_rows, lambda x: P.leaky_relu_(x.clone(), 0.1),
                    lambda x: F.leaky_relu_(x.clone(), 0.1)),
    "sigmoid": (_rows, P.sigmoid, torch.sigmoid),
    "tanh": (_rows, P.tanh, torch.tanh),
    "bias_act": (lambda g: (_randn(g, 2, 16, 4, 4), _randn(g, 16)),
                 lambda x, b: P.bias_act(x, b, "relu"),
                 lambda x, b: torch.relu(x + b.view(1, -1, 1, 1))),
    "conv2d": (_conv_inputs, lambda x, w, b: P.conv2d(x, w, b, padding=1),
               lambda x, w, b: F.conv2d(x, w, b, padding=1)),
    "conv_transpose2d": (
        _conv_transpose_inputs,
        lambda x, w, b: P.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1)),
    "conv2d_bias_act": (_conv_inputs,
                        lambda x, w, b: P.conv2d_bias_act(x, w, b, padding=1, activation="tanh"),
                        lambda x, w, b: torch.tanh(F.conv2d(x, w, b, padding=1))),
    "dropout": (_rows, lambda x: P.dropout(x, 0.3), None),
    "linear": (_linear_inputs, P.linear, F.linear),
    "linear_act": (_linear_inputs, lambda x, w, b: P.linear_act(x, w, b, "sigmoid"),
                   lambda x, w, b: torch.sigmoid(F.linear(x, w, b))),
    "max_pool2d": (_image, lambda x: P.max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1)),
    "min_pool2d": (_image, lambda x: P.min_pool2d(x, 3, 2, 1),
                   lambda x: -F.max_pool2d(-x, 3, 2, 1)),
    "avg_pool2d": (_image, lambda x: P.avg_pool2d(x, 3, 2, 1), lambda x: F.avg_pool2d(x, 3, 2, 1)),
    "relu_max_pool2d": (_image, lambda x: P.relu_max_pool2d(x, 2),
                        lambda x: F.max_pool2d(F.relu(x), 2)),
    "log_softmax": (_rows, lambda x: P.log_softmax(x, 1), lambda x: F.log_softmax(x, 1)),
    "log_softmax_nll_loss": (_logits_and_targets, P.log_softmax_nll_loss, F.cross_entropy),
}

# Hyperparameters that give each optimizer per-parameter state to read and write.
OPTIMIZER_CONFIGS = {
    "SGD": dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    "Adagrad": dict(lr=0.1),
    "Adadelta": dict(lr=1.0),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True),
    "Adam": dict(lr=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01),
}


def _assert_near(actual, expected, what):
    # As the family tests: sums (GEMMs, bias and weight gradients) are added in another
    # order than torch's, so the float32 tolerance scales with the magnitude.
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale,
                               msg=lambda m: f"{what}: {m}")


def _forward_backward(fn, inputs):
    """The op's output and the gradients of its differentiable inputs (for a gradient of
    ones)."""
    out = fn(*inputs)
    wrt = [t for t in inputs if t.requires_grad]
    return out.detach(), torch.autograd.grad(out, wrt, torch.ones_like(out))


def _assert_matches(name, ours, ref):
    (out, grads), (ref_out, ref_grads) = ours, ref
    _assert_near(out, ref_out, name)
    for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=True)):
        _assert_near(grad, ref_grad, f"{name} gradient {i}")


@pytest.fixture
def one_torch_thread():
    # Tiny ops gain nothing from threads, and on a loaded machine every parallel region's
    # barrier can wait milliseconds for a descheduled thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_functional_op_has_a_case():
    assert sorted(CASES) == sorted(P.__all__)
    assert sorted(OPTIMIZER_CONFIGS) == sorted(pyops.optim.__all__)


def test_cases_match_torch():
    # The cases themselves are right (so the thread test below compares like with like).
    for name, (make, ours, ref) in CASES.items():
        if ref is None:
            continue
        inputs = make(torch.Generator().manual_seed(0))
        _assert_matches(name, _forward_backward(ours, inputs), _forward_backward(ref, inputs))


# ---- No memory growth ----------------------------------------------------------------------

CALLS = 10_000
WARMUP_CALLS = 500
# Resident memory may move by a few allocator pages between measurements; a leak of one
# small tensor (>= 256 bytes of data plus its TensorImpl and storage) per call grows it by
# several MiB over CALLS calls.
RSS_GROWTH_BOUND = 2 * 1024 * 1024


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _under_address_sanitizer():
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="resident memory is read from /proc/self/statm (Linux)")
# scripts/sanitize.sh: ASan keeps freed memory in quarantine (to catch use after free), so
# resident memory grows by design there.
not_under_asan = pytest.mark.skipif(
    os.path.exists("/proc/self/maps") and _under_address_sanitizer(),
    reason="AddressSanitizer's quarantine holds freed memory: RSS growth means nothing here")


def _rss_growth(call):
    """Resident memory growth over CALLS calls of `call`, after WARMUP_CALLS calls."""
    for _ in range(WARMUP_CALLS):
        call()
    gc.collect()
    before = _rss_bytes()
    for _ in range(CALLS):
        call()
    gc.collect()
    return _rss_bytes() - before


@needs_proc
@not_under_asan
@pytest.mark.parametrize("name", sorted(CASES))
def test_no_memory_growth_over_repeated_forward_backward(name, one_torch_thread):
    make, ours, _ = CASES[name]
    inputs = make(torch.Generator().manual_seed(0))
    growth = _rss_growth(lambda: _forward_backward(ours, inputs))
    assert growth < RSS_GROWTH_BOUND, f"{name}: RSS grew by {growth} bytes over {CALLS} calls"


def _params_with_grads(gen):
    params = [torch.nn.Parameter(torch.randn(64, 16, generator=gen)),
              torch.nn.Parameter(torch.randn(16, generator=gen))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


@needs_proc
@not_under_asan
@pytest.mark.parametrize("name", sorted(OPTIMIZER_CONFIGS))
def test_no_memory_growth_over_repeated_optimizer_steps(name, one_torch_thread):
    optimizer = getattr(pyops.optim, name)(_params_with_grads(torch.Generator().manual_seed(0)),
                                           **OPTIMIZER_CONFIGS[name])
    growth = _rss_growth(optimizer.step)
    assert growth < RSS_GROWTH_BOUND, f"{name}: RSS grew by {growth} bytes over {CALLS} steps"


# ---- Several Python threads at once ---------------------------------------------------------

THREADS = 4


def _run_in_threads(work):
    """Runs work(thread_index) in THREADS threads started together; re-raises the first
    failure."""
    barrier = threading.Barrier(THREADS)
    errors = []

    def target(index):
        try:
            barrier.wait()
            work(index)
        except BaseException as error:  # noqa: BLE001  (reported in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _check_case(name, gen, grow=1):
    make, ours, ref = CASES[name]
    inputs = make(gen)
    if grow > 1:  # a batch `grow` times larger, so that at::parallel_for splits the work
        x, *rest = inputs
        inputs = (x.detach().repeat(grow, *[1] * (x.dim() - 1)).requires_grad_(), *rest)
        if name == "log_softmax_nll_loss":
            inputs = (inputs[0], rest[0].repeat(grow))
    if ref is None:  # dropout: each element is zeroed or scaled by 1 / (1 - p)
        x = inputs[0]
        out, (grad,) = _forward_backward(ours, inputs)
        kept = out != 0
        torch.testing.assert_close(out, torch.where(kept, x.detach() / 0.7, 0.0))
        torch.testing.assert_close(grad, torch.where(kept, torch.full_like(grad, 1 / 0.7), 0.0))
        return
    _assert_matches(name, _forward_backward(ours, inputs), _forward_backward(ref, inputs))


def test_ops_from_several_threads_match_torch():
    def work(index):
        gen = torch.Generator().manual_seed(index)
        names = sorted(CASES)
        random.Random(index).shuffle(names)  # threads run different ops at the same time
        for _ in range(3):
            for name in names:
                _check_case(name, gen)
                _check_case(name, gen, grow=64)

    _run_in_threads(work)


def test_optimizers_from_several_threads_match_torch():
    def work(index):
        names = sorted(OPTIMIZER_CONFIGS)
        random.Random(index).shuffle(names)
        for name in names:
            gen = torch.Generator().manual_seed(index)
            params = _params_with_grads(gen)
            ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            ours = getattr(pyops.optim, name)(params, **OPTIMIZER_CONFIGS[name])
            ref = getattr(torch.optim, name)(ref_params, **OPTIMIZER_CONFIGS[name], foreach=False)
            for _ in range(20):
                for p, q in zip(params, ref_params):
                    p.grad = torch.randn(p.shape, generator=gen)
                    q.grad = p.grad.clone()
                ours.step()
                ref.step()
            for p, q in zip(params, ref_params):
                torch.testing.assert_close(p, q, msg=lambda m: f"{name} in thread {index}: {m}")

    _run_in_threads(work)


# ---- The GIL is released while a kernel runs ------------------------------------------------


class _Ticker(threading.Thread):
    """A Python loop, which needs the GIL to run, that notes the time about once a
    millisecond until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stamps = []
        self.stop = False

    def run(self):
        last = 0.0
        while not self.stop:
            now = time.perf_counter()
            if now - last >= 1e-3:
                self.stamps.append(now)
                last = now


def _ticks_during(call):
    """Runs `call` in this thread while a _Ticker runs in another; returns the number of
    milliseconds in which the ticker ran during the middle half of the call, and that half's
    length in milliseconds. A call that holds the GIL gives 0: the ticker can run only
    at thread switches just before or after the call, which the outer quarters absorb."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # a thread waiting for the GIL gets it quickly
    ticker = _Ticker()
    ticker.start()
    try:
        time.sleep(0.01)  # the ticker is running
        start = time.perf_counter()
        call()
        end = time.perf_counter()
    finally:
        ticker.stop = True
        ticker.join()
        sys.setswitchinterval(old_interval)
    quarter = (end - start) / 4
    ticks = sum(start + quarter < t < end - quarter for t in ticker.stamps)
    return ticks, 2 * quarter * 1e3


LONG_CALLS = ["conv2d", "conv2d backward", "max_pool2d", "sigmoid", "log_softmax", "dropout",
              "Adam step"]


def _long_call(name):
    """A call (one per family) that runs for 0.1 s or so on one thread; its inputs are
    prepared here, outside the call."""
    gen = torch.Generator().manual_seed(0)
    if name.startswith("conv2d"):
        # 5x5: a 3x3 kernel here takes Winograd, which made the call too short to probe
        image = torch.randn(32, 32, 64, 64, generator=gen, requires_grad=True)
        weight = torch.randn(64, 32, 5, 5, generator=gen)
        if name == "conv2d":
            return lambda: P.conv2d(image, weight, padding=2)
        out = P.conv2d(image, weight, padding=2)
        return lambda: torch.autograd.grad(out, image, torch.ones_like(out), retain_graph=True)
    if name == "max_pool2d":
        images = torch.randn(32, 32, 64, 64, generator=gen)
        return lambda: P.max_pool2d(images, 3, 1, 1)
    if name == "Adam step":
        param = torch.nn.Parameter(torch.randn(1 << 25, generator=gen))
        param.grad = torch.randn(1 << 25, generator=gen)
        return pyops.optim.Adam([param], lr=1e-3).step
    matrix = torch.randn(4096, 4096, generator=gen)
    return {
        "sigmoid": lambda: P.sigmoid(matrix),
        "log_softmax": lambda: P.log_softmax(matrix, 0),
        "dropout": lambda: P.dropout(matrix[:2048], 0.5),  # 4 Philox rounds per element
    }[name]


def test_gil_probe_detects_a_call_that_holds_it():
    # The probe can fail: sum() over a range of ints loops in C and never releases the GIL.
    ticks, window_ms = _ticks_during(lambda: sum(range(20_000_000)))
    assert window_ms > 50, "the GIL-holding call is too short to probe"
    assert ticks == 0, f"the ticker ran in {ticks} of {window_ms:.0f} ms while sum() held the GIL"


@pytest.mark.parametrize("name", LONG_CALLS)
def test_gil_released_while_kernels_run(name, one_torch_thread):
    call = _long_call(name)
    call()  # warm-up: first-call costs are not the kernel
    ticks, window_ms = _ticks_during(call)
    # With the GIL released the ticker runs whenever it has a core: in most milliseconds
    # on an idle machine (torch computes on one thread here), in a quarter of them on a
    # loaded one; with the GIL held, in none (test_gil_probe_detects_a_call_that_holds_it).
    assert ticks >= 3, (
        f"{name}: a Python thread ran in only {ticks} of the {window_ms:.0f} ms in the middle "
        "of the call: the GIL looks held")


# ---- 64-bit indexing -------------------------------------------------------------------------

# More elements than int32 can index, and not a multiple of any SIMD width or chunk size.
BIG = 2**31 + 4099
# Tensors are filled with a random pattern of this (prime) period, so elements 2**31 or
# 2**32 apart hold different values and an index that wrapped would read a wrong one.
PERIOD = 1_000_003
# Element ranges checked: the start, around 2**31, the end.
WINDOWS = [(0, 4096), (2**31 - 2048, 2**31 + 2048), (BIG - 4096, BIG)]


def _available_memory():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _require_memory(tensors, dtype):
    """Skips (visibly) where `tensors` tensors of BIG elements do not fit in memory."""
    needed = tensors * BIG * torch.finfo(dtype).bits // 8 + (1 << 30)
    available = _available_memory() if os.path.exists("/proc/meminfo") else 0
    if available < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free memory, "
                    f"{available / 2**30:.1f} GiB available")


def _fill(out, pattern):
    """out[i] = pattern[i % PERIOD], by broadcasting copies."""
    whole, rest = divmod(out.numel(), PERIOD)
    out[: whole * PERIOD].view(whole, PERIOD).copy_(pattern)
    out[whole * PERIOD:].copy_(pattern[:rest])
    return out


def _window(pattern, begin, end):
    """Elements [begin, end) of a tensor filled by _fill(pattern)."""
    return pattern[torch.arange(begin, end) % PERIOD]


def _pattern(seed, dtype):
    return torch.randn(PERIOD, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16])
def test_elementwise_ops_index_past_2_31(dtype):
    _require_memory(2, dtype)
    pattern = _pattern(0, dtype)
    x = torch.empty(BIG, dtype=dtype)

    def check(result, reference, what):
        for begin, end in WINDOWS:
            torch.testing.assert_close(result[begin:end], reference(_window(pattern, begin, end)),
                                       msg=lambda m: f"{what} [{begin}, {end}): {m}")

    P.relu_(_fill(x, pattern))
    check(x, torch.relu, "relu_")
    P.leaky_relu_(_fill(x, pattern), 0.2)
    check(x, lambda w: F.leaky_relu(w, 0.2), "leaky_relu_")
    _fill(x, pattern)
    out = P.leaky_relu(x, 0.2)
    check(out, lambda w: F.leaky_relu(w, 0.2), "leaky_relu")
    P.sigmoid(x, out=out)
    check(out, torch.sigmoid, "sigmoid(out=)")


@pytest.mark.slow
@pytest.mark.parametrize("name, config, state_tensors", [
    ("SGD", dict(lr=0.1, momentum=0.9), 1),
    ("Adam", dict(lr=0.01), 2),
])
def test_optimizer_steps_index_past_2_31(name, config, state_tensors):
    dtype = torch.float16
    _require_memory(2 + state_tensors, dtype)
    param_pattern, grad_pattern = _pattern(1, dtype), _pattern(2, dtype)
    param = torch.nn.Parameter(_fill(torch.empty(BIG, dtype=dtype), param_pattern))
    param.grad = _fill(torch.empty(BIG, dtype=dtype), grad_pattern)
    optimizer = getattr(pyops.optim, name)([param], **config)
    # The reference: torch's twin in float32 on each window, the state rounded to float16
    # between steps as pyops stores it (see test_optim's low-precision test).
    references = []
    for begin, end in WINDOWS:
        ref_param = torch.nn.Parameter(_window(param_pattern, begin, end).float())
        ref_param.grad = _window(grad_pattern, begin, end).float()
        references.append((ref_param, getattr(torch.optim, name)([ref_param], **config,
                                                                  foreach=False)))
    for _ in range(2):  # the second step reads the state the first wrote
        optimizer.step()
        for _, ref in references:
            ref.step()
            for state in ref.state.values():
                for key, value in state.items():
                    if key != "step":
                        value.copy_(value.to(dtype).float())
    eps = torch.finfo(dtype).eps
    state = optimizer.state[param]
    for (begin, end), (ref_param, ref) in zip(WINDOWS, references):
        where = f"{name} [{begin}, {end})"
        torch.testing.assert_close(param.detach()[begin:end], ref_param.detach().to(dtype),
                                   rtol=2 * eps, atol=2 * eps, msg=lambda m: f"{where}: {m}")
        for key, value in ref.state[ref_param].items():
            if key != "step":
                torch.testing.assert_close(state[key][begin:end], value.to(dtype), rtol=2 * eps,
                                           atol=2 * eps, msg=lambda m: f"{where} {key}: {m}")
