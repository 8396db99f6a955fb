"""DeepseekV3's config.json -> nemoc's model (compiler/hfconfig.py `_deepseek_v3`): the MLA fields, YaRN, the
sigmoid router with its expert bias, groups, routed scaling and shared experts; what Megatron-Core cannot
build is refused at the `init` line naming the key; `multi_latent_attention` written against a checkpoint of
standard attention is E046. The weights and logits: tests/runtime/hf/test_hf_convert.py (deepseek_v3)."""

from __future__ import annotations

import pytest

from nemoc.compiler import hfconfig
from test_hf_init import LLAMA, SFT, _compile, _experiment

# DeepSeek-V3's config.json (the published keys; 61 layers, the first 3 dense) and a tiny one, every layer sparse
V3 = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280,
      "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
      "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
      "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
      "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
      "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 163840,
      "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False, "attention_bias": False,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 4096, "type": "yarn"},
      "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"}
TINY = dict(V3, vocab_size=200, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_group=2, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=0, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
            rope_scaling=dict(V3["rope_scaling"], factor=4.0, original_max_position_embeddings=16))


def test_deepseek_v3_maps_every_mla_and_router_field():
    f = hfconfig.architecture(dict(V3, first_k_dense_replace=0)).fields
    assert (f["multi_latent_attention"], f["q_lora_rank"], f["kv_lora_rank"], f["qk_head_dim"],
            f["qk_pos_emb_head_dim"], f["v_head_dim"], f["query_groups"], f["qk_layernorm"]) == \
        (True, 1536, 512, 128, 64, 128, 128, True)
    assert (f["rope_type"], f["rope_scaling_factor"], f["original_max_position_embeddings"], f["beta_fast"],
            f["beta_slow"], f["mscale"], f["mscale_all_dim"], f["rotary_base"]) == \
        ("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0, 10000.0)
    assert (f["experts"], f["top_k"], f["moe_ffn_hidden"], f["shared_expert_ffn_hidden"], f["moe_router_score"],
            f["moe_expert_bias"], f["moe_router_groups"], f["moe_router_group_topk"], f["moe_topk_scaling_factor"]) == \
        (256, 8, 2048, 2048, "sigmoid", True, 8, 4, 2.5)
    # the same numbers as the deepseek_v3 preset wherever the preset states them
    from nemoc.compiler.catalog.models import get_preset

    preset = get_preset("deepseek_v3")
    for name in ("hidden", "heads", "q_lora_rank", "kv_lora_rank", "experts", "top_k", "moe_ffn_hidden",
                 "shared_expert_ffn_hidden", "moe_router_groups", "moe_router_group_topk", "moe_topk_scaling_factor",
                 "rope_scaling_factor", "mscale", "mscale_all_dim", "moe_aux_loss_coeff", "moe_load_balancing"):
        assert f[name] == getattr(preset, name), name


def test_plain_rope_no_query_latent_and_an_all_dense_model():
    f = hfconfig.architecture(dict(TINY, rope_scaling=None, q_lora_rank=None)).fields
    assert (f["rope_type"], f["rope_scaling_factor"], f["q_lora_rank"]) == ("rope", 1.0, 0)
    dense = hfconfig.architecture(dict(TINY, first_k_dense_replace=2)).fields  # every layer below the replace
    assert "experts" not in dense and dense["ffn_hidden"] == 96


def test_dense_first_layers_are_described_for_moe_layer_freq():
    assert hfconfig.deepseek_dense_layers(V3) == [0, 0, 0] + [1] * 58
    assert hfconfig.deepseek_dense_layers(dict(TINY, first_k_dense_replace=0)) == [1, 1]


def test_the_published_config_maps_its_dense_first_layers_as_the_preset():
    """first_k_dense_replace = 3 -> moe_first_dense_layers = 3 (Megatron-Core moe_layer_freq [0]*3 + [1]*58),
    the deepseek_v3 preset's form, so the whole architecture (671 B parameters) equals the preset's."""
    from nemoc.compiler.catalog.models import get_preset
    from nemoc.compiler.flops import param_counts

    f = hfconfig.architecture(V3).fields
    assert f["moe_first_dense_layers"] == 3 and "moe_layer_freq" not in f
    preset = get_preset("deepseek_v3")
    assert f["moe_first_dense_layers"] == preset.moe_first_dense_layers
    import dataclasses
    spec = dataclasses.replace(preset, **{k: v for k, v in f.items() if k in {x.name for x in dataclasses.fields(preset)}})
    assert spec.moe_layer_pattern == (0, 0, 0) + (1,) * 58
    assert param_counts(spec).total == param_counts(preset).total


@pytest.mark.parametrize("config,key", [
    (dict(TINY, norm_topk_prob=False), "norm_topk_prob"),
    (dict(TINY, num_experts_per_tok=4, n_group=2, topk_group=1), "topk_group"),
    (dict(TINY, rope_interleave=False), "rope_interleave"),
    (dict(TINY, attention_bias=True), "attention_bias"),
    (dict(TINY, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type"),
    (dict(TINY, rope_scaling={**TINY["rope_scaling"], "mscale": None}), "rope_scaling.mscale"),
    (dict(TINY, rope_scaling={**TINY["rope_scaling"], "attention_factor": 1.2}), "rope_scaling.attention_factor"),
    (dict(TINY, rope_scaling={**TINY["rope_scaling"], "truncate": False}), "rope_scaling.truncate"),
    (dict(TINY, rope_scaling={**TINY["rope_scaling"], "factor": None}), "rope_scaling.factor"),
])
def test_what_megatron_core_does_not_build_is_refused_at_the_init_line_naming_the_key(tmp_path, config, key):
    _, errors, lines = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), config)
    assert [e.code for e in errors] == ["E045"] and key in errors[0].message, errors
    assert "init = hf" in lines[errors[0].span.line - 1]


def test_a_tiny_deepseek_checkpoint_checks_and_mla_against_llama_is_e046(tmp_path):
    spec, errors, _ = _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), TINY)
    assert errors == [] and spec.model.multi_latent_attention and spec.model.moe_expert_bias
    _, errors, lines = _compile(tmp_path, _experiment('    init = hf("ckpt")\n    multi_latent_attention = true', SFT),
                                dict(LLAMA, num_key_value_heads=4))
    assert [e.code for e in errors] == ["E046"] and "multi_latent_attention" in lines[errors[0].span.line - 1]


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("extra", [{}, {"mscale": 1.0, "mscale_all_dim": 1.0}, {"mscale": 0.7, "mscale_all_dim": 0.5},
                                   {"mscale": 0.7}, {"mscale_all_dim": 0.0, "mscale": 2.0}, {"factor": None}])
