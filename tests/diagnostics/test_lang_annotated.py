"""Annotated error files: every `tests/diagnostics/*.nemo` carries, on each line that must hold a
diagnostic, a marker comment `# error: E021 <regex of the message>` (or `# warning: W001 ...`).

The harness compiles each file (language front end only: syntax, schema, references, imports) and
fails on a missing, extra or misplaced diagnostic. Markers in imported files count when the file is
reached through an import.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from annotated import markers, mismatches

from nemoc.compiler.lower import compile_file
from nemoc.dsl.diagnostics import render_all

HERE = Path(__file__).parent
CASES = sorted(p for p in HERE.glob("*.nemo"))


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_annotated_file(case: Path, monkeypatch):
    monkeypatch.chdir(HERE.parent.parent)
    path = str(case.relative_to(HERE.parent.parent))
    _spec, diags, sources = compile_file(path)
    assert markers(sources), f"{path} has no markers"
    problems = mismatches(diags, sources)
    assert not problems, "\n".join(problems) + "\n\n" + render_all(diags, sources)


def test_every_code_is_exercised():
    """The annotated files cover every error code the front end can emit from a file."""
    files = CASES + sorted((HERE / "imports").glob("*.nemo"))
    sources = {str(p): p.read_text() for p in files}
    seen = {code for _path, _line, _sev, code, _regex in markers(sources)}
    wanted = {"E005", "E006", "E007", "E010", "E011", "E012", "E013", "E014", "E015", "E016", "E020", "E021",
              "E022", "E023", "E024", "E025", "E026", "E030", "E031", "E032", "E033", "E034", "E035", "E036",
              "E027", "E028", "E029", "E040", "E041", "E042", "E043", "E044", "E047", "W001", "W002"}
    assert wanted <= seen, sorted(wanted - seen)
