"""Multi-latent attention models in the alignment stage kinds resume bit-identically, as standard attention
does (tests/runtime/align/test_align_resume.py, whose harness this reuses on a tiny DeepSeek-style MLA base):
a run stopped after step 5 (periodic checkpoint at step 3) resumes from step 3 and ends with final weights
equal, bit for bit, to an uninterrupted run's; with LoRA the MLA projections' adapters are what trains
(`adapter_parameters`, counted like the plan: flops.lora_params_per_layer)."""

from __future__ import annotations

import json

import pytest

from align_helpers import arithmetic_world, mla_spec
from test_align_resume import CASES, EVERY, STEPS, STOP_AT, _run

MLA_CASES = ["lora_sft", "dpo", "lora_grpo_rm", "ppo"]


@pytest.fixture(scope="module")
def mla_world(tmp_path_factory, mcore):
    """The resume tests' world (tokenizer, chat and preference files, a reward model) on an MLA base."""
    root, spec, tok, qa = arithmetic_world(tmp_path_factory.mktemp("mla_resume"), mcore, seed=7, model=mla_spec)
    prefs = [{"prompt": q, "chosen": r, "rejected": r.replace(" is ", " is not ")} for q, r in qa]
    (root / "prefs.jsonl").write_text("\n".join(json.dumps(p) for p in prefs) + "\n")
    mcore.save_model(mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48, scalar_head=True),
                     root / "rm")
    return root, spec, tok


@pytest.mark.parametrize("case", MLA_CASES)
def test_an_mla_stage_resumes_to_bit_identical_final_weights(tmp_path, mla_world, case):
    from nemoc.compiler.flops import lora_params_per_layer
    from nemoc.compiler.spec import LoraSpec
    from nemoc.runtime.faults import differing_tensors

    full = _run(tmp_path, mla_world, case, tmp_path / "full")
    part = tmp_path / "part"
    first = _run(tmp_path, mla_world, case, part, max_steps=STOP_AT)
    saved = part / "checkpoints" / ("actor" if CASES[case][0] == "ppo" else "")
    assert first["steps"] == STOP_AT and (saved / f"iter_{EVERY:07d}").is_dir()
    second = _run(tmp_path, mla_world, case, part)
    assert second["resumed_from"] == EVERY, second
    assert not differing_tensors(second["checkpoint"], full["checkpoint"])
    assert second["final_loss"] == full["final_loss"]
    if CASES[case][2]:
        spec = mla_world[1]
        assert second["adapter_parameters"] == full["adapter_parameters"] == \
            spec.layers * lora_params_per_layer(spec, LoraSpec(rank=4, alpha=8.0))
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, STEPS + 1))
