"""Transformer Engine's userbuffers for tensor-parallel communication overlap (`tp_comm_overlap`).

Input:  the stage plan's `Execution.userbuffers` (compiler/catalog/userbuffers.py: buffer shape, dtype, FP8 or
        not, bootstrap backend, Megatron-Bridge's per-GEMM preset or TE's defaults) and the machine's facts.
Output: TE's userbuffer communicators, initialised once per process before the model is built (TE's layers
        look them up by GEMM name when `TransformerConfig.tp_comm_overlap` is set), destroyed at teardown.
Invariants: the arguments are the plan's, translated (Megatron-LM `megatron/training/initialize.py`
        `_initialize_tp_communicators` and Megatron-Bridge `training/initialize.py` make the same call); a
        machine that cannot run them (the CPU, no TE, a TE older than 1.9: megatron_args.check_tp_comm_overlap)
        is refused with the reason before any buffer is touched. TE's signature (read at TE 2.20.0.dev0, commit
        d0067d0d: transformer_engine/pytorch/module/base.py `initialize_ub`; `quantization_modes` since TE 2.8,
        `bootstrap_backend` since 1.9):
        initialize_ub(shape, tp_size, use_fp8=False, quantization_modes=None, dtype=torch.bfloat16,
                      ub_cfgs=None, bootstrap_backend=None, with_cublasmp=False)
"""

from __future__ import annotations

from nemoc.compiler.plan import Userbuffers
from nemoc.runtime.megatron_args import MachineFacts, UnsupportedPlan, check_tp_comm_overlap

# TE's `quantization_modes` argument (UserBufferQuantizationMode); older TEs take `use_fp8`
TE_QUANTIZATION_MODES = "2.8.0"

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

_initialised: list[Userbuffers] = []  # what this process initialised (one set of buffers per process)


def _te_at_least(version: str) -> bool:
    from megatron.core.utils import is_te_min_version

    return is_te_min_version(version)


def ub_cfgs(ub: Userbuffers) -> dict:
    """The plan's per-GEMM configs as TE's `ub_cfgs` dict ({} for TE's defaults); a pipeline entry without
    `num_splits` and the method-specific keys of other methods are left to TE."""
    out = {}
    for g in ub.gemms:
        cfg = dict(method=g.method, num_sm=g.num_sm, cga_size=g.cga_size, set_sm_margin=g.set_sm_margin,
                   atomic_gemm=g.atomic_gemm, fp8_buf=g.fp8_buf)
        if g.num_splits is not None:
            cfg["num_splits"] = g.num_splits
        if g.method == "ring_exchange":
            cfg["aggregate"] = g.aggregate
        out[g.name] = cfg
    return out


def initialize_kwargs(ub: Userbuffers, *, quantization_modes: bool) -> dict:
    """The keyword arguments of TE `initialize_ub` for the plan's buffers: `quantization_modes` (TE >= 2.8)
    or the older `use_fp8`."""
    import torch

    kwargs = dict(shape=list(ub.shape), tp_size=ub.tp, dtype=getattr(torch, _DTYPES[ub.dtype]),
                  ub_cfgs=ub_cfgs(ub), bootstrap_backend=ub.bootstrap_backend)
    if quantization_modes:
        from transformer_engine.pytorch.module.base import UserBufferQuantizationMode as Mode

        kwargs["quantization_modes"] = [Mode.FP8 if ub.quantization == "fp8" else Mode.NONE]
    else:
        kwargs["use_fp8"] = ub.quantization == "fp8"
    return kwargs


def initialize(ub: Userbuffers | None, facts: MachineFacts) -> None:
    """TE `initialize_ub` with the plan's buffers, once per process: a second model of the same stage (the
    alignment stages' reference or critic) reuses them; a different set in one process is refused (TE keeps
    one global set of communicators)."""
    if ub is None:
        return
    if _initialised:
        if _initialised[0] == ub:
            return
        raise UnsupportedPlan(f"tp_comm_overlap: this process already holds userbuffers of shape "
                              f"{list(_initialised[0].shape)} and cannot initialise a second set of shape "
                              f"{list(ub.shape)}")
    check_tp_comm_overlap(facts)
    from transformer_engine.pytorch.module import base

    base.initialize_ub(**initialize_kwargs(ub, quantization_modes=_te_at_least(TE_QUANTIZATION_MODES)))
    _initialised.append(ub)


def destroy() -> None:
    """TE `destroy_ub` where this process initialised the buffers (teardown)."""
    if not _initialised:
        return
    _initialised.clear()
    from transformer_engine.pytorch.module import base

    base.destroy_ub()
