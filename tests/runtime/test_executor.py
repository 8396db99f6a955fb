"""runtime/orchestrate/executor.py with the local launcher: order, caching by hash, partial re-runs, failure, preemption.

Distributed tasks run `tests/runtime/fake_train.py` under real torchrun (2 gloo processes), registered
as the test-only task kind `faketrain`; data tasks are the real tokenizer training and data preparation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plan_factory import make_layout, make_plan, make_stage, with_stage

from nemoc.compiler.graph import build_graph
from nemoc.runtime.orchestrate.executor import Executor
from nemoc.runtime.orchestrate.launch_local import LocalLauncher
from nemoc.runtime.orchestrate.rundir import RunDir, read_json
from nemoc.runtime.orchestrate.tasks import TaskKind, register

HERE = Path(__file__).resolve().parent
register(TaskKind(name="faketrain", module="fake_train"), replace=True)


def two_stage_plan(root, sft_steps=4, dp=1):
    layout = make_layout(dp=dp, micro_batch=1, global_batch=2)
    return make_plan(root, stages=(make_stage("pretrain", "faketrain", steps=6, layout=layout),
                                   make_stage("sft", "faketrain", after=("pretrain",), steps=sft_steps, layout=layout)))


def execute(plan, run_root, lines=None):
    lines = lines if lines is not None else []
    executor = Executor(plan, build_graph(plan), RunDir(run_root), launcher=LocalLauncher(echo=lambda _: None),
                        echo=lines.append, options={"workers": 1})
    return executor.run(), lines


def test_runs_in_order_then_everything_is_cached(workspace):
    run_root = workspace / "run"
    plan = make_plan(workspace, stages=(make_stage("pretrain", "faketrain", steps=6),))
    outcome, lines = execute(plan, run_root)
    assert outcome.ok, lines
    assert list(outcome.states()) == ["tokenizer:local", "prepare:web", "train:pretrain"]
    rd = RunDir(run_root)
    done = rd.done_record("train:pretrain")
    assert done["world_size"] == 1 and done["steps"] == 6 and done["hash"] == outcome.tasks[2].hash
    task = read_json(rd.task_dir("train:pretrain") / "task.json")
    assert task["datasets"][0]["prefix"].endswith("data/web/web_text_document") and task["split"] == "98,2,0"
    assert task["tokenizer"].endswith("tokenizers/local/tokenizer.json") and task["vocab_size"] <= 512
    assert task["eod_id"] == 0 and task["init_checkpoint"] is None and task["output_dir"].endswith("tasks/train_pretrain")
    assert read_json(rd.status_path)["tasks"]["train:pretrain"]["state"] == "done"
    assert "documents" in (rd.task_dir("prepare:web") / "log.txt").read_text()

    outcome, lines = execute(plan, run_root)
    assert set(outcome.states().values()) == {"cached"}
    assert sum("cached (hash" in line for line in lines) == 3


@pytest.mark.slow
def test_editing_a_later_stage_reruns_only_it(workspace):
    run_root = workspace / "run"
    outcome, lines = execute(two_stage_plan(workspace), run_root)
    assert outcome.ok, lines
    rd = RunDir(run_root)
    pre, sft = rd.done_record("train:pretrain"), rd.done_record("train:sft")
    assert sft["init_checkpoint"] == pre["checkpoint"]  # the parent's final checkpoint is handed on
    outcome, lines = execute(two_stage_plan(workspace, sft_steps=5), run_root)
    assert outcome.states() == {"tokenizer:local": "cached", "prepare:web": "cached", "train:pretrain": "cached",
                                "train:sft": "done"}
    assert any("previous output moved" in line for line in lines)
    first = rd.task_dir("train:sft").parent / f"train_sft.prev-{sft['hash']}"
    assert (first / "DONE.json").exists()
    second_hash = rd.done_record("train:sft")["hash"]
    outcome, lines = execute(two_stage_plan(workspace, sft_steps=6), run_root)  # a second change loses nothing
    assert outcome.states()["train:sft"] == "done"
    assert (first / "DONE.json").exists()
    assert (rd.task_dir("train:sft").parent / f"train_sft.prev-{second_hash}" / "DONE.json").exists()


def test_a_failing_rank_fails_the_task_with_its_error_and_skips_the_rest(workspace, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_RANK", "1")
    outcome, lines = execute(two_stage_plan(workspace, dp=2), workspace / "run")
    assert outcome.states()["train:pretrain"] == "failed" and outcome.states()["train:sft"] == "skipped"
    error = outcome.tasks[2].error
    assert "rank 1" in error and "fake failure on rank 1" in error
    status = read_json(workspace / "run" / "status.json")
    assert status["tasks"]["train:pretrain"]["state"] == "failed" and "fake failure" in status["tasks"]["train:pretrain"]["error"]
    assert not (RunDir(workspace / "run").task_dir("train:pretrain") / "DONE.json").exists()


def test_preempted_training_resumes_from_its_checkpoint(workspace, monkeypatch):
    plan = make_plan(workspace, stages=(make_stage("pretrain", "faketrain", steps=6,
                                                   layout=make_layout(dp=1, micro_batch=1, global_batch=2)),))
    monkeypatch.setenv("FAKE_PREEMPT_AT", "3")
    outcome, _ = execute(plan, workspace / "run")
    assert outcome.states()["train:pretrain"] == "preempted"
    outcome, lines = execute(plan, workspace / "run")
    assert outcome.ok and any("(resuming)" in line for line in lines)
    assert RunDir(workspace / "run").done_record("train:pretrain")["resumed_from"] == 3


def test_bad_data_stops_with_file_and_line(workspace):
    with open(workspace / "corpus.jsonl", "a") as f:
        f.write('{"text": "fine"}\n{"text": broken}\n')
    outcome, lines = execute(make_plan(workspace, stages=(make_stage("pretrain", "faketrain"),)), workspace / "run")
    assert outcome.states()["tokenizer:local"] == "failed"
    assert f"{workspace / 'corpus.jsonl'}:202: malformed JSON" in outcome.tasks[0].error
    assert outcome.states()["train:pretrain"] == "skipped"


def test_dry_run_starts_nothing(workspace):
    plan = make_plan(workspace, stages=(make_stage("pretrain", "faketrain"),))
    lines: list[str] = []
    executor = Executor(plan, build_graph(plan), RunDir(workspace / "run"), echo=lines.append)
    outcome = executor.dry_run()
    assert set(outcome.states().values()) == {"pending"} and not (workspace / "run" / "data").exists()
    assert all("would run" in line for line in lines)


def test_a_damaged_status_json_is_rewritten_not_a_traceback(workspace):
    from nemoc.runtime.orchestrate.executor import Status

    plan = make_plan(workspace, stages=(make_stage("pretrain", "faketrain"),))
    run_dir = RunDir(workspace / "run")
    run_dir.root.mkdir(parents=True)
    run_dir.status_path.write_text(json.dumps({"tasks": {"train:pretrain": 5, "tokenizer:local": None}}))
    status = Status(run_dir, plan, build_graph(plan))
    assert status.data["tasks"]["train:pretrain"]["state"] == "pending"
    assert read_json(run_dir.status_path)["tasks"]["tokenizer:local"]["state"] == "pending"


def test_vocab_larger_than_the_model_is_a_clear_error(workspace):
    plan = with_stage(make_plan(workspace, stages=(make_stage("pretrain", "faketrain"),)), "pretrain")
    from dataclasses import replace

    plan = replace(plan, model=replace(plan.model, vocab=260))
    outcome, _ = execute(plan, workspace / "run")
    assert outcome.states()["train:pretrain"] == "failed"
    assert "but the model's vocabulary is 260" in outcome.tasks[2].error


INTERRUPT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from plan_factory import make_layout, make_plan, make_stage
from nemoc.compiler.graph import build_graph
from nemoc.runtime.orchestrate.executor import Executor
from nemoc.runtime.orchestrate.launch_local import LocalLauncher
from nemoc.runtime.orchestrate.rundir import RunDir
from nemoc.runtime.orchestrate.tasks import TaskKind, register
register(TaskKind(name="faketrain", module="fake_train"))
plan = make_plan({root!r}, stages=(make_stage("pretrain", "faketrain", layout=make_layout(dp=2, global_batch=4)),))
try:
    Executor(plan, build_graph(plan), RunDir({run!r}), launcher=LocalLauncher(echo=lambda _: None),
             echo=print, options={{"workers": 1}}).run()
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_tears_down_every_rank(workspace, monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    monkeypatch.setenv("FAKE_HANG", "1")
    script = INTERRUPT_SCRIPT.format(tests=str(HERE.parent), root=str(workspace), run=str(workspace / "run"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    task_dir = RunDir(workspace / "run").task_dir("train:pretrain")
    deadline = time.time() + 120
    while len(list(task_dir.glob("pid.*"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    pids = [int(p.read_text()) for p in task_dir.glob("pid.*")]
    assert len(pids) == 2, proc.stdout.read().decode() if proc.poll() is not None else "ranks did not start"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    status = read_json(workspace / "run" / "status.json")
    assert status["tasks"]["train:pretrain"]["state"] == "interrupted"


def test_one_run_at_a_time_per_run_directory(workspace):
    run_dir = RunDir(workspace / "run")
    with run_dir.lock():
        import subprocess
        import sys

        code = ("import sys; from nemoc.runtime.orchestrate.rundir import RunDir\n"
                f"with RunDir({str(run_dir.root)!r}).lock(): pass")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and f"another `nemoc run` (pid {__import__('os').getpid()})" in other.stderr
    with run_dir.lock():  # released: it can be taken again
        pass


def test_a_launcher_that_raises_fails_the_task_without_a_traceback(workspace):
    class Broken:
        name = "broken"

        def launch(self, spec):
            raise RuntimeError("kubectl: connection refused")

    plan = make_plan(workspace, stages=(make_stage("pretrain", "faketrain"),))
    lines: list[str] = []
    outcome = Executor(plan, build_graph(plan), RunDir(workspace / "run"), launcher=Broken(), echo=lines.append,
                       options={"workers": 1}).run()
    assert outcome.states()["train:pretrain"] == "failed"
    assert outcome.tasks[2].error == "launcher 'broken' could not run the task: kubectl: connection refused"


def test_a_submission_failure_is_not_blamed_on_a_rank(workspace):
    from nemoc.runtime.orchestrate.launchers import LaunchResult

    class Unreachable:
        name = "slurm"

        def launch(self, spec):
            return LaunchResult(1, None, "could not submit train:pretrain to Slurm: sbatch: fatal: no config")

    plan = make_plan(workspace, stages=(make_stage("pretrain", "faketrain"),))
    outcome = Executor(plan, build_graph(plan), RunDir(workspace / "run"), launcher=Unreachable(),
                       echo=lambda _: None, options={"workers": 1}).run()
    error = outcome.tasks[2].error
    assert error.startswith("the task failed (exit 1)") and "sbatch: fatal: no config" in error and "rank" not in error


def test_eval_is_launched_at_its_layouts_world_size_and_export_in_one_host_process():
    """The eval stage runs at its layout (TP, PP, EP, DP: runtime/align/evaluate.py): the launcher starts the
    layout's world size on the cluster's GPUs; export streams the checkpoint in one process on the host."""
    from types import SimpleNamespace

    from nemoc.runtime.orchestrate.tasks import get_kind, launch_shape

    layout = SimpleNamespace(world_size=8)  # e.g. tp 2 x pp 2 x dp 2
    ctx = SimpleNamespace(stage=SimpleNamespace(layout=layout), plan=SimpleNamespace(cluster=SimpleNamespace(gpus_per_node=8)))
    assert launch_shape(get_kind("eval"), ctx) == (8, 8, {})
    assert launch_shape(get_kind("export"), ctx) == (1, 0, {"CUDA_VISIBLE_DEVICES": ""})
