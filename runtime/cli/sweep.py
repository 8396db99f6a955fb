"""Sweeps: `--sweep KEY=V1,V2,...` (repeatable) on `nemoc plan` and `nemoc run`.

Input:  the `--sweep` strings (each a `--set` path and a comma-separated list of values, written in the
        language's value syntax) and the command's own `--set` overrides.
Output: the points of the cartesian product of the axes, in command-line order (the last axis varies
        fastest), each a tuple of `KEY=VALUE` overrides applied after the command's `--set`s; for
        `nemoc plan` a table (or a JSON list) of every point planned; for `nemoc run` one run directory
        per point under the sweep's directory, with `sweep.json` indexing them for `nemoc status`.
Invariants: a point is compiled exactly as `--set KEY=VALUE` would compile it (same checks, same
diagnostics); a point that breaks a rule or does not fit is a row that says why, not the end of the
sweep; `nemoc run` checks and plans every point before it starts any, and runs each point as its own
`nemoc run --workdir POINT_DIR` process, so each point's cache, status and logs are its own.

    nemoc plan FILE --sweep parallel.tensor=2,4,8 --sweep parallel.micro_batch=1,2
    nemoc run FILE --sweep stage.pretrain.optimizer.lr=1e-4,3e-4     # runs/<experiment>/sweep-lr=1e-4/ ...
    nemoc status runs/<experiment>                                   # lists the points
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

INDEX = "sweep.json"
MAX_POINTS = 1000  # far more than anyone plans by hand; keeps a typo (`1,2,...` pasted twice) from running for hours
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_OPEN, _CLOSE = "([", ")]"


@dataclass(frozen=True, slots=True)
class Axis:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Point:
    """One combination: ((key, value as written), ...) in axis order."""

    settings: tuple[tuple[str, str], ...]

    @property
    def sets(self) -> tuple[str, ...]:
        return tuple(f"{k}={v}" for k, v in self.settings)

    def as_dict(self) -> dict[str, str]:
        return dict(self.settings)

    def label(self, short: dict[str, str]) -> str:
        """`tensor=2,micro_batch=4`: each key by its short name (see `short_names`)."""
        return ",".join(f"{short[k]}={v}" for k, v in self.settings)

    def dirname(self, short: dict[str, str]) -> str:
        """`sweep-tensor=2`; a value with characters unfit for a path gets a digest so names stay unique."""
        label = self.label(short)
        safe = _UNSAFE.sub("_", label)
        if safe != label or len(safe) > 80:
            digest = hashlib.sha256(label.encode()).hexdigest()[:8]
            safe = f"{safe[:60]}-{digest}"
        return f"sweep-{safe}"


# ----------------------------------------------------------------------------------------- parsing


def split_values(text: str) -> list[str]:
    """`2,4,8` -> ["2", "4", "8"]; commas inside brackets, parentheses or strings do not split:
    `adam(lr = 1e-4, eps = 1e-6),sgd(lr = 0.1)` is two values."""
    values, depth, start, quoted, escaped = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if quoted:
            quoted, escaped = (ch != '"' or escaped), (ch == "\\" and not escaped)
        elif ch == '"':
            quoted = True
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_axes(texts: Iterable[str]) -> tuple[Axis, ...]:
    """The `--sweep` strings as axes; raises click.BadParameter (exit 2) naming the bad one."""
    axes: list[Axis] = []
    for text in texts:
        key, eq, rest = text.partition("=")
        key = key.strip()
        if not eq or not key:
            raise click.BadParameter(f"`{text}` is not KEY=V1,V2,... (e.g. parallel.tensor=2,4,8)",
                                     param_hint="'--sweep'")
        values = split_values(rest)
        if any(not v for v in values):
            raise click.BadParameter(f"`{text}` has an empty value (values are separated by single commas)",
                                     param_hint="'--sweep'")
        if key in {a.key for a in axes}:
            raise click.BadParameter(f"`{key}` is swept twice; give all its values in one --sweep",
                                     param_hint="'--sweep'")
        axes.append(Axis(key, tuple(dict.fromkeys(values))))
    return tuple(axes)


def points_of(axes: Sequence[Axis]) -> list[Point]:
    count = 1
    for axis in axes:
        count *= len(axis.values)
    if count > MAX_POINTS:
        sizes = " x ".join(str(len(a.values)) for a in axes)
        raise click.BadParameter(f"{sizes} = {count} points; a sweep may have at most {MAX_POINTS}",
                                 param_hint="'--sweep'")
    combos = itertools.product(*[[(a.key, v) for v in a.values] for a in axes])
    return [Point(tuple(c)) for c in combos]


def short_names(axes: Sequence[Axis]) -> dict[str, str]:
    """Each key by its last segment (`tensor`), or the whole path where two axes share a last segment."""
    last = [a.key.rsplit(".", 1)[-1] for a in axes]
    return {a.key: (s if last.count(s) == 1 else a.key) for a, s in zip(axes, last)}


# -------------------------------------------------------------------------------------- nemoc plan


@dataclass(frozen=True)
class Planned:
    """One point planned: the `PlanResult`, or the diagnostics that stopped it (and their sources)."""

    point: Point
    result: object | None
    diagnostics: tuple
    sources: dict


def plan_point(file: str, sets: tuple[str, ...], point: Point, headroom: float, top: int) -> Planned:
    from dataclasses import replace

    from nemoc.compiler.planner import plan_experiment
    from nemoc.runtime.target import default_target
    from nemoc.dsl.diagnostics import DiagnosticError
    from nemoc.runtime.cli.common import load_spec_with_warnings

    try:
        spec, sources, warnings = load_spec_with_warnings(file, sets + point.sets)
    except DiagnosticError as err:
        return Planned(point, None, err.diagnostics, err.sources)
    try:
        result = plan_experiment(spec, headroom=headroom, top=top, target=default_target())
    except DiagnosticError as err:
        return Planned(point, None, tuple(err.diagnostics), sources)
    return Planned(point, replace(result, warnings=tuple(warnings) + result.warnings), (), sources)


def plan_sweep(file: str, sweeps: tuple[str, ...], sets: tuple[str, ...], headroom: float, top: int,
               as_json: bool) -> None:
    """`nemoc plan --sweep`: plan every point, print them side by side; exit 0 if any point planned."""
    from nemoc.runtime.cli.common import EXIT_DIAGNOSTICS, EXIT_OK, EXIT_USAGE, is_usage_error, print_diagnostics

    axes = parse_axes(sweeps)
    points = points_of(axes)
    planned = [plan_point(file, sets, p, headroom, max(top + 1, 2)) for p in points]
    if all(p.result is None for p in planned) and is_usage_error(planned[0].diagnostics):
        print_diagnostics(planned[0].diagnostics, planned[0].sources, as_json)  # the file itself is unreadable
        sys.exit(EXIT_USAGE)
    if as_json:
        click.echo(json.dumps([_point_json(p, headroom, top) for p in planned], indent=2))
    else:
        _print_table(file, axes, planned)
    sys.exit(EXIT_OK if any(p.result is not None for p in planned) else EXIT_DIAGNOSTICS)


def _point_json(p: Planned, headroom: float, top: int) -> dict:
    from nemoc.dsl.diagnostics import to_json
    from nemoc.runtime.cli.plan_json import report_json

    return {"point": p.point.as_dict(), "sets": list(p.point.sets), "ok": p.result is not None,
            "plan": report_json(p.result, headroom, top) if p.result is not None else None,
            "diagnostics": [to_json(d) for d in p.diagnostics]}


def why(diagnostics) -> str:
    """One line for a point that did not plan: the first error, its equation and hint."""
    from nemoc.dsl.diagnostics import sort_key

    errors = sorted((d for d in diagnostics if d.is_error), key=sort_key) or list(diagnostics)
    if not errors:
        return "no plan"
    d = errors[0]
    text = f"error[{d.code}]: {d.message}"
    if d.equation:
        text += f"; {d.equation}"
    if d.hint:
        text += f"; hint: {d.hint}"
    more = len(errors) - 1
    return text + (f" (+{more} more error{'s' * (more != 1)})" if more else "")


def _print_table(file: str, axes, planned: list[Planned]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from nemoc.compiler.search import describe
    from nemoc.runtime.display import GIB

    short = short_names(axes)
    table = Table(title=f"{file}: {len(planned)} sweep point{'s' * (len(planned) != 1)}", title_justify="left",
                  header_style="bold")
    for key in short.values():
        table.add_column(key, justify="right")
    for name in ("stage", "layout", "memory GiB", "step", "tokens/s/GPU", "MFU", "cost", "status"):
        table.add_column(name, justify="left" if name in ("stage", "layout", "status") else "right",
                         no_wrap=name != "status", overflow="fold")
    for p in planned:
        values = [v for _, v in p.point.settings]
        if p.result is None:
            table.add_row(*values, "", "", "", "", "", "", "", f"[red]{escape(why(p.diagnostics))}[/]")
            table.add_section()
            continue
        codes = sorted({d.code for d in p.result.warnings})
        ok = "[green]ok[/]" + (f" [yellow](warnings: {', '.join(codes)})[/]" if codes else "")
        for i, sp in enumerate(p.result.plan.stages):
            e, m = sp.estimate, sp.memory
            cost = f"${e.cost_usd:,.0f}" if e.cost_usd is not None else "-"
            table.add_row(*(values if i == 0 else [""] * len(values)), sp.name, describe(sp.layout),
                          f"{m.total / GIB:.1f} / {m.capacity / GIB:.1f}", f"{e.step_time_s:.3g} s",
                          f"{e.tokens_per_s_per_gpu:,.0f}", f"{e.mfu:.1%}", cost, ok if i == 0 else "")
        table.add_section()
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    console.print(table)
    best = _best(planned)
    if best is not None:
        console.print(f"fastest: {best.point.label(short)} "
                      f"({sum(s.estimate.wall_time_s for s in best.result.plan.stages) / 3600:.1f} h wall time)")


def _best(planned: list[Planned]) -> Planned | None:
    ok = [p for p in planned if p.result is not None]
    return min(ok, key=lambda p: sum(s.estimate.wall_time_s for s in p.result.plan.stages), default=None)


# --------------------------------------------------------------------------------------- nemoc run


def run_sweep(file: str, sweeps: tuple[str, ...], sets: tuple[str, ...], workdir: str | None,
              passthrough: list[str], dry_run: bool, as_json: bool) -> None:
    """`nemoc run --sweep`: check and plan every point, then run each in its own run directory."""
    from nemoc.runtime.cli.common import EXIT_DIAGNOSTICS, print_diagnostics
    from nemoc.runtime.orchestrate.rundir import default_run_dir

    axes = parse_axes(sweeps)
    points = points_of(axes)
    short = short_names(axes)
    experiment = None
    for point in points:  # every point must compile before any starts
        problem, experiment = _compile_point(file, sets, point)
        if problem is not None:
            click.echo(f"error: sweep point {point.label(short)} does not compile; nothing was started", err=True)
            if isinstance(problem, str):
                click.echo(problem, err=True)
            else:
                print_diagnostics(*problem, as_json)
            sys.exit(EXIT_DIAGNOSTICS)
    root = Path(workdir) if workdir else default_run_dir(experiment)
    entries = [{"dir": p.dirname(short), "settings": p.as_dict(), "sets": list(p.sets)} for p in points]
    index = {"version": 1, "file": os.path.abspath(file), "experiment": experiment, "sets": list(sets),
             "axes": [{"key": a.key, "values": list(a.values)} for a in axes], "points": entries}
    if not dry_run:
        _write_index(root, index, as_json)
    outcomes = []
    for point, entry in zip(points, entries):
        label = point.label(short)
        click.echo(f"sweep point {label}: {root / entry['dir']}", err=True)
        argv = [sys.executable, "-m", "nemoc.runtime.cli", "run", file, "--workdir", str(root / entry["dir"]),
                *passthrough, *(("--dry-run",) if dry_run else ()), *(("--json",) if as_json else ()),
                *[a for s in sets + point.sets for a in ("--set", s)]]
        code, output = _run_point(argv, as_json)
        entry["exit_code"] = code
        if not dry_run:
            _write_index(root, index, as_json)
        outcomes.append({"point": point.as_dict(), "dir": str(root / entry["dir"]), "exit_code": code,
                         **({"result": output} if as_json else {})})
        if code == 130:
            click.echo(f"interrupted at sweep point {label}; the points after it were not started", err=True)
            sys.exit(130)
        if code == 2:  # a usage error (--detach without slurm, an unusable --workdir) fails every point alike
            click.echo(f"error: sweep point {label} was refused (exit 2); the points after it were not started",
                       err=True)
            sys.exit(2)
    failed = [o for o in outcomes if o["exit_code"] != 0]
    if as_json:
        click.echo(json.dumps({"sweep_dir": str(root.resolve()), "ok": not failed, "points": outcomes}, indent=2))
    else:
        click.echo(f"sweep {'ok' if not failed else 'FAILED'}: {len(outcomes) - len(failed)} of {len(outcomes)} "
                   f"points succeeded (nemoc status {root})")
    if failed:
        sys.exit(EXIT_DIAGNOSTICS)


def _compile_point(file: str, sets: tuple[str, ...], point: Point):
    """(None, experiment name) when the point checks, plans and builds its graph; else (what to print:
    (diagnostics, sources) or an error line, None)."""
    from nemoc.compiler.graph import GraphError, build_graph
    from nemoc.compiler.planner import plan_experiment
    from nemoc.runtime.target import default_target
    from nemoc.dsl.diagnostics import DiagnosticError
    from nemoc.runtime.cli.common import load_spec

    sources = {}
    try:
        spec, sources = load_spec(file, sets + point.sets)
        plan = plan_experiment(spec, target=default_target()).plan
        build_graph(plan)
    except DiagnosticError as err:
        return (err.diagnostics, err.sources or sources), None
    except GraphError as err:
        return f"error: {err}", None
    return None, plan.experiment


def _write_index(root: Path, index: dict, as_json: bool) -> None:
    from nemoc.runtime.atomic import atomic_write_json

    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / INDEX, index)
    except OSError as error:
        message = f"error: cannot write the sweep index {root / INDEX}: {error.strerror or error}"
        click.echo(json.dumps({"error": message}) if as_json else message, err=not as_json)
        sys.exit(2)


def _run_point(argv: list[str], as_json: bool) -> tuple[int, object]:
    """Run one point's `nemoc run` in its own session; Ctrl-C, SIGTERM and SIGHUP are passed on to it
    once, and it tears its processes down as a plain `nemoc run` does. Returns (exit code, its --json)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if as_json else None, start_new_session=True)
    forwarded = {}

    def forward(signum, frame):
        if signum not in forwarded and proc.poll() is None:
            forwarded[signum] = True
            proc.send_signal(signum)

    import threading

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    old = {s: signal.signal(s, forward) for s in handled} if main else {}
    try:
        out, _ = proc.communicate()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    if forwarded and code != 0:
        code = 130
    try:
        parsed = json.loads(out) if as_json and out else None
    except ValueError:
        parsed = None
    return code, parsed


