"""One Span, one Diagnostic, one renderer.

Every phase of nemoc (parser, schema checks, layout rules, memory fit, runtime-graph emission) reports
problems as `Diagnostic` values anchored at a `Span` of the file the user wrote. Passes never format
text themselves: `render` turns diagnostics into the compiler-style text

    path:line:col: error[E0xx]: message
       |
    12 |     tensor = 3
       |              ^ here
       = equation: heads(32) % tp(3) = 2 != 0
       = hint: use a tensor-parallel size that divides 32
    note: declared here ...

and `to_json` into plain data for `--json`. Checks collect diagnostics and a phase raises
`DiagnosticError` once, with all of them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, order=True)
class Span:
    """A region of one source file. Lines and columns are 1-based; `end_col` is exclusive."""

    path: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True, slots=True)
class Note:
    message: str
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem. `code` is stable (E0xx errors, W0xx warnings) so tests and tools can match it."""

    code: str
    message: str
    span: Span | None = None
    severity: Severity = Severity.ERROR
    equation: str | None = None  # the whole failed equation, every operand shown
    hint: str | None = None  # the cheapest change that would fix it
    notes: tuple[Note, ...] = field(default=())

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR


class DiagnosticError(Exception):
    """Raised once by a phase that found errors; carries every diagnostic it collected."""

    def __init__(self, diagnostics: Iterable[Diagnostic], sources: Mapping[str, str] | None = None):
        self.diagnostics = tuple(diagnostics)
        self.sources = dict(sources or {})  # path -> text of every file a span may name, for `render`
        super().__init__("; ".join(d.message for d in self.diagnostics))


def has_errors(diagnostics: Iterable[Diagnostic]) -> bool:
    return any(d.is_error for d in diagnostics)


def raise_if_errors(diagnostics: Iterable[Diagnostic]) -> None:
    diagnostics = tuple(diagnostics)
    if has_errors(diagnostics):
        raise DiagnosticError(diagnostics)


def sort_key(d: Diagnostic) -> tuple:
    s = d.span
    return (s.path, s.line, s.col, d.code) if s else ("", 0, 0, d.code)


# --------------------------------------------------------------------------------------------- render


def _source_lines(span: Span, sources: Mapping[str, str]) -> list[str] | None:
    text = sources.get(span.path)
    return None if text is None else text.splitlines()


def _excerpt(span: Span, sources: Mapping[str, str], label: str = "") -> list[str]:
    lines = _source_lines(span, sources)
    if not lines or not 1 <= span.line <= len(lines):
        return []
    src = lines[span.line - 1].expandtabs(1)
    width = len(str(span.line))
    end = span.end_col if span.end_line == span.line and span.end_col > span.col else len(src) + 1
    carets = "^" * max(1, min(end, len(src) + 1) - span.col)
    gutter = " " * width
    underline = " " * (span.col - 1) + carets + (f" {label}" if label else "")
    return [f"{gutter} |", f"{span.line} | {src}", f"{gutter} | {underline}"]


def render(diagnostic: Diagnostic, sources: Mapping[str, str]) -> str:
    """Compiler-style text for one diagnostic; `sources` maps a span's path to the file's text."""
    where = f"{diagnostic.span}: " if diagnostic.span else ""
    out = [f"{where}{diagnostic.severity.value}[{diagnostic.code}]: {diagnostic.message}"]
    if diagnostic.span:
        out += _excerpt(diagnostic.span, sources)
    if diagnostic.equation:
        out.append(f"  = equation: {diagnostic.equation}")
    if diagnostic.hint:
        out.append(f"  = hint: {diagnostic.hint}")
    for note in diagnostic.notes:
        where = f"{note.span}: " if note.span else ""
        out.append(f"{where}note: {note.message}")
        if note.span:
            out += _excerpt(note.span, sources)
    return "\n".join(out)


def render_all(diagnostics: Iterable[Diagnostic], sources: Mapping[str, str]) -> str:
    diagnostics = sorted(diagnostics, key=sort_key)
    text = "\n\n".join(render(d, sources) for d in diagnostics)
    errors = sum(d.is_error for d in diagnostics)
    warnings = sum(d.severity is Severity.WARNING for d in diagnostics)
    if errors or warnings:
        text += f"\n\n{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    return text


def to_json(diagnostic: Diagnostic) -> dict:
    def span(s: Span | None) -> dict | None:
        if s is None:
            return None
        return {"path": s.path, "line": s.line, "col": s.col, "end_line": s.end_line, "end_col": s.end_col}

    return {
        "code": diagnostic.code,
        "severity": diagnostic.severity.value,
        "message": diagnostic.message,
        "span": span(diagnostic.span),
        "equation": diagnostic.equation,
        "hint": diagnostic.hint,
        "notes": [{"message": n.message, "span": span(n.span)} for n in diagnostic.notes],
    }
