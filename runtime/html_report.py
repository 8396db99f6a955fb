"""The HTML pictures of a plan (`nemoc plan --html`) and of a run (`nemoc report`): one self-contained file.

Input:  a compiled `Plan` (and, from `nemoc plan`, the planner's `StageResult`s: runner-ups and why the
other candidates lost); for a run, `RunData` (runtime.cli.report): each stage's metrics records, task
states and eval results.
Output: one HTML page (str) with plotly's JavaScript inlined (no network at view time); per stage the
layout, the per-GPU memory of every pipeline stage against capacity (stacked by term), the simulated
pipeline schedule of one step per rank (`compiler.schedule`), the step-time terms, the runner-ups, and
for a run the metric curves and predicted vs measured; the cost of every stage.
Invariants: every chart is a `div.plotly-graph-div` (the rendering test screenshots each); user text
(names, notes, reasons) is HTML-escaped; nothing here changes the plan.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from nemoc.runtime.display import GIB, duration
MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations")
TERM_COLORS = {"weights": "#4c78a8", "gradients": "#b279a2", "optimizer": "#eeca3b", "activations": "#54a24b"}
PART_COLORS = ("#72b7b2", "#9d755d", "#bab0ac", "#ff9da6", "#e45756", "#f58518", "#79706e", "#d67195", "#439894")
OP_COLORS = {"F": "#4c78a8", "B": "#f58518", "bubble": "#e0e0e0", "transfer": "#54a24b"}
ESTIMATE_ROWS = (("step time", "step_time_s", "{:.4g} s"), ("tokens/s per GPU", "tokens_per_s_per_gpu", "{:,.0f}"),
                 ("model TFLOP/s per GPU", "model_tflops_per_gpu", "{:.1f}"), ("MFU", "mfu", "{:.1%}"),
                 ("steps", "steps", "{:,}"), ("GPU-hours", "gpu_hours", "{:,.1f}"))
MAX_VISIBLE_OPS = 160  # ops per rank the schedule chart opens with (more are zoomed out to)
MAX_HOVER_OPS = 8_000  # beyond this the schedule's hover shows times only (file size)
MAX_TIMELINE_OPS = 60_000  # beyond this the schedule chart draws the first ranks only (browser memory)


@dataclass(frozen=True, slots=True)
class StageRun:
    """What a run directory holds for one stage (runtime.cli.report reads it)."""

    task: str
    state: str
    records: tuple[dict, ...] = ()
    results: Mapping | None = None  # eval results.json
    done: Mapping | None = None  # DONE.json payload


@dataclass(frozen=True, slots=True)
class RunData:
    root: str
    stages: Mapping[str, StageRun] = field(default_factory=dict)
    tasks: tuple[tuple[str, str], ...] = ()  # (task id, state) of every task, graph order


# ------------------------------------------------------------------------------------------ figures


def _figure(fig, div_id: str) -> str:
    fig.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), font=dict(size=12))
    # Not `responsive`: its window-resize redraw, racing the first draw of a long page, left axis
    # titles at y = -Infinity (a console error in Chromium, seen under load); each chart still takes
    # its container's width when drawn.
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": False})


def memory_figure(breakdowns: Sequence, capacity: int, budget: int, title: str):
    """Stacked bars, one per pipeline stage: the four model-state / activation terms and every named
    part of `other` (logits, NCCL buffers, CUDA context, fragmentation, ...), in GiB, with the GPU's
    capacity and the headroom budget as lines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    x = [f"stage {i}" for i in range(len(breakdowns))]
    for term in MEMORY_TERMS:
        fig.add_bar(name=term, x=x, y=[getattr(b, term) / GIB for b in breakdowns], marker_color=TERM_COLORS[term])
    parts = sorted({k for b in breakdowns for k in b.parts}, key=lambda k: -max(b.parts.get(k, 0) for b in breakdowns))
    for i, name in enumerate(parts):
        fig.add_bar(name=name.replace("_", " "), x=x, y=[b.parts.get(name, 0) / GIB for b in breakdowns],
                    marker_color=PART_COLORS[i % len(PART_COLORS)])
    rest = [max(0.0, b.other - sum(b.parts.values())) / GIB for b in breakdowns]
    if any(r > 1e-9 for r in rest):
        fig.add_bar(name="other", x=x, y=rest, marker_color="#cccccc")
    if capacity:
        fig.add_hline(y=capacity / GIB, line_color="#d62728", annotation_text=f"capacity {capacity / GIB:.1f} GiB")
        fig.add_hline(y=budget / GIB, line_dash="dash", line_color="#ff7f0e",
                      annotation_text=f"budget {budget / GIB:.1f} GiB", annotation_position="bottom right")
    fig.update_layout(barmode="stack", title=title, yaxis_title="GiB per GPU", legend_traceorder="normal")
    return fig


