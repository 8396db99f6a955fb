"""The eval stage runs at its stage's layout: at TP=2 (two processes, the weights sharded; with and without
sequence parallelism), at PP=2 (each process one pipeline stage: every loss through forward-only schedules,
the generations decoded stage after stage) and for a mixture-of-experts model at EP=2 (the experts split over the data-parallel ranks) and TP=2 it
reports what one process reports (validation-document loss, response loss, held-out preference
likelihoods, KV-cached generations), so a model whose weights exceed one GPU can be evaluated."""

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


def _documents(prefix, tok, qa) -> str:
    """An indexed data set (Megatron's .bin/.idx) of the arithmetic sentences, one document each, ending in EOD."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for q, r in qa:
        doc = np.array(tok.tokenize(q + " " + r) + [tok.eod], dtype=np.int32)
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _eval_at_layouts(tmp_path, plan, spec, *, layouts: dict, datasets, tokenizer, vocab: int, parents,
                     attention: str = "unfused") -> dict:
    """results.json of the plan's `eval` stage run at each {name: (nproc, Layout fields)}."""
    from plan_factory import make_execution

    results = {}
    for name, (nproc, fields) in layouts.items():
        stage = plan.stage("eval")
        layout = dataclasses.replace(stage.layout, **fields)
        stage = dataclasses.replace(stage, layout=layout, execution=make_execution(spec, layout, kind="eval",
                                                                                   attention=attention))
        at = dataclasses.replace(plan, stages=(*[s for s in plan.stages if s.name != "eval"], stage))
        out = tmp_path / name
        out.mkdir()
        task = write_task(out, at, "eval", datasets=datasets, tokenizer=tokenizer, vocab_size=vocab, parents=parents,
                          out=out / "task")
        proc = _run(task, nproc)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[name] = json.loads((out / "task" / "results.json").read_text())
    return results


def _assert_same_numbers(one: dict, other: dict) -> None:
    """Every loss / likelihood of `other` is `one`'s to 1e-5 relative; the generations are the same text."""
    assert other["datasets"].keys() == one["datasets"].keys() and one["datasets"]
    for name, a in one["datasets"].items():
        b = other["datasets"][name]
        if "loss" in a:
            assert b["tokens"] == a["tokens"] > 0, name
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), name
            assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5), name
        if "likelihood_accuracy" in a:
            assert b["likelihood_accuracy"] == a["likelihood_accuracy"], name
            assert b["likelihood_margin"] == pytest.approx(a["likelihood_margin"], rel=1e-5, abs=1e-6), name
        if "preference_accuracy" in a:  # against a reference parent: r = beta (log pi - log ref)
            assert b["preference_accuracy"] == a["preference_accuracy"], name
            assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-5, abs=1e-6), name
    assert [g["completion"] for g in other["generations"]] == [g["completion"] for g in one["generations"]]
    assert one["generations"] and all(g["tokens"] > 0 for g in one["generations"])


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


@pytest.mark.slow
def test_eval_at_tp2_with_sequence_parallelism_reports_what_one_process_reports(mcore, tmp_path):
    """Tensor parallelism 2 with sequence parallelism (what the planner gives eval at tp > 1 now): the loss and
    log-prob passes run with the activations split along the sequence over the two ranks, the generations
    decode with the split switched off (runtime/model.py `unsplit_sequence`: a decode step's one token per row
    cannot be scattered; before it, the prefill crashed in the embedding's reduce-scatter). One process's
    numbers and text."""
    root, spec, tok, qa = arithmetic_world(tmp_path, mcore, seed=7)
    spec = dataclasses.replace(spec, vocab=512)  # no vocabulary padding at tp=1 or tp=2: the same softmax
    mcore.seed_all(7)
    mcore.save_model(mcore.build_gpt(spec, mcore.single_layout(), vocab=512, seq_length=48), root / "base512")
    params = {"prompts": ["What is 1 plus 2?", "What is 4 plus 4?"], "max_new_tokens": 4, "max_windows": 8}
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("eval", "eval", ("base",), params, None, 0)])
    base = dict(pp=1, dp=1, micro_batch=2, global_batch=2, num_microbatches=1)
    results = _eval_at_layouts(tmp_path, plan, spec,
                               layouts={"one": (1, dict(base, tp=1, sequence_parallel=False)),
                                        "tp2sp": (2, dict(base, tp=2, sequence_parallel=True))},
                               datasets=_datasets(root, tok, qa), tokenizer=str(root / "tokenizer.json"),
                               vocab=512, parents={"base": str(root / "base512")})
    _assert_same_numbers(results["one"], results["tp2sp"])


