"""`nemoc plan FILE`: resolve every `auto`, prove the layout fits, estimate time and cost (no GPU).

Prints a readable report (layout, a memory bar against capacity with the breakdown, time and cost
per stage and in total, the runner-up layouts and why the other candidates lost), or with `--json`
the contract other tools rely on:

    {"experiment": str,
     "stages": [{"name", "kind",
                 "layout": {"tp","pp","vp","cp","ep","etp","dp","micro_batch","global_batch",
                            "num_microbatches","sequence_parallel","distributed_optimizer","recompute"},
                 "memory": {"weights","gradients","optimizer","activations","other","total","capacity"},
                 "estimate": {"step_time_s","tokens_per_s_per_gpu","model_tflops_per_gpu","mfu",
                              "steps","wall_time_s","gpu_hours","cost_usd"}}],
     "total": {"wall_time_s","gpu_hours","cost_usd"}}

(memory in bytes per GPU; extra keys may be added, none renamed; `kernels`, top level and per stage,
says which layer kernels the estimates assume: `te` or `local`). `--emit PATH` writes the full
`Plan` (plan.to_json) that `nemoc run` consumes. Exit 0: planned; 1: diagnostics (a broken rule,
or a stage that fits nowhere); 2: usage error. Imports neither torch nor Megatron-Core.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import click

from nemoc.runtime.cli.common import EXIT_OK, EXIT_USAGE, common_options, fail, load_spec_with_warnings, \
    print_diagnostics, write_output
from nemoc.runtime.cli.plan_json import TERMS, report_json, report_json_total
from nemoc.runtime.display import GIB, duration
from nemoc.compiler.search import recompute_text

TERM_STYLE = {"weights": ("W", "blue"), "gradients": ("G", "magenta"), "optimizer": ("O", "yellow"),
              "activations": ("A", "green"), "other": ("x", "cyan")}
KERNELS_LABEL = {"te": "Transformer Engine", "local": "Megatron-Core local spec"}


class Headroom(click.ParamType):
    """`10%`, `10 %` or `0.1` -> 0.1."""

    name = "PERCENT"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            frac = float(text.rstrip("%").strip()) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"{value!r} is not a percentage (e.g. 10% or 0.1)", param, ctx)
        if not 0.0 <= frac < 1.0:
            self.fail(f"{value!r} must be between 0% and 100%", param, ctx)
        return frac


# ------------------------------------------------------------------------------------------- JSON


def _mfu_basis(sp) -> str:
    """What the stage's model FLOPs (the MFU numerator) count (docs/cost-model.md, MFU convention)."""
    from nemoc.compiler.flops import FORWARD, FROZEN, stage_work

    work = stage_work(sp.kind, sp.params, sp.peft)
    how = {FORWARD: "forward", FROZEN: "forward + input gradients (frozen base, LoRA adapters trained)"}
    terms = [f"{p.model} {'' if p.count == 1 else f'{p.count:g} x '}{how.get(p.backward, 'forward + backward')}"
             for p in work.passes]
    if work.generated:
        terms.insert(0, f"rollout of {work.generated} tokens (one causal forward)")
    rows = " per sequence, 2 sequences per pair" if work.rows == 2 else " per sequence"
    return "; ".join(terms) + rows + "; recompute excluded"


def _split_line(sp) -> str:
    """One line for an uneven pipeline split (the plan's `Execution.pipeline`, as TransformerConfig sets it)."""
    split = sp.execution.pipeline
    if split.first is not None:
        return f"  uneven pipeline: first stage {split.first} layers, last {split.last}"
    counted = [n for n, on in (("embedding", split.embedding), ("loss", split.loss)) if on]
    if not counted:
        return ""
    return (f"  uneven pipeline: the {' and '.join(counted)} counted as pipeline layers "
            f"({', '.join(f'{k} = true' for k in split.params())})")


# ----------------------------------------------------------------------------------------- report


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def memory_bar(m, budget: int, width: int = 60):
    """A rich Text bar: one letter per term (W G O A x), '.' free, '|' the headroom budget."""
    from rich.text import Text

    cap = max(m.capacity, m.total, 1)
    bar = Text()
    used = 0
    for t in TERMS:
        n = round(getattr(m, t) / cap * width)
        letter, style = TERM_STYLE[t]
        bar.append(letter * n, style=style)
        used += n
    mark = min(width - 1, round(budget / cap * width))
    free = max(0, width - used)
    tail = "".join("|" if used + i == mark else "." for i in range(free))
    bar.append(tail, style="dim")
    over = m.total > budget
    bar.append(f"  {_gib(m.total)} / {_gib(m.capacity)} GiB", style="bold red" if over else "bold")
    return bar


