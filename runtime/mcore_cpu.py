"""Megatron-Core 0.16.1 on a CPU-only torch build (gloo): the one place the runtime adapts it.

Megatron-Core assumes CUDA: it passes `torch.cuda.current_device()` as a `device=`, hard-codes
`device="cuda"` in the optimizers, DDP buffers, clip_grads, the schedules and p2p, keeps its
tensor-parallel RNG in the CUDA generator, and asserts `grad.type() == "torch.cuda.FloatTensor"`.
`apply()` redirects all of that to the CPU. It is idempotent and does nothing when CUDA is available
(`force=True` applies it anyway, for tests). Findings behind every patch:
/work/shared/notes/megatron-core-on-cpu.md (sections 2, 3, 4, 6).

Call it at module top level, before any Megatron object is built: the first torch_dist save spawns a
multiprocessing Manager that re-imports `__main__`, and that child must be patched too.

`apply_no_te_fixes()` holds the workarounds that are about a missing Transformer Engine rather
than a missing GPU (also needed on a GPU machine without TE): the MoE router's undefined
`te_general_gemm`, sequence parallelism with the torch LayerNorm/RMSNorm fallback, and multi-latent
attention's TELinear check (`_mla_without_te`).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_state = {"cpu": False, "no_te": False, "fork_queue": False}
_mode: TorchFunctionMode | None = None


def needed() -> bool:
    """True when the CPU adaptation must be applied (no usable CUDA device)."""
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _state["cpu"]


def apply(*, force: bool = False) -> bool:
    """Patch torch.cuda / Megatron-Core for CPU execution. Returns True if the patches are active."""
    if _state["cpu"]:
        return True
    if not (force or needed()):
        return False
    _state["cpu"] = True
    _patch_cuda_device_api()
    _patch_rng()
    _patch_moe_split_sizes()
    _patch_uneven_collectives()
    apply_no_te_fixes()
    _enter_device_mode()
    _patch_recompute_backward()
    return True


# ------------------------------------------------------------------------------ torch.cuda API


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is synchronous, so every wait is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NullStream()

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_cuda_device_api() -> None:
    tc = torch.cuda
    # Megatron passes current_device() as `device=` in ~70 places (layers, embeddings, DDP buffers).
    tc.current_device = lambda: _CPU
    # The persistent async checkpoint worker does set_device(rank % device_count()): avoid % 0.
    tc.device_count = lambda: 1
    tc.set_device = lambda device: None
    tc.synchronize = lambda device=None: None
    tc.empty_cache = lambda: None
    tc.Stream = _NullStream
    tc.Event = _NullStream
    tc.current_stream = lambda device=None: _NullStream()
    tc.default_stream = lambda device=None: _NullStream()
    tc.stream = lambda stream=None: contextlib.nullcontext()
    tc.set_stream = lambda stream=None: None
    tc.nvtx.range_push = lambda *args, **kwargs: None
    tc.nvtx.range_pop = lambda *args, **kwargs: None
    # torch.cuda.is_available() deliberately stays False: code that branches on it takes CPU paths.


@contextlib.contextmanager
def cuda_device_index() -> None:
    """While Megatron-FSDP is built: `torch.cuda.current_device()` answers 0, not the CPU device. Its
    constructor formats the current device into a device string (megatron_fsdp.py
    `torch.device(f"cuda:{torch.cuda.current_device()}")`, which would read "cuda:cpu" and raise); the
    module itself is placed on the CPU by the `device` the runtime passes (runtime/model.py `wrap_fsdp`)
    and tensors created with a CUDA device go to the CPU through the device mode above; its warning that
    the module's device (the CPU) is not the current CUDA device is silenced meanwhile. A no-op when the
    adaptation is not applied."""
    if not _state["cpu"]:
        yield
        return
    patched = torch.cuda.current_device
    fsdp_log = logging.getLogger("megatron.core.distributed.fsdp.src.megatron_fsdp.megatron_fsdp")
    level = fsdp_log.level
    torch.cuda.current_device = lambda: 0
    fsdp_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch.cuda.current_device = patched
        fsdp_log.setLevel(level)


def _patch_rng() -> None:
    """Megatron's CudaRNGStatesTracker (TP-aware dropout/init seeds, recompute replays) -> CPU generator.

    torch.cuda.manual_seed_all is left alone: torch.manual_seed calls it, and replacing it with a
    call into the default generator would recurse.
    """
    tc = torch.cuda
    tc.get_rng_state = lambda device="cuda": torch.get_rng_state()
    tc.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    tc.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    from megatron.core.tensor_parallel import random as mrandom

    # Without this, _set_cuda_rng_state queues a lazy CUDA callback that never runs: a silent no-op.
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # The tracker warns when the CPU RNG changes inside its "GPU" fork; here they are the same generator.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while the mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # optimizer.py / clip_grads.py assert `grad.type() == 'torch.cuda.FloatTensor'`
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _to_cpu_device(args[1]) is _CPU:
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _to_cpu_device(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):  # a bare int means cuda:<int>
        return _CPU
    return device


def _enter_device_mode() -> None:
    # Entered once and never exited: the mode must cover every Megatron call for the process's life.
    global _mode
    _mode = _CudaToCpu()
    _mode.__enter__()


def _patch_recompute_backward() -> None:
    """Activation recompute replays the forward inside an autograd Function's backward, which the
    autograd engine runs without the Python TorchFunctionMode stack: a literal `device="cuda"` met
    there (e.g. transformer.utils.get_default_causal_mask) would escape the rewrite. Re-enter the
    mode for the duration of those backwards."""
    from megatron.core.tensor_parallel import random as mrandom

    for cls in (mrandom.CheckpointFunction, getattr(mrandom, "CheckpointWithoutOutputFunction", None)):
        if cls is None or getattr(cls.backward, "_nemoc_cpu", False):
            continue
        original = cls.backward

        def backward(ctx, *args, _original=original):
            with _CudaToCpu():
                return _original(ctx, *args)

        backward._nemoc_cpu = True
        cls.backward = staticmethod(backward)


# ------------------------------------------------------------------------------------------ MoE


def _patch_moe_split_sizes() -> None:
    """The alltoall dispatcher turns split sizes into numpy only `if tensor.is_cuda`; on CPU they stay
    tensors and all_to_all_single rejects them. Always honour `as_numpy`."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.detach().cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_collectives() -> None:
    """gloo lacks list-form all_gather/reduce_scatter with unequal sizes (MoE EP x TP/SP dispatch).

    Emulated synchronously: pad to the largest shard and gather; reduce_scatter as an all_reduce of
    the concatenation followed by taking this rank's slice. Equal sizes go to the originals.
    """
    import torch.distributed as dist

    orig_all_gather, orig_reduce_scatter = dist.all_gather, dist.reduce_scatter

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if all(t.shape == tensor.shape for t in tensor_list):
            return orig_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        if async_op:
            raise RuntimeError("nemoc mcore_cpu: uneven all_gather is emulated synchronously only")
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in tensor_list]
        orig_all_gather(buffers, padded, group=group)
        for out, buf in zip(tensor_list, buffers):
            out.copy_(buf[: out.shape[0]])
        return None

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if all(t.shape == output.shape for t in input_list):
            return orig_reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        if async_op:
            raise RuntimeError("nemoc mcore_cpu: uneven reduce_scatter is emulated synchronously only")
        flat = torch.cat([t.reshape(-1) for t in input_list])
        dist.all_reduce(flat, op=op, group=group)
        offset = sum(t.numel() for t in input_list[: dist.get_rank(group)])
        output.copy_(flat[offset : offset + output.numel()].view_as(output))
        return None

    dist.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter


