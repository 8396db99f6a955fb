"""Annotated layout-error files: `tests/diagnostics/layout/*.nemo` go through exactly what
`nemoc check` runs (the language front end, then `rules.check_spec`), and every diagnostic must sit
on a line whose marker `# error: E1xx <regex>` (or `# warning: W1xx ...`) names it: the same marker
format as tests/diagnostics/test_lang_annotated.py; a missing, extra or misplaced diagnostic fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from annotated import markers, mismatches

from nemoc.dsl.diagnostics import render_all
from nemoc.runtime.cli.lang import check_file

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "diagnostics" / "layout"
CASES = sorted(HERE.glob("*.nemo"))


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_layout_file(case: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    path = str(case.relative_to(ROOT))
    diags, sources = check_file(path)
    assert markers(sources), f"{path} has no markers"
    problems = mismatches(diags, sources)
    assert not problems, "\n".join(problems) + "\n\n" + render_all(diags, sources)


def test_the_main_layout_rules_are_exercised() -> None:
    sources = {str(p): p.read_text() for p in CASES}
    seen = {code for *_, code, _regex in markers(sources)}
    wanted = {"E101", "E102", "E103", "E106", "E109", "E111", "E112", "E115", "E116", "E123", "W101"}
    assert wanted <= seen, sorted(wanted - seen)
