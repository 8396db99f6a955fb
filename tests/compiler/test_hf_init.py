"""`init = hf("DIR")`: the architecture from config.json, check-time errors at the user's line, the
conversion as a task of the runtime graph."""

from __future__ import annotations

import json

import pytest

from nemoc.compiler.lower import compile_file
from nemoc.dsl.diagnostics import Severity

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
         "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def _experiment(model_body: str, stages: str) -> str:
    return f"""experiment ft {{
  cluster {{
    gpu = CPU
    gpus_per_node = 1
  }}
  model tiny {{
{model_body}
  }}
  precision = fp32
  data chat {{
    path = "chat.jsonl"
    format = chat
    tokenizer = "ckpt"
  }}
{stages}
}}
"""


SFT = """  stage sft {
    data = [chat]
    steps = 4
    global_batch = 2
    seq_length = 32
  }"""


def _compile(tmp_path, text: str, config=LLAMA):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes(b"weights-1")
    path = tmp_path / "ft.nemo"
    path.write_text(text)
    spec, diags, _sources = compile_file(str(path))
    return spec, [d for d in diags if d.severity == Severity.ERROR], text.splitlines()


def test_a_model_block_holding_only_init_takes_config_json(tmp_path):
    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT))
    assert errors == []
    m = spec.model
    assert (m.layers, m.hidden, m.heads, m.query_groups, m.ffn_hidden, m.vocab, m.seq_length) == (2, 64, 4, 2, 96, 200, 64)
    assert m.init == "ckpt"  # relative to the experiment root, like data paths


def test_named_argument_and_qwen3_family(tmp_path):
    qwen3 = dict(LLAMA, model_type="qwen3", head_dim=32)
    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf(path = "ckpt")', SFT), qwen3)
    assert errors == [] and spec.model.qk_layernorm and spec.model.kv_channels == 32


def test_a_field_that_disagrees_is_an_error_at_its_line_with_both_values(tmp_path):
    _, errors, lines = _compile(tmp_path, _experiment('    init = hf("ckpt")\n    heads = 8\n    layers = 2', SFT))
    assert [e.code for e in errors] == ["E046"]
    assert "heads = 8" in lines[errors[0].span.line - 1]
    assert "8" in errors[0].message and "says 4" in errors[0].message


def test_a_missing_directory_is_an_error_at_the_init_line(tmp_path):
    _, errors, lines = _compile(tmp_path, _experiment('    init = hf("nowhere")', SFT))
    assert [e.code for e in errors] == ["E045"]
    assert "nowhere" in lines[errors[0].span.line - 1] and "does not exist" in errors[0].message


def test_an_unsupported_architecture_names_the_key(tmp_path):
    scaled = dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0})
    _, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), scaled)
    assert [e.code for e in errors] == ["E045"] and "rope_scaling.low_freq_factor" in errors[0].message
    yarn = dict(LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    _, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), yarn)
    assert [e.code for e in errors] == ["E045"] and "'yarn'" in errors[0].message


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])  # transformers 4 / 5 spelling
def test_llama31_rope_scaling_is_carried_into_the_plan(tmp_path, key):
    from nemoc.compiler.planner import plan_experiment

    config = dict(LLAMA, **{key: dict(LLAMA31_ROPE, rope_theta=500000.0)})
    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), config)
    assert errors == [] and spec.model.rope_scaling_factor == 8.0
    plan = plan_experiment(spec).plan
    assert plan.model.rope_scaling_factor == 8.0
    from nemoc.compiler.plan import from_json, to_json

    assert from_json(to_json(plan)).model.rope_scaling_factor == 8.0


def test_rope_scaling_factor_written_or_from_a_preset_must_agree_with_config_json(tmp_path):
    config = dict(LLAMA, rope_scaling=LLAMA31_ROPE)
    _, errors, lines = _compile(tmp_path, _experiment('    init = hf("ckpt")\n    rope_scaling_factor = 32', SFT),
                                config)
    assert [e.code for e in errors] == ["E046"] and "says 8.0" in errors[0].message
    assert "rope_scaling_factor = 32" in lines[errors[0].span.line - 1]


