"""The `tracking` block: Weights & Biases (offline) and MLflow (local file store) beside TensorBoard.

The experiment file chooses the sinks; the plan carries them; runtime.metrics hands every logged
record to them on rank 0 (runtime/tracking.py); a missing package is a one-line error naming it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemoc.compiler.lower import load_experiment
from nemoc.compiler.plan import from_json, to_json
from nemoc.compiler.planner import plan_experiment
from nemoc.compiler.spec import TrackingSpec
from nemoc.runtime import tracking
from nemoc.runtime.cli import cli
from nemoc.runtime.metrics import Metrics
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples/quickstart.nemo"
TRACKING = '  tracking { wandb = true  mlflow = "mlruns"  project = "nemoc-test" }\n'


def with_tracking(tmp_path: Path, block: str = TRACKING, steps: int | None = None) -> Path:
    """The quickstart with a tracking block, beside a copy of its data (paths stay relative)."""
    shutil.copytree(REPO / "examples/data", tmp_path / "data")
    text = QUICKSTART.read_text().replace("  precision = fp32", block + "  precision = fp32")
    if steps is not None:
        text = text.replace("steps = 300", f"steps = {steps}").replace("eval_every = 100", f"eval_every = {steps}")
        text = text.replace("warmup = 30", "warmup = 2").replace("log_every = 10", "log_every = 2")
        text = text.replace("every = 100", f"every = {steps}")
    path = tmp_path / "quickstart.nemo"
    path.write_text(text)
    return path


def _plan(path):
    spec, _ = load_experiment(str(path))
    return plan_experiment(spec, target=NEMOC_RUNTIME).plan


def test_the_block_reaches_the_plan_and_round_trips(tmp_path):
    plan = _plan(with_tracking(tmp_path))
    assert plan.tracking == TrackingSpec(wandb=True, mlflow="mlruns", project="nemoc-test", tensorboard=True)
    assert from_json(to_json(plan)) == plan
    old = json.loads(to_json(plan))
    del old["tracking"]  # a plan written before the block existed
    assert from_json(json.dumps(old)).tracking == TrackingSpec()
    assert _plan(QUICKSTART).tracking == TrackingSpec()
    spec, _ = load_experiment(str(QUICKSTART), ("tracking.wandb=true", 'tracking.project="sweep"'))
    assert spec.tracking == TrackingSpec(wandb=True, project="sweep")  # --set creates the block


def test_a_misspelt_field_is_a_diagnostic_at_its_line(tmp_path):
    path = with_tracking(tmp_path, "  tracking { wandb = yes }\n")
    res = CliRunner().invoke(cli, ["check", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{path}:" in res.output and "wandb" in res.output


def test_target_names_the_run_and_resolves_the_store(tmp_path):
    plan = _plan(with_tracking(tmp_path))
    t = tracking.target(plan, plan.stages[0], tmp_path / "task")
    assert t.mlflow == str(tmp_path / "mlruns") and t.project == "nemoc-test" and t.run_name == "quickstart-pretrain"
    assert t.config["dp"] == plan.stages[0].layout.dp
    assert tracking.target(replace(plan, tracking=TrackingSpec()), plan.stages[0], tmp_path) is None


def test_missing_package_is_named_with_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    assert "pip install wandb" in tracking.missing(TrackingSpec(wandb=True))
    assert tracking.missing(TrackingSpec(mlflow="x")) is None
    plan = _plan(with_tracking(tmp_path))
    with pytest.raises(tracking.TrackingError, match="pip install wandb"):
        tracking.open_sinks(tracking.target(plan, plan.stages[0], tmp_path), sys.stdout)
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "quickstart.nemo"), "--workdir", str(tmp_path / "run")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "pip install wandb" in res.output and res.output.strip().startswith("error:")


def _records(n=5):
    return [{"step": 2 * (i + 1), "loss": 5.0 - i, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0 + i}
            for i in range(n)]


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    plan = _plan(with_tracking(tmp_path, '  tracking { wandb = true  project = "nemoc-test" }\n'))
    task = tmp_path / "task"
    with Metrics(metrics_path=str(task / "metrics.jsonl"), tensorboard_dir=None, total_steps=10, use_rich=False,
                 tracking=tracking.target(plan, plan.stages[0], task)) as metrics:
        for r in _records():
            metrics.log(r)
    runs = list((task / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    assert [h["loss"] for h in history] == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert [h["_step"] for h in history] == [2, 4, 6, 8, 10]


def _wandb_history(run_dir: Path) -> list[dict]:
    """The logged rows of an offline run's .wandb file: W&B's record log (LevelDB's log format: a
    7-byte file header, 32 KiB blocks of records with a 7-byte header: crc32, length, type FULL=1 /
    FIRST=2 / MIDDLE=3 / LAST=4), each record a `wandb_internal_pb2.Record`."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_mlflow_file_store_holds_the_metrics(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    plan = _plan(with_tracking(tmp_path, '  tracking { mlflow = "mlruns" }\n'))
    with Metrics(metrics_path=None, tensorboard_dir=None, total_steps=10, use_rich=False,
                 tracking=tracking.target(plan, plan.stages[0], tmp_path / "task")) as metrics:
        for r in _records():
            metrics.log(r)
        metrics.event("checkpoint", iteration=10)  # events are not metrics
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri="file://" + str(tmp_path / "mlruns"))
    experiment = client.get_experiment_by_name("quickstart")  # project defaults to the experiment's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "quickstart-pretrain" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (2, 5.0), (4, 4.0), (6, 3.0), (8, 2.0), (10, 1.0)]
    assert run.data.params["dp"] == str(plan.stages[0].layout.dp)


