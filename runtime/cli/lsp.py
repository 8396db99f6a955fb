"""`nemoc lsp`: a language server for `.nemo` files (Language Server Protocol over stdio, on pygls).

Input:  an editor speaking LSP on stdin/stdout (JSON-RPC with Content-Length framing).
Output: `textDocument/publishDiagnostics` on open, change and save, with the codes, messages and spans of
        `nemoc check` (the same `check_file`, run on the unsaved buffer; imports are read from disk);
        hover docs for fields, call arguments, blocks, functions and model presets (from
        `nemoc.dsl.schema` as `docs/language.md` renders them); completion of the enclosing block's
        fields and sub-blocks, a call's arguments, enum words and functions after `=`, model presets
        after `model`, stage names after `after`, data names inside `data = [...]`.
Invariants: the editor's text is never required to parse: the cursor's context (enclosing blocks, call,
field) comes from a tolerant scan of the tokens before it (`context_at`), so completion works mid-edit;
a bug in the checker is reported as the E000 diagnostic, never as a dead server.

pygls and lsprotocol are the optional extra `lsp` (`pip install 'nemoc[lsp]'`); the scan, hover and
completion logic below is plain Python and imports neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import click

from nemoc.dsl.schema import BLOCKS, CALLS, STAGE_PARAMS, FieldDef, fields_of

_TOKEN = re.compile(r"""
    (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\[^\n])*"?)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:[A-Za-z]+(?:/[A-Za-z]+)?|%)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*)
  | (?P<punct>[{}\[\](),=])
  | (?P<other>[^\s])
