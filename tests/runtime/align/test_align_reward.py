"""Reward model: scalar head on the GPT trunk; Bradley-Terry training ranks held-out pairs above chance."""

from __future__ import annotations

import torch

from align_helpers import llama_spec, mapping, preference_pairs, stage_settings


def test_score_ignores_right_padding(mcore):
    from nemoc.runtime.align import reward

    spec = llama_spec(seq_length=12)
    mcore.seed_all(8)
    model = mcore.build_gpt(spec, mcore.single_layout(), scalar_head=True)
    with torch.no_grad():
        for p in mcore.unwrap(model).output_layer.parameters():
            p.normal_()
    a = reward.score(model, [[5, 6, 7, 8]], 12)
    b = reward.score(model, [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]], 12)
    torch.testing.assert_close(a, b[:1], atol=1e-5, rtol=1e-5)
    assert mcore.unwrap(model).output_layer.weight.shape == (1, spec.hidden)


def test_reward_model_ranks_held_out_pairs(mcore):
    from nemoc.runtime.align import reward, trainer

    spec = llama_spec(seq_length=8)
    f = mapping(3)
    train, held_out = preference_pairs(256, 1, f), preference_pairs(64, 2, f)
    mcore.seed_all(9)
    model = mcore.build_gpt(spec, mcore.single_layout(), scalar_head=True)
    before = reward.accuracy(model, held_out, seq_length=8)
    assert before["accuracy"] == 0.5  # zero-initialised head: every pair ties
    steps = 200
    tr = trainer.Trainer(model, layout=mcore.single_layout(global_batch=16, micro_batch=16), **stage_settings(steps=steps, lr=1e-3))
    history = trainer.run_steps(tr, items=train, steps=steps, global_batch=16,
                                to_microbatches=lambda share: reward.pair_microbatches(share, seq_length=8, micro_batch=16),
                                forward=reward.forward, seq_length=8)
    after = reward.accuracy(model, held_out, seq_length=8)
    print(f"reward model held-out accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f} (margin {after['margin']:.2f}); "
          f"train loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")
    assert after["accuracy"] >= 0.75
    first, last = (sum(h["loss"] for h in part) / len(part) for part in (history[:20], history[-20:]))
    assert last < 0.7 * first
