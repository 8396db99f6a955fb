"""The memory model: exact model-state bytes, Korthikanti's activation formula, monotonicity."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemoc.compiler import memory
from nemoc.compiler.catalog import PRESETS
from nemoc.compiler.flops import padded_vocab, param_counts
from nemoc.compiler.memory import (
    estimate,
    in_flight_microbatches,
    layer_activations,
    resident_models,
    rollout_kv_cache,
    state_bytes_per_param,
)
from nemoc.compiler.plan import Layout
from nemoc.compiler.spec import LoraSpec, ModelSpec


def layout(**kw) -> Layout:
    base = dict(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=8, num_microbatches=8,
                sequence_parallel=False, distributed_optimizer=False, recompute="none")
    base.update(kw)
    return Layout(**base)


def test_mixed_precision_adam_is_18_bytes_and_6_plus_12_over_dp() -> None:
    assert state_bytes_per_param("bf16", distributed_optimizer=False, shard=8).total == 18
    for dp in (1, 2, 8, 64, 1024):
        s = state_bytes_per_param("bf16", distributed_optimizer=True, shard=dp)
        assert (s.weights, s.gradients) == (2, 4)
        assert s.total == pytest.approx(6 + 12 / dp)
    assert state_bytes_per_param("fp32", distributed_optimizer=False, shard=1).total == 16
    assert state_bytes_per_param("fp32", distributed_optimizer=True, shard=4).total == pytest.approx(8 + 8 / 4)


def test_single_gpu_model_states_are_18_bytes_per_parameter() -> None:
    model = PRESETS["llama2_7b"]
    mem = estimate(model, layout(), precision="bf16", gpu="H100")
    counts = param_counts(model)
    params = counts.total + (padded_vocab(model.vocab) - model.vocab) * model.hidden * 2  # both tables padded
    assert mem.weights + mem.gradients + mem.optimizer == pytest.approx(18 * params, rel=1e-6)
    dist = estimate(model, layout(dp=8, global_batch=64, distributed_optimizer=True), gpu="H100")
    assert dist.weights + dist.gradients + dist.optimizer == pytest.approx((6 + 12 / 8) * params, rel=1e-6)


# Korthikanti et al. 2022 Table 3 models (heads, hidden), s = 2048, 16-bit, dropout, unfused softmax.
KORTHIKANTI = [(64, 6144, 4), (96, 12288, 1), (128, 20480, 1), (160, 25600, 1)]


def _gpt(a: int, h: int) -> ModelSpec:
    return ModelSpec(name="gpt", layers=8, hidden=h, heads=a, query_groups=a, ffn_hidden=4 * h, vocab=51200,
                     seq_length=2048, activation="gelu", norm="layernorm", position="learned", add_bias_linear=True)


@pytest.mark.parametrize("a,h,b", KORTHIKANTI)
@pytest.mark.parametrize("t", [1, 2, 8])
def test_korthikanti_table2(a: int, h: int, b: int, t: int) -> None:
    s, model = 2048, _gpt(a, h)
    sbh = s * b * h

    def act(sp: bool, recompute: str) -> float:
        return layer_activations(model, seq=s, micro_batch=b, tp=t, sp=sp, recompute=recompute,
                                 attention_backend="unfused", dropout=True).total

    assert act(False, "none") == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert act(True, "none") == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert act(True, "selective") == pytest.approx(sbh / t * 34)
    assert act(False, "selective") == pytest.approx(sbh * (10 + 24 / t))
    assert act(True, "full") == pytest.approx(2 * sbh / t)
    assert act(False, "full") == pytest.approx(2 * sbh)


def test_flash_attention_never_materialises_scores() -> None:
    model = PRESETS["llama3_8b"]
    flash = layer_activations(model, seq=8192, micro_batch=1, tp=1, sp=False, attention_backend="flash")
    unfused = layer_activations(model, seq=8192, micro_batch=1, tp=1, sp=False, attention_backend="unfused")
    assert unfused.scores == pytest.approx(2 * model.heads * 8192 * 8192)  # bf16 softmax output, no dropout
    assert flash.scores < unfused.scores / 1000


def test_pipeline_in_flight_and_interleaving_penalty() -> None:
    assert in_flight_microbatches(4, None, 32) == 4
    assert in_flight_microbatches(4, None, 32, stage=3) == 1
    assert in_flight_microbatches(8, None, 2) == 2
    assert in_flight_microbatches(4, 2, 32) == pytest.approx(4 * (1 + 3 / 8))


def test_resident_models() -> None:
    assert resident_models("pretrain") == ("policy",)
    assert resident_models("dpo") == ("policy", "reference")
    assert resident_models("dpo", {"reference_free": True}) == ("policy",)
    assert resident_models("dpo", peft=LoraSpec()) == ("policy",)
    assert resident_models("ppo") == ("actor", "critic", "reward", "reference")
    assert resident_models("ppo", peft=LoraSpec()) == ("actor", "critic", "reward")  # reference: adapters off
    # eval holds its first parent's model; `eval after POLICY, REFERENCE` the reference's too
    assert resident_models("eval", parents=("dpo",)) == ("policy",)
    assert resident_models("eval", parents=("orpo", "sft")) == ("policy", "reference")
    assert resident_models("eval", parents=("reward",)) == ("reward",)


def test_an_eval_with_a_reference_holds_two_models_weights() -> None:
    from nemoc.compiler.planner import plan_experiment
    from nemoc.compiler.lower import load_experiment

    spec, _ = load_experiment("examples/alignment_kinds.nemo")
    plan = plan_experiment(spec).plan
    ev = plan.stage("eval")
    assert ev.resident_models == ("policy", "reference")
    one = estimate(spec.model, ev.layout, precision=plan.precision, stage_kind="eval", gpu=spec.cluster.gpu,
                   seq_length=ev.seq_length, kernels=ev.kernels, parents=("orpo",))
    assert ev.memory.weights == pytest.approx(2 * one.weights)


def test_lora_dpo_ppo_states() -> None:
    model, lay = PRESETS["llama3_8b"], layout(tp=2, dp=4, global_batch=32, distributed_optimizer=True)
    full = estimate(model, lay, gpu="H100")
    lora = estimate(model, lay, gpu="H100", peft=LoraSpec(rank=16))
    assert lora.gradients < full.gradients / 100 and lora.optimizer < full.optimizer / 100
    assert lora.weights >= full.weights
    dpo = estimate(model, lay, gpu="H100", stage_kind="dpo")
    assert dpo.weights == pytest.approx(2 * full.weights, rel=1e-6)  # + frozen reference
    assert dpo.activations > full.activations  # chosen + rejected
    # PPO: the actor and the reference end in the vocabulary output layer, the critic and the reward model in
    # a scalar head (runtime/align/common.py ScalarHead: h weights + 1 bias), as the reward stage's model
    ppo = estimate(model, lay, gpu="H100", stage_kind="ppo")
    reward = estimate(model, lay, gpu="H100", stage_kind="reward")
    assert ppo.weights == pytest.approx(2 * full.weights + 2 * reward.weights, rel=1e-6)
    assert ppo.gradients == pytest.approx(full.gradients + reward.gradients, rel=1e-6)
    assert ppo.optimizer == pytest.approx(full.optimizer + reward.optimizer, rel=1e-6)
    head = padded_vocab(model.vocab, 2) * model.hidden / 2 - model.hidden  # per GPU at TP 2, untied
    assert full.weights - reward.weights == pytest.approx(2.0 * head, rel=1e-6)  # bf16 weights
    assert "logits" not in reward.parts
    # PPO with LoRA holds what `runners.run_ppo` builds: the actor with adapters (a LoRA SFT model), the critic
    # trained whole (a reward stage's model: no adapters on it), the frozen reward model, and no reference
    lora_ppo = estimate(model, lay, gpu="H100", stage_kind="ppo", peft=LoraSpec(rank=16))
    assert lora_ppo.weights == pytest.approx(lora.weights + 2 * reward.weights, rel=1e-6)
    assert lora_ppo.gradients == pytest.approx(lora.gradients + reward.gradients, rel=1e-6)
    assert lora_ppo.optimizer == pytest.approx(lora.optimizer + reward.optimizer, rel=1e-6)
    # a reward stage with `peft` trains its whole model too (`runners.run_reward` applies no adapters)
    lora_rw = estimate(model, lay, gpu="H100", stage_kind="reward", peft=LoraSpec(rank=16))
    assert (lora_rw.gradients, lora_rw.optimizer) == (reward.gradients, reward.optimizer)
    # an eval of the reward model holds the scalar-headed model and takes no logits either
    ev = estimate(model, lay, gpu="H100", stage_kind="eval", parents=("reward",))
    assert ev.weights == pytest.approx(reward.weights, rel=1e-6) and "logits" not in ev.parts


def test_breakdown_names_its_parts() -> None:
    model = PRESETS["mixtral_8x7b"]
    mem = estimate(model, layout(tp=2, pp=1, ep=4, dp=4, global_batch=64, sequence_parallel=True,
                                 distributed_optimizer=True), precision="fp8", gpu="H100")
    assert mem.other == sum(mem.parts.values())
    assert {"cuda_context", "nccl", "logits", "moe_dispatch", "fragmentation", "fp8_weight_cache"} <= set(mem.parts)
    assert mem.capacity == 81_559 * 2**20


layouts = st.builds(
    lambda tp, pp, cp, dp, mb, sp, do, rc, name: (PRESETS[name], layout(
        tp=tp, pp=pp, cp=cp, dp=dp, micro_batch=mb, global_batch=mb * dp * 8, num_microbatches=8,
        sequence_parallel=sp and tp > 1, distributed_optimizer=do, recompute=rc)),
    st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.sampled_from([1, 2, 8]),
    st.sampled_from([1, 2, 4]), st.booleans(), st.booleans(), st.sampled_from(["none", "selective", "full"]),
    st.sampled_from(["llama3_8b", "gpt3_6p7b", "mixtral_8x7b", "qwen3_8b"]),
)


@settings(max_examples=60, deadline=None)
@given(layouts)
def test_more_tp_never_increases_per_gpu_weights(case) -> None:
    model, lay = case
    if lay.tp >= 8:
        return
    more = dataclasses.replace(lay, tp=lay.tp * 2)
    assert estimate(model, more).weights <= estimate(model, lay).weights


@settings(max_examples=60, deadline=None)
@given(layouts)
def test_recompute_never_increases_memory(case) -> None:
    model, lay = case
    by_level = [estimate(model, dataclasses.replace(lay, recompute=r)) for r in ("none", "selective", "full")]
    assert by_level[0].activations >= by_level[1].activations >= by_level[2].activations
    assert by_level[0].total >= by_level[1].total >= by_level[2].total


@settings(max_examples=60, deadline=None)
@given(layouts)
def test_monotone_in_micro_batch_and_sharding(case) -> None:
    model, lay = case
    base = estimate(model, lay)
    assert estimate(model, dataclasses.replace(lay, micro_batch=lay.micro_batch * 2)).total >= base.total
    assert estimate(model, dataclasses.replace(lay, distributed_optimizer=True)).total <= base.total
    if lay.tp > 1:
        assert estimate(model, dataclasses.replace(lay, sequence_parallel=True)).total <= base.total
    assert estimate(model, dataclasses.replace(lay, pp=lay.pp * 2)).weights <= base.weights


def test_sixteen_bit_gradients_keep_their_fp32_copy_in_the_optimizer_step_only() -> None:
    """grad_reduce_in_fp32=False (NeMo FP8 recipes): 2 + 2 + 12 = 16 B/param held (4 + 12/DP
    distributed) and the fp32 gradient copy (4, or 4/DP) only while the optimizer steps
    (distrib_optimizer.py allocates it there, zero_grad(set_to_none) frees it before the forward)."""
    plain = state_bytes_per_param("bf16", distributed_optimizer=False, shard=8, grad_bytes=2)
    assert (plain.total, plain.step) == (16, 4)
    sharded = state_bytes_per_param("bf16", distributed_optimizer=True, shard=8, grad_bytes=2)
    assert (sharded.total, sharded.step) == (pytest.approx(4 + 12 / 8), pytest.approx(4 / 8))
    # the copy counts only where it outgrows the freed activations: none with activations, all without
    model = ModelSpec(name="m", layers=4, hidden=1024, heads=8, query_groups=8, ffn_hidden=4096, vocab=32000,
                      seq_length=2048)
    lay = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=1, num_microbatches=1,
                 sequence_parallel=False, distributed_optimizer=False, recompute="full")
    mem = estimate(model, lay, grad_bytes=2)
    params = mem.weights / 2
    dynamic = mem.activations + sum(mem.parts.get(k, 0) for k in ("logits", "moe_dispatch", "backward_working"))
    assert mem.parts.get("optimizer_step_fp32_grads", 0) == pytest.approx(max(0.0, 4 * params - dynamic), abs=2)


def test_fp8_keeps_one_byte_linear_inputs() -> None:
    """GPT (h = a d, f = 4h), SP + selective, no dropout: Korthikanti's 34 s b h / t minus the two
    dropout masks is 32; with TE FP8 it is 27 (QKV and MLP inputs 2 -> 1, fc2 input 8 -> 4, + 1 for
    the projection's FP8 copy of the attention output)."""
    a, h, s, b, t = 96, 12288, 2048, 1, 8
    model = _gpt(a, h)
    kw = dict(seq=s, micro_batch=b, tp=t, sp=True, recompute="selective", attention_backend="flash")
    # selective recompute (core_attn) frees the flash core's softmax statistics too: none are left
    bf16 = layer_activations(model, **kw).total
    fp8 = layer_activations(model, fp8=True, **kw).total
    assert bf16 == pytest.approx(32 * s * b * h / t)
    assert fp8 == pytest.approx(27 * s * b * h / t)


def test_fp8_parameters_hold_one_byte_per_linear_weight_and_one_fp8_copy() -> None:
    """fp8_param_gather (Megatron-Core fp8_param): the linear weights are TE FP8 tensors, 1 byte plus
    the cached transpose, instead of a 16-bit weight plus both FP8 copies: -2 bytes per linear
    parameter; embedding, gradients and the fp32 optimizer shard are unchanged."""
    model = PRESETS["llama3_8b"]
    lay = Layout(tp=2, pp=1, vp=None, cp=1, ep=1, etp=2, dp=4, micro_batch=1, global_batch=8, num_microbatches=2,
                 sequence_parallel=True, distributed_optimizer=True, recompute="none")
    base = estimate(model, lay, precision="fp8")
    fp8p = estimate(model, dataclasses.replace(lay, fp8_param_gather=True), precision="fp8")
    linear = base.parts["fp8_weight_cache"] / 2
    assert base.weights - fp8p.weights == pytest.approx(linear, abs=2)
    assert fp8p.parts["fp8_weight_cache"] == pytest.approx(linear, abs=2)
    assert (fp8p.gradients, fp8p.optimizer, fp8p.activations) == (base.gradients, base.optimizer, base.activations)
    assert base.total - fp8p.total == pytest.approx(2 * linear, rel=1e-6, abs=8)
    # the FP8 linear weights are the transformer layers' only: Megatron-Core's output layer is a plain
    # ColumnParallelLinear (gpt_model.py), no TE module, so it has no FP8 copies and stays 16-bit
    counts = param_counts(model)
    assert linear == pytest.approx(model.layers * (counts.per_layer - counts.expert) / 2, rel=1e-9)
    # and every PPO model has the same FP8 linear weights (the critic's scalar head is no FP8 GEMM either): the
    # trained actor and critic each save 1 byte per linear weight, whatever their head
    ppo, ppo8 = (estimate(model, lay_, precision="fp8", stage_kind="ppo")
                 for lay_ in (lay, dataclasses.replace(lay, fp8_param_gather=True)))
    assert ppo.weights - ppo8.weights == pytest.approx(2 * linear, abs=4)


def test_a_rollout_holds_its_stages_kv_cache_for_the_whole_batch() -> None:
    """GRPO / PPO decode the DP rank's whole batch at once (runtime/generation.py), each pipeline stage
    caching only its layers: the KV cache is 2 x seq x batch x groups/tp x head_dim x 2 B per layer, half
    per stage at PP = 2; when it outgrows the step's freed activations the plan counts the difference."""
    model = PRESETS["llama3_8b"]  # 8 query groups of 128
    lay = layout(tp=2, dp=4, micro_batch=1, global_batch=512, num_microbatches=128)
    per_layer = 2 * 4096 * (128 * 8) * (8 / 2) * 128 * 2
    assert rollout_kv_cache(model, lay, seq=4096, rows=8, layers=32) == pytest.approx(32 * per_layer)
    piped = layout(tp=2, pp=2, dp=2, micro_batch=1, global_batch=512, num_microbatches=256)
    assert rollout_kv_cache(model, piped, seq=4096, rows=8, layers=16) == pytest.approx(2 * 16 * per_layer)
    params = {"num_generations": 8, "max_new_tokens": 512}
    grpo = estimate(model, lay, gpu="H100", stage_kind="grpo", seq_length=4096, params=params)
    assert grpo.parts.get("rollout_kv_cache", 0) > 0  # 1,024 sequences of 4,096 tokens: 256 GiB of cache
    small = layout(tp=2, dp=4, micro_batch=1, global_batch=8, num_microbatches=2)
    assert "rollout_kv_cache" not in estimate(model, small, gpu="H100", stage_kind="grpo", seq_length=4096,
                                              params=params).parts  # under the step's activations


def test_context_parallelism_splits_the_training_activations_but_not_the_rollouts_kv_cache() -> None:
    """Every CP rank decodes the whole rows (runtime/generation.py: the rollout is not split), so a GRPO
    stage at cp = 2 holds the same KV cache as at cp = 1 for the same DP rank's batch, while its training
    activations (each rank's shard of every row) halve."""
    model = PRESETS["llama3_8b"]
    one = layout(tp=2, dp=4, micro_batch=1, global_batch=512, num_microbatches=128)
    two = layout(tp=2, cp=2, dp=4, micro_batch=1, global_batch=512, num_microbatches=128)
    assert rollout_kv_cache(model, two, seq=4096, rows=8, layers=32) == rollout_kv_cache(model, one, seq=4096, rows=8,
                                                                                         layers=32)
    params = {"num_generations": 8, "max_new_tokens": 512}
    a = estimate(model, one, gpu="H100", stage_kind="grpo", seq_length=4096, params=params)
    b = estimate(model, two, gpu="H100", stage_kind="grpo", seq_length=4096, params=params)
    assert b.activations == pytest.approx(a.activations / 2, rel=0.05)
    # the cache outgrows the freed activations at both: the difference grows by the activations cp saved
    dynamic = lambda m: m.parts["rollout_kv_cache"] + m.activations  # noqa: E731
    assert b.parts["rollout_kv_cache"] > a.parts["rollout_kv_cache"] > 0
    assert dynamic(b) > 0.9 * rollout_kv_cache(model, two, seq=4096, rows=8, layers=32)


def test_bf16_optimizer_state_holds_two_byte_moments_and_a_master_remainder() -> None:
    """optimizer_state_dtype = bf16 (Megatron-Core's precision-aware optimizer): 2-byte Adam moments, and
    the fp32 master kept as its 16-bit remainder beside bf16 weights (store_param_remainders) where
    FusedAdam owns the master (bf16, or fp8 with delayed scaling): 6 B of sharded state per parameter
    instead of 12; with FP8 current scaling Megatron-Core keeps the 4-byte fp32 master itself: 8 B.
    Weights, gradients and activations do not move."""
    model = PRESETS["llama3_8b"]
    lay = Layout(tp=2, pp=1, vp=None, cp=1, ep=1, etp=2, dp=4, micro_batch=1, global_batch=8, num_microbatches=2,
                 sequence_parallel=True, distributed_optimizer=True, recompute="none")
    half = dataclasses.replace(lay, optimizer_state_dtype="bf16", precision_aware_optimizer=True)
    for precision, recipe, state in (("bf16", None, 6), ("fp8", "delayed", 6), ("fp8", "tensorwise", 8)):
        base = estimate(model, lay, precision=precision, fp8_recipe=recipe)
        low = estimate(model, half, precision=precision, fp8_recipe=recipe)
        assert low.optimizer == pytest.approx(base.optimizer * state / 12, rel=1e-9)
        assert (low.weights, low.gradients, low.activations) == (base.weights, base.gradients, base.activations)
    fp32 = estimate(model, lay, precision="fp32")
    assert estimate(model, half, precision="fp32").optimizer == pytest.approx(fp32.optimizer / 2, rel=1e-9)


def test_fp32_moment_precision_aware_optimizer_keeps_a_master_remainder_and_no_fp32_gradient_copy() -> None:
    """precision_aware_optimizer with fp32 moments (Megatron-Bridge's bf16 Adam): FusedAdam owns the master weight
    where Megatron-Core lets it (bf16, or fp8 with delayed scaling), stored as the 16-bit remainder beside the bf16
    weight: 4 + 4 + 2 = 10 B of sharded state per parameter instead of 12; and it reads the 16-bit gradient shard
    in place (`decoupled_grad`), so the step's fp32 gradient copy of a bf16-reduced gradient is gone. With FP8
    current scaling Megatron-Core keeps its own fp32 master and copy: nothing moves."""
    model = PRESETS["llama3_8b"]
    lay = Layout(tp=2, pp=1, vp=None, cp=1, ep=1, etp=2, dp=4, micro_batch=1, global_batch=8, num_microbatches=2,
                 sequence_parallel=True, distributed_optimizer=True, recompute="none", grad_reduce_in_fp32=False)
    aware = dataclasses.replace(lay, precision_aware_optimizer=True)
    for precision, recipe, state, copy_gone in (("bf16", None, 10, True), ("fp8", "delayed", 10, True),
                                                ("fp8", "tensorwise", 12, False)):
        # a short sequence, so that the step's fp32 gradient copy outgrows the freed activations
        base = estimate(model, lay, precision=precision, fp8_recipe=recipe, grad_bytes=2, seq_length=512)
        new = estimate(model, aware, precision=precision, fp8_recipe=recipe, grad_bytes=2, seq_length=512)
        assert new.optimizer == pytest.approx(base.optimizer * state / 12, rel=1e-9), precision
        assert (new.weights, new.gradients, new.activations) == (base.weights, base.gradients, base.activations)
        step = base.parts["optimizer_step_fp32_grads"]
        assert step > 0 and new.parts.get("optimizer_step_fp32_grads", 0) == (0 if copy_gone else step)
    assert memory.optimizer_bytes(lay, "bf16", None) == (4, 4, True)
    assert memory.optimizer_bytes(aware, "bf16", None) == (4, 2, False)
    # nvfp4 has no fp8_recipe (its FP4 recipe is TransformerConfig's): FusedAdam owns the master, 10 B not 12 B
    assert memory.optimizer_bytes(aware, "nvfp4", None) == (4, 2, False)


def test_precision_aware_optimizer_through_the_language(tmp_path) -> None:
    """`parallel.precision_aware_optimizer = true` plans the layout with it (the runtime's OptimizerConfig reads
    it: tests/runtime/test_model_args.py) and 10 B of optimizer state per parameter instead of 12; auto keeps
    the meaning files had: off with fp32 moments, on with bf16 ones."""
    from nemoc.compiler.lower import compile_file
    from nemoc.compiler.planner import plan_experiment

    def plan(setting: str):
        path = tmp_path / "p.nemo"
        path.write_text("experiment p {\n  cluster { gpu = H100  nodes = 1  gpus_per_node = 8 }\n"
                        "  model llama3_8b { seq_length = 4096 }\n"
                        "  parallel { tensor = 2  pipeline = 1  data = 4  micro_batch = 1  recompute = none  "
                        f"{setting} }}\n  stage pretrain {{ steps = 10  global_batch = 64 }}\n}}\n")
        spec, diags, _ = compile_file(str(path))
        assert not [d for d in diags if d.is_error]
        return plan_experiment(spec).plan.stages[0]

    auto, aware, bf16 = (plan(s) for s in ("", "precision_aware_optimizer = true", "optimizer_state_dtype = bf16"))
    assert (auto.layout.precision_aware_optimizer, aware.layout.precision_aware_optimizer,
            bf16.layout.precision_aware_optimizer) == (False, True, True)
    assert aware.memory.optimizer == pytest.approx(auto.memory.optimizer * 10 / 12, rel=1e-6)
    assert bf16.memory.optimizer == pytest.approx(auto.memory.optimizer * 6 / 12, rel=1e-6)


def test_mxfp8_parameters_are_all_gathered_through_the_gradient_buffer(tmp_path) -> None:
    """precision = mxfp8 with fp8_param_gather on a B200: the plan sets reuse_grad_buf_for_mxfp8_param_ag (as
    Megatron-Bridge's MXFP8 recipes; Megatron-Core 0.16.1 shares one buffer between the MXFP8 all-gather and
    the gradients) and says so; the memory counts no all-gather buffer beside the gradients: FP8 parameters
    save the same 2 bytes per linear weight as with fp8, and gradients and optimizer state do not move."""
    from nemoc.compiler.lower import compile_file
    from nemoc.compiler.planner import plan_experiment

    def plan(precision: str, gather: bool):
        path = tmp_path / "m.nemo"
        path.write_text("experiment m {\n  cluster { gpu = B200  nodes = 1  gpus_per_node = 8 }\n"
                        "  model llama3_8b { seq_length = 4096 }\n"
                        "  parallel { tensor = 2  pipeline = 1  data = 4  micro_batch = 1  recompute = none  "
                        f"fp8_param_gather = {str(gather).lower()} }}\n  precision = {precision}\n"
                        "  stage pretrain { steps = 10  global_batch = 64 }\n}\n")
        spec, diags, _ = compile_file(str(path))
        assert not [d for d in diags if d.is_error]
        result = plan_experiment(spec)
        return result.plan.stages[0], result.stages[0].notes

    (mx, notes), (mx_plain, plain_notes) = plan("mxfp8", True), plan("mxfp8", False)
    assert mx.execution.reuse_grad_buf_for_mxfp8_param_ag and not mx_plain.execution.reuse_grad_buf_for_mxfp8_param_ag
    assert any("reuse_grad_buf_for_mxfp8_param_ag" in n for n in notes)
    assert not any("reuse_grad_buf_for_mxfp8_param_ag" in n for n in plain_notes)
    assert not plan("fp8", True)[0].execution.reuse_grad_buf_for_mxfp8_param_ag
    linear = mx_plain.memory.parts["fp8_weight_cache"] / 2
    assert mx_plain.memory.total - mx.memory.total == pytest.approx(2 * linear, rel=1e-6, abs=8)
    assert (mx.memory.gradients, mx.memory.optimizer) == (mx_plain.memory.gradients, mx_plain.memory.optimizer)


def test_layers_kept_in_bf16_hold_no_low_precision_copies_and_save_16_bit_inputs() -> None:
    """The first / last layers kept in bf16 (first_last_layers_bf16): no NVFP4 / FP8 weight copies for them
    (the caches shrink by their share of the stage's layers), 16-bit weights where fp8_param_gather keeps the
    others in FP8, and (fp8 / mxfp8) their saved GEMM inputs in 16 bits instead of FP8's one byte. They sit on
    the stages that hold them: at PP 2 the last 4 layers are all on the last stage, none on the first."""
    model = PRESETS["llama3_8b"]
    lay = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=8, micro_batch=1, global_batch=8, num_microbatches=1,
                 sequence_parallel=False, distributed_optimizer=True, recompute="none")
    fp4 = estimate(model, lay, precision="nvfp4", gpu="B200")
    fp4_kept = estimate(model, lay, precision="nvfp4", gpu="B200", bf16_layers=(0, 4))
    per_layer = param_counts(model).per_layer
    assert fp4.parts["fp4_weight_cache"] - fp4_kept.parts["fp4_weight_cache"] == pytest.approx(
        4 * per_layer * 2 * memory.NVFP4_BYTES, rel=1e-6)
    assert (fp4_kept.weights, fp4_kept.activations) == (fp4.weights, fp4.activations)
    gather = dataclasses.replace(lay, fp8_param_gather=True)
    fp8 = estimate(model, gather, precision="fp8")
    fp8_kept = estimate(model, gather, precision="fp8", bf16_layers=(1, 1))
    linear_per_layer = param_counts(model).per_layer
    assert fp8.parts["fp8_weight_cache"] - fp8_kept.parts["fp8_weight_cache"] == pytest.approx(
        2 * linear_per_layer, rel=1e-6)
    assert fp8_kept.weights - fp8.weights == pytest.approx(2 * linear_per_layer, rel=1e-6, abs=2)
    assert fp8_kept.activations > fp8.activations
    piped = [dataclasses.replace(lay, pp=2, dp=4)]
    first, last = memory.pipeline_stages(model, piped[0], precision="nvfp4", gpu="B200", bf16_layers=(0, 4))
    first0, last0 = memory.pipeline_stages(model, piped[0], precision="nvfp4", gpu="B200")
    assert first.parts["fp4_weight_cache"] == first0.parts["fp4_weight_cache"]
    assert last.parts["fp4_weight_cache"] < last0.parts["fp4_weight_cache"]


