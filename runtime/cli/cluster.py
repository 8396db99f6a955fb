"""`nemoc logs RUN_DIR [TASK] [-f]` and `nemoc cancel RUN_DIR`, whatever launched the run.

The run directory says which launcher ran it: `slurm.json` (job ids, written by the Slurm launcher),
`k8s.json` (PyTorchJob names, written by the k8s launcher), else the local launcher. Logs are
`tasks/<id>/log.txt` for every launcher (Slurm appends every attempt of a job to it); for a k8s task
whose log is not on this machine, `kubectl logs` of its pods.

Cancelling:
- local: the processes the run recorded when it started them (`procs/` of the run and of each task,
  runtime/orchestrate/procs.py), each verified by pid, start time and owner before it is signalled: every torchrun
  gets SIGTERM (its ranks save a checkpoint and exit 143; `nemoc run` then marks the task preempted),
  or the `nemoc run` itself while it prepares data; SIGKILL after a grace period to whatever recorded
  process is left. No other process is ever signalled, whatever its command line names;
- slurm: `scancel` of every recorded job that has not ended (a running job gets SIGTERM and KillWait);
- k8s: `kubectl delete pytorchjob` of every recorded job.
Exit codes: 0 done, 1 something could not be cancelled, 2 not a run directory / unknown task.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from nemoc.runtime.cli.common import EXIT_DIAGNOSTICS, EXIT_USAGE

TERM_GRACE_S = 30.0
RUNNING_STATES = ("running", "pending")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_dir(path: str) -> Path:
    root = Path(path).resolve()
    if not any((root / name).is_file() for name in ("status.json", "plan.json", "graph.json")):
        click.echo(f"error: {path} is not a nemoc run directory (no status.json, plan.json or graph.json)", err=True)
        sys.exit(EXIT_USAGE)
    return root


def launcher_of(root: Path) -> str:
    if (root / "slurm.json").is_file():
        return "slurm"
    if (root / "k8s.json").is_file():
        return "k8s"
    return "local"


def _status_tasks(root: Path) -> dict[str, dict]:
    """status.json's task records; a damaged file (wrong shapes) reads as the records still usable."""
    tasks = (_read_json(root / "status.json") or {}).get("tasks")
    if not isinstance(tasks, dict):
        return {}
    return {task: rec for task, rec in tasks.items() if isinstance(rec, dict)}


def _task_ids(root: Path) -> list[str]:
    ids = list(_status_tasks(root))
    if not ids:
        tasks = (_read_json(root / "graph.json") or {}).get("tasks")
        ids = [t["id"] for t in tasks if isinstance(t, dict) and isinstance(t.get("id"), str)] \
            if isinstance(tasks, list) else []
    return ids


def task_dir(root: Path, task_id: str) -> Path:
    from nemoc.runtime.orchestrate.rundir import RunDir

    return RunDir(root).task_dir(task_id)


def resolve_task(root: Path, task: str | None) -> str:
    """TASK as given (`train:pretrain`, `pretrain` or the directory name `train_pretrain`); by default
    the running task, else the last one that has a log."""
    ids = _task_ids(root)
    if task is None:
        running = [t for t, rec in _status_tasks(root).items() if rec.get("state") == "running"]
        logged = [t for t in ids if (task_dir(root, t) / "log.txt").exists()]
        if running or logged:
            return (running or logged)[-1]
        click.echo(f"error: no task of {root} has a log yet", err=True)
        sys.exit(EXIT_USAGE)
    from nemoc.runtime.orchestrate.rundir import safe_name

    for candidate in ids:
        if task in (candidate, safe_name(candidate), candidate.partition(":")[2]):
            return candidate
    click.echo(f"error: no task {task!r} in {root} (tasks: {', '.join(ids) or 'none'})", err=True)
    sys.exit(EXIT_USAGE)


def _task_running(root: Path, task_id: str) -> bool:
    return (_status_tasks(root).get(task_id) or {}).get("state") in RUNNING_STATES \
        and not (_read_json(root / "status.json") or {}).get("finished") and _run_alive(root)


def _run_alive(root: Path) -> bool:
    from nemoc.runtime.orchestrate.rundir import RunDir

    return RunDir(root).holder_alive()


