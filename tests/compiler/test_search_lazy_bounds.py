"""The search's lazily computed step-time bounds (`search._lazy_bounds`, `_Context.coarse_bound`) and the
all-auto MoE search: the coarse bound never exceeds a group's exact bound, the lazy search gives the
same result, rejections and counts included, as the search that computes every exact bound and sorts them
(without the prunings that tests/compiler/test_search_pruning.py compares with it),
and an all-auto MoE problem (expert and expert-TP sizes auto too) agrees with the brute-force oracle."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings

from nemoc.compiler.catalog.hardware import get_gpu
from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.search import (
    REL_TOL,
    Problem,
    _coarse_groups,
    _Context,
    _groups,
    _record_slower,
    _Recorder,
    _search_group,
    _Top,
    enumerate_all,
    search,
)
from nemoc.compiler.spec import ClusterSpec, ModelSpec, ParallelSpec
from nemoc.runtime.target import NEMOC_RUNTIME
from test_search import small_problems

GIB = 1 << 30
H100 = get_gpu("H100")
ALL_AUTO = ParallelSpec(tensor=None, pipeline=None, virtual_pipeline=None, context=None, expert=None,
                        expert_tensor=None, data=None, sequence_parallel=None, distributed_optimizer=None,
                        recompute=None, micro_batch=None)


def _eager(p: Problem, top: int = 5):
    """The search as it was before its bounds were lazy: every group's exact bound first, sorted."""
    ctx = _Context(p)
    rec = _Recorder(ctx.budget)
    best = _Top(top)
    groups = sorted(_groups(ctx, rec), key=lambda g: g[0])
    for i, (bound, _, args, sps) in enumerate(groups):
        threshold = best.threshold()
        if threshold is not None and bound > threshold[0] * (1 + REL_TOL):
            _record_slower(ctx, rec, best.n, threshold[0], groups[i:])
            break
        _search_group(ctx, rec, best, *args, sps)
    return rec.result(best)


def _deepseek_v3(nodes: int = 128) -> Problem:
    """DeepSeek-V3 (MLA, 256 experts) on nodes x 8 H100, every parallel setting auto
    (bench/cases/deepseek_v3_all_auto.nemo)."""
    return Problem(model=get_preset("deepseek_v3"), cluster=ClusterSpec(gpu="H100", nodes=nodes, gpus_per_node=8),
                   gpu=H100, fixed=ALL_AUTO, global_batch=15360, seq_length=4096, target=NEMOC_RUNTIME)


def _coarse_and_exact(p: Problem) -> list[tuple[float, float]]:
    ctx = _Context(p)
    return [(coarse, ctx.group_bound(args, sps)) for coarse, _, args, sps in _coarse_groups(ctx, _Recorder(ctx.budget))]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_the_coarse_bound_is_below_the_exact_bound_and_the_lazy_search_changes_nothing(p: Problem):
    for coarse, exact in _coarse_and_exact(p):
        assert coarse <= exact
    assert search(p, prune=False) == _eager(p)  # the prunings of test_search_pruning.py off: the same search


def test_the_lazy_search_of_an_all_auto_deepseek_v3_changes_nothing_and_skips_most_exact_bounds(monkeypatch):
    """At production scale (1,024 H100, 256 experts, ~4,000 groups): the same top list, rejections and
    candidate count as the eager search, every coarse bound at or below its exact one, and far fewer exact
    bounds computed than there are groups."""
    p = _deepseek_v3()
    pairs = _coarse_and_exact(p)
    assert len(pairs) > 2000 and all(coarse <= exact for coarse, exact in pairs)
    eager = _eager(p)
    exact = []
    group_bound = _Context.group_bound
    monkeypatch.setattr(_Context, "group_bound",
                        lambda self, args, sps: exact.append(args) or group_bound(self, args, sps))
    lazy = search(p, prune=False)
    assert lazy == eager
    assert lazy.best.layout.ep > 1  # the expert-parallel size was searched, not left at 1
    assert 0 < len(exact) < len(pairs) / 2


def test_an_all_auto_moe_search_agrees_with_the_oracle():
    """Every parallel setting auto, expert and expert-TP sizes included, on a small MoE model (4 experts,
    top-2) on 4 GPUs, from a memory that fits nothing to one that fits every layout the rules allow: the fast search and
    the brute force (~40,000 candidates, ~1 s each) find the same best plan, or both find none."""
    model = ModelSpec(name="moe", layers=2, hidden=512, heads=8, query_groups=2, ffn_hidden=1536, vocab=32000,
                      seq_length=1024, experts=4, top_k=2, moe_ffn_hidden=512)
    found = 0
    for hbm in (1.5, 1.7, 4.0):
        p = Problem(model=model, cluster=ClusterSpec(gpu="H100", nodes=1, gpus_per_node=4),
                    gpu=replace(H100, hbm_bytes=int(hbm * GIB)), fixed=ALL_AUTO, global_batch=4, seq_length=1024,
                    target=NEMOC_RUNTIME)
        fast, brute = search(p), enumerate_all(p)
        assert brute.space > 40_000
        assert any(r.reason.startswith("out of memory") for r in brute.rejections) == (hbm < 4.0)
        if brute.best is None:
            assert fast.best is None, hbm
            continue
        found += 1
        assert fast.best.layout == brute.best.layout, hbm
        assert fast.best.estimate.step_time_s == brute.best.estimate.step_time_s
    assert found == 2


def test_the_bench_case_files_check():
    """bench/bench_plan.py plans every file of bench/cases as a whole process: each parses and checks, and the
    all-auto MoE files leave the expert size to the planner."""
    from pathlib import Path

    from nemoc.runtime.cli.common import load_spec

    cases = sorted((Path(__file__).resolve().parents[2] / "bench" / "cases").glob("*.nemo"))
    assert len(cases) >= 5
    for path in cases:
        spec, _ = load_spec(str(path))
        if "all_auto" in path.name and spec.model.is_moe:
            assert spec.parallel.expert is None and spec.parallel.tensor is None, path.name
