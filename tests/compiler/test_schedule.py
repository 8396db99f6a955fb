"""The pipeline schedule simulation (compiler/schedule.py): Megatron-Core's op order, the dependencies,
and the bubble the cost model charges."""

from __future__ import annotations

import glob

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemoc.compiler.schedule import (
    BACKWARD_OP,
    FORWARD_OP,
    MICROBATCH_TERMS,
    pipeline_memory,
    rank_order,
    schedule_table,
    simulate,
    stage_schedule,
    stage_times,
)
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

EPS = 1e-9


def _check_dependencies(s, t_transfer=0.0):
    """Every micro batch's F precedes its B on each virtual stage; F of stage s starts after F of s - 1
    ended (plus a transfer across ranks), B of s after B of s + 1; one op at a time per rank."""
    vstages = s.pp * s.vp
    end = {(o.kind, o.microbatch, o.chunk * s.pp + o.rank): o for o in s.ops}
    assert len(end) == len(s.ops)
    for (kind, mb, stage), op in end.items():
        hop = t_transfer if s.pp > 1 else 0.0
        if kind == FORWARD_OP and stage > 0:
            assert op.start >= end[(FORWARD_OP, mb, stage - 1)].end + hop - EPS
        if kind == BACKWARD_OP:
            assert op.start >= end[(FORWARD_OP, mb, stage)].end - EPS
            if stage < vstages - 1:
                assert op.start >= end[(BACKWARD_OP, mb, stage + 1)].end + hop - EPS
    for r in range(s.pp):
        ops = s.rank_ops(r)
        assert all(a.end <= b.start + EPS for a, b in zip(ops, ops[1:]))


@pytest.mark.parametrize("pp,m,vp", [(1, 4, 1), (2, 4, 1), (4, 8, 1), (4, 4, 1), (3, 7, 1), (8, 3, 1),
                                     (2, 4, 2), (4, 8, 2), (4, 12, 3), (8, 16, 4)])
def test_bubble_fraction_equals_the_cost_models_formula(pp, m, vp):
    s = simulate(pp, m, 1.0, 2.0, vp)
    want = (pp - 1) / (m * vp + pp - 1)
    for r in range(pp):
        assert s.bubble_fraction(r) == pytest.approx(want, abs=1e-9)
    # the cost model: m micro batches on a stage + (pp - 1) / vp micro-batch times of bubble
    assert s.makespan == pytest.approx(m * 3.0 + (pp - 1) * 3.0 / vp)
    _check_dependencies(s)


@settings(max_examples=60, deadline=None)
@given(pp=st.integers(1, 6), groups=st.integers(1, 4), vp=st.integers(1, 4), extra=st.integers(0, 5),
       tf=st.floats(0.1, 3.0), tb=st.floats(0.0, 6.0), hop=st.floats(0.0, 0.5))
def test_any_schedule_respects_dependencies(pp, groups, vp, extra, tf, tb, hop):
    if pp == 1:
        vp = 1
    m = groups * pp + (extra if vp == 1 else 0)
    s = simulate(pp, m, tf, tb, vp, hop)
    assert len(s.ops) == pp * m * vp * (2 if tb > 0 else 1)
    assert {(o.microbatch, o.chunk, o.kind) for o in s.ops if o.rank == 0} == {
        (mb, c, k) for mb in range(m) for c in range(vp) for k in ((FORWARD_OP, BACKWARD_OP) if tb > 0 else (FORWARD_OP,))}
    _check_dependencies(s, hop)
    assert s.makespan >= m * (tf + tb) - EPS  # no rank works faster than its own ops
    assert all(0.0 <= s.bubble_fraction(r) < 1.0 for r in range(pp))


