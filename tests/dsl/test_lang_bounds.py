"""Upper bounds on sizes that drive the plan search: an absurd value is a diagnostic at its line, not
a search that runs for minutes."""

from __future__ import annotations

import pytest

from nemoc.compiler.lower import compile_file

TEMPLATE = """experiment bounds {{
  cluster {{ gpu = H100  nodes = {nodes}  gpus_per_node = 8 }}
  model llama3_8b {{ layers = {layers} }}
  stage pretrain {{ steps = 10  global_batch = {global_batch} }}
}}
"""


@pytest.mark.parametrize(("field", "value", "line"), [("layers", "1e18", 3), ("nodes", "1e18", 2),
                                                     ("global_batch", "1e18", 4)])
def test_absurd_sizes_are_errors_at_their_line(tmp_path, field, value, line):
    values = {"nodes": 1, "layers": 32, "global_batch": 64, field: value}
    path = tmp_path / "bounds.nemo"
    path.write_text(TEMPLATE.format(**values))
    spec, diags, _sources = compile_file(str(path))
    errors = [d for d in diags if d.is_error]
    assert spec is None and len(errors) == 1
    assert errors[0].code == "E032" and f"`{field}` must be <=" in errors[0].message
    assert errors[0].span.line == line


def test_real_sizes_pass(tmp_path):
    path = tmp_path / "ok.nemo"
    path.write_text(TEMPLATE.format(nodes=2048, layers=126, global_batch=2048))
    spec, diags, _sources = compile_file(str(path))
    assert spec is not None and not [d for d in diags if d.is_error]


# ------------------------------------------------------------------ time and memory on any input
# Issue 16: no input under the size limits may make check, fmt or plan take more than a few seconds
# or memory out of proportion. Hypothesis builds adversarial sources from the fragments the red team
# used (thousands of fields, duplicates, flat sums, unary chains, brackets, comments, long literals,
# strings, CRs, non-ASCII digits) and each is run through all three under tracemalloc. The bounds are
# generous (10 s, 200 bytes per character + 64 MiB): a regression to quadratic rendering or parsing,
# or to a line copied per diagnostic, breaks them by orders of magnitude. bench/bench_check.py
# measures the same shapes at the full limits.

import time  # noqa: E402
import tracemalloc  # noqa: E402
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

STAGE_HEAD = ("experiment adv {\n  cluster {\n    gpu = CPU\n    nodes = 1\n    gpus_per_node = 2\n  }\n"
              "  model tiny {\n    layers = 2\n    hidden = 64\n    heads = 2\n    ffn_hidden = 256\n"
              "    vocab = 256\n    seq_length = 64\n  }\n  precision = fp32\n  data web {\n    path = \"w.jsonl\"\n  }\n"
              "  stage pretrain {\n    data = [web]\n    steps = 10\n    global_batch = 4\n")
FRAGMENTS = ["    unknown_field = 1\n", "steps = 1 ", "1 + ", "- ", "(", ")", "[", "]", "{", "}", "    # comment\n",
             '"a string" ', "9" * 64 + " ", "\r", "\r\n", "\uff14", "log_every = ", "    data d { path = \"x\" }\n",
             "  stage s after pretrain {\n", "x", "=", ",", "1e99 ", "\t"]

sources = st.tuples(
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=4),  # the repeated unit
    st.integers(1, 3000),  # how often
    st.sampled_from(["", "    log_every = ", "    seed = "]),  # what precedes it inside the stage
    st.booleans(),  # close the blocks
).map(lambda t: STAGE_HEAD + t[2] + "".join(t[0]) * t[1] + ("\n  }\n}\n" if t[3] else ""))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(sources)
def test_check_fmt_and_plan_stay_within_time_and_memory_bounds(tmp_path, text):
    from nemoc.compiler.planner import plan_experiment
    from nemoc.dsl.diagnostics import DiagnosticError, render_all
    from nemoc.runtime.cli.common import load_spec
    from nemoc.runtime.cli.lang import check_file, format_file

    path = tmp_path / "adv.nemo"
    path.write_text(text, encoding="utf-8", newline="")

    def plan():
        try:
            plan_experiment(load_spec(str(path))[0], target=NEMOC_RUNTIME)
        except DiagnosticError:
            pass

    def check():
        diags, srcs = check_file(str(path))
        assert not any(d.code == "E000" for d in diags), render_all(diags, srcs)
        render_all(diags, srcs)

    for name, run in (("check", check), ("fmt", lambda: format_file(str(path))), ("plan", plan)):
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        assert seconds < 10, f"{name} took {seconds:.1f} s on {len(text):,} characters"
        tracemalloc.start()  # memory in a second run: tracing slows the first one's clock down
        try:
            run()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 200 * len(text) + (64 << 20), f"{name} peaked at {peak / 2**20:.0f} MiB on {len(text):,} chars"
