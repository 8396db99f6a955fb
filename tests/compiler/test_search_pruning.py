"""The search's prunings (6) to (9) (`search.search(prune=True)`, the default): each skips work whose
outcome cannot change the top list, so the search with them chooses exactly what the search without them
chooses. Checked here on a few hundred random dense and MoE problems (small and medium: up to 64 GPUs, 16
layers, 16 experts): the same ranked candidates (layouts, memory breakdowns, step-time estimates), the same
number of candidates covered, and, where nothing fits, the same closest overflow (the "does not fit"
diagnostic's layout). Their bounds are checked against the exact models on random layouts: the model-states
memory bound (`memory.states_lower_bound`) never exceeds `memory.estimate`, and the bound of a family of
groups that differ only in VP (`cost.step_time_lower_bound(any_vp=True)`) never exceeds any member's own
bound, which tests/compiler/test_search.py checks against `cost.estimate`."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from nemoc.compiler import memory
from nemoc.compiler.catalog.hardware import get_gpu
from nemoc.compiler.search import (
    MB_SLOWER_REASON,
    STATES_REASON,
    Problem,
    _Context,
    _Recorder,
    _families,
    _groups,
    evaluate_memory,
    evaluate_time,
    search,
)
from nemoc.compiler.spec import ClusterSpec, ModelSpec, ParallelSpec
from nemoc.runtime.target import NEMOC_RUNTIME

GIB = 1 << 30
H100 = get_gpu("H100")


def random_problem(rng: random.Random, medium: bool) -> Problem:
    """A dense or MoE problem with most parallel sizes auto: small (<= 8 GPUs, <= 4 layers) or medium (<= 64
    GPUs, <= 16 layers, <= 16 experts), with the recipe settings the search's domains branch on."""
    heads = rng.choice([4, 8, 16] if medium else [2, 4, 8])
    groups = rng.choice([g for g in (1, 2, heads) if heads % g == 0])
    experts = rng.choice([0, 0, 4, 8, 16] if medium else [0, 0, 2, 4])
    layers = rng.randint(2, 16) if medium else rng.randint(1, 4)
    dense = rng.choice([(1, 0), (1, 0), (2, 0), (1, 1)]) if experts and layers > 1 else (1, 0)
    model = ModelSpec(
        name="rand", layers=layers, hidden=heads * 64, heads=heads, query_groups=groups,
        ffn_hidden=rng.choice([512, 1024, 2048] if medium else [256, 512, 768]),
        vocab=rng.choice([8000, 32000, 50000]), seq_length=2048, experts=experts,
        top_k=min(2, experts) if experts else 0, moe_ffn_hidden=256 if experts else None,
        moe_layer_freq=dense[0], moe_first_dense_layers=dense[1])
    gpn = rng.choice([2, 4, 8]) if medium else rng.choice([1, 2, 4, 8])
    nodes = rng.choice([1, 2, 4, 8]) if medium else 1
    gib = rng.uniform(1.5, 12.0) if medium else rng.uniform(1.2, 3.0)
    fixed = ParallelSpec(
        tensor=rng.choice([None, None, None, 1, 2]), pipeline=rng.choice([None, None, None, 1]),
        virtual_pipeline=rng.choice([None, None, None, 1]) if medium else None,
        context=rng.choice([None, 1, 1]), expert=rng.choice([None, None, 1]) if experts else 1,
        expert_tensor=None, data=None, sequence_parallel=rng.choice([None, None, False]),
        distributed_optimizer=rng.choice([None, None, True, False]), recompute=rng.choice([None, None, "selective"]),
        micro_batch=rng.choice([None, None, None, 1]), tp_comm_overlap=rng.choice([False, False, True]),
        grad_reduce_in_fp32=rng.choice([True, False]), overlap_param_gather=rng.choice([False, True]),
        defer_embedding_wgrad_compute=rng.choice([False, False, True]))
    return Problem(model=model, cluster=ClusterSpec(gpu="H100", nodes=nodes, gpus_per_node=gpn),
                   gpu=replace(H100, hbm_bytes=int(gib * GIB)), fixed=fixed,
                   global_batch=rng.choice([None, 8, 16, 64] if medium else [None, 4, 8]),
                   seq_length=rng.choice([1024, 2048, 4096] if medium else [512, 1024, 2048]),
                   headroom=rng.choice([0.0, 0.1]), kernels=rng.choice(["te", "local"]),
                   optimizer=rng.choice(["adam", "adam", "sgd"]), precision=rng.choice(["bf16", "bf16", "fp8"]),
                   attention_backend=rng.choice(["auto", "flash"]), target=NEMOC_RUNTIME)


