"""A hung collective does not hang the job forever: a rank frozen with SIGSTOP in the middle of
training makes its peer's collective time out after the task's `timeout_s`, and the error names the
rank, the phase and the operation (runtime/train.py), and torchrun ends the job. Slow: 2 ranks."""

from __future__ import annotations

import re
import signal
import time

import pytest

from nemoc.runtime.faults import RESTART_SAFE_ENV

pytestmark = pytest.mark.slow

# Megatron-Core's parallel groups take their timeout in whole minutes (train.py rounds timeout_s up), so
# the data-parallel collective times out after 60 s; torchrun then gives the frozen rank 30 s to exit.
TIMEOUT_S = 60
TORCHRUN_GRACE_S = 30


def test_a_frozen_rank_times_out_its_peers_collective_with_rank_and_phase(tmp_path, kit, train_data):
    import subprocess

    import psutil

    out = tmp_path / "run"
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(dp=2), steps=200, every=None))
    task = kit.write_task(out, plan, data_prefix=train_data, timeout_s=TIMEOUT_S)
    env = dict(kit.torchrun_env(), **RESTART_SAFE_ENV)
    log = open(out / "torchrun.log", "w")
    proc = subprocess.Popen([str(kit.VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2",
                             "--max-restarts=0", "-m", "nemoc.runtime.train", str(task)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(kit.REPO), start_new_session=True)
    frozen = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
                ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                         if "nemoc.runtime.train" in " ".join(p.cmdline())]
                ranks.sort(key=lambda p: p.environ().get("RANK", ""))
                frozen = ranks[-1]  # rank 1
                frozen.send_signal(signal.SIGSTOP)
                break
            time.sleep(0.05)
        assert frozen is not None, (out / "torchrun.log").read_text()[-3000:]
        stopped_at = time.monotonic()
        proc.wait(timeout=TIMEOUT_S + TORCHRUN_GRACE_S + 120)
        took = time.monotonic() - stopped_at
    finally:
        if frozen is not None and frozen.is_running():
            frozen.send_signal(signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (out / "torchrun.log").read_text(errors="replace")
    assert proc.returncode != 0
    assert took < TIMEOUT_S + TORCHRUN_GRACE_S + 60, took
    # rank 0 waits in whichever collective comes next: the step's gradient all-reduce, or the loss /
    # stop-signal all-reduce of the logging step that follows the first logged loss
    phase = re.search(r"\[nemoc rank 0\] error during (train step|log step|validation at step) \d+", text)
    assert phase, "\n".join(line for line in text.splitlines() if "[nemoc" in line)[-3000:] or text[-3000:]
    assert "a collective timed out" in text
    assert "Timed out waiting" in text and "operation" in text  # gloo names the operation (send/recv)
    assert not (out / "DONE.json").exists()
    print(f"\nfrozen rank detected after {took:.1f} s (timeout {TIMEOUT_S} s)")
