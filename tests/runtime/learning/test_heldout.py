"""The held-out split never scores a trained record; the metrics mean what they say."""

from __future__ import annotations

import math

import pytest
import torch

from nemoc.runtime import heldout
from nemoc.runtime.align import stage


def test_split_is_the_stages_split_minus_copies_of_training_records():
    records = [{"p": i % 7, "c": "x"} for i in range(40)]  # every record repeated: a naive split leaks
    train, val = stage.split_held_out(records, 0.2, seed=3)
    assert any(v in train for v in val)  # what the training stages' split does today
    train2, val2 = heldout.split(records, 0.2, seed=3)
    assert train2 == train  # the same training records: the stage trained on exactly these
    assert not any(v in train2 for v in val2)


def test_split_of_distinct_records_holds_out_the_fraction():
    records = list(range(100))
    train, val = heldout.split(records, 0.25, seed=0)
    assert len(val) == 25 and sorted(train + val) == records


def test_untrained_policy_scores_exactly_one_half():
    scores = torch.tensor([-3.0, -2.0, -5.0, -1.0, -4.0, -6.0])
    m = heldout.preference_metrics(scores, scores.clone())
    assert m["preference_accuracy"] == 0.5 and m["reward_margin"] == 0.0
    assert m["likelihood_accuracy"] == pytest.approx(2 / 3)


def test_preference_accuracy_and_margin():
    ref = torch.zeros(4)
    policy = torch.tensor([1.0, -1.0, 0.0, 0.0])  # pair 0: chosen up; pair 1: chosen down
    m = heldout.preference_metrics(policy, ref, beta=0.5)
    assert m["preference_accuracy"] == 0.5 and m["reward_margin"] == pytest.approx(0.0)
    m = heldout.preference_metrics(torch.tensor([1.0, 1.0, -1.0, 0.0]), ref, beta=0.5)
    assert m["preference_accuracy"] == 1.0 and m["reward_margin"] == pytest.approx(0.5 * (2 + 1) / 2)


def test_reward_model_and_lm_metrics():
    assert heldout.reward_model_metrics(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))["accuracy"] == 0.5
    m = heldout.lm_metrics(2.0 * 10, 10)
    assert m["loss"] == 2.0 and m["perplexity"] == pytest.approx(math.exp(2.0))
    assert math.isnan(heldout.lm_metrics(0.0, 0)["loss"])


def test_lm_eval_is_skipped_cleanly():
    assert "skipped" in heldout.lm_eval("/nonexistent", [])
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        assert "not installed" in heldout.lm_eval("/nonexistent", ["hellaswag"])["skipped"]
