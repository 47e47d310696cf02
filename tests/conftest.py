"""Fixtures and settings shared across test modules."""

import os

import pytest
import torch
from hypothesis import settings


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny float64 kernels run ~100x slower with two
    OpenMP threads on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# CI runs the same hypothesis examples every time (a failure there is reproducible); local runs
# keep exploring new ones.
if os.environ.get("CI"):
    settings.register_profile("ci", derandomize=True, print_blob=True)
    settings.load_profile("ci")
