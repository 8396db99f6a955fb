"""The executor: runs a runtime graph's tasks in topological order inside a run directory.

Input:  a compiled `Plan`, its `RuntimeGraph` and a `RunDir`.
Output: every task done (or cached), `status.json` kept current (atomic writes) and `DONE.json` per task.
Behaviour (docs/graph.md, section 5):
* A task whose directory has `DONE.json` for the same hash is skipped and says so:
  `✓ prepare:web  cached (hash 3f2a1b0c)`.
* A task runs in its own directory, kept across re-runs of the same hash (training resumes from its
  checkpoints) and moved aside to `<dir>.prev-<old hash>` (never deleted) when the hash changed.
* The first failure stops the run: the task is marked `failed` with the failing rank's last lines; the
  tasks after it are `skipped`. Exit status 143 of a distributed task is `preempted` (resumable).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nemoc.compiler.graph import RuntimeGraph, Task
from nemoc.compiler.plan import Plan, to_json
from nemoc.runtime.rundir import RunDir, atomic_write_json, atomic_write_text, read_json
from nemoc.runtime.tasks import TaskContext, TaskError, get_kind

STATUS_VERSION = 1
TERMINAL = ("done", "cached")


@dataclass
class TaskOutcome:
    task_id: str
    state: str  # done | cached | failed | preempted | skipped | pending (dry run: would run)
    hash: str
    elapsed_s: float = 0.0
    error: str = ""


@dataclass
class RunOutcome:
    run_dir: Path
    tasks: list[TaskOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.state in TERMINAL or t.state == "pending" for t in self.tasks)  # pending: dry run

    def states(self) -> dict[str, str]:
        return {t.task_id: t.state for t in self.tasks}


class Status:
    """status.json: one record per task, rewritten atomically at every transition."""

    def __init__(self, run_dir: RunDir, plan: Plan, graph: RuntimeGraph) -> None:
        self.path = run_dir.status_path
        old = read_json(self.path) or {}
        old_tasks = old.get("tasks", {}) if isinstance(old.get("tasks"), dict) else {}
        self.data = {
            "version": STATUS_VERSION,
            "experiment": plan.experiment,
            "started": time.time(),
            "finished": None,
            "order": [t.id for t in graph.tasks()],  # the JSON keys are sorted; this keeps execution order
            "tasks": {},
        }
        for task in graph.tasks():
            stage = plan.stage(task.stage) if task.stage else None
            previous = old_tasks.get(task.id)
            keep = previous if isinstance(previous, dict) and previous.get("hash") == task.hash else {}
            self.data["tasks"][task.id] = {
                "state": "pending",
                "hash": task.hash,
                "kind": task.kind,
                "steps_total": stage.steps if stage else None,
                "started": keep.get("started"),
                "finished": keep.get("finished"),
                "elapsed_s": keep.get("elapsed_s"),
                "error": "",
            }
        self.write()

    def set(self, task_id: str, **fields: object) -> None:
        self.data["tasks"][task_id].update(fields)
        self.write()

    def finish(self) -> None:
        self.data["finished"] = time.time()
        self.write()

    def write(self) -> None:
        atomic_write_json(self.path, self.data)


class Executor:
    def __init__(
        self,
        plan: Plan,
        graph: RuntimeGraph,
        run_dir: RunDir,
        *,
        launcher: object | None = None,
        echo: Callable[[str], None] = print,
        options: Mapping[str, object] | None = None,
    ) -> None:
        self.plan, self.graph, self.run_dir = plan, graph, run_dir
        self.launcher = launcher
        self.echo = echo
        self.options = dict(options or {})

    # ----------------------------------------------------------------------------------- public
    def write_artifacts(self) -> None:
        """plan.json and graph.json, so the run directory describes itself."""
        atomic_write_text(self.run_dir.plan_path, to_json(self.plan))
        atomic_write_text(self.run_dir.graph_path, self.graph.to_json())

    def dry_run(self) -> RunOutcome:
        """What `run` would do, without doing it: cached tasks and tasks that would run."""
        outcome = RunOutcome(self.run_dir.root)
        missing = set(self.missing_kinds())
        for task in self.graph.tasks():
            if task.kind in missing:
                self.echo(f"✗ {task.id:<24} no runner for task kind {task.kind!r} in this installation")
                outcome.tasks.append(TaskOutcome(task.id, "failed", task.hash, error=f"no runner for {task.kind!r}"))
                continue
            cached = self.run_dir.is_done(task.id, task.hash)
            state = "cached" if cached else "pending"
            self.echo(f"{'✓' if cached else '·'} {task.id:<24} {'cached' if cached else 'would run'} (hash {task.short_hash})")
            outcome.tasks.append(TaskOutcome(task.id, state, task.hash))
        return outcome

    def missing_kinds(self) -> list[str]:
        """Task kinds of this graph that no registered runner handles (checked before anything starts)."""
        from nemoc.runtime.tasks import known_kinds

        known = set(known_kinds())
        return sorted({t.kind for t in self.graph.tasks() if t.kind not in known})

    def run(self) -> RunOutcome:
        missing = self.missing_kinds()
        if missing:
            raise TaskError(f"this installation has no runner for task kind(s) {', '.join(missing)} "
                            f"(known: {', '.join(sorted(set(known_kinds_list())))}); nothing was started")
        with self.run_dir.lock():
            return self._run_locked()

    def _run_locked(self) -> RunOutcome:
        self.write_artifacts()
        status = Status(self.run_dir, self.plan, self.graph)
        outcome = RunOutcome(self.run_dir.root)
        failed = False
        try:
            for task in self.graph.tasks():
                if failed:
                    status.set(task.id, state="skipped")
                    outcome.tasks.append(TaskOutcome(task.id, "skipped", task.hash))
                    continue
                result = self._run_task(task, status)
                outcome.tasks.append(result)
                failed = result.state not in TERMINAL
        except KeyboardInterrupt:
            running = [t for t, rec in status.data["tasks"].items() if rec["state"] == "running"]
            for task_id in running:
                status.set(task_id, state="interrupted", error="interrupted (Ctrl-C)")
            raise
        finally:
            status.finish()
        return outcome

    # ----------------------------------------------------------------------------------- one task
    def _run_task(self, task: Task, status: Status) -> TaskOutcome:
        if self.run_dir.is_done(task.id, task.hash):
            self.echo(f"✓ {task.id:<24} cached (hash {task.short_hash})")
            status.set(task.id, state="cached")
            return TaskOutcome(task.id, "cached", task.hash)
        out_dir, moved = self.run_dir.claim(task.id, task.hash)
        note = f"  (settings changed: previous output moved to {moved.name})" if moved else ""
        resumed = "  (resuming)" if (out_dir / "checkpoints" / "latest").exists() else ""
        self.echo(f"▶ {task.id:<24} running (hash {task.short_hash}){note}{resumed}")
        started = time.time()
        status.set(task.id, state="running", started=started, finished=None, error="")
        try:
            state, payload, error = self._execute(task, out_dir)
        except TaskError as exc:
            state, payload, error = "failed", None, str(exc)
        except (ValueError, OSError) as exc:  # DataError / TokenizerError / unreadable files: user-facing
            state, payload, error = "failed", None, str(exc)
        elapsed = time.time() - started
        if state == "done":
            self.run_dir.mark_done(task.id, task.hash, payload)
            self.echo(f"✓ {task.id:<24} done in {elapsed:.1f} s")
        elif state == "preempted":
            self.echo(f"⏸ {task.id:<24} preempted after {elapsed:.1f} s; its checkpoint is kept, `nemoc run` again resumes it")
        else:
            self.echo(f"✗ {task.id:<24} failed after {elapsed:.1f} s\n{_indent(error)}")
        status.set(task.id, state=state, finished=time.time(), elapsed_s=round(elapsed, 3), error=error)
        return TaskOutcome(task.id, state, task.hash, elapsed, error)

    def _context(self, task: Task, out_dir: Path) -> TaskContext:
        inputs = {}
        for artifact in self.graph.inputs(task.id):
            record = self.run_dir.done_record(artifact.src) or {}
            inputs[artifact.src] = dict(record, artifact=artifact.type, name=artifact.name)
        def log(line: str) -> None:  # the console, and the task's own log.txt
            self.echo(f"  {line}")
            with open(out_dir / "log.txt", "a", encoding="utf-8") as f:
                f.write(line + "\n")

        return TaskContext(task=task, plan=self.plan, plan_path=self.run_dir.plan_path, run_dir=self.run_dir,
                           out_dir=out_dir, inputs=inputs, launcher=self.launcher, log=log, options=self.options)

    def _execute(self, task: Task, out_dir: Path) -> tuple[str, dict | None, str]:
        kind = get_kind(task.kind)
        ctx = self._context(task, out_dir)
        if kind.run_inline is not None:
            return "done", kind.run_inline(ctx), ""
        return self._launch(kind, ctx)

    def _launch(self, kind, ctx: TaskContext) -> tuple[str, dict | None, str]:
        from nemoc.runtime.launchers import LaunchSpec
        from nemoc.runtime.tasks.training import base_task_json

        if self.launcher is None:
            raise TaskError(f"{ctx.task.id}: no launcher to start a distributed task")
        task_json = base_task_json(ctx)
        if kind.build_task is not None:
            task_json = kind.build_task(ctx, task_json)
        task_path = ctx.out_dir / "task.json"
        atomic_write_json(task_path, task_json)
        (ctx.out_dir / "DONE.json").unlink(missing_ok=True)  # only the task itself may write it, on success
        nproc = kind.nproc(ctx) if kind.nproc else ctx.stage.layout.world_size
        cluster = self.plan.cluster
        spec = LaunchSpec(task_id=ctx.task.id, module=kind.module, args=(str(task_path),), nproc=nproc,
                          out_dir=ctx.out_dir, log_path=ctx.out_dir / "log.txt", nodes=cluster.nodes,
                          gpus_per_node=cluster.gpus_per_node, env=dict(self.options.get("env", {})),
                          options=dict(cluster.scheduler_options))
        try:
            result = self.launcher.launch(spec)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a scheduler/cluster problem (sbatch, kubectl, ...) fails the task
            return "failed", None, f"launcher {getattr(self.launcher, 'name', '?')!r} could not run the task: {exc}"
        if result.preempted:
            return "preempted", None, "preempted (exit 143); resumable"
        if not result.ok:
            # no rank named: a cluster launcher's submission / job failure, or a rank torchrun did not name
            who = f"rank {result.failed_rank}" if result.failed_rank is not None else "the task"
            return "failed", None, (f"{who} failed (exit {result.returncode}); last lines:\n{result.error_tail}\n"
                                    f"full log: {spec.log_path}")
        done = read_json(ctx.out_dir / "DONE.json")
        if done is None:
            return "failed", None, f"the task exited 0 but wrote no DONE.json in {ctx.out_dir}"
        for key, source in (("tokenizer", "tokenizer"), ("vocab_size", "vocab_size"), ("eod", "eod_id")):
            done.setdefault(key, task_json.get(source))  # downstream stages without datasets inherit them
        return "done", done, ""


def known_kinds_list() -> list[str]:
    from nemoc.runtime.tasks import known_kinds

    return known_kinds()


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def load_status(run_dir: str | Path) -> dict | None:
    return read_json(Path(run_dir) / "status.json")


def last_metrics(path: str | Path) -> dict | None:
    """The last complete per-step record of a metrics.jsonl (event lines such as checkpoints are skipped)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record and "event" not in record:
            return record
    return None
