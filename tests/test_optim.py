"""pyops.optim against torch.optim: trajectories, state, state_dict, checkpoints, errors,
DDP and ZeroRedundancyOptimizer."""

import inspect
import io
import itertools
import os
import socket

import pytest
import torch

import pyops
import pyops.optim

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

NAMES = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"]
STEPS = 50


def _grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def _sgd_ok(c):
    return not c["nesterov"] or (c["momentum"] > 0 and c["dampening"] == 0)


# Every hyperparameter torch accepts, each option on and off (lr as given, non-default
# values where the default would hide a term).
CONFIGS = {
    "SGD": [c for c in _grid(lr=[0.05], momentum=[0.0, 0.9], dampening=[0.0, 0.3],
                             weight_decay=[0.0, 0.1], nesterov=[False, True],
                             maximize=[False, True]) if _sgd_ok(c)],
    "Adagrad": _grid(lr=[0.05], lr_decay=[0.0, 0.01], weight_decay=[0.0, 0.1],
                     initial_accumulator_value=[0.0, 0.1], eps=[1e-10], maximize=[False, True]),
    "Adadelta": _grid(lr=[1.0, 0.5], rho=[0.9, 0.5], weight_decay=[0.0, 0.1], eps=[1e-6],
                      maximize=[False, True]),
    "RMSprop": _grid(lr=[0.01], alpha=[0.99, 0.9], weight_decay=[0.0, 0.1],
                     momentum=[0.0, 0.9], centered=[False, True], maximize=[False, True]),
    "Adam": _grid(lr=[0.01], betas=[(0.9, 0.999), (0.5, 0.9)], weight_decay=[0.0, 0.1],
                  amsgrad=[False, True], maximize=[False, True],
                  decoupled_weight_decay=[False, True]),
    "AdamW": _grid(lr=[0.01], weight_decay=[0.0, 0.01, 0.1], amsgrad=[False, True],
                   maximize=[False, True]),
}


def _config_id(config):
    return ",".join(f"{k}={v}" for k, v in config.items())


def _all_configs():
    return [pytest.param(name, c, id=f"{name}-{_config_id(c)}")
            for name in NAMES for c in CONFIGS[name]]


# Short lists: one plain and one with every option on, per optimizer.
def _few_configs():
    out = []
    for name in NAMES:
        out.append(pytest.param(name, {}, id=f"{name}-defaults"))
        out.append(pytest.param(name, CONFIGS[name][-1], id=f"{name}-{_config_id(CONFIGS[name][-1])}"))
    return out


# Sizes below, at and just above multiples of the SIMD widths (8 doubles / 16 floats /
# 32 halves per AVX512 register), a 0-dim and an empty param, a transposed (dense,
# non-contiguous) param, a non-dense param (every other column) and one big enough to
# be split across threads.
def _is_dense(t):
    """Its elements fill a block of memory with no gaps (any order of dims)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _like_layout(t, dtype, device):
    """An empty tensor laid out as `t` (dense with its strides, or every other column)."""
    if _is_dense(t):
        return torch.empty_strided(t.size(), t.stride(), dtype=dtype, device=device)
    return torch.empty(t.shape[0], t.shape[1] * 2, dtype=dtype, device=device)[:, ::2]


def _make_params(dtype, device, big=True):
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (0, 3), (1,), (7,), (8,), (9,), (15,), (16,), (17,), (31,), (32,), (33,), (65,), (4, 5)]
    tensors = [torch.randn(s, generator=gen) for s in shapes]
    tensors.append(torch.randn(5, 3, generator=gen).t())        # dense, transposed strides
    tensors.append(torch.randn(6, 10, generator=gen)[:, ::2])   # not dense: written back
    if big:
        tensors.append(torch.randn(40000, generator=gen))
    out = []
    for t in tensors:
        storage = _like_layout(t, dtype, device)
        storage.copy_(t)
        out.append(torch.nn.Parameter(storage))
    return out


def _clone_params(params):
    clones = []
    for p in params:
        c = _like_layout(p, p.dtype, p.device)
        c.copy_(p.detach())
        clones.append(torch.nn.Parameter(c))
    return clones


def _set_grads(params_list, step, dtype):
    """The same random, non-zero grads (rounded to `dtype`) for every list of params."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params_list[0]):
        g = torch.randn(p.shape, generator=gen) + 0.1 * (i % 3)
        g = g.to(dtype)
        for params in params_list:
            params[i].grad = g.to(device=params[i].device, dtype=params[i].dtype).clone()


