"""The pipeline schedule of one step, simulated: when each rank runs each micro batch's forward and
backward, when activations travel between ranks, and where the bubbles are.

Input:  pipeline size `pp`, virtual stages per rank `vp` (None or 1: plain 1F1B), micro batches `m`,
per-rank forward and backward seconds of one micro batch (all of the rank's model chunks together),
and the seconds of one pipeline transfer; or a `StagePlan` (`stage_schedule`), whose estimate
carries those times.
Output: `Schedule`: every compute op (rank, F/B, micro batch, model chunk, start, end), every
transfer, the makespan, and per rank its idle intervals (bubbles) and bubble fraction.
Invariants: pure, no torch. The per-rank op order is Megatron-Core 0.16's
(`pipeline_parallel/schedules.py`): 1F1B (`forward_backward_pipelining_without_interleaving`): pp -
rank - 1 warm-up forwards, then one forward / one backward, then the cool-down backwards;
interleaved (`forward_backward_pipelining_with_interleaving`, `get_schedule_table` with
`microbatch_group_size_per_vp_stage = pp`): 2 (pp - rank - 1) + (vp - 1) pp warm-up forwards over
the schedule table, backwards over the same table with the model chunks reversed. Each op starts as
soon as its rank is free and its input has arrived: a forward of virtual stage s needs the forward
of s - 1 (plus a transfer when that is another rank), a backward of s the backward of s + 1 (the last
virtual stage: its own forward). With equal stages and free transfers the bubble fraction is the
cost model's (pp - 1) / (m vp + pp - 1) (Narayanan et al. 2021, Sec. 2.2; `cost.estimate`'s
`pp_bubble` = (pp - 1) / vp micro-batch times).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FORWARD_OP, BACKWARD_OP = "F", "B"


@dataclass(frozen=True, slots=True)
class Op:
    """One compute op on one rank: `kind` F or B of micro batch `microbatch` in model chunk `chunk`."""

    rank: int
    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Transfer:
    """An activation (after F) or gradient (after B) sent from rank `src` to rank `dst`."""

    src: int
    dst: int
    kind: str
    microbatch: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Schedule:
    pp: int
    vp: int
    microbatches: int
    ops: tuple[Op, ...]
    transfers: tuple[Transfer, ...]
    makespan: float

    def rank_ops(self, rank: int) -> tuple[Op, ...]:
        return tuple(sorted((o for o in self.ops if o.rank == rank), key=lambda o: o.start))

    def bubbles(self, rank: int) -> tuple[tuple[float, float], ...]:
        """Idle intervals of `rank` within [0, makespan]."""
        out, t = [], 0.0
        for op in self.rank_ops(rank):
            if op.start > t + 1e-12 * max(1.0, self.makespan):
                out.append((t, op.start))
            t = max(t, op.end)
        if self.makespan > t + 1e-12 * max(1.0, self.makespan):
            out.append((t, self.makespan))
        return tuple(out)

    def bubble_fraction(self, rank: int) -> float:
        if not self.makespan:
            return 0.0
        return sum(b - a for a, b in self.bubbles(rank)) / self.makespan


def _per_rank(value: float | Sequence[float], pp: int, what: str) -> tuple[float, ...]:
    values = (float(value),) * pp if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) != pp or any(v < 0 for v in values):
        raise ValueError(f"{what} must be one non-negative time or {pp} of them, got {value!r}")
    return values


def schedule_table(m: int, vp: int, group: int) -> list[tuple[int, int]]:
    """(micro batch, model chunk) of each virtual micro batch, in forward order (Megatron-Core's
    `get_schedule_table`): groups of `group` micro batches run through every chunk in turn; the last
    group takes whatever micro batches remain."""
    table: list[tuple[int, int]] = []
    for first in range(0, m, group):
        last = m if first + group >= m else first + group
        table.extend((mb, chunk) for chunk in range(vp) for mb in range(first, last))
    return table


def rank_order(rank: int, pp: int, m: int, vp: int = 1, forward_only: bool = False) -> list[tuple[str, int, int]]:
    """The (kind, micro batch, chunk) ops of `rank` in the order Megatron-Core issues them."""
    if vp == 1:
        forwards = [(FORWARD_OP, mb, 0) for mb in range(m)]
        backwards = [(BACKWARD_OP, mb, 0) for mb in range(m)]
        warmup = m if forward_only else min(pp - rank - 1, m)
    else:
        table = schedule_table(m, vp, pp)
        forwards = [(FORWARD_OP, mb, chunk) for mb, chunk in table]
        backwards = [(BACKWARD_OP, mb, vp - 1 - chunk) for mb, chunk in table]
        warmup = len(table) if forward_only else min(2 * (pp - rank - 1) + (vp - 1) * pp, len(table))
    if forward_only:
        return forwards
    order = forwards[:warmup]
    for k in range(len(forwards) - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[len(forwards) - warmup:]


def simulate(pp: int, microbatches: int, t_forward: float | Sequence[float], t_backward: float | Sequence[float],
             vp: int | None = None, t_transfer: float = 0.0) -> Schedule:
    """Simulate one step (see module docstring). `t_forward` / `t_backward`: seconds of one micro
    batch on a rank (all its chunks; one per rank or one for all); `t_backward = 0`: a forward-only
    step (evaluation). Interleaving needs m >= pp (Megatron-Core asserts the same)."""
    vp = vp or 1
    if pp < 1 or microbatches < 1 or vp < 1:
        raise ValueError(f"pp ({pp}), micro batches ({microbatches}) and vp ({vp}) must be >= 1")
    if vp > 1 and (pp == 1 or microbatches < pp):
        raise ValueError(f"an interleaved schedule needs pp > 1 and micro batches >= pp, got pp {pp}, "
                         f"{microbatches} micro batches")
    fwd = _per_rank(t_forward, pp, "t_forward")
    bwd = _per_rank(t_backward, pp, "t_backward")
    forward_only = not any(bwd)
    orders = [rank_order(r, pp, microbatches, vp, forward_only) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}  # (kind, micro batch, virtual stage) -> end
    ops: list[Op] = []
    transfers: list[Transfer] = []
    free = [0.0] * pp
    nxt = [0] * pp
    last_stage = pp * vp - 1
    while any(nxt[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while nxt[r] < len(orders[r]):
                kind, mb, chunk = orders[r][nxt[r]]
                stage = chunk * pp + r
                dep = _dependency(kind, mb, stage, last_stage)
                if dep is not None and dep not in done:
                    break
                ready = 0.0
                if dep is not None:
                    ready = done[dep] + (t_transfer if dep[2] % pp != r else 0.0)
                start = max(free[r], ready)
                end = start + (fwd[r] if kind == FORWARD_OP else bwd[r]) / vp
                done[(kind, mb, stage)] = end
                ops.append(Op(r, kind, mb, chunk, start, end))
                free[r] = end
                nxt[r] += 1
                progressed = True
                dst = (stage + (1 if kind == FORWARD_OP else -1)) % pp
                sends = stage < last_stage if kind == FORWARD_OP else (stage > 0 and not forward_only)
                if sends and pp > 1:
                    transfers.append(Transfer(r, dst, kind, mb, end, end + t_transfer))
        if not progressed:  # the op orders above never deadlock; this guards a future edit
            raise RuntimeError(f"pipeline schedule deadlock (pp {pp}, vp {vp}, m {microbatches})")
    makespan = max((o.end for o in ops), default=0.0)
    return Schedule(pp, vp, microbatches, tuple(ops), tuple(transfers), makespan)


def _dependency(kind: str, mb: int, stage: int, last_stage: int) -> tuple[str, int, int] | None:
    if kind == FORWARD_OP:
        return (FORWARD_OP, mb, stage - 1) if stage > 0 else None
    return (BACKWARD_OP, mb, stage + 1) if stage < last_stage else (FORWARD_OP, mb, stage)


# ------------------------------------------------------------------------------------ from a plan


@dataclass(frozen=True, slots=True)
class StageTimes:
    """What `stage_schedule` simulates, derived from a stage's estimate (seconds)."""

    forward: tuple[float, ...]  # per rank, one micro batch, all chunks
    backward: tuple[float, ...]
    transfer: float
    passes: float  # how many times a step runs this schedule (PPO: ppo_epochs)


