"""What the planner counts for kto, orpo and grpo stages: the model passes per step, the resident models,
and GRPO's rollout costed as KV-cached decoding (memory-bandwidth bound)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from nemoc.compiler.flops import FORWARD, FULL, stage_work
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
