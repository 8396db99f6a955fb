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

The package is split by concern: `base` (Sizes, Env, Violation), `parallel` (parallel sizes),
`pipeline` (the split and PP / VP), `moe`, `precision` (precision, kernels, attention), `stages`
(per-stage settings), `registry` (the ordered rule tables and `CODES`, code -> rule) and `check`
(`check_spec`: the rules over a spec). This module re-exports all of it.

The rule table `RULES` is ordered cheapest / most decisive first, because `layout_violations`
stops at the first error it finds.

`STAGE_RULES` (E150-E155, W150) are the stage settings that would otherwise fail only at run time, in a
torch or Megatron traceback or an alignment error after data preparation: `min_lr` above `lr`, an
alignment stage without data in a format its records need, an export with no `after`, a stage that
starts from a parent checkpoint its parent never saves, and a warm-up longer than the stage.
"""

from __future__ import annotations

from nemoc.compiler.flops import MEGATRON_VOCAB_DIVISOR as VOCAB_DIVISOR  # noqa: F401
from nemoc.compiler.flops import padded_vocab  # noqa: F401  Megatron-LM `_vocab_size_with_padding`
from nemoc.compiler.plan import PipelineSplit  # noqa: F401
from nemoc.compiler.rules.base import (  # noqa: F401
    TRAINING_KINDS,
    RECOMPUTE,
    Sizes,
    Env,
    Violation,
    _round_up,
    Rule,
    _P,
    _tp_hint,
    _divisors_upto,
    stage_seq_length,
    to_diagnostic,
)
from nemoc.compiler.rules.pipeline import (  # noqa: F401
    pipeline_split,
    model_split,
    _accounted_split,
    _empty_chunk_split,
    rule_layers_pipeline,
    rule_interleave_needs_pp,
    rule_defer_wgrad_needs_pp,
    rule_defer_wgrad_needs_fusion,
    rule_wgrad_deferral_limit,
    rule_runtime_pipeline,
    rule_interleave_microbatches,
    warn_uneven_pipeline,
    warn_vp_one,
)
from nemoc.compiler.rules.parallel import (  # noqa: F401
    rule_world_size,
    _partial_world_size,
    _SIZE_FIELDS,
    _breaking_first,
    _world_hint,
    rule_heads_tp,
    rule_query_groups_tp,
    rule_ffn_tp,
    rule_head_dim,
    rule_rope_head_dim,
    rule_sequence_parallel,
    rule_sequence_parallel_split,
    rule_global_batch,
    rule_context_seq,
    rule_context_backend,
    rule_seq_length_positions,
    rule_heads_query_groups,
    rule_qkv_split,
    rule_sgd_distributed_optimizer,
    rule_precision_aware_optimizer_adam,
    warn_tp_crosses_node,
    warn_padded_vocab,
    warn_useless_distributed_optimizer,
    rule_overlap_param_gather,
    rule_recompute_layers,
    rule_recompute_layers_chunk,
    rule_fp8_param_gather_optimizer,
    rule_optimizer_state_dtype_optimizer,
)
from nemoc.compiler.rules.host import (  # noqa: F401
    rule_cuda_graph_gpu, rule_cuda_graph_scope, rule_fsdp_distributed_optimizer, rule_fsdp_pipeline,
    rule_manual_gc_interval)
from nemoc.compiler.rules.moe import (  # noqa: F401
    expert_tp_options,
    rule_runtime_moe,
    rule_dense_expert,
    rule_experts_ep,
    rule_expert_grid,
    rule_top_k,
    rule_moe_ffn_etp,
    rule_ep_fp16,
    rule_moe_tp_needs_sp,
    rule_moe_bias_etp,
    rule_moe_bias_runtime,
    rule_moe_settings_dense,
    rule_moe_settings_kernels,
    rule_moe_pad_needs_capacity,
    rule_moe_capacity_balancing,
    rule_moe_shared_expert_overlap,
    rule_moe_pad_flex,
    rule_moe_shared_overlap_needs_shared,
    rule_moe_shared_overlap_gpu,
    rule_moe_expert_bias_sigmoid,
    rule_moe_router_groups,
    warn_ep_without_sp,
    warn_moe_ffn_default,
    warn_top1_router,
)
from nemoc.compiler.rules.precision import (  # noqa: F401
    _local_why,
    rule_fp8_needs_te,
    rule_cross_entropy_needs_te,
    warn_native_cross_entropy_dtype,
    rule_fp8_recipe,
    rule_fp8_param_gather,
    rule_te_needs_gpu,
    _PRECISION_NEEDS,
    rule_precision_hardware,
    uses_te,
    _FLASH_CLASS,
    rule_fp32_attention,
    rule_attention_head_dim,
    te_auto_unfused,
    warn_auto_attention_unfused,
    _FP8,
    _fp8_gemm_dims,
    rule_fp8_dims,
    rule_fp8_tokens,
    warn_fp16_loss_scaling,
    warn_selective_recompute_flash,
    rule_tp_comm_overlap,
    rule_optimizer_state_dtype_te,
    rule_precision_aware_bf16_moments,
    rule_bf16_layers_delayed,
    rule_bf16_layers_per_stage,
    rule_bf16_layers_beyond_model,
    warn_bf16_layers_overlap,
    warn_bf16_layers_without_low_precision,
)
from nemoc.compiler.rules.recompute import (  # noqa: F401
    rule_recompute_modules_selective, rule_recompute_modules_support, rule_recompute_shared_experts_overlap,
    rule_recompute_modules_fp8, warn_recompute_modules_unused)
from nemoc.compiler.rules.registry import (  # noqa: F401
    ERROR_RULES,
    WARNING_RULES,
    RULES,
    violations,
    layout_violations,
    CODES,
)
from nemoc.compiler.rules.stages import (  # noqa: F401
    _RECORDS,
    _stage_diagnostic,
    rule_min_lr,
    rule_data_format,
    rule_export_after,
    rule_parent_saves,
    warn_warmup_longer_than_stage,
    _stage_steps,
    STAGE_RULES,
    MAX_STAGES,
    rule_stage_count,
    stage_diagnostics,
    STAGE_CODES,
)
from nemoc.compiler.rules.check import (  # noqa: F401
    gpu_facts,
    sizes_of,
    _PARALLEL_FIELDS,
    stage_parallel,
    env_of,
    stage_dropout,
    check_spec,
)
