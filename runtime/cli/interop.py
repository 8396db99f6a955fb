"""`nemoc import`, `nemoc export --megatron-args` and `nemoc presets`: what people already have, in and out.

import FILE [--gpu ID] [--name NAME] [-o OUT]: a Megatron-LM launch script, a NeMo 1 YAML config or a
    Megatron-Bridge config dump -> a canonical `.nemo` file on stdout (or OUT). Every source setting not
    carried over is named in the file's header comment and, with every assumption, as a `warning:` line
    on stderr. `--json` prints `{"format", "nemo", "warnings", "dropped"}` instead.
export --megatron-args FILE [--stage NAME]: plan FILE, then print the Megatron-LM `pretrain_gpt.py`
    command line of a stage (default: the first training stage), one flag per line
    (runtime/megatron_args.megatron_lm_command). `--json` prints `{"experiment", "stage", "arguments",
    "notes", "command"}`.
presets [--json]: every model preset with its key sizes and its source.

Exit codes: 0 done, 1 the input cannot be imported / the experiment has errors, 2 usage error or an
unreadable file. A one-line error goes to stderr as `error: ...`, or with `--json` to stdout as
`{"error": "error: ..."}` (as `nemoc run` / `nemoc status` do). `import` and `presets` import neither torch nor Megatron-Core; `export` does (the
one plan -> Megatron translation lives in the runtime).
"""

from __future__ import annotations

import json
import sys

import click

from nemoc.runtime.cli.common import EXIT_DIAGNOSTICS, EXIT_OK, EXIT_USAGE, common_options, fail, \
    load_spec_with_warnings

from nemoc.dsl.schema import TRAINING_KINDS  # the stage kinds whose layout a Megatron-LM command line carries


