"""runtime/orchestrate/executor.py with a chain launcher (the Slurm launcher's contract, without Slurm): every
distributed task is submitted at once with its dependencies; task.json of a task whose parent has not
run names the parent under `upstream`; `detach` returns with the jobs queued; a job still queued with
the same hash is attached to, never submitted twice; one with other settings stops the run.

`ChainDouble` plays Slurm: `follow_chain` runs the submitted tasks in order with the real local launcher
(torchrun, gloo) and cancels the dependants of a failed one, as `--kill-on-invalid-dep=yes` does.
"""

from __future__ import annotations

import pytest
from plan_factory import make_layout, make_plan, make_stage

from nemoc.compiler.graph import build_graph
from nemoc.runtime.orchestrate.executor import Executor
from nemoc.runtime.orchestrate.launch_local import LocalLauncher
from nemoc.runtime.orchestrate.launchers import LaunchResult
from nemoc.runtime.orchestrate.rundir import RunDir, read_json
from nemoc.compiler.plan import to_json
from nemoc.runtime.taskfile import plan_digest
from nemoc.runtime.orchestrate.tasks import TaskError, TaskKind, register

register(TaskKind(name="faketrain", module="fake_train"), replace=True)  # tests/runtime/fake_train.py


class ChainDouble:
    name = "slurm"

    def __init__(self, active=None, ended=(), meanwhile=None, refuse=False):
        self.submitted: list[tuple[list[str], dict, dict]] = []
        self.active = {t: {"plan": "", "after": [], "state": "PENDING", "reason": "", **job}
                       for t, job in (active or {}).items()}
        self.ended_by_submission = set(ended)  # tasks whose active job ends before submission (2nd look)
        self.meanwhile = meanwhile  # what happens between the first and the second look
        self.refuse = refuse  # sbatch refuses the submission
        self.looks = 0
        self.cancelled: list[str] = []
        self.local = LocalLauncher(echo=lambda _: None)
        self.next_id = 100

    def launch(self, spec):  # pragma: no cover - the executor must not use it for a chain launcher
        raise AssertionError("a chain launcher's tasks are submitted with submit_chain")

    def active_jobs(self, run_dir):
        self.looks += 1
        if self.looks == 2 and self.meanwhile is not None:
            self.meanwhile()
        if self.looks > 1:
            return {t: job for t, job in self.active.items() if t not in self.ended_by_submission}
        return dict(self.active)

    def cancel(self, job_ids):
        self.cancelled += list(job_ids)
        return list(job_ids)

    def submit_chain(self, specs, after, existing, run_dir):
        self.submitted.append(([s.task_id for s in specs], {k: list(v) for k, v in after.items()}, dict(existing)))
        if self.refuse:
            raise RuntimeError("sbatch: error: Socket timed out on send/recv operation")
        ids = {}
        for spec in specs:
            self.next_id += 1
            ids[spec.task_id] = str(self.next_id)
        return ids

    def follow_chain(self, specs, job_ids, on_end, *, on_start=None, owned=()):
        failed = set()
        after = self.submitted[-1][1] if self.submitted else {}
        for spec in specs:
            if failed & set(after.get(spec.task_id, ())):
                result = LaunchResult(1, None, "cancelled: an upstream job did not succeed")
            else:
                if on_start is not None:
                    on_start(spec.task_id)
                result = self.local.launch(spec)
            if not result.ok:
                failed.add(spec.task_id)
            on_end(spec.task_id, result)


def chain_plan(root, sft_steps=4):
    layout = make_layout(dp=1, micro_batch=1, global_batch=2)
    return make_plan(root, stages=(make_stage("pretrain", "faketrain", steps=6, layout=layout),
                                   make_stage("sft", "faketrain", after=("pretrain",), steps=sft_steps, layout=layout)))


def execute(plan, run_root, launcher, **options):
    lines: list[str] = []
    executor = Executor(plan, build_graph(plan), RunDir(run_root), launcher=launcher, echo=lines.append,
                        options={"workers": 1, **options})
    return executor.run(), lines


