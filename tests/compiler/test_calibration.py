"""Regression bounds on the calibration against published runs (bench/calibrate.py).

The bounds are what the model reaches today (docs/calibration.md); a change that makes the cost
or memory model worse on the published measurements fails here.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def calibrate():
    spec = importlib.util.spec_from_file_location("nemoc_bench_calibrate", ROOT / "bench" / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def results(calibrate):
    rows = calibrate.load_rows()
    return rows, [r for r in calibrate.throughput_errors(rows) if "error" in r]


def test_rows_are_sourced(calibrate) -> None:
    for row in calibrate.load_rows():
        assert row["source"] and row["source_ref"] and row["tokens_per_sec_per_gpu"] > 0


def test_throughput_error_bounds(results) -> None:
    _, used = results
    errors = [abs(r["error"]) for r in used]
    assert len(errors) >= 100
    assert statistics.median(errors) <= 0.035
    assert max(errors) <= 0.28
    assert sum(e <= 0.15 for e in errors) >= 93


def test_reliable_rows_error_bounds(calibrate, results) -> None:
    """Rows with a complete, self-consistent layout and measured (or exactly derived) tokens/s:
    docs/calibration.md explains the one just above 15 % (C11: GB200 vs B200, and its own siblings'
    spread)."""
    _, used = results
    errors = [abs(r["error"]) for r in used if calibrate.reliable(r)]
    assert len(errors) >= 85
    assert statistics.median(errors) <= 0.035
    assert max(errors) <= 0.16
    assert sum(e <= 0.15 for e in errors) >= 87


def test_unreliable_rows_are_few_and_explained(calibrate) -> None:
    assert len(calibrate.UNRELIABLE) <= 4 and all(len(why) > 40 for why in calibrate.UNRELIABLE.values())


def test_pretraining_rows_error_bounds(results) -> None:
    _, used = results
    errors = [abs(r["error"]) for r in used if r["task"] == "pretrain"]
    assert statistics.median(errors) <= 0.035
    assert sum(e <= 0.15 for e in errors) >= 78


def test_no_systematic_bias(results) -> None:
    """Signed errors straddle zero: the model neither always over- nor under-predicts."""
    _, used = results
    signed = [r["error"] for r in used]
    assert abs(statistics.median(signed)) <= 0.02


def test_memory_against_korthikanti_figure_1(calibrate, results) -> None:
    rows, _ = results
    mem = calibrate.memory_errors(rows)
    assert len(mem) == 12
    acts = [abs(r["error"]) for r in mem if "activations" in r["label"]]
    states = [abs(r["error"]) for r in mem if "states" in r["label"]]
    assert max(acts) <= 0.01
    # the figure's states are 18 B x 12 l h^2 / (t p): transformer layers at our bytes per parameter
    assert max(states) <= 0.005


def test_memory_against_bare_megatron_on_h200(calibrate) -> None:
    """Stored single-H200 measurements of bare Megatron-Core (bench/results/megatron_h200.json):
    weights + fp32 grads + Adam states within 1 %, the forward-backward peak within 6 %."""
    rows = calibrate.megatron_errors()
    assert len(rows) >= 10
    for r in rows:
        if "unfused" not in r["name"]:
            assert abs(r["static_error"]) <= 0.01, r
        assert abs(r["peak_error"]) <= 0.06, r


def test_step_time_against_bare_megatron_on_h200(calibrate) -> None:
    """The local-spec path (kernels="local": unfused norms, RoPE, SwiGLU, torch softmax, foreach
    Adam) against the stored single-H200 step times: flash configurations within 10 %, the
    unfused-attention ones within 23 % (under-predicted by ~20 %: the score chain's bytes are counted
    kernel by kernel but run at ~0.65 of the HBM peak on the H200, unexplained without a kernel
    profile: docs/calibration.md)."""
    rows = calibrate.megatron_errors()
    errors = [abs(r["step_error"]) for r in rows]
    assert len(rows) >= 10
    assert statistics.median(errors) <= 0.06
    assert max(errors) <= 0.23
    for r in rows:
        if "unfused" not in r["name"]:
            assert abs(r["step_error"]) <= 0.10, r


def test_planner_route_reproduces_the_direct_estimate(calibrate, results) -> None:
    """A published row written as `.nemo` and planned with its layout fixed gives the same tokens/s
    as calling the cost model directly (rows whose recompute is published, grads are fp32 and whose
    communication overlaps are those of the nemoc runtime: Ampere rows without TP overlap), with
    the runtime's settings where a `.nemo` file cannot state the source's: no dropout, gradient
    reduction overlapped with the backward."""
    import dataclasses

    rows, _ = results
    picked = [r for r in rows if r["id"] in ("G02", "F03", "G01")]
    direct = {r["id"]: calibrate.predict(dataclasses.replace(calibrate.row_case(r), dropout=False,
                                                             overlap_grad_reduce=True)) for r in picked}
    planned = calibrate.planner_errors(picked)
    assert len(planned) == 3
    for r in planned:
        assert "rejected" not in r, r
        assert r["layout_kept"]
        assert r["predicted"] == pytest.approx(direct[r["id"]], rel=1e-9)
