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
# critic) and GRPO (policy), virtual stages included: their steps run Megatron's schedules (trainer.py
# `Trainer.step`: 1F1B, or interleaved over a rank's chunks), their reward scores, reference / old log-probs
# and critic values forward-only schedules (common.py `forward_everywhere`), and their rollouts decode with
# Megatron-Core's StaticInferenceContext across the pipeline stages (runtime/generation.py: each chunk keeps
# its layers' KV cache, hidden states go stage to stage -- around the ring vp times, in Megatron's
# interleaved chunk order -- the last stage samples; called by runtime/align/ppo.py `iteration` and
# runtime/align/grpo.py `rollout`; tests/runtime/align/test_align_rl_pipeline.py: PP=2 and PP=2 VP=2 = one
# process). KTO and ORPO train and evaluate
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
# MoE models for sft/dpo/kto/orpo/reward, ppo, grpo and eval (Megatron's MoELayer through the core's build; LoRA
# adapts their attention; expert parallelism from the layout: runtime/align/stage.py `init_process_group`; under
# expert parallelism the rollout's ranks of an expert-parallel group decode in step until the group's last row
# stops, runtime/generation.py `_all_done`: EP=2 = EP=1 at DP=2, tests/runtime/align/test_align_rl_pipeline.py);
# export writes MoE models as Mixtral / Qwen3-MoE (runtime/hf/trained.py). `init = hf(DIR)` is converted by the hf_import task
# (runtime/orchestrate/tasks/hf.py) and loaded where a parent's checkpoint would be (runtime/align/stage.py
# `policy_start`, runtime/core/build.py `restore_or_initialize`).
# Megatron-FSDP (`parallel.megatron_fsdp`) wraps pretraining stages (runtime/core/build.py `wrap`) and the
# trained models of every alignment kind (runtime/align/trainer.py `_wrap`: ZeRO-3 over the DP x CP group,
# fsdp_dtensor checkpoints: runtime/fsdp_checkpoint.py; the final model-only checkpoint too,
# runtime/checkpoint.py `save_weights`, read as full tensors by later stages and export). Whatever runs a
# trained model outside the training schedules -- held-out scores, KTO's KL baseline, PPO's and GRPO's
# rollouts and experience passes (old log-probs, the critic's values) -- runs it through the wrapper
# (`Trainer.trained`), whose forward hooks all-gather each layer's shards (megatron_fsdp.py
# `_pre_forward_param_unshard`) and free them after it (`_post_forward`), decode steps included. Frozen models
# (DPO's / KTO's / PPO's / GRPO's reference, the reward model) stay plain (unsharded) models, as the memory
# model prices them (compiler/memory.py: frozen models hold their full weights). LoRA stages (a frozen base)
# wrap in DDP and the planner plans them without FSDP (compiler/planner.py).
_ALIGN = StageCaps(
    pipeline=True, virtual_pipeline=True, context_parallel=True, packed_context_parallel=False, te=True, moe=True,
    hf_init=True, megatron_fsdp=True, graphed_param_gather=False,
    runs="the nemoc runtime's sft, dpo, kto, orpo and reward stages (runtime/align) run TP/PP/VP/CP/DP, context "
         "parallelism on rows of one sample (packed rows need Transformer Engine's THD attention with CP)",
    source="nemoc runtime/align/trainer.py fit (interleaved schedule over a rank's chunks), runtime/align/common.py "
           "on_this_cp_rank (context-parallel shards; packed rows refused)")
