"""Qwen3-MoE end to end from the CLI: `init = hf(...)` of a Qwen3MoeForCausalLM checkpoint -> SFT at expert
parallelism 2 on two CPU processes -> Hugging Face export that transformers loads. The SFT stage starts at
transformers' own loss (the import is right at EP 2, router and experts included); the export carries the
trained weights under Qwen3-MoE's names. And the grouped-GEMM (TEGroupedMLP) naming of the experts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "align"))
sys.path.insert(0, str(Path(__file__).parent))

from hf_models import read_tensors, response_loss  # noqa: E402

NEMOC = str(Path(sys.executable).parent / "nemoc")
SEQ = 48
# vocab 384 = 3 x 128: no padding rows at TP 1, so Megatron's softmax runs over exactly transformers' logits.
# 8 experts, top 2, every layer sparse, softmax over the chosen experts (Qwen3-30B-A3B's routing in small)
CONFIG = dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
              num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False,
              router_aux_loss_coef=0.001, bos_token_id=1, eos_token_id=2)
QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(6) for b in range(6)]

EXPERIMENT = """experiment moe_ft {
  cluster {
    gpu = CPU
    gpus_per_node = 2
  }
  model tiny_qwen3_moe {
    init = hf("ckpt")
  }
  parallel {
    tensor = 1
    pipeline = 1
    expert = 2
    data = 2
  }
  precision = fp32
  data chat {
    path = "chat.jsonl"
    format = chat
    tokenizer = "ckpt/tokenizer.json"
  }
  stage sft {
    data = [chat]
    steps = 2
    global_batch = 4
    seq_length = 48
    optimizer = adam(lr = 1e-3, weight_decay = 0.0)
  }
  stage export after sft {
  }
}
"""


def _world(root: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemoc.runtime.tokenizer import train_byte_level_bpe

    ckpt = root / "ckpt"
    ckpt.mkdir(parents=True)
    train_byte_level_bpe([q + " " + r for q, r in QA] * 4, 300, ckpt / "tokenizer.json")
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", initializer_range=0.1, **CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a dropped q_norm / k_norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(ckpt)
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, r in QA]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chat) + "\n")
    return ckpt, model




@pytest.mark.slow
def test_nemoc_run_sft_at_ep2_from_a_qwen3_moe_checkpoint_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from nemoc.runtime.align import runners, stage

    ckpt, hf_model = _world(tmp_path)
    (tmp_path / "ft.nemo").write_text(EXPERIMENT)
    proc = subprocess.run([NEMOC, "run", "ft.nemo", "--workdir", "runs", "--workers", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tasks = tmp_path / "runs" / "tasks"
    task_path = tasks / "train_sft" / "task.json"
    task = stage.load_task(str(task_path))
    assert json.loads(task_path.read_text())["hf_init"].endswith("converted")
    done = json.loads((tasks / "train_sft" / "DONE.json").read_text())
    # the held-out loss before training is transformers' own on the same rows: the 8 experts split 4 + 4 over
    # the two expert-parallel ranks, the router, q_norm and k_norm all loaded where Megatron-Core reads them
    _, val = runners._sft_samples(task, stage.tokenizer_of(task))
    assert done["val_response_loss_before"] == pytest.approx(response_loss(hf_model, val, SEQ), rel=1e-4)
    out = tasks / "export_export" / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    # transformers 5 writes num_experts under its attribute-map name num_local_experts
    experts = config.get("num_experts", config.get("num_local_experts"))
    assert (experts, config["num_experts_per_tok"], config["moe_intermediate_size"]) == (8, 2, 32)
    before, after = read_tensors(ckpt), read_tensors(out)
    assert sorted(before) == sorted(after)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(".mlp.experts.7." in k for k in moved) and any(k.endswith("mlp.gate.weight") for k in moved)
    assert any("q_norm" in k for k in moved)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert response_loss(exported, val, SEQ) == pytest.approx(done["val_response_loss"], rel=1e-3)


def test_grouped_gemm_experts_take_the_sequential_names_slices():
    """A chunk built with grouped GEMM (TE's TEGroupedMLP: `mlp.experts.linear_fc1.weight{j}`, local j) loads the
    same expert slices as SequentialMLP's `mlp.experts.local_experts.{j}.linear_fc1.weight` (runtime/hf/load.py).
    TE is not built here: the chunk's names are Megatron-Core 0.16.1's, written out."""
    from nemoc.runtime.hf.load import _te_names
    from nemoc.runtime.hf.mapping import grouped_expert_name

    assert grouped_expert_name("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight") == \
        "decoder.layers.3.mlp.experts.linear_fc1.weight5"
    assert grouped_expert_name("decoder.layers.3.mlp.experts.local_experts.12.linear_fc2.bias") == \
        "decoder.layers.3.mlp.experts.linear_fc2.bias12"
    assert grouped_expert_name("decoder.layers.3.mlp.router.weight") is None
    state = {f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc{n}.weight": torch.full((2, 2), 10.0 * j + n)
             for j in range(4) for n in (1, 2)}
    state["decoder.layers.0.mlp.router.weight"] = torch.zeros(4, 2)
    state["decoder.layers.0.input_layernorm.weight"] = torch.ones(2)
    ours = {f"decoder.layers.0.mlp.experts.linear_fc{n}.weight{j}": None for j in range(4) for n in (1, 2)}
    ours |= {"decoder.layers.0.mlp.router.weight": None, "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight":
             None}
    renamed = _te_names(state, ours)
    assert set(renamed) == set(ours)
    assert all(float(renamed[f"decoder.layers.0.mlp.experts.linear_fc{n}.weight{j}"][0, 0]) == 10.0 * j + n
               for j in range(4) for n in (1, 2))


@pytest.mark.parametrize("dense", [{}, {"moe_first_dense_layers": 1}, {"moe_layer_freq": 2}],
                         ids=["all_sparse", "dense_first", "dense_after_expert"])
def test_a_trained_qwen3_moe_without_a_source_config_exports_as_qwen3_moe(mcore, tmp_path, dense):
    """No config.json to copy (a model written out in the .nemo file, or a preset): the export builds
    Qwen3MoeConfig from the spec (runtime/hf/trained.py spec_config), the router's aux-loss weight included, and
    the model's dense layers (moe_first_dense_layers) as mlp_only_layers."""
    from align_helpers import llama_spec
    from transformers import AutoModelForCausalLM

    from nemoc.runtime.hf import trained

    spec = llama_spec(seq_length=16, experts=4, top_k=2, moe_ffn_hidden=48, qk_layernorm=True, kv_channels=32,
                      moe_aux_loss_coeff=1e-3, norm_epsilon=1e-6, **dense)
    torch.manual_seed(0)
    model = mcore.build_gpt(spec, mcore.single_layout(), attention_backend="flash")
    with torch.no_grad():  # q_layernorm / k_layernorm start at 1: perturb so a dropped one shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    mcore.save_model(model, tmp_path / "ckpt")
    tokens = torch.randint(0, spec.vocab, (2, 9))
    batch = mcore.make_batch([(t, [1] * len(t)) for t in tokens.tolist()], tokens.shape[1] - 1)
    model.eval()
    with torch.no_grad():
        ours = mcore.gather_logits(model, batch)[..., : spec.vocab]
    out, _ = trained.export_trained(tmp_path / "ckpt", spec, tmp_path / "hf", vocab=spec.vocab, source=None,
                                    tokenizer_dir=None)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["router_aux_loss_coef"], config["norm_topk_prob"]) == ("qwen3_moe", 1e-3, True)
    assert config["mlp_only_layers"] == [i for i, p in enumerate(spec.moe_layer_pattern) if not p]
    expected = {"moe_first_dense_layers": [0], "moe_layer_freq": [1]}  # 2 layers: [0, 1] / [1, 0]
    assert config["mlp_only_layers"] == expected.get(next(iter(dense), ""), [])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        theirs = hf(tokens[:, :-1]).logits
    torch.testing.assert_close(theirs, ours.float().cpu(), atol=1e-4, rtol=1e-4)
