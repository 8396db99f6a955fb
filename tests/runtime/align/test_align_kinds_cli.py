"""examples/alignment_kinds.nemo with `nemoc run` (pretrain -> sft -> kto, orpo, grpo; eval after orpo, sft),
shortened: every stage finishes, holds the models the memory model planned, and reports held-out metrics
that `nemoc status` lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SHORT = ["--set", "stage.pretrain.steps=10", "--set", "stage.sft.steps=5", "--set", "stage.kto.steps=3",
         "--set", "stage.orpo.steps=3", "--set", "stage.grpo.steps=2"]


def _nemoc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", *args], capture_output=True, text=True,
                          timeout=1500, env=dict(os.environ), cwd=cwd)


@pytest.mark.slow
def test_kto_orpo_grpo_run_end_to_end(tmp_path):
    from nemoc.compiler.memory import resident_models
    from nemoc.compiler.plan import from_json

    workdir = tmp_path / "run"
    run = _nemoc("run", str(REPO / "examples" / "alignment_kinds.nemo"), "--workdir", str(workdir), *SHORT, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    plan = from_json((workdir / "plan.json").read_text())
    done = {k: json.loads((workdir / "tasks" / f"train_{k}" / "DONE.json").read_text()) for k in ("kto", "orpo", "grpo")}
    for kind, d in done.items():
        sp = plan.stage(kind)
        assert d["resident_models"] == list(resident_models(kind, sp.params, peft=sp.peft)) == list(sp.resident_models)
        assert d["steps"] == {"kto": 3, "orpo": 3, "grpo": 2}[kind]
    assert done["kto"]["val_before"] == {"reward_margin": 0.0, "reward_auc": 0.5}  # policy == reference
    assert done["kto"]["val_examples"] > 0 and done["kto"]["loss_type"] == "kto"
    assert set(done["orpo"]["val"]) == {"reward_accuracy", "reward_margin", "likelihood_accuracy", "nll"}
    assert done["orpo"]["val"]["nll"] < done["orpo"]["val_before"]["nll"]  # the SFT term learns in 3 steps
    assert done["grpo"]["reward_source"] == "contains" and 0.0 <= done["grpo"]["val"]["reward"] <= 1.0
    assert done["grpo"]["num_generations"] == 4
    status = _nemoc("status", str(workdir), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    held = {t["id"]: t.get("held_out") or {} for t in json.loads(status.stdout)["tasks"]}
    assert set(held["train:kto"]) >= {"reward_auc"} and set(held["train:grpo"]) >= {"reward"}
    assert set(held["train:orpo"]) >= {"preference_accuracy", "likelihood_accuracy"}
    # eval after orpo, sft: ORPO's policy against its SFT reference, on the pairs ORPO held out and the chat
    # records SFT held out
    ev = json.loads((workdir / "tasks" / "eval_eval" / "DONE.json").read_text())
    prefs, chat = ev["datasets"]["prefs"], ev["datasets"]["chat"]
    assert prefs["pairs"] == done["orpo"]["val_pairs"] and "orpo (seed 1234)" in prefs["split"]
    assert {"preference_accuracy", "reward_margin", "likelihood_accuracy"} <= set(prefs)
    assert "sft (seed 1234)" in chat["split"] and chat["perplexity"] > 1
    assert ev["resident_models"] == ["policy", "reference"] and ev["reference"] == "sft"
    assert {"prefs.preference_accuracy", "chat.perplexity"} <= set(held["eval:eval"])
