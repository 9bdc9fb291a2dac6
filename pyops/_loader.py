"""Loads the compiled library before anything registers against it (design section 7)."""

import importlib

import torch


def load_extension():
    try:
        ext = importlib.import_module("pyops._C")
    except ImportError as error:
        raise ImportError(
            f"pyops: the compiled library pyops._C could not be loaded ({error}). It must be "
            f"built against the torch that runs it (running torch {torch.__version__}); "
            "reinstall with `pip install --no-build-isolation .` from the pyops checkout, "
            "or run `python scripts/run.py test`, which rebuilds it."
        ) from error
    if ext.torch_version != torch.__version__:
        raise ImportError(
            f"pyops: pyops._C was built against torch {ext.torch_version} but torch "
            f"{torch.__version__} is running; rebuild pyops with "
            "`pip install --no-build-isolation .` (or `python scripts/run.py test`)."
        )
    return ext
