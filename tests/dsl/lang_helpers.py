"""Shared helpers for the language tests."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.nemo")) + sorted((REPO / "examples" / "common").glob("*.nemo"))


def ast_to_json(node: object, *, spans: bool = True) -> object:
    """Plain data for an AST node: {"node": class name, field: value...}; spans as [l, c, el, ec]."""
    if isinstance(node, tuple):
        return [ast_to_json(n, spans=spans) for n in node]
    if not is_dataclass(node):
        return node
    if type(node).__name__ == "Span":
        return f"{node.line}:{node.col}-{node.end_line}:{node.end_col}"
    out = {"node": type(node).__name__}
    for f in fields(node):
        if f.name in ("comments", "items") or (not spans and f.name in ("span", "head")):
            continue
        out[f.name] = ast_to_json(getattr(node, f.name), spans=spans)
    return out
