"""Multi-token prediction (DeepSeek-V3 Sec. 2.2; Megatron-Core 0.16.1 transformer/multi_token_prediction.py):
what the nemoc runtime cannot build with it (E209), what Megatron cannot checkpoint or start with it (E210, E211) and a
loss weight that does nothing (W127). Which stage kinds
train it is a stage rule (`stages.stage_mtp_layers`, W128); more depths than an `init` checkpoint holds is E204 at
lowering (compiler/lower.py, `hfimport.mtp_depths_in`).

Megatron-Core 0.16.1 itself refuses little: TransformerConfig.__post_init__ checks MTP only against a custom
`pipeline_model_parallel_layout` (which nemoc does not write: the MTP depths always sit on the last pipeline stage,
its last virtual chunk) and `overlap_moe_expert_parallel_comm` (which nemoc does not set); context parallelism is
supported (`roll_tensor` exchanges the boundary tokens between CP ranks), and full recompute with the block method
skips the MTP depths with a warning (the memory and cost models price them unreplayed, docs/cost-model.md).
"""

from __future__ import annotations

from nemoc.compiler.rules.base import _P, Env, Sizes, Violation
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


def rule_mtp_tied_pipeline(env: Env, s: Sizes) -> Violation | None:
    """Tied embeddings with MTP past pipeline stage 0 cannot be checkpointed by Megatron-Core 0.16.1: the last stage
    builds the MTP depths' word embedding (gpt_model.py `if self.pre_process or self.mtp_process`) and, because it is
    not the first stage, also allocates the output layer's weight (`skip_weight_param_allocation=self.pre_process
    and self.share_embeddings_and_output_weights` is False there), which `shared_embedding_or_output_weight` then
    never uses; language_module.py `tie_embeddings_and_output_weights_state_dict` asserts that an MTP stage has no
    `output_layer.weight` in its sharded state dict, so the first checkpoint save fails after the training ran."""
    m = env.model
    if not m.mtp_num_layers or not m.tie_embeddings or s.pp is None or s.pp <= 1:
        return None
    return Violation(
        "E210", "Megatron-Core cannot checkpoint tied embeddings with multi-token prediction in a pipeline",
        f"tie_embeddings = true with mtp_num_layers({m.mtp_num_layers}) and pp({s.pp}) > 1: the last stage builds "
        "the MTP embedding and an unused output_layer.weight, which the checkpoint save asserts against",
        "set model.tie_embeddings = false, or pipeline = 1",
        anchors=("model.tie_embeddings", _P + "pipeline", "model.mtp_num_layers", "model"),
        source="megatron/core/models/common/language_module/language_module.py "
               "tie_embeddings_and_output_weights_state_dict; models/gpt/gpt_model.py output_layer "
               "skip_weight_param_allocation",
    )


def rule_mtp_position(env: Env, s: Sizes) -> Violation | None:
    """Megatron-LM arguments.py `validate_args` asserts that MTP runs with rotary or no position embedding (a learned
    position table would also be built again on the MTP stage): a Megatron-LM command with `--mtp-num-layers` and
    learned absolute positions does not start."""
    m = env.model
    if not m.mtp_num_layers or m.position in ("rope", "none"):
        return None
    return Violation(
        "E211", "multi-token prediction needs rotary or no position embeddings",
        f"mtp_num_layers({m.mtp_num_layers}) with position = {m.position}: Megatron-LM supports MTP only with "
        "position = rope or none",
        "set model.position = rope (or none), or model.mtp_num_layers = 0",
        anchors=("model.position", "model.mtp_num_layers", "model"),
        source="megatron/training/arguments.py validate_args (\"Multi-Token Prediction (MTP) is not supported with "
               "... position embedding type\")",
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
