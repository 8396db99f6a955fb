"""Layout rules: every check Megatron-Core 0.16.1 would make after launch, made before launch.

Input:  the model, the cluster, the precision/attention settings of the experiment and a `Sizes`
        (the parallel sizes of one stage; `None` = auto, not yet chosen).
Output: `Violation`s (pure data) -> `Diagnostic`s anchored at the user's span (`check_spec`) or a
        short reason string for the search (`layout_violations`).
Invariants: pure functions, no torch / megatron import; a rule whose operands are still `auto`
        says nothing (the search decides them and re-checks the complete layout); every message
        shows the whole equation with every operand; errors are exactly the conditions under which
        Megatron-Core raises (each rule cites the source line it mirrors), warnings are the settings
        Megatron silently rewrites, stating what it would do.

The rule table `RULES` is ordered cheapest / most decisive first, because `layout_violations`
stops at the first error it finds.

`STAGE_RULES` (E150-E153, W150) are the stage settings that would otherwise fail only at run time, in a
torch or Megatron traceback or an alignment error after data preparation: `min_lr` above `lr`, an
alignment stage without data in a format its records need, an export with no `after`, a stage that
starts from a parent checkpoint its parent never saves, and a warm-up longer than the stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache

from nemoc.compiler.catalog.hardware import get_gpu
from nemoc.compiler.flops import MEGATRON_VOCAB_DIVISOR as VOCAB_DIVISOR
from nemoc.compiler.flops import padded_vocab  # Megatron-LM `_vocab_size_with_padding` (128 x tp)
from nemoc.compiler.plan import PipelineSplit
from nemoc.compiler.spec import ClusterSpec, ExperimentSpec, ModelSpec, ParallelSpec, StageSpec, resolve_kernels
from nemoc.compiler.target import MEGATRON_CORE, Target
from nemoc.dsl.diagnostics import Diagnostic, Note, Severity
from nemoc.dsl.schema import PARENT_CHECKPOINT_KINDS, STAGE_DATA_FORMATS

TRAINING_KINDS = ("pretrain", "sft", "dpo", "reward", "ppo")
RECOMPUTE = ("none", "selective", "full")


# ------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Sizes:
    """The parallel sizes of one stage as the rules see them; `None` = auto (unknown yet)."""

    tp: int | None = None
    pp: int | None = None
    vp: int | None = None  # None = auto or no interleaving (see `interleaved`)
    cp: int | None = 1
    ep: int | None = 1
    etp: int | None = None
    dp: int | None = None
    micro_batch: int | None = None
    global_batch: int | None = None
    sequence_parallel: bool | None = None
    distributed_optimizer: bool | None = True
    recompute: str | None = None
    seq_length: int = 0


@dataclass(frozen=True, slots=True)
class Env:
    """What the rules need besides the sizes: model, cluster and experiment-wide settings."""

    model: ModelSpec
    cluster: ClusterSpec
    precision: str = "bf16"
    attention_backend: str = "flash"  # resolved or "auto"
    gpu_arch: str | None = None  # ampere | hopper | blackwell | cpu (HardwareSpec.generation)
    gpu_precisions: tuple[str, ...] | None = None  # precisions the GPU runs (None = GPU unknown)
    stage_kind: str = "pretrain"
    kernels: str = "te"  # the experiment's resolved `kernels`: te | local
    optimizer: str = "adam"  # the stage's optimizer: adam | sgd
    target: Target = MEGATRON_CORE  # what the runtime that executes the plan can run

    @property
    def stage_kernels(self) -> str:
        """The kernels this stage runs with on the target."""
        return self.target.stage_kernels(self.stage_kind, self.kernels)


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule, as plain data; `anchors` are spec span paths, most specific first."""

    code: str
    message: str
    equation: str
    hint: str | None = None
    anchors: tuple[str, ...] = ()
    severity: Severity = Severity.ERROR
    source: str = ""  # the Megatron source it mirrors

    @property
    def short(self) -> str:
        return f"{self.code} {self.equation}"


@lru_cache(maxsize=4096)
def pipeline_split(layers: int, pp: int, vp: int | None = None) -> PipelineSplit | None:
    """The split nemoc gives Megatron for `layers` over `pp` stages, or None when none is valid.

    Even when `layers % pp == 0` (and the per-stage count divides by `vp`); otherwise the uneven
    split with the fewest layers on the most-loaded stage: middle stages get `m` each (a multiple
    of `vp`), first and last share the rest (each a positive multiple of `vp`), which satisfies every
    check of transformer_config.py __post_init__ ("Uneven PP"); or, where that is worse or
    impossible, the embedding and/or the loss counted as pipeline layers (`_accounted_split`).
    Ties: the larger middle count, then first/last counts over accounting.
    """
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


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def expert_tp_options(sizes: Sizes) -> tuple[int, ...]:
    """The expert-TP sizes a rule must consider: the fixed one, or, when `expert_tensor` is auto,
    what the search tries (1 and tp; only 1 while tp is auto too). A rule on ETP says nothing when
    one of them satisfies it. (Megatron-Core would default an unset ETP to tp, model_parallel_config.py
    __post_init__; nemoc always resolves it itself.)"""
    if sizes.etp is not None:
        return (sizes.etp,)
    return (1,) if sizes.tp is None or sizes.tp == 1 else (1, sizes.tp)


# ------------------------------------------------------------------------------------------ rules
# Each rule: (Env, Sizes) -> Violation | None. A rule returns None when an operand is still auto.

Rule = Callable[[Env, Sizes], "Violation | None"]

_P = "parallel."


def rule_world_size(env: Env, s: Sizes) -> Violation | None:
    """parallel_state.py initialize_model_parallel: world % (tp*pp*cp) == 0, dp = world / (tp*pp*cp).
    With some sizes still auto, the fixed ones must already divide the world."""
    if None in (s.tp, s.pp, s.cp):
        return _partial_world_size(env, s)
    c = env.cluster
    world = c.world_size
    model = s.tp * s.pp * s.cp
    where = f"world size {world} ({c.nodes} node{'s' * (c.nodes != 1)} x {c.gpus_per_node} GPUs)"
    if s.dp is not None and model * s.dp != world:
        return Violation(
            "E101", "the parallel sizes do not multiply to the number of GPUs",
            f"tp({s.tp}) * pp({s.pp}) * cp({s.cp}) * dp({s.dp}) = {model * s.dp} != {where}",
            _world_hint(world, model, s.dp, c),
            anchors=(_P + "data", _P + "tensor", _P + "pipeline", "cluster.nodes", "cluster"),
            source="megatron/core/parallel_state.py initialize_model_parallel (world_size % model_size)",
        )
    if world % model:
        sizes = (("tp", s.tp), ("pp", s.pp), ("cp", s.cp))
        return Violation(
            "E101", "the model-parallel size does not divide the number of GPUs",
            f"{where} % (tp({s.tp}) * pp({s.pp}) * cp({s.cp}) = {model}) = {world % model} != 0",
            _world_hint(world, model, None, c),
            anchors=_breaking_first(world, sizes) + ("cluster.nodes", "cluster"),
            source="megatron/core/parallel_state.py initialize_model_parallel (world_size % model_size)",
        )
    return None


def _partial_world_size(env: Env, s: Sizes) -> Violation | None:
    c = env.cluster
    known = [(n, v) for n, v in (("tp", s.tp), ("pp", s.pp), ("cp", s.cp), ("dp", s.dp)) if v is not None and v > 1]
    product = math.prod(v for _, v in known)
    if not known or c.world_size % product == 0:
        return None
    where = f"world size {c.world_size} ({c.nodes} node{'s' * (c.nodes != 1)} x {c.gpus_per_node} GPUs)"
    factors = " * ".join(f"{n}({v})" for n, v in known)
    return Violation(
        "E101", "the fixed parallel sizes do not divide the number of GPUs",
        f"{where} % ({factors} = {product}) = {c.world_size % product} != 0" if len(known) > 1 else
        f"{where} % {factors} = {c.world_size % product} != 0",
        "use sizes whose product divides the GPU count, or more nodes",
        anchors=_breaking_first(c.world_size, known) + ("cluster.nodes", "cluster"),
        source="megatron/core/parallel_state.py initialize_model_parallel (world_size % model_size)",
    )


_SIZE_FIELDS = {"tp": "tensor", "pp": "pipeline", "cp": "context", "dp": "data"}


