"""Parser: spans on every node, value forms, comments, limits and named syntax errors."""

from __future__ import annotations

import pytest
from lang_helpers import EXAMPLES

from nemoc.dsl import ast
from nemoc.dsl.diagnostics import DiagnosticError, Span
from nemoc.dsl.parser import MAX_BYTES, MAX_NESTING, grammar, parse, parse_value


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_node_of_every_example_has_a_span(path):
    module = parse(path.read_text(), str(path))
    nodes = list(ast.walk(module))
    assert len(nodes) > 5
    for node in nodes:
        span = node.span
        assert span.path == str(path)
        assert span.line >= 1 and span.col >= 1
        assert (span.end_line, span.end_col) >= (span.line, span.col), node


def test_parser_is_built_once():
    assert grammar() is grammar()


S = Span("elsewhere", 9, 9, 9, 9)  # spans do not take part in equality


def test_value_forms():
    v = parse_value("adam(lr = 3e-4, betas = [0.9, 0.95])", "<v>")
    assert isinstance(v, ast.Call) and v.func.value == "adam"
    assert [a.key.value for a in v.args] == ["lr", "betas"]
    assert parse_value("1.2T", "<v>") == ast.Number("1.2T", S)
    assert parse_value("1.2T", "<v>").unit == "T" and parse_value("900GB/s", "<v>").unit == "GB/s"
    assert parse_value("A100-80GB", "<v>") == ast.Name("A100-80GB", S)
    assert parse_value("auto", "<v>") == ast.Auto(S)
    assert parse_value("true", "<v>") == ast.Bool(True, S)
    assert parse_value('"a\\"b"', "<v>") == ast.String('a"b', S)
    assert parse_value("4 * 128 + 2", "<v>") == ast.BinOp("+", ast.BinOp("*", ast.Number("4", S), ast.Number("128", S), S),
                                                          ast.Number("2", S), S)
    assert parse_value("-(2 - 3)", "<v>") == ast.Neg(ast.BinOp("-", ast.Number("2", S), ast.Number("3", S), S), S)


def test_spans_are_excluded_from_equality():
    a = parse("experiment x { a = 1 }", "a.nemo")
    b = parse("experiment   x {\n  a = 1\n}\n", "b.nemo")
    assert a == b


def test_keywords_are_only_words_in_fields():
    m = parse("experiment x { after = 1  import = 2  stage s after a, b { } }", "k.nemo")
    fields = m.blocks[0].fields
    assert [f.key.value for f in fields] == ["after", "import"]
    assert [a.value for a in m.blocks[0].blocks[0].after] == ["a", "b"]


def test_comments_are_collected():
    m = parse("# one\nexperiment x {  # two\n}\n", "c.nemo")
    assert [c.text for c in m.comments] == ["# one", "# two"]


def _error(text: str):
    with pytest.raises(DiagnosticError) as info:
        parse(text, "e.nemo")
    (diag,) = info.value.diagnostics
    return diag


def test_missing_brace_names_the_block_and_where_it_opened():
    d = _error("experiment x {\n  parallel {\n    tensor = 8\n  stage s { }\n}\n")
    assert d.code == "E011"
    assert d.message == "missing `}` to close `parallel` opened at 2:3"
    assert (d.span.line, d.span.col) == (2, 3)


def test_syntax_errors_never_show_lark_terminal_names():
    for text in ("experiment", "experiment x { a = }", "experiment x { a b }", "experiment x { a = [1, 2 }",
                 "x { = }", "experiment x { a = f(1) }", "import x", "experiment x { a = 1 + }"):
        d = _error(text)
        assert d.code.startswith("E01")
        for raw in ("RBRACE", "LBRACE", "NAME", "NUMBER", "EQUAL", "$END", "Token(", "LSQB", "RPAR"):
            assert raw not in d.message, (text, d.message)


def test_limits():
    assert _error("x" * (MAX_BYTES + 1)).code == "E003"
    assert _error("experiment x { a = " + "[" * 10_000 + "]" * 10_000 + " }").code == "E004"
    assert _error("experiment x { " + "b { " * (MAX_NESTING + 1) + "}" * (MAX_NESTING + 2)).code == "E004"


def test_long_arithmetic_chain_is_a_diagnostic_not_a_crash():
    text = "experiment x { a = " + " + ".join(["1"] * 5000) + " }"
    try:
        parse(text, "l.nemo")
    except DiagnosticError as err:
        assert err.diagnostics[0].code == "E004"


def test_binary_garbage():
    d = _error("\x00\x01\x02 experiment")
    assert d.code == "E014" and "\\x00" in d.message


@pytest.mark.parametrize("text, message", [
    ("precision = bf16\nexperiment x { }\n", "a field must be inside a block"),
    ("experiment x {\n  stage sft after { }\n}\n", "`after` needs the name of a stage"),
    ("experiment x {\n  a = adam(3e-4)\n}\n", "call arguments are named"),
    ("experiment x {\n  a = 8,\n  b = 2\n}\n", "fields are separated by spaces or newlines, not `,`"),
    ("experiment x {\n  tensor == 8\n}\n", "`=` appears twice"),
    ("experiment x {\n  cluster\n    gpu = H100\n  }\n}\n", "missing `{` after a block header"),
    ("import common/x.nemo\n", "an import path is a string"),
    ("experiment x {\n  a = 1\n  8 = 3\n}\n", "a field name must be a word"),
    ("experiment x {\n  a = f(b = { })\n}\n", "a block cannot be a value"),
    ("experiment x {\n  a = 1 2\n}\n", "two values in a row"),
    ("experiment x {\n  stage s {\n    parallel { a = [1] 2 }\n  }\n}\n", "two values in a row"),
])
def test_syntax_errors_are_named_by_example(text, message):
    d = _error(text)
    assert d.code == "E010" and message in d.message and d.hint


def test_every_named_example_is_named_as_its_label():
    from nemoc.dsl.parser import NAMED_ERRORS

    for label, (examples, message, _hint) in NAMED_ERRORS.items():
        for example in examples:
            assert message in _error(example).message, (label, example)


@pytest.mark.parametrize("char, hint", [(":", "write `=`"), (";", "remove the `;`"), ("'", "double quotes")])
def test_common_wrong_characters_get_a_hint(char, hint):
    d = _error(f"experiment x {{ a {char} 1 }}")
    assert d.code == "E014" and hint in d.hint


def test_missing_value_at_end_of_file_is_named_as_such():
    d = _error("experiment x {\n  a =")
    assert d.code == "E012" and d.message == "missing value after `a =`"


def test_forgotten_brace_of_the_last_block_is_found_by_indentation():
    d = _error("experiment x {\n  stage s {\n    a = 1\n}\n")
    assert d.message == "missing `}` to close `stage s` opened at 2:3"
