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
* With a chain launcher (Slurm) the inline tasks run here first, then every distributed task is
  submitted at once, chained along the graph (`_run_chain`); task.json of a task whose parents have not
  run yet names them under `upstream` (runtime/taskfile.py). With `detach`, `run` returns once the
  chain is submitted (tasks `queued`); otherwise it follows the jobs to their end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nemoc.compiler.graph import RuntimeGraph, Task
from nemoc.compiler.plan import Plan, to_json
from nemoc.runtime import taskfile
from nemoc.runtime.orchestrate.rundir import RunDir, atomic_write_json, atomic_write_text, read_json
from nemoc.runtime.orchestrate.tasks import TaskContext, TaskError, get_kind

STATUS_VERSION = 1
TERMINAL = ("done", "cached")
SUBMITTED = ("pending", "queued")  # not failed: a dry run's "would run", a detached chain's queued job


@dataclass
class TaskOutcome:
    task_id: str
    state: str  # done | cached | failed | preempted | skipped | pending (dry run: would run) | queued (detached)
    hash: str
    elapsed_s: float = 0.0
    error: str = ""
    job_id: str | None = None  # the scheduler's job (chain launchers)


@dataclass
class RunOutcome:
    run_dir: Path
    tasks: list[TaskOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.state in TERMINAL or t.state in SUBMITTED for t in self.tasks)

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
        self.plan_text = to_json(plan)
        self.plan_file = run_dir.plan_path  # the snapshot, once written
        self._digests: dict[str | None, str] = {}
        self._live: dict[str, str] = {}  # chain: task id -> job id of a job that runs whatever this command does

    # ----------------------------------------------------------------------------------- public
    def write_artifacts(self) -> None:
        """plan.json and graph.json, so the run directory describes itself, and the plan snapshot that
        this run's task.json files name (`RunDir.plan_snapshot`)."""
        atomic_write_text(self.run_dir.plan_path, self.plan_text)
        atomic_write_text(self.run_dir.graph_path, self.graph.to_json())
        self.plan_file = self.run_dir.plan_snapshot(self.plan_text)

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
        from nemoc.runtime.orchestrate.tasks import known_kinds

        known = set(known_kinds())
        return sorted({t.kind for t in self.graph.tasks() if t.kind not in known})

    def run(self) -> RunOutcome:
        missing = self.missing_kinds()
        if missing:
            raise TaskError(f"this installation has no runner for task kind(s) {', '.join(missing)} "
                            f"(known: {', '.join(sorted(set(known_kinds_list())))}); nothing was started")
        with self.run_dir.lock(echo=self.echo):
            return self._run_locked()

    def _run_locked(self) -> RunOutcome:
        chain = callable(getattr(self.launcher, "submit_chain", None))
        active = self._chain_preflight() if chain else {}  # before anything in the run directory changes
        self.write_artifacts()
        status = Status(self.run_dir, self.plan, self.graph)
        try:
            if chain:
                return self._run_chain(status, active)
            return self._run_in_turn(status)
        except KeyboardInterrupt as interrupt:
            from nemoc.runtime.orchestrate.launchers import Hangup

            keep_jobs = chain and isinstance(interrupt, Hangup)  # a hangup leaves the cluster's jobs running
            for task_id, rec in list(status.data["tasks"].items()):
                if rec["state"] in ("running", "queued") and not (keep_jobs and rec.get("job_id")):
                    status.set(task_id, state="interrupted", error="interrupted (Ctrl-C)")
            raise
        except BaseException as exc:  # the run directory itself failed (disk full), or a bug: no task stays "running"
            for task_id, rec in list(status.data["tasks"].items()):
                if rec["state"] == "running":
                    rec.update(state="failed", error=f"stopped by {type(exc).__name__}: {exc}")
            raise
        finally:
            try:
                status.finish()
            except OSError:  # disk full: `nemoc status` reads the dead launcher's "running" as "interrupted"
                pass

    def _run_in_turn(self, status: Status) -> RunOutcome:
        """One task at a time in topological order; the first failure skips the rest."""
        outcome = RunOutcome(self.run_dir.root)
        for task in self.graph.tasks():
            if outcome.tasks and outcome.tasks[-1].state not in TERMINAL:
                return self._skip_rest(outcome, status)
            outcome.tasks.append(self._run_task(task, status))
        return outcome

    # ----------------------------------------------------------------------------------- one task
    def _run_task(self, task: Task, status: Status) -> TaskOutcome:
        if self.run_dir.is_done(task.id, task.hash):
            return self._cached(task, status)
        damaged = self._say_why_not_cached(task)
        out_dir = self._start(task, status)
        started = time.time()
        try:
            state, payload, error = self._execute(task, out_dir)
            if state == "done" and damaged and not damaged.exists():
                state, payload, error = "failed", None, (
                    f"{task.id} ran again because {damaged} was missing, but finished without writing it again: "
                    "its output is still incomplete, so it is not marked done")
        except TaskError as exc:
            state, payload, error = "failed", None, str(exc)
        except (ValueError, OSError) as exc:  # DataError / TokenizerError / unreadable files: user-facing
            state, payload, error = "failed", None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a bug or an input nobody foresaw: the task fails, never "running"
            state, payload, error = "failed", None, _internal_error(exc, out_dir)
        return self._end(task, status, state, payload, error, time.time() - started)

    def _say_why_not_cached(self, task: Task) -> Path | None:
        """A task finished with this hash whose recorded outputs are gone or changed runs again: say so.
        Returns the missing output, which the re-run must write again (else it is not done)."""
        record = self.run_dir.done_record(task.id)
        problem = self.run_dir.outputs_problem(task.id) if record and record.get("hash") == task.hash else None
        if not problem:
            return None
        self.echo(f"↻ {task.id:<24} finished before, but {problem}: running it again")
        return Path(problem[:-len(" is missing")]) if problem.endswith(" is missing") else None

    def _cached(self, task: Task, status: Status) -> TaskOutcome:
        self.echo(f"✓ {task.id:<24} cached (hash {task.short_hash})")
        status.set(task.id, state="cached")
        return TaskOutcome(task.id, "cached", task.hash)

    def _start(self, task: Task, status: Status, *, verb: str = "running") -> Path:
        """Claim the task's directory (moving another hash's output aside), say so, mark it `verb`."""
        out_dir, moved = self.run_dir.claim(task.id, task.hash)
        note = f"  (settings changed: previous output moved to {moved.name})" if moved else ""
        resumed = "  (resuming)" if (out_dir / "checkpoints" / "latest").exists() else ""
        self.echo(f"▶ {task.id:<24} {verb} (hash {task.short_hash}){note}{resumed}")
        status.set(task.id, state=verb, started=time.time(), finished=None, error="")
        return out_dir

    def _end(self, task: Task, status: Status, state: str, payload: dict | None, error: str,
             elapsed: float, job_id: str | None = None) -> TaskOutcome:
        if state == "done":
            self.run_dir.mark_done(task.id, task.hash, payload)
            self.echo(f"✓ {task.id:<24} done in {elapsed:.1f} s")
        elif state == "preempted":
            self.echo(f"⏸ {task.id:<24} preempted after {elapsed:.1f} s; its checkpoint is kept, `nemoc run` again resumes it")
        elif state == "skipped":
            self.echo(f"- {task.id:<24} skipped: {error}")
        else:
            self.echo(f"✗ {task.id:<24} failed after {elapsed:.1f} s\n{_indent(error)}")
        status.set(task.id, state=state, finished=time.time(), elapsed_s=round(elapsed, 3), error=error)
        return TaskOutcome(task.id, state, task.hash, elapsed, error, job_id)

    def _context(self, task: Task, out_dir: Path, inputs: Mapping[str, dict] | None = None) -> TaskContext:
        if inputs is None:
            inputs = dict(self._upstream_inputs(task, {}))
        def log(line: str) -> None:  # the console, and the task's own log.txt
            self.echo(f"  {line}")
            with open(out_dir / "log.txt", "a", encoding="utf-8") as f:
                f.write(line + "\n")

        return TaskContext(task=task, plan=self.plan, plan_path=self.plan_file, run_dir=self.run_dir,
                           out_dir=out_dir, inputs=inputs, launcher=self.launcher, log=log, options=self.options)

    def _execute(self, task: Task, out_dir: Path) -> tuple[str, dict | None, str]:
        kind = get_kind(task.kind)
        ctx = self._context(task, out_dir)
        if kind.run_inline is not None:
            return "done", kind.run_inline(ctx), ""
        return self._launch(kind, ctx)

    def _launch(self, kind, ctx: TaskContext) -> tuple[str, dict | None, str]:
        if self.launcher is None:
            raise TaskError(f"{ctx.task.id}: no launcher to start a distributed task")
        spec, task_json = self._prepare_launch(kind, ctx)
        try:
            result = self.launcher.launch(spec)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a scheduler/cluster problem (sbatch, kubectl, ...) fails the task
            return "failed", None, f"launcher {getattr(self.launcher, 'name', '?')!r} could not run the task: {exc}"
        return self._launch_outcome(spec, task_json, result)

    def _prepare_launch(self, kind, ctx: TaskContext, upstream: Mapping[str, dict] | None = None):
        """Write the task's task.json (with `upstream`: parents that have not run yet, see
        runtime/taskfile.py) and build its LaunchSpec."""
        from nemoc.runtime.orchestrate.tasks.training import base_task_json

        task_json = base_task_json(ctx)
        if kind.build_task is not None:
            task_json = kind.build_task(ctx, task_json)
        if upstream:
            task_json["upstream"] = dict(upstream)
        task_path = ctx.out_dir / "task.json"
        atomic_write_json(task_path, task_json)
        (ctx.out_dir / "DONE.json").unlink(missing_ok=True)  # only the task itself may write it, on success
        (ctx.out_dir / taskfile.FATAL).unlink(missing_ok=True)  # a previous attempt's "cannot succeed"
        return self._spec(kind, ctx), task_json

    def _spec(self, kind, ctx: TaskContext):
        from nemoc.runtime.orchestrate.launchers import LaunchSpec

        from nemoc.runtime.orchestrate.tasks import launch_shape

        nproc, gpus, env = launch_shape(kind, ctx)
        cluster = self.plan.cluster
        return LaunchSpec(task_id=ctx.task.id, module=kind.module, args=(str(ctx.out_dir / "task.json"),), nproc=nproc,
                          out_dir=ctx.out_dir, log_path=ctx.out_dir / "log.txt", nodes=cluster.nodes,
                          gpus_per_node=gpus, env={**self.options.get("env", {}), **env},
                          options=cluster.scheduler_options, task_hash=ctx.task.hash,
                          plan_digest=self._plan_digest(ctx.task))

    def _launch_outcome(self, spec, task_json: Mapping, result) -> tuple[str, dict | None, str]:
        if result.preempted:
            return "preempted", None, "preempted (exit 143); resumable"
        if not result.ok:
            # no rank named: a cluster launcher's submission / job failure, or a rank torchrun did not name
            who = f"rank {result.failed_rank}" if result.failed_rank is not None else "the task"
            return "failed", None, (f"{who} failed (exit {result.returncode}); last lines:\n{result.error_tail}\n"
                                    f"full log: {spec.log_path}")
        done = read_json(Path(spec.out_dir) / "DONE.json")
        if done is None:
            return "failed", None, f"the task exited 0 but wrote no DONE.json in {spec.out_dir}"
        for key, source in (("tokenizer", "tokenizer"), ("vocab_size", "vocab_size"), ("eod", "eod_id")):
            done.setdefault(key, task_json.get(source))  # downstream stages without datasets inherit them
        return "done", done, ""

    # ----------------------------------------------------------------------------------- a whole chain
    def _active_jobs(self) -> dict[str, dict]:
        try:
            return self.launcher.active_jobs(self.run_dir.root)
        except Exception as exc:  # noqa: BLE001 - an unreadable record or scheduler: reported, nothing started
            raise TaskError(f"cannot read this run's jobs from {self.launcher.name}: {exc}; nothing was started") from None

    def _chain_preflight(self) -> dict[str, dict]:
        """The run's jobs that may still run, checked before anything changes: a job of a task whose
        settings (hash) or plan changed since it was submitted stops the run (it would otherwise run
        later with files this run rewrites); jobs of tasks no longer in the graph are named."""
        active = self._active_jobs()
        ids = {task.id: task for task in self.graph.tasks()}
        stale = {t: job for t, job in active.items() if t in ids and
                 (job["hash"] != ids[t].hash or self._recorded_digest(job, ids[t]) != self._plan_digest(ids[t]))}
        if stale:
            jobs = ", ".join(f"{t} (job {job['job_id']}, {job['state'].lower()})" for t, job in sorted(stale.items()))
            raise TaskError(f"the settings or layout of {', '.join(sorted(stale))} changed while {self.launcher.name} "
                            f"still holds their jobs: {jobs}; each would run as submitted, not as edited. Stop them "
                            f"(`scancel {' '.join(job['job_id'] for job in stale.values())}`) or wait for them to "
                            "end, then run again; nothing was started")
        for task_id, job in sorted(active.items()):
            if task_id not in ids:
                self.echo(f"note: {self.launcher.name} job {job['job_id']} of {task_id}, a task no longer in this "
                          f"graph, is still {job['state'].lower()} (`scancel {job['job_id']}` stops it)")
        return {t: job for t, job in active.items() if t in ids}

    def _plan_digest(self, task: Task) -> str:
        """What `task` reads of the plan (runtime/taskfile.py: plan_digest), recorded with its job."""
        if task.stage not in self._digests:
            self._digests[task.stage] = taskfile.plan_digest(self.plan_text, task.stage)
        return self._digests[task.stage]

    def _recorded_digest(self, job: Mapping, task: Task) -> str:
        """The plan digest a job was submitted with; a job recorded without one (submitted before nemoc
        recorded it) reads plan.json, which is what this run would replace."""
        if job.get("plan"):
            return job["plan"]
        try:
            return taskfile.plan_digest(self.run_dir.plan_path.read_text(encoding="utf-8"), task.stage)
        except (OSError, ValueError):
            return ""

    def _run_chain(self, status: Status, active: dict[str, dict]) -> RunOutcome:
        """Inline tasks here, then every distributed task submitted at once (afterok along the graph's
        edges), then followed to the end unless `detach`. A task whose job (same hash, same plan) is
        still queued or running is attached to, not submitted again, if it still waits for the right
        parents; a stale one (its parent is resubmitted, or its dependency can never be met) is
        cancelled and submitted again."""
        outcome = RunOutcome(self.run_dir.root)
        try:
            return self._submit_chain(outcome, status, active)
        except TaskError as exc:  # after the run directory changed: recorded on the task, not "nothing started"
            task_id = getattr(exc, "task_id", None) or next(
                (t.id for t in self.graph.tasks() if t.id not in {o.task_id for o in outcome.tasks}), None)
            if task_id is None:
                raise
            outcome.tasks.append(self._end(self.graph.task(task_id), status, "failed", None, str(exc), 0.0))
            return self._skip_rest(outcome, status)

    def _submit_chain(self, outcome: RunOutcome, status: Status, active: dict[str, dict]) -> RunOutcome:
        chained: dict[str, dict] = {}  # task id -> its task.json (what a downstream task may know before it runs)
        specs, attached, fresh = [], {}, set()
        for task in self.graph.tasks():
            kind = get_kind(task.kind)
            if self.run_dir.is_done(task.id, task.hash):
                outcome.tasks.append(self._cached(task, status))
            elif kind.run_inline is not None:
                waits_for = [a.src for a in self.graph.inputs(task.id) if a.src in chained]
                if waits_for:
                    raise TaskError(f"{task.id} runs in this process but needs {', '.join(waits_for)}, which "
                                    f"{self.launcher.name} runs; this graph cannot be submitted as one chain")
                result = self._run_task(task, status)
                outcome.tasks.append(result)
                if result.state not in TERMINAL:
                    return self._skip_rest(outcome, status)
            elif task.id in active and self._attachable(task, active, attached, fresh):
                job_id = active[task.id]["job_id"]
                self.echo(f"▶ {task.id:<24} already submitted as {self.launcher.name} job {job_id} "
                          f"(hash {task.short_hash}, {active[task.id]['state'].lower()}); following it")
                status.set(task.id, state="queued", error="", job_id=job_id)
                out_dir = self.run_dir.task_dir(task.id)
                attached[task.id] = self._live[task.id] = job_id
                specs.append(self._spec(kind, self._context(task, out_dir, dict(self._upstream_inputs(task, chained)))))
                chained[task.id] = read_json(out_dir / "task.json") or {}
            else:
                out_dir = self._start(task, status, verb="queued")
                try:
                    inputs = self._upstream_inputs(task, chained)
                    ctx = self._context(task, out_dir, dict(inputs))
                    upstream = {rec["name"]: {"task": src, "hash": self.graph.task(src).hash, "init": False,
                                              "done": str(self.run_dir.task_dir(src) / "DONE.json")}
                                for src, rec in inputs if src in chained and rec.get("artifact") == "checkpoint"}
                    first = ctx.stage.after[0] if ctx.stage is not None and ctx.stage.after else None
                    if first in upstream:
                        upstream[first]["init"] = True
                    spec, chained[task.id] = self._prepare_launch(kind, ctx, upstream)
                except (TaskError, ValueError, OSError) as exc:
                    raise _task_failed(task.id, str(exc)) from None
                specs.append(spec)
                fresh.add(task.id)
        still = self._still_attached(attached)
        for task_id in attached.keys() - still.keys():  # finished while data was prepared
            outcome.tasks.append(self._end(self.graph.task(task_id), status, "done", self.run_dir.done_record(task_id),
                                           "", 0.0, job_id=attached[task_id]))
        specs = [spec for spec in specs if spec.task_id in still or spec.task_id not in attached]
        attached = self._live = still
        if not specs:
            return outcome
        new = [spec for spec in specs if spec.task_id not in attached]
        waiting = {spec.task_id for spec in specs}  # a parent that has finished meanwhile is no dependency
        after = {spec.task_id: [a.src for a in self.graph.inputs(spec.task_id) if a.src in waiting] for spec in new}
        try:
            submitted = self.launcher.submit_chain(new, after, attached, self.run_dir.root) if new else {}
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - sbatch refused (bad partition, ...): nothing stays submitted
            raise _task_failed(getattr(exc, "task_id", None) or new[0].task_id,
                               f"could not submit to {self.launcher.name}: {exc}") from None
        job_ids = {**attached, **submitted}
        for task_id, job_id in submitted.items():
            status.set(task_id, state="queued", job_id=job_id)
        if self.options.get("detach"):
            outcome.tasks += [TaskOutcome(spec.task_id, "queued", self.graph.task(spec.task_id).hash,
                                          job_id=job_ids[spec.task_id]) for spec in specs]
            return outcome
        return self._follow_chain(outcome, status, specs, job_ids, chained, owned=set(submitted.values()))

    def _attachable(self, task: Task, active: Mapping[str, dict], attached: Mapping[str, str], fresh: set) -> bool:
        """May the task's still-active job be followed as it is? Not if a parent is submitted anew in this
        run (the job waits for the parent's old job) or its dependency can never be met: then a queued
        job is cancelled here (it could never run) and the task is submitted again."""
        job = active[task.id]
        parents = [a.src for a in self.graph.inputs(task.id)]
        recorded = job.get("after")  # None: a record from before nemoc kept dependencies (not checkable)
        waits_right = not any(p in fresh for p in parents) and \
            (recorded is None or all(attached.get(p) in recorded for p in parents if p in attached))
        # JobHeldUser: left held by a submission that was killed before it released the chain
        if waits_right and job.get("reason") not in ("DependencyNeverSatisfied", "JobHeldUser"):
            return True
        if job["state"] not in ("PENDING", "REQUEUE_HOLD", "REQUEUED"):
            raise TaskError(f"{task.id}: {self.launcher.name} job {job['job_id']} is {job['state'].lower()} although "
                            f"its parent is being submitted again; stop it (`scancel {job['job_id']}`) and run again")
        try:
            self.launcher.cancel([job["job_id"]])
        except Exception as exc:  # noqa: BLE001 - permission denied, a controller timeout
            raise _task_failed(task.id, f"{task.id}: could not cancel its stale {self.launcher.name} job "
                                        f"{job['job_id']} ({exc}); cancel it by hand (`scancel {job['job_id']}`) "
                                        "and run again") from None
        why = ("was left held by an interrupted submission" if job.get("reason") == "JobHeldUser" else
               "waited for a parent job that will not succeed")
        self.echo(f"  {task.id}: cancelled its queued {self.launcher.name} job {job['job_id']}, which {why}; "
                  "submitting it again")
        return False

    def _still_attached(self, attached: Mapping[str, str]) -> dict[str, str]:
        """Attached jobs asked again just before submission (data preparation may have taken hours):
        one that has ended meanwhile with its DONE.json is finished (no dependency on a job Slurm may
        have purged); one that ended without it breaks the chain."""
        if not attached:
            return {}
        now = self._active_jobs()
        still = {}
        for task_id, job_id in attached.items():
            if task_id in now and now[task_id]["job_id"] == job_id:
                still[task_id] = job_id
            elif not self.run_dir.is_done(task_id, self.graph.task(task_id).hash):
                raise _task_failed(task_id, f"its {self.launcher.name} job {job_id} ended without finishing the task "
                                            f"(`nemoc logs {self.run_dir.root} {task_id}`); run again to resubmit it")
        return still

    def _follow_chain(self, outcome: RunOutcome, status: Status, specs, job_ids, task_jsons, *, owned) -> RunOutcome:
        by_id = {spec.task_id: spec for spec in specs}
        started = {task_id: time.time() for task_id in by_id}  # reset when the job starts running
        ended: dict[str, TaskOutcome] = {}
        failed: list[str] = []

        def on_start(task_id: str) -> None:
            started[task_id] = time.time()
            status.set(task_id, state="running", started=started[task_id])

        def on_end(task_id: str, result) -> None:
            task = self.graph.task(task_id)
            state, payload, error = self._launch_outcome(by_id[task_id], task_jsons[task_id], result)
            blocked = [t for t in failed if t in self._ancestors(task_id)]
            if state != "done" and blocked:
                state, error = "skipped", f"{', '.join(blocked)} did not finish"
            if state not in TERMINAL:
                failed.append(task_id)
            ended[task_id] = self._end(task, status, state, payload, error, time.time() - started[task_id],
                                       job_id=job_ids[task_id])

        try:
            self.launcher.follow_chain(specs, job_ids, on_end, on_start=on_start, owned=owned)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the scheduler stopped answering (or a follow timeout)
            for spec in specs:
                if spec.task_id not in ended:
                    ended[spec.task_id] = self._end(self.graph.task(spec.task_id), status, "failed", None,
                                                    f"stopped following {self.launcher.name} job {job_ids[spec.task_id]}: "
                                                    f"{exc}; the job was not cancelled (`nemoc status`, `nemoc run` "
                                                    "again follows it)", time.time() - started[spec.task_id],
                                                    job_id=job_ids[spec.task_id])
        outcome.tasks += [ended[spec.task_id] for spec in specs if spec.task_id in ended]
        return outcome

    def _ancestors(self, task_id: str) -> set[str]:
        seen, todo = set(), [task_id]
        while todo:
            for artifact in self.graph.inputs(todo.pop()):
                if artifact.src not in seen:
                    seen.add(artifact.src)
                    todo.append(artifact.src)
        return seen

    def _upstream_inputs(self, task: Task, chained: Mapping[str, dict]) -> list[tuple[str, dict]]:
        """The task's inputs: DONE records of finished tasks; for a task of this chain that has not run,
        what its task.json promises (tokenizer, vocabulary; the checkpoint comes from `upstream`)."""
        inputs = []
        for artifact in self.graph.inputs(task.id):
            if artifact.src in chained:
                promised = chained[artifact.src]
                record = {"tokenizer": promised.get("tokenizer"), "vocab_size": promised.get("vocab_size"),
                          "eod": promised.get("eod_id"), "checkpoint": None}
            else:
                record = self.run_dir.done_record(artifact.src) or {}
            inputs.append((artifact.src, dict(record, artifact=artifact.type, name=artifact.name)))
        return inputs

    def _skip_rest(self, outcome: RunOutcome, status: Status) -> RunOutcome:
        """Every task without an outcome yet is skipped, except one whose job runs anyway (attached):
        it stays `queued` with its job id, for `nemoc status` to follow."""
        seen = {t.task_id for t in outcome.tasks}
        live = self._live
        for task in self.graph.tasks():
            if task.id in seen:
                continue
            if task.id in live:
                status.set(task.id, state="queued", job_id=live[task.id])
                outcome.tasks.append(TaskOutcome(task.id, "queued", task.hash, job_id=live[task.id]))
            else:
                status.set(task.id, state="skipped")
                outcome.tasks.append(TaskOutcome(task.id, "skipped", task.hash))
        return outcome


def _task_failed(task_id: str, message: str) -> TaskError:
    """A TaskError that fails `task_id` (the chain's one failure path: `_run_chain` records it on the
    task and skips the rest)."""
    error = TaskError(message)
    error.task_id = task_id
    return error


def known_kinds_list() -> list[str]:
    from nemoc.runtime.orchestrate.tasks import known_kinds

    return known_kinds()


def _internal_error(exc: BaseException, out_dir: Path) -> str:
    """The one-line message of an unexpected exception; its traceback goes to the task's log.txt."""
    import traceback

    where = out_dir / "log.txt"
    try:
        with open(where, "a", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(exc)))
    except OSError:
        where = None
    detail = str(exc)[:500] or type(exc).__name__
    return (f"internal error ({type(exc).__name__}): {detail}" +
            (f" (traceback in {where}); please report it" if where else ""))


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
