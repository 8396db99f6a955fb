"""AST blocks and values -> typed Python values, checked against `nemoc.dsl.schema`.

Input:  `ast.Block`s (templates already merged by the caller) and their schema `BlockDef`s.
Output: `Checked` blocks: the fields the user wrote as Python values in base units (ints for counts,
        bytes and steps; floats for rates, fractions and seconds; `None` for `auto`; `Ref` for names
        of other declarations; `CallValue` for `adam(...)`), each with its span; plus diagnostics
        (E020-E036) appended to the caller's list.
Invariants: pure (never mutates its input); reports every problem it finds rather than the first; an
invalid field is left out of `values`, so later passes see only well-typed data.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType

from nemoc.dsl import ast
from nemoc.dsl.diagnostics import Diagnostic, Note, Span
from nemoc.dsl.schema import (BLOCKS, CALLS, DIMENSIONAL, STAGE_PARAMS, UNIT_KIND_OF_SUFFIX, UNITS, BlockDef,
                              FieldDef, Type, all_stage_param_names, fields_of)


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to another declaration (`web` in `data = [web]`), resolved by the lowering."""

    name: str
    span: Span = field(compare=False)


@dataclass(frozen=True, slots=True)
class CallValue:
    """`adam(lr = 3e-4)` -> CallValue("adam", {"lr": 0.0003}); only the arguments written appear."""

    func: str
    args: Mapping[str, object]
    spans: Mapping[str, Span] = field(compare=False, default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Checked:
    """One checked block: the values and spans of the fields written, and its checked sub-blocks."""

    kind: str
    name: str | None
    after: tuple[Ref, ...]
    values: Mapping[str, object]
    spans: Mapping[str, Span]
    blocks: tuple[Checked, ...]
    span: Span
    head: Span
    written: frozenset[str] = frozenset()  # every field key written, including invalid ones

    def sub(self, kind: str) -> Checked | None:
        return next((b for b in self.blocks if b.kind == kind), None)


INVALID = object()


def suggest(word: str, candidates) -> str | None:
    """`did you mean` candidate (difflib, cutoff 0.6), or None."""
    candidates = list(candidates)
    # ratio = 2 * matches / (len(word) + len(candidate)) < 0.6 whenever len(word) > 2.4 x len(candidate):
    # skip difflib then (on a 1 MB string it builds index tables of hundreds of MB for nothing).
    if not candidates or len(word) > 3 * max(len(c) for c in candidates):
        return None
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(word: str, candidates) -> str | None:
    match = suggest(word, candidates)
    return f"did you mean `{match}`?" if match else None


# ------------------------------------------------------------------------------------------ blocks


def check_block(block: ast.Block, diags: list[Diagnostic], *, stage_kind: str | None = None,
                where: str = "experiment") -> Checked:
    """Check one block (and its sub-blocks) against the schema for `block.kind.value`."""
    kind = block.kind.value
    bdef = BLOCKS[kind]
    _check_header(block, bdef, diags, where)
    if kind == "stage" and stage_kind is None:
        stage_kind = _stage_kind(block)
    defs = {f.name: f for f in fields_of(kind, stage_kind)}
    values, spans, seen = {}, {}, {}
    for f in block.fields:
        key = f.key.value
        if key in seen:
            diags.append(Diagnostic("E022", f"duplicate field `{key}` in `{block.title}`", f.key.span,
                                    notes=(Note(f"`{key}` first set here", seen[key]),)))
            continue
        seen[key] = f.key.span
        fdef = defs.get(key)
        if fdef is None:
            diags.append(_unknown_field(f, block, defs, stage_kind))
            continue
        value = check_value(f.value, fdef.type, key, diags, auto=fdef.auto)
        if value is not INVALID:
            values[key], spans[key] = value, f.span
    subs = _check_sub_blocks(block, bdef, diags, stage_kind)
    return Checked(kind, block.name.value if block.name else None,
                   tuple(Ref(a.value, a.span) for a in block.after), MappingProxyType(values),
                   MappingProxyType(spans), subs, block.span, block.head, frozenset(seen))


def _stage_kind(block: ast.Block) -> str | None:
    for f in block.fields:
        if f.key.value == "kind" and isinstance(f.value, ast.Name) and f.value.value in STAGE_PARAMS:
            return f.value.value
    if block.name and block.name.value in STAGE_PARAMS:
        return block.name.value
    return None


def _check_header(block: ast.Block, bdef: BlockDef, diags: list[Diagnostic], where: str) -> None:
    name_rule = "required" if where == "top level" and bdef.template else bdef.name
    if block.name is None and name_rule == "required":
        example = {"model": "model llama3_8b { }", "data": "data web { path = \"...\" }",
                   "stage": "stage pretrain { }"}.get(bdef.kind, f"{bdef.kind} NAME {{ }}")
        diags.append(Diagnostic("E024", f"`{bdef.kind}` needs a name here", block.head,
                                hint=f"write e.g. `{example}`"))
    if block.name is not None and name_rule == "forbidden":
        diags.append(Diagnostic("E024", f"`{bdef.kind}` takes no name", block.name.span,
                                hint=f"write `{bdef.kind} {{ ... }}`"))
    if block.after and not bdef.after:
        diags.append(Diagnostic("E024", f"only stages take `after`; `{bdef.kind}` does not", block.after[0].span))


def _check_sub_blocks(block: ast.Block, bdef: BlockDef, diags: list[Diagnostic],
                      stage_kind: str | None) -> tuple[Checked, ...]:
    out, seen = [], {}
    for sub in block.blocks:
        kind = sub.kind.value
        if kind not in bdef.blocks:
            diags.append(_unknown_block(sub, block, bdef))
            continue
        key = (kind, sub.name.value if (sub.name and BLOCKS[kind].repeat) else None)
        if key in seen:
            what = f"{kind} {key[1]}" if key[1] else kind
            diags.append(Diagnostic("E023", f"duplicate `{what}` block in `{block.title}`", sub.head,
                                    notes=(Note(f"`{what}` first declared here", seen[key]),)))
            continue
        seen[key] = sub.head
        out.append(check_block(sub, diags, stage_kind=stage_kind if kind != "stage" else None,
                               where=block.kind.value))
    return tuple(out)


def _unknown_field(f: ast.Field, block: ast.Block, defs: Mapping[str, FieldDef], stage_kind: str | None) -> Diagnostic:
    key = f.key.value
    params = all_stage_param_names()
    if block.kind.value == "stage" and key in params:
        kinds = ", ".join(f"`{k}`" for k in params[key])
        this = f"this stage's kind is `{stage_kind}`" if stage_kind else "this stage has no valid `kind`"
        return Diagnostic("E021", f"`{key}` is not a field of a `{stage_kind or '?'}` stage", f.key.span,
                          hint=f"`{key}` belongs to {kinds} stages; {this}")
    if key in BLOCKS and key not in defs:
        return Diagnostic("E021", f"`{key}` is a block, not a field, in `{block.title}`", f.key.span,
                          hint=f"write `{key} {{ ... }}`" if key in BLOCKS[block.kind.value].blocks else None)
    hint = did_you_mean(key, defs)
    if hint is None:
        hint = "known fields: " + ", ".join(f"`{d}`" for d in defs)
    return Diagnostic("E021", f"unknown field `{key}` in `{block.title}`", f.key.span, hint=hint)


def _unknown_block(sub: ast.Block, parent: ast.Block, bdef: BlockDef) -> Diagnostic:
    kind = sub.kind.value
    if kind in BLOCKS:
        return Diagnostic("E020", f"a `{kind}` block cannot appear inside `{parent.title}`", sub.kind.span,
                          hint=("allowed here: " + ", ".join(f"`{b}`" for b in bdef.blocks)) if bdef.blocks
                          else f"`{parent.title}` holds only fields")
    hint = did_you_mean(kind, bdef.blocks) or (
        "allowed here: " + ", ".join(f"`{b}`" for b in bdef.blocks) if bdef.blocks else None)
    if bdef.field(kind):
        hint = f"`{kind}` is a field: write `{kind} = ...`"
    return Diagnostic("E020", f"unknown block `{kind}` in `{parent.title}`", sub.kind.span, hint=hint)


def missing_required(checked: Checked, defs, diags: list[Diagnostic], what: str) -> None:
    """E025 for every required field of `defs` that `checked` lacks (one diagnostic listing them all)."""
    missing = [d.name for d in defs if d.required and d.name not in checked.written]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        diags.append(Diagnostic("E025", f"`{what}` is missing required field{'s' * (len(missing) > 1)} {names}",
                                checked.head))


# ------------------------------------------------------------------------------------------ values


def describe_found(expr: ast.Expr) -> str:
    """How a diagnostic names what the user wrote: `the string "x"`, `the name `web``, `a list`."""
    if isinstance(expr, ast.String):
        return f'the string "{expr.value}"' if len(expr.value) < 30 else "a string"
    if isinstance(expr, ast.Name):
        return f"the name `{expr.value}`"
    if isinstance(expr, ast.Bool):
        return f"`{str(expr.value).lower()}`"
    if isinstance(expr, ast.Auto):
        return "`auto`"
    if isinstance(expr, ast.ListValue):
        return "a list"
    if isinstance(expr, ast.Call):
        return f"the call `{expr.func.value}(...)`"
    if isinstance(expr, ast.Number):
        return f"`{_show(expr)}`"
    return "an expression"


def _wrong_type(expr: ast.Expr, t: Type, key: str) -> Diagnostic:
    return Diagnostic("E030", f"`{key}` expects {t.describe()}, found {describe_found(expr)}", expr.span)


def check_value(expr: ast.Expr, t: Type, key: str, diags: list[Diagnostic], *, auto: bool = False) -> object:
    """The Python value of `expr` as type `t`, or INVALID after appending a diagnostic."""
    if isinstance(expr, ast.Auto):
        if t.name == "enum" and "auto" in t.choices:
            return "auto"
        if auto:
            return None
        diags.append(Diagnostic("E030", f"`{key}` cannot be `auto`; it expects {t.describe()}", expr.span))
        return INVALID
    checker = _CHECKERS[t.name]
    return checker(expr, t, key, diags)


def _check_bool(expr, t, key, diags):
    if isinstance(expr, ast.Bool):
        return expr.value
    diags.append(_wrong_type(expr, t, key))
    return INVALID


def _check_str(expr, t, key, diags):
    if isinstance(expr, ast.String):
        return expr.value
    hint = f'quote it: `{key} = "{expr.value}"`' if isinstance(expr, ast.Name) else None
    d = _wrong_type(expr, t, key)
    diags.append(Diagnostic(d.code, d.message, d.span, hint=hint))
    return INVALID


def _check_id(expr, t, key, diags):
    if isinstance(expr, (ast.String, ast.Name)):
        return expr.value
    diags.append(_wrong_type(expr, t, key))
    return INVALID


def _check_enum(expr, t, key, diags):
    if isinstance(expr, ast.Name) and expr.value in t.choices:
        return expr.value
    if isinstance(expr, (ast.Name, ast.String)):
        hint = did_you_mean(expr.value, t.choices)
        if isinstance(expr, ast.String) and expr.value in t.choices:
            hint = f"write it without quotes: `{key} = {expr.value}`"
        diags.append(Diagnostic("E033", f"`{key}` must be {t.describe()}, found {describe_found(expr)}",
                                expr.span, hint=hint))
        return INVALID
    diags.append(_wrong_type(expr, t, key))
    return INVALID


def _check_ref(expr, t, key, diags):
    if isinstance(expr, ast.Name):
        return Ref(expr.value, expr.span)
    diags.append(_wrong_type(expr, t, key))
    return INVALID


def _check_list(expr, t, key, diags):
    if not isinstance(expr, ast.ListValue):
        if t.item.name == "ref" and isinstance(expr, ast.Name):
            diags.append(Diagnostic("E030", f"`{key}` expects {t.describe()}, found {describe_found(expr)}",
                                    expr.span, hint=f"write a list: `{key} = [{expr.value}]`"))
        else:
            diags.append(_wrong_type(expr, t, key))
        return INVALID
    if t.length is not None and len(expr.items) != t.length:
        diags.append(Diagnostic("E030", f"`{key}` expects {t.length} items, found {len(expr.items)}", expr.span))
        return INVALID
    items = [check_value(item, t.item, key, diags) for item in expr.items]
    return INVALID if any(i is INVALID for i in items) else tuple(items)


def _check_int_or_list(expr, t, key, diags):
    if isinstance(expr, ast.ListValue):
        return _check_list(expr, Type("list", item=t.item), key, diags)
    if isinstance(expr, (ast.Number, ast.BinOp, ast.Neg)):
        return _check_number(expr, Type("int", minimum=t.minimum, maximum=t.maximum), key, diags)
    diags.append(_wrong_type(expr, t, key))
    return INVALID


def _check_call(expr, t, key, diags):
    if isinstance(expr, ast.Name):
        expr = ast.Call(expr, (), expr.span)
    if not isinstance(expr, ast.Call):
        diags.append(_wrong_type(expr, t, key))
        return INVALID
    func = expr.func.value
    if func not in t.choices:
        diags.append(Diagnostic("E034", f"`{key}` must be {t.describe()}, found `{func}`", expr.func.span,
                                hint=did_you_mean(func, t.choices)))
        return INVALID
    defs = {d.name: d for d in CALLS[func]}
    args, spans, seen, ok = {}, {}, {}, True
    for arg in expr.args:
        name = arg.key.value
        if name == "" and arg is not expr.args[0]:
            diags.append(Diagnostic("E034", f"only the first argument to `{func}` may be written without a name",
                                    arg.span, hint="write `NAME = value`"))
            ok = False
            continue
        if name == "":  # `hf("DIR")`: the first parameter
            if not defs:
                diags.append(Diagnostic("E034", f"`{func}` takes no arguments", arg.span))
                ok = False
                continue
            name = next(iter(defs))
        if name in seen:
            diags.append(Diagnostic("E022", f"duplicate argument `{name}` to `{func}`", arg.key.span,
                                    notes=(Note(f"`{name}` first given here", seen[name]),)))
            ok = False
            continue
        seen[name] = arg.key.span
        d = defs.get(name)
        if d is None:
            known = ", ".join(f"`{k}`" for k in defs) or "none"
            diags.append(Diagnostic("E034", f"`{func}` has no argument `{name}`", arg.key.span,
                                    hint=did_you_mean(name, defs) or f"its arguments: {known}"))
            ok = False
            continue
        value = check_value(arg.value, d.type, f"{func}.{name}", diags)
        if value is INVALID:
            ok = False
        else:
            args[name], spans[name] = value, arg.span
    missing = [d.name for d in CALLS[func] if d.required and d.name not in seen]
    if ok and missing:
        diags.append(Diagnostic("E025", f"`{func}` needs " + ", ".join(f"`{m}`" for m in missing), expr.span,
                                hint=f"write e.g. `{func}(\"...\")`"))
        ok = False
    return CallValue(func, MappingProxyType(args), MappingProxyType(spans)) if ok else INVALID


# ------------------------------------------------------------------------------------------ numbers


class _NumberError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


def _check_number(expr, t, key, diags):
    if not isinstance(expr, (ast.Number, ast.BinOp, ast.Neg)):
        diags.append(_wrong_type(expr, t, key))
        return INVALID
    try:
        value, dim = _evaluate(expr, t, key)
    except _NumberError as err:
        diags.append(err.diagnostic)
        return INVALID
    want = t.unit if t.unit in DIMENSIONAL else ""
    if dim != want:
        diags.append(_unit_mismatch(expr, t, key, dim, want))
        return INVALID
    return _finish(expr, t, key, value, diags)


def _finish(expr, t, key, value: Fraction, diags):
    if t.name == "int" and value.denominator != 1:
        diags.append(Diagnostic("E036", f"`{key}` expects {t.describe()}, but `{_show(expr)}` = {float(value):g} "
                                "is not a whole number", expr.span))
        return INVALID
    if t.minimum is not None and (value < t.minimum or (t.exclusive_min and value == t.minimum)):
        bound = f"> {t.minimum:g}" if t.exclusive_min else f">= {t.minimum:g}"
        diags.append(Diagnostic("E032", f"`{key}` must be {bound}, found {float(value):g}", expr.span))
        return INVALID
    if t.maximum is not None and (value > t.maximum or (t.exclusive_max and value == t.maximum)):
        bound = f"< {t.maximum:g}" if t.exclusive_max else f"<= {int(t.maximum):,}" if t.maximum >= 1000 \
            else f"<= {t.maximum:g}"
        diags.append(Diagnostic("E032", f"`{key}` must be {bound}, found {float(value):g}", expr.span,
                                hint=t.range_hint or "this bound is far beyond any real experiment; check the value"))
        return INVALID
    if abs(value) > MAX_MAGNITUDE:
        diags.append(_out_of_range(expr, key))
        return INVALID
    if t.name == "int" or (t.unit == "duration" and value.denominator == 1):
        return int(value)  # durations in whole seconds stay integers (Slurm --time)
    return float(value)


def _show(expr) -> str:
    """`expr` as written, for a message between backticks: a 5,000-digit literal or a 20,000-term sum is
    named by its start and length, not printed whole."""
    from nemoc.dsl.format import format_expr

    text = format_expr(expr)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text):,} characters)"


