"""The run directory: where a run's plan, graph, status, data, logs, metrics and checkpoints live.

    runs/<experiment>/                 (default under the cwd; `--workdir DIR` replaces it)
      plan.json  graph.json  status.json
      plans/plan-<digest>.json         the plan as each task was started with (task.json names it)
      tokenizers/local/                tokenizer:local (the BPE trained on the corpus)
      data/<name>/                     prepare:<name> (any data name: data/ holds nothing else)
      tasks/<task id, ':' -> '_'>/     task.json log.txt ranks/ metrics.jsonl tensorboard/ checkpoints/ DONE.json

Every JSON file is written atomically (`*.tmp` then `os.replace`), so a reader never sees half a file and
a crash never leaves a truncated marker. A task is done iff its directory has a `DONE.json` whose `hash`
is the task's current hash (docs/graph.md, section 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path

from nemoc.runtime.atomic import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)

DONE = "DONE.json"
RELATIVE = "relative"  # DONE.json: key -> the path (or paths) relative to the run directory
OUTPUTS = "outputs"  # DONE.json: file relative to the task directory -> {"size", "sha256", "digest"}
FULL_DIGEST_BYTES = 64 << 20  # files up to this size are digested whole; larger ones by size, head and tail
SAMPLE_BYTES = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None if it is missing or unreadable (e.g. written by a crashed run)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def safe_name(task_id: str) -> str:
    """A task id as a directory name: `train:pretrain` -> `train_pretrain`."""
    return _UNSAFE.sub("_", task_id)


def default_run_dir(experiment: str, cwd: str | os.PathLike | None = None) -> Path:
    return Path(cwd or os.getcwd()) / "runs" / safe_name(experiment)


class RunDir:
    """Paths inside one run directory (absolute)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    @property
    def graph_path(self) -> Path:
        return self.root / "graph.json"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    def plan_snapshot(self, text: str) -> Path:
        """The plan `text` under `plans/plan-<digest>.json` (written once, never changed).
        task.json names this file, not plan.json: a job queued by Slurm reads the plan it was submitted
        with even after a later `nemoc run` rewrote plan.json."""
        import hashlib

        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        path = self.root / "plans" / f"plan-{digest}.json"
        if not path.exists():
            atomic_write_text(path, text)
        return path

    @contextlib.contextmanager
    def lock(self, *, echo=None):
        """Hold the run directory for one `nemoc run` at a time (an flock, released if the process dies),
        and record this process under `procs/` (runtime/orchestrate/procs.py) for `nemoc status` and `nemoc cancel`.

        A lock still held although the `nemoc run` named in it is gone (a process it forked inherited
        the open file and outlives it) is stale: it is cleared (the file replaced) with a message on
        `echo`. A lock whose holder runs refuses with its pid."""
        from nemoc.runtime.orchestrate import procs
        from nemoc.runtime.orchestrate.tasks import TaskError

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        for attempt in range(2):
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                handle.close()
                if attempt or self.holder_alive():
                    raise TaskError(f"another `nemoc run` (pid {holder}) is using {self.root}; wait for it or "
                                    "use --workdir") from None
                (echo or print)(f"note: the `nemoc run` (pid {holder}) that locked {self.root} is gone, but a "
                                "process it started still holds the lock; clearing the stale lock")
                path.unlink(missing_ok=True)
        with handle:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            procs.clear_dead(self.root)  # a killed predecessor's record: read by `nemoc status` until now
            mine = procs.record(self.root, "launcher")
            try:
                yield
            finally:
                mine.unlink(missing_ok=True)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def holder_alive(self) -> bool:
        """False when the `nemoc run` that last held this directory is gone, e.g. killed with SIGKILL: its
        status.json may still say running, but nothing will update it. Read from its process record
        (pid and start time, runtime/orchestrate/procs.py); for a run directory without one, from the pid in `.lock`.
        True while it runs, and when unknown (no record, no readable `.lock`)."""
        from nemoc.runtime.orchestrate import procs

        recorded = procs.launcher_alive(self.root)
        if recorded is not None:
            return recorded
        import psutil

        try:
            pid = int((self.root / ".lock").read_text().strip())
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except (OSError, ValueError):
            return True
        except psutil.NoSuchProcess:  # gone (a zombie included)
            return False
        except psutil.Error:  # AccessDenied: it exists
            return True

    def task_dir(self, task_id: str) -> Path:
        """Where a task writes. Prepared data sets live under data/, one directory per data name and
        nothing else there, so any data name (`tokenizer` included) is free; the run's tokenizer has
        its own tokenizers/<name>/. A run directory from before this layout keeps its trained tokenizer
        in data/tokenizer/ (recognised by the task its DONE.json names) and goes on using it."""
        kind, _, name = task_id.partition(":")
        if kind == "tokenizer":
            directory = self.root / "tokenizers" / safe_name(name)
            legacy = self.root / "data" / "tokenizer"
            if name == "local" and not directory.exists() and (read_json(legacy / DONE) or {}).get("task") == task_id:
                return legacy
            return directory
        if kind == "prepare":
            return self.root / "data" / safe_name(name)
        return self.root / "tasks" / safe_name(task_id)

    def done_record(self, task_id: str) -> dict | None:
        """The task's DONE.json, its paths inside the run directory resolved against where the run
        directory is now (a moved or copied run directory reads its own files). A record written
        before paths were recorded relative is returned as it is."""
        record = read_json(self.task_dir(task_id) / DONE)
        if record is None or not isinstance(record.get(RELATIVE), dict):
            return record
        for key, rel in record[RELATIVE].items():
            if isinstance(rel, str):
                record[key] = str(self.root / rel)
            elif isinstance(rel, list) and all(isinstance(r, str) for r in rel):
                record[key] = [str(self.root / r) for r in rel]
        return record

    def is_done(self, task_id: str, task_hash: str) -> bool:
        """DONE.json has this hash and every output it records is there with its recorded digest."""
        record = self.done_record(task_id)
        return record is not None and record.get("hash") == task_hash and self.outputs_problem(task_id) is None

    def outputs_problem(self, task_id: str) -> str | None:
        """What is wrong with the outputs the task's DONE.json records (missing, other size or digest),
        None when they match (or the record, written before outputs were recorded, names none)."""
        record = read_json(self.task_dir(task_id) / DONE) or {}
        outputs = record.get(OUTPUTS)
        if not isinstance(outputs, dict):
            return None
        task_dir = self.task_dir(task_id)
        for rel, expected in sorted(outputs.items()):
            path = task_dir / rel
            if not isinstance(expected, dict):
                return f"{path}: damaged record in DONE.json"
            try:
                found = file_digest(path)
            except FileNotFoundError:
                return f"{path} is missing"
            except OSError as exc:
                return f"{path} is unreadable ({exc.strerror})"
            if found["size"] != expected.get("size"):
                return f"{path} changed (size {found['size']} bytes, {expected.get('size')} recorded)"
            if found["sha256"] != expected.get("sha256"):
                return f"{path} changed (content digest differs from the one recorded)"
        return None

    def mark_done(self, task_id: str, task_hash: str, payload: dict) -> dict:
        """Write DONE.json: `payload`, the identity, the run-directory-relative form of every path
        inside the run directory (under "relative"), and the size and digest of every output inside the
        task's directory that the payload names (under "outputs": files, every file of a directory, a
        data set prefix's .bin and .idx). The absolute paths stay as they were for readers that take
        DONE.json as it is (a chained Slurm job reads its parent's)."""
        task_dir = self.task_dir(task_id)
        record = {k: v for k, v in payload.items() if k not in (RELATIVE, OUTPUTS)}
        record.update(hash=task_hash, task=task_id, finished=time.time())
        relative, outputs = {}, {}
        for key, value in payload.items():
            paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
            inside = [self._relative(p) for p in paths if isinstance(p, str)]
            if inside and all(r is not None for r in inside) and len(inside) == len(paths):
                relative[key] = inside[0] if isinstance(value, str) else inside
            for path in paths:
                if isinstance(path, str):
                    for file in _output_files(Path(path), task_dir):
                        outputs[file.relative_to(task_dir).as_posix()] = file_digest(file)
        if relative:
            record[RELATIVE] = relative
        if outputs:
            record[OUTPUTS] = outputs
        atomic_write_json(task_dir / DONE, record)
        return record

    def _relative(self, value: str) -> str | None:
        """`value` relative to the run directory (posix), if it is an absolute path inside it."""
        if not value.startswith("/"):
            return None
        try:
            return Path(os.path.normpath(value)).relative_to(self.root).as_posix()
        except ValueError:
            return None

    def claim(self, task_id: str, task_hash: str) -> tuple[Path, Path | None]:
        """Prepare a task's directory for a (re-)run with `task_hash`.

        A directory left by the same hash (an interrupted run) is kept, so training resumes from its
        checkpoints; one left by another hash is moved aside to `<dir>.prev-<its hash>` (never
        deleted: finished work survives any number of setting changes). Returns (directory, where the
        previous output was moved, or None).
        """
        directory = self.task_dir(task_id)
        owner = directory / "HASH"
        previous = owner.read_text().strip() if owner.is_file() else None
        moved = None
        if directory.exists() and previous != task_hash and any(directory.iterdir()):
            moved = _free_name(directory.with_name(f"{directory.name}.prev-{previous or 'unknown'}"))
            os.replace(directory, moved)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(owner, task_hash + "\n")
        return directory, moved


def _output_files(path: Path, task_dir: Path) -> list[Path]:
    """The files a DONE payload's path stands for, if it lies inside `task_dir`: the file, every file of
    a directory, or a data set prefix's `.bin` and `.idx`."""
    try:
        Path(os.path.normpath(path)).relative_to(task_dir)
    except ValueError:
        return []
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [p for p in (path.with_name(path.name + ".bin"), path.with_name(path.name + ".idx")) if p.is_file()]


def file_digest(path: Path) -> dict:
    """{"size", "sha256", "digest"}: a sha256 of the whole file up to FULL_DIGEST_BYTES ("full"); above,
    of its size, first and last SAMPLE_BYTES ("sampled": cheap for a data set of many GB; it catches a
    deleted, truncated, extended or replaced file, not a change in the middle). Raises OSError."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= FULL_DIGEST_BYTES:
            while block := f.read(1 << 20):
                digest.update(block)
            return {"size": size, "sha256": digest.hexdigest(), "digest": "full"}
        digest.update(str(size).encode())
        digest.update(f.read(SAMPLE_BYTES))
        f.seek(size - SAMPLE_BYTES)
        digest.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sha256": digest.hexdigest(), "digest": "sampled"}


def _free_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ... : the first that does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
