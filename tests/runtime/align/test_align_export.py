"""Export parity: a trained stage's dist checkpoint, streamed to Hugging Face (runtime/hf/trained.py), loads in
transformers and reproduces our GPTModel's logits, for every architecture the export names."""

from __future__ import annotations

import json

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


def _saved(mcore, spec, tmp_path, **build):
    torch.manual_seed(0)
    model = mcore.build_gpt(spec, mcore.single_layout(), **build)
    _randomise_norms(model)
    mcore.save_model(model, tmp_path / "ckpt")
    return model


@pytest.mark.parametrize("make_spec, arch", [
    (lambda: llama_spec(), "LlamaForCausalLM"),
    (lambda: llama_spec(tie_embeddings=True, heads=4, query_groups=1), "LlamaForCausalLM"),
    (lambda: llama_spec(rope_scaling_factor=8.0, seq_length=32), "LlamaForCausalLM"),  # Llama 3.1 RoPE
    (lambda: llama_spec(add_qkv_bias=True), "Qwen2ForCausalLM"),
    (lambda: llama_spec(qk_layernorm=True), "Qwen3ForCausalLM"),
    (lambda: gpt2_spec(), "GPT2LMHeadModel"),
    (lambda: gpt2_spec(tie_embeddings=False), "GPT2LMHeadModel"),
    (lambda: gpt2_spec(activation="gelu_tanh"), "GPT2LMHeadModel"),
])
def test_hf_logits_match(mcore, tmp_path, make_spec, arch):
    from transformers import AutoModelForCausalLM

    from nemoc.runtime.hf import trained

    spec = make_spec()
    model = _saved(mcore, spec, tmp_path)
    tokens = torch.randint(0, spec.vocab, (2, 17))
    ours = _our_logits(mcore, model, tokens)[..., : spec.vocab]  # Megatron pads the vocabulary to 128

    out, manifest = trained.export_trained(tmp_path / "ckpt", spec, tmp_path / "hf", vocab=spec.vocab, source=None,
                                           tokenizer_dir=None, special_ids={"eos_token_id": 3})
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["eos_token_id"] == 3
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3
    if spec.rope_scaling_factor != 1.0:
        assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 8.0
    if spec.activation == "gelu_tanh":
        assert config["activation_function"] == "gelu_new"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    with torch.no_grad():
        theirs = hf(tokens[:, :-1]).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours.float().cpu(), atol=1e-4, rtol=1e-4)


