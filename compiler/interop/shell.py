"""Just enough of a POSIX/bash shell to read a Megatron-LM launch script without running it.

Input:  the text of a shell script that ends in a `pretrain_gpt.py` launch (`torchrun ... pretrain_gpt.py
        ARGS`, `python -m torch.distributed.launch ...`, `python pretrain_gpt.py ...`).
Output: `Launch`: the launcher's words before the script, the script, the words after it (the Megatron-LM
        arguments), and warnings (one line each, naming the script line).
Invariants: nothing is executed. Assignments (`X=1`, `X="a b"`, `X=(a b)`, `X+=(c)`, `export X=...`),
line continuations, comments, `$X` / `${X}` / `${X[@]}` / `${X:-default}` / `$((A*B))`, quotes and word
splitting of unquoted expansions are evaluated as bash would; `if/elif/else/fi` whose conditions compare
known strings (`[[ "$A" == "b" ]]`, `-z`, `-n`, `!`, `||`, `&&`) take the branch bash would take. A value
that depends on something unknown (a positional parameter `$1`, an unset environment variable, `$(cmd)`)
stays as its own text (`$DATA_PATH`), so the importer can name it; never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCRIPT_RE = re.compile(r"(^|/)pretrain_(gpt|mamba|llama|mixtral)\w*\.py$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\+?)=")


# Compound commands read as straight-line code (a warning says so): launch scripts rarely loop.
_UNEVALUATED = ("for", "while", "until", "case", "function", "do", "done", "esac", "select")


class ShellError(ValueError):
    """The script cannot be read (no launch line, unbalanced quotes); the message names the line."""


@dataclass(frozen=True)
class Launch:
    launcher: tuple[str, ...]  # words before the training script (torchrun and its options)
    script: str
    args: tuple[str, ...]  # the Megatron-LM arguments
    line: int  # script line of the launch
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------- lexer
# A word is a tuple of parts: ("lit", text, quoted) or ("var", expression, quoted).

@dataclass
class _Token:
    kind: str  # word | sep | lparen | rparen | array (`NAME=( ... )`, parts = the words inside)
    parts: tuple = ()
    line: int = 0
    text: str = ""


def _lex(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n, line = 0, len(text), 1
    parts: list = []
    start_line = 1

    def flush():
        nonlocal parts
        if parts:
            tokens.append(_Token("word", tuple(parts), start_line, _raw(parts)))
            parts = []

    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] == "\n":
            i, line = i + 2, line + 1
            continue
        if c in " \t\r":
            flush()
            i += 1
            continue
        if c == "\n" or c == ";":
            flush()
            tokens.append(_Token("sep", line=line))
            line += c == "\n"
            i += 1
            continue
        if c == "#" and not parts:
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c in "()":
            flush()
            tokens.append(_Token("lparen" if c == "(" else "rparen", line=line))
            i += 1
            continue
        if c in "|&<>":
            flush()
            j = i
            while j < n and text[j] in "|&<>":
                j += 1
            tokens.append(_Token("sep", line=line, text=text[i:j]))
            i = j
            continue
        if not parts:
            start_line = line
        if c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise ShellError(f"line {line}: unterminated single quote")
            parts.append(("lit", text[i + 1:j], True))
            line += text.count("\n", i, j)
            i = j + 1
            continue
        if c == '"':
            i, line = _double_quoted(text, i + 1, line, parts)
            continue
        if c == "$":
            i = _dollar(text, i, parts, quoted=False)
            continue
        if c == "\\" and i + 1 < n:
            parts.append(("lit", text[i + 1], True))
            i += 2
            continue
        if c == "`":
            j = text.find("`", i + 1)
            j = n - 1 if j < 0 else j
            parts.append(("var", "`" + text[i + 1:j] + "`", False))
            i = j + 1
            continue
        parts.append(("lit", c, False))
        i += 1
    flush()
    return tokens


def _raw(parts) -> str:
    return "".join(p[1] if p[0] == "lit" else f"${{{p[1]}}}" for p in parts)


def _double_quoted(text: str, i: int, line: int, parts: list) -> tuple[int, int]:
    n, buf, start = len(text), [], line
    while i < n and text[i] != '"':
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in '"\\$`\n':
            if text[i + 1] != "\n":
                buf.append(text[i + 1])
            else:
                line += 1
            i += 2
            continue
        if c == "$":
            if buf:
                parts.append(("lit", "".join(buf), True))
                buf = []
            i = _dollar(text, i, parts, quoted=True)
            continue
        line += c == "\n"
        buf.append(c)
        i += 1
    if i >= n:
        raise ShellError(f"line {start}: unterminated double quote")
    parts.append(("lit", "".join(buf), True))
    return i + 1, line


def _matching(text: str, i: int, open_: str, close: str) -> int:
    """Index of the `close` matching the `open_` at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j
    return len(text) - 1