# ------------------------------------------------------------------- missing Transformer Engine


def apply_no_te_fixes() -> None:
    """Workarounds for megatron-core 0.16.1 without Transformer Engine (CPU or GPU). Idempotent."""
    if _state["no_te"]:
        return
    _state["no_te"] = True
    from megatron.core.transformer.moe import moe_utils

    # moe_utils defines te_general_gemm only inside `try: import transformer_engine`, but the router's
    # RouterGatingLinearFunction reads it unconditionally -> NameError. (Fixed upstream in 0.19.)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _allow_sequence_parallel_with_torch_norm()
    _checkpoint_without_output_without_te()
    _mla_without_te()


def _mla_without_te() -> None:
    """multi_latent_attention.py sets HAVE_TE from `import megatron.core.extensions.transformer_engine`,
    which succeeds without Transformer Engine (that module stubs `te` with a MagicMock), so TELinear is a
    MagicMock and `MultiLatentAttention.__init__`'s `isinstance(self.linear_proj, TELinear)` raises
    TypeError: no MLA model builds without TE. The check only decides whether a TELinear output projection
    saves its original input under FP8 / FP4, which needs TE; HAVE_TE = False there is exact."""
    from megatron.core.transformer import multi_latent_attention as mla

    if mla.HAVE_TE and not isinstance(mla.TELinear, type):
        mla.HAVE_TE = False


