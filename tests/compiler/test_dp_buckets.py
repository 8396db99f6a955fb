"""The input embedding's DDP bucket (`cost._embedding_bucket`): Megatron-Core 0.16.1 fills gradient buckets
in reverse registration order, so the input embedding is the last bucket reduced (its gradient is complete
only when the backward ends) and the first one all-gathered (nothing precedes it in the forward): both
exposed. With a 256K vocabulary (Nemotron-4 15B on 64 B200, calibration row C05) that is 1.6 billion
parameters per GPU, not the 40M-parameter bucket the model charged before."""

from __future__ import annotations

import pytest

from nemoc.compiler.catalog import PRESETS, get_gpu
import dataclasses

from nemoc.compiler.cost import (DEFAULT_PARAMS, _dp_exposed, _embedding_params, _link_bw, ddp_bucket_params,
                                 embedding_bucket_params, estimate)
from nemoc.compiler.flops import padded_vocab
from nemoc.compiler.plan import Layout
from nemoc.compiler.spec import LoraSpec

NEMOTRON_15B = PRESETS["nemotron4_15b"]
B200 = get_gpu("B200")


def lay(**kw) -> Layout:
    """C05's published layout: TP 1, PP 1, DP 64 (8 HGX B200 nodes), micro batch 2, 2 micro batches."""
    base = dict(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=64, micro_batch=2, global_batch=256, num_microbatches=2,
                sequence_parallel=False, distributed_optimizer=True, recompute="none")
    base.update(kw)
    return Layout(**base)


def test_megatron_default_bucket_size():
    """`bucket_size = max(40000000, 1000000 * dp_group.size())` (distributed_data_parallel.py)."""
    assert ddp_bucket_params(8) == 40e6
    assert ddp_bucket_params(64) == 64e6


def test_the_embedding_bucket_is_reduced_last_and_gathered_first():
    """At C05's size every layer bucket hides (a 0.3 s backward window against a ~0.1 s reduce-scatter),
    so what is exposed is exactly the embedding bucket's reduce-scatter (bf16 gradients) and all-gather
    (bf16 parameters) over the 64-rank group (8 NICs per node: `_link_bw`)."""
    layout = lay()
    embed = _embedding_params(NEMOTRON_15B, layout)
    assert embed == pytest.approx(padded_vocab(256000, 1) * 6144)  # 1.57e9 parameters
    trainable = 15.6e9
    t_mb, fwd = 0.46, 1 / 3
    bw = _link_bw(B200, 64, 1, DEFAULT_PARAMS)
    one = embed * 2 * 63 / 64 / bw  # bf16 reduce-scatter or all-gather of the embedding
    exposed = _dp_exposed(NEMOTRON_15B, layout, B200, t_mb, fwd, DEFAULT_PARAMS, trainable, 2, embedding=embed)
    assert exposed == pytest.approx(2 * one, rel=1e-12)
    # the model before this term: a 40M-parameter last bucket and a gather hidden in the forward
    before = _dp_exposed(NEMOTRON_15B, layout, B200, t_mb, fwd, DEFAULT_PARAMS, trainable, 2)
    assert before == pytest.approx(40e6 * 2 * 63 / 64 / bw, rel=1e-12)
    assert exposed > 30 * before


def test_plain_ddp_all_reduces_the_embedding_bucket_last():
    """Without the distributed optimizer the last bucket is all-reduced (twice the bytes) and nothing is
    gathered: never faster than the overlapped distributed optimizer, which the search's dominance
    (`search._do_domain`) relies on."""
    layout = lay(distributed_optimizer=False)
    embed = _embedding_params(NEMOTRON_15B, layout)
    bw = _link_bw(B200, 64, 1, DEFAULT_PARAMS)
    for grad_bytes in (2, 4):
        # a 1 s micro batch: every layer bucket's all-reduce hides behind the 0.67 s backward
        plain = _dp_exposed(NEMOTRON_15B, layout, B200, 1.0, 1 / 3, DEFAULT_PARAMS, 15.6e9, grad_bytes,
                            embedding=embed)
        assert plain == pytest.approx(2 * embed * grad_bytes * 63 / 64 / bw, rel=1e-12)
        dist = _dp_exposed(NEMOTRON_15B, lay(), B200, 1.0, 1 / 3, DEFAULT_PARAMS, 15.6e9, grad_bytes,
                           embedding=embed)
        assert dist <= plain * (1 + 1e-12)


