"""A NaN/Inf loss fails the step, never the silence of NaN weights: detect, rerun from the same state
(Megatron-LM's rerun state machine), report. A transient fault (NaN once) costs one rerun and changes
nothing; a real divergence (lr = 1e12) raises LossDiverged with the step and a hint."""

from __future__ import annotations

import pytest
import torch

from align_helpers import instruction_samples, llama_spec, mapping, stage_settings


def _setup(mcore, lr=3e-3, dropout=0.1):
    from nemoc.runtime.align import sft, trainer

    spec = llama_spec(seq_length=16)
    mcore.seed_all(3)
    chunk = mcore.build_gpt(spec, mcore.single_layout())
    rows = sft.pack(sft.truncate(instruction_samples(64, seed=1, f=mapping(0)), 16), 16, False)
    tr = trainer.Trainer(chunk, layout=mcore.single_layout(global_batch=16, micro_batch=8), **stage_settings(steps=3, lr=lr))
    for module in chunk.modules():  # dropout on: the rerun must replay the RNG state too
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    return tr, rows


def _steps(tr, rows, forward, steps=3):
    from nemoc.runtime.align import sft, trainer

    return trainer.run_steps(tr, items=rows, steps=steps, global_batch=16,
                             to_microbatches=lambda share: sft.rows_to_batches(share, 16, 8), forward=forward,
                             seq_length=16)


def test_a_transient_nan_is_rerun_from_the_same_state_and_changes_nothing(mcore):
    from nemoc.runtime.align import sft

    clean, rows = _setup(mcore)
    _steps(clean, rows, sft.forward)
    expected = {k: v.clone() for k, v in clean.model.state_dict().items() if torch.is_tensor(v)}

    faulty, rows = _setup(mcore)
    warnings, calls = [], [0]
    faulty.warn = warnings.append

    def flaky_forward(model, batch):  # the 3rd micro-batch's loss is NaN once (step 2, first try)
        calls[0] += 1
        output, loss_func = sft.forward(model, batch)
        if calls[0] != 3:
            return output, loss_func

        def nan_loss(out):
            loss, report = loss_func(out)
            return loss * float("nan"), {**report, "loss": report["loss"] * float("nan")}
        return output, nan_loss

    history = _steps(faulty, rows, flaky_forward)
    assert len(warnings) == 1 and "at step 2" in warnings[0] and "transient" in warnings[0]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    got = faulty.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_diverging_loss_raises_with_the_step_and_a_hint(mcore):
    from nemoc.runtime import faults
    from nemoc.runtime.align import sft

    tr, rows = _setup(mcore, lr=1e12, dropout=0.0)  # this tiny SFT saturates at lr 1e6 (loss flat, finite)
    with pytest.raises(faults.LossDiverged) as caught:
        _steps(tr, rows, sft.forward, steps=20)
    text = str(caught.value)
    assert text.startswith("loss became ") and " at step " in text and "lower the learning rate" in text
    assert tr.step_count >= 1  # it trained, then diverged; the diverged step never updated the weights
