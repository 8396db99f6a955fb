"""`nemoc report RUN_DIR [-o FILE.html]`: the plan's pictures plus what the run measured, as one HTML file.

Reads the run directory (runtime.rundir): `plan.json`, `status.json` (task states; `nemoc status`'s
rows), and per task `task.json` (which stage), `metrics.jsonl` (runtime.metrics.read_records: complete
lines only, so a run in progress or a crashed one renders what it logged), `DONE.json` and an eval
stage's `results.json`. Writes RUN_DIR/report.html unless `-o` says otherwise (atomically). Exit 0:
written; 2: not a run directory (no readable plan.json) or an unwritable output. Never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nemoc.runtime.cli.common import EXIT_OK, EXIT_USAGE


def write_html(path: str | Path, plan, *, headroom: float = 0.10, results=None, top: int = 3, run=None) -> None:
    """Render `plan` (and a run) and write it atomically; an unwritable path is a one-line error, exit 2."""
    from nemoc.runtime.atomic import atomic_write_text
    from nemoc.runtime.html_report import plan_html

    page = plan_html(plan, headroom=headroom, results=results, top=top, run=run)
    try:
        atomic_write_text(path, page)
    except OSError as exc:
        click.echo(f"error: cannot write {path}: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_USAGE)


def read_run(run_dir: str | Path, plan):
    """`RunData` of a run directory: task states in graph order, and per stage of `plan` its task's
    metrics records, DONE payload and eval results (whatever exists so far). Without a readable
    status.json (a damaged or hand-copied run), the task directories themselves are read."""
    from nemoc.runtime.orchestrate.status import status_rows
    from nemoc.runtime.html_report import RunData, StageRun
    from nemoc.runtime.metrics import read_records
    from nemoc.runtime.orchestrate.rundir import RunDir, read_json

    rd = RunDir(run_dir)
    rows = status_rows(run_dir) or []
    found = [(rd.task_dir(r["id"]), r["id"], str(r["state"])) for r in rows]
    known = {d.name for d, _, _ in found}
    tasks_root = rd.root / "tasks"
    if tasks_root.is_dir():
        found += [(d, d.name, "unknown (not in status.json)") for d in sorted(tasks_root.iterdir())
                  if d.is_dir() and d.name not in known]
    stages: dict[str, StageRun] = {}
    names = {s.name for s in plan.stages}
    for task_dir, task_id, state in found:
        task = read_json(task_dir / "task.json") or {}
        stage = task.get("stage") or task_id.partition(":")[2]
        if stage not in names or stage in stages:
            continue
        stages[stage] = StageRun(task=task_id, state=state, records=tuple(read_records(task_dir / "metrics.jsonl")),
                                 results=read_json(task_dir / "results.json"), done=read_json(task_dir / "DONE.json"))
    return RunData(root=str(rd.root), stages=stages, tasks=tuple((r["id"], str(r["state"])) for r in rows))


def load_run_plan(run_dir: str | Path):
    """The plan of a run directory, or a one-line error (exit 2) naming the file."""
    from nemoc.compiler.plan import from_json

    path = Path(run_dir) / "plan.json"
    try:
        return from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        click.echo(f"error: {run_dir}: not a nemoc run directory (no {path.name}; `nemoc run` writes it)", err=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        click.echo(f"error: {path}: unreadable plan ({type(exc).__name__}: {exc})", err=True)
    sys.exit(EXIT_USAGE)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Where to write the HTML (default: RUN_DIR/report.html).")
@click.option("--headroom", type=float, default=0.10, show_default=True,
              help="The memory budget line, as a fraction of capacity kept free (as in `nemoc plan`).")
def report(run_dir: str, output: str | None, headroom: float) -> None:
    """Write one self-contained HTML file: the plan's pictures, the run's curves, predicted vs measured."""
    if not Path(run_dir).is_dir():
        click.echo(f"error: {run_dir}: no such run directory", err=True)
        sys.exit(EXIT_USAGE)
    plan = load_run_plan(run_dir)
    out = output or str(Path(run_dir) / "report.html")
    write_html(out, plan, headroom=headroom, run=read_run(run_dir, plan))
    click.echo(f"report written to {out}")
    sys.exit(EXIT_OK)
