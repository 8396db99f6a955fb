"""Export a Megatron-Core GPTModel as a Hugging Face checkpoint (safetensors + config.json).

Input:  a full (TP=1, PP=1) GPTModel state dict, obtained by loading the stage's dist_checkpointing
        checkpoint, whatever TP/PP layout wrote it, into a one-process model (dist_checkpointing
        reshards; this is how shards are gathered, including SwiGLU's per-rank [gate; up] halves).
Output: `model.safetensors`, `config.json` (and `generation_config.json`) for `LlamaForCausalLM`
        (rmsnorm + swiglu + rope, GQA) or `GPT2LMHeadModel` (layernorm + gelu + learned positions,
        biases, multi-head attention).
Invariants: the exported model's logits equal ours to float tolerance (tests/runtime/align/test_export.py).

Key mapping (the one used by NeMo's and Megatron-Bridge's Llama converters):
  embedding.word_embeddings.weight                 -> model.embed_tokens.weight
  decoder.layers.i.input_layernorm.weight          -> model.layers.i.input_layernorm.weight
  decoder.layers.i.self_attention.linear_qkv.weight -> q_proj / k_proj / v_proj   (see split_qkv)
  decoder.layers.i.self_attention.linear_proj.weight -> o_proj
  decoder.layers.i.pre_mlp_layernorm.weight        -> model.layers.i.post_attention_layernorm.weight
  decoder.layers.i.mlp.linear_fc1.weight           -> gate_proj ; up_proj   (rows [gate; up])
  decoder.layers.i.mlp.linear_fc2.weight           -> down_proj
  decoder.final_layernorm.weight                   -> model.norm.weight
  output_layer.weight                              -> lm_head.weight
With Transformer Engine's fused spec the norms live in `linear_qkv.layer_norm_weight` and
`linear_fc1.layer_norm_weight`; both spellings are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from nemoc.runtime.align.common import AlignError, ModelShape

MEGATRON_PREFIX = "decoder.layers"


def split_qkv(qkv: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV rows are grouped per query group: [q_1..q_{h/g}, k, v] x g, each head_dim rows.

    Returns q [heads*d, ...], k [groups*d, ...], v [groups*d, ...] in head order (works for weights
    and biases: the trailing dims are carried along).
    """
    g, d = shape.query_groups, shape.head_dim
    per_group = shape.heads // g
    grouped = qkv.reshape(g, (per_group + 2) * d, *qkv.shape[1:])
    q = grouped[:, : per_group * d].reshape(g * per_group * d, *qkv.shape[1:])
    k = grouped[:, per_group * d : (per_group + 1) * d].reshape(g * d, *qkv.shape[1:])
    v = grouped[:, (per_group + 1) * d :].reshape(g * d, *qkv.shape[1:])
    return q, k, v


def style_of(shape: ModelShape) -> str:
    """'llama' or 'gpt2', or an AlignError naming the first feature neither architecture has."""
    if shape.experts:
        raise AlignError(f"export: a mixture-of-experts model ({shape.experts} experts) has no Llama/GPT-2 Hugging "
                         "Face equivalent here")
    if shape.qk_layernorm:
        raise AlignError("export: qk_layernorm models (Qwen3-style) have no Llama/GPT-2 Hugging Face equivalent")
    if shape.norm == "rmsnorm" and shape.activation == "swiglu" and shape.position == "rope":
        if shape.add_bias_linear:
            raise AlignError("export: Llama-style export needs add_bias_linear = false")
        return "llama"
    if shape.norm == "layernorm" and shape.activation == "gelu" and shape.position == "learned":
        problems = []
        if not shape.add_bias_linear:
            problems.append("GPT-2 has biases on every linear layer (add_bias_linear = true)")
        if shape.query_groups != shape.heads:
            problems.append(f"GPT-2 has multi-head attention (query_groups {shape.query_groups} != heads {shape.heads})")
        if shape.head_dim * shape.heads != shape.hidden:
            problems.append("GPT-2 needs head_dim * heads == hidden")
        if problems:
            raise AlignError("export: " + "; ".join(problems))
        return "gpt2"
    raise AlignError(
        f"export: no Hugging Face architecture for norm={shape.norm}, activation={shape.activation}, "
        f"position={shape.position} (supported: rmsnorm+swiglu+rope -> LlamaForCausalLM, "
        "layernorm+gelu+learned -> GPT2LMHeadModel)"
    )


