"""Pipeline rules: the split of the layers over pipeline stages (`pipeline_split`, the one Megatron-Core
0.16.1 accepts with the fewest layers on the most-loaded stage), PP / VP divisibility, the interleaved
schedule's microbatch condition, and the target's pipeline capability (E126).
"""

from __future__ import annotations

from functools import lru_cache

from nemoc.compiler.flops import mtp_layer_equivalents
from nemoc.compiler.plan import PipelineSplit
from nemoc.compiler.spec import ModelSpec
from nemoc.dsl.diagnostics import Severity
from nemoc.compiler.rules.base import TRAINING_KINDS, Env, Sizes, Violation, _P
from nemoc.compiler.rules.precision import _local_why


@lru_cache(maxsize=4096)
def model_split(model: ModelSpec, pp: int, vp: int | None = None) -> PipelineSplit | None:
    """`pipeline_split` of `model`'s layers, the last stage weighted by its multi-token prediction depths
    (`flops.mtp_layer_equivalents`)."""
    return pipeline_split(model.layers, pp, vp, last_load=mtp_layer_equivalents(model))


@lru_cache(maxsize=4096)
def pipeline_split(layers: int, pp: int, vp: int | None = None, last_load: int = 0) -> PipelineSplit | None:
    """The split nemoc gives Megatron for `layers` over `pp` stages, or None when none is valid.

    Even when `layers % pp == 0` (and the per-stage count divides by `vp`); otherwise the uneven
    split with the fewest layers on the most-loaded stage: middle stages get `m` each (a multiple
    of `vp`), first and last share the rest (each a positive multiple of `vp`), which satisfies every
    check of transformer_config.py __post_init__ ("Uneven PP"); or, where that is worse or
    impossible, the embedding and/or the loss counted as pipeline layers (`_accounted_split`).
    Ties: the larger middle count, then first/last counts over accounting.
    `last_load`: decoder layers' worth of other work on the last stage (multi-token prediction:
    `model_split`); with it the split minimises the heaviest stage counting that work (`_loaded_split`).
    """
    if last_load and pp > 1:
        return _loaded_split(layers, pp, vp, last_load)
    v = vp or 1
    if pp < 1 or layers < pp * v or layers % v:
        return _accounted_split(layers, pp, vp) if pp > 1 else None
    if layers % pp == 0 and (layers // pp) % v == 0:
        return PipelineSplit(None, None, layers // pp)
    if pp == 1:
        return None
    middle_stages = pp - 2
    best: PipelineSplit | None = None
    middles = range(v, layers // middle_stages + 1, v) if middle_stages else (0,)
    for m in middles:
        rest = layers - middle_stages * m
        if rest < 2 * v:
            continue
        first = (rest // 2) // v * v
        split = PipelineSplit(first, rest - first, m if middle_stages else rest - first)
        if best is None or split.max_layers <= best.max_layers:
            best = split
    accounted = _accounted_split(layers, pp, vp)
    if accounted is not None and (best is None or accounted.max_layers < best.max_layers):
        return accounted
    return best


def _loaded_split(layers: int, pp: int, vp: int | None, last_load: int) -> PipelineSplit | None:
    """`pipeline_split` with `last_load` layers' worth of work on the last stage: of the even split, every uneven
    one (first and last stage counts multiples of vp, every middle stage the same multiple, Megatron's "Uneven PP"
    checks) and the accounted ones, the one whose heaviest stage, counting the last stage's load, is lightest; ties:
    the lighter last stage, then the larger middle count."""
    v = vp or 1
    unloaded = pipeline_split(layers, pp, vp)
    if unloaded is None:
        return None
    candidates = [unloaded]
    if layers >= pp * v and layers % v == 0:
        middle_stages = pp - 2
        for m in (range(v, layers // middle_stages + 1, v) if middle_stages else (0,)):
            rest = layers - middle_stages * m
            for first in range(v, rest - v + 1, v):
                candidates.append(PipelineSplit(first, rest - first, m if middle_stages else rest - first))
    accounted = _accounted_split(layers, pp, vp)
    if accounted is not None:
        candidates.append(accounted)

    def key(split: PipelineSplit) -> tuple[int, int, int]:
        first, middle, last = split.stage_layers(pp)
        heaviest = max(first, last + last_load, middle if pp > 2 else 0)
        return heaviest, last + last_load, -middle
    best = min(candidates, key=key)
    if best.first is not None and best.first == best.per_stage == best.last and not best.embedding:
        return PipelineSplit(None, None, best.per_stage)  # an uneven candidate that is the even split
    return best


def _accounted_split(layers: int, pp: int, vp: int | None) -> PipelineSplit | None:
    """The split with the embedding and/or the loss counted as layers (transformer_config.py
    __post_init__: (layers + e + l) % pp == 0 and, interleaved, ((layers + e + l) / pp) % vp == 0;
    transformer_block.py get_num_layers_to_build: the first / last model chunk keeps at least one
    transformer layer here, so it is never empty). Both counted first (embedding and loss are the
    ends of the pipeline), then embedding only, then loss only."""
    v = vp or 1
    for embedding, loss in ((True, True), (True, False), (False, True)):
        total = layers + embedding + loss
        if total % pp or (total // pp) % v:
            continue
        chunk = total // pp // v  # layers per model chunk, counting the embedding / loss
        if chunk - max(embedding, loss) < 1:
            continue
        return PipelineSplit(None, None, total // pp, embedding=embedding, loss=loss, stages=pp)
    return None


def _empty_chunk_split(layers: int, pp: int, vp: int | None) -> str | None:
    """What Megatron would count as layers (embedding / loss) in a split that `_accounted_split`
    refuses only because a first or last model chunk would hold no transformer layer; None otherwise."""
    v = vp or 1
    if pp < 2:
        return None
    for embedding, loss in ((True, True), (True, False), (False, True)):
        total = layers + embedding + loss
        if total % pp == 0 and (total // pp) % v == 0 and total // pp // v - max(embedding, loss) < 1:
            return " and ".join(n for n, on in (("embedding", embedding), ("loss", loss)) if on)
    return None


def rule_layers_pipeline(env: Env, s: Sizes) -> Violation | None:
    """transformer_block.py get_num_layers_to_build + transformer_config.py "Uneven PP" checks."""
    L = env.model.layers
    if s.pp is None:
        return None
    vp = s.vp if (s.vp or 1) > 1 else None
    if model_split(env.model, s.pp, vp) is not None:
        return None
    v = vp or 1
    eq = f"layers({L}) < pp({s.pp}) * vp({v}) = {s.pp * v}" if L < s.pp * v else (
        f"no split of layers({L}) over pp({s.pp}) stages has first, last and per-middle-stage counts divisible by vp({v})"
    )
    hint = "use a pipeline size (x virtual stages) that divides the layer count"
    empty = _empty_chunk_split(L, s.pp, vp)
    if empty:
        eq += (f"; counting the {empty} as layers would leave a model chunk with 0 transformer layers: Megatron "
               "accepts that (get_num_layers_to_build >= 0), nemoc requires >= 1 (its runtime and memory model are "
               "not validated on empty chunks)")
        hint = "use fewer pipeline stages or virtual stages, so that every model chunk holds a transformer layer"
    return Violation(
        "E105", "the decoder layers cannot be split over the pipeline stages",
        eq,
        hint,
        anchors=(_P + "pipeline", _P + "virtual_pipeline", "model.layers", "model"),
        source="megatron/core/transformer/transformer_block.py get_num_layers_to_build; transformer_config.py (Uneven PP)",
    )


def rule_interleave_needs_pp(env: Env, s: Sizes) -> Violation | None:
    """parallel_state.py initialize_model_parallel: interleaved schedule needs pp > 1."""
    if s.vp is None or s.vp <= 1 or s.pp is None or s.pp > 1:
        return None
    return Violation(
        "E106", "the interleaved (virtual pipeline) schedule needs pipeline parallelism",
        f"virtual_pipeline({s.vp}) > 1 requires pp({s.pp}) > 1",
        "remove `virtual_pipeline` or set pipeline >= 2",
        anchors=(_P + "virtual_pipeline", _P + "pipeline"),
        source="megatron/core/parallel_state.py initialize_model_parallel (interleaved schedule)",
    )


def rule_defer_wgrad_needs_pp(env: Env, s: Sizes) -> Violation | None:
    """model_parallel_config.py __post_init__ (0.16.1, l. 425): "Cannot defer embedding wgrad compute when
    pipeline model parallel is not used": the deferred GEMMs run in the pipeline's drain. Auto pp is judged
    once resolved (the search keeps pp > 1)."""
    if not s.defer_embedding_wgrad_compute or s.pp is None or s.pp > 1 or env.stage_kind not in TRAINING_KINDS:
        return None
    return Violation(
        "E196", "defer_embedding_wgrad_compute needs pipeline parallelism",
        f"defer_embedding_wgrad_compute = true with pp({s.pp}): there is no pipeline drain to hide the output "
        "layer's weight gradients in",
        "set defer_embedding_wgrad_compute = false, or pipeline >= 2 (or leave it auto)",
        anchors=(_P + "defer_embedding_wgrad_compute", _P + "pipeline"),
        source="megatron/core/model_parallel_config.py __post_init__ (defer_embedding_wgrad_compute needs "
               "pipeline_model_parallel_size > 1)",
    )


def rule_defer_wgrad_needs_fusion(env: Env, s: Sizes) -> Violation | None:
    """model_parallel_config.py __post_init__ (0.16.1, l. 430): "Cannot defer embedding wgrad compute when
    gradient accumulation fusion is not used": the drain accumulates the deferred weight gradients into
    main_grad with the fused wgrad kernel (tensor_parallel/layers.py drain_embedding_wgrad_compute), which the
    plan turns on with Transformer Engine's kernels only (execution.fusions: grad_accumulation)."""
    if not s.defer_embedding_wgrad_compute or env.stage_kind not in TRAINING_KINDS:
        return None
    local = _local_why(env)
    if not local:
        return None
    return Violation(
        "E197", "defer_embedding_wgrad_compute needs the fused weight-gradient accumulation of Transformer Engine "
        "kernels",
        f"defer_embedding_wgrad_compute = true but {local}: Megatron-Core defers only with "
        "gradient_accumulation_fusion",
        "set defer_embedding_wgrad_compute = false, or kernels = te",
        anchors=(_P + "defer_embedding_wgrad_compute", "kernels"),
        source="megatron/core/model_parallel_config.py __post_init__ (defer_embedding_wgrad_compute needs "
               "gradient_accumulation_fusion)",
    )


def rule_wgrad_deferral_limit(env: Env, s: Sizes) -> Violation | None:
    """`wgrad_deferral_limit` says how many micro batches' output-layer weight gradients wait for the drain:
    without `defer_embedding_wgrad_compute` nothing waits (model_parallel_config.py: "this argument is invalid
    if `defer_embedding_wgrad_compute` is False"), so a written limit would be ignored silently."""
    if s.defer_embedding_wgrad_compute or not s.wgrad_deferral_limit:
        return None
    return Violation(
        "E198", "wgrad_deferral_limit without defer_embedding_wgrad_compute",
        f"wgrad_deferral_limit({s.wgrad_deferral_limit}) with defer_embedding_wgrad_compute = false: no output-layer "
        "weight gradient is deferred",
        "remove wgrad_deferral_limit, or set defer_embedding_wgrad_compute = true",
        anchors=(_P + "wgrad_deferral_limit", _P + "defer_embedding_wgrad_compute"),
        source="megatron/core/model_parallel_config.py (wgrad_deferral_limit is read only with "
               "defer_embedding_wgrad_compute)",
    )


def rule_runtime_pipeline(env: Env, s: Sizes) -> Violation | None:
    """The target, not Megatron: a stage kind it runs without a pipeline refuses pp > 1 and vp."""
    caps = env.target.caps(env.stage_kind)
    pp, vp, cp = s.pp or 1, s.vp or 1, s.cp or 1
    if not caps.sequence_parallel and s.sequence_parallel:
        return Violation(
            "E126", f"`{env.stage_kind}` stages cannot run sequence parallelism: {caps.runs}",
            f"sequence_parallel = true, but stage kind {env.stage_kind} keeps whole sequences on every "
            "tensor-parallel rank",
            "remove `sequence_parallel` from this stage's `parallel` block (auto plans it off)",
            anchors=(_P + "sequence_parallel",), source=caps.source or f"the target `{env.target.name}`",
        )
    if not caps.context_parallel and cp > 1:
        return Violation(
            "E126", f"`{env.stage_kind}` stages cannot run context-parallel: {caps.runs}",
            f"cp({cp}) > 1, but stage kind {env.stage_kind} runs every sequence whole on each rank",
            "set context = 1 for this stage (its own `parallel { context = 1 }` block overrides the experiment's)",
            anchors=(_P + "context",), source=caps.source or f"the target `{env.target.name}`",
        )
    if env.packed and not caps.packed_context_parallel and cp > 1:
        return Violation(
            "E126", f"`{env.stage_kind}` stages that pack samples cannot run context-parallel: {caps.runs}",
            f"cp({cp}) > 1 with pack = true, but stage kind {env.stage_kind} splits only rows of one sample over "
            "context-parallel ranks",
            "set pack = false for this stage, or context = 1 (its own `parallel { context = 1 }` block overrides "
            "the experiment's)",
            anchors=(_P + "context",), source=caps.source or f"the target `{env.target.name}`",
        )
    if (caps.pipeline or (pp <= 1 and vp <= 1)) and (caps.virtual_pipeline or vp <= 1):
        return None
    if caps.pipeline:  # pipelines, but without virtual stages
        return Violation(
            "E126", f"`{env.stage_kind}` stages cannot run virtual pipeline stages: {caps.runs}",
            f"vp({vp}) > 1, but stage kind {env.stage_kind} runs one model chunk per pipeline rank",
            "remove `virtual_pipeline` for this stage (pipeline parallelism itself is fine)",
            anchors=(_P + "virtual_pipeline", _P + "pipeline"),
            source=caps.source or f"the target `{env.target.name}`",
        )
    field, size = ("pipeline", f"pp({pp})") if pp > 1 else ("virtual_pipeline", f"vp({vp})")
    return Violation(
        "E126", f"`{env.stage_kind}` stages cannot run pipeline-parallel: {caps.runs}",
        f"{size} > 1, but stage kind {env.stage_kind} runs with pp(1) and no virtual pipeline",
        "set pipeline = 1 (or auto) and no virtual_pipeline for this stage (its own `parallel { pipeline = 1 }` "
        "block overrides the experiment's); split the model with tensor parallelism instead",
        anchors=(_P + field, _P + "pipeline"),
        source=caps.source or f"the target `{env.target.name}`",
    )


def rule_interleave_microbatches(env: Env, s: Sizes) -> Violation | None:
    """schedules.py forward_backward_pipelining_with_interleaving: with the default
    microbatch_group_size_per_vp_stage = pp, need pp <= M and M % pp == 0 (else 0 < M % pp < pp)."""
    if s.vp is None or s.vp <= 1 or None in (s.pp, s.dp, s.micro_batch, s.global_batch) or s.pp <= 1:
        return None
    if s.global_batch % (s.micro_batch * s.dp):
        return None  # rule_global_batch reports it
    m = s.global_batch // (s.micro_batch * s.dp)
    if m >= s.pp and m % s.pp == 0:
        return None
    return Violation(
        "E108", "the interleaved schedule needs the number of microbatches to be a multiple of the pipeline size",
        f"num_microbatches = global_batch({s.global_batch}) / (micro_batch({s.micro_batch}) * dp({s.dp})) = {m}; "
        f"{m} % pp({s.pp}) = {m % s.pp} != 0" if m >= s.pp else
        f"num_microbatches = global_batch({s.global_batch}) / (micro_batch({s.micro_batch}) * dp({s.dp})) = {m} < pp({s.pp})",
        "use a global batch that is a multiple of micro_batch x data x pipeline, or drop virtual_pipeline",
        anchors=(_P + "virtual_pipeline", "stage.global_batch", _P + "micro_batch"),
        source="megatron/core/pipeline_parallel/schedules.py forward_backward_pipelining_with_interleaving",
    )


def warn_uneven_pipeline(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py "Uneven PP": nemoc sets num_layers_in_first/last_pipeline_stage."""
    if s.pp is None:
        return None
    vp = s.vp if (s.vp or 1) > 1 else None
    split = model_split(env.model, s.pp, vp)
    if split is None or split.even:
        return None
    settings = ", ".join(f"{k}={v}" for k, v in split.params().items())
    return Violation(
        "W108", "the layers do not divide evenly over the pipeline: nemoc uses an uneven split",
        f"layers({env.model.layers}) over pp({s.pp}) x vp({vp or 1}) -> {split.describe(s.pp)} ({settings})",
        None, anchors=(_P + "pipeline", "model.layers"), severity=Severity.NOTE,
        source="megatron/core/transformer/transformer_config.py __post_init__ (Uneven PP)",
    )


def warn_vp_one(env: Env, s: Sizes) -> Violation | None:
    """Megatron-LM arguments.py: virtual_pipeline_model_parallel_size == 1 is reset to None."""
    if s.vp != 1:
        return None
    return Violation(
        "W109", "virtual_pipeline = 1 means no interleaving",
        "virtual_pipeline(1) -> virtual_pipeline_model_parallel_size = None",
        None, anchors=(_P + "virtual_pipeline",), severity=Severity.NOTE,
        source="megatron/training/arguments.py validate_args (virtual_pipeline_model_parallel_size == 1 -> None)",
    )
