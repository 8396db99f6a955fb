"""Multi-latent attention end to end on CPU/gloo through the CLI: a tiny DeepSeek-style MLA model (query
and key/value latents, YaRN RoPE, the latents' RMSNorms) pretrains at TP 1 x DP 2 and at TP 2 (the local
spec's column-parallel down projections, gathered over TP), its loss falls, and the plan the runtime read
carries the MLA fields (what Megatron-Core's MLATransformerConfig got: tests/runtime/test_mla_layer.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemoc.runtime.cli import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MLA_MODEL = """\
  model tiny_mla {
    layers = 2
    hidden = 64
    heads = 4
    ffn_hidden = 256
    vocab = 1024
    seq_length = 128
    multi_latent_attention = true
    q_lora_rank = 32
    kv_lora_rank = 32
    qk_head_dim = 16
    qk_pos_emb_head_dim = 8
    v_head_dim = 16
    qk_layernorm = true
    rope_type = yarn
    rope_scaling_factor = 4
    original_max_position_embeddings = 32
    mscale_all_dim = 1
  }
"""


def _experiment(tmp_path: Path, tensor: int) -> Path:
    """The quickstart, its model swapped for the tiny MLA model, at `tensor` on 2 CPU ranks."""
    text = (EXAMPLES / "quickstart.nemo").read_text()
    start, end = text.index("  model tiny_gpt {"), text.index("  parallel {")
    text = text[:start] + MLA_MODEL + "\n" + text[end:]
    text = text.replace("vocab_size = 4096", "vocab_size = 1024").replace("    tensor = 1\n", f"    tensor = {tensor}\n")
    text = text.replace("micro_batch = auto", "micro_batch = 2").replace("warmup = 30", "warmup = 2")
    data = tmp_path / "data" / "quickstart"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLES / "data" / "quickstart" / "corpus.jsonl", data / "corpus.jsonl")
    path = tmp_path / f"mla_tp{tensor}.nemo"
    path.write_text(text)
    return path


def _losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "tasks" / "train_pretrain" / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m and "event" not in m}


@pytest.mark.slow
@pytest.mark.parametrize("tensor", [1, 2])
def test_mla_pretrains_and_its_loss_falls(tmp_path, tensor):
    """About 30 s each on 2 CPU ranks (tokenizer, data preparation, 30 steps)."""
    path, workdir = _experiment(tmp_path, tensor), tmp_path / "w"
    result = CliRunner().invoke(cli, ["run", str(path), "--workdir", str(workdir), "--set", "stage.pretrain.steps=30",
                                      "--set", "stage.pretrain.log_every=1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"tp={tensor}" in result.output
    task = json.loads((workdir / "tasks" / "train_pretrain" / "task.json").read_text())
    model = json.loads(Path(task["plan"]).read_text())["model"]
    assert (model["multi_latent_attention"], model["q_lora_rank"], model["rope_type"]) == (True, 32, "yarn")
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, 31))
    assert sum(losses[s] for s in range(26, 31)) < 0.8 * sum(losses[s] for s in range(1, 6)), losses
