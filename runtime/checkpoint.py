"""Checkpoints on megatron.core.dist_checkpointing (torch_dist): atomic, verifiable, reshardable.

Layout under a stage's `checkpoint_dir`:
    iter_0000100/          one complete checkpoint: dist_checkpointing files + nemoc_checkpoint.json
    iter_0000200.tmp/      a save in progress (never read; removed on the next save or prune)
    latest                 text file naming the newest complete iter_* directory
A save writes into `iter_N.tmp`; once every rank's shards are on disk (for async saves: in the
finalize step of Megatron's AsyncCallsQueue, after all ranks report done) rank 0 writes the manifest
(file names + sizes), renames the directory to `iter_N` and replaces `latest` atomically (tmp file +
os.replace), then prunes to the newest `keep` checkpoints. A crash at any point leaves either the
previous `latest` or the new one, never a half-written checkpoint named as finished.

State saved: model chunks (sharded tensors; dist_checkpointing reshards them to any TP/PP/VP layout),
optimizer (incl. the fp16 loss scaler), scheduler, iteration, consumed samples (the data position),
the layout, and per-rank RNG states (restored only under the same layout). Resume walks `latest` and
then older checkpoints, skipping (with a warning) any that fails verification or loading.

Without Transformer Engine / Apex, megatron-core 0.16.1's DistributedOptimizer needs three loading
workarounds (see /work/shared/notes/megatron-core-on-cpu.md section 4), applied here: the
`dp_reshardable` sharding type, primed Adam state before building the loading state dict, and the
per-parameter Adam `step` restored from the param group. `dp_reshardable` reshards across DP only:
a resume under a different TP/PP/EP layout with the distributed optimizer restores the model, the
scheduler and the data position, and restarts the Adam moments (logged as a warning).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from nemoc.runtime.atomic import atomic_write_text as write_text_atomic, fsync_dir as _fsync_dir  # noqa: E402

MANIFEST = "nemoc_checkpoint.json"
LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
# DistributedOptimizer formats that load without TE/Apex in 0.16.1 (Megatron-LM's default is the first)
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def read_latest(root: str) -> str | None:
    """Absolute path of the checkpoint named by `root/latest`, or None (also when the marker is damaged:
    not UTF-8, not a file; resuming then falls back to the newest complete checkpoint)."""
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as handle:
            name = handle.read().strip()
    except (OSError, ValueError):
        return None
    return os.path.join(root, name) if _ITER_RE.match(name) else None


def complete_checkpoints(root: str) -> list[str]:
    """Finished iter_* directories under root, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _ITER_RE.match(n))]
    return [os.path.join(root, n) for _, n in sorted(found, reverse=True)]


def resume_candidates(root: str) -> list[str]:
    """`latest` first, then every other complete checkpoint, newest first."""
    latest = read_latest(root)
    rest = [c for c in complete_checkpoints(root) if c != latest]
    return ([latest] if latest else []) + rest


def verify(path: str) -> str | None:
    """None if `path` is a complete checkpoint per its manifest, else the reason it is not."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return f"{manifest_path} is missing (save did not complete)"
    except (OSError, ValueError) as exc:
        return f"{manifest_path} is unreadable: {exc}"
    for name, size in manifest.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, manifest says {size}"
    return None


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
        return json.load(handle)


def prune(root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names) and any
    leftover .tmp directories. Rank 0 only. Returns the removed paths."""
    latest = read_latest(root)
    complete = complete_checkpoints(root)
    doomed = [c for c in complete[max(keep, 1):] if c != latest]
    doomed += [os.path.join(root, n) for n in os.listdir(root) if n.startswith("iter_") and n.endswith(".tmp")]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------- state dicts


