"""Rules of the recipe settings added for Megatron-Bridge parity: CUDA graphs (Megatron-Core 0.16.1 TransformerConfig
`cuda_graph_impl` / `cuda_graph_scope`, checked in its __post_init__) and manual garbage collection
(Megatron-LM `manual_gc`, `manual_gc_interval`: megatron/training/arguments.py) and Megatron-FSDP
(`parallel.megatron_fsdp`: DDP `use_megatron_fsdp`). Each returns one
`Violation` anchored at the field the user wrote, or None; they are cheap when the fields are not
written (the search calls every rule per candidate layout).
"""

from __future__ import annotations

from nemoc.compiler.rules.base import Env, Sizes, Violation

_CONFIG = "megatron/core/transformer/transformer_config.py __post_init__ (cuda_graph_impl / cuda_graph_scope)"


def rule_cuda_graph_gpu(env: Env, s: Sizes) -> Violation | None:
    """CUDA graphs capture CUDA kernels: no graph on the CPU (gloo); the nemoc runtime graphs the
    Transformer Engine layer spec only (Megatron-Bridge's recipes; the local spec's composite
    kernels are what `kernels = local` is for)."""
    impl = env.host_requested[0]
    if impl in (None, "none"):
        return None
    if env.gpu_arch == "cpu":
        why, hint, anchors = (f"cuda_graph_impl = {impl} but cluster.gpu = {env.cluster.gpu}",
                              "remove cuda_graph_impl (or set it to none) on the CPU",
                              ("cuda_graph_impl", "cluster.gpu", "cluster"))
    elif env.kernels != "te":
        why, hint, anchors = (f"cuda_graph_impl = {impl} with kernels = {env.kernels}",
                              "set kernels = te (or auto) on GPUs, or remove cuda_graph_impl",
                              ("cuda_graph_impl", "kernels"))
    else:
        return None
    return Violation("E173", "CUDA graphs need GPUs and Transformer Engine's layers", why, hint, anchors=anchors,
                     source="megatron/core/transformer/cuda_graphs.py (CUDA stream capture)")


def _scope_problem(env: Env, s: Sizes) -> tuple[str, str] | None:
    impl, scope = env.host_requested[0], env.host_requested[1]
    shown = "[" + ", ".join(scope) + "]"
    moe = env.model.is_moe
    if "full_iteration" in scope and impl != "local":
        return (f"cuda_graph_scope = {shown} with cuda_graph_impl = {impl}",
                "a whole-iteration graph needs cuda_graph_impl = local")
    if not moe and ("moe" in scope or "moe_router" in scope):
        return (f"cuda_graph_scope = {shown} with model.experts = 0", "MoE scopes need a MoE model; use attn / mlp")
    if moe and "mlp" in scope and not env.model.has_dense_layers:
        return (f"cuda_graph_scope = {shown} with model.experts = {env.model.experts} (every layer MoE)",
                "mlp graphs dense MLPs only; use moe_router")
    if "moe" in scope and "moe_router" in scope:
        return f"cuda_graph_scope = {shown}", "use moe or moe_router, not both"
    if "moe_preprocess" in scope and "moe_router" not in scope:
        return f"cuda_graph_scope = {shown}", "moe_preprocess needs moe_router in the scope"
    m = env.model
    if "moe" in scope and not m.drop_and_pad:
        return (f"cuda_graph_scope = {shown} with model.moe_capacity_factor = "
                f"{m.moe_capacity_factor if m.moe_capacity_factor is not None else 'none (dropless)'}, "
                f"moe_pad_to_capacity = {str(m.moe_pad_to_capacity).lower()}: the moe graph needs drop-and-pad experts",
                "set model.moe_capacity_factor and moe_pad_to_capacity = true, or use moe_router (and moe_preprocess)")
    dispatcher = env.moe_requested[0] or "alltoall"  # a TE stage's auto dispatcher (execution.AUTO_MOE_TE)
    if ("moe_preprocess" in scope and dispatcher == "alltoall" and m.moe_capacity_factor is not None
            and not m.moe_pad_to_capacity):
        return (f"cuda_graph_scope = {shown} with the alltoall dispatcher and moe_capacity_factor("
                f"{m.moe_capacity_factor}) without padding: its preprocess copies token counts to the host",
                "remove moe_preprocess, or set model.moe_pad_to_capacity = true")
    if s.recompute == "full" and tuple(scope) != ("full_iteration",):
        return (f"cuda_graph_scope = {shown} with recompute = full",
                "full recompute is graphed only with cuda_graph_scope = [full_iteration] (cuda_graph_impl = "
                "local); or use recompute = selective / none")
    return _graphed_recompute_problem(env, s, impl, scope, shown)


