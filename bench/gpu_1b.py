"""~1B GPT on one GPU: nemoc's runtime vs a bare Megatron-Core loop, flash (SDPA) vs unfused attention.

Run once on a lent H100/H200 through `bench/gpu_run.sh` (installs the carried megatron-core wheel,
maps `nemoc.*` onto the repository folders, writes everything under $OUT). On a CPU-only machine
`python bench/gpu_1b.py --cpu-smoke --out /tmp/x` runs the very same code paths (gloo, a tiny fp32
model, 3 steps per sub-run) so that a crash shows up here and not on the device.

Four variants, each in its own fresh process, all launched the same way (`torchrun --standalone
--nproc-per-node 1`, same environment: OMP_NUM_THREADS=1, CUDA_DEVICE_MAX_CONNECTIONS=1):
  * runtime/flash, runtime/unfused: `nemoc.runtime.train.main(task.json)` on a synthetic indexed
    dataset (GPTDataset pipeline, logging, signal checks: everything a user gets), no checkpoints,
    log_every = 1 so that every step is timed (the runtime synchronises at a log step; its
    `step_time_s` intervals tile the clock: a step's includes the writing of the previous record).
    The only additions are read-only: the worker wraps `train.build_model` / `train.build_optimizer`
    to record the settings they produced, and the metrics sink to stamp each record's arrival (wall
    and process CPU time: `interval_step_s` / `interval_cpu_step_s`).
  * bare/flash, bare/unfused: a minimal Megatron-Core loop (GPTModel, Float16Module, DDP,
    get_megatron_optimizer, get_forward_backward_func, OptimizerParamScheduler) whose
    TransformerConfig / DDP config / OptimizerConfig / scheduler kwargs come from the same adapter
    (runtime.megatron_args), whose layer spec names the attention core explicitly (flash =
    Megatron's local spec with the runtime's `SDPAttention` core, unfused = the local spec's
    `DotProductAttention`; with Transformer Engine installed, TE's spec and TE's backend), fed with
    pre-generated device tensors, synchronised and timed at the end of every step.
Both sides record a settings fingerprint (every TransformerConfig field, DDP config, optimizer
config and class, the attention core class of every layer, parameter count and dtypes, the CUDA /
threading environment); the parent diffs runtime vs bare per backend (`settings_diff`, expected
empty). Per variant: step time = median of the steps after `--warmup`, tokens/s, model TFLOP/s and
MFU (the compiler's formula with the causal discount, the `nemoc plan` convention, against the
catalog's dense bf16 peak), peak allocated/reserved memory, and `nemoc plan`'s predictions
(compiler.memory / compiler.cost) with their errors; runtime overhead = runtime / bare - 1 per backend.

Order (time-boxed by --budget; a sub-run that cannot start in time is skipped and says so):
bare/flash, runtime/flash, runtime/unfused, bare/unfused, then (--repeat) runtime/flash and
bare/flash again in the reverse order, so that an order or drift effect is visible. Each bare run
ends with a few extra steps fed as the runtime feeds (its own `collate`: host tensors stacked, pinned
and copied per micro-batch): `host_batches_step_time_s` isolates that effect.
The JSON is rewritten after each sub-run, so a partial run still leaves results.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODEL_1B = dict(name="gpt-1b", layers=24, hidden=2048, heads=16, query_groups=16, ffn_hidden=5632, vocab=32000,
                seq_length=2048, activation="swiglu", norm="rmsnorm", position="rope")
MODEL_SMOKE = dict(name="gpt-smoke", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=128, vocab=256,
                   seq_length=64, activation="swiglu", norm="rmsnorm", position="rope")

# The environment every worker gets (the runtime would set CUDA_DEVICE_MAX_CONNECTIONS=1 itself at
# import; the bare side must not run with a different value).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1"}
_POSITION = {"rope": "rope", "learned": "learned_absolute", "none": "none"}


# Megatron-Core's local layer spec on both sides (the lent GPU machines have no Transformer Engine;
# with a plan saying `local` the runtime builds it even where TE imports, and so does the bare loop).
KERNELS = "local"


def build_plan(*, smoke: bool, backend: str, steps: int, log_every: int, micro_batch: int, num_micro: int,
               gpu: str):
    from nemoc.compiler.execution import stage_execution
    from nemoc.compiler.plan import Estimate, Layout, MemoryBreakdown, Plan, StagePlan
    from nemoc.compiler.spec import CheckpointSpec, ClusterSpec, DataSpec, ModelSpec, OptimizerSpec, ScheduleSpec

    model = ModelSpec(**(MODEL_SMOKE if smoke else MODEL_1B))
    layout = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=micro_batch,
                    global_batch=micro_batch * num_micro, num_microbatches=num_micro, sequence_parallel=False,
                    distributed_optimizer=False, recompute="none")
    precision = "fp32" if smoke else "bf16"
    execution = stage_execution(model=model, gpu=gpu, layout=layout, split=None, stage_kind="pretrain",
                                precision=precision, attention_backend=backend, kernels=KERNELS,
                                seq_length=model.seq_length)
    stage = StagePlan(
        name="pretrain", kind="pretrain", after=(), data=("synthetic",), layout=layout,
        memory=MemoryBreakdown(0, 0, 0, 0, 0, 0), estimate=Estimate(0, 0, 0, 0, steps, 0, 0, None),
        seq_length=model.seq_length, steps=steps, optimizer=OptimizerSpec(lr=3e-4),
        schedule=ScheduleSpec(name="cosine", warmup=2, min_lr=3e-5), checkpoint=CheckpointSpec(every=None),
        log_every=log_every, eval_every=None, seed=1234, params={"save_checkpoints": False}, execution=execution,
    )
    return Plan(experiment="gpu_1b", model=model, cluster=ClusterSpec(gpu=gpu, nodes=1, gpus_per_node=1),
                precision=precision, attention_backend=backend,
                data=(DataSpec(name="synthetic", path="synthetic", split=(1.0, 0.0, 0.0)),), stages=(stage,),
                kernels=KERNELS)


def write_dataset(prefix: Path, *, vocab: int, tokens: int) -> None:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    written = 0
    while written < tokens:
        doc = rng.integers(0, vocab, size=4096, dtype=np.int32)
        builder.add_document(doc, [len(doc)])
        written += len(doc)
    builder.finalize(str(prefix) + ".idx")


def device_name() -> str:
    """The GPU's name from nvidia-smi (no CUDA context in the parent: it would hold GPU memory
    during every sub-run), or "cpu"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu"


