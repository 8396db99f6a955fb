"""The training loop on Megatron-Core's schedules, for every stage kind.

`train_loop` runs steps from `state.iteration` to `end_iteration`: each step is
`get_forward_backward_func()` (no pipelining, 1F1B or interleaved, as parallel_state says) over the
stage kind's `forward_step` and the layout's micro-batches, then the Megatron optimizer and scheduler.
A NaN/Inf loss reruns the step from the same state (ReplayableIterator); a second one raises
LossDiverged. Logging (loss averaged over the interval, rates, memory), validation at the stage's
layout, periodic checkpoints and the agreed stop signal happen between steps.

A forward step's loss function returns `(loss, count, {name: tensor([sum, count]), ...})`: the
first report (`loss_key`, "lm loss" for pretraining) is the loss the loop logs and checks; every
other report is averaged the same way and logged under its own name (DPO's accuracy, PPO's value loss).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from nemoc.runtime import mcore_cpu
from nemoc.runtime.core.dist import StopSignal, device, set_phase
from nemoc.runtime.core.graphs import StepGraphs
from nemoc.runtime.core.param_gather import ParamGather

from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from nemoc.compiler.plan import Plan, StagePlan  # noqa: E402
from nemoc.runtime import checkpoint as ckpt  # noqa: E402
from nemoc.runtime import faults  # noqa: E402
from nemoc.runtime.metrics import NullMetrics  # noqa: E402


def chunk_iterators(make: Callable[[], Iterator], n_chunks: int):
    """The schedules want one iterator per virtual-pipeline chunk, each yielding the same batches."""
    return make() if n_chunks == 1 else [make() for _ in range(n_chunks)]


def eval_iters(stage: StagePlan) -> int:
    return stage.params.eval_iters  # the stage kind's typed record (compiler.params), default filled


def _stacked_reports(losses: list[dict], names: tuple[str, ...]) -> tuple[str, torch.Tensor | None]:
    """Every micro-batch's reports in one tensor, made by one stack where their shapes agree (each small
    tensor operation costs host time in a step): ("pairs", [micro-batches, len(names), 2]) when every
    report is a [sum, count] pair (pretraining's token-weighted "lm loss"), ("scalars", [micro-batches,
    len(names)]) when every report is a per-micro-batch scalar (SFT's mean loss, DPO's accuracy; each
    counts [value, 1]), else ("rows", [len(names), 2]) summed per report (mixed shapes, a report absent
    from some micro-batch: zeros). ("rows", None) when this rank has no reports (off the last pipeline
    stage)."""
    if not losses:
        return "rows", None
    values = [entry.get(name) for entry in losses for name in names]
    if all(v is not None for v in values):
        shapes = {tuple(v.shape) for v in values}
        if shapes == {(2,)}:
            return "pairs", torch.stack(values).detach().view(len(losses), len(names), 2)
        if shapes == {()}:
            return "scalars", torch.stack(values).detach().view(len(losses), len(names))
    rows = []
    for entry in losses:
        row = []
        for name in names:
            value = entry.get(name)
            if value is None:
                row.append(torch.zeros(2, dtype=torch.float64, device=device()))
                continue
            value = value.detach().reshape(-1).to(torch.float64)
            row.append(value if value.numel() == 2 else torch.cat([value, value.new_ones(1)]))
        rows.append(torch.stack(row))
    return "rows", torch.stack(rows).sum(0)


def _summed_on_device(kind: str, stacked: torch.Tensor | None, n_names: int) -> torch.Tensor:
    """[n_names, 2] float64 [sum, count] per report over this rank's micro-batches, on the device."""
    if stacked is None:
        return torch.zeros(n_names, 2, dtype=torch.float64, device=device())
    stacked = stacked.to(device(), torch.float64)
    if kind == "pairs":
        return stacked.sum(0)
    if kind == "scalars":
        total = stacked.sum(0)
        return torch.stack([total, torch.full_like(total, stacked.shape[0])], dim=1)
    return stacked


def _summed_on_host(kind: str, stacked: torch.Tensor | None, n_names: int) -> list[list[float]]:
    """The same sums as `_summed_on_device`, from ONE device-to-host read of the stacked reports, added
    up in Python floats (float64)."""
    sums = [[0.0, 0.0] for _ in range(n_names)]
    if stacked is None:
        return sums
    values = stacked.tolist()
    if kind == "rows":
        return [[float(s), float(c)] for s, c in values]
    for micro_batch in values:
        for row, value in zip(sums, micro_batch):
            if kind == "pairs":
                row[0] += value[0]
                row[1] += value[1]
            else:
                row[0] += value
                row[1] += 1.0
    return sums