def test_megatron_op_order():
    # schedules.py's docstring example: PP2 N3M5 with VP2 (micro-batch group 3 there; ours is pp)
    assert schedule_table(5, 2, 3) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (3, 0), (4, 0), (3, 1), (4, 1)]
    # 1F1B on the first of 4 ranks, 6 micro batches: 3 warm-up forwards, then F/B pairs, then the cool-down
    order = rank_order(0, 4, 6)
    assert [f"{k}{mb}" for k, mb, _ in order] == ["F0", "F1", "F2", "F3", "B0", "F4", "B1", "F5", "B2", "B3", "B4", "B5"]
    # the last rank starts 1F1B at once
    assert [f"{k}{mb}" for k, mb, _ in rank_order(3, 4, 6)][:4] == ["F0", "B0", "F1", "B1"]
    # interleaved: 2 (pp - rank - 1) + (vp - 1) pp warm-up forwards; backwards start with the last chunk
    order = rank_order(0, 2, 4, vp=2)
    warmup = 2 * (2 - 0 - 1) + (2 - 1) * 2
    assert all(k == FORWARD_OP for k, _, _ in order[:warmup]) and order[warmup + 1] == (BACKWARD_OP, 0, 1)


def test_transfers_and_unequal_stages_lengthen_the_step():
    base = simulate(4, 8, 1.0, 2.0)
    slow_last = simulate(4, 8, [1.0, 1.0, 1.0, 1.5], [2.0, 2.0, 2.0, 3.0])
    hops = simulate(4, 8, 1.0, 2.0, t_transfer=0.1)
    assert slow_last.makespan > base.makespan and hops.makespan > base.makespan
    assert len(hops.transfers) == 2 * 8 * 3  # every F and B crosses each of the 3 boundaries
    _check_dependencies(hops, 0.1)


def test_forward_only_and_bad_input():
    s = simulate(3, 4, 1.0, 0.0)
    assert all(o.kind == FORWARD_OP for o in s.ops) and s.makespan == pytest.approx(4 + 2)
    with pytest.raises(ValueError, match="micro batches >= pp"):
        simulate(4, 2, 1.0, 2.0, vp=2)
    with pytest.raises(ValueError, match="t_forward"):
        simulate(2, 4, [1.0], 2.0)


def _example_plans():
    from nemoc.compiler.lower import load_experiment
    from nemoc.compiler.planner import plan_experiment

    for path in sorted(glob.glob("examples/*.nemo")):
        spec, _ = load_experiment(path)
        yield path, plan_experiment(spec, target=NEMOC_RUNTIME).plan


def test_examples_schedule_and_pipeline_memory_agree_with_the_plan():
    """Every example stage: the most-loaded pipeline stage's memory is the plan's memory; the simulated
    step (with transfers and the slowest stage) is within 5 % of the cost model's pipeline terms."""
    seen_interleaved = False
    for path, plan in _example_plans():
        for sp in plan.stages:
            mems = pipeline_memory(plan, sp)
            assert len(mems) == sp.layout.pp and max(m.total for m in mems) == sp.memory.total, (path, sp.name)
            s = stage_schedule(sp)
            if s is None:
                assert sp.kind == "export"
                continue
            seen_interleaved |= s.vp > 1
            t = stage_times(sp)
            p = sp.estimate.parts
            pipeline = sum(p.get(k, 0.0) for k in MICROBATCH_TERMS + ("pp_imbalance", "pp_bubble", "pp_p2p")) / t.passes
            assert s.makespan == pytest.approx(pipeline, rel=0.05), (path, sp.name)
    assert seen_interleaved


def test_block_recompute_replays_only_its_share_of_the_forward():
    """recompute = full with recompute_layers = n: the backward of a micro batch carries the forward of
    min(n, chunk) / chunk of the layers again (all of them without recompute_layers)."""
    import dataclasses

    from nemoc.compiler.flops import recomputed_fraction

    for _, plan in _example_plans():
        sp = next((s for s in plan.stages if s.kind == "pretrain"
                   and s.execution.pipeline.per_stage // (s.layout.vp or 1) >= 2), None)
        if sp is not None:
            break
    lay = sp.layout
    per_stage = sp.execution.pipeline.per_stage
    shares = {}
    for n in (None, 1):
        block = dataclasses.replace(sp, layout=dataclasses.replace(lay, recompute="full", recompute_layers=n))
        t = stage_times(block)
        shares[n] = t.forward[0] / (t.forward[0] + t.backward[0])
    frac = recomputed_fraction(per_stage * lay.pp, lay.pp, lay.vp, "full", 1)
    assert 0 < frac < 1
    assert shares[None] == pytest.approx(1 / 4)
    assert shares[1] == pytest.approx(1 / (3 + frac))