def test_the_whole_chain_is_submitted_at_once_and_parents_resolve_when_a_task_starts(workspace):
    plan, run_root = chain_plan(workspace), workspace / "run"
    launcher = ChainDouble()
    outcome, lines = execute(plan, run_root, launcher)
    assert outcome.ok, lines
    assert launcher.submitted == [(["train:pretrain", "train:sft"], {"train:pretrain": [], "train:sft": ["train:pretrain"]}, {})]
    rd = RunDir(run_root)
    task = read_json(rd.task_dir("train:sft") / "task.json")
    assert task["version"] == 2 and task["plan"].startswith(str(run_root / "plans" / "plan-"))
    assert task["init_checkpoint"] is None and task["parents"] == {"pretrain": None}  # not known at submission
    assert task["upstream"]["pretrain"] == {"task": "train:pretrain", "hash": outcome.tasks[2].hash, "init": True,
                                            "done": str(rd.task_dir("train:pretrain") / "DONE.json")}
    assert task["tokenizer"].endswith("tokenizer.json") and task["vocab_size"] <= 512  # known: data ran first
    pretrain = rd.done_record("train:pretrain")
    assert rd.done_record("train:sft")["init_checkpoint"] == pretrain["checkpoint"]  # resolved at start
    status = read_json(rd.status_path)["tasks"]
    assert status["train:sft"]["state"] == "done" and status["train:sft"]["job_id"] == "102"


def test_detach_leaves_the_jobs_queued_and_a_later_run_finds_them_done(workspace):
    plan, run_root = chain_plan(workspace), workspace / "run"
    launcher = ChainDouble()
    outcome, _ = execute(plan, run_root, launcher, detach=True)
    assert outcome.ok and outcome.states() == {"tokenizer:local": "done", "prepare:web": "done",
                                               "train:pretrain": "queued", "train:sft": "queued"}
    rd = RunDir(run_root)
    assert read_json(rd.status_path)["tasks"]["train:sft"]["state"] == "queued"
    assert rd.done_record("train:pretrain") is None
    # "Slurm" runs the jobs with no nemoc process watching; each task stamps its own DONE.json
    specs = [Executor(plan, build_graph(plan), rd)._spec(*_kind_ctx(plan, rd, t)) for t in ("train:pretrain", "train:sft")]
    for spec in specs:
        assert LocalLauncher(echo=lambda _: None).launch(spec).ok
    assert rd.done_record("train:sft")["hash"] == outcome.tasks[3].hash
    outcome, lines = execute(plan, run_root, ChainDouble())
    assert set(outcome.states().values()) == {"cached"}, lines


def _kind_ctx(plan, rd, task_id):
    from nemoc.runtime.orchestrate.tasks import get_kind

    executor = Executor(plan, build_graph(plan), rd)
    task = executor.graph.task(task_id)
    return get_kind(task.kind), executor._context(task, rd.task_dir(task_id))


def test_a_job_still_queued_with_the_same_hash_is_attached_to_not_submitted_again(workspace):
    plan, run_root = chain_plan(workspace), workspace / "run"
    outcome, _ = execute(plan, run_root, ChainDouble(), detach=True)
    hashes = {t.task_id: t.hash for t in outcome.tasks}
    launcher = ChainDouble(active={"train:pretrain": {"job_id": "101", "hash": hashes["train:pretrain"]}})
    outcome, lines = execute(plan, run_root, launcher)
    assert outcome.ok, lines
    assert launcher.submitted == [(["train:sft"], {"train:sft": ["train:pretrain"]}, {"train:pretrain": "101"})]
    assert any("already submitted as slurm job 101" in line for line in lines)


def test_a_job_still_queued_with_other_settings_stops_the_run_before_anything_changes(workspace):
    plan, run_root = chain_plan(workspace), workspace / "run"
    outcome, _ = execute(plan, run_root, ChainDouble(), detach=True)
    rd = RunDir(run_root)
    before = {p: p.read_bytes() for p in (rd.plan_path, rd.status_path, rd.task_dir("train:sft") / "task.json")}
    launcher = ChainDouble(active={"train:pretrain": {"job_id": "101", "hash": outcome.tasks[2].hash},
                                   "train:sft": {"job_id": "102", "hash": outcome.tasks[3].hash}})
    with pytest.raises(TaskError, match=r"settings or layout of train:sft changed while slurm still holds their "
                                        r"jobs: train:sft \(job 102, pending\).*`scancel 102`.*nothing was started"):
        execute(chain_plan(workspace, sft_steps=9), run_root, launcher)  # pretrain's job is left alone
    assert launcher.submitted == [] and launcher.cancelled == []
    assert {p: p.read_bytes() for p in before} == before  # the queued job still reads what it was submitted with


