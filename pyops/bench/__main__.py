import sys

from pyops.bench.cli import main

sys.exit(main())
