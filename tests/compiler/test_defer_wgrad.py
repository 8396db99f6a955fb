"""`defer_embedding_wgrad_compute` / `wgrad_deferral_limit`: the last pipeline stage's output-layer weight-gradient
GEMMs move from its steady state to the pipeline's drain (cost), the deferred micro batches' buffers stay on that
stage until then (memory), and the search's lower bound still bounds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nemoc.compiler import cost, memory
from nemoc.compiler.catalog.hardware import get_gpu
from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.flops import padded_vocab
from nemoc.compiler.plan import Layout

H100 = get_gpu("H100")
LLAMA70B = get_preset("llama3_70b")


def lay(**kw) -> Layout:
    base = dict(tp=4, pp=4, vp=None, cp=2, ep=1, etp=4, dp=2, micro_batch=1, global_batch=128, num_microbatches=64,
                sequence_parallel=True, distributed_optimizer=True, recompute="none")
    base.update(kw)
    return Layout(**base)


def est(layout, **kw):
    return cost.estimate(LLAMA70B, layout, gpu=H100, precision="bf16", seq_length=8192, **kw)


def _wgrad_gemm(layout) -> float:
    return cost._output_gemm_time(LLAMA70B, layout, H100, seq=8192, micro_batch=1, params=cost.DEFAULT_PARAMS)


def test_the_last_stage_sheds_its_output_wgrad_from_the_steady_state_up_to_the_drain():
    """With the output layer on it, the last stage is the slowest by more than one output GEMM here: each of
    the d deferred micro batches takes one GEMM off the step (pp_imbalance); beyond the cooldown's wait of
    (pp - 1) backward passes of a mean stage, the deferred GEMMs come back as `embedding_wgrad_drain`."""
    base = est(lay())
    w = _wgrad_gemm(lay())
    limited = est(lay(defer_embedding_wgrad_compute=True, wgrad_deferral_limit=22))
    assert limited.parts["pp_imbalance"] == pytest.approx(base.parts["pp_imbalance"] - 22 * w)
    assert limited.parts["embedding_wgrad_drain"] == 0.0  # 22 GEMMs fit the wait
    assert limited.step_time_s == pytest.approx(base.step_time_s - 22 * w)
    every = est(lay(defer_embedding_wgrad_compute=True))  # limit 0: all 64 micro batches, still within the wait
    assert every.parts["pp_imbalance"] == pytest.approx(base.parts["pp_imbalance"] - 64 * w)
    assert every.parts["embedding_wgrad_drain"] == 0.0
    # interleaved (vp 5): the cooldown's wait is 5 x shorter, and 64 GEMMs no longer fit it
    base5 = est(lay(vp=5))
    every5 = est(lay(vp=5, defer_embedding_wgrad_compute=True))
    per_mb = (base5.parts["compute"] + base5.parts["elementwise"] + base5.parts["tp_comm"]
              + base5.parts["cp_comm"]) / 64  # a mean stage's micro batch (no host or EP terms here)
    wait = 3 / 5 * per_mb * 2 / 3
    assert every5.parts["embedding_wgrad_drain"] == pytest.approx(64 * w - wait, rel=1e-6)
    assert every5.step_time_s == pytest.approx(base5.step_time_s - 64 * w + every5.parts["embedding_wgrad_drain"])


def test_nothing_moves_without_a_pipeline_or_without_a_trained_output_layer():
    base = est(lay(pp=1, dp=8))
    assert est(lay(pp=1, dp=8, defer_embedding_wgrad_compute=True)).step_time_s == base.step_time_s
    ev = dict(stage_kind="eval")
    assert est(lay(defer_embedding_wgrad_compute=True), **ev).step_time_s == est(lay(), **ev).step_time_s


def test_a_last_stage_that_is_not_the_slowest_saves_nothing_in_the_steady_state():
    """An uneven split with two layers fewer on the last stage: the first stage bounds the steady state, so
    taking GEMMs off the last stage shortens nothing; they still fit its wait in the drain."""
    split = (21, 20, 19)  # first, middle, last
    base = est(lay(), split=split)
    deferred = est(lay(defer_embedding_wgrad_compute=True, wgrad_deferral_limit=8), split=split)
    assert deferred.step_time_s == pytest.approx(base.step_time_s)


def test_the_lower_bound_still_bounds_with_the_deferral():
    for limit in (0, 4, 22):
        for mb in (1, 2):
            layout = lay(defer_embedding_wgrad_compute=True, wgrad_deferral_limit=limit, micro_batch=mb,
                         num_microbatches=64 // mb)
            bound = cost.step_time_lower_bound(LLAMA70B, layout, micro_batches=(1, 2), gpu=H100, seq_length=8192)
            assert bound <= est(layout).step_time_s * (1 + 1e-9)


def test_the_last_stage_holds_the_deferred_inputs_and_logits_gradients():
    """tensor_parallel/layers.py keeps, per deferred micro batch, the output layer's input (its SP shard) and the
    logits gradient: s / cp x b x (h / tp + V / tp) 16-bit values, d times."""
    layout = lay(defer_embedding_wgrad_compute=True, wgrad_deferral_limit=22)
    stages = memory.pipeline_stages(LLAMA70B, layout, seq_length=8192, gpu=H100)
    vocab = padded_vocab(LLAMA70B.vocab, 4)
    assert stages[-1].parts["deferred_wgrad_buffers"] == 22 * 2 * 4096 * (8192 / 4 + vocab / 4)
    assert all("deferred_wgrad_buffers" not in s.parts for s in stages[:-1])
    every = memory.pipeline_stages(LLAMA70B, replace(layout, wgrad_deferral_limit=0), seq_length=8192, gpu=H100)
    per_limit = stages[-1].parts["deferred_wgrad_buffers"] / 22
    assert every[-1].parts["deferred_wgrad_buffers"] == pytest.approx(64 * per_limit)
    plain = memory.pipeline_stages(LLAMA70B, lay(), seq_length=8192, gpu=H100)
    assert "deferred_wgrad_buffers" not in plain[-1].parts
