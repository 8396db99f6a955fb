"""Against a real Slurm (bash .ci/slurm.sh install && bash .ci/slurm.sh up; export SLURM_CONF=/tmp/slurm/slurm.conf):
two slurmd "nodes" on this host. Skipped when no Slurm is reachable (tests/conftest.py).

* hostile names reach Slurm verbatim and execute nothing;
* jobs chain with afterok, and a failed upstream cancels its dependants;
* the time-limit warning (USR1 to the batch shell) makes the step stop and the job requeue itself;
* the quickstart trains through `nemoc run --launcher slurm` on 2 nodes x 1 process (gloo), is
  preempted by `scontrol requeue` in the middle, resumes from its checkpoint and finishes (slow);
* a rank killed with SIGKILL makes the job requeue itself and resume from the last checkpoint, and the
  final weights and optimizer state equal an uninterrupted run's bit for bit (slow);
* `nemoc run --detach` submits a pretrain -> anneal -> eval chain at once (afterok) and returns; the jobs
  run with no nemoc process alive, each stage starting from its parent's checkpoint; `nemoc status` reads
  their states from Slurm, and a second `nemoc run` finds everything cached (slow).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemoc.runtime.orchestrate import launch_slurm as ls
from nemoc.runtime.metrics import read_records

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
EVIL = "a b'c\"d $(touch pwned) `touch pwned` ; touch pwned && echo $HOME"

# A small program that behaves like a trainer towards the batch script: it counts steps in a state
# file, stops with 143 after SIGTERM (having "saved"), resumes from the state, writes DONE at the end.
STEPPER = r"""
import json, os, signal, sys, time
state_path, done_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
step = json.load(open(state_path))["step"] if os.path.exists(state_path) else 0
print(f"stepper start at {step} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
open(state_path + ".started", "w").write(str(step))
while step < steps:
    time.sleep(0.2)
    step += 1
    json.dump({"step": step}, open(state_path + ".tmp", "w")); os.replace(state_path + ".tmp", state_path)
    if stop:
        print(f"stepper stopped at {step}", flush=True); sys.exit(143)
json.dump({"steps": step}, open(done_path, "w"))
"""


def _wait(job_ids, timeout=180) -> dict[str, str]:
    states = ls.wait_jobs(job_ids, timeout_s=timeout, poll_s=0.5)
    assert all(s in ls.TERMINAL for s in states.values()), states
    return states


def _job(tmp_path: Path, task_id: str, program: tuple[str, ...], name: str | None = None) -> ls.SlurmJob:
    out = tmp_path / "tasks" / ls_safe(task_id)
    out.mkdir(parents=True, exist_ok=True)
    return ls.SlurmJob(task_id=task_id, name=name or f"nemoc-test-{task_id}", nodes=1, procs_per_node=1,
                       gpus_per_node=0, program=program, run_dir=str(tmp_path), log_path=str(out / "log.txt"),
                       done_path=str(out / "DONE.json"), distributed=False, workdir=str(out))


def ls_safe(task_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", task_id)


def test_hostile_names_reach_slurm_verbatim_and_run_nothing(tmp_path):
    job = _job(tmp_path, "evil", ("-c", "import sys; print('ARGV', sys.argv[1:])", EVIL), name=EVIL)
    opts = ls.SlurmOptions(extra=(f"--comment={EVIL}",), time=300)
    ids = ls.submit_jobs([job], {}, opts, tmp_path)
    shown = subprocess.run(["scontrol", "show", "job", ids["evil"]], capture_output=True, text=True).stdout
    assert shown.splitlines()[0].split("JobName=", 1)[1] == EVIL
    assert f"   Comment={EVIL}" in [line.rstrip() for line in shown.splitlines()]
    assert _wait(ids.values())[ids["evil"]] == "COMPLETED"
    assert f"ARGV [{EVIL!r}]" in Path(job.log_path).read_text()
    assert not list(tmp_path.rglob("pwned")) and not Path(job.workdir, "pwned").exists()
    record = json.loads((tmp_path / "slurm.json").read_text())
    assert record["jobs"]["evil"]["job_id"] == ids["evil"]


def test_jobs_chain_along_the_graph_with_afterok(tmp_path):
    stamp = "import sys, time; open(sys.argv[1], 'w').write(str(time.time())); time.sleep(float(sys.argv[2]))"
    first = _job(tmp_path, "prepare", ("-c", stamp, str(tmp_path / "a"), "3"))
    second = _job(tmp_path, "train", ("-c", stamp, str(tmp_path / "b"), "0"))
    failing = _job(tmp_path, "broken", ("-c", "raise SystemExit(3)"))
    orphan = _job(tmp_path, "after-broken", ("-c", stamp, str(tmp_path / "c"), "0"))
    opts = ls.SlurmOptions(max_failures=0)
    ids = ls.submit_jobs([first, second, failing, orphan],
                         {"train": ["prepare"], "after-broken": ["broken"]}, opts, tmp_path)
    shown = subprocess.run(["scontrol", "show", "job", "-o", ids["train"]], capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{ids['prepare']}" in shown
    states = _wait(ids.values())
    assert states[ids["prepare"]] == states[ids["train"]] == "COMPLETED"
    assert float((tmp_path / "b").read_text()) >= float((tmp_path / "a").read_text()) + 3
    assert states[ids["broken"]] == "FAILED"
    assert states[ids["after-broken"]] == "CANCELLED"  # --kill-on-invalid-dep=yes
    assert not (tmp_path / "c").exists()


def test_the_time_limit_warning_stops_the_step_and_requeues_the_job(tmp_path):
    state = tmp_path / "state.json"
    job = _job(tmp_path, "stepper", ("-c", STEPPER, str(state), str(tmp_path / "tasks" / "stepper" / "DONE.json"), "25"))
    ids = ls.submit_jobs([job], {}, ls.SlurmOptions(time=600, signal_lead=60), tmp_path)
    job_id = ids["stepper"]
    deadline = time.monotonic() + 60
    while not (state.exists() and json.loads(state.read_text())["step"] >= 5) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.exists(), Path(job.log_path).read_text() if Path(job.log_path).exists() else "no log"
    # what Slurm sends `signal_lead` before the limit (--signal=B:USR1@...): USR1 to the batch shell only
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    assert _wait([job_id], timeout=240)[job_id] == "COMPLETED"
    log = Path(job.log_path).read_text()
    assert "signal USR1" in log and "requeueing job" in log
    stopped = int(re.search(r"stepper stopped at (\d+)", log).group(1))
    assert f"stepper start at {stopped} restart 1" in log  # resumed where it stopped, in the requeued job
    assert json.loads(Path(job.done_path).read_text())["steps"] == 25
    assert ls.job_info(job_id)["Restarts"] == "1"


# ----------------------------------------------------------------------------------- the quickstart


def quickstart_on_slurm(tmp_path: Path, extra_stages: str = "") -> Path:
    text = (REPO / "examples" / "quickstart.nemo").read_text()
    data = REPO / "examples" / "data" / "quickstart"
    text = text.replace('"data/quickstart/', f'"{data}/')
    text = re.sub(r"nodes = 1\n", "nodes = 2\n", text, count=1)
    text = re.sub(r"gpus_per_node = 2\n",
                  'gpus_per_node = 1\n    scheduler = slurm(partition = "debug", time = 20min)\n', text, count=1)
    if extra_stages:
        text = text.rstrip().removesuffix("}") + extra_stages + "}\n"
    path = tmp_path / "quickstart_slurm.nemo"
    path.write_text(text)
    return path


def start_run(tmp_path: Path, steps: int) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    nemo = quickstart_on_slurm(tmp_path)
    cmd = [str(Path(sys.executable).parent / "nemoc"), "run", str(nemo), "--workdir", str(run_dir),
           "--set", f"stage.pretrain.steps={steps}", "--set", "stage.pretrain.checkpoint.every=10",
           "--set", "stage.pretrain.log_every=1", "--set", "stage.pretrain.eval_every=1000"]
    log = open(tmp_path / "nemoc-run.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    return proc, run_dir


def metrics(run_dir: Path) -> list[dict]:
    return read_records(run_dir / "tasks" / "train_pretrain" / "metrics.jsonl")


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"nemoc run ended early ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 420) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        raise AssertionError(f"nemoc run did not finish:\n{log.read_text()[-4000:]}")
    return log.read_text()


def _checkpointed(run_dir: Path, at_least: int):
    return any(r.get("event") == "checkpoint" and r["iteration"] >= at_least for r in metrics(run_dir))


def _job_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "slurm.json").read_text())["jobs"]["train:pretrain"]["job_id"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_quickstart_on_two_slurm_nodes_survives_a_requeue_and_finishes(tmp_path):
    steps = 50
    proc, run_dir = start_run(tmp_path, steps)
    log = tmp_path / "nemoc-run.log"
    try:
        wait_for(lambda: _checkpointed(run_dir, 20), proc, 360, "a checkpoint at step 20", log)
        job_id = _job_id(run_dir)
        subprocess.run(["scontrol", "requeue", job_id], check=True)  # preemption
        output = finish(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    records = metrics(run_dir)
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["iteration"] >= 20, records[-5:]
    assert max(r["step"] for r in records if "loss" in r) == steps
    done = json.loads((run_dir / "tasks" / "train_pretrain" / "DONE.json").read_text())
    assert done["steps"] == steps
    assert int(ls.job_info(job_id).get("Restarts", "0")) >= 1
    slurm_log = (run_dir / "tasks" / "train_pretrain" / "log.txt").read_text()
    assert "(attempt 2)" in slurm_log and "NodeAddr" not in slurm_log
    assert re.search(r"rendezvous 127\.0\.0\.1:\d+", slurm_log)
    # both nodes took part: srun --label prefixes every line with the node's task number
    assert re.search(r"^1: ", slurm_log, re.M) and re.search(r"^0: ", slurm_log, re.M)
    # the time from submission to the first training step, for docs/clusters.md
    submitted = json.loads((run_dir / "slurm.json").read_text())["jobs"]["train:pretrain"]["submitted_at"]
    first = min(r["time"] for r in records if r.get("step") == 1 and "loss" in r)
    print(f"\nsubmission -> first step: {first - submitted:.1f} s")


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_is_requeued_and_resumes_from_the_last_checkpoint(tmp_path):
    import psutil

    steps = 40
    proc, run_dir = start_run(tmp_path, steps)
    log = tmp_path / "nemoc-run.log"
    task_json = str(run_dir / "tasks" / "train_pretrain" / "task.json")
    try:
        wait_for(lambda: _checkpointed(run_dir, 10), proc, 360, "a checkpoint at step 10", log)
        ranks = [p for p in psutil.process_iter(["cmdline"])
                 if "nemoc.runtime.train" in (p.info["cmdline"] or []) and task_json in (p.info["cmdline"] or [])
                 and "torch.distributed.run" not in (p.info["cmdline"] or [])]
        assert ranks, "no training rank found"
        ranks[-1].send_signal(signal.SIGKILL)
        output = finish(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    slurm_log = (run_dir / "tasks" / "train_pretrain" / "log.txt").read_text()
    assert "failure 1 of 2 allowed" in slurm_log
    resumed = [r for r in metrics(run_dir) if r.get("event") == "resumed"]
    assert resumed and resumed[0]["iteration"] >= 10
    done = json.loads((run_dir / "tasks" / "train_pretrain" / "DONE.json").read_text())
    assert done["steps"] == steps
    # the same run uninterrupted, through the same Slurm: the final weights and optimizer state are equal bit
    # for bit (the requeued job resumed exactly; CPU, fp32, gloo)
    reference_root = tmp_path / "uninterrupted"
    reference_root.mkdir()
    proc, reference = start_run(reference_root, steps)
    try:
        output = finish(proc, reference_root / "nemoc-run.log")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    expected = json.loads((reference / "tasks" / "train_pretrain" / "DONE.json").read_text())["checkpoint"]
    from nemoc.runtime.faults import checkpoint_tensors, differing_tensors

    assert any("exp_avg" in k for k in checkpoint_tensors(expected))
    assert differing_tensors(done["checkpoint"], expected) == []


def test_nemoc_logs_and_cancel_work_on_a_slurm_run(tmp_path):
    from click.testing import CliRunner

    from nemoc.runtime.cli.cluster import cancel, logs

    state = tmp_path / "state.json"
    job = _job(tmp_path, "train:pretrain", ("-c", STEPPER, str(state), str(tmp_path / "never"), "1000"))
    (tmp_path / "status.json").write_text(json.dumps({"tasks": {"train:pretrain": {"state": "running"}}}))
    ids = ls.submit_jobs([job], {}, ls.SlurmOptions(max_failures=0), tmp_path)
    deadline = time.monotonic() + 60
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    result = CliRunner().invoke(logs, [str(tmp_path), "pretrain"])
    assert result.exit_code == 0 and "stepper start at 0" in result.output, result.output
    result = CliRunner().invoke(cancel, [str(tmp_path)])
    assert result.exit_code == 0 and f"Slurm job {ids['train:pretrain']}" in result.output, result.output
    assert _wait(ids.values(), timeout=60)[ids["train:pretrain"]] == "CANCELLED"
    result = CliRunner().invoke(cancel, [str(tmp_path)])
    assert "nothing to cancel" in result.output


CHAIN = """
  stage anneal after pretrain {
    kind = pretrain
    data = [corpus]
    steps = 4
    global_batch = 8
    optimizer = adam(lr = 1e-4)
    log_every = 1
  }

  stage eval after anneal {
    data = [corpus]
    prompts = ["Once upon a time"]
    max_new_tokens = 4
  }
"""


@pytest.mark.slow
def test_a_detached_chain_runs_on_slurm_without_nemoc_and_is_then_cached(tmp_path):
    nemo, run_dir = quickstart_on_slurm(tmp_path, CHAIN), tmp_path / "run"
    nemoc = str(Path(sys.executable).parent / "nemoc")
    args = [nemoc, "run", str(nemo), "--workdir", str(run_dir), "--set", "stage.pretrain.steps=6",
            "--set", "stage.pretrain.eval_every=1000"]
    started = time.monotonic()
    try:
        _detached_chain(args, nemoc, run_dir, tmp_path, started)
    finally:  # a failed assertion must not leave jobs holding the two nodes for the tests after it
        if (run_dir / "slurm.json").exists():
            ls.cancel(job["job_id"] for job in json.loads((run_dir / "slurm.json").read_text())["jobs"].values()
                      if ls.is_alive(ls.job_state(job["job_id"])))


def _detached_chain(args, nemoc, run_dir, tmp_path, started):
    submit = subprocess.run([*args, "--detach"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "2 done, 3 queued" in submit.stdout and "detached" in submit.stdout
    assert time.monotonic() - started < 60  # data preparation and sbatch only: nothing waits for training
    jobs = json.loads((run_dir / "slurm.json").read_text())["jobs"]
    ids = {task: jobs[task]["job_id"] for task in ("train:pretrain", "train:anneal", "eval:eval")}
    assert jobs["train:anneal"]["after"] == [ids["train:pretrain"]] and jobs["eval:eval"]["after"] == [ids["train:anneal"]]
    shown = subprocess.run(["scontrol", "show", "job", "-o", ids["eval:eval"]], capture_output=True, text=True).stdout
    # eval runs at its stage's layout (runtime/align/evaluate.py): the job spans that layout's nodes
    from nemoc.compiler.plan import from_json

    plan = from_json((run_dir / "plan.json").read_text())
    ev = plan.stage("eval").layout
    nodes = -(-(ev.tp * ev.pp * ev.cp * ev.dp) // plan.cluster.gpus_per_node)
    assert f"Dependency=afterok:{ids['train:anneal']}" in shown and re.search(rf" NumNodes={nodes}(-\d+)? ", shown), shown
    status = subprocess.run([nemoc, "status", str(run_dir), "--json"], capture_output=True, text=True)
    rows = {row["id"]: row for row in json.loads(status.stdout)["tasks"]}
    assert rows["eval:eval"]["state"] == "queued (Dependency)"  # Slurm's reason: read live, not recorded
    assert rows["eval:eval"]["job_id"] == ids["eval:eval"]
    # a second `nemoc run` while the chain is queued attaches to the three jobs and follows them
    follow = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=420)
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    assert follow.stdout.count("already submitted as slurm job") == 3 and "submitted Slurm job" not in follow.stdout
    assert "2 cached, 3 done" in follow.stdout
    assert _wait(ids.values(), timeout=60)[ids["eval:eval"]] == "COMPLETED"
    anneal = run_dir / "tasks" / "train_anneal"
    initialized = [json.loads(line) for line in (anneal / "metrics.jsonl").read_text().splitlines()
                   if '"initialized"' in line]
    pretrain_done = json.loads((run_dir / "tasks" / "train_pretrain" / "DONE.json").read_text())
    assert initialized[0]["checkpoint"] == pretrain_done["checkpoint"]  # resolved when the job started
    status = subprocess.run([nemoc, "status", str(run_dir), "--json"], capture_output=True, text=True)
    states = {row["id"]: row["state"] for row in json.loads(status.stdout)["tasks"]}
    assert [states[t] for t in ("train:pretrain", "train:anneal", "eval:eval")] == ["done"] * 3, status.stdout
    again = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "5 cached" in again.stdout, again.stdout + again.stderr
