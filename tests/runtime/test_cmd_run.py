"""`nemoc graph`, `nemoc run`, `nemoc status` through the real CLI (language + planner + graph + executor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemoc.runtime.cli import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def invoke(*args, cwd=None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(cli, list(args), catch_exceptions=False)
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(cli, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


@pytest.fixture
def quickstart(tmp_path):
    """A copy of the quickstart with its corpus next to it (so tests may edit the data)."""
    shutil.copy(EXAMPLES / "quickstart.nemo", tmp_path / "quickstart.nemo")
    (tmp_path / "data" / "quickstart").mkdir(parents=True)
    shutil.copy(EXAMPLES / "data" / "quickstart" / "corpus.jsonl", tmp_path / "data" / "quickstart" / "corpus.jsonl")
    return tmp_path


def test_graph_formats_are_deterministic():
    first = invoke("graph", str(EXAMPLES / "quickstart.nemo"))
    assert first.exit_code == 0, first.output
    data = json.loads(first.output)
    assert data["version"] == 1 and [t["id"] for t in data["tasks"]] == ["tokenizer:local", "prepare:corpus", "train:pretrain"]
    assert invoke("graph", str(EXAMPLES / "quickstart.nemo")).output == first.output
    dot = invoke("graph", str(EXAMPLES / "quickstart.nemo"), "--format", "dot").output
    assert '"prepare:corpus" -> "train:pretrain" [label="dataset"];' in dot
    assert invoke("graph", str(EXAMPLES / "quickstart.nemo"), "--format", "mermaid").output.startswith("flowchart LR")


def test_graph_follows_set_overrides():
    base = json.loads(invoke("graph", str(EXAMPLES / "quickstart.nemo")).output)
    edited = json.loads(invoke("graph", str(EXAMPLES / "quickstart.nemo"), "--set", "stage.pretrain.steps=50").output)
    changed = {t["id"] for t, u in zip(base["tasks"], edited["tasks"]) if t["hash"] != u["hash"]}
    assert changed == {"train:pretrain"}


def test_graph_of_a_broken_file_is_a_diagnostic_not_a_traceback(tmp_path):
    (tmp_path / "bad.nemo").write_text("experiment x { model m { layers = } }\n")
    result = invoke("graph", str(tmp_path / "bad.nemo"))
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_dry_run_starts_nothing(quickstart):
    result = invoke("run", str(quickstart / "quickstart.nemo"), "--dry-run", cwd=quickstart)
    assert result.exit_code == 0, result.output
    assert "would run" in result.output and str(quickstart / "runs" / "quickstart") in result.output
    assert not (quickstart / "runs" / "quickstart" / "data").exists()


def _with_scheduler(quickstart, scheduler: str):
    path = quickstart / "quickstart.nemo"
    text = path.read_text()
    assert "gpus_per_node = 2\n" in text
    path.write_text(text.replace("gpus_per_node = 2\n", f"gpus_per_node = 2\n    scheduler = {scheduler}\n", 1))
    return path


def test_dry_run_on_slurm_writes_the_batch_scripts_and_submits_nothing(quickstart, monkeypatch):
    monkeypatch.setenv("PATH", str(quickstart))  # no sbatch/squeue reachable: a submission would fail
    path = _with_scheduler(quickstart, 'slurm(partition = "batch", extra = ["--exclusive"], time = 2h)')
    result = invoke("run", str(path), "--dry-run", "--workdir", str(quickstart / "w"))
    assert result.exit_code == 0, result.output
    script = quickstart / "w" / "tasks" / "train_pretrain" / "job.sbatch"
    assert "wrote 1 sbatch script (nothing submitted):" in result.output and str(script) in result.output
    text = script.read_text()
    assert "#SBATCH --partition=batch" in text and "#SBATCH --exclusive" in text
    assert not (quickstart / "w" / "tasks" / "tokenizer_local").exists()  # inline tasks run where nemoc runs
    assert not (quickstart / "w" / "data").exists() and not (quickstart / "w" / "slurm.json").exists()


def test_dry_run_on_k8s_writes_the_manifests_and_applies_nothing(quickstart, monkeypatch):
    monkeypatch.setenv("PATH", str(quickstart))  # no kubectl
    path = _with_scheduler(quickstart, 'k8s(namespace = "ml", image = "registry.example/nemoc:0.1")')
    result = invoke("run", str(path), "--dry-run", "--json", "--workdir", str(quickstart / "w"))
    assert result.exit_code == 0, result.output
    manifest = quickstart / "w" / "tasks" / "train_pretrain" / "pytorchjob.yaml"
    payload = json.loads(result.stdout)
    assert payload["written"] == [str(manifest)]
    assert "namespace: ml" in manifest.read_text() and "registry.example/nemoc:0.1" in manifest.read_text()
    assert (quickstart / "w" / "k8s" / "manifests.yaml").exists()


def test_dry_run_with_a_launcher_override_and_bad_options(quickstart):
    path = _with_scheduler(quickstart, 'slurm(partition = "batch")')
    result = invoke("run", str(path), "--dry-run", "--launcher", "k8s", "--workdir", str(quickstart / "w"))
    assert result.exit_code == 2 and "the cluster's `slurm(...)` options (partition) do not apply to the k8s " \
        "launcher" in result.output
    result = invoke("run", str(path), "--dry-run", "--launcher", "local", "--workdir", str(quickstart / "w"))
    assert result.exit_code == 0 and "wrote" not in result.output
    result = invoke("run", str(path), "--dry-run", "--launcher", "nope", "--workdir", str(quickstart / "w"))
    assert result.exit_code == 2 and "unknown launcher 'nope'" in result.output


def test_bad_data_fails_with_file_line_and_status_shows_it(quickstart):
    corpus = quickstart / "data" / "quickstart" / "corpus.jsonl"
    with open(corpus, "a") as f:
        f.write('{"txt": "wrong field"}\n')
    result = invoke("run", str(quickstart / "quickstart.nemo"), "--workdir", str(quickstart / "w"))
    assert result.exit_code == 1
    assert f"{corpus}:4001: missing field 'text' (fields present: txt)" in result.output
    assert "Traceback" not in result.output
    status = invoke("status", str(quickstart / "w"))
    assert status.exit_code == 0 and "failed" in status.output and "skipped" in status.output
    rows = json.loads(invoke("status", str(quickstart / "w"), "--json").output)["tasks"]
    assert [(r["id"], r["state"]) for r in rows] == [
        ("tokenizer:local", "failed"), ("prepare:corpus", "skipped"), ("train:pretrain", "skipped")]


def test_status_of_a_non_run_directory_and_unknown_launcher(tmp_path, quickstart):
    result = invoke("status", str(tmp_path))
    assert result.exit_code == 2 and "not a nemoc run directory" in result.output
    result = invoke("run", str(quickstart / "quickstart.nemo"), "--launcher", "nope", "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 2 and "unknown launcher 'nope'" in result.output


def test_a_workdir_that_cannot_be_created_is_a_usage_error(quickstart):
    blocker = quickstart / "a_file"
    blocker.write_text("not a directory")
    for extra in ((), ("--dry-run", "--launcher", "slurm")):
        result = invoke("run", str(quickstart / "quickstart.nemo"), "--workdir", str(blocker / "run"), *extra)
        assert result.exit_code == 2, result.output
        assert f"cannot create the run directory {blocker / 'run'}: {blocker} is a file" in result.output
    assert blocker.read_text() == "not a directory"


def test_a_run_directory_that_cannot_be_written_is_a_message_not_a_traceback(quickstart):
    (quickstart / "w" / "status.json").mkdir(parents=True)  # status.json cannot be replaced
    result = invoke("run", str(quickstart / "quickstart.nemo"), "--workdir", str(quickstart / "w"))
    assert result.exit_code == 1 and f"error: Is a directory: {quickstart / 'w' / 'status.json'}" in result.output


def test_sigterm_and_sighup_take_the_ctrl_c_path():
    """A closed terminal (SIGHUP) must tear the ranks down like Ctrl-C, not end `nemoc run` alone."""
    import os
    import signal
    import time

    from nemoc.runtime.cli.run import _sigterm_as_interrupt

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a terminal, even when the suite runs under nohup
        _sigterm_as_interrupt()
        for sig in saved:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(2)  # the handler raises before this ends
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup nemoc run ...: stays ignored
        _sigterm_as_interrupt()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_status_shows_a_dead_launchers_running_task_as_interrupted(tmp_path):
    import os
    import subprocess
    import sys

    from nemoc.runtime.orchestrate import procs

    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"finished": None, "tasks": {"train:pretrain": {"state": "running"}}}))
    (run / ".lock").write_text(str(os.getpid()))
    assert "interrupted" not in invoke("status", str(run)).output
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(str(dead.pid))  # a run directory from before procs/: the pid in the lock file
    result = invoke("status", str(run))
    assert result.exit_code == 0 and "interrupted" in result.output and "is gone" in result.output, result.output
    # the recorded launcher (pid + start time) decides when there is one: a live pid with another start
    # time (a recycled pid) is not the launcher
    (run / ".lock").write_text(str(os.getpid()))
    record = procs.record(run, "launcher")
    assert "interrupted" not in invoke("status", str(run)).output
    data = json.loads(record.read_text())
    record.write_text(json.dumps(dict(data, start=data["start"] - 1)))
    rows = json.loads(invoke("status", str(run), "--json").output)["tasks"]
    assert rows[0]["state"] == "interrupted"


def test_status_of_a_damaged_status_json_is_a_message_not_a_traceback(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    unreadable = ({"tasks": [1]}, {"tasks": {"train:pretrain": None}}, ["not", "an", "object"])
    for data in unreadable:
        (run / "status.json").write_text(json.dumps(data))
        for extra in ((), ("--json",)):
            result = invoke("status", str(run), *extra)
            assert result.exit_code == 2 and "not a nemoc run directory" in result.output, result.output
    (run / "status.json").write_text(json.dumps({"order": [["x"], 3], "tasks": {
        "train:pretrain": {"state": 5, "hash": 7, "elapsed_s": "x", "steps_total": "y"}}}))
    result = invoke("status", str(run))
    assert result.exit_code == 0 and "train:pretrain" in result.output, result.output
    (run / "status.json").write_text(json.dumps({"order": 3, "tasks": {"train:pretrain": {}}}))
    assert json.loads(invoke("status", str(run), "--json").output)["tasks"][0]["id"] == "train:pretrain"


@pytest.mark.slow
def test_quickstart_trains_with_falling_loss_then_is_cached(quickstart):
    """The end-to-end goal on 2 CPU processes, shortened to 60 steps (about 1-2 minutes)."""
    workdir = str(quickstart / "w")
    args = ("run", str(quickstart / "quickstart.nemo"), "--workdir", workdir, "--set", "stage.pretrain.steps=60")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (quickstart / "w" / "tasks" / "train_pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m and "event" not in m]
    assert losses[-1] < 0.6 * losses[0], losses
    again = invoke(*args)
    assert again.exit_code == 0 and again.output.count("cached (hash") == 3
    rows = json.loads(invoke("status", workdir, "--json").output)["tasks"]
    assert rows[-1]["steps_done"] == 60 and rows[-1]["last_loss"] == pytest.approx(losses[-1])


@pytest.mark.slow
def test_ctrl_c_during_real_training_then_run_again_resumes(quickstart):
    """Ctrl-C mid-training: the ranks save and stop, nothing is left running; `nemoc run` again resumes."""
    import signal
    import subprocess
    import sys
    import time

    workdir = quickstart / "w"
    command = [sys.executable, "-m", "nemoc.runtime.cli", "run", str(quickstart / "quickstart.nemo"),
               "--workdir", str(workdir), "--set", "stage.pretrain.steps=40"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = workdir / "tasks" / "train_pretrain" / "log.txt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and "step 10/40" in log.read_text(errors="replace"):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    status = json.loads((workdir / "status.json").read_text())
    assert status["tasks"]["train:pretrain"]["state"] == "interrupted"
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(resuming)" in again.stdout and "[nemoc] resumed:" in again.stdout
    done = json.loads((workdir / "tasks" / "train_pretrain" / "DONE.json").read_text())
    assert done["steps"] == 40
