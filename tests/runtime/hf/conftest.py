"""Fixtures for the Hugging Face conversion tests: one 1-process gloo group (shared with the alignment
tests' helpers) and one intra-op thread (2 shared cores)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def mcore():
    from nemoc.runtime.align import common

    common.init_distributed(tp=1, pp=1, seed=1234)
    return common


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
