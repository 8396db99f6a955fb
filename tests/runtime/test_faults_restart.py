"""Fault tolerance, locally: torchrun's restarts (`--max-restarts`) bring a job back after a rank dies,
and it resumes from the last good checkpoint, ending with the same weights as an uninterrupted run.

* A rank killed with SIGKILL at random steps (seeded; the seed is printed): the final checkpoint's
  tensors (model, Adam moments, main params) equal the uninterrupted run's bit for bit.
* A rank killed while a checkpoint is being written: the previous checkpoint stays `latest` and
  verifies; the half-written one is never used.
* A corrupt `latest` found after a crash is skipped with a warning; the older checkpoint is used and
  the result is still bit-identical.
Deterministic CPU settings: gloo, fp32, 2 ranks (DP=2), one OMP thread each.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nemoc.runtime.faults import RESTART_SAFE_ENV, checkpoint_tensors, differing_tensors

pytestmark = pytest.mark.slow

STEPS = 8
EVERY = 2


def _plan(kit):
    return kit.make_plan(kit.stage_plan(lay=kit.layout(dp=2), steps=STEPS, every=EVERY, keep=3))


def _torchrun(kit, task_path: Path, log: Path, max_restarts: int) -> subprocess.Popen:
    cmd = [str(kit.VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", f"--max-restarts={max_restarts}",
           "--monitor-interval=0.2", "-m", "nemoc.runtime.train", str(task_path)]
    handle = open(log, "w")
    env = kit.torchrun_env()
    env.update(RESTART_SAFE_ENV)
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(kit.REPO),
                            start_new_session=True)


def _ranks(proc: subprocess.Popen) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "nemoc.runtime.train" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _steps_logged(out: Path) -> list[int]:
    from nemoc.runtime.metrics import read_records

    return [record["step"] for record in read_records(out / "metrics.jsonl") if "loss" in record]


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text(errors="replace")


def assert_bit_identical(a: str | Path, b: str | Path) -> None:
    keys = checkpoint_tensors(a).keys()
    assert any(k.startswith("decoder.") for k in keys) and any("exp_avg" in k for k in keys)
    different = differing_tensors(a, b)
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, kit, train_data, reference_weights):
    out = tmp_path_factory.mktemp("uninterrupted")
    task = kit.write_task(out, _plan(kit), data_prefix=train_data, init_checkpoint=reference_weights)
    log = out / "torchrun.log"
    proc = _torchrun(kit, task, log, max_restarts=0)
    text = _finish(proc, log)
    assert proc.returncode == 0, text[-4000:]
    return json.loads((out / "DONE.json").read_text())["checkpoint"]


def _run_with_fault(tmp_path, kit, train_data, reference_weights, fault) -> tuple[int, str, Path]:
    """Start a 2-rank run with restarts allowed; `fault(proc, out)` runs in a thread and injects the fault."""
    out = tmp_path / "run"
    task = kit.write_task(out, _plan(kit), data_prefix=train_data, init_checkpoint=reference_weights)
    log = out / "torchrun.log"
    proc = _torchrun(kit, task, log, max_restarts=2)
    errors: list[BaseException] = []

    def inject():
        try:
            fault(proc, out)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    text = _finish(proc, log)
    thread.join(timeout=30)
    if errors:
        raise errors[0]
    return proc.returncode, text, out


def _kill_a_rank_at(step: int, rng: random.Random, state: dict):
    def fault(proc, out):
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if max(_steps_logged(out), default=0) >= step:
                ranks = _ranks(proc)
                if ranks:
                    victim = rng.choice(ranks)
                    state["killed"] = (step, victim.pid)
                    victim.send_signal(signal.SIGKILL)
                    return
            time.sleep(0.02)
        raise AssertionError(f"never reached step {step}")
    return fault


def test_sigkill_at_random_steps_resumes_to_bit_identical_weights(tmp_path, kit, train_data, reference_weights,
                                                                  uninterrupted):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, STEPS), 3))
    print(f"\nkill points {points} (seed {seed})")
    for point in points:
        state: dict = {}
        code, text, out = _run_with_fault(tmp_path / f"kill{point}", kit, train_data, reference_weights,
                                          _kill_a_rank_at(point, rng, state))
        assert code == 0, f"seed {seed}, kill at {point}:\n{text[-4000:]}"
        assert state.get("killed"), f"seed {seed}: the fault was not injected at {point}"
        assert text.count("[nemoc] stage pretrain") >= 2, text[-3000:]  # torchrun restarted the ranks
        done = json.loads((out / "DONE.json").read_text())
        assert done["steps"] == STEPS
        assert_bit_identical(done["checkpoint"], uninterrupted)


def test_a_crash_during_a_checkpoint_save_leaves_the_previous_checkpoint_intact(tmp_path, kit, train_data,
                                                                                reference_weights, uninterrupted):
    from nemoc.runtime import checkpoint as ckpt

    seen: dict = {}

    def fault(proc, out):
        root = out / "checkpoints"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            latest = ckpt.read_latest(str(root))
            saving = sorted(root.glob("iter_*.tmp")) if root.is_dir() else []
            if latest and saving:
                ranks = _ranks(proc)
                if ranks:
                    ranks[0].send_signal(signal.SIGKILL)
                    seen.update(latest=latest, saving=str(saving[-1]))
                    # right after the crash: `latest` still names the previous, complete checkpoint
                    seen["latest_after"] = ckpt.read_latest(str(root))
                    seen["verify"] = ckpt.verify(seen["latest_after"])
                    return
            time.sleep(0.002)
        raise AssertionError("never caught a save in progress")

    code, text, out = _run_with_fault(tmp_path, kit, train_data, reference_weights, fault)
    assert code == 0, text[-4000:]
    assert seen["latest_after"] == seen["latest"] and seen["verify"] is None, seen
    assert Path(seen["saving"]).name > Path(seen["latest"]).name  # the save in flight was a newer one
    done = json.loads((out / "DONE.json").read_text())
    assert_bit_identical(done["checkpoint"], uninterrupted)
    assert not list((out / "checkpoints").glob("*.tmp"))  # the next save or prune removed the debris


def test_a_corrupt_latest_after_a_crash_is_skipped_with_a_warning(tmp_path, kit, train_data, reference_weights,
                                                                  uninterrupted):
    from nemoc.runtime import checkpoint as ckpt

    seen: dict = {}

    def fault(proc, out):
        root = out / "checkpoints"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            latest = ckpt.read_latest(str(root))
            if latest and latest.endswith(f"iter_{2 * EVERY:07d}") and not list(root.glob("*.tmp")):
                ranks = _ranks(proc)
                for rank in ranks:  # stop the world, then damage the newest checkpoint, as a bad disk would
                    rank.send_signal(signal.SIGSTOP)
                shard = next(p for p in sorted(Path(latest).iterdir()) if p.suffix == ".distcp")
                with open(shard, "r+b") as handle:
                    handle.truncate(max(shard.stat().st_size // 2, 1))
                seen.update(corrupted=latest)
                ranks[0].send_signal(signal.SIGKILL)
                for rank in ranks[1:]:
                    rank.send_signal(signal.SIGCONT)
                return
            time.sleep(0.005)
        raise AssertionError("never saw the second checkpoint")

    code, text, out = _run_with_fault(tmp_path, kit, train_data, reference_weights, fault)
    assert code == 0, text[-4000:]
    assert "skipping checkpoint" in text and Path(seen["corrupted"]).name in text, text[-3000:]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if '"resumed"' in line]
    assert resumed and resumed[-1]["iteration"] == EVERY  # the one before the corrupt latest
    assert_bit_identical(json.loads((out / "DONE.json").read_text())["checkpoint"], uninterrupted)