MICROBATCH_TERMS = ("compute", "elementwise", "tp_comm", "cp_comm", "ep_comm")


def stage_times(stage) -> StageTimes | None:
    """Per-rank micro-batch times of a `StagePlan`'s main model pass, from its estimate: the
    mean-stage micro batch is the sum of the per-layer terms (`MICROBATCH_TERMS`) over count x m
    micro batches; the slowest stage adds `pp_imbalance` / (count x m) and is drawn as the last rank
    (it carries the output layer and the loss); forward is 1 / (1 + backward ratio) of it (full
    recompute runs the forward again inside the backward); a transfer is `pp_p2p` over the critical
    transfers (`cost.p2p_transfers`). None for a stage without a model pass (export)."""
    from nemoc.compiler.cost import p2p_transfers
    from nemoc.compiler.flops import stage_work

    work = stage_work(stage.kind, stage.params, stage.peft)
    if not work.passes or not stage.estimate.step_time_s:
        return None
    main = work.passes[0]
    lay, parts = stage.layout, stage.estimate.parts
    runs = main.count * lay.num_microbatches
    mean = sum(parts.get(k, 0.0) for k in MICROBATCH_TERMS) / runs
    per_rank = [mean] * lay.pp
    per_rank[-1] += parts.get("pp_imbalance", 0.0) / runs
    share = 1.0 / (1.0 + main.backward + (_replayed(stage) if main.backward else 0.0))
    transfer = 0.0
    if lay.pp > 1:
        transfer = parts.get("pp_p2p", 0.0) / main.count / p2p_transfers(lay.pp, lay.vp or 1, lay.num_microbatches)
    return StageTimes(tuple(t * share for t in per_rank), tuple(t * (1.0 - share) for t in per_rank),
                      transfer, main.count)


