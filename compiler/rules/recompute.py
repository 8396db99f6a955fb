"""Selective-recompute rules: which `recompute_modules` a stage can run, mirroring Megatron-Core
0.16.1's own checks (transformer_config.py __post_init__, `recompute_granularity == "selective"`
branch) and the layers that honour each module (transformer_layer.py, moe/moe_layer.py,
moe/experts.py, attention.py).
"""

from __future__ import annotations

from nemoc.compiler.execution import fp8_recipe_of, moe_execution
from nemoc.dsl.diagnostics import Severity
from nemoc.compiler.rules.base import Env, Sizes, Violation, _P

_SOURCE = "megatron/core/transformer/transformer_config.py __post_init__ (recompute_modules)"
_MODULES = _P + "recompute_modules"


def _shown(modules: tuple[str, ...]) -> str:
    return "[" + ", ".join(modules) + "]"


def rule_recompute_modules_selective(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core reads `recompute_modules` only with `recompute_granularity = "selective"`
    (transformer_layer.py, attention.py, moe_layer.py, experts.py all test it first): with none or full
    the list would be silently ignored, so nemoc refuses it; an empty list with selective recomputes
    nothing (the `len(self.recompute_modules) > 0` branch is skipped), which is recompute = none."""
    if s.recompute_modules is None:
        return None
    if s.recompute in ("none", "full"):
        return Violation(
            "E192", "recompute_modules needs recompute = selective",
            f"recompute_modules = {_shown(s.recompute_modules)} with recompute = {s.recompute}",
            "set recompute = selective (or auto), or remove recompute_modules",
            anchors=(_MODULES, _P + "recompute"), source=_SOURCE + ": read only with granularity selective")
    if not s.recompute_modules:
        return Violation(
            "E192", "recompute_modules = [] recomputes nothing",
            "recompute = selective with recompute_modules = []: no module drops its activations",
            "set recompute = none, or name the modules to recompute (e.g. [core_attn, mlp])",
            anchors=(_MODULES, _P + "recompute"), source=_SOURCE + ": an empty list skips every module")
    return None


def _grouped_gemm(env: Env) -> bool:
    """The stage's MoE layers run grouped GEMM (the experiment's `moe_grouped_gemm`, or its auto)."""
    moe = moe_execution(env.model, env.stage_kernels, 1, *env.moe_requested)
    return moe is not None and moe.grouped_gemm


def _written(s: Sizes) -> tuple[str, ...]:
    """The modules the stage recomputes as written (None / none / full: E192's, or Megatron's default)."""
    return (s.recompute_modules or ()) if s.recompute in (None, "selective") else ()


def rule_recompute_modules_support(env: Env, s: Sizes) -> Violation | None:
    """What Megatron-Core raises for a module the stage cannot recompute: `moe_act` "is only supported
    with moe_grouped_gemm" (and the local spec has no grouped GEMM, E172); `mla_up_proj` "is only
    supported with multi_latent_attention" (a model without `multi_latent_attention`). Megatron checks
    moe_act before it looks at the model, so a dense model (moe_grouped_gemm False) is refused too."""
    mods, m = _written(s), env.model
    if "mla_up_proj" in mods and not m.multi_latent_attention:
        return Violation("E193", "recompute module mla_up_proj needs multi-latent attention",
                         "mla_up_proj in recompute_modules with standard (multi-head / grouped-query) attention",
                         "remove mla_up_proj from recompute_modules", anchors=(_MODULES, "model"),
                         source=_SOURCE + ": mla_up_proj is only supported with multi_latent_attention")
    if "moe_act" in mods and not _grouped_gemm(env):
        # Megatron raises on a dense model too (its moe_grouped_gemm is False there)
        why = f"moe_grouped_gemm = false (kernels {env.stage_kernels})" if m.is_moe else "a dense model (no experts)"
        return Violation("E193", "recompute module moe_act needs grouped GEMM",
                         f"moe_act in recompute_modules with {why}",
                         "use moe (the whole MoE layer) instead, or run with moe_grouped_gemm = true on "
                         "Transformer Engine (kernels te)", anchors=(_MODULES, "moe_grouped_gemm", "kernels"),
                         source=_SOURCE + ": moe_act is only supported with moe_grouped_gemm")
    return None


def rule_recompute_shared_experts_overlap(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core: "shared_experts recompute cannot work with --moe-shared-expert-overlap"."""
    mods, m = _written(s), env.model
    if "shared_experts" in mods and m.shared_expert_ffn_hidden and m.moe_shared_expert_overlap:
        return Violation("E194", "shared_experts recompute cannot run with the overlapped shared expert",
                         "shared_experts in recompute_modules with model.moe_shared_expert_overlap = true",
                         "remove shared_experts from recompute_modules, or set moe_shared_expert_overlap = false",
                         anchors=(_MODULES, "model.moe_shared_expert_overlap", "model"),
                         source=_SOURCE + ": shared_experts recompute cannot work with --moe-shared-expert-overlap")
    return None


