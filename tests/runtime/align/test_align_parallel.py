"""Pipeline and data parallelism (2 processes) for an alignment stage's step: SFT at PP=2 (1F1B over 4
micro-batches, losses from the last stage) and at DP=2 (each rank 2 micro-batches of its share, DDP)
reproduces the single-process losses from the same weights. (TP=2: test_align_tp2.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_helpers import instruction_samples, llama_spec, mapping, stage_settings

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pp2", "dp2"])
def test_sft_under_two_processes_matches_one_process(mcore, tmp_path, mode):
    from nemoc.runtime.align import sft, trainer

    spec = llama_spec(seq_length=16, vocab=256)
    mcore.seed_all(5)
    model = mcore.build_gpt(spec, mcore.single_layout())
    mcore.save_model(model, tmp_path / "base")
    samples = instruction_samples(16, seed=1, f=mapping(0))
    tr = trainer.Trainer(model, layout=mcore.single_layout(global_batch=8, micro_batch=2), **stage_settings(steps=3, lr=1e-2))
    history = trainer.run_steps(tr, items=[[s] for s in samples], steps=3, global_batch=8,
                                to_microbatches=lambda share: sft.rows_to_batches(share, 16, 2),
                                forward=sft.forward, seq_length=16)
    one = [h["loss"] for h in history]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "parallel_worker.py"), str(tmp_path), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / f"sft_{mode}.json").read_text())
    assert len(two) == 3 and one[0] > one[-1]
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)
