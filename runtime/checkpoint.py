"""Checkpoints on megatron.core.dist_checkpointing (torch_dist): atomic, verifiable, reshardable.

Layout under a stage's `checkpoint_dir`:
    iter_0000100/          one complete checkpoint: dist_checkpointing files + nemoc_checkpoint.json
    iter_0000200.tmp/      a save in progress (never read; removed on the next save or prune)
    latest                 text file naming the newest complete iter_* directory
A save writes into `iter_N.tmp`; once every rank's shards are on disk (for async saves: in the
finalize step of Megatron's AsyncCallsQueue, after all ranks report done) the ranks digest the files
(BLAKE2b, each rank a share), rank 0 writes the manifest (file names, sizes, digests), renames the
directory to `iter_N` and replaces `latest` atomically (tmp file + os.replace), then prunes to the
newest `keep` checkpoints. A crash at any point leaves either the previous `latest` or the new one,
never a half-written checkpoint named as finished; a save that fails (disk full) removes its
`iter_N.tmp` and raises `CheckpointSaveError` ("checkpoint save failed at step N: No space left on
device (path)"), leaving the previous `latest`. A `.tmp` left by a killed process is removed when the
next `Checkpointer` starts.

State saved: model chunks (sharded tensors; dist_checkpointing reshards them to any TP/PP/VP layout),
optimizer (incl. the fp16 loss scaler), scheduler, iteration, consumed samples (the data position),
the layout, and per-rank RNG states (restored only under the same layout). Resume walks `latest` and
then older checkpoints, skipping (with a warning naming the file) any whose files do not match the
manifest's sizes and digests (a corrupted shard of unchanged size included) or that fails to load; if
checkpoints exist but none is usable it raises `CheckpointError` naming them instead of silently
starting over. A load is all or nothing: the checkpoint is read into fresh tensors and copied into
the model and optimizer only once every tensor has been read.

Without Transformer Engine / Apex, megatron-core 0.16.1's DistributedOptimizer needs three loading
workarounds (see /work/shared/notes/megatron-core-on-cpu.md section 4), applied here: the
`dp_reshardable` sharding type, primed Adam state before building the loading state dict, and the
per-parameter Adam `step` restored from the param group. `dp_reshardable` reshards across DP only:
a resume under a different TP/PP/EP layout with the distributed optimizer restores the model, the
scheduler and the data position, and restarts the Adam moments (logged as a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from nemoc.runtime.atomic import atomic_write_text as write_text_atomic, fsync_dir as _fsync_dir  # noqa: E402

MANIFEST = "nemoc_checkpoint.json"
DIGEST = "blake2b"  # hashlib.blake2b(digest_size=32) of each file's bytes, hex (stdlib)
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


class CheckpointError(RuntimeError):
    """No usable checkpoint where some exist (every one damaged): the message names the files."""


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, I/O error); its temporary directory is removed, `latest` unchanged."""


def file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=32)
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _file_entries(directory: str, names: list[str]) -> dict:
    return {n: {"size": os.path.getsize(os.path.join(directory, n)), DIGEST: file_digest(os.path.join(directory, n))}
            for n in names}


