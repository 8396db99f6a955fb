"""Gemma 3 (gemma3_text) through the compiler: config.json -> ModelSpec, what stays refused (E045), the kernels
its layer runs on (auto -> local, E179 for te), and its sliding window in the FLOPs. No torch."""

from __future__ import annotations

import json

import pytest

from nemoc.compiler import hfconfig
from nemoc.compiler.flops import flops_per_token, param_counts, window_keys_per_token
from nemoc.compiler.lower import compile_file
from nemoc.compiler.spec import ModelSpec
from nemoc.dsl.diagnostics import Severity

# Modelled on google/gemma-3-1b-pt's config.json in the older transformers spelling (rope_theta,
# rope_local_base_freq, sliding_window_pattern at the top level; transformers 5 writes rope_parameters per layer
# type and layer_types, which the runtime tests' configs use).
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "vocab_size": 262144,
}


def test_gemma3_config_maps_every_part_of_its_layer():
    arch = hfconfig.architecture(GEMMA3_1B)
    f = arch.fields
    assert arch.family == "gemma3_text" and arch.dtype == "bfloat16"
    assert (f["layers"], f["hidden"], f["heads"], f["query_groups"], f["kv_channels"], f["ffn_hidden"]) == \
        (26, 1152, 4, 1, 256, 6912)
    assert f["activation"] == "geglu_tanh" and f["qk_layernorm"] and f["tie_embeddings"]
    assert f["norm_zero_centered"] and f["post_block_norms"] and f["embedding_scale"]
    assert f["softmax_scale"] == 256 ** -0.5
    assert (f["sliding_window"], f["full_attention_every"]) == (512, 6)
    assert (f["rotary_base"], f["local_rotary_base"]) == (1_000_000.0, 10_000.0)
    assert arch.special_ids == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    model = ModelSpec(name="gemma3_1b", **f)
    assert [model.is_sliding_layer(i) for i in range(1, 13)] == [True] * 5 + [False] + [True] * 5 + [False]
    assert model.sliding_layers == 22 and model.local_layer_only
    # 4 norms per layer and a QK norm: 262144 x 1152 (tied) + 26 x (attention + GeGLU + norms) + final norm
    per_layer = 1152 * (4 + 2) * 256 + 4 * 256 * 1152 + 2 * 256 + 3 * 1152 * 6912 + 4 * 1152
    assert param_counts(model).total == 262144 * 1152 + 26 * per_layer + 1152
    assert param_counts(model).total == pytest.approx(1.0e9, rel=0.01)  # "Gemma 3 1B"


def test_transformers5_layer_types_and_rope_parameters_map_too():
    config = {k: v for k, v in GEMMA3_1B.items() if k not in ("rope_theta", "rope_local_base_freq",
                                                              "sliding_window_pattern", "rope_scaling")}
    config |= {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
               "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}}
    f = hfconfig.architecture(config).fields
    assert (f["sliding_window"], f["full_attention_every"], f["rotary_base"], f["local_rotary_base"]) == \
        (512, 2, 5e5, 2e4)
    all_full = hfconfig.architecture(config | {"layer_types": ["full_attention"] * 4}).fields
    assert (all_full["sliding_window"], all_full["local_rotary_base"]) == (0, None)


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gemma2", "attn_logit_softcapping": 50.0}, "soft-cap"),
    ({"model_type": "gemma"}, "Gemma 3"),
    ({"model_type": "gemma3"}, "text model only"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "'linear'"),
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention"] + ["sliding_attention"] * 23},
     "layer_types"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_what_nemoc_does_not_build_is_refused_naming_the_key(change, words):
    with pytest.raises(hfconfig.HfConfigError, match=words):
        hfconfig.architecture(GEMMA3_1B | change)


def _compile(tmp_path, kernels: str = ""):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(GEMMA3_1B))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "ft.nemo").write_text(f"""experiment ft {{
  cluster {{
    gpu = H100
    gpus_per_node = 8
  }}
  model gemma {{
    init = hf("ckpt")
    seq_length = 4096
  }}
  precision = bf16
{kernels}
  data chat {{
    path = "chat.jsonl"
    format = chat
    tokenizer = "ckpt"
  }}
  stage sft {{
    data = [chat]
    steps = 10
    global_batch = 64
  }}
}}
""")
    spec, diags, _ = compile_file(str(tmp_path / "ft.nemo"))
    return spec, [d for d in diags if d.severity == Severity.ERROR]


def test_kernels_auto_plans_gemma3_on_the_local_spec(tmp_path):
    from nemoc.compiler.planner import plan_experiment

    spec, errors = _compile(tmp_path)
    assert errors == [] and spec.model.local_layer_only
    stage = plan_experiment(spec).plan.stage("sft")
    assert stage.execution.kernels == "local"


def test_kernels_te_is_e173_at_its_line(tmp_path):
    from nemoc.compiler.rules import check_spec

    spec, errors = _compile(tmp_path, "  kernels = te")
    errors += [d for d in check_spec(spec) if d.severity == Severity.ERROR]
    assert [e.code for e in errors] == ["E179"]
    assert (tmp_path / "ft.nemo").read_text().splitlines()[errors[0].span.line - 1].strip() == "kernels = te"


def test_window_keys_per_token_is_the_average_of_min_t_w():
    for s, w in ((16, 4), (16, 16), (16, 40), (7, 1)):
        assert window_keys_per_token(s, w) == pytest.approx(sum(min(t, w) for t in range(1, s + 1)) / s)


def test_sliding_layers_attend_to_fewer_keys_in_the_model_flops():
    model = ModelSpec(name="gemma3_1b", **hfconfig.architecture(GEMMA3_1B).fields)
    full = ModelSpec(name="dense", **{**hfconfig.architecture(GEMMA3_1B).fields, "sliding_window": 0,
                                      "full_attention_every": 0, "local_rotary_base": None})
    s, width = 4096, 4 * 256
    ours, theirs = flops_per_token(model, s, True), flops_per_token(full, s, True)
    assert ours.dense_gemm == theirs.dense_gemm and ours.logits == theirs.logits
    assert ours.attention_core == pytest.approx(4 * width * (4 * s / 2 + 22 * window_keys_per_token(s, 512)))
    # a kernel without the causal discount computes every score: the window saves nothing there
    assert flops_per_token(model, s, False).attention_core == flops_per_token(full, s, False).attention_core


@pytest.mark.parametrize("fields, anchor", [("norm = layernorm\n    norm_zero_centered = true", "norm_zero_centered"),
                                            ("post_block_norms = true", "post_block_norms")])
def test_a_written_gemma_part_nemoc_does_not_build_is_e174_at_its_line(tmp_path, fields, anchor):
    from nemoc.compiler.rules import check_spec

    (tmp_path / "m.nemo").write_text(f"""experiment m {{
  cluster {{
    gpu = CPU
    gpus_per_node = 1
  }}
  model tiny {{
    layers = 2
    hidden = 64
    heads = 4
    ffn_hidden = 96
    vocab = 256
    seq_length = 32
    {fields}
  }}
  precision = fp32
  stage pretrain {{
    steps = 2
    global_batch = 2
  }}
}}
""")
    spec, diags, _ = compile_file(str(tmp_path / "m.nemo"))
    errors = [d for d in list(diags) + list(check_spec(spec)) if d.severity == Severity.ERROR]
    assert [e.code for e in errors] == ["E180"]
    assert (tmp_path / "m.nemo").read_text().splitlines()[errors[0].span.line - 1].strip().startswith(anchor)
