"""`init = hf("DIR")` of a MoE checkpoint with a written `moe_layer_freq` / `moe_first_dense_layers`: the layer
pattern they make is compared with config.json's (E046 at the written line when they differ; equal patterns in
another form pass), and Qwen3-MoE's pattern keys are read as transformers 5.25 reads them
(`Qwen3MoeDecoderLayer`: `layer_idx not in mlp_only_layers and (layer_idx + 1) % decoder_sparse_step == 0`)."""

from __future__ import annotations

import pytest

from nemoc.compiler import hfconfig
from test_hf_init import LLAMA, SFT, _compile, _experiment

MIXTRAL = dict(LLAMA, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
               num_hidden_layers=4)
QWEN3_MOE = dict(LLAMA, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                 norm_topk_prob=True, head_dim=32, num_hidden_layers=4)


@pytest.mark.parametrize("config", [MIXTRAL, QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("written", ["moe_layer_freq = 2", "moe_first_dense_layers = 1",
                                     "moe_layer_freq = [1, 1, 0, 1]"])
def test_a_written_pattern_that_contradicts_config_json_is_e046_at_its_line(tmp_path, config, written):
    _, errors, lines = _compile(tmp_path, _experiment(f'    init = hf("ckpt")\n    {written}', SFT), config)
    assert [e.code for e in errors] == ["E046"], [e.message for e in errors]
    assert written in lines[errors[0].span.line - 1]
    assert "says expert layers = every layer" in errors[0].message, errors[0].message


@pytest.mark.parametrize("change,written", [
    ({"decoder_sparse_step": 2}, "moe_layer_freq = [0, 1, 0, 1]"),
    ({"mlp_only_layers": [0]}, "moe_first_dense_layers = 1"),
    ({"mlp_only_layers": [1, 3]}, "moe_layer_freq = 2"),  # the int form of [1, 0, 1, 0]
    ({}, "moe_layer_freq = 1"),
    ({}, "moe_layer_freq = [1, 1, 1, 1]"),
])
def test_the_same_pattern_in_another_form_agrees(tmp_path, change, written):
    spec, errors, _ = _compile(tmp_path, _experiment(f'    init = hf("ckpt")\n    {written}', SFT), QWEN3_MOE | change)
    assert errors == [], [e.message for e in errors]
    assert spec.model.moe_layer_pattern == hfconfig.architecture(QWEN3_MOE | change).fields.get(
        "moe_layer_freq", (1, 1, 1, 1))


def test_a_qwen3_moe_dense_layer_written_against_config_json_names_both():
    arch = hfconfig.architecture(QWEN3_MOE | {"mlp_only_layers": [0]})
    assert hfconfig.mismatches(arch, {"moe_first_dense_layers": 2}) == [
        ("moe_first_dense_layers", 2, "expert layers = all but the first 1 (moe_first_dense_layers = 1)")]
    assert hfconfig.mismatches(arch, {"moe_layer_freq": (1, 1, 1, 1)}) == [
        ("moe_layer_freq", (1, 1, 1, 1), "expert layers = all but the first 1 (moe_first_dense_layers = 1)")]
    odd = hfconfig.architecture(QWEN3_MOE | {"mlp_only_layers": [1]})
    assert hfconfig.mismatches(odd, {"moe_layer_freq": 1}) == [("moe_layer_freq", 1, "expert layers (moe_layer_freq) = [1, 0, 1, 1]")]


def test_mlp_only_layers_outside_the_model_are_ignored_as_transformers_does():
    fields = hfconfig.architecture(QWEN3_MOE | {"mlp_only_layers": [1, 4, 99, -1]}).fields
    assert fields["moe_layer_freq"] == (1, 0, 1, 1)
    assert "moe_layer_freq" not in hfconfig.architecture(QWEN3_MOE | {"mlp_only_layers": [7]}).fields


def test_decoder_sparse_step_zero_is_refused_as_transformers_fails_on_it():
    with pytest.raises(hfconfig.HfConfigError, match="decoder_sparse_step = 0"):
        hfconfig.architecture(QWEN3_MOE | {"decoder_sparse_step": 0})
    assert "moe_layer_freq" not in hfconfig.architecture(QWEN3_MOE | {"decoder_sparse_step": None}).fields
