"""The local launcher: torchrun as a subprocess on this machine.

    python -m torch.distributed.run --nproc-per-node N --master-port <free port> --tee 3
        --log-dir <task>/ranks -m MODULE task.json

* One process per rank (N = the stage layout's world size: on CPU, N gloo processes).
* `OMP_NUM_THREADS = max(1, cpus // N)`, so N ranks do not oversubscribe the cores.
* Output of every rank goes to `<task>/log.txt` (prefixed `[rankK]:` by torchrun's tee) and to the
  console (rank 0 only, plus every line of a failing rank's traceback afterwards); each rank's own
  stdout/stderr is kept under `<task>/ranks/`.
* torchrun runs in its own process group: Ctrl-C (or any exception here) sends SIGTERM to the group,
  waits, then SIGKILLs it, so no rank outlives `nemoc run`. Even a SIGKILLed `nemoc run` leaves nothing:
  torchrun gets SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG) and each rank, started through
  runtime/orchestrate/rank_guard.py, gets SIGKILL when torchrun dies.
* torchrun and every rank are recorded under `<task>/procs/` (pid, start time: runtime/orchestrate/procs.py); that
  record, not a search of command lines, is what `nemoc cancel` and the leftover-rank check read.
* A failing rank fails the task: torchrun stops the other ranks, and the result carries the failing
  rank (from torchrun's error summary, else the first rank whose stderr ends in an error) and its last lines.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

from nemoc.runtime.orchestrate.launchers import EXIT_PREEMPTED, LaunchResult, LauncherError, LaunchSpec

TAIL_LINES = 25
TERM_GRACE_S = 15.0
_RANK_PREFIX = re.compile(r"^\[(?:[a-z]*)(\d+)\]:")
_SUMMARY_RANK = re.compile(r"rank\s*:\s*(\d+)")
_SUMMARY_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")


def free_port() -> int:
    """A TCP port free right now on localhost (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(spec: LaunchSpec, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(spec.nproc),
        "--master-addr", "127.0.0.1",
        "--master-port", str(port),
        "--tee", "3",
        "--log-dir", str(spec.out_dir / "ranks"),
        "-m", "nemoc.runtime.orchestrate.rank_guard", spec.module, *spec.args,  # records the rank, dies with torchrun
    ]


def worker_env(spec: LaunchSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(spec.env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, spec.nproc))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCHELASTIC_ERROR_FILE", str(spec.out_dir / "ranks" / "error.json"))
    return env


MAX_PROCS_PER_CPU = 4  # CPU ranks beyond this only thrash (gloo ranks are whole processes)


def check_fits_this_machine(spec: LaunchSpec, *, cpus: int | None = None, gpus: int | None = None) -> None:
    """The local launcher starts every rank on this one machine; say so when the stage cannot fit it."""
    if spec.nodes > 1:
        raise LauncherError(f"{spec.task_id}: the stage spans {spec.nodes} nodes x {spec.gpus_per_node} GPUs, but the "
                            "local launcher runs on this machine only; use --launcher slurm or k8s")
    if gpus is None:
        gpus = _cuda_devices()
    cpus = cpus or os.cpu_count() or 1
    if gpus and spec.nproc > gpus:
        raise LauncherError(f"{spec.task_id}: {spec.nproc} ranks need {spec.nproc} GPUs, this machine has {gpus}")
    if not gpus and spec.nproc > MAX_PROCS_PER_CPU * cpus:
        raise LauncherError(f"{spec.task_id}: {spec.nproc} CPU ranks on {cpus} cores is more than "
                            f"{MAX_PROCS_PER_CPU} per core; lower the stage's world size (tp*pp*cp*dp)")


def check_no_leftover_ranks(spec: LaunchSpec) -> None:
    """Processes an earlier `nemoc run` started for this very task directory and that still run (recorded
    under `<task>/procs/`, verified by pid and start time: runtime/orchestrate/procs.py) would write the same
    checkpoints as a second torchrun. Records of processes that have ended are cleared."""
    from nemoc.runtime.orchestrate import procs

    found = procs.live(spec.out_dir)
    if found:
        run_dir = Path(spec.out_dir).resolve().parent.parent
        raise LauncherError(f"{spec.task_id}: processes of an earlier run are still running this task (pid "
                            f"{', '.join(str(r.pid) for r in sorted(found, key=lambda r: r.pid))}); stop them with "
                            f"`nemoc cancel {run_dir}`, then run again")
    procs.clear_dead(spec.out_dir)


def _cuda_devices() -> int:
    """GPUs visible here, without importing torch in this process (nvidia-smi -L), 0 if none."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return min(count, len([d for d in visible.split(",") if d.strip()])) if visible else count


class LocalLauncher:
    name = "local"

    def __init__(self, *, cluster=None, echo=None) -> None:
        self.cluster = cluster
        self.echo = echo if echo is not None else Rank0Echo()

    def launch(self, spec: LaunchSpec) -> LaunchResult:
        from nemoc.runtime.orchestrate import procs

        check_fits_this_machine(spec)
        check_no_leftover_ranks(spec)
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        ranks_dir = spec.out_dir / "ranks"
        before = set(ranks_dir.iterdir()) if ranks_dir.is_dir() else set()
        command = torchrun_command(spec, free_port())
        with open(spec.log_path, "a", encoding="utf-8") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            proc = subprocess.Popen(command, cwd=spec.out_dir, env=worker_env(spec), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, text=True,
                                    errors="replace", bufsize=1, preexec_fn=_dies_with(os.getpid()))
            try:
                procs.record(spec.out_dir, "torchrun", proc.pid)
                tail = self._pump(proc, log)
                returncode = proc.wait()
            except BaseException:  # Ctrl-C or anything else: never leave ranks behind
                _terminate_group(proc)
                raise
        if returncode == 0:
            return LaunchResult(0)
        new = sorted(set(ranks_dir.iterdir()) - before) if ranks_dir.is_dir() else []
        root_exit = root_cause_exitcode(list(tail))
        if root_exit == EXIT_PREEMPTED:  # a rank saved and stopped; torchrun then SIGTERMed the others
            return LaunchResult(EXIT_PREEMPTED)
        rank, error_tail = failing_rank(new[-1] if new else ranks_dir, list(tail))
        return LaunchResult(returncode, rank, error_tail)

    def _pump(self, proc: subprocess.Popen, log) -> deque:
        tail: deque = deque(maxlen=400)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            self.echo(line)
        return tail


_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")


class Rank0Echo:
    """Echo rank 0's lines (and torchrun's own) to the console, minus Python warnings (the log keeps all)."""

    def __init__(self) -> None:
        self._in_warning = False

    def __call__(self, line: str) -> None:
        match = _RANK_PREFIX.match(line)
        if match is not None and match.group(1) != "0":
            return
        text = line[match.end():] if match else line
        if _WARNING.match(text):
            self._in_warning = True
            return
        if self._in_warning and text.startswith(" "):  # the warning's source line
            return
        self._in_warning = False
        sys.stdout.write(text)
        sys.stdout.flush()


def _dies_with(launcher: int):
    """torchrun's preexec_fn: SIGTERM when `nemoc run` dies, even by SIGKILL (torchrun then stops the
    ranks; a rank whose torchrun dies gets SIGKILL: runtime/orchestrate/rank_guard.py)."""
    from nemoc.runtime.orchestrate.procs import set_parent_death_signal  # imported here: the child only calls it

    def preexec() -> None:
        set_parent_death_signal(signal.SIGTERM, parent=launcher)

    return preexec


def _terminate_group(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun's group (torchrun passes it on to the ranks), then SIGKILL. torchrun starts every
    rank in a session of its own, out of reach of killpg: a rank still alive once torchrun is gone (one
    that ignored SIGTERM, torchrun killed before it could escalate) is SIGKILLed here by pid."""
    ranks = _descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    ranks += [p for p in _descendants(proc.pid) if p not in ranks]
    for rank in ranks:
        try:
            rank.kill()  # psutil checks that the pid still names the same process
        except Exception:  # noqa: BLE001 - gone already (NoSuchProcess) or not ours
            pass


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def root_cause_exitcode(combined_tail: list[str]) -> int | None:
    """The exit code torchrun's error summary gives for the root-cause (first failed) rank."""
    summary = "\n".join(combined_tail)
    if "Root Cause" not in summary:
        return None
    codes = _SUMMARY_EXIT.findall(summary.split("Root Cause", 1)[1])
    return int(codes[0]) if codes else None