def _check_file(path: str, name: str, entry) -> str | None:
    """Why `name` does not match its manifest entry ({size, blake2b}, or a bare size from older
    manifests), or None."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return f"{file} is missing"
    size = entry.get("size") if isinstance(entry, dict) else entry
    actual = os.path.getsize(file)
    if actual != size:
        return f"{file} has {actual} bytes, manifest says {size} (truncated or overwritten)"
    expected = entry.get(DIGEST) if isinstance(entry, dict) else None
    if expected is not None and file_digest(file) != expected:
        return f"{file} is corrupted: its {DIGEST} digest does not match the one in {MANIFEST}"
    return None


def verify(path: str, *, share: tuple[int, int] = (0, 1)) -> str | None:
    """None if `path` is a complete checkpoint per its manifest (every file present, of the recorded
    size and digest), else the reason it is not. `share=(i, n)` checks every n-th file from the i-th
    (one rank's part of a parallel verification)."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files = sorted(manifest["files"].items())
    except FileNotFoundError:
        return f"{manifest_path} is missing (save did not complete)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{manifest_path} is unreadable: {type(exc).__name__}: {exc}"
    index, count = share
    for name, entry in files[index::count]:
        try:
            reason = _check_file(path, name, entry)
        except OSError as exc:
            reason = f"{os.path.join(path, name)} is unreadable: {exc}"
        if reason is not None:
            return reason
    return None


def verify_on_all_ranks(path: str) -> str | None:
    """`verify` with the files shared out over the ranks; every rank gets the same answer."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return verify(path)
    world = torch.distributed.get_world_size()
    reasons = [None] * world
    torch.distributed.all_gather_object(reasons, verify(path, share=(_rank(), world)))
    return next((r for r in reasons if r is not None), None)


_SIDECAR = ".nemoc_digests.{rank}.json"  # digests an async writer computed of its rank's files


def _digest_on_all_ranks(directory: str) -> dict:
    """{file: {size, digest}} of every file in `directory` (all ranks call): the entries the async
    writers left in sidecar files, and the rest digested here, each rank a share."""
    names = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n)) and n != MANIFEST)
    known = {}
    for name in [n for n in names if n.startswith(".nemoc_digests.")]:
        with open(os.path.join(directory, name), encoding="utf-8") as handle:
            known.update(json.load(handle))
    todo = [n for n in names if n not in known and not n.startswith(".nemoc_digests.")]
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return {**known, **_file_entries(directory, todo)}
    world = torch.distributed.get_world_size()
    parts = [None] * world
    torch.distributed.all_gather_object(parts, _file_entries(directory, todo[_rank()::world]))
    return {**known, **{name: entry for part in parts for name, entry in part.items()}}


def _process_tree(pid: int) -> list:
    """psutil.Process of `pid` followed by its descendants; [] when it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_io_chars(pid: int) -> int:
    """Characters read + written so far by process `pid` and its descendants (Linux /proc via psutil; other
    systems: their read / write counts), without touching the files they write."""
    import psutil

    procs = _process_tree(pid)
    if not procs:
        return -1
    total = 0
    for proc in procs:
        try:
            io = proc.io_counters()
        except (psutil.Error, AttributeError, NotImplementedError):
            continue
        total += getattr(io, "read_chars", io.read_count) + getattr(io, "write_chars", io.write_count)
    return total


def _kill_tree(process) -> None:
    """SIGKILL a multiprocessing writer and the write workers it forked; reap the writer."""
    import psutil

    for proc in _process_tree(process.pid)[1:]:
        try:
            proc.kill()
        except psutil.Error:
            pass
    process.kill()
    process.join(5)


def _gather_flags(flags: list[int]) -> list[tuple[int, ...]]:
    """Every rank's `flags` (small ints), in rank order: one all-gather on the default group."""
    on_gpu = torch.cuda.is_available() and torch.distributed.get_backend() == "nccl"
    mine = torch.tensor(flags, dtype=torch.int32, device="cuda" if on_gpu else "cpu")
    parts = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, mine)
    return [tuple(int(v) for v in p.tolist()) for p in parts]


def _dump_stacks(pid: int) -> None:
    """Ask a helper process and its descendants (which inherit its faulthandler registration through
    fork) to print their Python stacks (SIGUSR2), and give them a moment."""
    import signal

    import psutil

    procs = _process_tree(pid)
    if not procs:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGUSR2)
        except (psutil.Error, AttributeError, ValueError):
            pass
    time.sleep(1.0)


def write_then_digest(write, directory: str, rank: int, *args, **kwargs) -> None:
    """The async writer's work: `write(*args, **kwargs)` (this rank's shards), then the digests of the
    files it wrote (`__{rank}_*`, torch_dist's naming) into a sidecar the finalize step reads, so the
    training ranks do not read their own shards back."""
    write(*args, **kwargs)
    prefix = f"__{rank}_"
    names = sorted(n for n in os.listdir(directory) if n.startswith(prefix))
    write_text_atomic(os.path.join(directory, _SIDECAR.format(rank=rank)), json.dumps(_file_entries(directory, names)))


def write_manifest(directory: str, **fields) -> None:
    """Digest every file of a finished checkpoint directory and write its manifest (all ranks call)."""
    files = _digest_on_all_ranks(directory)
    _barrier()  # every rank has read the sidecars
    if _rank() == 0:
        for name in os.listdir(directory):
            if name.startswith(".nemoc_digests."):
                os.unlink(os.path.join(directory, name))
        manifest = dict(fields, files=files, digest=DIGEST, time=time.time())
        write_text_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
        return json.load(handle)


