"""The eval stage scores only what no upstream stage trained on, and reports preference accuracy with a
reference (`eval after POLICY, REFERENCE`) and reward-model accuracy after a reward stage."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from align_helpers import arithmetic_world, make_plan, write_task


@pytest.fixture(scope="module")
def world(tmp_path_factory, mcore):
    root, spec, tok, qa = arithmetic_world(tmp_path_factory.mktemp("evalsplit"), mcore, seed=11)
    prefs = [{"prompt": q, "chosen": r, "rejected": r.replace(" is ", " is not ")} for q, r in qa]
    prefs.append(dict(prefs[0]))  # a repeated record: its copy must not count as held out
    (root / "prefs.jsonl").write_text("\n".join(json.dumps(p) for p in prefs) + "\n")
    mcore.save_model(mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48, scalar_head=True),
                     root / "rm")
    return root, spec, tok


def _plan(spec, eval_after, seeds=(1234, 99)):
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("sft", "sft", ("base",), {}, None, 1),
                            ("dpo", "dpo", ("sft",), {}, None, 1), ("rm", "reward", ("sft",), {}, None, 1),
                            ("eval", "eval", eval_after, {}, None, 0)])
    data = {"sft": ("chat",), "dpo": ("prefs",), "rm": ("prefs",)}
    stages = tuple(replace(s, data=data.get(s.name, ()), seed={"dpo": seeds[0], "rm": seeds[1]}.get(s.name, s.seed))
                   for s in plan.stages)
    return replace(plan, stages=stages)


def _eval(tmp_path, world, plan, parents):
    from nemoc.runtime.align import runners, stage

    root, _, tok = world
    datasets = [{"name": "chat", "path": str(root / "chat.jsonl"), "format": "chat", "split": "80,20,0"},
                {"name": "prefs", "path": str(root / "prefs.jsonl"), "format": "preference", "split": "75,25,0"}]
    task = stage.load_task(write_task(tmp_path, plan, "eval", datasets=datasets, tokenizer=str(root / "tokenizer.json"),
                                      vocab_size=tok.vocab_size, parents=parents))
    return task, runners.RUNNERS["eval"](task)


def test_eval_scores_only_records_no_upstream_stage_trained_on(world, tmp_path):
    from nemoc.runtime.align import eval_heldout, stage
    from nemoc.runtime.align.data import read_preferences, read_sft

    root, spec, _ = world
    base = str(root / "base")
    task, done = _eval(tmp_path, world, _plan(spec, ("dpo", "sft")), {"dpo": base, "sft": base})
    chat, prefs = done["datasets"]["chat"], done["datasets"]["prefs"]
    convs, pairs = read_sft(root / "chat.jsonl", "chat"), read_preferences(root / "prefs.jsonl")
    # chat: sft's held-out side (20% of 36, seeded) and nothing else
    _, sft_val = stage.split_held_out(convs, 0.2, 1234)
    assert chat["records"] == len(sft_val) == 7 and "sft (seed 1234)" in chat["split"]
    # prefs: dpo's held-out side (rm is not upstream of this eval), minus the copy of a trained record
    train_d, val_d = stage.split_held_out(pairs, 0.25, 1234)
    held, how = eval_heldout.held_out(task, {"name": "prefs", "split": "75,25,0"}, pairs)
    assert "dpo (seed 1234)" in how and "rm" not in how
    assert all(h in val_d and h not in train_d for h in held) and prefs["pairs"] == len(held) > 0
    assert len(held) == len([v for v in val_d if v not in train_d])
    # below dpo and rm, which trained on it with different seeds: only what both held out
    (tmp_path / "both").mkdir()
    both = stage.load_task(write_task(tmp_path / "both", _plan(spec, ("dpo", "rm")), "eval", datasets=[],
                                      tokenizer=None, vocab_size=10, parents={}))
    held2, how2 = eval_heldout.held_out(both, {"name": "prefs", "split": "75,25,0"}, pairs)
    train_r, val_r = stage.split_held_out(pairs, 0.25, 99)
    assert "dpo (seed 1234)" in how2 and "rm (seed 99)" in how2
    assert all(h in val_d and h in val_r and h not in train_d and h not in train_r for h in held2)
    assert len(held2) < len(held)
    # a policy equal to its reference: implicit rewards tie on every pair
    assert prefs["preference_accuracy"] == 0.5 and prefs["reward_margin"] == 0.0
    assert done["reference"] == "sft" and done["resident_models"] == ["policy", "reference"]
    assert json.loads((tmp_path / "tasks" / "eval" / "results.json").read_text())["datasets"]["prefs"]["pairs"] == len(held)


def test_eval_after_a_reward_stage_reports_its_held_out_pair_accuracy(world, tmp_path):
    root, spec, _ = world
    _, done = _eval(tmp_path, world, _plan(spec, ("rm",)), {"rm": str(root / "rm")})
    prefs = done["datasets"]["prefs"]
    assert set(prefs) >= {"accuracy", "margin", "pairs", "split"} and "rm (seed 99)" in prefs["split"]
    assert prefs["accuracy"] == 0.5  # the zero-initialised scalar head ties every pair
    assert "chat" not in done["datasets"] and "generations" not in done and done["resident_models"] == ["reward"]


def test_lm_eval_is_skipped_with_the_package_to_install_when_absent(world, tmp_path, monkeypatch):
    import importlib.util

    root, spec, _ = world
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    plan = _plan(spec, ("sft",))
    plan = replace(plan, stages=tuple(replace(s, params={"lm_eval_tasks": ("nemoc_sums",)}) if s.name == "eval"
                                      else s for s in plan.stages))
    _, done = _eval(tmp_path, world, plan, {"sft": str(root / "base")})
    assert "lm-eval is not installed" in done["lm_eval"]["skipped"]


SUMS_TASK = """task: nemoc_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "<|user|>\\n{{{{prompt}}}}\\n<|assistant|>\\n"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_scores_a_local_task_on_the_exported_model(world, tmp_path, monkeypatch):
    """A user task over local JSONL (no network): lm-eval loads the stage's Hugging Face export."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, spec, _ = world
    tasks = tmp_path / "evals"
    tasks.mkdir()
    rows = [{"prompt": f"What is {a} plus {b}?", "choices": [f"{a} plus {b} is {c}." for c in range(4)], "answer": a + b}
            for a in range(2) for b in range(2)]
    (tasks / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "sums.yaml").write_text(SUMS_TASK.format(data=tasks / "sums.jsonl"))
    plan = _plan(spec, ("sft",))
    plan = replace(plan, root=str(tmp_path), stages=tuple(
        replace(s, params={"lm_eval_tasks": ("nemoc_sums",), "lm_eval_include": "evals"}) if s.name == "eval" else s
        for s in plan.stages))
    _, done = _eval(tmp_path, world, plan, {"sft": str(root / "base")})
    scores = done["lm_eval"]["tasks"]["nemoc_sums"]
    assert 0.0 <= scores["acc,none"] <= 1.0, done["lm_eval"]
    assert (tmp_path / "tasks" / "eval" / "hf" / "config.json").is_file()