def layout_key() -> dict:
    """The parallel layout of this process group (RNG states only transfer under the same one)."""
    ps = parallel_state
    return dict(
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        vp=ps.get_virtual_pipeline_model_parallel_world_size(), cp=ps.get_context_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
        world=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
    )


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """{'model': sd} for one chunk, {'model0': sd, 'model1': ...} for virtual pipeline chunks (the
    Megatron-LM naming). Tensor keys are global, so any chunking loads any other."""
    from nemoc.runtime.model import unwrap

    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _rng_state() -> dict:
    state = dict(
        random=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
        tracker=tensor_parallel.get_cuda_rng_tracker().get_states(),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state) -> ShardedObject:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ShardedObject("nemoc.rng_state", state, (world,), (rank,), replica_id=0)


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in subs if isinstance(o, DistributedOptimizer)]


def _prime_adam_state(optimizer) -> None:
    """Without TE/Apex, DistributedOptimizer.state_dict() asserts every Adam state has a `step`, so a
    never-stepped optimizer cannot build its loading state dict: give it zero state first."""
    for sub in _distributed_optimizers(optimizer):
        inner = sub.optimizer
        if not isinstance(inner, torch.optim.Adam):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def _restore_adam_steps(optimizer) -> None:
    """The loaded `step` lives in the param groups only; torch Adam reads the per-parameter one."""
    for sub in _distributed_optimizers(optimizer):
        inner = sub.optimizer
        for group in inner.param_groups:
            if "step" in group and group["step"] is not None:
                for p in group["params"]:
                    if p in inner.state:
                        inner.state[p]["step"] = torch.tensor(float(group["step"]))


def _load_optimizer_state(optimizer, state) -> None:
    """optimizer.load_state_dict, except for a `fully_reshardable` DistributedOptimizer without
    TE/Apex: 0.16.1 copies every key of the torch Adam state, including the `step` it put there
    itself, from the loaded tensors, which never carry `step` -> KeyError. Load the non-parameter
    part first, then the parameter state with the `step` entries set aside (restored afterwards)."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(subs) == 1 else [v for _, v in sorted(state.items())]
    for sub, part in zip(subs, parts):
        special = (isinstance(sub, dopt.DistributedOptimizer) and not dopt.HAVE_APEX_OR_TE
                   and isinstance(part, dict) and part.get("param_state_sharding_type") == "fully_reshardable")
        if not special:
            sub.load_state_dict(part)
            continue
        part = dict(part)
        param_state = part.pop("param_state")
        part.pop("param_state_sharding_type")
        sub.load_state_dict(part)
        steps = {p: st.pop("step") for p, st in sub.optimizer.state.items() if "step" in st}
        try:
            sub.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                sub.optimizer.state[p]["step"] = step
    if len(subs) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


def training_state(*, chunks, optimizer, scheduler, iteration: int, consumed_samples: int,
                   is_loading: bool = False, include_optimizer: bool = True, include_rng: bool = True,
                   extra: dict | None = None, optimizer_format: str = "dp_reshardable") -> dict:
    """The sharded state dict of a training run (what is saved, and the template a load fills).

    `optimizer_format` (distributed optimizer only): `dp_reshardable` writes each rank's flat buffer
    shard in parallel and reshards across DP only; `fully_reshardable` gathers the state into
    model-parameter shape (more memory and communication at save) and reshards across TP/PP too."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer checkpoint format {optimizer_format!r} is not one of {OPTIMIZER_FORMATS}")
    model_sd = model_sharded_state_dict(chunks)
    state = dict(model_sd)  # the optimizer maps its params to these (nested walk over all chunks)
    if include_optimizer and optimizer is not None:
        if is_loading:
            _prime_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format}
        )
        state["optimizer_format"] = optimizer_format
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if include_rng:
        state["rng_state"] = _rng_sharded_object(_rng_state())
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    state["layout"] = layout_key()
    state["nemoc"] = dict(extra or {})
    return state


# ------------------------------------------------------------------------------------------ save


def _dp_group():
    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if torch.distributed.get_world_size(group) > 1 else None


