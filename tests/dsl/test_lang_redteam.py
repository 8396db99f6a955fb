"""Red-team regressions for the language and the CLI (issue 16, "The language and the CLI").

One test (or property) per class of bad input, never one per instance: import paths with NUL or
control characters, number literals too large for int(), rendering that must stay linear and bounded,
CR / CRLF / mixed line endings, flat expressions that are long but not deep, Unicode digits, imports of
non-regular files, projects reached through a symlink, `fmt --write` and `plan --emit` that must not
lose data or print a traceback, and files without an experiment checked as modules.

The red-team inputs live in tests/dsl/redteam/*.nemo, annotated like tests/diagnostics (a marker
`# error: E0xx <regex>` on each line that must carry a diagnostic; a file without markers must check
clean), so they run through exactly what `nemoc check` runs.
"""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
import textwrap
import tracemalloc
import unicodedata
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotated import markers, mismatches
from tiny_experiment import TINY_CPU

from nemoc.compiler.lower import compile_file
from nemoc.dsl.diagnostics import MAX_PER_FILE, render_all
from nemoc.dsl.parser import parse
from nemoc.runtime.cli import cli
from nemoc.runtime.cli.lang import check_file

REPO = Path(__file__).resolve().parents[2]
REDTEAM = Path(__file__).parent / "redteam"
CASES = sorted(REDTEAM.glob("*.nemo"))
QUICKSTART = str(REPO / "examples" / "quickstart.nemo")
HARDWARE = str(REPO / "examples" / "common" / "hardware.nemo")

BASE = "# a red-team case\nexperiment redteam {\n" + TINY_CPU + textwrap.dedent("""\
      data web {
        path = "web.jsonl"
      }
      stage pretrain {
        data = [web]
        steps = 10
        global_batch = 4
        log_every = VALUE
      }
    }
""")
VALUE_LINE = 24  # the line of `log_every = VALUE` in BASE
VALUE_COL = 17


def with_value(value: str) -> str:
    return BASE.replace("VALUE", value)


def run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    # CliRunner keeps an escaping exception aside instead of printing its traceback: none may escape
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def write(tmp_path: Path, text: str, name: str = "x.nemo") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return str(path)


def codes_at(diags) -> list[tuple[str, int, int]]:
    return sorted((d.code, d.span.line, d.span.col) for d in diags if d.span)


# ------------------------------------------------------------------------------ the red-team files


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_redteam_file(case: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = str(case.relative_to(REPO))
    diags, sources = check_file(path)
    assert not any(d.code == "E000" for d in diags), render_all(diags, sources)
    problems = mismatches(diags, sources)
    assert not problems, "\n".join(problems) + "\n\n" + render_all(diags, sources)
    if not markers(sources):
        assert not diags, render_all(diags, sources)


# ------------------------------------------------------------------------- 1. bad import paths


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f", "\x1f"])
@pytest.mark.parametrize("command", ["check", "plan", "graph", "run"])
def test_control_characters_in_an_import_path_are_a_diagnostic_in_every_command(tmp_path, char, command):
    path = write(tmp_path, f'import "common{char}x.nemo"\n' + with_value("10"))
    result = run(command, path)
    assert result.exit_code == 1, result.output
    assert f"{path}:1:8: error[E005]: cannot import" in result.output
    assert "Traceback" not in result.output and "E000" not in result.output
    assert char not in result.output  # escaped when shown


# --------------------------------------------------------------------- 2. number literals too large


@settings(max_examples=25, deadline=None)
@given(digits=st.integers(65, 6000), form=st.sampled_from(["int", "exponent", "fraction", "unit"]))
def test_over_long_number_literals_are_number_too_large_at_the_literal(tmp_path_factory, digits, form):
    literal = {"int": "9" * digits, "exponent": "1e" + "9" * digits, "fraction": "0." + "0" * digits + "1",
               "unit": "1" * digits + "K"}[form]
    path = write(tmp_path_factory.mktemp("n"), with_value(literal))
    _spec, diags, _ = compile_file(path)
    assert codes_at(diags) == [("E032", VALUE_LINE, VALUE_COL)]
    assert "too large" in diags[0].message and len(diags[0].message) < 300  # named, not printed


def test_a_huge_literal_in_a_set_override_is_a_diagnostic(tmp_path):
    result = run("check", QUICKSTART, "--set", "stage.pretrain.log_every=" + "9" * 5000)
    assert result.exit_code == 1 and "E032" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------ 3. rendering


def test_five_thousand_duplicates_on_one_line_render_bounded(tmp_path):
    line = "    " + " ".join(["steps = 1"] * 5000)
    path = write(tmp_path, BASE.replace("    log_every = VALUE", line))
    tracemalloc.start()
    try:
        _spec, diags, sources = compile_file(path)
        text = render_all(diags, sources)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(diags) == 5000 and all(d.code == "E022" for d in diags)
    assert f"... and {5000 - MAX_PER_FILE:,} more diagnostics in {path}" in text
    assert text.endswith("5000 errors, 0 warnings")
    assert len(text) < 100_000  # 50 windows of the 50 KB line, not 10,000 copies of it
    assert peak < 200 * 1024 * 1024, peak


def test_a_long_line_is_shown_as_a_window_with_the_caret_under_the_span(tmp_path):
    path = write(tmp_path, with_value(" + ".join(["1"] * 300) + " + x"))
    _spec, diags, sources = compile_file(path)
    text = render_all(diags, sources)
    excerpt = [ln for ln in text.splitlines() if ln.startswith(f"{VALUE_LINE} | ")][0]
    caret = text.splitlines()[text.splitlines().index(excerpt) + 1]
    assert len(excerpt) < 200 and excerpt.startswith(f"{VALUE_LINE} | ...")
    src = excerpt[len(f"{VALUE_LINE} | "):]
    at = caret.index("^") - len(" " * len(str(VALUE_LINE)) + " | ")
    assert src[at] == "x", (src, caret)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "", " x ", "\t"]), max_size=30), st.booleans())