""", re.VERBOSE)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*")


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    start: int  # offset in the text


@dataclass
class Frame:
    """One open bracket: a block `{`, a call `(` or a list `[`."""

    bracket: str
    kind: str | None = None  # block kind
    name: str | None = None  # block name
    func: str | None = None  # call function
    key: str | None = None  # the field whose value the call / list is
    stage_kind: str | None = None


@dataclass
class Context:
    """Where an offset is: the open frames, the word being typed, what precedes it."""

    frames: list[Frame] = field(default_factory=list)
    previous: list[Token] = field(default_factory=list)  # significant tokens before the word, last first
    word: str = ""

    @property
    def block(self) -> Frame | None:
        return next((f for f in reversed(self.frames) if f.bracket == "{"), None)

    @property
    def innermost(self) -> Frame | None:
        return self.frames[-1] if self.frames else None


def tokens(text: str) -> list[Token]:
    return [Token(m.lastgroup, m.group(), m.start()) for m in _TOKEN.finditer(text) if m.lastgroup != "comment"]


def _header(before: list[Token]) -> tuple[str | None, str | None]:
    """(kind, name) of a block from the tokens before its `{`: `stage dpo after sft, x {` -> (stage, dpo)."""
    names: list[str] = []
    i = len(before) - 1
    while i >= 0 and (before[i].kind == "name" or before[i].text == ","):
        if before[i].kind == "name":
            names.insert(0, before[i].text)
        i -= 1
    if i >= 0 and before[i].text == "=" and names:  # `precision = bf16 stage x {`: bf16 is a value
        names = names[1:]
    if "after" in names[1:]:
        names = names[:names.index("after", 1)]
    names = names[-2:] if len(names) > 2 else names
    if not names:
        return None, None
    if len(names) == 2 and names[0] not in BLOCKS and names[1] in BLOCKS:  # `x = web data {`
        return names[1], None
    return names[0], names[1] if len(names) == 2 else None


def _stage_kind(name: str | None, body: list[Token]) -> str | None:
    for a, b, c in zip(body, body[1:], body[2:]):
        if a.text == "kind" and b.text == "=" and c.text in STAGE_PARAMS:
            return c.text
    return name if name in STAGE_PARAMS else None


def context_at(text: str, offset: int) -> Context:
    """The context of `offset` from a tolerant scan of `text[:offset]` (need not parse)."""
    toks = tokens(text[:offset])
    ctx = Context()
    if toks and toks[-1].kind == "name" and toks[-1].start + len(toks[-1].text) == offset:
        ctx.word = toks.pop().text
    opened: list[int] = []  # token index of each open frame's bracket
    for i, tok in enumerate(toks):
        if tok.text in "{[(" and tok.kind == "punct":
            before = toks[:i]
            if tok.text == "{":
                kind, name = _header(before)
                ctx.frames.append(Frame("{", kind=kind, name=name))
            else:
                func = before[-1].text if tok.text == "(" and before and before[-1].kind == "name" else None
                key_at = len(before) - (2 if func else 1)
                key = before[key_at - 1].text if key_at >= 1 and before[key_at].text == "=" else None
                ctx.frames.append(Frame(tok.text, func=func, key=key))
            opened.append(i)
        elif tok.text in "}])" and tok.kind == "punct" and ctx.frames:
            ctx.frames.pop()
            opened.pop()
    for frame, start in zip(ctx.frames, opened):
        if frame.bracket == "{" and frame.kind == "stage":
            frame.stage_kind = _stage_kind(frame.name, _frame_tokens(toks, start) + tokens(text[offset:]))
    ctx.previous = list(reversed(toks))
    return ctx


def _frame_tokens(toks: list[Token], start: int) -> list[Token]:
    """The tokens of the frame opened at `start` at its own depth (not those of nested frames)."""
    out, depth = [], 0
    for tok in toks[start + 1:]:
        if tok.kind == "punct" and tok.text in "{[(":
            depth += 1
        elif tok.kind == "punct" and tok.text in "}])":
            depth -= 1
        elif depth == 0:
            out.append(tok)
    return out


# ------------------------------------------------------------------------------------------- schema


def block_fields(frame: Frame | None) -> tuple[FieldDef, ...]:
    if frame is None or frame.kind not in BLOCKS:
        return ()
    if frame.kind == "stage" and frame.stage_kind is None:  # kind unknown yet: offer every kind's fields
        return BLOCKS["stage"].fields + tuple({f.name: f for p in STAGE_PARAMS.values() for f in p}.values())
    return fields_of(frame.kind, frame.stage_kind)


def _field(frame: Frame | None, key: str) -> FieldDef | None:
    return next((f for f in block_fields(frame) if f.name == key), None)


def declared_names(text: str, kind: str) -> list[str]:
    """Names of `kind` blocks in the text (`stage NAME`, `data NAME`), in order, without repeats."""
    toks = tokens(text)
    names = [b.text for a, b, c in zip(toks, toks[1:], toks[2:])
             if a.text == kind and b.kind == "name" and (c.text == "{" or c.text == "after")]
    return list(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class Item:
    """One completion: label, what it is (field, block, function, value, preset, reference), detail, doc."""

    label: str
    kind: str
    detail: str = ""
    doc: str = ""
    insert: str | None = None


def complete(text: str, offset: int) -> list[Item]:
    """What may be written at `offset`."""
    from nemoc.dsl.docgen import field_markdown

    ctx = context_at(text, offset)
    prev = ctx.previous[0] if ctx.previous else None
    inner, block = ctx.innermost, ctx.block
    if prev is not None and prev.text == "model" and (inner is None or inner.bracket == "{"):
        return _presets()
    if prev is not None and (prev.text == "after" or (prev.text == "," and _in_after(ctx))):
        own = _declaring(ctx)  # a stage does not run after itself
        return [Item(n, "reference", "stage") for n in declared_names(text, "stage") if n != own]
    if inner is not None and inner.bracket == "[" and inner.key == "data":
        return [Item(n, "reference", "data set") for n in declared_names(text, "data")]
    if inner is not None and inner.bracket == "(" and inner.func in CALLS:
        if prev is not None and prev.text == "=" and len(ctx.previous) > 1:
            return _values(next((f for f in CALLS[inner.func] if f.name == ctx.previous[1].text), None))
        return [Item(f.name, "field", f"{inner.func}(...) argument", field_markdown(f, f"{inner.func}(...)"),
                     f"{f.name} = ") for f in CALLS[inner.func]]
    if prev is not None and prev.text == "=" and len(ctx.previous) > 1:
        return _values(_field(block, ctx.previous[1].text))
    if block is None:
        return [Item(k, "block", "top-level block", BLOCKS[k].doc, f"{k} ") for k in ("experiment",) +
                tuple(k for k, b in BLOCKS.items() if b.template)] + [Item("import", "keyword", "import a file")]
    owner = _title(block)
    items = [Item(f.name, "field", f.type.describe(), field_markdown(f, owner), f"{f.name} = ")
             for f in block_fields(block)]
    subs = BLOCKS[block.kind].blocks if block.kind in BLOCKS else ()
    return items + [Item(k, "block", "block", BLOCKS[k].doc) for k in subs]


def _title(frame: Frame | None) -> str:
    """`stage sft`, `parallel` (as diagnostics name a block)."""
    if frame is None or frame.kind is None:
        return "?"
    return frame.kind + (f" {frame.name}" if frame.name else "")


def _declaring(ctx: Context) -> str | None:
    """The name of the block whose `after` clause the cursor is in (`sft` in `stage sft after a, `)."""
    for tok, before in zip(ctx.previous, ctx.previous[1:]):
        if tok.text == "after":
            return before.text if before.kind == "name" else None
    return None


def _in_after(ctx: Context) -> bool:
    for tok in ctx.previous:
        if tok.text == "after":
            return True
        if tok.kind != "name" and tok.text != ",":
            return False
    return False


def _presets() -> list[Item]:
    from nemoc.compiler.catalog.models import PRESETS

    return [Item(name, "preset", _preset_line(m), m.source) for name, m in sorted(PRESETS.items())]


def _preset_line(m) -> str:
    moe = f", {m.experts} experts top-{m.top_k}" if m.experts else ""
    return f"{m.layers} layers, hidden {m.hidden}, {m.heads} heads ({m.query_groups} KV groups){moe}, vocab {m.vocab}"


def _values(fdef: FieldDef | None) -> list[Item]:
    if fdef is None:
        return []
    t = fdef.type
    words = list(t.choices) if t.name == "enum" else []
    if fdef.auto and "auto" not in words:
        words.append("auto")
    if t.name == "bool":
        words += ["true", "false"]
    items = [Item(w, "value", fdef.name) for w in words]
    if t.name == "call":
        items += [Item(f, "function", f"{f}(...)", _call_markdown(f)) for f in t.choices]
    if t.name == "id" and fdef.name == "gpu":
        from nemoc.compiler.catalog.hardware import GPUS

        items += [Item(g, "value", "accelerator") for g in GPUS]
    return items


def _call_markdown(func: str) -> str:
    args = CALLS.get(func, ())
    lines = [f"**`{func}(...)`**" + ("" if args else ": no arguments")]
    lines += [f"- `{f.name}`: {f.type.describe()}. {f.doc}" for f in args]
    return "\n".join(lines)


def hover(text: str, offset: int) -> str | None:
    """Markdown for the word at `offset`, or None."""
    from nemoc.dsl.docgen import field_markdown

    word, start, end = _word_at(text, offset)
    if word is None:
        return None
    ctx = context_at(text, start)
    after = text[end:].lstrip(" \t")
    nxt = after[:1]
    inner, block = ctx.innermost, ctx.block
    prev = ctx.previous[0].text if ctx.previous else None
    if nxt == "=" and inner is not None and inner.bracket == "(" and inner.func in CALLS:
        fdef = next((f for f in CALLS[inner.func] if f.name == word), None)
        return field_markdown(fdef, f"{inner.func}(...)") if fdef else None
    if nxt == "=":
        fdef = _field(block, word)
        return field_markdown(fdef, _title(block)) if fdef else None
    if nxt == "(" and word in CALLS:
        return _call_markdown(word)
    if prev == "model" and (inner is None or inner.bracket == "{"):
        from nemoc.compiler.catalog.models import get_preset

        m = get_preset(word)
        return f"**model preset `{word}`**: {_preset_line(m)}\n\nsource: {m.source}" if m else None
    if word in BLOCKS and (nxt == "{" or re.match(r"[A-Za-z_][\w-]*\s*(\{|after\b)", after)):
        b = BLOCKS[word]
        subs = f"\n\nblocks inside: {', '.join(f'`{s}`' for s in b.blocks)}" if b.blocks else ""
        return f"**`{word}` block**: {b.doc}\n\nfields: {', '.join(f'`{f.name}`' for f in b.fields)}{subs}"
    return None


def _word_at(text: str, offset: int) -> tuple[str | None, int, int]:
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    line_end = len(text) if line_end < 0 else line_end
    for m in _WORD.finditer(text, line_start, line_end):
        if m.start() <= offset <= m.end():
            return m.group(), m.start(), m.end()
    return None, offset, offset


def offset_of(text: str, line: int, character: int) -> int:
    """An LSP position (0-based line, UTF-16 column; nemo files are nearly always ASCII) -> text offset."""
    lines = text.split("\n")
    line = min(line, len(lines) - 1)
    return sum(len(x) + 1 for x in lines[:line]) + min(character, len(lines[line]))


# ------------------------------------------------------------------------------------------- server


def diagnostics_for(path: str, text: str):
    """{display path: [Diagnostic]}: what `nemoc check` says about `path` with `text` as its contents."""
    from nemoc.runtime.cli.lang import check_file

    diags, _ = check_file(path, (), text)
    out: dict[str, list] = {path: []}
    for d in diags:
        out.setdefault(d.span.path if d.span and not d.span.path.startswith("<") else path, []).append(d)
    return out


def build_server():
    """The pygls server (imported here: pygls is the optional extra `lsp`)."""
    import os

    from lsprotocol import types as lsp
    from pygls.lsp.server import LanguageServer
    from pygls.uris import from_fs_path, to_fs_path

    from nemoc.dsl.diagnostics import Severity

    server = LanguageServer("nemoc", _version(), text_document_sync_kind=lsp.TextDocumentSyncKind.Full)
    published: dict[str, set[str]] = {}  # root uri -> uris it published diagnostics for

    def rng(span) -> lsp.Range:
        if span is None:
            return lsp.Range(lsp.Position(0, 0), lsp.Position(0, 1))
        return lsp.Range(lsp.Position(span.line - 1, span.col - 1), lsp.Position(span.end_line - 1, span.end_col - 1))

    def convert(d) -> lsp.Diagnostic:
        severity = {Severity.ERROR: lsp.DiagnosticSeverity.Error, Severity.WARNING: lsp.DiagnosticSeverity.Warning}
        message = d.message + "".join(f"\n{label}: {v}" for label, v in (("equation", d.equation), ("hint", d.hint)) if v)
        related = [lsp.DiagnosticRelatedInformation(lsp.Location(from_fs_path(os.path.abspath(n.span.path)), rng(n.span)),
                                                    n.message)
                   for n in d.notes if n.span is not None and not n.span.path.startswith("<")]
        return lsp.Diagnostic(range=rng(d.span), message=message,
                              severity=severity.get(d.severity, lsp.DiagnosticSeverity.Information),
                              code=d.code, source="nemoc", related_information=related or None)

    def validate(uri: str) -> None:
        doc = server.workspace.get_text_document(uri)
        path = to_fs_path(uri) or uri
        uris = set()
        for shown, diags in diagnostics_for(path, doc.source).items():
            target = uri if shown == path else from_fs_path(os.path.abspath(shown))
            uris.add(target)
            server.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(
                uri=target, diagnostics=[convert(d) for d in diags], version=doc.version))
        for stale in published.get(uri, set()) - uris:
            server.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(uri=stale, diagnostics=[]))
        published[uri] = uris

    @server.feature(lsp.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls, params: lsp.DidOpenTextDocumentParams):
        validate(params.text_document.uri)

    @server.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls, params: lsp.DidChangeTextDocumentParams):
        validate(params.text_document.uri)

    @server.feature(lsp.TEXT_DOCUMENT_DID_SAVE)
    def did_save(ls, params: lsp.DidSaveTextDocumentParams):
        validate(params.text_document.uri)

    @server.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls, params: lsp.DidCloseTextDocumentParams):
        for uri in published.pop(params.text_document.uri, set()):
            server.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(uri=uri, diagnostics=[]))

    @server.feature(lsp.TEXT_DOCUMENT_HOVER)
    def on_hover(ls, params: lsp.HoverParams):
        text = server.workspace.get_text_document(params.text_document.uri).source
        doc = hover(text, offset_of(text, params.position.line, params.position.character))
        return lsp.Hover(lsp.MarkupContent(lsp.MarkupKind.Markdown, doc)) if doc else None

    kinds = {"field": lsp.CompletionItemKind.Property, "block": lsp.CompletionItemKind.Module,
             "function": lsp.CompletionItemKind.Function, "value": lsp.CompletionItemKind.EnumMember,
             "preset": lsp.CompletionItemKind.Class, "reference": lsp.CompletionItemKind.Reference,
             "keyword": lsp.CompletionItemKind.Keyword}

    @server.feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions(trigger_characters=["=", "(", "[", ",", " "]))
    def on_completion(ls, params: lsp.CompletionParams):
        text = server.workspace.get_text_document(params.text_document.uri).source
        items = complete(text, offset_of(text, params.position.line, params.position.character))
        return lsp.CompletionList(is_incomplete=False, items=[
            lsp.CompletionItem(label=i.label, kind=kinds[i.kind], detail=i.detail or None,
                               documentation=lsp.MarkupContent(lsp.MarkupKind.Markdown, i.doc) if i.doc else None,
                               insert_text=i.insert) for i in items])

    return server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nemoc")
    except PackageNotFoundError:
        return "0"


@click.command()
def lsp() -> None:
    """Run the .nemo language server on stdin/stdout (for editors; see docs/editors.md)."""
    try:
        server = build_server()
    except ImportError as exc:
        click.echo(f"error: nemoc lsp needs pygls and lsprotocol ({exc.name} is not installed): "
                   "pip install 'nemoc[lsp]'", err=True)
        raise SystemExit(2) from None
    server.start_io()
