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


def test_a_resume_rewinds_the_log_so_each_step_has_one_record(tmp_path):
    """A run logged steps 1-5 (and a torn line) and was killed; the rerun resumes from step 3's
    checkpoint: steps 4-5 are dropped before they are logged again; events are kept."""
    from nemoc.runtime.metrics import read_records

    path = tmp_path / "metrics.jsonl"
    with Metrics(metrics_path=str(path), tensorboard_dir=str(tmp_path / "tb"), total_steps=6,
                 console=io.StringIO(), use_rich=False) as metrics:
        for step in range(1, 6):
            metrics.log({"step": step, "loss": float(step)})
        metrics.event("checkpoint", iteration=3)
    with open(path, "a") as handle:
        handle.write('{"step": 6, "lo')  # killed mid-write
    with Metrics(metrics_path=str(path), tensorboard_dir=str(tmp_path / "tb"), total_steps=6,
                 console=io.StringIO(), use_rich=False) as metrics:
        metrics.rewind(3)
        for step in range(4, 7):
            metrics.log({"step": step, "loss": 10.0 + step})
    records = read_records(path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records if "loss" in r][3:] == [14.0, 15.0, 16.0]
    assert any(r.get("event") == "checkpoint" for r in records)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines() if '"loss"' in x] == [1, 2, 3, 4, 5, 6]


def test_read_records_keeps_the_last_of_a_repeated_step_and_distinct_records_of_one_step(tmp_path):
    from nemoc.runtime.metrics import read_records

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "val_loss": 4.5},
            {"event": "resumed", "iteration": 1}, {"step": 2, "loss": 3.9}, {"step": 3, "loss": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(path)
    assert [(r.get("step"), r.get("loss"), r.get("val_loss")) for r in records if "step" in r] == [
        (1, 5.0, None), (2, None, 4.5), (2, 3.9, None), (3, 3.0, None)]


def test_records_are_fsynced_off_the_callers_thread_and_a_failed_sync_is_raised(tmp_path, monkeypatch):
    import os
    import threading

    import pytest

    from nemoc.runtime import metrics as metrics_module

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((fd, threading.current_thread().name))
        real_fsync(fd)

    monkeypatch.setattr(metrics_module.os, "fsync", fsync)
    path = tmp_path / "metrics.jsonl"
    metrics = Metrics(metrics_path=str(path), tensorboard_dir=None, total_steps=4, console=io.StringIO(),
                      use_rich=False)
    fd = metrics._jsonl.fileno()
    metrics.log({"step": 1, "loss": 1.0})
    assert json.loads(path.read_text())["step"] == 1  # written and flushed before log returns
    for _ in range(200):  # the background thread syncs it
        if any(name == "nemoc-metrics-fsync" for _, name in synced):
            break
        threading.Event().wait(0.01)
    assert (fd, "nemoc-metrics-fsync") in synced
    metrics.close()
    assert synced[-1] == (fd, threading.current_thread().name)  # close syncs once more, on the caller's thread

    def failing(fd):
        raise OSError(28, "No space left on device")

    metrics = Metrics(metrics_path=str(path), tensorboard_dir=None, total_steps=4, console=io.StringIO(),
                      use_rich=False)
    monkeypatch.setattr(metrics_module.os, "fsync", failing)
    metrics.log({"step": 2, "loss": 1.0})
    metrics._fsync._thread.join(0.5)
    for _ in range(200):
        if metrics._fsync.error is not None:
            break
        threading.Event().wait(0.01)
    with pytest.raises(OSError, match="No space left"):
        metrics.log({"step": 3, "loss": 1.0})
    monkeypatch.setattr(metrics_module.os, "fsync", real_fsync)
    metrics.close()
