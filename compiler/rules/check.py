"""Rules applied to a spec: each stage's effective parallel block and environment, `check_spec` (every
rule over every stage, diagnostics anchored at the user's spans) and `to_diagnostic`.
"""

from __future__ import annotations

from dataclasses import replace

from nemoc.compiler.catalog.hardware import TRAINING_PRECISIONS, get_gpu
from nemoc.compiler.params import packs_sequences
from nemoc.compiler.spec import ExperimentSpec, ParallelSpec, StageSpec, resolve_kernels
from nemoc.compiler.target import MEGATRON_CORE, Target
from nemoc.dsl.diagnostics import Diagnostic
from nemoc.compiler.rules.base import Env, Sizes, TRAINING_KINDS, stage_seq_length, to_diagnostic
from nemoc.compiler.rules.registry import violations
from nemoc.compiler.rules.stages import (
    MAX_STAGES, hf_init_not_loaded, is_hf_conversion, stage_diagnostics, stage_mtp_layers,
)


def gpu_facts(gpu_name: str) -> tuple[str | None, tuple[str, ...] | None]:
    """(generation, supported training precisions) of a catalog GPU; (None, None) if unknown
    (the schema check reports an unknown GPU; the rules then skip hardware checks)."""
    hw = get_gpu(gpu_name)
    if hw is None:
        return None, None
    return hw.generation, tuple(p for p in TRAINING_PRECISIONS if hw.supports(p))


def sizes_of(parallel: ParallelSpec, *, global_batch: int | None, seq_length: int) -> Sizes:
    """The rules' view of what the user fixed (None = auto)."""
    vp = parallel.virtual_pipeline
    return Sizes(
        tp=parallel.tensor, pp=parallel.pipeline, vp=vp, cp=parallel.context, ep=parallel.expert,
        etp=parallel.expert_tensor, dp=parallel.data, micro_batch=parallel.micro_batch,
        global_batch=global_batch, sequence_parallel=parallel.sequence_parallel,
        distributed_optimizer=parallel.distributed_optimizer, recompute=parallel.recompute,
        recompute_layers=parallel.recompute_layers, recompute_modules=parallel.recompute_modules,
        seq_length=seq_length, tp_comm_overlap=parallel.tp_comm_overlap,
        defer_embedding_wgrad_compute=parallel.defer_embedding_wgrad_compute,
        wgrad_deferral_limit=parallel.wgrad_deferral_limit,
        overlap_param_gather=parallel.overlap_param_gather, fp8_param_gather=parallel.fp8_param_gather,
        megatron_fsdp=parallel.megatron_fsdp,
        optimizer_state_dtype=parallel.optimizer_state_dtype,
        precision_aware_optimizer=parallel.precision_aware,
    )


_PARALLEL_FIELDS = (
    "tensor", "pipeline", "virtual_pipeline", "context", "expert", "expert_tensor", "data",
    "sequence_parallel", "distributed_optimizer", "recompute", "recompute_layers", "recompute_modules",
    "micro_batch", "tp_comm_overlap", "defer_embedding_wgrad_compute", "wgrad_deferral_limit",
    "grad_reduce_in_fp32", "overlap_param_gather", "fp8_param_gather", "megatron_fsdp", "optimizer_state_dtype",
    "precision_aware_optimizer",
)


def stage_parallel(spec: ExperimentSpec, stage: StageSpec) -> ParallelSpec:
    """The parallel block a stage runs with: the stage-level block overrides the experiment's.

    When the spans say which fields the stage block wrote (`stage.<name>.parallel.<field>`), only
    those override (field by field); otherwise the stage block replaces the experiment's whole.
    """
    if stage.parallel is None:
        return spec.parallel
    prefix = f"stage.{stage.name}.parallel."
    written = {k[len(prefix):] for k in spec.spans if k.startswith(prefix)}
    if not written:
        return stage.parallel
    return replace(spec.parallel, **{f: getattr(stage.parallel, f) for f in _PARALLEL_FIELDS if f in written})