def _datasets(root, tok, qa) -> list[dict]:
    """A validation-document set, a chat set and a preference set (the right sum against a wrong one)."""
    (root / "prefs.jsonl").write_text("\n".join(json.dumps({"prompt": q, "chosen": r, "rejected": r.replace(" is ", " is 1")})
                                                for q, r in qa) + "\n")
    prefix = _documents(root / "docs", tok, qa)
    return [{"name": "docs", "prefix": prefix, "format": "text", "split": "50,50,0"},
            {"name": "c", "path": str(root / "chat.jsonl"), "format": "chat"},
            {"name": "p", "path": str(root / "prefs.jsonl"), "format": "preference"}]


@pytest.mark.slow
def test_eval_at_pp2_reports_what_one_process_reports(mcore, tmp_path):
    """Pipeline parallelism 2: rank 0 holds the first layer, rank 1 the second and the output layer; the losses
    and the log-probs of the policy and of its reference (a second parent, a second model at the same layout)
    are reduced on the last stage (forward-only schedules) and written once, the generations decoded across
    both stages (runtime/generation.py)."""
    root, spec, tok, qa = arithmetic_world(tmp_path, mcore, seed=7)
    mcore.seed_all(8)  # a reference that differs from the policy: non-zero implicit rewards
    mcore.save_model(mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48), root / "ref")
    params = {"prompts": ["What is 1 plus 2?", "What is 4 plus 4?"], "max_new_tokens": 4, "max_windows": 8}
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("ref", "pretrain", (), {}, None, 1),
                            ("eval", "eval", ("base", "ref"), params, None, 0)])
    base = dict(tp=1, dp=1, micro_batch=2, global_batch=2, num_microbatches=1)
    results = _eval_at_layouts(tmp_path, plan, spec, layouts={"one": (1, dict(base, pp=1)), "pp2": (2, dict(base, pp=2))},
                               datasets=_datasets(root, tok, qa), tokenizer=str(root / "tokenizer.json"),
                               vocab=tok.vocab_size, parents={"base": str(root / "base"), "ref": str(root / "ref")})
    _assert_same_numbers(results["one"], results["pp2"])
    assert results["pp2"]["reference"] == "ref" and "reward_margin" in results["one"]["datasets"]["p"]



@pytest.mark.slow
def test_a_mixture_of_experts_model_evaluates_at_ep2_and_tp2_as_in_one_process(mcore, tmp_path):
    """A tiny Mixtral-style model (4 experts, top-2 routing, Megatron's MoELayer): at EP=2 each of the two
    data-parallel ranks holds two experts and the alltoall dispatcher sends tokens to them; at TP=2 the weights
    are sharded, without sequence parallelism (Megatron refuses MoE at tp > 1 without SP only in training) and
    with it (what the planner gives eval at tp > 1: the generations decode with it switched off, runtime/model.py
    `unsplit_sequence`, each TP rank's MoE layers then routing the whole window). The numbers are one
    process's (dropless routing, so no token is dropped at any layout)."""
    root, dense, tok, qa = arithmetic_world(tmp_path, mcore, seed=5)
    spec = dataclasses.replace(dense, experts=4, top_k=2, moe_ffn_hidden=64, vocab=512)  # 512: no padding at tp 2
    mcore.seed_all(5)
    model = mcore.build_gpt(spec, mcore.single_layout(), vocab=512, seq_length=48, attention_backend="flash")
    assert type(mcore.unwrap(model).decoder.layers[0].mlp).__name__ == "MoELayer"
    mcore.save_model(model, root / "moe")
    params = {"prompts": ["What is 2 plus 3?"], "max_new_tokens": 4, "max_windows": 8}
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("eval", "eval", ("base",), params, None, 0)])
    base = dict(pp=1, micro_batch=2, num_microbatches=1, sequence_parallel=False)
    results = _eval_at_layouts(tmp_path, plan, spec,
                               layouts={"one": (1, dict(base, tp=1, dp=1, ep=1, global_batch=2)),
                                        "ep2": (2, dict(base, tp=1, dp=2, ep=2, global_batch=4)),
                                        "tp2": (2, dict(base, tp=2, dp=1, ep=1, etp=1, global_batch=2)),
                                        "tp2sp": (2, dict(base, tp=2, dp=1, ep=1, etp=1, global_batch=2,
                                                          sequence_parallel=True))},
                               datasets=_datasets(root, tok, qa), tokenizer=str(root / "tokenizer.json"),
                               vocab=512, parents={"base": str(root / "moe")}, attention="flash")
    _assert_same_numbers(results["one"], results["ep2"])
    _assert_same_numbers(results["one"], results["tp2"])
    _assert_same_numbers(results["one"], results["tp2sp"])


