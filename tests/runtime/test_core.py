"""The one training core (runtime/core/): the only place the runtime sets up Megatron's parallel groups,
and the NaN/Inf rerun that every stage kind's step goes through."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def test_only_the_core_initialises_model_parallel_groups():
    callers = sorted(str(p.relative_to(RUNTIME)) for p in RUNTIME.rglob("*.py")
                     if re.search(r"\binitialize_model_parallel\(", p.read_text()))
    assert callers == ["core/dist.py"]


def test_only_the_core_creates_process_groups_and_stop_signals():
    for p in RUNTIME.rglob("*.py"):
        rel = str(p.relative_to(RUNTIME))
        text = p.read_text()
        if rel != "core/dist.py":
            assert "distributed.init_process_group(" not in text, rel
        if rel not in ("faults.py", "core/dist.py"):
            assert not re.search(r"class \w+\(faults\.StopSignal\)", text), rel


def _attempts(values):
    calls = {"n": 0, "rewinds": 0}

    def attempt():
        value = values[calls["n"]]
        calls["n"] += 1
        return f"result{calls['n']}", "loss", value

    def rewind():
        calls["rewinds"] += 1

    return attempt, rewind, calls


def test_a_finite_step_runs_once():
    from nemoc.runtime.core.loop import rerun_nonfinite

    attempt, rewind, calls = _attempts([1.5])
    warnings = []
    assert rerun_nonfinite(attempt, step=3, lr=lambda: 1e-3, warn=warnings.append, rewind=rewind) == "result1"
    assert calls == {"n": 1, "rewinds": 0} and warnings == []


def test_a_transient_nan_reruns_the_step_and_warns():
    from nemoc.runtime.core.loop import rerun_nonfinite

    attempt, rewind, calls = _attempts([math.nan, 2.0])
    warnings = []
    assert rerun_nonfinite(attempt, step=7, lr=lambda: 1e-3, warn=warnings.append, rewind=rewind) == "result2"
    assert calls == {"n": 2, "rewinds": 1}
    assert len(warnings) == 1 and "was NaN at step 7" in warnings[0] and "transient fault" in warnings[0]


def test_a_second_nonfinite_loss_is_a_divergence():
    from nemoc.runtime import faults
    from nemoc.runtime.core.loop import rerun_nonfinite

    attempt, rewind, _ = _attempts([math.inf, math.nan])
    with pytest.raises(faults.LossDiverged, match=r"loss became Inf at step 4 \(learning rate 0.002"):
        rerun_nonfinite(attempt, step=4, lr=lambda: 2e-3, warn=print, rewind=rewind)


def test_without_a_replay_a_nonfinite_loss_is_a_divergence_at_once():
    from nemoc.runtime import faults
    from nemoc.runtime.core.loop import rerun_nonfinite

    attempt, _, calls = _attempts([math.nan, 1.0])
    with pytest.raises(faults.LossDiverged):
        rerun_nonfinite(attempt, step=1, lr=lambda: 1e-3, warn=print, rewind=None)
    assert calls["n"] == 1
