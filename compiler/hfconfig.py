"""A Hugging Face `config.json` -> the fields of nemoc's `ModelSpec` (no torch, no transformers).

Input:  the parsed `config.json` of a Hugging Face causal-LM checkpoint directory.
Output: `HfArchitecture`: the family, the `ModelSpec` field values it implies, and the special ids
        (bos/eos/pad) export writes back into `generation_config.json`.
Invariants: pure; every config the mapping cannot express exactly raises `HfConfigError` naming the
        key and why (never a silently different model). transformers' configuration classes are the
        source of truth for key names and defaults (`LlamaConfig`, `MistralConfig`, `Qwen2Config`,
        `Qwen3Config`, `GPT2Config`, `Gemma3TextConfig`, transformers 5.x): a key absent from config.json takes the
        default of that class.

Families and what each needs of Megatron-Core's GPT model (local or TE layer spec):
  llama, mistral   rmsnorm + SwiGLU + RoPE, GQA, no biases          (LlamaForCausalLM, MistralForCausalLM)
  qwen2            as llama, plus a bias on the QKV projection only  (Qwen2ForCausalLM; also Qwen2.5)
  qwen3            as llama, plus RMSNorm on queries and keys per head (Qwen3ForCausalLM)
  mixtral          as mistral, every MLP a mixture of SwiGLU experts, top-k router (MixtralForCausalLM)
  qwen3_moe        as qwen3, the MLPs mixtures of experts but in mlp_only_layers / off decoder_sparse_step,
                   which are dense (Qwen3MoeForCausalLM; Megatron-Core `moe_layer_freq` as a list)
  gpt2             layernorm + GELU + learned positions, biases everywhere, MHA (GPT2LMHeadModel)
  gemma3_text      (1 + w) RMSNorm, sandwich norms, QK norm, GeGLU (tanh), embedding x sqrt(hidden), sliding
                   windows with a second RoPE base, query_pre_attn_scalar (Gemma3ForCausalLM; see _gemma3)
  deepseek_v3      multi-latent attention (YaRN or plain RoPE), sigmoid-routed experts with an expert bias,
                   group-limited top-k, routed scaling and shared experts (DeepseekV3ForCausalLM; see
                   _deepseek_v3; the dense first layers, first_k_dense_replace, map to moe_first_dense_layers)
Llama 3.1/3.2 `rope_scaling` (rope_type llama3) maps to `rope_scaling_factor` when its other three keys
have the values Megatron-Core fixes (LLAMA3_FIXED). Not expressible (an error says so): other RoPE
scaling types, Mistral's sliding window shorter than the sequence, top-1 routing, Qwen3-MoE without norm_topk_prob
(see _moe) or without any expert layer (_qwen3_moe_layer_pattern), Gemma 3's linear
RoPE scaling (4B and larger), and Gemma 1 / 2 (see _UNSUPPORTED).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemoc.dsl.schema import LAYERS

CONFIG_FILE = "config.json"
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
MOE = ("mixtral", "qwen3_moe")
FAMILIES = LLAMA_LIKE + ("gpt2", "gemma3_text", "deepseek_v3")


class HfConfigError(ValueError):
    """A config.json nemoc cannot map; the message names the key."""


@dataclass(frozen=True)
class HfArchitecture:
    family: str  # one of FAMILIES
    fields: dict[str, Any]  # ModelSpec field -> value
    special_ids: dict[str, Any] = field(default_factory=dict)  # bos_token_id / eos_token_id / pad_token_id
    dtype: str = "float32"  # the checkpoint's torch dtype name


def read_config(directory: str | Path) -> dict:
    """config.json of a checkpoint directory, or HfConfigError naming what is missing."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise HfConfigError(f"Hugging Face checkpoint directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise HfConfigError(f"{str(directory)!r} has no {CONFIG_FILE} (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HfConfigError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise HfConfigError(f"{path}: a JSON {type(config).__name__}, not an object of configuration keys")
    return config


# The JSON type of every config.json key the mapping reads, as transformers' configuration classes annotate
# it (LlamaConfig, Qwen3MoeConfig, GPT2Config, Gemma3TextConfig, ...): key -> smallest value. A value of
# another type, or below the minimum, is an HfConfigError naming the key (never a Python exception from
# int() / float(), never a silently negative width). `null` is accepted where the class takes None
# (NULLABLE_KEYS: "use the default"); elsewhere it is refused like any other wrong type.
INT_KEYS = {"hidden_size": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 1,
            "intermediate_size": 1, "moe_intermediate_size": 1, "num_hidden_layers": 1, "vocab_size": 1,
            "max_position_embeddings": 1, "num_experts": 0, "num_local_experts": 0, "num_experts_per_tok": 1,
            "decoder_sparse_step": 1, "sliding_window": 0, "sliding_window_pattern": 1,
            "n_embd": 1, "n_layer": 1, "n_head": 1, "n_inner": 1, "n_positions": 1}
FLOAT_KEYS = {"rms_norm_eps": 0.0, "layer_norm_epsilon": 0.0, "rope_theta": 0.0, "rope_local_base_freq": 0.0,
              "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0, "query_pre_attn_scalar": 0.0}
LAYER_KEYS = ("num_hidden_layers", "n_layer")
POSITIVE_FLOAT_KEYS = ("rope_theta", "rope_local_base_freq", "query_pre_attn_scalar")
BOOL_KEYS = ("norm_topk_prob", "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
             "use_bidirectional_attention")
DICT_KEYS = ("rope_scaling", "rope_parameters")
LIST_KEYS = ("mlp_only_layers", "layer_types")
NULLABLE_KEYS = ("num_key_value_heads", "head_dim", "n_inner", "sliding_window", "num_experts", "num_local_experts",
                 "decoder_sparse_step", "router_jitter_noise", "mlp_only_layers", "layer_types", "rope_scaling",
                 "rope_parameters", "mlp_bias", "attention_bias", "use_sliding_window", "use_bidirectional_attention")


def _number(where: str, value: Any, *, integer: bool = False, minimum: float = 0.0, exclusive: bool = False) -> float:
    """`value` as a JSON number of the right kind, or HfConfigError naming `where`."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and isinstance(value, float) and not value.is_integer()):
        raise HfConfigError(f"{where} = {json.dumps(value)}: expected {kind}")
    if value < minimum or (exclusive and value == minimum):
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise HfConfigError(f"{where} = {json.dumps(value)}: expected {kind} {bound}")
    return int(value) if integer else float(value)


def check_types(config: dict) -> None:
    """HfConfigError for the first key whose value has the wrong JSON type or range (see INT_KEYS)."""
    for key, value in config.items():
        if value is None:
            if key in NULLABLE_KEYS or key not in (*INT_KEYS, *FLOAT_KEYS, *BOOL_KEYS, *DICT_KEYS, *LIST_KEYS):
                continue
            raise HfConfigError(f"{key} = null: expected "
                                + ("an integer" if key in INT_KEYS else "a number" if key in FLOAT_KEYS else
                                   "true or false" if key in BOOL_KEYS else "a JSON object"))
        if key in INT_KEYS:
            layers = _number(key, value, integer=True, minimum=INT_KEYS[key])
            if key in LAYER_KEYS and layers > LAYERS.maximum:  # Gemma 3's layer_types default is built per layer
                raise HfConfigError(f"{key} = {layers:g}: nemoc builds at most {LAYERS.maximum:,} layers")
        elif key in FLOAT_KEYS:
            _number(key, value, minimum=FLOAT_KEYS[key], exclusive=key in POSITIVE_FLOAT_KEYS)
        elif key in BOOL_KEYS and not isinstance(value, bool):
            raise HfConfigError(f"{key} = {json.dumps(value)}: expected true or false")
        elif key in DICT_KEYS and not isinstance(value, dict):
            raise HfConfigError(f"{key} = {json.dumps(value)}: expected a JSON object")
        elif key in LIST_KEYS and not isinstance(value, list):
            raise HfConfigError(f"{key} = {json.dumps(value)}: expected a list")
    for i, layer in enumerate(config.get("mlp_only_layers") or []):  # any integer: transformers ignores one
        _number(f"mlp_only_layers[{i}]", layer, integer=True, minimum=-math.inf)  # outside the layers
    for key in DICT_KEYS:  # nested RoPE parameters (transformers 5: rope_parameters[layer_type] for Gemma 3)
        params = config.get(key) or {}
        for inner in [params, *(v for v in params.values() if isinstance(v, dict))]:
            for name in ("rope_theta", "factor", *LLAMA3_FIXED):
                # YaRN's factor may be null: transformers derives it (max_position_embeddings / original)
                yarn = (inner.get("rope_type") or inner.get("type")) == "yarn"
                if name in inner and not (name == "factor" and inner[name] is None and yarn):
                    _number(f"{key}.{name}", inner[name], exclusive=True)


def _rope_theta(config: dict, default: float) -> float:
    # transformers >= 5 nests it in rope_parameters; older configs carry rope_theta at the top level.
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", default)))


def _rope_type(config: dict) -> str:
    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key) or {}
        kind = params.get("rope_type") or params.get("type")
        if kind:
            return kind
    return "default"


# Megatron-Core 0.16.1 RotaryEmbedding._apply_scaling (models/common/embeddings/rotary_pos_embedding.py)
# takes only `factor` from GPTModel(rope_scaling_factor=); these three are its fixed defaults. They are
# also the values of every published Llama 3.1 / 3.2 config.json.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_scaling_factor(config: dict) -> float:
    """The llama3 RoPE scaling factor (1.0 when unscaled), or HfConfigError naming the key that does not map."""
    kind = _rope_type(config)
    if kind == "default":
        return 1.0
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    if kind != "llama3":
        raise HfConfigError(f"{key}.rope_type {kind!r} is not supported: Megatron-Core's GPTModel takes the "
                            "llama3 scaling only (YaRN is a separate position type nemoc does not map)")
    params = config[key]
    for name, fixed in LLAMA3_FIXED.items():
        if name in params and float(params[name]) != fixed:
            raise HfConfigError(f"{key}.{name} = {params[name]}: Megatron-Core 0.16.1's llama3 RoPE scaling fixes "
                                f"{name} = {fixed:g} (only `factor` is a GPTModel argument)")
    if "factor" not in params:
        raise HfConfigError(f"{key} of rope_type 'llama3' has no 'factor'")
    return float(params["factor"])


def _llama_like(config: dict, family: str) -> dict[str, Any]:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise HfConfigError(f"hidden_act {act!r}: nemoc maps {family} only with silu (SwiGLU)")
    rope_factor = _rope_scaling_factor(config)
    if config.get("mlp_bias"):
        raise HfConfigError("mlp_bias = true: nemoc has no bias-on-MLP-only switch")
    attention_bias = bool(config.get("attention_bias", family == "qwen2"))
    if family != "qwen2" and attention_bias:
        raise HfConfigError("attention_bias = true puts a bias on o_proj too; nemoc's add_qkv_bias covers q/k/v only")
    # Qwen2 / Qwen3 / Qwen3-MoE configs drop sliding_window unless use_sliding_window (their __post_init__)
    gated_window = family in ("qwen2", "qwen3", "qwen3_moe")
    window = config.get("sliding_window") if not gated_window or config.get("use_sliding_window") else None
    if window is not None and int(window) < int(config.get("max_position_embeddings", 0)):
        raise HfConfigError(f"sliding_window {window} < max_position_embeddings: sliding-window attention "
                            "is not supported")
    default_theta = 1000000.0 if family in ("qwen2", "qwen3", "mixtral") else 10000.0
    return _moe(config, family) | {
        "layers": int(config["num_hidden_layers"]), "hidden": hidden, "heads": heads,
        "query_groups": int(config.get("num_key_value_heads") or heads),
        "ffn_hidden": int(config["intermediate_size"]), "vocab": int(config["vocab_size"]),
        "seq_length": int(config.get("max_position_embeddings", 2048)),
        "kv_channels": int(config.get("head_dim") or hidden // heads),
        "activation": "swiglu", "norm": "rmsnorm", "position": "rope",
        "rotary_base": _rope_theta(config, default_theta), "rope_scaling_factor": rope_factor,
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "add_bias_linear": False, "add_qkv_bias": attention_bias, "qk_layernorm": family in ("qwen3", "qwen3_moe"),
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
    }


def _moe(config: dict, family: str) -> dict[str, Any]:
    """The expert fields of Mixtral (MixtralConfig) and Qwen3-MoE (Qwen3MoeConfig); {} for dense families.

    Routing: both take the top-k router logits and weight the chosen experts by their softmax over those
    k (Mixtral always; Qwen3-MoE with norm_topk_prob), which is Megatron-Core's TopKRouter with
    moe_router_pre_softmax = false. Megatron-Core routes top-1 only with the softmax first (an unnormalised
    weight), and Qwen3-MoE's norm_topk_prob = false keeps the softmax over all experts: nemoc builds
    neither, so both are refused. Mixtral's every layer is sparse; Qwen3-MoE's dense layers are
    `_qwen3_moe_layer_pattern`'s.
    """
    if family not in MOE:
        return {}
    # absent keys take the class defaults: MixtralConfig 8 experts, top 2; Qwen3MoeConfig 128, top 8
    default_experts, default_top_k = (8, 2) if family == "mixtral" else (128, 8)
    both = {k: config[k] for k in ("num_local_experts", "num_experts") if config.get(k)}
    if len(set(both.values())) > 1:
        raise HfConfigError(f"num_local_experts = {both['num_local_experts']} but num_experts = {both['num_experts']}: "
                            "two different expert counts (transformers 5 writes one of them); keep the one the "
                            "checkpoint's tensors have")
    experts = int(config.get("num_local_experts") or config.get("num_experts") or default_experts)
    top_k = int(config.get("num_experts_per_tok", default_top_k))
    if top_k > experts:
        raise HfConfigError(f"num_experts_per_tok = {top_k} > {experts} experts: a token cannot be routed to more "
                            "experts than there are")
    if top_k < 2:
        raise HfConfigError(f"num_experts_per_tok = {top_k}: Megatron-Core routes top-1 with the softmax before "
                            "the top-k (a weight below 1), transformers renormalises it to 1")
    if family == "qwen3_moe":
        if not config.get("norm_topk_prob", False):
            raise HfConfigError("norm_topk_prob = false weights experts by their softmax over all experts; nemoc "
                                "builds Megatron-Core's router with the softmax over the top-k (norm_topk_prob = true)")
        layers = _qwen3_moe_layer_pattern(config)
        moe_ffn = int(config.get("moe_intermediate_size", 768))
        # the checkpoint's own auxiliary-loss weight (Qwen3MoeConfig.router_aux_loss_coef, 1e-3, which
        # Megatron-Bridge's Qwen3-MoE bridge also sets with aux_loss balancing); a training choice, so a
        # written value wins (TRAINING_FIELDS)
        balance = {"moe_load_balancing": "aux_loss",
                   "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef", 1e-3))} | layers
    else:
        if float(config.get("router_jitter_noise") or 0.0):
            raise HfConfigError("router_jitter_noise != 0: Megatron-Core's router has no multiplicative jitter")
        moe_ffn = int(config["intermediate_size"])
        balance = {}
    return {"experts": experts, "top_k": top_k, "moe_ffn_hidden": moe_ffn, "shared_expert_ffn_hidden": 0} | balance


def _qwen3_moe_layer_pattern(config: dict) -> dict[str, Any]:
    """Which Qwen3-MoE layers are expert layers: Qwen3MoeDecoderLayer makes layer i an expert layer when i is not
    in mlp_only_layers, num_experts > 0 and (i + 1) % decoder_sparse_step == 0, else a dense MLP of
    intermediate_size (transformers models/qwen3_moe/modeling_qwen3_moe.py). Megatron-Core builds the same with
    `moe_layer_freq` as a 0 / 1 list (its integer form, `i % N == 0`, marks layers 0, N, ... where
    decoder_sparse_step marks N - 1, 2N - 1, ...): {} when every layer is sparse, else {"moe_layer_freq": list}.
    Refused, the key named: num_experts = 0 (a dense Qwen3), decoder_sparse_step = 0 (transformers fails on it)
    and a pattern without any expert layer. mlp_only_layers entries outside the model are ignored, as there."""
    for key in ("num_experts", "num_local_experts"):  # transformers 5 writes num_experts as num_local_experts
        if key in config and not int(config[key] or 0):
            raise HfConfigError(f"{key} = 0 makes every layer a dense MLP (a dense Qwen3 under model_type "
                                "qwen3_moe); nemoc maps qwen3_moe with expert layers only (use model_type qwen3)")
    layers = int(config["num_hidden_layers"])
    # an entry outside 0 .. layers - 1 marks no layer (`layer_idx not in mlp_only_layers`): ignored, as there
    dense = sorted(i for i in {int(i) for i in config.get("mlp_only_layers") or []} if 0 <= i < layers)
    step = config.get("decoder_sparse_step")
    step = 1 if step is None else int(step)  # absent or null: Qwen3MoeConfig's default
    if step == 0:  # transformers divides by it: `(layer_idx + 1) % config.decoder_sparse_step`
        raise HfConfigError("decoder_sparse_step = 0: transformers' Qwen3MoeDecoderLayer fails on it (a modulo by "
                            "zero); 1 makes every layer not in mlp_only_layers an expert layer")
    pattern = tuple(0 if i in dense or (i + 1) % step else 1 for i in range(layers))
    if not any(pattern):
        raise HfConfigError(f"mlp_only_layers = {dense}, decoder_sparse_step = {step}: no layer of the "
                            f"{layers} is an expert layer (a dense Qwen3: use model_type qwen3)")
    return {} if all(pattern) else {"moe_layer_freq": pattern}


def _deepseek_rope(config: dict) -> dict[str, Any]:
    """DeepseekV3Config's RoPE -> MLA's: `yarn` (rope_scaling / rope_parameters with factor,
    original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim: Megatron-Core's
    YarnRotaryEmbedding takes the same six) or plain RoPE. transformers applies DeepSeek's rotation to
    interleaved channel pairs (rope_interleave = true, DeepseekV3Config's default and every published
    checkpoint), which is what Megatron-Core's MLA does (rope_utils._apply_rotary_pos_emb_bshd de-interleaves
    x[0::2], x[1::2] under multi_latent_attention), so the weights map unpermuted."""
    if config.get("rope_interleave") is False:
        raise HfConfigError("rope_interleave = false rotates the two contiguous halves of the RoPE channels; "
                            "Megatron-Core's MLA rotates interleaved pairs (DeepSeek's layout, rope_interleave = true)")
    kind = _rope_type(config)
    out = {"rotary_base": _rope_theta(config, 10000.0)}
    if kind == "default":
        return out | {"rope_type": "rope", "rope_scaling_factor": 1.0}
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    if kind != "yarn":
        raise HfConfigError(f"{key}.rope_type {kind!r} is not supported for deepseek_v3: MLA takes yarn or no "
                            "scaling (Megatron-Core MultiLatentAttention builds RotaryEmbedding or YarnRotaryEmbedding)")
    p = config[key]
    # transformers' yarn defaults (modeling_rope_utils._compute_yarn_parameters): beta_fast 32, beta_slow 1,
    # original context = max_position_embeddings
    original = int(p.get("original_max_position_embeddings") or config.get("max_position_embeddings", 4096))
    mscale, mscale_all_dim = _deepseek_yarn_mscale(key, p)
    return out | {"rope_type": "yarn", "rope_scaling_factor": _deepseek_yarn_factor(key, p, config, original),
                  "original_max_position_embeddings": original,
                  "beta_fast": float(p.get("beta_fast") or 32.0), "beta_slow": float(p.get("beta_slow") or 1.0),
                  "mscale": mscale, "mscale_all_dim": mscale_all_dim}


def _deepseek_yarn_factor(key: str, p: dict, config: dict, original: int) -> float:
    """YaRN's `factor`; transformers derives an absent one (null) as max_position_embeddings / original context
    (_compute_yarn_parameters), but DeepseekV3Attention's softmax scale reads `factor` itself when mscale_all_dim
    is set (yarn_apply_mscale), which a null one breaks. `attention_factor` and `truncate = false` are YaRN
    variants Megatron-Core's YarnRotaryEmbedding does not compute (it always takes the mscale ratio and rounds the
    correction range: _yarn_find_correction_range round_to_int)."""
    if p.get("attention_factor") is not None:
        raise HfConfigError(f"{key}.attention_factor = {p['attention_factor']}: Megatron-Core's YarnRotaryEmbedding "
                            "computes the cos/sin factor from factor, mscale and mscale_all_dim; it takes no "
                            "written one")
    if p.get("truncate") is False:
        raise HfConfigError(f"{key}.truncate = false: Megatron-Core's YarnRotaryEmbedding always rounds the "
                            "correction range to whole dimensions (truncate = true)")
    factor = p.get("factor")
    if factor is not None:
        return float(factor)
    if p.get("mscale_all_dim"):
        raise HfConfigError(f"{key}.factor = null with mscale_all_dim: transformers' DeepseekV3Attention computes its "
                            "softmax scale from the written factor (yarn_apply_mscale); write factor")
    return float(config.get("max_position_embeddings", 4096)) / original


def _deepseek_yarn_mscale(key: str, p: dict) -> tuple[float, float]:
    """(mscale, mscale_all_dim) for Megatron-Core's YarnRotaryEmbedding, which scales cos/sin by
    get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) (_yarn_get_concentration_factor) and MLA's
    softmax by get_mscale(factor, mscale_all_dim)^2. transformers takes that ratio only `if mscale and
    mscale_all_dim`, else get_mscale(factor) (_compute_yarn_parameters), and scales the softmax only when
    mscale_all_dim is set (yarn_apply_mscale). So: both set -> both; mscale_all_dim absent or 0 -> 1 / 0 (the
    same cos/sin factor and softmax; transformers ignores a lone mscale); mscale_all_dim without mscale ->
    refused (transformers' cos/sin get get_mscale(factor), Megatron's the ratio)."""
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(mscale), float(mscale_all_dim)
    if not mscale_all_dim:
        return 1.0, 0.0
    given = "absent" if mscale is None else f"= {mscale}"
    raise HfConfigError(f"{key}.mscale {given} with mscale_all_dim = {mscale_all_dim}: transformers then scales "
                        "cos/sin by 0.1 ln(factor) + 1, Megatron-Core's YarnRotaryEmbedding by get_mscale(factor, "
                        "mscale) / get_mscale(factor, mscale_all_dim); write mscale too (DeepSeek-V3 writes both)")


def _deepseek_router(config: dict) -> dict[str, Any]:
    """DeepseekV3TopkRouter -> Megatron-Core's TopKRouter: sigmoid scores, the expert choice on scores +
    e_score_correction_bias (Megatron's expert bias, moe_router_enable_expert_bias), the chosen experts
    weighted by their scores renormalised over the top-k (norm_topk_prob; Megatron's sigmoid router always
    renormalises for top-k > 1, moe_utils.topk_routing_with_score_function) times routed_scaling_factor
    (moe_router_topk_scaling_factor), group-limited over n_group groups of which topk_group are kept
    (moe_router_num_groups / moe_router_group_topk). transformers ranks a group by the sum of its top-2
    scores, Megatron by its top (top_k // topk_group): equal only when that is 2 (DeepSeek-V3: 8 // 4)."""
    experts, top_k = int(config.get("n_routed_experts", 256)), int(config.get("num_experts_per_tok", 8))
    if top_k < 2:
        raise HfConfigError(f"num_experts_per_tok = {top_k}: Megatron-Core's sigmoid router does not renormalise "
                            "a single expert's score, transformers' norm_topk_prob does")
    if not config.get("norm_topk_prob", True):
        raise HfConfigError("norm_topk_prob = false weights experts by their raw sigmoid scores; Megatron-Core's "
                            "sigmoid router renormalises them over the top-k")
    groups, group_topk = int(config.get("n_group") or 1), int(config.get("topk_group") or 1)
    if groups > 1 and top_k // group_topk != 2:
        raise HfConfigError(f"n_group = {groups} with num_experts_per_tok = {top_k}, topk_group = {group_topk}: "
                            f"transformers ranks a group by its top-2 scores, Megatron-Core by its top "
                            f"num_experts_per_tok // topk_group = {top_k // group_topk}")
    shared = int(config.get("n_shared_experts") or 0)
    moe_ffn = int(config.get("moe_intermediate_size", 2048))
    return {"experts": experts, "top_k": top_k, "moe_ffn_hidden": moe_ffn, "shared_expert_ffn_hidden": shared * moe_ffn,
            "moe_router_score": "sigmoid", "moe_expert_bias": True,
            "moe_topk_scaling_factor": float(config.get("routed_scaling_factor", 2.5)),
            "moe_router_groups": groups if groups > 1 else 0, "moe_router_group_topk": group_topk if groups > 1 else 0,
            # how the router is trained (TRAINING_FIELDS; DeepSeek-V3's sequence-wise balance loss, alpha 1e-4)
            "moe_load_balancing": "seq_aux_loss", "moe_aux_loss_coeff": 1e-4}


def deepseek_dense_layers(config: dict) -> list[int]:
    """The dense-MLP layers of a DeepseekV3 checkpoint: DeepseekV3DecoderLayer builds an MoE block when
    layer_idx >= first_k_dense_replace, else a dense MLP of intermediate_size. As Megatron-Core's moe_layer_freq
    list (1 = expert layer): [0] * first_k_dense_replace + [1] * (layers - first_k_dense_replace)."""
    layers, dense = int(config["num_hidden_layers"]), int(config.get("first_k_dense_replace", 3) or 0)
    return [0] * min(dense, layers) + [1] * max(0, layers - dense)


def _deepseek_v3(config: dict) -> dict[str, Any]:
    """DeepseekV3Config (transformers 5.x; absent keys take its defaults) -> ModelSpec fields."""
    hidden, heads = int(config.get("hidden_size", 7168)), int(config.get("num_attention_heads", 128))
    if config.get("hidden_act", "silu") != "silu":
        raise HfConfigError(f"hidden_act {config['hidden_act']!r}: nemoc maps deepseek_v3 only with silu (SwiGLU)")
    if config.get("attention_bias"):
        raise HfConfigError("attention_bias = true: MLA's projections have no bias in Megatron-Core (MLASelfAttention)")
    kv_heads = config.get("num_key_value_heads")
    if kv_heads is not None and int(kv_heads) != heads:
        raise HfConfigError(f"num_key_value_heads = {kv_heads} != num_attention_heads = {heads}: MLA has a key and "
                            "value per head")
    dense = deepseek_dense_layers(config)
    # the dense first layers (DeepSeek-V3's 3, V2-Lite's 1) are Megatron-Core's moe_layer_freq
    # [0] * k + [1] * (layers - k), which the model states as moe_first_dense_layers = k (the presets' form)
    first_dense = {"moe_first_dense_layers": dense.count(0)} if 0 in dense and 1 in dense else {}
    q_lora = config.get("q_lora_rank", 1536)
    experts = _deepseek_router(config) if 1 in dense else {}  # every layer dense: a dense MLA model
    return _deepseek_rope(config) | experts | first_dense | {
        "layers": int(config["num_hidden_layers"]), "hidden": hidden, "heads": heads, "query_groups": heads,
        "ffn_hidden": int(config.get("intermediate_size", 18432)), "vocab": int(config["vocab_size"]),
        "seq_length": int(config.get("max_position_embeddings", 4096)),
        "activation": "swiglu", "norm": "rmsnorm", "position": "rope",
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": True,  # q_a_layernorm, kv_a_layernorm
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "multi_latent_attention": True, "q_lora_rank": int(q_lora) if q_lora else 0,
        "kv_lora_rank": int(config.get("kv_lora_rank", 512)), "qk_head_dim": int(config.get("qk_nope_head_dim", 128)),
        "qk_pos_emb_head_dim": int(config.get("qk_rope_head_dim", 64)), "v_head_dim": int(config.get("v_head_dim", 128)),
    }


# transformers' ACT2FN names -> nemoc's activation: `gelu` is torch's exact erf GELU; gelu_new (GPT-2's
# default), gelu_pytorch_tanh and gelu_fast are the tanh approximation (transformers/activations.py).
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh"}


def _gpt2(config: dict) -> dict[str, Any]:
    act = config.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise HfConfigError(f"activation_function {act!r} is not supported (supported: "
                            f"{', '.join(sorted(GPT2_ACTIVATIONS))})")
    hidden = int(config.get("n_embd", 768))
    return {
        "layers": int(config.get("n_layer", 12)), "hidden": hidden, "heads": int(config.get("n_head", 12)),
        "query_groups": int(config.get("n_head", 12)), "ffn_hidden": int(config.get("n_inner") or 4 * hidden),
        "vocab": int(config.get("vocab_size", 50257)), "seq_length": int(config.get("n_positions", 1024)),
        "kv_channels": None, "activation": GPT2_ACTIVATIONS[act], "norm": "layernorm", "position": "learned",
        "rotary_base": 10000.0, "rope_scaling_factor": 1.0,
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "add_bias_linear": True, "add_qkv_bias": False, "qk_layernorm": False,
        "norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5)),
    }


# Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text; transformers' Gemma3TextConfig is the source of its
# defaults). Megatron-Core 0.16.1's GPTModel has no switch for five of its parts, which nemoc's runtime adds as
# small modules on Megatron-Core's local layer spec: the (1 + w) RMSNorm (the local spec's
# WrappedTorchNorm asserts layernorm_zero_centered_gamma off, transformer/torch_norm.py), the sandwich norms
# (TransformerLayerSubmodules has no post-block norm), the embedding scale sqrt(hidden) (LanguageModelEmbedding
# has no multiplier, and tied embeddings keep it out of the weights), the second RoPE base of the sliding layers
# (GPTModel holds one RotaryEmbedding) and the per-layer sliding window in the SDPA core. GeGLU (tanh GELU,
# gated_linear_unit), query_pre_attn_scalar (TransformerConfig.softmax_scale) and the QK norm map directly.
GEMMA3_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # the tanh GELU under transformers' names
GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma3TextConfig.default_theta


def _gemma3_rope(config: dict) -> tuple[float, float]:
    """(base of the full-attention layers, base of the sliding layers); only unscaled RoPE maps."""
    params = config.get("rope_parameters") or {}
    nested = isinstance(params.get("full_attention"), dict) or isinstance(params.get("sliding_attention"), dict)
    full = dict(params.get("full_attention") or {}) if nested else dict(params)
    full.update(config.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {}) if nested else {}
    for layer_type, p in (("full_attention", full), ("sliding_attention", local)):
        kind = p.get("rope_type") or p.get("type") or "default"
        if kind != "default":
            raise HfConfigError(f"rope_parameters.{layer_type}.rope_type {kind!r}: nemoc maps Gemma 3 with unscaled "
                                "RoPE only (the linear scaling of Gemma 3 4B/12B/27B is not built)")
    return (float(full.get("rope_theta", config.get("rope_theta", GEMMA3_THETA["full_attention"]))),
            float(local.get("rope_theta", config.get("rope_local_base_freq", GEMMA3_THETA["sliding_attention"]))))


def _gemma3_window(config: dict, layers: int) -> tuple[int, int]:
    """(sliding_window, full_attention_every) from layer_types (or the older sliding_window_pattern, default 6)."""
    window = config.get("sliding_window", 4096)
    types = config.get("layer_types")
    if types is None:
        pattern = int(config.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if len(types) != layers:
        raise HfConfigError(f"layer_types has {len(types)} entries for num_hidden_layers = {layers}")
    full = [i + 1 for i, t in enumerate(types) if t == "full_attention"]
    if not window or len(full) == layers:
        return 0, 0
    every = full[0] if full else 0
    if any(t not in ("full_attention", "sliding_attention") for t in types) or \
            full != list(range(every, layers + 1, every) if every else []):
        raise HfConfigError(f"layer_types {types}: nemoc maps a full-attention layer every n-th layer (n, 2n, ...), "
                            "the others sliding")
    return int(window), every


def _gemma3(config: dict) -> dict[str, Any]:
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GEMMA3_ACTIVATIONS:
        raise HfConfigError(f"hidden_activation {act!r}: nemoc maps Gemma 3 with the tanh GELU (gelu_pytorch_tanh)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            raise HfConfigError(f"{key} = {config[key]}: nemoc builds no soft-capping (Gemma 2's; Gemma 3 has none)")
    if config.get("attention_bias"):
        raise HfConfigError("attention_bias = true: nemoc maps Gemma 3 without biases")
    if config.get("use_bidirectional_attention"):
        raise HfConfigError("use_bidirectional_attention = true (an embedding model): nemoc trains causal models")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    full_base, local_base = _gemma3_rope(config)
    window, every = _gemma3_window(config, layers)
    head_dim = int(config.get("head_dim") or 256)
    return {
        "layers": layers, "hidden": hidden, "heads": heads,
        "query_groups": int(config.get("num_key_value_heads") or heads),
        "ffn_hidden": int(config["intermediate_size"]), "vocab": int(config["vocab_size"]),
        "seq_length": int(config.get("max_position_embeddings", 131_072)), "kv_channels": head_dim,
        "activation": "geglu_tanh", "norm": "rmsnorm", "position": "rope",
        "rotary_base": full_base, "rope_scaling_factor": 1.0,
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": True,
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "norm_zero_centered": True, "post_block_norms": True, "embedding_scale": True,
        "softmax_scale": float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
        "sliding_window": window, "full_attention_every": every,
        "local_rotary_base": local_base if window else None,
    }


# Gemma 1 and 2 stay unsupported: Gemma 1 is built of the same parts as Gemma 3 less the sandwich norms and
# the QK norm, but nemoc's runtime builds the Gemma 3 layer only; Gemma 2 adds attention-logit and final-logit
# soft-capping (tanh(x / c) * c), which neither Megatron-Core 0.16.1 (attention.py passes softcap 0.0) nor
# nemoc's attention core computes.
_UNSUPPORTED = {
    "gemma": "nemoc builds Gemma 3 (gemma3_text) only; Gemma 1 lacks its sandwich norms and QK norm",
    "gemma2": "attn_logit_softcapping / final_logit_softcapping: neither Megatron-Core 0.16.1 nor nemoc's "
              "attention core soft-caps logits (nemoc builds Gemma 3, gemma3_text)",
    "gemma3": "the multimodal Gemma3ForConditionalGeneration: nemoc imports the text model only "
              "(Gemma3ForCausalLM, model_type gemma3_text, e.g. google/gemma-3-1b-pt)",
}


def architecture(config: dict) -> HfArchitecture:
    """The family and ModelSpec fields of a parsed config.json (HfConfigError when not expressible)."""
    if not isinstance(config, dict):
        raise HfConfigError(f"config.json is a JSON {type(config).__name__}, not an object of configuration keys")
    family = config.get("model_type")
    if not isinstance(family, (str, type(None))):
        raise HfConfigError(f"model_type = {json.dumps(family)}: expected a string")
    if family in _UNSUPPORTED:
        raise HfConfigError(f"model_type {family!r} is not supported: {_UNSUPPORTED[family]}")
    if family not in FAMILIES:
        raise HfConfigError(f"model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
    check_types(config)
    try:
        fields = {"gpt2": _gpt2, "gemma3_text": _gemma3, "deepseek_v3": _deepseek_v3}.get(
            family, lambda c: _llama_like(c, family))(config)
    except KeyError as exc:
        raise HfConfigError(f"config.json has no {exc.args[0]!r}") from None
    special = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return HfArchitecture(family=family, fields=fields, special_ids=special, dtype=str(dtype))


def load_architecture(directory: str | Path) -> HfArchitecture:
    return architecture(read_config(directory))


# Fields config.json suggests but the architecture does not fix: how the router is trained. A value written in
# the model block (or a preset's) replaces the checkpoint's rather than contradicting it.
TRAINING_FIELDS = ("moe_load_balancing", "moe_aux_loss_coeff")


def mismatches(arch: HfArchitecture, written: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, value written in the .nemo file, value from config.json) for every disagreement.

    `seq_length` is exempt for RoPE models: training on sequences shorter than max_position_embeddings
    is normal; a learned position table (GPT-2) must have the checkpoint's length. TRAINING_FIELDS are exempt.
    """
    out = _attention_kind_mismatch(arch, written) + _moe_layer_mismatch(arch, written)
    for name, value in written.items():
        if name not in arch.fields or name in TRAINING_FIELDS or name in _PATTERN_FIELDS or (
                name == "seq_length" and arch.fields["position"] != "learned"):
            continue
        theirs = arch.fields[name]
        if theirs is None and name == "kv_channels":
            theirs = arch.fields["hidden"] // arch.fields["heads"]
        if theirs is not None and (isinstance(theirs, float) or isinstance(value, float)):
            if abs(float(value) - float(theirs)) > 1e-9 * max(1.0, abs(float(theirs))):
                out.append((name, value, theirs))
        elif value != theirs:
            out.append((name, value, theirs))
    return out


_PATTERN_FIELDS = ("moe_layer_freq", "moe_first_dense_layers")  # compared as the layer pattern they make


def _moe_layer_mismatch(arch: HfArchitecture, written: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Which layers are expert layers: the pattern `moe_layer_freq` and `moe_first_dense_layers` make as written
    (a field not written takes config.json's, as the model then does) against config.json's own (Mixtral: every
    layer; Qwen3-MoE: mlp_only_layers / decoder_sparse_step; DeepSeek-V3: first_k_dense_replace). Compared as
    patterns, so `moe_layer_freq = 2` equals a checkpoint's [1, 0, 1, 0]. One entry, on the field that differs
    from config.json's (moe_layer_freq when both are written and the dense prefix agrees)."""
    from nemoc.compiler.spec import moe_layer_pattern

    f = arch.fields
    if not f.get("experts") or not any(k in written for k in _PATTERN_FIELDS):
        return []

    def pattern(fields: dict) -> tuple[int, ...]:
        freq = fields.get("moe_layer_freq", 1)
        return moe_layer_pattern(int(f["layers"]), int(f["experts"]), freq if isinstance(freq, int) else tuple(freq),
                                 int(fields.get("moe_first_dense_layers", 0) or 0))

    theirs = pattern(f)
    if pattern({**f, **{k: written[k] for k in _PATTERN_FIELDS if k in written}}) == theirs:
        return []
    name = ("moe_first_dense_layers" if "moe_first_dense_layers" in written and (
        written["moe_first_dense_layers"] != f.get("moe_first_dense_layers", 0) or "moe_layer_freq" not in written)
        else "moe_layer_freq")
    return [(name, written[name], f"expert layers {_pattern_text(theirs)}")]


def _pattern_text(pattern: tuple[int, ...]) -> str:
    """A layer pattern as config.json's fields say it, briefly: `every layer`, `all but the first K`, or the
    0 / 1 list (shortened after 16 entries)."""
    k = next((i for i, v in enumerate(pattern) if v), len(pattern))
    if all(pattern[k:]):
        return "= every layer" if k == 0 else f"= all but the first {k} (moe_first_dense_layers = {k})"
    shown = ", ".join(str(v) for v in pattern[:16]) + (", ..." if len(pattern) > 16 else "")
    return f"(moe_layer_freq) = [{shown}]"


def _attention_kind_mismatch(arch: HfArchitecture, written: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """`multi_latent_attention` written against a checkpoint of the other kind: only deepseek_v3 has MLA (its
    fields say so); every other family's config.json implies standard attention without naming the field."""
    if "multi_latent_attention" not in written or "multi_latent_attention" in arch.fields:
        return []
    return [("multi_latent_attention", written["multi_latent_attention"], False)] if written["multi_latent_attention"] else []