def test_the_line_index_agrees_with_splitting_on_newlines(parts, final_newline):
    from nemoc.dsl.diagnostics import _Lines

    text = "\n".join(parts) + ("\n" if final_newline else "")
    expected = text.splitlines()
    lines = _Lines(text)
    assert [lines.line(n) for n in range(1, len(expected) + 1)] == expected
    assert lines.line(len(expected) + 1) is None and lines.line(0) is None


# ------------------------------------------------------------------------------ 4. line endings


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=40, max_size=40))
def test_any_mix_of_line_endings_gives_the_same_lines_columns_and_diagnostics(tmp_path, endings):
    source = with_value("0  # a comment that must end at its line ending\n    bogus = 1").replace("\t", " ")
    lines = source.split("\n")
    mixed = "".join(line + endings[i % len(endings)] for i, line in enumerate(lines[:-1])) + lines[-1]
    expected = codes_at(compile_file(write(tmp_path, source, "lf.nemo"))[1])
    got = codes_at(compile_file(write(tmp_path, mixed, "mixed.nemo"))[1])
    assert got == expected == [("E021", VALUE_LINE + 1, 5), ("E032", VALUE_LINE, VALUE_COL)]
    assert parse(mixed, "m.nemo") == parse(source, "s.nemo")


def test_a_comment_ends_at_a_lone_cr():
    module = parse("# comment\rcluster c {\r  gpu = H100  # trailing\r}\r", "cr.nemo")
    assert [b.kind.value for b in module.blocks] == ["cluster"]
    assert [(c.text, c.span.line) for c in module.comments] == [("# comment", 1), ("# trailing", 3)]
    assert module.blocks[0].fields[0].span.line == 3


# ------------------------------------------------------------------------ 5. long is not deep


@pytest.mark.parametrize("op, terms, value", [("+", 2000, 2000), ("*", 3000, 1), ("-", 1500, 1)])
def test_a_flat_chain_of_any_length_is_evaluated_and_formatted(tmp_path, op, terms, value):
    from nemoc.dsl.format import format_module

    first = "1" if op != "-" else str(terms)
    expr = f" {op} ".join([first] + ["1"] * (terms - 1))
    path = write(tmp_path, with_value(expr))
    spec, diags, sources = compile_file(path)
    assert not diags and spec.stages[0].log_every == value
    text = sources[path]
    once = format_module(parse(text, path), text)
    assert format_module(parse(once, path), once) == once and expr in once


@pytest.mark.parametrize("prefix_levels", [0, 10, 30])
def test_nesting_counts_brackets_and_unary_minus_and_is_reported_where_exceeded(tmp_path, prefix_levels):
    # Inside `experiment { stage { ... } }` two levels are open; 62 more reach the limit of 64.
    parens = "(" * prefix_levels
    ok = parens + "- " * (62 - prefix_levels) + "4" + ")" * prefix_levels
    _spec, diags, _ = compile_file(write(tmp_path, with_value(ok)))
    assert "E004" not in [d.code for d in diags]  # exactly at the limit: fine (the value may still be -4)
    deep = parens + "- " * (63 - prefix_levels) + "4" + ")" * prefix_levels
    _spec, diags, _ = compile_file(write(tmp_path, with_value(deep), "deep.nemo"))
    col = VALUE_COL + prefix_levels + 2 * (62 - prefix_levels)  # the 63rd level: the last `-`
    assert codes_at(diags) == [("E004", VALUE_LINE, col)]


