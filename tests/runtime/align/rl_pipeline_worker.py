"""Run under `torchrun --nproc-per-node 2`: two iterations of PPO or GRPO (`ppo|grpo`) at pipeline
parallelism 2 from the checkpoint `OUT/base` (align_helpers.rl_kind), its result to `OUT/KIND_pp2.json`
(compared with one process by test_align_rl_pipeline.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from align_helpers import rl_kind  # noqa: E402

from nemoc.runtime.align import common  # noqa: E402


def main(out: Path, kind: str) -> None:
    torch.set_num_threads(1)
    common.init_distributed(tp=1, pp=2, seed=0)
    result = rl_kind(common, kind, out / "base", common.single_layout(pp=2, global_batch=4, micro_batch=2))
    if torch.distributed.get_rank() == 0:
        (out / f"{kind}_pp2.json").write_text(json.dumps(result))
    common.teardown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
