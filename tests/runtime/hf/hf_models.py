"""Tiny random Hugging Face models per family (transformers' own configs), saved into a directory."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),  # Llama 3.2 1B/3B tie embeddings
    # Llama 3.1 (factor 8) and 3.2 (factor 32, tied): llama3 RoPE scaling. With head_dim 16 and theta 5e5 the
    # wavelengths 2*pi*theta^(k/16) fall in all three bands (kept, smoothed, divided by the factor).
    "llama31": dict(model_type="llama", tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192, rope_theta=500000.0)),
    "llama32": dict(model_type="llama", tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192, rope_theta=500000.0)),
    "mistral": dict(model_type="mistral", sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),  # QKV bias
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False),  # QK norm, head_dim != h/n
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                    tie_word_embeddings=False),
    # QK norm + experts; Qwen3-30B-A3B's routing (norm_topk_prob) and expert size below the dense one
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      head_dim=32, norm_topk_prob=True, tie_word_embeddings=False),
    # Qwen3-MoE with a dense layer among the expert layers (mlp_only_layers: layer 0 a dense MLP of
    # intermediate_size; Megatron-Core moe_layer_freq = [0, 1]); layer 1 routed
    "qwen3_moe_dense": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                            head_dim=32, norm_topk_prob=True, tie_word_embeddings=False, mlp_only_layers=[0]),
    # Gemma 3 text: layer 1 slides over 4 tokens with the local RoPE base, layer 2 attends fully with the global
    # one; query_pre_attn_scalar != head_dim, so a wrong softmax scale shows; tied embeddings (as every Gemma 3)
    "gemma3": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    # DeepSeek-V3: MLA with a query latent (q/k 16 + 8 and v 12 head widths all different), YaRN RoPE on the
    # interleaved channels, 4 routed experts in 2 groups (top-2 of the best group: n_group, topk_group), sigmoid
    # scores with an expert bias (perturbed below), routed scaling 2.5, one shared expert; every layer sparse
    "deepseek_v3": dict(model_type="deepseek_v3", num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                        n_group=2, topk_group=1, n_shared_experts=1, moe_intermediate_size=32, routed_scaling_factor=2.5,
                        first_k_dense_replace=0, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=12, tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                             rope_theta=10000.0)),
    # DeepSeek-V3 with its dense first layer (first_k_dense_replace = 1: layer 0 a dense MLP of intermediate_size,
    # Megatron-Core moe_layer_freq [0, 1], nemoc moe_first_dense_layers = 1); layer 1 routed as above
    "deepseek_v3_dense": dict(model_type="deepseek_v3", num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                              moe_intermediate_size=32, routed_scaling_factor=2.5, first_k_dense_replace=1,
                              q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                              tie_word_embeddings=False,
                              rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                   beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                                   rope_theta=10000.0)),
    "gpt2": dict(model_type="gpt2", vocab_size=200, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                 activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 bos_token_id=1, eos_token_id=2),
    # GPT2Config's default activation: the tanh approximation of GELU
    "gpt2_gelu_new": dict(model_type="gpt2", vocab_size=200, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                          activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=1, eos_token_id=2),
}


def make_hf_model(family: str, directory, *, seed: int = 0, max_shard_size: str | None = None, dtype=torch.float32):
    """Build a random model of `family` with transformers, perturb its norms/biases, save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILIES[family])
    model_type = kw.pop("model_type")
    base = {} if model_type == "gpt2" else dict(COMMON)
    # weights of std 0.02 leave activations so small that a wrong nonlinearity (erf vs tanh GELU) or RoPE
    # frequency moves the logits by less than the tolerance; std 0.3 puts them in the nonlinear range
    base.update(initializer_range=0.3, **kw)
    config = AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb so a dropped or swapped one shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():  # DeepSeek's expert bias (a buffer, zero at init) picks experts
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def read_tensors(directory) -> dict:
    """Every tensor of every safetensors file in `directory`."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def response_loss(model, samples, seq: int) -> float:
    """A transformers model's token-weighted mean of -log p(token) over the response tokens of (ids, weights)
    samples cut to `seq` + 1 tokens, as nemoc's SFT stage counts its held-out loss."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for ids, weights in samples:
            ids, weights = ids[: seq + 1], weights[: seq + 1]
            logits = model(torch.tensor([ids[:-1]])).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            mask = torch.tensor(weights[1:], dtype=torch.float)
            total += float((nll * mask).sum())
            count += float(mask.sum())
    return total / count
