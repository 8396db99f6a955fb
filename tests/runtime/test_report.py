"""`nemoc plan --html` and `nemoc report RUN_DIR`: the page's content, partial and missing run data, and
the page as rendered by headless Chromium (no console errors, no blank chart)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemoc.compiler.lower import load_experiment
from nemoc.compiler.plan import to_json
from nemoc.compiler.planner import plan_experiment
from nemoc.runtime.browser import find_chromium, png_is_blank, render
from nemoc.runtime.cli import cli
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

LLAMA = "examples/llama3_8b_pretrain.nemo"
needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def _plan(path: str):
    spec, _ = load_experiment(path)
    return plan_experiment(spec, target=NEMOC_RUNTIME).plan


def make_run(root: Path, example: str = "examples/quickstart.nemo", *, records=None, states=None,
             results=None, torn_line: bool = False) -> Path:
    """A run directory as `nemoc run` leaves it (plan.json, status.json, tasks/<id>/task.json and
    metrics.jsonl), with the metrics given: a run in progress, a failed task, or none at all."""
    plan = _plan(example)
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(to_json(plan))
    tasks = {f"train:{s.name}": {"state": (states or {}).get(s.name, "done"), "hash": "h", "kind": s.kind}
             for s in plan.stages}
    (root / "status.json").write_text(json.dumps({"version": 1, "order": list(tasks), "tasks": tasks}))
    for s in plan.stages:
        task_dir = root / "tasks" / f"train_{s.name}"
        task_dir.mkdir(parents=True)
        (task_dir / "task.json").write_text(json.dumps({"stage": s.name, "kind": s.kind}))
        recs = (records or {}).get(s.name)
        if recs is not None:
            text = "".join(json.dumps(r) + "\n" for r in recs)
            (task_dir / "metrics.jsonl").write_text(text + ('{"step": 99, "loss": 1.' if torn_line else ""))
        if results and s.name in results:
            (task_dir / "results.json").write_text(json.dumps(results[s.name]))
    return root


def curve(n: int, every: int = 10, world: int = 2):
    return [{"step": every * (i + 1), "loss": 6.0 / (i + 1), "lr": 1e-3 * (i + 1) / n, "grad_norm": 1.0 + 0.1 * i,
             "tokens_per_s": 9000.0 + 50 * i, "step_time_s": 0.2, "time": 1.0 + i} for i in range(n)]


def test_plan_html_is_one_self_contained_page(tmp_path):
    out = tmp_path / "plan.html"
    res = invoke("plan", LLAMA, "--html", str(out))
    assert res.exit_code == 0, res.output
    assert f"HTML report written to {out}" in res.output
    page = out.read_text()
    head, _, rest = page.partition("</script>")  # the first script is plotly.js itself, inlined
    assert "plotly.js v" in head and "<script src=" not in page.partition("<script")[0]
    assert "<script src=" not in rest and "<link" not in rest and "http://" not in rest.replace("http://www.w3.org", "")
    assert "Plotly.newPlot" in page or "Plotly.react" in page
    for chart in ("cost", "memory-0", "schedule-0", "steptime-0"):
        assert f'id="{chart}"' in page
    assert "runner-ups (why each lost)" in page and "step time:" in page  # each runner-up's slower terms
    assert "why the other candidates lost" in page
    for term in ("weights", "gradients", "optimizer", "activations", "cuda context", "fragmentation"):
        assert f'"name":"{term}"' in page, term


def test_plan_html_with_json_keeps_stdout_json(tmp_path):
    out = tmp_path / "p.html"
    res = invoke("plan", "examples/mixtral_8x7b_pretrain.nemo", "--json", "--html", str(out))
    assert res.exit_code == 0
    json.loads(res.stdout)
    assert "interleaved 1F1B" in out.read_text()


def test_plan_html_unwritable_is_a_one_line_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    res = invoke("plan", LLAMA, "--html", str(tmp_path / "a_file" / "p.html"))
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: cannot write")
    assert "Traceback" not in res.output


def test_report_of_a_run_in_progress_renders_what_exists(tmp_path):
    run = make_run(tmp_path, records={"pretrain": curve(6) + [{"event": "checkpoint", "iteration": 60}]},
                   states={"pretrain": "running"}, torn_line=True)
    res = invoke("report", str(run))
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    for chart in ("cost", "memory-0", "schedule-0", "steptime-0", "curves-0", "predicted-0"):
        assert f'id="{chart}"' in page, chart
    assert "running" in page and "6 logged intervals, last step 60" in page  # the torn line 99 skipped
    assert "tokens/s per GPU" in page and "checkpoint at 60" in page


def test_predicted_vs_measured_uses_per_gpu_throughput_and_skips_warmup():
    from nemoc.runtime.html_report import measured, predicted_rows

    plan = _plan("examples/quickstart.nemo")
    sp = plan.stages[0]
    recs = [{"step": 10, "tokens_per_s": 1.0, "step_time_s": 9.0}] + [
        {"step": 10 * i, "tokens_per_s": 8000.0, "step_time_s": 0.25} for i in range(2, 6)]
    rows = {name: (p, m) for name, p, m, _ in predicted_rows(sp, recs)}
    assert rows["tokens/s per GPU"] == (sp.estimate.tokens_per_s_per_gpu, 8000.0 / sp.layout.world_size)
    assert rows["step time"][1] == 0.25
    assert rows["peak memory"][1] is None  # CPU runs log no CUDA peak
    assert measured([{"step": 1, "x": 3.0}], "x") == 3.0 and measured([], "x") is None


def test_report_without_metrics_and_with_a_failed_task(tmp_path):
    run = make_run(tmp_path / "r", "examples/pipeline.nemo", states={"pretrain": "failed", "sft": "pending"},
                   records={"pretrain": curve(2)}, results={"eval": {"stage": "eval", "datasets": {"corpus": {"loss": 2.5, "perplexity": 12.18}},
                                     "generations": [{"prompt": "Once upon", "completion": " a <time>", "tokens": 3}]}})
    out = tmp_path / "out.html"
    res = invoke("report", str(run), "-o", str(out))
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "failed" in page and "no metrics logged yet" in page
    assert "evaluation results" in page and "datasets.corpus.perplexity" in page and "12.18" in page
    assert "<td>Once upon</td><td> a &lt;time&gt;</td>" in page  # generations, escaped


def test_report_without_status_reads_the_task_directories(tmp_path):
    run = make_run(tmp_path, records={"pretrain": curve(3)})
    (run / "status.json").write_text("{damaged")
    res = invoke("report", str(run))
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    assert "no readable status.json" in page and 'id="curves-0"' in page and "not in status.json" in page


def test_report_of_a_directory_without_plan_is_a_one_line_error(tmp_path):
    res = invoke("report", str(tmp_path))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().startswith("error:") and "plan.json" in res.output
    (tmp_path / "plan.json").write_text("{not json")
    res = invoke("report", str(tmp_path))
    assert res.exit_code == 2 and "unreadable plan" in res.output
    res = invoke("report", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "no such run directory" in res.output


# ----------------------------------------------------------------------------------- as rendered


def _assert_renders(path: Path, charts: set[str]):
    shot = render(path, timeout=180)
    assert shot.errors == []
    assert charts <= set(shot.charts), set(shot.charts)
    for name, png in shot.charts.items():
        assert png.startswith(b"\x89PNG") and not png_is_blank(png), name
    return shot


@needs_chromium
def test_plan_and_run_reports_render_in_chromium(tmp_path):
    out = tmp_path / "plan.html"
    assert invoke("plan", LLAMA, "--html", str(out)).exit_code == 0
    _assert_renders(out, {"cost", "memory-0", "schedule-0", "steptime-0"})
    run = make_run(tmp_path / "run", records={"pretrain": curve(8)}, torn_line=True)
    assert invoke("report", str(run)).exit_code == 0
    _assert_renders(run / "report.html", {"memory-0", "schedule-0", "curves-0", "predicted-0"})


def test_blank_image_is_detected():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 100), "white").save(buf, format="PNG")
    assert png_is_blank(buf.getvalue())


@needs_chromium
@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(glob.glob("examples/*.nemo")))
def test_every_examples_plan_renders(tmp_path, path):
    out = tmp_path / "plan.html"
    assert invoke("plan", path, "--html", str(out)).exit_code == 0
    _assert_renders(out, {"cost", "memory-0", "schedule-0", "steptime-0"})