def gpu_id(name: str) -> str:
    """The hardware catalog's id for a device name (CPU when there is no GPU)."""
    if name == "cpu":
        return "CPU"
    return next((g for g in ("B200", "H200", "H100") if g in name), "H100")


def summarise(samples: list[float]) -> dict:
    """Median and spread of per-step times (seconds)."""
    if not samples:
        return {"step_time_s": float("nan"), "step_times_s": []}
    ordered = sorted(samples)
    return {"step_time_s": statistics.median(samples), "step_time_s_min": ordered[0],
            "step_time_s_max": ordered[-1], "step_time_s_mean": statistics.mean(samples),
            "measured_steps": len(samples), "step_times_s": samples,
            "step_time_s_intervals": samples}  # the key bench_runtime_overhead.py reads


def rates(step_time_s: float, *, tokens_per_step: int, flops_per_step: float | None,
          peak_flops: float | None) -> dict:
    out = {"tokens_per_s": tokens_per_step / step_time_s}
    if flops_per_step:
        out["tflops_per_gpu"] = flops_per_step / step_time_s / 1e12
        if peak_flops:
            out["mfu"] = flops_per_step / step_time_s / peak_flops
    return out


# ------------------------------------------------------------------------- processes and settings


_current_worker: list = [None]  # the running torchrun (own session), killed with us on SIGTERM/SIGINT


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so killing
    torchrun's process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_current_worker() -> None:
    """SIGKILL the running torchrun and everything it started."""
    proc = _current_worker[0]
    if proc is None or proc.poll() is not None:
        return
    for pid in [proc.pid] + _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _run_worker(args: list[str], *, work: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 1 <this script> ARGS` in its own session; on timeout
    the whole process group (torchrun and its worker) is killed, so no orphan keeps the GPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(Path(__file__).resolve())] + args
    env = dict(os.environ, **WORKER_ENV)
    with open(work / "stdout.txt", "w") as out, open(work / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=str(REPO), env=env, start_new_session=True)
        _current_worker[0] = proc
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            _kill_current_worker()
            raise RuntimeError(f"timed out after {timeout_s:.0f} s: {' '.join(args[:2])}") from None
        finally:
            _current_worker[0] = None
    return subprocess.CompletedProcess(cmd, rc, (work / "stdout.txt").read_text(), (work / "stderr.txt").read_text())


def _plain(value):
    """A JSON-comparable rendering of a config value (callables by name, dtypes and enums by str)."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, (list, tuple)):
        return [_plain(x) for x in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if callable(value):
        return getattr(value, "__qualname__", None) or type(value).__name__
    return type(value).__name__


def _dataclass_fields(obj) -> dict:
    if obj is None or not dataclasses.is_dataclass(obj):
        return {"value": _plain(obj)}
    return {f.name: _plain(getattr(obj, f.name, None)) for f in dataclasses.fields(obj)}


def settings_fingerprint(*, model, config, optimizer) -> dict:
    """Everything that decides what a training step computes and how: recorded identically by the
    runtime worker and the bare loop, diffed by the parent."""
    import torch

    chunks = list(model)
    cores = sorted({type(m).__module__ + "." + type(m).__name__ for c in chunks
                    for n, m in c.named_modules() if n.endswith("core_attention")})
    wrappers, inner = [], chunks[0]
    while True:
        wrappers.append(type(inner).__name__)
        if not hasattr(inner, "module"):
            break
        inner = inner.module
    params = [p for c in chunks for p in c.parameters()]
    opts = list(getattr(optimizer, "chained_optimizers", None) or [optimizer])
    optim = []
    for o in opts:
        torch_opt = getattr(o, "optimizer", None)
        defaults = {k: _plain(v) for k, v in (getattr(torch_opt, "defaults", None) or {}).items()
                    if k not in ("lr", "params")}
        optim.append({"class": type(o).__name__, "torch_class": type(torch_opt).__name__, "torch_defaults": defaults,
                      "config": _dataclass_fields(getattr(o, "config", None))})
    cuda = torch.cuda.is_available()
    sdpa = {}
    if cuda:
        for key in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
            fn = getattr(torch.backends.cuda, key, None)
            sdpa[key] = bool(fn()) if fn else None
    env = {k: os.environ.get(k) for k in ("CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS", "CUDA_LAUNCH_BLOCKING",
                                          "NCCL_ALGO", "NCCL_PROTO", "TORCH_NCCL_AVOID_RECORD_STREAMS")}
    env.update(launcher="torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python",
               torch_threads=torch.get_num_threads(), matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
               cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
               float32_matmul_precision=torch.get_float32_matmul_precision(),
               deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
               grad_enabled=torch.is_grad_enabled(), **sdpa)
    return {
        "transformer_config": _dataclass_fields(config),
        "ddp_config": _dataclass_fields(getattr(chunks[0], "ddp_config", None)),
        "optimizer": optim,
        "model": {"wrappers": wrappers, "chunks": len(chunks), "parameters": sum(p.numel() for p in params),
                  "param_dtypes": sorted({str(p.dtype) for p in params}), "core_attention": cores,
                  "training": all(c.training for c in chunks)},
        "environment": env,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
    }


def settings_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """`key: a != b` for every leaf that differs between two fingerprints."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(x, dict) and isinstance(y, dict):
            out += settings_diff(x, y, f"{prefix}{key}.")
        elif json.dumps(x, sort_keys=True, default=str) != json.dumps(y, sort_keys=True, default=str):
            out.append(f"{prefix}{key}: {json.dumps(x, default=str)} != {json.dumps(y, default=str)}")
    return out


def _memory_stats() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


# ------------------------------------------------------------------------------------- the runtime


def write_task(plan, *, work: Path, prefix: Path) -> Path:
    """plan.json and the runtime's task.json (the synthetic dataset at `prefix`) in `work`."""
    from nemoc.compiler.plan import to_json
    from nemoc.runtime.taskfile import TASK_JSON_VERSION

    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(to_json(plan))
    task = {"version": TASK_JSON_VERSION, "plan": str(work / "plan.json"), "stage": "pretrain",
            "datasets": [{"name": "synthetic", "prefix": str(prefix), "weight": 1.0}], "tokenizer": None,
            "vocab_size": plan.model.vocab, "init_checkpoint": None, "output_dir": str(work),
            "checkpoint_dir": str(work / "checkpoints"), "metrics_path": str(work / "metrics.jsonl"),
            "tensorboard_dir": None, "max_steps": None, "timeout_s": 300}
    (work / "task.json").write_text(json.dumps(task))
    return work / "task.json"


def stamp_intervals(stamps: list, *, warmup: int) -> dict:
    """Per-step wall and CPU time of each interval between consecutive (step, wall, cpu) stamps, the
    intervals ending after step `warmup` only (the first ones pay for first-touch allocations)."""
    wall, cpu = [], []
    for (s0, w0, c0), (s1, w1, c1) in zip(stamps, stamps[1:]):
        if s0 >= warmup and s1 > s0:
            wall.append((w1 - w0) / (s1 - s0))
            cpu.append((c1 - c0) / (s1 - s0))
    return {"interval_step_s": wall, "interval_cpu_step_s": cpu}


def run_runtime(plan, *, work: Path, prefix: Path, timeout_s: float, smoke: bool, warmup: int | None = None) -> dict:
    """The runtime on `plan` in a fresh torchrun process; per-step times from its metrics.jsonl,
    dropping the steps up to `warmup` (default: the first logged interval); `interval_step_s` /
    `interval_cpu_step_s`: wall and process CPU time per step between the worker's stamps at each
    metrics record (runtime_worker), the same measure as the bare loop's."""

    stage = plan.stages[0]
    warmup = stage.log_every if warmup is None else warmup
    shutil.rmtree(work, ignore_errors=True)  # metrics.jsonl appends (resume semantics): start clean
    write_task(plan, work=work, prefix=prefix)
    started = time.monotonic()
    proc = _run_worker(["--runtime-worker", str(work / "task.json"), "--out", str(work)], work=work,
                       timeout_s=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"runtime exited {proc.returncode}: {proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = sorted((r for r in records if "loss" in r and "step_time_s" in r), key=lambda r: r["step"])
    measured, previous = [], 0
    for r in steps:  # a record covers the steps (previous, step]
        if previous >= warmup:
            measured.append(r)
        previous = r["step"]
    measured = measured or steps[-1:]
    out = {"wall_s": time.monotonic() - started, "final_loss": steps[-1]["loss"], "warmup_steps": warmup,
           "all_step_times_s": [r["step_time_s"] for r in steps], **summarise([r["step_time_s"] for r in measured])}
    for key in ("tflops_per_gpu", "mfu"):  # the runtime's own metrics, as a cross-check of the parent's
        if key in measured[-1]:
            out[f"runtime_reported_{key}"] = statistics.median(r[key] for r in measured)
    worker = work / "worker.json"
    if worker.exists():
        out.update(json.loads(worker.read_text()))
    if out.get("record_stamps"):
        out.update(stamp_intervals(out["record_stamps"], warmup=warmup))
    if "peak_mem_gib" not in out and "peak_mem_gib" in steps[-1]:
        out["peak_mem_gib"] = max(r.get("peak_mem_gib", 0.0) for r in steps)
    shutil.rmtree(work / "dataset_cache", ignore_errors=True)
    return out


def runtime_worker(task_path: str, out_dir: str) -> int:
    """`nemoc.runtime.train.main(task)` with read-only wrappers that record the settings the runtime
    built (model, TransformerConfig, DDP and optimizer config) and, at the end, the CUDA memory peaks."""
    from nemoc.runtime import train as T

    built, info = {}, {"record_stamps": []}
    original_model, original_optimizer, original_metrics = T.build_model, T.build_optimizer, T.open_metrics

    def build_model(*args, **kwargs):
        result = original_model(*args, **kwargs)
        built["model"], built["config"] = result[0], result[1]
        return result

    def build_optimizer(*args, **kwargs):
        result = original_optimizer(*args, **kwargs)
        try:
            info["settings"] = settings_fingerprint(model=built["model"], config=built["config"], optimizer=result[0])
        except Exception:
            info["settings_error"] = traceback.format_exc()[-2000:]
        return result

    def open_metrics(**kwargs):  # (step, wall, process CPU time) as each step record reaches the sink
        sink = original_metrics(**kwargs)
        log = sink.log

        def stamped(record):
            if "loss" in record:
                info["record_stamps"].append((record["step"], time.perf_counter(), time.process_time()))
            log(record)

        sink.log = stamped
        return sink

    T.build_model, T.build_optimizer, T.open_metrics = build_model, build_optimizer, open_metrics
    rc = T.main([task_path])
    info.update(_memory_stats())
    Path(out_dir, "worker.json").write_text(json.dumps(info, sort_keys=True))
    return rc


# ---------------------------------------------------------------------------------------- the bare


def run_bare_subprocess(plan, *, work: Path, timeout_s: float, smoke: bool, warmup: int | None = None,
                        diag_steps: int = 0, prefix: Path | None = None) -> dict:
    """The bare Megatron-Core loop on `plan` in a fresh torchrun process (see bare_main); with `prefix`,
    fed from the same GPTDataset samples as the runtime (not pre-generated tensors)."""
    from nemoc.compiler.plan import to_json

    stage = plan.stages[0]
    warmup = stage.log_every if warmup is None else warmup
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(to_json(plan))
    started = time.monotonic()
    args = ["--bare", str(work / "plan.json"), "--out", str(work), "--warmup", str(warmup),
            "--diag-steps", str(diag_steps)]
    if prefix is not None:
        args += ["--bare-task", str(write_task(plan, work=work / "data", prefix=prefix))]
    proc = _run_worker(args + (["--smoke"] if smoke else []), work=work, timeout_s=timeout_s)
    result = work / "bare.json"
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"bare loop exited {proc.returncode}: {proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.monotonic() - started
    every = stage.log_every
    # the runtime's intervals: one stamp every log_every steps (and after the last), from step 0
    wall = cpu = 0.0
    stamps = [(0, 0.0, 0.0)]
    for step, (w, c) in enumerate(zip(out["all_step_times_s"], out["all_step_cpu_s"]), start=1):
        wall, cpu = wall + w, cpu + c
        if step % every == 0 or step == len(out["all_step_times_s"]):
            stamps.append((step, wall, cpu))
    out.update(stamp_intervals(stamps, warmup=warmup))
    return out


def bare_main(plan_path: str, out_dir: str, smoke: bool, warmup: int, diag_steps: int,
              data_task: str | None = None) -> None:
    """A minimal Megatron-Core training loop with exactly the runtime's Megatron settings.

    Settings: TransformerConfig, DDP config, OptimizerConfig and scheduler kwargs from
    runtime.megatron_args (the runtime's one adapter); the model is built here with Megatron's API and
    an explicit attention core. Data: pre-generated contiguous device tensors (tokens, labels,
    loss_mask, position_ids as the runtime's batches). Every step ends with a device synchronisation
    and is timed from the previous one. With `data_task` (the runtime's task.json) the data are instead
    the runtime's own GPTDataset samples (Megatron-Core's BlendedMegatronDatasetBuilder with the config
    runtime.train.build_gpt_datasets gives it), read and collated by torch's `default_collate` per
    micro-batch inside the timed step, as a Megatron-LM loop reads: both sides then pay for the same
    data, and the difference is what the runtime adds. Per step: wall time and process CPU time."""
    import numpy as np
    import torch

    from nemoc.runtime import mcore_cpu

    if smoke or not torch.cuda.is_available():
        mcore_cpu.apply()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from nemoc.compiler.plan import from_json
    from nemoc.runtime import megatron_args as margs
    from nemoc.runtime.model import SDPAttention
    from nemoc.runtime.train import kernel_setup

    plan = from_json(Path(plan_path).read_text())
    stage, spec_model = plan.stages[0], plan.model
    lay = stage.layout
    cuda = torch.cuda.is_available() and not mcore_cpu.is_applied()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    else:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)
    parallel_state.initialize_model_parallel(**margs.parallel_kwargs(layout=lay))
    seed = stage.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()  # as runtime.train.set_seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    facts, _ = kernel_setup(stage.kernels)  # what the runtime builds for the plan's kernels (runtime/train.py)
    have_te = facts.have_te
    config = margs.transformer_config(model=spec_model, layout=lay, execution=stage.execution, facts=facts,
                                      dropout=float(stage.params.dropout), deterministic=facts.cpu)
    # The attention core, explicitly: TE decides from config.attention_backend when TE is installed;
    # otherwise Megatron's local spec, whose core is DotProductAttention (`unfused`), or our SDPA core.
    if have_te:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=spec_model.experts or None,
                                                          moe_grouped_gemm=False, qk_layernorm=spec_model.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=spec_model.experts or None, moe_grouped_gemm=False,
                                        qk_layernorm=spec_model.qk_layernorm, normalization=config.normalization)
        if plan.attention_backend != "unfused":
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    vocab = margs.padded_vocab_size(spec_model.vocab, multiple=stage.execution.vocab_multiple)
    gpt = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                   max_sequence_length=stage.seq_length, pre_process=True, post_process=True,
                   share_embeddings_and_output_weights=spec_model.tie_embeddings,
                   position_embedding_type=_POSITION[spec_model.position], rotary_base=int(spec_model.rotary_base))
    if not config.use_cpu_initialization:
        gpt = gpt.to(torch.cuda.current_device())
    if config.bf16 or config.fp16:
        gpt = Float16Module(config, gpt)
    ddp_cfg = margs.ddp_config(layout=lay, overlaps=stage.execution.overlaps)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=gpt)]
    config.finalize_model_grads_func = finalize_model_grads
    if ddp_cfg.overlap_grad_reduce:
        config.no_sync_func, config.grad_sync_func = model[0].no_sync, model[0].start_grad_sync
    optimizer = get_megatron_optimizer(margs.optimizer_config(optimizer=stage.optimizer, schedule=stage.schedule,
                                                              layout=lay, precision=plan.precision), model)
    scheduler = OptimizerParamScheduler(optimizer, **margs.scheduler_kwargs(
        optimizer=stage.optimizer, schedule=stage.schedule, steps=stage.steps))
    settings = settings_fingerprint(model=model, config=config, optimizer=optimizer)

    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    seq, mb, n_micro = stage.seq_length, lay.micro_batch, lay.num_microbatches
    gen = torch.Generator().manual_seed(0)

    def host_batch() -> dict:
        """One micro-batch as the runtime's collate builds it (CPU tensors, before the device copy)."""
        tokens = torch.randint(0, spec_model.vocab, (mb, seq + 1), generator=gen)
        return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(mb, seq, dtype=torch.float32),
                "position_ids": torch.arange(seq, dtype=torch.int64).unsqueeze(0).expand(mb, seq).contiguous()}

    def to_device(batch: dict) -> dict:
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()} if cuda else batch

    # Fresh tokens for every micro-batch, as the runtime reads (repeating one batch lets the model
    # memorise it, and on CPU the shrinking values hit denormal slow paths); on the device up front.
    device_batches = [to_device(host_batch()) for _ in range(stage.steps * n_micro)] if data_task is None else None
    dataset = None
    if data_task is not None:
        from torch.utils.data import default_collate

        from nemoc.runtime import train as runtime_train

        task = runtime_train.load_task(data_task)
        dataset, _ = runtime_train.build_gpt_datasets(task=task, stage=task.stage, seed=task.stage.seed)

    def step_batches(step: int):
        if dataset is None:
            return iter(device_batches[(step - 1) * n_micro: step * n_micro])
        first = (step - 1) * n_micro * mb  # the runtime's order (MegatronPretrainingSampler, dp = 1)
        return (to_device(default_collate([dataset[(first + i * mb + k) % len(dataset)] for k in range(mb)]))
                for i in range(n_micro))

    def loss_func(loss_mask, output_tensor):  # = runtime.train.masked_lm_loss
        losses = output_tensor.float().view(-1)
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        tokens = mask.sum()
        return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens.detach()])}

    def forward_step(data_iterator, module):  # = runtime.train.gpt_forward_step (cp = 1)
        batch = next(data_iterator)
        output = module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, lambda out, mask=batch["loss_mask"]: loss_func(mask, out)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    fwd_bwd = get_forward_backward_func()

    def train_step(batches) -> torch.Tensor:  # = runtime.train.train_step, minus the metrics
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        losses = fwd_bwd(forward_step_func=forward_step, data_iterator=batches, model=model,
                         num_microbatches=n_micro, seq_length=seq, micro_batch_size=mb, decoder_seq_length=seq,
                         forward_only=False)
        ok, _, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        return sum(x["lm loss"] for x in losses)

    sync()
    times, cpu_times, last = [], [], None
    for step in range(1, stage.steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        last = train_step(step_batches(step))
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    result = {"final_loss": float(last[0] / last[1]), "warmup_steps": warmup, "settings": settings,
              "all_step_times_s": times, "all_step_cpu_s": cpu_times, "data": "gptdataset" if dataset else "tensors",
              **summarise(times[warmup:] or times[-1:]), **_memory_stats()}

    if diag_steps > 0:  # the same loop fed as the runtime feeds: its own collate, per micro-batch
        from nemoc.runtime.train import collate

        def host_iterator():
            while True:
                batch = host_batch()
                yield collate([{k: v[i] for k, v in batch.items()} for i in range(mb)], dev)

        diag = []
        for _ in range(diag_steps):
            iterator = host_iterator()
            start = time.perf_counter()
            train_step(iterator)
            sync()
            diag.append(time.perf_counter() - start)
        kept = diag[1:] or diag  # the first pays for the new host-tensor path
        result.update(host_batches_step_time_s=statistics.median(kept), host_batches_step_times_s=diag)
    Path(out_dir, "bare.json").write_text(json.dumps(result, sort_keys=True))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------- predictions


def predictions(plan) -> dict:
    from nemoc.compiler import cost, memory

    stage = plan.stages[0]
    out = {}
    try:
        mem = memory.estimate(plan.model, stage.layout, precision=plan.precision,
                              attention_backend=plan.attention_backend, seq_length=stage.seq_length,
                              gpu=plan.cluster.gpu, kernels=stage.kernels)
        out["memory_total_gib"] = mem.total / 2**30
        out["memory_terms_gib"] = {k: getattr(mem, k) / 2**30 for k in ("weights", "gradients", "optimizer",
                                                                        "activations", "other")}
    except Exception as exc:
        out["memory_error"] = f"{type(exc).__name__}: {exc}"
    try:
        est = cost.estimate(plan.model, stage.layout, gpu=plan.cluster.gpu, precision=plan.precision,
                            attention_backend=plan.attention_backend, seq_length=stage.seq_length,
                            kernels=stage.kernels)
        out.update(step_time_s=est.step_time_s, tokens_per_s=est.tokens_per_s_per_gpu, mfu=est.mfu,
                   tflops_per_gpu=est.model_tflops_per_gpu)
    except Exception as exc:
        out["cost_error"] = f"{type(exc).__name__}: {exc}"
    return out


# ------------------------------------------------------------------------------------------- main


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return format(value * scale, spec) if isinstance(value, (int, float)) else "-"


def table(results: dict) -> list[str]:
    """The side-by-side table (markdown), one row per variant, then the comparisons."""
    rows = ["| variant | attention core | step time (median) | tokens/s | TFLOP/s | MFU | peak alloc | "
            "pred. step | pred. MFU | pred. memory |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, entry in results["runs"].items():
        pred = entry.get("predicted", {})
        for kind in ("bare", "runtime", "runtime_repeat", "bare_repeat"):
            r = entry.get(kind)
            if r is None:
                continue
            name = f"{kind.split('_')[0]}/{backend}{' (repeat)' if kind.endswith('repeat') else ''}"
            if "step_time_s" not in r:
                rows.append(f"| {name} | - | {str(r.get('error', '?')).strip().splitlines()[-1][:60]} "
                            "| | | | | | | |")
                continue
            core = ",".join(c.rsplit(".", 1)[-1] for c in r.get("settings", {}).get("model", {}).get("core_attention", []))
            rows.append(f"| {name} | {core or '?'} | {_fmt(r['step_time_s'], '.4f')} s | {_fmt(r.get('tokens_per_s'), ',.0f')} "
                        f"| {_fmt(r.get('tflops_per_gpu'), '.1f')} | {_fmt(r.get('mfu'), '.1f', 100)} % "
                        f"| {_fmt(r.get('peak_mem_gib'), '.2f')} GiB | {_fmt(pred.get('step_time_s'), '.3f')} s "
                        f"| {_fmt(pred.get('mfu'), '.1f', 100)} % | {_fmt(pred.get('memory_total_gib'), '.2f')} GiB |")
    lines = rows + [""]
    for backend, entry in results["runs"].items():
        if "runtime_overhead" in entry:
            lines.append(f"runtime overhead ({backend}): {entry['runtime_overhead'] * 100:+.2f} % "
                         f"(runtime/bare median step time; settings_diff: {len(entry.get('settings_diff', []))} "
                         f"difference(s))")
        if "runtime_overhead_repeat" in entry:
            lines.append(f"runtime overhead ({backend}, repeat round, runtime first): "
                         f"{entry['runtime_overhead_repeat'] * 100:+.2f} %")
        bare = entry.get("bare", {})
        if "host_batches_step_time_s" in bare and "step_time_s" in bare:
            lines.append(f"bare ({backend}) fed with host batches as the runtime feeds: "
                         f"{bare['host_batches_step_time_s']:.4f} s/step vs {bare['step_time_s']:.4f} s/step "
                         "on device-resident batches")
    for kind, fu in results.get("flash_vs_unfused", {}).items():
        lines.append(f"flash vs unfused ({kind}): unfused/flash step time {fu['speedup']:.3f}x, "
                     f"peak memory saved by flash {_fmt(fu.get('peak_mem_gib_saved'), '.2f')} GiB")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "results" / "gpu")))
    parser.add_argument("--smoke", "--cpu-smoke", dest="smoke", action="store_true",
                        help="tiny fp32 model, 3 steps per sub-run, gloo on the CPU: checks every code path")
    parser.add_argument("--steps", type=int, default=None, help="steps per sub-run (default 20; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="leading steps left out of the median (default 4; smoke 1)")
    parser.add_argument("--diag-steps", type=int, default=None,
                        help="extra bare steps fed with host batches as the runtime feeds (default 6; smoke 2; 0 = off)")
    parser.add_argument("--no-repeat", dest="repeat", action="store_false",
                        help="skip the second (reverse-order) runtime/bare flash round")
    parser.add_argument("--backends", default="flash,unfused")
    parser.add_argument("--budget", type=float, default=270.0,
                        help="seconds for all sub-runs; a sub-run is not started with less than 60 s left "
                             "(order: bare/flash, runtime/flash, runtime/unfused, bare/unfused, runtime/flash, "
                             "bare/flash)")
    parser.add_argument("--bare", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runtime-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bare-task", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runtime_worker:
        return runtime_worker(args.runtime_worker, args.out)
    if args.bare:
        bare_main(args.bare, args.out, args.smoke, args.warmup or 0, args.diag_steps or 0, args.bare_task)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / ("gpu_1b_smoke.json" if args.smoke else "gpu_1b.json")
    steps = args.steps or (3 if args.smoke else 20)
    warmup = min(args.warmup if args.warmup is not None else (1 if args.smoke else 4), steps - 1)
    diag_steps = args.diag_steps if args.diag_steps is not None else (2 if args.smoke else 6)
    micro_batch, num_micro = (2, 2) if args.smoke else (1, 8)
    model_cfg = MODEL_SMOKE if args.smoke else MODEL_1B
    started = time.monotonic()
    results: dict = {"config": {"steps": steps, "warmup_steps": warmup, "log_every": 1, "micro_batch": micro_batch,
                                "num_microbatches": num_micro, "model": model_cfg, "diag_steps": diag_steps,
                                "precision": "fp32" if args.smoke else "bf16", "worker_env": WORKER_ENV,
                                "statistic": "median of the per-step times after the warm-up steps"},
                     "runs": {}}

    def save():
        results["wall_s"] = time.monotonic() - started
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    def interrupted(signum, frame):  # `timeout` in gpu_run.sh: end the worker too, keep what was measured
        _kill_current_worker()
        results["interrupted"] = f"{signal.Signals(signum).name} after {time.monotonic() - started:.0f} s"
        save()
        sys.exit(124)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    try:
        import torch

        results["device"] = "cpu" if args.smoke else device_name()
        results["torch"] = torch.__version__
        import megatron.core

        results["megatron_core"] = megatron.core.__version__
        from nemoc.runtime.model import have_transformer_engine

        results["transformer_engine"] = have_transformer_engine()
        gpu = gpu_id(results["device"])
        prefix = out / "data" / "synthetic_text_document"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        write_dataset(prefix, vocab=model_cfg["vocab"],
                      tokens=(steps + 2) * micro_batch * num_micro * (model_cfg["seq_length"] + 1) * 2)
        from nemoc.compiler.flops import model_flops_per_step

        flops = model_flops_per_step(_model_spec(model_cfg), model_cfg["seq_length"], micro_batch * num_micro,
                                     causal_discount=True)
        peak = None
        if gpu != "CPU":
            from nemoc.compiler.catalog.hardware import get_gpu

            hw = get_gpu(gpu)
            peak = hw.peak("bf16") if hw is not None else None
        results["config"].update(model_flops_per_step=flops, peak_flops_bf16=peak, gpu_catalog_id=gpu)
    except Exception:
        results["setup_error"] = traceback.format_exc()
        save()
        return 1
    save()

    backends = [b for b in args.backends.split(",") if b]
    plans = {b: build_plan(smoke=args.smoke, backend=b, steps=steps, log_every=1, micro_batch=micro_batch,
                           num_micro=num_micro, gpu=gpu) for b in backends}
    tokens_per_step = micro_batch * num_micro * model_cfg["seq_length"]
    for b in backends:
        entry = results["runs"].setdefault(b, {})
        try:
            entry["predicted"] = predictions(plans[b])
        except Exception:
            entry["predicted"] = {"error": traceback.format_exc()}
    order = []
    if "flash" in backends:
        order += [("flash", "bare"), ("flash", "runtime")]
    for b in backends:
        if b != "flash":
            order += [(b, "runtime"), (b, "bare")]
    if args.repeat and "flash" in backends:
        order += [("flash", "runtime_repeat"), ("flash", "bare_repeat")]
    budget = max(args.budget, 900) if args.smoke else args.budget
    min_start = 0 if args.smoke else 60
    retries = [2]  # at most two retries in the whole script: a deterministic failure must not eat the budget
    for backend, kind in order:
        entry = results["runs"][backend]
        left = budget - (time.monotonic() - started)
        if left < min_start:
            entry[kind] = {"error": f"skipped: {left:.0f} s left of the {budget:.0f} s budget"}
            save()
            continue
        work = out / f"{backend}_{kind}"
        first_error = None
        for attempt in (1, 2):  # one retry of a failed (not timed-out) sub-run if time allows
            left = budget - (time.monotonic() - started)
            timeout = left + 30 if args.smoke else min(150.0, left + 30)
            try:
                if kind.startswith("runtime"):
                    r = run_runtime(plans[backend], work=work, prefix=prefix, timeout_s=timeout, smoke=args.smoke,
                                    warmup=warmup)
                else:
                    r = run_bare_subprocess(plans[backend], work=work, timeout_s=timeout, smoke=args.smoke,
                                            warmup=warmup, diag_steps=diag_steps)
                r.update(rates(r["step_time_s"], tokens_per_step=tokens_per_step, flops_per_step=flops,
                               peak_flops=peak))
                pred = entry.get("predicted", {})
                if "step_time_s" in pred:
                    r["step_time_prediction_error"] = pred["step_time_s"] / r["step_time_s"] - 1.0
                if "memory_total_gib" in pred and r.get("peak_mem_gib"):
                    r["memory_prediction_error"] = pred["memory_total_gib"] / r["peak_mem_gib"] - 1.0
                if first_error:
                    r["first_attempt_error"] = first_error
                entry[kind] = r
                break
            except Exception:
                error = traceback.format_exc()[-4000:]
                entry[kind] = {"error": error, **({"first_attempt_error": first_error} if first_error else {})}
                save()
                timed_out = "timed out after" in error
                if (attempt == 2 or timed_out or not retries[0]
                        or budget - (time.monotonic() - started) < min_start + 30):
                    break
                retries[0] -= 1
                first_error = error
                print(f"[gpu_1b] {backend}/{kind} failed, retrying once: {error.strip().splitlines()[-1][:200]}",
                      flush=True)
        finalise(entry)
        save()
    runs = results["runs"]
    fu = {}
    for kind in ("runtime", "bare"):
        f, u = runs.get("flash", {}).get(kind, {}), runs.get("unfused", {}).get(kind, {})
        if "step_time_s" in f and "step_time_s" in u:
            fu[kind] = {"speedup": u["step_time_s"] / f["step_time_s"]}
            if f.get("peak_mem_gib") is not None and u.get("peak_mem_gib") is not None:
                fu[kind]["peak_mem_gib_saved"] = u["peak_mem_gib"] - f["peak_mem_gib"]
    if fu:
        results["flash_vs_unfused"] = fu
    shutil.rmtree(out / "data", ignore_errors=True)  # synthetic tokens: not worth keeping
    lines = table(results)
    results["table"] = lines
    save()
    (out / ("gpu_1b_smoke_table.md" if args.smoke else "gpu_1b_table.md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"-> {results_path} ({results['wall_s']:.0f} s)")
    failed = [f"{b}/{k}" for b, e in runs.items() for k in ("runtime", "bare") if "step_time_s" not in e.get(k, {})]
    return 1 if failed and args.smoke else 0


def finalise(entry: dict) -> None:
    """Overheads and the settings diff of one backend's runs, from whatever has finished."""
    rt, bare = entry.get("runtime", {}), entry.get("bare", {})
    if "step_time_s" in rt and "step_time_s" in bare:
        entry["runtime_overhead"] = rt["step_time_s"] / bare["step_time_s"] - 1.0
        entry["runtime_overhead_within_2_percent"] = entry["runtime_overhead"] <= 0.02
    rt2, bare2 = entry.get("runtime_repeat", {}), entry.get("bare_repeat", {})
    if "step_time_s" in rt2 and "step_time_s" in bare2:
        entry["runtime_overhead_repeat"] = rt2["step_time_s"] / bare2["step_time_s"] - 1.0
        pooled_rt = rt.get("step_times_s", []) + rt2.get("step_times_s", [])
        pooled_bare = bare.get("step_times_s", []) + bare2.get("step_times_s", [])
        if pooled_rt and pooled_bare:
            entry["runtime_overhead_pooled"] = statistics.median(pooled_rt) / statistics.median(pooled_bare) - 1.0
    if "settings" in rt and "settings" in bare:
        entry["settings_diff"] = settings_diff(rt["settings"], bare["settings"])
    elif "step_time_s" in rt and "step_time_s" in bare:
        entry["settings_diff"] = ["fingerprint missing: " + (rt.get("settings_error") or "runtime/bare has none")]


def _model_spec(cfg: dict):
    from nemoc.compiler.spec import ModelSpec

    return ModelSpec(**cfg)


if __name__ == "__main__":
    sys.exit(main())
