"""The experiment's `kernels` setting (te | local | auto): parsing, its default per cluster kind, the
rules that need Transformer Engine, how the planner threads it into the cost and memory models, and
plans written before the field existed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from nemoc.compiler.lower import compile_file
from nemoc.compiler.plan import from_dict, from_json, to_json
from nemoc.compiler.planner import plan_experiment
from nemoc.compiler.plan import PLAN_VERSION
from nemoc.compiler.rules import check_spec
from nemoc.compiler.spec import ParallelSpec, StageSpec, resolve_kernels
from nemoc.dsl.diagnostics import render_all
from nemoc.runtime.cli.common import load_spec
from nemoc.runtime.target import NEMOC_RUNTIME

GPU_EXAMPLE = "examples/llama3_8b_pretrain.nemo"
CPU_EXAMPLE = "examples/quickstart.nemo"

SOURCE = """experiment k {{
  cluster {{ gpu = {gpu}  nodes = 1  gpus_per_node = 8 }}
  model llama3_8b {{ seq_length = 4096 }}
  {setting}
  stage pretrain {{ steps = 10  global_batch = 64 }}
}}
"""


def _compile(tmp_path, setting: str, gpu: str = "H100"):
    path = tmp_path / "k.nemo"
    path.write_text(SOURCE.format(gpu=gpu, setting=setting))
    return compile_file(str(path))


@pytest.mark.parametrize("setting, expected", [("kernels = te", "te"), ("kernels = local", "local"),
                                               ("kernels = auto", "auto"), ("", "auto")])
def test_the_setting_parses_and_defaults_to_auto(tmp_path, setting, expected):
    spec, diags, _ = _compile(tmp_path, setting)
    assert not [d for d in diags if d.is_error]
    assert spec.kernels == expected
    if setting:
        assert spec.span("kernels").line == 4


def test_a_bad_value_is_an_error_at_the_value_with_a_suggestion(tmp_path):
    spec, diags, sources = _compile(tmp_path, "kernels = tee")
    (d,) = [d for d in diags if d.is_error]
    assert spec is None and d.code == "E033"
    assert (d.span.line, d.span.col) == (4, 13)
    text = render_all([d], sources)
    assert "k.nemo:4:13: error[E033]" in text and "^^^" in text and "did you mean `te`?" in text


def test_auto_is_te_on_gpus_and_local_on_the_cpu():
    assert resolve_kernels("auto", "H100") == "te" and resolve_kernels("auto", "CPU") == "local"
    assert resolve_kernels("local", "H100") == "local" and resolve_kernels("te", "B200") == "te"
    gpu = plan_experiment(load_spec(GPU_EXAMPLE)[0], target=NEMOC_RUNTIME).plan
    cpu = plan_experiment(load_spec(CPU_EXAMPLE)[0], target=NEMOC_RUNTIME).plan
    assert gpu.kernels == "te" and [s.kernels for s in gpu.stages] == ["te"]
    assert cpu.kernels == "local" and [s.kernels for s in cpu.stages] == ["local"]


def test_alignment_stages_are_planned_with_te_and_export_with_the_local_spec():
    """runtime/align builds sft/dpo with the stage's kernels (TE where installed: the core's build) and
    exports with the local spec on the host; a target that runs every kind with TE (Megatron-Core's own)
    plans export with `te` too: the target is data."""
    spec = load_spec("examples/llama3_70b_sft_dpo.nemo")[0]
    plan = plan_experiment(spec, target=NEMOC_RUNTIME).plan
    assert plan.kernels == "te"
    assert {s.kind: s.kernels for s in plan.stages} == {"sft": "te", "dpo": "te", "export": "local"}
    # sft and dpo run the experiment's attention core (packed rows as variable-length segments); export
    # computes no attention
    assert {s.kind: s.execution.attention for s in plan.stages} == {
        "sft": plan.attention_backend, "dpo": plan.attention_backend, "export": "unfused"}
    assert plan.attention_backend != "unfused"
    assert [NEMOC_RUNTIME.stage_kernels(k, "te") for k in ("pretrain", "sft", "export")] == ["te", "te", "local"]
    full = plan_experiment(spec).plan  # NO_TARGET: Megatron-Core's own capabilities
    assert {s.kind: s.kernels for s in full.stages} == {"sft": "te", "dpo": "te", "export": "te"}


def test_alignment_stages_and_rl_kinds_interleave_their_pipeline():
    """The nemoc runtime's sft/dpo/reward run 1F1B or the interleaved schedule (vp chunks per pipeline
    rank), PPO and GRPO too (the rollout generator walks a rank's chunks in the interleaved order)."""
    assert NEMOC_RUNTIME.caps("sft").pipeline and NEMOC_RUNTIME.caps("sft").virtual_pipeline
    for kind in ("ppo", "grpo"):
        assert NEMOC_RUNTIME.caps(kind).pipeline and NEMOC_RUNTIME.caps(kind).virtual_pipeline
    spec, _ = load_spec("examples/llama3_70b_sft_dpo.nemo")
    fixed = replace(spec, parallel=replace(spec.parallel, pipeline=2, virtual_pipeline=2))
    assert not [d for d in check_spec(fixed, target=NEMOC_RUNTIME) if d.code == "E126"]
    plan = plan_experiment(fixed, target=NEMOC_RUNTIME).plan
    assert all((s.layout.pp, s.layout.vp) == (2, 2) for s in plan.stages if s.kind in ("sft", "dpo")), \
        [(s.name, s.layout) for s in plan.stages]


def test_local_kernels_cost_more_time_and_activation_memory_for_the_same_layout():
    spec, _ = load_spec(GPU_EXAMPLE)
    te = plan_experiment(replace(spec, kernels="te"), target=NEMOC_RUNTIME).plan.stages[0]
    fixed = ParallelSpec(tensor=te.layout.tp, pipeline=te.layout.pp, virtual_pipeline=te.layout.vp or 1,
                         context=1, expert=1, data=te.layout.dp, micro_batch=te.layout.micro_batch,
                         recompute=te.layout.recompute, sequence_parallel=te.layout.sequence_parallel,
                         distributed_optimizer=te.layout.distributed_optimizer)
    te_fixed = plan_experiment(replace(spec, kernels="te", parallel=fixed), target=NEMOC_RUNTIME).plan.stages[0]
    local = plan_experiment(replace(spec, kernels="local", parallel=fixed), target=NEMOC_RUNTIME).plan.stages[0]
    assert local.layout == te_fixed.layout == te.layout
    assert local.kernels == "local" and te_fixed.kernels == "te"
    assert local.estimate.step_time_s / te_fixed.estimate.step_time_s > 1.05
    assert local.memory.activations / te_fixed.memory.activations > 1.2


@pytest.mark.parametrize("precision", ["fp8", "mxfp8"])
def test_fp8_with_local_kernels_is_refused(precision):
    spec, _ = load_spec(GPU_EXAMPLE)
    spec = replace(spec, precision=precision, cluster=replace(spec.cluster, gpu="B200"), kernels="local")
    assert "E127" in {d.code for d in check_spec(spec, target=NEMOC_RUNTIME)}
    assert "E127" not in {d.code for d in check_spec(replace(spec, kernels="te"), target=NEMOC_RUNTIME)}


def test_context_parallelism_with_local_kernels_needs_the_sdpa_core():
    """The nemoc runtime's local spec splits sequences on its SDPA core (attention_backend auto / flash /
    fused), not on Megatron's unfused core; bare Megatron-Core's local spec has no such core."""
    from nemoc.compiler.target import MEGATRON_CORE

    spec, _ = load_spec(GPU_EXAMPLE)
    spec = replace(spec, parallel=replace(spec.parallel, context=2), kernels="local", attention_backend="flash")
    assert "E113" not in {d.code for d in check_spec(spec, target=NEMOC_RUNTIME)}
    (d,) = [d for d in check_spec(replace(spec, attention_backend="unfused"), target=NEMOC_RUNTIME) if d.code == "E113"]
    assert "unfused DotProductAttention (kernels local, attention_backend unfused)" in d.equation
    assert d.hint == "set attention_backend = auto, flash or fused"
    assert d.span.line == spec.span("parallel.context").line
    (bare,) = [d for d in check_spec(spec, target=MEGATRON_CORE) if d.code == "E113"]
    assert "kernels local" in bare.equation and "kernels = te" in bare.hint
    assert "E113" not in {d.code for d in check_spec(replace(spec, kernels="auto"), target=MEGATRON_CORE)}


def test_te_kernels_on_the_cpu_are_refused():
    spec, _ = load_spec(CPU_EXAMPLE)
    assert "E128" in {d.code for d in check_spec(replace(spec, kernels="te"), target=NEMOC_RUNTIME)}
    assert "E128" not in {d.code for d in check_spec(spec, target=NEMOC_RUNTIME)}


@pytest.mark.parametrize("example", [GPU_EXAMPLE, CPU_EXAMPLE, "examples/llama3_70b_sft_dpo.nemo"])
def test_a_plan_of_an_older_version_is_refused_naming_both_versions(example):
    plan = plan_experiment(load_spec(example)[0], target=NEMOC_RUNTIME).plan
    assert from_json(to_json(plan)) == plan
    old = json.loads(to_json(plan))
    old["version"] = 1
    for s in old["stages"]:
        s.pop("execution")
    with pytest.raises(ValueError, match=f"plan version 1 is not supported: this nemoc reads plan version "
                                         f"{PLAN_VERSION}; re-plan"):
        from_dict(old)
    with pytest.raises(ValueError, match="use the nemoc that wrote it"):
        from_dict(dict(old, version=PLAN_VERSION + 1))


def test_a_local_plan_on_a_gpu_round_trips_and_keeps_its_setting():
    spec, _ = load_spec(GPU_EXAMPLE)
    plan = plan_experiment(replace(spec, kernels="local"), target=NEMOC_RUNTIME).plan
    assert from_json(to_json(plan)).kernels == "local" and from_json(to_json(plan)).stages[0].kernels == "local"


def test_a_stage_level_kind_does_not_change_the_experiment_setting():
    spec, _ = load_spec(GPU_EXAMPLE)
    stages = spec.stages + (StageSpec(name="sft", kind="sft", after=("pretrain",), steps=10, global_batch=128),
                            StageSpec(name="export", kind="export", after=("sft",)))
    plan = plan_experiment(replace(spec, stages=stages, kernels="te"), target=NEMOC_RUNTIME).plan
    assert plan.kernels == "te" and [s.kernels for s in plan.stages] == ["te", "te", "local"]


MISTRAL_7B_CONFIG = {  # mistralai/Mistral-7B-v0.1 config.json
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 32000}


def test_mistral_7b_lora_sft_on_8_h100_runs_the_pretraining_attention_not_unfused_tp8(tmp_path):
    """The plan a new user gets for a Mistral 7B LoRA SFT on one 8-H100 node: the stage runs the
    experiment's attention core (SDPA / TE flash, packed rows as variable-length segments), so the s x s
    scores no longer push it to TP8 (it was TP4-TP8 at 11-17 % MFU with the unfused core)."""
    import json

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(MISTRAL_7B_CONFIG))
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "m.nemo").write_text("""experiment mistral_lora {
  cluster { gpu = H100  nodes = 1  gpus_per_node = 8 }
  model mistral_7b { init = hf("ckpt")  seq_length = 4096 }
  precision = bf16
  data chat { path = "chat.jsonl"  format = chat }
  stage sft { data = [chat]  steps = 1000  global_batch = 128  peft = lora(rank = 16, alpha = 32) }
}
""")
    spec, diags = load_spec(str(tmp_path / "m.nemo"))
    stage = plan_experiment(spec, target=NEMOC_RUNTIME).plan.stages[0]
    assert stage.execution.attention != "unfused"
    assert stage.layout.tp < 8 and stage.layout.dp >= 2, stage.layout
    assert stage.estimate.mfu > 0.3, stage.estimate


