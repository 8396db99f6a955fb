"""Run under `torchrun --nproc-per-node 2`: two iterations of PPO or GRPO (`ppo|grpo`) at pipeline
parallelism 2 (`pp2`, the default) or context parallelism 2 (`cp2`, on the SDPA core) from the checkpoint
`OUT/base` (align_helpers.rl_kind), its result to `OUT/KIND_MODE.json` (compared with one process by
test_align_rl_pipeline.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from align_helpers import rl_kind  # noqa: E402

from nemoc.runtime.align import common  # noqa: E402


def main(out: Path, kind: str, mode: str = "pp2") -> None:
    torch.set_num_threads(1)
    pp, cp = {"pp2": (2, 1), "cp2": (1, 2)}[mode]
    common.init_distributed(tp=1, pp=pp, cp=cp, seed=0)
    result = rl_kind(common, kind, out / "base", common.single_layout(pp=pp, cp=cp, global_batch=4, micro_batch=2),
                     attention="flash" if cp > 1 else "unfused")
    if torch.distributed.get_rank() == 0:
        (out / f"{kind}_{mode}.json").write_text(json.dumps(result))
    if cp > 1:  # every CP rank holds the same rollout and the same metrics (wall times aside)
        mine = {"tokens": result["tokens"],
                "steps": [{k: v for k, v in s.items() if not k.endswith("_time_s")} for s in result["steps"]]}
        box = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(box, mine)
        assert all(r == box[0] for r in box), box
    common.teardown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