def _rule_errors(spec):
    from nemoc.compiler.rules import check_spec

    return [d for d in check_spec(spec) if d.severity == Severity.ERROR]


def test_a_fine_tuning_stage_without_parent_or_init_is_an_error_at_its_line(tmp_path):
    body = "    layers = 2\n    hidden = 64\n    heads = 4\n    ffn_hidden = 96\n    vocab = 200\n    seq_length = 64"
    spec, errors, lines = _compile(tmp_path, _experiment(body, SFT))
    errors += _rule_errors(spec)
    assert [e.code for e in errors] == ["E155"]
    assert lines[errors[0].span.line - 1].strip().startswith("stage sft")
    # the stage's own init is enough
    stage_init = SFT.replace("    steps = 4", '    steps = 4\n    init = hf("ckpt")')
    spec, errors, _ = _compile(tmp_path, _experiment(body, stage_init))
    assert errors + _rule_errors(spec) == []
    assert spec.stage("sft").params["init"] == "ckpt"


def test_an_export_only_experiment_converts_the_checkpoint(tmp_path):
    from nemoc.compiler.graph import build_graph
    from nemoc.compiler.planner import plan_experiment

    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', "  stage export {\n  }"))
    assert errors == []
    plan = plan_experiment(spec).plan
    graph = build_graph(plan, root=str(tmp_path))
    kinds = {t.id: t.kind for t in graph.tasks()}
    assert kinds == {"hf_import:ckpt": "hf_import", "export:export": "hf_export"}
    assert [(a.src, a.dst, a.type) for a in graph.artifacts()] == [("hf_import:ckpt", "export:export", "checkpoint")]


def test_the_import_task_is_content_hashed_on_the_checkpoint_files(tmp_path):
    from nemoc.compiler.graph import build_graph
    from nemoc.compiler.planner import plan_experiment

    spec, _, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT))
    before = build_graph(plan_experiment(spec).plan, root=str(tmp_path))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights-2")
    after = build_graph(plan_experiment(spec).plan, root=str(tmp_path))
    assert before.task("hf_import:ckpt").hash != after.task("hf_import:ckpt").hash
    assert before.task("train:sft").hash != after.task("train:sft").hash
    assert ("hf_import:ckpt", "train:sft") in [(a.src, a.dst) for a in after.artifacts()]


def test_fmt_keeps_the_positional_argument(tmp_path):
    from nemoc.dsl.format import format_module
    from nemoc.dsl.parser import parse

    text = _experiment('    init = hf("ckpt")', SFT)
    assert 'init = hf("ckpt")' in format_module(parse(text, "ft.nemo"), text)


def test_w156_on_a_target_that_does_not_load_hf_init_and_none_on_the_nemoc_runtime(tmp_path):
    """A target that converts `init = hf(DIR)` but does not load it into a stage kind (`StageCaps.hf_init`
    False) gets W156 at the stage; the nemoc runtime loads it into every kind, so `nemoc check` is quiet."""
    from dataclasses import replace
    from types import MappingProxyType

    from click.testing import CliRunner

    from nemoc.compiler.rules import check_spec
    from nemoc.compiler.target import StageCaps
    from nemoc.runtime.cli import cli
    from nemoc.runtime.target import NEMOC_RUNTIME

    text = _experiment('    init = hf("ckpt")', SFT)
    spec, errors, _ = _compile(tmp_path, text)
    assert errors == []
    assert NEMOC_RUNTIME.caps("sft").hf_init and NEMOC_RUNTIME.caps("pretrain").hf_init
    assert not [d for d in check_spec(spec, NEMOC_RUNTIME) if d.code == "W156"]
    old = replace(NEMOC_RUNTIME, stages=MappingProxyType({**NEMOC_RUNTIME.stages, "sft": StageCaps(hf_init=False)}))
    (w156,) = [d for d in check_spec(spec, old) if d.code == "W156"]
    assert "sft stage `sft`" in w156.message
    check = CliRunner().invoke(cli, ["check", str(tmp_path / "ft.nemo")])
    assert "W156" not in check.output, check.output


