"""A MoE model with a dense first layer (`moe_first_dense_layers = 1`, DeepSeek's first_k_dense_replace) through
the CLI on CPU / gloo: a tiny pretrain at expert parallelism 2 trains (its loss falls), saves checkpoints of the
mixed layers (Megatron-Core's non-homogeneous dist_checkpointing layout, which `moe_layer_freq` switches on) and
resumes from one, continuing the uninterrupted run's losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemoc.runtime.cli import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MODEL = """\
  model tiny_moe {
    layers = 3
    hidden = 64
    heads = 4
    ffn_hidden = 256
    experts = 4
    top_k = 2
    moe_ffn_hidden = 64
    shared_expert_ffn_hidden = 64
    moe_first_dense_layers = 1
    vocab = 1024
    seq_length = 128
  }
"""


def _experiment(tmp_path: Path) -> Path:
    text = (EXAMPLES / "quickstart.nemo").read_text()
    start, end = text.index("  model tiny_gpt {"), text.index("  parallel {")
    text = text[:start] + MODEL + "\n" + text[end:]
    text = text.replace("vocab_size = 4096", "vocab_size = 1024").replace("    tensor = 1\n", "    tensor = 1\n    expert = 2\n")
    text = text.replace("micro_batch = auto", "micro_batch = 2").replace("warmup = 30", "warmup = 2")
    text = text.replace("every = 100\n      keep = 2", "every = 6\n      keep = 3").replace("eval_every = 100", "eval_every = 1000")
    (tmp_path / "data" / "quickstart").mkdir(parents=True)
    shutil.copy(EXAMPLES / "data" / "quickstart" / "corpus.jsonl", tmp_path / "data" / "quickstart" / "corpus.jsonl")
    path = tmp_path / "moe_dense.nemo"
    path.write_text(text)
    return path


def _records(task: Path) -> list[dict]:
    return [json.loads(line) for line in (task / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}


@pytest.mark.slow
def test_moe_with_a_dense_first_layer_trains_at_ep2_and_resumes(tmp_path):
    """About a minute on 2 CPU ranks: 12 steps with checkpoints at 6 and 12, then the run again from step 6."""
    path, workdir = _experiment(tmp_path), tmp_path / "w"
    args = ["run", str(path), "--workdir", str(workdir), "--set", "stage.pretrain.steps=12",
            "--set", "stage.pretrain.log_every=1"]
    runner = CliRunner()
    first = runner.invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "ep=2" in first.output
    task = workdir / "tasks" / "train_pretrain"
    plan = json.loads(Path(json.loads((task / "task.json").read_text())["plan"]).read_text())
    assert plan["model"]["moe_first_dense_layers"] == 1
    losses = _losses(_records(task))
    assert sorted(losses) == list(range(1, 13))
    # from ln(1024) = 6.93 at the start: 6.65 -> about 5.99 over steps 1-3 vs 10-12 on this tree
    assert sum(losses[s] for s in (10, 11, 12)) < 0.95 * sum(losses[s] for s in (1, 2, 3)), losses

    # resume: the run stopped after its step-6 checkpoint (the step-12 one gone, the task not done)
    checkpoints = task / "checkpoints"
    shutil.rmtree(checkpoints / "iter_0000012")
    (checkpoints / "latest").write_text("iter_0000006\n")
    (task / "DONE.json").unlink()
    (task / "metrics.jsonl").unlink()
    again = runner.invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    records = _records(task)
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["iteration"] == 6, records[:5]
    continued = _losses(records)
    assert sorted(continued) == list(range(7, 13))
    for step in range(7, 13):
        assert continued[step] == pytest.approx(losses[step], rel=1e-4), (step, continued, losses)
