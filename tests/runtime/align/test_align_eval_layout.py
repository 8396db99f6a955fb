"""The eval stage runs at its stage's layout: at TP=2 (two processes, the weights sharded) it reports what
one process reports (response loss, held-out preference likelihoods, KV-cached generations), so a model whose weights exceed one GPU can be evaluated."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from align_helpers import arithmetic_world, make_plan, write_task


def _run(task_path, nproc: int):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    module = ["-m", "nemoc.runtime.align"] if nproc == 1 else ["--module", "nemoc.runtime.align"]
    return subprocess.run([*head, *module, str(task_path)], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_eval_at_tp2_reports_what_one_process_reports(mcore, tmp_path):
    from plan_factory import make_execution

    root, spec, tok, qa = arithmetic_world(tmp_path, mcore, seed=7)
    spec = dataclasses.replace(spec, vocab=512)  # no vocabulary padding at tp=1 or tp=2: the same softmax
    mcore.seed_all(7)
    mcore.save_model(mcore.build_gpt(spec, mcore.single_layout(), vocab=512, seq_length=48), root / "base512")
    params = {"prompts": ["What is 1 plus 2?"], "max_new_tokens": 4}
    # held-out preference pairs (the right sum against a wrong one): summed reply log-probs at TP=2 too
    (root / "prefs.jsonl").write_text("\n".join(json.dumps({"prompt": q, "chosen": r, "rejected": r.replace(" is ", " is 1")})
                                                for q, r in qa) + "\n")
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("eval", "eval", ("base",), params, None, 0)])
    results = {}
    for tp in (1, 2):
        stage = plan.stage("eval")
        layout = dataclasses.replace(stage.layout, tp=tp, dp=1, micro_batch=2, global_batch=2, num_microbatches=1)
        stage = dataclasses.replace(stage, layout=layout, execution=make_execution(spec, layout, kind="eval"))
        at = dataclasses.replace(plan, stages=(plan.stage("base"), stage))
        out = tmp_path / f"tp{tp}"
        out.mkdir()
        task = write_task(out, at, "eval", datasets=[{"name": "c", "path": str(root / "chat.jsonl"), "format": "chat"},
                                                {"name": "p", "path": str(root / "prefs.jsonl"), "format": "preference"}],
                          tokenizer=str(root / "tokenizer.json"), vocab_size=512,
                          parents={"base": str(root / "base512")}, out=out / "task")
        proc = _run(task, tp)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[tp] = json.loads((out / "task" / "results.json").read_text())
    one, two = results[1]["datasets"]["c"], results[2]["datasets"]["c"]
    assert one["tokens"] == two["tokens"] > 0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    pone, ptwo = results[1]["datasets"]["p"], results[2]["datasets"]["p"]
    assert pone["likelihood_accuracy"] == ptwo["likelihood_accuracy"]
    assert ptwo["likelihood_margin"] == pytest.approx(pone["likelihood_margin"], rel=1e-4, abs=1e-4)
    assert [g["completion"] for g in results[2]["generations"]] == [g["completion"] for g in results[1]["generations"]]
