"""A child stage at another sequence length than its parent (pretrain at 2048, SFT at 4096): with RoPE no
weight depends on the length, so the parent's checkpoint loads and the longer model computes on longer
rows; learned position embeddings ([seq, hidden]) are refused, at run time here and at `nemoc check`
(E157, tests/compiler/test_stage_seq_length.py)."""

from __future__ import annotations

import pytest
import torch

from align_helpers import gpt2_spec, llama_spec


def test_a_rope_checkpoint_loads_at_another_seq_length(mcore, tmp_path):
    spec = llama_spec()
    short = mcore.build_gpt(spec, mcore.single_layout(), seq_length=16)
    mcore.save_model(short, tmp_path / "parent")
    longer = mcore.build_gpt(spec, mcore.single_layout(), seq_length=64)
    mcore.load_model(longer, tmp_path / "parent")
    for (name, a), (_, b) in zip(mcore.unwrap(short).state_dict().items(), mcore.unwrap(longer).state_dict().items()):
        if torch.is_tensor(a) and a.is_floating_point():
            assert torch.equal(a, b), name
    tokens = torch.randint(0, spec.vocab, (1, 64))
    positions = torch.arange(64).unsqueeze(0)
    mcore.unwrap(longer).eval()
    with torch.no_grad():
        logits = mcore.unwrap(longer)(tokens, positions, None)
    assert logits.shape[:2] == (1, 64) and torch.isfinite(logits).all()


def test_learned_positions_refuse_another_seq_length(mcore, tmp_path):
    spec = gpt2_spec()
    mcore.save_model(mcore.build_gpt(spec, mcore.single_layout(), seq_length=16), tmp_path / "parent")
    with pytest.raises(mcore.AlignError, match=r"seq_length: checkpoint 16 != model 32"):
        mcore.load_model(mcore.build_gpt(spec, mcore.single_layout(), seq_length=32), tmp_path / "parent")