def _te_ready() -> bool:
    import torch

    from nemoc.runtime import mcore_cpu
    from nemoc.runtime.model import have_transformer_engine

    return torch.cuda.is_available() and not mcore_cpu.is_applied() and have_transformer_engine()


def _eval_in_process(tmp_path, world, *, kernels: str) -> tuple[dict, object]:
    """results.json of an eval stage planned with `kernels` (run by evaluate.run in this process), and the
    model its stage builds."""
    from plan_factory import make_execution

    from nemoc.runtime.align import evaluate, stage as align_stage

    root, spec, tok, qa = world
    params = {"prompts": ["What is 1 plus 2?"], "max_new_tokens": 4, "max_windows": 4}
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1), ("eval", "eval", ("base",), params, None, 0)])
    ev = plan.stage("eval")
    ev = dataclasses.replace(ev, execution=make_execution(spec, ev.layout, kind="eval", attention="flash",
                                                          kernels=kernels, gpu="H100"))
    out = tmp_path / kernels
    out.mkdir()
    task_path = write_task(out, dataclasses.replace(plan, stages=(plan.stage("base"), ev)), "eval",
                           datasets=_datasets(root, tok, qa), tokenizer=str(root / "tokenizer.json"),
                           vocab_size=tok.vocab_size, parents={"base": str(root / "base")}, out=out / "task")
    task = align_stage.load_task(str(task_path))
    evaluate.run(task)
    return json.loads((out / "task" / "results.json").read_text()), align_stage.build(task, checkpoint=None)


@pytest.mark.gpu
@pytest.mark.skipif(not _te_ready(), reason="needs a CUDA GPU with Transformer Engine")
def test_eval_planned_with_te_kernels_builds_te_layers_and_reports_the_local_specs_numbers(mcore, tmp_path):
    """kernels = te (what the planner gives a GPU eval stage now that the target says eval has a TE path):
    the stage builds Transformer Engine's layer spec, as sft does (runtime/core/build.py), and its losses,
    likelihoods and greedy generations are the local spec's (fp32; TE's kernels differ in summation order)."""
    world = arithmetic_world(tmp_path, mcore, seed=3)
    local, _ = _eval_in_process(tmp_path, world, kernels="local")
    te, model = _eval_in_process(tmp_path, world, kernels="te")
    names = [name for name, _ in mcore.unwrap(model).named_parameters()]
    assert any("layer_norm_weight" in name for name in names), names[:8]  # TE's fused LayerNorm-linear
    for name, a in local["datasets"].items():
        b = te["datasets"][name]
        for key in ("loss", "likelihood_margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-3), (name, key)
    assert [g["completion"] for g in te["generations"]] == [g["completion"] for g in local["generations"]]


def test_generations_under_virtual_pipeline_stages_are_refused_with_the_way_out(mcore, tmp_path):
    """The pipelined generator runs one model chunk per rank; the planner never gives eval virtual stages (and
    a stage's own `virtual_pipeline` is E126), so only a hand-made plan gets here: refused before any model
    is built, naming both ways out."""
    from nemoc.runtime.align import evaluate, stage as align_stage
    from nemoc.runtime.align.common import AlignError

    root, spec, tok, qa = arithmetic_world(tmp_path, mcore, seed=2)
    plan = make_plan(spec, [("base", "pretrain", (), {}, None, 1),
                            ("eval", "eval", ("base",), {"prompts": ["What is 1 plus 1?"]}, None, 0)])
    ev = plan.stage("eval")
    ev = dataclasses.replace(ev, layout=dataclasses.replace(ev.layout, pp=2, vp=2))
    task_path = write_task(tmp_path, dataclasses.replace(plan, stages=(plan.stage("base"), ev)), "eval",
                           datasets=[{"name": "c", "path": str(root / "chat.jsonl"), "format": "chat"}],
                           tokenizer=str(root / "tokenizer.json"), vocab_size=tok.vocab_size,
                           parents={"base": str(root / "base")})
    with pytest.raises(AlignError, match=r"virtual_pipeline = 2: drop it, or the prompts"):
        evaluate.run(align_stage.load_task(str(task_path)))