def _report_sums(losses: list[dict], names: tuple[str, ...] = ("lm loss",)) -> torch.Tensor:
    """[len(names), 2]: per report name, [sum, count] over this rank's micro-batches (zeros off the last
    pipeline stage). A report is either a [sum, count] pair (pretraining's token-weighted "lm loss") or a
    scalar (a per-micro-batch mean: DPO's reward accuracy), counted as [value, 1]. Stays on the device
    (validation adds them up over its batches and reads them once)."""
    return _summed_on_device(*_stacked_reports(losses, names), len(names))


def _global_means(sums: torch.Tensor) -> list[float]:
    """Mean of each report over the whole job from per-rank [sum, count] rows. Every last-stage rank of a
    TP/CP group holds the same (or its CP share of the) sums, so the ratio of world sums is exact."""
    sums = sums.to(device(), torch.float64).reshape(-1, 2)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    sums = sums.cpu()
    return [float(row[0] / row[1]) if row[1] > 0 else float("nan") for row in sums]


def _global_mean(sums: torch.Tensor) -> float:
    return _global_means(sums)[0]


def _means(sums: list[list[float]]) -> list[float]:
    return [total / count if count > 0 else float("nan") for total, count in sums]


def _step_sums_and_stop(losses: list[dict], names: tuple[str, ...],
                        stop: StopSignal | None) -> tuple[list[list[float]], int]:
    """(per report [sum, count] over the step's micro-batches of the whole job, the agreed stop signal)
    with ONE all-reduce of a small tensor ([sum, count] per report, one count per stop signal) and ONE
    host read. The NaN/Inf check needs the loss on every rank before the optimizer moves; the stop
    signal and the other reports ride along, so a step costs one collective and one host
    synchronisation more than a bare Megatron-Core loop, and a log step none (the interval's means are
    added up on the host). One process: no collective, one host read of the stacked reports."""
    flags = stop.flags() if stop is not None else []
    kind, stacked = _stacked_reports(losses, names)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        row = torch.cat([_summed_on_device(kind, stacked, len(names)).reshape(-1),
                         torch.tensor(flags, dtype=torch.float64, device=device())])
        torch.distributed.all_reduce(row)
        values = row.tolist()
        sums = [values[2 * i:2 * i + 2] for i in range(len(names))]
        flags = values[2 * len(names):]
    else:  # one process: nothing to agree on (a bare loop would not reduce either)
        sums = _summed_on_host(kind, stacked, len(names))
    return sums, (StopSignal.from_flags(flags) if stop is not None else 0)


class ReplayableIterator:
    """Wraps a micro-batch iterator and remembers what the current step took, so that the step can be
    run again on the same micro-batches (the rerun of a step whose loss was NaN/Inf)."""

    def __init__(self, iterator: Iterator):
        self._iterator = iterator
        self._taken: list = []
        self._replay: list = []

    def __iter__(self):
        return self

    def __next__(self):
        item = self._replay.pop(0) if self._replay else next(self._iterator)
        self._taken.append(item)
        return item

    def begin_step(self) -> None:
        self._taken = []

    def rewind(self) -> None:
        self._replay = self._taken + self._replay
        self._taken = []


def _each_iterator(iterators) -> list:
    return list(iterators) if isinstance(iterators, list) else [iterators]


# ------------------------------------------------------------------------------------- train loop


@dataclass
class LoopState:
    iteration: int = 0
    consumed_samples: int = 0
    last_loss: float = float("nan")
    last_val_loss: float | None = None
    preempted_by: int = 0
    losses: list[float] = field(default_factory=list)
    reports: dict[str, float] = field(default_factory=dict)  # the other named reports at the last log step


@dataclass(frozen=True)
class Throughput:
    """Constants for the per-step rates: tokens per step and (if known) model FLOPs per step."""

    tokens_per_step: int
    model_flops_per_step: float | None
    peak_flops_per_gpu: float | None
    world_size: int


def throughput_for(*, plan: Plan, stage: StagePlan) -> Throughput:
    """The plan's FLOPs per step and the planned GPU's peak (`StagePlan.execution`), as `nemoc plan`
    computed them; no peak on the CPU (MFU is a GPU figure)."""
    tokens = stage.layout.global_batch * stage.seq_length
    ex = stage.execution
    peak = ex.peak_flops_per_gpu if torch.cuda.is_available() and not mcore_cpu.is_applied() else None
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return Throughput(tokens, ex.model_flops_per_step, peak, world)


