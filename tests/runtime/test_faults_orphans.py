"""`kill -9` of `nemoc run` leaves no torchrun and no rank behind (issue 16): torchrun gets SIGTERM when
its parent dies (PR_SET_PDEATHSIG), every rank SIGKILL when torchrun dies (runtime/orchestrate/rank_guard.py); the
task then reads "interrupted" in `nemoc status`, and the next `nemoc run` starts. Real torchrun with the
test double `fake_train.py` (2 ranks that block, FAKE_HANG), so no training: about 20 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nemoc.runtime.orchestrate import procs

HERE = Path(__file__).resolve().parent

LAUNCHER = r"""
import sys
from plan_factory import make_layout, make_plan, make_stage
from nemoc.compiler.graph import build_graph
from nemoc.runtime.orchestrate.executor import Executor
from nemoc.runtime.orchestrate.launch_local import LocalLauncher
from nemoc.runtime.orchestrate.rundir import RunDir
from nemoc.runtime.orchestrate.tasks import TaskKind, register

register(TaskKind(name="faketrain", module="fake_train"), replace=True)
if __name__ == "__main__":
    layout = make_layout(dp=2, micro_batch=1, global_batch=2)
    plan = make_plan(sys.argv[1], stages=(make_stage("pretrain", "faketrain", steps=6, layout=layout),))
    Executor(plan, build_graph(plan), RunDir(sys.argv[2]), launcher=LocalLauncher(echo=lambda _: None),
             echo=print, options={"workers": 1}).run()
"""


def _alive(records) -> list:
    return [r for r in records if r.live()]


def test_kill_9_of_the_launcher_takes_torchrun_and_the_ranks_with_it(workspace):
    run = workspace / "run"
    env = dict(os.environ, FAKE_HANG="1",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(workspace), str(run)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    task_dir = run / "tasks" / "train_pretrain"
    records: list = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and launcher.poll() is None:
            if all((task_dir / f"pid.{rank}").exists() for rank in (0, 1)):
                records = procs.read(task_dir)
                if len([r for r in records if r.role == "rank"]) == 2:
                    break
            time.sleep(0.1)
        assert sorted(r.role for r in records) == ["rank", "rank", "torchrun"], (launcher.poll(), records)
        assert {int((task_dir / f"pid.{rank}").read_text()) for rank in (0, 1)} == \
            {r.pid for r in records if r.role == "rank"}
        assert all(r.live() for r in records)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 120
        while _alive(records) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(records), f"left running after kill -9 of nemoc run: {_alive(records)}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for rec in _alive(records):
            rec.signal(signal.SIGKILL)
    status = json.loads((run / "status.json").read_text())
    assert status["tasks"]["train:pretrain"]["state"] == "running"  # what the killed launcher left
    from nemoc.runtime.orchestrate.status import status_rows

    rows = {row["id"]: row["state"] for row in status_rows(run)}
    assert rows["train:pretrain"] == "interrupted"