# ------------------------------------------------------------------------------ 6. ASCII digits


NON_ASCII_DIGITS = st.characters(categories=["Nd"]).filter(lambda c: not c.isascii())


@settings(max_examples=40, deadline=None)
@given(NON_ASCII_DIGITS, st.sampled_from(["{d}", "1{d}", "{d}0", "2 * {d}"]))
def test_unicode_digits_are_not_numbers_and_the_diagnostic_names_the_character(digit, shape):
    value = shape.format(d=digit)
    col = VALUE_COL + value.index(digit)
    from nemoc.dsl.diagnostics import DiagnosticError

    with pytest.raises(DiagnosticError) as err:
        parse(with_value(value), "u.nemo")
    (d,) = err.value.diagnostics
    assert (d.code, d.span.line, d.span.col) == ("E014", VALUE_LINE, col)
    assert f"U+{ord(digit):04X}" in d.message and unicodedata.name(digit) in d.message
    assert f"write `{unicodedata.digit(digit)}`" in d.hint


# ----------------------------------------------------------------------- 7. non-regular files


@pytest.mark.timeout(60)
def test_importing_a_fifo_is_a_diagnostic_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe.nemo")
    path = write(tmp_path, 'import "pipe.nemo"\n' + with_value("10"))
    _spec, diags, _ = compile_file(path)
    assert codes_at(diags) == [("E005", 1, 8)] and "FIFO" in diags[0].message
    result = run("check", str(tmp_path / "pipe.nemo"))  # the root file itself
    assert result.exit_code == 2 and "it is a FIFO" in result.output


def test_a_device_or_a_directory_is_not_read(tmp_path):
    assert "character device" in run("check", "/dev/null").output
    (tmp_path / "dir.nemo").mkdir()
    path = write(tmp_path, 'import "dir.nemo"\n' + with_value("10"))
    _spec, diags, _ = compile_file(path)
    assert codes_at(diags) == [("E005", 1, 8)] and "directory" in diags[0].message


# ------------------------------------------------------------------------- 8. symlinked project


def test_a_project_reached_through_a_symlinked_directory_imports_normally(tmp_path):
    real = tmp_path / "real"
    (real / "common").mkdir(parents=True)
    (real / "common" / "hardware.nemo").write_text(Path(HARDWARE).read_text())
    text = with_value("10").replace("  cluster {\n    gpu = CPU\n", "  cluster cpu_box {\n")
    (real / "exp.nemo").write_text('import "common/hardware.nemo"\n' + text)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    _spec, diags, _ = compile_file(str(tmp_path / "link" / "exp.nemo"))
    assert not diags, diags
    outside = tmp_path / "outside.nemo"
    outside.write_text("cluster far { gpu = H100 }\n")
    (real / "exp2.nemo").write_text('import "../outside.nemo"\n' + with_value("10"))
    _spec, diags, _ = compile_file(str(tmp_path / "link" / "exp2.nemo"))
    assert [d.code for d in diags] == ["E007"]  # still: leaving the tree is an error


# ------------------------------------------------------------------------ 9. fmt --write


UGLY = with_value("10").replace("steps = 10", "steps    =   10")


def _fmt_write_under_rlimit(path: str, limit: int) -> subprocess.CompletedProcess:
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = "import sys; from nemoc.runtime.cli import main; sys.argv = ['nemoc', 'fmt', '--write', sys.argv[1]]; main()"
    return subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def test_fmt_write_over_the_file_size_limit_leaves_the_file_untouched(tmp_path):
    path = write(tmp_path, UGLY)
    os.chmod(path, 0o640)
    before = Path(path).read_bytes()
    out = _fmt_write_under_rlimit(path, 64)  # the canonical text is larger than 64 bytes
    assert out.returncode == 2, out.stderr
    assert f"error: cannot write {path}" in out.stderr and "Traceback" not in out.stderr
    assert Path(path).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x.nemo"]  # no temporary file left behind
    out = _fmt_write_under_rlimit(path, 1 << 20)  # room enough: written, permissions kept
    assert out.returncode == 0, out.stderr
    assert Path(path).read_bytes() != before and stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_fmt_write_in_a_read_only_directory_is_an_error_line(tmp_path, monkeypatch):
    path = write(tmp_path, UGLY)
    before = Path(path).read_bytes()
    os.chmod(tmp_path, 0o555)
    if os.geteuid() == 0:  # root ignores the mode bits: refuse the temporary file as the kernel would
        real_open = os.open

        def refuse_in_read_only_dir(file, flags, *args, **kwargs):
            if os.fspath(file).startswith(str(tmp_path)) and flags & os.O_CREAT:
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse_in_read_only_dir)
    try:
        result = run("fmt", "--write", path)
    finally:
        monkeypatch.undo()
        os.chmod(tmp_path, 0o755)
    assert result.exit_code == 2 and "error: cannot write" in result.output
    assert "Traceback" not in result.output and Path(path).read_bytes() == before