def test_the_step_charges_the_embedding_bucket_and_lora_does_not():
    """Through `estimate`: the full model's step carries the exposed embedding bucket; under LoRA the
    embedding is frozen (no gradient, no gather) and the term is absent."""
    kw = dict(gpu="B200", precision="fp8", seq_length=4096)
    full = estimate(NEMOTRON_15B, lay(), grad_bytes=2, overlap_param_gather=True, **kw)
    embed = _embedding_params(NEMOTRON_15B, lay())
    bw = _link_bw(B200, 64, 1, DEFAULT_PARAMS)
    assert full.parts["dp_comm_exposed"] >= 2 * embed * 2 * 63 / 64 / bw * (1 - 1e-9)
    lora = estimate(NEMOTRON_15B, lay(), grad_bytes=2, overlap_param_gather=True, peft=LoraSpec(rank=16),
                    stage_kind="sft", **kw)
    assert lora.parts["dp_comm_exposed"] < 1e-3


def test_the_bucket_size_counts_the_data_parallel_ranks_without_context_parallel_ones():
    """DDP sizes its buckets with `dp_group.size()` (distributed_data_parallel.py), the data-parallel group
    without CP, though its buffers reduce over DP x CP: at dp 2 x cp 32 the last bucket is 40M parameters,
    not the 64M of dp 64. With a 10M-parameter embedding (joining that bucket) and a long micro batch that hides
    every other bucket, the exposed time scales with exactly that bucket."""
    assert embedding_bucket_params(10e6, dp=2, shared=False, distributed=True) == 40e6
    assert embedding_bucket_params(10e6, dp=64, shared=False, distributed=True) == 64e6
    kw = dict(trainable_params=1e9, grad_bytes=2, embedding=10e6)
    cp = _dp_exposed(NEMOTRON_15B, lay(dp=2, cp=32), B200, 10.0, 1 / 3, DEFAULT_PARAMS, **kw)
    dp = _dp_exposed(NEMOTRON_15B, lay(dp=64), B200, 10.0, 1 / 3, DEFAULT_PARAMS, **kw)
    bw = _link_bw(B200, 64, 1, DEFAULT_PARAMS)
    assert cp == pytest.approx(2 * 40e6 * 2 * 63 / 64 / bw, rel=1e-12)  # the last bucket's reduce + first gather
    assert dp == pytest.approx(cp * 64 / 40, rel=1e-12)


def test_a_tied_embedding_split_over_a_pipeline_gets_its_own_bucket():
    """With tied embeddings and pp > 1 Megatron-Core marks the first stage's word embeddings `shared_embedding`,
    and with the distributed optimizer param_and_grad_buffer.py gives them a bucket of exactly their size: the
    last bucket is the embedding, however small; untied, without a pipeline or with plain DDP it joins the
    last default bucket."""
    assert embedding_bucket_params(10e6, dp=8, shared=True, distributed=True) == 10e6
    assert embedding_bucket_params(10e6, dp=8, shared=True, distributed=False) == 40e6
    assert embedding_bucket_params(2e9, dp=8, shared=False, distributed=True) == 2e9
    tied = dataclasses.replace(NEMOTRON_15B, tie_embeddings=True)
    kw = dict(trainable_params=1e9, grad_bytes=2, embedding=10e6)
    bw = _link_bw(B200, 64, 2, DEFAULT_PARAMS)
    layout = lay(tp=2, dp=64, pp=2, num_microbatches=4, global_batch=512)
    own = _dp_exposed(tied, layout, B200, 10.0, 1 / 3, DEFAULT_PARAMS, **kw)
    assert own == pytest.approx(2 * 10e6 * 2 * 63 / 64 / bw, rel=1e-12)
    assert _dp_exposed(NEMOTRON_15B, layout, B200, 10.0, 1 / 3, DEFAULT_PARAMS, **kw) == pytest.approx(
        own * 64e6 / 10e6, rel=1e-12)
