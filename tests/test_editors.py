"""The VS Code extension (editors/vscode): a valid TextMate grammar that cannot drift from the language."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

from nemoc.dsl.schema import BLOCKS, CALLS, STAGE_PARAMS, UNITS

VSCODE = Path(__file__).resolve().parents[1] / "editors" / "vscode"
GRAMMAR = VSCODE / "syntaxes" / "nemo.tmLanguage.json"


def _grammar() -> dict:
    return json.loads(GRAMMAR.read_text())


def _alternation(pattern: str, group_prefix: str) -> set[str]:
    """The words of the first `(a|b|c)` group after `group_prefix` in a pattern."""
    body = pattern[pattern.index(group_prefix) + len(group_prefix):]
    return set(body[:body.index(")")].split("|"))


def _regexes(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("match", "begin", "end") and isinstance(value, str):
                yield value
            else:
                yield from _regexes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _regexes(item)


def test_the_grammar_is_generated_from_the_language():
    build = runpy.run_path(str(VSCODE / "build_grammar.py"))
    assert GRAMMAR.read_text() == build["render"](), "run: python editors/vscode/build_grammar.py"
    assert build["keywords"]() == ["after", "import"]  # the quoted words of grammar/nemo.lark


def test_the_grammar_lists_match_the_schema_and_the_grammar():
    repo = _grammar()["repository"]
    assert _alternation(repo["block"]["match"], r"\b(") == set(BLOCKS)
    fields = {f.name for b in BLOCKS.values() for f in b.fields} | {f.name for p in STAGE_PARAMS.values() for f in p}
    args = {f.name for a in CALLS.values() for f in a}
    assert _alternation(repo["field"]["patterns"][0]["match"], r"\b(") == fields | args
    functions = repo["call"]["beginCaptures"]["1"]["patterns"][0]["match"]
    assert _alternation(functions, "^(?:") == set(CALLS)
    units = {s for table in UNITS.values() for s in table if s}
    number = repo["number"]["patterns"][0]["match"]
    assert _alternation(number, "?)(") == units
    assert repo["import"]["captures"]["1"]["name"].startswith("keyword") and "(import)" in repo["import"]["match"]
    assert "(after)" in repo["block"]["match"]
    assert _alternation(repo["constant"]["match"], r"\b(") == {"true", "false", "auto"}


def test_the_patterns_compile_and_tokenize_what_they_should():
    grammar = _grammar()
    for pattern in _regexes(grammar):
        re.compile(pattern)  # the patterns use the subset Python's re shares with Oniguruma
    repo = grammar["repository"]
    block = re.search(repo["block"]["match"], "  stage dpo after sft, pretrain {")
    assert block.group(1, 2, 3) == ("stage", "dpo", "after") and block.group(4).strip() == "sft, pretrain"
    assert re.search(repo["block"]["match"], "data = [web]") is None  # a field named like a block
    number, bad_unit = (re.compile(p["match"]) for p in repo["number"]["patterns"])
    assert number.match("80GiB").group(1, 2) == ("80", "GiB")
    assert number.match("900GB/s").group(1, 2) == ("900", "GB/s")
    assert number.match("3e-4").group(1, 2) == ("3e-4", None)
    assert number.match("90%").group(2) == "%" and number.match("1.2T").group(2) == "T"
    assert number.match("8x") is None and bad_unit.match("8x").group(2) == "x"
    assert re.match(repo["call"]["begin"], "adam(lr = 3e-4)").group(1) == "adam"
    assert re.match(repo["comment"]["match"], "# a comment")


def test_the_extension_declares_the_language_and_launches_nemoc_lsp():
    from nemoc.runtime.cli.main import COMMANDS

    package = json.loads((VSCODE / "package.json").read_text())
    json.loads((VSCODE / "language-configuration.json").read_text())
    (language,) = package["contributes"]["languages"]
    assert language["id"] == "nemo" and language["extensions"] == [".nemo"]
    assert (VSCODE / language["configuration"]).is_file()
    (grammar,) = package["contributes"]["grammars"]
    assert (VSCODE / grammar["path"]).resolve() == GRAMMAR and grammar["scopeName"] == _grammar()["scopeName"]
    command = package["contributes"]["configuration"]["properties"]["nemo.server.command"]["default"]
    assert command == ["nemoc", "lsp"] and COMMANDS["lsp"] == "nemoc.runtime.cli.lsp:lsp"
    main = (VSCODE / package["main"]).read_text()
    assert "vscode-languageclient" in package["dependencies"] and "server.command" in main


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_extension_script_is_valid_javascript():
    subprocess.run(["node", "--check", str(VSCODE / "extension.js")], check=True, timeout=120)