def step_rng_state() -> dict:
    """The random state a step's forward and backward passes draw from: torch's default generator, the
    CUDA generator and Megatron's tensor-parallel RNG tracker (dropout, per-TP-rank streams). Python's
    and NumPy's global generators are not among them (Megatron-Core's model, schedules and layers never
    call them; the micro-batches of a rerun are replayed, not drawn again), so the rerun snapshot leaves
    them out: they cost ~60 us a step to copy (checkpoint.rng_state, which a checkpoint saves, has
    all four)."""
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and not mcore_cpu.is_applied():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_step_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def rerun_nonfinite(attempt: Callable[[], tuple], *, step: int, lr: Callable[[], float],
                    warn: Callable[[str], None], rewind: Callable[[], None] | None):
    """Megatron-LM's rerun state machine for one step, before the optimizer moves. `attempt()` runs the
    forward and backward passes and returns (result, name of the checked value, its value agreed over
    the ranks). A NaN/Inf value reruns the step from the same state (RNG restored, `rewind()` replays
    the micro-batches): finite the second time is a transient fault (warned, training goes on); not
    finite again, or no way to replay (`rewind` None), raises LossDiverged. Returns the result."""
    rng = step_rng_state()
    first = None
    while True:
        result, what, value = attempt()
        if faults.nonfinite_name(value) is None:
            if first is not None:
                warn(f"warning: the {what} was {faults.nonfinite_name(first)} at step {step}; the rerun of the "
                     f"step from the same state gave {value:.6g}: a transient fault, training goes on")
            return result
        if first is not None or rewind is None:
            raise faults.LossDiverged(faults.divergence_message(
                what=what, step=step, first=first if first is not None else value, second=value, lr=lr()))
        first = value
        rewind()
        set_step_rng_state(rng)


def train_step(*, forward_step, iterators, model, optimizer, scheduler, layout, seq_length: int,
               step: int = 0, warn: Callable[[str], None] = print, reports: tuple[str, ...] = ("lm loss",),
               micro_batch: int | None = None, stop: StopSignal | None = None,
               forward_backward: Callable | None = None, gather: ParamGather | None = None):
    """One optimizer step over num_microbatches micro-batches. Returns (per report, the loss first, its
    [sum, count] over the step's micro-batches of the whole job as host floats, grad_norm, ok, the stop
    signal agreed over the ranks: 0, or the signal any rank had seen by the loss check of this step).

    The loss is checked before the optimizer steps (Megatron-LM's rerun state machine): if it is NaN or
    Inf on any rank, the gradients are dropped and the step is run again from the same state (same
    parameters, micro-batches and RNG state). A finite rerun is a transient fault (warned, training
    goes on); a second non-finite loss raises LossDiverged. Wrap `iterators` in ReplayableIterator for
    the rerun to see the same micro-batches. `forward_backward`: the schedule to run (default
    `get_forward_backward_func()`; StepGraphs' whole-step CUDA graph wraps it). `gather`: the loop's
    ParamGather, which stages the main parameters for an MXFP8 gather through the gradient buffer."""
    replayable = [it for it in _each_iterator(iterators) if isinstance(it, ReplayableIterator)]
    for it in replayable:
        it.begin_step()

    def attempt():
        losses = _forward_backward(forward_step=forward_step, iterators=iterators, model=model, optimizer=optimizer,
                                   layout=layout, seq_length=seq_length, micro_batch=micro_batch,
                                   forward_backward=forward_backward, gather=gather)
        sums, signum = _step_sums_and_stop(losses, reports, stop)
        return (sums, signum), "loss", _means(sums[:1])[0]

    def rewind():
        for it in replayable:
            it.rewind()

    sums, signum = rerun_nonfinite(attempt, step=step, lr=lambda: float(optimizer.param_groups[0]["lr"]), warn=warn,
                           rewind=rewind if replayable else None)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return sums, (float(grad_norm) if grad_norm is not None else float("nan")), bool(ok), signum


def _forward_backward(*, forward_step, iterators, model, optimizer, layout, seq_length: int,
                      micro_batch: int | None = None, forward_backward: Callable | None = None,
                      gather: ParamGather | None = None) -> list[dict]:
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    if gather is not None:  # MXFP8 through the gradient buffer: the main parameters into it (Megatron-LM train_step)
        gather.before_forward()
    losses = (forward_backward or get_forward_backward_func())(
        forward_step_func=forward_step, data_iterator=iterators, model=model,
        num_microbatches=layout.num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch or layout.micro_batch, decoder_seq_length=seq_length, forward_only=False,
    )
    return losses


