"""Parallel-size rules: world size, heads / query groups / FFN over TP, head dimensions, sequence and
context parallelism, the global batch, the distributed optimizer.
"""

from __future__ import annotations

import math

from nemoc.compiler.flops import MEGATRON_VOCAB_DIVISOR as VOCAB_DIVISOR
from nemoc.compiler.flops import chunk_layers, padded_vocab
from nemoc.compiler.spec import ClusterSpec
from nemoc.dsl.diagnostics import Severity
from nemoc.compiler.rules.base import Env, Sizes, TRAINING_KINDS, Violation, _P, _round_up, _tp_hint


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
    if m.kv_channels is not None or m.hidden % m.heads == 0 or m.multi_latent_attention:
        return None
    return Violation(
        "E125", "the hidden size is not divisible by the attention heads (and kv_channels is not set)",
        f"hidden({m.hidden}) % heads({m.heads}) = {m.hidden % m.heads} != 0",
        "set kv_channels (the head dimension), or a hidden size that is a multiple of heads",
        anchors=("model.hidden", "model.heads", "model"),
        source="megatron/training/arguments.py validate_args (hidden_size % num_attention_heads when kv_channels is None)",
    )


def rule_rope_head_dim(env: Env, s: Sizes) -> Violation | None:
    """Rotary embeddings rotate pairs of channels: RotaryEmbedding builds 2 * ceil(head_dim / 2)
    frequencies (inv_freq over arange(0, dim, 2)), and applying them to a head with an odd dimension
    fails in the first forward pass (rope_utils.py _apply_rotary_pos_emb_bshd: t * cos with
    t[..., :rot_dim] of head_dim channels against rot_dim = head_dim + 1)."""
    m = env.model
    if m.position != "rope" or m.head_dim % 2 == 0 or m.multi_latent_attention:  # MLA's rotary channels: E169
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
    """The stage's attention core must split a sequence over the context-parallel ranks. Which cores do
    is the target's data (`Target.attention_core`, per kernels and attention backend): Transformer
    Engine's flash / fused attention does (ring attention); Megatron-Core's local DotProductAttention
    and TE's unfused core assert context_parallel_size == 1; the nemoc runtime's SDPA core (the local
    spec's `auto` / `flash` / `fused`, so the CPU's) does, except for sliding-window layers. A stage kind
    the target never runs context-parallel is E126's."""
    if s.cp is None or s.cp <= 1 or not env.target.caps(env.stage_kind).context_parallel:
        return None
    kernels = "local" if env.gpu_arch == "cpu" else env.kernels  # no Transformer Engine on the CPU
    core = env.target.attention_core(env.stage_kind, kernels, env.attention_backend)
    window = env.model.sliding_window > 0
    if core.context_parallel and (not window or core.sliding_window_context_parallel):
        return None
    built = f"{core.name} (kernels {env.target.stage_kernels(env.stage_kind, kernels)}, attention_backend " \
            f"{env.attention_backend})"
    if core.context_parallel:  # splits causal attention, not this model's sliding windows
        return Violation(
            "E113", "the stage's attention core cannot split sliding-window attention over context-parallel ranks",
            f"cp({s.cp}) > 1 but {env.model.name} has sliding-window layers ({env.model.sliding_window} tokens) "
            f"and {built} splits only full causal attention", "set context = 1",
            anchors=(_P + "context", "model"), source=core.source)
    return Violation(
        "E113", "the stage's attention core cannot split a sequence over context-parallel ranks",
        f"cp({s.cp}) > 1 but {built} attends whole sequences only", _context_backend_hint(env, kernels),
        anchors=(_P + "context", "kernels" if kernels == "local" and env.attention_backend != "unfused"
                 else "attention_backend"),
        source=core.source)


def _context_backend_hint(env: Env, kernels: str) -> str:
    """The attention backends (same kernels) whose core splits sequences, or what else would."""
    target, kind = env.target, env.stage_kind
    splitting = [b for b in ("auto", "flash", "fused") if target.attention_core(kind, kernels, b).context_parallel]
    if target.stage_kernels(kind, kernels) == "te" and env.precision == "fp32":
        # TE's flash / fused cores take 16-bit inputs only; with fp32 `auto` falls back to the unfused core
        return ("set context = 1 (Transformer Engine has no fp32 attention with context parallelism), or "
                "precision = bf16 with attention_backend = auto")
    if splitting and env.attention_backend not in splitting:
        return f"set attention_backend = {', '.join(splitting[:-1])} or {splitting[-1]}" if len(splitting) > 1 \
            else f"set attention_backend = {splitting[0]}"
    if env.kernels == "local" and env.gpu_arch != "cpu" and target.caps(kind).te and \
            target.attention_core(kind, "te", env.attention_backend).context_parallel:
        return "set context = 1, or kernels = te where Transformer Engine is installed"
    return "set context = 1"


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
    if s.tp is None or s.tp == 1 or m.multi_latent_attention:  # MLA has no fused QKV (its splits: E168)
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


