"""LoRA: adapters only train (base bit-identical), learning happens, merge is exact, adapter checkpoints round-trip."""

from __future__ import annotations

import torch

from align_helpers import instruction_samples, llama_spec, mapping, stage_settings


def _peft(rank=8, alpha=16.0, targets=("qkv", "proj", "fc1", "fc2")):
    from nemoc.compiler.spec import LoraSpec

    return LoraSpec(rank=rank, alpha=alpha, dropout=0.0, targets=targets)


def _batch(mcore, n=8, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(4, 40, (n, seq + 1), generator=g).tolist()
    return mcore.make_batch([(r, [1] * len(r)) for r in rows], seq)


def _full_sft(mcore, chunk, samples, steps):
    from nemoc.runtime.align import sft, trainer

    tr = trainer.Trainer(chunk, layout=mcore.single_layout(global_batch=16, micro_batch=16), **stage_settings(steps=steps))
    trainer.run_steps(tr, items=[[s] for s in samples], steps=steps, global_batch=16,
                      to_microbatches=lambda share: sft.rows_to_batches(share, 16, 16), forward=sft.forward, seq_length=16)
    # Trainer wraps the chunk in DDP, which registered grad hooks; the bare chunk is used from here on.
    for p in chunk.parameters():
        p.grad = None


def test_wrapped_model_starts_equal_to_base(mcore):
    from nemoc.runtime.align import lora

    spec = llama_spec(seq_length=16)
    mcore.seed_all(5)
    model = mcore.build_gpt(spec, mcore.single_layout())
    batch = _batch(mcore)
    with torch.no_grad():
        before = mcore.token_logprobs(model, batch)
    names = lora.apply_lora(model, _peft(), seed=1)
    assert len(names) == 2 * 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        after = mcore.token_logprobs(model, batch)
    torch.testing.assert_close(before, after, atol=0, rtol=0)  # B = 0


def test_lora_sft_learns_with_only_adapters_changing(mcore, tmp_path):
    from nemoc.runtime.align import lora, sft, trainer

    spec = llama_spec(seq_length=16)
    mcore.seed_all(6)
    chunk = mcore.build_gpt(spec, mcore.single_layout())
    # A base that has learned something (mapping f0) as LoRA bases have; a frozen random-init output
    # layer cannot produce confident logits at all. The adapters must then learn a *different* mapping.
    _full_sft(mcore, chunk, instruction_samples(512, 1, mapping(0)), steps=60)
    f = mapping(1)
    train, held_out = instruction_samples(512, 1, f), instruction_samples(64, 2, f)
    base_before = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    lora.apply_lora(chunk, _peft(), seed=1)
    val = sft.rows_to_batches([[s] for s in held_out], 16, 32)
    loss_before = sft.response_loss(chunk, val)
    tr = trainer.Trainer(chunk, layout=mcore.single_layout(global_batch=16, micro_batch=8), **stage_settings(steps=120, lr=1e-2))
    trainer.run_steps(tr, items=[[s] for s in train], steps=120, global_batch=16,
                      to_microbatches=lambda share: sft.rows_to_batches(share, 16, 8), forward=sft.forward, seq_length=16)
    loss_after = sft.response_loss(chunk, val)
    print(f"LoRA SFT held-out response loss {loss_before:.3f} -> {loss_after:.3f}")
    assert loss_after < 0.5 * loss_before and loss_after < 1.5, (loss_before, loss_after)

    # every base tensor is bit-identical; every adapter B moved away from zero
    params = dict(chunk.named_parameters())
    for name, before in base_before.items():
        now = params.get(name) if name in params else params[name.replace(".linear_qkv.", ".linear_qkv.base.")
                                                               .replace(".linear_proj.", ".linear_proj.base.")
                                                               .replace(".linear_fc1.", ".linear_fc1.base.")
                                                               .replace(".linear_fc2.", ".linear_fc2.base.")]
        assert torch.equal(now, before), name
    assert all(p.abs().sum() > 0 for n, p in lora.adapters(chunk).items() if n.endswith("lora_b"))

    # adapter-only checkpoint round trip (into a fresh wrapped model)
    lora.save_adapters(chunk, tmp_path / "adapters", info={"rank": 8})
    saved = {p.name for p in (tmp_path / "adapters").iterdir()}
    assert "metadata.json" in saved
    mcore.seed_all(6)
    fresh = mcore.build_gpt(spec, mcore.single_layout())
    lora.apply_lora(fresh, _peft(), seed=99)
    lora.load_adapters(fresh, tmp_path / "adapters")
    for (n1, p1), (n2, p2) in zip(lora.adapters(chunk).items(), lora.adapters(fresh).items()):
        assert n1 == n2 and torch.equal(p1, p2)

    # merge folds the adapters in: same outputs, no wrappers left
    batch = _batch(mcore, seed=3)
    with torch.no_grad():
        lora_lp = mcore.token_logprobs(chunk, batch)
    assert lora.merge(chunk) == 8
    assert not lora.adapters(chunk)
    with torch.no_grad():
        merged_lp = mcore.token_logprobs(chunk, batch)
    torch.testing.assert_close(merged_lp, lora_lp, atol=1e-4, rtol=1e-4)