def evaluate(*, forward_step, make_iterators, model, layout, seq_length: int, iters: int,
             reports: tuple[str, ...] = ("lm loss",), micro_batch: int | None = None) -> float:
    """Mean validation loss over `iters` global batches (forward only, all ranks)."""
    for chunk in model:
        chunk.eval()
    total = torch.zeros(len(reports), 2, dtype=torch.float64, device=device())
    iterators = make_iterators()
    with torch.no_grad():
        for _ in range(iters):
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators, model=model,
                num_microbatches=layout.num_microbatches, seq_length=seq_length,
                micro_batch_size=micro_batch or layout.micro_batch, decoder_seq_length=seq_length,
                forward_only=True,
            )
            total += _report_sums(losses, reports)
    for chunk in model:
        chunk.train()
    return _global_mean(total[0])


def forward_only(model, items, step: Callable, *, shape: Callable, everywhere: bool = False) -> list:
    """`step(model, item) -> (output, fn)` for each item, forward only, through Megatron's schedule.
    Returns [fn(output), ...] on the last pipeline stage; elsewhere [None, ...], or with `everywhere` the
    last stage's values (broadcast over the pipeline group). Every pipeline rank must call it with the
    same items, outside any other schedule. Without pipelining it calls the model directly.

    Items may differ in shape (`shape(item) -> (seq_length, micro_batch)` as the pipeline sends it): each
    run of equal-shape items is one schedule call of that many micro-batches (1F1B), or, with virtual
    pipeline chunks (the interleaved schedule, which takes micro-batches in groups of pp), that many
    rounded up to a multiple of pp, the last item repeated and its extra results dropped."""
    from megatron.core import parallel_state as ps

    chunks = list(model) if isinstance(model, (list, tuple, torch.nn.ModuleList)) else [model]
    if ps.get_pipeline_model_parallel_world_size() == 1:
        out = []
        for item in items:
            output, fn = step(chunks[0], item)
            out.append(fn(output))
        return out
    items = list(items)
    pp = ps.get_pipeline_model_parallel_world_size()
    results = []
    for run in _equal_shape_runs(items, shape):
        feed = run + [run[-1]] * ((-len(run) % pp) if len(chunks) > 1 else 0)

        def forward_step(data, chunk):
            output, fn = step(chunk, next(data))
            return output, (lambda o, non_loss_data=True: fn(o))

        seq, micro = shape(run[0])
        stored = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter(feed) for _ in chunks] if len(chunks) > 1 else
            iter(feed), model=chunks, num_microbatches=len(feed), seq_length=seq, micro_batch_size=micro,
            decoder_seq_length=seq, forward_only=True, collect_non_loss_data=True)
        results += list(stored[:len(run)]) if stored else [None] * len(run)
    if everywhere:
        box = [results if ps.is_pipeline_last_stage() else None]
        torch.distributed.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                                group=ps.get_pipeline_model_parallel_group())
        results = box[0]
    return results


def _equal_shape_runs(items: list, shape: Callable) -> list[list]:
    """Consecutive items of equal `shape`, as lists (one schedule call each)."""
    runs: list[list] = []
    for item in items:
        if runs and shape(runs[-1][0]) == shape(item):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _sync() -> None:
    if torch.cuda.is_available() and not mcore_cpu.is_applied():
        torch.cuda.synchronize()


def _peak_memory_gib() -> float | None:
    if not torch.cuda.is_available() or mcore_cpu.is_applied():
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated()], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return float(peak.item()) / 2**30


