"""The Slurm launcher: each task of the runtime graph becomes one sbatch job, chained along the graph.

Input:  `SlurmJob`s (one per task, built from the compiled plan's cluster and the task's command) and the
        compiled `SlurmOptions` of `cluster { scheduler = slurm(partition = "...", account = "...",
        time = 4h, extra = ["--exclusive"]) }` (the plan's record: defaults filled, durations in seconds).
Output: one batch script per task in `tasks/<id>/job.sbatch`, submitted with `sbatch --parsable` and
        `--dependency=afterok:<upstream ids>`; job ids recorded in `<run dir>/slurm.json`.
Invariants:
- Every value that reaches a generated script goes through `shlex.quote`; values that would end a
  `#SBATCH` line (newlines, control characters) are rejected, because a directive is a shell comment
  and a newline inside it would start a command line. sbatch's own directive parser honours the same
  quotes and backslashes as the shell (Slurm's `_get_argument`), so a quoted value reaches Slurm intact.
- Multi-node: `srun` starts one `torchrun` per node; the rendezvous endpoint is the first node's
  `NodeAddr` from `scontrol show node` (node names need not resolve, e.g. several slurmd on one host) and
  a port derived from the job id, so concurrent jobs on one node do not collide.
- Time limits: `--signal=B:USR1@<lead>` asks Slurm to warn the batch shell before the limit; the shell
  forwards SIGTERM to the training processes (which checkpoint and exit 143) and then requeues the job
  (`scontrol requeue`), which resumes from `checkpoints/latest`. SIGTERM to the batch shell (scancel,
  preemption, `scontrol requeue`) is forwarded too, but requeueing is left to Slurm, so a cancelled job
  stays cancelled. A job whose training fails without a signal is requeued at most `max_failures` times
  (a killed node or rank); a task that wrote its DONE marker is never requeued.
- The executor hands `SlurmLauncher.submit_chain` every distributed task of a run at once: one sbatch
  per task, `afterok` on the jobs of its upstream tasks, `--kill-on-invalid-dep=yes` so a failed
  upstream cancels its dependants. `follow_chain` then watches the jobs (or `nemoc run --detach` leaves
  them to Slurm). A task whose job is still queued or running with the same hash is never submitted
  twice; `active_jobs` tells the executor which those are.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nemoc.compiler.params import SCHEDULER_OPTIONS_TYPES, OptionsMismatch, options_for
from nemoc.runtime.faults import RESTART_SAFE_ENV
from nemoc.runtime.orchestrate.launchers import (EXIT_PREEMPTED, Hangup, LaunchResult, LaunchSpec, LauncherError, nodes_for,
                                     read_job_record, read_new)
from nemoc.runtime.orchestrate.rundir import atomic_write_json
from nemoc.runtime.taskfile import FATAL

RECORD_FILE = "slurm.json"
PORT_SPAN = 20000  # rendezvous port = base + job id % span

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SlurmError(LauncherError):
    """A problem with the scheduler or a submission; the message is for the user."""


# `slurm(...)` as compiled (nemoc.compiler.params): every default filled, `time` and `signal_lead` in whole
# seconds by the language's one duration grammar, each value checked at compile time (E047,
# compiler/scheduler.py). The launcher reads it as it is and parses nothing.
SlurmOptions = SCHEDULER_OPTIONS_TYPES["slurm"]


def _options(cluster) -> SlurmOptions:
    """The plan's `slurm(...)` options (defaults when the cluster names no scheduler options of its own)."""
    try:
        return options_for(cluster, "slurm")
    except OptionsMismatch as error:
        raise SlurmError(str(error)) from None