def _dollar(text: str, i: int, parts: list, quoted: bool) -> int:
    """Parse the expansion starting at text[i] == '$'; append it to `parts`; return the next index."""
    nxt = text[i + 1] if i + 1 < len(text) else ""
    if text.startswith("$((", i):
        j = text.find("))", i)
        j = len(text) - 2 if j < 0 else j
        parts.append(("var", "((" + text[i + 3:j] + "))", quoted))
        return j + 2
    if nxt == "(":
        j = _matching(text, i + 1, "(", ")")
        parts.append(("var", "`" + text[i + 2:j] + "`", quoted))
        return j + 1
    if nxt == "{":
        j = _matching(text, i + 1, "{", "}")
        parts.append(("var", text[i + 2:j], quoted))
        return j + 1
    m = _NAME.match(text, i + 1)
    if m:
        parts.append(("var", m.group(0), quoted))
        return m.end()
    if nxt and (nxt.isdigit() or nxt in "@*#?$!"):
        parts.append(("var", nxt, quoted))
        return i + 2
    parts.append(("lit", "$", quoted))
    return i + 1


# ------------------------------------------------------------------------------------ evaluator

class _Unknown(str):
    """Text standing for a value the script does not define (kept as `$NAME`)."""


@dataclass
class _Shell:
    vars: dict = field(default_factory=dict)  # name -> str | list[str] | _Unknown
    warnings: list = field(default_factory=list)
    unknown_seen: bool = False  # an expansion since the flag was cleared met an _Unknown

    # -- expansion
    def lookup(self, expr: str, line: int):
        """The value of `${expr}`: a list (arrays), a str, or an _Unknown."""
        if expr.startswith("((") and expr.endswith("))"):
            return self.arith(expr[2:-2], line)
        if expr.startswith("`"):
            return _Unknown(f"$({expr.strip('`')})")
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*|\d+)(\[[@*]\]|\[\d+\])?(?::?([-=+?])(.*))?", expr, re.S)
        if not m:
            return _Unknown(f"${{{expr}}}")
        name, index, op, word = m.groups()
        value = self.vars.get(name)
        if index and isinstance(value, list):
            value = value if index in ("[@]", "[*]") else (value[int(index[1:-1])] if int(index[1:-1]) < len(value) else "")
        elif isinstance(value, list):
            value = value[0] if value else ""
        if op == "-" or op == "=":
            if value is None or value == "" or isinstance(value, _Unknown):
                value = self.expand_text(word or "", line)
                if isinstance(value, _Unknown) and not value:
                    value = _Unknown(f"${name}")
                if op == "=":
                    self.vars[name] = value
        elif op == "+":
            value = self.expand_text(word or "", line) if value not in (None, "") else ""
        if value is None:
            return _Unknown(f"${name}")
        return value

    def expand_text(self, word: str, line: int) -> str:
        """Expand the default word of `${X:-word}` (quotes removed, no splitting)."""
        if re.search(r"<[^<>]*>", word):  # `${DATA_PATH:-<Specify path>}`: a placeholder, not a value
            self.unknown_seen = True
            return _Unknown("")
        if not re.search(r"[$'\"\\`]", word):
            return word
        before, self.unknown_seen = self.unknown_seen, False
        words = [t for t in _lex(word) if t.kind == "word"]
        joined = " ".join(self.expand(words, line, split=False))
        value = _Unknown(joined) if self.unknown_seen else joined
        self.unknown_seen = before or self.unknown_seen
        return value

    def arith(self, expr: str, line: int):
        def sub(m):
            v = self.vars.get(m.group(1) or m.group(2))
            return v if isinstance(v, str) and not isinstance(v, _Unknown) and v.strip().lstrip("-").isdigit() else "?"

        text = re.sub(r"\$\{?([A-Za-z_]\w*)\}?|\b([A-Za-z_]\w*)\b", sub, expr)
        if "?" in text or not re.fullmatch(r"[\d\s+\-*/%()]+", text):
            return _Unknown(f"$(({expr}))")
        try:
            return str(int(eval(text.replace("/", "//"), {"__builtins__": {}}, {})))  # noqa: S307 - digits and operators only
        except (SyntaxError, ZeroDivisionError):
            return _Unknown(f"$(({expr}))")

    def expand(self, words: list[_Token], line: int, split: bool = True) -> list[str]:
        """Bash word expansion: parameter expansion, then word splitting of unquoted results, then quote removal."""
        out: list[str] = []
        for tok in words:
            if tok.kind == "array":  # `NAME=(...)` outside an assignment (bash: a syntax error): its words
                out.extend(self.expand(list(tok.parts), line, split))
                continue
            fields: list[str] = [""]
            started = False
            for kind, text, quoted in tok.parts:
                if kind == "lit":
                    fields[-1] += text
                    started = started or quoted or bool(text)
                    continue
                value = self.lookup(text, line)
                items = value if isinstance(value, list) else [value]
                for k, item in enumerate(items):
                    self.unknown_seen = self.unknown_seen or isinstance(item, _Unknown)
                    if k:
                        fields.append("")
                    if quoted or not split or isinstance(item, _Unknown):
                        fields[-1] += item
                        started = started or quoted
                    else:
                        pieces = item.split()
                        if not pieces:
                            continue
                        if item[:1].isspace() and fields[-1]:
                            fields.append("")
                        fields[-1] += pieces[0]
                        fields.extend(pieces[1:])
                        if item[-1:].isspace():
                            fields.append("")
                started = started or bool(items) and quoted
            out.extend(f for f in fields if f or started)
        return out

    # -- conditions
    def test(self, words: list[str], line: int) -> bool | None:
        """`[[ ... ]]` / `[ ... ]` with ==, !=, -z, -n, !, ||, &&; None when unknown."""
        def atom(ws: list[str]) -> bool | None:
            ws = [w for w in ws if w not in ("[[", "]]", "[", "]")]
            if ws[:1] == ["!"]:
                v = atom(ws[1:])
                return None if v is None else not v
            if any("$" in w for w in ws):
                return None
            if len(ws) == 3 and ws[1] in ("==", "=", "!="):
                return (ws[0] == ws[2]) == (ws[1] != "!=")
            if len(ws) == 2 and ws[0] in ("-z", "-n"):
                return (ws[1] == "") == (ws[0] == "-z")
            return None

        result, op, chunk = None, None, []
        for w in words + ["||"]:
            if w in ("||", "&&"):
                v = atom(chunk)
                result = v if op is None else _combine(result, v, op)
                op, chunk = w, []
            else:
                chunk.append(w)
        return result


