"""``python -m denseflow`` (also what ``torchrun -m denseflow`` runs)."""

import sys

from .cli import main

sys.exit(main())
