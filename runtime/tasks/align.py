"""Task kinds beyond pretraining, run by `python -m nemoc.runtime.align task.json` (runtime/align/).

Training kinds (sft, lora, dpo, kto, orpo, reward, ppo, rlhf, grpo) start the stage layout's world size; eval and export
run in one process (they load the parent checkpoint at TP=1, dist_checkpointing reshards it); export
runs on the host CPU, where a large model's fp32 weights fit.
"""

from __future__ import annotations

from nemoc.runtime.tasks import TaskKind, register

MODULE = "nemoc.runtime.align"


def _one_process(ctx) -> int:
    return 1


for _name in ("sft", "lora", "dpo", "kto", "orpo", "reward", "ppo", "rlhf", "grpo"):
    register(TaskKind(name=_name, module=MODULE))
register(TaskKind(name="eval", module=MODULE, nproc=_one_process))
# export holds the whole model at TP=1 in fp32 (4 bytes per parameter: 280 GB for 70B): host memory, not a GPU's
register(TaskKind(name="export", module=MODULE, nproc=_one_process, host_only=True))
