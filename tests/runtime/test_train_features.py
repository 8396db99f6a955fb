"""Slow feature matrix of the training core (CPU/gloo, multi-process): VPP, SP, distributed optimizer
with async saves and a DP-resharded resume, recompute, bf16, the SDPA attention core, MoE expert
parallelism, preemption by SIGTERM, and a failing rank that must fail the job promptly."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow
REL = 2e-5


def _same(result, baseline, *, rel=REL, steps=range(1, 7)):
    assert result.returncode == 0, result.explain()
    for step in steps:
        assert result.losses[step] == pytest.approx(baseline.losses[step], rel=rel), (step, result.losses,
                                                                                    baseline.losses)


@pytest.mark.parametrize("sizes,nproc", [
    (dict(pp=2, vp=2), 2),  # interleaved 1F1B, unbatched p2p on gloo
    (dict(tp=2, sp=True), 2),  # sequence parallel (norm grads all-reduced over TP)
    (dict(tp=2, pp=2), 4),
    (dict(recompute="full"), 1),
    (dict(recompute="full", recompute_layers=2), 1),  # block: 2 of the 4 layers replay (recompute_method block)
    (dict(recompute="selective"), 1),
    # selective recompute of the MLP and both norms (recompute_modules; the norms through Megatron's
    # CheckpointWithoutOutput, which needs the no-TE fix in runtime/mcore_cpu.py), and all three with TP + SP
    (dict(recompute="selective", recompute_modules=("mlp", "layernorm")), 1),
    (dict(tp=2, sp=True, recompute="selective", recompute_modules=("core_attn", "mlp", "layernorm")), 2),
], ids=["pp2-vp2", "tp2-sp", "tp2-pp2", "recompute-full", "recompute-block", "recompute-selective",
        "recompute-mlp-layernorm", "recompute-modules-tp2-sp"])
def test_more_layouts_reproduce_single_process(tmp_path, kit, train_data, reference_weights, baseline, sizes, nproc):
    lay = kit.layout(**sizes)
    result = kit.run_training(tmp_path / "run", kit.make_plan(kit.stage_plan(lay=lay, every=3)), nproc,
                              data_prefix=train_data, init_checkpoint=reference_weights)
    _same(result, baseline)


def test_distributed_optimizer_async_save_and_dp_resharded_resume(tmp_path, kit, train_data, reference_weights,
                                                                   baseline):
    lay = kit.layout(dp=2, dist_opt=True)
    plan = kit.make_plan(kit.stage_plan(lay=lay, every=3, async_save=True))
    result = kit.run_training(tmp_path / "dp2", plan, 2, data_prefix=train_data, init_checkpoint=reference_weights)
    _same(result, baseline)
    saves = [r for r in result.records if r.get("event") == "checkpoint"]
    assert [s["iteration"] for s in saves] == [3, 6] and all(s["async_save"] for s in saves)
    # resume the DP=2 distributed-optimizer checkpoint with DP=1: dp_reshardable reshards across DP
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    os.rename(result.out / "checkpoints" / "iter_0000003", ckdir / "iter_0000003")
    (ckdir / "latest").write_text("iter_0000003\n")
    plan1 = kit.make_plan(kit.stage_plan(lay=kit.layout(dist_opt=True), every=3))
    resumed = kit.run_training(tmp_path / "dp1", plan1, 1, data_prefix=train_data, checkpoint_dir=ckdir)
    assert resumed.returncode == 0, resumed.explain()
    event = next(r for r in resumed.records if r.get("event") == "resumed")
    assert event["iteration"] == 3 and event["optimizer_restored"]
    _same(resumed, baseline, steps=(4, 5, 6))


def test_bf16_and_the_sdpa_core_track_the_fp32_curve(tmp_path, kit, train_data, reference_weights, baseline):
    stage = kit.stage_plan(lay=kit.layout(), every=3)
    flash = kit.run_training(tmp_path / "flash", kit.make_plan(stage, attention="flash"), 1, data_prefix=train_data,
                             init_checkpoint=reference_weights)
    _same(flash, baseline, rel=1e-4)
    bf16 = kit.run_training(tmp_path / "bf16", kit.make_plan(stage, precision="bf16"), 1, data_prefix=train_data,
                            init_checkpoint=reference_weights)
    _same(bf16, baseline, rel=2e-2)
    fp16 = kit.run_training(tmp_path / "fp16", kit.make_plan(stage, precision="fp16"), 1, data_prefix=train_data,
                            init_checkpoint=reference_weights)
    _same(fp16, baseline, rel=5e-3)
    assert all(r["loss_scale"] == 2.0**16 for r in fp16.records if "loss" in r)  # dynamic scaler, no overflow
    flash_tp2 = kit.run_training(tmp_path / "flash_tp2", kit.make_plan(kit.stage_plan(lay=kit.layout(tp=2), every=3),
                                                                        attention="flash"),
                                 2, data_prefix=train_data, init_checkpoint=reference_weights)
    _same(flash_tp2, flash)


def test_moe_expert_parallel_reproduces_single_process(tmp_path, kit, train_data):
    moe = dataclasses.replace(kit.TINY, name="tiny-moe", experts=4, top_k=2, moe_ffn_hidden=64)
    ref = kit.run_training(tmp_path / "ref", kit.make_plan(kit.stage_plan(lay=kit.layout()), model=moe), 1,
                           data_prefix=train_data, max_steps=0)
    assert ref.returncode == 0, ref.explain()
    weights = ref.done["checkpoint"]
    runs = {}
    # ep2-allgather: the plan's `moe_dispatcher = allgather` at EP 2 (the local spec's auto is alltoall there)
    for name, lay, nproc, dispatcher in (("ws1", kit.layout(), 1, None), ("ep2", kit.layout(dp=2, ep=2), 2, None),
                                         ("ep2-allgather", kit.layout(dp=2, ep=2), 2, "allgather")):
        plan = kit.make_plan(kit.stage_plan(lay=lay, steps=4), model=moe)
        if dispatcher is not None:
            st = plan.stages[0]
            moe_ex = dataclasses.replace(st.execution.moe, dispatcher=dispatcher)
            plan = dataclasses.replace(plan, stages=(dataclasses.replace(
                st, execution=dataclasses.replace(st.execution, moe=moe_ex)),))
        runs[name] = kit.run_training(tmp_path / name, plan, nproc, data_prefix=train_data, init_checkpoint=weights)
        assert runs[name].returncode == 0, runs[name].explain()
    for step in range(1, 5):
        assert runs["ep2"].losses[step] == pytest.approx(runs["ws1"].losses[step], rel=REL)
        assert runs["ep2-allgather"].losses[step] == pytest.approx(runs["ws1"].losses[step], rel=REL)


def _wait_for_step(metrics_path, step, proc, deadline_s=240):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training exited before it was signalled"
        if metrics_path.exists():
            steps = [json.loads(x).get("step", 0) for x in metrics_path.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def test_sigterm_finishes_the_step_saves_and_exits_143_then_resumes(tmp_path, kit, train_data, reference_weights):
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), steps=400, every=None))
    out = tmp_path / "run"
    task = kit.write_task(out, plan, data_prefix=train_data, init_checkpoint=reference_weights)
    proc = subprocess.Popen([sys.executable, "-m", "nemoc.runtime.train", str(task)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=kit.torchrun_env(), cwd=str(kit.REPO))
    try:
        _wait_for_step(out / "metrics.jsonl", 3, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    preempted = json.loads((out / "PREEMPTED.json").read_text())
    assert preempted["signal"] == "SIGTERM" and not (out / "DONE.json").exists()
    step = preempted["steps"]
    assert preempted["checkpoint"].endswith(f"iter_{step:07d}")
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{step:07d}"
    # the requeued job resumes from it (here: only 2 more steps)
    kit.write_task(out, plan, data_prefix=train_data, init_checkpoint=reference_weights, max_steps=step + 2)
    again = kit.launch(out / "task.json", 1)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"resumed"' in x]
    assert resumed and resumed[-1]["iteration"] == step
    assert json.loads((out / "DONE.json").read_text())["steps"] == step + 2


def test_a_killed_rank_fails_the_job_promptly(tmp_path, kit, train_data):
    import psutil

    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(dp=2), steps=400))
    out = tmp_path / "run"
    task = kit.write_task(out, plan, data_prefix=train_data, timeout_s=60)
    proc = subprocess.Popen([str(kit.VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m",
                             "nemoc.runtime.train", str(task)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=kit.torchrun_env(), cwd=str(kit.REPO))
    try:
        _wait_for_step(out / "metrics.jsonl", 2, proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "nemoc.runtime.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        assert workers, "rank 1 worker not found"
        workers[0].kill()
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=150)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 90, f"the job took {elapsed:.0f} s to fail after rank 1 died"
    assert not (out / "DONE.json").exists()


def test_fully_reshardable_distributed_optimizer_resumes_under_tp2(tmp_path, kit, train_data, reference_weights,
                                                                   baseline):
    """params.optimizer_checkpoint_format = fully_reshardable: the distributed optimizer's Adam state
    follows a TP=1 -> TP=2 change (the dp_reshardable default would restart the moments)."""
    params = {"eval_iters": 2, "optimizer_checkpoint_format": "fully_reshardable"}
    lay1 = kit.layout(dist_opt=True)
    first = kit.run_training(tmp_path / "tp1", kit.make_plan(kit.stage_plan(lay=lay1, every=3, params=params)), 1,
                             data_prefix=train_data, init_checkpoint=reference_weights, max_steps=3)
    _same(first, baseline, steps=(1, 2, 3))
    lay2 = kit.layout(tp=2, dist_opt=True)
    second = kit.run_training(tmp_path / "tp2", kit.make_plan(kit.stage_plan(lay=lay2, every=3, params=params)), 2,
                              data_prefix=train_data, checkpoint_dir=first.out / "checkpoints")
    event = next(r for r in second.records if r.get("event") == "resumed")
    assert event["iteration"] == 3 and event["optimizer_restored"], second.explain()
    _same(second, baseline, steps=(4, 5, 6))


def test_sigterm_to_torchrun_reaches_every_rank_and_saves(tmp_path, kit, train_data):
    """The real launcher path: torchrun re-sends SIGTERM to its workers; they agree on the step, save
    one checkpoint and write PREEMPTED.json (torchrun's own status is 1: the launcher reads the file)."""
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(dp=2), steps=400))
    out = tmp_path / "run"
    task = kit.write_task(out, plan, data_prefix=train_data)
    proc = subprocess.Popen([str(kit.VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m",
                             "nemoc.runtime.train", str(task)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=kit.torchrun_env(), cwd=str(kit.REPO))
    try:
        _wait_for_step(out / "metrics.jsonl", 3, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    preempted = json.loads((out / "PREEMPTED.json").read_text())
    assert preempted["signal"] == "SIGTERM" and preempted["steps"] >= 3
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{preempted['steps']:07d}"
    from nemoc.runtime import checkpoint as ckpt

    assert ckpt.verify(preempted["checkpoint"]) is None


@pytest.mark.parametrize("sizes", [dict(dp=2), dict(pp=2)], ids=["dp2", "pp2"])
def test_single_process_checkpoint_resumes_under_dp2_and_pp2(tmp_path, kit, train_data, baseline, sizes):
    """A single-process checkpoint resumed with DP=2 (the DP ranks split the reads of replicated
    shards, FullyParallelLoadStrategyWrapper, and exchange them) or PP=2 (layers resharded over
    stages): the curve continues."""
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    import shutil

    shutil.copytree(baseline.out / "checkpoints" / "iter_0000003", ckdir / "iter_0000003")
    (ckdir / "latest").write_text("iter_0000003\n")
    lay = kit.layout(**sizes)
    result = kit.run_training(tmp_path / "run", kit.make_plan(kit.stage_plan(lay=lay, every=3)), 2,
                              data_prefix=train_data, checkpoint_dir=ckdir)
    event = next(r for r in result.records if r.get("event") == "resumed")
    assert event["iteration"] == 3 and event["optimizer_restored"], result.explain()
    _same(result, baseline, steps=(4, 5, 6))


def test_manual_gc_collects_on_its_interval_and_leaves_the_losses(tmp_path, kit, train_data, reference_weights,
                                                                   baseline):
    """The plan's manual GC (`Execution.host`, Megatron-LM's `manual_gc`): automatic collection off, a full
    collection on every rank every `manual_gc_interval` steps (here 2), the losses those of the baseline;
    each log record says how many collections ran and how long they took."""
    from nemoc.compiler.plan import HostExecution

    stage = kit.stage_plan(lay=kit.layout(dp=2), every=3)
    plan = kit.make_plan(stage)
    host = HostExecution("none", (), True, 2)
    plan = dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(s, execution=dataclasses.replace(s.execution, host=host)) for s in plan.stages))
    result = kit.run_training(tmp_path / "gc", plan, 2, data_prefix=train_data, init_checkpoint=reference_weights)
    _same(result, baseline)
    steps = {r["step"]: r for r in result.records if "gc_full_collections" in r}
    assert [steps[s]["gc_full_collections"] for s in range(2, 7)] == [1, 0, 1, 0, 1]
    assert all(steps[s]["gc_pause_s"] > 0 for s in (2, 4, 6))
    assert all(steps[s]["gc_collections"] == 0 for s in (3, 5))  # the automatic collector is off