def test_a_sink_failing_while_logging_is_dropped_not_fatal(capsys):
    class Broken:
        def log(self, record):
            raise OSError("disk full")

        def close(self):
            pass

    sinks = tracking.Sinks([Broken()], sys.stdout)
    sinks.log({"step": 1, "loss": 1.0})
    sinks.log({"step": 2, "loss": 1.0})
    assert sinks.sinks == [] and capsys.readouterr().out.count("dropped") == 1


@pytest.mark.slow
def test_nemoc_run_logs_to_wandb_and_mlflow(tmp_path):
    """End to end: `nemoc run` of the quickstart (a few steps) with both sinks, no network; then
    `nemoc report` of that run directory, rendered in headless Chromium."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    path = with_tracking(tmp_path, steps=6)
    env = dict(os.environ, WANDB_MODE="offline")
    nemoc = Path(sys.executable).parent / "nemoc"
    proc = subprocess.run([str(nemoc), "run", str(path), "--workdir", str(tmp_path / "run"), "--workers", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    task = tmp_path / "run" / "tasks" / "train_pretrain"
    (wandb_run,) = (task / "wandb").glob("offline-run-*")
    assert [h["_step"] for h in _wandb_history(wandb_run) if "loss" in h] == [2, 4, 6]
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri="file://" + str(tmp_path / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("nemoc-test").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert (task / "tensorboard").is_dir()
    # the run's HTML report, from the real run directory, as rendered
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'id="curves-0"' in page and 'id="predicted-0"' in page and "done" in page
    from nemoc.runtime.browser import find_chromium, png_is_blank, render

    if find_chromium() is not None:
        shot = render(tmp_path / "run" / "report.html", timeout=180)
        assert shot.errors == [] and {"curves-0", "predicted-0", "memory-0"} <= set(shot.charts)
        assert not any(png_is_blank(png) for png in shot.charts.values())


def test_tensorboard_false_leaves_it_out_of_the_task(tmp_path):
    from nemoc.compiler.graph import build_graph
    from nemoc.runtime.orchestrate.rundir import RunDir
    from nemoc.runtime.orchestrate.tasks import TaskContext
    from nemoc.runtime.orchestrate.tasks.training import base_task_json

    for block, want in (("  tracking { tensorboard = false }\n", None), ("", "tensorboard")):
        root = tmp_path / f"case{bool(block)}"
        root.mkdir()
        plan = _plan(with_tracking(root, block))
        task = next(t for t in build_graph(plan).tasks() if t.stage == "pretrain")
        ctx = TaskContext(task=task, plan=plan, plan_path=root / "plan.json", run_dir=RunDir(root),
                          out_dir=root / "out", inputs={})
        got = base_task_json(ctx)["tensorboard_dir"]
        assert got == want or Path(got).name == want