def test_yarn_cos_sin_and_softmax_scale_equal_transformers(extra):
    """The cos/sin factor Megatron-Core computes from the mapped fields (_yarn_get_concentration_factor) and MLA's
    softmax mscale equal transformers' (_compute_yarn_parameters' attention_factor, yarn_apply_mscale), also when
    a config gives one of mscale / mscale_all_dim or no factor (transformers: max_position_embeddings / original)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (_yarn_get_concentration_factor,
                                                                                  _yarn_get_mscale)
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    config = dict(TINY, rope_scaling={**YARN, **extra})
    f = hfconfig.architecture(config).fields
    theirs = AutoConfig.for_model(**config)
    _, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
    ours = _yarn_get_concentration_factor(f["rope_scaling_factor"], f["mscale"], f["mscale_all_dim"])
    assert ours == pytest.approx(attention_factor, rel=1e-12)
    if extra.get("factor", 1) is not None:  # transformers' softmax scale reads the written factor
        softmax = _yarn_get_mscale(f["rope_scaling_factor"], f["mscale_all_dim"]) ** 2
        assert softmax == pytest.approx(yarn_apply_mscale(theirs.rope_parameters, 1.0), rel=1e-12)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_a_deepseek_checkpoint_whose_rms_norm_eps_is_not_1e_6_warns_at_the_init_line(tmp_path, eps):
    """transformers' latent norms keep DeepseekV3RMSNorm's 1e-6 whatever rms_norm_eps says; Megatron uses
    norm_epsilon for them: W126 at the init line (once, at the first stage) when they differ."""
    from nemoc.dsl.diagnostics import Severity
    from nemoc.runtime.cli.lang import check_file

    _compile(tmp_path, _experiment('    init = hf("ckpt")', SFT), dict(TINY, rms_norm_eps=eps))
    diags, _ = check_file(str(tmp_path / "ft.nemo"))
    warned = [d for d in diags if d.code == "W126"]
    assert [d.severity for d in diags if d.severity == Severity.ERROR] == []
    if eps == 1e-6:
        assert warned == []
    else:
        assert len(warned) == 1 and "starts from a DeepseekV3 checkpoint" in warned[0].message
        assert "init = hf" in (tmp_path / "ft.nemo").read_text().splitlines()[warned[0].span.line - 1]
