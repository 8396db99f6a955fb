"""Multi-token prediction in the plan: the preset's depth, the parameter count stated apart from the main model,
FLOPs as Megatron-LM counts them, the last stage's memory and time, the MTP-weighted pipeline split, the rules
(E204, E209, E210, E211, W127, W128) and Megatron-LM's flags."""

from __future__ import annotations

import dataclasses

import pytest

from nemoc.compiler import memory
from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.flops import flops_per_token, mtp_layer_equivalents, param_counts
from nemoc.compiler.plan import Layout
from nemoc.compiler.rules import model_split, pipeline_split

V3 = get_preset("deepseek_v3")


def test_presets_depth_and_the_separate_count():
    assert V3.mtp_num_layers == 1 and V3.mtp_loss_scaling_factor == 0.1
    assert get_preset("deepseek_v2_lite").mtp_num_layers == 0
    counts = param_counts(V3)
    assert counts.total == 671_026_404_352  # the paper's 671B main model, unchanged
    # one expert layer (the last layer's kind) + enorm + hnorm + final norm + eh_proj 2h x h
    assert counts.mtp == counts.per_layer + 3 * V3.hidden + 2 * V3.hidden ** 2 == 11_610_067_968
    # with the embedding and head HF stores again at model.layers.61: 684.5B, the model card's "685B"
    assert counts.total_with_mtp + 2 * V3.vocab * V3.hidden == 684_489_830_400
    assert param_counts(V3.without_mtp()).mtp == 0


def test_flops_follow_megatron_lm():
    """Megatron-LM training.py num_floating_point_operations: one more layer of the last layer's kind, eh_proj and
    the logits again, per depth."""
    with_mtp, without = flops_per_token(V3, 4096, True), flops_per_token(V3.without_mtp(), 4096, True)
    counts = param_counts(V3)
    h = V3.hidden
    assert with_mtp.logits == 2 * without.logits
    assert with_mtp.mtp == 2 * (counts.attention + counts.mlp_active + 2 * h * h) + without.attention_core / V3.layers
    assert with_mtp.forward / without.forward == pytest.approx(1.0407, abs=1e-4)
    assert mtp_layer_equivalents(V3) == 3 and mtp_layer_equivalents(V3.without_mtp()) == 0


def test_the_split_weights_the_last_stage():
    """Megatron-Bridge's PP 16 DeepSeek-V3 layout: 4 decoders per stage, the last 1 decoder + mtp + loss."""
    assert pipeline_split(61, 16).stage_layers(16) == (2, 4, 3)
    split = model_split(V3, 16)
    assert split.stage_layers(16) == (4, 4, 1) and split.params() == {
        "num_layers_in_first_pipeline_stage": 4, "num_layers_in_last_pipeline_stage": 1}
    assert model_split(V3.without_mtp(), 16) == pipeline_split(61, 16)


