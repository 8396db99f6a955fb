"""DPO / IPO: the loss maths, and held-out preference accuracy rising well above chance."""

from __future__ import annotations

import math

import pytest
import torch

from align_helpers import clone_model, llama_spec, mapping, preference_pairs, stage_settings


def test_dpo_loss_values():
    from nemoc.runtime.align.dpo import preference_loss

    policy = torch.tensor([-1.0, -3.0])   # chosen, rejected
    reference = torch.tensor([-2.0, -2.0])
    loss, m = preference_loss(policy, reference, beta=0.5, loss="dpo")
    # h = (-1 - -3) - 0 = 2 -> -log sigmoid(1)
    assert math.isclose(float(loss), -math.log(1 / (1 + math.exp(-1.0))), rel_tol=1e-6)
    assert float(m["reward_accuracy"]) == 1.0 and math.isclose(float(m["reward_margin"]), 1.0)
    loss, _ = preference_loss(policy, reference, beta=0.5, loss="ipo")
    assert math.isclose(float(loss), (2 - 1 / (2 * 0.5)) ** 2)  # (h - 1/(2 beta))^2 = 1


@pytest.mark.parametrize("loss, reference_kind", [("dpo", "model"), ("ipo", "precomputed")])
def test_dpo_raises_held_out_preference_accuracy(mcore, loss, reference_kind):
    from nemoc.runtime.align import dpo, trainer

    spec = llama_spec(seq_length=8)
    f = mapping(2)
    train, held_out = preference_pairs(256, 1, f), preference_pairs(64, 2, f)
    mcore.seed_all(7)
    policy = mcore.build_gpt(spec, mcore.single_layout())
    reference = dpo.ReferenceScores(model=clone_model(mcore, spec, policy), loss=loss)
    table = held_table = None
    if reference_kind == "precomputed":
        table = dpo.precompute(reference, train, 8, 32)
        held_table = dpo.precompute(reference, held_out, 8, 32)
    before = dpo.preference_accuracy(policy, held_out, seq_length=8, reference=reference, table=held_table, loss=loss)
    assert before["reward_accuracy"] == 0.5  # policy == reference: every pair ties

    steps = 40
    tr = trainer.Trainer(policy, layout=mcore.single_layout(global_batch=16, micro_batch=8), **stage_settings(steps=steps, lr=2e-3))
    beta = 0.1 if loss == "dpo" else 0.5
    history = trainer.run_steps(
        tr, items=list(enumerate(train)), steps=steps, global_batch=16,
        to_microbatches=lambda share: dpo.microbatches(share, seq_length=8, micro_batch=8, reference=reference, table=table),
        forward=dpo.make_forward(beta=beta, loss=loss), seq_length=8)
    after = dpo.preference_accuracy(policy, held_out, seq_length=8, reference=reference, table=held_table, loss=loss)
    print(f"{loss} held-out reward accuracy {before['reward_accuracy']:.2f} -> {after['reward_accuracy']:.2f}; "
          f"likelihood accuracy {before['likelihood_accuracy']:.2f} -> {after['likelihood_accuracy']:.2f}; "
          f"train margin {history[0]['reward_margin']:.3f} -> {history[-1]['reward_margin']:.3f}")
    assert after["reward_accuracy"] >= 0.85
    assert after["likelihood_accuracy"] >= 0.85
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["reward_margin"] > 0