def _die(message: str, code: int, as_json: bool = False) -> None:
    """A one-line error: on stderr, or with --json as {"error": "error: ..."} on stdout (as `nemoc run`)."""
    if as_json:
        click.echo(json.dumps({"error": f"error: {message}"}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--gpu", default=None, metavar="ID",
              help="Accelerator catalog id for cluster.gpu (H100, A100-80GB, ...); default: from the file name, "
                   "else H100 with a warning.")
@click.option("--name", default=None, help="Experiment name (default: from the file name).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the .nemo file here instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
def import_(file: str, gpu: str | None, name: str | None, output: str | None, as_json: bool) -> None:
    """Import a Megatron-LM command line, a NeMo 1 YAML or a Megatron-Bridge config dump as a .nemo file."""
    from nemoc.compiler.interop import ImportProblem, import_text

    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        _die(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}", EXIT_USAGE, as_json)
    try:
        result = import_text(text, file, gpu=gpu, name=name)
    except ImportProblem as exc:
        _die(str(exc), EXIT_DIAGNOSTICS, as_json)
    if not as_json:
        for w in result.warnings:
            click.echo(f"warning: {file}: {w}", err=True)
        if result.dropped:
            click.echo(f"warning: {file}: {len(result.dropped)} settings not carried over (listed in the header "
                       f"comment): " + ", ".join(d.split(" ")[0] for d in result.dropped), err=True)
    if output:
        from nemoc.runtime.atomic import atomic_write_text

        atomic_write_text(output, result.text)
        if not as_json:
            click.echo(f"wrote {output} (from {result.format}); next: nemoc check {output} && nemoc plan {output}",
                       err=True)
    if as_json:
        click.echo(json.dumps({"format": result.format, "nemo": result.text, "warnings": list(result.warnings),
                               "dropped": list(result.dropped)}, indent=2))
    elif not output:
        click.echo(result.text, nl=False)
    sys.exit(EXIT_OK)


@click.command()
@click.argument("file")
@click.option("--megatron-args", "megatron_args", is_flag=True, required=True,
              help="Print the equivalent Megatron-LM pretrain_gpt.py command line (the only export format).")
@click.option("--stage", "stage_name", default=None, help="Stage to export (default: the first training stage).")
@common_options
def export(file: str, megatron_args: bool, stage_name: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Export a stage's plan: the equivalent Megatron-LM command line (--megatron-args)."""
    from nemoc.compiler.planner import plan_experiment
    from nemoc.runtime.target import default_target
    from nemoc.dsl.diagnostics import DiagnosticError

    try:
        spec, sources, _ = load_spec_with_warnings(file, sets)
        result = plan_experiment(spec, target=default_target())
    except DiagnosticError as err:
        fail(err.diagnostics, getattr(err, "sources", {}) or {}, as_json)
    plan = result.plan
    names = [s.name for s in plan.stages]
    if stage_name is None:
        stage_name = next((s.name for s in plan.stages if s.kind in TRAINING_KINDS), None)
        if stage_name is None:
            _die(f"{file}: no training stage to export (stages: {', '.join(names)})", EXIT_DIAGNOSTICS, as_json)
    elif stage_name not in names:
        _die(f"{file}: no stage `{stage_name}` (stages: {', '.join(names)})", EXIT_USAGE, as_json)
    elif plan.stage(stage_name).kind not in TRAINING_KINDS:
        _die(f"{file}: stage `{stage_name}` is a {plan.stage(stage_name).kind} stage; Megatron-LM's pretrain_gpt.py "
             f"trains (export a training stage: {', '.join(s.name for s in plan.stages if s.kind in TRAINING_KINDS)})",
             EXIT_DIAGNOSTICS, as_json)
    from nemoc.runtime.megatron_args import megatron_lm_arguments, megatron_lm_command

    command = megatron_lm_command(plan, stage_name)
    if as_json:
        args, notes = megatron_lm_arguments(plan, stage_name)
        click.echo(json.dumps({"experiment": plan.experiment, "stage": stage_name, "arguments": args,
                               "notes": notes, "command": command}, indent=2))
    else:
        click.echo(command, nl=False)
    sys.exit(EXIT_OK)


def preset_rows() -> list[dict]:
    """One row per model preset: its key sizes, parameter count and source."""
    from nemoc.compiler.catalog.models import PRESETS
    from nemoc.compiler.flops import param_counts

    rows = []
    for name, m in PRESETS.items():
        counts = param_counts(m)
        rows.append({"name": name, "layers": m.layers, "hidden": m.hidden, "heads": m.heads,
                     "query_groups": m.query_groups, "ffn_hidden": m.ffn_hidden, "vocab": m.vocab,
                     "seq_length": m.seq_length, "experts": m.experts, "top_k": m.top_k,
                     "moe_ffn_hidden": (m.moe_ffn_hidden or m.ffn_hidden) if m.experts else None,
                     "parameters": counts.total, "active_parameters": counts.active,
                     "mtp_num_layers": m.mtp_num_layers, "mtp_parameters": counts.mtp, "source": m.source})
    return rows


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
def presets(as_json: bool) -> None:
    """List every model preset with its key sizes and its source."""
    rows = preset_rows()
    if as_json:
        click.echo(json.dumps({"presets": rows}, indent=2))
        sys.exit(EXIT_OK)
    from rich.console import Console
    from rich.table import Table

    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for c in ("preset", "params", "layers", "hidden", "heads", "kv", "ffn", "vocab", "seq", "experts", "source"):
        t.add_column(c, justify="left" if c in ("preset", "source") else "right", overflow="fold")
    for r in rows:
        # an MoE preset: the experts' FFN width (the dense `ffn` of Qwen3-MoE builds no layer) and the active size
        experts = (f"{r['experts']} top-{r['top_k']} x{r['moe_ffn_hidden']}, "
                   f"{r['active_parameters'] / 1e9:.2f}B active") if r["experts"] else "-"
        # the main model's count (the published one), multi-token prediction modules stated beside it
        params = f"{r['parameters'] / 1e9:.2f}B" + (f" + {r['mtp_parameters'] / 1e9:.2f}B MTP" if r["mtp_parameters"] else "")
        t.add_row(r["name"], params, str(r["layers"]), str(r["hidden"]), str(r["heads"]),
                  str(r["query_groups"]), str(r["ffn_hidden"]), str(r["vocab"]), str(r["seq_length"]), experts,
                  r["source"])
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(t)
    sys.exit(EXIT_OK)
