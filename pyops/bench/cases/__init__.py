"""The benchmark cases, one module per op family.

Adding a family is adding a module here (its name is the family's name) with a
function ``cases(scale, device, dtype) -> list[pyops.bench.case.Case]``; the suite
finds it by itself.
"""

import importlib
import itertools
import pkgutil
from dataclasses import replace

FAMILIES = tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def collect(families, scale, devices, dtypes):
    """Every case of the given families, over the product of devices and dtypes."""
    found = []
    for family in families:
        module = importlib.import_module(f"{__name__}.{family}")
        for device, dtype in itertools.product(devices, dtypes):
            found += [replace(c, family=family) for c in module.cases(scale, device, dtype)]
    return found
