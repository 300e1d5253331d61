"""``python -m promptcore`` (and ``torchrun -m promptcore``): the command line."""

import sys

from .cli import main

sys.exit(main())