def _save_strategy():
    """torch_dist, with the writing of DP-replicated shards spread over the DP ranks (Megatron-LM's
    --ckpt-fully-parallel-save, its default) instead of all on DP rank 0."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    strategy = get_default_save_sharded_strategy("torch_dist")
    group = _dp_group()
    if group is None:
        return strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(strategy, group)


def _load_strategy(path: str):
    """Fully parallel load: each DP rank reads a slice of the replicated shards and they exchange
    them (Megatron-LM's --ckpt-fully-parallel-load), instead of every rank reading everything."""
    group = _dp_group()
    if group is None:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), group)


@dataclass
class SaveRecord:
    iteration: int
    path: str
    started: float
    async_save: bool


class Checkpointer:
    """Saves training state under `root`, synchronously or through Megatron's AsyncCallsQueue.

    Call `maybe_finalize()` once per step (all ranks): it completes finished async saves (rename +
    `latest` + prune). `close()` waits for any save in flight. `on_saved(record)` runs on every rank
    after a checkpoint becomes `latest`.
    """

    def __init__(self, *, root: str, keep: int, async_save: bool, on_saved=None):
        self.root = root
        self.keep = keep
        self.async_save = async_save
        self.on_saved = on_saved
        self.last_saved: SaveRecord | None = None
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)

    def save(self, state: dict, *, iteration: int) -> SaveRecord:
        final = os.path.join(self.root, iteration_name(iteration))
        tmp = final + ".tmp"
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        record = SaveRecord(iteration, final, time.monotonic(), self.async_save)
        strategy = _save_strategy()
        if self._queue is not None:
            self.maybe_finalize(blocking=True)  # at most one save in flight
            request = dist_checkpointing.save(state, tmp, sharded_strategy=strategy, async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(tmp, record))
            self._queue.schedule_async_request(request)
        else:
            dist_checkpointing.save(state, tmp, sharded_strategy=strategy)
            self._publish(tmp, record)
        return record

    def _publish(self, tmp: str, record: SaveRecord) -> None:
        _barrier()  # every rank's shards and rank 0's metadata are on disk
        if _rank() == 0:
            files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))
                     if os.path.isfile(os.path.join(tmp, n))}
            manifest = dict(iteration=record.iteration, files=files, layout=layout_key(), time=time.time())
            write_text_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
            if os.path.exists(record.path):
                shutil.rmtree(record.path)
            os.rename(tmp, record.path)
            _fsync_dir(self.root)
            write_text_atomic(os.path.join(self.root, LATEST), os.path.basename(record.path) + "\n")
            prune(self.root, self.keep)
        _barrier()
        self.last_saved = record
        if self.on_saved is not None:
            self.on_saved(record, time.monotonic() - record.started)

    def maybe_finalize(self, blocking: bool = False) -> None:
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)
            self._queue.close()
            self._queue = None


# ------------------------------------------------------------------------------------------ load


@dataclass
class Restored:
    path: str
    iteration: int
    consumed_samples: int
    optimizer_restored: bool
    rng_restored: bool
    skipped: list[str] = field(default_factory=list)  # "path: reason" of checkpoints passed over


def _all_ranks_ok(ok: bool) -> bool:
    if not torch.distributed.is_initialized():
        return ok
    on_gpu = torch.cuda.is_available() and torch.distributed.get_backend() == "nccl"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device="cuda" if on_gpu else "cpu")
    torch.distributed.all_reduce(flag)
    return int(flag.item()) == 0


