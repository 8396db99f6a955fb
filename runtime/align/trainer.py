"""The alignment kinds on the training core: a model with its optimizer (`Trainer`), and their steps on
`core.loop.train_loop` (`fit`).

Input:  a model chunk from `common.build_gpt` (parameters with `requires_grad=False` are frozen: DDP
        gives them no gradient buffer and the optimizer never sees them), the stage plan's optimizer,
        schedule, layout and steps; the stage kind's items, `to_microbatches(share)` and
        `forward(model, microbatch) -> (output, loss_func)` in Megatron's forward-step contract, whose
        loss function returns `(mean loss, {name: scalar})` with the names in `forward.reports`.
Output: the core loop's `LoopState` (the loss and every named report averaged over the log interval);
        `run_steps`: every step's record. `Trainer.step`: one step outside the loop (PPO's inner epochs).
Invariants: the gradient is that of the mean of the per-microbatch losses over all microbatches of all
DP ranks (Megatron divides each microbatch loss by the number of microbatches; DDP averages over DP);
a step's micro-batches are made before its schedule runs (`StepBatches`), so whatever they compute
(DPO's reference scores: a forward-only schedule) never nests inside the training schedule.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemoc.compiler.params import StageParams
from nemoc.compiler.spec import CheckpointSpec
from nemoc.runtime import faults
from nemoc.runtime import megatron_args as margs
from nemoc.runtime import model as mmodel
from nemoc.runtime.align.common import AlignError, chunk_list, unwrap
from nemoc.runtime.core import build as core_build
from nemoc.runtime.core import loop as core_loop
from nemoc.runtime.core.dist import StopSignal


class Trainer:
    """A model (one chunk, or a rank's virtual-pipeline `Chunks`) wrapped in Megatron DDP -- or in
    Megatron-FSDP where the plan says `megatron_fsdp` -- with its optimizer and scheduler. `chunks`: the
    wrapped chunks the schedules take (and checkpoints save); `model`: the first (the only one without
    virtual pipeline stages). Under FSDP the bare chunk's parameters are this rank's shards: evaluate and
    save the trained model through `model` / `chunks` (`trained`). `execution`: the stage plan's
    `Execution`, whose precision, overlaps, FP8 recipe and MXFP8 gradient-buffer reuse reach the DDP and
    optimizer configs as pretraining's (runtime/core/build.py `wrap`, `build_optimizer`); without it (tests,
    tools) `precision` and `overlaps`."""

    def __init__(self, chunk, *, layout, optimizer, schedule, steps: int, precision: str = "fp32", overlaps=None,
                 execution=None):
        built = chunk_list(chunk)
        config = unwrap(built[0]).config
        trainable = [p for p in chunk.parameters() if p.requires_grad]
        if not trainable:
            raise AlignError("no trainable parameters")
        frozen = len(trainable) < sum(1 for _ in chunk.parameters())
        if execution is not None:
            precision, overlaps = execution.precision, execution.overlaps
        reuse_grad_buf = bool(execution is not None and execution.reuse_grad_buf_for_mxfp8_param_ag)
        self.chunks = _wrap(built, config=config, layout=layout, overlaps=overlaps, frozen=frozen,
                            reuse_grad_buf=reuse_grad_buf)
        self.model = self.chunks[0]
        self._bare = chunk
        try:
            self.optimizer, self.scheduler = core_build.optimizer_for(
                model=self.chunks, optimizer=optimizer, schedule=schedule, layout=layout, precision=precision,
                steps=steps, reuse_grad_buf=reuse_grad_buf,
                fp8_recipe=execution.fp8_recipe if execution is not None else None)
        except margs.UnsupportedPlan as exc:
            raise AlignError(str(exc)) from None
        self.step_count = 0
        self.warn: Callable[[str], None] = print  # a transient NaN/Inf loss (see `step`)

    @property
    def trained(self):
        """The trained model for whatever runs outside the schedules' training steps (held-out scores, the
        final save): the bare chunk(s) under DDP, which share the wrapper's parameters; under Megatron-FSDP
        the wrapper, whose forward all-gathers each layer's shards (the bare chunk holds only this rank's)
        and whose state dict the final save writes in fsdp_dtensor format."""
        return self.model if mmodel.is_fsdp(self.chunks) else self._bare

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, microbatches: Sequence, forward: Callable, *, seq_length: int) -> dict[str, float]:
        """One optimizer step over `microbatches` (this DP rank's share of the global batch).

        A NaN/Inf loss (any reported `*loss`, agreed over the DP group) stops the step before the
        optimizer moves: it is run again from the same state (same parameters, micro-batches and RNG
        state). Finite the second time: a transient fault, warned through `self.warn`; non-finite
        again: LossDiverged ("loss became NaN at step N ... lower the learning rate")."""
        if any(getattr(chunk, "use_forward_hook", False) for chunk in self.chunks):
            # the overlapped gather leaves other ranks' shards stale after the optimizer step until the next
            # forward's pre-hooks; the training loop (core/param_gather.py) gathers before anything else reads
            # them, this step-by-step path (GRPO's, with rollouts between steps) does not
            raise AlignError("overlap_param_gather = true: this stage kind steps outside the training loop, which "
                             "does not gather the distributed optimizer's parameters for its rollouts; run it with "
                             "overlap_param_gather = false")
        start = time.perf_counter()
        for chunk in self.chunks:
            chunk.train()

        def attempt():
            metrics = self._forward_backward(microbatches, forward, seq_length=seq_length)
            bad = next(((k, v) for k, v in sorted(metrics.items()) if k.endswith("loss") and faults.nonfinite_name(v)),
                       None)
            return (metrics, *(bad or ("loss", 0.0)))

        metrics = core_loop.rerun_nonfinite(attempt, step=self.step_count + 1, lr=lambda: self.lr,
                                            warn=self.warn, rewind=lambda: None)
        lr = self.lr
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        self.step_count += 1
        metrics.update(lr=lr, grad_norm=float(grad_norm or 0.0), step_time_s=time.perf_counter() - start)
        return metrics

    def _forward_backward(self, microbatches: Sequence, forward: Callable, *, seq_length: int) -> dict[str, float]:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        its = [iter(microbatches) for _ in self.chunks]  # one per virtual-pipeline chunk, the same micro-batches
        reports = get_forward_backward_func()(
            forward_step_func=lambda data, model: forward(model, next(data)),
            data_iterator=its if len(its) > 1 else its[0], model=self.chunks, num_microbatches=len(microbatches),
            seq_length=seq_length, micro_batch_size=_rows(microbatches[0]), forward_only=False,
        )
        return average_reports(reports)


def _wrap(built: list, *, config, layout, overlaps, frozen: bool, reuse_grad_buf: bool = False) -> list:
    """The trained model's chunks in Megatron DDP, or in Megatron-FSDP's FullyShardedDataParallel where the
    plan says `megatron_fsdp` (ZeRO-3 over the DP x CP group, as pretraining: runtime/core/build.py `wrap`).
    A model with frozen parameters (LoRA's base) is refused under FSDP: the planner plans those stages
    without it (compiler/planner.py), and its memory model prices FSDP for fully trained models only. The
    layout's FSDP limits (one chunk, a shard group of more than one rank: E177, E181) were checked when the
    chunks were built (runtime/megatron_args.py `_check_fsdp`)."""
    from nemoc.runtime import mcore_cpu

    if layout.megatron_fsdp and frozen:
        raise AlignError("megatron_fsdp = true with frozen parameters (LoRA adapters on a frozen base): nemoc wraps "
                         "only fully trained models in Megatron-FSDP; re-plan (nemoc plans LoRA stages without it)")
    ddp_config = margs.ddp_config(layout=layout, overlaps=overlaps, cpu=mcore_cpu.is_applied(),
                                  reuse_grad_buf=reuse_grad_buf)
    if not layout.megatron_fsdp:
        return mmodel.wrap_ddp(chunks=built, config=config, ddp_config=ddp_config)
    return mmodel.wrap_fsdp(chunks=built, config=config, ddp_config=ddp_config)


def _rows(mb) -> int:
    if isinstance(mb, dict):
        mb = mb["batch"]
    tokens = mb.batch.tokens if hasattr(mb, "batch") else mb.tokens
    return int(tokens.shape[0])


def average_reports(reports: Sequence[dict]) -> dict[str, float]:
    """Mean of each reported scalar over microbatches, then over the data-parallel group.

    Reported tensors must not share storage with the returned loss: Megatron's schedule divides that
    loss by the number of microbatches in place (hence the `.detach().clone()` in every loss_func).
    """
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        return _from_last_pipeline_stage(_average(reports))
    return _average(reports)


def _average(reports: Sequence[dict]) -> dict[str, float]:
    if not reports:
        return {}
    names = sorted(reports[0])
    values = torch.stack([torch.stack([r[n].detach().float().reshape(()) for n in names]) for r in reports]).mean(0)
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    return {n: float(v) for n, v in zip(names, values)}


def _from_last_pipeline_stage(metrics: dict[str, float]) -> dict[str, float]:
    """Under pipeline parallelism only the last stage computes the losses; every stage needs them (the
    NaN/Inf rerun is decided by all ranks alike, rank 0 logs)."""
    box = [metrics]
    torch.distributed.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                            group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def dp_shard(items: Sequence, step: int, global_batch: int) -> list:
    """This DP rank's share of step `step`'s global batch, cycling through `items` in order."""
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    start = step * global_batch
    batch = [items[(start + i) % len(items)] for i in range(global_batch)]
    return batch[rank::dp]


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class Preempted(Exception):
    """SIGTERM/SIGINT/SIGUSR1 arrived: the stage saved at `step` and exits 143 (resumable)."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"preempted by signal {signum} after step {step} (checkpoint saved)")
        self.step, self.signum = step, signum


@dataclass(frozen=True)
class Steps:
    """What `core.loop.train_loop` reads of a stage plan, for a model trained outside one (run_steps)."""

    layout: object
    seq_length: int
    log_every: int = 1
    eval_every: int | None = None
    checkpoint: CheckpointSpec = CheckpointSpec(every=None)
    # read by the loop only to validate (eval_iters), which eval_every None never does; a record as a stage's
    params: Mapping = field(default_factory=lambda: StageParams.of("sft"))
    execution: object = None  # no plan: Python's automatic collector (core.loop.GarbageCollection)


def batches(items: Sequence, *, start: int, global_batch: int, to_microbatches: Callable):
    """Every step's micro-batches from step `start` on: this DP rank's share of the step's global batch
    (a pure function of the step, so a resumed run sees the same data), cut by `to_microbatches`."""
    for step in itertools.count(start):
        yield from to_microbatches(dp_shard(items, step, global_batch))


class SameBatches(core_loop.ReplayableIterator):
    """The micro-batches of `leader`'s current step again, for another virtual-pipeline chunk (the
    interleaved schedule reads one iterator per chunk, each yielding the same micro-batches); begins its
    step after the leader (core.loop.train_step begins them in list order) and replays with it."""

    def __init__(self, leader: core_loop.ReplayableIterator):
        super().__init__(iter(()))
        self.leader = leader

    def begin_step(self) -> None:
        super().begin_step()
        self._replay = list(self.leader._replay)


class StepBatches(core_loop.ReplayableIterator):
    """The micro-batch stream of `batches`, each step's micro-batches made when the step begins
    (`begin_step`, called by core.loop.train_step before the schedule runs): whatever making them
    computes -- DPO's reference scores, a forward-only pipeline schedule of their own -- runs outside
    the training schedule, in the same order on every pipeline rank."""

    def __init__(self, iterator, per_step: int):
        super().__init__(iterator)
        self.per_step = per_step

    def begin_step(self) -> None:
        super().begin_step()
        missing = self.per_step - len(self._replay)
        self._replay += [next(self._iterator) for _ in range(max(missing, 0))]


def pipeline_shape(microbatch) -> tuple[int, int]:
    """(sequence, micro-batch) of a stage kind's micro-batch as the pipeline schedule sends it."""
    batch = microbatch["batch"] if isinstance(microbatch, dict) else microbatch
    return batch.pipeline_shape()


def fit(trainer: Trainer, *, stage, items: Sequence, to_microbatches: Callable, forward: Callable, start: int,
        end: int, reports: tuple[str, ...], metrics=None, checkpointer=None, make_checkpoint_state=None,
        throughput=None, stop: StopSignal | None = None) -> core_loop.LoopState:
    """Steps `start+1 .. end` of a stage kind on the training core's loop (core.loop.train_loop: Megatron's
    schedules -- no pipelining, 1F1B, interleaved over virtual-pipeline chunks -- the NaN/Inf rerun on replayed micro-batches, logging, periodic
    checkpoints, the stop signal). `forward(model, microbatch) -> (output, loss_func)` is the stage kind's
    forward step; `reports` the names its loss function reports, the loss first."""
    iterator = StepBatches(batches(items, start=start, global_batch=stage.layout.global_batch,
                                   to_microbatches=to_microbatches), per_step=stage.layout.num_microbatches)
    iterators = [iterator] + [SameBatches(iterator) for _ in trainer.chunks[1:]]
    state = core_loop.LoopState(iteration=start, consumed_samples=start * stage.layout.global_batch)
    if start >= end:
        return state
    iterator.begin_step()  # the first step's micro-batches: their shape is the pipeline's
    seq_length, micro_batch = pipeline_shape(iterator._replay[0])
    iterator._taken = []
    return core_loop.train_loop(
        model=trainer.chunks, optimizer=trainer.optimizer, scheduler=trainer.scheduler, stage=stage,
        forward_step=lambda data, model: forward(model, next(data)),
        train_iterators=iterators if len(iterators) > 1 else iterator, state=state,
        end_iteration=end, checkpointer=checkpointer, make_checkpoint_state=make_checkpoint_state, metrics=metrics,
        throughput=throughput, stop=stop, reports=reports, seq_length=seq_length, micro_batch=micro_batch)


class _Records:
    """A metrics sink that keeps every logged record (run_steps' per-step history), counts the trainer's
    steps and hands a transient fault's warning to `trainer.warn`."""

    def __init__(self, trainer: Trainer):
        self.records: list[dict] = []
        self.trainer = trainer

    def log(self, record: dict) -> None:
        self.records.append(dict(record))
        self.trainer.step_count = int(record["step"])

    def event(self, name: str, **fields) -> None:
        if name == "transient_fault":
            self.trainer.warn(fields.get("message", ""))


def run_steps(trainer: Trainer, *, items: Sequence, steps: int, global_batch: int, to_microbatches: Callable,
              forward: Callable, seq_length: int, layout=None, reports: tuple[str, ...] | None = None) -> list[dict]:
    """`steps` steps from scratch on the training core's loop (`fit`, as the stage runners train), with
    every step's record kept: for tools and tests that train a model outside a stage plan. `layout`
    defaults to one process's; `reports` to the forward step's (`forward.reports`)."""
    from nemoc.runtime.align.common import single_layout

    dp = parallel_state.get_data_parallel_world_size()
    if layout is None:
        first = to_microbatches(dp_shard(items, 0, global_batch))
        layout = single_layout(dp=dp, micro_batch=_rows(first[0]), global_batch=global_batch)
        layout = dataclasses.replace(layout, num_microbatches=len(first))
    sink = _Records(trainer)
    fit(trainer, stage=Steps(layout=layout, seq_length=seq_length), items=items, to_microbatches=to_microbatches,
        forward=forward, start=0, end=steps, reports=reports or getattr(forward, "reports", ("loss",)), metrics=sink)
    return sink.records
