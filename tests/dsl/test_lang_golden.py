"""Golden ASTs: the parse of a few examples, as JSON with spans. Regenerate with
`pytest tests/dsl --update-golden` and review the diff."""

from __future__ import annotations

import json

import pytest

from nemoc.dsl.parser import parse
from lang_helpers import REPO, ast_to_json

GOLDEN = REPO / "tests" / "dsl" / "golden"
CASES = ["quickstart", "pipeline", "gpt3_175b_a100"]


@pytest.mark.parametrize("name", CASES)
def test_golden_ast(name: str, update_golden: bool):
    source = (REPO / "examples" / f"{name}.nemo").read_text()
    actual = ast_to_json(parse(source, f"examples/{name}.nemo"))
    golden = GOLDEN / f"{name}.ast.json"
    if update_golden:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    assert golden.exists(), f"missing {golden}; run pytest tests/dsl --update-golden"
    assert json.loads(golden.read_text()) == actual
