"""The sft, dpo, reward, kto and orpo stages at pipeline parallelism 2 through the entrypoint (`python -m
nemoc.runtime.align` under torchrun): training on the core loop's 1F1B schedule and every other pass
(held-out loss, reference scores, KTO's KL baseline, accuracies) through forward-only schedules report what one process
reports."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from align_helpers import arithmetic_world, make_plan, write_task


def _run(task_path, nproc: int):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "nemoc.runtime.align", str(task_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--module", "nemoc.runtime.align", str(task_path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "dpo", "reward", "kto", "orpo"])
def test_a_stage_at_pp2_reports_what_one_process_reports(mcore, tmp_path, kind):
    from plan_factory import make_execution

    root, spec, tok, qa = arithmetic_world(tmp_path, mcore, seed=11)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({"prompt": q, "chosen": r, "rejected": r.replace(" is ", " is not ")})
                               for q, r in qa) + "\n")
    data = {"sft": [{"name": "c", "path": str(root / "chat.jsonl"), "format": "chat", "split": "80,20,0"}],
            "dpo": [{"name": "p", "path": str(prefs), "format": "preference", "split": "80,20,0"}],
            "reward": [{"name": "p", "path": str(prefs), "format": "preference", "split": "80,20,0"}],
            "kto": [{"name": "p", "path": str(prefs), "format": "preference", "split": "80,20,0"}],
            "orpo": [{"name": "p", "path": str(prefs), "format": "preference", "split": "80,20,0"}]}[kind]
    params = {"sft": {"pack": True}, "dpo": {"beta": 0.1}, "reward": {}, "kto": {"beta": 0.1}, "orpo": {"beta": 0.1}}[kind]
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("s", kind, ("base",), params, None, 3)],
                     log_every=1)
    done = {}
    for pp in (1, 2):
        stage = plan.stage("s")
        layout = dataclasses.replace(stage.layout, pp=pp)
        stage = dataclasses.replace(stage, layout=layout, execution=make_execution(spec, layout, kind=kind,
                                                                                   attention="flash"))
        out = tmp_path / f"pp{pp}"
        out.mkdir()
        task = write_task(out, dataclasses.replace(plan, stages=(plan.stage("base"), stage)), "s", datasets=data,
                          tokenizer=str(root / "tokenizer.json"), vocab_size=tok.vocab_size,
                          parents={"base": str(root / "base")}, out=out / "task")
        proc = _run(task, pp)
        assert proc.returncode == 0, proc.stderr[-4000:]
        done[pp] = json.loads((out / "task" / "DONE.json").read_text())
    one, two = done[1], done[2]
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    if kind == "sft":  # packed rows, variable-length attention at both layouts
        assert two["val_response_loss_before"] == pytest.approx(one["val_response_loss_before"], rel=1e-5)
        assert two["val_response_loss"] == pytest.approx(one["val_response_loss"], rel=1e-4)
    else:
        for key in ("val_before", "val"):
            assert two[key].keys() == one[key].keys() and one[key]
            for name, value in one[key].items():
                assert two[key][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, name)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_stage_at_cp2_reports_what_one_process_reports(mcore, tmp_path, kind):
    """Context parallelism 2 through the entrypoint: the stage's process group gets its CP group, every
    batch is a CP shard, and the training losses and held-out numbers (SFT's response loss, DPO's
    reference-relative accuracies) are one process's; SFT with its default `pack = true` is refused with
    the way out (packed rows are split over CP ranks only by TE's THD attention)."""
    from plan_factory import make_execution

    root, spec, tok, qa = arithmetic_world(tmp_path, mcore, seed=11)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({"prompt": q, "chosen": r, "rejected": r.replace(" is ", " is not ")})
                               for q, r in qa) + "\n")
    data = {"sft": [{"name": "c", "path": str(root / "chat.jsonl"), "format": "chat", "split": "80,20,0"}],
            "dpo": [{"name": "p", "path": str(prefs), "format": "preference", "split": "80,20,0"}]}[kind]
    params = {"sft": {"pack": False}, "dpo": {"beta": 0.1}}[kind]
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("s", kind, ("base",), params, None, 3)],
                     log_every=1)
    done = {}
    for cp in (1, 2):
        stage = plan.stage("s")
        layout = dataclasses.replace(stage.layout, cp=cp)
        stage = dataclasses.replace(stage, layout=layout, execution=make_execution(spec, layout, kind=kind,
                                                                                   attention="flash"))
        out = tmp_path / f"cp{cp}"
        out.mkdir()
        task = write_task(out, dataclasses.replace(plan, stages=(plan.stage("base"), stage)), "s", datasets=data,
                          tokenizer=str(root / "tokenizer.json"), vocab_size=tok.vocab_size,
                          parents={"base": str(root / "base")}, out=out / "task")
        proc = _run(task, cp)
        assert proc.returncode == 0, proc.stderr[-4000:]
        done[cp] = json.loads((out / "task" / "DONE.json").read_text())
    one, two = done[1], done[2]
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    if kind == "sft":
        assert two["val_response_loss_before"] == pytest.approx(one["val_response_loss_before"], rel=1e-5)
        assert two["val_response_loss"] == pytest.approx(one["val_response_loss"], rel=1e-4)
        packed = dataclasses.replace(plan.stage("s"), params=type(plan.stage("s").params).build({"pack": True}),
                                     layout=layout, execution=make_execution(spec, layout, kind=kind, attention="flash"))
        out = tmp_path / "packed"
        out.mkdir()
        task = write_task(out, dataclasses.replace(plan, stages=(plan.stage("base"), packed)), "s", datasets=data,
                          tokenizer=str(root / "tokenizer.json"), vocab_size=tok.vocab_size,
                          parents={"base": str(root / "base")}, out=out / "task")
        proc = _run(task, 2)  # each rank exits 2 with the one-line message (torchrun then reports the failure)
        assert proc.returncode != 0, proc.stderr[-3000:]
        assert "error: stage s: context parallelism (cp=2) with packed rows (pack = true)" in proc.stderr
        assert "set pack = false for this stage, or context = 1" in proc.stderr
    else:
        for key in ("val_before", "val"):
            assert two[key].keys() == one[key].keys() and one[key]
            for name, value in one[key].items():
                assert two[key][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, name)
