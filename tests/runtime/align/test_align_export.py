"""Export parity: transformers loads our Hugging Face checkpoint and reproduces our GPTModel's logits."""

from __future__ import annotations

import pytest
import torch

from align_helpers import gpt2_spec, llama_spec


def _randomise_norms(model):
    # Norm weights start at exactly 1 (and biases at 0); perturb them so a swapped or dropped norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)


def _our_logits(common, model, tokens):
    batch = common.make_batch([(t, [1] * len(t)) for t in tokens.tolist()], tokens.shape[1] - 1)
    model.eval()
    with torch.no_grad():
        return common.gather_logits(model, batch)


@pytest.mark.parametrize("make_spec, arch", [
    (lambda: llama_spec(), "LlamaForCausalLM"),
    (lambda: llama_spec(tie_embeddings=True, heads=4, query_groups=1), "LlamaForCausalLM"),
    (lambda: gpt2_spec(), "GPT2LMHeadModel"),
    (lambda: gpt2_spec(tie_embeddings=False), "GPT2LMHeadModel"),
])
def test_hf_logits_match(mcore, tmp_path, make_spec, arch):
    from transformers import AutoModelForCausalLM

    from nemoc.runtime.align import export

    spec = make_spec()
    shape = mcore.ModelShape.of(spec)
    torch.manual_seed(0)
    model = mcore.build_gpt(spec, mcore.single_layout())
    _randomise_norms(model)
    tokens = torch.randint(0, shape.vocab, (2, 17))
    ours = _our_logits(mcore, model, tokens)[..., : shape.vocab]  # Megatron pads the vocabulary to 128

    export.write_hf_checkpoint(model.state_dict(), shape, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    with torch.no_grad():
        theirs = hf(tokens[:, :-1]).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours.float().cpu(), atol=1e-4, rtol=1e-4)


def test_export_rejects_an_architecture_without_hf_equivalent(mcore):
    from nemoc.runtime.align import export

    shape = mcore.ModelShape.of(llama_spec(activation="gelu"))
    with pytest.raises(mcore.AlignError, match="no Hugging Face architecture"):
        export.style_of(shape)
    shape = mcore.ModelShape.of(gpt2_spec(add_bias_linear=False))
    with pytest.raises(mcore.AlignError, match="biases"):
        export.style_of(shape)


def test_split_qkv_grouped_layout(mcore):
    from nemoc.runtime.align import export

    shape = mcore.ModelShape.of(llama_spec(hidden=8, heads=4, query_groups=2))  # d = 2, 2 q heads per group
    rows = torch.arange(2 * (2 + 2) * 2).float().unsqueeze(1)  # group0: q0 q1 k v, group1: q2 q3 k v
    q, k, v = export.split_qkv(rows, shape)
    assert q.squeeze(1).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert k.squeeze(1).tolist() == [4, 5, 12, 13]
    assert v.squeeze(1).tolist() == [6, 7, 14, 15]