def load_training_state(path: str, *, chunks, optimizer, scheduler, distributed_optimizer: bool,
                        warn=print) -> Restored:
    """Load a full training state from `path` into the given objects (all ranks)."""
    common = dist_checkpointing.load_common_state_dict(path)
    saved_layout, here = common.get("layout", {}), layout_key()
    same_layout = saved_layout == here
    model_parallel_same = all(saved_layout.get(k) == here[k] for k in ("tp", "pp", "vp", "cp", "ep"))
    with_optimizer = optimizer is not None and "optimizer" in common_keys(common, path)
    saved_format = common.get("optimizer_format", "dp_reshardable")
    if with_optimizer and distributed_optimizer and saved_format == "dp_reshardable" and not model_parallel_same:
        warn(f"checkpoint {path} was saved with layout {saved_layout}, now {here}: the distributed "
             "optimizer's dp_reshardable state reshards across DP only; loading the model, scheduler and "
             "data position, and restarting the Adam moments (save with params.optimizer_checkpoint_format"
             " = fully_reshardable to carry them across TP/PP changes)")
        with_optimizer = False
    template = training_state(chunks=chunks, optimizer=optimizer, scheduler=None, iteration=0, consumed_samples=0,
                              is_loading=True, include_optimizer=with_optimizer, include_rng=same_layout,
                              optimizer_format=saved_format if saved_format in OPTIMIZER_FORMATS else "dp_reshardable")
    for key in ("iteration", "consumed_samples", "layout", "nemoc", "optimizer_format"):
        template.pop(key, None)
    loaded = dist_checkpointing.load(template, path, sharded_strategy=_load_strategy(path))
    from nemoc.runtime.model import unwrap

    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if with_optimizer:
        with torch.no_grad():  # fp32 DistributedOptimizer main params are views of leaf params
            _load_optimizer_state(optimizer, loaded["optimizer"])
        _restore_adam_steps(optimizer)
    elif optimizer is not None:
        # Only the model was loaded: refresh the fp32 main params (bf16/fp16) from it, otherwise the
        # next step would write the optimizer's stale copy back over the loaded weights.
        optimizer.reload_model_params()
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return Restored(path, int(common.get("iteration", 0)), int(common.get("consumed_samples", 0)),
                    with_optimizer, same_layout and "rng_state" in loaded)


def common_keys(common: dict, path: str) -> set[str]:
    """Top-level keys present in the checkpoint (sharded ones from its metadata)."""
    keys = set(common)
    try:
        metadata = dist_checkpointing.load_tensors_metadata(path)
        keys |= {k.split(".", 1)[0] for k in metadata}
        if any(k.startswith("optimizer.") for k in metadata):
            keys.add("optimizer")
    except Exception:  # metadata unreadable: the load itself will report it
        pass
    return keys


def resume(*, root: str, chunks, optimizer, scheduler, distributed_optimizer: bool, warn=print) -> Restored | None:
    """Restore from `latest` (or the newest loadable checkpoint). None if there is none.

    Every rank walks the same candidates (same filesystem); after each attempt the ranks agree
    (all-reduce) so that they all use the same checkpoint."""
    skipped = []
    for path in resume_candidates(root):
        reason = verify(path)
        if _all_ranks_ok(reason is None):
            try:
                restored = load_training_state(path, chunks=chunks, optimizer=optimizer, scheduler=scheduler,
                                               distributed_optimizer=distributed_optimizer, warn=warn)
                error = None
            except Exception as exc:  # corrupt shard, incompatible model: fall back to an older one
                restored, error = None, f"{type(exc).__name__}: {exc}"
            if _all_ranks_ok(error is None):
                restored.skipped = skipped
                return restored
            reason = error or "failed to load on another rank"
        reason = reason or "failed verification on another rank"
        warn(f"warning: skipping checkpoint {path}: {reason}")
        skipped.append(f"{path}: {reason}")
    if skipped:
        warn(f"warning: no loadable checkpoint under {root}; starting from scratch")
    return None


def load_weights(path: str, *, chunks, optimizer=None) -> None:
    """Initialise model weights from a checkpoint (fine-tuning): model only, any layout. Pass the
    optimizer if it already exists, so that its fp32 main copy is refreshed from the loaded weights."""
    reason = verify(path) if os.path.exists(os.path.join(path, MANIFEST)) else None
    if reason is not None:
        raise RuntimeError(f"init checkpoint {path} is incomplete: {reason}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init checkpoint {path} does not exist")
    from nemoc.runtime.model import unwrap

    template = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(template, path)
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.reload_model_params()


def save_weights(path: str, *, chunks) -> None:
    """Model-only dist checkpoint (no optimizer), e.g. reference weights for tests or export."""
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    _barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), path)
    _barrier()
