"""Pretraining a Gemma 3-shaped model on the training core: TP=2 with sequence parallelism reproduces the
single-process losses and gradient norms, so the gradients of nemoc's own modules (runtime/gemma.py: the (1 + w)
norms, the post-block norms in the sequence-parallel region, the Q/K norms over each rank's heads) are reduced
as Megatron reduces its own."""

from __future__ import annotations

from dataclasses import replace

import pytest

REL = 2e-5  # fp32 reduction-order noise over 4 Adam steps (test_train_parallel.py's bound)


@pytest.mark.slow
def test_gemma3_tp2_with_sequence_parallelism_reproduces_single_process(tmp_path, kit, train_data):
    gemma = replace(kit.TINY, name="tiny-gemma3", activation="geglu_tanh", qk_layernorm=True, kv_channels=16,
                    norm_zero_centered=True, post_block_norms=True, embedding_scale=True, softmax_scale=24 ** -0.5,
                    sliding_window=8, full_attention_every=2, rotary_base=1e6, local_rotary_base=1e4,
                    norm_epsilon=1e-6, tie_embeddings=True)
    one = kit.layout()
    ref = kit.run_training(tmp_path / "ref", kit.make_plan(kit.stage_plan(lay=one), model=gemma, attention="flash"), 1,
                           data_prefix=train_data, max_steps=0)
    assert ref.returncode == 0, ref.explain()
    runs = {}
    for name, lay in (("single", one), ("tp2sp", kit.layout(tp=2, sp=True))):
        plan = kit.make_plan(kit.stage_plan(lay=lay, steps=4), model=gemma, attention="flash")
        runs[name] = kit.run_training(tmp_path / name, plan, lay.world_size, data_prefix=train_data,
                                      init_checkpoint=ref.done["checkpoint"])
        assert runs[name].returncode == 0, runs[name].explain()
    got, want = runs["tp2sp"].losses, runs["single"].losses
    assert sorted(want) == [1, 2, 3, 4] and want[4] < want[1]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=REL), (step, got, want)
    grad = {r["step"]: r["grad_norm"] for r in runs["tp2sp"].records if "grad_norm" in r}
    base = {r["step"]: r["grad_norm"] for r in runs["single"].records if "grad_norm" in r}
    assert all(grad[s] == pytest.approx(base[s], rel=1e-4) for s in base)
