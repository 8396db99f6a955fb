"""Process group, model-parallel groups, seeding, kernels, the stop signal and teardown.

Every stage kind starts here: `init_distributed(layout=...)` is the one call of
`parallel_state.initialize_model_parallel` in the runtime (its arguments from
megatron_args.parallel_kwargs); `set_seed` seeds Python, NumPy, torch and the tensor-parallel RNG
tracker as Megatron-LM does; `StopSignal` turns SIGTERM/SIGINT/SIGUSR1 into "finish the step, save,
exit 143"; `set_phase` records what this rank is doing for the one-line failure report.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import sys
import traceback

import numpy as np
import torch

from nemoc.runtime import core as _core  # noqa: F401  (the CPU adaptation, before Megatron)
from nemoc.runtime import faults
from nemoc.runtime import mcore_cpu
from nemoc.runtime import megatron_args as margs
from nemoc.runtime import model as mdl
from nemoc.runtime import userbuffers

from megatron.core import parallel_state, tensor_parallel  # noqa: E402


DEFAULT_TIMEOUT_S = 300

_control_group = [None]  # a gloo group for host-side agreement (stop signal) when the backend is nccl
_phase = ["startup"]  # what this rank is doing, for error reports (a hang shows up as a timeout here)


def set_phase(text: str) -> None:
    _phase[0] = text


class TaskError(ValueError):
    """The task file is unreadable or inconsistent; the message says what and where."""



def kernel_setup(kernels: str) -> tuple[margs.MachineFacts, str | None]:
    """(the facts a stage builds with, a warning for task start or None) for the plan's `kernels`
    (StagePlan.kernels): margs.choose_kernels decides; the local spec gets its workarounds on a GPU too."""
    cpu = mcore_cpu.is_applied()
    importable = kernels == "te" and not cpu and mdl.have_transformer_engine()  # TE is imported only if wanted
    choice = margs.choose_kernels(planned=kernels, te_importable=importable, cpu=cpu)
    if not choice.use_te:
        mcore_cpu.apply_no_te_fixes()  # idempotent; the CPU adaptation has applied them already
    return margs.MachineFacts(cpu=cpu, have_te=choice.use_te), choice.warning


def machine_facts(kernels: str = "te") -> margs.MachineFacts:
    return kernel_setup(kernels)[0]


def init_distributed(*, layout, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Process group (nccl on GPU, gloo on CPU; env:// under torchrun, in-process store otherwise)
    and Megatron's model-parallel groups for `layout`."""
    set_phase("init_process_group")
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if torch.cuda.is_available() and not mcore_cpu.is_applied() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        if "RANK" in os.environ:
            torch.distributed.init_process_group(backend=backend, timeout=timeout)
        else:  # a single process without torchrun
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    world = torch.distributed.get_world_size()
    if world != layout.world_size:
        raise TaskError(f"tp({layout.tp}) * pp({layout.pp}) * cp({layout.cp}) * dp({layout.dp}) = "
                        f"{layout.world_size} != world size {world} (processes launched)")
    if backend == "nccl":
        # The per-step stop-signal agreement runs on the host over gloo: no GPU synchronisation.
        _control_group[0] = torch.distributed.new_group(backend="gloo", timeout=timeout)
    set_phase("initialize_model_parallel")
    if parallel_state.model_parallel_is_initialized():  # a second stage in one process (tests, tools)
        if _current_sizes() == (layout.tp, layout.pp, layout.cp, layout.dp, layout.vp, layout.ep, layout.etp):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**margs.parallel_kwargs(layout=layout,
                                                                     timeout_minutes=math.ceil(timeout_s / 60)))


def _current_sizes() -> tuple[int, int, int, int, int | None, int, int]:
    ps = parallel_state
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size(), ps.get_data_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_world_size())


def set_seed(seed: int, host=None) -> None:
    """Megatron-LM's _set_random_seed: a different seed per pipeline stage, and the tensor-parallel
    RNG tracker (per-TP-rank streams for dropout and TP-sharded init); with CUDA graphs in the stage's
    `host` settings, Transformer Engine's tracker with graph-safe states (megatron_args.cuda_graph_rng_kwargs)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, **margs.cuda_graph_rng_kwargs(host))


def teardown() -> None:
    set_phase("teardown")
    _control_group[0] = None
    try:
        try:
            userbuffers.destroy()  # TE destroy_ub where tp_comm_overlap initialised them
        finally:
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if not mcore_cpu.is_applied() else torch.device("cpu")


# ------------------------------------------------------------------------------- model, optimizer


class StopSignal(faults.StopSignal):
    """SIGTERM / SIGINT / SIGUSR1 -> finish the current step, save, exit 143 (Ctrl-C, `nemoc cancel`,
    Slurm requeue, K8s preemption)."""

    def agreed(self) -> int:
        return super().agreed(group=_control_group[0])  # host tensor: gloo (default or control group)


def rank0_print(text: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"[nemoc] {text}", flush=True)


def report_failure(exc: BaseException) -> None:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))
    text = "".join(traceback.format_exception(exc))
    hint = ""
    if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
        hint = " (a collective timed out: another rank probably failed or hangs; see its log)"
    print(f"[nemoc rank {rank}] error during {_phase[0]}{hint}: {type(exc).__name__}: {exc}\n{text}",
          file=sys.stderr, flush=True)
