"""SlurmLauncher's chain functions against a scriptable stand-in Slurm (no daemons): one squeue per
poll for the whole chain, PREEMPTED and an unanswered squeue never taken for "ended", cancelling on
Ctrl-C only the jobs this invocation submitted (none on a hangup), a scheduler hiccup that cancels
nothing, all-or-nothing submission, the DependencyNeverSatisfied mapping, and the dry-run scripts of
one-process tasks. The real-Slurm end-to-end runs are in test_slurm_cluster.py.

The stand-ins read `$FAKE/jobs.json` ({job id: [state, state, ...]}): each squeue call answers every
asked job's next state (the last one sticks); `FAKE_SQUEUE_FAIL=N` makes the first N calls fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import nemoc.runtime.orchestrate.launch_slurm as ls
from nemoc.compiler.spec import ClusterSpec
from nemoc.runtime.orchestrate.launchers import Hangup, LaunchSpec

SQUEUE = r"""#!/usr/bin/env python3
import json, os, sys
fake = os.environ["FAKE"]
with open(os.path.join(fake, "squeue.calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
calls = sum(1 for _ in open(os.path.join(fake, "squeue.calls")))
if calls <= int(os.environ.get("FAKE_SQUEUE_FAIL", "0")):
    print("squeue: error: Socket timed out on send/recv operation", file=sys.stderr); sys.exit(1)
jobs = json.load(open(os.path.join(fake, "jobs.json")))
asked = sys.argv[sys.argv.index("-j") + 1].split(",")
known = [j for j in asked if j in jobs]
if not known and len(asked) == 1:
    print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr); sys.exit(1)
pos = json.load(open(os.path.join(fake, "pos.json"))) if os.path.exists(os.path.join(fake, "pos.json")) else {}
for j in known:
    states = jobs[j]
    i = min(pos.get(j, 0), len(states) - 1)
    state, _, reason = states[i].partition("/")
    print(f"{j}|{state}|{reason or 'None'}")
    pos[j] = i + 1
json.dump(pos, open(os.path.join(fake, "pos.json"), "w"))
"""
SBATCH = r"""#!/usr/bin/env python3
import os, sys
fake = os.environ["FAKE"]
with open(os.path.join(fake, "sbatch.calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
n = sum(1 for _ in open(os.path.join(fake, "sbatch.calls")))
if str(n) == os.environ.get("FAKE_SBATCH_FAIL_AT"):
    print("sbatch: error: invalid partition specified: gpu", file=sys.stderr); sys.exit(1)
print(100 + n)
"""
SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE/scontrol.calls"
echo "JobId=$3 JobName=x JobState=X Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=${FAKE_EXIT:-0:0} StartTime=now"
"""
SCANCEL = r"""#!/bin/bash
echo "$*" >> "$FAKE/scancel.calls"
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "bin", tmp_path / "fake"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("squeue", SQUEUE), ("sbatch", SBATCH), ("scontrol", SCONTROL), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(state))
    return state


def jobs(fake: Path, table: dict[str, list[str]]) -> None:
    (fake / "jobs.json").write_text(json.dumps(table))


def calls(fake: Path, tool: str) -> list[str]:
    path = fake / f"{tool}.calls"
    return path.read_text().splitlines() if path.exists() else []


def spec(root: Path, task_id: str, nproc: int = 2) -> LaunchSpec:
    out = root / "run" / "tasks" / task_id.replace(":", "_")
    out.mkdir(parents=True, exist_ok=True)
    return LaunchSpec(task_id=task_id, module="nemoc.runtime.train", args=(str(out / "task.json"),), nproc=nproc,
                      out_dir=out, log_path=out / "log.txt", nodes=2, gpus_per_node=1, task_hash=f"h-{task_id}")


def launcher(lines=None) -> ls.SlurmLauncher:
    return ls.SlurmLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1),
                            echo=(lines.append if lines is not None else (lambda _: None)), poll_s=0.01)


def test_one_squeue_call_per_poll_follows_a_whole_chain(fake, tmp_path):
    a, b = spec(tmp_path, "train:a"), spec(tmp_path, "train:b")
    (a.out_dir / "DONE.json").write_text("{}")
    (b.out_dir / "DONE.json").write_text("{}")
    jobs(fake, {"101": ["PENDING", "RUNNING", "COMPLETED"], "102": ["PENDING/Dependency", "PENDING/Dependency",
                                                                     "RUNNING", "COMPLETED"]})
    ended, started = {}, []
    launcher().follow_chain([a, b], {"train:a": "101", "train:b": "102"}, ended.__setitem__, on_start=started.append)
    assert {t: r.ok for t, r in ended.items()} == {"train:a": True, "train:b": True}
    assert started == ["train:a", "train:b"]
    queries = calls(fake, "squeue")
    assert all("-j 101,102" in q or "-j 102" in q for q in queries) and len(queries) == 4


def test_a_cancelled_dependant_is_reported_as_such(fake, tmp_path):
    b = spec(tmp_path, "train:b")
    jobs(fake, {"102": ["PENDING/Dependency", "CANCELLED/DependencyNeverSatisfied"]})
    ended = {}
    launcher().follow_chain([b], {"train:b": "102"}, ended.__setitem__)
    assert not ended["train:b"].ok and "an upstream job did not succeed" in ended["train:b"].error_tail


def test_preempted_and_queued_jobs_are_alive_ended_and_forgotten_ones_are_not(fake, tmp_path):
    jobs(fake, {"101": ["PREEMPTED"], "102": ["PENDING/Dependency"], "103": ["COMPLETED"]})
    record = {"launcher": "slurm", "jobs": {t: {"job_id": j, "hash": f"h{j}", "after": []} for t, j in
                                            (("a", "101"), ("b", "102"), ("c", "103"), ("d", "999"))}}
    ls.write_record(tmp_path, record)
    active = launcher().active_jobs(tmp_path)
    assert sorted(active) == ["a", "b"] and active["b"]["reason"] == "Dependency" and active["a"]["hash"] == "h101"


def test_an_unanswered_squeue_is_an_error_not_an_ended_job(fake, tmp_path, monkeypatch):
    jobs(fake, {"101": ["RUNNING"]})
    ls.write_record(tmp_path, {"launcher": "slurm", "jobs": {"a": {"job_id": "101"}}})
    monkeypatch.setenv("FAKE_SQUEUE_FAIL", "1")
    with pytest.raises(ls.SlurmError, match="squeue failed: squeue: error: Socket timed out"):
        launcher().active_jobs(tmp_path)
    assert ls.job_states(["999"]) == {}  # "Invalid job id": forgotten, i.e. ended


def test_a_scheduler_hiccup_while_following_cancels_nothing(fake, tmp_path, monkeypatch):
    a = spec(tmp_path, "train:a")
    (a.out_dir / "DONE.json").write_text("{}")
    jobs(fake, {"101": ["RUNNING", "COMPLETED"]})
    monkeypatch.setenv("FAKE_SQUEUE_FAIL", "3")
    lines, ended = [], {}
    launcher(lines).follow_chain([a], {"train:a": "101"}, ended.__setitem__, owned={"101"})
    assert ended["train:a"].ok and calls(fake, "scancel") == []
    assert sum("Slurm did not answer" in line for line in lines) == 3


@pytest.mark.parametrize("interrupt, cancelled", [(KeyboardInterrupt, ["102"]), (Hangup, [])])
def test_ctrl_c_cancels_only_the_jobs_this_command_submitted_and_a_hangup_none(fake, tmp_path, interrupt, cancelled):
    a, b = spec(tmp_path, "train:a"), spec(tmp_path, "train:b")
    jobs(fake, {"101": ["RUNNING"], "102": ["PENDING/Dependency"]})

    def on_start(task_id):
        raise interrupt

    with pytest.raises(interrupt):
        launcher().follow_chain([a, b], {"train:a": "101", "train:b": "102"}, lambda *_: None, on_start=on_start,
                                owned={"102"})  # 101 was attached to, not submitted, by this command
    assert calls(fake, "scancel") == ([" ".join(cancelled)] if cancelled else [])


def test_a_chain_is_submitted_whole_or_not_at_all(fake, tmp_path, monkeypatch):
    specs = [spec(tmp_path, "train:a"), spec(tmp_path, "train:b"), spec(tmp_path, "eval:c", nproc=1)]
    monkeypatch.setenv("FAKE_SBATCH_FAIL_AT", "3")
    with pytest.raises(ls.SlurmError, match="invalid partition") as raised:
        launcher().submit_chain(specs, {"train:b": ["train:a"], "eval:c": ["train:b"]}, {}, tmp_path / "run")
    assert raised.value.task_id == "eval:c"
    assert calls(fake, "scancel") == ["101 102"]
    submitted = calls(fake, "sbatch")
    assert submitted[1].startswith("--parsable --hold --dependency=afterok:101 ")
    assert not [c for c in calls(fake, "scontrol") if c.startswith("release")]  # held jobs never ran


def test_the_chain_is_submitted_held_and_released_whole(fake, tmp_path):
    specs = [spec(tmp_path, "train:a"), spec(tmp_path, "train:b")]
    ids = launcher().submit_chain(specs, {"train:b": ["train:a"]}, {}, tmp_path / "run")
    assert ids == {"train:a": "101", "train:b": "102"}
    assert all(c.startswith("--parsable --hold ") for c in calls(fake, "sbatch"))
    assert [c for c in calls(fake, "scontrol") if c.startswith("release")] == ["release 101,102"]


def test_a_one_process_task_asks_for_one_node_and_its_dependency_on_an_attached_job(fake, tmp_path):
    ids = launcher().submit_chain([spec(tmp_path, "eval:c", nproc=1)], {"eval:c": ["train:b"]}, {"train:b": "77"},
                                  tmp_path / "run")
    assert ids == {"eval:c": "101"} and calls(fake, "sbatch")[0].startswith("--parsable --hold --dependency=afterok:77 ")
    script = (tmp_path / "run" / "tasks" / "eval_c" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=1" in script
    record = json.loads((tmp_path / "run" / "slurm.json").read_text())["jobs"]["eval:c"]
    assert record["hash"] == "h-eval:c" and record["after"] == ["77"]


def test_dry_run_scripts_start_eval_as_the_executor_does(tmp_path):
    from dataclasses import replace

    from plan_factory import make_plan, make_stage

    from nemoc.compiler.graph import build_graph
    from nemoc.runtime.orchestrate.rundir import RunDir

    (tmp_path / "corpus.jsonl").write_text('{"text": "hello world"}\n' * 20)
    plan = make_plan(tmp_path, stages=(make_stage("pretrain"), make_stage("eval", "eval", after=("pretrain",)),
                                       make_stage("export", "export", after=("pretrain",))))
    plan = replace(plan, cluster=ClusterSpec(gpu="H100", nodes=2, gpus_per_node=1, scheduler="slurm"))
    plan = replace(plan, stages=tuple(replace(s, layout=replace(s.layout, dp=2)) for s in plan.stages))
    paths = ls.write_scripts(plan, build_graph(plan), RunDir(tmp_path / "run"))
    by_task = {p.parent.name: p.read_text() for p in paths}
    # eval runs at its stage's layout (here dp=2 over two one-GPU nodes), like training
    assert "#SBATCH --nodes=2" in by_task["train_pretrain"] and "#SBATCH --nodes=2" in by_task["eval_eval"]
    assert "#SBATCH --gpus-per-node=1" in by_task["train_pretrain"] and "#SBATCH --gpus-per-node=1" in by_task["eval_eval"]
    # export holds the whole model in fp32: on the host, no GPU asked for, CUDA hidden
    export = by_task["export_export"]
    assert "#SBATCH --nodes=1" in export and "--gpus-per-node" not in export
    assert "export CUDA_VISIBLE_DEVICES=''" in export


def test_a_dependency_on_a_task_that_is_not_submitted_is_dropped_not_a_crash(fake, tmp_path):
    """A parent that finished while data was prepared is in `after` but neither submitted nor attached."""
    ids = launcher().submit_chain([spec(tmp_path, "train:b")], {"train:b": ["train:a"]}, {}, tmp_path / "run")
    assert ids == {"train:b": "101"} and calls(fake, "sbatch")[0].startswith("--parsable ")
    assert "--dependency" not in calls(fake, "sbatch")[0] and calls(fake, "scancel") == []


def test_following_gives_up_after_a_time_without_answers_not_a_count_and_cancels_nothing(fake, tmp_path, monkeypatch):
    import threading
    import time

    a = spec(tmp_path, "train:a")
    jobs(fake, {"101": ["RUNNING"]})
    monkeypatch.setenv("FAKE_SQUEUE_FAIL", "100000")
    monkeypatch.setattr(ls.SlurmLauncher, "GIVE_UP_S", 1.5)
    stop = threading.Event()

    def training_logs():  # new log lines all the time must not keep squeue at full rate
        with open(a.log_path, "a") as f:
            while not stop.is_set():
                f.write("0: step\n")
                f.flush()
                time.sleep(0.01)

    writer = threading.Thread(target=training_logs)
    writer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ls.SlurmError, match="no answer from Slurm for 2 s"):
            launcher().follow_chain([a], {"train:a": "101"}, lambda *_: None, owned={"101"})
    finally:
        stop.set()
        writer.join()
    assert time.monotonic() - started >= 1.5
    assert len(calls(fake, "squeue")) < 30 and calls(fake, "scancel") == []  # backed off (poll 0.01 s)
