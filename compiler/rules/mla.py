"""Multi-latent attention (DeepSeek-V2/V3): what Megatron-Core 0.16.1's MLATransformerConfig,
MLASelfAttention and its layer specs accept (E167-E169), what the nemoc runtime runs (E170, E207: stage rules
in `stages`), and MLA fields written for a model without it (W117).

MLA replaces the standard attention's query groups, head dimension and RoPE with its own fields
(`q_lora_rank`, `kv_lora_rank`, `qk_head_dim`, `qk_pos_emb_head_dim`, `v_head_dim`, `rope_type` and YaRN's):
each rule names the field that breaks it and the Megatron source it mirrors.
"""

from __future__ import annotations

from nemoc.compiler.rules.base import _P, Env, Sizes, Violation
from nemoc.compiler.spec import ModelSpec
from nemoc.dsl.diagnostics import Severity

_MLA = "megatron/core/transformer/multi_latent_attention.py"
# the MLA fields and their defaults (the ModelSpec's): written without multi_latent_attention they do nothing
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
              "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _standard_attention_conflicts(m: ModelSpec) -> list[tuple[str, str, str]]:
    """(field, equation, why) for each standard-attention setting an MLA model cannot take."""
    out = []
    if m.query_groups != m.heads:
        out.append(("query_groups", f"query_groups({m.query_groups}) != heads({m.heads})",
                    "every MLA head has its own key and value (linear_kv_up_proj: heads x (qk_head_dim + v_head_dim)); "
                    "there are no query groups"))
    if m.kv_channels is not None:
        out.append(("kv_channels", f"kv_channels({m.kv_channels}) set",
                    "MLA's head dimensions are qk_head_dim + qk_pos_emb_head_dim (queries, keys) and v_head_dim"))
    if m.position != "rope":
        out.append(("position", f"position({m.position}) != rope",
                    "MLA always applies its own rotary embedding to the qk_pos_emb_head_dim channels "
                    "(MultiLatentAttention.__init__ builds RotaryEmbedding or YarnRotaryEmbedding)"))
    if m.sliding_window:
        out.append(("sliding_window", f"sliding_window({m.sliding_window}) > 0",
                    "nemoc's MLA layers attend to the whole causal context (the cost model has no MLA window)"))
    if m.add_qkv_bias:
        out.append(("add_qkv_bias", "add_qkv_bias = true",
                    "MLA's projections are built with bias=False (MLASelfAttention.__init__)"))
    if m.softmax_scale is not None:
        out.append(("softmax_scale", f"softmax_scale({m.softmax_scale:g}) set",
                    "MLA computes its own: mscale(rope_scaling_factor, mscale_all_dim)^2 / sqrt(qk_head_dim + "
                    "qk_pos_emb_head_dim)"))
    return out


def rule_mla_standard_fields(env: Env, s: Sizes) -> Violation | None:
    """MLA has no query groups, head dimension, learned positions, window, QKV bias or written softmax
    scale: Megatron-Core builds MLA's projections from its own fields and ignores or breaks on the others
    (multi_latent_attention.py MultiLatentAttention / MLASelfAttention `__init__`)."""
    m = env.model
    if not m.multi_latent_attention:
        return None
    conflicts = _standard_attention_conflicts(m)
    if not conflicts:
        return None
    field, eq, why = conflicts[0]
    return Violation(
        "E167", f"multi-latent attention does not take `{field}`",
        f"multi_latent_attention = true with {eq}: {why}",
        f"remove `{field}` from the model (MLA sizes its heads with qk_head_dim, qk_pos_emb_head_dim, v_head_dim)",
        anchors=(f"model.{field}", "model.multi_latent_attention", "model"),
        source=f"{_MLA} MultiLatentAttention.__init__, MLASelfAttention.__init__",
    )


