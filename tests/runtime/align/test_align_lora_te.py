"""LoRA on Transformer Engine's fused LayerNorm-linear layers sees the normalised input: the same adapters
on TE's layer spec and on the local spec compute the same outputs (GPU with Transformer Engine only)."""

from __future__ import annotations

import pytest
import torch

from align_helpers import llama_spec


def _te_ready() -> bool:
    from nemoc.runtime import mcore_cpu
    from nemoc.runtime.model import have_transformer_engine

    return torch.cuda.is_available() and not mcore_cpu.is_applied() and have_transformer_engine()


@pytest.mark.gpu
@pytest.mark.skipif(not _te_ready(), reason="needs a CUDA GPU with Transformer Engine")
def test_lora_on_te_layers_matches_lora_on_the_local_spec(mcore):
    from nemoc.compiler.spec import LoraSpec
    from nemoc.runtime import megatron_args as margs
    from nemoc.runtime.align import lora

    spec = llama_spec(seq_length=32)
    peft = LoraSpec(rank=4, alpha=8, dropout=0.0, targets=("qkv", "proj", "fc1", "fc2"))
    torch.manual_seed(0)
    local = mcore.build_gpt(spec, mcore.single_layout(), attention_backend="flash")
    te = mcore.build_gpt(spec, mcore.single_layout(), attention_backend="flash",
                         facts=margs.MachineFacts(cpu=False, have_te=True))
    # the same weights: through the sharded state dict, which maps TE's fused norm names to the local ones
    te_state = {k: v for k, v in te.state_dict().items() if not k.endswith("_extra_state")}
    assert any("layer_norm_weight" in k for k in te_state)
    with torch.no_grad():
        for module in (local, te):
            for name, p in module.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).to(p))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        mcore.save_model(local, d)
        mcore.load_model(te, d)
    for model in (local, te):
        lora.apply_lora(model, peft, seed=3)
        with torch.no_grad():
            for name, p in lora.adapters(model).items():
                if name.endswith("lora_b"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)).to(p))
    batch = mcore.make_batch([([5, 6, 7, 8, 9, 10, 11, 12], [1] * 8)], 7)
    with torch.no_grad():
        a, b = mcore.gather_logits(local.eval(), batch), mcore.gather_logits(te.eval(), batch)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