# ------------------------------------------------------------------------------------ nemoc status


def load_index(run_dir: str | Path) -> dict | None:
    from nemoc.runtime.orchestrate.rundir import read_json

    data = read_json(Path(run_dir) / INDEX)
    if data is None or not isinstance(data.get("points"), list):
        return None
    return data


def sweep_rows(run_dir: str | Path, index: dict) -> list[dict]:
    """One row per point: its settings, directory, task states and the last training loss."""
    from nemoc.runtime.orchestrate.status import status_rows

    rows = []
    for entry in index["points"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("dir"), str):
            continue
        tasks = status_rows(Path(run_dir) / entry["dir"])
        states: dict[str, int] = {}
        for t in tasks or ():
            states[str(t["state"])] = states.get(str(t["state"]), 0) + 1
        losses = [t["last_loss"] for t in tasks or () if t.get("last_loss") is not None]
        rows.append({"dir": entry["dir"], "settings": entry.get("settings", {}), "exit_code": entry.get("exit_code"),
                     "states": states, "last_loss": losses[-1] if losses else None, "tasks": tasks})
    return rows


def print_sweep_status(run_dir: str, index: dict, as_json: bool) -> None:
    rows = sweep_rows(run_dir, index)
    if as_json:
        click.echo(json.dumps({"sweep_dir": str(Path(run_dir).resolve()), "points": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{Path(run_dir).resolve()}: sweep of {len(rows)} points", title_justify="left")
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    for column in (*keys, "directory", "tasks", "last loss"):
        table.add_column(column, justify="right" if column == "last loss" else "left")
    for r in rows:
        states = ", ".join(f"{n} {s}" for s, n in sorted(r["states"].items())) if r["tasks"] is not None \
            else "not started"
        loss = "" if r["last_loss"] is None else f"{r['last_loss']:.4f}" if isinstance(r["last_loss"], float) \
            else str(r["last_loss"])
        table.add_row(*[str(r["settings"].get(k, "")) for k in keys], r["dir"], states, loss)
    Console(width=max(100, Console().width)).print(table)
    click.echo(f"each point: nemoc status {Path(run_dir) / '<directory>'}")
