"""Every training stage kind resumes bit-identically: sft, dpo, reward and ppo, with and without LoRA
(pretraining: tests/runtime/test_train_resume.py, test_faults_checkpoint.py, test_faults_restart.py).

A run stopped after step 5 (its last periodic checkpoint at step 3; what a kill -9 after step 5 leaves)
is rerun: it resumes from step 3 (`resumed_from`), logs one record per step, and ends with final
weights equal, bit for bit, to those of an uninterrupted run. Also: a failed save (ENOSPC injected
into the checkpoint writer) removes its temporary directory and leaves the previous `latest`.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from align_helpers import arithmetic_world, make_plan, write_task

STEPS, EVERY, STOP_AT = 7, 3, 5


@pytest.fixture(scope="module")
def world(tmp_path_factory, mcore):
    """A tokenizer, a tiny base checkpoint and a reward model (scalar head), chat and preference files."""
    root, spec, tok, qa = arithmetic_world(tmp_path_factory.mktemp("resume"), mcore, seed=7)
    prefs = [{"prompt": q, "chosen": r, "rejected": r.replace(" is ", " is not ")} for q, r in qa]
    (root / "prefs.jsonl").write_text("\n".join(json.dumps(p) for p in prefs) + "\n")
    mcore.save_model(mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48, scalar_head=True),
                     root / "rm")
    return root, spec, tok


def _lora():
    from nemoc.compiler.spec import LoraSpec

    return LoraSpec(rank=4, alpha=8.0)


CASES = {
    "sft": ("sft", {"pack": False}, None, "chat"),
    "lora_sft": ("sft", {"pack": False}, "lora", "chat"),
    "dpo": ("dpo", {"beta": 0.1}, None, "preference"),
    "lora_dpo": ("dpo", {"beta": 0.1}, "lora", "preference"),
    "reward": ("reward", {}, None, "preference"),
    "ppo": ("ppo", {"max_new_tokens": 4, "ppo_epochs": 1}, None, "preference"),
    "lora_ppo": ("ppo", {"max_new_tokens": 4, "ppo_epochs": 1}, "lora", "preference"),
    "kto": ("kto", {"beta": 0.1}, None, "preference"),
    "orpo": ("orpo", {"beta": 0.1}, None, "preference"),
    "grpo": ("grpo", {"max_new_tokens": 4, "num_generations": 2, "reward": "contains"}, None, "preference"),
    "lora_grpo_rm": ("grpo", {"max_new_tokens": 4, "num_generations": 2, "iterations": 2}, "lora", "preference"),
}


def _run(tmp_path, world, case: str, out, max_steps=None) -> dict:
    from nemoc.runtime.align import runners, stage

    root, spec, tok = world
    kind, params, peft, fmt = CASES[case]
    after, parents = ("base",), {"base": str(root / "base")}
    if kind == "ppo" or (kind == "grpo" and "reward" not in params):  # the policy from the base, the reward
        # model (and ppo's critic) from a reward stage
        after, parents = ("base", "rm"), {"base": str(root / "base"), "rm": str(root / "rm")}
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("rm", "reward", ("base",), {}, None, 1),
                            ("s", kind, after, params, _lora() if peft else None, STEPS)],
                     checkpoint_every=EVERY, log_every=1)
    data = [{"name": "d", "path": str(root / ("chat.jsonl" if fmt == "chat" else "prefs.jsonl")), "format": fmt,
             "split": "90,10,0"}]
    task = write_task(tmp_path, plan, "s", out=out, datasets=data, tokenizer=str(root / "tokenizer.json"),
                      vocab_size=tok.vocab_size, parents=parents, max_steps=max_steps)
    return runners.RUNNERS[kind](stage.load_task(task))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_stopped_stage_resumes_to_bit_identical_final_weights(tmp_path, world, case):
    from nemoc.runtime.faults import differing_tensors
    from nemoc.runtime.metrics import read_records

    full = _run(tmp_path, world, case, tmp_path / "full")
    part = tmp_path / "part"
    first = _run(tmp_path, world, case, part, max_steps=STOP_AT)
    saved = part / "checkpoints" / ("actor" if CASES[case][0] == "ppo" else "")
    assert first["steps"] == STOP_AT and (saved / f"iter_{EVERY:07d}").is_dir()
    second = _run(tmp_path, world, case, part)
    assert second["resumed_from"] == EVERY, second
    assert not differing_tensors(second["checkpoint"], full["checkpoint"])
    assert second["final_loss"] == full["final_loss"]
    if CASES[case][2]:
        assert second["adapter_parameters"] == full["adapter_parameters"] > 0
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, STEPS + 1))  # one record per step: the resume rewound steps 4-5
    assert [r["step"] for r in read_records(part / "metrics.jsonl") if "loss" in r] == steps


def test_a_load_that_fails_half_way_leaves_the_model_untouched(world, mcore, tmp_path):
    """A truncated shard (manifest gone, so only the load itself can notice) fails the load after some
    tensors were read: none of them reaches the model (all or nothing)."""
    from nemoc.runtime import checkpoint as ckpt
    from nemoc.runtime.align import lora

    root, spec, tok = world
    mcore.seed_all(11)
    other = mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48)
    ckpt.save_weights(str(tmp_path / "other"), chunks=[other])
    (tmp_path / "other" / ckpt.MANIFEST).unlink()
    shard = max((p for p in (tmp_path / "other").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as handle:
        handle.truncate(int(shard.stat().st_size * 0.6))
    mcore.seed_all(12)
    model = mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48)
    lora.apply_lora(model, _lora(), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(BaseException):  # torch's CheckpointException derives from BaseException
        ckpt.load_weights(str(tmp_path / "other"), chunks=[model])
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_that_hits_a_full_disk_removes_its_temporary_and_keeps_latest(world, mcore, tmp_path, monkeypatch,
                                                                            async_save):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from nemoc.runtime import checkpoint as ckpt

    root, spec, tok = world
    model = mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48)
    saver = ckpt.Checkpointer(root=str(tmp_path / "ck"), keep=3, async_save=async_save)
    state = lambda it: ckpt.training_state(chunks=[model], optimizer=None, scheduler=None, iteration=it,  # noqa: E731
                                           consumed_samples=0)
    saver.save(state(1), iteration=1)
    saver.maybe_finalize(blocking=True)

    def full_disk(*args, **kwargs):  # torch's _write_item(transforms, stream, data, write_item, storage_key, ...)
        stream = next((a for a in args if hasattr(a, "write") and hasattr(a, "name")), None)
        raise OSError(errno.ENOSPC, "No space left on device", getattr(stream, "name", None))

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk)  # the forked writers inherit it
    with pytest.raises(ckpt.CheckpointSaveError) as caught:
        saver.save(state(2), iteration=2)
        saver.maybe_finalize(blocking=True)  # an async save's failure surfaces when it is finalized
    message = str(caught.value)
    assert message.startswith("checkpoint save failed at step 2: No space left on device (")
    assert str(tmp_path / "ck" / "iter_0000002.tmp") in message
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["iter_0000001", "latest"]
    assert ckpt.read_latest(str(tmp_path / "ck")).endswith("iter_0000001")
    assert ckpt.verify(ckpt.read_latest(str(tmp_path / "ck"))) is None
    saver.close()


def test_an_async_save_is_digested_by_its_writer_before_latest_moves(world, mcore, tmp_path, monkeypatch):
    """The forked writer digests the shards it wrote (a sidecar file); the finalize step only digests
    the metadata rank 0 writes, then publishes the manifest and moves `latest`."""
    from nemoc.runtime import checkpoint as ckpt

    root, spec, tok = world
    model = mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48)
    digested_here = []
    original = ckpt._file_entries

    def recording(directory, names):
        digested_here.extend(names)
        return original(directory, names)

    monkeypatch.setattr(ckpt, "_file_entries", recording)  # the forked writer records into its own copy
    saver = ckpt.Checkpointer(root=str(tmp_path / "ck"), keep=3, async_save=True)
    saver.save(ckpt.training_state(chunks=[model], optimizer=None, scheduler=None, iteration=1, consumed_samples=0),
               iteration=1)
    saver.close()
    path = ckpt.read_latest(str(tmp_path / "ck"))
    assert path is not None and ckpt.verify(path) is None
    files = ckpt.read_manifest(path)["files"]
    shards = [n for n in files if n.startswith("__0_")]
    assert shards and not [n for n in digested_here if n.startswith("__0_")], digested_here
    assert not [n for n in files if n.startswith(".nemoc_digests")]
    assert not [n for n in os.listdir(path) if n.startswith(".nemoc_digests")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_to_an_sft_stage_saves_exits_143_and_the_rerun_is_bit_identical(world, tmp_path, sig):
    """`python -m nemoc.runtime.align`: Ctrl-C / SIGTERM mid-run finishes the step, saves, exits 143."""
    import signal
    import subprocess
    import sys
    import time

    from nemoc.runtime.faults import differing_tensors
    from nemoc.runtime.metrics import read_records

    root, spec, tok = world
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("s", "sft", ("base",), {"pack": False}, _lora(), 60)],
                     checkpoint_every=25, log_every=1)
    data = [{"name": "d", "path": str(root / "chat.jsonl"), "format": "chat", "split": "90,10,0"}]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_ADDR", None)

    def task(out):
        return write_task(tmp_path, plan, "s", out=out, datasets=data, tokenizer=str(root / "tokenizer.json"),
                          vocab_size=tok.vocab_size, parents={"base": str(root / "base")})

    def start(path):
        return subprocess.Popen([sys.executable, "-m", "nemoc.runtime.align", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    whole = start(task(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
    out = tmp_path / "part"
    path = task(out)
    proc = start(path)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if max((r["step"] for r in read_records(out / "metrics.jsonl") if "loss" in r), default=0) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "re-run to resume" in stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert 3 <= int(latest[5:]) < 60 and not list((out / "checkpoints").glob("*.tmp"))
    rerun = start(path)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()[-3000:]
    done = json.loads((out / "DONE.json").read_text())
    assert done["resumed_from"] == int(latest[5:])
    assert not differing_tensors(done["checkpoint"], json.loads((tmp_path / "whole" / "DONE.json").read_text())["checkpoint"])
