"""pyops.convert and pyops.convert_optimizer: in-place swaps that keep parameters,
optimizers and results."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import pyops


def seed_network():
    """The project's reference model (DESIGN.md), as a user would write it in torch."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10), nn.LogSoftmax(dim=1),
    )


def test_convert_swaps_in_place_and_keeps_parameters():
    torch.manual_seed(0)
    model = seed_network()
    params_before = list(model.parameters())
    state_before = copy.deepcopy(model.state_dict())
    result, report = pyops.convert(model, return_report=True)
    assert result is model
    assert [type(m) for m in model] == [
        pyops.nn.Conv2d, pyops.nn.ReLU, pyops.nn.Conv2d, pyops.nn.ReLU, pyops.nn.MaxPool2d,
        pyops.nn.Dropout, nn.Flatten, pyops.nn.Linear, pyops.nn.ReLU, pyops.nn.Dropout,
        pyops.nn.Linear, pyops.nn.LogSoftmax]
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    assert model.state_dict().keys() == state_before.keys()
    assert len(report.swapped) == 11
    assert [k[:2] for k in report.kept] == [("6", "Flatten")]
    assert "kept    6: Flatten" in str(report)


def test_converted_seed_network_matches_native_forward_and_backward():
    torch.manual_seed(0)
    native = seed_network().eval()  # dropout off: deterministic
    converted = pyops.convert(copy.deepcopy(native))
    x = torch.randn(8, 1, 28, 28)
    target = torch.randint(0, 10, (8,))
    out_n, out_p = native(x), converted(x)
    assert_close(out_p, out_n, rtol=1e-4, atol=1e-5)
    torch.nn.functional.nll_loss(out_n, target).backward()
    torch.nn.functional.nll_loss(out_p, target).backward()
    for (name, p_n), p_p in zip(native.named_parameters(), converted.parameters()):
        assert_close(p_p.grad, p_n.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_an_optimizer_built_before_the_swap_keeps_training_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.Adadelta(model.parameters(), lr=0.5)
    pyops.convert(model)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 20)).sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_modules_pyops_cannot_serve_are_kept_and_reported():
    class MyReLU(nn.ReLU):  # a subclass may change forward: pyops leaves it alone
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.float16), MyReLU(), nn.BatchNorm1d(4),
                          nn.Linear(4, 2, dtype=torch.float64),
                          nn.Linear(2, 2, dtype=torch.complex128))
    with pytest.warns(UserWarning, match="MyReLU"):
        _, report = pyops.convert(model, return_report=True)
    kept = {name: why for name, _, why in report.kept}
    assert "subclass of torch.nn.ReLU" in kept["1"]
    assert kept["2"] == "no pyops kernel for this module"
    assert "complex128" in kept["4"]
    assert isinstance(model[0], pyops.nn.Linear) and isinstance(model[3], pyops.nn.Linear)
    assert type(model[1]) is MyReLU and type(model[4]) is nn.Linear


def test_convert_twice_is_a_no_op_and_bad_input_raises():
    model = pyops.convert(nn.Sequential(nn.ReLU()))
    _, report = pyops.convert(model, return_report=True)
    assert report.swapped == [] and report.kept == []
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        pyops.convert(torch.randn(3))


def test_convert_optimizer_continues_the_same_trajectory():
    torch.manual_seed(0)
    w0 = torch.randn(50)
    grads = [torch.randn(50) for _ in range(20)]
    runs = []
    for switch in (False, True):
        w = torch.nn.Parameter(w0.clone())
        optimizer = torch.optim.Adam([w], lr=0.01, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.5)
        for step, g in enumerate(grads):
            if switch and step == 10:
                assert pyops.convert_optimizer(optimizer) is optimizer
                assert isinstance(optimizer, pyops.optim.Adam)
            w.grad = g.clone()
            optimizer.step()
            scheduler.step()
        runs.append(w.detach())
    assert_close(runs[1], runs[0])


def test_convert_optimizer_refuses_what_it_cannot_serve():
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="expected one of torch.optim"):
        pyops.convert_optimizer(torch.optim.LBFGS([w]))
    optimizer = torch.optim.Adam([w], differentiable=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        pyops.convert_optimizer(optimizer)
    assert type(optimizer) is torch.optim.Adam


def test_thirty_adadelta_steps_follow_the_native_loss_curve():
    torch.manual_seed(0)
    native = seed_network().eval()  # dropout off
    converted = pyops.convert(copy.deepcopy(native))
    native_opt = torch.optim.Adadelta(native.parameters(), lr=0.5)
    pyops_opt = pyops.optim.Adadelta(converted.parameters(), lr=0.5)
    x = torch.randn(16, 1, 28, 28)
    target = torch.randint(0, 10, (16,))
    curves = ([], [])
    for _ in range(30):
        for model, optimizer, curve in ((native, native_opt, curves[0]),
                                        (converted, pyops_opt, curves[1])):
            optimizer.zero_grad()
            loss = torch.nn.functional.nll_loss(model(x), target)
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-3, curves
    assert curves[1][-1] < curves[1][0]


def test_torch_compile_fullgraph_of_the_converted_seed_network():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = pyops.convert(seed_network()).eval()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(compiled(x).sum(), x)
    (ref,) = torch.autograd.grad(model(x).sum(), x)
    assert_close(grad, ref, rtol=1e-4, atol=1e-5)