def _layout_table(sp, split):
    from rich.table import Table

    lay = sp.layout
    t = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
    cols = ["TP", "PP", "VP", "CP", "EP", "ETP", "DP", "micro", "global", "microbatches", "SP", "dist-opt", "recompute"]
    for c in cols:
        t.add_column(c, justify="right")
    yn = lambda b: "on" if b else "off"  # noqa: E731
    t.add_row(*map(str, (lay.tp, lay.pp, lay.vp or "-", lay.cp, lay.ep, lay.etp, lay.dp, lay.micro_batch,
                         lay.global_batch, lay.num_microbatches, yn(lay.sequence_parallel),
                         "fsdp" if lay.megatron_fsdp else yn(lay.distributed_optimizer),
                         recompute_text(lay.recompute, lay.recompute_layers, lay.recompute_modules))))
    return t


def _memory_table(m, budget: int):
    from rich.table import Table

    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for c in ("term", "GiB", "share"):
        t.add_column(c, justify="right" if c != "term" else "left")
    for term in TERMS:
        letter, style = TERM_STYLE[term]
        v = getattr(m, term)
        t.add_row(f"[{style}]{letter}[/] {term}", _gib(v), f"{v / max(m.total, 1):.0%}")
    for name, v in sorted(m.parts.items(), key=lambda kv: -kv[1]):
        t.add_row(f"    {name}", _gib(v), "")
    t.add_row("[bold]total[/]", f"[bold]{_gib(m.total)}[/]", "")
    t.add_row("budget", _gib(budget), f"{budget / max(m.capacity, 1):.0%} of {_gib(m.capacity)}")
    return t


def _time_table(e):
    from rich.table import Table

    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for c in ("step", "tokens/s/GPU", "TFLOP/s/GPU", "MFU", "steps", "wall time", "GPU-hours", "cost"):
        t.add_column(c, justify="right")
    cost = f"${e.cost_usd:,.0f}" if e.cost_usd is not None else "-"
    t.add_row(f"{e.step_time_s:.3g} s", f"{e.tokens_per_s_per_gpu:,.0f}", f"{e.model_tflops_per_gpu:.0f}",
              f"{e.mfu:.1%}", f"{e.steps:,}", duration(e.wall_time_s), f"{e.gpu_hours:,.0f}", cost)
    parts = "  ".join(f"{k} {v:.3g}s" for k, v in sorted(e.parts.items(), key=lambda kv: -kv[1]) if v > 0)
    return t, parts


def _runner_ups_table(sr, top: int):
    from rich.table import Table

    from nemoc.compiler.search import describe

    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for c in ("#", "layout", "step", "vs best", "memory GiB"):
        t.add_column(c, justify="left" if c == "layout" else "right")
    best = sr.chosen.estimate.step_time_s
    for i, c in enumerate(sr.runner_ups[:top], 2):
        d = c.estimate.step_time_s / best - 1 if best else 0.0
        t.add_row(str(i), describe(c.layout), f"{c.estimate.step_time_s:.3g} s", f"+{d:.1%}", _gib(c.memory.total))
    return t


def _rejections_table(search):
    from rich.table import Table

    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for c in ("candidates", "why they lost", "closest example"):
        t.add_column(c, justify="right" if c == "candidates" else "left", overflow="fold")
    for r in search.rejections[:8]:
        t.add_row(f"{r.count:,}", r.reason, f"{r.layout}: {r.example}")
    return t


def render_report(result, headroom: float, top: int, console) -> None:
    from rich.rule import Rule

    plan = result.plan
    c = plan.cluster
    console.print(f"[bold]experiment {plan.experiment}[/]: {c.nodes} node{'s' * (c.nodes != 1)} x {c.gpus_per_node} "
                  f"{c.gpu} = {c.world_size} GPUs, {plan.precision}, attention {plan.attention_backend}, "
                  f"kernels {plan.kernels} ({KERNELS_LABEL[plan.kernels]}), headroom {headroom:.0%}")
    for sp, sr in zip(plan.stages, result.stages):
        console.print(Rule(f"stage {sp.name} ({sp.kind})", style="dim"))
        ex = sp.execution
        if ex.kernels != plan.kernels or ex.attention != plan.attention_backend:  # what the target runs this kind with
            spec = "Megatron-Core's local spec" if ex.kernels == "local" else "Transformer Engine's layers"
            scores = " (s x s scores)" if ex.attention == "unfused" else ""
            console.print(f"[dim]kernels {ex.kernels}: the nemoc runtime builds {sp.kind} stages with {spec} and "
                          f"its {ex.attention} attention core{scores}; the estimates below assume it[/]")
        split = _split_line(sp)
        console.print(_layout_table(sp, split))
        if split:
            console.print(split)
        budget = int(sp.memory.capacity * (1 - headroom))
        console.print("memory per GPU (most-loaded pipeline stage):")
        console.print(memory_bar(sp.memory, budget))
        console.print(_memory_table(sp.memory, budget))
        table, parts = _time_table(sp.estimate)
        console.print(table)
        if parts:
            console.print(f"[dim]step time terms: {parts}[/]")
        if sp.estimate.step_time_s:
            console.print(f"[dim]MFU counts: {_mfu_basis(sp)}[/]")
        for note in sr.notes:
            console.print(f"[dim]note: {note}[/]")
        if sr.search is not None:
            if sr.runner_ups[:top]:
                console.print("runner-ups:")
                console.print(_runner_ups_table(sr, top))
            if sr.search.rejections:
                console.print(f"search: {sr.search.space:,} candidates, {sr.search.evaluated:,} memory evaluations; "
                              "why the others lost:")
                console.print(_rejections_table(sr.search))
    for imp in plan.imports:
        console.print(Rule(f"hf_import {imp.directory}", style="dim"))
        console.print(import_line(imp))
    total = report_json_total(plan)
    cost = f"${total['cost_usd']:,.0f}" if total["cost_usd"] is not None else "- (set cluster usd_per_gpu_hour)"
    console.print(Rule("total", style="dim"))
    console.print(f"[bold]wall time {duration(total['wall_time_s'])}, {total['gpu_hours']:,.0f} GPU-hours, cost {cost}[/]"
                  f"  [dim](planned in {result.elapsed_s * 1000:.0f} ms)[/]")


