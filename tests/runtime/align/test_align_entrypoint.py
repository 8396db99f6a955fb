"""`python -m nemoc.runtime.align TASK_JSON`: sft (LoRA) -> export end to end, and bad input as `file:line`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from align_helpers import arithmetic_world, make_plan, write_task


def _run(task_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_ADDR", None)
    return subprocess.run([sys.executable, "-m", "nemoc.runtime.align", str(task_path)], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def world(tmp_path_factory, mcore):
    """A tokenizer trained on the chat data, a tiny model checkpoint, chat + preference files."""
    root, spec, tok, _ = arithmetic_world(tmp_path_factory.mktemp("entry"), mcore, seed=31)
    return root, spec, tok


def test_sft_lora_then_export_through_the_entrypoint(world, mcore, tmp_path):
    from nemoc.compiler.spec import LoraSpec
    from transformers import AutoModelForCausalLM

    root, spec, tok = world
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1),
                            ("sft", "sft", ("base",), {"pack": True}, LoraSpec(rank=4, alpha=8.0), 30),
                            ("export", "export", ("sft",), {}, None, 0)])
    datasets = [{"name": "chat", "path": str(root / "chat.jsonl"), "format": "chat", "split": "80,20,0"}]
    task = write_task(tmp_path, plan, "sft", datasets=datasets, tokenizer=str(root / "tokenizer.json"),
                      vocab_size=tok.vocab_size, parents={"base": str(root / "base")})
    proc = _run(task)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((tmp_path / "tasks" / "sft" / "DONE.json").read_text())
    # LoRA on a random-init base learns slowly (its frozen output layer bounds the logits); the learning
    # proof is test_align_lora.py. Here: held-out loss falls, adapters-only training, merged checkpoint.
    assert done["val_response_loss"] < done["val_response_loss_before"] - 0.3, done
    assert done["adapter_parameters"] > 0 and done["resident_models"] == ["policy"]
    lines = [json.loads(x) for x in (tmp_path / "tasks" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(lines[0])

    task = write_task(tmp_path, plan, "export", datasets=[], tokenizer=str(root / "tokenizer.json"),
                      vocab_size=tok.vocab_size, parents={"sft": done["checkpoint"]})
    proc = _run(task)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = json.loads((tmp_path / "tasks" / "export" / "DONE.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(exported["export"], torch_dtype=torch.float32).eval()
    ours = mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48)
    mcore.load_model(ours, done["checkpoint"])
    ids = torch.tensor([tok.tokenize("What is 2 plus 3?")])
    batch = mcore.make_batch([(ids[0].tolist(), [1] * ids.shape[1])], ids.shape[1] - 1)
    with torch.no_grad():
        mine = mcore.gather_logits(ours, batch)[..., : tok.vocab_size].cpu()
        theirs = hf(ids[:, :-1]).logits
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "tasks" / "export" / "hf" / "tokenizer.json").exists()


def test_malformed_preference_record_fails_with_file_and_line(world, tmp_path):
    root, spec, tok = world
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                     + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("dpo", "dpo", ("base",), {"beta": 0.1}, None, 2)])
    task = write_task(tmp_path, plan, "dpo", datasets=[{"name": "p", "path": str(prefs), "format": "preference"}],
                      tokenizer=str(root / "tokenizer.json"), vocab_size=tok.vocab_size,
                      parents={"base": str(root / "base")})
    proc = _run(task)
    assert proc.returncode == 2
    assert f"{prefs}:2: missing field 'rejected'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tasks" / "dpo" / "DONE.json").exists()


def test_incompatible_parent_checkpoint_is_refused(world, tmp_path):
    root, spec, tok = world
    from dataclasses import replace

    other = replace(spec, hidden=32, ffn_hidden=64)
    plan = make_plan(other, [("base", "pretrain", (), {}, None, 1), ("sft", "sft", ("base",), {}, None, 2)])
    task = write_task(tmp_path, plan, "sft", datasets=[{"name": "c", "path": str(root / "chat.jsonl"), "format": "chat"}],
                      tokenizer=str(root / "tokenizer.json"), vocab_size=tok.vocab_size,
                      parents={"base": str(root / "base")})
    proc = _run(task)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "incompatible architecture (hidden: checkpoint 64 != model 32" in proc.stderr


@pytest.mark.slow
def test_reward_dpo_ppo_eval_stages_through_the_entrypoint(world, tmp_path):
    root, spec, tok = world
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
             "rejected": f"{a} plus {b} is {a + b + 1}."} for a in range(6) for b in range(6)]
    prefs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pref_ds = [{"name": "p", "path": str(prefs), "format": "preference", "split": "80,20,0"}]
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1),
                            ("rm", "reward", ("base",), {}, None, 4),
                            ("dpo", "dpo", ("base",), {"beta": 0.1, "reference": "precomputed"}, None, 4),
                            ("ppo", "ppo", ("dpo", "rm"), {"max_new_tokens": 4, "ppo_epochs": 1}, None, 2),
                            ("eval", "eval", ("ppo",), {"prompts": ["What is 1 plus 1?"], "max_new_tokens": 4}, None, 0)])
    common = dict(tokenizer=str(root / "tokenizer.json"), vocab_size=tok.vocab_size)
    done = {}
    for name, parents, datasets in (("rm", {"base": str(root / "base")}, pref_ds),
                                    ("dpo", {"base": str(root / "base")}, pref_ds),
                                    ("ppo", None, pref_ds),
                                    ("eval", None, pref_ds)):
        if parents is None:
            parents = {"dpo": done["dpo"]["checkpoint"], "rm": done["rm"]["checkpoint"]} if name == "ppo" \
                else {"ppo": done["ppo"]["checkpoint"]}
        task = write_task(tmp_path, plan, name, datasets=datasets, parents=parents, **common)
        proc = _run(task)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        done[name] = json.loads((tmp_path / "tasks" / name / "DONE.json").read_text())
    assert done["rm"]["resident_models"] == ["reward"] and "accuracy" in done["rm"]["val"]
    assert done["dpo"]["resident_models"] == ["policy"] and done["dpo"]["reference"] == "precomputed"
    assert set(done["ppo"]) >= {"reward", "kl", "entropy"} and len(done["ppo"]["resident_models"]) == 4
    assert done["eval"]["datasets"]["p"]["pairs"] == len(rows) and len(done["eval"]["generations"]) == 1


def test_sft_resumes_from_its_checkpoint_and_reproduces_the_uninterrupted_losses(world, mcore, tmp_path):
    from nemoc.runtime.align import runners, stage

    root, spec, tok = world
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("sft", "sft", ("base",), {"pack": False}, None, 8)],
                     checkpoint_every=3, log_every=1)
    data = [{"name": "chat", "path": str(root / "chat.jsonl"), "format": "chat", "split": "90,10,0"}]
    common = dict(datasets=data, tokenizer=str(root / "tokenizer.json"), vocab_size=tok.vocab_size,
                  parents={"base": str(root / "base")})

    def losses(out):
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in lines if "loss" in r}

    full = tmp_path / "full"
    runners.run_sft(stage.load_task(write_task(tmp_path, plan, "sft", out=full, **common)))
    part = tmp_path / "part"
    first = runners.run_sft(stage.load_task(write_task(tmp_path, plan, "sft", out=part, max_steps=5, **common)))
    assert first["steps"] == 5 and (part / "checkpoints" / "iter_0000003").is_dir()
    second = runners.run_sft(stage.load_task(write_task(tmp_path, plan, "sft", out=part, **common)))
    assert second["resumed_from"] == 3
    expected, resumed = losses(full), losses(part)  # part's log holds steps 1-5, then 4-8 after the resume
    assert sorted(expected) == list(range(1, 9))
    for step in range(4, 9):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