def test_te_kernels_price_transformer_engines_fused_cross_entropy():
    """`kernels = te` runs (and is priced with) Transformer Engine's fused cross entropy, as Megatron-Bridge's
    performance recipes: the loss moves CROSS_ENTROPY_BYTES_TE (6 + 4 B) per logit instead of the unfused
    38 + 14, and keeps 2 B per logit (the 16-bit logits holding the gradient) instead of the fp32 softmax's 4;
    the plan records it in `execution.fusions.cross_entropy`. The local spec keeps Megatron-Core's loss."""
    from nemoc.compiler import cost, memory
    from nemoc.compiler.catalog import PRESETS, get_gpu
    from nemoc.compiler.plan import Layout

    assert cost.CROSS_ENTROPY_BYTES_TE == (6.0, 4.0) and cost.CROSS_ENTROPY_BYTES == (38.0, 14.0)
    model = PRESETS["llama3_8b"]
    lay = Layout(tp=2, pp=1, vp=None, cp=1, ep=1, etp=1, dp=4, micro_batch=1, global_batch=64, num_microbatches=16,
                 sequence_parallel=True, distributed_optimizer=True, recompute="none")
    hw, seq = get_gpu("H100"), 4096
    lt = cost.layer_times(model, lay, hw, seq=seq, precision="bf16", attention_backend="flash", micro_batch=1)
    _, _, te = cost._stage_times(model, lay, hw, lt, seq=seq, micro_batch=1, backward=2.0,
                                 params=cost.DEFAULT_PARAMS, kernels="te")
    _, _, local = cost._stage_times(model, lay, hw, lt, seq=seq, micro_batch=1, backward=2.0,
                                    params=cost.DEFAULT_PARAMS, kernels="local")
    logits = seq * cost.padded_vocab(model.vocab, lay.tp) / lay.tp  # per GPU and micro batch
    assert local - te == pytest.approx((52.0 - 10.0) * logits / hw.hbm_bw, rel=1e-9)
    mem = {k: memory.estimate(model, lay, seq_length=seq, gpu="H100", kernels=k).parts["logits"] for k in ("te", "local")}
    assert mem["te"] == logits * 2 and mem["local"] == logits * 4
    spec, _ = load_spec(GPU_EXAMPLE)
    for kernels, loss in (("te", "te"), ("local", "none")):  # cross_entropy_fusion auto
        stage = plan_experiment(replace(spec, kernels=kernels), target=NEMOC_RUNTIME).plan.stages[0]
        assert stage.execution.fusions.cross_entropy == loss
