"""Fake kernels of the optimizer family."""

from torch.library import register_fake

# Optimizer steps mutate their arguments in place and return nothing.
for _name in ("sgd_", "adagrad_", "adadelta_", "rmsprop_", "adam_"):
    register_fake(f"pyops::{_name}")(lambda *args, **kwargs: None)
