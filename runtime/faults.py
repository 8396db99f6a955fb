"""Fault-tolerance pieces the launchers and tests share (the checkpoint side lives in runtime/checkpoint.py:
atomic saves, manifest verification, skipping a checkpoint that fails to load; runtime/train.py reports a
collective timeout with the rank and the phase).

* `RESTART_SAFE_ENV`: torchrun's restarts (`--max-restarts`, the elastic policy of a PyTorchJob) with the
  agent-shared TCPStore hand restarted ranks the previous attempt's process-group keys, so they connect
  to dead peers and fail ("Gloo connectFullMesh failed ... Connection refused"; pytorch/pytorch#167288,
  reproduced here with torch 2.13). With `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` the c10d rendezvous has
  rank 0 host a fresh store for every attempt. Every launcher that allows restarts sets it.
* `checkpoint_tensors` / `differing_tensors`: every tensor of a torch_dist checkpoint read without a
  process group (torch.distributed.checkpoint's format utilities), to prove that a resumed run ends
  with the same weights as an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import os
import tempfile

RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def checkpoint_tensors(path: str | os.PathLike) -> dict:
    """{key: tensor} of a dist_checkpointing (torch_dist) checkpoint directory: model weights, optimizer
    state (main params, Adam moments); non-tensor entries (RNG states, extra state) are left out."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "checkpoint.pt")
        dcp_to_torch_save(str(path), target)
        state = torch.load(target, weights_only=False)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def differing_tensors(a: str | os.PathLike, b: str | os.PathLike) -> list[str]:
    """Keys whose tensors are not bit-identical in checkpoints `a` and `b` (missing keys included)."""
    import torch

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    keys = sorted(set(ta) | set(tb))
    return [k for k in keys if k not in ta or k not in tb or not torch.equal(ta[k], tb[k])]
