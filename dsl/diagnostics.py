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

Rendering is linear in the input: each source's line starts are indexed once per `render_all` (not
re-split per diagnostic), a source line longer than MAX_LINE_WIDTH is shown as a window around the
span, and at most MAX_PER_FILE diagnostics are printed per file, then "... and N more" (the count line
and `--json` still cover all of them).
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


MAX_PER_FILE = 50  # diagnostics printed per file; the rest are counted ("... and N more")
MAX_LINE_WIDTH = 160  # characters of one source line shown; a longer line is windowed around the span
_CONTEXT = 60  # characters shown before the span in a windowed line
_UNPRINTABLE = {c: "\ufffd" for c in (*range(0x20), 0x7F) if c != 0x09}  # one cell each, so carets still line up


class _Lines:
    """The line starts of one source, found once; `line(n)` is then a slice, not a re-split."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0]
        find = text.find
        at = find("\n")
        while at >= 0:
            self.starts.append(at + 1)
            at = find("\n", at + 1)

    def line(self, n: int) -> str | None:
        if not 1 <= n <= len(self.starts) or (n == len(self.starts) and self.starts[-1] == len(self.text)):
            return None  # past the end (a final newline starts no line, as with str.splitlines)
        start = self.starts[n - 1]
        end = self.starts[n] - 1 if n < len(self.starts) else len(self.text)
        return self.text[start:end].rstrip("\r")


class _SourceIndex:
    """`_Lines` per path of a sources map, built on first use and shared by every diagnostic."""

    def __init__(self, sources: Mapping[str, str]):
        self.sources = sources
        self.lines: dict[str, _Lines] = {}

    def line(self, path: str, n: int) -> str | None:
        if path not in self.lines:
            text = self.sources.get(path)
            if text is None:
                return None
            self.lines[path] = _Lines(text)
        return self.lines[path].line(n)


def _excerpt(span: Span, index: _SourceIndex, label: str = "") -> list[str]:
    src = index.line(span.path, span.line)
    if src is None:
        return []
    end = span.end_col if span.end_line == span.line and span.end_col > span.col else len(src) + 1
    col, end = max(1, span.col), min(end, len(src) + 1)
    if len(src) > MAX_LINE_WIDTH:  # a window around the span, so one 1 MB line is not printed per diagnostic
        first = max(0, col - 1 - _CONTEXT)
        shown = src[first:first + MAX_LINE_WIDTH]
        lead, tail = ("..." if first else ""), ("..." if first + MAX_LINE_WIDTH < len(src) else "")
        col, end = col - first + len(lead), min(end - first, len(shown) + 1) + len(lead)
        src = lead + shown + tail
    src = src.translate(_UNPRINTABLE).expandtabs(1)
    width = len(str(span.line))
    carets = "^" * max(1, min(end, len(src) + 1) - col)
    gutter = " " * width
    underline = " " * (col - 1) + carets + (f" {label}" if label else "")
    return [f"{gutter} |", f"{span.line} | {src}", f"{gutter} | {underline}"]


def render(diagnostic: Diagnostic, sources: Mapping[str, str] | _SourceIndex) -> str:
    """Compiler-style text for one diagnostic; `sources` maps a span's path to the file's text."""
    index = sources if isinstance(sources, _SourceIndex) else _SourceIndex(sources)
    where = f"{diagnostic.span}: " if diagnostic.span else ""
    out = [f"{where}{diagnostic.severity.value}[{diagnostic.code}]: {diagnostic.message}"]
    if diagnostic.span:
        out += _excerpt(diagnostic.span, index)
    if diagnostic.equation:
        out.append(f"  = equation: {diagnostic.equation}")
    if diagnostic.hint:
        out.append(f"  = hint: {diagnostic.hint}")
    for note in diagnostic.notes:
        where = f"{note.span}: " if note.span else ""
        out.append(f"{where}note: {note.message}")
        if note.span:
            out += _excerpt(note.span, index)
    return "\n".join(out)


def render_all(diagnostics: Iterable[Diagnostic], sources: Mapping[str, str]) -> str:
    """Every diagnostic (at most MAX_PER_FILE per file, then a count of the rest) and a summary line."""
    diagnostics = sorted(diagnostics, key=sort_key)
    index, shown, hidden, parts = _SourceIndex(sources), {}, {}, []
    for d in diagnostics:
        path = d.span.path if d.span else ""
        shown[path] = shown.get(path, 0) + 1
        if shown[path] > MAX_PER_FILE:
            hidden[path] = hidden.get(path, 0) + 1
        else:
            parts.append(render(d, index))
    for path, count in hidden.items():
        where = f" in {path}" if path else ""
        parts.append(f"... and {count:,} more diagnostic{'s' * (count != 1)}{where} (the first {MAX_PER_FILE} "
                     "are shown; fix these, or use --json for all)")
    text = "\n\n".join(parts)
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
