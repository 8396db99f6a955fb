"""Separate q/k/v/o/gate/up/down adapters and rsLoRA compute what peft computes on the exported model.

Our tiny Llama is exported to Hugging Face (runtime/hf/trained.py), peft wraps the export with the same
rank, alpha, targets and scaling, each peft adapter gets our A and B (random, non-zero), and the logits
must agree; merging must not change them; with the adapters off the model is the base model.
"""

from __future__ import annotations

import pytest
import torch
from align_helpers import llama_spec

from nemoc.runtime import lora_peft
from nemoc.runtime.align import lora
from nemoc.runtime.hf import trained

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'nemoc[test]')")
transformers = pytest.importorskip("transformers")

HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _ours_and_peft(mcore, tmp_path, *, targets, rslora, rank=4, alpha=8.0):
    torch.manual_seed(11)
    spec = llama_spec(vocab=64)
    chunk = mcore.build_gpt(spec, mcore.single_layout(), seq_length=spec.seq_length)
    gpt = mcore.unwrap(chunk)
    shape = gpt.nemoc_shape
    mcore.save_model(chunk, tmp_path / "ckpt")
    trained.export_trained(tmp_path / "ckpt", spec, tmp_path / "hf", vocab=spec.vocab, source=None, tokenizer_dir=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    lora_peft.apply_lora(chunk, rank=rank, alpha=alpha, targets=targets, rslora=rslora, seed=5)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero B, so the adapters change the output
        for name, p in lora.adapters(chunk).items():
            if ".lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, use_rslora=rslora,
                             target_modules=[HF_NAMES[t].split(".")[1] for t in targets])
    model = peft.get_peft_model(hf, config).eval()
    ours = dict(lora.adapters(chunk))
    with torch.no_grad():
        for i in range(shape.layers):
            layer = model.base_model.model.model.layers[i]
            for t in targets:
                module = layer.get_submodule(HF_NAMES[t])
                src = f"decoder.layers.{i}.{'self_attention' if t in ('q', 'k', 'v', 'o') else 'mlp'}"
                src += {"q": ".linear_qkv.lora_%s_q", "k": ".linear_qkv.lora_%s_k", "v": ".linear_qkv.lora_%s_v",
                        "o": ".linear_proj.lora_%s", "gate": ".linear_fc1.lora_%s_gate", "up": ".linear_fc1.lora_%s_up",
                        "down": ".linear_fc2.lora_%s"}[t]
                module.lora_A["default"].weight.copy_(ours[src % "a"])
                module.lora_B["default"].weight.copy_(ours[src % "b"])
    return chunk, model, shape


def _logits(mcore, chunk, ids, vocab):
    batch = mcore.make_batch([(ids, [1] * len(ids))], len(ids) - 1)
    with torch.no_grad():
        return mcore.gather_logits(chunk, batch)[..., :vocab].cpu()


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("targets", [lora_peft.PEFT_TARGETS, ("q", "v"), ("k", "up", "down")],
                         ids=["all", "q-v", "k-up-down"])
def test_separate_adapters_compute_what_peft_computes(mcore, tmp_path, targets, rslora):
    chunk, model, shape = _ours_and_peft(mcore, tmp_path, targets=targets, rslora=rslora)
    ids = [3, 17, 5, 40, 22, 9, 31, 2, 11]
    ours = _logits(mcore, chunk, ids, shape.vocab)
    with torch.no_grad():
        theirs = model(torch.tensor([ids[:-1]])).logits
        base = model.get_base_model()
        with model.disable_adapter():
            theirs_base = base(torch.tensor([ids[:-1]])).logits
    assert (ours - theirs_base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with lora.disabled(chunk):
        torch.testing.assert_close(_logits(mcore, chunk, ids, shape.vocab), theirs_base, atol=1e-5, rtol=1e-5)
    lora.merge(chunk)
    torch.testing.assert_close(_logits(mcore, chunk, ids, shape.vocab), theirs, atol=1e-5, rtol=1e-5)


def test_rslora_scaling_is_alpha_over_sqrt_rank():
    assert lora_peft.scaling(16, 4, rslora=True) == pytest.approx(8.0)
    assert lora_peft.scaling(16, 4, rslora=False) == pytest.approx(4.0)


def test_only_the_adapters_train(mcore):
    torch.manual_seed(1)
    chunk = mcore.build_gpt(llama_spec(), mcore.single_layout(), seq_length=32)
    lora_peft.apply_lora(chunk, rank=2, alpha=4, targets=("q", "k", "v", "gate", "up"))
    trainable = sorted(n for n, p in chunk.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_" in n for n in trainable)
    assert any(n.endswith("lora_b_k") for n in trainable) and any(n.endswith("lora_a_up") for n in trainable)


def test_unknown_targets_are_refused(mcore):
    chunk = mcore.build_gpt(llama_spec(), mcore.single_layout(), seq_length=32)
    with pytest.raises(lora.AlignError, match="unknown"):
        lora_peft.apply_lora(chunk, rank=2, alpha=4, targets=("qkv",))


def test_a_stage_peft_block_installs_fused_or_peft_granular_adapters_as_planned(mcore):
    """`peft = lora(...)` of a stage (runners._policy -> lora_peft.apply_peft): the fused NeMo adapters for
    qkv proj fc1 fc2, separate peft adapters for q k v o gate up down, rsLoRA's alpha / sqrt(r); the
    adapter parameters equal the planner's count (compiler.flops.lora_params_per_layer)."""
    from nemoc.compiler.flops import lora_params_per_layer
    from nemoc.compiler.spec import LoraSpec
    from nemoc.runtime import lora_peft
    from nemoc.runtime.align import lora

    spec = llama_spec()
    for targets, rslora, kinds in ((("qkv", "proj", "fc1", "fc2"), False, {"LoraLinear"}),
                                   (("q", "k", "v", "o", "gate", "up", "down"), False, {"SplitLoraLinear", "LoraLinear"}),
                                   (("qkv", "o", "down"), True, {"LoraLinear"}),
                                   (("q", "v"), True, {"SplitLoraLinear"})):
        peft = LoraSpec(rank=4, alpha=8.0, targets=targets, rslora=rslora)
        chunk = mcore.build_gpt(spec, mcore.single_layout())
        names = lora_peft.apply_peft(chunk, peft, seed=3)
        modules = [m for m in chunk.modules() if isinstance(m, lora.LoraLinear)]
        assert {type(m).__name__ for m in modules} == kinds and len(names) == len(modules)
        assert all(m.scale == pytest.approx(8.0 / (2.0 if rslora else 4.0)) for m in modules)
        trained = sum(p.numel() for p in chunk.parameters() if p.requires_grad)
        assert trained == spec.layers * lora_params_per_layer(spec, peft), targets
    with pytest.raises(lora.AlignError, match="`qkv` .* and `q`"):
        lora_peft.apply_peft(mcore.build_gpt(spec, mcore.single_layout()), LoraSpec(targets=("qkv", "q")))
