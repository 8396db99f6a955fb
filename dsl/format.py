"""`nemoc fmt`: the canonical text of a parsed `.nemo` file.

Input:  a `Module` and the source text it was parsed from (to place comments and blank lines).
Output: text in canonical form: 2-space indent, one field per line, blocks and fields in source order,
        `key = value` with single spaces, lists `[a, b]`, calls `f(k = v)`, minimal parentheses,
        numbers exactly as written, at most one blank line where the source had one or more.
Invariants: `parse(format_module(m, src)) == m` (AST equality ignores spans); formatting is idempotent;
every comment survives (an own-line comment stays on its own line before what followed it; a comment
after code stays at the end of that line).
"""

from __future__ import annotations

import bisect
from collections import deque

from nemoc.dsl import ast

INDENT = "  "
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def format_expr(expr: ast.Expr) -> str:
    """One value in canonical form (used by the formatter and by diagnostics)."""
    if isinstance(expr, ast.Name):
        return expr.value
    if isinstance(expr, ast.Number):
        return expr.text
    if isinstance(expr, ast.String):
        return quote(expr.value)
    if isinstance(expr, ast.Bool):
        return "true" if expr.value else "false"
    if isinstance(expr, ast.Auto):
        return "auto"
    if isinstance(expr, ast.ListValue):
        return "[" + ", ".join(format_expr(i) for i in expr.items) + "]"
    if isinstance(expr, ast.Call):
        args = ", ".join(format_expr(a.value) if a.key.value == "" else f"{a.key.value} = {format_expr(a.value)}"
                         for a in expr.args)
        return f"{expr.func.value}({args})"
    if isinstance(expr, ast.Neg):
        inner = format_expr(expr.operand)
        return f"-({inner})" if isinstance(expr.operand, ast.BinOp) else f"-{inner}"
    if isinstance(expr, ast.BinOp):
        return _format_binop(expr)
    raise TypeError(f"not an expression: {expr!r}")


def _format_binop(expr: ast.BinOp) -> str:
    """A left-associative chain `a + b + ... + z` in a loop along its left spine (any length; only the
    brackets the parser bounds recurse)."""
    spine = []
    while isinstance(expr, ast.BinOp):
        spine.append(expr)
        expr = expr.left
    parts, left = [format_expr(expr)], expr
    for node in reversed(spine):
        prec = _PREC[node.op]
        if isinstance(left, ast.BinOp) and _PREC[left.op] < prec:
            parts = ["(", *parts, ")"]  # as deep as the source's brackets, which the parser bounds
        right = format_expr(node.right)
        if isinstance(node.right, ast.BinOp) and _PREC[node.right.op] <= prec:
            right = f"({right})"
        parts += [f" {node.op} ", right]
        left = node
    return "".join(parts)


def quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def format_module(module: ast.Module, source: str) -> str:
    """The canonical text of `module`, which was parsed from `source`."""
    items = module.items or (*module.imports, *module.blocks)
    printer = _Printer(module.comments, items)
    printer.items(items, depth=0)
    printer.flush_comments(before_line=None, depth=0)
    return "\n".join(printer.lines).rstrip("\n") + "\n" if printer.lines else ""


def _ends(items) -> list[tuple[tuple[int, int], tuple[str, int]]]:
    """(end position, owner key) of everything a trailing comment can follow: import, field, `{`, `}`."""
    out, stack = [], list(items)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Block):
            out.append(((node.head.end_line, node.head.end_col), ("head", id(node))))
            out.append(((node.span.end_line, node.span.end_col), ("close", id(node))))
            stack.extend(node.members)
        else:
            out.append(((node.span.end_line, node.span.end_col), ("item", id(node))))
    return out


class _Printer:
    """Emits lines; a comment that follows code on its line belongs to the last thing ending before it
    there (`owned`), any other comment is printed on its own line before what followed it (`pending`)."""

    def __init__(self, comments: tuple[ast.Comment, ...], items):
        ends_by_line: dict[int, list[tuple[tuple[int, int], tuple[str, int]]]] = {}
        for end in _ends(items):  # indexed by line: linear, however many comments and fields
            ends_by_line.setdefault(end[0][0], []).append(end)
        self.owned: dict[tuple[str, int], list[str]] = {}
        self.pending: deque[ast.Comment] = deque()
        for c in sorted(comments, key=lambda c: (c.span.line, c.span.col)):
            start = (c.span.line, c.span.col)
            before = [e for e in ends_by_line.get(c.span.line, ()) if e[0] <= start]
            if before:
                owner = max(before, key=lambda e: e[0])[1]
                self.owned.setdefault(owner, []).append(c.text.rstrip())
            else:
                self.pending.append(c)
        self.pending_lines = [c.span.line for c in self.pending]  # sorted: which lines hold own-line comments
        self.lines: list[str] = []
        self.last_line = 0  # last source line emitted at the current level (for blank-line preservation)
        self.fresh = True  # nothing emitted yet at the current level

    def trailing(self, *owners: tuple[str, int]) -> str:
        texts = [t for o in owners for t in self.owned.pop(o, ())]
        return ("  " + "  ".join(texts)) if texts else ""

    def flush_comments(self, before_line: int | None, depth: int) -> None:
        """Own-line comments that come before `before_line` (all, if None), at `depth`."""
        while self.pending and (before_line is None or self.pending[0].span.line < before_line):
            c = self.pending.popleft()
            self._gap(c.span.line)
            self.lines.append(INDENT * depth + c.text.rstrip())
            self.last_line, self.fresh = c.span.end_line, False

    def _gap(self, line: int) -> None:
        if not self.fresh and line > self.last_line + 1:
            self.lines.append("")

    def items(self, items, depth: int) -> None:
        for item in items:
            self.flush_comments(item.span.line, depth)
            self._gap(item.span.line)
            if isinstance(item, ast.Block):
                self.block(item, depth)
            else:
                text = f"import {quote(item.path.value)}" if isinstance(item, ast.Import) else \
                    f"{item.key.value} = {format_expr(item.value)}"
                self.lines.append(INDENT * depth + text + self.trailing(("item", id(item))))
            self.last_line, self.fresh = item.span.end_line, False

    def block(self, block: ast.Block, depth: int) -> None:
        head = block.kind.value + (f" {block.name.value}" if block.name else "")
        if block.after:
            head += " after " + ", ".join(a.value for a in block.after)
        end = block.span.end_line
        # An own-line comment strictly inside the block? (none inside has been flushed yet, so the static,
        # sorted list of own-line comment lines answers it in O(log n))
        first = bisect.bisect_right(self.pending_lines, block.head.end_line)
        inner_comments = first < len(self.pending_lines) and self.pending_lines[first] < end
        if not block.members and not inner_comments:
            self.lines.append(INDENT * depth + head + " {}" + self.trailing(("head", id(block)), ("close", id(block))))
            return
        self.lines.append(INDENT * depth + head + " {" + self.trailing(("head", id(block))))
        self.last_line, self.fresh = block.head.end_line, True
        self.items(block.members, depth + 1)
        self.flush_comments(end, depth + 1)
        self.lines.append(INDENT * depth + "}" + self.trailing(("close", id(block))))