def failing_rank(ranks_dir: Path, combined_tail: list[str]) -> tuple[int | None, str]:
    """(rank, its last lines) of the rank that failed, read from torchrun's summary and the rank logs."""
    summary = "\n".join(combined_tail)
    ranks = [int(r) for r in _SUMMARY_RANK.findall(summary.split("Root Cause", 1)[-1])] if "Root Cause" in summary else []
    stderr_files = {int(Path(p).parent.name): p for p in glob.glob(str(ranks_dir / "**" / "*" / "stderr.log"), recursive=True)
                    if Path(p).parent.name.isdigit()}
    if not ranks:  # no summary: the first rank whose stderr shows an error
        ranks = [r for r, p in sorted(stderr_files.items()) if _has_error(p)]
    if ranks and ranks[0] in stderr_files and _peer_failure(stderr_files[ranks[0]]):
        # torchrun's root cause is the first error *file* written: a rank whose collective broke because
        # another rank died can write its file first (the dying rank is still tearing down). Name a rank
        # with an error of its own instead, when one has.
        own = [r for r, p in sorted(stderr_files.items()) if _has_error(p) and not _peer_failure(p)]
        if own:
            ranks = own
    rank = ranks[0] if ranks else None
    if rank is not None and rank in stderr_files:
        lines = Path(stderr_files[rank]).read_text(errors="replace").splitlines()
        return rank, "\n".join(lines[-TAIL_LINES:])
    lines = [ln for ln in combined_tail if rank is None or ln.startswith(f"[default{rank}]") or not _RANK_PREFIX.match(ln)]
    return rank, "\n".join(lines[-TAIL_LINES:])


# How a rank's collective fails when a peer process died (gloo / NCCL / torch.distributed), not an error of its own
_PEER_FAILURE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|ECONNRESET|"
                           r"DistBackendError|NCCL communicator was aborted|Watchdog caught collective operation "
                           r"timeout|ProcessGroupGloo|gloo/transport|remote process exited or there was a network error")


def _peer_failure(path: str) -> bool:
    """The rank's last traceback is a collective that broke because another rank went away."""
    text = Path(path).read_text(errors="replace")
    last = text[text.rfind("Traceback"):] if "Traceback" in text else text
    return bool(_PEER_FAILURE.search(last))


def _has_error(path: str) -> bool:
    text = Path(path).read_text(errors="replace")
    return "Traceback" in text or "Error" in text