def _breaking_first(world: int, sizes) -> tuple[str, ...]:
    """Anchors for a product of sizes that does not divide `world`: first the size that breaks it (the
    first whose running product, in tp, pp, cp, dp order, stops dividing), then the others."""
    product, breaker = 1, None
    for name, value in sizes:
        product *= value or 1
        if world % product:
            breaker = name
            break
    ordered = [n for n, _ in sizes if n == breaker] + [n for n, _ in sizes if n != breaker]
    return tuple(_P + _SIZE_FIELDS[n] for n in ordered)


def _world_hint(world: int, model: int, dp: int | None, c: ClusterSpec) -> str:
    options = []
    if dp is not None and world % model == 0:
        options.append(f"set data = {world // model} (or leave it auto)")
    if dp is not None and (model * dp) % c.gpus_per_node == 0:
        options.append(f"nodes = {model * dp // c.gpus_per_node} for data = {dp}")
    if dp is None or world % model:
        nodes = next(n for n in range(c.nodes, c.nodes * model + 1) if (n * c.gpus_per_node) % model == 0)
        options.insert(0, f"use a model-parallel size that divides {world}")
        if nodes != c.nodes and dp is None:
            options.append(f"nodes = {nodes}")
    return ", or ".join(options)


def rule_heads_tp(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py __post_init__: num_attention_heads % tensor_model_parallel_size == 0."""
    h = env.model.heads
    if s.tp is None or h % s.tp == 0:
        return None
    return Violation(
        "E102", "attention heads are not divisible by the tensor-parallel size",
        f"heads({h}) % tp({s.tp}) = {h % s.tp} != 0",
        _tp_hint(env),
        anchors=(_P + "tensor", "model.heads", "model"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (num_attention_heads)",
    )


def rule_query_groups_tp(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py __post_init__: query_groups % tp == 0 or tp % query_groups == 0."""
    g = env.model.query_groups
    if s.tp is None or g % s.tp == 0 or s.tp % g == 0:
        return None
    return Violation(
        "E103", "query groups and the tensor-parallel size must divide one another",
        f"query_groups({g}) % tp({s.tp}) = {g % s.tp} != 0 and tp({s.tp}) % query_groups({g}) = {s.tp % g} != 0",
        _tp_hint(env),
        anchors=(_P + "tensor", "model.query_groups", "model"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (num_query_groups)",
    )


def rule_ffn_tp(env: Env, s: Sizes) -> Violation | None:
    """tensor_parallel/layers.py RowParallelLinear: divide(input_size, tp) asserts that fc2's input
    (the dense MLP's ffn_hidden; in an MoE model the shared expert's, the routed experts use etp)
    splits evenly over the tensor-parallel ranks."""
    m = env.model
    f, name = (m.shared_expert_ffn_hidden, "shared_expert_ffn_hidden") if m.is_moe else (m.ffn_hidden, "ffn_hidden")
    if s.tp is None or not f or f % s.tp == 0:
        return None
    return Violation(
        "E104", "the MLP hidden size is not divisible by the tensor-parallel size",
        f"{name}({f}) % tp({s.tp}) = {f % s.tp} != 0",
        _tp_hint(env),
        anchors=(_P + "tensor", f"model.{name}", "model"),
        source="megatron/core/tensor_parallel/layers.py RowParallelLinear (divide(input_size, world_size))",
    )


def rule_head_dim(env: Env, s: Sizes) -> Violation | None:
    """Megatron-LM arguments.py validate_args: without kv_channels, hidden % heads == 0."""
    m = env.model
    if m.kv_channels is not None or m.hidden % m.heads == 0:
        return None
    return Violation(
        "E125", "the hidden size is not divisible by the attention heads (and kv_channels is not set)",
        f"hidden({m.hidden}) % heads({m.heads}) = {m.hidden % m.heads} != 0",
        "set kv_channels (the head dimension), or a hidden size that is a multiple of heads",
        anchors=("model.hidden", "model.heads", "model"),
        source="megatron/training/arguments.py validate_args (hidden_size % num_attention_heads when kv_channels is None)",
    )


def rule_layers_pipeline(env: Env, s: Sizes) -> Violation | None:
    """transformer_block.py get_num_layers_to_build + transformer_config.py "Uneven PP" checks."""
    L = env.model.layers
    if s.pp is None:
        return None
    vp = s.vp if (s.vp or 1) > 1 else None
    if pipeline_split(L, s.pp, vp) is not None:
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


def rule_runtime_pipeline(env: Env, s: Sizes) -> Violation | None:
    """The target, not Megatron: a stage kind it runs without a pipeline refuses pp > 1 and vp."""
    caps = env.target.caps(env.stage_kind)
    pp, vp = s.pp or 1, s.vp or 1
    if caps.pipeline or (pp <= 1 and vp <= 1):
        return None
    field, size = ("pipeline", f"pp({pp})") if pp > 1 else ("virtual_pipeline", f"vp({vp})")
    return Violation(
        "E126", f"`{env.stage_kind}` stages cannot run pipeline-parallel: {caps.runs}",
        f"{size} > 1, but stage kind {env.stage_kind} runs with pp(1) and no virtual pipeline",
        "set pipeline = 1 (or auto) and no virtual_pipeline for this stage (its own `parallel { pipeline = 1 }` "
        "block overrides the experiment's); split the model with tensor parallelism instead",
        anchors=(_P + field, _P + "pipeline"),
        source=caps.source or f"the target `{env.target.name}`",
    )


def rule_runtime_moe(env: Env, s: Sizes) -> Violation | None:
    """The target, not Megatron: a stage kind it builds dense models for only refuses a MoE model."""
    m = env.model
    caps = env.target.caps(env.stage_kind)
    if not m.is_moe or caps.moe:
        return None
    return Violation(
        "E141", f"`{env.stage_kind}` stages cannot run MoE models: {caps.runs}, with dense models only",
        f"experts({m.experts}) > 0, but stage kind {env.stage_kind} runs dense models only",
        "run this stage on a dense model, or train the MoE model with `pretrain` stages only",
        anchors=("model.experts", "model"),
        source=caps.source or f"the target `{env.target.name}`",
    )


def rule_rope_head_dim(env: Env, s: Sizes) -> Violation | None:
    """Rotary embeddings rotate pairs of channels: RotaryEmbedding builds 2 * ceil(head_dim / 2)
    frequencies (inv_freq over arange(0, dim, 2)), and applying them to a head with an odd dimension
    fails in the first forward pass (rope_utils.py _apply_rotary_pos_emb_bshd: t * cos with
    t[..., :rot_dim] of head_dim channels against rot_dim = head_dim + 1)."""
    m = env.model
    if m.position != "rope" or m.head_dim % 2 == 0:
        return None
    d = m.head_dim
    return Violation(
        "E142", "rotary position embeddings need an even head dimension",
        f"head_dim({d}) % 2 = 1 with position = rope (RotaryEmbedding builds 2 * ceil({d} / 2) = {d + 1} frequencies)",
        "use an even head dimension (kv_channels, or hidden / heads), e.g. a multiple of 8; or position = learned",
        anchors=("model.kv_channels", "model.hidden", "model.position", "model"),
        source="megatron/core/models/common/embeddings/rotary_pos_embedding.py RotaryEmbedding; rope_utils.py "
               "_apply_rotary_pos_emb_bshd",
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


def rule_sequence_parallel(env: Env, s: Sizes) -> Violation | None:
    """model_parallel_config.py __post_init__: sequence parallelism needs tp > 1."""
    if not s.sequence_parallel or s.tp is None or s.tp > 1:
        return None
    return Violation(
        "E109", "sequence parallelism needs tensor parallelism",
        f"sequence_parallel = true requires tp({s.tp}) > 1",
        "set sequence_parallel = false, or tensor >= 2",
        anchors=(_P + "sequence_parallel", _P + "tensor"),
        source="megatron/core/model_parallel_config.py __post_init__ (Cannot use sequence parallelism without tensor parallelism)",
    )


def rule_sequence_parallel_split(env: Env, s: Sizes) -> Violation | None:
    """tensor_parallel/mappings.py _split_along_first_dim: (seq / cp) % tp == 0 under sequence parallel."""
    if not s.sequence_parallel or None in (s.tp, s.cp) or s.tp <= 1 or not s.seq_length:
        return None
    local = s.seq_length // s.cp
    if local % s.tp == 0:
        return None
    return Violation(
        "E110", "the sequence cannot be split evenly over the tensor-parallel ranks",
        f"(seq_length({s.seq_length}) / cp({s.cp}) = {local}) % tp({s.tp}) = {local % s.tp} != 0",
        "use a sequence length that is a multiple of tensor x context (x 2)",
        anchors=(_P + "sequence_parallel", "stage.seq_length", "model.seq_length", _P + "tensor"),
        source="megatron/core/tensor_parallel/mappings.py _split_along_first_dim",
    )


def rule_global_batch(env: Env, s: Sizes) -> Violation | None:
    """num_microbatches_calculator.py ConstantNumMicroBatchesCalculator: gb % (mb * dp) == 0."""
    if None in (s.global_batch, s.micro_batch, s.dp):
        return None
    unit = s.micro_batch * s.dp
    if s.global_batch % unit == 0:
        return None
    lo, hi = s.global_batch // unit * unit, _round_up(s.global_batch, unit)
    return Violation(
        "E111", "the global batch is not a multiple of micro batch x data-parallel size",
        f"global_batch({s.global_batch}) % (micro_batch({s.micro_batch}) * dp({s.dp}) = {unit}) = {s.global_batch % unit} != 0",
        f"use global_batch = {hi}" + (f" or {lo}" if lo else ""),
        anchors=("stage.global_batch", _P + "micro_batch", _P + "data"),
        source="megatron/core/num_microbatches_calculator.py ConstantNumMicroBatchesCalculator",
    )


def rule_context_seq(env: Env, s: Sizes) -> Violation | None:
    """Megatron-LM arguments.py validate_args: seq_length % (2 * cp) == 0 when cp > 1 (load balancing)."""
    if s.cp is None or s.cp <= 1 or not s.seq_length or s.seq_length % (2 * s.cp) == 0:
        return None
    return Violation(
        "E112", "context parallelism needs the sequence length to be a multiple of 2 x cp",
        f"seq_length({s.seq_length}) % (2 * cp({s.cp})) = {s.seq_length % (2 * s.cp)} != 0",
        f"use seq_length = {_round_up(s.seq_length, 2 * s.cp)}",
        anchors=(_P + "context", "stage.seq_length", "model.seq_length"),
        source="megatron/training/arguments.py validate_args (seq-length multiple of 2 * context-parallel-size)",
    )


def rule_context_backend(env: Env, s: Sizes) -> Violation | None:
    """transformer/dot_product_attention.py: the local (unfused) attention asserts cp == 1; only
    Transformer Engine attention (flash/fused, GPU only) implements the ring exchange. Without TE
    (`kernels = local`) the runtime's attention cores are local ones, and its Megatron adapter refuses
    cp > 1."""
    if s.cp is None or s.cp <= 1:
        return None
    cpu = env.gpu_arch == "cpu"
    local = _local_why(env)
    if not cpu and not local and env.attention_backend not in ("unfused",):
        return None
    if cpu:
        why, hint = "the CPU has no Transformer Engine attention", "set context = 1"
    elif local:
        why, hint = local, "set context = 1" + (", or kernels = te where Transformer Engine is installed"
                                                 if env.kernels == "local" else "")
    else:
        why, hint = "attention_backend = unfused", ("set context = 1 (Transformer Engine has no fp32 attention with "
                                                    "context parallelism), or precision = bf16 with attention_backend "
                                                    "= auto" if env.precision == "fp32"
                                                    else "set attention_backend = auto, flash or fused")
    return Violation(
        "E113", "context parallelism needs Transformer Engine attention (flash or fused)",
        f"cp({s.cp}) > 1 but {why}", hint,
        anchors=(_P + "context", "kernels" if local else "attention_backend"),
        source="megatron/core/transformer/dot_product_attention.py DotProductAttention (context_parallel_size == 1)",
    )


def rule_dense_expert(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py __post_init__: expert parallelism needs num_moe_experts."""
    if env.model.is_moe or s.ep is None or s.ep <= 1:
        return None
    return Violation(
        "E114", "expert parallelism on a dense model",
        f"expert({s.ep}) > 1 but model.experts = 0",
        "set expert = 1",
        anchors=(_P + "expert", "model"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (num_moe_experts must be non None)",
    )


def rule_experts_ep(env: Env, s: Sizes) -> Violation | None:
    """transformer/moe/moe_layer.py: num_moe_experts % ep == 0."""
    e = env.model.experts
    if not env.model.is_moe or s.ep is None or e % s.ep == 0:
        return None
    return Violation(
        "E115", "the experts are not divisible by the expert-parallel size",
        f"experts({e}) % ep({s.ep}) = {e % s.ep} != 0",
        f"use expert = one of {_divisors_upto(e, 64)}",
        anchors=(_P + "expert", "model.experts", "model"),
        source="megatron/core/transformer/moe/moe_layer.py BaseMoELayer (num_moe_experts % ep_size)",
    )


def rule_expert_grid(env: Env, s: Sizes) -> Violation | None:
    """parallel_state.py: world % (etp * ep * pp) == 0 (the expert rank grid). With `expert_tensor`
    auto, silent when ETP = 1 or ETP = tp satisfies it (the search tries both). Megatron builds the
    expert grid for dense models too: there an auto ETP is tp (tp x pp divides the world, E101), a
    fixed `expert_tensor` must satisfy it."""
    dense = not env.model.is_moe
    if s.pp is None or (dense and s.etp is None) or (not dense and s.ep is None):
        return None
    ep = s.ep if s.ep is not None else 1
    world = env.cluster.world_size
    options = expert_tp_options(s)
    if any(world % (etp * ep * s.pp) == 0 for etp in options):
        return None
    etp = options[0]
    grid = etp * ep * s.pp
    label = f"etp({etp})" if s.etp is not None else f"etp({etp}, the smallest auto choice)"
    hint = ("choose expert / expert_tensor so that etp x ep x pp divides the GPU count" if not dense else
            "remove expert_tensor (or auto): a dense model has no experts, but Megatron still builds its expert "
            "rank grid with that size")
    return Violation(
        "E116", "the expert grid does not divide the number of GPUs",
        f"world size {world} % ({label} * ep({ep}) * pp({s.pp}) = {grid}) = {world % grid} != 0",
        hint,
        anchors=(_P + "expert_tensor", "model") if dense else (_P + "expert", _P + "expert_tensor", _P + "pipeline"),
        source="megatron/core/parallel_state.py initialize_model_parallel (expert_tensor_model_pipeline_parallel size)",
    )


def rule_top_k(env: Env, s: Sizes) -> Violation | None:
    """moe/router.py: topk selects top_k of num_moe_experts."""
    m = env.model
    if not m.is_moe or 1 <= m.top_k <= m.experts:
        return None
    return Violation(
        "E117", "the router's top_k must be between 1 and the number of experts",
        f"1 <= top_k({m.top_k}) <= experts({m.experts}) is false",
        f"set top_k <= {m.experts}",
        anchors=("model.top_k", "model"),
        source="megatron/core/transformer/moe/router.py TopKRouter (torch.topk over num_moe_experts)",
    )


def rule_moe_ffn_etp(env: Env, s: Sizes) -> Violation | None:
    """moe/experts.py: expert fc2 input divide(moe_ffn_hidden, etp). With `expert_tensor` auto, silent
    when ETP = 1 or ETP = tp divides it (ETP = 1 always does: the search then picks it)."""
    m = env.model
    f = m.moe_ffn_hidden or m.ffn_hidden
    if not m.is_moe or any(f % etp == 0 for etp in expert_tp_options(s)):
        return None
    etp = s.etp
    return Violation(
        "E118", "the expert MLP hidden size is not divisible by the expert tensor-parallel size",
        f"moe_ffn_hidden({f}) % etp({etp}) = {f % etp} != 0",
        "set expert_tensor = a divisor of the expert hidden size (1 is common), or auto",
        anchors=(_P + "expert_tensor", _P + "tensor", "model.moe_ffn_hidden", "model"),
        source="megatron/core/transformer/moe/experts.py (expert linear layers use divide(size, etp))",
    )


def rule_ep_fp16(env: Env, s: Sizes) -> Violation | None:
    """Megatron-LM arguments.py validate_args: expert parallelism is not supported with fp16."""
    if env.precision != "fp16" or s.ep is None or s.ep <= 1:
        return None
    return Violation(
        "E119", "expert parallelism is not supported with fp16",
        f"expert({s.ep}) > 1 with precision = fp16",
        "use precision = bf16",
        anchors=("precision", _P + "expert"),
        source="megatron/training/arguments.py validate_args (Expert parallelism is not supported with fp16 training)",
    )


def rule_moe_tp_needs_sp(env: Env, s: Sizes) -> Violation | None:
    """moe/moe_layer.py MoELayer.forward raises in training when tp > 1 without sequence parallelism."""
    if (not env.model.is_moe or env.stage_kind not in TRAINING_KINDS or s.sequence_parallel is not False
            or s.tp is None or s.tp <= 1):
        return None
    return Violation(
        "E123", "training an MoE model with tensor parallelism needs sequence parallelism",
        f"tp({s.tp}) > 1 with experts({env.model.experts}) and sequence_parallel = false",
        "set sequence_parallel = true (or leave it auto)",
        anchors=(_P + "sequence_parallel", _P + "tensor"),
        source="megatron/core/transformer/moe/moe_layer.py MoELayer.forward (MoE and tensor parallelism without "
               "sequence parallelism)",
    )


def rule_moe_bias_etp(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py __post_init__: bias in MoE only with expert_tensor_parallel_size == 1
    (an auto ETP can always be 1). The nemoc runtime refuses MoE biases altogether (E140)."""
    etp = s.etp
    if not env.model.is_moe or not env.model.add_bias_linear or etp is None or etp == 1:
        return None
    return Violation(
        "E120", "MoE experts with biases need expert tensor parallelism 1",
        f"add_bias_linear = true requires etp({etp}) == 1",
        "set expert_tensor = 1",
        anchors=(_P + "expert_tensor", _P + "tensor", "model.add_bias_linear", "model"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (Bias in Moe is only supported when ETP==1)",
    )


def rule_moe_bias_runtime(env: Env, s: Sizes) -> Violation | None:
    """The target builds MoE models without any linear bias unless it says otherwise
    (`Target.moe_linear_bias`; the nemoc runtime's Megatron adapter: expert MLPs with a bias hit an autograd view+inplace error in Megatron-Core
    0.16.1 mlp.py), so a MoE spec with `add_bias_linear = true` would train another model."""
    m = env.model
    if not m.is_moe or not m.add_bias_linear or env.target.moe_linear_bias:
        return None
    return Violation(
        "E140", f"the target `{env.target.name}` does not support linear biases in MoE models",
        f"add_bias_linear = true with experts({m.experts}) > 0",
        "set add_bias_linear = false (add_qkv_bias is supported)",
        anchors=("model.add_bias_linear", "model"),
        source=f"the target `{env.target.name}` (moe_linear_bias = false); megatron/core/transformer/mlp.py",
    )


def _local_why(env: Env) -> str | None:
    """Why a training stage runs without Transformer Engine (None when it runs with it)."""
    if env.stage_kernels != "local" or env.stage_kind not in TRAINING_KINDS:
        return None
    if env.kernels == "local":
        return "kernels = local (no Transformer Engine)"
    return f"{env.target.caps(env.stage_kind).runs}, with Megatron-Core's local spec"


def rule_fp8_needs_te(env: Env, s: Sizes) -> Violation | None:
    """fp8 / mxfp8 GEMMs are Transformer Engine's (TransformerConfig.fp8 needs TE's layers); with the
    local spec the runtime's Megatron adapter refuses the plan.
    A GPU that cannot run the precision at all is E121's."""
    local = _local_why(env)
    p = env.precision
    if p not in ("fp8", "mxfp8") or not local or env.gpu_arch == "cpu" or (
            env.gpu_precisions is not None and p not in env.gpu_precisions):
        return None
    return Violation(
        "E127", f"precision = {p} needs Transformer Engine",
        f"precision({p}) but {local}",
        "use precision = bf16" + (", or kernels = te where Transformer Engine is installed"
                                  if env.kernels == "local" else ""),
        anchors=("kernels", "precision") if env.kernels == "local" else ("precision",),
        source="megatron/core/transformer/transformer_config.py (fp8 needs Transformer Engine's layers)",
    )


def rule_te_needs_gpu(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine is CUDA-only; on the CPU (gloo) the runtime builds the local spec."""
    if env.gpu_arch != "cpu" or env.kernels != "te":
        return None
    return Violation(
        "E128", "Transformer Engine kernels need a GPU",
        f"kernels = te but cluster.gpu = {env.cluster.gpu}",
        "set kernels = local (or auto)",
        anchors=("kernels", "cluster.gpu", "cluster"),
        source="transformer_engine (CUDA only): the gloo/CPU runtime has no Transformer Engine",
    )


_PRECISION_NEEDS = {"fp8": "Hopper or newer", "mxfp8": "Blackwell", "fp4": "Blackwell"}


def rule_precision_hardware(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine: fp8 GEMMs need Hopper (sm_90) or newer; MXFP8 block scaling needs
    Blackwell (sm_100); the catalog lists the precisions each GPU runs (`HardwareSpec.supports`)."""
    p = env.precision
    if env.gpu_precisions is None or p in env.gpu_precisions:
        return None
    need = _PRECISION_NEEDS.get(p, "a GPU that supports it")
    return Violation(
        "E121", f"precision = {p} is not supported on {env.cluster.gpu}",
        f"{p} needs {need}; {env.cluster.gpu} ({env.gpu_arch}) supports {', '.join(env.gpu_precisions)}",
        "use precision = bf16" + (", or a Hopper/Blackwell GPU" if p == "fp8" else ", or a Blackwell GPU"),
        anchors=("precision", "cluster.gpu", "cluster"),
        source="transformer_engine/pytorch/fp8.py check_fp8_support (sm >= 8.9) / check_mxfp8_support (sm >= 10.0)",
    )


def rule_seq_length_positions(env: Env, s: Sizes) -> Violation | None:
    """Megatron-LM arguments.py validate_args: max_position_embeddings >= seq_length."""
    if not s.seq_length or s.seq_length <= env.model.seq_length:
        return None
    return Violation(
        "E122", "the stage's sequence length exceeds the model's position embeddings",
        f"seq_length({s.seq_length}) > model.seq_length({env.model.seq_length}) (max_position_embeddings)",
        f"set seq_length <= {env.model.seq_length}, or raise model.seq_length",
        anchors=("stage.seq_length", "model.seq_length", "model"),
        source="megatron/training/arguments.py validate_args (max_position_embeddings >= seq_length)",
    )


def rule_heads_query_groups(env: Env, s: Sizes) -> Violation | None:
    """attention.py get_query_key_value_tensors: num_query_heads_per_group = heads_per_partition //
    groups_per_partition, then a reshape that fails unless the groups divide the heads
    (Transformer Engine's DotProductAttention asserts the same); TransformerConfig checks only TP."""
    m = env.model
    h, g = m.heads, m.query_groups
    if 0 < g <= h and h % g == 0:
        return None
    eq = f"query_groups({g}) > heads({h})" if g > h else f"heads({h}) % query_groups({g}) = {h % g} != 0"
    ok = [d for d in range(1, h + 1) if h % d == 0]
    return Violation(
        "E134", "the query groups must divide the attention heads",
        eq, f"use query_groups = one of {', '.join(map(str, ok[-8:]))} (a divisor of heads; = heads for MHA, 1 for MQA)",
        anchors=("model.query_groups", "model.heads", "model"),
        source="megatron/core/transformer/attention.py get_query_key_value_tensors (reshape by heads per group); "
               "transformer_engine DotProductAttention (heads % gqa groups)",
    )


def rule_qkv_split(env: Env, s: Sizes) -> Violation | None:
    """tensor_parallel/layers.py ColumnParallelLinear: output_size_per_partition = divide(output_size,
    tp), with the fused QKV projection's output head_dim * (heads + 2 * query_groups). E102/E103 do not
    imply it when tp exceeds the query groups (MQA with an odd head dim)."""
    m = env.model
    if s.tp is None or s.tp == 1:
        return None
    out = m.head_dim * (m.heads + 2 * m.query_groups)
    if out % s.tp == 0:
        return None
    return Violation(
        "E139", "the fused QKV projection cannot be split over the tensor-parallel ranks",
        f"head_dim({m.head_dim}) * (heads({m.heads}) + 2 * query_groups({m.query_groups})) = {out}; "
        f"{out} % tp({s.tp}) = {out % s.tp} != 0",
        "use a tensor size that divides the QKV width, or a head dimension (kv_channels) that is a multiple of 8",
        anchors=(_P + "tensor", "model.kv_channels", "model.query_groups", "model"),
        source="megatron/core/tensor_parallel/layers.py ColumnParallelLinear (divide(output_size, world_size))",
    )


def rule_sgd_distributed_optimizer(env: Env, s: Sizes) -> Violation | None:
    """optimizer/distrib_optimizer.py DistributedOptimizer.__init__ asserts the wrapped optimizer is
    Adam (or HybridDeviceOptimizer), "due to checkpointing requirements"; optimizer/__init__.py wraps
    the SGD it builds whenever use_distributed_optimizer is set."""
    if (env.optimizer != "sgd" or not s.distributed_optimizer or env.stage_kind not in TRAINING_KINDS):
        return None
    return Violation(
        "E129", "the distributed optimizer supports Adam only",
        "optimizer = sgd with distributed_optimizer = true",
        "set distributed_optimizer = false (or auto), or use optimizer = adam(...)",
        anchors=(_P + "distributed_optimizer", "stage.optimizer", "stage"),
        source="megatron/core/optimizer/distrib_optimizer.py DistributedOptimizer.__init__ "
               "(Only Adam and HybridDeviceOptimizer currently supported)",
    )


def uses_te(env: Env) -> bool:
    """The stage runs Transformer Engine's layers (its attention included): kernels te on a GPU."""
    return env.stage_kernels == "te" and env.gpu_arch != "cpu"


_FLASH_CLASS = ("auto", "flash", "fused")  # TE's flash-attn / cuDNN fused attention (auto: TE picks)


def rule_fp32_attention(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine dot_product_attention/utils.py get_attention_backend: a qkv dtype other than
    bf16 / fp16 disables both flash and fused attention; `flash` / `fused` then leave no backend
    (DotProductAttention.forward raises "No dot product attention backend is available"); `auto`
    falls back to TE's unfused core, which the plan then prices (W111), but which has no context
    parallelism: an error only with cp > 1."""
    if env.precision != "fp32" or not uses_te(env) or env.attention_backend not in _FLASH_CLASS:
        return None
    cp = s.cp if s.cp is not None else 1
    if env.attention_backend == "auto" and cp <= 1:
        return None
    auto = env.attention_backend == "auto"
    eq = (f"precision(fp32) with attention_backend({env.attention_backend}) and kernels te: TE's flash and "
          "cuDNN fused attention take bf16 / fp16 only")
    if cp > 1:
        eq += f"; cp({cp}) > 1 rules out TE's unfused core too"
    if auto:  # cp > 1 here: TE's unfused fallback would run fp32 with cp = 1 (priced so, W111)
        hint = "set context = 1 (TE then runs its unfused core in fp32), or precision = bf16"
    else:
        hint = "set precision = bf16" + ("" if cp > 1 else ", or attention_backend = unfused")
    return Violation(
        "E135", "Transformer Engine has no fp32 flash or fused attention",
        eq, hint,
        anchors=("attention_backend", "precision", _P + "context") if not auto
        else ("precision", _P + "context", "attention_backend"),
        source="transformer_engine/pytorch/attention/dot_product_attention/utils.py get_attention_backend "
               "(qkv_dtype not in [bf16, fp16])",
    )


def rule_attention_head_dim(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine get_attention_backend: flash-attn needs head_dim <= 256 and head_dim % 8 == 0;
    cuDNN fused attention needs head_dim % 8 == 0 too. Explicit `flash` / `fused` then have no backend;
    `auto` falls back to TE's unfused core, which the plan then prices (W111), but which has no
    context parallelism: an error only with cp > 1."""
    b = env.attention_backend
    if not uses_te(env) or b not in _FLASH_CLASS:
        return None
    d = env.model.head_dim
    cp = s.cp if s.cp is not None else 1
    if b == "auto":
        # cp > 1 where TE falls back to its unfused core (`te_auto_unfused`), which has no context
        # parallelism. fp32 is E135's (one error for one cause).
        if cp <= 1 or env.precision == "fp32" or te_auto_unfused(env) is None:
            return None
        if d % 8:
            eq = (f"head_dim({d}) % 8 = {d % 8} != 0 with attention_backend(auto), kernels te and cp({cp}) > 1: "
                  "TE falls back to its unfused core, which has no context parallelism")
            hint = "set context = 1, or a head dimension (kv_channels, or hidden / heads) that is a multiple of 8"
        else:
            eq = (f"head_dim({d}) > 256 with attention_backend(auto), kernels te and cp({cp}) > 1: flash-attn cannot "
                  "take it and TE's unfused fallback has no context parallelism")
            hint = f"set context = 1, or attention_backend = fused if your cuDNN supports head_dim({d})"
        return Violation(
            "E136", "Transformer Engine's flash / fused attention does not support this head dimension",
            eq, hint, anchors=(_P + "context", "attention_backend", "model.kv_channels", "model"),
            source="transformer_engine/pytorch/attention/dot_product_attention/utils.py get_attention_backend "
                   "(head_dim_qk > 256 or head_dim_qk % 8 != 0)",
        )
    if d % 8:
        eq = f"head_dim({d}) % 8 = {d % 8} != 0 with attention_backend({b}) and kernels te"
    elif d > 256 and b == "flash":
        eq = f"head_dim({d}) > 256 with attention_backend(flash) and kernels te"
    else:
        return None
    return Violation(
        "E136", "Transformer Engine's flash / fused attention does not support this head dimension",
        eq, "set attention_backend = unfused, or a head dimension (kv_channels, or hidden / heads) that is a "
        "multiple of 8" + (" and at most 256" if b == "flash" else ""),
        anchors=("attention_backend", "model.kv_channels", "model.heads", "model.hidden", "model"),
        source="transformer_engine/pytorch/attention/dot_product_attention/utils.py get_attention_backend "
               "(head_dim_qk > 256 or head_dim_qk % 8 != 0)",
    )


def te_auto_unfused(env: Env) -> str | None:
    """Why Transformer Engine may run `attention_backend = auto` on its unfused core (None when it
    will not): its flash and fused attention take bf16 / fp16 only and head_dim % 8 == 0; flash-attn
    takes head_dim <= 256 only, and cuDNN fused attention's limit depends on the cuDNN version (256
    for training in cuDNN 9 on Hopper). The plan then costs the unfused core (the s x s scores in
    memory), the safe side of TE's choice (`search.Problem.costed_backend`); with cp > 1 it is an
    error (E135 / E136: the unfused core has no context parallelism)."""
    d = env.model.head_dim
    if env.attention_backend != "auto" or not uses_te(env):
        return None
    if env.precision == "fp32":
        return "precision(fp32): TE's flash and cuDNN fused attention take bf16 / fp16 only"
    if d % 8:
        return f"head_dim({d}) % 8 = {d % 8} != 0: flash-attn and cuDNN fused attention need a multiple of 8"
    if d > 256:
        return f"head_dim({d}) > 256: flash-attn takes at most 256, cuDNN fused attention may not take it either"
    return None


def warn_auto_attention_unfused(env: Env, s: Sizes) -> Violation | None:
    """See `te_auto_unfused`."""
    why = te_auto_unfused(env)
    if why is None or (s.cp is not None and s.cp > 1):  # with cp > 1 it is an error (E135 / E136)
        return None
    if why.startswith("precision"):
        verb, hint, anchors = "runs", "set precision = bf16 to keep flash-class attention", ("precision",)
    elif "% 8" in why:
        verb, hint = "runs", "a head dimension (kv_channels, or hidden / heads) that is a multiple of 8 keeps it flash-class"
        anchors = ("model.kv_channels", "model.heads", "model")
    else:
        verb, hint = "may run", "set attention_backend = fused if your cuDNN supports this head dimension, to plan it flash-class"
        anchors = ("attention_backend", "model.kv_channels", "model")
    return Violation(
        "W111", f"attention_backend = auto {verb} Transformer Engine's unfused attention here",
        f"{why}; planned with the unfused core (s x s scores kept)", hint, anchors=anchors, severity=Severity.NOTE,
        source="transformer_engine/pytorch/attention/dot_product_attention/utils.py get_attention_backend "
               "(qkv dtype, head_dim_qk > 256 or head_dim_qk % 8 != 0)",
    )


_FP8 = ("fp8", "mxfp8")


def _fp8_gemm_dims(env: Env, s: Sizes) -> list[str]:
    """The per-rank GEMM dimensions Transformer Engine's fp8 check rejects, as equations
    (transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec: the input's and the weight's last
    dimension % 16 == 0, their other dimensions' product % 8 == 0)."""
    m = env.model
    bad: list[str] = []
    if m.hidden % 16:
        bad.append(f"hidden({m.hidden}) % 16 = {m.hidden % 16} != 0")
    tp = s.tp
    if tp is not None:
        attn = m.heads * m.head_dim
        if attn % tp == 0 and (attn // tp) % 16:
            bad.append(f"(heads({m.heads}) * head_dim({m.head_dim}) / tp({tp}) = {attn // tp}) % 16 = {attn // tp % 16} != 0")
        qkv = m.head_dim * (m.heads + 2 * m.query_groups)
        if qkv % tp == 0 and (qkv // tp) % 8:
            bad.append(f"(head_dim({m.head_dim}) * (heads({m.heads}) + 2 * query_groups({m.query_groups})) / tp({tp}) "
                       f"= {qkv // tp}) % 8 = {qkv // tp % 8} != 0")
        f, name = (m.shared_expert_ffn_hidden, "shared_expert_ffn_hidden") if m.is_moe else (m.ffn_hidden, "ffn_hidden")
        if f and f % tp == 0 and (f // tp) % 16:
            bad.append(f"({name}({f}) / tp({tp}) = {f // tp}) % 16 = {f // tp % 16} != 0")
    if m.is_moe:
        f = m.moe_ffn_hidden or m.ffn_hidden
        options = [e for e in expert_tp_options(s) if f % e == 0]
        if options and all((f // e) % 16 for e in options):
            e = options[0]
            bad.append(f"(moe_ffn_hidden({f}) / etp({e}) = {f // e}) % 16 = {f // e % 16} != 0")
    return bad


def rule_fp8_dims(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine fp8 / mxfp8 GEMMs (TransformerConfig.fp8 = "hybrid"): Linear and
    LayerNormLinear call assert_dim_for_fp8_exec(input, weight) per tensor-parallel rank: hidden, the
    attention projection's input heads x head_dim / tp, fc2's input ffn_hidden / tp (experts:
    moe_ffn_hidden / etp) % 16, the QKV weight rows / tp % 8."""
    if env.precision not in _FP8 or not uses_te(env):
        return None
    bad = _fp8_gemm_dims(env, s)
    if not bad:
        return None
    return Violation(
        "E137", f"{env.precision} GEMMs need every per-rank matrix dimension to be a multiple of 16 (rows: 8)",
        "; ".join(bad),
        "use sizes whose per-tensor-parallel-rank shares are multiples of 16 (a smaller tensor size often works), "
        "or precision = bf16",
        anchors=(_P + "tensor", _P + "expert_tensor", "model.ffn_hidden", "model.moe_ffn_hidden", "model.hidden",
                 "precision", "model"),
        source="transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec (module/linear.py, layernorm_linear.py)",
    )


def rule_fp8_tokens(env: Env, s: Sizes) -> Violation | None:
    """assert_dim_for_fp8_exec on a GEMM's input [s, b, h]: s x b % 8 == 0, with s the rank's local
    sequence: seq / cp, and / tp under sequence parallelism (TE checks the shard before the all-gather).
    Depends on the micro batch: the search checks it per micro batch."""
    if (env.precision not in _FP8 or not uses_te(env) or not s.seq_length
            or None in (s.micro_batch, s.cp, s.tp, s.sequence_parallel)):
        return None
    local = s.seq_length // s.cp
    sp = s.sequence_parallel and s.tp > 1
    if sp:
        if local % s.tp:
            return None  # E110 reports it
        local //= s.tp
    tokens = s.micro_batch * local
    if tokens % 8 == 0:
        return None
    split = f" / tp({s.tp}) (sequence parallel)" if sp else ""
    return Violation(
        "E138", f"{env.precision} GEMMs need the tokens per GEMM to be a multiple of 8",
        f"micro_batch({s.micro_batch}) * seq_length({s.seq_length}) / cp({s.cp}){split} = {tokens}; "
        f"{tokens} % 8 = {tokens % 8} != 0",
        "use a sequence length (or micro batch) that makes the tokens per rank a multiple of 8, or precision = bf16",
        anchors=(_P + "micro_batch", "stage.seq_length", "model.seq_length", _P + "sequence_parallel", "precision"),
        source="transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec (prod(shape[:-1]) % 8)",
    )


# ---- warnings: settings Megatron accepts but silently rewrites or that cost performance


def warn_tp_crosses_node(env: Env, s: Sizes) -> Violation | None:
    """Topology: TP all-reduces every layer; across nodes they leave NVLink for the network."""
    g = env.cluster.gpus_per_node
    if s.tp is None or s.tp == 1 or (s.tp <= g and g % s.tp == 0):
        return None
    eq = (f"tp({s.tp}) > gpus_per_node({g})" if s.tp > g else f"gpus_per_node({g}) % tp({s.tp}) = {g % s.tp} != 0")
    return Violation(
        "W101", "tensor-parallel groups cross the node boundary (TP collectives go over the network)",
        eq, f"keep tensor <= {g} and a divisor of {g}",
        anchors=(_P + "tensor", "cluster.gpus_per_node"), severity=Severity.WARNING,
        source="megatron/core/parallel_state.py RankGenerator (tp is the fastest-varying rank dimension)",
    )


def warn_padded_vocab(env: Env, s: Sizes) -> Violation | None:
    """Megatron-LM tokenizer.py _vocab_size_with_padding: vocab rounded up to 128 x tp."""
    if s.tp is None:
        return None
    v = env.model.vocab
    padded = padded_vocab(v, s.tp)
    if padded == v:
        return None
    return Violation(
        "W102", f"Megatron pads the vocabulary from {v} to {padded} rows",
        f"padded_vocab = ceil(vocab({v}) / (128 * tp({s.tp}))) * {VOCAB_DIVISOR * s.tp} = {padded} (+{padded - v} rows)",
        None,
        anchors=("model.vocab", "model"), severity=Severity.WARNING,
        source="megatron/training/tokenizer/tokenizer.py _vocab_size_with_padding (make_vocab_size_divisible_by=128)",
    )


def warn_ep_without_sp(env: Env, s: Sizes) -> Violation | None:
    """model_parallel_config.py __post_init__ warns: EP with TP needs sequence parallelism (training
    MoE stages are E123 errors; this warning is for the forward-only stages)."""
    if (s.sequence_parallel is not False or None in (s.ep, s.tp) or s.ep <= 1 or s.tp <= 1
            or env.stage_kind in TRAINING_KINDS):
        return None
    return Violation(
        "W103", "expert parallelism with tensor parallelism should use sequence parallelism",
        f"ep({s.ep}) > 1 and tp({s.tp}) > 1 with sequence_parallel = false",
        "set sequence_parallel = true",
        anchors=(_P + "sequence_parallel", _P + "expert"), severity=Severity.WARNING,
        source="megatron/core/model_parallel_config.py __post_init__ (sequence parallelism must be used)",
    )


def warn_useless_distributed_optimizer(env: Env, s: Sizes) -> Violation | None:
    """optimizer/distrib_optimizer.py shards over the data-parallel (with CP) group; of size 1 it
    shards nothing."""
    if not s.distributed_optimizer or None in (s.dp, s.cp) or s.dp * s.cp > 1:
        return None
    return Violation(
        "W104", "the distributed optimizer has nothing to shard over",
        f"dp({s.dp}) * cp({s.cp}) = 1: optimizer states are not sharded",
        None, anchors=(_P + "distributed_optimizer", _P + "data"), severity=Severity.NOTE,
        source="megatron/core/optimizer/distrib_optimizer.py (shards over the data-parallel-with-CP group)",
    )


def warn_fp16_loss_scaling(env: Env, s: Sizes) -> Violation | None:
    """Megatron uses dynamic loss scaling with fp16 and then stops checking for NaN in loss/grads."""
    if env.precision != "fp16":
        return None
    return Violation(
        "W105", "fp16 trains with dynamic loss scaling",
        "precision = fp16 -> loss_scale = dynamic (initial 2**16, halved on overflow after hysteresis 2, doubled after 1000 clean steps, min 1)",
        "prefer bf16 on Ampere or newer",
        anchors=("precision",), severity=Severity.WARNING,
        source="megatron/core/optimizer/grad_scaler.py DynamicGradScaler; the runtime's optimizer_config "
               "(initial_loss_scale=2**16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)",
    )


def warn_moe_ffn_default(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py __post_init__ warns and uses ffn_hidden_size when moe_ffn_hidden_size is unset."""
    m = env.model
    if not m.is_moe or m.moe_ffn_hidden is not None:
        return None
    return Violation(
        "W106", "moe_ffn_hidden is not set: Megatron uses ffn_hidden for every expert",
        f"moe_ffn_hidden = ffn_hidden({m.ffn_hidden})",
        None, anchors=("model.moe_ffn_hidden", "model"), severity=Severity.WARNING,
        source="megatron/core/transformer/transformer_config.py __post_init__ (moe_ffn_hidden_size is not set)",
    )


def warn_top1_router(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py __post_init__ raises for top-1 softmax routing unless pre-softmax is on."""
    m = env.model
    if not m.is_moe or m.top_k != 1:
        return None
    return Violation(
        "W107", "top-1 routing: nemoc enables moe_router_pre_softmax (Megatron raises without it)",
        "top_k(1) with softmax scores -> moe_router_pre_softmax = true",
        None, anchors=("model.top_k", "model"), severity=Severity.NOTE,
        source="megatron/core/transformer/transformer_config.py __post_init__ (Please use --moe-router-pre-softmax when topk is 1)",
    )


def warn_uneven_pipeline(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py "Uneven PP": nemoc sets num_layers_in_first/last_pipeline_stage."""
    if s.pp is None:
        return None
    vp = s.vp if (s.vp or 1) > 1 else None
    split = pipeline_split(env.model.layers, s.pp, vp)
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


def warn_selective_recompute_flash(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py __post_init__ warns that with Transformer Engine's fused / flash core
    attention there is "no need to set 'core_attn' to recompute": it keeps no s x s scores, so
    selective recompute (Megatron's recompute_modules = ["core_attn"]) frees almost nothing and adds an
    attention forward to every backward (the cost model charges it; memory.py gives the same scores
    term whichever recompute is set)."""
    if s.recompute != "selective" or not uses_te(env) or env.attention_backend not in _FLASH_CLASS:
        return None
    if te_auto_unfused(env):  # `auto` that TE runs (and the plan prices) on its unfused core keeps the scores
        return None
    return Violation(
        "W110", "selective recompute with flash-class attention recomputes almost nothing",
        f"recompute = selective with attention_backend({env.attention_backend}) and kernels te: the core attention "
        "keeps no s x s scores; the plan charges one more attention forward per layer and saves ~0 bytes",
        "set recompute = none (or auto), or full to save memory",
        anchors=(_P + "recompute", "attention_backend"), severity=Severity.WARNING,
        source="megatron/core/transformer/transformer_config.py __post_init__ (no need to set 'core_attn' to recompute)",
    )


# Ordered: cheapest and most decisive first (layout_violations stops at the first error).
ERROR_RULES: tuple[Rule, ...] = (
    rule_world_size, rule_heads_tp, rule_query_groups_tp, rule_heads_query_groups, rule_ffn_tp, rule_qkv_split,
    rule_head_dim, rule_rope_head_dim, rule_layers_pipeline,
    rule_runtime_pipeline, rule_runtime_moe, rule_interleave_needs_pp, rule_sequence_parallel, rule_global_batch,
    rule_interleave_microbatches,
    rule_context_seq, rule_context_backend, rule_sequence_parallel_split, rule_dense_expert,
    rule_experts_ep, rule_expert_grid, rule_top_k, rule_moe_ffn_etp, rule_ep_fp16, rule_moe_bias_etp,
    rule_moe_bias_runtime, rule_moe_tp_needs_sp, rule_sgd_distributed_optimizer,
    rule_precision_hardware, rule_fp8_needs_te, rule_te_needs_gpu, rule_fp32_attention, rule_attention_head_dim,
    rule_fp8_dims, rule_fp8_tokens, rule_seq_length_positions,
)
WARNING_RULES: tuple[Rule, ...] = (
    warn_tp_crosses_node, warn_padded_vocab, warn_ep_without_sp, warn_useless_distributed_optimizer,
    warn_fp16_loss_scaling, warn_moe_ffn_default, warn_top1_router, warn_uneven_pipeline, warn_vp_one,
    warn_selective_recompute_flash, warn_auto_attention_unfused,
)
RULES: tuple[Rule, ...] = ERROR_RULES + WARNING_RULES


def violations(env: Env, sizes: Sizes, rules: Iterable[Rule] = RULES) -> Iterator[Violation]:
    for rule in rules:
        v = rule(env, sizes)
        if v is not None:
            yield v


def _tp_hint(env: Env) -> str:
    """Tensor-parallel sizes within one node that pass E102, E103 and E104 together."""
    m = env.model
    f = m.shared_expert_ffn_hidden if m.is_moe else m.ffn_hidden
    ok = [t for t in range(1, env.cluster.gpus_per_node + 1)
          if m.heads % t == 0 and (m.query_groups % t == 0 or t % m.query_groups == 0) and (not f or f % t == 0)]
    return f"use tensor = one of {', '.join(map(str, ok))} (they divide heads, query groups and the MLP, within a node)"


def _divisors_upto(n: int, limit: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, limit) + 1) if n % d == 0)


# ------------------------------------------------------------------------------ public entry points


def gpu_facts(gpu_name: str) -> tuple[str | None, tuple[str, ...] | None]:
    """(generation, supported training precisions) of a catalog GPU; (None, None) if unknown
    (the schema check reports an unknown GPU; the rules then skip hardware checks)."""
    hw = get_gpu(gpu_name)
    if hw is None:
        return None, None
    return hw.generation, tuple(p for p in ("bf16", "fp16", "fp32", "fp8", "mxfp8") if hw.supports(p))


def sizes_of(parallel: ParallelSpec, *, global_batch: int | None, seq_length: int) -> Sizes:
    """The rules' view of what the user fixed (None = auto)."""
    vp = parallel.virtual_pipeline
    return Sizes(
        tp=parallel.tensor, pp=parallel.pipeline, vp=vp, cp=parallel.context, ep=parallel.expert,
        etp=parallel.expert_tensor, dp=parallel.data, micro_batch=parallel.micro_batch,
        global_batch=global_batch, sequence_parallel=parallel.sequence_parallel,
        distributed_optimizer=parallel.distributed_optimizer, recompute=parallel.recompute,
        seq_length=seq_length,
    )


_PARALLEL_FIELDS = (
    "tensor", "pipeline", "virtual_pipeline", "context", "expert", "expert_tensor", "data",
    "sequence_parallel", "distributed_optimizer", "recompute", "micro_batch",
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


def stage_seq_length(spec: ExperimentSpec, stage: StageSpec) -> int:
    return stage.seq_length or spec.model.seq_length


def env_of(spec: ExperimentSpec, stage_kind: str = "pretrain", attention_backend: str | None = None,
           optimizer: str = "adam", target: Target = MEGATRON_CORE) -> Env:
    arch, precisions = gpu_facts(spec.cluster.gpu)
    return Env(
        model=spec.model, cluster=spec.cluster, precision=spec.precision,
        attention_backend=attention_backend or spec.attention_backend,
        gpu_arch=arch, gpu_precisions=precisions, stage_kind=stage_kind,
        kernels=resolve_kernels(spec.kernels, spec.cluster.gpu), optimizer=optimizer, target=target,
    )


def to_diagnostic(v: Violation, spec: ExperimentSpec, stage: StageSpec | None = None) -> Diagnostic:
    """Anchor a violation at the most specific span the user wrote (stage-level first)."""
    paths: list[str] = []
    for a in v.anchors:
        if stage is not None and a.startswith("stage."):
            paths.append(f"stage.{stage.name}.{a[len('stage.'):]}")
        elif stage is not None and a.startswith(_P):
            paths += [f"stage.{stage.name}.{a}", a]
        else:
            paths.append(a)
    fallback = ([f"stage.{stage.name}.parallel", f"stage.{stage.name}"] if stage else []) + ["parallel", "model"]
    where = f" (stage `{stage.name}`)" if stage is not None else ""
    return Diagnostic(
        code=v.code, message=v.message + where, span=spec.span(*paths, *fallback), severity=v.severity,
        equation=v.equation, hint=v.hint,
    )


def check_spec(spec: ExperimentSpec, target: Target = MEGATRON_CORE) -> tuple[Diagnostic, ...]:
    """Validate what the user fixed (no search): every rule over every training stage's sizes (for
    eval / export stages, the rules that do not depend on the parallel sizes).

    Auto sizes are skipped by each rule; a violation that several stages share (because they run
    with the same experiment-level block) is reported once, at the experiment-level span.
    """
    out: list[Diagnostic] = []
    seen: set[tuple[str, str]] = set()
    stages = list(spec.stages) or [None]
    for stage in stages:
        parallel = spec.parallel if stage is None else stage_parallel(spec, stage)
        seq = spec.model.seq_length if stage is None else stage_seq_length(spec, stage)
        gb = None if stage is None else stage.global_batch
        env = env_of(spec, stage.kind if stage else "pretrain", optimizer=stage.optimizer.name if stage else "adam",
                     target=target)
        own = stage is not None and stage.parallel is not None
        sizes = sizes_of(parallel, global_batch=gb, seq_length=seq)
        if stage is not None and stage.kind not in TRAINING_KINDS:
            # eval / export run with their own layout (the planner picks it): only the rules on the
            # model, the precision and the sequence length apply here.
            # A pipeline the stage's own block writes is checked against what the runtime runs.
            own_pp = own and f"stage.{stage.name}.parallel.pipeline" in spec.spans
            own_vp = own and f"stage.{stage.name}.parallel.virtual_pipeline" in spec.spans
            sizes = Sizes(tp=None, pp=parallel.pipeline if own_pp else None,
                          vp=parallel.virtual_pipeline if own_vp else None, cp=None, ep=None,
                          distributed_optimizer=None, seq_length=seq)
        for v in violations(env, sizes):
            key = (v.code, v.equation)
            if key in seen:
                continue
            seen.add(key)
            uses_stage = own or any(a.startswith("stage.") for a in v.anchors)
            out.append(to_diagnostic(v, spec, stage if uses_stage else None))
    return tuple(out) + stage_diagnostics(spec)


# ------------------------------------------------------------------------------------ stage rules
# Each rule: (spec, stage) -> Diagnostic | None, for the settings of one stage and its parents.

_RECORDS = {"chat": '{"messages": [{"role", "content"}, ...]}', "prompt_response": '{"prompt", "response"}',
            "preference": '{"prompt", "chosen", "rejected"}'}


def _stage_diagnostic(v: Violation, spec: ExperimentSpec, stage: StageSpec, notes=()) -> Diagnostic:
    d = to_diagnostic(v, spec, stage)
    return replace(d, notes=tuple(notes)) if notes else d


def rule_min_lr(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """megatron/core/optimizer_param_scheduler.py OptimizerParamScheduler.__init__: `assert max_lr >= min_lr`."""
    lr, min_lr = stage.optimizer.lr, stage.schedule.min_lr
    if stage.kind not in TRAINING_KINDS or min_lr <= lr:
        return None
    return _stage_diagnostic(Violation(
        "E150", "the schedule's `min_lr` is above the optimizer's peak `lr`",
        f"min_lr({min_lr:g}) > lr({lr:g})",
        f"the schedule decays from lr to min_lr: use min_lr <= {lr:g} (often lr / 10 = {lr / 10:g})",
        anchors=("stage.schedule.min_lr", "stage.optimizer.lr", "stage.schedule"),
        source="megatron/core/optimizer_param_scheduler.py (assert self.max_lr >= self.min_lr)"), spec, stage)


def rule_data_format(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """An alignment stage reads only data sets of its record formats (the runtime's data loader)."""
    wanted = STAGE_DATA_FORMATS.get(stage.kind)
    formats = {d.name: d.format for d in spec.data}
    given = [(name, formats.get(name, "text")) for name in stage.data]
    if wanted is None or not given or any(fmt in wanted for _, fmt in given):
        return None  # (a stage that names no data at all is not this rule's: nothing was misdeclared)
    shown = ", ".join(f"{name} ({fmt})" for name, fmt in given)
    example = f"`format = {wanted[0]}` ({_RECORDS[wanted[0]]} records)"
    return _stage_diagnostic(Violation(
        "E151", f"a `{stage.kind}` stage needs data in format {' | '.join(wanted)}",
        f"data = [{shown}]; {stage.kind} reads {' | '.join(wanted)}",
        f"declare `data {given[0][0]}` with {example}, or give the stage such a data set",
        anchors=("stage.data", "stage")), spec, stage)


def rule_export_after(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """An export writes the checkpoint of the stage it follows (the runtime's parent checkpoint lookup)."""
    if stage.kind != "export" or stage.after:
        return None
    trained = [s.name for s in spec.stages if s.kind in TRAINING_KINDS]
    return _stage_diagnostic(Violation(
        "E152", f"export stage `{stage.name}` has no `after`: there is no checkpoint to export",
        "after = []", f"write `stage {stage.name} after {trained[-1] if trained else 'NAME'} {{ ... }}`",
        anchors=("stage",)), spec, stage)


def rule_parent_saves(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """The runtime's parent checkpoint lookup: the first parent with a checkpoint (ppo: every parent:
    the reward model and the policy)."""
    if stage.kind not in PARENT_CHECKPOINT_KINDS or not stage.after:
        return None
    names = {s.name for s in spec.stages}
    parents = [spec.stage(n) for n in stage.after if n in names]
    silent = [p for p in parents if p.params.get("save_checkpoints", True) is False]
    if not silent or (stage.kind != "ppo" and len(silent) < len(parents)):
        return None
    parent = silent[0]
    notes = [Note(f"`{parent.name}` saves no checkpoints here", spec.span(f"stage.{parent.name}.save_checkpoints"))]
    return _stage_diagnostic(Violation(
        "E153", f"stage `{stage.name}` starts from the checkpoint of `{parent.name}`, which saves none",
        f"{parent.name}.save_checkpoints = false",
        f"remove `save_checkpoints = false` from `{parent.name}` (it is meant for benchmark runs)",
        anchors=("stage",)), spec, stage, notes)


def warn_warmup_longer_than_stage(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """Megatron's scheduler clamps: a warm-up longer than the stage never reaches the peak `lr`."""
    warmup, steps = stage.schedule.warmup, _stage_steps(spec, stage)
    if stage.kind not in TRAINING_KINDS or steps is None or warmup <= steps:
        return None
    return _stage_diagnostic(Violation(
        "W150", "the warm-up is longer than the stage: the learning rate never reaches its peak",
        f"warmup({warmup:,}) > steps({steps:,})" + ("" if stage.steps else
                                                     f" = tokens({stage.tokens:,}) / (global_batch x seq_length)"),
        f"use a warm-up shorter than the stage, e.g. warmup = {max(1, steps // 10):,} (10%)",
        anchors=("stage.schedule.warmup", "stage.schedule", "stage"), severity=Severity.WARNING), spec, stage)


def _stage_steps(spec: ExperimentSpec, stage: StageSpec) -> int | None:
    """The stage's optimizer steps when known without the data: `steps`, or `tokens` with a batch."""
    if stage.steps is not None:
        return stage.steps
    if stage.tokens is not None and stage.global_batch:
        return max(1, stage.tokens // (stage.global_batch * stage_seq_length(spec, stage)))
    return None


STAGE_RULES = (rule_min_lr, rule_data_format, rule_export_after, rule_parent_saves, warn_warmup_longer_than_stage)


def stage_diagnostics(spec: ExperimentSpec) -> tuple[Diagnostic, ...]:
    """Every stage rule over every stage."""
    return tuple(d for stage in spec.stages for rule in STAGE_RULES if (d := rule(spec, stage)) is not None)


def layout_violations(env: Env, sizes: Sizes) -> Violation | None:
    """The first error rule a complete layout breaks, or None (the search's fast path)."""
    for rule in ERROR_RULES:
        v = rule(env, sizes)
        if v is not None:
            return v
    return None
