"""Faults around checkpoints, losses and stops, end to end through `python -m nemoc.runtime.train`
(damaged checkpoints: test_train_resume.py):

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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemoc.runtime.faults import differing_tensors


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


# --------------------------------------------------- Ctrl-C to a torchrun job, kill -9 during a save


def _torchrun(kit, task: Path, log: Path) -> subprocess.Popen:
    cmd = [str(kit.VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "nemoc.runtime.train", str(task)]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=kit.torchrun_env(),
                            cwd=str(kit.REPO), start_new_session=True)


@pytest.mark.slow
def test_ctrl_c_to_a_torchrun_job_saves_every_rank_and_resumes_bit_identically(tmp_path, kit, train_data,
                                                                               reference_weights):
    """SIGINT to the whole process group, as a terminal's Ctrl-C delivers it: torchrun, both ranks and
    the checkpoint helper processes. The helpers ignore it; the ranks finish the step and save."""
    import os

    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(dp=2), steps=STEPS, every=EVERY, async_save=True))
    whole = tmp_path / "whole"
    task = kit.write_task(whole, plan, data_prefix=train_data, init_checkpoint=reference_weights)
    proc = _torchrun(kit, task, whole / "log")
    assert proc.wait(timeout=300) == 0, (whole / "log").read_text()[-3000:]

    out = tmp_path / "run"
    task = kit.write_task(out, plan, data_prefix=train_data, init_checkpoint=reference_weights)
    proc = _torchrun(kit, task, out / "log")
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and _logged_steps(out) < 3:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (out / "log").read_text(errors="replace")
    preempted = json.loads((out / "PREEMPTED.json").read_text())
    assert preempted["signal"] == "SIGINT" and 3 <= preempted["steps"] < STEPS, log[-3000:]
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == f"iter_{preempted['steps']:07d}"
    assert not list(root.glob("*.tmp")) and "BrokenPipeError" not in log and "error during" not in log, log[-3000:]
    rerun = _torchrun(kit, task, out / "log2")
    assert rerun.wait(timeout=300) == 0, (out / "log2").read_text()[-3000:]
    done = json.loads((out / "DONE.json").read_text())
    assert not differing_tensors(done["checkpoint"], json.loads((whole / "DONE.json").read_text())["checkpoint"])


@pytest.mark.slow
def test_kill_9_during_an_async_save_leaves_no_helper_and_the_rerun_cleans_up(tmp_path, kit, train_data,
                                                                             reference_weights):
    import psutil

    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), steps=400, every=2, async_save=True))
    out = tmp_path / "run"
    task = kit.write_task(out, plan, data_prefix=train_data, init_checkpoint=reference_weights, max_steps=None)
    proc = subprocess.Popen([sys.executable, "-m", "nemoc.runtime.train", str(task)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=kit.torchrun_env(), cwd=str(kit.REPO))
    root = out / "checkpoints"
    helpers = []
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children(recursive=True)
        if list(root.glob("iter_*.tmp")) and len(children) >= 2:  # the results-queue manager and a writer
            helpers = children
            proc.kill()
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert helpers, "never caught an async save in flight"
    gone, alive = psutil.wait_procs(helpers, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert list(root.glob("iter_*.tmp"))  # the save in flight was cut off
    rerun = kit.launch(kit.write_task(out, kit.make_plan(kit.stage_plan(lay=kit.layout(), steps=400, every=2,
                                                                         async_save=True)),
                                      data_prefix=train_data, init_checkpoint=reference_weights, max_steps=1), 1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(root.glob("iter_*.tmp"))
