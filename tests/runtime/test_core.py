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


def test_the_stop_signal_rides_in_the_loss_check_and_agrees_on_the_highest_signal():
    import signal

    from nemoc.runtime import faults

    stop = faults.StopSignal()
    assert sum(stop.flags()) == 0 and faults.StopSignal.from_flags(stop.flags()) == 0
    stop._handle(signal.SIGUSR1, None)
    stop._handle(signal.SIGTERM, None)  # a repeated signal changes nothing
    assert faults.StopSignal.from_flags(stop.flags()) == signal.SIGUSR1
    other = faults.StopSignal()
    other._handle(signal.SIGTERM, None)
    summed = [a + b for a, b in zip(stop.flags(), other.flags())]  # what the all-reduce adds up over two ranks
    assert faults.StopSignal.from_flags(summed) == max(signal.SIGUSR1, signal.SIGTERM)


def test_one_all_reduce_gives_the_loss_and_the_stop_signal(monkeypatch):
    import signal

    import torch

    from nemoc.runtime.core import loop
    from nemoc.runtime.core.dist import StopSignal

    monkeypatch.setattr(loop, "device", lambda: torch.device("cpu"))

    def loss_and_stop(pair, stop):  # a step whose one micro-batch reports this [sum, count]
        sums, signum = loop._step_sums_and_stop([{"loss": pair}], ("loss",), stop)
        return loop._means(sums)[0], signum

    calls = []
    world = [2]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: world[0])
    # two ranks with the same sums and flags: the all-reduce doubles them
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: calls.append(t.clone()) or t.mul_(2))
    stop = StopSignal()
    assert loss_and_stop(torch.tensor([6.0, 3.0]), stop) == (2.0, 0)
    stop._handle(signal.SIGINT, None)
    loss, signum = loss_and_stop(torch.tensor([6.0, 3.0]), stop)
    assert (loss, signum) == (2.0, signal.SIGINT) and len(calls) == 2
    assert calls[1].tolist()[:2] == [6.0, 3.0] and sum(calls[1].tolist()[2:]) == 1  # one collective for both
    assert math.isnan(loss_and_stop(torch.tensor([float("nan"), 3.0]), None)[0])
    world[0] = 1  # one process: the same answers without a collective
    assert loss_and_stop(torch.tensor([6.0, 3.0]), stop) == (2.0, signal.SIGINT) and len(calls) == 3


def test_report_sums_add_pairs_and_count_scalars_per_name(monkeypatch):
    import torch

    from nemoc.runtime.core import loop

    monkeypatch.setattr(loop, "device", lambda: torch.device("cpu"))
    losses = [{"loss": torch.tensor([4.0, 2.0]), "accuracy": torch.tensor(0.5)},
              {"loss": torch.tensor([6.0, 3.0]), "accuracy": torch.tensor(1.0)}, {"other": torch.tensor(9.0)}]
    assert loop._report_sums(losses, ("loss", "accuracy", "absent")).tolist() == [[10, 5], [1.5, 2], [0, 0]]
    assert loop._report_sums([], ("loss",)).tolist() == [[0, 0]]


def _reports(kind):
    import torch

    if kind == "pairs":  # pretraining's token-weighted [sum, count]
        return [{"lm loss": torch.tensor([4.0, 2.0]), "aux": torch.tensor([1.0, 1.0])},
                {"lm loss": torch.tensor([6.0, 3.0]), "aux": torch.tensor([3.0, 1.0])}], ("lm loss", "aux")
    if kind == "scalars":  # SFT's per-micro-batch means
        return [{"loss": torch.tensor(2.0), "tokens": torch.tensor(5.0)},
                {"loss": torch.tensor(4.0), "tokens": torch.tensor(7.0)}], ("loss", "tokens")
    # mixed shapes and a report one micro-batch lacks: the per-entry path
    return [{"loss": torch.tensor([4.0, 2.0]), "accuracy": torch.tensor(0.5)},
            {"loss": torch.tensor([6.0, 3.0])}], ("loss", "accuracy", "absent")


@pytest.mark.parametrize("kind", ["pairs", "scalars", "mixed"])
def test_a_steps_reports_are_summed_alike_on_the_host_and_on_the_device(monkeypatch, kind):
    import torch

    from nemoc.runtime.core import loop

    monkeypatch.setattr(loop, "device", lambda: torch.device("cpu"))
    losses, names = _reports(kind)
    expected = {"pairs": [[10, 5], [4, 2]], "scalars": [[6, 2], [12, 2]], "mixed": [[10, 5], [0.5, 1], [0, 0]]}[kind]
    assert loop._report_sums(losses, names).tolist() == expected
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    sums, signum = loop._step_sums_and_stop(losses, names, None)
    assert sums == expected and signum == 0
    assert loop._step_sums_and_stop([], names, None)[0] == [[0, 0]] * len(names)  # off the last pipeline stage


def test_several_ranks_sum_every_report_and_the_stop_flags_in_one_all_reduce(monkeypatch):
    import signal

    import torch

    from nemoc.runtime.core import loop
    from nemoc.runtime.core.dist import StopSignal

    monkeypatch.setattr(loop, "device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    calls = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: calls.append(t.clone()) or t.mul_(2))
    stop = StopSignal()
    stop._handle(signal.SIGTERM, None)
    losses, names = _reports("scalars")
    sums, signum = loop._step_sums_and_stop(losses, names, stop)
    assert sums == [[12, 4], [24, 4]] and signum == signal.SIGTERM and len(calls) == 1
    assert calls[0].tolist()[:4] == [6, 2, 12, 2]


def test_the_rerun_snapshot_restores_what_a_step_draws_from():
    import torch
    from megatron.core import tensor_parallel

    from nemoc.runtime import core  # noqa: F401  (the CPU adaptation)
    from nemoc.runtime.core.loop import set_step_rng_state, step_rng_state

    torch.manual_seed(3)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 3)  # the per-TP-rank stream dropout draws from
    state = step_rng_state()

    def draws():
        with tracker.fork():
            dropout = torch.rand(4)
        return torch.rand(4), dropout

    first = draws()
    set_step_rng_state(state)
    second = draws()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(draws()[0], first[0])
