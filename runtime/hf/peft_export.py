"""LoRA adapters of a Megatron-Core GPTModel -> peft's format (adapter_config.json + adapter_model.safetensors).

Input:  a full (TP=1, PP=1) state dict holding nemoc's adapters (`<linear>.lora_a` [r, in],
        `<linear>.lora_b` [out, r], runtime/align/lora.py; update = B A * alpha / r, as peft's LoRA),
        the converted checkpoint's manifest (family, architecture), and the LoRA settings.
Output: peft's files for the Hugging Face model of that family, so
        `PeftModel.from_pretrained(base, DIR)` applies the same update (tests/runtime/hf/test_hf_peft.py).
Exactness: a fused Megatron projection shares one A across its parts, so each Hugging Face projection
        gets that A and its own rows of B: linear_qkv -> q/k/v_proj (B split per query group like the
        weight), linear_fc1 -> gate/up_proj (B halves), linear_proj -> o_proj, linear_fc2 -> down_proj;
        DeepSeek-V3's MLA projections one to one (linear_q_down_proj -> q_a_proj, linear_q_up_proj -> q_b_proj,
        linear_q_proj -> q_proj, linear_kv_down_proj -> kv_a_proj_with_mqa, linear_kv_up_proj -> kv_b_proj).
        B_q A, B_k A, B_v A are exactly the rows of B A, so nothing is approximated.
Limits: Llama-like families only (GPT-2's fused Conv1D c_attn would need fan_in_fan_out adapters).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from nemoc.runtime.atomic import atomic_write_bytes, atomic_write_json
from nemoc.runtime.hf import mapping

PREFIX = "base_model.model."


class AdapterError(ValueError):
    pass


# DeepSeek-V3: each multi-latent attention projection is one Hugging Face module, its weight unpermuted
# (runtime/hf/mapping.py DEEPSEEK_ATTENTION), so its adapter is that module's adapter as it is
_MLA_MODULES = {f"self_attention.{ours}": f"self_attn.{theirs}" for theirs, ours in mapping.DEEPSEEK_ATTENTION.items()
                if "layernorm" not in ours}


def _parts(linear: str, a: torch.Tensor, b: torch.Tensor, arch: dict) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if linear in _MLA_MODULES and arch.get("multi_latent_attention"):
        return [(_MLA_MODULES[linear], a, b)]
    if linear == "self_attention.linear_qkv":
        return [(f"self_attn.{n}_proj", a, part) for n, part in zip("qkv", mapping.split_qkv(b, arch))]
    if linear == "self_attention.linear_proj":
        return [("self_attn.o_proj", a, b)]
    if linear == "mlp.linear_fc1":
        gate, up = torch.chunk(b, 2, 0)
        return [("mlp.gate_proj", a, gate), ("mlp.up_proj", a, up)]
    if linear == "mlp.linear_fc2":
        return [("mlp.down_proj", a, b)]
    raise AdapterError(f"no Hugging Face module for an adapter on {linear}")


def adapter_tensors(state: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """(peft tensors, target module names) from the adapters in `state`."""
    if manifest["family"] == "gpt2":
        raise AdapterError("peft export: GPT-2's fused Conv1D layers are not supported (Llama-like families only)")
    arch = manifest["architecture"]
    out, targets = {}, set()
    for key in sorted(k for k in state if k.endswith(".lora_a")):
        stem = key[: -len(".lora_a")]
        _, _, layer, linear = stem.split(".", 3)  # decoder.layers.<i>.<self_attention|mlp>.<linear>
        for module, a, b in _parts(linear, state[key], state[stem + ".lora_b"], arch):
            name = f"{PREFIX}model.layers.{layer}.{module}"
            out[f"{name}.lora_A.weight"] = a.contiguous().clone()
            out[f"{name}.lora_B.weight"] = b.contiguous().clone()
            targets.add(module.rsplit(".", 1)[1])
    if not out:
        raise AdapterError("peft export: the model has no LoRA adapters")
    return out, sorted(targets)


def write_adapter(state: Mapping[str, torch.Tensor], manifest: Mapping[str, Any], out: str | Path, *,
                  rank: int, alpha: float, dropout: float = 0.0, base_model: str | None = None,
                  dtype: str | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, targets = adapter_tensors(state, manifest)
    if dtype:
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    atomic_write_bytes(out / "adapter_model.safetensors", st_save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model or manifest.get("source"),
    })
    return out