def _graphed_recompute_problem(env: Env, s: Sizes, impl: str, scope: tuple, shown: str) -> tuple[str, str] | None:
    """Selective recompute under CUDA graphs (transformer_config.py 0.16.1, l. 1790-1828): a recomputed module
    must lie wholly inside or outside the graph, and a graphed recomputation replays no fresh random numbers.
    An empty scope graphs the whole layer, and counts as a full graph there, like full_iteration."""
    selective = s.recompute == "selective" or (s.recompute is None and s.recompute_modules is not None)
    if not selective:
        return None
    modules = s.recompute_modules if s.recompute_modules is not None else ("core_attn",)  # Megatron's default
    shown_modules = "[" + ", ".join(modules) + "]"
    if impl == "transformer_engine" and "moe" in modules and "moe_router" in scope:
        return (f"cuda_graph_scope = {shown} with recompute_modules = {shown_modules} (cuda_graph_impl = "
                "transformer_engine): the moe recompute would cover the graphed router",
                "remove moe from recompute_modules (use moe_act), or moe_router from cuda_graph_scope")
    if not env.dropout:
        return None
    full = not scope or "full_iteration" in scope
    graphed = [m for m, part in (("core_attn", "attn"), ("mlp", "mlp"), ("moe", "moe"))
               if m in modules and (full or part in scope)]
    if not graphed:
        return None
    what = ("attention" if graphed == ["core_attn"] else "hidden" if "core_attn" not in graphed
            else "attention and hidden")
    return (f"recompute_modules = {shown_modules} with cuda_graph_scope = {shown}"
            f"{' (the whole layer)' if not scope else ''} and dropout > 0: the graphed recompute of "
            f"{', '.join(graphed)} would replay its {what} dropout masks",
            f"remove {', '.join(graphed)} from recompute_modules, leave {'them' if len(graphed) > 1 else 'it'} "
            "out of cuda_graph_scope, or set the stage's dropout = 0")