def _assert_same_state(ours, ref, params_ours, params_ref, dtype=None, **tol):
    for p, q in zip(params_ours, params_ref):
        actual, expected = ours.state[p], ref.state[q]
        assert set(actual) == set(expected)
        for key in expected:
            a, e = actual[key], expected[key]
            if key == "step":
                assert a.device.type == "cpu" and a.dtype == e.dtype
                assert a.item() == e.item()
                continue
            assert a.shape == e.shape and a.dtype == (dtype or e.dtype), key
            torch.testing.assert_close(a, e.to(a.dtype), **tol, msg=lambda m: f"state {key}: {m}")


def _run_pair(name, config, dtype, device, steps=STEPS, big=True):
    params = _make_params(dtype, device, big)
    ref_params = _clone_params(params)
    ours = getattr(pyops.optim, name)(params, **config)
    ref = getattr(torch.optim, name)(ref_params, **config, foreach=False)
    for step in range(steps):
        _set_grads([params, ref_params], step, dtype)
        ours.step()
        ref.step()
    return ours, ref, params, ref_params


@pytest.mark.parametrize("name,config", _all_configs())
def test_matches_torch(name, config):
    ours, ref, params, ref_params = _run_pair(name, config, torch.float32, "cpu", big=False)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q)
    _assert_same_state(ours, ref, params, ref_params)


# With a param big enough to be split across threads, and in float64.
@pytest.mark.parametrize("name,config", _few_configs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_big_and_float64(name, config, dtype):
    ours, ref, params, ref_params = _run_pair(name, config, dtype, "cpu")
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q)
    _assert_same_state(ours, ref, params, ref_params)


def _round_trip_states(opt, dtype):
    """Rounds a float32 torch optimizer's params and states to `dtype` and back: with it,
    torch's own formulas reproduce "compute in float, store in dtype once per step"."""
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                p.copy_(p.to(dtype).float())
                for key, value in opt.state[p].items():
                    if key != "step":
                        value.copy_(value.to(dtype).float())


@pytest.mark.parametrize("name,config", _few_configs())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_matches_torch_in_float(name, config, dtype, device):
    # pyops computes half/bfloat16 in float and rounds once per step (as torch's fused
    # optimizers do); the reference is torch's twin in float32 from the same rounded
    # values, rounded to the dtype after every step.
    params = _make_params(dtype, device, big=False)
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in params]
    ours = getattr(pyops.optim, name)(params, **config)
    ref = getattr(torch.optim, name)(ref_params, **config, foreach=False)
    for step in range(STEPS):
        _set_grads([params, ref_params], step, dtype)
        ours.step()
        ref.step()
        _round_trip_states(ref, dtype)
    # Results are mostly bit-identical; where float32 rounds differently (operation
    # order), a value moves by one unit in the last place, and later steps may carry it
    # into values that cancel (a momentum near 0 from terms near 1): allow two units of
    # the dtype at the scale of the values (about 1), relative and absolute.
    eps = torch.finfo(dtype).eps
    tol = dict(rtol=2 * eps, atol=2 * eps)
    for p, q in zip(params, ref_params):
        assert p.dtype == dtype
        torch.testing.assert_close(p, q.to(dtype), **tol)
    _assert_same_state(ours, ref, params, ref_params, dtype=dtype, **tol)


@pytest.mark.parametrize("name,config", _few_configs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_cuda_matches_torch(name, config, dtype, device):
    ours, ref, params, ref_params = _run_pair(name, config, dtype, device)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q)
    _assert_same_state(ours, ref, params, ref_params)


# ---- The torch.optim contract ----------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_same_constructor_and_class(name):
    ours, twin = getattr(pyops.optim, name), getattr(torch.optim, name)
    assert issubclass(ours, twin) and issubclass(ours, torch.optim.Optimizer)
    ours_sig = inspect.signature(ours.__init__).parameters
    twin_sig = inspect.signature(twin.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in ours_sig.values()] == \
        [(p.name, p.kind, p.default) for p in twin_sig.values()]


@pytest.mark.parametrize("name,config", _few_configs())
def test_state_dict_moves_both_ways(name, config):
    dtype = torch.float32
    params = _make_params(dtype, "cpu", big=False)
    mid = 20
    # pyops -> torch -> keeps training like an all-torch run, and torch -> pyops.
    for first, second in ((pyops.optim, torch.optim), (torch.optim, pyops.optim)):
        a_params, ref_params = _clone_params(params), _clone_params(params)
        a = getattr(first, name)(a_params, **config)
        ref = getattr(torch.optim, name)(ref_params, **config, foreach=False)
        for step in range(mid):
            _set_grads([a_params, ref_params], step, dtype)
            a.step()
            ref.step()
        b_params = _clone_params(a_params)
        b = getattr(second, name)(b_params, **config)
        b.load_state_dict(a.state_dict())
        for step in range(mid, mid + 20):
            _set_grads([b_params, ref_params], step, dtype)
            b.step()
            ref.step()
        for p, q in zip(b_params, ref_params):
            torch.testing.assert_close(p, q)
        _assert_same_state(b, ref, b_params, ref_params)


