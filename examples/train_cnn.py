#!/usr/bin/env python3
"""Trains the seed network (DESIGN.md) on handwritten digits with pyops.

    python examples/train_cnn.py                      # scikit-learn's digits, upscaled to 28x28
    python examples/train_cnn.py --data-dir DIR       # MNIST IDX files (train-images-idx3-ubyte, ...)
    python examples/train_cnn.py --native             # the identical model on torch alone

The model is written in plain torch.nn and swapped with pyops.convert; the optimizer is
Adadelta at a fixed learning rate of 0.5, swapped with pyops.convert_optimizer.
"""

import argparse
import gzip
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def seed_network():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10), nn.LogSoftmax(dim=1),
    )


def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's 1797 8x8 digits, upscaled to 28x28 (the network's input size),
    scaled to [0, 1] and split into train and test sets."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        magic, = struct.unpack(">I", f.read(4))
        dims = struct.unpack(f">{magic & 0xFF}I", f.read(4 * (magic & 0xFF)))
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).reshape(dims)


def load_mnist(data_dir):
    """MNIST from its IDX files (optionally .gz) in data_dir."""
    def find(stem):
        for name in (stem, stem + ".gz"):
            if os.path.exists(os.path.join(data_dir, name)):
                return os.path.join(data_dir, name)
        sys.exit(f"--data-dir: {stem}[.gz] not found in {data_dir}")

    def split(prefix):
        images = _read_idx(find(f"{prefix}-images-idx3-ubyte")).float().unsqueeze(1) / 255.0
        return images, _read_idx(find(f"{prefix}-labels-idx1-ubyte")).long()

    return split("train"), split("t10k")


def batches(images, labels, batch_size, shuffle, generator=None):
    order = torch.randperm(len(labels), generator=generator) if shuffle else torch.arange(len(labels))
    for start in range(0, len(labels), batch_size):
        index = order[start:start + batch_size]
        yield images[index], labels[index]


def progress(epoch, done, total, loss):
    width = 30
    filled = width * done // total
    print(f"\repoch {epoch:2d} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
          f"loss {loss:.4f}", end="", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder holding MNIST's IDX files")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--native", action="store_true", help="torch alone, no pyops")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    (train_x, train_y), (test_x, test_y) = (
        load_mnist(args.data_dir) if args.data_dir else load_digits())
    device = torch.device(args.device)
    model = seed_network().to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=0.5)
    if not args.native:
        import pyops

        pyops.convert(model)
        pyops.convert_optimizer(optimizer)
    print(f"{'native torch' if args.native else 'pyops'} on {device}: {len(train_y)} train, "
          f"{len(test_y)} test images")

    generator = torch.Generator().manual_seed(args.seed)
    accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        started = time.perf_counter()
        total, seen = len(train_y), 0
        for images, labels in batches(train_x, train_y, args.batch_size, True, generator):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.nll_loss(model(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            progress(epoch, seen, total, loss.item())
        elapsed = time.perf_counter() - started
        model.eval()
        correct, test_loss = 0, 0.0
        with torch.no_grad():
            for images, labels in batches(test_x, test_y, 1000, False):
                out = model(images.to(device))
                test_loss += F.nll_loss(out, labels.to(device), reduction="sum").item()
                correct += (out.argmax(1).cpu() == labels).sum().item()
        accuracy = correct / len(test_y)
        print(f"  | test loss {test_loss / len(test_y):.4f} accuracy {100 * accuracy:.2f}% "
              f"| {elapsed:.2f} s")
    return accuracy


if __name__ == "__main__":
    main()