def _sampled_groups(seed: int, *, problems: int, groups: int):
    """(problem, its search context, group sizes (tp, pp, vp, cp, ep, etp, dp, do), SP values) of the first
    `groups` layout groups of `problems` random problems, small and medium alternately."""
    rng = random.Random(seed)
    for i in range(problems):
        p = random_problem(rng, medium=i % 2 == 0)
        ctx = _Context(p)
        for _, _, sizes, sps in _groups(ctx, _Recorder(ctx.budget), bounds=False)[:groups]:
            yield p, ctx, sizes, sps


def assert_same_choice(p: Problem) -> tuple:
    """The search with and without its prunings: the same top list and candidate count, each candidate's
    figures those of the exact models; where nothing fits, the same closest overflow. Returns both results."""
    pruned, plain = search(p), search(p, prune=False)
    assert pruned.ranked == plain.ranked, p
    assert pruned.space == plain.space, p
    for c in pruned.ranked:  # the search's memos (layer times of the estimates and bounds) change no figure
        assert c.estimate == evaluate_time(p, c.layout) and c.memory == evaluate_memory(p, c.layout)
    if not plain.ranked:
        assert pruned.closest == plain.closest, p
    return pruned, plain


@pytest.mark.parametrize("seed", range(4))
def test_pruning_changes_no_chosen_plan_on_random_problems(seed: int):
    """A few hundred random problems in all (4 x 60 small, 4 x 15 medium): what the prunings skip never
    changes the ranked list; and they do skip work somewhere (a test that cannot fail is no test)."""
    rng = random.Random(seed)
    evaluated = plain_evaluated = pruned_reasons = 0
    for i in range(75):
        pruned, plain = assert_same_choice(random_problem(rng, medium=i >= 60))
        evaluated += pruned.evaluated
        plain_evaluated += plain.evaluated
        pruned_reasons += sum(r.count for r in pruned.rejections if r.reason in (STATES_REASON, MB_SLOWER_REASON))
    assert evaluated < plain_evaluated and pruned_reasons > 0


def test_pruning_changes_no_chosen_plan_at_production_scale():
    """The bench cases' sizes: Qwen3-235B-A22B (128 experts) on 256 H100 and Llama 3.1 405B on 1,024 H100,
    every parallel setting auto: the same top list and candidate count, with far fewer memory estimates."""
    from nemoc.compiler.catalog.models import get_preset

    auto = ParallelSpec(tensor=None, pipeline=None, virtual_pipeline=None, context=None, expert=None,
                        expert_tensor=None, data=None, sequence_parallel=None, distributed_optimizer=None,
                        recompute=None, micro_batch=None)
    for name, nodes, batch, seq in (("qwen3_235b_a22b", 32, 1024, 4096), ("llama31_405b", 128, 1024, 8192)):
        p = Problem(model=get_preset(name), cluster=ClusterSpec(gpu="H100", nodes=nodes, gpus_per_node=8),
                    gpu=H100, fixed=auto, global_batch=batch, seq_length=seq)
        pruned, plain = assert_same_choice(p)
        assert pruned.best is not None and pruned.evaluated < 0.7 * plain.evaluated, (name, pruned.evaluated)


@pytest.mark.parametrize("seed", range(3))
def test_the_model_states_bound_is_below_the_exact_memory(seed: int):
    """`memory.states_lower_bound` <= `memory.estimate` for every micro batch, recompute and SP value of
    random layouts (each problem's groups at their smallest and largest micro batch, every recompute level):
    the bound leaves out only terms that are >= 0, so it may never exceed the exact total."""
    checked = 0
    for p, ctx, (tp, pp, vp, cp, ep, etp, dp, do), sps in _sampled_groups(100 + seed, problems=80, groups=40):
        mbs = ctx.micro_batches(dp)
        for mb in {mbs[0], mbs[-1]}:
            for sp in sps:
                for rc in ctx.recomputes(pp, vp):
                    layout = ctx.layout(tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rc)
                    bound = ctx.states_bound(layout)
                    exact = evaluate_memory(p, layout)
                    assert bound[0] <= exact.total, (layout, bound, exact)
                    # the weights, gradients and optimizer it counts are the exact breakdown's stage's own
                    # where that stage is the one it took (never more than the exact total of any stage)
                    assert bound[1] + bound[2] + bound[3] <= exact.total
                    checked += 1
    assert checked > 300


