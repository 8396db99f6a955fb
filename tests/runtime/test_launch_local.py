"""runtime/orchestrate/launch_local.py pieces that need no processes: the command line, the environment, the
machine-fit guard and reading torchrun's failure summary; and, with two plain processes, the teardown of a rank that
outlives torchrun."""

from __future__ import annotations

import pytest

from nemoc.runtime.orchestrate.launch_local import (
    Rank0Echo,
    check_fits_this_machine,
    check_no_leftover_ranks,
    failing_rank,
    root_cause_exitcode,
    torchrun_command,
    worker_env,
)
from nemoc.runtime.orchestrate.launchers import LauncherError, LaunchSpec, get_launcher


def spec(tmp_path, **kw) -> LaunchSpec:
    return LaunchSpec(task_id="train:pretrain", module="nemoc.runtime.train", args=(str(tmp_path / "task.json"),),
                      nproc=kw.pop("nproc", 2), out_dir=tmp_path, log_path=tmp_path / "log.txt", **kw)


def test_command_and_environment(tmp_path, monkeypatch):
    command = torchrun_command(spec(tmp_path), 29511)
    assert command[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", "29511", "--tee", "3", "--log-dir", str(tmp_path / "ranks"),
                           "-m", "nemoc.runtime.orchestrate.rank_guard", "nemoc.runtime.train", str(tmp_path / "task.json")]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_env(spec(tmp_path, nproc=4))["OMP_NUM_THREADS"] == "2"
    assert worker_env(spec(tmp_path, nproc=16))["OMP_NUM_THREADS"] == "1"


def test_stages_that_cannot_fit_this_machine_are_refused(tmp_path):
    with pytest.raises(LauncherError, match="spans 2 nodes x 8 GPUs.*--launcher slurm or k8s"):
        check_fits_this_machine(spec(tmp_path, nodes=2, gpus_per_node=8), cpus=2, gpus=0)
    with pytest.raises(LauncherError, match="16 ranks need 16 GPUs, this machine has 8"):
        check_fits_this_machine(spec(tmp_path, nproc=16), cpus=64, gpus=8)
    with pytest.raises(LauncherError, match="64 CPU ranks on 2 cores"):
        check_fits_this_machine(spec(tmp_path, nproc=64), cpus=2, gpus=0)
    check_fits_this_machine(spec(tmp_path, nproc=8), cpus=2, gpus=0)


SUMMARY = """[default1]:RuntimeError: boom
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 11)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 12)
============================================================"""


def test_failure_summary_names_the_root_cause_rank_and_its_stderr(tmp_path):
    rank1 = tmp_path / "ranks" / "none_abc" / "attempt_0" / "1"
    rank1.mkdir(parents=True)
    (rank1 / "stderr.log").write_text("line\n" * 40 + "RuntimeError: boom on rank 1\n")
    lines = SUMMARY.format(code=1).splitlines()
    assert root_cause_exitcode(lines) == 1
    assert root_cause_exitcode(SUMMARY.format(code=143).splitlines()) == 143
    rank, tail = failing_rank(tmp_path / "ranks" / "none_abc", lines)
    assert rank == 1 and tail.endswith("RuntimeError: boom on rank 1") and len(tail.splitlines()) == 25


def test_a_rank_whose_collective_broke_is_not_named_when_another_rank_has_its_own_error(tmp_path):
    """torchrun's root cause is the first error file written; under load the surviving rank's broken collective
    can be written before the dying rank's own error (seen in test_executor's failing-rank test): the rank with
    an error of its own is named."""
    attempt = tmp_path / "ranks" / "none_abc" / "attempt_0"
    for rank, text in ((0, "Traceback (most recent call last):\n  File \"x.py\"\nRuntimeError: [../third_party/gloo/"
                           "gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5000\n"),
                       (1, "Traceback (most recent call last):\n  File \"y.py\"\nRuntimeError: boom on rank 1\n")):
        (attempt / str(rank)).mkdir(parents=True)
        (attempt / str(rank) / "stderr.log").write_text(text)
    root_is_rank0 = SUMMARY.format(code=1).replace("rank      : 1 (local_rank: 1)", "rank      : 0 (local_rank: 0)")
    rank, tail = failing_rank(tmp_path / "ranks" / "none_abc", root_is_rank0.splitlines())
    assert rank == 1 and tail.endswith("RuntimeError: boom on rank 1")
    # with no rank of its own error (every rank's collective broke), torchrun's root cause stays
    (attempt / "1" / "stderr.log").write_text("Traceback (most recent call last):\nRuntimeError: Connection reset by peer\n")
    assert failing_rank(tmp_path / "ranks" / "none_abc", root_is_rank0.splitlines())[0] == 0


def test_console_echo_shows_rank0_without_warnings(capsys):
    echo = Rank0Echo()
    for line in ["[default0]:/x/y.py:3: UserWarning: Apex is not installed\n", "[default0]:  warnings.warn(\n",
                 "[default1]:step 1 from rank 1\n", "[default0]:step 1 | loss 4.2\n", "torchrun says hi\n"]:
        echo(line)
    assert capsys.readouterr().out == "step 1 | loss 4.2\ntorchrun says hi\n"


def test_get_launcher(tmp_path):
    assert get_launcher("local", cluster=None).name == "local"
    with pytest.raises(LauncherError, match="unknown launcher 'pbs'"):
        get_launcher("pbs", cluster=None)


# A stand-in for torchrun: it dies on SIGTERM, its "rank" runs in a session of its own (as torchrun
# starts ranks) and ignores SIGTERM (a rank stuck where its handler never runs).
FAKE_TORCHRUN = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                         "print('ready', flush=True); time.sleep(600)"], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(600)
"""


def test_teardown_kills_a_rank_that_outlives_torchrun(monkeypatch):
    import subprocess
    import sys

    import psutil

    from nemoc.runtime.orchestrate import launch_local

    monkeypatch.setattr(launch_local, "TERM_GRACE_S", 1.0)
    proc = subprocess.Popen([sys.executable, "-c", FAKE_TORCHRUN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    rank = None
    try:
        rank = psutil.Process(int(proc.stdout.readline()))
        assert proc.stdout.readline().strip() == "ready"
        launch_local._terminate_group(proc)
        assert proc.poll() is not None
        rank.wait(timeout=10)  # raises TimeoutExpired if the rank was left behind
    finally:
        for p in (proc, rank):
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        proc.stdout.close()


def test_a_task_still_run_by_leftover_ranks_is_not_started_twice(tmp_path):
    """`nemoc run` SIGKILLed leaves its ranks training; the next run must not start a second torchrun
    on the same task directory (both would write its checkpoints)."""
    import subprocess
    import sys

    from nemoc.runtime.orchestrate.launch_local import LocalLauncher

    from nemoc.runtime.orchestrate import procs

    task = tmp_path / "task.json"
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    decoy = subprocess.Popen(["tail", "-f", str(task)], stdout=subprocess.DEVNULL)  # names it, is not ours
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        procs.record(tmp_path, "rank", leftover.pid)
        with pytest.raises(LauncherError, match=rf"still running this task \(pid {leftover.pid}\).*nemoc cancel"):
            LocalLauncher(echo=lambda _: None).launch(spec(tmp_path, nproc=1))
        leftover.kill()
        leftover.wait()
        check_no_leftover_ranks(spec(tmp_path, nproc=1))  # only ended records and a decoy: free to start
        assert procs.read(tmp_path) == []  # the ended records are cleared
    finally:
        for p in (leftover, decoy):
            p.kill()
            p.wait()