@pytest.mark.parametrize("name,config", _few_configs())
def test_resumed_checkpoint_is_bit_identical(name, config):
    dtype = torch.float32
    params = _make_params(dtype, "cpu")
    straight = _clone_params(params)
    opt = getattr(pyops.optim, name)(straight, **config)
    for step in range(30):
        _set_grads([straight], step, dtype)
        opt.step()

    first = _clone_params(params)
    opt1 = getattr(pyops.optim, name)(first, **config)
    for step in range(15):
        _set_grads([first], step, dtype)
        opt1.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optim": opt1.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = _clone_params(checkpoint["params"])
    opt2 = getattr(pyops.optim, name)(resumed, **config)
    opt2.load_state_dict(checkpoint["optim"])
    for step in range(15, 30):
        _set_grads([resumed], step, dtype)
        opt2.step()
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
    for p, q in zip(resumed, straight):
        for key, value in opt.state[q].items():
            assert torch.equal(opt2.state[p][key], value), key


def test_grad_none_skipped_and_add_param_group():
    a, b, c = (torch.nn.Parameter(torch.randn(10)) for _ in range(3))
    ra, rb, rc = (torch.nn.Parameter(t.detach().clone()) for t in (a, b, c))
    ours = pyops.optim.Adam([a, b], lr=0.1)
    ref = torch.optim.Adam([ra, rb], lr=0.1, foreach=False)
    before = b.detach().clone()
    a.grad, ra.grad = torch.ones(10), torch.ones(10)
    ours.step()
    ref.step()
    assert torch.equal(b, before) and b not in ours.state  # no grad: untouched, no state
    ours.add_param_group({"params": [c], "lr": 0.01, "amsgrad": True})
    ref.add_param_group({"params": [rc], "lr": 0.01, "amsgrad": True})
    for step in range(5):
        _set_grads([[a, b, c], [ra, rb, rc]], step, torch.float32)
        ours.step()
        ref.step()
    for p, q in zip((a, b, c), (ra, rb, rc)):
        torch.testing.assert_close(p, q)
    _assert_same_state(ours, ref, [a, b, c], [ra, rb, rc])


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_tensor_lr_and_closure(name):
    p, q = torch.nn.Parameter(torch.randn(20)), None
    q = torch.nn.Parameter(p.detach().clone())
    ours = getattr(pyops.optim, name)([p], lr=torch.tensor(0.01))
    ref = getattr(torch.optim, name)([q], lr=torch.tensor(0.01), foreach=False)
    for _ in range(5):
        def closure(param):
            def f():
                assert torch.is_grad_enabled()
                param.grad = None
                loss = (param ** 2).sum()
                loss.backward()
                return loss
            return f
        loss_ours = ours.step(closure(p))
        loss_ref = ref.step(closure(q))
        torch.testing.assert_close(loss_ours, loss_ref)
    torch.testing.assert_close(p, q)


def test_mixed_dtypes_in_one_group():
    params = [torch.nn.Parameter(torch.randn(9, dtype=dt)) for dt in (torch.float32, torch.float64)]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, ref = pyops.optim.AdamW(params), torch.optim.AdamW(refs, foreach=False)
    for step in range(5):
        for p, r in zip(params, refs):
            p.grad = torch.full_like(p, step + 1.0)
            r.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, r in zip(params, refs):
        torch.testing.assert_close(p, r)


def test_lr_scheduler_and_hooks_work():
    p = torch.nn.Parameter(torch.randn(4))
    opt = pyops.optim.SGD([p], lr=1.0)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(4)
    opt.step()
    sched.step()
    assert calls == [1] and opt.param_groups[0]["lr"] == 0.5


# ---- Bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_rejects_sparse_grads(name):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = getattr(pyops.optim, name)([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name,flag", [(n, "differentiable") for n in NAMES] +
                         [(n, "capturable") for n in ("Adadelta", "RMSprop", "Adam", "AdamW")])
def test_rejects_unsupported_flags(name, flag):
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        getattr(pyops.optim, name)([p], **{flag: True})


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adam", "AdamW"])
def test_foreach_and_fused_flags_are_accepted(name):
    for flags in ({"foreach": True}, {"fused": True}, {"foreach": False, "fused": False}):
        p = torch.nn.Parameter(torch.randn(17))
        q = torch.nn.Parameter(p.detach().clone())
        ours = getattr(pyops.optim, name)([p], **flags)
        ref = getattr(torch.optim, name)([q], foreach=False)
        for step in range(3):
            p.grad = torch.full_like(p, 0.5 + step)
            q.grad = p.grad.clone()
            ours.step()
            ref.step()
        torch.testing.assert_close(p, q)