def test_a_queued_job_whose_plan_changed_is_refused_even_with_the_same_hash(workspace):
    from dataclasses import replace

    plan, run_root = chain_plan(workspace), workspace / "run"
    execute(plan, run_root, ChainDouble(), detach=True)
    slurm_jobs = {}
    for task in build_graph(plan).tasks():
        if task.kind == "faketrain":  # what the launcher recorded: the digest of what the task reads
            slurm_jobs[task.id] = {"job_id": str(len(slurm_jobs) + 101), "hash": task.hash,
                                   "after": [job["job_id"] for job in slurm_jobs.values()],
                                   "plan": plan_digest(to_json(plan), task.stage)}
    wider = replace(plan, stages=tuple(replace(s, layout=replace(s.layout, micro_batch=2, num_microbatches=1))
                                       for s in plan.stages))  # a layout change keeps the task hash
    assert [t.hash for t in build_graph(wider).tasks()] == [t.hash for t in build_graph(plan).tasks()]
    with pytest.raises(TaskError, match="layout of train:pretrain, train:sft changed"):
        execute(wider, run_root, ChainDouble(active=slurm_jobs))
    outcome, lines = execute(plan, run_root, ChainDouble(active=slurm_jobs))  # the same plan attaches
    assert outcome.ok and sum("already submitted" in line for line in lines) == 2, lines


def test_a_queued_child_of_a_resubmitted_parent_is_cancelled_and_submitted_again(workspace):
    plan, run_root = chain_plan(workspace), workspace / "run"
    outcome, _ = execute(plan, run_root, ChainDouble(), detach=True)
    sft = outcome.tasks[3]
    # pretrain's job 101 failed; sft's job 102 still waits for it (Slurm has not cancelled it yet)
    launcher = ChainDouble(active={"train:sft": {"job_id": "102", "hash": sft.hash, "after": ["101"],
                                                 "reason": "DependencyNeverSatisfied"}})
    outcome, lines = execute(plan, run_root, launcher)
    assert outcome.ok, lines
    assert launcher.cancelled == ["102"]
    assert launcher.submitted[0][0] == ["train:pretrain", "train:sft"]


def test_an_attached_job_that_finished_during_data_preparation_is_done_not_a_dependency(workspace):
    plan, run_root = chain_plan(workspace), workspace / "run"
    outcome, _ = execute(plan, run_root, ChainDouble(), detach=True)
    pretrain = outcome.tasks[2]
    rd = RunDir(run_root)
    spec = Executor(plan, build_graph(plan), rd)._spec(*_kind_ctx(plan, rd, "train:pretrain"))

    def job_finishes():
        assert LocalLauncher(echo=lambda _: None).launch(spec).ok

    launcher = ChainDouble(active={"train:pretrain": {"job_id": "101", "hash": pretrain.hash}},
                           ended={"train:pretrain"}, meanwhile=job_finishes)  # Slurm no longer lists it
    outcome, lines = execute(plan, run_root, launcher)
    assert outcome.ok, lines
    assert outcome.states()["train:pretrain"] == "done" and any("already submitted" in line for line in lines)
    assert launcher.submitted == [(["train:sft"], {"train:sft": []}, {})]  # no dependency on a finished job


def test_a_failed_parent_skips_its_children(workspace, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_RANK", "0")
    outcome, lines = execute(chain_plan(workspace), workspace / "run", ChainDouble())
    assert outcome.states()["train:pretrain"] == "failed" and outcome.states()["train:sft"] == "skipped"
    assert "fake failure on rank 0" in outcome.tasks[2].error and "train:pretrain" in outcome.tasks[3].error


def test_a_failed_submission_leaves_an_attached_job_queued_not_skipped(workspace):
    plan, run_root = chain_plan(workspace, sft_steps=4), workspace / "run"
    outcome, _ = execute(plan, run_root, ChainDouble(), detach=True)
    launcher = ChainDouble(active={"train:pretrain": {"job_id": "101", "hash": outcome.tasks[2].hash}}, refuse=True)
    outcome, lines = execute(chain_plan(workspace, sft_steps=9), run_root, launcher)  # sft edited, pretrain running
    errors = {t.task_id: t.error for t in outcome.tasks}
    assert outcome.states()["train:sft"] == "failed" and "Socket timed out" in errors["train:sft"]
    assert outcome.states()["train:pretrain"] == "queued"  # its job runs on: `nemoc status` follows it
    status = read_json(RunDir(run_root).status_path)["tasks"]["train:pretrain"]
    assert status["state"] == "queued" and status["job_id"] == "101"


def test_a_job_left_held_by_an_interrupted_submission_is_cancelled_and_submitted_again(workspace):
    plan, run_root = chain_plan(workspace), workspace / "run"
    outcome, _ = execute(plan, run_root, ChainDouble(), detach=True)
    launcher = ChainDouble(active={"train:pretrain": {"job_id": "101", "hash": outcome.tasks[2].hash,
                                                      "reason": "JobHeldUser"}})
    outcome, lines = execute(plan, run_root, launcher)
    assert outcome.ok and launcher.cancelled == ["101"], lines
    assert any("left held by an interrupted submission" in line for line in lines)
    assert launcher.submitted[0][0] == ["train:pretrain", "train:sft"]
