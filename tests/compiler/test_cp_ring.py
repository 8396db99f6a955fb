"""The context-parallel ring as Transformer Engine runs it (`AttnFuncWithCPAndKVP2P`, cp_comm_type p2p,
16-bit dot-product attention; TE 2.1 `pytorch/attention.py`, 2.3-2.4 `dot_product_attention/
context_parallel.py`): the memory-bound corrections per rank and step, the backward ring's first and
last transfers, the slowest rank (docs/cost-model.md "CP"; docs/calibration.md "Issue 17, CP revision")."""

from __future__ import annotations

import dataclasses
import random

import pytest

from nemoc.compiler.catalog import get_gpu
from nemoc.compiler.cost import DEFAULT_PARAMS, _cp_comm, cp_ring_bytes, cp_ring_ranks
from nemoc.compiler.plan import Layout
from nemoc.compiler.spec import ModelSpec

# Mixtral 8x22B (calibration rows C08 / C17): 48 query heads, 8 KV groups, head dim 128
MIXTRAL_22B = ModelSpec(name="mixtral_8x22b", layers=56, hidden=6144, heads=48, query_groups=8, ffn_hidden=16384,
                        vocab=32000, seq_length=65536, experts=8, top_k=2, moe_ffn_hidden=16384)
MHA = dataclasses.replace(MIXTRAL_22B, name="mha", query_groups=48, experts=0, top_k=0, moe_ffn_hidden=None)


def ring(cp: int, tp: int = 2, **kw) -> Layout:
    base = dict(tp=tp, pp=1, vp=None, cp=cp, ep=1, etp=1, dp=1, micro_batch=1, global_batch=8, num_microbatches=8,
                sequence_parallel=True, distributed_optimizer=True, recompute="none")
    base.update(kw)
    return Layout(**base)


def test_cp2_bytes_are_te_s_branches_counted_by_hand() -> None:
    """CP 2, read off TE's code. Forward: `torch.cat` of K and V into the ring buffer (2 + 2 B per kv
    element); step 0 writes the output from its partial (4 B per query element); step 1 adds its
    partial into all rows on rank 1 (i <= rank: 6 B) and into the second half on rank 0 (3 B).
    Backward: `copy_(kv)` into the ring buffer (4 B); rank 0: dq[1].copy_ (2 B), then dq[0].copy_ +
    dq[1].add_ (5 B); dkv.copy_ (4 B), then the local block's dkv[0].add_ + dkv[1].copy_ (5 B).
    Rank 1: dq.copy_ (4 B) then dq.add_ (6 B); dkv[0].copy_ of the first half (2 B) then dkv.add_ (6 B)."""
    assert cp_ring_bytes(2, 0) == (4.0 + 3.0, 4.0, 2.0 + 5.0, 4.0 + 4.0 + 5.0)
    assert cp_ring_bytes(2, 1) == (4.0 + 6.0, 4.0, 4.0 + 6.0, 4.0 + 2.0 + 6.0)


@pytest.mark.parametrize("cp", [2, 3, 4, 8, 16, 32])
def test_the_two_end_ranks_in_closed_form(cp: int) -> None:
    """The last rank corrects every query row on every step (6 B, 4 B for the first), the first rank
    half of them after step 0; on the key / value side it is the other way round."""
    last, first = cp_ring_bytes(cp, cp - 1), cp_ring_bytes(cp, 0)
    assert last == (6.0 * cp - 2.0, 4.0, 6.0 * cp - 2.0, 4.0 + 3.0 * cp + 2.0)
    assert first == (3.0 * cp + 1.0, 4.0, 3.0 * cp + 1.0, 4.0 + 6.0 * cp - 3.0)


@pytest.mark.parametrize("cp", [2, 3, 4, 5, 8, 16, 32, 64])
def test_the_slowest_rank_is_among_the_ranks_priced(cp: int) -> None:
    """`cp_ring_ranks` keeps ranks 0, 1, cp - 2, cp - 1 only (the counts are linear in between): for
    any mix of query and key / value elements and of forward and backward, its maximum is the
    maximum over every rank."""
    rng = random.Random(cp)
    every = [cp_ring_bytes(cp, r) for r in range(cp)]
    for _ in range(200):
        w = [rng.uniform(0.0, 1.0) for _ in range(4)]
        full = max(sum(a * b for a, b in zip(w, c)) for c in every)
        kept = max(sum(a * b for a, b in zip(w, c)) for c in cp_ring_ranks(cp))
        assert kept == pytest.approx(full, rel=1e-12)


def _merge(model: ModelSpec, lay: Layout, tokens: float, passes: float = 3.0) -> float:
    """`_cp_comm` with every transfer hidden and no step latency: the corrections alone, in seconds."""
    params = dataclasses.replace(DEFAULT_PARAMS, ring_step_latency=0.0)
    return _cp_comm(model, lay, get_gpu("B200"), tokens, passes, 1e9, 3.5e9, params)


