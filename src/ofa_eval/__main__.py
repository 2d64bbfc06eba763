"""``python -m ofa_eval``: see :mod:`ofa_eval.cli`."""

import sys

from .cli import main

sys.exit(main())