class GarbageCollection:
    """Python's garbage collector during training, as the plan says (`Execution.host`): Megatron-LM's
    `manual_gc` (megatron/training/training.py) disables the automatic collector, collects once at the
    start and then on every rank at the same steps (every `manual_gc_interval`; 0 = never), so no rank
    pauses alone while the others wait in a collective. Either way it measures every collection:
    `take()` returns (collections, full generation-2 collections, seconds) since the last call (metrics
    `gc_collections`, `gc_full_collections`, `gc_pause_s`: what docs/cost-model.md's GC term is measured
    from)."""

    def __init__(self, host) -> None:
        self.manual = bool(host is not None and host.manual_gc)
        self.interval = host.manual_gc_interval if self.manual else 0
        self.count, self.full, self.seconds, self._t0 = 0, 0, 0.0, None
        self._was_enabled = gc.isenabled()

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.count += 1
            self.full += 1 if info.get("generation") == 2 else 0
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def __enter__(self) -> "GarbageCollection":
        gc.callbacks.append(self._callback)
        if self.manual:
            gc.disable()
            gc.collect()
        return self

    def after_step(self, iteration: int) -> None:
        if self.manual and self.interval and iteration % self.interval == 0:
            gc.collect()

    def take(self) -> tuple[int, int, float]:
        out = (self.count, self.full, self.seconds)
        self.count, self.full, self.seconds = 0, 0, 0.0
        return out

    def __exit__(self, *exc) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        if self.manual and self._was_enabled:
            gc.enable()


def train_loop(*, model, optimizer, scheduler, stage: StagePlan, forward_step, train_iterators,
               state: LoopState, end_iteration: int, checkpointer: ckpt.Checkpointer | None,
               make_checkpoint_state: Callable[[LoopState], dict] | None, metrics=None,
               make_valid_iterators: Callable | None = None, throughput: Throughput | None = None,
               stop: StopSignal | None = None, reports: tuple[str, ...] = ("lm loss",),
               seq_length: int | None = None, micro_batch: int | None = None) -> LoopState:
    """Train from state.iteration to end_iteration. Logs every stage.log_every steps (the loss, the
    first of `reports`, and every other report averaged over the interval), validates every
    stage.eval_every steps, checkpoints every stage.checkpoint.every steps, and stops early (the caller
    saves) on SIGTERM/SIGUSR1. `seq_length` / `micro_batch`: the shape of one micro-batch as the
    pipeline schedule sends it (default: the stage's; a packed `thd` micro-batch is one row of b x s)."""
    metrics = metrics or NullMetrics()
    layout = stage.layout
    seq_length = seq_length or stage.seq_length

    def validate_now(last: bool) -> bool:
        return make_valid_iterators is not None and bool(stage.eval_every) and (
            state.iteration % stage.eval_every == 0 or last)

    gather = ParamGather(model, getattr(model[0], "config", None), optimizer)

    def validate() -> float:
        set_phase(f"validation at step {state.iteration}")
        with gather.synced():  # the forward-only schedule reads whole parameters, hooks off (Megatron-LM)
            state.last_val_loss = evaluate(forward_step=forward_step, make_iterators=make_valid_iterators, model=model,
                                           layout=layout, seq_length=seq_length, iters=eval_iters(stage),
                                           reports=reports, micro_batch=micro_batch)
        return state.last_val_loss

    host = stage.execution.host if stage.execution is not None else None
    graphs = StepGraphs(model=model, optimizer=optimizer, host=host, seq_length=seq_length,
                        micro_batch=micro_batch or layout.micro_batch)
    if gather.active:  # the run's record of what it overlaps (the plan's Execution.overlaps, as built)
        metrics.event("param_gather_overlap", aligned=gather.aligned, step=state.iteration)
    gather.hold()
    try:
        with GarbageCollection(host) as collector:
            done = _train_steps(model=model, optimizer=optimizer, scheduler=scheduler, stage=stage,
                                forward_step=forward_step, train_iterators=train_iterators, state=state,
                                end_iteration=end_iteration, checkpointer=checkpointer,
                                make_checkpoint_state=make_checkpoint_state, metrics=metrics,
                                validate_now=validate_now, validate=validate, throughput=throughput, stop=stop,
                                reports=reports, seq_length=seq_length, micro_batch=micro_batch,
                                collector=collector, graphs=graphs, gather=gather)
    except BaseException:
        gather.abandon()  # fail fast: no all-gather that the ranks which did not raise would never join
        raise
    gather.release()  # the caller's final save and whatever follows read whole parameters, no hooks
    return done