def _combine(a, b, op):
    if op == "||":
        return True if a is True or b is True else (None if a is None or b is None else False)
    return False if a is False or b is False else (None if a is None or b is None else True)


def _statements(tokens: list[_Token]):
    """Group tokens into statements: (words, line), with `NAME=( ... )` kept as one statement."""
    stmt: list[_Token] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.kind == "lparen" and stmt and _ASSIGN.match(stmt[-1].text) and stmt[-1].text.endswith("="):
            j, depth, items = i + 1, 1, []
            while j < len(tokens) and depth:
                t = tokens[j]
                depth += (t.kind == "lparen") - (t.kind == "rparen")
                if depth and t.kind == "word":
                    items.append(t)
                j += 1
            stmt[-1] = _Token("array", tuple(items), stmt[-1].line, stmt[-1].text)
            i = j
            continue
        if tok.kind == "sep":
            if stmt:
                yield stmt
            stmt = []
        elif tok.kind == "word":
            stmt.append(tok)
        i += 1
    if stmt:
        yield stmt


def read_launch(text: str) -> Launch:
    """The Megatron-LM launch in a shell script (see the module docstring). Raises ShellError."""
    sh = _Shell()
    branch: list[list[bool | None]] = []  # per open `if`: [this branch active, some earlier branch taken]
    launch = bare = None
    for stmt in _statements(_lex(text)):
        line = stmt[0].line
        head = stmt[0].text if stmt[0].kind == "word" else ""
        if head in ("if", "elif"):
            words = [w for w in sh.expand(stmt[1:], line) if w != "then"]
            cond = sh.test(words, line)
            if cond is None:
                sh.warnings.append(f"line {line}: cannot evaluate `{' '.join(words)}`; took the else branch")
                cond = False
            if head == "if":
                branch.append([cond, cond])
            elif branch:
                branch[-1] = [cond and not branch[-1][1], branch[-1][1] or cond]
            continue
        if head == "else" and branch:
            branch[-1] = [not branch[-1][1], True]
            stmt = stmt[1:]
            if not stmt:
                continue
        if head == "fi" and branch:
            branch.pop()
            continue
        if head == "then":
            stmt = stmt[1:]
            if not stmt:
                continue
        if not all(b[0] for b in branch):
            continue
        if head in _UNEVALUATED:
            sh.warnings.append(f"line {line}: `{head}` is not evaluated: the lines inside it are read once, in order")
            stmt = stmt[1:] if head in ("do", "done", "esac") else []
            if not stmt:
                continue
        if stmt[0].text == "export":
            stmt = stmt[1:]
            if not stmt:
                continue
        if _assign(sh, stmt, line):
            continue
        words = sh.expand(stmt, line)
        for k, w in enumerate(words):
            if SCRIPT_RE.search(w):
                launch = Launch(tuple(words[:k]), w, tuple(words[k + 1:]), line)
                break
        else:
            if launch is None and "--num-layers" in words:  # bare arguments, no launcher
                bare = Launch((), "pretrain_gpt.py", tuple(words[words.index("--num-layers"):]), line)
    if launch is None and bare is not None:
        launch = bare
        sh.warnings.append(f"line {bare.line}: no launcher line (torchrun ... pretrain_gpt.py): read the arguments "
                           "there; the cluster is nemoc's default")
    if launch is None:
        raise ShellError("no Megatron-LM launch found (a line running pretrain_gpt.py, or Megatron-LM arguments "
                         "starting at --num-layers); nemoc import reads Megatron-LM launch scripts, NeMo 1 YAML "
                         "(trainer: and model:) and Megatron-Bridge config dumps")
    return Launch(launch.launcher, launch.script, launch.args, launch.line, tuple(sh.warnings))


