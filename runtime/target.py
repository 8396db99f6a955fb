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

from dataclasses import replace
from types import MappingProxyType

from nemoc.compiler.target import StageCaps, Target

# The alignment kinds run in runtime/align/: trainer.py `Trainer` refuses pp > 1 and common.py
# `build_gpt` refuses vp (docs/alignment.md, "Parallelism"). All of runtime/align builds Megatron-Core's
# local layer spec, with or without Transformer Engine (common.py `machine_facts`: LoRA must see
# normalised inputs, packed samples need an explicit mask), and Megatron's unfused attention core
# (common.py `build_gpt`: the explicit packing mask, which the SDPA core ignores), which keeps the
# s x s scores; dense models only (common.py `ModelShape.of`).
# `init = hf(DIR)` is converted by the hf_import task (runtime/tasks/hf.py) and read by export only:
# the training and eval stages still start from a parent stage's checkpoint (docs/huggingface.md).
_ALIGN = StageCaps(
    pipeline=False, te=False, moe=False, attention="unfused", kv_cache_rollout=False, hf_init=False,
    runs="the nemoc runtime's alignment stages (runtime/align) run TP/DP only",
    source="nemoc runtime/align/runners.py _trainer (pp > 1), runtime/align/common.py build_gpt (vp), "
           "ModelShape.of (dense models only)")
# PPO's and GRPO's rollouts decode with Megatron-Core's StaticInferenceContext (runtime/generation.py, called
# by runtime/align/ppo.py `iteration` and runtime/align/grpo.py `rollout`).
_ALIGN_KV = replace(_ALIGN, kv_cache_rollout=True,
                    source=_ALIGN.source + ", runtime/generation.py (KV-cached rollouts of ppo and grpo)")
# eval and export run in one process (runtime/tasks/align.py `_one_process`) on the local spec, which
# has no FP8 GEMMs: an fp8 / mxfp8 model (16-bit weights) is evaluated in bf16 (runtime/align/evaluate.py).
_EVAL = StageCaps(
    pipeline=False, te=False, moe=False, fp8=False, attention="unfused", one_process=True, hf_init=False,
    runs="the nemoc runtime runs eval and export in one process (runtime/align)",
    source="nemoc runtime/tasks/align.py _one_process, runtime/align/common.py ModelShape.of")
_EXPORT = StageCaps(
    pipeline=False, te=False, moe=False, attention="unfused", one_process=True, hf_init=True, runs=_EVAL.runs,
    source=_EVAL.source)

NEMOC_RUNTIME = Target(
    name="nemoc-runtime",
    stages=MappingProxyType({
        "pretrain": StageCaps(runs="runtime/train.py runs every Megatron-Core schedule", hf_init=False),
        "sft": _ALIGN, "dpo": _ALIGN, "kto": _ALIGN, "orpo": _ALIGN, "reward": _ALIGN, "ppo": _ALIGN_KV,
        "grpo": _ALIGN_KV,
        "eval": _EVAL, "export": _EXPORT,
    }),
    # runtime/megatron_args.py: the interleaved schedule overlaps its pipeline transfers
    # (overlap_p2p_comm, unbatched);
    # MoE models are built without linear biases (Megatron-Core 0.16.1 mlp.py fails with them).
    overlap_p2p=True,
    moe_linear_bias=False,
)


def default_target() -> Target:
    """The target `nemoc check / plan / run` hand to the compiler."""
    return NEMOC_RUNTIME
