"""The nemoc runtime's target description: what this runtime executes, as data for the planner.

Input:  nothing (pure data; no torch import, so `nemoc check` / `nemoc plan` stay light).
Output: `NEMOC_RUNTIME`, a `nemoc.compiler.target.Target` the CLI hands to `check_spec` and
        `plan_experiment`. The compiler knows no runtime code; when this runtime learns to run more
        (pipeline-parallel alignment stages, MoE, TE kernels), this description changes and the
        planner follows.
Invariants: each `StageCaps` states what the code named in its `source` enforces (a refusal there
        would otherwise be a run-time error after data preparation).
"""

from __future__ import annotations

from types import MappingProxyType

from nemoc.compiler.target import AttentionCore, StageCaps, Target, attention_cores

# The local spec's flash core (`auto`, `flash` and `fused` without Transformer Engine: on the CPU, with
# `kernels = local`, for Gemma 3's local-only layer): torch SDPA, runtime/model.py `SDPAttention`. At cp > 1
# it all-gathers the CP group's keys and values and attends its load-balanced query shard causally
# (`SDPAttention._context_parallel`), for pretraining (runtime/train.py `gpt_forward_step` shards each
# batch with get_batch_on_this_cp_rank) and the alignment kinds alike; it refuses a sliding window at
# cp > 1 (`SDPAttention.__init__`). `unfused` stays Megatron's DotProductAttention (cp = 1 only;
# runtime/megatron_args.py `_check_supported` refuses it).
SDPA_CORE = AttentionCore(
    "the nemoc runtime's SDPA core (torch scaled_dot_product_attention)", context_parallel=True,
    sliding_window_context_parallel=False,
    source="nemoc runtime/model.py SDPAttention._context_parallel (all-gathered keys and values; no sliding "
           "window at cp > 1)")

# The alignment kinds run in runtime/align/ on the training core: their models are built by
# runtime/core/build.py `build_chunks` from the stage's Execution (kernels: TE's layer spec where TE is
# installed, the local spec otherwise; the plan's attention core: packed SFT rows are variable-length
# segments on TE's attention and on the SDPA core of runtime/model.py, only an `unfused` core the user
# chose gets an explicit mask; LoRA on TE's fused LayerNorm-linear normalises its own input, lora.py
# `LoraLinear._adapter_input`). sft, dpo, kto, orpo and reward train and evaluate through Megatron's schedules at
# any pipeline layout, virtual pipeline stages included (common.py `build_gpt` builds a rank's vp chunks,
# trainer.py `fit` feeds each chunk the step's micro-batches for the interleaved schedule, core/loop.py
# `forward_only` runs reference and held-out passes in groups of pp micro-batches); so do PPO (actor and
# critic) and GRPO (policy), without virtual stages: their steps run Megatron's schedules (trainer.py
# `Trainer.step`), their reward scores, reference / old log-probs and critic values forward-only schedules
# (common.py `forward_everywhere`), and their rollouts decode with Megatron-Core's StaticInferenceContext
# across the pipeline stages (runtime/generation.py: each stage keeps its layers' KV cache, hidden states go
# stage to stage, the last stage samples, one model chunk per rank; called by runtime/align/ppo.py
# `iteration` and runtime/align/grpo.py `rollout`). KTO and ORPO train and evaluate
# through Megatron's schedules as sft/dpo do (KTO's KL baseline and reference scores by forward-only
# schedules before each step: runtime/align/kto.py `microbatches`).
# Context parallelism: every batch constructor hands each CP rank Megatron's load-balanced shard of whole
# rows (common.py `on_this_cp_rank`, get_batch_on_this_cp_rank as pretraining uses); per-row sums of
# log-probs, token counts and the reward model's last-token value are summed over the CP group
# (`cp_sum`, differentiable) and each rank returns its share of the loss (`cp_share`). Attention: TE's
# (ring) or the local spec's SDPA core (runtime/model.py `SDPAttention._context_parallel`, all-gathered
# keys and values); Megatron's unfused core runs cp = 1 only (runtime/megatron_args.py refuses it). Rows
# packed with several samples (sft `pack = true`) are split only by TE's THD attention with CP, which
# this runtime does not drive: refused (`packed_context_parallel = False`; common.py `on_this_cp_rank`).
# MoE models for sft/dpo/kto/orpo/reward (Megatron's MoELayer through the core's build; LoRA adapts their
# attention); ppo, grpo and eval stay dense-only (untested); export writes MoE models as Mixtral / Qwen3-MoE (runtime/hf/trained.py). `init = hf(DIR)` is converted by the hf_import task
# (runtime/orchestrate/tasks/hf.py) and loaded where a parent's checkpoint would be (runtime/align/stage.py
# `policy_start`, runtime/core/build.py `restore_or_initialize`).
# Megatron-FSDP (`parallel.megatron_fsdp`) wraps pretraining stages only (runtime/core/build.py `wrap`,
# runtime/fsdp_checkpoint.py); the alignment kinds' Trainer wraps in DDP (runtime/align/trainer.py), so the
# planner plans them with megatron_fsdp = false and says so.
_ALIGN = StageCaps(
    pipeline=True, virtual_pipeline=True, context_parallel=True, packed_context_parallel=False, te=True, moe=True,
    hf_init=True, megatron_fsdp=False,
    runs="the nemoc runtime's sft, dpo, kto, orpo and reward stages (runtime/align) run TP/PP/VP/CP/DP, context "
         "parallelism on rows of one sample (packed rows need Transformer Engine's THD attention with CP)",
    source="nemoc runtime/align/trainer.py fit (interleaved schedule over a rank's chunks), runtime/align/common.py "
           "on_this_cp_rank (context-parallel shards; packed rows refused)")
