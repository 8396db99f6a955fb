"""Launchers: how a distributed task's processes are started. Selected by name; see docs/graph.md, section 4.

`LAUNCHERS` maps a name to "module:Class"; the class is built as `cls(cluster=<ClusterSpec>)` and must
offer `name` and `launch(spec: LaunchSpec) -> LaunchResult` (blocking; Ctrl-C tears the job down).
A `ChainLauncher` (Slurm) also takes a run's whole chain of distributed tasks at once.
The cluster engineer's `nemoc.runtime.orchestrate.launch_slurm` / `nemoc.runtime.orchestrate.launch_k8s` plug in by defining
`SlurmLauncher` / `K8sLauncher`; until a module exists, asking for it is a clear error.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from nemoc.compiler.params import SchedulerOptions

LAUNCHERS: dict[str, str] = {
    "local": "nemoc.runtime.orchestrate.launch_local:LocalLauncher",
    "slurm": "nemoc.runtime.orchestrate.launch_slurm:SlurmLauncher",
    "k8s": "nemoc.runtime.orchestrate.launch_k8s:K8sLauncher",
}
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the task saved a checkpoint and stopped; it resumes on the next run


class LauncherError(RuntimeError):
    """The launcher is unknown or unavailable; the message is for the user."""


class Hangup(KeyboardInterrupt):
    """SIGHUP (the terminal closed): local processes are torn down like on Ctrl-C, but jobs a cluster
    scheduler runs are left running, since they need no terminal."""


@dataclass(frozen=True)
class LaunchSpec:
    task_id: str
    module: str  # python -m module *args
    args: tuple[str, ...]
    nproc: int  # processes in total (the stage layout's world size)
    out_dir: Path
    log_path: Path  # the combined log of every rank
    nodes: int = 1
    gpus_per_node: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    options: SchedulerOptions | None = None  # the plan's compiled cluster.scheduler_options
    task_hash: str = ""  # the task's content hash (a cluster launcher records it with the job)
    plan_digest: str = ""  # the digest of the plan snapshot its task.json names (recorded likewise)


@dataclass(frozen=True)
class LaunchResult:
    returncode: int  # 0 success, EXIT_PREEMPTED, anything else failure
    failed_rank: int | None = None
    error_tail: str = ""  # the failing rank's last log lines

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def preempted(self) -> bool:
        return self.returncode == EXIT_PREEMPTED


def read_job_record(path: Path, *, launcher: str, keys: set[str], error: type[Exception], holds: str,
                    check: str) -> dict:
    """A cluster launcher's record of a run's jobs (`slurm.json`, `k8s.json`: {"launcher", "jobs":
    {task: {...}}}), or an empty one. A damaged record raises `error` naming the file, what it holds
    and `check` (where to look for the run's jobs): it is never silently replaced, since it is the
    only list of jobs `nemoc cancel` can reach."""
    if not path.exists():
        return {"launcher": launcher, "jobs": {}}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise error(f"{path} is unreadable ({exc}); it records this run's {holds}: repair or remove it "
                    f"(then {check})") from None
    jobs = record.get("jobs") if isinstance(record, dict) else None
    if not isinstance(jobs, dict) or not all(isinstance(j, dict) and keys <= set(j) for j in jobs.values()):
        shape = ", ".join(f'"{k}": ...' for k in sorted(keys))
        raise error(f"{path} is damaged: not the record nemoc writes ({{\"jobs\": {{TASK: {{{shape}}}}}}}); "
                    f"repair or remove it (then {check})")
    return record


def read_new(path: Path, offset: int, *, whole_lines: bool = True) -> tuple[str, int]:
    """What `path` holds past byte `offset` (only up to its last newline when `whole_lines`, so a line
    being written is read once it is complete) and the offset to read from next; ("", offset) while the
    file cannot be read. The one reader behind every log follower (`nemoc logs -f`, the Slurm echo)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return "", offset
    end = data.rfind(b"\n") + 1 if whole_lines else len(data)
    return data[:end].decode("utf-8", "replace"), offset + end


def nodes_for(spec: LaunchSpec) -> int:
    """The nodes a task takes: the cluster's, or fewer when its processes fill fewer (eval and export
    run one process: one node)."""
    return max(1, min(spec.nodes, -(-spec.nproc // max(1, spec.gpus_per_node))))


class Launcher(Protocol):
    name: str

    def launch(self, spec: LaunchSpec) -> LaunchResult: ...


class ChainLauncher(Launcher, Protocol):
    """A launcher whose scheduler chains jobs itself (Slurm's afterok): the executor hands it every
    distributed task of the run at once instead of one at a time (docs/graph.md, section 4)."""

    def active_jobs(self, run_dir: Path) -> dict[str, dict]: ...  # task id -> {"job_id", "hash", "plan", "after", "state", "reason"}

    def submit_chain(self, specs: list[LaunchSpec], after: Mapping[str, list[str]], existing: Mapping[str, str],
                     run_dir: Path) -> dict[str, str]: ...  # task id -> job id

    def follow_chain(self, specs: list[LaunchSpec], job_ids: Mapping[str, str], on_end, *, on_start=None,
                     owned=()) -> None: ...  # on_end(task_id, LaunchResult); Ctrl-C cancels `owned` job ids

    def cancel(self, job_ids) -> list[str]: ...


def get_launcher(name: str, *, cluster) -> Launcher:
    """Build the launcher called `name` for `cluster` (a ClusterSpec)."""
    target = LAUNCHERS.get(name)
    if target is None:
        raise LauncherError(f"unknown launcher {name!r} (known: {', '.join(sorted(LAUNCHERS))})")
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise LauncherError(f"launcher {name!r} is not available in this installation ({module_name} is missing)") from None
        raise
    cls = getattr(module, attr, None)
    if cls is None:
        raise LauncherError(f"launcher {name!r} is not available yet ({module_name} has no {attr})")
    return cls(cluster=cluster)
