"""`nemoc cancel` and `nemoc logs` on a local run: the run's processes are found by the task.json they
name, stopped with SIGTERM on their process group (SIGKILL after the grace period); logs follow a
running task and stop when it ends. Stand-in processes, no torch: fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from nemoc.runtime.cmd_cluster import cancel, cancel_local, local_processes, logs

# a "rank": names its task.json on the command line, saves and exits 143 on SIGTERM (or ignores it)
RANK = r"""
import signal, sys, time, pathlib
task, mode = sys.argv[1], sys.argv[2]
out = pathlib.Path(task).parent
def stop(*_):
    (out / "stopped").write_text("143"); sys.exit(143)
signal.signal(signal.SIGTERM, stop if mode == "save" else signal.SIG_IGN)
(out / "ready").write_text("1")
while True:
    time.sleep(0.05)
"""


def make_run(tmp_path: Path, state: str = "running") -> Path:
    run = tmp_path / "run"
    task_dir = run / "tasks" / "train_pretrain"
    task_dir.mkdir(parents=True)
    (task_dir / "task.json").write_text("{}")
    (run / "status.json").write_text(json.dumps({"tasks": {"train:pretrain": {"state": state}}}))
    return run


def start_rank(run: Path, mode: str) -> subprocess.Popen:
    task = run / "tasks" / "train_pretrain" / "task.json"
    proc = subprocess.Popen([sys.executable, "-c", RANK, str(task), mode], start_new_session=True)
    deadline = time.monotonic() + 20
    while not (task.parent / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (task.parent / "ready").exists()
    return proc


def test_cancel_stops_the_runs_process_group_with_sigterm(tmp_path):
    run = make_run(tmp_path)
    proc = start_rank(run, "save")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert list(local_processes(run.resolve())) == [os.getpgid(proc.pid)]
        result = CliRunner().invoke(cancel, [str(run)])
        assert result.exit_code == 0, result.output
        assert "cancelled process group" in result.output
        assert proc.wait(timeout=10) == 143
        assert (run / "tasks" / "train_pretrain" / "stopped").read_text() == "143"
        assert bystander.poll() is None  # only the run's processes
    finally:
        for p in (proc, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    run = make_run(tmp_path)
    proc = start_rank(run, "ignore")
    try:
        started = time.monotonic()
        stopped = cancel_local(run.resolve(), grace_s=1.0)
        assert stopped and proc.wait(timeout=10) == -9
        assert time.monotonic() - started >= 1.0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cancel_with_nothing_running_says_so(tmp_path):
    run = make_run(tmp_path, state="done")
    result = CliRunner().invoke(cancel, [str(run)])
    assert result.exit_code == 0 and "nothing to cancel" in result.output


def test_not_a_run_directory_is_a_usage_error(tmp_path):
    for command in (cancel, logs):
        result = CliRunner().invoke(command, [str(tmp_path)])
        assert result.exit_code == 2 and "not a nemoc run directory" in result.output


def test_logs_by_any_task_name_and_the_last_lines(tmp_path):
    run = make_run(tmp_path, state="done")
    (run / "tasks" / "train_pretrain" / "log.txt").write_text("".join(f"line {i}\n" for i in range(10)))
    for name in ("train:pretrain", "pretrain", "train_pretrain"):
        result = CliRunner().invoke(logs, [str(run), name, "-n", "2"])
        assert result.exit_code == 0 and result.output == "line 8\nline 9\n", result.output
    result = CliRunner().invoke(logs, [str(run), "sft"])
    assert result.exit_code == 2 and "no task 'sft'" in result.output and "train:pretrain" in result.output


def test_logs_follow_prints_new_lines_until_the_task_stops_running(tmp_path):
    run = make_run(tmp_path, state="running")
    log = run / "tasks" / "train_pretrain" / "log.txt"
    log.write_text("start\n")

    def training():
        for i in range(3):
            time.sleep(0.3)
            with open(log, "a") as f:
                f.write(f"step {i}\n")
        (run / "status.json").write_text(json.dumps({"tasks": {"train:pretrain": {"state": "done"}}}))

    thread = threading.Thread(target=training)
    thread.start()
    started = time.monotonic()
    result = CliRunner().invoke(logs, [str(run), "-f"])  # default task: the running one
    thread.join()
    assert result.exit_code == 0
    assert result.output == "start\nstep 0\nstep 1\nstep 2\n"
    assert time.monotonic() - started < 15


def test_logs_follow_stops_when_the_nemoc_run_that_wrote_running_is_gone(tmp_path):
    """`nemoc run` SIGKILLed: status.json says running forever; -f must not follow it forever."""
    run = make_run(tmp_path, state="running")
    (run / "tasks" / "train_pretrain" / "log.txt").write_text("last words\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(str(dead.pid))  # the pid `nemoc run` leaves in its lock file
    outcome = {}
    follower = threading.Thread(target=lambda: outcome.update(result=CliRunner().invoke(logs, [str(run), "-f"])),
                                daemon=True)
    follower.start()
    follower.join(timeout=20)
    assert not follower.is_alive(), "logs -f kept following a run nobody is running"
    assert outcome["result"].exit_code == 0 and outcome["result"].output == "last words\n"
    (run / ".lock").write_text(str(os.getpid()))  # alive: still followed (the test above covers the end)
    from nemoc.runtime.cmd_cluster import _run_alive

    assert _run_alive(run.resolve())


def test_logs_and_cancel_read_a_damaged_status_json_without_a_traceback(tmp_path):
    run = make_run(tmp_path, state="done")
    (run / "tasks" / "train_pretrain" / "log.txt").write_text("the log\n")
    damaged = ({"tasks": {"train:pretrain": None, "other": 5}}, {"tasks": [1, 2]}, {"tasks": {"train:pretrain": {}}})
    for status in damaged:
        (run / "status.json").write_text(json.dumps(status))
        result = CliRunner().invoke(logs, [str(run)], catch_exceptions=False)
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
        result = CliRunner().invoke(logs, [str(run), "pretrain"], catch_exceptions=False)
        assert result.exit_code in (0, 2), result.output
        result = CliRunner().invoke(cancel, [str(run)], catch_exceptions=False)
        assert result.exit_code == 0 and "nothing to cancel" in result.output
    (run / "status.json").unlink()
    (run / "graph.json").write_text(json.dumps({"tasks": [{"id": 5}, {"id": None}, "x"]}))
    result = CliRunner().invoke(logs, [str(run), "pretrain"], catch_exceptions=False)
    assert result.exit_code == 2 and "no task 'pretrain'" in result.output