def _get(state: Mapping[str, torch.Tensor], *names: str) -> torch.Tensor:
    for name in names:
        if name in state:
            return state[name]
    raise AlignError(f"export: checkpoint has no tensor {names[0]}")


def _lm_head(state: Mapping[str, torch.Tensor], shape: ModelShape) -> torch.Tensor:
    head = state.get("output_layer.weight")
    return state["embedding.word_embeddings.weight"] if head is None or shape.tie_embeddings else head


def llama_state_dict(state: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    vocab = shape.vocab
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab]}
    for i in range(shape.layers):
        src, dst = f"{MEGATRON_PREFIX}.{i}", f"model.layers.{i}"
        attn = f"{src}.self_attention"
        out[f"{dst}.input_layernorm.weight"] = _get(state, f"{src}.input_layernorm.weight", f"{attn}.linear_qkv.layer_norm_weight")
        q, k, v = split_qkv(state[f"{attn}.linear_qkv.weight"], shape)
        out[f"{dst}.self_attn.q_proj.weight"], out[f"{dst}.self_attn.k_proj.weight"], out[f"{dst}.self_attn.v_proj.weight"] = q, k, v
        if shape.add_qkv_bias:
            qb, kb, vb = split_qkv(state[f"{attn}.linear_qkv.bias"], shape)
            out[f"{dst}.self_attn.q_proj.bias"], out[f"{dst}.self_attn.k_proj.bias"], out[f"{dst}.self_attn.v_proj.bias"] = qb, kb, vb
        out[f"{dst}.self_attn.o_proj.weight"] = state[f"{attn}.linear_proj.weight"]
        mlp = f"{src}.mlp"
        out[f"{dst}.post_attention_layernorm.weight"] = _get(state, f"{src}.pre_mlp_layernorm.weight", f"{mlp}.linear_fc1.layer_norm_weight")
        gate, up = torch.chunk(state[f"{mlp}.linear_fc1.weight"], 2, dim=0)
        out[f"{dst}.mlp.gate_proj.weight"], out[f"{dst}.mlp.up_proj.weight"] = gate, up
        out[f"{dst}.mlp.down_proj.weight"] = state[f"{mlp}.linear_fc2.weight"]
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    if not shape.tie_embeddings:
        out["lm_head.weight"] = _lm_head(state, shape)[:vocab]
    return out


def llama_config(shape: ModelShape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": shape.vocab,
        "hidden_size": shape.hidden, "intermediate_size": shape.ffn_hidden, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.query_groups, "head_dim": shape.head_dim,
        "hidden_act": "silu", "max_position_embeddings": shape.seq_length, "rms_norm_eps": shape.norm_epsilon,
        "rope_theta": shape.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": shape.rotary_base},
        "attention_bias": shape.add_qkv_bias, "mlp_bias": False, "tie_word_embeddings": shape.tie_embeddings,
        "torch_dtype": "float32", "attention_dropout": 0.0, "initializer_range": 0.02,
    }