MIXTRAL = dict(LLAMA, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def test_moe_families_take_their_experts_from_config_json(tmp_path):
    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), MIXTRAL)
    assert errors == []
    m = spec.model
    assert (m.experts, m.top_k, m.moe_ffn_hidden, m.qk_layernorm) == (4, 2, 96, False)
    qwen3_moe = dict(LLAMA, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                     norm_topk_prob=True, head_dim=32)
    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), qwen3_moe)
    assert errors == [] and (spec.model.experts, spec.model.moe_ffn_hidden, spec.model.qk_layernorm) == (8, 48, True)


@pytest.mark.parametrize("config,key", [
    (dict(MIXTRAL, num_experts_per_tok=1), "num_experts_per_tok"),
    (dict(MIXTRAL, model_type="qwen3_moe", norm_topk_prob=False), "norm_topk_prob"),
    (dict(MIXTRAL, model_type="qwen3_moe", norm_topk_prob=True, mlp_only_layers=[0, 1]), "mlp_only_layers"),
    (dict(MIXTRAL, router_jitter_noise=0.1), "router_jitter_noise"),
])
def test_moe_routing_megatron_core_does_not_build_is_refused_naming_the_key(tmp_path, config, key):
    _, errors, lines = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), config)
    assert [e.code for e in errors] == ["E045"] and key in errors[0].message
    assert "init = hf" in lines[errors[0].span.line - 1]


def test_the_import_task_is_planned_with_host_memory_and_time(tmp_path):
    from nemoc.compiler import hfimport
    from nemoc.compiler.flops import param_counts
    from nemoc.compiler.planner import plan_experiment

    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT))
    (imp,) = plan_experiment(spec).plan.imports
    counts = param_counts(spec.model)
    # model.safetensors here is 9 bytes of stand-in weights: measured, and spread over the parameters
    assert imp.directory == "ckpt" and imp.measured and imp.checkpoint_bytes == 9
    assert imp.workers == 2  # min(DEFAULT_IMPORT_WORKERS, layers)
    assert imp.layer_bytes == int(counts.per_layer * 9 / counts.total)
    assert imp.host_memory_bytes == max(2 * 2 * imp.layer_bytes, 2 * imp.edge_bytes)
    assert imp.hash_s == pytest.approx(9 / hfimport.HASH_BYTES_PER_S)
    assert imp.seconds == pytest.approx(imp.hash_s + hfimport.WORKER_START_S + imp.convert_s)
    # without weights: parameters x 2 bytes (bf16), stated as an assumption
    from nemoc.compiler.plan import from_json, to_json

    plan = plan_experiment(spec).plan
    assert from_json(to_json(plan)).imports == plan.imports
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    imp = hfimport.estimate_import(spec.model, str(tmp_path / "ckpt"))
    assert not imp.measured and imp.checkpoint_bytes == 2 * counts.total


def test_nemoc_plan_shows_the_import(tmp_path):
    from click.testing import CliRunner

    from nemoc.runtime.cli import cli

    _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT))
    out = CliRunner().invoke(cli, ["plan", str(tmp_path / "ft.nemo")]).output
    assert "hf_import ckpt" in out and "host memory peak" in out and "worker start" in out, out


def test_a_moe_checkpoint_converts_in_an_export_only_experiment_and_fine_tunes(tmp_path):
    """Export-only conversion builds no model; SFT builds Megatron's MoE layers on the training core."""
    from nemoc.compiler.rules import check_spec
    from nemoc.runtime.target import NEMOC_RUNTIME

    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', "  stage export {\n  }"), MIXTRAL)
    assert errors == [] and not [d for d in check_spec(spec, NEMOC_RUNTIME) if d.code == "E141"]
    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), MIXTRAL)
    assert NEMOC_RUNTIME.caps("sft").moe and not [d for d in check_spec(spec, NEMOC_RUNTIME) if d.code == "E141"]
