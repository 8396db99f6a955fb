"""runtime.metrics: JSON lines survive, console lines carry the numbers and an ETA, rank != 0 is silent."""

from __future__ import annotations

import io
import json

from nemoc.runtime.metrics import Metrics, NullMetrics, format_duration, open_metrics


def test_jsonl_console_and_events(tmp_path):
    console = io.StringIO()
    path = tmp_path / "m" / "metrics.jsonl"
    with Metrics(metrics_path=str(path), tensorboard_dir=None, total_steps=10, console=console,
                 use_rich=False) as metrics:
        metrics.log({"step": 2, "loss": 3.25, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0,
                     "step_time_s": 0.1})
        metrics.event("checkpoint", path="/x/iter_0000002", iteration=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["step"] == 2 and records[0]["loss"] == 3.25 and "time" in records[0]
    assert records[1]["event"] == "checkpoint" and "step" not in records[1]
    text = console.getvalue()
    assert "step 2/10" in text and "loss 3.2500" in text and "tokens_per_s 1234" in text and "ETA" in text
    assert "[nemoc] checkpoint: path=/x/iter_0000002" in text


def test_appends_on_resume_and_tensorboard_scalars(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        with Metrics(metrics_path=str(path), tensorboard_dir=str(tmp_path / "tb"), total_steps=2,
                     console=io.StringIO(), use_rich=False) as metrics:
            metrics.log({"step": step, "loss": 1.0 / step, "val_loss": 2.0})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_other_ranks_get_a_null_sink_and_durations_format(tmp_path):
    assert isinstance(open_metrics(rank=1, metrics_path=str(tmp_path / "x.jsonl"), tensorboard_dir=None,
                                   total_steps=1), NullMetrics)
    assert not (tmp_path / "x.jsonl").exists()
    assert format_duration(59) == "00:59" and format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"
