"""examples/pipeline.nemo end to end with `nemoc run`: pretrain -> sft (LoRA) -> dpo -> eval -> export;
re-running after editing only the DPO stage re-runs only dpo, eval and export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
SHORT = ["--set", "stage.pretrain.steps=20", "--set", "stage.sft.steps=5", "--set", "stage.dpo.steps=5"]


def _nemoc(*args, cwd):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", *args], capture_output=True, text=True,
                          timeout=1500, env=env, cwd=cwd)


def _states(workdir: Path) -> dict[str, str]:
    status = json.loads((workdir / "status.json").read_text())
    return {tid: t["state"] for tid, t in status["tasks"].items()}


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_reruns_only_what_changed(mcore, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemoc.compiler.plan import from_json
    from nemoc.runtime.tokenizer import load_tokenizer

    workdir = tmp_path / "run"
    first = _nemoc("run", str(REPO / "examples" / "pipeline.nemo"), "--workdir", str(workdir), *SHORT, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    states = _states(workdir)
    assert all(s == "done" for s in states.values()), states
    tasks = workdir / "tasks"
    dpo = json.loads((tasks / "train_dpo" / "DONE.json").read_text())
    assert dpo["resident_models"] == ["policy", "reference"] and "val" in dpo
    results = json.loads((tasks / "eval_eval" / "results.json").read_text())
    assert results["datasets"]["corpus"]["perplexity"] > 1 and len(results["generations"]) == 2

    # the exported checkpoint is the DPO model: transformers reproduces its logits
    export = json.loads((tasks / "export_export" / "DONE.json").read_text())
    plan = from_json((workdir / "plan.json").read_text())
    tok = load_tokenizer(export["tokenizer"])
    ours = mcore.build_gpt(plan.model, mcore.single_layout(), vocab=tok.vocab_size, seq_length=plan.stage("dpo").seq_length)
    mcore.load_model(ours, dpo["checkpoint"])
    ids = tok.tokenize("The day after Sunday is Monday.")
    batch = mcore.make_batch([(ids, [1] * len(ids))], len(ids) - 1)
    hf = AutoModelForCausalLM.from_pretrained(export["export"], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids[:-1]])).logits,
                                   mcore.gather_logits(ours, batch)[..., : tok.vocab_size].cpu(), atol=1e-4, rtol=1e-4)

    second = _nemoc("run", str(REPO / "examples" / "pipeline.nemo"), "--workdir", str(workdir), *SHORT,
                    "--set", "stage.dpo.beta=0.2", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    states = _states(workdir)
    rerun = sorted(t for t, s in states.items() if s == "done")
    assert rerun == ["eval:eval", "export:export", "train:dpo"], states
    assert all(states[t] == "cached" for t in ("train:pretrain", "train:sft", "tokenizer:local"))