def _unit_mismatch(expr, t, key, dim, want) -> Diagnostic:
    if want:
        return Diagnostic("E031", f"`{key}` needs a unit: it expects {t.describe()}", expr.span,
                          hint=f"units: {', '.join(s for s in UNITS[want] if s)}")
    return Diagnostic("E031", f"`{key}` expects {t.describe()}, found a {dim}", expr.span,
                      hint=f"`{key}` takes no {dim} unit")


def _evaluate(expr, t: Type, key: str) -> tuple[Fraction, str]:
    """Exact value and dimension ("" or size/bandwidth/duration) of a numeric expression.

    A chain of left-associative operators (`1 + 2 + ... + n`, any length) is walked in a loop along
    its left spine; only brackets and unary `-` recurse, and the parser bounds those (MAX_NESTING)."""
    if isinstance(expr, ast.Number):
        return _literal(expr, t, key)
    if isinstance(expr, ast.Neg):
        value, dim = _evaluate(expr.operand, t, key)
        return -value, dim
    if isinstance(expr, ast.BinOp):
        spine = []
        while isinstance(expr, ast.BinOp):
            spine.append(expr)
            expr = expr.left
        acc = _evaluate(expr, t, key)
        for node in reversed(spine):
            acc = _binop(node, acc, _evaluate(node.right, t, key), key)
        return acc
    raise _NumberError(Diagnostic("E030", f"`{key}` expects {t.describe()}; arithmetic works on numbers only, "
                                  f"found {describe_found(expr)}", expr.span))


