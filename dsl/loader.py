"""Files -> parsed modules: reading, decoding, size limits and `import` resolution.

Input:  the path of the root `.nemo` file, as the user typed it.
Output: a `Program` (every module parsed, keyed by display path, imports before importers) and the
        diagnostics found on the way: E001 root unreadable, E002 root not UTF-8, E003 too large,
        E005 import unreadable, E006 import cycle, E007 import outside the project tree, plus every
        syntax error of every file.
Invariants: an import is resolved relative to the importing file and must stay inside the project
tree (the root file's directory; both sides compared as real paths, so a project reached through a
symlinked directory imports normally); each file is read and parsed once even when imported twice;
only regular files are read (a FIFO, a device or a directory is a diagnostic, never a hang); a path
with a NUL or another control character is a diagnostic at the import; no input escapes as anything
but a diagnostic.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nemoc.dsl import ast
from nemoc.dsl.diagnostics import Diagnostic, DiagnosticError, Note, Span
from nemoc.dsl.parser import MAX_BYTES, normalize_newlines, parse

# Diagnostics that mean "the root file could not be read at all": the CLI exits 2, not 1.
UNREADABLE_CODES = frozenset({"E001", "E002"})


@dataclass(frozen=True, slots=True)
class Program:
    root: str  # display path of the root file
    modules: Mapping[str, ast.Module]  # display path -> module; imports before the files importing them
    sources: Mapping[str, str] = field(default_factory=dict)
    root_dir: str = "."  # absolute directory of the root file (the project tree)


def shown_path(path: str) -> str:
    """`path` with control characters escaped (`a\\x00b`), safe to print in a diagnostic."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)


def bad_path_char(path: str) -> str | None:
    """A description of the first character no file name of ours may hold (NUL, a control character)."""
    for c in path:
        if c == "\0":
            return "a NUL byte (`\\x00`)"
        if ord(c) < 0x20 or ord(c) == 0x7F:
            return f"the control character `{repr(c)[1:-1]}`"
    return None


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_source(path: str, *, code: str = "E001", anchor: Span | None = None) -> tuple[str | None, Diagnostic | None]:
    """The UTF-8 text of `path` (line endings normalized to LF), or a diagnostic saying why it cannot be had.

    Only a regular file is read: the file is opened non-blocking and checked with fstat before any read,
    so a FIFO or a device in the project is reported, not waited on forever."""
    what, shown = ("import" if anchor else "read"), shown_path(path)
    bad = bad_path_char(path)
    if bad:
        return None, Diagnostic(code, f"cannot {what} `{shown}`: the path contains {bad}", anchor,
                                hint="file names in imports are plain text: remove the character")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, Diagnostic(code, f"cannot {what} `{shown}`: no such file", anchor)
    except PermissionError:
        return None, Diagnostic(code, f"cannot {what} `{shown}`: permission denied", anchor)
    except (OSError, ValueError) as exc:
        return None, Diagnostic(code, f"cannot {what} `{shown}`: {exc.strerror if isinstance(exc, OSError) else exc}",
                                anchor)
    try:
        raw, problem = _read_regular(fd, shown, what, code, anchor)
    finally:
        os.close(fd)
    if problem:
        return None, problem
    try:
        return normalize_newlines(raw.decode("utf-8-sig")), None  # a byte-order mark some editors write is not content
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        where = anchor or Span(path, line, col, line, col + 1)
        return None, Diagnostic("E002" if code == "E001" else code,
                                f"`{path}` is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at {line}:{col})", where)