def slurm_time(seconds: int) -> str:
    """Slurm's `--time` format: D-HH:MM:SS (minutes are rounded up by Slurm itself)."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}" if days else f"{hours:02d}:{minutes:02d}:{secs:02d}"


@dataclass(frozen=True, slots=True)
class SlurmJob:
    """One task as a batch job. `program` follows `torchrun`'s options (e.g. `-m nemoc.runtime.train
    TASK_JSON`) when `distributed`, else it is the whole command run once on the first node."""

    task_id: str
    name: str  # the Slurm job name
    nodes: int
    procs_per_node: int
    gpus_per_node: int  # 0 = CPU: no --gpus-per-node
    program: tuple[str, ...]
    run_dir: str
    log_path: str  # stdout+stderr of every attempt, appended (requeues keep the same file)
    done_path: str  # written by the task when it has finished; a job with it is never requeued
    distributed: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable
    workdir: str | None = None
    task_hash: str = ""
    plan_digest: str = ""  # of the plan file its task.json names (a re-run attaches only to the same plan)


def _directive(option: str, value: object | None = None) -> str:
    text = option if value is None else f"{option}={value}"
    if _CONTROL.search(text):  # a newline would end the comment and start a command line
        raise SlurmError(f"sbatch option {text!r} contains a newline or control character")
    return f"#SBATCH {shlex.quote(text)}"


def directives(job: SlurmJob, opts: SlurmOptions) -> list[str]:
    lines = [
        _directive("--job-name", job.name),
        _directive("--nodes", job.nodes),
        _directive("--ntasks-per-node", 1),
        _directive("--output", job.log_path),
        _directive("--open-mode", "append"),
        _directive("--requeue"),
        _directive("--signal", f"B:USR1@{int(opts.signal_lead)}"),
        _directive("--kill-on-invalid-dep", "yes"),
    ]
    if job.gpus_per_node > 0:
        lines.append(_directive("--gpus-per-node", job.gpus_per_node))
    if opts.cpus_per_task:
        lines.append(_directive("--cpus-per-task", opts.cpus_per_task))
    if opts.time:
        lines.append(_directive("--time", slurm_time(int(opts.time))))
    for option, value in (("--partition", opts.partition), ("--account", opts.account), ("--qos", opts.qos),
                          ("--reservation", opts.reservation), ("--constraint", opts.constraint),
                          ("--mem", opts.mem)):
        if value:
            lines.append(_directive(option, value))
    if job.workdir:
        lines.append(_directive("--chdir", job.workdir))
    lines.extend(_directive(item) for item in opts.extra)
    return lines


# The per-node wrapper is a constant string: the node rank is read on the node, every other value
# arrives as a separate, already-quoted argument ("$@"), so nothing user-written is ever re-parsed.
_NODE_WRAPPER = 'exec "$0" -m torch.distributed.run --node-rank="$SLURM_NODEID" "$@"'

_BODY = r"""
set -u
q() {{ printf '[nemoc %(%H:%M:%S)T] %s\n' -1 "$*"; }}
{env}
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# NodeAddr, not the node name: emulated nodes (several slurmd on one host) do not resolve by name.
MASTER_ADDR=$(scontrol show node -o "$FIRST_NODE" | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
MASTER_ADDR=${{MASTER_ADDR:-$FIRST_NODE}}
MASTER_PORT=$(( {port_base} + SLURM_JOB_ID % {port_span} ))
export MASTER_ADDR MASTER_PORT
if [ -z "${{OMP_NUM_THREADS:-}}" ]; then  # the node's CPUs shared by its ranks, so they do not oversubscribe
  OMP_NUM_THREADS=$(( ${{SLURM_CPUS_ON_NODE:-1}} / {procs} )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi
TASK_ID={task}
RESTARTS=${{SLURM_RESTART_COUNT:-0}}
q "job $SLURM_JOB_ID (attempt $((RESTARTS + 1))) task $TASK_ID on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

WARNED=0
STOPPED=0
ask_training_to_stop() {{
  # Signals every process of the job's steps (torchrun and its workers) on every node, not the batch
  # shell; training finishes its step, saves a checkpoint and exits 143.
  scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
}}
# USR1: Slurm's warning before the time limit (--signal=B:USR1@...): checkpoint, then requeue ourselves.
trap 'WARNED=1; q "signal USR1 (time limit near): asking training to checkpoint and stop"; ask_training_to_stop' USR1
# TERM: scancel, preemption or `scontrol requeue`: Slurm decides whether the job comes back; training
# still gets the chance to checkpoint within KillWait.
trap 'STOPPED=1; q "signal TERM: asking training to checkpoint and stop"; ask_training_to_stop' TERM

{launch} &
STEP_PID=$!
# `wait` returns early when a trapped signal arrives: keep waiting until the step itself has ended
# (bash keeps the status of a finished background job, so the last `wait` returns the step's own code).
while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; done
wait "$STEP_PID"; RC=$?
q "training step exited with $RC"

if [ -e {done} ]; then
  q "task finished"
  exit 0
fi
if [ -e {fatal} ]; then
  q "the task cannot succeed as configured ({fatal_name}): not requeued"
  exit 1
fi
if [ "$STOPPED" = 1 ]; then
  q "stopped by Slurm (cancel, preemption or requeue); Slurm decides whether the job runs again"
  exit "$RC"
fi
FAILURES_FILE={failures}
if [ "$WARNED" = 1 ] || [ "$RC" = 143 ]; then
  q "preempted: requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
  # a job that could not requeue itself must not end COMPLETED: that would satisfy its dependants' afterok
  scontrol requeue "$SLURM_JOB_ID" || {{ q "requeue failed: the job ends here (nemoc run resumes it)"; exit 1; }}
  exit 0
fi
FAILURES=$(cat "$FAILURES_FILE" 2>/dev/null || echo 0)
if [ "$RC" != 0 ] && [ "$FAILURES" -lt {max_failures} ]; then
  echo $((FAILURES + 1)) > "$FAILURES_FILE"
  q "failure $((FAILURES + 1)) of {max_failures} allowed: requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
  scontrol requeue "$SLURM_JOB_ID" || {{ q "requeue failed: the job ends here"; exit "$RC"; }}
  exit 0
fi
exit "$RC"
"""


def launch_command(job: SlurmJob, opts: SlurmOptions) -> str:
    q = shlex.quote
    program = " ".join(q(a) for a in job.program)
    container = f" --container-image={q(opts.container)}" if opts.container else ""
    if not job.distributed:
        return f"srun --nodes=1 --ntasks=1{container} {q(job.python)} {program}"
    torchrun = " ".join([
        '--nnodes="$SLURM_NNODES"',
        f"--nproc-per-node={job.procs_per_node}",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
        '--rdzv-id="$SLURM_JOB_ID"',
        f"--max-restarts={opts.torchrun_restarts}",
    ])
    # --kill-on-bad-exit=0: a rank that stops with 143 after checkpointing must not get the others killed
    # before they have written their shards.
    return (f"srun --ntasks-per-node=1 --kill-on-bad-exit=0 --label{container} bash -c {q(_NODE_WRAPPER)} "
            f"{q(job.python)} {torchrun} {program}")


def render_sbatch(job: SlurmJob, opts: SlurmOptions) -> str:
    """The batch script for `job`: directives, rendezvous, signal handling and the requeue policy."""
    env = "\n".join(f"export {_env_name(k)}={shlex.quote(str(v))}" for k, v in sorted(job.env.items()))
    failures = str(Path(job.done_path).parent / "slurm_failures")
    body = _BODY.format(
        env=env,
        port_base=int(opts.port_base),
        port_span=PORT_SPAN,
        procs=max(1, int(job.procs_per_node)),
        task=shlex.quote(job.task_id),
        launch=launch_command(job, opts),
        done=shlex.quote(job.done_path),
        fatal=shlex.quote(str(Path(job.done_path).parent / FATAL)),
        fatal_name=FATAL,
        failures=shlex.quote(failures),
        max_failures=int(opts.max_failures),
    )
    header = ["#!/bin/bash", f"# generated by nemoc for task {shlex.quote(job.task_id)}"]
    return "\n".join(header + directives(job, opts)) + "\n" + body


def _env_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise SlurmError(f"environment variable name {name!r} is not valid")
    return name


# ----------------------------------------------------------------------------------- submission


def require_slurm() -> None:
    missing = [tool for tool in ("sbatch", "scontrol", "scancel", "squeue") if shutil.which(tool) is None]
    if missing:
        raise SlurmError(f"Slurm is not reachable from this machine: {', '.join(missing)} not on PATH")


def sbatch(script_path: str, dependencies: Sequence[str] = (), *, hold: bool = False) -> str:
    """Submit one script; returns the job id. Arguments go as a list, never through a shell."""
    argv = ["sbatch", "--parsable", *(["--hold"] if hold else [])]
    if dependencies:
        argv.append("--dependency=afterok:" + ":".join(dependencies))
    argv.append(script_path)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {script_path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {proc.stdout!r}")
    return job_id


def submit_jobs(jobs: Sequence[SlurmJob], after: Mapping[str, Iterable[str]], opts: SlurmOptions,
                run_dir: str | os.PathLike, existing: Mapping[str, str] | None = None, *,
                hold: bool = False) -> dict[str, str]:
    """Write and submit every job in order (`jobs` is topologically sorted; `after[task]` names the
    tasks it waits for, among `jobs` or `existing`: task id -> the job id of an already submitted task).
    Returns task id -> job id of `jobs` and records it in `<run_dir>/slurm.json`."""
    require_slurm()
    job_ids: dict[str, str] = dict(existing or {})
    record = read_record(run_dir)
    for job in jobs:
        script = Path(job.done_path).parent / "job.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(render_sbatch(job, opts))
        deps = [job_ids[t] for t in after.get(job.task_id, ()) if t in job_ids]
        job_ids[job.task_id] = sbatch(str(script), deps, hold=hold)
        record["jobs"][job.task_id] = {"job_id": job_ids[job.task_id], "script": str(script), "hash": job.task_hash,
                                       "plan": job.plan_digest, "after": deps, "submitted_at": time.time()}
        write_record(run_dir, record)
    return {job.task_id: job_ids[job.task_id] for job in jobs}


def read_record(run_dir: str | os.PathLike) -> dict:
    """`slurm.json`; raises SlurmError naming it when it is damaged (it holds the run's job ids)."""
    return read_job_record(Path(run_dir) / RECORD_FILE, launcher="slurm", keys={"job_id"}, error=SlurmError,
                           holds="Slurm job ids", check="check squeue for jobs of this run")


def write_record(run_dir: str | os.PathLike, record: Mapping) -> None:
    atomic_write_json(Path(run_dir) / RECORD_FILE, record)


# ----------------------------------------------------------------------------------- queries


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
# PREEMPTED is where a job ends *or* passes through on its way back to the queue (PreemptMode=REQUEUE):
# for "may it still run?" it counts as alive, so a re-run never submits a second copy of it.
ENDED = TERMINAL - {"PREEMPTED"}


def is_alive(state: str, end_time: str | None = None) -> bool:
    """The job may still run (queued, running, requeueing); "UNKNOWN" (forgotten by Slurm) has ended.
    PREEMPTED counts as alive until PREEMPT_SETTLE_S after its end time (squeue's %e): a job requeued
    on preemption is PENDING again by then; one still PREEMPTED was cancelled (PreemptMode=CANCEL)."""
    if state == "PREEMPTED" and end_time:
        try:
            ended = time.mktime(time.strptime(end_time, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return True
        return time.time() - ended < PREEMPT_SETTLE_S
    return state not in ENDED and state != "UNKNOWN"


_COUNTERS = re.compile(r" Requeue=(\d+) Restarts=(\d+) BatchFlag=\d+ Reboot=\d+ ExitCode=(\d+):(\d+)")
_FORGOTTEN = "Invalid job id"  # squeue's answer for one job id that slurmctld no longer knows


def job_states(job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """JobState and Reason of many jobs in one `squeue` call (one RPC, whatever the chain's length);
    a job Slurm has forgotten is absent. Raises SlurmError when squeue fails for another reason (the
    controller is busy or down): "unknown" must not be taken for "ended"."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return {}
    try:
        proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r|%e"],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmError("squeue did not answer within 60 s (slurmctld busy?)") from None
    if proc.returncode != 0:
        if _FORGOTTEN in proc.stderr:
            return {}
        raise SlurmError(f"squeue failed: {proc.stderr.strip() or proc.stdout.strip() or f'exit {proc.returncode}'}")
    out = {}
    for line in proc.stdout.splitlines():
        job_id, state, reason, end = (line.strip().split("|") + ["", "", ""])[:4]
        if job_id in ids:
            out[job_id] = {"JobState": state.strip(), "Reason": reason.strip(), "EndTime": end.strip()}
    return out


def job_counters(job_id: str) -> dict[str, str]:
    """Requeue, Restarts and ExitCode from one anchored pattern of `scontrol show job -o`, so a job name
    or comment that contains `JobState=...` cannot spoof them; {} when unavailable."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        return {}
    match = _COUNTERS.search(proc.stdout) if proc.returncode == 0 else None
    if not match:
        return {}
    return {"Requeue": match.group(1), "Restarts": match.group(2), "ExitCode": f"{match.group(3)}:{match.group(4)}"}


def job_info(job_id: str) -> dict[str, str]:
    """JobState, Reason, Restarts and ExitCode of a job without an accounting database; {} once Slurm
    has forgotten it."""
    info = job_states([job_id]).get(str(job_id))
    return {**info, **job_counters(job_id)} if info else {}


def job_state(job_id: str) -> str:
    return job_info(job_id).get("JobState", "UNKNOWN")


def wait_jobs(job_ids: Iterable[str], timeout_s: float, poll_s: float = 1.0) -> dict[str, str]:
    """Poll until every job reaches a terminal state (or timeout); returns job id -> state."""
    pending = [str(j) for j in job_ids]
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        found = job_states(pending)
        for job_id in list(pending):
            states[job_id] = found.get(job_id, {}).get("JobState", "UNKNOWN")
            if states[job_id] in TERMINAL | {"UNKNOWN"}:
                pending.remove(job_id)
        if pending:
            time.sleep(poll_s)
    return states


def release(job_ids: Iterable[str]) -> None:
    """`scontrol release` of held jobs (a chain is submitted held, then released whole)."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return
    try:
        proc = subprocess.run(["scontrol", "release", ",".join(ids)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"scontrol release {','.join(ids)} did not answer within 60 s") from None
    if proc.returncode != 0:
        raise SlurmError(f"scontrol release {','.join(ids)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def cancel(job_ids: Iterable[str]) -> list[str]:
    """scancel every job id; returns the ids. A job that ended meanwhile is not an error."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return []
    require_slurm()
    proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines()
              if "error" in line.lower() and "already completing or completed" not in line and _FORGOTTEN not in line]
    if proc.returncode != 0 and errors:
        raise SlurmError(f"scancel {' '.join(ids)} failed: {'; '.join(errors)}")
    return ids


# ----------------------------------------------------------------------------------- the launcher


TAIL_LINES = 25
PREEMPT_SETTLE_S = 15.0  # a PREEMPTED job that is being requeued turns PENDING within this time


def job_from_spec(spec: LaunchSpec, cluster=None) -> SlurmJob:
    """A `LaunchSpec` from the executor as a batch job: `nproc` processes over `spec.nodes` nodes."""
    nodes = nodes_for(spec)
    if spec.nproc % nodes:
        raise SlurmError(f"{spec.task_id}: {spec.nproc} processes do not split evenly over {nodes} nodes")
    per_node = spec.nproc // nodes
    on_cpu = spec.gpus_per_node == 0 or (cluster is not None and str(getattr(cluster, "gpu", "")).upper() == "CPU")
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **RESTART_SAFE_ENV}
    env.update({k: str(v) for k, v in spec.env.items()})
    out = Path(spec.out_dir).resolve()
    return SlurmJob(
        task_id=spec.task_id,
        name=f"nemoc-{spec.task_id}",
        nodes=nodes,
        procs_per_node=per_node,
        gpus_per_node=0 if on_cpu else per_node,
        program=("-m", spec.module, *spec.args),
        run_dir=str(out.parent.parent),
        log_path=str(Path(spec.log_path).resolve()),
        done_path=str(out / "DONE.json"),
        env=env,
        workdir=str(out),
        task_hash=spec.task_hash,
        plan_digest=spec.plan_digest,
    )


class SlurmLauncher:
    """The Slurm side of the executor (docs/graph.md, section 4): `submit_chain` submits every distributed
    task of a run at once, chained with afterok, all or nothing; `follow_chain` watches the jobs to their
    end with one `squeue` per poll (backing off while nothing changes), echoing the first node's log lines
    and state changes (requeues after a preemption or a failure happen inside Slurm, under the same job
    id, and are followed transparently). Ctrl-C or SIGTERM while following cancels the jobs this
    invocation submitted; a hangup (SIGHUP: the terminal closed) or a scheduler that stops answering
    only stops the following. `launch` is the one-task form of the same steps."""

    name = "slurm"
    MAX_QUERY_S = 10.0  # the longest pause between two squeue calls while nothing changes
    GIVE_UP_S = 300.0  # no answer from squeue for this long: stop following (the jobs are not cancelled)

    def __init__(self, *, cluster=None, echo=None, poll_s: float = 1.0, timeout_s: float | None = None) -> None:
        require_slurm()  # here, so that `nemoc run` stops with a clear message before any task runs
        self.cluster = cluster
        self.options = _options(cluster)
        self.echo = echo if echo is not None else _echo
        self.poll_s = poll_s
        self.timeout_s = timeout_s

    def launch(self, spec: LaunchSpec) -> LaunchResult:
        """Submit one task and follow it; a submission problem is a failed task with the reason."""
        try:
            job_ids = self.submit_chain([spec], {}, {}, Path(job_from_spec(spec, self.cluster).run_dir))
        except (SlurmError, OSError, subprocess.TimeoutExpired) as error:
            return LaunchResult(1, None, f"could not submit {spec.task_id} to Slurm: {error}")
        results: dict[str, LaunchResult] = {}
        self.follow_chain([spec], job_ids, lambda task_id, result: results.__setitem__(task_id, result),
                          owned=set(job_ids.values()))
        return results[spec.task_id]

    def active_jobs(self, run_dir: Path) -> dict[str, dict]:
        """The run's recorded jobs that may still run: task id -> {"job_id", "hash", "plan", "after",
        "state", "reason"}. Raises SlurmError when Slurm cannot be asked."""
        jobs = read_record(run_dir).get("jobs") or {}
        states = job_states(str(rec["job_id"]) for rec in jobs.values())
        active = {}
        for task_id, rec in jobs.items():
            info = states.get(str(rec["job_id"]), {})
            if is_alive(info.get("JobState", "UNKNOWN"), info.get("EndTime")):
                active[task_id] = {"job_id": str(rec["job_id"]), "hash": str(rec.get("hash", "")),
                                   "plan": str(rec.get("plan", "")),
                                   "after": [str(a) for a in rec["after"]] if isinstance(rec.get("after"), list) else None,
                                   "state": info["JobState"], "reason": info.get("Reason", "")}
        return active

    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        return cancel(job_ids)

    def submit_chain(self, specs: Sequence[LaunchSpec], after: Mapping[str, Sequence[str]],
                     existing: Mapping[str, str], run_dir: Path) -> dict[str, str]:
        """sbatch every spec (topological order), each with afterok on the jobs of `after[task]` (tasks
        of `specs` or of `existing`, task id -> job id). All or nothing: every job is submitted held and
        the whole chain released at the end; on any failure (or Ctrl-C) the jobs already submitted are
        cancelled before the error propagates (with `task_id` set on it). A job whose sbatch was cut
        short after Slurm took it (killed nemoc) stays held: it never runs unseen."""
        jobs = []
        for spec in specs:
            try:
                job = job_from_spec(spec, self.cluster)
                opts = spec.options if isinstance(spec.options, SlurmOptions) else self.options
            except SlurmError as error:
                error.task_id = spec.task_id
                raise
            Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
            jobs.append((job, opts))
        job_ids: dict[str, str] = {}
        for job, opts in jobs:  # one call per job: options may differ per task
            try:
                job_ids.update(submit_jobs([job], after, opts, run_dir, existing={**existing, **job_ids}, hold=True))
                known = {**existing, **job_ids}
                deps = [f"{t} (job {known[t]})" for t in after.get(job.task_id, ()) if t in known]
                self.echo(f"submitted Slurm job {job_ids[job.task_id]} for {job.task_id} ({job.nodes} node(s) x "
                          f"{job.procs_per_node} process(es)){'; after ' + ', '.join(deps) if deps else ''}\n")
            except BaseException as error:
                if job_ids:  # a half-submitted chain would train without its tail
                    subprocess.run(["scancel", *job_ids.values()], capture_output=True, timeout=60)
                    self.echo(f"cancelled the jobs already submitted: {', '.join(job_ids.values())}\n")
                if isinstance(error, subprocess.TimeoutExpired):
                    self.echo(f"sbatch did not answer for {job.task_id}: check `squeue --name={job.name}` for a "
                              f"job it may still have queued\n")
                if isinstance(error, Exception):
                    error.task_id = job.task_id
                raise
        try:
            release(job_ids.values())
        except BaseException:
            subprocess.run(["scancel", *job_ids.values()], capture_output=True, timeout=60)
            self.echo(f"cancelled the held jobs: {', '.join(job_ids.values())}\n")
            raise
        return job_ids

    def follow_chain(self, specs: Sequence[LaunchSpec], job_ids: Mapping[str, str], on_end, *,
                     on_start=None, owned: Iterable[str] = ()) -> None:
        """Watch every job until it ends: `on_start(task_id)` when it first runs, `on_end(task_id,
        LaunchResult)` when it ends. Ctrl-C / SIGTERM cancels the `owned` jobs that have not ended."""
        jobs = {spec.task_id: job_from_spec(spec, self.cluster) for spec in specs}
        watch = {task_id: _Watch(job_ids[task_id], Path(job.log_path)) for task_id, job in jobs.items()}
        label = len(watch) > 1
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        pause, next_query, answered = self.poll_s, 0.0, time.monotonic()
        try:
            while watch:
                changed = False
                for task_id, w in watch.items():  # local files: every poll
                    offset = self._echo_new(w.log_path, w.offset, f"[{task_id}] " if label else "")
                    changed |= offset != w.offset
                    w.offset = offset
                if time.monotonic() >= next_query:
                    try:
                        states = job_states(w.job_id for w in watch.values())
                        answered = time.monotonic()
                    except SlurmError as error:
                        if time.monotonic() - answered > self.GIVE_UP_S:
                            raise SlurmError(f"no answer from Slurm for {self.GIVE_UP_S:.0f} s ({error})") from None
                        self.echo(f"Slurm did not answer ({error}); asking again\n")
                        states, changed = None, False  # back off whatever the logs do
                    if states is not None:
                        for task_id, w in list(watch.items()):
                            info = self._update(task_id, w, states.get(w.job_id), on_start)
                            changed |= w.changed
                            if info is not None:
                                del watch[task_id]
                                on_end(task_id, self._result(jobs[task_id], w.job_id, info))
                    pause = self.poll_s if changed else min(pause * 1.5, max(self.poll_s, self.MAX_QUERY_S))
                    next_query = time.monotonic() + pause
                if not watch:
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"Slurm job(s) {', '.join(w.job_id for w in watch.values())} did not "
                                       f"finish within {self.timeout_s} s")
                time.sleep(min(self.poll_s, max(0.0, next_query - time.monotonic())) or self.poll_s)
        except KeyboardInterrupt as interrupt:
            left = [w.job_id for w in watch.values() if w.job_id in set(owned)]
            if left and not isinstance(interrupt, Hangup):
                try:
                    subprocess.run(["scancel", *left], capture_output=True, timeout=60)
                    self.echo(f"cancelled Slurm job(s) {', '.join(left)}\n")
                except (OSError, subprocess.TimeoutExpired):
                    self.echo(f"could not cancel Slurm job(s) {', '.join(left)}: `nemoc cancel` or scancel them\n")
            raise

    def _update(self, task_id: str, w: "_Watch", found: dict | None, on_start) -> dict[str, str] | None:
        """Apply one squeue answer to a watched job: say what changed; its final info once it has ended."""
        w.changed = False
        if found is None:  # forgotten by Slurm (purged after MinJobAge): it has ended; counters if still there
            return {**w.info, **job_counters(w.job_id), "JobState": "UNKNOWN"}
        state = found["JobState"]
        if state != w.state or found.get("Reason") != w.info.get("Reason"):
            w.info = {**w.info, **found, **job_counters(w.job_id)}  # scontrol only when something changed
            w.changed = True
        if state != w.state:
            reason = w.info.get("Reason", "")
            why = f", {reason}" if state == "PENDING" and reason not in ("", "None") else ""
            self.echo(f"Slurm job {w.job_id} ({task_id}): {state} (restarts {w.info.get('Restarts', '0')}{why})\n")
            if state == "RUNNING" and not w.started and on_start is not None:
                on_start(task_id)
            w.started |= state == "RUNNING"
            w.state = state
        if state == "PREEMPTED":  # with PreemptMode=REQUEUE the job passes through it and comes back
            w.preempted_since = w.preempted_since or time.monotonic()
            if time.monotonic() - w.preempted_since < PREEMPT_SETTLE_S:
                return None
        else:
            w.preempted_since = None
        return w.info if state in TERMINAL else None

    def _echo_new(self, log_path: Path, offset: int, prefix: str = "") -> int:
        text, offset = read_new(log_path, offset)
        for line in text.splitlines(keepends=True):
            if line.startswith(("0: ", "[nemoc ")):  # node 0's output (srun --label) and the script's
                self.echo(prefix + (line[3:] if line.startswith("0: ") else line))
        return offset

    def _result(self, job: SlurmJob, job_id: str, info: Mapping[str, str]) -> LaunchResult:
        state = info.get("JobState", "UNKNOWN")
        code, _, sig = info.get("ExitCode", "1:0").partition(":")
        if state in ("COMPLETED", "UNKNOWN") and Path(job.done_path).exists():
            return LaunchResult(0)
        if state in ("PREEMPTED", "TIMEOUT") or code == str(EXIT_PREEMPTED):
            return LaunchResult(EXIT_PREEMPTED)
        if state == "CANCELLED" and info.get("Reason") == "DependencyNeverSatisfied":
            return LaunchResult(1, None, f"Slurm job {job_id} was cancelled: an upstream job did not succeed")
        tail = _tail(Path(job.log_path))
        returncode = int(code) if code.isdigit() and int(code) else 1
        return LaunchResult(returncode, None, f"Slurm job {job_id} ended {state} (exit {code}:{sig or 0})\n{tail}")


@dataclass
class _Watch:
    job_id: str
    log_path: Path
    offset: int = 0
    state: str = ""
    info: dict = field(default_factory=dict)
    preempted_since: float | None = None
    started: bool = False
    changed: bool = False

    def __post_init__(self) -> None:
        self.offset = self.log_path.stat().st_size if self.log_path.exists() else 0


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _echo(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def write_scripts(plan, graph, run_dir) -> list[Path]:
    """`--dry-run` for Slurm: the batch script of every distributed task of `graph`, written to
    `tasks/<id>/job.sbatch` and not submitted (for review, or for `sbatch` by hand in graph order)."""
    from nemoc.runtime.orchestrate.tasks import TaskContext, TaskError, get_kind, launch_shape

    opts = _options(plan.cluster)
    written = []
    for task in graph.tasks():
        try:
            kind = get_kind(task.kind)
        except TaskError as error:
            raise SlurmError(str(error)) from None
        if kind.run_inline is not None:
            continue  # tokenizer / prepare run where `nemoc run` runs
        out_dir = run_dir.task_dir(task.id)
        ctx = TaskContext(task=task, plan=plan, plan_path=run_dir.plan_path, run_dir=run_dir, out_dir=out_dir, inputs={})
        nproc, gpus, env = launch_shape(kind, ctx)  # as the executor starts it
        spec = LaunchSpec(task_id=task.id, module=kind.module, args=(str(out_dir / "task.json"),), nproc=nproc,
                          out_dir=out_dir, log_path=out_dir / "log.txt", nodes=plan.cluster.nodes,
                          gpus_per_node=gpus, env=env)
        job = job_from_spec(spec, plan.cluster)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "job.sbatch"
        path.write_text(render_sbatch(job, opts))
        written.append(path)
    return written
