"""PPO (actor, critic) and GRPO (policy) at pipeline parallelism 2 reproduce one process: the rollouts
decoded across the two stages (runtime/generation.py: hidden states sent stage to stage, each stage's KV
cache kept on it, the last stage samples) give the same tokens; the reward model's scores, the reference's
and the old policy's log-probs and the critic's values come from forward-only schedules (broadcast from the
last stage), and every actor, critic and policy step runs Megatron's 1F1B schedule over 2 micro-batches.
Same weights, same sampling generators: the tokens are equal and every reported metric agrees to a relative
1e-4 (as the sft/dpo/kto parity tests in test_align_parallel.py).

With 2 virtual pipeline stages per rank (4 layers: rank 0 holds layers 1 and 3, rank 1 layers 2 and 4) the
rollout's hidden states go around the ring twice per decode step, each chunk keeping its own layers' KV
cache, and the steps and forward-only passes run Megatron's interleaved schedule: one process's result again.

A Mixtral-style MoE model (4 experts, top-2) trains with PPO and GRPO at data parallelism 2 with its experts
split over the two ranks (EP=2: the MoE layers exchange tokens all-to-all, so both ranks decode the same
number of steps, the one whose rows stopped first stepping on) exactly as with every expert on each rank
(EP=1), at the same global batch.

At context parallelism 2 (both ranks one CP group, the SDPA core, compared with one process on the same core)
the rollouts decode the whole rows on both ranks (runtime/generation.py: the attention core's CP split and
RoPE's CP slicing off, the first CP rank's tokens kept), and every experience pass and step shards each row
over the two ranks (Megatron's load-balanced chunks) with per-row sums over the group: PPO's rewards and GAE
run along the whole rows gathered over the group, GRPO's token sums through the objective's `seq_sum`.

At tensor parallelism 2 with sequence parallelism (the layout the planner gives PPO and GRPO at tp > 1) the
rollouts decode with sequence parallelism switched off (runtime/model.py `unsplit_sequence`: a decode step's
one token per row cannot be scattered over the two ranks; before it, the prefill crashed in the embedding's
reduce-scatter), and the experience passes and steps run split along the sequence, the reward model's and
critic's scalar heads gathering it (common.py `ScalarHead`): one process's result again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_helpers import rl_kind, rl_spec

HERE = Path(__file__).parent


def _torchrun(tmp_path, kind: str, layout: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "rl_pipeline_worker.py"), str(tmp_path), kind, layout]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / f"{kind}_{layout}.json").read_text())


def _assert_same(kind: str, one: dict, two: dict, label: str) -> None:
    assert two["tokens"] == one["tokens"]
    loss = "policy_loss" if kind == "ppo" else "loss"
    assert len(two["steps"]) == 2 and one["steps"][0][loss] != one["steps"][1][loss]  # it trained
    print(f"{kind}: reference {one['steps']}\n{label} {two['steps']}")
    for a, b in zip(one["steps"], two["steps"]):
        assert a.keys() == b.keys()
        for name, value in a.items():
            if name.endswith("_time_s"):  # wall time, not a result
                continue
            assert b[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, one["steps"], two["steps"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "pp2vp2", "cp2", "tp2sp"])
@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_two_processes_reproduce_one_process(mcore, tmp_path, kind, layout):
    layers = 4 if layout == "pp2vp2" else 2
    attention = "flash" if layout == "cp2" else "unfused"  # context parallelism needs the SDPA core
    mcore.seed_all(5)
    mcore.save_model(mcore.build_gpt(rl_spec(layers=layers), mcore.single_layout()), tmp_path / "base")
    one = rl_kind(mcore, kind, tmp_path / "base", mcore.single_layout(global_batch=4, micro_batch=2), layers=layers,
                  attention=attention)
    _assert_same(kind, one, _torchrun(tmp_path, kind, layout), layout)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_moe_expert_parallel_reproduces_data_parallel(mcore, tmp_path, kind):
    mcore.seed_all(5)
    mcore.save_model(mcore.build_gpt(rl_spec(experts=4), mcore.single_layout()), tmp_path / "base")
    dp = _torchrun(tmp_path, kind, "dp2")
    ep = _torchrun(tmp_path, kind, "ep2")
    _assert_same(kind, dp, ep, "ep=2")
    # prompts of other lengths and budgets on each rank (rl_pipeline_worker.uneven_rollouts): rank 0 stops
    # 4 tokens before rank 1 and keeps stepping with it; every row as without expert parallelism
    assert [len(r) for r in ep["uneven"][0]] == [2] * 4 and [len(r) for r in ep["uneven"][1]] == [6] * 4
    assert ep["uneven"] == dp["uneven"]
