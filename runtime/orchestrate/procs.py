"""The processes a run started, recorded at launch and verified before anything signals them.

Every process nemoc starts for a run leaves one record (`procs/<role>-<pid>.json`, written atomically):

    <run>/procs/launcher-<pid>.json          the `nemoc run` that holds the run directory
    <task dir>/procs/torchrun-<pid>.json     the local launcher's torchrun (a session of its own)
    <task dir>/procs/rank-<pid>.json         each rank (written by runtime/orchestrate/rank_guard.py as it starts)

A record is {"pid", "pgid", "start", "uid", "role"}; `start` is the process's start time in clock ticks
since boot (/proc/PID/stat, field 22). A record is *live* only while a process with that pid exists,
started at that very tick, belongs to the same user and is not a zombie: a recycled pid, a process of
another user or an unrelated process that merely names the run's files (`tail -f task.json`) is never
taken for ours. `nemoc cancel`, the leftover-rank check before a launch and `nemoc status`'s
"interrupted" all read these records and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from nemoc.runtime.atomic import atomic_write_json

PROCS = "procs"


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time, clock ticks after boot), None if there is no such process.
    The command name (field 2) may hold spaces and parentheses: fields are counted after its last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    try:  # fields[0] is field 3 (state): field 22 is fields[19]
        return int(fields[19]) if fields[0] != b"Z" else None
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcRecord:
    pid: int
    pgid: int
    start: int
    uid: int
    role: str  # launcher | torchrun | rank
    path: Path | None = None  # the record's file

    def live(self) -> bool:
        """This very process still runs (same pid, same start tick, same user, not a zombie)."""
        if self.start != start_ticks(self.pid):
            return False
        try:
            return os.stat(f"/proc/{self.pid}").st_uid == self.uid
        except OSError:
            return False

    @property
    def leads_group(self) -> bool:
        return self.pgid == self.pid

    def signal(self, sig: int, *, group: bool = False) -> bool:
        """Send `sig` to the process (or its whole group when it leads one it was started to lead),
        re-verified just before; False when it is gone or no longer the recorded process."""
        if not self.live():
            return False
        try:
            if group and self.leads_group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def record(directory: str | os.PathLike, role: str, pid: int | None = None) -> Path:
    """Record process `pid` (default: this one) under `directory/procs/`. Raises OSError."""
    pid = os.getpid() if pid is None else pid
    start = start_ticks(pid)
    if start is None:
        raise ProcessLookupError(f"process {pid} is gone")
    path = Path(directory) / PROCS / f"{role}-{pid}.json"
    atomic_write_json(path, {"pid": pid, "pgid": os.getpgid(pid), "start": start, "uid": os.getuid(), "role": role})
    return path


def read(directory: str | os.PathLike) -> list[ProcRecord]:
    """Every readable record under `directory/procs/` (damaged files are skipped)."""
    records = []
    for path in sorted(Path(directory, PROCS).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records.append(ProcRecord(int(data["pid"]), int(data["pgid"]), int(data["start"]), int(data["uid"]),
                                      str(data["role"]), path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def live(directory: str | os.PathLike, roles: tuple[str, ...] | None = None) -> list[ProcRecord]:
    return [r for r in read(directory) if (roles is None or r.role in roles) and r.live()]


def clear_dead(directory: str | os.PathLike) -> None:
    """Remove the records of processes that have ended (a task directory about to be launched again)."""
    for rec in read(directory):
        if not rec.live() and rec.path is not None:
            rec.path.unlink(missing_ok=True)


def task_dirs(root: str | os.PathLike) -> list[Path]:
    """The task directories of a run that hold process records."""
    root = Path(root)
    return sorted({p.parent.parent for p in root.glob(f"*/*/{PROCS}/*.json")})


def launcher_alive(root: str | os.PathLike) -> bool | None:
    """Whether the `nemoc run` recorded in `root/procs/` still runs: None when none is recorded."""
    records = [r for r in read(root) if r.role == "launcher"]
    if not records:
        return None
    return any(r.live() for r in records)


def set_parent_death_signal(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Linux: deliver `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG). If the parent
    died before the call (the child was reparented), act on it at once. Elsewhere: nothing."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
