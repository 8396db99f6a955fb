"""Annotated layout-error files: `tests/diagnostics/layout/*.nemo` go through exactly what
`nemoc check` runs (the language front end, then `rules.check_spec`), and every diagnostic must sit
on a line whose marker `# error: E1xx <regex>` (or `# warning: W1xx ...`) names it: the same marker
format as tests/diagnostics/test_lang_annotated.py; a missing, extra or misplaced diagnostic fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nemoc.dsl.diagnostics import render_all
from nemoc.runtime.cmd_lang import check_file

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "diagnostics" / "layout"
CASES = sorted(HERE.glob("*.nemo"))
MARKER = re.compile(r"#\s*(error|warning):\s*([EW]\d{3})\s*(.*?)\s*(?=#\s*(?:error|warning):|$)")


def _markers(sources: dict[str, str]) -> list[tuple[str, int, str, str, str]]:
    return [(path, lineno, m.group(1), m.group(2), m.group(3))
            for path, text in sources.items() for lineno, line in enumerate(text.splitlines(), start=1)
            for m in MARKER.finditer(line)]


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_layout_file(case: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    path = str(case.relative_to(ROOT))
    diags, sources = check_file(path)
    expected = _markers(sources)
    assert expected, f"{path} has no markers"
    unmatched = list(diags)
    problems = []
    for mpath, line, severity, code, regex in expected:
        hit = next((d for d in unmatched if d.span and d.span.path == mpath and d.span.line == line
                    and d.code == code and d.severity.value == severity and re.search(regex, d.message)), None)
        if hit is None:
            problems.append(f"missing {severity} {code} /{regex}/ at {mpath}:{line}")
        else:
            unmatched.remove(hit)
    problems += [f"unexpected {d.span}: {d.code} {d.message}" for d in unmatched]
    assert not problems, "\n".join(problems) + "\n\n" + render_all(diags, sources)


def test_the_main_layout_rules_are_exercised() -> None:
    sources = {str(p): p.read_text() for p in CASES}
    seen = {code for *_, code, _regex in _markers(sources)}
    wanted = {"E101", "E102", "E103", "E106", "E109", "E111", "E112", "E115", "E116", "E123", "W101"}
    assert wanted <= seen, sorted(wanted - seen)