def test_the_corrections_are_the_slowest_rank_s_bytes_at_hbm_bandwidth() -> None:
    """Per rank, query-side bytes grow with the rank (3 B per element and rank), key/value bytes
    shrink (3 B per element and rank): with query_groups <= heads (kv <= 2 x q elements) the last
    rank is the slowest, for MHA by its ends' counts alone; the price is its bytes at HBM bandwidth."""
    hw, tokens, cp = get_gpu("B200"), 8192.0, 8
    for model in (MIXTRAL_22B, MHA):
        q = tokens * model.heads * model.head_dim / 2
        kv = 2.0 * tokens * model.query_groups * model.head_dim / 2
        per_rank = [(fq + bq) * q + (fkv + bkv) * kv for fq, fkv, bq, bkv in (cp_ring_bytes(cp, r) for r in range(cp))]
        assert max(per_rank) == per_rank[cp - 1]
        assert _merge(model, ring(cp), tokens) == pytest.approx(per_rank[cp - 1] / hw.hbm_bw, rel=1e-12)
    # forward only (an inference pass): the backward's corrections go
    q = tokens * MIXTRAL_22B.heads * MIXTRAL_22B.head_dim / 2
    kv = 2.0 * tokens * MIXTRAL_22B.query_groups * MIXTRAL_22B.head_dim / 2
    assert _merge(MIXTRAL_22B, ring(cp), tokens, passes=1.0) == pytest.approx(
        ((6 * cp - 2) * q + 4 * kv) / hw.hbm_bw, rel=1e-12)


def test_the_backward_ring_s_first_and_last_transfers_carry_one_tensor() -> None:
    """Backward: step 0 sends K, V only, steps 1 .. cp - 2 K, V with the dK, dV accumulated so far,
    step cp - 1 dK, dV only, each behind one backward kernel. With kernels between one and two
    transfers long only the cp - 2 double transfers are exposed, by (2 x transfer - kernel) each."""
    hw = get_gpu("B200")
    params = dataclasses.replace(DEFAULT_PARAMS, ring_step_latency=0.0)
    tokens, cp = 8192.0, 8
    lay = ring(cp)  # TP 2 x CP 8 = 16 ranks: the ring crosses the 8-GPU node over one NIC
    kv = 2.0 * tokens * MIXTRAL_22B.query_groups * MIXTRAL_22B.head_dim / lay.tp
    step = kv * 2.0 / (hw.net_bw * params.link)
    fwd = 2.0 * cp * step  # every forward transfer hidden
    per_kernel = 1.5 * step
    exposed = _cp_comm(MIXTRAL_22B, lay, hw, tokens, 3.0, fwd, fwd + cp * per_kernel, params) - _merge(
        MIXTRAL_22B, lay, tokens)
    assert exposed == pytest.approx((cp - 2) * (2.0 * step - per_kernel), rel=1e-9)
    # CP 2: one transfer each way, K, V then dK, dV: nothing doubles
    lay2 = ring(2, tp=8)
    kv2 = 2.0 * tokens * MIXTRAL_22B.query_groups * MIXTRAL_22B.head_dim / lay2.tp
    step2 = kv2 * 2.0 / (hw.net_bw * params.link)
    fwd2 = 4.0 * step2
    merge2 = _cp_comm(MIXTRAL_22B, lay2, hw, tokens, 3.0, 1e9, 3.5e9, params)
    assert _cp_comm(MIXTRAL_22B, lay2, hw, tokens, 3.0, fwd2, fwd2 + 2 * 1.5 * step2, params) == pytest.approx(merge2)


def test_ring_latency_counts_every_dependent_exchange() -> None:
    """cp - 1 exchanges per forward (and per recomputed forward), cp per backward."""
    hw, tokens, cp = get_gpu("B200"), 8192.0, 8
    hidden = dict(attn_fwd=1e9, attention=3.5e9)
    base = dataclasses.replace(DEFAULT_PARAMS, ring_step_latency=0.0)
    lat = dataclasses.replace(DEFAULT_PARAMS, ring_step_latency=1e-3)
    for recompute, steps in (("none", (cp - 1) + cp), ("full", 2 * (cp - 1) + cp)):
        lay = ring(cp, recompute=recompute)
        with_lat = _cp_comm(MIXTRAL_22B, lay, hw, tokens, 3.0, hidden["attn_fwd"], hidden["attention"], lat)
        without = _cp_comm(MIXTRAL_22B, lay, hw, tokens, 3.0, hidden["attn_fwd"], hidden["attention"], base)
        assert with_lat - without == pytest.approx(steps * 1e-3)