def test_a_mixture_of_experts_model_exports_as_mixtral(mcore, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemoc.runtime.hf import trained

    spec = llama_spec(seq_length=16, experts=4, top_k=2, moe_ffn_hidden=48)  # experts narrower than ffn_hidden
    model = _saved(mcore, spec, tmp_path, attention_backend="flash")
    tokens = torch.randint(0, spec.vocab, (2, 9))
    ours = _our_logits(mcore, model, tokens)[..., : spec.vocab]
    out, _ = trained.export_trained(tmp_path / "ckpt", spec, tmp_path / "hf", vocab=spec.vocab, source=None,
                                    tokenizer_dir=None)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        theirs = hf(tokens[:, :-1]).logits
    torch.testing.assert_close(theirs, ours.float().cpu(), atol=1e-4, rtol=1e-4)


def test_the_export_streams_one_layer_at_a_time_in_the_stage_dtype(mcore, tmp_path):
    from safetensors import safe_open

    from nemoc.runtime.hf import trained

    spec = llama_spec(layers=3)
    _saved(mcore, spec, tmp_path)
    reader = trained.DistCheckpointReader(tmp_path / "ckpt")
    layer = dict(trained.DistCheckpointReader(tmp_path / "ckpt")._load(reader._layer_names("1")))
    assert set(layer) >= {"decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.mlp.linear_fc2.weight"}
    assert layer["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (128, 64)  # one layer's slice
    out, _ = trained.export_trained(tmp_path / "ckpt", spec, tmp_path / "hf", vocab=spec.vocab, source=None,
                                    tokenizer_dir=None, dtype="bfloat16", get=None)
    with safe_open(next(out.glob("model-*.safetensors")), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reader.get("decoder.layers.0.mlp.linear_fc1.weight")
    reader.get("decoder.layers.0.mlp.linear_fc2.weight")
    reader.get("decoder.layers.2.mlp.linear_fc2.weight")
    assert reader.loads == 2 and set(reader._cache) == set(reader._layer_names("2"))  # layer 0 was dropped


def test_a_damaged_checkpoint_is_one_error_line_not_a_traceback(mcore, tmp_path):
    """A truncated .metadata and a truncated data file each end in TrainedExportError naming the directory
    (the unpickler's and DCP's own exceptions, CheckpointException a BaseException, escaped before)."""
    from nemoc.runtime.hf import trained

    spec = llama_spec(layers=2)
    _saved(mcore, spec, tmp_path)
    ckpt = tmp_path / "ckpt"
    data = max((p for p in ckpt.glob("*.distcp")), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    reader = trained.DistCheckpointReader(ckpt)
    with pytest.raises(trained.TrainedExportError, match="damaged or incomplete"):
        for layer in ("0", "1"):
            reader._load(reader._layer_names(layer))
        reader._load(["embedding.word_embeddings.weight", "output_layer.weight"])
    (ckpt / ".metadata").write_bytes(b"\x80\x04\x95")
    with pytest.raises(trained.TrainedExportError, match="not a readable dist_checkpointing directory"):
        trained.DistCheckpointReader(ckpt)


def test_export_rejects_an_architecture_without_hf_equivalent():
    from nemoc.runtime.hf import trained

    with pytest.raises(trained.TrainedExportError, match="no Hugging Face architecture"):
        trained.spec_config(llama_spec(activation="gelu"), 50)
    with pytest.raises(trained.TrainedExportError, match="biases"):
        trained.spec_config(gpt2_spec(add_bias_linear=False), 50)
    with pytest.raises(trained.TrainedExportError, match="post_block_norms, sliding_window"):
        trained.spec_config(llama_spec(post_block_norms=True, sliding_window=8), 50)  # Gemma's parts on a Llama


def test_a_bare_tokenizer_gets_a_config_transformers_loads_with_its_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    from nemoc.runtime.hf import trained

    tok = Tokenizer(models.WordLevel({"<eod>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert trained.write_tokenizer_config(tmp_path, eod=0) is not None
    assert trained.write_tokenizer_config(tmp_path, eod=0) is None  # an existing config is kept
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == "<eod>" and loaded.eos_token_id == 0 and loaded.encode("a b") == [1, 2]


@pytest.mark.parametrize("pattern", [dict(moe_first_dense_layers=1), dict(moe_layer_freq=2)])
def test_the_reader_finds_the_experts_of_a_model_saved_layer_by_layer(mcore, tmp_path, pattern):
    """With dense layers in a MoE model Megatron saves every layer under its own index (no stacked layer axis):
    expert j of layer i is `decoder.layers.i.mlp.experts.experts.*[j]`. The reader and the Megatron-FSDP init's
    torch_dist getter return each layer's tensors, dense and expert, equal to the model's own."""
    from nemoc.runtime import checkpoint
    from nemoc.runtime.hf import trained

    spec = llama_spec(layers=3, seq_length=16, experts=4, top_k=2, moe_ffn_hidden=24, **pattern)
    model = _saved(mcore, spec, tmp_path)
    assert any(k.startswith("decoder.layers.2.mlp.experts.experts.")
               for k in trained.DistCheckpointReader(tmp_path / "ckpt").meta)  # saved per index, not stacked
    want = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    reader = trained.DistCheckpointReader(tmp_path / "ckpt")
    getter = checkpoint.torch_dist_getter(str(tmp_path / "ckpt"))
    moe_layers = [i for i, moe in enumerate(spec.moe_layer_pattern) if moe]
    assert moe_layers == ([1, 2] if "moe_first_dense_layers" in pattern else [0, 2])
    for name, value in want.items():  # the getter also finds a norm under its TE-fused stored name
        torch.testing.assert_close(getter(name), value, atol=0, rtol=0, msg=name)
        if ".mlp." in name:
            torch.testing.assert_close(reader.get(name), value, atol=0, rtol=0, msg=name)
    for i in moe_layers:  # one load reads a layer's experts with the rest of it
        assert {f"decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc1.weight"
                for j in range(4)} <= set(reader._layer_names(str(i)))


def test_a_checkpoint_saved_before_dense_layers_were_recorded_is_an_every_layer_moe(mcore, tmp_path):
    """nemoc_model.json without `dense_layers` (written before the field existed, when every layer of a MoE model
    was an expert layer, e.g. the DeepSeek presets before their dense first layers) is refused by a model with
    dense layers as an incompatible architecture, before dist_checkpointing meets missing keys."""
    spec = llama_spec(layers=2, seq_length=16, experts=4, top_k=2, moe_ffn_hidden=24, moe_first_dense_layers=1)
    model = _saved(mcore, spec, tmp_path)
    info_path = tmp_path / "ckpt" / "nemoc_model.json"
    info = json.loads(info_path.read_text())
    assert info["shape"].pop("dense_layers") == "0"
    info_path.write_text(json.dumps(info))
    with pytest.raises(mcore.AlignError, match=r"incompatible architecture \(dense_layers: checkpoint '' != model '0'\)"):
        mcore.load_model(model, tmp_path / "ckpt")
    every = mcore.build_gpt(llama_spec(layers=2, seq_length=16, experts=4, top_k=2, moe_ffn_hidden=24),
                            mcore.single_layout())
    mcore._check_shape(every, tmp_path / "ckpt")  # the architecture it was saved with still loads