def test_megatron_fsdp_never_reuses_the_gradient_buffer_for_mxfp8(tmp_path) -> None:
    """Under Megatron-FSDP the distributed optimizer keeps no DDP buffers (Megatron-Core 0.16.1
    distrib_optimizer.py returns from `__init__` before `self.buffers` with `use_megatron_fsdp`): a plan with
    reuse_grad_buf_for_mxfp8_param_ag failed at the first step with AttributeError. Megatron-FSDP gathers MXFP8
    parameters itself: the flag stays off and the note says who gathers."""
    from nemoc.compiler.execution import reuses_grad_buffer
    from nemoc.compiler.lower import compile_file
    from nemoc.compiler.planner import plan_experiment

    lay = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=8, micro_batch=1, global_batch=8, num_microbatches=1,
                 sequence_parallel=False, distributed_optimizer=True, recompute="none", fp8_param_gather=True)
    assert reuses_grad_buffer("mxfp8", lay)
    assert not reuses_grad_buffer("mxfp8", dataclasses.replace(lay, megatron_fsdp=True))

    path = tmp_path / "m.nemo"
    path.write_text("experiment m {\n  cluster { gpu = B200  nodes = 1  gpus_per_node = 8 }\n"
                    "  model llama3_8b { seq_length = 4096 }\n"
                    "  parallel { tensor = 1  pipeline = 1  data = 8  micro_batch = 1  recompute = none  "
                    "fp8_param_gather = true  megatron_fsdp = true }\n  precision = mxfp8\n"
                    "  stage pretrain { steps = 10  global_batch = 64 }\n}\n")
    spec, diags, _ = compile_file(str(path))
    assert not [d for d in diags if d.is_error], diags
    result = plan_experiment(spec)
    stage, notes = result.plan.stages[0], result.stages[0].notes
    assert stage.layout.megatron_fsdp and stage.layout.fp8_param_gather
    assert not stage.execution.reuse_grad_buf_for_mxfp8_param_ag
    assert any("Megatron-FSDP's own buffers" in n for n in notes)
    assert not any("through the gradient buffer" in n for n in notes)


