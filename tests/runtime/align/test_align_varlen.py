"""Packed SFT as variable-length attention (PackedSeqParams, cu_seqlens, thd) on the SDPA core: the same
losses and gradients as the masked path, and activation memory that grows linearly with the row."""

from __future__ import annotations

import pytest
import torch

from align_helpers import gpt2_spec, llama_spec

SAMPLES = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([11, 12, 13], [0, 1, 1]), ([14, 15, 16, 17], [0, 0, 0, 1])]


def _twin_models(mcore, spec):
    """The same weights behind the unfused core (explicit mask) and the SDPA core (variable length)."""
    torch.manual_seed(1)
    masked = mcore.build_gpt(spec, mcore.single_layout(), attention_backend="unfused")
    varlen = mcore.build_gpt(spec, mcore.single_layout(), attention_backend="flash")
    varlen.load_state_dict(masked.state_dict())
    return masked, varlen


@pytest.mark.parametrize("spec", [llama_spec(seq_length=32), gpt2_spec(seq_length=32)], ids=["rope", "learned"])
def test_varlen_packed_rows_give_the_masked_paths_losses_and_gradients(mcore, spec):
    from nemoc.runtime.align import sft

    masked, varlen = _twin_models(mcore, spec)
    rows = [SAMPLES, SAMPLES[:1], SAMPLES[1:]]  # three packed rows in one micro-batch, with padding
    by_mask = mcore.pack_rows(rows, 16)
    by_segments = mcore.pack_rows(rows, 16, varlen=True)
    assert by_segments.attention_mask is None
    assert by_segments.packed_seq_params.cu_seqlens_q.tolist() == [0, 5, 8, 12, 16, 21, 32, 35, 39, 48]
    losses = []
    for model, batch in ((masked, by_mask), (varlen, by_segments)):
        out, loss_func = sft.forward(model, batch)
        loss, _ = loss_func(out)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in masked.named_parameters()}
    for name, p in varlen.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # a single causal sequence over the packed row differs (the comparison can fail)
    causal_only = mcore.Batch(by_mask.tokens, by_mask.labels, by_mask.loss_mask, by_mask.position_ids,
                              mcore.causal_mask(torch.ones_like(by_mask.tokens)))
    with torch.no_grad():
        assert abs(float(mcore.sequence_logprobs(masked, causal_only).sum()
                         - mcore.sequence_logprobs(masked, by_mask).sum())) > 1e-3


def _saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one SFT step (activation memory),
    counting each storage once."""
    from nemoc.runtime.align import sft

    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, loss_func = sft.forward(model, batch)
        loss_func(out)[0].backward()
    return sum(seen.values())


def test_a_packed_rows_activation_memory_grows_linearly_with_varlen_and_quadratically_with_a_mask(mcore):
    spec = llama_spec(seq_length=2048, layers=1, vocab=64)
    masked, varlen = _twin_models(mcore, spec)
    sizes = (512, 2048)
    measured = {}
    for name, model, flag in (("mask", masked, False), ("varlen", varlen, True)):
        for s in sizes:  # one row of s tokens packed with samples of 128 tokens
            samples = [([(7 * i + j) % 60 + 1 for j in range(128)], [1] * 128) for i in range(s // 128)]
            samples[-1] = (samples[-1][0][:127], samples[-1][1][:127])  # the row holds s + 1 tokens
            batch = mcore.pack_rows([samples], s, varlen=flag)
            measured[name, s] = _saved_bytes(model, batch)
    growth = {name: measured[name, sizes[1]] / measured[name, sizes[0]] for name in ("mask", "varlen")}
    # 4x the tokens: about 4x the bytes for variable-length segments; the masked core keeps [s, s] scores
    print("saved bytes", measured, "growth", growth)
    assert growth["varlen"] < 4.5, (growth, measured)
    assert growth["mask"] > 8, (growth, measured)
    assert measured["varlen", sizes[1]] * 3 < measured["mask", sizes[1]], measured


def test_dpo_pairs_as_variable_length_segments_score_as_with_a_mask(mcore):
    from nemoc.runtime.align import dpo

    masked, varlen = _twin_models(mcore, llama_spec(seq_length=32))
    pairs = [dpo.Pair([1, 10, 2], [11, 11, 3], [12, 3]), dpo.Pair([1, 13, 14, 2], [15, 3], [16, 16, 16, 3])]
    with torch.no_grad():
        by_mask = dpo.ReferenceScores(model=masked)(dpo.pair_batch(pairs, 8))
        by_segments = dpo.ReferenceScores(model=varlen)(dpo.pair_batch(pairs, 8, varlen=True))
    assert by_mask.shape == (4,)
    torch.testing.assert_close(by_segments, by_mask, atol=1e-5, rtol=1e-5)
