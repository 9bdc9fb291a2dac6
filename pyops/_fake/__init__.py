"""Fake (meta) kernels of every pyops operator, one module per op family: output shapes,
dtypes and strides, so torch.compile, FakeTensor and torch.library.opcheck can trace."""

from pyops._fake import activation, conv, dropout, linear, optim, pool, softmax  # noqa: F401
