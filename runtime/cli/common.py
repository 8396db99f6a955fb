"""What every `nemoc` command shares: `--set` / `--json`, loading a spec, and failing with diagnostics.

    @click.command()
    @click.argument("file")
    @common_options
    def plan(file, sets, as_json):
        spec, sources = load_spec(file, sets)      # raises DiagnosticError
        ...

`common_options` adds a repeatable `--set KEY=VALUE` (stored as the tuple `sets`) and `--json` (stored as
`as_json`). Overrides are parsed with the same value grammar as `.nemo` files; each one is reported in a
pseudo-file `<--set N>` whose text is the override itself, so its diagnostics get a caret like any other.

`load_spec` returns the lowered `ExperimentSpec` and the sources map (path -> text) that `render` needs.
It raises `DiagnosticError` for anything wrong with the experiment, and `UnreadableFile` (a subclass)
when the root file itself cannot be read, which commands turn into exit code 2 via `fail`.

This module imports neither torch nor Megatron-Core, so `check`/`plan` stay fast.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import NoReturn

import click

from nemoc.dsl.diagnostics import Diagnostic, DiagnosticError, render_all, sort_key, to_json

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2


def common_options(command: Callable) -> Callable:
    """Adds `--set KEY=VALUE` (repeatable; parameter `sets`) and `--json` (parameter `as_json`)."""

    @click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a field, e.g. --set parallel.tensor=8 --set stage.pretrain.steps=100 (repeatable).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        return command(*args, **kwargs)

    return wrapper


def load_spec(path: str, sets: tuple[str, ...] = ()):
    """Parse, check and lower `path` with the `--set` overrides applied.

    Returns `(ExperimentSpec, sources)` where `sources` maps every path a span may name (the root file,
    its imports, the `<--set N>` pseudo-files) to its text. Raises `DiagnosticError` with every
    diagnostic found (its `sources` attribute carries the same map, for rendering).
    """
    from nemoc.compiler.lower import load_experiment  # the compiler pass that owns AST -> spec

    return load_experiment(path, sets)


def load_spec_with_warnings(path: str, sets: tuple[str, ...] = ()):
    """Like `load_spec`, but also returns the language's warnings (W001 unused data set, W002 stage
    without a length): `(spec, sources, warnings)`. Print them with `print_diagnostics`."""
    from nemoc.compiler.lower import compile_file
    from nemoc.dsl.diagnostics import has_errors

    spec, diags, sources = compile_file(path, sets)
    if spec is None or has_errors(diags):
        raise DiagnosticError(diags, sources)
    return spec, sources, tuple(diags)


def diagnostic_sources(error: DiagnosticError) -> Mapping[str, str]:
    """The sources map a `DiagnosticError` raised by `load_spec` carries (empty if none)."""
    return getattr(error, "sources", {}) or {}


def is_usage_error(diagnostics: Iterable[Diagnostic]) -> bool:
    """True when the root file could not be read at all (exit code 2 rather than 1)."""
    from nemoc.dsl.loader import UNREADABLE_CODES

    return any(d.code in UNREADABLE_CODES for d in diagnostics)


def print_diagnostics(diagnostics: Iterable[Diagnostic], sources: Mapping[str, str], as_json: bool) -> None:
    """Text to stderr (coloured when it is a terminal), or `{"diagnostics": [...]}` JSON to stdout."""
    diagnostics = sorted(diagnostics, key=sort_key)
    if as_json:
        click.echo(json.dumps({"diagnostics": [to_json(d) for d in diagnostics]}, indent=2))
        return
    if not diagnostics:
        return
    text = render_all(diagnostics, sources)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.markup import escape

        console = Console(stderr=True, highlight=False)
        for line in text.splitlines():
            style = "bold red" if "error[" in line else "bold yellow" if "warning[" in line else None
            console.print(escape(line), style=style)
    else:
        click.echo(text, err=True)


def fail(diagnostics: Iterable[Diagnostic], sources: Mapping[str, str], as_json: bool) -> NoReturn:
    """Print `diagnostics` and exit: 2 if the root file was unreadable, else 1."""
    diagnostics = tuple(diagnostics)
    print_diagnostics(diagnostics, sources, as_json)
    sys.exit(EXIT_USAGE if is_usage_error(diagnostics) else EXIT_DIAGNOSTICS)


def fail_on(error: DiagnosticError, as_json: bool) -> NoReturn:
    """`fail` for a caught `DiagnosticError` from `load_spec`."""
    fail(error.diagnostics, diagnostic_sources(error), as_json)


# What `nemoc run` needs beyond `pip install nemoc`: the `train` extra (import name -> distribution).
TRAIN_MODULES = {"torch": "torch", "megatron.core": "megatron-core", "numpy": "numpy", "tokenizers": "tokenizers",
                 "safetensors": "safetensors"}


def missing_train_modules() -> list[str]:
    """Distributions of the `train` extra that cannot be imported here (without importing them)."""
    import importlib.util

    missing = []
    for module, distribution in TRAIN_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a broken install
            found = False
        if not found:
            missing.append(distribution)
    return missing


def write_output(path: str, text: str) -> str | None:
    """Write `text` to the file a user named (`fmt --write`, `plan --emit`): None when written, else the
    reason it was not, for a one-line `error:` (exit 2) and never a traceback.

    A regular file (or a new one) is replaced through `nemoc.runtime.atomic`: on a full disk, over
    RLIMIT_FSIZE or in a read-only directory the original is untouched, and its permissions are kept;
    a symlink's target is replaced, not the link. An existing non-regular path (`/dev/stdout`,
    `/dev/full`) cannot be renamed over, so it is written directly, its errors caught the same way.
    """
    import os

    from nemoc.runtime.atomic import atomic_write_text

    try:
        real = os.path.realpath(path)
        if os.path.isdir(real):
            return "it is a directory"
        if os.path.exists(real) and not os.path.isfile(real):
            with open(real, "w", encoding="utf-8") as fh:
                fh.write(text)
            return None
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            return f"directory {parent} does not exist"
        atomic_write_text(real, text)
    except (OSError, ValueError) as exc:
        return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return None
