"""Run under `torchrun --nproc-per-node N` (N: the mode's world size, align_helpers.PARALLEL_MODES): three
steps of an alignment kind at pipeline, data or tensor parallelism 2 (`sft|dpo|reward pp2|dp2|tp2`), virtual
pipeline stages (`vp2`: pp 2 x vp 2, 4 layers), context parallelism 2 (`cp2`) or context parallelism with
tensor (+ sequence) or pipeline parallelism (`tp2sp-cp2`, `pp2-cp2`: 4 processes) from the checkpoint
`OUT/base`, losses to `OUT/KIND_MODE.json` (compared with one process by test_align_parallel.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from align_helpers import PARALLEL_MODES, train_kind  # noqa: E402

from nemoc.runtime.align import common  # noqa: E402


def main(out: Path, kind: str, mode: str) -> None:
    torch.set_num_threads(1)
    tp, pp, dp, vp, cp, sp = PARALLEL_MODES[mode]
    common.init_distributed(tp=tp, pp=pp, cp=cp, vp=vp, seed=0)
    layers = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    losses = train_kind(common, kind, out / "base",
                        common.single_layout(tp=tp, pp=pp, dp=dp, vp=vp, cp=cp, global_batch=8, micro_batch=2,
                                             sequence_parallel=sp),
                        layers=layers, attention="flash" if cp > 1 else "unfused")
    if torch.distributed.get_rank() == 0:
        (out / f"{kind}_{mode}.json").write_text(json.dumps(losses))
    if mode == "cp2" and kind == "sft":  # two samples in one row cannot be split over CP ranks here
        try:
            common.pack_rows([[([1, 2, 3], [0, 1, 1]), ([4, 5, 6], [0, 1, 1])]], 16, varlen=True)
            refusal = "accepted"
        except common.AlignError as exc:
            refusal = str(exc)
        if torch.distributed.get_rank() == 0:
            (out / "sft_cp2_packed.txt").write_text(refusal)
    common.teardown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