MAX_MAGNITUDE = 10**18  # larger than any count, size or rate an experiment needs; keeps floats finite
_MAX_EXPONENT = 30
_MAX_DIGITS = 64  # digits in one literal: far beyond 1e18 at full precision, far below int()'s 4,300


def _literal(expr: ast.Number, t: Type, key: str) -> tuple[Fraction, str]:
    mantissa, _, exponent = expr.magnitude.lower().partition("e")
    # Lengths first: int() and Fraction() refuse strings over 4,300 digits (and are slow near it).
    if len(mantissa) > _MAX_DIGITS or len(exponent) > 8 or (exponent and abs(int(exponent)) > _MAX_EXPONENT):
        raise _NumberError(_out_of_range(expr, key))
    magnitude, suffix = Fraction(expr.magnitude), expr.unit
    table = UNITS[t.unit] if t.unit in UNITS else UNITS[""]
    if suffix == "":
        return magnitude, ""  # a plain number; a dimensional field then says it needs a unit
    if suffix in table:
        dim = t.unit if (t.unit in DIMENSIONAL and suffix) else ""
        return magnitude * Fraction(table[suffix]), dim
    kind = UNIT_KIND_OF_SUFFIX.get(suffix)
    if kind is None:
        units = ", ".join(s for s in table if s) or "none"
        raise _NumberError(Diagnostic("E031", f"unknown unit `{suffix}` in `{expr.text}`", expr.span,
                                      hint=f"`{key}` expects {t.describe()}; its units: {units}"))
    noun = {"count": "a count", "size": "a size", "bandwidth": "a bandwidth", "duration": "a duration",
            "percent": "a percentage"}[kind]
    hint = _unit_hint(t)
    if kind == "count" and t.unit == "":
        hint = f"write the exact number (`{expr.magnitude}{suffix}` would be decimal, e.g. 8K = 8000, not 8192)"
    raise _NumberError(Diagnostic("E031", f"`{key}` expects {t.describe()}, but `{expr.text}` is {noun}",
                                  expr.span, hint=hint))


