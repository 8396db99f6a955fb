"""The generated sbatch script, without a Slurm: directives, quoting against injection, and the
preemption/requeue policy, executed by bash with recording stand-ins for srun/scontrol/scancel.

(The tests that need a real Slurm are in test_slurm_cluster.py, marked `slurm`.)
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nemoc.runtime.orchestrate.launch_slurm import (
    SlurmError,
    SlurmJob,
    SlurmOptions,
    directives,
    job_from_spec,
    render_sbatch,
    slurm_time,
)
from nemoc.runtime.orchestrate.launchers import LaunchSpec

EVIL = "a b'c\"d $(touch pwned) `touch pwned` ; touch pwned && echo $HOME \\ |x> end"

FAKE_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'n1\nn2\n' ;;
  "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=10.0.0.7 NodeHostName=h Port=6818" ;;
  requeue*) echo "requeue $2" >> "$FAKE_LOG/requeue" ;;
  *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
"""
# scancel --signal=TERM reaches the job's step processes: here, the fake srun (which recorded its pid).
FAKE_SCANCEL = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG/scancel"
[ "$1" = --signal=TERM ] && kill -TERM "$(cat "$FAKE_LOG/srun.pid")"
exit 0
"""
# srun records its argv (NUL-separated, so any character survives), then behaves as FAKE_SRUN says.
FAKE_SRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE_LOG/srun.argv"
echo "${OMP_NUM_THREADS:-unset}" > "$FAKE_LOG/omp"
case "$FAKE_SRUN" in
  done) echo '{}' > "$FAKE_DONE"; exit 0 ;;
  wait) trap 'exit 143' TERM; echo $$ > "$FAKE_LOG/srun.pid"; echo ready > "$FAKE_LOG/ready"
        while :; do sleep 0.05; done ;;
  *) exit "$FAKE_SRUN" ;;
esac
"""


@pytest.fixture
def sandbox(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "log").mkdir()
    return tmp_path


def make_job(root: Path, *, name="nemoc-train", task_id="train:pretrain", args=("/run/task.json",), env=None,
             gpus=0) -> SlurmJob:
    out = root / "tasks" / "t"
    out.mkdir(parents=True, exist_ok=True)
    return SlurmJob(task_id=task_id, name=name, nodes=2, procs_per_node=1, gpus_per_node=gpus,
                    program=("-m", "nemoc.runtime.train", *args), run_dir=str(root), log_path=str(out / "log.txt"),
                    done_path=str(out / "DONE.json"), env=env or {"OMP_NUM_THREADS": "1"}, python="/usr/bin/python3")


def run_script(sandbox: Path, job: SlurmJob, opts: SlurmOptions, srun: str, *, background=False, restarts=None):
    script = sandbox / "job.sbatch"
    script.write_text(render_sbatch(job, opts))
    env = {"PATH": f"{sandbox / 'bin'}:/usr/bin:/bin", "FAKE_LOG": str(sandbox / "log"), "FAKE_SRUN": srun,
           "FAKE_DONE": job.done_path, "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2",
           "HOME": str(sandbox), "SLURM_CPUS_ON_NODE": "8"}
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    popen = subprocess.Popen(["bash", str(script)], cwd=sandbox, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    if background:
        return popen
    out, _ = popen.communicate(timeout=30)
    return popen.returncode, out


def srun_argv(sandbox: Path) -> list[str]:
    return (sandbox / "log" / "srun.argv").read_bytes().decode().split("\0")[:-1]


def requeues(sandbox: Path) -> list[str]:
    path = sandbox / "log" / "requeue"
    return path.read_text().splitlines() if path.exists() else []


# ----------------------------------------------------------------------------------- directives


def test_directives_carry_nodes_limits_partition_account_and_extra(tmp_path):
    opts = SlurmOptions(partition="batch", account="proj", time=4 * 3600, qos="high",
                        extra=("--exclusive", "--mail-type=END"), signal_lead=600)
    lines = directives(make_job(tmp_path, gpus=8), opts)
    values = [shlex.split(line.removeprefix("#SBATCH "))[0] for line in lines]
    for expected in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=04:00:00",
                     "--partition=batch", "--account=proj", "--qos=high", "--exclusive", "--mail-type=END",
                     "--requeue", "--signal=B:USR1@600", "--open-mode=append"):
        assert expected in values, (expected, values)


def test_cpu_jobs_ask_for_no_gpus_and_unset_limits_are_left_to_the_partition(tmp_path):
    values = " ".join(directives(make_job(tmp_path, gpus=0), SlurmOptions()))
    assert "--gpus-per-node" not in values
    assert "--time" not in values and "--partition" not in values and "--account" not in values


