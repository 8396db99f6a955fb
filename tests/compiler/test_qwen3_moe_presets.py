"""Qwen3-MoE: the two presets against the published sizes and config.json files, the Hugging Face config
import (what it maps and what it refuses, naming the key), and plans of both on realistic clusters."""

from __future__ import annotations

import dataclasses

import pytest

from nemoc.compiler import hfconfig
from nemoc.compiler.catalog import PRESETS
from nemoc.compiler.flops import param_counts
from nemoc.compiler.lower import compile_file
from nemoc.compiler.planner import plan_experiment
from nemoc.dsl.diagnostics import Severity

# The published config.json of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B (Hugging Face), every key the
# mapping reads; the two differ in hidden_size, intermediate_size, moe_intermediate_size, layers and heads.
_COMMON = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
           "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960,
           "mlp_only_layers": [], "norm_topk_prob": True, "num_experts": 128, "num_experts_per_tok": 8,
           "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
           "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
           "bos_token_id": 151643, "eos_token_id": 151645}
CONFIGS = {
    "qwen3_30b_a3b": _COMMON | {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                                "num_attention_heads": 32, "num_hidden_layers": 48},
    "qwen3_235b_a22b": _COMMON | {"hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                                  "num_attention_heads": 64, "num_hidden_layers": 94},
}
# model cards: "Number of Parameters: 30.5B in total and 3.3B activated"; "235B in total and 22B activated"
PUBLISHED = {"qwen3_30b_a3b": (30.5e9, 3.3e9), "qwen3_235b_a22b": (235e9, 22e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_and_active_parameters_match_the_model_cards(name):
    counts = param_counts(PRESETS[name])
    total, active = PUBLISHED[name]
    # the cards round to 3 digits (30.53B -> 30.5B, 3.35B -> 3.3B, 235.09B -> 235B, 22.19B -> 22B)
    assert abs(counts.total / total - 1) < 0.005, counts.total
    assert abs(counts.active / active - 1) < 0.02, counts.active
    # the experts are almost all of it: 128 x 3 x hidden x moe_ffn per layer (gate, up, down; no bias)
    m = PRESETS[name]
    assert counts.expert == m.experts * 3 * m.hidden * m.moe_ffn_hidden
    assert counts.layers * counts.expert / counts.total > 0.94  # 95.0 % (30B), 96.6 % (235B)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_preset_is_what_init_hf_of_the_published_config_json_builds(name):
    arch = hfconfig.architecture(CONFIGS[name])
    preset = PRESETS[name]
    given = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset) if f.name not in ("name", "init")}
    assert hfconfig.mismatches(arch, given) == []
    compared = ("experts", "top_k", "moe_ffn_hidden", "shared_expert_ffn_hidden", "qk_layernorm", "kv_channels",
                "query_groups", "tie_embeddings", "rotary_base", "norm_epsilon", "vocab", "moe_aux_loss_coeff",
                "moe_load_balancing")
    assert {k: arch.fields[k] for k in compared} == {k: getattr(preset, k) for k in compared}
    assert (preset.experts, preset.top_k, preset.shared_expert_ffn_hidden) == (128, 8, 0)
    assert not preset.moe_router_pre_softmax  # norm_topk_prob: softmax over the chosen 8


def test_transformers_5_spelling_num_local_experts_is_read():
    config = {k: v for k, v in CONFIGS["qwen3_30b_a3b"].items() if k != "num_experts"} | {"num_local_experts": 64}
    assert hfconfig.architecture(config).fields["experts"] == 64


def test_a_sliding_window_without_use_sliding_window_is_full_attention_as_in_transformers():
    # Qwen3MoeConfig.__post_init__: sliding_window = sliding_window if use_sliding_window else None
    assert hfconfig.architecture(CONFIGS["qwen3_30b_a3b"] | {"sliding_window": 4096})
    with pytest.raises(hfconfig.HfConfigError, match="sliding_window 4096"):
        hfconfig.architecture(CONFIGS["qwen3_30b_a3b"] | {"sliding_window": 4096, "use_sliding_window": True})


def test_router_aux_loss_coef_is_read_and_a_written_weight_wins():
    arch = hfconfig.architecture(CONFIGS["qwen3_30b_a3b"] | {"router_aux_loss_coef": 0.01})
    assert arch.fields["moe_aux_loss_coeff"] == 0.01
    assert hfconfig.architecture({k: v for k, v in CONFIGS["qwen3_30b_a3b"].items()
                                  if k != "router_aux_loss_coef"}).fields["moe_aux_loss_coeff"] == 1e-3
    assert hfconfig.mismatches(arch, {"moe_aux_loss_coeff": 1e-3, "moe_load_balancing": "seq_aux_loss"}) == []
    assert hfconfig.mismatches(arch, {"top_k": 4}) == [("top_k", 4, 8)]


def test_dense_layers_among_the_expert_layers_become_a_moe_layer_freq_list():
    """Qwen3MoeDecoderLayer: layer i sparse when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0;
    Megatron-Core's list form of moe_layer_freq says the same per layer (its int form counts from layer 0)."""
    base = CONFIGS["qwen3_30b_a3b"]
    assert "moe_layer_freq" not in hfconfig.architecture(base).fields  # every layer sparse: Megatron's default 1
    step2 = hfconfig.architecture(base | {"decoder_sparse_step": 2}).fields["moe_layer_freq"]
    assert step2 == (0, 1) * 24
    only = hfconfig.architecture(base | {"mlp_only_layers": [3, 0]}).fields["moe_layer_freq"]
    assert only == (0, 1, 1, 0) + (1,) * 44
    both = hfconfig.architecture(base | {"mlp_only_layers": [1], "decoder_sparse_step": 2}).fields["moe_layer_freq"]
    assert both == (0, 0) + (0, 1) * 23


@pytest.mark.parametrize("change,named", [
    ({"decoder_sparse_step": 49}, "decoder_sparse_step = 49: no layer"),
    ({"mlp_only_layers": list(range(48))}, "no layer of the 48 is an expert layer"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step = 0"),
    ({"num_experts": 0}, "num_experts = 0"),
    ({"num_local_experts": 0}, "num_local_experts = 0"),  # transformers 5's spelling of num_experts
    ({"norm_topk_prob": False}, "norm_topk_prob = false"),
    ({"num_experts_per_tok": 1}, "num_experts_per_tok = 1"),
])
def test_layers_or_routing_nemoc_cannot_build_are_refused_naming_the_key(change, named):
    with pytest.raises(hfconfig.HfConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        hfconfig.architecture(CONFIGS["qwen3_30b_a3b"] | change)


def _plan(tmp_path, model: str, gpu: str, nodes: int, parallel: str = "expert = auto"):
    path = tmp_path / "q.nemo"
    path.write_text(f"""experiment q {{
  cluster {{
    gpu = {gpu}
    nodes = {nodes}
    gpus_per_node = 8
  }}
  model {model} {{
  }}
  parallel {{
    {parallel}
  }}
  precision = bf16
  data web {{
    path = "web/*.jsonl"
    tokenizer = "tokenizer.json"
  }}
  stage pretrain {{
    data = [web]
    steps = 100
    global_batch = 1024
  }}
}}
""")
    spec, diags, _ = compile_file(str(path))
    assert [d for d in diags if d.severity == Severity.ERROR] == []
    return plan_experiment(spec)


@pytest.mark.parametrize("gpu", ["H100", "B200"])
def test_235b_plans_on_64_gpus_with_expert_parallelism(tmp_path, gpu):
    result = _plan(tmp_path, "qwen3_235b_a22b", gpu, 8)
    stage = result.plan.stages[0]
    lay, mem = stage.layout, stage.memory
    assert lay.tp * lay.pp * lay.cp * lay.dp == 64
    assert lay.ep > 1 and 128 % lay.ep == 0 and (lay.dp * lay.cp * lay.tp) % (lay.ep * lay.etp) == 0
    assert lay.pp > 1  # 470 GB of bf16 weights and gradients alone do not fit 64 x 80 GB without pipelining
    assert lay.distributed_optimizer
    assert mem.total <= mem.capacity
    assert stage.execution.moe.grouped_gemm and stage.execution.moe.dispatcher == "alltoall"
    # MFU counts the active parameters only: a plan claiming more than a dense model's 40-50 % would be wrong
    assert 0.15 < stage.estimate.mfu < 0.45


def test_30b_on_16_h100_keeps_the_all_to_all_inside_a_node(tmp_path):
    """Megatron-Bridge's 16-GPU recipe (TP 1, PP 1, EP 16) spans two nodes with its EP group, which it runs with
    the HybridEP flex dispatcher; with the default all-to-all each rank sends 8 of its 15 shares through its own
    NIC (cost._alltoall_bw: 94 GB/s against NVLink's 450): the planner keeps EP inside a node and pipelines."""
    best = _plan(tmp_path, "qwen3_30b_a3b", "H100", 2).plan.stages[0]
    bridge = _plan(tmp_path, "qwen3_30b_a3b", "H100", 2,
                   "tensor = 1\n    pipeline = 1\n    expert = 16\n    micro_batch = 1\n    recompute = none"
                   ).plan.stages[0]
    assert (bridge.layout.tp, bridge.layout.pp, bridge.layout.ep, bridge.layout.dp) == (1, 1, 16, 16)
    assert bridge.memory.total <= bridge.memory.capacity
    assert best.layout.ep * best.layout.etp <= 8 and best.layout.pp > 1
    assert best.estimate.step_time_s < bridge.estimate.step_time_s
    # the cross-node all-to-all is what costs: 16 GPUs' dispatch and combine at the NIC's rate
    assert bridge.estimate.parts["ep_comm"] > 2 * best.estimate.parts["ep_comm"]


def test_235b_on_256_h100_keeps_the_expert_group_inside_a_node(tmp_path):
    """Megatron-Bridge's qwen3_235b_a22b_pretrain_256gpu_h100_bf16_config runs EP 8 (one node); priced as a ring
    over 8 NICs per node the planner chose EP 128 over 16 nodes, priced as the all-to-all it is, EP 8."""
    lay = _plan(tmp_path, "qwen3_235b_a22b", "H100", 32).plan.stages[0].layout
    assert lay.ep * lay.etp <= 8 and lay.tp * lay.pp * lay.cp * lay.dp == 256