def rule_recompute_modules_fp8(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core with FP8: "Delayed scaling does not support moe_act and layernorm recompute for
    fp8" (and the other recipes need TE >= 2.6, which Megatron checks when the run starts)."""
    mods = _written(s)
    bad = [x for x in ("moe_act", "layernorm") if x in mods]
    if bad and fp8_recipe_of(env.precision, env.fp8_recipe) == "delayed":
        return Violation("E195", f"recompute module {bad[0]} does not run with FP8 delayed scaling",
                         f"{bad[0]} in recompute_modules with precision {env.precision}, fp8_recipe = delayed",
                         "use fp8_recipe = tensorwise (or blockwise / mxfp8; needs Transformer Engine >= 2.6), "
                         f"or remove {bad[0]}", anchors=(_MODULES, "fp8_recipe", "precision"),
                         source=_SOURCE + ": Delayed scaling does not support moe_act and layernorm recompute")
    return None


def warn_recompute_modules_unused(env: Env, s: Sizes) -> Violation | None:
    """A module the stage's layers do not have is accepted by Megatron-Core and recomputes nothing:
    `mlp` only on dense layers (transformer_layer.py `if not self.is_moe_layer`), `moe` /
    `moe_act` / `shared_experts` only in MoE layers (and shared experts only where the model has
    them), and `layernorm` only where the norm is its own module (`not isinstance(..., IdentityOp)`):
    Transformer Engine's layer spec fuses both norms of a dense layer into the next linear
    (TELayerNormColumnParallelLinear), so only a MoE layer's pre-MLP norm is left to recompute."""
    mods = s.recompute_modules or ()
    if s.recompute not in (None, "selective") or not mods:
        return None
    m, te = env.model, env.stage_kernels == "te" and env.gpu_arch != "cpu"
    why = {"mlp": "the model's MLPs are MoE layers (recompute them with moe)"
           if m.is_moe and not m.has_dense_layers else None,
           "moe": None if m.is_moe else "the model is dense (recompute its MLP with mlp)",
           "shared_experts": None if m.is_moe and m.shared_expert_ffn_hidden else "the model has no shared experts",
           "layernorm": ("Transformer Engine fuses both norms of a dense layer into the next linear layer"
                         if te and not m.is_moe else None)}
    unused = [(x, why[x]) for x in mods if why.get(x)]
    if not unused:
        return None
    name, reason = unused[0]
    return Violation("W116", f"recompute module {name} recomputes nothing here",
                     f"{name} in recompute_modules: {reason}",
                     f"remove {name} from recompute_modules", anchors=(_MODULES,), severity=Severity.WARNING,
                     source="megatron/core/transformer/transformer_layer.py TransformerLayer.__init__ (recompute_* "
                            "flags), moe/moe_layer.py")


def warn_duplicate_list_entries(env: Env, s: Sizes) -> Violation | None:
    """A name written twice in `recompute_modules` or `cuda_graph_scope`: Megatron-Core treats both lists as
    sets (transformer_config.py tests membership, `"mlp" in recompute_modules`, `attn in cuda_graph_scope`),
    so the second one does nothing; usually a typo for another module or scope."""
    for field, anchor, values in (("recompute_modules", _MODULES, s.recompute_modules or ()),
                                  ("cuda_graph_scope", "cuda_graph_scope", env.host_requested[1] or ())):
        twice = sorted({v for v in values if list(values).count(v) > 1})
        if twice:
            shown = "[" + ", ".join(values) + "]"
            return Violation("W125", f"{field} names {', '.join(twice)} twice",
                             f"{field} = {shown}: Megatron-Core reads it as a set, the repeat does nothing",
                             f"remove the repeated {', '.join(twice)} (or name the module you meant)",
                             anchors=(anchor,), severity=Severity.WARNING,
                             source="megatron/core/transformer/transformer_config.py __post_init__ "
                                    "(recompute_modules / cuda_graph_scope membership tests)")
    return None
