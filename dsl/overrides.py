"""`--set KEY=VALUE` overrides: parsed with the language's value grammar, applied to the experiment AST.

Input:  the experiment `ast.Block` and the `--set` strings in command-line order.
Output: a new experiment block with each override's field replaced (or added, creating a missing
        singleton block such as `parallel`), the pseudo-sources `<--set N>` -> text for rendering, and
        diagnostics (E050 malformed or unknown path, E010-E016 syntax errors in a value).
Invariants: pure; an override's spans point into its own pseudo-file, so a bad value is reported with
a caret like any other; later overrides of the same key win; the schema checks the result exactly
as if the user had written it in the file.

Paths: `parallel.tensor`, `model.layers`, `cluster.nodes`, `precision`, `data.web.path`,
`stage.pretrain.steps`, `stage.pretrain.checkpoint.every`, `stage.sft.parallel.tensor`.
"""

from __future__ import annotations

import dataclasses
import re

from nemoc.dsl import ast
from nemoc.dsl.diagnostics import Diagnostic, DiagnosticError, Span
from nemoc.dsl.parser import parse_value
from nemoc.dsl.schema import BLOCKS
from nemoc.dsl.typecheck import did_you_mean

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")


def pseudo_path(index: int) -> str:
    """The pseudo-file name of the `index`-th (1-based) override."""
    return f"<--set {index}>"


def apply_overrides(experiment: ast.Block, sets: tuple[str, ...]):
    """Returns (new experiment block, {pseudo path: text}, diagnostics)."""
    sources, diags = {}, []
    for index, text in enumerate(sets, start=1):
        path = pseudo_path(index)
        sources[path] = text
        parsed = _parse_override(text, path, diags)
        if parsed is None:
            continue
        segments, fld = parsed
        try:
            experiment = _apply(experiment, segments, fld, path)
        except _PathError as err:
            diags.append(err.diagnostic)
    return experiment, sources, diags


class _PathError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


def _parse_override(text: str, path: str, diags: list[Diagnostic]):
    whole = Span(path, 1, 1, 1, max(2, len(text) + 1))
    if "=" not in text:
        diags.append(Diagnostic("E050", f"`--set {text}` is not KEY=VALUE", whole,
                                hint="write e.g. --set parallel.tensor=8"))
        return None
    key, _, value = text.partition("=")
    stripped = key.strip()
    if not _KEY.match(stripped):
        diags.append(Diagnostic("E050", f"`{key}` is not a field path", Span(path, 1, 1, 1, len(key) + 1),
                                hint="a path is dotted names: parallel.tensor, stage.pretrain.steps"))
        return None
    if not value.strip():
        diags.append(Diagnostic("E012", f"missing value after `{stripped} =`", whole,
                                hint="write a value: a number, a string, a name, a list `[...]` or `auto`"))
        return None
    try:
        expr = parse_value(" " * (len(key) + 1) + value, path)  # pad so columns match the whole text
    except DiagnosticError as err:
        diags.extend(err.diagnostics)
        return None
    offset = len(key) - len(key.lstrip())
    segments = []
    for seg in stripped.split("."):
        segments.append(ast.Name(seg, Span(path, 1, offset + 1, 1, offset + 1 + len(seg))))
        offset += len(seg) + 1
    return segments, ast.Field(segments[-1], expr, whole)


def _apply(block: ast.Block, segments: list[ast.Name], fld: ast.Field, path: str) -> ast.Block:
    if len(segments) == 1:
        members = [m for m in block.members if not (isinstance(m, ast.Field) and m.key.value == fld.key.value)]
        return dataclasses.replace(block, members=tuple(members) + (fld,))
    head, rest = segments[0], segments[1:]
    kind = head.value
    allowed = BLOCKS[block.kind.value].blocks if block.kind.value in BLOCKS else ()
    if kind not in allowed:
        where = block.title
        hint = did_you_mean(kind, allowed) or (f"`{where}` has blocks: " + ", ".join(allowed) if allowed else None)
        raise _PathError(Diagnostic("E050", f"`{where}` has no block `{kind}`", head.span, hint=hint))
    if BLOCKS[kind].repeat:
        if len(rest) < 2:
            raise _PathError(Diagnostic("E050", f"name the `{kind}` and a field: `{kind}.NAME.FIELD`", head.span))
        name, rest = rest[0], rest[1:]
        match = lambda b: b.kind.value == kind and b.name is not None and b.name.value == name.value  # noqa: E731
        if not any(match(b) for b in block.blocks):
            names = [b.name.value for b in block.blocks if b.kind.value == kind and b.name]
            raise _PathError(Diagnostic("E050", f"no `{kind} {name.value}` in `{block.title}`", name.span,
                                        hint=did_you_mean(name.value, names) or
                                        (f"declared: {', '.join(names)}" if names else None)))
    else:
        match = lambda b: b.kind.value == kind  # noqa: E731
    members = list(block.members)
    index = next((i for i, m in enumerate(members) if isinstance(m, ast.Block) and match(m)), None)
    if index is None:
        if BLOCKS[kind].name == "required":
            raise _PathError(Diagnostic("E050", f"`{block.title}` has no `{kind}` block to override",
                                        head.span))
        members.append(ast.Block(ast.Name(kind, head.span), None, (), (), fld.span, fld.span))
        index = len(members) - 1
    members[index] = _apply(members[index], rest, fld, path)
    return dataclasses.replace(block, members=tuple(members))