def prune(root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names) and any
    leftover .tmp directories. Rank 0 only. Returns the removed paths."""
    latest = read_latest(root)
    complete = complete_checkpoints(root)
    doomed = [c for c in complete[max(keep, 1):] if c != latest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed + remove_partial_saves(root)


def remove_partial_saves(root: str) -> list[str]:
    """Delete the `iter_N.tmp` directories of saves that never finished (a killed process, a failed
    save). Rank 0 only, while no save is in flight. Returns the removed paths."""
    if not os.path.isdir(root):
        return []
    doomed = [os.path.join(root, n) for n in os.listdir(root) if n.startswith("iter_") and n.endswith(".tmp")]
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
        ep=ps.get_expert_model_parallel_world_size(), etp=ps.get_expert_tensor_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        world=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
    )


def saved_layout(record: dict) -> dict:
    """The `layout` of a manifest or a checkpoint's common state, as `layout_key` writes it today: one saved
    before etp was recorded had Megatron's default expert tensor size, the tensor size."""
    layout = dict(record.get("layout") or {})
    if layout and "etp" not in layout:
        layout["etp"] = layout.get("tp", 1)
    return layout


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """{'model': sd} for one chunk, {'model0': sd, 'model1': ...} for virtual pipeline chunks (the
    Megatron-LM naming). Tensor keys are global, so any chunking loads any other."""
    from nemoc.runtime.model import unwrap

    if len(chunks) == 1:
        return {"model": _chunk_sharded_state_dict(unwrap(chunks[0]))}
    return {f"model{i}": _chunk_sharded_state_dict(unwrap(c)) for i, c in enumerate(chunks)}


def _chunk_sharded_state_dict(chunk) -> dict:
    """A GPTModel chunk's sharded state dict. A chunk that builds multi-token prediction depths without the first
    stage's embedding keeps its own copy of the word embedding, tied to the first stage's
    (gpt_model.py `sharded_state_dict`: `tie_word_embeddings_state_dict(..., dp_cp_group=metadata['dp_cp_group'])`),
    which needs the metadata Megatron-LM's checkpointing passes; other chunks get none, as before."""
    if getattr(chunk, "mtp_process", False) and not getattr(chunk, "pre_process", True):
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        return chunk.sharded_state_dict(metadata={"dp_cp_group": group})
    return chunk.sharded_state_dict()


