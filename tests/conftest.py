"""Suite-wide test configuration: GPU tests skip without CUDA, Slurm tests without a reachable Slurm."""

from __future__ import annotations

import os
import shutil

import pytest


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any failure to probe means "no usable GPU"
        return False


def _has_slurm() -> bool:
    return shutil.which("sinfo") is not None and bool(os.environ.get("SLURM_CONF"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden files (ASTs, plans, graphs) from the current code; review the diff")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    need_gpu = any("gpu" in item.keywords for item in items)
    need_slurm = any("slurm" in item.keywords for item in items)
    no_gpu = need_gpu and not _has_cuda()
    no_slurm = need_slurm and not _has_slurm()
    for item in items:
        if no_gpu and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if no_slurm and "slurm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a local Slurm (bash .ci/slurm.sh up; export SLURM_CONF)"))
