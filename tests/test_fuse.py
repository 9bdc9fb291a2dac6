"""pyops.convert(model, fuse=True): the fx fusion pass (conv/linear -> activation,
relu -> max-pool), exact against native torch, sharing the model's parameters."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.testing import assert_close

import pyops
from test_convert import seed_network


def assert_matches_native(native, candidate, x, atol=1e-5):
    """Output, input gradient, and each parameter's gradient and buffer (by name: the
    fused model keeps the native state_dict keys) of `candidate` match `native`."""
    x_native, x_candidate = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_native, out_candidate = native(x_native), candidate(x_candidate)
    assert_close(out_candidate, out_native, rtol=1e-4, atol=atol)
    upstream = torch.randn_like(out_native)
    out_native.backward(upstream)
    out_candidate.backward(upstream)
    assert_close(x_candidate.grad, x_native.grad, rtol=1e-4, atol=atol)
    candidate_params = dict(candidate.named_parameters())
    for name, p in native.named_parameters():
        assert_close(candidate_params[name].grad, p.grad, rtol=1e-4, atol=atol, msg=name)
    candidate_buffers = dict(candidate.named_buffers())
    for name, b in native.named_buffers():
        assert_close(candidate_buffers[name], b, rtol=1e-4, atol=atol, msg=name)


def test_fused_seed_network_matches_native_and_shares_parameters():
    torch.manual_seed(0)
    native = seed_network().eval()  # dropout off
    model = copy.deepcopy(native)
    params = list(model.parameters())
    fused, report = pyops.convert(model, fuse=True, return_report=True)

    assert isinstance(fused, torch.fx.GraphModule) and type(fused).__name__ == "Sequential"
    assert [(names, kind) for names, kind in report.fused] == [
        (["0", "1"], "Conv2dAct(relu)"), (["2", "3"], "Conv2dAct(relu)"),
        (["7", "8"], "LinearAct(relu)")]
    assert report.not_fused == [] and report.fusion_skipped is None
    assert "fused   2 + 3 -> Conv2dAct(relu)" in str(report)
    assert type(fused.get_submodule("0")) is pyops.nn.Conv2dAct
    assert type(fused.get_submodule("7")) is pyops.nn.LinearAct
    assert not hasattr(fused, "1")  # the fused ReLU is gone from the GraphModule
    assert "Conv2dAct(32, 64, kernel_size=(3, 3), stride=(1, 1), activation=relu)" in repr(fused)
    # The same Parameter objects and state_dict keys; the fused model is in eval mode too.
    assert {id(p) for p in fused.parameters()} == {id(p) for p in params}
    assert fused.get_submodule("0").weight is model[0].weight
    assert list(fused.state_dict()) == list(native.state_dict())
    assert not fused.training and not fused.get_submodule("0").training

    x = torch.randn(8, 1, 28, 28)
    assert_matches_native(native, fused, x)
    # The model passed in stays valid: converted in place, unfused.
    assert type(model[1]) is pyops.nn.ReLU
    assert_close(model(x), native(x), rtol=1e-4, atol=1e-5)
    # Nothing left to swap or fuse: converting again returns the fused model itself.
    again, report = pyops.convert(fused, fuse=True, return_report=True)
    assert again is fused and report.swapped == report.fused == []


def test_fusion_keeps_the_random_stream_of_dropout():
    torch.manual_seed(0)
    unfused = pyops.convert(seed_network())  # train mode: dropout on
    fused = pyops.convert(copy.deepcopy(unfused), fuse=True)
    x = torch.randn(4, 1, 28, 28)
    outputs = []
    for model in (unfused, fused):
        torch.manual_seed(1)
        outputs.append(model(x))
    assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


def test_thirty_adadelta_steps_of_the_fused_seed_network_follow_native():
    torch.manual_seed(0)
    native = seed_network().eval()  # dropout off
    model = copy.deepcopy(native)
    native_opt = torch.optim.Adadelta(native.parameters(), lr=0.5)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=0.5)  # built before the fusion
    fused = pyops.convert(model, fuse=True)
    pyops.convert_optimizer(optimizer)
    x = torch.randn(16, 1, 28, 28)
    target = torch.randint(0, 10, (16,))
    curves = ([], [])
    for _ in range(30):
        for net, opt, curve in ((native, native_opt, curves[0]), (fused, optimizer, curves[1])):
            opt.zero_grad()
            loss = TF.nll_loss(net(x), target)
            loss.backward()
            opt.step()
            curve.append(loss.item())
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-3, curves
    assert curves[1][-1] < curves[1][0]


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv-bn-relu-conv-bn, identity (or a strided
    1x1 conv-bn) added, relu; one in-place ReLU module called twice."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def small_resnet():
    """A ResNet stem (conv-bn-in-place relu-max-pool) and two basic blocks."""
    return nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
                         BasicBlock(8, 8), BasicBlock(8, 16, stride=2))


def depthwise_separable_block(channels=16, out_channels=24):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
                         nn.ReLU(), nn.Conv2d(channels, out_channels, 1), nn.ReLU())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_resnet_blocks_with_native_batch_norm_match_native(fuse, train):
    torch.manual_seed(0)
    native = small_resnet().train(train)
    # Non-trivial running statistics for eval mode.
    with torch.no_grad():
        native(torch.randn(4, 3, 32, 32))
    model = copy.deepcopy(native)
    converted, report = pyops.convert(model, fuse=fuse, return_report=True)
    assert {kind for _, kind, _ in report.kept} == {"BatchNorm2d"}
    if fuse:
        # The stem's in-place relu after batch norm fuses with the pool; the block relus
        # follow a batch norm or an add, not a conv, and stay.
        assert report.fused == [(["2", "3"], "ReLUMaxPool2d")]
        assert type(converted.get_submodule("3")) is pyops.nn.ReLUMaxPool2d
        assert converted.get_submodule("4.bn1") is model[4].bn1  # BatchNorm left native, shared
    assert converted.training == train
    assert_matches_native(native, converted, torch.randn(4, 3, 32, 32), atol=1e-4)


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_depthwise_separable_block_matches_native(fuse):
    torch.manual_seed(0)
    native = depthwise_separable_block()
    converted, report = pyops.convert(copy.deepcopy(native), fuse=fuse, return_report=True)
    if fuse:
        assert [kind for _, kind in report.fused] == ["Conv2dAct(relu)"] * 2
        assert converted.get_submodule("0").groups == 16
    assert_matches_native(native, converted, torch.randn(2, 16, 15, 17))


class FunctionalActivations(nn.Module):
    """Activations and pools written as functions and tensor methods."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(8, 8, 3, padding="same")
        self.conv3 = nn.Conv2d(8, 8, 3, bias=False)
        self.conv4 = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 5 * 5, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = TF.leaky_relu(self.conv1(x), -0.2)  # a negative slope, carried into the fusion
        x = torch.sigmoid(self.conv2(x))
        x = self.conv3(x).tanh()
        x = TF.max_pool2d(TF.relu(self.conv4(x) - 0.5), 2, ceil_mode=True)
        x = TF.relu(self.fc1(x.flatten(1)), inplace=True)
        return torch.tanh(self.fc2(x))