# PPO and GRPO step through `Trainer.step` (their own iteration, not the core loop's StepGraphs) and eval runs
# forward-only passes and KV-cached decoding: no CUDA graphs for them (`cuda_graphs=False`; the plan drops
# cuda_graph_impl for these stages and says so). Nor the overlapped parameter all-gather for PPO and GRPO
# (`overlap_param_gather=False`): the training loop gathers the distributed optimizer's shards before anything
# reads the weights outside a step (runtime/core/param_gather.py), their rollouts between steps would not.
# PPO and GRPO at cp > 1: the rollout is not split over the CP group (runtime/generation.py: every CP rank
# decodes the whole rows under runtime/model.py `whole_sequences`, the attention core's CP path and RoPE's
# CP slicing off, and keeps the first CP rank's tokens); the experience passes (reward scores, reference /
# old log-probs, critic values) and the actor, critic and policy steps shard each row over the group as
# sft/dpo do (`on_this_cp_rank`, per-row sums with `cp_sum`; PPO's rewards and GAE run along whole rows
# gathered over the group: common.py `cp_gather`). Rows hold one sample each (no packing). At tp > 1 with
# sequence parallelism the rollout decodes with the split switched off (runtime/model.py `unsplit_sequence`; a
# decode step's one token per row cannot be scattered over the TP group), the passes and steps keep it
# (tests/runtime/align/test_align_rl_pipeline.py: TP=2 with SP = one process).
_PPO = StageCaps(
    pipeline=True, virtual_pipeline=True, context_parallel=True, te=True, moe=True, kv_cache_rollout=True,
    hf_init=True, megatron_fsdp=True, cuda_graphs=False, overlap_param_gather=False,
    runs="the nemoc runtime's ppo and grpo stages (runtime/align) run TP/PP/VP/CP/EP/DP, dense or MoE models, "
         "their rollouts decoded across the pipeline stages (around the ring vp times per token), whole rows on "
         "every context-parallel rank",
    source="nemoc runtime/align/common.py build_gpt (a rank's vp chunks), trainer.py Trainer.step (interleaved "
           "schedule), runtime/generation.py (KV-cached rollouts across pipeline stages and virtual chunks; "
           "expert-parallel groups decode in step; context and sequence parallelism off while decoding: "
           "runtime/model.py whole_sequences, unsplit_sequence)")
# eval runs at the stage's layout (runtime/orchestrate/tasks/align.py launches the layout's world size), so a
# model whose weights exceed one GPU is evaluated: its model is built as every align stage's (runtime/core/build.py
# `build_chunks`: TE's layer spec where the plan says kernels = te and TE is installed, MoE layers with the
# layout's expert parallelism, a rank's pipeline stage); every loss and log-prob pass runs through forward-only
# schedules whose last stage's sums are broadcast (common.py `forward_only`; rank 0 writes results.json), and the
# generations decode across the pipeline stages (runtime/generation.py: one model chunk per rank, so no virtual
# stages; the planner gives inference kinds none). Sequence parallelism at tp > 1 as the training kinds: the loss and
# log-prob passes split the activations along the sequence; the generations decode with the split switched off
# (runtime/model.py `unsplit_sequence`: a decode step feeds one token per row, which Megatron-Core's embedding
# cannot scatter over the TP group; tests/runtime/align/test_align_eval_layout.py: TP=2 with SP = one process).
# FP8: off. TE's FP8 GEMMs have shape requirements that a decode step (one token per row) breaks; Megatron-Core pads for them only in its own inference wrapper
# (megatron/core/fp8_utils.py `prepare_model_for_fp8_inference`), which the pipelined generator does not use, and
# an FP8 eval is untested here: an fp8 / mxfp8 model (16-bit weights, FP8 only inside the GEMMs) is evaluated in
# bf16. Export runs in one process on the host (runtime/orchestrate/tasks/align.py `_one_process`).
_EVAL = StageCaps(
    pipeline=True, virtual_pipeline=False, context_parallel=False, te=True, moe=True,
    fp8=False, hf_init=True, cuda_graphs=False,
    runs="the nemoc runtime evaluates at the stage's TP/PP/EP/DP layout (forward-only schedules; generations "
         "decoded across the pipeline stages), one model chunk per pipeline rank, in bf16 for an fp8 model",
    source="nemoc runtime/align/evaluate.py (common.py forward_only, runtime/generation.py; no virtual pipeline "
           "stages, no context parallelism, no FP8 GEMMs; sequence parallelism off while decoding: runtime/model.py "
           "unsplit_sequence)")
_EXPORT = StageCaps(
    pipeline=False, context_parallel=False, te=False, moe=True, attention="unfused", one_process=True, hf_init=True,
    runs="the nemoc runtime exports in one process on the host, streaming the checkpoint layer by layer "
         "(runtime/hf/trained.py)",
    source="nemoc runtime/orchestrate/tasks/align.py _one_process, runtime/hf/trained.py spec_config")

NEMOC_RUNTIME = Target(
    name="nemoc-runtime",
    stages=MappingProxyType({
        "pretrain": StageCaps(graphed_param_gather=False, runs="runtime/train.py runs every Megatron-Core schedule",
                              source="nemoc runtime/megatron_args.py transformer_config (CUDA graphs with the "
                                     "overlapped parameter all-gather refused: the loop does not switch its hooks "
                                     "around graph capture)"),
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
