"""Fault-tolerance pieces the launchers and tests share (the checkpoint side lives in runtime/checkpoint.py:
atomic saves, manifest verification, skipping a checkpoint that fails to load; runtime/train.py reports a
collective timeout with the rank and the phase).

* `RESTART_SAFE_ENV`: torchrun's restarts (`--max-restarts`, the elastic policy of a PyTorchJob) with the
  agent-shared TCPStore hand restarted ranks the previous attempt's process-group keys, so they connect
  to dead peers and fail ("Gloo connectFullMesh failed ... Connection refused"; pytorch/pytorch#167288,
  reproduced here with torch 2.13). With `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` the c10d rendezvous has
  rank 0 host a fresh store for every attempt. Every launcher that allows restarts sets it.
* `become_helper_process` / `run_as_helper`: a process a rank starts to help it (the checkpoint
  results-queue Manager, an async checkpoint writer) shares the rank's process group, so Ctrl-C or a
  group SIGTERM would kill it in the middle of the rank's final save (BrokenPipeError). Helpers ignore
  SIGINT/SIGTERM/SIGUSR1/SIGHUP (the rank decides when to stop) and get SIGKILL from the kernel when
  the rank dies (prctl PR_SET_PDEATHSIG), so a `kill -9` of a rank during a save leaves no writer hung.
* `checkpoint_tensors` / `differing_tensors`: every tensor of a torch_dist checkpoint read without a
  process group (torch.distributed.checkpoint's format utilities), to prove that a resumed run ends
  with the same weights as an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import os
import signal
import tempfile

RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
_PR_SET_PDEATHSIG = 1
HELPER_IGNORED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, n))


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; False elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_helper_process(parent_pid: int) -> None:
    """Run first in a helper process of a rank: deaf to the group's stop signals, dead with its rank."""
    for sig in HELPER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR2"):  # the rank asks a stalled helper for its stack (checkpoint._dump_stack)
        import faulthandler

        faulthandler.register(signal.SIGUSR2, all_threads=True)
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the rank died before prctl took effect
        os._exit(1)


def run_as_helper(parent_pid: int, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a helper process (the target of a forked async checkpoint writer)."""
    become_helper_process(parent_pid)
    return fn(*args, **kwargs)


def checkpoint_tensors(path: str | os.PathLike) -> dict:
    """{key: tensor} of a dist_checkpointing (torch_dist) checkpoint directory: model weights, optimizer
    state (main params, Adam moments); non-tensor entries (RNG states, extra state) are left out."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "checkpoint.pt")
        dcp_to_torch_save(str(path), target)
        state = torch.load(target, weights_only=False)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def differing_tensors(a: str | os.PathLike, b: str | os.PathLike) -> list[str]:
    """Keys whose tensors are not bit-identical in checkpoints `a` and `b` (missing keys included)."""
    import torch

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    keys = sorted(set(ta) | set(tb))
    return [k for k in keys if k not in ta or k not in tb or not torch.equal(ta[k], tb[k])]


# ------------------------------------------------------------------------------ stopping, divergence


class StopSignal:
    """SIGTERM (torchrun, `nemoc cancel`, Kubernetes), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's warning)
    only set a flag: the training loop finishes its step, the ranks agree (`agreed`), save a checkpoint
    and exit 143. A repeated signal changes nothing (Ctrl-C reaches a rank twice under torchrun: from
    the terminal and forwarded by torchrun); a stop that must not wait is SIGKILL."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n))

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def flags(self) -> list[float]:
        """This rank's stop state as one count per signal of SIGNALS (1 for the one it saw): summed over
        the ranks (an all-reduce the step does anyway, core.loop.train_step) they say which signals any
        rank saw; `from_flags` picks the one `agreed` would (the highest signal number)."""
        return [1.0 if self.signum == sig else 0.0 for sig in self.SIGNALS]

    @classmethod
    def from_flags(cls, counts) -> int:
        """The agreed signal from summed `flags()`: the highest signal number any rank saw, 0 for none."""
        seen = [int(sig) for sig, n in zip(cls.SIGNALS, counts) if float(n) > 0]
        return max(seen, default=0)

    def agreed(self, *, group=None, device=None) -> int:
        """The signal any rank saw (ranks may see it at different steps); all ranks call it."""
        import torch

        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return int(flag.item())


class LossDiverged(RuntimeError):
    """The loss was NaN/Inf twice at the same step from the same state: the step fails, the task too."""


def nonfinite_name(value: float) -> str | None:
    """'NaN' / 'Inf' / '-Inf' for a non-finite value, None for a finite one."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Inf" if value > 0 else "-Inf"
    return None


def divergence_message(*, what: str, step: int, first: float, second: float, lr: float) -> str:
    """Megatron-LM's rerun state machine's verdict, for a user: detected, retried, reported."""
    return (f"{what} became {nonfinite_name(first)} at step {step} (learning rate {lr:.3g} at that step) and "
            f"was {nonfinite_name(second) or second} again when the step was rerun from the same state: "
            f"training diverged; lower the learning rate, lengthen the warmup or clip gradients "
            f"(optimizer grad_clip)")
