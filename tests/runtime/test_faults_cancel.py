"""`nemoc cancel` and `nemoc logs` on a local run: the run's processes are the ones recorded under its
`procs/` directories (runtime/orchestrate/procs.py), verified by pid and start time, stopped with SIGTERM (SIGKILL
after the grace period); nothing else is signalled, whatever it names. Logs follow a running task and
stop when it ends. Stand-in processes, no torch: fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from nemoc.runtime.orchestrate import procs
from nemoc.runtime.cli.cluster import cancel, cancel_local, local_processes, logs

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


def start_rank(run: Path, mode: str, role: str = "torchrun") -> subprocess.Popen:
    """A stand-in for torchrun, recorded as the local launcher records it."""
    task = run / "tasks" / "train_pretrain" / "task.json"
    proc = subprocess.Popen([sys.executable, "-c", RANK, str(task), mode], start_new_session=True)
    deadline = time.monotonic() + 20
    while not (task.parent / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (task.parent / "ready").exists()
    procs.record(task.parent, role, proc.pid)
    return proc


def start_decoy(run: Path) -> subprocess.Popen:
    """`tail -f .../task.json` in a process group of its own: names the run's files, is not the run's."""
    return subprocess.Popen(["tail", "-f", str(run / "tasks" / "train_pretrain" / "task.json")],
                            stdout=subprocess.DEVNULL, start_new_session=True)


def test_cancel_stops_the_recorded_processes_with_sigterm_and_spares_a_decoy(tmp_path):
    run = make_run(tmp_path)
    proc = start_rank(run, "save")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    decoy = start_decoy(run)
    try:
        assert [r.pid for r in local_processes(run.resolve())] == [proc.pid]
        result = CliRunner().invoke(cancel, [str(run)])
        assert result.exit_code == 0, result.output
        assert f"cancelled torchrun pid {proc.pid}" in result.output
        assert proc.wait(timeout=10) == 143
        assert (run / "tasks" / "train_pretrain" / "stopped").read_text() == "143"
        assert bystander.poll() is None and decoy.poll() is None  # only the run's processes
    finally:
        for p in (proc, bystander, decoy):
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


def test_cancel_while_the_run_prepares_data_stops_the_recorded_nemoc_run(tmp_path):
    """No torchrun yet (the run tokenizes): the recorded `nemoc run` itself gets SIGTERM (its Ctrl-C path)."""
    run = make_run(tmp_path)
    proc = start_rank(run, "save", role="launcher")
    (run / "tasks" / "train_pretrain" / "procs").rename(run / "procs")  # a launcher is recorded at the run's root
    try:
        result = CliRunner().invoke(cancel, [str(run)])
        assert result.exit_code == 0 and f"cancelled launcher pid {proc.pid}" in result.output, result.output
        assert proc.wait(timeout=10) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cancel_with_nothing_running_says_so(tmp_path):
    run = make_run(tmp_path, state="done")
    result = CliRunner().invoke(cancel, [str(run)])
    assert result.exit_code == 0 and "nothing to cancel" in result.output


def test_cancel_after_the_run_finished_signals_no_decoy_and_no_recycled_pid(tmp_path):
    """The run's recorded torchrun has ended; a `tail -f task.json` runs, and a record whose pid now names
    another process (a recycled pid: same pid, other start time) must not be signalled either."""
    run = make_run(tmp_path, state="done")
    proc = start_rank(run, "save")
    proc.terminate()
    proc.wait(timeout=10)
    decoy = start_decoy(run)
    task_dir = run / "tasks" / "train_pretrain"
    recycled = procs.record(task_dir, "rank", decoy.pid)
    data = json.loads(recycled.read_text())
    recycled.write_text(json.dumps(dict(data, start=data["start"] - 1)))  # an earlier process with that pid
    try:
        assert local_processes(run.resolve()) == []
        result = CliRunner().invoke(cancel, [str(run)])
        assert result.exit_code == 0 and "nothing to cancel" in result.output, result.output
        time.sleep(0.3)
        assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait()


def test_a_process_record_is_verified_by_start_time_and_owner():
    me = procs.start_ticks(os.getpid())
    assert me is not None and procs.start_ticks(2**22 + 12345) is None
    rec = procs.ProcRecord(os.getpid(), os.getpgid(0), me, os.getuid(), "launcher")
    assert rec.live()
    assert not procs.ProcRecord(os.getpid(), os.getpgid(0), me + 1, os.getuid(), "launcher").live()
    assert not procs.ProcRecord(os.getpid(), os.getpgid(0), me, os.getuid() + 1, "launcher").live()
    assert not procs.ProcRecord(os.getpid(), os.getpgid(0), me + 1, os.getuid(), "x").signal(0)


def test_a_sigkilled_nemoc_run_leaves_a_lock_that_is_cleared_and_a_live_one_refuses(tmp_path):
    """An flock held on by a child of a dead `nemoc run` (it inherited the open file) is stale: cleared with
    a message. A lock whose holder runs still refuses and names it."""
    import pytest

    from nemoc.runtime.orchestrate.rundir import RunDir
    from nemoc.runtime.orchestrate.tasks import TaskError

    rd = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(rd.root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TaskError, match=rf"another `nemoc run` \(pid {holder.pid}\)"):
            with rd.lock():
                pass
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "forking"  # a child that keeps the file; then it dies
        child = int(holder.stdout.readline())
        holder.wait(timeout=10)
        notes = []
        with rd.lock(echo=notes.append):
            assert (rd.root / ".lock").read_text() == str(os.getpid())
        assert any("gone" in n and "clearing the stale lock" in n for n in notes), notes
    finally:
        holder.kill()
        holder.wait()
        try:
            os.kill(child, 9)
        except (NameError, ProcessLookupError):
            pass


# a `nemoc run` stand-in: takes the lock, says so, waits for a line on stdin, forks a child that keeps the lock's
# file open (and sleeps), prints the child's pid and exits without releasing anything
HOLDER = r"""
import os, sys, time
from nemoc.runtime.orchestrate.rundir import RunDir
lock = RunDir(sys.argv[1]).lock()
lock.__enter__()
print("locked", flush=True)
sys.stdin.readline()
print("forking", flush=True)
pid = os.fork()
if pid == 0:
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
os._exit(0)
"""


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
    from nemoc.runtime.cli.cluster import _run_alive

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