def rule_cuda_graph_scope(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core 0.16.1's scope checks (transformer_config.py __post_init__): full_iteration only
    with the local implementation; moe / moe_router only on MoE models, mlp only on dense layers,
    not moe and moe_router together, moe_preprocess only with moe_router, moe only with drop-and-pad
    experts; full recompute only under a whole-iteration graph; selective recompute neither covering a
    graphed router (moe with TE graphs) nor graphed under dropout (`_graphed_recompute_problem`)."""
    if env.host_requested[0] in (None, "none") or env.stage_kernels != "te":
        return None  # no graphs, or a stage on the local spec, which runs none (execution.stage_host)
    problem = _scope_problem(env, s)
    if problem is None:
        return None
    equation, hint = problem
    anchors = ("cuda_graph_scope", "cuda_graph_impl")
    if "recompute_modules" in equation:
        anchors = ("cuda_graph_scope", "parallel.recompute_modules", "parallel.recompute", "cuda_graph_impl")
    elif "recompute" in equation:
        anchors = ("cuda_graph_scope", "parallel.recompute", "cuda_graph_impl")
    return Violation("E174", "the CUDA graph scope is not one Megatron-Core can capture", equation, hint,
                     anchors=anchors, source=_CONFIG)


def rule_manual_gc_interval(env: Env, s: Sizes) -> Violation | None:
    """`manual_gc_interval` says how often the manual collector runs: with manual_gc = false there is
    none (Megatron-LM reads the interval only under --manual-gc)."""
    _, _, manual, interval = env.host_requested
    if manual is not False or interval is None:
        return None
    return Violation("E175", "manual_gc_interval without manual garbage collection",
                     f"manual_gc_interval({interval}) with manual_gc = false",
                     "remove manual_gc_interval, or set manual_gc = true",
                     anchors=("manual_gc_interval", "manual_gc"),
                     source="megatron/training/training.py (manual_gc_interval is read only with manual_gc)")


_FSDP = ("parallel.megatron_fsdp",)


def rule_fsdp_distributed_optimizer(env: Env, s: Sizes) -> Violation | None:
    """Megatron-FSDP's optimizer is Megatron-Core's DistributedOptimizer over the FSDP buffers
    (optimizer/__init__.py `if ddp_config.use_megatron_fsdp`; Megatron-LM sets
    --use-distributed-optimizer with --use-megatron-fsdp)."""
    if not s.megatron_fsdp or s.distributed_optimizer is not False:
        return None
    return Violation("E176", "megatron_fsdp needs the distributed optimizer",
                     "megatron_fsdp = true with distributed_optimizer = false",
                     "set distributed_optimizer = true (or auto), or megatron_fsdp = false",
                     anchors=(_FSDP[0], "parallel.distributed_optimizer"),
                     source="megatron/core/optimizer/__init__.py get_megatron_optimizer (use_megatron_fsdp)")


def rule_fsdp_pipeline(env: Env, s: Sizes) -> Violation | None:
    """nemoc plans Megatron-FSDP without pipeline parallelism, as Megatron-Bridge's FSDP recipes run it:
    a pipeline stage's weights would be all-gathered once per micro batch and model chunk, and the
    schedule's interleaving of forward and backward micro batches defeats FSDP's per-layer prefetch."""
    if not s.megatron_fsdp or s.pp is None or s.pp == 1:
        return None
    return Violation("E177", "megatron_fsdp with pipeline parallelism",
                     f"megatron_fsdp = true with pipeline({s.pp})",
                     "set pipeline = 1 (or auto), or megatron_fsdp = false",
                     anchors=(_FSDP[0], "parallel.pipeline"),
                     source="Megatron-Bridge FSDP recipes (pipeline_model_parallel_size = 1)")


_FSDP_BUFFER = ("megatron/core/distributed/fsdp/src/megatron_fsdp/param_and_grad_buffer.py "
                "`_bucket_group_gradient_reduce` (a shard group of one rank: `local_grad += reduced_grad` into the "
                "buffer it reduced)")


def fsdp_shard_groups(s: Sizes, moe: bool) -> tuple[int | None, int | None]:
    """(dense, expert) shard-group sizes of Megatron-FSDP, None where a size is auto: the dense weights shard
    over the data-parallel x context-parallel group (mcore_fsdp_adapter.py `_init_dist_index`:
    `get_data_parallel_group(with_context_parallel=True)`), the experts' over the expert data-parallel group
    (`get_expert_data_parallel_group`: world / (pp x ep x etp) = tp x cp x dp / (ep x etp); None for a dense
    model)."""
    if s.dp is None or s.cp is None:
        return None, None
    dense = s.dp * s.cp
    if not moe or s.tp is None or s.ep is None or s.etp is None:
        return dense, None
    return dense, s.tp * s.cp * s.dp // (s.ep * s.etp)


def rule_fsdp_shard_group(env: Env, s: Sizes) -> Violation | None:
    """Megatron-FSDP needs more than one rank to shard over. At a shard group of one rank Megatron-Core
    0.16.1's buffer is not data-distributed, so the bucket it reduces is the gradient buffer itself, and
    after the (identity) reduce-scatter into a copy it adds that copy back into the same memory: every
    micro batch's reduce doubles the whole accumulated gradient (reproduced at DP 1 on the CPU: exactly 2x
    DDP's gradient with one micro batch, sum_i 2^(n-i+1) g_i / n with n = 4, 9.07x DDP's norm). Nothing is
    sharded there anyway: the distributed optimizer keeps the same memory."""
    if not s.megatron_fsdp:
        return None
    dense, expert = fsdp_shard_groups(s, env.model.is_moe)
    if dense == 1:
        equation = f"megatron_fsdp = true with data({s.dp}) x context({s.cp}) = 1 rank to shard over"
        anchors = (_FSDP[0], "parallel.data", "parallel.context")
    elif expert == 1:
        equation = (f"megatron_fsdp = true with the experts' data-parallel group tensor({s.tp}) x context({s.cp}) "
                    f"x data({s.dp}) / (expert({s.ep}) x expert_tensor({s.etp})) = 1 rank to shard over")
        anchors = (_FSDP[0], "parallel.expert", "parallel.data")
    else:
        return None
    return Violation("E181", "megatron_fsdp needs more than one data-parallel rank to shard over", equation,
                     "FSDP shards over data-parallel ranks: at DP 1 it saves no memory (and Megatron-Core 0.16.1 "
                     "doubles its gradients there); use the distributed optimizer (megatron_fsdp = false), or "
                     "give data parallelism more ranks", anchors=anchors, source=_FSDP_BUFFER)


def rule_fsdp_tensor_parallel_te(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core 0.16.1's FSDP adapter tags the tensor-parallel weights it shards by testing
    `isinstance(module, (TELinear,))` (mcore_fsdp_adapter.py `_fix_tensor_parallel_attributes`): without
    Transformer Engine TELinear is a placeholder, not a class (TypeError at build, which the nemoc runtime
    refuses first), and the local spec's linears are not TELinear. So nemoc
    runs Megatron-FSDP with tensor parallelism only on TE's layer spec; the runtime refuses an expert
    tensor size > 1 the same way."""
    if not s.megatron_fsdp or env.stage_kernels == "te":
        return None
    sizes = [(name, v) for name, v in (("tensor", s.tp), ("expert_tensor", s.etp)) if v is not None and v > 1]
    if not sizes:
        return None
    name, size = sizes[0]
    return Violation("E182", "megatron_fsdp with tensor parallelism needs Transformer Engine's layers",
                     f"megatron_fsdp = true with {name}({size}) and kernels = {env.stage_kernels}",
                     "set tensor = 1 (or auto: FSDP then shards over data parallelism alone), or megatron_fsdp = "
                     "false, or kernels = te on GPUs with Transformer Engine",
                     anchors=(_FSDP[0], f"parallel.{name}", "kernels"),
                     source="megatron/core/distributed/fsdp/mcore_fsdp_adapter.py `_fix_tensor_parallel_attributes`")