def env_of(spec: ExperimentSpec, stage_kind: str = "pretrain", attention_backend: str | None = None,
           optimizer: str = "adam", target: Target = MEGATRON_CORE, hf_conversion: bool = False,
           packed: bool = False, dropout: bool = False) -> Env:
    arch, precisions = gpu_facts(spec.cluster.gpu)
    return Env(
        model=spec.model, cluster=spec.cluster, precision=spec.precision,
        attention_backend=attention_backend or spec.attention_backend,
        gpu_arch=arch, gpu_precisions=precisions, stage_kind=stage_kind,
        kernels=resolve_kernels(spec.kernels, spec.cluster.gpu, spec.model), optimizer=optimizer, target=target,
        fp8_recipe=spec.fp8_recipe, hf_conversion=hf_conversion,
        moe_requested=(spec.moe_dispatcher, spec.moe_grouped_gemm, spec.moe_permute_fusion), packed=packed,
        host_requested=host_requested(spec), cross_entropy_fusion=spec.cross_entropy_fusion,
        bf16_layers=(spec.bf16_first_layers, spec.bf16_last_layers), dropout=dropout,
    )


def stage_dropout(params: object) -> bool:
    """Whether a stage trains with dropout (its `dropout` > 0: TransformerConfig hidden_dropout and
    attention_dropout, as the runtime sets them)."""
    return bool(params is not None and "dropout" in params and params.dropout)


def host_requested(spec: ExperimentSpec) -> tuple:
    """The host settings the user wrote (Env.host_requested; None = auto)."""
    return (spec.cuda_graph_impl, tuple(spec.cuda_graph_scope), spec.manual_gc, spec.manual_gc_interval)


def check_spec(spec: ExperimentSpec, target: Target = MEGATRON_CORE) -> tuple[Diagnostic, ...]:
    """Validate what the user fixed (no search): every rule over every training stage's sizes (for
    eval / export stages, the rules that do not depend on the parallel sizes).

    Auto sizes are skipped by each rule; a violation that several stages share (because they run
    with the same experiment-level block) is reported once, at the experiment-level span.
    """
    out: list[Diagnostic] = []
    seen: set[tuple[str, str]] = set()
    if len(spec.stages) > MAX_STAGES:
        return stage_diagnostics(spec)
    stages = list(spec.stages) or [None]
    for stage in stages:
        parallel = spec.parallel if stage is None else stage_parallel(spec, stage)
        seq = spec.model.seq_length if stage is None else stage_seq_length(spec, stage)
        gb = None if stage is None else stage.global_batch
        # a stage that runs without the MTP depths is checked as the planner builds it (`plan_stage`: W128)
        runs = spec if stage is None or stage_mtp_layers(spec, stage) else replace(spec, model=spec.model.without_mtp())
        env = env_of(runs, stage.kind if stage else "pretrain", optimizer=stage.optimizer.name if stage else "adam",
                     target=target, hf_conversion=stage is not None and is_hf_conversion(spec, stage),
                     packed=stage is not None and packs_sequences(stage.kind, stage.params),
                     dropout=stage is not None and stage_dropout(stage.params))
        own = stage is not None and stage.parallel is not None
        sizes = sizes_of(parallel, global_batch=gb, seq_length=seq)
        if stage is not None and stage.kind not in TRAINING_KINDS:
            # eval / export run with their own layout (the planner picks it): only the rules on the
            # model, the precision and the sequence length apply here.
            # A pipeline the stage's own block writes is checked against what the runtime runs.
            own_pp = own and f"stage.{stage.name}.parallel.pipeline" in spec.spans
            own_vp = own and f"stage.{stage.name}.parallel.virtual_pipeline" in spec.spans
            own_sp = own and f"stage.{stage.name}.parallel.sequence_parallel" in spec.spans
            sizes = Sizes(tp=None, pp=parallel.pipeline if own_pp else None,
                          vp=parallel.virtual_pipeline if own_vp else None, cp=None, ep=None,
                          sequence_parallel=parallel.sequence_parallel if own_sp else None,
                          distributed_optimizer=None, seq_length=seq)
        for v in violations(env, sizes):
            key = (v.code, v.equation)
            if key in seen:
                continue
            seen.add(key)
            uses_stage = own or any(a.startswith("stage.") for a in v.anchors)
            out.append(to_diagnostic(v, spec, stage if uses_stage else None))
    return tuple(out) + stage_diagnostics(spec) + hf_init_not_loaded(spec, target)
