"""The frozen, typed syntax tree of a `.nemo` file.

Input:  a lark parse tree of `grammar/nemo.lark` (only `nemoc.dsl.parser` builds one).
Output: frozen, slotted dataclasses named after the grammar rules; collections are tuples.
Invariants: every node carries the `Span` of the text it came from; spans (and comments) are excluded
from equality, so `parse(fmt(x)) == parse(x)` compares meaning, not layout. Numbers keep their source
text (`1.2T`, `3e-4`) so the formatter reproduces them exactly; their meaning depends on the field's
unit kind and is decided by `nemoc.dsl.typecheck`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Union

from nemoc.dsl.diagnostics import Span

_NUMBER = re.compile(r"^((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(.*)$", re.S)


def _span() -> Span:
    return field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Name:
    """A bare word: an enum value (`bf16`), a catalog id (`A100-80GB`) or a reference (`web`)."""

    value: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Number:
    """A numeric literal with an optional unit suffix, kept as written: `text` = `80GiB`, `3e-4`."""

    text: str
    span: Span = _span()

    @property
    def magnitude(self) -> str:
        return _NUMBER.match(self.text).group(1)

    @property
    def unit(self) -> str:
        return _NUMBER.match(self.text).group(2)


@dataclass(frozen=True, slots=True)
class String:
    value: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Auto:
    """`auto`: let the planner choose."""

    span: Span = _span()


@dataclass(frozen=True, slots=True)
class ListValue:
    items: tuple[Expr, ...]
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Arg:
    """`key = value` inside a call."""

    key: Name
    value: Expr
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Call:
    """A call-like value: `adam(lr = 3e-4, betas = [0.9, 0.95])`."""

    func: Name
    args: tuple[Arg, ...]
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str  # + - * /
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Expr
    span: Span = _span()


Expr = Union[Name, Number, String, Bool, Auto, ListValue, Call, BinOp, Neg]


@dataclass(frozen=True, slots=True)
class Field:
    """`key = value`."""

    key: Name
    value: Expr
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Block:
    """`kind [name] [after a, b] { members }`; `head` spans `kind name after ... {`."""

    kind: Name
    name: Name | None
    after: tuple[Name, ...]
    members: tuple[Member, ...]
    span: Span = _span()
    head: Span = _span()

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(m for m in self.members if isinstance(m, Field))

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(m for m in self.members if isinstance(m, Block))

    @property
    def title(self) -> str:
        """How a diagnostic names the block: `stage sft`, `cluster`."""
        return self.kind.value + (f" {self.name.value}" if self.name else "")


Member = Union[Field, Block]


@dataclass(frozen=True, slots=True)
class Import:
    path: String
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Comment:
    """A `# ...` comment; kept for the formatter, not part of the tree's meaning."""

    text: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Module:
    """One `.nemo` file."""

    imports: tuple[Import, ...]
    blocks: tuple[Block, ...]
    span: Span = _span()
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)
    items: tuple[Import | Block, ...] = field(default=(), compare=False, repr=False)  # source order


Node = Union[Expr, Arg, Field, Block, Import, Module]


def children(node: object) -> tuple[object, ...]:
    """Direct child nodes of an AST node, in field order (for generic walks and tests)."""
    out: list[object] = []
    for f in fields(node):
        if f.name in ("span", "head", "comments", "items"):
            continue
        value = getattr(node, f.name)
        values = value if isinstance(value, tuple) else (value,)
        out.extend(v for v in values if is_dataclass(v))
    return tuple(out)


def walk(node: object):
    """Every node under (and including) `node`, pre-order, without recursion."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(children(current)))
