"""Checkpoints of Megatron-FSDP stages in its `fsdp_dtensor` format (torch.distributed.checkpoint).

Megatron-Core 0.16.1's DistributedOptimizer over Megatron-FSDP's buffers saves only this format
(distrib_optimizer.py `sharded_state_dict`: "sharding_type ... is not supported with Megatron FSDP" for
every other), and the FSDP model's parameters are DTensors that the torch_dist path of runtime/checkpoint.py
cannot shard. So, as Megatron-LM does with `--ckpt-format fsdp_dtensor`: the model's state dict (one
DTensor per parameter, each rank its shard), the optimizer's (`distrib_optim_sharding_type = fsdp_dtensor`:
Adam's moments as DTensors keyed by parameter name, the param groups' settings), prepared for uneven shards
by Megatron-FSDP's `preprocess_state_dict_for_uneven_dtensor`, written with `torch.distributed.checkpoint`;
the scheduler, iteration, data position, layout and each rank's RNG state travel in the same save.

Input:  the stage's FullyShardedDataParallel chunk, its optimizer and scheduler.
Output: `training_state` (what `Checkpointer.save` writes when it carries `FORMAT`), `load` (in place).
Invariants: every rank holds optimizer state for every parameter before a save or load: a parameter whose
shard is empty on a rank has no Adam state there (torch skips it), while the uneven-DTensor preparation
runs one collective per DTensor in key order, so the ranks' key sets must agree (`_fill_empty_shards`,
sorted keys). A resume needs the layout it was saved under (no resharding); the load is in place, not all
or nothing (runtime/checkpoint.py's torch_dist loads are). Saves are synchronous.
"""

from __future__ import annotations

import torch

FORMAT = "fsdp_dtensor"
MARKER = "nemoc_format"  # the key that tells Checkpointer.save which writer a state dict needs


def _fill_empty_shards(optimizer) -> None:
    """Adam state (zero moments, the optimizer's step) for the parameters whose shard is empty on this rank,
    so that every rank's optimizer state names every parameter (see the module's invariants)."""
    inner = optimizer.optimizer
    steps = [float(st["step"]) for st in inner.state.values() if "step" in st]
    step = torch.tensor([max(steps) if steps else 0.0])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MAX)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if "step" not in state:
                state.update(step=step[0].clone(), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def _rng_key() -> str:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return f"rng_state_rank{rank}"


def training_state(*, chunks, optimizer, scheduler, iteration: int, consumed_samples: int, rng: dict, layout: dict,
                   is_loading: bool = False, extra: dict | None = None) -> dict:
    """The state dict of an FSDP training run (what is saved, and the template a load fills); `rng`: this rank's
    RNG states, `layout`: the process group's (runtime/checkpoint.py `rng_state`, `layout_key`)."""
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import (
        preprocess_state_dict_for_uneven_dtensor,
    )

    model_sd = chunks[0].state_dict()
    state: dict = {"model": model_sd}
    if optimizer is not None:
        _fill_empty_shards(optimizer)
        opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                              metadata={"distrib_optim_sharding_type": FORMAT})
        opt_sd["state"] = dict(sorted(opt_sd["state"].items()))
        state["optimizer"] = opt_sd
    preprocess_state_dict_for_uneven_dtensor(state)
    state[_rng_key()] = rng
    state["common"] = dict(iteration=iteration, consumed_samples=consumed_samples, layout=layout,
                           nemoc=dict(extra or {}), format=FORMAT,
                           opt_param_scheduler=scheduler.state_dict() if scheduler is not None else {})
    state[MARKER] = FORMAT
    return state


def save(state: dict, directory: str) -> None:
    """Write `state` (from `training_state`) into `directory` with torch.distributed.checkpoint (all ranks)."""
    import torch.distributed.checkpoint as dcp

    state = {k: v for k, v in state.items() if k != MARKER}
    dcp.save(state, checkpoint_id=directory)


def load(path: str, *, chunks, optimizer, scheduler, saved_layout: dict, rng: dict, layout: dict) -> tuple[int, int, dict]:
    """Load an `fsdp_dtensor` checkpoint into the model, optimizer and scheduler (all ranks); `rng` and `layout`
    as for `training_state` (the template). Returns (iteration, consumed samples, this rank's saved RNG states).
    Raises ValueError for another layout."""
    import torch.distributed.checkpoint as dcp

    here = layout
    if saved_layout != here:
        raise ValueError(f"it was saved by Megatron-FSDP (fsdp_dtensor) with layout {saved_layout}, now {here}: "
                         "nemoc resumes an FSDP checkpoint under the layout that saved it")
    template = training_state(chunks=chunks, optimizer=optimizer, scheduler=scheduler, iteration=0,
                              consumed_samples=0, rng=rng, layout=layout, is_loading=True)
    template.pop(MARKER)
    dcp.load(template, checkpoint_id=path)
    chunks[0].load_state_dict(template["model"])
    if optimizer is not None:
        optimizer.load_state_dict(template["optimizer"])
    common = template["common"]
    if scheduler is not None and common.get("opt_param_scheduler"):
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return int(common["iteration"]), int(common["consumed_samples"]), template[_rng_key()]
