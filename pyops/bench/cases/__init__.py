"""The benchmark cases, one module per op family.

Adding a family is adding a module here (its name is the family's name) with a
function ``cases(scale, device, dtype) -> list[pyops.bench.case.Case]``; the suite
finds it by itself. A family may also define ``summary(rows) -> list[str]``: lines
printed after the table, for conclusions that span rows (e.g. the fastest of several
native implementations).
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


def summaries(families, rows):
    """The lines of the families' ``summary`` hooks, given every row of the run."""
    lines = []
    for family in families:
        module = importlib.import_module(f"{__name__}.{family}")
        if hasattr(module, "summary"):
            lines += module.summary(rows)
    return lines
