"""Multi-token prediction (DeepSeek-V3 Sec. 2.2; Megatron-Core 0.16.1 transformer/multi_token_prediction.py):
what the nemoc runtime cannot build with it (E209) and a loss weight that does nothing (W127). Which stage kinds
train it is a stage rule (`stages.stage_mtp_layers`, W128); more depths than an `init` checkpoint holds is E204 at
lowering (compiler/lower.py, `hfimport.mtp_depths_in`).

Megatron-Core 0.16.1 itself refuses little: TransformerConfig.__post_init__ checks MTP only against a custom
`pipeline_model_parallel_layout` (which nemoc does not write: the MTP depths always sit on the last pipeline stage,
its last virtual chunk) and `overlap_moe_expert_parallel_comm` (which nemoc does not set); context parallelism is
supported (`roll_tensor` exchanges the boundary tokens between CP ranks), and full recompute with the block method
skips the MTP depths with a warning (the memory and cost models price them unreplayed, docs/cost-model.md).
"""

from __future__ import annotations

from nemoc.compiler.rules.base import Env, Sizes, Violation
from nemoc.compiler.spec import ModelSpec
from nemoc.dsl.diagnostics import Severity

_MTP = "megatron/core/transformer/multi_token_prediction.py"


def rule_mtp_local_layer_parts(env: Env, s: Sizes) -> Violation | None:
    """An MTP depth is built by Megatron-Core from its own norms (`enorm`, `hnorm`, `final_layernorm`: the backend's
    plain LayerNorm / RMSNorm, get_mtp_layer_spec_for_backend) around the decoder's last layer spec, and embeds the
    next tokens through GPTModel's embedding. Gemma 3's parts that the nemoc runtime builds as its own modules (the
    (1 + w) zero-centred norms, post-block norms, the sqrt(hidden) embedding scale, a second RoPE base:
    `ModelSpec.local_layer_only`) would not reach those: the depth would compute another model than the decoder."""
    m = env.model
    if not m.mtp_num_layers or not m.local_layer_only:
        return None
    parts = [f for f in ("norm_zero_centered", "post_block_norms", "embedding_scale") if getattr(m, f)]
    if m.local_rotary_base is not None:
        parts.append("local_rotary_base")
    return Violation(
        "E209", "multi-token prediction is not built for Gemma-style layer parts",
        f"mtp_num_layers({m.mtp_num_layers}) with {', '.join(f'{p} set' for p in parts)}: Megatron-Core's MTP depth "
        "has its own plain norms and embeds through GPTModel's embedding, which the nemoc runtime's Gemma parts "
        "do not reach",
        "set model.mtp_num_layers = 0",
        anchors=("model.mtp_num_layers", "model"),
        source=f"{_MTP} get_mtp_layer_spec_for_backend, MultiTokenPredictionLayer._get_embeddings",
    )


def warn_mtp_scale_unused(env: Env, s: Sizes) -> Violation | None:
    """`mtp_loss_scaling_factor` weights the MTP loss; without MTP depths Megatron never reads it."""
    m = env.model
    default = ModelSpec.__dataclass_fields__["mtp_loss_scaling_factor"].default
    if m.mtp_num_layers or m.mtp_loss_scaling_factor == default:
        return None
    return Violation(
        "W127", "mtp_loss_scaling_factor does nothing without multi-token prediction",
        f"mtp_loss_scaling_factor({m.mtp_loss_scaling_factor:g}) with mtp_num_layers(0)",
        "set model.mtp_num_layers (DeepSeek-V3: 1), or remove mtp_loss_scaling_factor",
        anchors=("model.mtp_loss_scaling_factor", "model"), severity=Severity.WARNING,
        source="megatron/core/models/gpt/gpt_model.py _postprocess (reads it only `if self.config.mtp_num_layers`)",
    )