def rule_mla_tp_split(env: Env, s: Sizes) -> Violation | None:
    """The local spec builds MLA's down projections as ColumnParallelLinear (gpt_layer_specs.py
    get_gpt_layer_local_spec: linear_q_down_proj, linear_kv_down_proj = column_parallel_linear), whose
    output_size_per_partition = divide(output_size, tp) asserts divisibility: q_lora_rank and
    kv_lora_rank + qk_pos_emb_head_dim must divide by TP. Transformer Engine's spec runs them duplicated
    (TELinear parallel_mode='duplicated'), which has no such condition."""
    m = env.model
    if not m.multi_latent_attention or s.tp is None or s.tp == 1 or env.stage_kernels != "local":
        return None
    kv = m.kv_lora_rank + m.qk_pos_emb_head_dim
    if m.q_lora_rank and m.q_lora_rank % s.tp:
        eq = f"q_lora_rank({m.q_lora_rank}) % tp({s.tp}) = {m.q_lora_rank % s.tp} != 0"
        anchor = "model.q_lora_rank"
    elif kv % s.tp:
        eq = (f"(kv_lora_rank({m.kv_lora_rank}) + qk_pos_emb_head_dim({m.qk_pos_emb_head_dim})) = {kv}; "
              f"{kv} % tp({s.tp}) = {kv % s.tp} != 0")
        anchor = "model.kv_lora_rank"
    else:
        return None
    return Violation(
        "E168", "the local spec's MLA down projections cannot be split over the tensor-parallel ranks",
        eq + " (kernels local: linear_q_down_proj / linear_kv_down_proj are column-parallel)",
        "use a tensor size that divides q_lora_rank and kv_lora_rank + qk_pos_emb_head_dim, or kernels = te "
        "(Transformer Engine duplicates the down projections)",
        anchors=(_P + "tensor", anchor, "model"),
        source="megatron/core/models/gpt/gpt_layer_specs.py get_gpt_layer_local_spec (multi_latent_attention); "
               "megatron/core/tensor_parallel/layers.py ColumnParallelLinear (divide(output_size, world_size))",
    )


def rule_mla_rope(env: Env, s: Sizes) -> Violation | None:
    """MLA's rotary embedding: RotaryEmbedding / YarnRotaryEmbedding rotate channel pairs of the
    qk_pos_emb_head_dim part (an odd width builds one frequency too many: the same failure as E142);
    `rope_type = rope` builds RotaryEmbedding without Llama 3.1 scaling (MultiLatentAttention.__init__
    passes no rope_scaling), so a written rope_scaling_factor would be silently dropped; `yarn` exists
    only in MLA here (nemoc's standard attention scales RoPE the Llama 3.1 way)."""
    m = env.model
    if not m.multi_latent_attention:
        if m.rope_type == "yarn":
            return Violation(
                "E169", "rope_type = yarn needs multi-latent attention",
                "rope_type(yarn) with multi_latent_attention = false (standard attention scales RoPE by "
                "rope_scaling_factor the Llama 3.1 way)",
                "set multi_latent_attention = true, or remove rope_type",
                anchors=("model.rope_type", "model"), source=f"{_MLA} MultiLatentAttention.__init__ (rope_type)")
        return None
    pe = m.qk_pos_emb_head_dim
    if pe % 2:
        return Violation(
            "E169", "MLA's rotary channels must be even",
            f"qk_pos_emb_head_dim({pe}) % 2 = 1 (RoPE rotates channel pairs: 2 * ceil({pe} / 2) = {pe + 1} "
            f"frequencies for {pe} channels)",
            f"use an even qk_pos_emb_head_dim, e.g. {pe + 1}",
            anchors=("model.qk_pos_emb_head_dim", "model"),
            source="megatron/core/models/common/embeddings/rotary_pos_embedding.py RotaryEmbedding / "
                   "yarn_rotary_pos_embedding.py YarnRotaryEmbedding (arange(0, dim, 2))")
    if m.rope_type == "rope" and m.rope_scaling_factor != 1.0:
        return Violation(
            "E169", "MLA with rope_type = rope takes no rope_scaling_factor",
            f"rope_type(rope) with rope_scaling_factor({m.rope_scaling_factor:g}) != 1: MLA builds RotaryEmbedding "
            "without rope scaling",
            "set rope_type = yarn (YaRN scaling by rope_scaling_factor), or remove rope_scaling_factor",
            anchors=("model.rope_scaling_factor", "model.rope_type", "model"),
            source=f"{_MLA} MultiLatentAttention.__init__ (RotaryEmbedding(qk_pos_emb_head_dim, rotary_percent, "
                   "rotary_base, cp_group))")
    return None


