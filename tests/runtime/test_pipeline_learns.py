"""examples/pipeline_learns.nemo learns: SFT makes the model answer in the trained form, DPO raises the
preference accuracy on held-out pairs (never trained on) from 0.5 to at least 0.75."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pipeline_learns.nemo"
PREFS = REPO / "examples" / "data" / "pipeline" / "prefs_heldout.jsonl"
# the answer form SFT trains for each kind of question (examples/data/make_data.py, sft_example)
FORMS = {"What is 3 plus 2?": r"\d plus \d is \d+\.", "What is the capital of France?": r"The capital of \w+ is \w+\.",
         "Which day comes after Monday?": r"The day after \w+ is \w+\."}


def _replies(results_path: Path) -> dict[str, str]:
    return {g["prompt"]: g["completion"].strip() for g in json.loads(results_path.read_text())["generations"]}


def test_its_held_out_pairs_are_never_training_pairs():
    from nemoc.runtime import heldout
    from nemoc.runtime.align import stage

    records = [json.loads(line) for line in PREFS.read_text().splitlines() if line.strip()]
    assert len({json.dumps(r, sort_keys=True) for r in records}) == len(records)  # every triple once
    train, val = stage.split_held_out(records, 0.2, seed=1234)
    assert heldout.split(records, 0.2, seed=1234) == (train, val)  # nothing to drop: no copies
    assert len(val) >= 30


@pytest.mark.slow
def test_pipeline_learns(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(EXAMPLE), "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=1800, env=dict(os.environ), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tasks = workdir / "tasks"
    sft = json.loads((tasks / "train_sft" / "DONE.json").read_text())
    assert sft["val_response_loss"] < 0.5 * sft["val_response_loss_before"]
    dpo = json.loads((tasks / "train_dpo" / "DONE.json").read_text())
    assert dpo["val_before"]["reward_accuracy"] == 0.5  # policy == reference: every held-out pair ties
    assert dpo["val"]["reward_accuracy"] >= 0.75, dpo["val"]
    for stage in ("eval_sft", "eval"):  # after SFT, and still after DPO: each question gets its kind's form
        replies = _replies(tasks / f"eval_{stage}" / "results.json")
        assert all(re.fullmatch(FORMS[q], replies[q]) for q in FORMS), (stage, replies)
