"""Multi-latent attention through Megatron-LM command lines: `nemoc export --megatron-args` writes the MLA
flags (runtime.megatron_args `_lm_mla`), `nemoc import` reads them back (compiler.interop.megatron_lm `_mla`),
a DeepSeek preset stays that preset, and a standard-attention model never matches an MLA preset."""

from __future__ import annotations

import dataclasses

import pytest

from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.interop import import_text
from nemoc.compiler.lower import load_experiment
from nemoc.compiler.spec import ModelSpec
from nemoc.runtime.megatron_args import megatron_lm_command
from plan_factory import make_plan, with_executions

MLA_FIELDS = ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
              "v_head_dim", "rope_type", "rope_scaling_factor", "mscale", "mscale_all_dim", "query_groups",
              "qk_layernorm")
TINY = ModelSpec(name="tiny_mla", layers=2, hidden=64, heads=4, query_groups=4, ffn_hidden=128, vocab=256,
                 seq_length=64, multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=48, qk_head_dim=16,
                 qk_pos_emb_head_dim=8, v_head_dim=12, qk_layernorm=True, rope_type="yarn", rope_scaling_factor=4.0,
                 mscale=0.707, mscale_all_dim=0.707)


def _round_trip(tmp_path, model: ModelSpec):
    command = megatron_lm_command(with_executions(make_plan(tmp_path, model=model)), "pretrain")
    imported = import_text(command, "run.sh", gpu="H100")
    path = tmp_path / "imported.nemo"
    path.write_text(imported.text)
    spec, _ = load_experiment(str(path))
    return imported, spec.model


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2_lite"])
def test_a_deepseek_preset_round_trips_as_itself(tmp_path, name):
    imported, model = _round_trip(tmp_path, get_preset(name))
    assert f"model {name} {{" in imported.text and f"exactly the {name} preset" in imported.text, imported.text
    assert {f: getattr(model, f) for f in MLA_FIELDS} == {f: getattr(get_preset(name), f) for f in MLA_FIELDS}
    mla_flags = ("--multi-latent-attention", "--kv-lora-rank", "--rope-type")
    assert not any(d.split()[0] in mla_flags for d in imported.dropped)


def test_an_explicit_mla_model_round_trips_its_mla_fields(tmp_path):
    imported, model = _round_trip(tmp_path, TINY)
    assert {f: getattr(model, f) for f in MLA_FIELDS} == {f: getattr(TINY, f) for f in MLA_FIELDS}, imported.text


def test_mla_flags_without_mla_are_named_and_match_no_mla_preset(tmp_path):
    command = megatron_lm_command(with_executions(make_plan(tmp_path, model=get_preset("deepseek_v2_lite"))),
                                  "pretrain").replace("--multi-latent-attention ", "")
    imported = import_text(command, "run.sh", gpu="H100")
    assert "exactly the deepseek_v2_lite preset" not in imported.text
    assert {"--kv-lora-rank 512", "--rope-type yarn", "--mscale 0.707"} <= set(imported.dropped)
    assert "multi_latent_attention" not in imported.text


def test_a_standard_model_of_deepseek_sizes_is_not_the_preset(tmp_path):
    std = dataclasses.replace(get_preset("deepseek_v2_lite"), multi_latent_attention=False, rope_type="rope",
                              rope_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0, qk_layernorm=False,
                              name="std")
    imported, model = _round_trip(tmp_path, std)
    assert "deepseek_v2_lite" not in imported.text and not model.multi_latent_attention
