"""`nemoc graph`, `nemoc run` and `nemoc status`.

    nemoc graph FILE [--format json|dot|mermaid]
    nemoc run FILE [--workdir DIR] [--launcher local|slurm|k8s] [--dry-run] [--workers N] [--detach]
    nemoc status RUN_DIR [--json]

Exit codes (as every command): 0 success; 1 diagnostics, a graph error or a failed / preempted task;
2 usage error or an unreadable file; 130 interrupted with Ctrl-C (every started process is torn down).
Heavy modules (torch, Megatron-Core) are imported only by the tasks that need them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import click

from nemoc.runtime.cli_common import EXIT_DIAGNOSTICS, EXIT_USAGE, common_options, fail_on, load_spec, \
    missing_train_modules

EXIT_INTERRUPTED = 130


def _compile(file: str, sets: tuple[str, ...], as_json: bool):
    """FILE -> (Plan, RuntimeGraph); diagnostics and graph errors exit here."""
    from nemoc.compiler.graph import GraphError, build_graph
    from nemoc.compiler.planner import plan_experiment
    from nemoc.runtime.target import default_target
    from nemoc.dsl.diagnostics import DiagnosticError

    try:
        spec, _ = load_spec(file, sets)
        plan = plan_experiment(spec, target=default_target()).plan
    except DiagnosticError as error:
        fail_on(error, as_json)
    try:
        return plan, build_graph(plan)
    except GraphError as error:
        _die(f"error: {error}", as_json)


def _die(message: str, as_json: bool, code: int = EXIT_DIAGNOSTICS):
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        click.echo(message, err=True)
    sys.exit(code)


@click.command()
@click.argument("file")
@click.option("--format", "fmt", type=click.Choice(["json", "dot", "mermaid"]), default="json", show_default=True)
@common_options
def graph(file: str, fmt: str, sets: tuple[str, ...], as_json: bool) -> None:
    """Print the runtime graph of FILE: tasks, the artifacts between them, and their content hashes."""
    _, runtime_graph = _compile(file, sets, as_json)
    fmt = "json" if as_json else fmt
    text = {"json": runtime_graph.to_json, "dot": runtime_graph.to_dot, "mermaid": runtime_graph.to_mermaid}[fmt]()
    click.echo(text, nl=False)


def _refuse_unloaded_hf_init(plan, as_json: bool) -> None:
    """W156 made a refusal before anything starts: a stage whose `init = hf(DIR)` the runtime would
    convert but not load would otherwise train from random weights or fail after data preparation."""
    from nemoc.compiler.graph import stage_init
    from nemoc.runtime.target import NEMOC_RUNTIME

    for stage in plan.stages:
        start = stage_init(plan, stage)
        if start and not NEMOC_RUNTIME.caps(stage.kind).hf_init:
            _die(f"error: stage `{stage.name}` ({stage.kind}) starts from init = hf({start!r}), which this runtime "
                 f"converts but does not load into {stage.kind} stages yet (W156; docs/huggingface.md)\n"
                 "  = hint: start it `after` a stage with a checkpoint; an export-only experiment converts the "
                 "checkpoint", as_json)


@click.command()
@click.argument("file")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<experiment> under the current directory).")
@click.option("--launcher", "launcher_name", default=None,
              help="local | slurm | k8s (default: the cluster block's scheduler). With slurm, data preparation "
                   "runs here, then every training task is submitted at once as sbatch jobs chained with afterok, "
                   "and `nemoc run` follows them to the end (Ctrl-C cancels them; --detach leaves them to Slurm). "
                   "With k8s, one PyTorchJob per task, one at a time in graph order. Running again caches "
                   "finished tasks and attaches to jobs still queued or running.")
@click.option("--dry-run", is_flag=True,
              help="Show which tasks would run and which are cached; start nothing. With the slurm or k8s "
                   "launcher, also write each distributed task's sbatch script (tasks/<id>/job.sbatch) or "
                   "PyTorchJob manifest (tasks/<id>/pytorchjob.yaml, all in k8s/manifests.yaml) into the run "
                   "directory and print their paths; nothing is submitted.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Data-preparation worker processes (default: one per CPU core).")
@click.option("--detach", is_flag=True,
              help="slurm: return once the chain of jobs is submitted, without following it; `nemoc status`, "
                   "`nemoc logs` and `nemoc cancel` work on the run directory, and the jobs need no `nemoc run` "
                   "alive.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Run every point of a sweep (repeatable: the cartesian product), each in its own run directory "
                   "under --workdir (default runs/<experiment>): sweep-tensor=2/, ... indexed by sweep.json, "
                   "which `nemoc status` lists.")
@common_options
def run(file: str, workdir: str | None, launcher_name: str | None, dry_run: bool, workers: int | None,
        detach: bool, sweeps: tuple[str, ...], sets: tuple[str, ...], as_json: bool) -> None:
    """Compile FILE and execute its runtime graph; finished tasks with unchanged inputs are cached."""
    if sweeps:
        from nemoc.runtime.sweep import run_sweep

        passthrough = [*(("--launcher", launcher_name) if launcher_name else ()),
                       *(("--workers", str(workers)) if workers else ()), *(("--detach",) if detach else ())]
        run_sweep(file, sweeps, sets, workdir, passthrough, dry_run, as_json)
        return
    from nemoc.runtime.executor import Executor
    from nemoc.runtime.launchers import LauncherError, get_launcher
    from nemoc.runtime.rundir import RunDir, default_run_dir
    from nemoc.runtime.tasks import TaskError

    plan, runtime_graph = _compile(file, sets, as_json)
    if not dry_run:
        _refuse_unloaded_hf_init(plan, as_json)
    missing = [] if dry_run else missing_train_modules()
    if missing:
        _die(f"error: `nemoc run` executes the graph on Megatron-Core, which this installation lacks "
             f"({', '.join(missing)} not importable)\n  = hint: pip install 'nemoc[train]' (on a CPU machine, "
             "`pip install torch==2.13.0` first)", as_json, EXIT_USAGE)
    run_dir = RunDir(workdir if workdir else default_run_dir(plan.experiment))
    echo = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    name = launcher_name or plan.cluster.scheduler
    if name == "local" and not dry_run:  # the tasks run here: a sink they cannot open fails now, not mid-run
        from nemoc.runtime.tracking import missing

        if (problem := missing(plan.tracking)) is not None:
            _die(f"error: {file}: {problem}", as_json, EXIT_USAGE)
    if detach and name != "slurm":
        _die(f"error: --detach needs the slurm launcher (this run uses {name!r}): a {name} run is followed by "
             "`nemoc run` itself", as_json, EXIT_USAGE)
    if not dry_run or name in ("slurm", "k8s"):  # a dry run writes only the cluster launchers' files
        _make_run_dir(run_dir.root, as_json)
    launcher, written = None, None
    try:
        if dry_run:
            written = _write_cluster_files(name, plan, runtime_graph, run_dir)
        else:
            launcher = get_launcher(name, cluster=plan.cluster)
    except LauncherError as error:
        _die(f"error: {error}", as_json, EXIT_USAGE)
    except OSError as error:  # the sbatch scripts / manifests could not be written
        _die(f"error: {_os_error(error)}", as_json)
    executor = Executor(plan, runtime_graph, run_dir, launcher=launcher, echo=echo, options={"workers": workers, "detach": detach})
    echo(f"run directory: {run_dir.root}")
    started = time.time()
    _sigterm_as_interrupt()
    import contextlib

    # With --json, stdout carries only the final JSON: progress (ours, the ranks') goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with quiet:
            outcome = executor.dry_run() if dry_run else executor.run()
    except TaskError as error:
        _die(f"error: {error}", as_json)
    except OSError as error:  # the run directory itself (status.json, a task's directory): full, gone, read-only
        _die(f"error: {_os_error(error)}", as_json)
    except KeyboardInterrupt as interrupt:
        from nemoc.runtime.launchers import Hangup

        if isinstance(interrupt, Hangup) and name == "slurm":
            click.echo(f"\nhangup: stopped; Slurm jobs already submitted keep running (`nemoc status "
                       f"{run_dir.root}`; `nemoc run` again follows them)", err=True)
        elif name == "slurm":
            click.echo("\ninterrupted: the Slurm jobs this command submitted were cancelled (jobs it only followed "
                       "keep running); `nemoc run` again resumes", err=True)
        else:
            click.echo("\ninterrupted: every started process was stopped; `nemoc run` again resumes", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if written is not None:
        what = "sbatch script" if name == "slurm" else "PyTorchJob manifest"
        echo(f"wrote {len(written)} {what}{'s' * (len(written) != 1)} (nothing submitted):")
        for path in written:
            echo(f"  {path}")
    if as_json:
        result = {"run_dir": str(run_dir.root), "ok": outcome.ok, "tasks": [
            {"id": t.task_id, "state": t.state, "hash": t.hash, "elapsed_s": round(t.elapsed_s, 3), "error": t.error,
             **({"job_id": t.job_id} if t.job_id else {})} for t in outcome.tasks]}
        if written is not None:
            result["written"] = [str(p) for p in written]
        click.echo(json.dumps(result, indent=2))
    elif not dry_run:
        counts = {}
        for t in outcome.tasks:
            counts[t.state] = counts.get(t.state, 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        click.echo(f"{'ok' if outcome.ok else 'FAILED'}: {summary} in {time.time() - started:.1f} s "
                   f"(nemoc status {run_dir.root})")
        if counts.get("queued"):
            click.echo(f"detached: the queued jobs run without this command; `nemoc status {run_dir.root}` shows "
                       f"their progress, `nemoc logs` their output, `nemoc cancel` stops them")
    if not outcome.ok:
        sys.exit(EXIT_DIAGNOSTICS)


def _make_run_dir(root: Path, as_json: bool) -> None:
    """Create the run directory up front: a --workdir that cannot be one is a usage error (exit 2)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in (root, *root.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            reason = f"{blocker} is a file, not a directory"
        else:
            reason = error.strerror if error.filename == str(root) and error.strerror else _os_error(error)
        _die(f"error: cannot create the run directory {root}: {reason} (--workdir)", as_json, EXIT_USAGE)


def _os_error(error: OSError) -> str:
    """`Not a directory: /a/b` rather than `[Errno 20] Not a directory: '/a/b'`."""
    if error.strerror and error.filename:  # filename2: the target of a failed rename (status.json, not its .tmp)
        return f"{error.strerror}: {error.filename2 or error.filename}"
    return error.strerror or str(error)


def _write_cluster_files(name: str, plan, runtime_graph, run_dir) -> list[Path] | None:
    """`--dry-run` on a cluster launcher: the files it would submit, written (not submitted); None for
    `local`. Raises LauncherError for an unknown launcher or bad scheduler options."""
    from nemoc.runtime.launchers import LAUNCHERS, LauncherError

    if name == "slurm":
        from nemoc.runtime.launch_slurm import write_scripts

        return write_scripts(plan, runtime_graph, run_dir)
    if name == "k8s":
        from nemoc.runtime.launch_k8s import write_manifests

        return write_manifests(plan, runtime_graph, run_dir)
    if name not in LAUNCHERS:
        raise LauncherError(f"unknown launcher {name!r} (known: {', '.join(sorted(LAUNCHERS))})")
    return None


def _sigterm_as_interrupt() -> None:
    """SIGTERM (kill, a scheduler's time limit) and SIGHUP (the terminal closed, an ssh session dropped) take
    the Ctrl-C path, so launched processes are torn down: by default SIGHUP would end `nemoc run` alone and
    leave torchrun (a session of its own) training, unseen, while a second `nemoc run` could start."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    from nemoc.runtime.launchers import Hangup

    def handler(signum, frame):
        raise KeyboardInterrupt

    def hangup(signum, frame):  # local processes stop as on Ctrl-C; Slurm jobs keep running
        raise Hangup

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup it stays ignored
        signal.signal(signal.SIGHUP, hangup)


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
def status(run_dir: str, as_json: bool) -> None:
    """Summarise a run directory: each task's state, hash, steps, last loss and timings (of a sweep: its points)."""
    from nemoc.runtime.sweep import load_index, print_sweep_status

    sweep_index = load_index(run_dir)
    if sweep_index is not None:
        print_sweep_status(run_dir, sweep_index, as_json)
        return
    rows = status_rows(run_dir)
    if rows is None:
        _die(f"error: {run_dir}: not a nemoc run directory (no readable status.json, or not one nemoc wrote)",
             as_json, EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({"run_dir": str(Path(run_dir).resolve()), "tasks": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(Path(run_dir).resolve()), title_justify="left")
    jobs = any(row.get("job_id") for row in rows)
    for column in ("task", "state", "hash", *(("job",) if jobs else ()), "steps", "last loss", "tokens/s", "elapsed"):
        table.add_column(column, justify="right" if column in ("steps", "last loss", "tokens/s", "elapsed") else "left")
    for row in rows:
        steps = "" if not row["steps_total"] else f"{row['steps_done'] or 0}/{row['steps_total']}"
        job = (row.get("job_id") or "",) if jobs else ()
        table.add_row(row["id"], str(row["state"]), str(row["hash"])[:8], *job, steps, _fmt(row["last_loss"], "{:.4f}"),
                      _fmt(row["tokens_per_s"], "{:,.0f}"), _fmt(row["elapsed_s"], "{:.1f} s"))
    Console(width=max(100, Console().width)).print(table)
    for row in rows:
        if row["error"]:
            click.echo(f"\n{row['id']} failed:\n{row['error']}")
    held = [f"  {row['id']}: " + ", ".join(f"{k} {_fmt(v.get('before'), '{:.4g}') + ' -> ' if v.get('before') is not None else ''}"
                                          f"{_fmt(v['after'], '{:.4g}')}" for k, v in row["held_out"].items())
            for row in rows if row.get("held_out")]
    if held:
        click.echo("\nheld-out metrics (before -> after the stage):\n" + "\n".join(held))
    stale = [row["id"] for row in rows if row.get("stale")]
    if stale:
        click.echo(f"\nnote: the `nemoc run` that was running {', '.join(stale)} is gone (killed?), so "
                   f"{'it is' if len(stale) == 1 else 'they are'} shown as interrupted: `nemoc cancel {run_dir}` "
                   "stops any leftover process, `nemoc run` again resumes")


def _fmt(value, pattern: str) -> str:
    if value is None:
        return ""
    try:
        return pattern.format(value)
    except (TypeError, ValueError):  # a hand-edited or damaged file: show the value as it is
        return str(value)


def status_rows(run_dir: str | Path) -> list[dict] | None:
    """One row per task of a run directory's status.json, with progress from its metrics.jsonl."""
    from nemoc.runtime.executor import last_metrics, load_status
    from nemoc.runtime.rundir import RunDir

    data = load_status(run_dir)
    tasks = data.get("tasks") if data is not None else None
    if not isinstance(tasks, dict) or not all(isinstance(rec, dict) for rec in tasks.values()):
        return None  # missing, or damaged past reading: not the shape the executor writes
    rd = RunDir(run_dir)
    jobs = _slurm_jobs(Path(run_dir), tasks)
    # status.json says "running" but the `nemoc run` that writes it is gone (SIGKILL, a crash, disk full):
    # nothing runs that task any more (runtime/procs.py: its recorded pid and start time)
    orphaned = not data.get("finished") and any(rec.get("state") == "running" for rec in tasks.values()) \
        and not rd.holder_alive()
    rows = []
    order = data.get("order")
    order = [t for t in order if isinstance(t, str) and t in tasks] if isinstance(order, list) else []
    order += sorted(t for t in tasks if t not in order)
    for task_id in order:
        rec = data["tasks"][task_id]
        task_dir = rd.task_dir(task_id)
        metrics = last_metrics(task_dir / "metrics.jsonl") or {}
        done = rd.done_record(task_id) or {}
        steps_done = metrics.get("step")
        if done.get("hash") == rec.get("hash") and done.get("steps") is not None:
            steps_done = done["steps"]
        state, job_id = rec.get("state", "?"), None
        stale = False
        if task_id in jobs:
            job_id = jobs[task_id]["job_id"]
            state = _live_state(state, jobs[task_id], done.get("hash") == rec.get("hash"))
        elif state == "running" and orphaned:
            state, stale = "interrupted", True
        rows.append({
            "id": task_id,
            "state": state,
            "job_id": job_id,
            "hash": rec.get("hash", ""),
            "steps_done": steps_done,
            "steps_total": rec.get("steps_total"),
            "last_loss": metrics.get("loss", done.get("final_loss")),
            "tokens_per_s": metrics.get("tokens_per_s"),
            "elapsed_s": rec.get("elapsed_s"),
            "error": rec.get("error", ""),
            "held_out": held_out_metrics(done) if done.get("hash") == rec.get("hash") else None,
            **({"stale": True} if stale else {}),
        })
    return rows


def held_out_metrics(done: Mapping) -> dict | None:
    """The held-out metrics an alignment stage's DONE.json reports, as {name: {"before", "after"}}: SFT's
    response loss, DPO's / ORPO's preference (implicit-reward) and likelihood accuracy, KTO's reward AUC
    (desirable over undesirable held-out examples), GRPO's mean held-out reward, a reward model's pair
    accuracy, eval's per-dataset perplexity and preference accuracy."""
    out: dict[str, dict] = {}
    if isinstance(done.get("val_response_loss"), (int, float)):
        out["response_loss"] = {"before": done.get("val_response_loss_before"), "after": done["val_response_loss"]}
    val, before = done.get("val"), done.get("val_before")
    before = before if isinstance(before, dict) else {}
    if isinstance(val, dict):
        for key, name in (("reward_accuracy", "preference_accuracy"), ("accuracy", "pair_accuracy"),
                          ("likelihood_accuracy", "likelihood_accuracy"), ("reward_auc", "reward_auc"),
                          ("reward", "reward")):
            if isinstance(val.get(key), (int, float)):
                out[name] = {"before": before.get(key), "after": val[key]}
    datasets = done.get("datasets")
    if isinstance(datasets, dict):
        for name, m in sorted(datasets.items()):
            for key in ("perplexity", "likelihood_accuracy", "preference_accuracy", "reward_margin", "accuracy"):
                if isinstance(m, dict) and isinstance(m.get(key), (int, float)):
                    out[f"{name}.{key}"] = {"before": None, "after": m[key]}
    return out or None


# Slurm job states as task states (squeue's long names; `nemoc status` of a run whose jobs outlive `nemoc run`)
_SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED",
                 "PREEMPTED", "RESIZING", "SIGNALING", "STAGE_OUT"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING"}


def _slurm_jobs(root: Path, tasks: Mapping[str, dict]) -> dict[str, dict]:
    """slurm.json's task -> {"job_id", "hash", "live": squeue's {"JobState", "Reason"} or None}, for the
    tasks recorded with the job's hash; {} when there is none or Slurm is not reachable from here. One
    squeue call for the whole run; if it fails, the recorded states are shown."""
    import shutil

    if not (root / "slurm.json").is_file() or shutil.which("squeue") is None:
        return {}
    from nemoc.runtime import launch_slurm

    try:
        jobs = launch_slurm.read_record(root).get("jobs") or {}
    except launch_slurm.SlurmError:
        return {}
    jobs = {task: {"job_id": str(rec["job_id"]), "hash": str(rec.get("hash", ""))} for task, rec in jobs.items()
            if task in tasks and str(rec.get("hash", "")) in ("", tasks[task].get("hash"))}
    try:
        live = launch_slurm.job_states(job["job_id"] for job in jobs.values())
    except launch_slurm.SlurmError:
        return {task: dict(job, live=None, unanswered=True) for task, job in jobs.items()}
    return {task: dict(job, live=live.get(job["job_id"], {})) for task, job in jobs.items()}


def _live_state(recorded: str, job: Mapping, done: bool) -> str:
    """The task's state from its job when `nemoc run` is not following it (detached, killed, or it gave
    up following): a job that is queued or running is shown so whatever status.json recorded."""
    if done:
        return recorded if recorded in ("done", "cached") else "done"
    if job.get("unanswered"):
        return recorded
    state, reason = job["live"].get("JobState", ""), job["live"].get("Reason", "")
    if state in _SLURM_QUEUED:
        return f"queued ({reason})" if reason not in ("", "None") else "queued"
    if state in _SLURM_RUNNING:
        return "running"
    if recorded not in ("queued", "running", "pending", "interrupted"):
        return recorded
    if state == "COMPLETED":
        return "failed (job completed without DONE.json)"
    if state:
        return f"failed ({state.lower()})" if state != "CANCELLED" else "cancelled"
    return recorded if recorded != "queued" else "failed (job gone from Slurm without DONE.json)"
