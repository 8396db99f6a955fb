"""DeepSeek-V3 end to end from the CLI: `init = hf(...)` of a tiny DeepseekV3ForCausalLM checkpoint (multi-latent
attention with a query latent and YaRN, sigmoid-routed experts with an expert bias in two groups, routed scaling,
a shared expert) -> SFT at expert parallelism 2 on two CPU processes -> Hugging Face export that transformers
loads. The SFT stage starts at transformers' own loss (the import is right at EP 2); the export carries the
trained weights under DeepSeek's names and computes the loss the stage ended with. And an MLA model trained
without a Hugging Face source (dense, and MoE) exports as DeepseekV3 with transformers' logits equal to ours."""

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
# vocab 384 = 3 x 128 (no padding rows at TP 1); every width of MLA different (q/k 16 + 8, v 12, latents 24 / 16);
# 4 routed experts in 2 groups, top 2 from the best group, one shared expert; YaRN over an original context of 16
CONFIG = dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
              topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
              first_k_dense_replace=0, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
              rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                                   beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, rope_theta=10000.0),
              bos_token_id=1, eos_token_id=2)
QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(6) for b in range(6)]

EXPERIMENT = """experiment deepseek_ft {
  cluster {
    gpu = CPU
    gpus_per_node = 2
  }
  model tiny_deepseek {
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
    config = AutoConfig.for_model("deepseek_v3", initializer_range=0.1, **CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 1 and the expert bias at 0: perturb them so a dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    model.save_pretrained(ckpt)
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, r in QA]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chat) + "\n")
    return ckpt, model




@pytest.mark.slow
def test_nemoc_run_sft_at_ep2_from_a_deepseek_v3_checkpoint_and_export(tmp_path):
    """About 1.5 minutes on the 2-core box."""
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
    plan_model = json.loads(Path(json.loads(task_path.read_text())["plan"]).read_text())["model"]
    assert (plan_model["multi_latent_attention"], plan_model["moe_router_score"], plan_model["moe_expert_bias"],
            plan_model["moe_router_groups"], plan_model["moe_topk_scaling_factor"]) == (True, "sigmoid", True, 2, 2.5)
    done = json.loads((tasks / "train_sft" / "DONE.json").read_text())
    # the held-out loss before training is transformers' own on the same rows: MLA, the experts split 2 + 2 over
    # the two expert-parallel ranks, the sigmoid router with its expert bias and the shared expert all loaded
    _, val = runners._sft_samples(task, stage.tokenizer_of(task))
    assert done["val_response_loss_before"] == pytest.approx(response_loss(hf_model, val, SEQ), rel=1e-4)
    out = tasks / "export_export" / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    before, after = read_tensors(ckpt), read_tensors(out)
    assert sorted(before) == sorted(after)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    for part in ("kv_b_proj", "q_a_layernorm", "kv_a_proj_with_mqa", ".mlp.experts.3.", "shared_experts",
                 "mlp.gate.weight"):
        assert any(part in k for k in moved), part
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert response_loss(exported, val, SEQ) == pytest.approx(done["val_response_loss"], rel=1e-3)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_an_mla_model_trained_without_a_source_exports_as_deepseek_v3(mcore, tmp_path, moe):
    """No config.json to copy: the export builds DeepseekV3Config from the spec (runtime/hf/trained.py
    deepseek_v3_config); transformers computes our logits."""
    from align_helpers import mla_spec
    from transformers import AutoModelForCausalLM

    from nemoc.runtime.hf import trained
    from nemoc.runtime.model import unwrap

    extra = dict(experts=4, top_k=2, moe_ffn_hidden=32, shared_expert_ffn_hidden=32, moe_router_score="sigmoid",
                 moe_expert_bias=True, moe_router_groups=2, moe_router_group_topk=1, moe_topk_scaling_factor=2.5,
                 moe_load_balancing="seq_aux_loss", moe_aux_loss_coeff=1e-4) if moe else {}
    spec = mla_spec(seq_length=16, vocab=128, norm_epsilon=1e-6, **extra)
    torch.manual_seed(0)
    model = mcore.build_gpt(spec, mcore.single_layout())
    with torch.no_grad():  # norms start at 1, the expert bias at 0: perturb them so a dropped one shows
        for name, p in unwrap(model).named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in unwrap(model).named_buffers():
            if name.endswith("expert_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    mcore.save_model(model, tmp_path / "ckpt")
    tokens = torch.randint(0, spec.vocab, (2, 13), generator=torch.Generator().manual_seed(1))
    batch = mcore.make_batch([(t, [1] * len(t)) for t in tokens.tolist()], tokens.shape[1] - 1)
    model.eval()
    with torch.no_grad():
        ours = mcore.gather_logits(model, batch)[..., : spec.vocab]
    out, _ = trained.export_trained(tmp_path / "ckpt", spec, tmp_path / "hf", vocab=spec.vocab, source=None,
                                    tokenizer_dir=None)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["first_k_dense_replace"] == (0 if moe else spec.layers)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens[:, :-1]).logits
    torch.testing.assert_close(theirs, ours.float().cpu(), atol=1e-4, rtol=1e-4)
