"""Pipeline, data and tensor parallelism (2 processes) for the alignment stages on the training core's loop:
SFT, ORPO, KTO (its KL baseline and reference scores by forward-only schedules before each step), DPO (chosen and rejected in one micro-batch, the frozen reference's scores made before each step by a
forward-only schedule of their own) and the reward model at PP=2 (1F1B over 4 micro-batches, losses from
the last stage), DP=2 (each rank 2 micro-batches of its share, DDP), TP=2 and PP=2 x VP=2 (the interleaved
schedule) and CP=2 (sequence shards) reproduce the single-process losses from the same weights (relative tolerance 1e-4; on CPU
they agree to the last printed digit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_helpers import llama_spec, train_kind, world_size

HERE = Path(__file__).parent


# KTO at DP=2 is left out on purpose: its KL baseline z0 pairs each example with the next one of the same
# rank's share (TRL's mismatched pairs, per device), so two ranks pair differently from one process.
CASES = [(kind, mode) for kind in ("sft", "dpo", "reward", "orpo") for mode in ("pp2", "dp2", "tp2")] + \
    [("kto", "pp2"), ("kto", "tp2")]


# Virtual pipeline stages: pp 2 x vp 2 over a 4-layer model (each rank holds two chunks of one layer,
# Megatron's interleaved schedule over 4 micro-batches; the reference scores of a step in one
# forward-only interleaved schedule).
VP_CASES = [(kind, "vp2") for kind in ("sft", "dpo", "reward", "orpo", "kto")]
# Context parallelism 2: each rank holds Megatron's load-balanced half of every row (chunks r and 3 - r of
# 4), the SDPA core attends over the all-gathered keys and values, per-row log-prob sums, token counts
# and the reward model's last-token value are summed over the CP group; compared with one process on the
# same (flash) attention core.
CP_CASES = [(kind, "cp2") for kind in ("sft", "dpo", "reward", "orpo", "kto")]
# Context parallelism with tensor (+ sequence) or pipeline parallelism, 4 processes: the SDPA core attends
# its heads / tp over the CP group's keys and values (under SP the TP group's sequence is gathered first);
# under PP the last stage makes the per-row sums over the CP group and the reference scores reach it by
# the forward-only schedule.
CP_MIXED_CASES = [(kind, mode) for kind in ("sft", "dpo") for mode in ("tp2sp-cp2", "pp2-cp2")]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "mode"), CASES + VP_CASES + CP_CASES + CP_MIXED_CASES)
def test_two_processes_reproduce_one_process(mcore, tmp_path, kind, mode):
    layers = 4 if mode == "vp2" else 2
    attention = "flash" if "cp2" in mode else "unfused"
    mcore.seed_all(5)
    mcore.save_model(mcore.build_gpt(llama_spec(seq_length=16, vocab=256, layers=layers), mcore.single_layout()),
                     tmp_path / "base")
    one = train_kind(mcore, kind, tmp_path / "base", mcore.single_layout(global_batch=8, micro_batch=2), layers=layers,
                     attention=attention)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size(mode)),
           str(HERE / "parallel_worker.py"), str(tmp_path), kind, mode, str(layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / f"{kind}_{mode}.json").read_text())
    assert len(two) == 3 and one[0] != one[-1]  # it trained
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)
    if mode == "cp2" and kind == "sft":  # rows packed with several samples: refused, with the way out
        refusal = (tmp_path / "sft_cp2_packed.txt").read_text()
        assert "packed rows" in refusal and "pack = false" in refusal, refusal
