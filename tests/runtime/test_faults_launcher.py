"""Fault injection through `nemoc run` on CPU (issue 16): SIGINT, SIGTERM or SIGKILL to the launcher or to
a rank at a random step of real training (the quickstart model, 2 gloo ranks). After each fault: no
process the run recorded is left (runtime/orchestrate/procs.py: pid + start time, read from /proc), status is true
(never "running" for a task nothing runs: a SIGKILLed launcher's task reads "interrupted"), and `nemoc
run` again resumes to the same final weights as an uninterrupted run, bit for bit.

The cases are drawn from the 6 (target x signal) with a seeded random step; the seed is printed
(NEMOC_FAULT_SEED replays it). NEMOC_FAULT_CASES (default 2: CI has 2 cores) draws more, up to all 6.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemoc.runtime.orchestrate import procs
from nemoc.runtime.faults import differing_tensors

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS = 16
SETS = ("--set", f"stage.pretrain.steps={STEPS}", "--set", "stage.pretrain.checkpoint.every=2", "--set",
        "stage.pretrain.checkpoint.keep=20", "--set", "stage.pretrain.log_every=1")
SEED = int(os.environ.get("NEMOC_FAULT_SEED") or int.from_bytes(os.urandom(4), "little"))
ALL = [(target, sig) for target in ("launcher", "rank") for sig in ("SIGINT", "SIGTERM", "SIGKILL")]
_rng = random.Random(SEED)
CASES = [(target, sig, _rng.randint(2, STEPS - 3))
         for target, sig in _rng.sample(ALL, min(len(ALL), int(os.environ.get("NEMOC_FAULT_CASES", "2"))))]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    text = (EXAMPLES / "quickstart.nemo").read_text().replace("warmup = 30", "warmup = 2")
    (root / "quickstart.nemo").write_text(text)
    (root / "data" / "quickstart").mkdir(parents=True)
    shutil.copy(EXAMPLES / "data" / "quickstart" / "corpus.jsonl", root / "data" / "quickstart" / "corpus.jsonl")
    return root


def command(project: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "nemoc.runtime.cli", "run", str(project / "quickstart.nemo"), "--workdir",
            str(workdir), *SETS]


def final_checkpoint(workdir: Path) -> str:
    done = json.loads((workdir / "tasks" / "train_pretrain" / "DONE.json").read_text())
    assert done["steps"] == STEPS
    return done["checkpoint"]


@pytest.fixture(scope="module")
def uninterrupted(project, tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("uninterrupted") / "w"
    result = subprocess.run(command(project, workdir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return final_checkpoint(workdir)


def recorded_live(workdir: Path) -> list:
    found = procs.live(workdir)
    for directory in procs.task_dirs(workdir):
        found += procs.live(directory)
    return found


def wait_for_step(workdir: Path, proc: subprocess.Popen, step: int) -> None:
    metrics = workdir / "tasks" / "train_pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            lines = metrics.read_text().splitlines()
        except OSError:
            lines = []
        steps = [json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")]
        if max(steps, default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"training never reached step {step} (nemoc run exit {proc.poll()})")


@pytest.mark.parametrize("target,sig,step", CASES, ids=[f"{t}-{s}-at-{n}" for t, s, n in CASES])
def test_a_fault_leaves_nothing_running_and_the_rerun_is_bit_identical(project, uninterrupted, tmp_path,
                                                                       target, sig, step):
    print(f"\nfault: {sig} to the {target} at step {step} (NEMOC_FAULT_SEED={SEED})")
    workdir = tmp_path / "w"
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(command(project, workdir), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(workdir, proc, step)
        task_dir = workdir / "tasks" / "train_pretrain"
        if target == "launcher":
            victim = proc.pid
        else:
            victim = random.Random(SEED + step).choice(procs.live(task_dir, ("rank",))).pid
        os.kill(victim, getattr(signal, sig))
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "run.log").read_text(errors="replace")
    deadline = time.monotonic() + 120  # a parent-death signal is delivered asynchronously
    while recorded_live(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not recorded_live(workdir), f"processes left behind: {recorded_live(workdir)}\n{output[-3000:]}"
    status = json.loads(subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "status", str(workdir), "--json"],
                                       capture_output=True, text=True, timeout=120).stdout)
    state = {row["id"]: row["state"] for row in status["tasks"]}["train:pretrain"]
    assert state in ("interrupted", "preempted", "failed", "done"), state
    if target == "launcher" and sig == "SIGKILL":
        assert state == "interrupted"
    again = subprocess.run(command(project, workdir), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    different = differing_tensors(final_checkpoint(workdir), uninterrupted)
    assert not different, f"tensors differ after {sig} to the {target} at step {step}: {different[:5]}"



def test_a_copied_run_directory_with_a_deleted_data_set_reruns_what_is_missing(project, uninterrupted, tmp_path):
    """The uninterrupted run directory copied elsewhere (the original out of reach) with its prepared .bin
    deleted: the copy reads its own files, prepares the data set again (the same bytes, so training stays
    cached) and its final checkpoint is its own, the uninterrupted weights."""
    original = Path(uninterrupted).parents[3]  # w/tasks/train_pretrain/checkpoints/iter_N
    workdir = tmp_path / "copy"
    shutil.copytree(original, workdir, symlinks=True)
    (workdir / "data" / "corpus" / "corpus_text_document.bin").unlink()
    moved_away = tmp_path / "original-gone"
    original.rename(moved_away)  # nothing may read the original any more
    try:
        again = subprocess.run(command(project, workdir), capture_output=True, text=True, timeout=900)
    finally:
        moved_away.rename(original)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "corpus_text_document.bin is missing: running it again" in again.stdout
    assert "train:pretrain           cached" in again.stdout
    from nemoc.runtime.orchestrate.rundir import RunDir

    checkpoint = RunDir(workdir).done_record("train:pretrain")["checkpoint"]  # resolved in the copy
    assert checkpoint.startswith(str(workdir.resolve()) + "/")
    assert not differing_tensors(checkpoint, uninterrupted)