def _assign(sh: _Shell, stmt: list[_Token], line: int) -> bool:
    """Perform `NAME=value` / `NAME+=value` / `NAME=(...)` statements (all words must be assignments)."""
    if not all(_ASSIGN.match(t.text) for t in stmt):
        return False
    for tok in stmt:
        m = _ASSIGN.match(tok.text)
        name, append = m.group(1), m.group(2) == "+"
        if tok.kind == "array":
            values = sh.expand(list(tok.parts), line)
            old = sh.vars.get(name)
            old = old if isinstance(old, list) else ([] if old in (None, "") else [old])
            sh.vars[name] = (old if append else []) + values
            continue
        value_parts = _strip_prefix(tok.parts, len(m.group(0)))
        sh.unknown_seen = False
        value = "".join(sh.expand([_Token("word", value_parts, line)], line, split=False)) if value_parts else ""
        unknown = sh.unknown_seen
        old = sh.vars.get(name, "")
        if unknown:
            sh.vars.pop(name, None)  # later `$NAME` stays as `$NAME`: the value depends on the caller
        else:
            sh.vars[name] = (old if append and isinstance(old, str) else "") + value
    return True


def _strip_prefix(parts: tuple, length: int) -> tuple:
    """The parts of a word after its first `length` literal characters (`NAME=`)."""
    out, skip = [], length
    for p in parts:
        if skip and p[0] == "lit":
            take = min(skip, len(p[1]))
            skip -= take
            if p[1][take:]:
                out.append((p[0], p[1][take:], p[2]))
            continue
        out.append(p)
    return tuple(out)