def test_functional_and_method_activations_fuse():
    torch.manual_seed(0)
    native = FunctionalActivations()
    fused, report = pyops.convert(copy.deepcopy(native), fuse=True, return_report=True)
    assert [(names[0], kind) for names, kind in report.fused] == [
        ("conv1", "Conv2dAct(leaky_relu)"), ("conv2", "Conv2dAct(sigmoid)"),
        ("conv3", "Conv2dAct(tanh)"), ("fc1", "LinearAct(relu)"), ("fc2", "LinearAct(tanh)"),
        ("relu()", "relu_max_pool2d")]
    conv1 = fused.get_submodule("conv1")
    assert conv1.negative_slope == -0.2 and conv1.padding_mode == "reflect"
    assert "negative_slope=-0.2" in repr(conv1)
    assert_matches_native(native, fused, torch.randn(2, 3, 12, 12))


class NotFusable(nn.Module):
    """Each conv -> relu here must stay unfused for the result to stay exact."""

    def __init__(self):
        super().__init__()
        self.twice_used = nn.Conv2d(3, 4, 3, padding=1)
        self.hooked = nn.Conv2d(4, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        y = self.twice_used(x)
        z = TF.relu(y) + y  # the pre-activation is read again
        z = torch.relu(self.hooked(z))
        z = self.shared(torch.relu(self.shared(z)))  # one module, two call sites
        return self.pool(torch.relu_(x)), z  # an in-place relu of the model's input


def test_fusions_that_would_not_be_exact_are_left_and_reported():
    torch.manual_seed(0)
    native = NotFusable()
    model = copy.deepcopy(native)
    seen = []
    model.hooked.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    result, report = pyops.convert(model, fuse=True, return_report=True)
    assert result is model and report.fused == []  # nothing fused: the model comes back
    reasons = {names[0]: why for names, why in report.not_fused}
    assert reasons == {
        "twice_used": "the output of twice_used is used 2 times",
        "hooked": "hooked has hooks",
        "shared": "shared is called at 2 places",
        "relu_()": "the in-place relu mutates a tensor that may be seen elsewhere",
    }
    x = torch.randn(2, 3, 8, 8)
    out_native, out_model = native(x.clone()), model(x.clone())
    assert_close(out_model, out_native, rtol=1e-4, atol=1e-5)
    assert seen == [(2, 4, 8, 8)]


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor's value: fx cannot follow it
            return torch.relu(self.conv(x))
        return self.conv(x)


class TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return y * 2 if self.training else y


@pytest.mark.parametrize("model_class, why", [
    (DataDependent, "torch.fx cannot trace DataDependent.forward (TraceError: symbolically "
                    "traced variables cannot be used as inputs to control flow)"),
    (TrainingBranch, "TrainingBranch.forward runs different code in train() and eval() mode"),
])
def test_untraceable_model_is_converted_unfused_with_a_clear_warning(model_class, why):
    model = model_class().eval()
    with pytest.warns(UserWarning, match="fusion skipped") as caught:
        result, report = pyops.convert(model, fuse=True, return_report=True)
    message = str(caught[0].message)
    assert why in message and "converted in place, as with fuse=False" in message
    assert result is model and why in report.fusion_skipped
    assert isinstance(next(iter(model.children())), (pyops.nn.Conv2d, pyops.nn.Linear))
    assert not model.training  # the two trial traces left the mode as it was


def test_torch_compile_fullgraph_of_the_fused_seed_network():
    torch._dynamo.reset()
    torch.manual_seed(0)
    fused = pyops.convert(seed_network(), fuse=True).eval()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), fused(x), rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(compiled(x).sum(), x)
    (ref,) = torch.autograd.grad(fused(x).sum(), x)
    assert_close(grad, ref, rtol=1e-4, atol=1e-5)


def test_fused_modules_as_layers():
    torch.manual_seed(0)
    conv = pyops.nn.Conv2dAct(3, 4, 3, padding=1, activation="tanh")
    assert isinstance(conv, nn.Conv2d) and list(conv.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 3, 5, 5)
    assert_close(conv(x), torch.tanh(TF.conv2d(x, conv.weight, conv.bias, padding=1)))
    linear = pyops.nn.LinearAct(6, 5, activation="leaky_relu", negative_slope=0.3)
    x = torch.randn(2, 3, 6)  # leading dimensions, as nn.Linear takes
    assert_close(linear(x), TF.leaky_relu(TF.linear(x, linear.weight, linear.bias), 0.3))
    pool = pyops.nn.ReLUMaxPool2d(2)
    assert not isinstance(pool, nn.MaxPool2d)
    x = torch.randn(2, 3, 6, 6)
    assert_close(pool(x), TF.max_pool2d(TF.relu(x), 2))
    with pytest.raises(ValueError, match="activation must be one of"):
        pyops.nn.Conv2dAct(3, 4, 3, activation="gelu")
    with pytest.raises(ValueError, match="must not return indices"):
        pyops.nn.ReLUMaxPool2d.fuse(nn.MaxPool2d(2, return_indices=True))
