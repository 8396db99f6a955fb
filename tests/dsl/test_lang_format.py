"""fmt: canonical, idempotent, meaning-preserving, comment-preserving."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from lang_helpers import EXAMPLES
from lang_strategies import programs

from nemoc.dsl.format import format_module
from nemoc.dsl.parser import parse


def fmt(text: str) -> str:
    return format_module(parse(text, "f.nemo"), text)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_canonical(path):
    text = path.read_text()
    assert fmt(text) == text


def test_canonical_layout():
    text = 'experiment x{cluster{gpu=H100 nodes=4*(2+1)}  # c\n\n\n  stage s after a,b{opt=adam(lr=3e-4,betas=[0.9,0.95])}}'
    assert fmt(text) == (
        "experiment x {\n"
        "  cluster {\n"
        "    gpu = H100\n"
        "    nodes = 4 * (2 + 1)\n"
        "  }  # c\n"
        "\n"
        "  stage s after a, b {\n"
        "    opt = adam(lr = 3e-4, betas = [0.9, 0.95])\n"
        "  }\n"
        "}\n"
    )


def test_minimal_parentheses_keep_meaning():
    for value in ("1 - (2 - 3)", "(1 - 2) - 3", "2 * (3 + 4)", "8 / (4 / 2)", "-(1 + 2)", "- -3", "(((7)))"):
        text = f"experiment x {{ a = {value} }}"
        assert parse(fmt(text), "f.nemo") == parse(text, "f.nemo"), value


def test_comments_survive_everywhere():
    text = "# head\nexperiment x { # open\n  a = [1, # in list\n 2]\n  # before close\n} # after\n# tail\n"
    out = fmt(text)
    for comment in re.findall(r"#[^\n]*", text):
        assert comment.strip() in out
    assert fmt(out) == out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_round_trip_and_idempotence(text):
    module = parse(text, "f.nemo")
    out = format_module(module, text)
    assert parse(out, "f.nemo") == module
    assert format_module(parse(out, "f.nemo"), out) == out
    for comment in re.findall(r"#[^\n]*", "\n".join(line for line in text.splitlines())):
        if '"' not in comment:  # a `#` inside a string is not a comment
            assert comment.rstrip() in out
