"""Bad task files stop with one clear message and exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_task_file(path, kit):
    return subprocess.run([sys.executable, "-m", "nemoc.runtime.train", str(path)], capture_output=True, text=True,
                          timeout=300, env=kit.torchrun_env(), cwd=str(kit.REPO))


def test_task_errors_are_one_line_messages(tmp_path, kit, train_data):
    from nemoc.runtime.train import TaskError, load_task

    good = kit.write_task(tmp_path / "ok", kit.make_plan(kit.stage_plan(lay=kit.layout())), data_prefix=train_data)
    assert load_task(str(good)).steps == 6
    raw = json.loads(good.read_text())
    (tmp_path / "v1.json").write_text(json.dumps(dict(raw, version=1)))  # queued before task.json version 2
    assert load_task(str(tmp_path / "v1.json")).steps == 6
    cases = {
        "missing": (None, "task file not found"),
        "version": (dict(raw, version=7), "task version 7 is not supported"),
        "stage": (dict(raw, stage="sft"), "stage 'sft' is not in the plan"),
        "field": ({k: v for k, v in raw.items() if k != "output_dir"}, "field `output_dir` is missing"),
        "plan": (dict(raw, plan=str(tmp_path / "nope.json")), "is unreadable"),
        "datasets": (dict(raw, datasets=[]), "`datasets` is empty"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.json"
        if content is not None:
            path.write_text(json.dumps(content))
        with pytest.raises(TaskError, match=message):
            load_task(str(path))
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(TaskError, match="not a readable JSON task"):
        load_task(str(tmp_path / "garbage.json"))


def test_world_size_mismatch_and_missing_data_exit_2(tmp_path, kit, train_data):
    tp2 = kit.write_task(tmp_path / "tp2", kit.make_plan(kit.stage_plan(lay=kit.layout(tp=2))), data_prefix=train_data)
    proc = run_task_file(tp2, kit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tp(2) * pp(1) * cp(1) * dp(1) = 2 != world size 1" in proc.stderr and "Traceback" not in proc.stderr
    nodata = kit.write_task(tmp_path / "nodata", kit.make_plan(kit.stage_plan(lay=kit.layout())),
                            data_prefix=tmp_path / "missing_text_document")
    proc = run_task_file(nodata, kit)
    assert proc.returncode == 2 and "missing_text_document.bin does not exist" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # next to task.json: "cannot succeed as configured", so Slurm's failure policy does not requeue it
    fatal = json.loads((nodata.parent / "FATAL.json").read_text())
    assert "missing_text_document.bin does not exist" in fatal["error"]


def test_a_parent_that_has_not_finished_is_named_when_the_task_starts(tmp_path, kit, train_data):
    task = kit.write_task(tmp_path / "child", kit.make_plan(kit.stage_plan(lay=kit.layout())), data_prefix=train_data)
    raw = json.loads(task.read_text())
    done = tmp_path / "parent" / "DONE.json"
    raw["upstream"] = {"pretrain": {"task": "train:pretrain", "hash": "abc123", "init": True, "done": str(done)}}
    task.write_text(json.dumps(raw))
    proc = run_task_file(task, kit)
    assert proc.returncode == 2 and "its parent train:pretrain has not finished" in proc.stderr, proc.stderr[-2000:]
    done.parent.mkdir()
    done.write_text(json.dumps({"hash": "other", "checkpoint": "/x"}))
    proc = run_task_file(task, kit)
    assert proc.returncode == 2 and "finished with other settings (hash other" in proc.stderr, proc.stderr[-2000:]


def test_a_corpus_too_small_for_its_validation_split_exits_2_instead_of_hanging(tmp_path, kit):
    """One document, split 0.9/0.1: the validation part gets no token, on which Megatron's epoch count
    loops forever; the task names the dataset and the split instead."""
    prefix = kit.write_indexed_dataset(tmp_path / "one_doc_text_document", docs=1)
    task = kit.write_task(tmp_path / "tiny", kit.make_plan(kit.stage_plan(lay=kit.layout(), eval_every=3)),
                          data_prefix=prefix)
    proc = subprocess.run([sys.executable, "-m", "nemoc.runtime.train", str(task)], capture_output=True, text=True,
                          timeout=120, env=kit.torchrun_env(), cwd=str(kit.REPO))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dataset 'web'" in proc.stderr and "validation part of the split 0.9,0.1,0" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
