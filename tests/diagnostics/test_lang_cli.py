"""`nemoc check` / `nemoc fmt` on the command line: exit codes, rendering, JSON, --set, --write."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from nemoc.runtime.cli import cli

HERE = Path(__file__).parent
REPO = HERE.parent.parent
QUICKSTART = str(REPO / "examples" / "quickstart.nemo")


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_clean_file_exits_0():
    assert run("check", QUICKSTART).exit_code == 0


def test_diagnostics_exit_1_with_file_line_col_caret_and_hint():
    result = run("check", str(HERE / "presets.nemo"))
    assert result.exit_code == 1
    assert "presets.nemo:3:5: error[E043]: unknown accelerator `H10`" in result.output
    assert "3 |     gpu = H10" in result.output and "^^^^^^^^^" in result.output
    assert "= hint: did you mean `H100`?" in result.output
    assert "Traceback" not in result.output


def test_unreadable_file_and_usage_exit_2(tmp_path):
    assert run("check", str(tmp_path / "missing.nemo")).exit_code == 2
    assert run("check", str(tmp_path)).exit_code == 2
    bad = tmp_path / "bad.nemo"
    bad.write_bytes(b"\xff\xfe")
    assert run("check", str(bad)).exit_code == 2
    assert run("check").exit_code == 2  # no file: click usage error
    assert run("fmt", "--check", "--write", QUICKSTART).exit_code == 2


def test_worst_exit_code_over_several_files(tmp_path):
    assert run("check", QUICKSTART, str(HERE / "presets.nemo")).exit_code == 1
    assert run("check", QUICKSTART, str(tmp_path / "missing.nemo")).exit_code == 2


def test_json_output():
    result = run("check", "--json", str(HERE / "references.nemo"))
    assert result.exit_code == 1
    (report,) = json.loads(result.output)["files"]
    assert report["ok"] is False
    codes = [d["code"] for d in report["diagnostics"]]
    assert "E041" in codes and "W001" in codes
    cycle = next(d for d in report["diagnostics"] if d["code"] == "E041")
    assert cycle["span"]["line"] > 0 and cycle["notes"]


def test_set_overrides_are_checked_like_the_file():
    result = run("check", QUICKSTART, "--set", "parallel.tensor=3GiB")
    assert result.exit_code == 1
    assert "<--set 1>:1:17: error[E031]" in result.output and "parallel.tensor=3GiB" in result.output
    assert run("check", QUICKSTART, "--set", "stage.pretrain.steps=50").exit_code == 0


def test_fmt_prints_checks_and_writes(tmp_path):
    messy = tmp_path / "messy.nemo"
    messy.write_text("experiment x{cluster{gpu=CPU}  # keep me\n}")
    printed = run("fmt", str(messy))
    assert printed.exit_code == 0
    assert printed.output == "experiment x {\n  cluster {\n    gpu = CPU\n  }  # keep me\n}\n"
    assert run("fmt", "--check", str(messy)).exit_code == 1
    assert run("fmt", "--write", str(messy)).exit_code == 0
    assert messy.read_text() == printed.output
    assert run("fmt", "--check", str(messy)).exit_code == 0


def test_fmt_reports_syntax_errors():
    result = run("fmt", str(HERE / "syntax_missing_brace.nemo"))
    assert result.exit_code == 1 and "error[E011]" in result.output


def test_check_runs_the_layout_rules_after_the_language(tmp_path):
    path = tmp_path / "tp.nemo"
    path.write_text((REPO / "examples" / "quickstart.nemo").read_text())
    result = run("check", str(path), "--set", "parallel.tensor=3")  # 4 heads are not divisible by 3
    assert result.exit_code == 1 and "<--set 1>" in result.output and "heads" in result.output


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.nemo"
    path.write_bytes(b"\xef\xbb\xbf" + (REPO / "examples" / "quickstart.nemo").read_bytes())
    assert run("check", str(path)).exit_code == 0
    assert run("fmt", "--check", str(path)).exit_code == 0


def test_load_spec_helpers(tmp_path):
    from nemoc.dsl.diagnostics import DiagnosticError
    from nemoc.runtime.cli.common import load_spec, load_spec_with_warnings

    spec, sources = load_spec(QUICKSTART, ("parallel.tensor=1",))
    assert spec.parallel.tensor == 1 and QUICKSTART in sources and "<--set 1>" in sources
    assert load_spec_with_warnings(QUICKSTART)[2] == ()
    path = tmp_path / "spare.nemo"
    path.write_text(Path(QUICKSTART).read_text().replace("  stage pretrain {", 'data spare { path = "x" }\nstage pretrain {'))
    assert [w.code for w in load_spec_with_warnings(str(path))[2]] == ["W001"]
    try:
        load_spec(str(HERE / "presets.nemo"))
    except DiagnosticError as err:
        assert {d.code for d in err.diagnostics} == {"E042", "E043"} and err.sources
    else:
        raise AssertionError("expected DiagnosticError")