def rule_precision_aware_optimizer_adam(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core OptimizerConfig `__post_init__`: "--use-precision-aware-optimizer only supported with
    adam" (it is Transformer Engine's FusedAdam with 16-bit or fp32 moments and an owned master weight)."""
    if env.optimizer != "sgd" or not s.precision_aware_optimizer or env.stage_kind not in TRAINING_KINDS:
        return None
    field = "optimizer_state_dtype" if s.optimizer_state_dtype != "fp32" else "precision_aware_optimizer"
    what = f"optimizer_state_dtype = {s.optimizer_state_dtype}" if field == "optimizer_state_dtype" \
        else "precision_aware_optimizer = true"
    return Violation(
        "E201", "the precision-aware optimizer supports Adam only",
        f"optimizer = sgd with {what}",
        "use optimizer = adam(...), or " + ("optimizer_state_dtype = fp32" if field == "optimizer_state_dtype"
                                            else "set precision_aware_optimizer = false (or auto)"),
        anchors=(_P + field, "stage.optimizer", "stage"),
        source="megatron/core/optimizer/optimizer_config.py __post_init__ (--use-precision-aware-optimizer only "
               "supported with adam)",
    )


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


def rule_recompute_layers(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core TransformerConfig: `recompute_num_layers` belongs to full recompute ("When using
    recompute_granularity: selective recompute_num_layers must be None")."""
    if s.recompute_layers is not None and s.recompute not in (None, "full"):
        return Violation("E162", "recompute_layers needs recompute = full",
                         f"recompute_layers = {s.recompute_layers} with recompute = {s.recompute}",
                         "set recompute = full (or auto), or remove recompute_layers",
                         anchors=(_P + "recompute_layers", _P + "recompute"),
                         source="megatron/core/transformer/transformer_config.py __post_init__ (recompute_num_layers "
                                "must be None for selective)")
    return None


def rule_recompute_layers_chunk(env: Env, s: Sizes) -> Violation | None:
    """With the block method `recompute_num_layers` counts layers per model chunk
    (transformer_block.py `_checkpointed_forward` loops over the chunk's layers), so more than a
    chunk holds is the same as every layer: nemoc refuses it as ambiguous."""
    if s.recompute_layers is None or s.pp is None:
        return None
    chunk = chunk_layers(env.model.layers, s.pp, s.vp if (s.vp or 1) > 1 else None)
    if s.recompute_layers <= chunk:
        return None
    v = s.vp or 1
    return Violation("E163", "recompute_layers is more than a model chunk holds",
                     f"recompute_layers({s.recompute_layers}) > ceil(layers({env.model.layers}) / (pp({s.pp}) * "
                     f"vp({v}))) = {chunk} layers per model chunk",
                     f"set recompute_layers <= {chunk} (or remove it to recompute every layer)",
                     anchors=(_P + "recompute_layers", _P + "pipeline", _P + "virtual_pipeline"),
                     source="megatron/core/transformer/transformer_block.py _checkpointed_forward (block method)")


def rule_fp8_param_gather_optimizer(env: Env, s: Sizes) -> Violation | None:
    """The FP8 parameter all-gather is the distributed optimizer's (param_and_grad_buffer.py gathers
    parameters only with `use_distributed_optimizer`); without it there is no gather to make FP8."""
    if not s.fp8_param_gather or s.distributed_optimizer is not False:
        return None
    return Violation("E166", "fp8_param_gather needs the distributed optimizer",
                     "fp8_param_gather = true with distributed_optimizer = false",
                     "set distributed_optimizer = true (or auto), or fp8_param_gather = false",
                     anchors=(_P + "fp8_param_gather", _P + "distributed_optimizer"),
                     source="megatron/core/distributed/param_and_grad_buffer.py (parameter all-gather with the "
                            "distributed optimizer)")


def rule_overlap_param_gather(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core `DistributedDataParallelConfig`: the overlapped parameter all-gather is the
    distributed optimizer's ("overlap_param_gather only supported with distributed optimizer")."""
    if not s.overlap_param_gather or s.distributed_optimizer is not False:
        return None
    return Violation("E161", "overlap_param_gather needs the distributed optimizer",
                     "overlap_param_gather = true with distributed_optimizer = false",
                     "set distributed_optimizer = true (or auto), or overlap_param_gather = false",
                     anchors=(_P + "overlap_param_gather", _P + "distributed_optimizer"),
                     source="megatron/core/distributed/distributed_data_parallel_config.py (__post_init__)")


def rule_optimizer_state_dtype_optimizer(env: Env, s: Sizes) -> Violation | None:
    """The precision-aware optimizer (16-bit Adam moments, or `precision_aware_optimizer = true`) is the
    distributed optimizer's (Megatron-Core OptimizerConfig `__post_init__`: "--use-precision-aware-optimizer
    only supported with distributed optimizer")."""
    if not s.precision_aware_optimizer or s.distributed_optimizer is not False:
        return None
    what = ("optimizer_state_dtype = bf16" if s.optimizer_state_dtype != "fp32"
            else "precision_aware_optimizer = true")
    field = "optimizer_state_dtype" if s.optimizer_state_dtype != "fp32" else "precision_aware_optimizer"
    return Violation("E190", f"{what} needs the distributed optimizer",
                     f"{what.replace(' = ', '(')}) with distributed_optimizer = false",
                     "set distributed_optimizer = true (or auto), or " + (
                         "optimizer_state_dtype = fp32" if field == "optimizer_state_dtype"
                         else "precision_aware_optimizer = false"),
                     anchors=(_P + field, _P + "distributed_optimizer"),
                     source="megatron/core/optimizer/optimizer_config.py __post_init__ (precision-aware optimizer "
                            "only with the distributed optimizer)")