def _adam_args(n=2, dtype=torch.float32):
    params = [torch.randn(5, dtype=dtype) for _ in range(n)]
    grads = [torch.randn(5, dtype=dtype) for _ in range(n)]
    m = [torch.zeros(5, dtype=dtype) for _ in range(n)]
    v = [torch.zeros(5, dtype=dtype) for _ in range(n)]
    steps = [torch.tensor(0.0) for _ in range(n)]
    return params, grads, m, v, [], steps


_ADAM_KW = dict(lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                maximize=False, decoupled_weight_decay=False)


def _call_adam(params, grads, m, v, mx, steps, **kw):
    torch.ops.pyops.adam_(params, grads, m, v, mx, steps, **{**_ADAM_KW, **kw})


def test_operator_errors_name_the_argument():
    params, grads, m, v, mx, steps = _adam_args()
    with pytest.raises(ValueError, match=r"expected grads to hold 2 tensors"):
        _call_adam(params, grads[:1], m, v, mx, steps)
    with pytest.raises(ValueError, match=r"expected max_exp_avg_sqs to hold 0 tensors"):
        _call_adam(params, grads, m, v, [torch.zeros(5)] * 2, steps)
    with pytest.raises(ValueError, match=r"expected max_exp_avg_sqs to hold 2 tensors"):
        _call_adam(params, grads, m, v, mx, steps, amsgrad=True)
    with pytest.raises(TypeError, match=r"exp_avgs\[1\] to have the dtype of params\[1\]"):
        _call_adam(params, grads, [m[0], m[1].double()], v, mx, steps)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] to have the shape of params\[0\]"):
        _call_adam(params, grads, m, [torch.zeros(6), v[1]], mx, steps)
    with pytest.raises(TypeError, match=r"params\[0\] to have dtype float32, float64"):
        _call_adam([p.int() for p in params], grads, m, v, mx, steps)
    with pytest.raises(TypeError, match=r"grads\[0\] to be a dense"):
        _call_adam(params, [grads[0].to_sparse(), grads[1]], m, v, mx, steps)
    with pytest.raises(TypeError, match=r"state_steps\[1\] to have dtype float32 or float64"):
        _call_adam(params, grads, m, v, mx, [steps[0], torch.tensor(0)])
    with pytest.raises(ValueError, match=r"expected beta1 in \[0, 1\)"):
        _call_adam(params, grads, m, v, mx, steps, beta1=1.5)
    with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] share memory"):
        _call_adam([params[0], params[0]], grads, m, v, mx, steps)
    with pytest.raises(RuntimeError, match=r"share memory"):
        _call_adam(params, grads, [params[0], m[1]], v, mx, steps)
    with pytest.raises(RuntimeError, match=r"params\[0\] has elements that share memory"):
        _call_adam([torch.randn(1).expand(5), params[1]], grads, m, v, mx, steps)
    # A failed check changes nothing, not even the step counts.
    assert all(s.item() == 0 for s in steps)


def test_operator_refuses_grad_mode_with_requires_grad_params():
    params, grads, m, v, mx, steps = _adam_args()
    params[0].requires_grad_()
    with pytest.raises(RuntimeError, match="argument 'params' requires grad"):
        _call_adam(params, grads, m, v, mx, steps)


def test_operator_bumps_versions_and_passes_opcheck():
    params, grads, m, v, mx, steps = _adam_args()
    before = [t._version for t in params + m + v + steps]
    _call_adam(params, grads, m, v, mx, steps)
    assert all(t._version > b for t, b in zip(params + m + v + steps, before))
    args = tuple(_adam_args())
    torch.library.opcheck(torch.ops.pyops.adam_.default, args, _ADAM_KW,
                          test_utils=("test_schema", "test_faketensor"))


# ---- Distributed ---------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        def model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

        def train(make_optimizer):
            net = DDP(model())
            opt = make_optimizer(net.parameters())
            gen = torch.Generator().manual_seed(rank)
            for _ in range(10):
                x = torch.randn(6, 8, generator=gen)
                opt.zero_grad()
                net(x).square().mean().backward()
                opt.step()
            return [p.detach().clone() for p in net.parameters()]

        runs = {
            "ddp": (lambda ps: pyops.optim.Adam(ps, lr=0.01, weight_decay=0.1),
                    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, foreach=False)),
            "zero": (lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=pyops.optim.Adam, lr=0.01),
                     lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=torch.optim.Adam,
                                                        lr=0.01, foreach=False)),
        }
        for ours, ref in runs.values():
            for a, b in zip(train(ours), train(ref)):
                torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()


def test_ddp_and_zero_redundancy_optimizer():
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_distributed_worker, args=(2, _free_port()), nprocs=2, join=True)
