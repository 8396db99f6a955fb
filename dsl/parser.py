"""Text -> `nemoc.dsl.ast.Module`, with syntax errors named the way a person would name them.

Input:  the text of one `.nemo` file (or one `--set` value) and the path its spans should carry.
Output: a frozen `Module` (or one `Expr`); raises `DiagnosticError` with exactly one syntax diagnostic
        (E010-E016) or a limit diagnostic (E003 too large, E004 too deeply nested).
Invariants: the lark parser is built once per process (`grammar()` is cached, and lark's own grammar
cache makes the first build cheap); the lark tree never leaves this module; no input, however
malformed, escapes as anything but `DiagnosticError`. Line endings (LF, CRLF, a lone CR) are normalized
to LF before lexing (`normalize_newlines`), so lines and columns agree with every editor. The tree is
turned into the AST without recursion, so a flat `1 + 1 + ... + 1` of any length is not "deep"; real
nesting (brackets and chains of unary `-`) is limited to MAX_NESTING and reported where it is exceeded.

Syntax errors are explained from the parser's expected-token set and a small bracket scanner: an
unclosed `{` becomes "missing `}` to close `parallel` opened at 3:3", `tensor 8` becomes "expected
`=` after `tensor`", and so on. Lark's raw terminal names never reach the user.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from dataclasses import dataclass
from importlib import resources

# lark imports the third-party `regex` module whenever it is installed, for Unicode-category terminals
# (`\p{...}`, which nemo.lark does not use) and `Lark(regex=True)` (not passed here); that import is
# ~15 ms of every `nemoc` command, so it is kept out while lark loads. Only a process that has imported
# neither is affected, and a later `import regex` (tokenizers, transformers) imports it as usual.
_KEEP_REGEX_OUT = "regex" not in sys.modules and "lark" not in sys.modules
if _KEEP_REGEX_OUT:
    sys.modules["regex"] = None  # type: ignore[assignment]  # `import regex` raises ImportError
try:
    import lark
    from lark import Transformer_NonRecursive, v_args
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput
finally:
    if _KEEP_REGEX_OUT and sys.modules.get("regex", ...) is None:
        del sys.modules["regex"]

from nemoc.dsl import ast
from nemoc.dsl.diagnostics import Diagnostic, DiagnosticError, Span

MAX_BYTES = 1 << 20  # 1 MiB: an experiment is a page, not a data set
MAX_NESTING = 64  # brackets of any kind plus chained unary `-`; the evaluator recurses on depth
# Tokens per file, comments included. lark's pure-Python LALR parser handles ~20k-50k tokens a second
# (bench/bench_check.py), so a 1 MiB file of one-character tokens would take most of a minute; an
# experiment is a few hundred to a few thousand tokens. The cap bounds check/fmt/plan on any input.
MAX_TOKENS = 50_000

_COMMENT_SINK: list[lark.Token] = []


@functools.lru_cache(maxsize=1)
def grammar() -> lark.Lark:
    """The LALR parser for `grammar/nemo.lark`, built once per process."""
    text = resources.files("nemoc.grammar").joinpath("nemo.lark").read_text(encoding="utf-8")
    return lark.Lark(
        text,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        start=["start", "value_start"],
        lexer_callbacks={"COMMENT": _COMMENT_SINK.append},
        cache=True,
    )


def normalize_newlines(text: str) -> str:
    """CRLF and a lone CR become LF: the one line ending the lexer, the spans and the renderer know."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def parse(text: str, path: str) -> ast.Module:
    """Parse a whole file. Raises `DiagnosticError` on a syntax error or a limit."""
    text = normalize_newlines(text)
    _check_limits(text, path)
    _COMMENT_SINK.clear()
    try:
        tree = grammar().parse(text, start="start")
    except UnexpectedInput as exc:
        raise DiagnosticError([explain(exc, text, path)]) from None
    finally:
        comments = [ast.Comment(t.value, _token_span(t, path)) for t in _COMMENT_SINK]
        _COMMENT_SINK.clear()
    module = _guard(lambda: _ToAst(path).transform(tree), text, path)
    return ast.Module(module.imports, module.blocks, module.span, tuple(comments), module.items)


