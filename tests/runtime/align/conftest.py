"""Shared fixtures for the alignment tests: one 1-process gloo group, tiny model shapes, synthetic data."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mcore():
    """Megatron-Core's parallel_state on a world-size-1 gloo group (shared by every in-process test)."""
    from nemoc.runtime.align import common

    common.init_distributed(tp=1, pp=1, seed=1234)
    return common


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine has 2 cores shared by many processes: oversubscribed intra-op threads only slow down.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
