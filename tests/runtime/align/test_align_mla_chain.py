"""A multi-latent attention model (DeepSeek-style: query and key/value latents, YaRN RoPE) through every
training stage kind with `nemoc run` on the CPU box's two ranks: pretrain -> sft (LoRA) -> reward, dpo (LoRA),
kto, orpo, ppo (rollouts with the KV cache), grpo (LoRA) and an eval with prompts. Every stage finishes with
finite losses and a checkpoint, pretraining and SFT losses fall, and the LoRA stages train exactly the
adapters the plan counts (the MLA projections': runtime/align/lora.py MLA_QKV)."""

from __future__ import annotations

import json
import math

import pytest

from cli_chain import REPO, assert_rl_stage_finished, nemoc_run, rl_chain

MLA_MODEL = """  model tiny_mla {
    layers = 2
    hidden = 64
    heads = 4
    ffn_hidden = 128
    vocab = 4096
    seq_length = 64
    activation = swiglu
    norm = rmsnorm
    multi_latent_attention = true
    q_lora_rank = 32
    kv_lora_rank = 32
    qk_head_dim = 16
    qk_pos_emb_head_dim = 8
    v_head_dim = 16
    qk_layernorm = true
    rope_type = yarn
    rope_scaling_factor = 4
    original_max_position_embeddings = 16
    mscale_all_dim = 1
  }
"""

EXTRA = """
  data unpaired {
    path = "DATA/pipeline/unpaired.jsonl"
    format = unpaired
  }

  stage dpo after sft {
    data = [prefs]
    steps = 2
    global_batch = 4
    peft = lora(rank = 4, alpha = 8)
    optimizer = adam(lr = 1e-5, weight_decay = 0.0)
  }

  stage kto after sft {
    data = [unpaired]
    steps = 2
    global_batch = 4
    optimizer = adam(lr = 1e-5, weight_decay = 0.0)
  }

  stage orpo after sft {
    data = [prefs]
    steps = 2
    global_batch = 4
    optimizer = adam(lr = 1e-5, weight_decay = 0.0)
  }

  stage eval after dpo {
    data = [corpus]
    prompts = ["Once upon a time"]
    max_new_tokens = 8
  }
"""


def _losses(workdir, kind):
    records = [json.loads(x) for x in (workdir / "tasks" / f"train_{kind}" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "step" in r and "event" not in r and "val_loss" not in r]


@pytest.mark.slow
@pytest.mark.long  # every stage kind on MLA through `nemoc run` (~2 min): out of CI, `pytest -m long`
def test_mla_runs_every_training_kind_end_to_end(tmp_path):
    """About 3 minutes of CPU (5 minutes on the shared 2-core box; 12 tasks)."""
    from nemoc.compiler.flops import lora_params_per_layer

    text = rl_chain("mla_chain", "", extra=EXTRA)
    start, end = text.index("  model tiny_llama {"), text.index("  parallel {")
    text = text[:start] + MLA_MODEL + "\n" + text[end:]
    text = text.replace("DATA/pipeline/unpaired.jsonl", str(REPO / "examples" / "data" / "pipeline" / "unpaired.jsonl"))
    text = text.replace("  stage pretrain {\n    data = [corpus]\n    steps = 4", "  stage pretrain {\n    data = [corpus]\n    steps = 30\n    log_every = 1")
    text = text.replace("  stage sft after pretrain {\n    data = [chat]\n    steps = 2", "  stage sft after pretrain {\n    data = [chat]\n    steps = 12\n    log_every = 1\n    peft = lora(rank = 8, alpha = 16)")
    workdir, plan = nemoc_run(tmp_path, text, "mla_chain.nemo")
    assert plan.model.multi_latent_attention

    pretrain, sft = _losses(workdir, "pretrain"), _losses(workdir, "sft")
    assert len(pretrain) == 30 and sum(pretrain[-5:]) < 0.9 * sum(pretrain[:5]), pretrain  # measured 6.46 -> 5.39
    assert len(sft) == 12 and sum(sft[-3:]) < sum(sft[:3]), sft
    for kind in ("sft", "reward", "dpo", "kto", "orpo"):
        done = json.loads((workdir / "tasks" / f"train_{kind}" / "DONE.json").read_text())
        assert math.isfinite(done["final_loss"]) and (workdir / "tasks" / f"train_{kind}" / "checkpoints").is_dir()
        peft = plan.stage(kind).peft
        if peft is not None:  # the adapters the runtime trained are the ones the plan sized
            assert done["adapter_parameters"] == plan.model.layers * lora_params_per_layer(plan.model, peft), kind
    for kind in ("ppo", "grpo"):
        assert_rl_stage_finished(workdir, plan, kind)
    ev = json.loads((workdir / "tasks" / "eval_eval" / "DONE.json").read_text())
    assert [g["tokens"] for g in ev["generations"]] == [8] and math.isfinite(ev["datasets"]["corpus"]["loss"])
