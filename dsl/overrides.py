"""`--set KEY=VALUE` overrides: parsed with the language's value grammar, applied to the experiment AST.

Input:  the experiment `ast.Block` and the `--set` strings in command-line order.
Output: a new experiment block with each override's field replaced (or added, creating a missing
        singleton block such as `parallel`), the pseudo-sources `<--set N>` -> text for rendering, and
        diagnostics (E050 malformed or unknown path or call argument, E010-E016 syntax errors in a
        value, W050 a call replaced by another function).
Invariants: pure; an override's spans point into its own pseudo-file, so a bad value is reported with
a caret like any other; later overrides of the same key win; the schema checks the result exactly
as if the user had written it in the file.

Paths: `parallel.tensor`, `model.layers`, `cluster.nodes`, `precision`, `data.web.path`,
`stage.pretrain.steps`, `stage.pretrain.checkpoint.every`, `stage.sft.parallel.tensor`, and one
argument of a call-valued field: `stage.sft.optimizer.lr`, `cluster.scheduler.time`.

Calls are never reset by an override. `stage.sft.optimizer.lr=2e-5` changes `lr` and keeps every
other argument the file (or the template the block extends) wrote; when the file writes no call
there, it starts from the first of the field's functions that takes the argument (`adam`, `cosine`,
`lora`, `slurm`...: the defaults). A whole call `--set "stage.sft.optimizer=adam(lr = 2e-5)"` is
merged the same way with the file's call of the same function: the arguments it names win, the
others stay. Only a call of a different function (`sgd(...)` over the file's `adam(...)`) replaces
the file's call, and says so (W050, naming the arguments dropped).
"""

from __future__ import annotations

import dataclasses
import re

from nemoc.dsl import ast
from nemoc.dsl.diagnostics import Diagnostic, DiagnosticError, Note, Severity, Span
from nemoc.dsl.parser import parse_value
from nemoc.dsl.schema import BLOCKS, CALLS, STAGE_PARAMS, FieldDef
from nemoc.dsl.typecheck import did_you_mean

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")


def pseudo_path(index: int) -> str:
    """The pseudo-file name of the `index`-th (1-based) override."""
    return f"<--set {index}>"


def apply_overrides(experiment: ast.Block, sets: tuple[str, ...], templates=None):
    """Returns (new experiment block, {pseudo path: text}, diagnostics).

    `templates` maps (kind, name) -> the top-level template block, so a call the experiment's block
    inherits from its template (`cluster big { }` extending `cluster big { scheduler = slurm(...) }`)
    is the one an override merges with."""
    sources, diags = {}, []
    ctx = _Context(templates or {}, diags)
    for index, text in enumerate(sets, start=1):
        path = pseudo_path(index)
        sources[path] = text
        parsed = _parse_override(text, path, diags)
        if parsed is None:
            continue
        segments, fld = parsed
        try:
            experiment = _apply(experiment, segments, fld, ctx)
        except _PathError as err:
            diags.append(err.diagnostic)
    return experiment, sources, diags


class _PathError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


@dataclasses.dataclass(frozen=True)
class _Context:
    templates: object  # (kind, name) -> ast.Block
    diags: list[Diagnostic]


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


def _apply(block: ast.Block, segments: list[ast.Name], fld: ast.Field, ctx: _Context) -> ast.Block:
    if len(segments) == 1:
        return _set_field(block, fld, ctx)
    head, rest = segments[0], segments[1:]
    kind = head.value
    allowed = BLOCKS[block.kind.value].blocks if block.kind.value in BLOCKS else ()
    if kind not in allowed and _field_def(block, kind) is not None:
        return _set_argument(block, head, rest, fld, ctx)
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
    members[index] = _apply(members[index], rest, fld, ctx)
    return dataclasses.replace(block, members=tuple(members))


# ------------------------------------------------------------------------------------------- calls


def _field_def(block: ast.Block, key: str) -> FieldDef | None:
    """The schema of field `key` of `block` (a stage's kind-specific fields included: the checker says
    later whether this stage's kind takes it)."""
    bdef = BLOCKS.get(block.kind.value)
    if bdef is None:
        return None
    extra = tuple(f for params in STAGE_PARAMS.values() for f in params) if bdef.kind == "stage" else ()
    return next((f for f in bdef.fields + extra if f.name == key), None)


def _written(block: ast.Block, key: str, ctx: _Context) -> ast.Field | None:
    """The field `key` as the file wrote it: in the block, else in the template the block extends."""
    own = next((f for f in block.fields if f.key.value == key), None)
    if own is not None or block.name is None:
        return own
    template = ctx.templates.get((block.kind.value, block.name.value))
    return None if template is None else next((f for f in template.fields if f.key.value == key), None)