def test_job_from_spec_splits_processes_over_nodes_and_omits_gpus_on_cpu(tmp_path):
    from nemoc.compiler.spec import ClusterSpec

    spec = LaunchSpec(task_id="train:pretrain", module="nemoc.runtime.train", args=("/r/task.json",), nproc=16,
                      out_dir=tmp_path / "tasks" / "train_pretrain", log_path=tmp_path / "log.txt", nodes=2,
                      gpus_per_node=8)
    gpu_job = job_from_spec(spec, ClusterSpec(gpu="H100", nodes=2, gpus_per_node=8))
    assert (gpu_job.nodes, gpu_job.procs_per_node, gpu_job.gpus_per_node) == (2, 8, 8)
    cpu_job = job_from_spec(spec, ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=8))
    assert cpu_job.gpus_per_node == 0
    with pytest.raises(SlurmError, match="do not split evenly"):
        job_from_spec(LaunchSpec(task_id="t", module="m", args=(), nproc=3, out_dir=tmp_path, log_path=tmp_path / "l",
                                 nodes=2), None)


@pytest.mark.parametrize("value, seconds", [("3600s", 3600), ("4h", 14400), ("90min", 5400), ("1.5h", 5400),
                                            ("2d", 172800), ("45s", 45), ("1h + 30min", 5400)])
def test_durations_are_the_languages_compiled_to_whole_seconds(tmp_path, value, seconds):
    """One duration grammar (the language's units): the plan carries seconds, the launcher parses nothing."""
    from nemoc.runtime.cli.common import load_spec

    (tmp_path / "x.nemo").write_text(f"""experiment x {{
  cluster {{ gpu = H100  scheduler = slurm(time = {value}, signal_lead = {value}) }}
  model llama3_8b {{}}
  stage pretrain {{ steps = 10  global_batch = 8 }}
}}
""")
    options = load_spec(str(tmp_path / "x.nemo"))[0].cluster.scheduler_options
    assert type(options) is SlurmOptions
    assert options.time == seconds and options.signal_lead == seconds and isinstance(options.time, int)


def test_slurm_time_format():
    assert slurm_time(14400) == "04:00:00"
    assert slurm_time(90061) == "1-01:01:01"


def test_bad_options_are_reported_together_at_compile_time():
    from nemoc.compiler.params import UnknownParameter
    from nemoc.compiler.scheduler import option_problems

    with pytest.raises(UnknownParameter, match="scheduler `slurm` has no parameter `partiton`"):
        SlurmOptions.of("slurm", {"partiton": "x"})
    text = " ".join(m for _, m, _ in option_problems(SlurmOptions(extra=("exclusive",), time=1.5)))
    assert "'exclusive' is not an sbatch option" in text and "not a whole number of seconds" in text


@pytest.mark.parametrize("field", ["partition", "account", "extra"])
def test_a_newline_cannot_end_a_directive_and_start_a_command(tmp_path, field):
    from nemoc.compiler.scheduler import option_problems

    value = "x\ntouch pwned"
    opts = SlurmOptions(**{field: (f"--{value}",) if field == "extra" else value})
    assert any("newline" in message for _, message, _ in option_problems(opts))  # E047 at compile time
    with pytest.raises(SlurmError, match="newline"):  # and the script writer refuses it still
        render_sbatch(make_job(tmp_path), opts)


def test_a_newline_in_a_job_name_is_rejected(tmp_path):
    with pytest.raises(SlurmError, match="newline"):
        render_sbatch(make_job(tmp_path, name="a\nrm -rf /"), SlurmOptions())


# ----------------------------------------------------------------------------------- quoting


def test_hostile_values_reach_slurm_and_the_program_verbatim_and_run_nothing(sandbox):
    opts = SlurmOptions(partition=EVIL, account=EVIL, extra=(f"--comment={EVIL}",))
    root = sandbox / f"runs {EVIL.replace('/', '_')}"
    job = make_job(root, name=EVIL, task_id=EVIL, args=(f"/runs/{EVIL}/task.json", EVIL), env={"NEMOC_X": EVIL})
    script = render_sbatch(job, opts)
    # sbatch parses directive values with the shell's quoting rules (Slurm's _get_argument).
    parsed = [shlex.split(line.removeprefix("#SBATCH ")) for line in script.splitlines() if line.startswith("#SBATCH")]
    assert all(len(tokens) == 1 for tokens in parsed)
    flat = [t[0] for t in parsed]
    for expected in (f"--job-name={EVIL}", f"--partition={EVIL}", f"--account={EVIL}", f"--comment={EVIL}",
                     f"--output={job.log_path}"):
        assert expected in flat
    subprocess.run(["bash", "-n", "-c", script], check=True)  # syntactically valid

    code, out = run_script(sandbox, job, opts, "done")
    assert code == 0, out
    assert not list(sandbox.rglob("pwned")), "a quoted value was executed"
    argv = srun_argv(sandbox)
    assert argv[-3:] == ["nemoc.runtime.train", f"/runs/{EVIL}/task.json", EVIL]
    assert f"task {EVIL} on" in out