def test_the_states_bound_keeps_the_fp8_weights_of_fp8_parameters():
    """Under fp8_param_gather the exact model takes only the trainable linear weights' second byte off the
    weights (frozen models, embedding and output layer keep theirs): the bound may take off no more, so it
    stays within the exact total and its weights stay well above zero (a PPO stage keeps three frozen
    models beside the policy)."""
    from nemoc.compiler.catalog.models import get_preset

    fixed = ParallelSpec(tensor=1, pipeline=1, virtual_pipeline=None, context=1, expert=1, data=None,
                         sequence_parallel=False, distributed_optimizer=True, recompute="full", micro_batch=1,
                         fp8_param_gather=True)
    for kind in ("pretrain", "ppo"):
        p = Problem(model=get_preset("llama31_8b"), cluster=ClusterSpec(gpu="H100", nodes=8, gpus_per_node=8),
                    gpu=H100, fixed=fixed, global_batch=64, seq_length=4096, precision="fp8",
                    fp8_recipe="tensorwise", stage_kind=kind)
        ctx = _Context(p)
        layout = ctx.layout(1, 1, None, 1, 1, 1, 64, 1, False, True, ("full", None))
        bound, exact = ctx.states_bound(layout), evaluate_memory(p, layout)
        assert bound[0] <= exact.total, (kind, bound, exact)
        assert bound[1] >= 0.75 * exact.weights, (kind, bound[1] / GIB, exact.weights / GIB)


@pytest.mark.parametrize("seed", range(3))
def test_the_family_bound_is_below_every_member_bound(seed: int):
    """`cost.step_time_lower_bound(any_vp=True)` (a family of groups that differ only in VP and DO) never
    exceeds a member's coarse or exact bound, so the heap yields the groups in the order of their exact
    bounds; and the pruned search's step times are the exact model's (`evaluate_time`)."""
    rng = random.Random(200 + seed)
    families = 0
    for i in range(60):
        p = random_problem(rng, medium=i % 2 == 0)
        ctx = _Context(p, prune=True)
        for family, _, _, members, _ in _families(ctx, _Recorder(ctx.budget)):
            for _, args, sps in members:
                assert family <= ctx.coarse_bound(args, sps) <= ctx.group_bound(args, sps)
            families += 1
        for c in search(p).ranked:
            assert c.estimate == evaluate_time(p, c.layout)
            assert c.memory == evaluate_memory(p, c.layout)
    assert families > 20


def test_states_bound_counts_the_first_or_last_stage():
    """The bound is the model states of the heavier of the first and the last stage: with a large vocabulary
    and pp = 2, the two stages differ (embedding vs output layer) and the bound is at least either's."""
    from nemoc.compiler.plan import Layout

    model = ModelSpec(name="m", layers=4, hidden=512, heads=8, query_groups=8, ffn_hidden=1024, vocab=128000,
                      seq_length=2048)
    layout = Layout(tp=1, pp=2, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=8, num_microbatches=8,
                    sequence_parallel=False, distributed_optimizer=False, recompute="none", recompute_layers=None)
    bound = memory.states_lower_bound(model, layout)
    stages = memory.pipeline_stages(model, layout)
    for stage in stages:
        states = stage.weights + stage.gradients + stage.optimizer
        assert bound[0] >= states + stage.parts["cuda_context"] + stage.parts["nccl"] - 2
    assert bound[0] <= max(s.total for s in stages)


@pytest.mark.parametrize("seed", range(2))
def test_the_micro_batch_bound_is_below_every_recompute_level_and_sp_value(seed: int):
    """Pruning (9) skips one micro batch of a group with `cost.step_time_lower_bound` over (mb, mb) at the
    group's preferred SP value: never above the exact step time of any recompute level or SP value of that
    micro batch (the range bound's argument with the range one micro batch wide; recompute only adds time,
    sequence parallelism never does)."""
    checked = 0
    for p, ctx, (tp, pp, vp, cp, ep, etp, dp, do), sps in _sampled_groups(400 + seed, problems=40, groups=30):
        for mb in ctx.micro_batches(dp)[:3]:
            bound = ctx.bound(ctx.layout(tp, pp, vp, cp, ep, etp, dp, mb, sps[0], do, ("none", None)), (mb, mb))
            for sp in sps:
                for rc in ctx.recomputes(pp, vp):
                    exact = evaluate_time(p, ctx.layout(tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rc)).step_time_s
                    assert bound <= exact * (1 + 1e-12), (tp, pp, vp, cp, ep, etp, dp, mb, sp, rc, bound, exact)
                    checked += 1
    assert checked > 300