_PPO = StageCaps(
    pipeline=True, virtual_pipeline=False, context_parallel=False, te=True, moe=False, kv_cache_rollout=True,
    hf_init=True, megatron_fsdp=False,
    runs="the nemoc runtime's ppo and grpo stages (runtime/align) run TP/PP/DP without virtual stages, their "
         "rollouts decoded across the pipeline stages",
    source="nemoc runtime/align/common.py build_gpt (vp), runtime/align/ppo.py, grpo.py (dense models only), "
           "runtime/generation.py (KV-cached rollouts across pipeline stages)")
# eval runs at the stage's layout (tensor and data parallel; runtime/orchestrate/tasks/align.py launches the layout's
# world size), so a model whose weights exceed one GPU is evaluated; its passes call the model directly
# (no pipeline). Export runs in one process on the host (runtime/orchestrate/tasks/align.py `_one_process`). The local
# spec has no FP8 GEMMs: an fp8 / mxfp8 model (16-bit weights) is evaluated in bf16 (runtime/align/evaluate.py).
_EVAL = StageCaps(
    pipeline=False, context_parallel=False, te=False, moe=False, fp8=False, hf_init=True,
    runs="the nemoc runtime evaluates at the stage's TP/DP layout (runtime/align/evaluate.py)",
    source="nemoc runtime/align/evaluate.py (direct model calls: no pipeline; dense models only)")
_EXPORT = StageCaps(
    pipeline=False, context_parallel=False, te=False, moe=True, attention="unfused", one_process=True, hf_init=True,
    runs="the nemoc runtime exports in one process on the host, streaming the checkpoint layer by layer "
         "(runtime/hf/trained.py)",
    source="nemoc runtime/orchestrate/tasks/align.py _one_process, runtime/hf/trained.py spec_config")

NEMOC_RUNTIME = Target(
    name="nemoc-runtime",
    stages=MappingProxyType({
        "pretrain": StageCaps(runs="runtime/train.py runs every Megatron-Core schedule"),
        "sft": _ALIGN, "dpo": _ALIGN, "kto": _ALIGN, "orpo": _ALIGN, "reward": _ALIGN, "ppo": _PPO, "grpo": _PPO,
        "eval": _EVAL, "export": _EXPORT,
    }),
    # runtime/megatron_args.py: the interleaved schedule overlaps its pipeline transfers
    # (overlap_p2p_comm, unbatched);
    # MoE models are built without linear biases (Megatron-Core 0.16.1 mlp.py fails with them).
    overlap_p2p=True,
    moe_linear_bias=False,
    attention_cores=attention_cores(SDPA_CORE),
)


def default_target() -> Target:
    """The target `nemoc check / plan / run` hand to the compiler."""
    return NEMOC_RUNTIME
