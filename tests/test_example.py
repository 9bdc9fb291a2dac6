"""examples/train_cnn.py: its data loading on small slices, and a few training steps."""

import gzip
import importlib.util
import os
import struct

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location(
        "train_cnn", os.path.join(ROOT, "examples", "train_cnn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_are_upscaled_to_the_networks_input(example):
    (train_x, train_y), (test_x, test_y) = example.load_digits()
    assert train_x.shape[1:] == (1, 28, 28) and test_x.shape[1:] == (1, 28, 28)
    assert len(train_y) + len(test_y) == 1797 and len(test_y) == 359
    assert 0.0 <= train_x.min() and train_x.max() <= 1.0
    assert set(train_y.tolist()) == set(range(10))


def _write_idx(path, tensor):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | tensor.dim()))
        f.write(struct.pack(f">{tensor.dim()}I", *tensor.shape))
        f.write(tensor.numpy().tobytes())


def test_mnist_idx_files_are_read(example, tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    (train_x, train_y), _ = example.load_mnist(str(tmp_path))
    assert torch.equal(train_x, images.float().unsqueeze(1) / 255)
    assert train_y.tolist() == [3, 1, 4, 1, 5]


def test_a_few_pyops_training_steps_lower_the_loss(example):
    import pyops

    torch.manual_seed(0)
    (train_x, train_y), _ = example.load_digits()
    x, y = train_x[:128], train_y[:128]
    model = pyops.convert(example.seed_network())
    optimizer = pyops.convert_optimizer(torch.optim.Adadelta(model.parameters(), lr=0.5))
    model.eval()  # no dropout: the loss must go down step by step on a fixed batch
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