def _as_call(expr: ast.Expr) -> ast.Call | None:
    """`adam(...)`, or a bare function name `none` / `adam` (a call without arguments)."""
    if isinstance(expr, ast.Call):
        return expr
    if isinstance(expr, ast.Name) and expr.value in CALLS:
        return ast.Call(expr, (), expr.span)
    return None


def _set_field(block: ast.Block, fld: ast.Field, ctx: _Context) -> ast.Block:
    """Replace (or add) `fld`; a call of the same function as the file's is merged with it."""
    fdef = _field_def(block, fld.key.value)
    new_call = _as_call(fld.value) if fdef is not None and fdef.type.name == "call" else None
    base = _written(block, fld.key.value, ctx) if new_call is not None else None
    old_call = _as_call(base.value) if base is not None else None
    if old_call is not None and old_call.func.value == new_call.func.value:
        fld = dataclasses.replace(fld, value=_merge_args(old_call, new_call.args))
    elif old_call is not None and _dropped(old_call, new_call):
        dropped = ", ".join(f"`{a}`" for a in _dropped(old_call, new_call))
        ctx.diags.append(Diagnostic(
            "W050", f"`{fld.key.value} = {new_call.func.value}(...)` replaces the file's "
                    f"`{old_call.func.value}(...)`; its arguments {dropped} are dropped",
            new_call.func.span, Severity.WARNING, notes=(Note("the file's call", old_call.span),),
            hint=f"an override merges only with a call of the same function (`{old_call.func.value}`)"))
    return _replace_field(block, fld)


def _dropped(old: ast.Call, new: ast.Call) -> list[str]:
    """The old call's arguments the new one does not set."""
    kept = {a.key.value for a in new.args}
    return [a.key.value for a in old.args if a.key.value not in kept]


def _replace_field(block: ast.Block, fld: ast.Field) -> ast.Block:
    members = [m for m in block.members if not (isinstance(m, ast.Field) and m.key.value == fld.key.value)]
    return dataclasses.replace(block, members=tuple(members) + (fld,))


def _merge_args(call: ast.Call, args: tuple[ast.Arg, ...]) -> ast.Call:
    """`call` with each of `args` replacing the argument of the same name (or appended)."""
    names = {a.key.value for a in args}
    kept = tuple(a for a in call.args if a.key.value not in names)
    return dataclasses.replace(call, args=kept + tuple(args))


def _set_argument(block: ast.Block, head: ast.Name, rest: list[ast.Name], fld: ast.Field,
                  ctx: _Context) -> ast.Block:
    """`FIELD.ARG=VALUE`: one argument of the call-valued field FIELD, the call's others kept."""
    key, fdef = head.value, _field_def(block, head.value)
    if fdef.type.name != "call":
        raise _PathError(Diagnostic("E050", f"`{key}` in `{block.title}` is {fdef.type.describe()}, not a call "
                                    "or a block", head.span, hint=f"write `--set ...{key}=VALUE`"))
    if len(rest) > 1:
        raise _PathError(Diagnostic("E050", f"a call argument has no fields: `{rest[0].value}.{rest[1].value}`",
                                    rest[1].span, hint=f"write `--set ...{key}.{rest[0].value}=VALUE`"))
    arg = rest[0]
    base = _written(block, key, ctx)
    call = _as_call(base.value) if base is not None else None
    if base is not None and call is None:
        raise _PathError(Diagnostic("E050", f"`{block.title}` sets `{key}` to no call, so it has no argument "
                                    f"`{arg.value}`", arg.span, notes=(Note(f"`{key}` is set here", base.span),)))
    if call is None:  # not written: the field's first function that takes the argument (its default)
        func = next((f for f in fdef.type.choices if any(d.name == arg.value for d in CALLS[f])), None)
        if func is None:
            raise _PathError(_unknown_argument(arg, fdef.type.choices[0], key))
        call = ast.Call(ast.Name(func, head.span), (), head.span)
    elif not any(d.name == arg.value for d in CALLS.get(call.func.value, ())):
        raise _PathError(_unknown_argument(arg, call.func.value, key))
    merged = _merge_args(call, (ast.Arg(arg, fld.value, fld.span),))
    span = base.span if any(f is base for f in block.fields) else fld.span
    return _replace_field(block, ast.Field(ast.Name(key, head.span), merged, span))


def _unknown_argument(arg: ast.Name, func: str, key: str) -> Diagnostic:
    accepted = [d.name for d in CALLS.get(func, ())]
    listed = ", ".join(f"`{a}`" for a in accepted) or "none"
    near = did_you_mean(arg.value, accepted)
    return Diagnostic("E050", f"`{func}` (the `{key}`) has no argument `{arg.value}`", arg.span,
                      hint=(near + " " if near else "") + f"`{func}` takes: {listed}")
