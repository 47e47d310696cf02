"""``python -m lmdfx``: the ``lmdfx`` command line (also what ``torchrun -m lmdfx`` runs)."""

import sys

from lmdfx.bev.cli import main

sys.exit(main())
