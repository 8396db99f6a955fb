"""Task kinds beyond pretraining, run by `python -m nemoc.runtime.align task.json` (runtime/align/).

Training kinds (sft, lora, dpo, reward, ppo, rlhf) start the stage layout's world size; eval and export
run in one process (they load the parent checkpoint at TP=1, dist_checkpointing reshards it).
"""

from __future__ import annotations

from nemoc.runtime.tasks import TaskKind, register

MODULE = "nemoc.runtime.align"


def _one_process(ctx) -> int:
    return 1


for _name in ("sft", "lora", "dpo", "reward", "ppo", "rlhf"):
    register(TaskKind(name=_name, module=MODULE))
for _name in ("eval", "export"):
    register(TaskKind(name=_name, module=MODULE, nproc=_one_process))