@pytest.mark.parametrize("model,precision,bf16_layers,kind,recompute,tp", [
    ("mixtral_8x7b", "nvfp4", (3, 0), "eval", "none", 1),
    ("mixtral_8x7b", "fp8", (1, 1), "pretrain", "full", 4),
    ("llama3_8b", "fp8", (2, 2), "dpo", "selective", 1),
])
def test_estimate_is_never_below_a_middle_stage_with_bf16_first_last_layers(model, precision, bf16_layers, kind,
                                                                              recompute, tp):
    """The bf16 first / last layers hold no FP8 / FP4 weight caches, so the stages holding them can be lighter than
    a middle one at pp 3: `estimate` compares the earliest stage with the fewest bf16 layers too (review finding:
    Mixtral pp 3 nvfp4 eval was 144 MB under its stage 1)."""
    m = PRESETS[model]
    layout = Layout(tp=tp, pp=3, vp=None, cp=1, ep=8 if m.is_moe else 1, etp=1, dp=8, micro_batch=1,
                    global_batch=64, num_microbatches=8, sequence_parallel=tp > 1, distributed_optimizer=True,
                    recompute=recompute)
    kw = dict(stage_kind=kind, gpu="H100", seq_length=4096, precision=precision, bf16_layers=bf16_layers,
              fp8_recipe="delayed")
    stages = [s.total for s in memory.pipeline_stages(m, layout, **kw)]
    assert memory.estimate(m, layout, **kw).total == max(stages)
