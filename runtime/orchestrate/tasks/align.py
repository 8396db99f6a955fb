"""Task kinds beyond pretraining, run by `python -m nemoc.runtime.align task.json` (runtime/align/).

Training kinds (sft, lora, dpo, kto, orpo, reward, ppo, rlhf, grpo) and eval start the stage layout's
world size (eval at its TP/PP/EP/DP layout, so a model larger than one GPU is evaluated); export runs in one
process on the host CPU (it loads the parent checkpoint at TP=1, dist_checkpointing reshards it), where
a large model's fp32 weights fit.
"""

from __future__ import annotations

from nemoc.runtime.orchestrate.tasks import TaskKind, register

MODULE = "nemoc.runtime.align"


def _one_process(ctx) -> int:
    return 1


for _name in ("sft", "lora", "dpo", "kto", "orpo", "reward", "ppo", "rlhf", "grpo"):
    register(TaskKind(name=_name, module=MODULE))
register(TaskKind(name="eval", module=MODULE))
# export holds the whole model at TP=1 in fp32 (4 bytes per parameter: 280 GB for 70B): host memory, not a GPU's
register(TaskKind(name="export", module=MODULE, nproc=_one_process, host_only=True))