def _out_of_range(expr, key: str) -> Diagnostic:
    return Diagnostic("E032", f"`{key}`: `{_show(expr)}` is out of range: number too large or too small "
                      "(magnitudes run from 1e-18 to 1e18)", expr.span)


def _unit_hint(t: Type) -> str:
    units = [s for s in (UNITS.get(t.unit) or {}) if s]
    return f"allowed units: {', '.join(units)}" if units else "write a plain number"


def _binop(expr: ast.BinOp, left: tuple[Fraction, str], right: tuple[Fraction, str], key: str) -> tuple[Fraction, str]:
    """`left op right` (both already evaluated), range-checked like every intermediate value."""
    value, dim = _binop_unchecked(expr, left, right)
    if abs(value) > MAX_MAGNITUDE or (value and abs(value) < Fraction(1, MAX_MAGNITUDE)):
        raise _NumberError(_out_of_range(expr, key))
    return value, dim


def _binop_unchecked(expr: ast.BinOp, left, right) -> tuple[Fraction, str]:
    (a, da), (b, db) = left, right
    if expr.op in "+-":
        if da != db:
            raise _NumberError(Diagnostic("E035", f"cannot {'add' if expr.op == '+' else 'subtract'} "
                                          f"{da or 'a plain number'} and {db or 'a plain number'}", expr.span))
        return (a + b if expr.op == "+" else a - b), da
    if expr.op == "*":
        if da and db:
            raise _NumberError(Diagnostic("E035", f"cannot multiply a {da} by a {db}", expr.span))
        return a * b, da or db
    if b == 0:
        raise _NumberError(Diagnostic("E035", "division by zero", expr.right.span))
    if db and db != da:
        raise _NumberError(Diagnostic("E035", f"cannot divide {da or 'a plain number'} by a {db}", expr.span))
    return a / b, ("" if db else da)


_CHECKERS = {
    "bool": _check_bool, "str": _check_str, "id": _check_id, "enum": _check_enum, "ref": _check_ref,
    "list": _check_list, "int_or_list": _check_int_or_list, "call": _check_call, "int": _check_number,
    "float": _check_number,
}
