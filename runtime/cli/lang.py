"""`nemoc check` and `nemoc fmt`: the language front end on the command line.

check FILE...: parse, check the schema, references, `after` cycles, presets and catalog ids, then (when
the language is clean) the layout rules (`nemoc.compiler.rules.check_spec`); exit 0 clean (warnings allowed), 1 diagnostics,
2 usage error or an unreadable file. `--json` prints `{"files": [{"path", "ok", "diagnostics"}]}`.
A file without an `experiment` (a module of templates, like examples/common/hardware.nemo) is checked
as a module: its imports, its templates' fields and types, duplicates and catalog ids.

fmt FILE...: print the canonical form; `--check` exits 1 (listing the files) when a file is not
canonical, `--write` rewrites files in place, atomically (a full disk or a read-only directory leaves
the original untouched and prints `error: cannot write FILE: ...`, exit 2). A file that does not parse
is reported like `check`.
"""

from __future__ import annotations

import json
import sys

import click

from nemoc.dsl.diagnostics import Diagnostic, has_errors, sort_key, to_json
from nemoc.runtime.cli.common import EXIT_DIAGNOSTICS, EXIT_OK, EXIT_USAGE, common_options, is_usage_error, \
    print_diagnostics, write_output


def check_file(path: str, sets: tuple[str, ...] = (), text: str | None = None) -> tuple[tuple[Diagnostic, ...], dict[str, str]]:
    """Every diagnostic for `path` (language, then layout rules when the language is clean); `text`: the
    file's contents when the caller has them unsaved (`nemoc lsp`)."""
    from nemoc.compiler.lower import compile_file

    try:
        spec, diags, sources = compile_file(path, sets, text, module_ok=True)
        if spec is not None and not has_errors(diags):
            diags = tuple(diags) + _layout_rules(spec)
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug in nemoc is still reported, not dumped
        diags, sources = (internal_error(path, exc),), {}
    return tuple(sorted(diags, key=sort_key)), sources


def internal_error(path: str, exc: BaseException) -> Diagnostic:
    """E000: nemoc itself failed on this input (a bug to report, never the user's fault)."""
    return Diagnostic("E000", f"internal compiler error while checking `{path}`: {type(exc).__name__}: {exc}",
                      hint="please report this with the input file; the test suite fuzzes for exactly this")


def _layout_rules(spec) -> tuple[Diagnostic, ...]:
    from nemoc.compiler.rules import check_spec  # the plan engineer's layout rules (tp divides heads, ...)
    from nemoc.runtime.target import default_target

    return tuple(check_spec(spec, default_target()))


@click.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@common_options
def check(files: tuple[str, ...], sets: tuple[str, ...], as_json: bool) -> None:
    """Check .nemo files: syntax, types, units, references, presets, layout rules."""
    worst, report = EXIT_OK, []
    for path in files:
        diags, sources = check_file(path, sets)
        if as_json:
            report.append({"path": path, "ok": not has_errors(diags), "diagnostics": [to_json(d) for d in diags]})
        else:
            print_diagnostics(diags, sources, as_json=False)
        code = EXIT_USAGE if is_usage_error(diags) else EXIT_DIAGNOSTICS if has_errors(diags) else EXIT_OK
        worst = max(worst, code)
    if as_json:
        click.echo(json.dumps({"files": report}, indent=2))
    elif worst == EXIT_OK:
        click.echo(f"ok: {len(files)} file{'s' * (len(files) != 1)} checked", err=True)
    sys.exit(worst)


def format_file(path: str) -> tuple[str | None, tuple[Diagnostic, ...], dict[str, str]]:
    """(canonical text or None, diagnostics, sources) for one file."""
    from nemoc.dsl.diagnostics import DiagnosticError
    from nemoc.dsl.format import format_module
    from nemoc.dsl.loader import read_source
    from nemoc.dsl.parser import parse

    text, problem = read_source(path)
    if problem:
        return None, (problem,), {}
    try:
        module = parse(text, path)
        return format_module(module, text), (), {path: text}
    except DiagnosticError as err:
        return None, err.diagnostics, {path: text}
    except Exception as exc:  # noqa: BLE001 - see check_file
        return None, (internal_error(path, exc),), {path: text}


@click.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--check", "check_only", is_flag=True, help="Exit 1 if a file is not in canonical form.")
@click.option("--write", is_flag=True, help="Rewrite files in place.")
def fmt(files: tuple[str, ...], check_only: bool, write: bool) -> None:
    """Print .nemo files in canonical form (comments kept)."""
    if check_only and write:
        raise click.UsageError("--check and --write exclude each other")
    worst = EXIT_OK
    for path in files:
        formatted, diags, sources = format_file(path)
        if formatted is None:
            print_diagnostics(diags, sources, as_json=False)
            worst = max(worst, EXIT_USAGE if is_usage_error(diags) else EXIT_DIAGNOSTICS)
            continue
        original = sources[path]
        if check_only:
            if formatted != original:
                click.echo(f"{path}: not formatted (run `nemoc fmt --write {path}`)", err=True)
                worst = max(worst, EXIT_DIAGNOSTICS)
        elif write:
            if formatted != original:
                problem = write_output(path, formatted)
                if problem:
                    click.echo(f"error: cannot write {path}: {problem} (the file is unchanged)", err=True)
                    worst = max(worst, EXIT_USAGE)
                    continue
                click.echo(f"formatted {path}", err=True)
        else:
            click.echo(formatted, nl=False)
    sys.exit(worst)
