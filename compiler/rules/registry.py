"""The registry of layout rules: the ordered tables `ERROR_RULES` / `WARNING_RULES` (cheapest / most
decisive first: `layout_violations` stops at the first error) and `CODES`, every diagnostic code with
the rule that emits it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from nemoc.compiler.rules.base import Env, Rule, Sizes, Violation
from nemoc.compiler.rules.recompute import (rule_recompute_modules_fp8, rule_recompute_modules_selective,
                                            rule_recompute_modules_support, rule_recompute_shared_experts_overlap,
                                            warn_recompute_modules_unused, warn_duplicate_list_entries)
from nemoc.compiler.rules.host import (rule_cuda_graph_gpu, rule_cuda_graph_scope, rule_fsdp_distributed_optimizer,
                                       rule_fsdp_pipeline, rule_fsdp_shard_group, rule_fsdp_tensor_parallel_te,
                                       rule_manual_gc_interval)
from nemoc.compiler.rules.moe_layers import (rule_moe_first_dense_contradicts, rule_moe_layer_freq_length,
                                             rule_moe_layer_some_expert, warn_moe_layer_freq_beyond_layers)
from nemoc.compiler.rules.mtp import (
    rule_mtp_local_layer_parts, rule_mtp_position, rule_mtp_tied_pipeline, warn_mtp_scale_unused,
)
from nemoc.compiler.rules.mla import (rule_mla_rope, rule_mla_standard_fields, rule_mla_tp_split, warn_mla_fields_unused,
                                      warn_mla_tp_rope_gradient, warn_yarn_fields_without_yarn)
from nemoc.compiler.rules.moe import (
    rule_dense_expert,
    rule_ep_fp16,
    rule_expert_grid,
    rule_experts_ep,
    rule_moe_bias_etp,
    rule_moe_bias_runtime,
    rule_moe_capacity_balancing,
    rule_moe_expert_bias_sigmoid,
    rule_moe_ffn_etp,
    rule_moe_pad_flex,
    rule_moe_pad_needs_capacity,
    rule_moe_router_groups,
    rule_moe_settings_dense,
    rule_moe_settings_kernels,
    rule_moe_shared_expert_overlap,
    rule_moe_shared_overlap_gpu,
    rule_moe_shared_overlap_needs_shared,
    rule_moe_tp_needs_sp,
    rule_runtime_moe,
    rule_top_k,
    warn_ep_without_sp,
    warn_moe_ffn_default,
    warn_top1_router,
)
from nemoc.compiler.rules.parallel import (
    rule_overlap_param_gather,
    rule_recompute_layers,
    rule_recompute_layers_chunk,
    rule_fp8_param_gather_optimizer,
    rule_optimizer_state_dtype_optimizer,
    rule_context_backend,
    rule_context_seq,
    rule_ffn_tp,
    rule_global_batch,
    rule_head_dim,
    rule_heads_query_groups,
    rule_heads_tp,
    rule_qkv_split,
    rule_query_groups_tp,
    rule_rope_head_dim,
    rule_seq_length_positions,
    rule_sequence_parallel,
    rule_sequence_parallel_split,
    rule_sgd_distributed_optimizer,
    rule_precision_aware_optimizer_adam,
    rule_world_size,
    warn_padded_vocab,
    warn_tp_crosses_node,
    warn_useless_distributed_optimizer,
)
from nemoc.compiler.rules.pipeline import (
    rule_defer_wgrad_needs_fusion,
    rule_defer_wgrad_needs_pp,
    rule_wgrad_deferral_limit,
    rule_interleave_microbatches,
    rule_interleave_needs_pp,
    rule_layers_pipeline,
    rule_runtime_pipeline,
    warn_uneven_pipeline,
    warn_vp_one,
)
from nemoc.compiler.rules.precision import (
    rule_cross_entropy_needs_te,
    warn_native_cross_entropy_dtype,
    rule_tp_comm_overlap,
    rule_attention_head_dim,
    rule_fp32_attention,
    rule_fp8_dims,
    rule_fp8_needs_te,
    rule_fp8_recipe,
    rule_fp8_param_gather,
    rule_fp8_tokens,
    rule_gemma_layer_parts,
    rule_gemma_layer_te,
    rule_optimizer_state_dtype_te,
    rule_precision_aware_bf16_moments,
    rule_bf16_layers_delayed,
    rule_bf16_layers_per_stage,
    rule_bf16_layers_beyond_model,
    warn_bf16_layers_overlap,
    warn_bf16_layers_without_low_precision,
    rule_precision_hardware,
    rule_te_needs_gpu,
    warn_auto_attention_unfused,
    warn_fp16_loss_scaling,
    warn_selective_recompute_flash,
)


# Ordered: cheapest and most decisive first (layout_violations stops at the first error).
ERROR_RULES: tuple[Rule, ...] = (
    rule_world_size, rule_heads_tp, rule_query_groups_tp, rule_heads_query_groups, rule_ffn_tp, rule_qkv_split,
    rule_head_dim, rule_rope_head_dim, rule_mla_standard_fields, rule_mla_tp_split, rule_mla_rope,
    rule_layers_pipeline,
    rule_runtime_pipeline, rule_runtime_moe, rule_interleave_needs_pp, rule_sequence_parallel, rule_global_batch,
    rule_interleave_microbatches,
    rule_context_seq, rule_context_backend, rule_sequence_parallel_split, rule_dense_expert,
    rule_experts_ep, rule_expert_grid, rule_top_k, rule_moe_ffn_etp, rule_ep_fp16, rule_moe_bias_etp,
    rule_moe_bias_runtime, rule_moe_tp_needs_sp, rule_moe_settings_dense, rule_moe_settings_kernels,
    rule_moe_pad_needs_capacity, rule_moe_capacity_balancing, rule_moe_shared_expert_overlap, rule_moe_pad_flex,
    rule_moe_shared_overlap_needs_shared, rule_moe_shared_overlap_gpu, rule_moe_layer_freq_length,
    rule_moe_layer_some_expert, rule_moe_first_dense_contradicts,
    rule_moe_expert_bias_sigmoid, rule_moe_router_groups,
    rule_cuda_graph_gpu, rule_cuda_graph_scope, rule_manual_gc_interval, rule_fsdp_distributed_optimizer,
    rule_fsdp_pipeline, rule_fsdp_shard_group, rule_fsdp_tensor_parallel_te,
    rule_sgd_distributed_optimizer, rule_precision_aware_optimizer_adam,
    rule_precision_hardware, rule_fp8_needs_te, rule_fp8_recipe, rule_fp8_param_gather, rule_te_needs_gpu, rule_fp32_attention, rule_attention_head_dim,
    rule_fp8_dims, rule_fp8_tokens, rule_seq_length_positions, rule_tp_comm_overlap,
    rule_defer_wgrad_needs_pp, rule_defer_wgrad_needs_fusion, rule_wgrad_deferral_limit,
    rule_overlap_param_gather, rule_recompute_layers,
    rule_recompute_layers_chunk, rule_recompute_modules_selective, rule_recompute_modules_support,
    rule_recompute_shared_experts_overlap, rule_recompute_modules_fp8,
    rule_fp8_param_gather_optimizer, rule_optimizer_state_dtype_optimizer, rule_optimizer_state_dtype_te,
    rule_precision_aware_bf16_moments, rule_bf16_layers_delayed, rule_bf16_layers_per_stage,
    rule_bf16_layers_beyond_model,
    rule_gemma_layer_te, rule_gemma_layer_parts, rule_cross_entropy_needs_te, rule_mtp_local_layer_parts,
    rule_mtp_tied_pipeline, rule_mtp_position,
)


WARNING_RULES: tuple[Rule, ...] = (
    warn_tp_crosses_node, warn_padded_vocab, warn_ep_without_sp, warn_useless_distributed_optimizer,
    warn_fp16_loss_scaling, warn_moe_ffn_default, warn_top1_router, warn_uneven_pipeline, warn_vp_one,
    warn_selective_recompute_flash, warn_auto_attention_unfused, warn_native_cross_entropy_dtype,
    warn_recompute_modules_unused, warn_mla_tp_rope_gradient, warn_duplicate_list_entries,
    warn_bf16_layers_without_low_precision, warn_bf16_layers_overlap, warn_mla_fields_unused,
    warn_moe_layer_freq_beyond_layers, warn_yarn_fields_without_yarn, warn_mtp_scale_unused,
)


RULES: tuple[Rule, ...] = ERROR_RULES + WARNING_RULES


def violations(env: Env, sizes: Sizes, rules: Iterable[Rule] = RULES) -> Iterator[Violation]:
    for rule in rules:
        v = rule(env, sizes)
        if v is not None:
            yield v


def layout_violations(env: Env, sizes: Sizes) -> Violation | None:
    """The first error rule a complete layout breaks, or None (the search's fast path)."""
    for rule in ERROR_RULES:
        v = rule(env, sizes)
        if v is not None:
            return v
    return None


# Every diagnostic code of the layout rules with the rule that emits it (docs/planning.md lists each
# with the Megatron-Core source it mirrors). The stage rules' codes are `stages.STAGE_CODES`.
CODES: dict[str, Rule] = {
    "E202": rule_moe_layer_freq_length,
    "E203": rule_moe_layer_some_expert,
    "E205": rule_moe_first_dense_contradicts,
    "W121": warn_moe_layer_freq_beyond_layers,
    "E160": rule_tp_comm_overlap,
    "E196": rule_defer_wgrad_needs_pp,
    "E197": rule_defer_wgrad_needs_fusion,
    "E198": rule_wgrad_deferral_limit,
    "E161": rule_overlap_param_gather,
    "E162": rule_recompute_layers,
    "E163": rule_recompute_layers_chunk,
    "E192": rule_recompute_modules_selective,
    "E193": rule_recompute_modules_support,
    "E194": rule_recompute_shared_experts_overlap,
    "E195": rule_recompute_modules_fp8,
    "E101": rule_world_size,
    "E102": rule_heads_tp,
    "E103": rule_query_groups_tp,
    "E104": rule_ffn_tp,
    "E105": rule_layers_pipeline,
    "E106": rule_interleave_needs_pp,
    "E108": rule_interleave_microbatches,
    "E109": rule_sequence_parallel,
    "E110": rule_sequence_parallel_split,
    "E111": rule_global_batch,
    "E112": rule_context_seq,
    "E113": rule_context_backend,
    "E114": rule_dense_expert,
    "E115": rule_experts_ep,
    "E116": rule_expert_grid,
    "E117": rule_top_k,
    "E118": rule_moe_ffn_etp,
    "E119": rule_ep_fp16,
    "E120": rule_moe_bias_etp,
    "E121": rule_precision_hardware,
    "E122": rule_seq_length_positions,
    "E123": rule_moe_tp_needs_sp,
    "E125": rule_head_dim,
    "E126": rule_runtime_pipeline,
    "E127": rule_fp8_needs_te,
    "E164": rule_fp8_recipe,
    "E165": rule_fp8_param_gather,
    "E166": rule_fp8_param_gather_optimizer,
    "E190": rule_optimizer_state_dtype_optimizer,
    "E191": rule_optimizer_state_dtype_te,
    "E184": rule_precision_aware_bf16_moments,
    "E185": rule_bf16_layers_delayed,
    "E186": rule_bf16_layers_per_stage,
    "E200": rule_bf16_layers_beyond_model,
    "E201": rule_precision_aware_optimizer_adam,
    "E171": rule_moe_settings_dense,
    "E172": rule_moe_settings_kernels,
    "E173": rule_cuda_graph_gpu,
    "E174": rule_cuda_graph_scope,
    "E175": rule_manual_gc_interval,
    "E176": rule_fsdp_distributed_optimizer,
    "E177": rule_fsdp_pipeline,
    "E181": rule_fsdp_shard_group,
    "E182": rule_fsdp_tensor_parallel_te,
    "E179": rule_gemma_layer_te,
    "E180": rule_gemma_layer_parts,
    "E183": rule_cross_entropy_needs_te,
    "E128": rule_te_needs_gpu,
    "E129": rule_sgd_distributed_optimizer,
    "E134": rule_heads_query_groups,
    "E135": rule_fp32_attention,
    "E136": rule_attention_head_dim,
    "E137": rule_fp8_dims,
    "E138": rule_fp8_tokens,
    "E139": rule_qkv_split,
    "E167": rule_mla_standard_fields,
    "E168": rule_mla_tp_split,
    "E169": rule_mla_rope,
    "W117": warn_mla_fields_unused,
    "W123": warn_mla_tp_rope_gradient,
    "W124": warn_yarn_fields_without_yarn,
    "E140": rule_moe_bias_runtime,
    "E141": rule_runtime_moe,
    "E142": rule_rope_head_dim,
    "E143": rule_moe_pad_needs_capacity,
    "E144": rule_moe_capacity_balancing,
    "E145": rule_moe_shared_expert_overlap,
    "E146": rule_moe_pad_flex,
    "E147": rule_moe_shared_overlap_needs_shared,
    "E148": rule_moe_shared_overlap_gpu,
    "E149": rule_moe_expert_bias_sigmoid,
    "E156": rule_moe_router_groups,
    "W101": warn_tp_crosses_node,
    "W102": warn_padded_vocab,
    "W103": warn_ep_without_sp,
    "W104": warn_useless_distributed_optimizer,
    "W105": warn_fp16_loss_scaling,
    "W106": warn_moe_ffn_default,
    "W107": warn_top1_router,
    "W108": warn_uneven_pipeline,
    "W109": warn_vp_one,
    "W110": warn_selective_recompute_flash,
    "W111": warn_auto_attention_unfused,
    "W112": warn_native_cross_entropy_dtype,
    "W116": warn_recompute_modules_unused,
    "W125": warn_duplicate_list_entries,
    "W113": warn_bf16_layers_without_low_precision,
    "W120": warn_bf16_layers_overlap,
    "E209": rule_mtp_local_layer_parts,
    "E210": rule_mtp_tied_pipeline,
    "E211": rule_mtp_position,
    "W127": warn_mtp_scale_unused,
}