def _layout(pp: int, **kw) -> Layout:
    base = dict(tp=4, pp=pp, vp=None, cp=1, ep=8, etp=1, dp=32 // pp, micro_batch=1, global_batch=64,
                num_microbatches=2 * 32 // pp, sequence_parallel=True, distributed_optimizer=True, recompute="none")
    return Layout(**{**base, **kw})


@pytest.mark.parametrize("tied", [False, True])
def test_last_stage_holds_the_depth(tied):
    """The depth's embedding copy is counted with tied embeddings too: the last stage's output layer then allocates
    its own (unused) weight beside it (gpt_model.py skip_weight_param_allocation is False past stage 0)."""
    layout = _layout(16)
    model = dataclasses.replace(V3, tie_embeddings=True) if tied else V3
    split = model_split(V3, 16).stage_layers(16)
    kw = dict(precision="bf16", gpu="H100", split=split)
    with_mtp = memory.pipeline_stages(model, layout, **kw)
    without = memory.pipeline_stages(model.without_mtp(), layout, **kw)
    assert [a.total for a in with_mtp[:-1]] == [b.total for b in without[:-1]]  # only the last stage changes
    last, last0 = with_mtp[-1], without[-1]
    assert last.weights > last0.weights and last.activations > last0.activations
    assert last.parts["logits"] == pytest.approx(2 * last0.parts["logits"], abs=1)
    # the depth's weights: its expert layer's experts over EP, the rest over TP, and the embedding copy
    counts = param_counts(V3)
    local = (counts.expert / layout.ep + (counts.mtp - counts.expert) / layout.tp
             + 129536 * V3.hidden / layout.tp)
    assert last.weights - last0.weights == pytest.approx(2 * local, rel=1e-6)


CHECK = """
experiment e {{
  cluster {{ gpu = H100
    nodes = 1 }}
  model m {{ layers = 2
    hidden = 64
    heads = 4
    ffn_hidden = 128
    vocab = 256
    seq_length = 64
{model} }}
  data d {{ path = "x.jsonl"
    tokenizer = "t.json" }}
  stage pretrain {{ data = [d]
    steps = 10
    global_batch = 8 }}
{more}}}
"""


def _codes(tmp_path, model: str = "", more: str = "") -> list[str]:
    from nemoc.runtime.cli.lang import check_file

    path = tmp_path / "e.nemo"
    path.write_text(CHECK.format(model=model, more=more))
    diagnostics, _ = check_file(str(path))
    return [d.code for d in diagnostics]


def test_rules(tmp_path):
    assert "W127" in _codes(tmp_path, "    mtp_loss_scaling_factor = 0.3\n")
    assert "W127" not in _codes(tmp_path, "    mtp_num_layers = 1\n    mtp_loss_scaling_factor = 0.3\n")
    assert "E209" in _codes(tmp_path, "    mtp_num_layers = 1\n    norm_zero_centered = true\n")
    assert "E209" not in _codes(tmp_path, "    mtp_num_layers = 1\n")
    assert "W128" not in _codes(tmp_path, "    mtp_num_layers = 1\n")


def _diagnostics(tmp_path, model: str = "", more: str = ""):
    from nemoc.runtime.cli.lang import check_file

    path = tmp_path / "e.nemo"
    text = CHECK.format(model=model, more=more)
    path.write_text(text)
    diagnostics, _ = check_file(str(path))
    return diagnostics, text.splitlines()


def test_tied_embeddings_with_mtp_need_one_pipeline_stage(tmp_path):
    """Megatron-Core 0.16.1 cannot checkpoint a tied model's MTP stage past stage 0 (language_module.py
    tie_embeddings_and_output_weights_state_dict asserts): an error at the user's tie_embeddings line."""
    tied = "    mtp_num_layers = 1\n    tie_embeddings = true\n"
    diagnostics, lines = _diagnostics(tmp_path, tied, "  parallel { pipeline = 2 }\n")
    (e210,) = [d for d in diagnostics if d.code == "E210"]
    assert lines[e210.span.line - 1].strip() == "tie_embeddings = true" and "pipeline = 1" in e210.hint
    assert "E210" not in _codes(tmp_path, tied, "  parallel { pipeline = 1 }\n")
    assert "E210" not in _codes(tmp_path, "    mtp_num_layers = 1\n", "  parallel { pipeline = 2 }\n")
    assert "E210" not in _codes(tmp_path, "    tie_embeddings = true\n", "  parallel { pipeline = 2 }\n")


def test_mtp_needs_rotary_or_no_position_embeddings(tmp_path):
    """Megatron-LM arguments.py refuses MTP with learned absolute positions: an error at the user's position line."""
    diagnostics, lines = _diagnostics(tmp_path, "    mtp_num_layers = 1\n    position = learned\n")
    (e211,) = [d for d in diagnostics if d.code == "E211"]
    assert lines[e211.span.line - 1].strip() == "position = learned"
    for position in ("rope", "none"):
        assert "E211" not in _codes(tmp_path, f"    mtp_num_layers = 1\n    position = {position}\n")
    assert "E211" not in _codes(tmp_path, "    position = learned\n")


def test_megatron_lm_flags_round_trip(tmp_path):
    """`nemoc export --megatron-args` writes --mtp-num-layers / --mtp-loss-scaling-factor, `nemoc import` reads them."""
    from nemoc.compiler.interop import import_text
    from nemoc.compiler.lower import load_experiment
    from nemoc.runtime.megatron_args import megatron_lm_command
    from plan_factory import TINY_MODEL, make_plan, with_executions

    model = dataclasses.replace(TINY_MODEL, mtp_num_layers=2, mtp_loss_scaling_factor=0.3)
    command = megatron_lm_command(with_executions(make_plan(tmp_path, model=model)), "pretrain")
    assert "--mtp-num-layers 2" in command and "--mtp-loss-scaling-factor 0.3" in command
    path = tmp_path / "imported.nemo"
    path.write_text(import_text(command, "run.sh", gpu="H100").text)
    spec, _ = load_experiment(str(path))
    assert (spec.model.mtp_num_layers, spec.model.mtp_loss_scaling_factor) == (2, 0.3)


CHAIN = """
experiment e {
  cluster { gpu = H100
    nodes = 1 }
  model m { layers = 2
    hidden = 64
    heads = 4
    ffn_hidden = 128
    vocab = 256
    seq_length = 64
    mtp_num_layers = 1 }
  data d { path = "x.jsonl"
    tokenizer = "t.json" }
  data chat { path = "x/*.jsonl"
    format = chat }
  stage pretrain { data = [d]
    steps = 10
    global_batch = 8 }
  stage sft after pretrain { data = [chat]
    steps = 10
    global_batch = 8 }
  stage export_base after pretrain { kind = export }
  stage export_sft after sft { kind = export }
}
"""


def test_only_pretrain_and_its_exports_build_the_depths(tmp_path):
    """W128 at each stage that runs the model without MTP (sft; an export of the sft checkpoint), anchored at the
    stage's line; those stages' plans (Execution, FLOPs) are the model's without the depths."""
    from nemoc.compiler.lower import compile_file
    from nemoc.compiler.planner import plan_experiment
    from nemoc.compiler.rules import check_spec

    path = tmp_path / "chain.nemo"
    path.write_text(CHAIN)
    spec, _, _ = compile_file(str(path))
    w128 = [d for d in check_spec(spec) if d.code == "W128"]
    lines = CHAIN.splitlines()
    assert sorted(lines[d.span.line - 1].split("{")[0].strip() for d in w128) == [
        "stage export_base after pretrain", "stage export_sft after sft", "stage sft after pretrain"], \
        [str(d) for d in w128]
    plan = plan_experiment(spec).plan
    mtp = {s.name: s.execution.mtp_num_layers for s in plan.stages}
    assert mtp == {"pretrain": 1, "sft": 0, "export_base": 0, "export_sft": 0}  # a standard-attention model
    assert plan.model.mtp_num_layers == 1
    pretrain, sft = plan.stage("pretrain"), plan.stage("sft")
    # the same model, layout and batch: the pretraining step counts the depth's FLOPs, the SFT step none
    assert pretrain.execution.model_flops_per_step > sft.execution.model_flops_per_step


def test_an_export_without_a_place_for_the_depth_warns(tmp_path):
    """A standard-attention model exports in a Llama-like layout, which has no MTP weights: W128 at the export."""
    from nemoc.compiler.lower import compile_file
    from nemoc.compiler.rules import check_spec

    path = tmp_path / "chain.nemo"
    path.write_text(CHAIN)
    spec, _, _ = compile_file(str(path))
    w128 = [d for d in check_spec(spec) if d.code == "W128"]
    assert any("export_base" in d.message and "Llama-like" in (d.equation or "") for d in w128), [str(d) for d in w128]


def test_an_mla_models_export_after_pretrain_keeps_the_depth(tmp_path):
    """An MLA model exports as DeepSeek-V3, whose layout holds the depth: the export after pretrain builds it, the one
    after sft (whose checkpoint has none) does not."""
    from nemoc.compiler.lower import compile_file
    from nemoc.compiler.planner import plan_experiment
    from nemoc.compiler.rules import check_spec

    path = tmp_path / "chain.nemo"
    path.write_text(CHAIN.replace("    mtp_num_layers = 1 }", "    mtp_num_layers = 1\n    multi_latent_attention = true\n"
                                  "    qk_layernorm = true\n    kv_lora_rank = 32 }"))
    spec, _, _ = compile_file(str(path))
    diags = check_spec(spec)
    assert not [d for d in diags if d.is_error], [str(d) for d in diags]
    assert sorted(d.message.split("`")[-2] for d in diags if d.code == "W128") == ["export_sft", "sft"]
    plan = plan_experiment(spec).plan
    assert {s.name: s.execution.mtp_num_layers for s in plan.stages} == {
        "pretrain": 1, "sft": 0, "export_base": 1, "export_sft": 0}


SFT_ONLY = """
experiment e {{
  cluster {{ gpu = H100
    nodes = 1 }}
  model m {{ layers = 8
    hidden = 1024
    heads = 8
    ffn_hidden = 4096
    vocab = 128000
    seq_length = 256
    mtp_num_layers = 1
    mtp_loss_scaling_factor = 0.3 }}
  data chat {{ path = "x/*.jsonl"
    format = chat }}
  parallel {{ pipeline = 4 }}
  stage s {{ data = [chat]
    kind = {kind}
    steps = 10
    global_batch = 8 }}
}}
"""


def test_a_stage_without_the_depths_is_checked_with_the_plain_split(tmp_path):
    """The large vocabulary makes the MTP head weigh several layers, so a pretrain stage gets an uneven split (W108);
    an sft stage runs without the depth (W128) and is checked with the even 2/2/2/2 split its plan uses, without
    W108 and without W127 about the loss weight it does not read."""
    from nemoc.compiler.lower import compile_file
    from nemoc.compiler.rules import check_spec

    def codes(kind):
        path = tmp_path / f"{kind}.nemo"
        path.write_text(SFT_ONLY.format(kind=kind))
        spec, _, _ = compile_file(str(path))
        return [d.code for d in check_spec(spec)]

    assert "W108" in codes("pretrain") and "W128" not in codes("pretrain")
    sft = codes("sft")
    assert "W128" in sft and "W108" not in sft and "W127" not in sft, sft