def test_fmt_write_through_a_symlink_rewrites_the_target_and_keeps_the_link(tmp_path):
    target = write(tmp_path, UGLY, "target.nemo")
    (tmp_path / "link.nemo").symlink_to(target)
    assert run("fmt", "--write", str(tmp_path / "link.nemo")).exit_code == 0
    assert (tmp_path / "link.nemo").is_symlink() and "steps = 10" in Path(target).read_text()


# ------------------------------------------------------------------------- 10. plan --emit


@pytest.mark.parametrize("target", ["missing/dir/plan.json", "/dev/full"])
def test_plan_emit_to_a_missing_directory_or_a_full_device_is_an_error_line(tmp_path, target):
    if target.startswith("/dev/") and not os.path.exists(target):
        pytest.skip(f"{target} does not exist here")
    emit = target if target.startswith("/") else str(tmp_path / target)
    result = run("plan", QUICKSTART, "--emit", emit)
    assert result.exit_code == 2, result.output
    assert f"error: cannot write the plan to {emit}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "missing").exists()


def test_plan_emit_writes_a_regular_file(tmp_path):
    emit = tmp_path / "plan.json"
    assert run("plan", QUICKSTART, "--emit", str(emit)).exit_code == 0
    assert emit.read_text().startswith("{")


# ------------------------------------------------------------------------ 15. modules


def test_a_file_without_an_experiment_is_checked_as_a_module():
    result = run("check", HARDWARE)
    assert result.exit_code == 0, result.output


def test_a_module_with_errors_reports_them(tmp_path):
    path = write(tmp_path, 'import "missing.nemo"\ncluster c {\n  gpu = H10\n  nodes = "x"\n}\n'
                           "stage s {\n}\ncluster c {\n  gpu = H100\n}\n")
    _spec, diags, _ = compile_file(path, module_ok=True)
    assert codes_at(diags) == [("E005", 1, 8)]  # an import that cannot be read stops there
    Path(tmp_path / "missing.nemo").write_text("data web {\n  path = 3\n}\n")
    _spec, diags, _ = compile_file(path, module_ok=True)
    assert [(d.code, d.span.path.endswith("missing.nemo"), d.span.line) for d in sorted(diags, key=lambda d: (
        d.span.path, d.span.line))] == [("E030", True, 2), ("E043", False, 3), ("E030", False, 4),
                                        ("E020", False, 6), ("E023", False, 8)]
    assert run("check", path).exit_code == 1


@pytest.mark.parametrize("command", ["plan", "run"])
def test_plan_and_run_of_a_module_say_there_is_no_experiment(command):
    result = run(command, HARDWARE)
    assert result.exit_code == 1 and "E026" in result.output and "no `experiment` block" in result.output
    assert f"check it with `nemoc check {HARDWARE}`" in result.output


# ------------------------------------------------------------------ 3 and 14. the token limit


def test_more_than_max_tokens_is_e003_where_the_limit_is_crossed(tmp_path):
    from nemoc.dsl.parser import MAX_TOKENS

    fields = "".join(f"    f{i} = 1\n" for i in range(MAX_TOKENS // 3 + 10))  # 3 tokens a line
    path = write(tmp_path, BASE.replace("    log_every = VALUE\n", fields))
    _spec, diags, _ = compile_file(path)
    (d,) = diags
    assert d.code == "E003" and f"more than {MAX_TOKENS:,} tokens" in d.message
    assert d.span.line > VALUE_LINE  # at the token that crosses it, not at 1:1
    under = write(tmp_path, BASE.replace("    log_every = VALUE\n", fields[: len(fields) // 2]), "under.nemo")
    assert {d.code for d in compile_file(under)[1]} == {"E021"}  # half as many: parsed and checked


def test_a_one_mebibyte_string_lexes_in_bounded_memory():
    from nemoc.dsl.parser import MAX_BYTES

    text = with_value("1").replace('"web.jsonl"', '"' + "x" * (MAX_BYTES - 1000) + '\\"y"')
    tracemalloc.start()
    try:
        module = parse(text, "s.nemo")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert module.blocks[0].members[3].fields[0].value.value.endswith('x"y')
    assert peak < 64 * MAX_BYTES, f"{peak / 2**20:.0f} MiB"  # was ~460 MiB: a backtracking mark per character