def _checkpoint_without_output_without_te() -> None:
    """`CheckpointWithoutOutput(fp8=False)` sets `self.fp8 = fp8 is not None`, i.e. True, and its
    forward then reads Transformer Engine's `FP8GlobalStateManager`, imported only when TE is installed
    -> NameError. It is what selective recompute of `layernorm` and `moe_act` (output-discarding
    checkpoints; transformer_layer.py, moe/experts.py) runs. Without TE no FP8 context can exist, so the
    flag is False exactly; with TE the class is left alone."""
    from megatron.core.tensor_parallel import random as mrandom

    if hasattr(mrandom, "FP8GlobalStateManager"):
        return
    original = mrandom.CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        original(self, fp8)
        self.fp8 = False

    mrandom.CheckpointWithoutOutput.__init__ = __init__


def _allow_sequence_parallel_with_torch_norm() -> None:
    """WrappedTorchNorm asserts `not sequence_parallel`, although a norm is per-token and works on a
    sequence shard unchanged. What SP needs is that the norm's weight grads are all-reduced over the
    TP group: tag the parameters `sequence_parallel=True`, as Apex's FusedLayerNorm and TE do, and
    finalize_model_grads does the rest."""
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(original_new, "_nemoc_sp", False):
        return

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            object.__setattr__(config, "sequence_parallel", False)
        try:
            module = original_new(cls, config, hidden_size, eps, **kwargs)
        finally:
            if sequence_parallel:
                object.__setattr__(config, "sequence_parallel", True)
        if sequence_parallel:
            for param in module.parameters():
                param.sequence_parallel = True
        return module

    __new__._nemoc_sp = True
    torch_norm.WrappedTorchNorm.__new__ = __new__


# ------------------------------------------------------------------------------- checkpointing


def fork_checkpoint_results_queue() -> None:
    """The first torch_dist save creates a 'spawn' multiprocessing Manager (re-imports torch and
    Megatron: ~7 s on 2 cores). The Manager only serves a queue and never touches torch, so a fork
    is safe and takes ~0.25 s. Used on CPU only; idempotent."""
    if _state["fork_queue"]:
        return
    _state["fork_queue"] = True
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    def results_queue(*args, **kwargs):
        if fa._results_queue is None:
            manager = SyncManager(ctx=mp.get_context("fork"))
            manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
            fa._results_queue = manager.Queue()
            fa._nemoc_manager = manager  # keep it referenced: its finalizer shuts the server down at exit
        return fa._results_queue

    for name in ("_get_write_results_queue", "get_write_results_queue"):  # 0.16 / 0.19 names
        if hasattr(fa, name):
            setattr(fa, name, results_queue)


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the queue-server process: it ignores the stop signals a Ctrl-C or a group SIGTERM
    delivers (the trainer is still saving through it) and is SIGKILLed by the kernel when the trainer
    dies (a SIGKILLed trainer cannot shut its Manager down). See runtime.faults.become_helper_process."""
    from nemoc.runtime.faults import become_helper_process

    become_helper_process(parent_pid)
