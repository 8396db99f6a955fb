"""Dense layers inside a MoE model (`moe_layer_freq`, `moe_first_dense_layers`): the per-layer pattern with
Megatron-Core's semantics, the layers each pipeline stage builds at Megatron's offsets, and the parameter, FLOP,
memory and step-time terms priced per stage (a dense layer holds an MLP of ffn_hidden, dispatches no tokens).
The parameter counts against a real Megatron-Core model: tests/runtime/test_moe_dense_layers_mcore.py; the
DeepSeek presets against their published counts: tests/compiler/test_mla_terms.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nemoc.compiler import cost, memory
from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.flops import (_mlp_params, dense_layers_per_stage, flops_per_token, param_counts,
                                  selective_recompute_flops_per_token)
from nemoc.compiler.plan import Layout, from_json, to_json
from nemoc.compiler.spec import ModelSpec

MOE = ModelSpec(name="m", layers=8, hidden=1024, heads=8, query_groups=8, ffn_hidden=4096, vocab=32000,
                seq_length=2048, experts=8, top_k=2, moe_ffn_hidden=1024, shared_expert_ffn_hidden=1024)


def _layout(**kw) -> Layout:
    base = dict(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=8, micro_batch=1, global_batch=64, num_microbatches=8,
                sequence_parallel=False, distributed_optimizer=True, recompute="none")
    return Layout(**(base | kw))


def test_the_pattern_has_megatrons_semantics():
    """gpt_layer_specs.py get_gpt_decoder_layer_specs: `1 if i % N == 0` for an int, the list as it is; the dense
    prefix zeroes the first entries; TransformerConfig gets the int back when no prefix is added."""
    assert MOE.moe_layer_pattern == (1,) * 8 and not MOE.has_dense_layers and MOE.megatron_moe_layer_freq == 1
    every2 = replace(MOE, moe_layer_freq=2)
    assert every2.moe_layer_pattern == (1, 0, 1, 0, 1, 0, 1, 0) and every2.megatron_moe_layer_freq == 2
    assert replace(MOE, moe_layer_freq=3).moe_layer_pattern == (1, 0, 0, 1, 0, 0, 1, 0)
    listed = replace(MOE, moe_layer_freq=(0, 1, 1, 0, 1, 1, 1, 1))
    assert listed.moe_layer_pattern == (0, 1, 1, 0, 1, 1, 1, 1) and listed.megatron_moe_layer_freq == list(
        listed.moe_layer_pattern)
    prefix = replace(MOE, moe_first_dense_layers=3)
    assert prefix.moe_layer_pattern == (0, 0, 0, 1, 1, 1, 1, 1) and prefix.megatron_moe_layer_freq == [0, 0, 0, 1, 1, 1,
                                                                                                        1, 1]
    assert replace(every2, moe_first_dense_layers=1).moe_layer_pattern == (0, 0, 1, 0, 1, 0, 1, 0)
    dense = replace(MOE, experts=0, top_k=0)
    assert dense.moe_layer_pattern == (0,) * 8 and dense.moe_layer_count == 0 and not dense.has_dense_layers
    assert prefix.dense_layer_model.experts == 0 and prefix.dense_layer_model.ffn_hidden == 4096


def test_the_pattern_survives_the_plan_json():
    from nemoc.compiler.plan import _build

    for m in (replace(MOE, moe_layer_freq=(0, 1) * 4), replace(MOE, moe_first_dense_layers=2), MOE):
        again = _build(ModelSpec, __import__("json").loads(__import__("json").dumps(_as_dict(m))))
        assert again == m and again.moe_layer_pattern == m.moe_layer_pattern


def _as_dict(m: ModelSpec) -> dict:
    import dataclasses

    return {f.name: (list(v) if isinstance(v := getattr(m, f.name), tuple) else v) for f in dataclasses.fields(m)}


def test_parameters_price_each_layer_by_its_kind():
    counts, prefix = param_counts(MOE), param_counts(replace(MOE, moe_first_dense_layers=3))
    dense_mlp = _mlp_params(MOE, MOE.ffn_hidden)
    assert prefix.dense_layers == 3 and prefix.dense_mlp == dense_mlp
    assert counts.total - prefix.total == 3 * (counts.mlp - dense_mlp)  # experts + shared + router -> dense MLP
    assert counts.active - prefix.active == 3 * (counts.mlp_active - dense_mlp)
    assert prefix.layer_params(5, 3) == 5 * counts.per_layer + 3 * (counts.attention + dense_mlp + counts.norms)


def test_flops_follow_the_pattern():
    """Forward GEMM FLOPs: 2 x (every layer's attention + the expert layers' active MLP + the dense layers' MLP);
    selective recompute of `moe` replays the expert layers only, of `mlp` the dense layers' MLPs."""
    prefix = replace(MOE, moe_first_dense_layers=3)
    c = param_counts(prefix)
    f = flops_per_token(prefix, 2048, True)
    assert f.dense_gemm == 2 * (8 * c.attention + 5 * c.mlp_active + 3 * c.dense_mlp)
    assert selective_recompute_flops_per_token(prefix, 2048, True, ("moe",)) == 2.0 * 5 * c.mlp_active
    assert selective_recompute_flops_per_token(prefix, 2048, True, ("mlp",)) == 2.0 * 3 * c.dense_mlp
    assert selective_recompute_flops_per_token(MOE, 2048, True, ("mlp",)) == 0.0


def test_stages_hold_the_dense_layers_at_megatrons_offsets():
    """transformer_layer.py get_transformer_layer_offset: chunk c of every stage before chunk c + 1 of any, so with
    virtual stages the dense prefix spreads over the stages' first chunks."""
    prefix = replace(MOE, moe_first_dense_layers=3)
    assert dense_layers_per_stage(prefix, 4, None, None) == (2, 1, 0, 0)  # layers 0-1 | 2-3 | 4-5 | 6-7
    assert dense_layers_per_stage(prefix, 2, 2, None) == (2, 1)  # chunks: s0 0-1, s1 2-3, s0 4-5, s1 6-7
    assert dense_layers_per_stage(prefix, 2, None, (3, 0, 5)) == (3, 0)  # an uneven split: 3 + 5
    assert dense_layers_per_stage(replace(MOE, moe_layer_freq=2), 2, None, None) == (2, 2)
    assert dense_layers_per_stage(MOE, 4, None, None) == (0, 0, 0, 0)


def test_stage_weights_add_up_to_the_model():
    """Each stage holds its own layers' parameters: over the stages, exactly the model (unpadded vocabulary)."""
    prefix = replace(MOE, moe_first_dense_layers=3)
    lay = _layout(pp=4, dp=2)
    stages = [memory._local_stage(prefix, lay, s, prefix.vocab, False) for s in range(4)]
    assert sum(st.dense + st.expert for st in stages) == param_counts(prefix).total
    assert [st.dense_layers for st in stages] == [2, 1, 0, 0]
    assert stages[0].expert < stages[2].expert  # two dense layers hold no experts


def test_dense_layers_dispatch_no_tokens():
    """The expert-parallel all-to-all runs in the expert layers only: ep_comm scales with their number; each dense
    layer keeps a dense layer's activations (`memory.layer_activations` of `dense_layer_model`) in place of an
    expert layer's."""
    lay = _layout(ep=8)
    prefix = replace(MOE, moe_first_dense_layers=2)
    full = cost.estimate(MOE, lay, gpu="H100", seq_length=2048)
    mixed = cost.estimate(prefix, lay, gpu="H100", seq_length=2048)
    assert mixed.parts["ep_comm"] == pytest.approx(full.parts["ep_comm"] * 6 / 8)
    assert mixed.step_time_s != full.step_time_s
    kw = dict(seq=2048, micro_batch=1, tp=1, sp=False, etp=1)
    dense_layer = memory.layer_activations(prefix.dense_layer_model, **kw).total
    moe_layer = memory.layer_activations(MOE, **kw).total
    m_full = memory.estimate(MOE, lay, gpu="H100", seq_length=2048)
    m_mixed = memory.estimate(prefix, lay, gpu="H100", seq_length=2048)
    held = memory.in_flight_microbatches(1, None, 8, 0)
    assert m_mixed.activations - m_full.activations == pytest.approx(2 * held * (dense_layer - moe_layer), abs=2)


def test_the_slowest_stage_sets_the_pipeline():
    """DeepSeek-V3 at PP 4 (14 + 16 + 16 + 15 layers): the three dense layers make stage 0 lighter, but the pipeline
    runs at its slowest stage, 16 expert layers in both models, so the step barely moves while the mean stage
    (and the all-to-all of three fewer layers) does: the difference becomes pipeline imbalance."""
    v3 = get_preset("deepseek_v3")
    lay = _layout(tp=4, pp=4, ep=64, dp=128, sequence_parallel=True, global_batch=15360, num_microbatches=120)
    split = (14, 16, 15)
    mixed = cost.estimate(v3, lay, gpu="H100", split=split)
    every = cost.estimate(replace(v3, moe_first_dense_layers=0), lay, gpu="H100", split=split)
    assert mixed.parts["ep_comm"] == pytest.approx(every.parts["ep_comm"] * 58 / 61)
    # the slowest stage (16 expert layers) is the same in both, so only the mean-stage terms move
    assert mixed.step_time_s == pytest.approx(every.step_time_s, rel=0.01)
    assert mixed.parts["pp_imbalance"] > every.parts["pp_imbalance"]


def test_bf16_first_layers_that_are_dense_are_priced_as_dense_layers():
    """Under FP8 with the first layers kept in bf16 (Megatron-Core `first_last_layers_bf16`), DeepSeek's first
    layers are bf16 and dense at once: no FP8 copies of a dense layer's weights (not an expert layer's), and a
    dense layer's extra bf16 time."""
    from nemoc.compiler.flops import bf16_dense_layers_per_stage, bf16_layers_per_stage

    prefix = replace(MOE, moe_first_dense_layers=2)
    assert bf16_layers_per_stage(8, 2, None, None, 3, 1) == (3, 1)
    assert bf16_dense_layers_per_stage(prefix, 2, None, None, 3, 1) == (2, 0)  # layers 0, 1 dense; 2 and 7 MoE
    assert bf16_dense_layers_per_stage(MOE, 2, None, None, 3, 1) == (0, 0)
    lay = _layout(pp=2, dp=4, ep=4)
    c = param_counts(prefix)
    moe_layer = (c.per_layer - c.expert) + c.expert / 4
    assert memory._bf16_layer_params(prefix, lay, 3, 2) == pytest.approx(moe_layer + 2 * c.dense_per_layer)
    kw = dict(gpu="H100", seq_length=2048, precision="fp8", split=None)
    with_bf16 = cost.estimate(prefix, lay, bf16_layers=(3, 1), **kw)
    without = cost.estimate(prefix, lay, **kw)
    assert with_bf16.parts["bf16_layers"] > 0 and with_bf16.step_time_s > without.step_time_s
    m_bf16 = memory.estimate(prefix, lay, bf16_layers=(3, 1), **kw)
    m_fp8 = memory.estimate(prefix, lay, **kw)
    assert m_bf16.parts["fp8_weight_cache"] < m_fp8.parts["fp8_weight_cache"]


def test_lora_adapters_of_a_dense_layer_wrap_one_mlp():
    """LoRA on fc1 / fc2: an expert layer's adapters wrap every expert's MLP (experts x (h + moe_ffn) r), a dense
    layer's the one MLP of ffn_hidden."""
    from nemoc.compiler.flops import lora_params_of_layers, lora_params_per_layer
    from nemoc.compiler.spec import LoraSpec

    lora = LoraSpec(rank=8, targets=("fc1", "fc2"))
    prefix = replace(MOE, moe_first_dense_layers=3)
    expert_layer = lora_params_per_layer(MOE, lora)
    dense_layer = lora_params_per_layer(prefix.dense_layer_model, lora)
    assert expert_layer == 8 * MOE.experts * ((1024 + 2 * 1024) + (1024 + 1024))  # fc1 gated: 2 x moe_ffn out
    assert dense_layer == 8 * ((1024 + 2 * 4096) + (4096 + 1024))
    assert lora_params_of_layers(prefix, lora, 8, 3) == 5 * expert_layer + 3 * dense_layer
    lay = _layout(pp=2, dp=4)
    st = memory._local_stage(prefix, lay, 0, prefix.vocab, False)
    assert st.dense_layers == 3  # layers 0-3 on stage 0, three of them dense
    mem = memory.estimate(prefix, lay, gpu="H100", seq_length=2048, stage_kind="sft", peft=lora)
    every = memory.estimate(MOE, lay, gpu="H100", seq_length=2048, stage_kind="sft", peft=lora)
    assert mem.optimizer < every.optimizer  # fewer adapter parameters to update


@pytest.mark.parametrize("preset,pp,tp,split", [
    ("deepseek_v3", 4, 1, (16, 15, 15)),  # stage 0 (3 dense + 13 expert layers) holds the most per GPU at EP 64
    ("deepseek_v3", 8, 2, (10, 7, 9)),
    ("deepseek_v2_lite", 3, 1, None),
    ("deepseek_v3", 4, 8, (14, 16, 15)),  # at TP 8 the 16-expert-layer stage is the busiest
])
def test_the_busiest_stage_holds_the_most_parameters_per_gpu(preset, pp, tp, split):
    """`_local_params` (DP reduce-scatter / all-gather, optimizer time, the search bound) is the stage with the most
    parameters on one GPU, memory's per-stage count: a dense layer's MLP, sharded by TP only, can outweigh an expert
    layer's EP share (DeepSeek-V3 at TP 1 / EP 64: 583M vs 409M per GPU). LoRA alike: the stage with most adapters."""
    from nemoc.compiler.flops import layers_on_stage, lora_params_of_layers
    from nemoc.compiler.spec import LoraSpec

    model = get_preset(preset)
    lay = _layout(tp=tp, pp=pp, ep=64, dp=64, sequence_parallel=tp > 1)
    dense = dense_layers_per_stage(model, pp, None, split)
    stages = [(layers_on_stage(model.layers, pp, s, split), d) for s, d in enumerate(dense)]
    per_stage = [memory._layer_params(model, lay, n, d) for n, d in stages]
    embed = cost._embedding_params(model, lay)
    assert cost._local_params(model, lay, split) == pytest.approx(max(per_stage) + embed)
    lora = LoraSpec(rank=8, targets=("qkv", "proj", "fc1", "fc2"))
    assert cost._trainable_params(model, lay, split, lora) == pytest.approx(
        max(lora_params_of_layers(model, lora, n, d) for n, d in stages) / tp)
    most_experts = max(n - d for n, d in stages)  # the expert part alone: the stage with most expert layers
    assert cost._expert_params(model, lay, split) == pytest.approx(
        most_experts * param_counts(model).expert / 64)