def _replayed(stage) -> float:
    """Share of a stage's layers whose forward runs again in the backward: all with full recompute,
    min(n, chunk) / chunk with block recompute of n layers per model chunk (`flops.recomputed_fraction`
    over the stage's own split), none otherwise."""
    from nemoc.compiler.flops import recomputed_fraction

    lay = stage.layout
    if lay.recompute != "full" or lay.recompute_layers is None or stage.execution is None:
        return 1.0 if lay.recompute == "full" else 0.0
    per_stage = stage.execution.pipeline.per_stage
    return recomputed_fraction(per_stage * lay.pp, lay.pp, lay.vp, lay.recompute, lay.recompute_layers)


def stage_schedule(stage) -> Schedule | None:
    """The simulated pipeline schedule of one step of a `StagePlan` (its main model pass)."""
    times = stage_times(stage)
    if times is None:
        return None
    lay = stage.layout
    return simulate(lay.pp, lay.num_microbatches, times.forward, times.backward, lay.vp, times.transfer)


def pipeline_memory(plan, stage) -> tuple:
    """Per-GPU `MemoryBreakdown` of every pipeline stage of a `StagePlan` of `plan`, priced as the
    planner priced the stage (`search.pipeline_memory` on the same problem); the largest total is the
    stage's `memory`. Empty for a stage whose GPU is not in the catalog."""
    from nemoc.compiler.catalog.hardware import get_gpu
    from nemoc.compiler.search import Problem, pipeline_memory as search_pipeline_memory
    from nemoc.compiler.spec import ParallelSpec

    gpu = get_gpu(plan.cluster.gpu)
    if gpu is None:
        return ()
    problem = Problem(model=plan.model, cluster=plan.cluster, gpu=gpu, fixed=ParallelSpec(),
                      global_batch=stage.layout.global_batch, seq_length=stage.seq_length,
                      precision=stage.execution.precision, fp8_recipe=stage.execution.fp8_recipe,
                      attention_backend=stage.execution.attention,
                      stage_kind=stage.kind, peft=stage.peft, params=stage.params, kernels=stage.execution.kernels,
                      optimizer=stage.optimizer.name, parents=tuple(plan.stage(name).kind for name in stage.after))
    return search_pipeline_memory(problem, stage.layout)
