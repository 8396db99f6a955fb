"""Correctness of the training core on CPU/gloo: parallel layouts reproduce the single-process run.

Every run starts from the same weights (a world-size-1 checkpoint, resharded by dist_checkpointing
into each layout) and reads the same global batches (Megatron's pretraining-sampler order), so TP,
PP and DP change only the order of floating-point reductions: losses must agree to ~1e-5 relative.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from nemoc.compiler.plan import PipelineSplit

REL = 2e-5  # fp32 reduction-order noise over 6 Adam steps; a wrong gradient is off by >1e-2


def assert_same_curve(result, baseline, *, rel=REL, steps=range(1, 7)):
    assert result.returncode == 0, result.explain()
    got, want = result.losses, baseline.losses
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=rel), (step, got, want)


def test_baseline_learns_and_finishes(baseline):
    losses = baseline.losses
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(5.0 < v < 6.0 for v in losses.values())  # ~ln(256) at the start: a sane init
    done = baseline.done
    assert done["steps"] == 6 and done["checkpoint"].endswith("iter_0000006")
    assert done["final_loss"] == pytest.approx(losses[6])
    for record in baseline.records:
        if "loss" in record:
            assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(record)
    # warmup 2 steps to lr 3e-3, cosine to 3e-4 at step 6
    lrs = {r["step"]: r["lr"] for r in baseline.records if "lr" in r}
    assert lrs[2] == pytest.approx(3e-3) and lrs[6] == pytest.approx(3e-4)


@pytest.mark.parametrize("sizes", [dict(tp=2), dict(pp=2), dict(dp=2)], ids=["tp2", "pp2", "dp2"])
def test_layout_reproduces_single_process(tmp_path, kit, train_data, reference_weights, baseline, sizes):
    lay = kit.layout(**sizes)
    result = kit.run_training(tmp_path / "run", kit.make_plan(kit.stage_plan(lay=lay, every=3)), lay.world_size,
                          data_prefix=train_data, init_checkpoint=reference_weights)
    assert_same_curve(result, baseline)
    grad = {r["step"]: r["grad_norm"] for r in result.records if "grad_norm" in r}
    base_grad = {r["step"]: r["grad_norm"] for r in baseline.records if "grad_norm" in r}
    assert grad[1] == pytest.approx(base_grad[1], rel=1e-4)


def test_uneven_pipeline_split_reproduces_single_process(tmp_path, kit, train_data, reference_weights, baseline):
    """pp=2 with 1 + 3 layers (the planner's num_layers_in_first_pipeline_stage) trains the same model."""
    lay = kit.layout(pp=2)
    stage = kit.stage_plan(lay=lay, every=3)
    stage = replace(stage, execution=replace(stage.execution, pipeline=PipelineSplit(first=1, last=None, per_stage=3)))
    result = kit.run_training(tmp_path / "run", kit.make_plan(stage), lay.world_size,
                              data_prefix=train_data, init_checkpoint=reference_weights)
    assert_same_curve(result, baseline)


@pytest.fixture(scope="module")
def flash_single(tmp_path_factory, kit, train_data, reference_weights):
    """The one-process run on the local spec's SDPA core (`attention = flash`), the context-parallel
    layouts' reference: same core, same weights, same batches."""
    single = kit.run_training(tmp_path_factory.mktemp("flash_one"),
                              kit.make_plan(kit.stage_plan(lay=kit.layout()), attention="flash"), 1,
                              data_prefix=train_data, init_checkpoint=reference_weights)
    assert single.returncode == 0, single.explain()
    assert single.losses[6] < single.losses[1]  # it learns: the six compared losses are not one flat value
    return single


# cp=2 alone (2 processes), and with tensor (+ sequence) or pipeline parallelism (4 processes): under
# TP the SDPA core sees heads / tp of the all-gathered keys and values (with SP the sequence is gathered
# over the TP group first, then over the CP group); under PP only the first and last stages read the
# batch and each shards its rows; the middle activations are [s / cp, b, h].
CP_LAYOUTS = [dict(cp=2), dict(tp=2, cp=2, sp=True), dict(pp=2, cp=2)]


@pytest.mark.slow
@pytest.mark.parametrize("sizes", CP_LAYOUTS, ids=["cp2", "tp2sp-cp2", "pp2-cp2"])
def test_context_parallel_reproduces_single_process(tmp_path, kit, train_data, reference_weights, flash_single,
                                                    sizes):
    """cp=2 on the local spec's SDPA core (`attention = flash` without Transformer Engine): each rank holds
    Megatron's load-balanced half of every row (get_batch_on_this_cp_rank), attends it over the
    all-gathered keys and values (runtime/model.py SDPAttention._context_parallel), and Megatron's DDP
    averages the gradients over the DP x CP group. Pretraining masks no token (eod_mask_loss = False), so
    each rank's shard mean weighs s / cp tokens and their average is the one-process token mean: the curve
    and the first gradient norm are the one-process run's (same SDPA core, same weights and batches) up to
    fp32 reduction order."""
    lay = kit.layout(**sizes)
    result = kit.run_training(tmp_path / "cp", kit.make_plan(kit.stage_plan(lay=lay), attention="flash"),
                              lay.world_size, data_prefix=train_data, init_checkpoint=reference_weights)
    assert "cp=2" in result.stdout, result.explain()
    assert_same_curve(result, flash_single)
    grad = {r["step"]: r["grad_norm"] for r in result.records if "grad_norm" in r}
    base_grad = {r["step"]: r["grad_norm"] for r in flash_single.records if "grad_norm" in r}
    assert grad[1] == pytest.approx(base_grad[1], rel=1e-4)
