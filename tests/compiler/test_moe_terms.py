"""The MoE layer's physical terms in the cost model: where the expert-parallel group sits (Megatron-Core's
expert rank grid, checked against Megatron-Core 0.16.1's own `RankGenerator`), and the busiest
expert-parallel rank of dropless routing (`moe_max_load`, checked against a Monte-Carlo router)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from nemoc.compiler.catalog import get_gpu
from nemoc.compiler.cost import (DEFAULT_PARAMS, _alltoall_bw, _dp_exposed, _ep_comm, _expert_params, _link_bw,
                                 expected_max_normal, layer_times, moe_max_load)
from nemoc.compiler.plan import Layout, MoeExecution
from nemoc.compiler.spec import ModelSpec

# Mixtral 8x22B (calibration rows C08 / C17: 64K tokens, TP 2, CP 8, EP 8, ETP 1, SP)
MIXTRAL_22B = ModelSpec(name="mixtral_8x22b", layers=56, hidden=6144, heads=48, query_groups=8, ffn_hidden=16384,
                        vocab=32000, seq_length=65536, experts=8, top_k=2, moe_ffn_hidden=16384)
B200 = get_gpu("B200")


def lay(**kw) -> Layout:
    base = dict(tp=2, pp=4, vp=None, cp=8, ep=8, etp=1, dp=4, micro_batch=1, global_batch=64, num_microbatches=16,
                sequence_parallel=True, distributed_optimizer=True, recompute="none")
    base.update(kw)
    return Layout(**base)


def ep_comm(layout: Layout, dispatcher: str = "alltoall") -> float:
    tokens = layout.micro_batch * MIXTRAL_22B.seq_length / layout.cp
    return _ep_comm(MIXTRAL_22B, layout, B200, tokens, 3.0, DEFAULT_PARAMS, dispatcher)


def test_the_ep_group_is_etp_apart_not_tp_apart():
    """TP 2 x CP 8 with EP 8, ETP 1: the EP group is eight consecutive ranks, one HGX B200 node (NVLink);
    with ETP 2 it is every second rank of two nodes: each rank sends 3 of its 7 shares over NVLink and 4 through
    its own NIC (an all-to-all, not a ring: the node's NICs do not add up, `_alltoall_bw`)."""
    inside = lay()
    tokens = 65536 / 8 / 2  # SP-sharded tokens each rank dispatches
    volume = 2.0 * 2.0 * tokens * 2 * 6144 * 2.0 * 7 / 8 * moe_max_load(MIXTRAL_22B, inside, tokens)
    assert ep_comm(inside) == pytest.approx(volume / (B200.nvlink_bw * DEFAULT_PARAMS.link), rel=1e-12)
    across = lay(etp=2, dp=2)  # etp x ep = 16 ranks
    ratio = B200.nvlink_bw / (7 / max(3 / B200.nvlink_bw, 4 / B200.net_bw))
    # (ETP 2 routes the tokens of 16 ranks: a smaller relative imbalance, divided out here)
    balanced = lambda layout: ep_comm(layout) / moe_max_load(MIXTRAL_22B, layout, tokens)
    assert balanced(across) == pytest.approx(balanced(inside) * ratio, rel=1e-12)
    # allgather: the ETP x EP group is etp x ep consecutive ranks
    assert ep_comm(inside, "allgather") < ep_comm(across, "allgather") / 2


def test_the_ep_group_placement_is_megatron_cores():
    """Differential: for layouts of 64 ranks on 8-GPU nodes, the EP (alltoall), ETP x EP (allgather) and
    expert-data-parallel groups of Megatron-Core 0.16.1's expert rank grid lie inside one node exactly
    when the cost model prices them over NVLink, and across nodes with as many NICs as members per node."""
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    world, node = 64, 8
    hw = dataclasses.replace(B200, nvlink_domain=node)
    nvlink = hw.nvlink_bw * DEFAULT_PARAMS.link
    checked = 0
    for tp in (1, 2, 4, 8):
        for etp in sorted({1, tp}):
            for ep in (2, 4, 8, 16):
                pp = 2
                if world % (etp * ep * pp):
                    continue
                grid = parallel_state.RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1,
                                                    order="tp-cp-ep-dp-pp", rank_offset=0)
                edp = world // (etp * ep * pp)
                for kind, size, stride in (("ep", ep, etp), ("tp-ep", ep * etp, 1), ("dp", edp, etp * ep)):
                    groups = grid.get_ranks(kind)
                    assert {len(g) for g in groups} == {size}
                    in_node = all(len({r // node for r in g}) == 1 for g in groups)
                    # across nodes: NCCL's rings run over as many NICs as the group has members per node
                    per_node = max(sum(1 for r in g if r // node == g[0] // node) for g in groups)
                    want = nvlink if in_node else min(hw.nvlink_bw, per_node * hw.net_bw) * DEFAULT_PARAMS.link
                    assert _link_bw(hw, size, stride, DEFAULT_PARAMS) == want, (tp, etp, ep, kind)
                    if kind == "ep":  # the all-to-all: the NVLink share and the own-NIC share at once
                        slowest = max((per_node - 1) / hw.nvlink_bw, (size - per_node) / hw.net_bw)
                        a2a = nvlink if in_node else (size - 1) / slowest * DEFAULT_PARAMS.link
                        assert _alltoall_bw(hw, size, stride, DEFAULT_PARAMS) == pytest.approx(a2a, rel=1e-12)
                    checked += 1
    assert checked >= 20


def test_expected_max_of_normals():
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(2) == pytest.approx(1.0 / math.sqrt(math.pi), abs=1e-6)
    assert expected_max_normal(8) == pytest.approx(1.4236, abs=1e-4)  # order-statistics tables
    assert expected_max_normal(64) > expected_max_normal(8)


def test_busiest_rank_of_a_balanced_router_matches_a_monte_carlo_router():
    """Uniform top-k routing (distinct experts per token) of N tokens over E experts on ep ranks: the
    mean over draws of the most loaded rank's routed copies, against `moe_max_load` x the mean load."""
    model = dataclasses.replace(MIXTRAL_22B, experts=16, top_k=4)
    layout = lay(tp=1, cp=1, ep=4, dp=16, sequence_parallel=False)
    per_rank = 200  # tokens each of the 4 ranks dispatches: 800 in all
    rng = random.Random(17)
    experts = list(range(model.experts))
    local = model.experts // layout.ep
    draws, total = 600, 0.0
    for _ in range(draws):
        load = [0] * layout.ep
        for _ in range(per_rank * layout.ep):
            for e in rng.sample(experts, model.top_k):
                load[e // local] += 1
        total += max(load)
    mean_load = per_rank * layout.ep * model.top_k / layout.ep
    simulated = total / draws / mean_load - 1.0  # ~ +3.3 % here
    predicted = moe_max_load(model, layout, per_rank) - 1.0
    assert predicted == pytest.approx(simulated, rel=0.1)


def test_busiest_rank_shrinks_with_the_tokens_and_needs_an_expert_group():
    """1 / sqrt(N): the excess halves for 4x the tokens; none with one EP rank (all experts local) or
    when every token visits every expert."""
    base = moe_max_load(MIXTRAL_22B, lay(), 4096) - 1.0
    assert 0.0 < base < 0.02
    assert moe_max_load(MIXTRAL_22B, lay(), 4 * 4096) - 1.0 == pytest.approx(base / 2, rel=1e-9)
    assert moe_max_load(MIXTRAL_22B, lay(ep=1, dp=32), 4096) == 1.0
    assert moe_max_load(dataclasses.replace(MIXTRAL_22B, top_k=8), lay(), 4096) == 1.0
    dense = dataclasses.replace(MIXTRAL_22B, experts=0, top_k=0, moe_ffn_hidden=None)
    assert moe_max_load(dense, lay(ep=1, dp=32), 4096) == 1.0


def test_the_busiest_rank_sets_the_expert_gemms_and_the_per_row_time_never_grows():
    """The grouped GEMMs run the busiest rank's rows: with EP the MoE GEMMs cost moe_max_load x the
    balanced ones (compute-bound), the dense GEMMs do not change; per row, the layer never gets slower
    with a larger micro batch (the search's lower bound)."""
    def times(mb: int, layout: Layout):
        return layer_times(MIXTRAL_22B, layout, B200, seq=4096, precision="bf16", attention_backend="flash",
                           micro_batch=mb, moe=MoeExecution("alltoall", True, True))

    layout = lay(cp=1, tp=1, sequence_parallel=False, dp=8)
    assert moe_max_load(MIXTRAL_22B, layout, 4096) > 1.0
    per_row = [times(mb, layout).total / mb for mb in (1, 2, 4, 8)]
    assert all(a >= b for a, b in zip(per_row, per_row[1:]))


def test_moe_gemms_and_exchange_scale_with_the_busiest_rank(monkeypatch):
    """Only the routed-expert GEMMs and the all-to-all take the busiest rank's load: a load factor r
    adds (r - 1) x the expert GEMMs (compute-bound here: linear in r) and multiplies the exchange."""
    import nemoc.compiler.cost as cost

    layout = lay(cp=1, tp=1, sequence_parallel=False, dp=8)

    def at(r: float):
        monkeypatch.setattr(cost, "moe_max_load", lambda *a: r)
        return layer_times(MIXTRAL_22B, layout, B200, seq=4096, precision="bf16", attention_backend="flash",
                           micro_batch=1, moe=MoeExecution("alltoall", True, True))

    one, half, two = at(1.0), at(1.5), at(2.0)
    assert two.gemm > one.gemm
    assert half.gemm - one.gemm == pytest.approx(0.5 * (two.gemm - one.gemm), rel=1e-9)
    assert two.ep_comm == pytest.approx(2.0 * one.ep_comm, rel=1e-12)
    assert (two.attention, two.elementwise) == (one.attention, one.elementwise)


def test_expert_gradients_reduce_over_the_expert_data_parallel_group():
    """The routed experts' gradients reduce-scatter (and their parameters all-gather) over the
    expert-data-parallel group: TP 2 x CP 8 x DP 4 / EP 8 = 8 ranks, 8 apart (one per node, InfiniBand),
    the dense ones over DP x CP = 32 ranks 2 apart (four per node); without overlap both are exposed."""
    layout = lay()
    experts = _expert_params(MIXTRAL_22B, layout)
    assert experts == pytest.approx(14 * 8 * 3 * 6144 * 16384 / 8)  # 14 layers per stage, 1 expert per GPU
    total = experts + 0.6e9
    exposed = _dp_exposed(MIXTRAL_22B, layout, B200, 0.4, 1 / 3, DEFAULT_PARAMS, total, 2, overlap=False,
                          expert_params=experts)
    link = DEFAULT_PARAMS.link
    dense = 0.6e9 * (2 + 2) * 31 / 32 / (min(B200.nvlink_bw, 4 * B200.net_bw) * link)
    expert = experts * (2 + 2) * 7 / 8 / (B200.net_bw * link)
    assert exposed == pytest.approx(dense + expert, rel=1e-12)
    # priced as dense parameters the same bytes would cross 4 NICs per node: far less
    assert _dp_exposed(MIXTRAL_22B, layout, B200, 0.4, 1 / 3, DEFAULT_PARAMS, total, 2, overlap=False) < exposed / 3
    dense_model = dataclasses.replace(MIXTRAL_22B, experts=0, top_k=0, moe_ffn_hidden=None)
    assert _expert_params(dense_model, lay(ep=1, etp=2)) == 0.0
