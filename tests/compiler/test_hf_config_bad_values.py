"""A malformed Hugging Face config.json under `init = hf("DIR")` (Qwen3-MoE, the family most recently added):
every wrong type, missing-but-required value, out-of-range number and contradiction is E045 at the `init`
line naming the key, never E000 (an internal error: before, `int("abc")` or `None.get` escaped as one) and
never a model nemoc check accepts (before, `hidden_size = -1` checked clean and `num_hidden_layers = 1e30`
made `nemoc plan` search forever)."""

from __future__ import annotations

import json

import pytest

from nemoc.compiler import hfconfig
from nemoc.runtime.cli.lang import check_file

QWEN3_MOE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
             "moe_intermediate_size": 32, "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 128,
             "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
             "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "float32", "sliding_window": None,
             "rope_scaling": None, "mlp_only_layers": []}

EXPERIMENT = """experiment x {
  cluster {
    gpu = CPU
    nodes = 1
    gpus_per_node = 2
  }
  model m {
    init = hf("hf")
  }
  precision = fp32
  data chat {
    path = "chat/*.jsonl"
    format = chat
  }
  stage sft {
    kind = sft
    data = [chat]
    steps = 2
    global_batch = 4
  }
}
"""


def _check(tmp_path, config_text: str):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(config_text)
    path = tmp_path / "x.nemo"
    path.write_text(EXPERIMENT)
    diags, sources = check_file(str(path))
    return [d for d in diags if d.is_error], sources[str(path)].splitlines()


def test_the_clean_config_checks_clean(tmp_path):
    errors, _ = _check(tmp_path, json.dumps(QWEN3_MOE))
    assert errors == []


BAD = [
    # wrong JSON types: before, ValueError / TypeError from int() and float() (E000)
    ({"hidden_size": "abc"}, 'hidden_size = "abc": expected an integer'),
    ({"num_attention_heads": [1]}, "num_attention_heads = \\[1\\]: expected an integer"),
    ({"num_experts_per_tok": {"a": 1}}, "num_experts_per_tok = {\"a\": 1}: expected an integer"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size = null: expected an integer"),
    ({"max_position_embeddings": None}, "max_position_embeddings = null"),
    ({"rms_norm_eps": "x"}, 'rms_norm_eps = "x": expected a number'),
    ({"rope_theta": None}, "rope_theta = null: expected a number"),
    ({"router_aux_loss_coef": "x"}, 'router_aux_loss_coef = "x"'),
    ({"decoder_sparse_step": "x"}, 'decoder_sparse_step = "x"'),
    ({"mlp_only_layers": [1, "x"]}, 'mlp_only_layers\\[1\\] = "x"'),
    ({"mlp_only_layers": "0"}, 'mlp_only_layers = "0": expected a list'),
    ({"rope_scaling": "x"}, 'rope_scaling = "x": expected a JSON object'),
    ({"rope_parameters": [1]}, "rope_parameters = \\[1\\]: expected a JSON object"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "x"}}, 'rope_scaling.factor = "x"'),
    ({"sliding_window": "x", "use_sliding_window": True}, 'sliding_window = "x"'),
    # booleans: before, any truthy value ("abc", 1.5) passed silently
    ({"norm_topk_prob": "abc"}, 'norm_topk_prob = "abc": expected true or false'),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings = 1: expected true or false"),
    ({"hidden_size": True}, "hidden_size = true: expected an integer"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers = 1.5: expected an integer"),
    # out of range: before, checked clean (a negative width reached the planner)
    ({"hidden_size": -1}, "hidden_size = -1: expected an integer >= 1"),
    ({"num_hidden_layers": 0}, "num_hidden_layers = 0: expected an integer >= 1"),
    ({"vocab_size": 0}, "vocab_size = 0"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step = 0"),
    ({"rope_theta": 0}, "rope_theta = 0: expected a number > 0"),
    ({"rms_norm_eps": -1}, "rms_norm_eps = -1"),
    # beyond what the language allows the same field: before, layers = 1e30 hung `nemoc plan`
    ({"num_hidden_layers": 10**30}, "num_hidden_layers = 1e\\+30: nemoc builds at most 10,000 layers"),
    ({"max_position_embeddings": 10**30}, "model.seq_length = 1e\\+30, but model.seq_length must be <= "),
    ({"hidden_size": 10**30}, "model.hidden = 1e\\+30"),
    # contradictions: before, num_local_experts silently won; top-k above the expert count checked clean
    ({"num_local_experts": 4, "num_experts": 8}, "num_local_experts = 4 but num_experts = 8"),
    ({"num_experts_per_tok": 8}, "num_experts_per_tok = 8 > 4 experts"),
    ({"model_type": 3}, "model_type = 3: expected a string"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[next(iter(c)) + "=" + json.dumps(c[next(iter(c))])[:20]
                                                     for c, _ in BAD])
def test_a_bad_value_is_e045_at_the_init_line_naming_the_key(tmp_path, change, message):
    errors, lines = _check(tmp_path, json.dumps(QWEN3_MOE | change))
    assert [e.code for e in errors] == ["E045"], [(e.code, e.message) for e in errors]
    assert 'init = hf("hf")' in lines[errors[0].span.line - 1]
    assert errors[0].span.col == lines[errors[0].span.line - 1].index('"hf"') + 1  # the caret on the path
    assert __import__("re").search(message, errors[0].message), errors[0].message


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "a JSON list, not an object"),
    ("null", "a JSON NoneType, not an object"),
    ('"qwen3_moe"', "a JSON str, not an object"),
    ('{"model_type": "qwen3_moe", ', "unreadable JSON"),  # truncated
    ("", "unreadable JSON"),
])
def test_a_config_json_that_is_not_an_object_is_e045(tmp_path, text, message):
    errors, _ = _check(tmp_path, text)
    assert [e.code for e in errors] == ["E045"] and message in errors[0].message, [e.message for e in errors]


def test_the_mapping_never_raises_anything_but_hfconfigerror():
    """Every key the mapping reads, set to every JSON kind: architecture() maps it or names it."""
    kinds = [None, "abc", [1], {"a": 1}, -1, 0, 1.5, True, 10**30]
    keys = [k for k in QWEN3_MOE if k != "model_type"] + list(hfconfig.INT_KEYS) + list(hfconfig.FLOAT_KEYS)
    for family in ("qwen3_moe", "llama", "mixtral", "gpt2", "gemma3_text"):
        for key in keys:
            for value in kinds:
                try:
                    hfconfig.architecture(QWEN3_MOE | {"model_type": family, key: value})
                except hfconfig.HfConfigError:
                    pass