def _read_regular(fd: int, shown: str, what: str, code: str, anchor: Span | None):
    """(bytes, None) from an open regular file, or (None, the diagnostic for anything else)."""
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return None, Diagnostic(code, f"cannot {what} `{shown}`: it is a directory", anchor, hint="name a .nemo file")
        kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), None)
        if kind is not None or not stat.S_ISREG(st.st_mode):
            return None, Diagnostic(code, f"cannot {what} `{shown}`: it is {kind or 'not a regular file'}", anchor,
                                    hint="only regular .nemo files are read")
        if st.st_size > MAX_BYTES:
            return None, Diagnostic("E003", f"`{shown}` is too large ({st.st_size:,} bytes; the limit is "
                                    f"{MAX_BYTES:,})", anchor,
                                    hint="an experiment file names data sets by path; it does not contain them")
        chunks, left = [], MAX_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        raw = b"".join(chunks)
        if len(raw) > MAX_BYTES:  # it grew after fstat
            return None, Diagnostic("E003", f"`{shown}` is too large (over {MAX_BYTES:,} bytes)", anchor)
        return raw, None
    except OSError as exc:
        return None, Diagnostic(code, f"cannot {what} `{shown}`: {exc.strerror or exc}", anchor)


def load_program(path: str, text: str | None = None) -> tuple[Program, tuple[Diagnostic, ...]]:
    """Read and parse `path` and everything it imports, transitively. `text`: the root file's contents
    when the caller already has them (an editor's unsaved buffer); imports are still read from disk."""
    loader = _Loader(os.path.dirname(os.path.abspath(path)))
    if text is None:
        text, problem = read_source(path)
        if problem:
            return Program(path, MappingProxyType({}), {}, loader.root_dir), (problem,)
    else:
        text = normalize_newlines(text)  # as read_source does: the sources map matches the spans
    loader.visit(path, text, None, ())
    modules = MappingProxyType(dict(loader.modules))
    return Program(path, modules, dict(loader.sources), loader.root_dir), tuple(loader.diags)


class _Loader:
    def __init__(self, root_dir: str):
        self.root_dir = root_dir
        self.real_root = os.path.realpath(root_dir)  # imports are real paths: compare like with like
        self.modules: dict[str, ast.Module] = {}
        self.sources: dict[str, str] = {}
        self.diags: list[Diagnostic] = []
        self.done: set[str] = set()  # real paths parsed

    def visit(self, path: str, text: str, reached_by: Span | None, stack: tuple) -> None:
        """Parse `path`, then its imports; `stack` holds (real path, display path, import span) frames."""
        real = os.path.realpath(path)
        self.sources[path] = text
        self.done.add(real)
        try:
            module = parse(text, path)
        except DiagnosticError as err:
            self.diags.extend(err.diagnostics)
            return
        chain = stack + ((real, path, reached_by),)
        for imp in module.imports:
            self._import(path, imp, chain)
        self.modules[path] = module

    def _import(self, importer: str, imp: ast.Import, chain: tuple) -> None:
        rel = imp.path.value
        bad = bad_path_char(rel)
        if bad:  # before any os.path call: realpath raises ValueError on a NUL byte
            self.diags.append(Diagnostic("E005", f"cannot import `{shown_path(rel)}`: the path contains {bad}",
                                         imp.path.span, hint="file names in imports are plain text: remove the character"))
            return
        target = os.path.normpath(os.path.join(os.path.dirname(importer), rel))
        real = os.path.realpath(target)
        if os.path.isabs(rel) or os.path.commonpath([real, self.real_root]) != self.real_root:
            self.diags.append(Diagnostic("E007", f"import `{rel}` leaves the project tree", imp.path.span,
                                         hint=f"imports are relative to the importing file and must stay "
                                              f"inside {self.root_dir}"))
            return
        first = next((i for i, frame in enumerate(chain) if frame[0] == real), None)
        if first is not None:
            cycle = [display for _, display, _ in chain[first:]] + [target]
            notes = tuple(Note(f"`{display}` is imported here", span) for _, display, span in chain[first + 1:] if span)
            self.diags.append(Diagnostic("E006", "import cycle: " + " -> ".join(cycle), imp.path.span, notes=notes))
            return
        if real in self.done:
            return
        text, problem = read_source(target, code="E005", anchor=imp.path.span)
        if problem:
            self.diags.append(problem)
            return
        self.visit(target, text, imp.path.span, chain)
