"""Gemma 3 (Gemma3ForCausalLM) from a Hugging Face checkpoint into training: an SFT stage starts at transformers'
own loss on the same rows (the sliding window, local RoPE base, (1 + w) norms, sandwich norms and embedding scale
all in the forward), takes optimizer steps, and `nemoc run` exports what it trained back to a checkpoint
transformers loads. Logits at TP=1/TP=2/PP=2 and the bit-identical round trip are test_hf_convert.py's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "align"))

from align_helpers import make_plan, write_task  # noqa: E402
from hf_models import make_hf_model, read_tensors, response_loss  # noqa: E402

NEMOC = str(Path(sys.executable).parent / "nemoc")
SEQ = 48
# vocab 384: a multiple of Megatron's padding (128 x TP=1), so Megatron's softmax runs over exactly transformers'
# logits. The window (8) is shorter than the rows (up to 48 tokens), so the sliding layer's mask matters.
GEMMA = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64, rms_norm_eps=1e-6,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(6) for b in range(6)]


def _gemma_world(root: Path):
    """A random transformers Gemma 3 with a byte-level tokenizer trained on the data, in `root/ckpt`, and chat data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemoc.runtime.tokenizer import train_byte_level_bpe

    ckpt = root / "ckpt"
    ckpt.mkdir(parents=True)
    tok = train_byte_level_bpe([q + " " + r for q, r in QA] * 4, 300, ckpt / "tokenizer.json")
    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3_text", **GEMMA)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # Gemma's norms start at 0 (a scale of 1): perturb them so a dropped or swapped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(ckpt)
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, r in QA]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chat) + "\n")
    return ckpt, tok, model




@pytest.mark.parametrize("pack", [False, True])
def test_an_sft_stage_from_gemma3_starts_at_its_loss_and_trains(mcore, tmp_path, pack):
    """pack = true trains on packed rows (the SDPA core's per-segment sliding window); the held-out loss
    before training is per row either way, and equals transformers'."""
    from nemoc.compiler import hfconfig
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime.align import runners, stage
    from nemoc.runtime.hf import convert

    ckpt, tok, hf_model = _gemma_world(tmp_path)
    convert.import_checkpoint(ckpt, tmp_path / "converted")
    arch = hfconfig.load_architecture(ckpt)
    assert arch.family == "gemma3_text" and arch.fields["sliding_window"] == 8
    spec = ModelSpec(name="gemma", **{**arch.fields, "seq_length": SEQ})
    plan = make_plan(spec, [("sft", "sft", (), {"pack": pack}, None, 3)])
    assert plan.stage("sft").execution.kernels == "local"
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
    assert payload["steps"] == 3 and payload["packing"] == pack
    assert payload["val_response_loss"] < payload["val_response_loss_before"]  # lr 3e-3 on the task's own data


@pytest.mark.parametrize("backend", ["unfused", "flash"])
def test_packed_samples_attend_only_within_themselves_on_the_sliding_layer(mcore, tmp_path, backend):
    """Two samples packed in one row: the second one's logits equal transformers' for it alone, under both
    attention cores (Megatron's unfused core would replace the packing mask by the window's: cross-sample
    attention inside the window; the SDPA core masks each segment)."""
    from build import layout

    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import megatron_args as margs
    from nemoc.runtime import model as mmodel
    from nemoc.runtime.align import common
    from nemoc.runtime.hf import convert

    hf = make_hf_model("gemma3", tmp_path / "hf")  # window 4 on layer 1
    manifest = convert.import_checkpoint(tmp_path / "hf", tmp_path / "conv")
    spec = ModelSpec(name="gemma", **manifest["architecture"])
    config = margs.transformer_config(model=spec, layout=layout(), precision="fp32", attention_backend=backend,
                                      facts=margs.MachineFacts(cpu=True, have_te=False))
    (chunk,) = mmodel.build_model_chunks(config=config, model=spec, vocab_size=256, seq_length=spec.seq_length,
                                         attention_backend=backend, have_te=False)
    mmodel.unwrap(chunk).load_state_dict(convert.rank_state_dict(tmp_path / "conv", padded_vocab=256), strict=False)
    g = torch.Generator().manual_seed(5)
    first, second = torch.randint(0, 200, (10,), generator=g).tolist(), torch.randint(0, 200, (12,), generator=g).tolist()
    batch = common.pack_rows([[(first, [1] * 10), (second, [1] * 12)]], 24, varlen=backend != "unfused")
    alone = common.make_batch([(second, [1] * 12)], 11)  # one sample per row: the causal path (pretraining's)
    chunk.eval()
    with torch.no_grad():
        ours = common.gather_logits(chunk, batch)[0, 10:22, :200]
        ours_alone = common.gather_logits(chunk, alone)[0, :, :200]
        theirs = hf(torch.tensor([second])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_alone, theirs[:11], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_nemoc_run_fine_tunes_gemma3_and_exports_a_checkpoint_transformers_loads(tmp_path):
    """End to end from the CLI: hf_import -> SFT (2 steps) -> export of the trained weights in the training dtype,
    with the post-block norms and QK norms under their Hugging Face names; transformers loads it and its logits
    differ from the untrained model's (it exported the trained weights, not the source)."""
    from transformers import AutoModelForCausalLM

    ckpt, _, hf_model = _gemma_world(tmp_path)
    (tmp_path / "ft.nemo").write_text("""experiment ft {
  cluster {
    gpu = CPU
    gpus_per_node = 1
  }
  model gemma {
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
  stage export after sft {
  }
}
""")
    proc = subprocess.run([NEMOC, "run", "ft.nemo", "--workdir", "runs", "--workers", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "runs" / "tasks" / "export_export" / "hf"
    before, after = read_tensors(ckpt), read_tensors(out)
    assert sorted(before) == sorted(after)
    assert not torch.equal(before["model.layers.0.post_feedforward_layernorm.weight"],
                           after["model.layers.0.post_feedforward_layernorm.weight"])  # trained
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again).__name__ == "Gemma3ForCausalLM"
    tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(again(tokens).logits, hf_model(tokens).logits)