@click.command()
@click.argument("run_dir", type=click.Path())
@click.argument("task", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the task stops running.")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=None, help="Only the last N lines.")
def logs(run_dir: str, task: str | None, follow: bool, lines: int | None) -> None:
    """Print the log of TASK (default: the running task) of RUN_DIR, whatever the launcher."""
    root = _run_dir(run_dir)
    task_id = resolve_task(root, task)
    log = task_dir(root, task_id) / "log.txt"
    if not log.exists() and launcher_of(root) == "k8s":
        sys.exit(_k8s_logs(root, task_id, follow, lines))
    if not log.exists():
        click.echo(f"{task_id}: no log yet ({log})", err=True)
        if not follow:
            return
    offset = _print_from(log, 0, lines)
    while follow:
        if not _task_running(root, task_id) and not _slurm_job_active(root, task_id):
            _print_from(log, offset, None)
            return
        time.sleep(0.5)
        offset = _print_from(log, offset, None)


def _print_from(log: Path, offset: int, last: int | None) -> int:
    from nemoc.runtime.orchestrate.launchers import read_new

    text, offset = read_new(log, offset, whole_lines=last is None)
    if last is not None:
        text = "".join(text.splitlines(keepends=True)[-last:]) if last else ""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
    return offset


def _slurm_job_active(root: Path, task_id: str) -> bool:
    """Whether the task's recorded Slurm job may still run; an squeue that does not answer counts as
    yes (`logs -f` keeps following rather than stop on one hiccup)."""
    if launcher_of(root) != "slurm":
        return False
    from nemoc.runtime.orchestrate import launch_slurm

    try:
        job = (launch_slurm.read_record(root).get("jobs") or {}).get(task_id)
    except (OSError, launch_slurm.SlurmError):
        return False
    if not job:
        return False
    try:
        info = launch_slurm.job_states([str(job["job_id"])]).get(str(job["job_id"]), {})
    except launch_slurm.SlurmError:
        return True
    return launch_slurm.is_alive(info.get("JobState", "UNKNOWN"), info.get("EndTime"))


def _k8s_logs(root: Path, task_id: str, follow: bool, lines: int | None) -> int:
    from nemoc.runtime.orchestrate import launch_k8s

    try:
        job = (launch_k8s.read_record(root).get("jobs") or {}).get(task_id)
    except launch_k8s.K8sError as error:
        click.echo(f"error: {error}", err=True)
        return EXIT_DIAGNOSTICS
    if not job:
        click.echo(f"error: {task_id} has no log and no recorded PyTorchJob", err=True)
        return EXIT_USAGE
    args = ["logs", "-n", job["namespace"], "-l", f"training.kubeflow.org/job-name={job['name']}", "--prefix"]
    args += ["-f"] if follow else []
    args += ["--tail", str(lines)] if lines is not None else []
    try:
        proc = launch_k8s.kubectl(*args, timeout=None if follow else 120)
    except launch_k8s.K8sError as error:
        click.echo(f"error: {error}", err=True)
        return EXIT_DIAGNOSTICS
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return 0 if proc.returncode == 0 else EXIT_DIAGNOSTICS


# ----------------------------------------------------------------------------------- cancel


@click.command()
@click.argument("run_dir", type=click.Path())
def cancel(run_dir: str) -> None:
    """Stop every running task of RUN_DIR (local processes, Slurm jobs or PyTorchJobs)."""
    root = _run_dir(run_dir)
    launcher = launcher_of(root)
    try:
        stopped = {"slurm": cancel_slurm, "k8s": cancel_k8s, "local": cancel_local}[launcher](root)
    except Exception as error:  # noqa: BLE001 - a LauncherError or OSError: reported, not a traceback
        click.echo(f"error: could not cancel {root}: {error}", err=True)
        sys.exit(EXIT_DIAGNOSTICS)
    if stopped:
        for line in stopped:
            click.echo(f"cancelled {line}")
    else:
        click.echo(f"nothing to cancel in {root} ({launcher} run: nothing is running)")


def cancel_slurm(root: Path) -> list[str]:
    from nemoc.runtime.orchestrate import launch_slurm

    jobs = launch_slurm.read_record(root).get("jobs") or {}
    states = launch_slurm.job_states(str(rec["job_id"]) for rec in jobs.values())  # one squeue for the run
    found = {task: states.get(str(rec["job_id"]), {}) for task, rec in jobs.items()}
    active = {task: str(rec["job_id"]) for task, rec in jobs.items()  # PREEMPTED too: it may come back
              if launch_slurm.is_alive(found[task].get("JobState", "UNKNOWN"), found[task].get("EndTime"))}
    launch_slurm.cancel(active.values())
    return [f"{task}: Slurm job {job_id}" for task, job_id in active.items()]


def cancel_k8s(root: Path) -> list[str]:
    from nemoc.runtime.orchestrate import launch_k8s

    done = []
    for task, rec in (launch_k8s.read_record(root).get("jobs") or {}).items():
        proc = launch_k8s.kubectl("delete", "pytorchjob", rec["name"], "-n", rec["namespace"], "--ignore-not-found")
        if proc.returncode != 0:
            raise launch_k8s.K8sError(f"kubectl delete pytorchjob {rec['name']}: {proc.stderr.strip()}")
        if proc.stdout.strip():
            done.append(f"{task}: PyTorchJob {rec['namespace']}/{rec['name']}")
    return done


def local_processes(root: Path) -> list:
    """The processes this run started that still run, from their records (runtime/orchestrate/procs.py): the
    `nemoc run` holding the directory, and each task's torchrun and ranks. Verified by pid, start time
    and owner; nothing else (not a process that merely names the run's files) is ever returned."""
    from nemoc.runtime.orchestrate import procs

    found = procs.live(root)
    for directory in procs.task_dirs(root):
        found += procs.live(directory)
    return found


def cancel_local(root: Path, grace_s: float = TERM_GRACE_S) -> list[str]:
    """SIGTERM to each live torchrun (it stops its ranks; training saves and exits 143), to ranks whose
    torchrun is gone, and to the `nemoc run` itself when no torchrun runs (it is preparing data: it stops
    as on Ctrl-C); SIGKILL after `grace_s` to whatever recorded process is left, with its process group
    when it leads one it was started to lead (torchrun, a rank: their forked helpers)."""
    found = local_processes(root)
    if not found:
        return []
    torchruns = [r for r in found if r.role == "torchrun"]
    targets = torchruns or [r for r in found if r.role == "rank"] or [r for r in found if r.role == "launcher"]
    if torchruns:  # a task directory whose torchrun died: its ranks
        with_torchrun = {r.path.parent for r in torchruns}
        targets += [r for r in found if r.role == "rank" and r.path.parent not in with_torchrun]
    for rec in targets:
        rec.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(r.live() for r in found):
        time.sleep(0.2)
    for rec in found:
        if rec.role != "launcher":  # the launcher tears down what it started; its children are recorded here
            rec.signal(signal.SIGKILL, group=True)
    return [f"{rec.role} pid {rec.pid}" for rec in targets]