def schedule_figure(schedule, title: str):
    """One row per pipeline rank: forward (F) and backward (B) of each micro batch, the bubbles
    (idle), and the activation / gradient transfers under each row."""
    import plotly.graph_objects as go

    ranks = schedule.pp
    if len(schedule.ops) > MAX_TIMELINE_OPS:
        ranks = max(1, MAX_TIMELINE_OPS * schedule.pp // len(schedule.ops))
        title += f" (first {ranks} of {schedule.pp} ranks drawn)"
    unit, scale = ("ms", 1e3) if schedule.makespan < 1 else ("s", 1.0)
    width = max(3, min(28, 220 // ranks))

    def segments(items, y_of, text_of):  # one path per trace: a gap (NaN / None) after each op's [start, end]
        try:  # numpy arrays: plotly writes them as compact binary, not JSON lists
            import numpy as np

            xs = np.full(3 * len(items), np.nan, dtype=np.float32)  # float32: ample for a timeline
            ys = np.full(3 * len(items), np.nan, dtype=np.float32)
        except ImportError:  # `pip install nemoc` without numpy (the train extra brings it): JSON lists
            xs, ys = [None] * (3 * len(items)), [None] * (3 * len(items))
        texts = []
        for i, it in enumerate(items):
            xs[3 * i:3 * i + 2] = it[0] * scale, it[1] * scale
            ys[3 * i:3 * i + 2] = (y_of(it),) * 2
            if hover == "text":
                texts += [text_of(it)] * 2 + [None]
        return xs, ys, texts

    hover = "text" if len(schedule.ops) <= MAX_HOVER_OPS else "x+name"  # per-op text costs ~100 bytes an op
    fig = go.Figure()
    bubbles = [(a, b, r) for r in range(ranks) for a, b in schedule.bubbles(r)]
    xs, ys, texts = segments(bubbles, lambda it: it[2], lambda it: f"bubble {(it[1] - it[0]) * scale:.3g} {unit}")
    fig.add_scatter(x=xs, y=ys, text=texts, mode="lines", name="bubble (idle)", hoverinfo=hover,
                    line=dict(color=OP_COLORS["bubble"], width=width))
    for kind, label in (("F", "forward"), ("B", "backward")):
        ops = [(o.start, o.end, o) for o in schedule.ops if o.kind == kind and o.rank < ranks]
        xs, ys, texts = segments(ops, lambda it: it[2].rank, lambda it: (
            f"{label} of micro batch {it[2].microbatch}" + (f", chunk {it[2].chunk}" if schedule.vp > 1 else "")
            + f" on rank {it[2].rank}: {it[0] * scale:.4g}-{it[1] * scale:.4g} {unit}"))
        fig.add_scatter(x=xs, y=ys, text=texts, mode="lines", name=label, hoverinfo=hover,
                        line=dict(color=OP_COLORS[kind], width=width))
    sends = [(t.start, t.end, t) for t in schedule.transfers if t.src < ranks and t.end > t.start]
    if sends:
        xs, ys, texts = segments(sends, lambda it: it[2].src + 0.38, lambda it: (
            f"{'activation' if it[2].kind == 'F' else 'gradient'} of micro batch {it[2].microbatch}, "
            f"rank {it[2].src} -> {it[2].dst}: {(it[1] - it[0]) * scale:.3g} {unit}"))
        fig.add_scatter(x=xs, y=ys, text=texts, mode="lines", name="p2p transfer", hoverinfo=hover,
                        line=dict(color=OP_COLORS["transfer"], width=max(2, width // 4)))
    fig.update_yaxes(autorange="reversed", tickvals=list(range(ranks)), ticktext=[f"rank {r}" for r in range(ranks)],
                     range=[ranks - 0.4, -0.6])
    per_rank = len(schedule.ops) / schedule.pp
    if per_rank > MAX_VISIBLE_OPS:  # thousands of ops per rank are sub-pixel: open on the warm-up
        window = schedule.makespan * MAX_VISIBLE_OPS / per_rank
        fig.update_xaxes(range=[0, window * scale])
        title += f"<br><sup>the first {window * scale:.3g} {unit} of {schedule.makespan * scale:.3g} shown: " \
                 "double-click the chart for the whole step</sup>"
    fig.update_layout(title=title, xaxis_title=unit, height=max(260, 140 + 34 * ranks),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def step_time_figure(parts: Mapping[str, float], title: str):
    """The step-time terms (seconds per step), largest first; they sum to the step time."""
    import plotly.graph_objects as go

    items = sorted(((k, v) for k, v in parts.items() if v > 0), key=lambda kv: kv[1])
    total = sum(v for _, v in items) or 1.0
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k.replace("_", " ") for k, _ in items], orientation="h",
                           text=[f"{v:.3g} s ({v / total:.0%})" for _, v in items], textposition="auto",
                           marker_color="#4c78a8"))
    fig.update_layout(title=title, xaxis_title="seconds per step", height=max(240, 90 + 26 * len(items)))
    return fig


def cost_figure(stages: Sequence, title: str):
    """Per stage: cost in USD (or GPU-hours when the cluster has no price) and wall time."""
    from plotly.subplots import make_subplots

    names = [s.name for s in stages]
    priced = all(s.estimate.cost_usd is not None for s in stages)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cost (USD)" if priced else "GPU-hours", "wall time (hours)"))
    fig.add_bar(x=names, y=[s.estimate.cost_usd if priced else s.estimate.gpu_hours for s in stages],
                marker_color="#4c78a8", name="cost" if priced else "GPU-hours", row=1, col=1)
    fig.add_bar(x=names, y=[s.estimate.wall_time_s / 3600 for s in stages], marker_color="#f58518",
                name="wall time", row=1, col=2)
    fig.update_layout(title=title, showlegend=False, height=320)
    return fig


CURVE_PANELS = (("loss", lambda k: k == "loss" or k.endswith("_loss")), ("learning rate", lambda k: k == "lr"),
                ("gradient norm", lambda k: k == "grad_norm"), ("tokens/s", lambda k: k == "tokens_per_s"))


def curves_figure(records: Sequence[Mapping], title: str):
    """Loss (and validation losses), learning rate, gradient norm and throughput against the step;
    only the panels that have data. None when no record has a step."""
    from plotly.subplots import make_subplots

    steps = [r for r in records if isinstance(r.get("step"), (int, float)) and "event" not in r]
    panels = []
    for name, wanted in CURVE_PANELS:
        keys = sorted({k for r in steps for k, v in r.items() if wanted(k) and _number(v)})
        if keys:
            panels.append((name, keys))
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[p[0] for p in panels])
    for i, (name, keys) in enumerate(panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in steps if _number(r.get(key))]
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=key,
                            marker=dict(size=4), row=i // cols + 1, col=i % cols + 1)
        fig.update_xaxes(title_text="step", row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title=title, height=300 * rows)
    return fig


def predicted_figure(rows: Sequence[tuple[str, float, float | None, str]], title: str):
    """Measured / predicted per quantity (1 = the plan was exact)."""
    import plotly.graph_objects as go

    shown = [(n, p, m) for n, p, m, _ in rows if m is not None and p]
    fig = go.Figure(go.Bar(x=[n for n, _, _ in shown], y=[m / p for _, p, m in shown],
                           text=[f"{m / p:.2f}x" for _, p, m in shown], textposition="auto", marker_color="#54a24b"))
    fig.add_hline(y=1.0, line_dash="dash", line_color="#555", annotation_text="as planned")
    fig.update_layout(title=title, yaxis_title="measured / predicted", height=320)
    return fig


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -------------------------------------------------------------------------------------------- tables


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _layout_rows(lay) -> list[list[object]]:
    on = lambda b: "on" if b else "off"  # noqa: E731
    return [[lay.tp, lay.pp, lay.vp or "-", lay.cp, lay.ep, lay.etp, lay.dp, lay.micro_batch, lay.global_batch,
             lay.num_microbatches, on(lay.sequence_parallel), on(lay.distributed_optimizer), lay.recompute]]


LAYOUT_HEADER = ("TP", "PP", "VP", "CP", "EP", "ETP", "DP", "micro", "global", "micro batches", "SP", "dist-opt",
                 "recompute")


def _estimate_rows(e) -> list[list[str]]:
    rows = [[label, fmt.format(getattr(e, key))] for label, key, fmt in ESTIMATE_ROWS]
    rows.append(["wall time", duration(e.wall_time_s)])
    rows.append(["cost", f"${e.cost_usd:,.0f}" if e.cost_usd is not None else "- (no usd_per_gpu_hour)"])
    return rows




def why_slower(chosen, other, top: int = 2) -> str:
    """The step-time terms that grew most from the chosen layout to `other` (why it lost)."""
    best = chosen.estimate.step_time_s
    diff = {k: other.estimate.parts.get(k, 0.0) - chosen.estimate.parts.get(k, 0.0)
            for k in set(other.estimate.parts) | set(chosen.estimate.parts)}
    worse = [f"{k.replace('_', ' ')} +{v:.3g} s" for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top] if v > 0]
    rel = other.estimate.step_time_s / best - 1 if best else 0.0
    return f"{rel:+.1%} step time" + (": " + ", ".join(worse) if worse else "")


def _runner_up_rows(sr, top: int) -> list[list[object]]:
    from nemoc.compiler.search import describe

    return [[i, describe(c.layout), f"{c.estimate.step_time_s:.4g} s", f"{c.memory.total / GIB:.1f}",
             why_slower(sr.chosen, c)] for i, c in enumerate(sr.runner_ups[:top], 2)]


# ---------------------------------------------------------------------------------------------- page


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{font-size:15px;margin-bottom:6px}table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:13px}.warn{color:#b35900}
.chart{margin:8px 0 18px}
"""


def _page(title: str, body: list[str]) -> str:
    from plotly.offline import get_plotlyjs

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _chart(fig, div_id: str) -> str:
    return f'<div class="chart">{_figure(fig, div_id)}</div>'


def _p(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{html.escape(text)}</p>'


def stage_section(plan, sp, index: int, headroom: float, sr=None, top: int = 3, run: StageRun | None = None) -> list[str]:
    """The HTML of one stage: layout, memory, schedule, step time, runner-ups (and the run's view)."""
    from nemoc.compiler.schedule import pipeline_memory, stage_schedule

    out = [f"<h2>stage {html.escape(sp.name)} ({html.escape(sp.kind)})</h2>",
           _table(LAYOUT_HEADER, _layout_rows(sp.layout)),
           _p(f"kernels {sp.kernels}; sequence length {sp.seq_length:,}; "
              f"resident models: {', '.join(sp.resident_models)}")]
    budget = int(sp.memory.capacity * (1 - headroom))
    stages_mem = pipeline_memory(plan, sp) or (sp.memory,)
    out.append(_chart(memory_figure(stages_mem, sp.memory.capacity, budget,
                                    f"memory per GPU: {sp.memory.total / GIB:.1f} GiB"
                                    + (f" on the most-loaded of {sp.layout.pp} pipeline stages" if sp.layout.pp > 1
                                       else " (no pipeline)")), f"memory-{index}"))
    try:
        schedule = stage_schedule(sp)
    except ValueError as exc:  # a plan written by hand with a layout Megatron-Core would refuse
        schedule = None
        out.append(_p(f"no pipeline schedule: {exc}", "warn"))
    if schedule is not None:
        kind = "interleaved 1F1B" if schedule.vp > 1 else ("1F1B" if sp.layout.pp > 1 else "no pipeline")
        out.append(_chart(schedule_figure(schedule, f"pipeline schedule of one step ({kind}, pp {sp.layout.pp}"
                                          + (f", vp {schedule.vp}" if schedule.vp > 1 else "")
                                          + f", {schedule.microbatches} micro batches): bubble "
                                          f"{schedule.bubble_fraction(0):.1%} of rank 0"), f"schedule-{index}"))
    if sp.estimate.parts:
        out.append(_chart(step_time_figure(sp.estimate.parts, f"step time {sp.estimate.step_time_s:.4g} s by term"),
                          f"steptime-{index}"))
    out.append(_table(("estimate", "value"), _estimate_rows(sp.estimate)))
    if sr is not None:
        out += [_p(f"note: {n}") for n in sr.notes]
        if sr.runner_ups[:top]:
            out += ["<h3>runner-ups (why each lost)</h3>",
                    _table(("#", "layout", "step", "memory GiB", "why it lost"), _runner_up_rows(sr, top))]
        if sr.search is not None and sr.search.rejections:
            out += [f"<h3>why the other candidates lost ({sr.search.space:,} candidates)</h3>",
                    _table(("candidates", "reason", "closest example"),
                           [[f"{r.count:,}", r.reason, f"{r.layout}: {r.example}"] for r in sr.search.rejections[:8]])]
    elif run is not None:
        out.append(_p("runner-ups: a run directory keeps the chosen plan only; `nemoc plan FILE --html` shows "
                      "the runner-ups and why each lost"))
    if run is not None:
        out += run_section(plan, sp, run, index)
    return out


def plan_html(plan, *, headroom: float = 0.10, results: Sequence | None = None, top: int = 3,
              run: RunData | None = None) -> str:
    """The whole page for `plan` (with the planner's `results` per stage, or a run's data)."""
    c = plan.cluster
    title = f"{'run' if run else 'plan'} of {plan.experiment}"
    body = [f"<h1>{html.escape(title)}</h1>",
            _p(f"{c.nodes} node{'s' * (c.nodes != 1)} x {c.gpus_per_node} {c.gpu} = {c.world_size} GPUs, "
               f"{plan.precision}, attention {plan.attention_backend}, kernels {plan.kernels}, headroom {headroom:.0%}")]
    if run is not None:
        body += [_p(f"run directory {run.root}"),
                 _table(("task", "state"), run.tasks) if run.tasks
                 else _p("no readable status.json (task states unknown)", "warn")]
    timed = [s for s in plan.stages if s.estimate.step_time_s]
    if timed:
        body.append(_chart(cost_figure(timed, "cost and wall time per stage"), "cost"))
    total_cost = [s.estimate.cost_usd for s in plan.stages if s.estimate.cost_usd is not None]
    body.append(_table(("stage", "kind", "wall time", "GPU-hours", "cost"), [
        [s.name, s.kind, duration(s.estimate.wall_time_s), f"{s.estimate.gpu_hours:,.1f}",
         f"${s.estimate.cost_usd:,.0f}" if s.estimate.cost_usd is not None else "-"] for s in plan.stages] + [
        ["total", "", duration(sum(s.estimate.wall_time_s for s in plan.stages)),
         f"{sum(s.estimate.gpu_hours for s in plan.stages):,.1f}", f"${sum(total_cost):,.0f}" if total_cost else "-"]]))
    by_name = {r.name: r for r in results or ()}
    for i, sp in enumerate(plan.stages):
        stage_run = run.stages.get(sp.name) if run is not None else None
        if run is not None and stage_run is None:
            stage_run = StageRun(task="-", state="not started")
        body += stage_section(plan, sp, i, headroom, by_name.get(sp.name), top, stage_run)
    return _page(title, body)


# ----------------------------------------------------------------------------------------- the run


def measured(records: Sequence[Mapping], key: str, how: str = "median") -> float | None:
    """The median (or max) of a per-step metric over the logged intervals, the first one (warm-up,
    compilation, first data loads) left out when there are others."""
    values = [r[key] for r in records if "event" not in r and _number(r.get(key))]
    if how == "max":
        return max(values) if values else None
    if len(values) > 1:
        values = values[1:]
    if not values:
        return None
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def predicted_rows(sp, records: Sequence[Mapping]) -> list[tuple[str, float, float | None, str]]:
    """(quantity, predicted, measured or None, unit) for tokens/s per GPU, step time, peak memory, MFU."""
    world = sp.layout.world_size
    tokens = measured(records, "tokens_per_s")
    peak = measured(records, "peak_mem_gib", "max")
    return [
        ("tokens/s per GPU", sp.estimate.tokens_per_s_per_gpu, tokens / world if tokens is not None else None, ""),
        ("step time", sp.estimate.step_time_s, measured(records, "step_time_s"), "s"),
        ("peak memory", sp.memory.total / GIB, peak, "GiB"),
        ("MFU", sp.estimate.mfu, measured(records, "mfu"), "%"),
    ]


def run_section(plan, sp, run: StageRun, index: int) -> list[str]:
    out = [f"<h3>run: task {html.escape(run.task)}, {html.escape(run.state)}</h3>"]
    records = [r for r in run.records if isinstance(r, Mapping)]
    steps = [r for r in records if "event" not in r and "step" in r]
    if not steps:
        out.append(_p("no metrics logged yet" if run.state not in ("done", "cached") or sp.steps else
                      "this stage logs no per-step metrics", "warn"))
    else:
        last = steps[-1]
        out.append(_p(f"{len(steps)} logged intervals, last step {last.get('step')} of {sp.steps:,}"))
        fig = curves_figure(steps, f"stage {sp.name}: training curves")
        if fig is not None:
            out.append(_chart(fig, f"curves-{index}"))
        rows = predicted_rows(sp, steps)
        if any(m is not None for _, p, m, _ in rows if p):
            out.append(_chart(predicted_figure(rows, f"stage {sp.name}: measured vs predicted"), f"predicted-{index}"))
        out.append(_table(("quantity", "predicted", "measured", "measured / predicted"), [
            [n, _fmt(p, u), _fmt(m, u), f"{m / p:.2f}" if m is not None and p else "-"] for n, p, m, u in rows]))
    events = [r for r in records if "event" in r]
    if events:
        out.append(_p("events: " + "; ".join(f"{r.get('event')}" + (f" at {r['iteration']}" if "iteration" in r else "")
                                             for r in events[-12:])))
    if run.done and _number(run.done.get("final_loss")):
        out.append(_p(f"finished: final loss {run.done['final_loss']:.4g} after {run.done.get('steps', '?')} steps"))
    if run.results:
        results = dict(run.results)
        generated = results.pop("generations", None)
        out += ["<h3>evaluation results</h3>", _table(("result", "value"), _flatten(results))]
        if isinstance(generated, list) and generated:
            out.append(_table(("prompt", "completion"), [
                [str(g.get("prompt", "")), str(g.get("completion", ""))] for g in generated if isinstance(g, Mapping)]))
    return out


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "%":
        return f"{v:.1%}"
    text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return f"{text} {unit}".strip()


def _flatten(data: Mapping, prefix: str = "") -> list[list[str]]:
    rows = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, name + ".")
        elif isinstance(value, float):
            rows.append([name, f"{value:.6g}"])
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            rows.append([name, text if len(text) <= 300 else text[:297] + "..."])
    return rows
