"""PPO (actor, critic) and GRPO (policy) at pipeline parallelism 2 reproduce one process: the rollouts
decoded across the two stages (runtime/generation.py: hidden states sent stage to stage, each stage's KV
cache kept on it, the last stage samples) give the same tokens; the reward model's scores, the reference's
and the old policy's log-probs and the critic's values come from forward-only schedules (broadcast from the
last stage), and every actor, critic and policy step runs Megatron's 1F1B schedule over 2 micro-batches.
Same weights, same sampling generators: the tokens are equal and every reported metric agrees to a relative
1e-4 (as the sft/dpo/kto parity tests in test_align_parallel.py).

At context parallelism 2 (both ranks one CP group, the SDPA core, compared with one process on the same core)
the rollouts decode the whole rows on both ranks (runtime/generation.py: the attention core's CP split and
RoPE's CP slicing off, the first CP rank's tokens kept), and every experience pass and step shards each row
over the two ranks (Megatron's load-balanced chunks) with per-row sums over the group: PPO's rewards and GAE
run along the whole rows gathered over the group, GRPO's token sums through the objective's `seq_sum`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_helpers import llama_spec, rl_kind

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pp2", "cp2"])
@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_two_processes_reproduce_one_process(mcore, tmp_path, kind, mode):
    attention = "flash" if mode == "cp2" else "unfused"
    mcore.seed_all(5)
    mcore.save_model(mcore.build_gpt(llama_spec(seq_length=16, vocab=256), mcore.single_layout()), tmp_path / "base")
    one = rl_kind(mcore, kind, tmp_path / "base", mcore.single_layout(global_batch=4, micro_batch=2),
                  attention=attention)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "rl_pipeline_worker.py"), str(tmp_path), kind, mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / f"{kind}_{mode}.json").read_text())
    assert two["tokens"] == one["tokens"]
    loss = "policy_loss" if kind == "ppo" else "loss"
    assert len(two["steps"]) == 2 and one["steps"][0][loss] != one["steps"][1][loss]  # it trained
    print(f"{kind}: one process {one['steps']}\n{mode} {two['steps']}")
    for a, b in zip(one["steps"], two["steps"]):
        assert a.keys() == b.keys()
        for name, value in a.items():
            if name.endswith("_time_s"):  # wall time, not a result
                continue
            assert b[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, one["steps"], two["steps"])
