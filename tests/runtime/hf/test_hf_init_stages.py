"""`init = hf(DIR)` into the training and eval stages: an SFT stage that starts from a converted Hugging
Face checkpoint starts at that model's loss (transformers' own loss on the same rows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "align"))

from align_helpers import make_plan, write_task  # noqa: E402
from hf_models import response_loss  # noqa: E402

NEMOC = str(Path(sys.executable).parent / "nemoc")
SEQ = 48
# vocab 384 is a multiple of Megatron's padding (128 x TP=1): the converted embedding has no zero rows,
# so Megatron's softmax runs over exactly transformers' logits and the losses are comparable exactly
HF = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(6) for b in range(6)]


def _hf_world(root: Path):
    """A random transformers Llama with a trained byte-level tokenizer in `root/ckpt`, and chat data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemoc.runtime.tokenizer import train_byte_level_bpe

    ckpt = root / "ckpt"
    ckpt.mkdir(parents=True)
    tok = train_byte_level_bpe([q + " " + r for q, r in QA] * 4, 300, ckpt / "tokenizer.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **HF), dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(ckpt)
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, r in QA]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chat) + "\n")
    return ckpt, tok, model




def test_an_sft_stage_with_init_hf_starts_at_the_hf_models_loss(mcore, tmp_path):
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime.align import runners, stage
    from nemoc.runtime.hf import convert

    ckpt, tok, hf_model = _hf_world(tmp_path)
    convert.import_checkpoint(ckpt, tmp_path / "converted")
    spec = ModelSpec(name="tiny", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=96, vocab=384,
                     seq_length=SEQ, activation="swiglu", norm="rmsnorm", position="rope", rotary_base=10000.0,
                     norm_epsilon=1e-5)
    plan = make_plan(spec, [("sft", "sft", (), {"pack": False}, None, 1)])
    path = write_task(tmp_path, plan, "sft", datasets=[{"name": "c", "path": str(tmp_path / "chat.jsonl"),
                                                        "format": "chat", "split": "80,20,0"}],
                      tokenizer=str(ckpt / "tokenizer.json"), vocab_size=tok.vocab_size, parents={})
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "hf_init": str(tmp_path / "converted")}))  # as base_task_json hands it
    task = stage.load_task(str(path))
    payload = runners.run_sft(task)
    _, val = runners._sft_samples(task, stage.tokenizer_of(task))
    expected = response_loss(hf_model, val, SEQ)
    assert payload["val_response_loss_before"] == pytest.approx(expected, rel=1e-4)
    assert expected < 7.0  # a random 384-token model: about ln(384) = 5.95, not a trained one's


def test_a_reward_stage_starts_its_trunk_from_hf_and_keeps_its_scalar_head(mcore, tmp_path):
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime.align import common, stage
    from nemoc.runtime.hf import convert

    ckpt, tok, hf_model = _hf_world(tmp_path)
    convert.import_checkpoint(ckpt, tmp_path / "converted")
    spec = ModelSpec(name="tiny", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=96, vocab=384,
                     seq_length=SEQ, activation="swiglu", norm="rmsnorm", position="rope", rotary_base=10000.0)
    plan = make_plan(spec, [("rm", "reward", (), {}, None, 1)])
    path = write_task(tmp_path, plan, "rm", datasets=[], tokenizer=str(ckpt / "tokenizer.json"),
                      vocab_size=tok.vocab_size, parents={})
    path.write_text(json.dumps({**json.loads(path.read_text()), "hf_init": str(tmp_path / "converted")}))
    task = stage.load_task(str(path))
    chunk = stage.build(task, checkpoint=stage.policy_start(task), scalar_head=True, skip_output=True)
    gpt = common.unwrap(chunk)
    assert torch.equal(gpt.decoder.layers[0].mlp.linear_fc2.weight, hf_model.model.layers[0].mlp.down_proj.weight)
    assert float(gpt.output_layer.weight.abs().sum()) == 0.0  # the scalar head starts at zero


@pytest.mark.slow
def test_nemoc_run_of_an_sft_stage_with_init_hf(tmp_path):
    """End to end from the CLI: hf_import converts, the SFT stage loads it (task.json `hf_init`)."""
    ckpt, _, hf_model = _hf_world(tmp_path)
    (tmp_path / "ft.nemo").write_text("""experiment ft {
  cluster {
    gpu = CPU
    gpus_per_node = 1
  }
  model tiny {
    init = hf("ckpt")
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
    global_batch = 2
    seq_length = 48
  }
}
""")
    proc = subprocess.run([NEMOC, "run", "ft.nemo", "--workdir", "runs", "--workers", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    task = json.loads((tmp_path / "runs" / "tasks" / "train_sft" / "task.json").read_text())
    assert task["hf_init"].endswith("converted") and "hf" not in task["parents"]
    done = json.loads((tmp_path / "runs" / "tasks" / "train_sft" / "DONE.json").read_text())
    assert done["val_response_loss_before"] < 7.0  # the HF model's, not a trained one's (checked exactly above)


def test_a_pretraining_stage_with_init_hf_loads_it_into_model_and_optimizer(mcore, tmp_path):
    """runtime/core/build.py restore_or_initialize: no checkpoint of its own -> the converted HF weights,
    in the model and in the optimizer's main copy (the first step moves from them, not from random)."""
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime.core import build
    from nemoc.runtime.hf import convert
    from nemoc.runtime.metrics import NullMetrics

    ckpt, tok, hf_model = _hf_world(tmp_path)
    convert.import_checkpoint(ckpt, tmp_path / "converted")
    spec = ModelSpec(name="tiny", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=96, vocab=384,
                     seq_length=SEQ, activation="swiglu", norm="rmsnorm", position="rope", rotary_base=10000.0)
    plan = make_plan(spec, [("pretrain", "pretrain", (), {}, None, 1)])
    stage_plan = plan.stage("pretrain")
    model, _, _ = build.build_model(plan=plan, stage=stage_plan, vocab_size=tok.vocab_size)
    optimizer, scheduler = build.build_optimizer(model=model, stage=stage_plan, precision="fp32")
    restored = build.restore_or_initialize(root=str(tmp_path / "ckpts"), init_checkpoint=None,
                                           distributed_optimizer=False, model=model, optimizer=optimizer,
                                           scheduler=scheduler, metrics=NullMetrics(),
                                           hf_init=str(tmp_path / "converted"), vocab_size=tok.vocab_size)
    assert restored is None
    gpt = model[0].module
    expected = hf_model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(gpt.decoder.layers[1].mlp.linear_fc2.weight, expected)
    main = [p for group in optimizer.param_groups for p in group["params"]]
    assert any(p.shape == expected.shape and torch.equal(p.detach(), expected) for p in main)
