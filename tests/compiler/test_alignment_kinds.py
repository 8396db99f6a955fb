"""What the planner counts for kto, orpo and grpo stages: the model passes per step, the resident models,
and GRPO's rollout costed as KV-cached decoding (memory-bandwidth bound)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from nemoc.compiler.flops import FORWARD, FROZEN, FULL, stage_work
from nemoc.compiler.lower import load_experiment
from nemoc.compiler.memory import resident_models
from nemoc.compiler.planner import plan_experiment
from nemoc.runtime.target import NEMOC_RUNTIME

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "alignment_kinds.nemo"


def _passes(kind, params):
    work = stage_work(kind, params)
    return work.rows, [(p.model, p.count, p.backward) for p in work.passes], work.generated


def test_model_passes_per_step():
    assert _passes("orpo", {}) == (2, [("policy", 1.0, FULL)], 0)  # no reference model
    assert _passes("kto", {}) == (1, [("policy", 1.0, FULL), ("policy (KL pairs)", 1.0, FORWARD),
                                      ("reference", 2.0, FORWARD)], 0)
    assert _passes("kto", {"loss": "apo_zero_unpaired"}) == (1, [("policy", 1.0, FULL), ("reference", 1.0, FORWARD)], 0)
    rows, passes, generated = _passes("grpo", {"num_generations": 8, "max_new_tokens": 64})
    assert (rows, generated) == (8, 64)  # 8 completions per prompt, each 64 decoded tokens
    assert [m for m, _, _ in passes] == ["policy", "reference", "reward"]
    assert _passes("grpo", {"reward": "exact_match", "beta": 0.0, "iterations": 2})[1] == [
        ("policy", 2.0, FULL), ("policy (old log-probs)", 1.0, FORWARD)]


def test_ppo_with_lora_trains_the_actors_adapters_and_the_whole_critic():
    """`runners.run_ppo` applies LoRA to the actor only: the critic (built from the reward model) trains every
    weight, so its update pass has the full backward, and its optimizer step and gradient reduction are a whole
    model's (the step time prices them); the reference is the actor with its adapters off."""
    from nemoc.compiler.catalog import PRESETS
    from nemoc.compiler.cost import estimate
    from nemoc.compiler.plan import Layout
    from nemoc.compiler.spec import LoraSpec

    work = stage_work("ppo", {"ppo_epochs": 2}, LoraSpec())
    assert [(p.model, p.backward) for p in work.passes if p.backward != FORWARD] == [("actor", FROZEN),
                                                                                     ("critic", FULL)]
    lay = Layout(tp=2, pp=1, vp=None, cp=1, ep=1, etp=1, dp=4, micro_batch=1, global_batch=32, num_microbatches=8,
                 sequence_parallel=False, distributed_optimizer=True, recompute="none")
    m = PRESETS["llama3_8b"]
    kw = dict(gpu="H100", seq_length=4096, stage_kind="ppo", stage_params={"max_new_tokens": 256, "ppo_epochs": 2})
    lora, full = estimate(m, lay, peft=LoraSpec(rank=16), **kw), estimate(m, lay, **kw)
    sft_lora = estimate(m, lay, gpu="H100", seq_length=4096, peft=LoraSpec(rank=16))
    # the critic's optimizer step is a whole model's: half of full PPO's (actor + critic), plus the adapters'
    # (2 epochs of each)
    assert lora.parts["optimizer"] == pytest.approx(full.parts["optimizer"] / 2 + 2 * sft_lora.parts["optimizer"],
                                                    rel=1e-6)
    assert lora.parts["dp_comm_exposed"] >= full.parts["dp_comm_exposed"] / 2
    # a reward stage with `peft` is trained whole too (`runners.run_reward` applies no adapters): priced so
    assert [p.backward for p in stage_work("reward", {}, LoraSpec()).passes] == [FULL]
    rw = dict(gpu="H100", seq_length=4096, stage_kind="reward")
    assert estimate(m, lay, peft=LoraSpec(), **rw).step_time_s == estimate(m, lay, **rw).step_time_s


@pytest.mark.parametrize("kind, params, lora, expected", [
    ("orpo", {}, False, ("policy",)),
    ("kto", {}, False, ("policy", "reference")),
    ("kto", {}, True, ("policy",)),
    ("grpo", {}, False, ("policy", "reference", "reward")),
    ("grpo", {"reward": "contains"}, False, ("policy", "reference")),
    ("grpo", {"reward": "contains", "beta": 0.0}, False, ("policy",)),
    ("grpo", {}, True, ("policy", "reward")),
])
def test_resident_models_agree_with_the_runtime(kind, params, lora, expected):
    from nemoc.compiler.spec import LoraSpec
    from nemoc.runtime.align import grpo, kto, orpo

    peft = LoraSpec() if lora else None
    assert resident_models(kind, params, peft=peft) == expected
    held = {"kto": kto.resident_models, "orpo": orpo.resident_models, "grpo": grpo.resident_models}[kind]
    assert tuple(held(params, peft)) == expected


def test_grpo_rollout_is_costed_as_memory_bound_decoding():
    spec, _ = load_experiment(str(EXAMPLE))
    result = plan_experiment(spec, target=NEMOC_RUNTIME)
    grpo = result.plan.stage("grpo")
    assert grpo.estimate.parts["rollout"] > 0 and grpo.resident_models == ("policy", "reference")
    # the nemoc runtime decodes GRPO's rollouts with a KV cache: no "recomputes the whole sequence" note
    assert not any("recomputes" in n for s in result.stages if s.name == "grpo" for n in s.notes)
    longer = replace(spec, stages=tuple(replace(s, params={**s.params, "max_new_tokens": 24}) if s.name == "grpo" else s
                                        for s in spec.stages))
    rollout = plan_experiment(longer, target=NEMOC_RUNTIME).plan.stage("grpo").estimate.parts["rollout"]
    # prefill + n decode steps: twice the new tokens cost less than twice the rollout (the prefill is shared)
    assert grpo.estimate.parts["rollout"] < rollout < 2 * grpo.estimate.parts["rollout"]
    orpo, kto = result.plan.stage("orpo"), result.plan.stage("kto")
    assert orpo.resident_models == ("policy",) and kto.resident_models == ("policy", "reference")
    assert "rollout" not in kto.estimate.parts and kto.estimate.parts["other_passes"] > 0
