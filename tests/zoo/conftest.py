"""The model zoo: random-init small models from timm, torchvision and transformers (the
``zoo`` extra: ``pip install -e ".[zoo]"``). A family whose package is missing or cannot be
imported (timm needs a torchvision that matches torch) is skipped. The models are built by
benchmarks/zoo_models.py (shared with the zoo benchmark); the repository root is put on
``sys.path`` so that ``benchmarks`` imports however pytest is started."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a minute on a 2-core CPU")
