"""pyops's kernel benchmark suite: ``python -m pyops.bench`` (``--help`` for options).

Every case times a native PyTorch callable against its pyops twin in the same process,
in interleaved rounds (median of the rounds), after checking once that both give the
same result. It reports the speed-up and the bandwidth pyops achieves, as a share of the
copy bandwidth measured at the start of the run.

- ``case``: what a case is (the vocabulary of the family modules)
- ``cases/``: one module per op family, each a function returning its cases
- ``timing``, ``runner``: interleaved timing; one case -> one checked, timed row
- ``machine``, ``report``, ``cli``: machine description, table/JSON/PNG, command line
"""

from pyops.bench.case import Case, Scale, Traffic
from pyops.bench.cli import main
from pyops.bench.runner import Row, run_case

__all__ = ["Case", "Row", "Scale", "Traffic", "main", "run_case"]