def warn_mla_fields_unused(env: Env, s: Sizes) -> Violation | None:
    """MLA fields on a model without `multi_latent_attention`: Megatron never reads them (TransformerConfig
    has none of them); the model is standard attention."""
    m = env.model
    if m.multi_latent_attention:
        return None
    changed = [f for f in MLA_FIELDS if f != "rope_type" and getattr(m, f) != ModelSpec.__dataclass_fields__[f].default]
    if not changed:
        return None
    return Violation(
        "W117", "multi-latent attention fields on a model without multi-latent attention are ignored",
        f"{', '.join(changed)} set with multi_latent_attention = false",
        "set multi_latent_attention = true, or remove " + ", ".join(changed),
        anchors=tuple(f"model.{f}" for f in changed) + ("model",), severity=Severity.WARNING,
        source="megatron/core/transformer/transformer_config.py (MLATransformerConfig holds these fields)")


def warn_mla_tp_rope_gradient(env: Env, s: Sizes) -> Violation | None:
    """Training an MLA model at TP > 1 on Transformer Engine's spec without sequence parallelism: the spec runs
    linear_kv_down_proj duplicated (TELinear parallel_mode='duplicated'), so the shared RoPE key k_pos_emb is
    replicated on every rank but expanded over this rank's heads only, and MLASelfAttention
    .get_query_key_value_tensors reduces its gradient only under sequence parallelism (there
    gather_from_sequence_parallel_region's backward reduce-scatters it): the key's rows get this rank's heads'
    part (NVIDIA/Megatron-LM issue #1699, fix proposed in PR #6839; read from Megatron-Core 0.16.1's source, not
    measured: Transformer Engine does not run on the CPU machines that test nemoc). The local spec's version of
    the same bug (the column-parallel gather) is fixed by the nemoc runtime and measured there (docs/runtime.md,
    "Megatron-Core's MLA gradient at TP > 1"), so no warning there."""
    m = env.model
    if (not m.multi_latent_attention or s.tp is None or s.tp == 1 or env.stage_kernels != "te"
            or s.sequence_parallel is not False or env.stage_kind in ("eval", "export")):
        return None
    return Violation(
        "W123", "MLA at tensor > 1 on Transformer Engine's spec without sequence parallelism trains the RoPE key "
        "with part of its gradient",
        f"tp({s.tp}) > 1, kernels te, sequence_parallel false: the key's qk_pos_emb_head_dim({m.qk_pos_emb_head_dim}) "
        "rows of the duplicated linear_kv_down_proj get the gradient of this rank's heads only (Megatron-Core "
        "0.16.1 reduces it only under sequence parallelism; Megatron-LM issue #1699)",
        "set sequence_parallel = true, or kernels = local (the runtime fixes the local spec's gradient)",
        anchors=(_P + "sequence_parallel", _P + "tensor", "model.multi_latent_attention", "model"),
        severity=Severity.WARNING,
        source=f"{_MLA} MLASelfAttention.get_query_key_value_tensors (k_pos_emb of a duplicated "
               "linear_kv_down_proj: gather_from_sequence_parallel_region only under sequence_parallel)")


YARN_FIELDS = ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def warn_yarn_fields_without_yarn(env: Env, s: Sizes) -> Violation | None:
    """YaRN's settings on an MLA model with rope_type = rope: MultiLatentAttention then builds a plain
    RotaryEmbedding, which reads none of them (they reach only YarnRotaryEmbedding), so a value the user
    (or the preset, e.g. DeepSeek's mscale) set does nothing; except mscale_all_dim with rope_scaling_factor > 1,
    which still sets the softmax scale (MLASelfAttention.__init__ `_yarn_get_mscale`)."""
    m = env.model
    if not m.multi_latent_attention or m.rope_type != "rope":
        return None
    changed = [f for f in YARN_FIELDS if getattr(m, f) != ModelSpec.__dataclass_fields__[f].default
               # MLASelfAttention's softmax scale reads mscale_all_dim whatever the rope type, once the scaling
               # factor is above 1 (`_yarn_get_mscale(rotary_scaling_factor, mscale_all_dim)`)
               and not (f == "mscale_all_dim" and m.rope_scaling_factor > 1)]
    if not changed:
        return None
    return Violation(
        "W124", "YaRN settings with rope_type = rope are ignored",
        f"{', '.join(f'{f}({getattr(m, f):g})' for f in changed)} set with rope_type(rope): MLA builds "
        "RotaryEmbedding, which takes none of them",
        "set rope_type = yarn to use them, or remove " + ", ".join(changed),
        anchors=tuple(f"model.{f}" for f in changed) + ("model.rope_type", "model"), severity=Severity.WARNING,
        source=f"{_MLA} MultiLatentAttention.__init__ (rope_type 'rope': RotaryEmbedding; 'yarn': "
               "YarnRotaryEmbedding(original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim))")
