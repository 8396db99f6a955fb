"""A LoRA stage's adapter exported in peft's format loads onto the base model and gives the merged
model's logits (and nemoc's own). DeepSeek-V3: `qkv` and `proj` put one adapter on each MLA projection, which
peft applies to q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj and o_proj (the experts have none)."""

from __future__ import annotations

import pytest
import torch

from hf_models import make_hf_model

VOCAB = 200


@pytest.mark.parametrize("family, saved", [("llama", False), ("qwen2", False), ("llama", True), ("gemma3", False),
                                           ("deepseek_v3", False), ("deepseek_v3", True)])
def test_peft_adapter_equals_the_merged_model(mcore, tmp_path, family, saved):
    """`saved`: the adapters go through the LoRA stage's adapter checkpoint and are read back as the export
    stage reads them (runtime/hf/trained.py adapter_state), not from the live model."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nemoc.compiler.spec import LoraSpec, ModelSpec
    from nemoc.runtime.align import lora
    from nemoc.runtime.hf import convert, peft_export
    from nemoc.runtime.hf.load import load_converted

    make_hf_model(family, tmp_path / "hf")
    manifest = convert.import_checkpoint(tmp_path / "hf", tmp_path / "conv")
    model = mcore.build_gpt(ModelSpec(name="hf", **manifest["architecture"]), mcore.single_layout())
    load_converted(model, tmp_path / "conv", vocab=VOCAB)
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0)
    lora.apply_lora(model, spec, seed=3)
    with torch.no_grad():  # B starts at zero: give the adapters an update to carry
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    state = {k: v for k, v in mcore.unwrap(model).state_dict().items() if isinstance(v, torch.Tensor)}
    if saved:
        from nemoc.runtime.hf import trained

        lora.save_adapters(model, tmp_path / "adapters", info={"rank": spec.rank, "alpha": spec.alpha})
        read = trained.adapter_state(tmp_path / "adapters", manifest["architecture"]["layers"])
        live = {k: v for k, v in state.items() if ".lora_" in k}
        assert set(read) == set(live) and all(torch.equal(read[k], live[k]) for k in live)
        state = read
    peft_export.write_adapter(state, manifest, tmp_path / "adapter", rank=spec.rank, alpha=spec.alpha)
    if family == "deepseek_v3":
        import json

        targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
        assert targets == ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]

    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    batch = mcore.make_batch([(t, [1] * len(t)) for t in tokens.tolist()], tokens.shape[1] - 1)
    model.eval()
    with torch.no_grad():
        ours = mcore.gather_logits(model, batch)[..., :VOCAB]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(tokens[:, :-1]).logits
        merged = peft_model.merge_and_unload()(tokens[:, :-1]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-4)
