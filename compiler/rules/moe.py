"""Mixture-of-experts rules: experts over EP, the expert grid, top-k, expert TP, MoE with biases, and
the target's MoE capability (E141).
"""

from __future__ import annotations

from nemoc.dsl.diagnostics import Severity
from nemoc.compiler.rules.base import Env, Sizes, TRAINING_KINDS, Violation, _P, _divisors_upto


def expert_tp_options(sizes: Sizes) -> tuple[int, ...]:
    """The expert-TP sizes a rule must consider: the fixed one, or, when `expert_tensor` is auto,
    what the search tries (1 and tp; only 1 while tp is auto too). A rule on ETP says nothing when
    one of them satisfies it. (Megatron-Core would default an unset ETP to tp, model_parallel_config.py
    __post_init__; nemoc always resolves it itself.)"""
    if sizes.etp is not None:
        return (sizes.etp,)
    return (1,) if sizes.tp is None or sizes.tp == 1 else (1, sizes.tp)


def rule_runtime_moe(env: Env, s: Sizes) -> Violation | None:
    """The target, not Megatron: a stage kind it builds dense models for only refuses a MoE model."""
    m = env.model
    caps = env.target.caps(env.stage_kind)
    if not m.is_moe or caps.moe or env.hf_conversion:
        return None
    return Violation(
        "E141", f"`{env.stage_kind}` stages cannot run MoE models: {caps.runs}, with dense models only",
        f"experts({m.experts}) > 0, but stage kind {env.stage_kind} runs dense models only",
        "run this stage on a dense model, or train the MoE model with `pretrain` stages only",
        anchors=("model.experts", "model"),
        source=caps.source or f"the target `{env.target.name}`",
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
    """transformer_config.py __post_init__ raises for top-1 softmax routing unless pre-softmax is on. Sigmoid
    scores read no pre-softmax switch (moe_utils.topk_routing_with_score_function): nothing to say there."""
    m = env.model
    if not m.is_moe or m.top_k != 1 or m.moe_router_score != "softmax":
        return None
    return Violation(
        "W107", "top-1 routing: nemoc enables moe_router_pre_softmax (Megatron raises without it)",
        "top_k(1) with softmax scores -> moe_router_pre_softmax = true",
        None, anchors=("model.top_k", "model"), severity=Severity.NOTE,
        source="megatron/core/transformer/transformer_config.py __post_init__ (Please use --moe-router-pre-softmax when topk is 1)",
    )


_MOE_FIELDS = ("moe_dispatcher", "moe_grouped_gemm", "moe_permute_fusion")


def _written_moe(env: Env) -> list[tuple[str, object]]:
    return [(name, value) for name, value in zip(_MOE_FIELDS, env.moe_requested) if value is not None]


# The model's routing fields with their defaults (compiler/spec.py ModelSpec): another value on a dense
# model is an MoE setting nothing reads.
_MODEL_MOE_DEFAULTS = (("moe_capacity_factor", None), ("moe_pad_to_capacity", False),
                       ("moe_token_drop_policy", "probs"), ("moe_load_balancing", "aux_loss"),
                       ("moe_aux_loss_coeff", 1e-2), ("moe_shared_expert_overlap", False),
                       ("moe_router_score", "softmax"), ("moe_router_pre_softmax", False),
                       ("moe_topk_scaling_factor", None), ("moe_expert_bias", False),
                       ("moe_expert_bias_update_rate", 1e-3), ("moe_router_groups", 0), ("moe_router_group_topk", 0),
                       ("moe_layer_freq", 1), ("moe_first_dense_layers", 0))


def _written_model_moe(m) -> list[tuple[str, object]]:
    return [(f"model.{name}", getattr(m, name)) for name, default in _MODEL_MOE_DEFAULTS
            if getattr(m, name) != default]


def rule_moe_settings_dense(env: Env, s: Sizes) -> Violation | None:
    """The MoE layer's settings (dispatcher, grouped GEMM, permute fusion; the model's token dropping and
    router fields) on a dense model: nothing would use them (Megatron-Core reads them only with
    num_moe_experts)."""
    written = _written_moe(env) or _written_model_moe(env.model)
    if env.model.is_moe or not written:
        return None
    name, value = written[0]
    shown = str(value).lower() if isinstance(value, bool) else value
    return Violation(
        "E171", f"`{name}` is a mixture-of-experts setting, but the model is dense",
        f"{name}({shown}) with model.experts = 0",
        f"remove `{name}`, or give the model experts (`experts = N`, `top_k = K`)",
        anchors=(name, "model.experts", "model"),
        source="megatron/core/transformer/moe (read only when num_moe_experts is set)",
    )


def rule_moe_settings_kernels(env: Env, s: Sizes) -> Violation | None:
    """Grouped GEMM, fused permutation and the flex (DeepEP) dispatcher are Transformer Engine kernels:
    Megatron-Core's local spec builds SequentialMLP (its legacy GroupedMLP needs the separate
    `grouped_gemm` package, which the nemoc runtime does not build), `moe_permute_fusion` needs TE >=
    2.1 (transformer_config.py __post_init__: "fused permutation is not available"), and the flex
    dispatcher's DeepEP / HybridEP kernels run on GPUs only."""
    if not env.model.is_moe or env.stage_kernels == "te":
        return None
    dispatcher, grouped, fusion = env.moe_requested
    bad = [(n, v) for n, v, on in (("moe_grouped_gemm", "true", grouped is True),
                                   ("moe_permute_fusion", "true", fusion is True),
                                   ("moe_dispatcher", "flex", dispatcher == "flex")) if on]
    if not bad:
        return None
    name, value = bad[0]
    return Violation(
        "E172", f"`{name} = {value}` needs Transformer Engine; this stage runs the local layer spec",
        f"{name}({value}) with kernels = {env.stage_kernels}",
        f"remove `{name}` (auto picks what the local spec can run), or run on GPUs with Transformer Engine "
        "(`kernels = te`)",
        anchors=(name, "kernels"),
        source="megatron/core/transformer/transformer_config.py (moe_permute_fusion needs TE >= 2.1); "
               "megatron/core/models/gpt/gpt_layer_specs.py (grouped GEMM: TEGroupedMLP)",
    )


# -- token dropping and the router (Megatron-Core 0.16.1 transformer_config.py __post_init__)

_CAPACITY_SOURCE = "megatron/core/transformer/transformer_config.py __post_init__ (moe_expert_capacity_factor)"


def _capacity_shown(m) -> str:
    return "none (dropless)" if m.moe_capacity_factor is None else str(m.moe_capacity_factor)


def rule_moe_pad_needs_capacity(env: Env, s: Sizes) -> Violation | None:
    """Padding to capacity needs a capacity: "moe_expert_capacity_factor must be set to use
    moe_pad_expert_input_to_capacity"."""
    m = env.model
    if not m.is_moe or not m.moe_pad_to_capacity or m.moe_capacity_factor is not None:
        return None
    return Violation(
        "E143", "moe_pad_to_capacity pads each expert's input to its capacity, but there is none",
        "moe_pad_to_capacity = true with moe_capacity_factor = none (dropless)",
        "set model.moe_capacity_factor (NeMo's Mixtral performance mode: 1.0), or remove moe_pad_to_capacity",
        anchors=("model.moe_pad_to_capacity", "model"), source=_CAPACITY_SOURCE)


def rule_moe_capacity_balancing(env: Env, s: Sizes) -> Violation | None:
    """Sinkhorn load balancing takes neither a capacity nor an auxiliary loss: "moe_expert_capacity_factor
    only works with aux_loss, seq_aux_loss, global_aux_loss or none load balancing" (Sinkhorn routing has no
    capacity step; transformer_config.py __post_init__), and router.py `sinkhorn_load_balancing` asserts
    `moe_aux_loss_coeff == 0` ("Sinkhorn routing does not support aux loss.") at the first forward, which
    the language's default coefficient (1e-2, Switch Transformer's alpha) would reach."""
    m = env.model
    if not m.is_moe or m.moe_load_balancing != "sinkhorn":
        return None
    if m.moe_capacity_factor is not None:
        return Violation(
            "E144", "token dropping does not work with Sinkhorn load balancing",
            f"moe_capacity_factor({m.moe_capacity_factor}) with moe_load_balancing = sinkhorn",
            "use moe_load_balancing = aux_loss, seq_aux_loss, global_aux_loss or none, or remove moe_capacity_factor",
            anchors=("model.moe_capacity_factor", "model.moe_load_balancing", "model"), source=_CAPACITY_SOURCE)
    if m.moe_aux_loss_coeff != 0:
        return Violation(
            "E144", "Sinkhorn load balancing takes no auxiliary loss, but moe_aux_loss_coeff is not 0",
            f"moe_aux_loss_coeff({m.moe_aux_loss_coeff:g}) != 0 with moe_load_balancing = sinkhorn"
            + ("" if m.moe_aux_loss_coeff != 1e-2 else " (1e-2 is the language's default)"),
            "set model.moe_aux_loss_coeff = 0 (Sinkhorn balances the experts by itself), or use "
            "moe_load_balancing = aux_loss",
            anchors=("model.moe_aux_loss_coeff", "model.moe_load_balancing", "model"),
            source="megatron/core/transformer/moe/router.py TopKRouter.sinkhorn_load_balancing (assert "
                   "moe_aux_loss_coeff == 0: \"Sinkhorn routing does not support aux loss.\")")
    return None


def rule_moe_shared_overlap_needs_shared(env: Env, s: Sizes) -> Violation | None:
    """Without a shared expert `moe_shared_expert_overlap` has nothing to overlap (Megatron-Core ignores
    it: "Only effective when moe-shared-expert-intermediate-size is set"), which nemoc reports rather than
    plan a setting that does nothing."""
    m = env.model
    if not m.is_moe or not m.moe_shared_expert_overlap or m.shared_expert_ffn_hidden:
        return None
    return Violation(
        "E147", "moe_shared_expert_overlap without a shared expert",
        "moe_shared_expert_overlap = true with shared_expert_ffn_hidden = 0",
        "set model.shared_expert_ffn_hidden, or remove moe_shared_expert_overlap",
        anchors=("model.moe_shared_expert_overlap", "model"),
        source="megatron/core/transformer/transformer_config.py (moe_shared_expert_overlap: only effective when "
               "moe_shared_expert_intermediate_size is set)")


def rule_moe_shared_expert_overlap(env: Env, s: Sizes) -> Violation | None:
    """`moe_shared_expert_overlap` overlaps the shared expert with the alltoall dispatcher's exchange:
    "moe_shared_expert_overlap only works with alltoall token dispatcher"."""
    m = env.model
    if not m.is_moe or not m.moe_shared_expert_overlap or not m.shared_expert_ffn_hidden:
        return None
    dispatcher = env.moe_requested[0]
    if dispatcher in (None, "alltoall"):
        return None  # auto resolves to alltoall with the overlap (execution.moe_execution)
    return Violation(
        "E145", "moe_shared_expert_overlap works with the alltoall dispatcher only",
        f"moe_shared_expert_overlap = true with moe_dispatcher = {dispatcher}",
        "set moe_dispatcher = alltoall (or auto), or remove moe_shared_expert_overlap",
        anchors=("model.moe_shared_expert_overlap", "moe_dispatcher", "model"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (moe_shared_expert_overlap only works "
               "with alltoall token dispatcher)")


def rule_moe_shared_overlap_gpu(env: Env, s: Sizes) -> Violation | None:
    """The overlap runs the shared expert on a CUDA side stream (shared_experts.py `torch.cuda.Stream()`):
    not on the CPU."""
    m = env.model
    if not m.is_moe or not m.moe_shared_expert_overlap or env.gpu_arch != "cpu":
        return None
    return Violation(
        "E148", "moe_shared_expert_overlap needs GPUs (a CUDA side stream)",
        f"moe_shared_expert_overlap = true with cluster.gpu = {env.cluster.gpu}",
        "remove moe_shared_expert_overlap on the CPU",
        anchors=("model.moe_shared_expert_overlap", "cluster.gpu", "cluster"),
        source="megatron/core/transformer/moe/shared_experts.py (self.stream = torch.cuda.Stream())")


def rule_moe_expert_bias_sigmoid(env: Env, s: Sizes) -> Violation | None:
    """"Expert bias for aux-loss-free routing only supports sigmoid score function"."""
    m = env.model
    if not m.is_moe or not m.moe_expert_bias or m.moe_router_score == "sigmoid":
        return None
    return Violation(
        "E149", "the aux-loss-free expert bias works with sigmoid router scores only",
        f"moe_expert_bias = true with moe_router_score = {m.moe_router_score}",
        "set model.moe_router_score = sigmoid (DeepSeek-V3), or remove moe_expert_bias",
        anchors=("model.moe_expert_bias", "model.moe_router_score", "model"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (Expert bias for aux-loss-free "
               "routing only supports sigmoid score function)")


def rule_moe_router_groups(env: Env, s: Sizes) -> Violation | None:
    """Group-limited routing (transformer_config.py __post_init__, `if self.moe_router_group_topk`): the
    groups must be given, divide the experts, and number at least the groups each token picks, and the
    chosen groups must hold the top_k experts (moe_utils.py `group_limited_topk`); groups
    without a group top-k route as if there were none (Megatron reads the groups only with it), which
    nemoc refuses rather than plan a setting that does nothing."""
    m = env.model
    groups, topk = m.moe_router_groups, m.moe_router_group_topk
    if not m.is_moe or (not groups and not topk):
        return None
    if not groups:
        eq, hint = (f"moe_router_group_topk({topk}) with moe_router_groups = 0",
                    "set model.moe_router_groups (DeepSeek-V3: 8), or remove moe_router_group_topk")
        anchor = "model.moe_router_group_topk"
    elif not topk:
        eq, hint = (f"moe_router_groups({groups}) with moe_router_group_topk = 0",
                    "set model.moe_router_group_topk (DeepSeek-V3: 4), or remove moe_router_groups")
        anchor = "model.moe_router_groups"
    elif m.experts % groups:
        eq, hint = (f"experts({m.experts}) % moe_router_groups({groups}) = {m.experts % groups} != 0",
                    "choose a number of groups that divides the experts")
        anchor = "model.moe_router_groups"
    elif topk > groups:
        eq, hint = (f"moe_router_group_topk({topk}) > moe_router_groups({groups})",
                    "pick at most as many groups per token as there are")
        anchor = "model.moe_router_group_topk"
    elif topk * (m.experts // groups) < m.top_k:
        # moe_utils.py group_limited_topk: each group is scored by its top (top_k // group_topk) experts
        # (`scores.view(T, groups, -1).topk(top_k // group_topk)`: a RuntimeError where a group has fewer),
        # then top_k experts are taken from the chosen groups' experts (a masked -inf one where they hold fewer)
        per_group = m.experts // groups
        eq = (f"moe_router_group_topk({topk}) * (experts({m.experts}) / moe_router_groups({groups}) = {per_group}) "
              f"= {topk * per_group} < top_k({m.top_k})")
        hint = (f"choose groups that hold at least top_k / moe_router_group_topk experts each "
                f"(moe_router_groups <= {m.experts * topk // m.top_k}), or pick more groups per token")
        anchor = "model.moe_router_groups"
    else:
        return None
    return Violation(
        "E156", "group-limited routing is not one Megatron-Core can build", eq, hint, anchors=(anchor, "model"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (moe_router_group_topk / "
               "moe_router_num_groups); megatron/core/transformer/moe/moe_utils.py group_limited_topk")


def rule_moe_pad_flex(env: Env, s: Sizes) -> Violation | None:
    """"Flex token dispatcher with deepep backend does not support moe_pad_expert_input_to_capacity"."""
    m = env.model
    if not m.is_moe or not m.moe_pad_to_capacity or env.moe_requested[0] != "flex":
        return None
    return Violation(
        "E146", "drop-and-pad does not work with the flex (DeepEP) dispatcher",
        f"moe_pad_to_capacity = true (moe_capacity_factor {_capacity_shown(m)}) with moe_dispatcher = flex",
        "set moe_dispatcher = alltoall (or auto), or remove moe_pad_to_capacity",
        anchors=("model.moe_pad_to_capacity", "moe_dispatcher", "model"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (flex token dispatcher with deepep)")