def import_line(imp) -> str:
    """The hf_import task's estimate (compiler/hfimport.py) with its terms."""
    size = f"{imp.checkpoint_bytes / 1e9:,.1f} GB" + ("" if imp.measured else " (parameters x 2 bytes: no weights there yet)")
    return (f"checkpoint {size}; host memory peak {_gib(imp.host_memory_bytes)} GiB (max of {imp.workers} worker"
            f"{'s' * (imp.workers > 1)} x 2 x one layer {_gib(imp.layer_bytes)} GiB, 2 x embeddings/output "
            f"{_gib(imp.edge_bytes)} GiB); time {duration(imp.seconds)} (hash {duration(imp.hash_s)} + worker start "
            f"{duration(imp.start_s)} + convert {duration(imp.convert_s)})")


# ---------------------------------------------------------------------------------------- command


@click.command()
@click.argument("file")
@click.option("--headroom", type=Headroom(), default="10%", show_default=True,
              help="Fraction of GPU memory kept free (allocator spikes, what no model sees), e.g. 10% or 0.1.")
@click.option("--top", "top", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Runner-up layouts to show per stage.")
@click.option("--emit", "emit", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the compiled plan (JSON) that `nemoc run` consumes.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Plan every point of a sweep and print them side by side, e.g. --sweep parallel.tensor=2,4,8 "
                   "(repeatable: the cartesian product); --json gives a list (runtime/cli/sweep.py).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write a self-contained HTML report (memory per pipeline stage, schedule, step time, "
                   "runner-ups, cost; docs/reports.md).")
@common_options
def plan(file: str, headroom: float, top: int, emit: str | None, sweeps: tuple[str, ...], html_path: str | None,
         sets: tuple[str, ...],
         as_json: bool) -> None:
    """Resolve every `auto` into the best Megatron-Core layout, prove it fits, estimate time and cost."""
    if sweeps:
        if emit or html_path:
            raise click.UsageError("--emit and --html write one plan; they cannot be combined with --sweep")
        from nemoc.runtime.cli.sweep import plan_sweep

        plan_sweep(file, sweeps, sets, headroom, top, as_json)
    from nemoc.compiler.plan import to_json
    from nemoc.compiler.planner import plan_experiment
    from nemoc.runtime.target import default_target
    from nemoc.dsl.diagnostics import DiagnosticError

    try:
        spec, sources, language_warnings = load_spec_with_warnings(file, sets)
    except DiagnosticError as err:
        fail(err.diagnostics, getattr(err, "sources", {}) or {}, as_json)
    try:
        result = plan_experiment(spec, headroom=headroom, top=max(top + 1, 2), target=default_target())
    except DiagnosticError as err:
        fail(tuple(language_warnings) + tuple(err.diagnostics), sources, as_json)
    result = replace(result, warnings=tuple(language_warnings) + result.warnings)
    if emit:
        problem = write_output(emit, to_json(result.plan))
        if problem:
            click.echo(f"error: cannot write the plan to {emit}: {problem}", err=True)
            sys.exit(EXIT_USAGE)
    if html_path:
        from nemoc.runtime.cli.report import write_html

        write_html(html_path, result.plan, headroom=headroom, results=result.stages, top=top)
    if as_json:
        click.echo(json.dumps(report_json(result, headroom, top), indent=2))
    else:
        from rich.console import Console

        print_diagnostics(result.warnings, sources, as_json=False)
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
        render_report(result, headroom, top, console)
        if emit:
            console.print(f"plan written to {emit}")
        if html_path:
            console.print(f"HTML report written to {html_path}")
    sys.exit(EXIT_OK)