def gpt2_state_dict(state: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """GPT-2 uses Conv1D ([in, out] weights, hence the transposes) and a [q; k; v] fused c_attn."""
    vocab = shape.vocab
    out = {
        "transformer.wte.weight": state["embedding.word_embeddings.weight"][:vocab],
        "transformer.wpe.weight": state["embedding.position_embeddings.weight"],
    }
    for i in range(shape.layers):
        src, dst = f"{MEGATRON_PREFIX}.{i}", f"transformer.h.{i}"
        attn, mlp = f"{src}.self_attention", f"{src}.mlp"
        out[f"{dst}.ln_1.weight"] = _get(state, f"{src}.input_layernorm.weight", f"{attn}.linear_qkv.layer_norm_weight")
        out[f"{dst}.ln_1.bias"] = _get(state, f"{src}.input_layernorm.bias", f"{attn}.linear_qkv.layer_norm_bias")
        out[f"{dst}.attn.c_attn.weight"] = torch.cat(split_qkv(state[f"{attn}.linear_qkv.weight"], shape), 0).t()
        out[f"{dst}.attn.c_attn.bias"] = torch.cat(split_qkv(state[f"{attn}.linear_qkv.bias"], shape), 0)
        out[f"{dst}.attn.c_proj.weight"] = state[f"{attn}.linear_proj.weight"].t()
        out[f"{dst}.attn.c_proj.bias"] = state[f"{attn}.linear_proj.bias"]
        out[f"{dst}.ln_2.weight"] = _get(state, f"{src}.pre_mlp_layernorm.weight", f"{mlp}.linear_fc1.layer_norm_weight")
        out[f"{dst}.ln_2.bias"] = _get(state, f"{src}.pre_mlp_layernorm.bias", f"{mlp}.linear_fc1.layer_norm_bias")
        out[f"{dst}.mlp.c_fc.weight"] = state[f"{mlp}.linear_fc1.weight"].t()
        out[f"{dst}.mlp.c_fc.bias"] = state[f"{mlp}.linear_fc1.bias"]
        out[f"{dst}.mlp.c_proj.weight"] = state[f"{mlp}.linear_fc2.weight"].t()
        out[f"{dst}.mlp.c_proj.bias"] = state[f"{mlp}.linear_fc2.bias"]
    out["transformer.ln_f.weight"] = state["decoder.final_layernorm.weight"]
    out["transformer.ln_f.bias"] = state["decoder.final_layernorm.bias"]
    if not shape.tie_embeddings:
        out["lm_head.weight"] = _lm_head(state, shape)[:vocab]
    return out


def gpt2_config(shape: ModelShape) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": shape.vocab,
        "n_embd": shape.hidden, "n_layer": shape.layers, "n_head": shape.heads, "n_inner": shape.ffn_hidden,
        "n_positions": shape.seq_length, "n_ctx": shape.seq_length, "layer_norm_epsilon": shape.norm_epsilon,
        "activation_function": "gelu",  # Megatron's F.gelu is the exact erf GELU, not GPT-2's gelu_new
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "tie_word_embeddings": shape.tie_embeddings, "torch_dtype": "float32", "initializer_range": 0.02,
    }


def hf_checkpoint(state: Mapping[str, torch.Tensor], shape: ModelShape) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config.json) for a full, unsharded Megatron GPTModel state dict."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    if any(".lora_" in k for k in tensors):
        raise AlignError("export: the model still has LoRA adapters; merge them first (lora.merge)")
    style = style_of(shape)
    if style == "llama":
        return llama_state_dict(tensors, shape), llama_config(shape)
    return gpt2_state_dict(tensors, shape), gpt2_config(shape)


def write_hf_checkpoint(state: Mapping[str, torch.Tensor], shape: ModelShape, out_dir: str | Path,
                        *, dtype: torch.dtype = torch.float32, tokenizer: str | None = None) -> Path:
    """Write `model.safetensors` + `config.json` (+ the tokenizer file when given) into `out_dir`."""
    from safetensors.torch import save_file

    tensors, config = hf_checkpoint(state, shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; clone every tensor into its own contiguous buffer
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous().clone() for k, v in tensors.items()}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2) + "\n")
    if tokenizer and Path(tokenizer).name == "tokenizer.json" and Path(tokenizer).exists():
        (out_dir / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return out_dir