def _train_steps(*, model, optimizer, scheduler, stage: StagePlan, forward_step, train_iterators, state: LoopState,
                 end_iteration: int, checkpointer, make_checkpoint_state, metrics, validate_now, validate,
                 throughput, stop, reports, seq_length, micro_batch, collector: GarbageCollection,
                 graphs: StepGraphs, gather: ParamGather) -> LoopState:
    """The steps of `train_loop`, under its garbage-collection policy."""
    layout = stage.layout
    interval_sums = [[0.0, 0.0] for _ in reports]  # per report, [sum, count] over the job, since the last log
    # The logged step_time_s is the wall time of the interval's steps including everything the loop does
    # between them (data, checks, the previous record's writing, a manual collection): intervals tile the
    # clock. Only validation and checkpoint saves are left out (they are not training steps).
    interval_start, interval_steps, skipped = time.perf_counter(), 0, 0
    every = stage.checkpoint.every
    while state.iteration < end_iteration:
        if graphs.before_step():
            metrics.event("cuda_graphs_captured", impl=graphs.impl, step=state.iteration + 1)
        set_phase(f"train step {state.iteration + 1}")
        sums, grad_norm, ok, signum = train_step(forward_step=forward_step, iterators=train_iterators, model=model,
                                         optimizer=optimizer, scheduler=scheduler, layout=layout,
                                         seq_length=seq_length, step=state.iteration + 1,
                                         warn=lambda text: metrics.event("transient_fault", message=text),
                                         reports=reports, micro_batch=micro_batch, stop=stop,
                                         forward_backward=graphs.forward_backward, gather=gather)
        graphs.after_step()
        gather.after_step(ok)
        state.iteration += 1
        state.consumed_samples += layout.global_batch
        for total, step_sums in zip(interval_sums, sums):
            total[0] += step_sums[0]
            total[1] += step_sums[1]
        interval_steps += 1
        skipped += 0 if ok else 1
        collector.after_step(state.iteration)
        last = state.iteration == end_iteration
        if state.iteration % max(stage.log_every, 1) == 0 or last:
            set_phase(f"log step {state.iteration}")
            _sync()
            now = time.perf_counter()
            elapsed = now - interval_start
            means = _means(interval_sums)  # already summed over the job, step by step: no collective here
            state.last_loss = means[0]
            state.reports = dict(zip(reports[1:], means[1:]))
            state.losses.append(state.last_loss)
            record = _step_record(state, interval_steps, elapsed, grad_norm, optimizer, skipped, throughput)
            record.update(state.reports)
            record["gc_collections"], record["gc_full_collections"], record["gc_pause_s"] = collector.take()
            interval_start = now
            if validate_now(last):
                started = time.perf_counter()
                record["val_loss"] = validate()
                interval_start += time.perf_counter() - started  # validation is not training step time
            metrics.log(record)
            interval_sums = [[0.0, 0.0] for _ in reports]
            interval_steps, skipped = 0, 0
        elif validate_now(last):
            started = time.perf_counter()
            metrics.log({"step": state.iteration, "val_loss": validate()})
            interval_start += time.perf_counter() - started  # validation is not training step time
        if checkpointer is not None:
            checkpointer.maybe_finalize()
        if stop is not None and last and not signum:
            signum = stop.agreed()  # a signal after the last step's loss check: once per run, not per step
        if signum:  # agreed in the step's loss all-reduce (_step_sums_and_stop): no collective of its own
            state.preempted_by = signum
            break
        if checkpointer is not None and every and state.iteration % every == 0 and not last:
            set_phase(f"checkpoint save at step {state.iteration}")
            started = time.perf_counter()
            with gather.synced():  # one DP rank writes each weight: every shard gathered first
                checkpointer.save(make_checkpoint_state(state), iteration=state.iteration)
            interval_start += time.perf_counter() - started  # do not bill the save to the next interval
    return state


def _step_record(state: LoopState, steps: int, elapsed: float, grad_norm: float, optimizer, skipped: int,
                 throughput: Throughput | None) -> dict:
    step_time = elapsed / max(steps, 1)
    record = {
        "step": state.iteration,
        "loss": state.last_loss,
        "lr": float(optimizer.param_groups[0]["lr"]),
        "grad_norm": grad_norm,
        "step_time_s": step_time,
        "consumed_samples": state.consumed_samples,
        "skipped_steps": skipped,
    }
    if hasattr(optimizer, "get_loss_scale"):
        scale = optimizer.get_loss_scale()
        record["loss_scale"] = float(scale.item() if torch.is_tensor(scale) else scale)
    if throughput is not None:
        record["tokens_per_s"] = throughput.tokens_per_step / step_time
        if throughput.model_flops_per_step:
            tflops = throughput.model_flops_per_step / step_time / throughput.world_size / 1e12
            record["tflops_per_gpu"] = tflops
            if throughput.peak_flops_per_gpu:
                record["mfu"] = tflops * 1e12 / throughput.peak_flops_per_gpu
    peak = _peak_memory_gib()
    if peak is not None:
        record["peak_mem_gib"] = peak
    return record
