"""Drop-and-pad MoE on CPU/gloo through the CLI: a tiny MoE pretrain at expert parallelism 2 with
`moe_capacity_factor = 1.0` and `moe_pad_to_capacity = true` (NeMo's Mixtral performance mode) trains,
and its first forward differs from the dropless run of the same weights (tokens over capacity are
dropped: the setting reached Megatron-Core's token dispatcher)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemoc.runtime.cli import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MOE_MODEL = """\
  model tiny_moe {
    layers = 2
    hidden = 64
    heads = 4
    ffn_hidden = 256
    experts = 4
    top_k = 2
    moe_ffn_hidden = 128
    vocab = 1024
    seq_length = 128
  }
"""


def _experiment(tmp_path: Path) -> Path:
    """The quickstart, its model swapped for a 4-expert MoE at EP 2 on 2 CPU ranks, 20 steps."""
    text = (EXAMPLES / "quickstart.nemo").read_text()
    start, end = text.index("  model tiny_gpt {"), text.index("  parallel {")
    text = text[:start] + MOE_MODEL + "\n" + text[end:]
    text = text.replace("vocab_size = 4096", "vocab_size = 1024").replace("    tensor = 1\n", "    tensor = 1\n    expert = 2\n")
    text = text.replace("micro_batch = auto", "micro_batch = 2").replace("warmup = 30", "warmup = 2")
    (tmp_path / "data" / "quickstart").mkdir(parents=True)
    shutil.copy(EXAMPLES / "data" / "quickstart" / "corpus.jsonl", tmp_path / "data" / "quickstart" / "corpus.jsonl")
    path = tmp_path / "moe.nemo"
    path.write_text(text)
    return path


def _losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "tasks" / "train_pretrain" / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m and "event" not in m}


@pytest.mark.slow
def test_drop_and_pad_moe_trains_at_ep2_and_drops_tokens(tmp_path):
    """About 45 s on 2 CPU ranks: the dropless run, then the drop-and-pad run of the same model and data."""
    path, workdir = _experiment(tmp_path), tmp_path / "w"
    common = ("run", str(path), "--workdir", str(workdir), "--set", "stage.pretrain.steps=20",
              "--set", "stage.pretrain.log_every=1")
    runner = CliRunner()
    dropless = runner.invoke(cli, list(common), catch_exceptions=False)
    assert dropless.exit_code == 0, dropless.output
    before = _losses(workdir)
    padded = runner.invoke(cli, [*common, "--set", "model.moe_capacity_factor=1.0",
                                 "--set", "model.moe_pad_to_capacity=true"], catch_exceptions=False)
    assert padded.exit_code == 0, padded.output
    assert "ep=2" in padded.output
    after = _losses(workdir)
    task = json.loads((workdir / "tasks" / "train_pretrain" / "task.json").read_text())
    model = json.loads(Path(task["plan"]).read_text())["model"]
    assert (model["moe_capacity_factor"], model["moe_pad_to_capacity"]) == (1.0, True)
    assert sorted(after) == list(range(1, 21))
    # the same initial weights and batch: a different first loss means tokens over capacity were dropped
    assert after[1] != pytest.approx(before[1], rel=1e-6), (before[1], after[1])
    assert after[1] == pytest.approx(before[1], rel=0.05)  # a few dropped copies, not a different model
    assert sum(after[s] for s in range(16, 21)) < 0.9 * sum(after[s] for s in range(1, 6)), after