def rng_state() -> dict:
    state = dict(
        random=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
        tracker=tensor_parallel.get_cuda_rng_tracker().get_states(),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _is_fsdp(chunks) -> bool:
    from nemoc.runtime.model import is_fsdp

    return is_fsdp(chunks)


def checkpoint_format(path: str) -> str:
    """`fsdp_dtensor` for a checkpoint a Megatron-FSDP stage wrote (its manifest says so), else `torch_dist`."""
    try:
        return read_manifest(path).get("format", "torch_dist")
    except (OSError, ValueError):
        return "torch_dist"


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
    if _is_fsdp(chunks) and not is_loading:  # Megatron-FSDP: its fsdp_dtensor format (runtime/fsdp_checkpoint.py)
        from nemoc.runtime import fsdp_checkpoint

        return fsdp_checkpoint.training_state(chunks=chunks, optimizer=optimizer if include_optimizer else None,
                                              scheduler=scheduler, iteration=iteration,
                                              consumed_samples=consumed_samples, rng=rng_state(),
                                              layout=layout_key(), extra=extra)
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
        state["rng_state"] = _rng_sharded_object(rng_state())
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


_OS_ERROR_TEXT = re.compile(r"\[Errno \d+\] ([^:'\n]+): '([^'\n]+)'")


def save_failure_reason(exc: BaseException, directory: str | None = None) -> str:
    """"No space left on device (path)" for the OSError behind a failed save (dist_checkpointing wraps
    the writer's exception in RuntimeError / CheckpointException). torch's zip writer turns a short
    write into "[enforce fail ...] unexpected pos": then the file system and the file size limit of
    `directory` are asked. Else "Type: message"."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            where = f" ({current.filename})" if current.filename else ""
            return f"{current.strerror or os.strerror(current.errno)}{where}"
        todo += [current.__cause__, current.__context__]
        todo += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        for failure in (getattr(current, "failures", None) or {}).values():  # DCP CheckpointException
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    # gathered across ranks (pickled), a wrapper keeps only the text: "[Errno 28] No space ...: 'path'"
    found = _OS_ERROR_TEXT.search("\n".join(str(e) for e in [exc, *(getattr(exc, "failures", None) or {}).values()]))
    if found:
        return f"{found.group(1)} ({found.group(2)})"
    if directory is not None:
        probed = _probe_space(directory)
        if probed is not None:
            return probed
    return f"{type(exc).__name__}: {exc}"


def _probe_space(directory: str) -> str | None:
    """Why writes under `directory` fail, if the disk is full or a file size limit is set."""
    existing = directory
    while existing and not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    try:
        if shutil.disk_usage(existing or ".").free < (1 << 20):
            return f"No space left on device ({directory})"
    except OSError:
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return f"File too large: the file size limit (RLIMIT_FSIZE, ulimit -f) is {soft} bytes ({directory})"
    except (ImportError, OSError, ValueError):
        pass
    return None


def guard_helper_processes() -> None:
    """Make the checkpoint results-queue Manager a helper process (runtime.faults): deaf to the
    group's SIGINT/SIGTERM, SIGKILLed when the rank dies. On CPU mcore_cpu forks it already so."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    name = next((n for n in ("_get_write_results_queue", "get_write_results_queue") if hasattr(fa, n)), None)
    if name is None or getattr(getattr(fa, name), "__module__", "").startswith("nemoc"):
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from nemoc.runtime.faults import become_helper_process

    def results_queue(*args, **kwargs):
        if fa._results_queue is None:
            manager = SyncManager(ctx=mp.get_context("spawn"))
            manager.start(initializer=become_helper_process, initargs=(os.getpid(),))
            fa._results_queue = manager.Queue()
            fa._nemoc_manager = manager
        return fa._results_queue

    setattr(fa, name, results_queue)


class Checkpointer:
    """Saves training state under `root`, synchronously or through Megatron's AsyncCallsQueue.

    Call `maybe_finalize()` once per step (all ranks): it completes finished async saves (digests,
    manifest, rename + `latest` + prune). `close()` waits for any save in flight. `on_saved(record)`
    runs on every rank after a checkpoint becomes `latest`. A failed save raises CheckpointSaveError
    after removing its temporary directory. Creating one removes the `.tmp` debris of killed saves.
    """

    POLL_S = 0.05  # between the checks of a blocking wait for the async writers (one tiny all-gather each)
    NOTE_EVERY_S = 60.0  # a blocking wait says what it waits for this often
    EXIT_GRACE_S = 10.0  # a writer that has finished its files and digests gets this long to exit
    STALL_FAIL = 4  # a writer with no I/O for this many times `stall_s` fails the save

    def __init__(self, *, root: str, keep: int, async_save: bool, on_saved=None, stall_s: float = 300.0):
        self.root = root
        self.keep = keep
        self.async_save = async_save
        self.on_saved = on_saved
        self.stall_s = stall_s  # an async writer that writes nothing for this long fails the save
        self.last_saved: SaveRecord | None = None
        self._in_flight: SaveRecord | None = None
        self._queue = None
        guard_helper_processes()
        if _rank() == 0:
            remove_partial_saves(root)
        _barrier()
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)

    def save(self, state: dict, *, iteration: int) -> SaveRecord:
        if self._queue is not None:
            self.maybe_finalize(blocking=True)  # at most one save in flight
        final = os.path.join(self.root, iteration_name(iteration))
        tmp = final + ".tmp"
        record = SaveRecord(iteration, final, time.monotonic(), self.async_save)
        with self._cleanup_on_failure(record):
            if _rank() == 0:
                os.makedirs(self.root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            _barrier()
            from nemoc.runtime import fsdp_checkpoint

            if state.get(fsdp_checkpoint.MARKER) == fsdp_checkpoint.FORMAT:
                # torch.distributed.checkpoint, synchronously (async_save applies to torch_dist saves only)
                record.async_save = False
                fsdp_checkpoint.save(state, tmp)
                self._publish(tmp, record, fmt=fsdp_checkpoint.FORMAT, dtype=state.get(fsdp_checkpoint.DTYPE_KEY))
                return record
            strategy = _save_strategy()
            if self._queue is not None:
                request = dist_checkpointing.save(state, tmp, sharded_strategy=strategy, async_sharded_save=True)
                if request.async_fn is not None:  # the forked writer is a helper process (runtime.faults)
                    from nemoc.runtime.faults import run_as_helper

                    request = request._replace(async_fn=partial(run_as_helper, os.getpid(), write_then_digest,
                                                                request.async_fn, tmp, _rank()))
                request.add_finalize_fn(lambda: self._publish(tmp, record))
                self._in_flight = record
                self._queue.schedule_async_request(request)
            else:
                dist_checkpointing.save(state, tmp, sharded_strategy=strategy)
                self._publish(tmp, record)
        return record

    @contextmanager
    def _cleanup_on_failure(self, record: SaveRecord):
        """A failed save: remove its `.tmp` (rank 0), keep `latest`, raise CheckpointSaveError."""
        try:
            yield
        except (CheckpointSaveError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # torch's CheckpointException derives from BaseException
            self._in_flight = None
            if _rank() == 0:
                shutil.rmtree(record.path + ".tmp", ignore_errors=True)
            raise CheckpointSaveError(f"checkpoint save failed at step {record.iteration}: "
                                      f"{save_failure_reason(exc, record.path + '.tmp')}") from exc

    def _publish(self, tmp: str, record: SaveRecord, fmt: str | None = None, dtype: str | None = None) -> None:
        _barrier()  # every rank's shards and rank 0's metadata are on disk
        extra = dict(({"format": fmt} if fmt else {}), **({"dtype": dtype} if dtype else {}))
        write_manifest(tmp, iteration=record.iteration, layout=layout_key(), **extra)
        if _rank() == 0:
            if os.path.exists(record.path):
                shutil.rmtree(record.path)
            os.rename(tmp, record.path)
            _fsync_dir(self.root)
            write_text_atomic(os.path.join(self.root, LATEST), os.path.basename(record.path) + "\n")
            prune(self.root, self.keep)
        _barrier()
        self.last_saved = record
        self._in_flight = None
        if self.on_saved is not None:
            self.on_saved(record, time.monotonic() - record.started)

    def has_saved(self, path: str) -> bool:
        """This checkpointer saved `path` (or its async save is in flight)."""
        return any(r is not None and r.path == path for r in (self.last_saved, self._in_flight))

    def maybe_finalize(self, blocking: bool = False) -> None:
        if self._queue is not None and self._in_flight is not None:
            with self._cleanup_on_failure(self._in_flight):
                if blocking:
                    self._await_writers(self._in_flight)
                self._queue.maybe_finalize_async_calls(blocking=blocking)

    def _local_writer(self):
        """This rank's forked writer process of the save in flight (Megatron's TemporalAsyncCaller), or None."""
        calls = getattr(self._queue, "async_calls", None)
        return getattr(calls[0].async_caller, "process", None) if calls else None

    def _await_writers(self, record: SaveRecord) -> None:
        """Wait until every rank's async writer has exited, polling rather than joining.

        Megatron's blocking finalize joins this rank's writer and then enters collectives: a rank whose
        writer finished early waits in one for the slowest writer, and a write slower than the process
        group's timeout (a busy disk, not a failure) ended the job with a collective timeout. Here the
        ranks check all writers together (one all-gather of three flags per poll, like Megatron's
        per-step non-blocking check) until none is alive, and rank 0 says every minute whom they wait
        for. Progress is the I/O a writer and its write workers do (/proc's read + write characters:
        writing, nemoc's digest pass reading the shards back), read without touching the checkpoint's
        filesystem. A writer with no I/O for `stall_s` prints its stack and its workers' (faulthandler on
        SIGUSR2, runtime.faults.become_helper_process) once; with none for STALL_FAIL x `stall_s` (an
        fsync shows no I/O, hence the margin) every rank stops its writer and fails the save naming the
        rank. A writer that wrote its files and digests (its sidecar exists, so its results are in the
        results queue: that queue's put is a synchronous call to the Manager) but does not exit is
        stopped after EXIT_GRACE_S. One rank alone joins as Megatron does (no peer can time out)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return
        sidecar = os.path.join(record.path + ".tmp", _SIDECAR.format(rank=_rank()))
        rank = _rank()
        started = last_change = time.monotonic()
        next_note, last_io, done_since, dumped = started + self.NOTE_EVERY_S, None, None, False
        while True:
            writer = self._local_writer()
            alive = writer is not None and writer.is_alive()
            now = time.monotonic()
            if alive:
                io = _tree_io_chars(writer.pid)
                if io != last_io:
                    last_io, last_change = io, now
                if now - last_change >= 1.0 and os.path.exists(sidecar):  # quiet: has it finished its work?
                    done_since = done_since or now
                    if now - done_since > self.EXIT_GRACE_S:
                        print(f"[nemoc rank {rank}] the checkpoint writer of step {record.iteration} wrote every "
                              f"file and its digests but did not exit for {self.EXIT_GRACE_S:.0f} s: stopping it "
                              f"(pid {writer.pid})", flush=True)
                        _kill_tree(writer)
                        alive = writer.is_alive()
            idle = now - last_change if alive else 0.0
            flags = _gather_flags([int(alive), int(idle > self.stall_s), int(idle > self.STALL_FAIL * self.stall_s)])
            waiting = [r for r, f in enumerate(flags) if f[0]]
            if not waiting:
                return
            if idle > self.stall_s and not dumped:
                dumped = True
                print(f"[nemoc rank {rank}] the checkpoint writer of step {record.iteration} (pid {writer.pid}) has "
                      f"done no I/O for {idle:.0f} s; its Python stack and its write workers' follow", flush=True)
                _dump_stacks(writer.pid)
            failed = [r for r, f in enumerate(flags) if f[2]]
            if failed:
                self._abort_in_flight(record)
                raise CheckpointSaveError(
                    f"checkpoint save failed at step {record.iteration}: the async checkpoint writer of rank"
                    f"{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} did no I/O for "
                    f"{self.STALL_FAIL * self.stall_s:.0f} s ({self.STALL_FAIL} x the process-group timeout_s; "
                    "its Python stack is in that rank's log)")
            if now >= next_note:
                next_note += self.NOTE_EVERY_S
                if rank == 0:
                    print(f"[nemoc] waiting for the checkpoint writer{'s' if len(waiting) > 1 else ''} of step "
                          f"{record.iteration} on rank{'s' if len(waiting) > 1 else ''} "
                          f"{', '.join(map(str, waiting[:8]))}{' ...' if len(waiting) > 8 else ''}: "
                          f"{now - started:.0f} s", flush=True)
            time.sleep(self.POLL_S)

    def _abort_in_flight(self, record: SaveRecord) -> None:
        """Every rank, after a failed wait: stop this rank's writer and its workers, drop the request from
        Megatron's queue (its close() would join the writer), remove the save's `.tmp` (rank 0)."""
        writer = self._local_writer()
        if writer is not None:
            _kill_tree(writer)
        for call in list(getattr(self._queue, "async_calls", ())):
            call.async_caller.close(abort=True)
        getattr(self._queue, "async_calls", []).clear()
        self._in_flight = None
        if _rank() == 0:
            shutil.rmtree(record.path + ".tmp", ignore_errors=True)

    def close(self) -> None:
        if self._queue is not None:
            try:
                self.maybe_finalize(blocking=True)
            finally:
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
    fsdp_saved, fsdp_here = checkpoint_format(path) == "fsdp_dtensor", _is_fsdp(chunks)
    if fsdp_saved or fsdp_here:
        return _load_fsdp(path, chunks=chunks, optimizer=optimizer, scheduler=scheduler, saved=fsdp_saved,
                          here=fsdp_here)
    common = dist_checkpointing.load_common_state_dict(path)
    saved, here = saved_layout(common), layout_key()
    same_layout = saved == here
    model_parallel_same = all(saved.get(k) == here[k] for k in ("tp", "pp", "vp", "cp", "ep", "etp"))
    with_optimizer = optimizer is not None and "optimizer" in common_keys(common, path)
    saved_format = common.get("optimizer_format", "dp_reshardable")
    if with_optimizer and distributed_optimizer and saved_format == "dp_reshardable" and not model_parallel_same:
        warn(f"checkpoint {path} was saved with layout {saved}, now {here}: the distributed "
             "optimizer's dp_reshardable state reshards across DP only; loading the model, scheduler and "
             "data position, and restarting the Adam moments (save with params.optimizer_checkpoint_format"
             " = fully_reshardable to carry them across TP/PP changes)")
        with_optimizer = False
    template = training_state(chunks=chunks, optimizer=optimizer, scheduler=None, iteration=0, consumed_samples=0,
                              is_loading=True, include_optimizer=with_optimizer, include_rng=same_layout,
                              optimizer_format=saved_format if saved_format in OPTIMIZER_FORMATS else "dp_reshardable")
    for key in ("iteration", "consumed_samples", "layout", "nemoc", "optimizer_format"):
        template.pop(key, None)
    loaded = dist_checkpointing.load(fresh_tensors(template), path, sharded_strategy=_load_strategy(path))
    _load_model_state(chunks, loaded)
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
        set_rng_state(loaded["rng_state"])
    return Restored(path, int(common.get("iteration", 0)), int(common.get("consumed_samples", 0)),
                    with_optimizer, same_layout and "rng_state" in loaded)


def _load_fsdp(path: str, *, chunks, optimizer, scheduler, saved: bool, here: bool) -> Restored:
    """A Megatron-FSDP checkpoint into a Megatron-FSDP model (runtime/fsdp_checkpoint.py); either without the
    other is refused with the reason."""
    if not here:
        raise ValueError("it was saved by a Megatron-FSDP stage (fsdp_dtensor format), which resumes with "
                         "megatron_fsdp = true only; to continue from its weights without FSDP, start a new stage "
                         "from it (`after` / init_checkpoint: read as full tensors at any layout)")
    if not saved:
        raise ValueError("it is a torch_dist checkpoint and this stage runs Megatron-FSDP, which resumes from its "
                         "own fsdp_dtensor checkpoints only; to start an FSDP stage from its weights, name it as "
                         "the stage's init_checkpoint (or `after` its stage) in a new checkpoint directory")
    from nemoc.runtime import fsdp_checkpoint

    iteration, consumed, rng = fsdp_checkpoint.load(path, chunks=chunks, optimizer=optimizer, scheduler=scheduler,
                                                    saved_layout=saved_layout(read_manifest(path)),
                                                    rng=rng_state(), layout=layout_key())
    if rng is not None:  # same layout: each rank's RNG streams go on where they stopped
        set_rng_state(rng)
    return Restored(path, iteration, consumed, optimizer is not None, rng is not None)


def fresh_tensors(template: dict) -> dict:
    """The loading template with every sharded tensor's storage replaced by a new, empty one.

    dist_checkpointing loads in place into the template's tensors, which are the model's parameters
    and the optimizer's state: a load that fails half-way (a corrupt shard, a missing key) would leave
    the model partly overwritten. Loading into fresh tensors and copying them in only afterwards
    (`_load_model_state`, the optimizer's load_state_dict) makes a load all or nothing. Call it after
    the optimizer's part is built: the optimizer maps its parameters to the model's tensors by id."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def fresh(value):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and torch.is_tensor(value.data):
            value.data = torch.empty_like(value.data)
        return value

    return dict_list_map_inplace(fresh, template)


def _load_model_state(chunks, loaded: dict) -> None:
    from nemoc.runtime.model import unwrap

    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"])


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


def resume(*, root: str, chunks, optimizer, scheduler, distributed_optimizer: bool, warn=print,
           iterations: set[int] | None = None) -> Restored | None:
    """Restore from `latest` (or the newest loadable checkpoint). None if there is none; raises
    CheckpointError naming every damaged one if checkpoints exist but none is usable.

    Every rank walks the same candidates (same filesystem); after each attempt the ranks agree
    (all-reduce) so that they all use the same checkpoint."""
    skipped = []
    for path in resume_candidates(root):
        if iterations is not None and int(os.path.basename(path)[5:]) not in iterations:
            continue  # a state saved in parts (PPO's actor and critic) resumes where every part has one
        reason = verify_on_all_ranks(path)
        if reason is None:
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
        warn(f"warning: skipping checkpoint {path}: {reason}")
        skipped.append(f"{path}: {reason}")
    if skipped:
        raise CheckpointError(f"no usable checkpoint under {root}: " + "; ".join(skipped)
                              + " (repair them, or move them away to start this stage from scratch)")
    return None


def load_weights(path: str, *, chunks, optimizer=None) -> None:
    """Initialise model weights from a checkpoint (fine-tuning): model only, any layout. Pass the
    optimizer if it already exists, so that its fp32 main copy is refreshed from the loaded weights."""
    if not os.path.isdir(path):
        raise CheckpointError(f"init checkpoint {path} does not exist")
    reason = verify_on_all_ranks(path) if os.path.exists(os.path.join(path, MANIFEST)) else None
    if reason is not None:
        raise CheckpointError(f"init checkpoint {path} is unusable: {reason}")
    saved_fsdp = checkpoint_format(path) == "fsdp_dtensor"
    if _is_fsdp(chunks):
        from nemoc.runtime import fsdp_checkpoint

        if saved_fsdp:
            reason = fsdp_checkpoint.layout_change(saved_layout(read_manifest(path)), layout_key(), init=True)
            if reason is not None:
                raise CheckpointError(f"init checkpoint {path}: {reason}")
            try:
                fsdp_checkpoint.load_model(path, chunks=chunks)
            except fsdp_checkpoint.ReadError as exc:
                raise CheckpointError(f"init checkpoint {path} is unusable: {exc} (repair it, or start this "
                                      "stage from another checkpoint)") from None
        else:
            try:
                fsdp_checkpoint.load_full_into_fsdp(chunks, torch_dist_getter(path), where=path)
            except ValueError as exc:
                raise CheckpointError(f"init checkpoint {exc}") from None
        if optimizer is not None:
            optimizer.reload_model_params()
        return
    if saved_fsdp:
        load_full_weights(path, chunks=chunks)
        if optimizer is not None:
            optimizer.reload_model_params()
        return
    loaded = dist_checkpointing.load(fresh_tensors(model_sharded_state_dict(chunks)), path)
    _load_model_state(chunks, loaded)
    if optimizer is not None:
        optimizer.reload_model_params()


def torch_dist_getter(path: str):
    """`get(name)`: the full (TP=1, PP=1) tensor of a torch_dist checkpoint by GPTModel state-dict name (the
    export's `DistCheckpointReader`); a pre-norm stored under Transformer Engine's fused name (the local spec's
    sharded_state_dict_keys_map) is found under either."""
    from nemoc.runtime.hf.mapping import either_spec
    from nemoc.runtime.hf.trained import DistCheckpointReader

    return either_spec(DistCheckpointReader(path).get)


def load_full_weights(path: str, *, chunks, skip_output: bool = False) -> None:
    """The model of an fsdp_dtensor checkpoint (a Megatron-FSDP stage's) into unsharded chunks of any TP/PP
    layout: read as full tensors (runtime/fsdp_checkpoint.py `FullTensorReader`) and sliced for this rank as
    a converted Hugging Face checkpoint is (runtime/hf/load.py `load_full`). Raises CheckpointError."""
    from nemoc.runtime import fsdp_checkpoint
    from nemoc.runtime.hf.load import LoadError, load_full

    try:
        reader = fsdp_checkpoint.full_reader(path)
        for chunk in chunks:  # every virtual-pipeline chunk reads its own layers
            load_full(chunk, reader, where=path, skip_output=skip_output)
    except (fsdp_checkpoint.FullCheckpointError, LoadError) as exc:
        raise CheckpointError(str(exc)) from None


def save_weights(path: str, *, chunks) -> None:
    """Model-only dist checkpoint (no optimizer), e.g. reference weights for tests or export; a Megatron-FSDP
    model's in its fsdp_dtensor format (runtime/fsdp_checkpoint.py: each rank its DTensor shards), which later
    stages and export read as full tensors (`load_full_weights`, `FullTensorReader`)."""
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    _barrier()
    extra = {}
    if _is_fsdp(chunks):
        from nemoc.runtime import fsdp_checkpoint

        state = fsdp_checkpoint.training_state(chunks=chunks, optimizer=None, scheduler=None, iteration=0,
                                               consumed_samples=0, rng=rng_state(), layout=layout_key())
        extra = dict(format=fsdp_checkpoint.FORMAT, dtype=state[fsdp_checkpoint.DTYPE_KEY])
        fsdp_checkpoint.save(state, path)
    else:
        dist_checkpointing.save(model_sharded_state_dict(chunks), path)
    _barrier()
    write_manifest(path, iteration=None, layout=layout_key(), **extra)
    _barrier()
