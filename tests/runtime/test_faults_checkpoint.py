"""Faults around checkpoints, losses and stops, end to end through `python -m nemoc.runtime.train`:

* a shard corrupted in place (same size) is caught by its digest: the run falls back to the previous
  checkpoint and ends bit-identical to an uninterrupted run; if every checkpoint is damaged it stops
  with an error naming the file (never a silent restart, never NaN losses and "done");
* `lr = 1e6` makes the loss NaN/Inf: the step is rerun once from the same state, then the task fails
  with "loss became ... at step N ... lower the learning rate", no DONE.json;
* a full disk (RLIMIT_FSIZE) at a checkpoint: "checkpoint save failed at step N: ...", the temporary
  directory removed, no DONE.json;
* SIGTERM / SIGINT mid-training: the step finishes, a checkpoint of the step reached is saved, exit
  143, no `.tmp` left, and the rerun ends with weights bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemoc.runtime.faults import differing_tensors


def _copy_checkpoints(baseline, dest: Path, iterations, latest: int) -> Path:
    src = baseline.out / "checkpoints"
    dest.mkdir(parents=True)
    for it in iterations:
        shutil.copytree(src / f"iter_{it:07d}", dest / f"iter_{it:07d}")
    (dest / "latest").write_text(f"iter_{latest:07d}\n")
    return dest


def _flip_bytes(path: Path) -> None:
    """Damage a file in place without changing its size (a bad disk, a bit rot)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 64, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard(checkpoint: Path) -> Path:
    return max((p for p in checkpoint.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


def test_a_corrupted_shard_of_unchanged_size_is_skipped_and_the_result_is_bit_identical(
        tmp_path, kit, train_data, reference_weights, baseline):
    ckdir = _copy_checkpoints(baseline, tmp_path / "ck", (3, 6), latest=6)
    shard = _shard(ckdir / "iter_0000006")
    size = shard.stat().st_size
    _flip_bytes(shard)
    assert shard.stat().st_size == size
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), every=3))
    result = kit.run_training(tmp_path / "run", plan, 1, data_prefix=train_data, checkpoint_dir=ckdir,
                              init_checkpoint=reference_weights)
    assert result.returncode == 0, result.explain()
    assert f"skipping checkpoint {ckdir / 'iter_0000006'}" in result.stdout, result.explain()
    assert str(shard) in result.stdout and "corrupted" in result.stdout
    resumed = [r for r in result.records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["iteration"] == 3
    assert not differing_tensors(result.done["checkpoint"], baseline.done["checkpoint"])


def test_when_every_checkpoint_is_damaged_the_run_stops_naming_the_file(tmp_path, kit, train_data,
                                                                          reference_weights, baseline):
    ckdir = _copy_checkpoints(baseline, tmp_path / "ck", (3, 6), latest=6)
    _flip_bytes(_shard(ckdir / "iter_0000006"))
    truncated = _shard(ckdir / "iter_0000003")
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), every=3))
    result = kit.run_training(tmp_path / "run", plan, 1, data_prefix=train_data, checkpoint_dir=ckdir,
                              init_checkpoint=reference_weights)
    assert result.returncode == 1, result.explain()
    assert "error: no usable checkpoint under" in result.stderr and str(truncated) in result.stderr
    assert "Traceback" not in result.stderr, result.explain()
    assert result.done is None and not [r for r in result.records if "loss" in r]


def test_a_diverging_loss_fails_the_task_with_the_step_and_a_hint(tmp_path, kit, train_data, reference_weights):
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), steps=6, lr=1e6))
    result = kit.run_training(tmp_path / "run", plan, 1, data_prefix=train_data, init_checkpoint=reference_weights)
    assert result.returncode == 1, result.explain()
    line = next((x for x in result.stderr.splitlines() if "error: loss became" in x), None)
    assert line is not None, result.explain()
    assert " at step " in line and "again when the step was rerun from the same state" in line
    assert "lower the learning rate" in line and "Traceback" not in result.stderr
    assert result.done is None
    assert (tmp_path / "run" / "FATAL.json").exists() or "loss became" in result.stderr


def _fsize_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    return apply


def test_a_full_disk_at_a_checkpoint_fails_cleanly_and_leaves_no_temporary(tmp_path, kit, train_data,
                                                                          reference_weights):
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), every=3))
    out = tmp_path / "run"
    task = kit.write_task(out, plan, data_prefix=train_data, init_checkpoint=reference_weights)
    proc = subprocess.run([sys.executable, "-m", "nemoc.runtime.train", str(task)], capture_output=True, text=True,
                          timeout=240, env=kit.torchrun_env(), cwd=str(kit.REPO), preexec_fn=_fsize_limit(200_000))
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "error: checkpoint save failed at step 3: File too large" in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    root = out / "checkpoints"
    assert not list(root.glob("*.tmp")) and not (root / "latest").exists()
    assert not (out / "DONE.json").exists()


# ------------------------------------------------------------------------------------- graceful stop

STEPS, EVERY = 30, 10


@pytest.fixture(scope="module")
def long_plan(kit):
    return kit.make_plan(kit.stage_plan(lay=kit.layout(), steps=STEPS, every=EVERY))


@pytest.fixture(scope="module")
def long_baseline(tmp_path_factory, kit, long_plan, train_data, reference_weights):
    out = tmp_path_factory.mktemp("long")
    result = kit.run_training(out, long_plan, 1, data_prefix=train_data, init_checkpoint=reference_weights)
    assert result.returncode == 0, result.explain()
    return result


def _logged_steps(out: Path) -> int:
    from nemoc.runtime.metrics import read_records

    return max((r["step"] for r in read_records(out / "metrics.jsonl") if "loss" in r), default=0)


def _stop_midway(kit, out: Path, task: Path, sig: int, *, at_step: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "nemoc.runtime.train", str(task)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=kit.torchrun_env(), cwd=str(kit.REPO))
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline and _logged_steps(out) < at_step:
        time.sleep(0.005)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_the_step_reached_exits_143_and_the_rerun_is_bit_identical(
        tmp_path, kit, long_plan, long_baseline, train_data, reference_weights, sig):
    out = tmp_path / "run"
    task = kit.write_task(out, long_plan, data_prefix=train_data, init_checkpoint=reference_weights)
    stopped = _stop_midway(kit, out, task, sig)
    assert stopped.returncode == 143, stopped.stderr[-4000:]
    preempted = json.loads((out / "PREEMPTED.json").read_text())
    reached = preempted["steps"]
    assert 2 <= reached < STEPS and preempted["signal"] == signal.Signals(sig).name
    root = out / "checkpoints"
    assert preempted["checkpoint"] == str(root / f"iter_{reached:07d}")
    assert (root / "latest").read_text().strip() == f"iter_{reached:07d}" and not list(root.glob("*.tmp"))
    assert "BrokenPipeError" not in stopped.stderr and "Traceback" not in stopped.stderr
    rerun = kit.launch(task, 1)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    done = json.loads((out / "DONE.json").read_text())
    assert not differing_tensors(done["checkpoint"], long_baseline.done["checkpoint"])
    from nemoc.runtime.metrics import read_records

    steps = [r["step"] for r in json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]")
             if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # one record per step in the file itself
    assert [r["step"] for r in read_records(out / "metrics.jsonl") if "loss" in r] == steps
