"""Run under `torchrun --nproc-per-node 2`: three SFT steps at pipeline parallelism 2 (`pp2`) or data
parallelism 2 (`dp2`) from the checkpoint `OUT/base`, losses to `OUT/sft_MODE.json` (compared with one
process by test_align_parallel.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from align_helpers import instruction_samples, llama_spec, mapping, stage_settings  # noqa: E402

from nemoc.runtime.align import common, sft, trainer  # noqa: E402


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    pp, dp = (2, 1) if mode == "pp2" else (1, 2)
    common.init_distributed(tp=1, pp=pp, seed=0)
    spec = llama_spec(seq_length=16, vocab=256)
    layout = common.single_layout(pp=pp, dp=dp, global_batch=8, micro_batch=2)
    model = common.build_gpt(spec, layout)
    common.load_model(model, out / "base")  # dist_checkpointing hands each stage its layers
    samples = instruction_samples(16, seed=1, f=mapping(0))
    tr = trainer.Trainer(model, layout=layout, **stage_settings(steps=3, lr=1e-2))
    history = trainer.run_steps(tr, items=[[s] for s in samples], steps=3, global_batch=8,
                                to_microbatches=lambda share: sft.rows_to_batches(share, 16, 2),
                                forward=sft.forward, seq_length=16)
    if torch.distributed.get_rank() == 0:
        (out / f"sft_{mode}.json").write_text(json.dumps([h["loss"] for h in history]))
    common.teardown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