def parse_value(text: str, path: str) -> ast.Expr:
    """Parse one value (the right-hand side of a `--set`)."""
    text = normalize_newlines(text)
    _check_limits(text, path)
    try:
        tree = grammar().parse(text, start="value_start")
    except UnexpectedInput as exc:
        raise DiagnosticError([explain(exc, text, path)]) from None
    finally:
        _COMMENT_SINK.clear()
    return _guard(lambda: _ToAst(path).transform(tree), text, path)


def _guard(build, text: str, path: str):
    try:
        return build()
    except RecursionError:  # a backstop: `_check_limits` bounds every recursive shape first
        raise DiagnosticError([_too_deep(Span(path, 1, 1, 1, 2))]) from None


# ------------------------------------------------------------------------------------------ limits


def _check_limits(text: str, path: str) -> None:
    if len(text) > MAX_BYTES:
        raise DiagnosticError([Diagnostic(
            "E003", f"file is too large ({len(text):,} characters; the limit is {MAX_BYTES:,})",
            Span(path, 1, 1, 1, 2), hint="an experiment file describes data sets by path; it does not contain them",
        )])
    limit = _limit_exceeded(text)
    if limit is not None:
        what, offset = limit
        span = _offset_span(text, offset, path)
        raise DiagnosticError([_too_deep(span) if what == "depth" else _too_many_tokens(span)])


def _too_many_tokens(span: Span) -> Diagnostic:
    return Diagnostic("E003", f"file is too large: more than {MAX_TOKENS:,} tokens (counted to here)", span,
                      hint="an experiment file is a page: share templates through `import`, name data sets by path")


def _too_deep(span: Span) -> Diagnostic:
    return Diagnostic("E004", f"nesting is too deep (the limit is {MAX_NESTING} levels of brackets and unary `-`)",
                      span, hint="flatten the expression or split the block")


_UNARY_AFTER = frozenset("=([{,+-*/")  # a `-` after one of these (or first) negates; after an operand it subtracts


def _limit_exceeded(text: str) -> tuple[str, int] | None:
    """("tokens", offset) of the first token past MAX_TOKENS, or ("depth", offset) of the first bracket
    or unary `-` nested deeper than MAX_NESTING, whichever comes first; None within the limits. One pass
    that stops there. `- - 4` nests like `-(-(4))`; `1 + 1 + 1` is flat however long it is."""
    opened: list[int] = []  # per open bracket: the levels it added (itself + the unary `-` before it)
    depth = unary = 0  # depth: levels of the open brackets; unary: `-` chained before the current operand
    prev = None
    for count, tok in enumerate(_tokens(text), start=1):
        if count > MAX_TOKENS:
            return "tokens", tok.offset
        if tok.kind == "comment":
            continue
        if tok.kind == "punct" and tok.text in "{[(":
            opened.append(1 + unary)
            depth, unary = depth + 1 + unary, 0
            if depth > MAX_NESTING:
                return "depth", tok.offset
        elif tok.kind == "punct" and tok.text in "}])":
            depth, unary = depth - (opened.pop() if opened else 0), 0
        elif tok.text == "-" and (prev is None or (prev.kind == "punct" and prev.text in _UNARY_AFTER)):
            unary += 1
            if depth + unary > MAX_NESTING:
                return "depth", tok.offset
        else:
            unary = 0
        prev = tok
    return None


# ------------------------------------------------------------------------------------- transformer


def _token_span(tok: lark.Token, path: str) -> Span:
    return Span(path, tok.line, tok.column, tok.end_line, tok.end_column)


def _offset_span(text: str, offset: int, path: str, length: int = 1) -> Span:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return Span(path, line, col, line, col + max(1, length))