def test_srun_starts_torchrun_per_node_with_a_c10d_rendezvous_on_the_first_nodes_address(sandbox):
    job = make_job(sandbox)
    code, out = run_script(sandbox, job, SlurmOptions(), "done")
    assert code == 0, out
    argv = srun_argv(sandbox)
    wrapper = argv.index("-c") + 1
    assert argv[:wrapper - 2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=0", "--label"]
    assert argv[wrapper] == 'exec "$0" -m torch.distributed.run --node-rank="$SLURM_NODEID" "$@"'
    assert argv[wrapper + 1:] == [
        "/usr/bin/python3", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.7:29542",  # NodeAddr of n1; port 29500 + job id 42
        "--rdzv-id=42", "--max-restarts=0", "-m", "nemoc.runtime.train", "/run/task.json"]
    # the per-node wrapper really adds the node's rank, read on that node
    probe = subprocess.run(["bash", "-c", argv[wrapper], "echo", "x", "y"], env={"SLURM_NODEID": "1", "PATH": "/bin:/usr/bin"},
                           capture_output=True, text=True)
    assert probe.stdout.split() == ["-m", "torch.distributed.run", "--node-rank=1", "x", "y"]


# ----------------------------------------------------------------------------------- requeue policy


def test_a_finished_task_is_never_requeued(sandbox):
    code, out = run_script(sandbox, make_job(sandbox), SlurmOptions(), "done")
    assert code == 0 and requeues(sandbox) == [] and "task finished" in out


def test_exit_143_after_a_checkpoint_requeues_the_job(sandbox):
    code, out = run_script(sandbox, make_job(sandbox), SlurmOptions(), "143")
    assert code == 0, out
    assert requeues(sandbox) == ["requeue 42"]


def test_failures_are_requeued_up_to_max_failures_then_fail(sandbox):
    job, opts = make_job(sandbox), SlurmOptions(max_failures=2)
    for attempt in range(2):
        code, out = run_script(sandbox, job, opts, "1", restarts=attempt)
        assert code == 0, out
        assert len(requeues(sandbox)) == attempt + 1
        assert f"failure {attempt + 1} of 2" in out
    code, out = run_script(sandbox, job, opts, "1", restarts=2)
    assert code == 1, out
    assert len(requeues(sandbox)) == 2


def test_a_task_that_cannot_succeed_as_configured_is_not_requeued(sandbox):
    job = make_job(sandbox)
    (Path(job.done_path).parent / "FATAL.json").write_text('{"error": "dataset too small"}')  # the entry point's mark
    code, out = run_script(sandbox, job, SlurmOptions(max_failures=2), "1")
    assert code == 1 and requeues(sandbox) == [] and "cannot succeed as configured (FATAL.json)" in out


def test_a_job_that_cannot_requeue_itself_fails_instead_of_completing(sandbox):
    (sandbox / "bin" / "scontrol").write_text(FAKE_SCONTROL.replace("requeue*)", "requeue*) exit 1 ;;\n  never)", 1))
    code, out = run_script(sandbox, make_job(sandbox), SlurmOptions(), "143")
    assert code == 1 and "requeue failed" in out  # COMPLETED would satisfy the dependants' afterok


def test_the_time_limit_warning_is_forwarded_to_training_and_the_job_requeued(sandbox):
    proc = run_script(sandbox, make_job(sandbox), SlurmOptions(), "wait", background=True)
    ready = sandbox / "log" / "ready"
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@lead delivers to the batch shell
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert (sandbox / "log" / "scancel").read_text().split() == ["--signal=TERM", "42"]
    assert "signal USR1" in out and "preempted" in out
    assert requeues(sandbox) == ["requeue 42"]


def test_env_names_are_checked_and_values_quoted(tmp_path):
    with pytest.raises(SlurmError, match="not valid"):
        render_sbatch(make_job(tmp_path, env={"A; touch x": "1"}), SlurmOptions())
    script = render_sbatch(make_job(tmp_path, env={"NEMOC_X": "$(id)"}), SlurmOptions())
    assert "export NEMOC_X='$(id)'" in script


def test_scripts_are_the_same_for_the_same_job(tmp_path):
    job = make_job(tmp_path)
    assert render_sbatch(job, SlurmOptions()) == render_sbatch(job, SlurmOptions())
    assert os.path.basename(job.done_path) == "DONE.json"


def test_a_cancel_or_preemption_is_left_to_slurm_and_never_requeued_by_the_script(sandbox):
    """TERM reaches the batch shell on `scancel`, on preemption and on `scontrol requeue`: training is
    asked to checkpoint, but the script must not requeue (that would resurrect a cancelled job)."""
    proc = run_script(sandbox, make_job(sandbox), SlurmOptions(), "wait", background=True)
    ready = sandbox / "log" / "ready"
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert (sandbox / "log" / "scancel").read_text().split() == ["--signal=TERM", "42"]
    assert proc.returncode == 143, out
    assert requeues(sandbox) == [] and "Slurm decides" in out


def test_write_scripts_renders_every_training_task_of_a_graph(tmp_path):
    from dataclasses import replace
    from types import MappingProxyType

    from plan_factory import make_plan, make_stage

    from nemoc.compiler.graph import build_graph
    from nemoc.compiler.spec import ClusterSpec
    from nemoc.runtime.orchestrate.launch_slurm import write_scripts
    from nemoc.runtime.orchestrate.rundir import RunDir

    (tmp_path / "corpus.jsonl").write_text('{"text": "hello world"}\n' * 20)
    plan = make_plan(tmp_path, stages=(make_stage("pretrain"), make_stage("anneal", after=("pretrain",))))
    plan = replace(plan, cluster=ClusterSpec(gpu="H100", nodes=2, gpus_per_node=1, scheduler="slurm",
                                             scheduler_options=MappingProxyType({"partition": "gpu", "time": 7200})))
    plan = replace(plan, stages=tuple(replace(s, layout=replace(s.layout, dp=2)) for s in plan.stages))
    paths = write_scripts(plan, build_graph(plan), RunDir(tmp_path / "run"))
    assert [p.parent.name for p in paths] == ["train_pretrain", "train_anneal"]
    text = paths[0].read_text()
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --time=02:00:00" in text
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=1" in text
    assert str(paths[0].parent / "task.json") in text
    subprocess.run(["bash", "-n", str(paths[0])], check=True)


# ----------------------------------------------------------------------------------- SlurmLauncher.launch

FAKE_SBATCH = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG/sbatch"
echo "77;localci"
"""
# squeue answers the next state of FAKE_STATES on every call (the last one sticks)
FAKE_SQUEUE = r"""#!/bin/bash
n=$(cat "$FAKE_LOG/n" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_LOG/n"
read -r -a states <<< "$FAKE_STATES"
i=$(( n < ${#states[@]} ? n : ${#states[@]} - 1 ))
echo "77|${states[$i]}|None"
"""
FAKE_SCONTROL_JOB = r"""#!/bin/bash
echo "JobId=77 JobName=x UserId=root(0) JobState=X Reason=None Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 Reboot=0 ExitCode=$FAKE_EXIT StartTime=now"
"""


def fake_slurm(sandbox, monkeypatch, states: str, exit_code: str = "0:0"):
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scontrol", FAKE_SCONTROL_JOB)):
        (sandbox / "bin" / name).write_text(text)
        (sandbox / "bin" / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{sandbox / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(sandbox / "log"))
    monkeypatch.setenv("FAKE_STATES", states)
    monkeypatch.setenv("FAKE_EXIT", exit_code)


def launch_spec(sandbox) -> LaunchSpec:
    out = sandbox / "run" / "tasks" / "train_pretrain"
    out.mkdir(parents=True)
    return LaunchSpec(task_id="train:pretrain", module="nemoc.runtime.train", args=(str(out / "task.json"),), nproc=2,
                      out_dir=out, log_path=out / "log.txt", nodes=2, gpus_per_node=1)


def test_launch_follows_a_requeued_job_to_the_end(sandbox, monkeypatch):
    import nemoc.runtime.orchestrate.launch_slurm as ls
    from nemoc.compiler.spec import ClusterSpec

    fake_slurm(sandbox, monkeypatch, "PENDING RUNNING PREEMPTED PENDING RUNNING COMPLETED")
    monkeypatch.setattr(ls, "PREEMPT_SETTLE_S", 0.5)
    spec = launch_spec(sandbox)
    (spec.out_dir / "DONE.json").write_text("{}")  # what the trainer writes at the end
    lines: list[str] = []
    launcher = ls.SlurmLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1), echo=lines.append, poll_s=0.01)
    result = launcher.launch(spec)
    assert result.ok, result
    states = [line.split(": ")[1].split()[0] for line in lines if line.startswith("Slurm job 77 (train:pretrain):")]
    assert states == ["PENDING", "RUNNING", "PREEMPTED", "PENDING", "RUNNING", "COMPLETED"]
    assert (sandbox / "log" / "sbatch").read_text().strip() == f"--parsable --hold {spec.out_dir / 'job.sbatch'}"
    record = json.loads((sandbox / "run" / "slurm.json").read_text())
    assert record["jobs"]["train:pretrain"]["job_id"] == "77"


def test_launch_reports_a_failed_job_with_its_logs_last_lines(sandbox, monkeypatch):
    import nemoc.runtime.orchestrate.launch_slurm as ls
    from nemoc.compiler.spec import ClusterSpec

    fake_slurm(sandbox, monkeypatch, "RUNNING FAILED", exit_code="1:0")
    spec = launch_spec(sandbox)
    spec.log_path.write_text("0: Traceback\n0: ValueError: boom\n")
    launcher = ls.SlurmLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1), echo=lambda _: None,
                                poll_s=0.01)
    result = launcher.launch(spec)
    assert result.returncode == 1 and "ended FAILED (exit 1:0)" in result.error_tail
    assert "ValueError: boom" in result.error_tail


def test_a_preempted_job_that_slurm_does_not_requeue_is_resumable(sandbox, monkeypatch):
    import nemoc.runtime.orchestrate.launch_slurm as ls
    from nemoc.compiler.spec import ClusterSpec

    fake_slurm(sandbox, monkeypatch, "RUNNING PREEMPTED", exit_code="0:15")
    monkeypatch.setattr(ls, "PREEMPT_SETTLE_S", 0.2)
    launcher = ls.SlurmLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1), echo=lambda _: None,
                                poll_s=0.01)
    assert launcher.launch(launch_spec(sandbox)).preempted


def test_a_damaged_slurm_record_is_named_not_a_traceback(tmp_path):
    from click.testing import CliRunner

    from nemoc.runtime.cli.cluster import cancel
    from nemoc.runtime.orchestrate.launch_slurm import read_record

    (tmp_path / "status.json").write_text(json.dumps({"tasks": {"train:pretrain": {"state": "running"}}}))
    for damaged in ("{garbage", "[1]", json.dumps({"jobs": {"train:pretrain": {"script": "x"}}})):
        (tmp_path / "slurm.json").write_text(damaged)
        with pytest.raises(SlurmError, match=r"slurm\.json is (unreadable|damaged).*repair or remove it"):
            read_record(tmp_path)
        result = CliRunner().invoke(cancel, [str(tmp_path)], catch_exceptions=False)
        assert result.exit_code == 1 and "slurm.json is" in result.output, result.output


def test_without_slurm_the_launcher_cannot_be_built_and_says_why(tmp_path, monkeypatch):
    from nemoc.compiler.spec import ClusterSpec
    from nemoc.runtime.orchestrate.launch_slurm import SlurmLauncher

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(SlurmError, match="Slurm is not reachable.*sbatch"):
        SlurmLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1))


def test_an_sbatch_error_fails_the_task_with_its_message(sandbox, monkeypatch):
    import nemoc.runtime.orchestrate.launch_slurm as ls
    from nemoc.compiler.spec import ClusterSpec

    fake_slurm(sandbox, monkeypatch, "RUNNING")
    (sandbox / "bin" / "sbatch").write_text("#!/bin/bash\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n")
    launcher = ls.SlurmLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1), echo=lambda _: None)
    result = launcher.launch(launch_spec(sandbox))
    assert result.returncode == 1 and "invalid partition specified: gpu" in result.error_tail


def test_ranks_share_the_nodes_cpus_unless_the_user_set_omp_threads(sandbox):
    job = make_job(sandbox, env={"NEMOC_X": "1"})
    job = SlurmJob(**{**{f: getattr(job, f) for f in job.__slots__}, "procs_per_node": 4})
    code, out = run_script(sandbox, job, SlurmOptions(), "done")
    assert code == 0, out
    assert (sandbox / "log" / "omp").read_text().strip() == "2"  # 8 CPUs on the node / 4 ranks
    code, out = run_script(sandbox, make_job(sandbox, env={"OMP_NUM_THREADS": "3"}), SlurmOptions(), "done")
    assert (sandbox / "log" / "omp").read_text().strip() == "3"