_ESCAPES = {"n": "\n", "t": "\t"}


def unquote(literal: str) -> str:
    """`"a\\"b"` -> `a"b` (escapes: \\n \\t, any other char stands for itself)."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), literal[1:-1])


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):  # iterative: a long flat sum is long, not deep
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.path, 1, 1, 1, 1)
        return Span(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    def _name(self, tok: lark.Token) -> ast.Name:
        return ast.Name(str(tok), _token_span(tok, self.path))

    def start(self, meta, items):
        imports = tuple(i for i in items if isinstance(i, ast.Import))
        blocks = tuple(i for i in items if isinstance(i, ast.Block))
        return ast.Module(imports, blocks, self._span(meta), (), tuple(items))

    def value_start(self, meta, children):
        return children[0]

    def import_stmt(self, meta, children):
        tok = children[0]
        return ast.Import(ast.String(unquote(tok), _token_span(tok, self.path)), self._span(meta))

    def block(self, meta, children):
        kind, name, after, lbrace, *members, _rbrace = children
        head = Span(self.path, kind.line, kind.column, lbrace.end_line, lbrace.end_column)
        return ast.Block(self._name(kind), self._name(name) if name is not None else None,
                         after or (), tuple(members), self._span(meta), head)

    def after_clause(self, meta, names):
        return tuple(self._name(n) for n in names)

    def field(self, meta, children):
        key, _eq, value = children
        return ast.Field(self._name(key), value, self._span(meta))

    def arg(self, meta, children):
        key, _eq, value = children
        return ast.Arg(self._name(key), value, self._span(meta))

    def positional_arg(self, meta, children):
        # key "" = the call's first parameter (typecheck binds it; only string arguments may be positional)
        span = self._span(meta)
        return ast.Arg(ast.Name("", span), self.string(meta, children), span)

    def binop(self, meta, children):
        left, op, right = children
        return ast.BinOp(str(op), left, right, self._span(meta))

    def neg(self, meta, children):
        return ast.Neg(children[1], self._span(meta))

    def atom(self, meta, children):  # ( expr )
        return children[1]

    def number(self, meta, children):
        return ast.Number(str(children[0]), self._span(meta))

    def string(self, meta, children):
        return ast.String(unquote(children[0]), self._span(meta))

    def name(self, meta, children):
        word, span = str(children[0]), self._span(meta)
        if word in ("true", "false"):
            return ast.Bool(word == "true", span)
        if word == "auto":
            return ast.Auto(span)
        return ast.Name(word, span)

    def call(self, meta, children):
        func, _lpar, *rest = children
        args = tuple(c for c in rest if isinstance(c, ast.Arg))
        return ast.Call(self._name(func), args, self._span(meta))

    def list(self, meta, children):
        items = tuple(c for c in children[1:-1] if c is not None)
        return ast.ListValue(items, self._span(meta))


# ------------------------------------------------------------------------------ syntax diagnostics


@dataclass(frozen=True, slots=True)
class _Tok:
    text: str
    offset: int
    kind: str  # name | number | string | punct


_SCAN = re.compile(r'(?P<ws>\s+)|(?P<comment>#[^\n]*)|(?P<string>"[^"\\\n]*(\\[^\n][^"\\\n]*)*"?)'
                   r"|(?P<number>(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?([A-Za-z]+(/[A-Za-z]+)?|%)?)"
                   r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(-[A-Za-z0-9_]+)*)|(?P<punct>.)", re.S | re.ASCII)


def _tokens(text: str):
    """A forgiving tokenizer (never fails): every token and comment, lazily, spaces skipped."""
    for m in _SCAN.finditer(text):
        kind = m.lastgroup
        if kind != "ws":
            yield _Tok(m.group(), m.start(), kind)


def _scan(text: str) -> list[_Tok]:
    """The tokens, comments skipped, for error analysis."""
    return [t for t in _tokens(text) if t.kind != "comment"]


_PHRASES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "LBRACE": "`{`", "RBRACE": "`}`",
    "LSQB": "`[`", "RSQB": "`]`", "LPAR": "`(`", "RPAR": "`)`", "EQUAL": "`=`", "PLUS": "`+`",
    "MINUS": "`-`", "STAR": "`*`", "SLASH": "`/`", "COMMA": "`,`", "AFTER": "`after`",
    "IMPORT": "`import`", "$END": "the end of the file",
}
_VALUE_STARTS = {"NAME", "NUMBER", "STRING", "LSQB", "LPAR", "MINUS"}
_CLOSERS = {"{": "}", "[": "]", "(": ")"}


def _expected_phrase(expected: set[str]) -> str:
    expected = set(expected)
    parts = []
    if _VALUE_STARTS <= expected:
        parts.append("a value")
        expected -= _VALUE_STARTS
    if {"PLUS", "MINUS", "STAR", "SLASH"} <= expected:
        parts.append("an operator")
        expected -= {"PLUS", "MINUS", "STAR", "SLASH"}
    parts += sorted(_PHRASES.get(t, f"`{t.lower()}`") for t in expected)
    if not parts:
        return "something else"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _describe(tok_text: str) -> str:
    if not tok_text:
        return "end of file"
    return f"`{tok_text}`" if len(tok_text) <= 20 else f"`{tok_text[:17]}...`"


# Syntax errors named by example (lark's `match_examples`): a parser state reached by one of these
# snippets gets the message and hint of its label instead of the generic "unexpected X".
NAMED_ERRORS: dict[str, tuple[list[str], str, str]] = {
    "field_outside_block": (
        ["a = 1", 'import "x.nemo"\na = 1', "x { }\na = 1"],
        "a field must be inside a block",
        "put it inside `experiment NAME { ... }` (or a template block)"),
    "after_without_name": (
        ["x y after { }", "x after { }", "x y after a, { }"],
        "`after` needs the name of a stage",
        "write e.g. `stage sft after pretrain { ... }`"),
    "positional_argument": (
        ["x { a = f(1) }", "x { a = f(b = 1, 2) }", "x { a = f([1]) }", "x { a = f(-1) }",
         "x { a = f((1)) }"],
        "call arguments are named",
        "write e.g. `adam(lr = 3e-4)`"),
    "comma_between_fields": (
        ["x { a = 1, }", "x { a = b, }", 'x { a = "s", }', "x { a = [1], }", "x { a = f(), }", "x { a = (1), }"],
        "fields are separated by spaces or newlines, not `,`",
        "remove the `,`"),
    "missing_block_brace": (
        ["x { y b = 1 }", "x y = 1 }", "x { y z b = 1 }"],
        "missing `{` after a block header",
        "a block is written `kind [name] { fields }`; a field `name = value`"),
    "import_needs_string": (
        ["import a", "import 1", "import a/b"],
        "an import path is a string",
        'write e.g. `import "common/hardware.nemo"`'),
    "two_values": (
        ["x { a = 1 2 }", "x { a = b 2 }", 'x { a = "s" 2 }', "x { a = [1] 2 }", "x { a = f() 2 }", "x { a = (1) 2 }",
         'x { a = 1 "s" }', 'x { a = b "s" }', 'x { a = "s" "t" }', "x { a = 1 [1] }", "x { a = b [1] }",
         'x { a = "s" [1] }', "x { a = [1] [1] }", "x { a = (1) [1] }", "x { a = f() [1] }"],
        "two values in a row",
        "each field holds one value: use a list `[a, b]`, an operator, or start a new field `name = value`"),
    "field_name_not_word": (
        ["x { 1 = 2 }", 'x { "a" = 2 }', "x { [a] = 1 }", "x { (a) = 1 }", "x { -a = 1 }"],
        "a field name must be a word",
        "names are letters, digits, `_` and inner `-`, starting with a letter"),
    "block_as_value": (
        ["x { a = { } }", "x { a = f(b = { }) }", "x { a = [{ }] }"],
        "a block cannot be a value",
        "write the block as `a { ... }` (no `=`), or use a call value `f(k = v)`"),
    "double_equals": (
        ["x { a = = 1 }", "x { a == 1 }"],
        "`=` appears twice",
        "a field is written `name = value`"),
}
_CHAR_HINTS = {
    ":": "write `=` between a name and its value: `tensor = 8`, `adam(lr = 3e-4)`",
    ";": "fields are separated by spaces or newlines; remove the `;`",
    "'": 'strings use double quotes: "like this"',
}


_HEADERS = ("x {", "x y {", "x after z {", "x y after z {")
_BEFORE = ("", "a = 1 ", "b { } ")


def _variants(example: str) -> list[str]:
    """An example written as `x { body }`, under every block-header form and after each member kind
    (the LALR state at a member's start depends on both)."""
    if not example.startswith("x { "):
        return [example]
    body = example[len("x { "):]
    return [f"{head} {before}{body}" for head in _HEADERS for before in _BEFORE]


def _position(exc: UnexpectedInput):
    state = getattr(exc, "state", None)
    return getattr(state, "position", state)


@functools.lru_cache(maxsize=1)
def _example_states() -> dict[tuple[object, str], str]:
    """(parser state, offending token type) -> label, from parsing every example once.

    Like lark's `match_examples`, but matched on the LALR state alone rather than also on the stack
    depth, so an example written at one nesting level names the same mistake at any level.
    """
    table: dict[tuple[object, str], str] = {}
    for label, (examples, _message, _hint) in NAMED_ERRORS.items():
        for example in (v for e in examples for v in _variants(e)):
            try:
                grammar().parse(example, start="start")
            except UnexpectedInput as ut:
                token = getattr(ut, "token", None)
                table.setdefault((_position(ut), getattr(token, "type", "$END")), label)
    return table


def _named(exc: UnexpectedInput) -> str | None:
    token = getattr(exc, "token", None)
    return _example_states().get((_position(exc), getattr(token, "type", "$END")))


def explain(exc: UnexpectedInput, text: str, path: str) -> Diagnostic:
    """Name a lark syntax error the way a person would (see the module docstring)."""
    tokens = _scan(text)
    if isinstance(exc, UnexpectedCharacters):
        return _bad_character(exc, text, path)
    offset = _error_offset(exc, text)
    at_end = isinstance(exc, UnexpectedEOF) or getattr(getattr(exc, "token", None), "type", "") == "$END"
    expected = set(getattr(exc, "expected", ()) or ())
    before = [t for t in tokens if t.offset < offset]
    here = next((t for t in tokens if t.offset >= offset), None)
    unclosed = _unclosed(tokens, text)
    if at_end and before and before[-1].text == "=":
        return _missing_value(before, text, path)
    if at_end and unclosed:
        return _missing_closer(unclosed, tokens, text, path)
    if here is not None and here.text in "}])" and here.kind == "punct":
        stray = _stray_closer(tokens, text, path, here)
        if stray:
            return stray
        if before and before[-1].text == "=":
            return _missing_value(before, text, path)
        mismatch = _mismatched_closer(tokens, text, path, here)
        if mismatch:
            return mismatch
    if here is not None and here.text == "=" and len(before) >= 3 and before[-2].text == "=":
        if text.count("\n", before[-2].offset, before[-1].offset):  # `a =` then `b = 1` on the next line
            return _missing_value(before[:-1], text, path)
    if at_end and before and before[-1].text == "=":
        return _missing_value(before, text, path)
    label = _named(exc) if here is not None else None
    if label == "two_values" and before and text.count("\n", before[-1].offset, here.offset):
        label = "field_name_not_word"  # the value ended its line: this starts a (bad) field
    if label is not None:
        _examples, message, hint = NAMED_ERRORS[label]
        found = f"unexpected {_describe(here.text)}: {message}"
        return Diagnostic("E010", found, _offset_span(text, here.offset, path, len(here.text)), hint=hint)
    if before and before[-1].kind == "name" and "EQUAL" in expected and here is not None:
        word = before[-1].text
        return Diagnostic("E012", f"expected `=` or `{{` after `{word}`, found {_describe(here.text)}",
                          _offset_span(text, here.offset, path, len(here.text)),
                          hint=f"a field is written `{word} = value`; a block `{word} {{ ... }}`")
    span = _offset_span(text, here.offset if here else max(0, len(text) - 1), path, len(here.text) if here else 1)
    return Diagnostic("E010", f"unexpected {_describe(here.text if here else '')}; expected {_expected_phrase(expected)}",
                      span)


def _error_offset(exc: UnexpectedInput, text: str) -> int:
    token = getattr(exc, "token", None)
    if token is not None and getattr(token, "type", "") != "$END" and token.start_pos is not None:
        return token.start_pos
    if isinstance(exc, (UnexpectedEOF,)) or getattr(token, "type", "") == "$END":
        return len(text)
    return getattr(exc, "pos_in_stream", None) or len(text)


def _bad_character(exc: UnexpectedCharacters, text: str, path: str) -> Diagnostic:
    pos = exc.pos_in_stream
    char = text[pos] if pos < len(text) else ""
    if char == '"':
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        return Diagnostic("E013", "unterminated string", _offset_span(text, pos, path, end - pos),
                          hint='close it with `"` on the same line (strings cannot span lines)')
    shown = repr(char)[1:-1] if not char.isprintable() or char.isspace() else char
    if char and not char.isascii():
        name = unicodedata.name(char, "unnamed character")
        return Diagnostic("E014", f"unexpected character `{shown}` (U+{ord(char):04X} {name})",
                          _offset_span(text, pos, path),
                          hint=_non_ascii_hint(char))
    return Diagnostic("E014", f"unexpected character `{shown}`", _offset_span(text, pos, path),
                      hint=_CHAR_HINTS.get(char, "names are letters, digits, `_` and inner `-`; comments start with `#`"))


def _non_ascii_hint(char: str) -> str:
    digit = unicodedata.digit(char, None)
    if digit is not None:
        return f"numbers are written with the ASCII digits 0-9: write `{digit}`"
    return "outside strings and comments only ASCII is allowed: names are letters, digits, `_` and inner `-`"


def _unclosed(tokens: list[_Tok], text: str) -> list[tuple[_Tok, _Tok | None]]:
    """Bracket pairs (opener, closer) whose closer is missing or suspiciously indented."""
    stack, pairs = [], []
    for tok in tokens:
        if tok.kind != "punct":
            continue
        if tok.text in _CLOSERS:
            stack.append(tok)
        elif tok.text in "}])" and stack and _CLOSERS[stack[-1].text] == tok.text:
            pairs.append((stack.pop(), tok))
    missing = [(t, None) for t in stack]
    if not missing:
        return []
    # A `}` that starts its line but is indented unlike its opener's line probably closes an outer block:
    # the earliest such opener is the one the user forgot to close.
    misindented = [(o, c) for o, c in pairs if o.text == "{" and _starts_line(text, c.offset)
                   and _indent(text, c.offset) != _indent(text, o.offset)]
    return sorted(misindented, key=lambda p: p[0].offset)[:1] + missing[::-1]


def _starts_line(text: str, offset: int) -> bool:
    start = text.rfind("\n", 0, offset) + 1
    return text[start:offset].strip() == ""


def _indent(text: str, offset: int) -> int:
    start = text.rfind("\n", 0, offset) + 1
    line = text[start:]
    return len(line) - len(line.lstrip(" \t"))


def _missing_closer(unclosed, tokens: list[_Tok], text: str, path: str) -> Diagnostic:
    opener = unclosed[0][0]
    closer = _CLOSERS[opener.text]
    what = _block_title(tokens, opener) if opener.text == "{" else None
    span = _offset_span(text, opener.offset, path)
    where = f"{span.line}:{span.col}"
    if what:
        head = _header_span(tokens, opener, text, path)
        return Diagnostic("E011", f"missing `{closer}` to close `{what}` opened at {head.line}:{head.col}", head,
                          hint=f"add `{closer}` after the last field of `{what}`")
    return Diagnostic("E015", f"missing `{closer}` to close the `{opener.text}` opened at {where}", span,
                      hint=f"add `{closer}`")


def _block_title(tokens: list[_Tok], opener: _Tok) -> str | None:
    """`stage sft` for the `{` of `stage sft after pretrain {`."""
    i = tokens.index(opener)
    words = []
    for tok in reversed(tokens[:i]):
        if tok.kind != "name" and tok.text != ",":
            break
        words.append(tok.text)
    words.reverse()
    if "after" in words:
        words = words[: words.index("after")]
    words = [w for w in words if w != ","]
    return " ".join(words[-2:]) if words else None


def _header_span(tokens: list[_Tok], opener: _Tok, text: str, path: str) -> Span:
    i = tokens.index(opener)
    start = opener
    for tok in reversed(tokens[:i]):
        if tok.kind != "name" and tok.text != ",":
            break
        start = tok
    first = _offset_span(text, start.offset, path)
    last = _offset_span(text, opener.offset, path)
    if first.line != last.line:
        return last
    return Span(path, first.line, first.col, last.line, last.end_col)


def _stray_closer(tokens: list[_Tok], text: str, path: str, here: _Tok) -> Diagnostic | None:
    depth = {"}": 0, "]": 0, ")": 0}
    opener_of = {v: k for k, v in _CLOSERS.items()}
    for tok in tokens:
        if tok.offset >= here.offset:
            break
        if tok.kind == "punct" and tok.text in _CLOSERS:
            depth[_CLOSERS[tok.text]] += 1
        elif tok.kind == "punct" and tok.text in depth:
            depth[tok.text] = max(0, depth[tok.text] - 1)
    if depth[here.text] == 0:
        return Diagnostic("E016", f"unmatched `{here.text}` (no `{opener_of[here.text]}` is open here)",
                          _offset_span(text, here.offset, path), hint="remove it, or open the block it closes")
    return None


def _mismatched_closer(tokens: list[_Tok], text: str, path: str, here: _Tok) -> Diagnostic | None:
    """`[1, 2 }`: the innermost open bracket is not the one `here` closes."""
    stack = []
    for tok in tokens:
        if tok.offset >= here.offset:
            break
        if tok.kind == "punct" and tok.text in _CLOSERS:
            stack.append(tok)
        elif tok.kind == "punct" and tok.text in "}])" and stack:
            stack.pop()
    if stack and _CLOSERS[stack[-1].text] != here.text:
        opener = stack[-1]
        span = _offset_span(text, opener.offset, path)
        return Diagnostic("E015", f"missing `{_CLOSERS[opener.text]}` to close the `{opener.text}` opened at "
                          f"{span.line}:{span.col}", _offset_span(text, here.offset, path),
                          hint=f"add `{_CLOSERS[opener.text]}` before `{here.text}`")
    return None


def _missing_value(before: list[_Tok], text: str, path: str) -> Diagnostic:
    eq = before[-1]
    key = before[-2].text if len(before) >= 2 and before[-2].kind == "name" else None
    start = before[-2] if key else eq
    span = _offset_span(text, start.offset, path, eq.offset + 1 - start.offset)
    what = f"`{key} =`" if key else "`=`"
    return Diagnostic("E012", f"missing value after {what}", span,
                      hint="write a value: a number, a string, a name, a list `[...]` or `auto`")
