"""Tensor-name and layout mapping between Hugging Face checkpoints and Megatron-Core's GPTModel.

Input:  a family (compiler.hfconfig.FAMILIES), the architecture fields of its config.json, and a
        `get(name) -> tensor` reader (streaming: each tensor is read when its target needs it).
Output: generators of (name, tensor) pairs, one layer at a time, in the *full* Megatron-Core naming
        (TP=1, PP=1, unpadded vocabulary; `shard_for_rank` slices to a rank's layout) or back in the
        Hugging Face naming. The transforms are exact permutations and concatenations, so
        HF -> Megatron -> HF is bit-identical.

Megatron-Core GPTModel (local and TE specs alike: TE's fused norm names, `TE_NORMS`, are renamed on the way in
when the chunk has them and accepted on the way out):
  embedding.word_embeddings.weight                   <- model.embed_tokens.weight (rows padded per TP)
  decoder.layers.i.input_layernorm.weight            <- model.layers.i.input_layernorm.weight
  decoder.layers.i.self_attention.linear_qkv.weight  <- q_proj, k_proj, v_proj interleaved per query
       group: [q heads of group 0; k_0; v_0; q heads of group 1; k_1; v_1; ...] (so a TP split of dim 0
       hands each rank whole groups); the same for Qwen2's biases
  decoder.layers.i.self_attention.{q,k}_layernorm.weight <- self_attn.{q,k}_norm.weight (Qwen3)
  decoder.layers.i.self_attention.linear_proj.weight <- self_attn.o_proj.weight
  decoder.layers.i.pre_mlp_layernorm.weight          <- post_attention_layernorm.weight
  decoder.layers.i.mlp.linear_fc1.weight             <- [gate_proj; up_proj] (SwiGLU: first half gated)
  decoder.layers.i.mlp.linear_fc2.weight             <- mlp.down_proj.weight
  MoE (Mixtral block_sparse_moe.*, Qwen3-MoE mlp.*): mlp.router.weight <- gate.weight;
  decoder.layers.i.mlp.experts.local_experts.j.linear_fc1.weight <- [w1; w3] (Mixtral) / [gate_proj; up_proj]
  decoder.layers.i.mlp.experts.local_experts.j.linear_fc2.weight <- w2 / down_proj
       (j global here; a rank of expert-parallel size EP holds experts [r E/EP, (r+1) E/EP) renumbered
       from 0, each split by the expert tensor-parallel size); with grouped GEMM (TE's TEGroupedMLP) local
       expert j is `mlp.experts.linear_fc1.weight{j}` / `linear_fc2.weight{j}` (`grouped_expert_name`);
       a MoE model's dense layers (Qwen3-MoE's mlp_only_layers / decoder_sparse_step: `is_expert_layer`) map as
       the dense MLP above
  decoder.final_layernorm.weight                     <- model.norm.weight
  output_layer.weight                                <- lm_head.weight (absent when tied)
GPT-2 stores Conv1D weights as [in, out] (transposed) and c_attn as [q; k; v] with heads contiguous.
Gemma 3 (runtime/gemma.py) as llama with the QK norms, except its four norms per layer:
  decoder.layers.i.input_layernorm.weight                          <- input_layernorm.weight
  decoder.layers.i.self_attention.linear_proj.post_layernorm.weight <- post_attention_layernorm.weight
  decoder.layers.i.pre_mlp_layernorm.weight                        <- pre_feedforward_layernorm.weight
  decoder.layers.i.mlp.linear_fc2.post_layernorm.weight            <- post_feedforward_layernorm.weight
  (every norm weight zero-centred on both sides: copied unchanged), fc1 = [gate_proj; up_proj] (GeGLU).
DeepSeek-V3 (DeepseekV3ForCausalLM; Megatron-Core's MLASelfAttention and MoE layer): see `_deepseek_layer`
  (local names). Transformer Engine's MLA spec (gpt_layer_specs.py get_gpt_layer_with_transformer_engine_spec,
  qk_layernorm) fuses the latent norms into the up projections (`linear_q_up_proj.layer_norm_weight`,
  `linear_kv_up_proj.layer_norm_weight`: `TE_NORMS`) and builds both down projections as
  TELinear(parallel_mode='duplicated'), whole on every tensor-parallel rank (`shard_for_rank`'s `whole`). Every MLA tensor maps unpermuted: q_b_proj's rows are [nope; rope] per head and kv_b_proj's
  [k_nope; v] per head in both (MLASelfAttention views them as [heads, qk + pe] / [heads, qk + v] and splits),
  kv_a_proj_with_mqa's rows [kv latent; shared rope key] in both, and transformers rotates DeepSeek's
  interleaved rope channels as Megatron's MLA does (compiler/hfconfig.py `_deepseek_rope`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from nemoc.compiler.spec import moe_layer_pattern

Getter = Callable[[str], torch.Tensor]
L = "decoder.layers"
GATED = ("swiglu", "geglu_tanh")  # activations whose fc1 is [gate; up]
# Gemma 3's norms: Hugging Face name (under model.layers.i.) -> Megatron name (under decoder.layers.i.)
GEMMA3_NORMS = {"input_layernorm": "input_layernorm",
                "post_attention_layernorm": "self_attention.linear_proj.post_layernorm",
                "pre_feedforward_layernorm": "pre_mlp_layernorm",
                "post_feedforward_layernorm": "mlp.linear_fc2.post_layernorm"}


class MappingError(ValueError):
    """A checkpoint whose tensors do not fit its config (missing name, wrong shape)."""


def _heads(arch: dict[str, Any]) -> tuple[int, int, int]:
    heads, groups = arch["heads"], arch["query_groups"]
    return heads, groups, arch["kv_channels"] or arch["hidden"] // heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: dict[str, Any]) -> torch.Tensor:
    """[q; k; v] in head order -> Megatron's per-query-group interleaving (weights and biases)."""
    heads, groups, d = _heads(arch)
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, arch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of fuse_qkv."""
    heads, groups, d = _heads(arch)
    per = heads // groups
    rest = qkv.shape[1:]
    g = qkv.reshape(groups, (per + 2) * d, *rest)
    return (g[:, : per * d].reshape(-1, *rest), g[:, per * d:(per + 1) * d].reshape(-1, *rest),
            g[:, (per + 1) * d:].reshape(-1, *rest))


# ------------------------------------------------------------------------------ Hugging Face -> Megatron


def _llama_layer(family: str, i: int, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    src, dst = f"model.layers.{i}", f"{L}.{i}"
    a = f"{src}.self_attn"
    if family == "gemma3_text":
        for theirs, ours in GEMMA3_NORMS.items():
            yield f"{dst}.{ours}.weight", get(f"{src}.{theirs}.weight")
    else:
        yield f"{dst}.input_layernorm.weight", get(f"{src}.input_layernorm.weight")
    yield f"{dst}.self_attention.linear_qkv.weight", fuse_qkv(
        get(f"{a}.q_proj.weight"), get(f"{a}.k_proj.weight"), get(f"{a}.v_proj.weight"), arch)
    if arch["add_qkv_bias"]:
        yield f"{dst}.self_attention.linear_qkv.bias", fuse_qkv(
            get(f"{a}.q_proj.bias"), get(f"{a}.k_proj.bias"), get(f"{a}.v_proj.bias"), arch)
    if arch["qk_layernorm"]:
        yield f"{dst}.self_attention.q_layernorm.weight", get(f"{a}.q_norm.weight")
        yield f"{dst}.self_attention.k_layernorm.weight", get(f"{a}.k_norm.weight")
    yield f"{dst}.self_attention.linear_proj.weight", get(f"{a}.o_proj.weight")
    if family != "gemma3_text":
        yield f"{dst}.pre_mlp_layernorm.weight", get(f"{src}.post_attention_layernorm.weight")
    if is_expert_layer(arch, i):
        yield from _moe_layer(family, src, dst, arch, get)
        return
    yield f"{dst}.mlp.linear_fc1.weight", torch.cat([get(f"{src}.mlp.gate_proj.weight"),
                                                     get(f"{src}.mlp.up_proj.weight")], 0)
    yield f"{dst}.mlp.linear_fc2.weight", get(f"{src}.mlp.down_proj.weight")


def is_expert_layer(arch: dict, i: int) -> bool:
    """Whether layer i of the architecture (ModelSpec fields, as the manifest keeps them) is an expert layer:
    a MoE model's layers are, but where `moe_layer_freq` / `moe_first_dense_layers` make it a dense MLP (Qwen3-MoE's
    mlp_only_layers / decoder_sparse_step, DeepSeek's first_k_dense_replace), whose weights map as a dense
    model's (mlp.gate_proj / up_proj / down_proj <-> mlp.linear_fc1 / linear_fc2)."""
    if not arch.get("experts"):
        return False
    freq = arch.get("moe_layer_freq", 1)
    freq = freq if isinstance(freq, int) else tuple(freq)
    return bool(moe_layer_pattern(arch["layers"], arch["experts"], freq, arch.get("moe_first_dense_layers", 0))[i])


# Hugging Face names of an MoE block: (block prefix, expert (gate, up, down) names). Mixtral's w1/w3/w2 are
# gate/up/down (MixtralBlockSparseTop2MLP: w2(silu(w1 x) * w3 x)).
_MOE_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
              "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def _moe_layer(family: str, src: str, dst: str, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Router and experts: Megatron-Core's local spec (SequentialMLP, grouped GEMM off) names expert j's
    SwiGLU `mlp.experts.local_experts.j.linear_fc1` = [gate_j; up_j] and `...linear_fc2` = down_j."""
    block, (gate, up, down) = _MOE_NAMES[family]
    yield f"{dst}.mlp.router.weight", get(f"{src}.{block}.gate.weight")
    for j in range(arch["experts"]):
        e, ours = f"{src}.{block}.experts.{j}", f"{dst}.mlp.experts.local_experts.{j}"
        yield f"{ours}.linear_fc1.weight", torch.cat([get(f"{e}.{gate}.weight"), get(f"{e}.{up}.weight")], 0)
        yield f"{ours}.linear_fc2.weight", get(f"{e}.{down}.weight")


# DeepSeek-V3: Hugging Face name under model.layers.i.self_attn. -> Megatron name under decoder.layers.i.self_attention.
DEEPSEEK_ATTENTION = {"q_proj": "linear_q_proj", "q_a_proj": "linear_q_down_proj", "q_a_layernorm": "q_layernorm",
                      "q_b_proj": "linear_q_up_proj", "kv_a_proj_with_mqa": "linear_kv_down_proj",
                      "kv_a_layernorm": "kv_layernorm", "kv_b_proj": "linear_kv_up_proj", "o_proj": "linear_proj"}


def _deepseek_attention_names(arch: dict) -> list[tuple[str, str]]:
    """(Hugging Face, Megatron) module names of an MLA layer: q_proj without a query latent, else q_a_proj,
    q_a_layernorm, q_b_proj."""
    q = ("q_a_proj", "q_a_layernorm", "q_b_proj") if arch["q_lora_rank"] else ("q_proj",)
    return [(h, DEEPSEEK_ATTENTION[h]) for h in (*q, "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")]


def hf_to_mcore_mtp(depth: int, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """The inverse of `mcore_to_hf_mtp`: DeepSeek-V3's `model.layers.{num_hidden_layers + depth}` -> Megatron-Core's
    `mtp.layers.{depth}` (the copies of the embedding and output layer there are the shared ones: not read)."""
    n, dst = arch["layers"] + depth, f"mtp.layers.{depth}"
    prefix = f"{L}.{n}."
    for name, t in _deepseek_layer(n, arch, get, expert=is_expert_layer(arch, arch["layers"] - 1)):
        yield f"{dst}.transformer_layer." + name[len(prefix):], t
    src = f"model.layers.{n}"
    for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                         ("final_layernorm", "shared_head.norm")):
        yield f"{dst}.{ours}.weight", get(f"{src}.{theirs}.weight")


def _deepseek_layer(i: int, arch: dict, get: Getter, expert: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """A DeepseekV3DecoderLayer -> Megatron-Core's MLA transformer layer:
      input_layernorm -> input_layernorm; self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj,
      kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj} -> self_attention.{linear_q_down_proj, q_layernorm,
      linear_q_up_proj | linear_q_proj, linear_kv_down_proj, kv_layernorm, linear_kv_up_proj, linear_proj};
      post_attention_layernorm -> pre_mlp_layernorm; an expert layer's mlp.gate.weight -> mlp.router.weight,
      mlp.gate.e_score_correction_bias -> mlp.router.expert_bias (Megatron's aux-loss-free expert bias),
      experts.j.{gate,up,down}_proj -> experts.local_experts.j.linear_fc1 = [gate; up] / linear_fc2,
      shared_experts.{gate,up,down}_proj -> mlp.shared_experts.linear_fc1 = [gate; up] / linear_fc2; a dense
      layer's mlp.{gate,up,down}_proj -> mlp.linear_fc1 = [gate; up] / linear_fc2."""
    src, dst = f"model.layers.{i}", f"{L}.{i}"
    yield f"{dst}.input_layernorm.weight", get(f"{src}.input_layernorm.weight")
    for theirs, ours in _deepseek_attention_names(arch):
        yield f"{dst}.self_attention.{ours}.weight", get(f"{src}.self_attn.{theirs}.weight")
    yield f"{dst}.pre_mlp_layernorm.weight", get(f"{src}.post_attention_layernorm.weight")
    m = f"{src}.mlp"
    if not (is_expert_layer(arch, i) if expert is None else expert):
        yield f"{dst}.mlp.linear_fc1.weight", torch.cat([get(f"{m}.gate_proj.weight"), get(f"{m}.up_proj.weight")], 0)
        yield f"{dst}.mlp.linear_fc2.weight", get(f"{m}.down_proj.weight")
        return
    yield f"{dst}.mlp.router.weight", get(f"{m}.gate.weight")
    yield f"{dst}.mlp.router.expert_bias", get(f"{m}.gate.e_score_correction_bias")
    experts = [(f"{m}.experts.{j}", f"{dst}.mlp.experts.local_experts.{j}") for j in range(arch["experts"])]
    if arch.get("shared_expert_ffn_hidden"):
        experts.append((f"{m}.shared_experts", f"{dst}.mlp.shared_experts"))
    for theirs, ours in experts:
        yield f"{ours}.linear_fc1.weight", torch.cat([get(f"{theirs}.gate_proj.weight"), get(f"{theirs}.up_proj.weight")], 0)
        yield f"{ours}.linear_fc2.weight", get(f"{theirs}.down_proj.weight")


def _deepseek_layer_out(i: int, arch: dict, get: Getter, expert: bool | None = None,
                        src: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The inverse of `_deepseek_layer` (Megatron names in, Hugging Face names out). `expert` / `src`: an MTP
    depth's layer (`mcore_to_hf_mtp`), which is no decoder layer of the pattern."""
    src, dst = src or f"{L}.{i}", f"model.layers.{i}"
    yield f"{dst}.input_layernorm.weight", get(f"{src}.input_layernorm.weight")
    for theirs, ours in _deepseek_attention_names(arch):  # a TE checkpoint: the latent norms under TE_NORMS' names
        yield f"{dst}.self_attn.{theirs}.weight", _pick(get, f"{src}.self_attention.{ours}.weight",
                                                        *_te_fused(f"{src}.self_attention.{ours}.weight"))
    yield f"{dst}.post_attention_layernorm.weight", _pick(get, f"{src}.pre_mlp_layernorm.weight",
                                                          f"{src}.mlp.linear_fc1.layer_norm_weight")
    m = f"{dst}.mlp"
    if not (is_expert_layer(arch, i) if expert is None else expert):
        gate, up = torch.chunk(get(f"{src}.mlp.linear_fc1.weight"), 2, 0)
        yield f"{m}.gate_proj.weight", gate
        yield f"{m}.up_proj.weight", up
        yield f"{m}.down_proj.weight", get(f"{src}.mlp.linear_fc2.weight")
        return
    yield f"{m}.gate.weight", get(f"{src}.mlp.router.weight")
    yield f"{m}.gate.e_score_correction_bias", get(f"{src}.mlp.router.expert_bias")
    experts = [(f"{m}.experts.{j}", f"{src}.mlp.experts.local_experts.{j}") for j in range(arch["experts"])]
    if arch.get("shared_expert_ffn_hidden"):
        experts.append((f"{m}.shared_experts", f"{src}.mlp.shared_experts"))
    for theirs, ours in experts:
        gate, up = torch.chunk(get(f"{ours}.linear_fc1.weight"), 2, 0)
        yield f"{theirs}.gate_proj.weight", gate
        yield f"{theirs}.up_proj.weight", up
        yield f"{theirs}.down_proj.weight", get(f"{ours}.linear_fc2.weight")


def _gpt2_layer(i: int, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    src, dst = f"transformer.h.{i}", f"{L}.{i}"
    for ln, ours in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
        yield f"{dst}.{ours}.weight", get(f"{src}.{ln}.weight")
        yield f"{dst}.{ours}.bias", get(f"{src}.{ln}.bias")
    w = get(f"{src}.attn.c_attn.weight").t()
    b = get(f"{src}.attn.c_attn.bias")
    yield f"{dst}.self_attention.linear_qkv.weight", fuse_qkv(*torch.chunk(w, 3, 0), arch)
    yield f"{dst}.self_attention.linear_qkv.bias", fuse_qkv(*torch.chunk(b, 3, 0), arch)
    yield f"{dst}.self_attention.linear_proj.weight", get(f"{src}.attn.c_proj.weight").t()
    yield f"{dst}.self_attention.linear_proj.bias", get(f"{src}.attn.c_proj.bias")
    yield f"{dst}.mlp.linear_fc1.weight", get(f"{src}.mlp.c_fc.weight").t()
    yield f"{dst}.mlp.linear_fc1.bias", get(f"{src}.mlp.c_fc.bias")
    yield f"{dst}.mlp.linear_fc2.weight", get(f"{src}.mlp.c_proj.weight").t()
    yield f"{dst}.mlp.linear_fc2.bias", get(f"{src}.mlp.c_proj.bias")


def hf_to_mcore_layer(family: str, i: int, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    if family == "deepseek_v3":
        return _deepseek_layer(i, arch, get)
    return _gpt2_layer(i, arch, get) if family == "gpt2" else _llama_layer(family, i, arch, get)


def hf_to_mcore_edges(family: str, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Embeddings, final norm and output layer (everything outside the decoder layers)."""
    if family == "gpt2":
        yield "embedding.word_embeddings.weight", get("transformer.wte.weight")
        yield "embedding.position_embeddings.weight", get("transformer.wpe.weight")
        yield "decoder.final_layernorm.weight", get("transformer.ln_f.weight")
        yield "decoder.final_layernorm.bias", get("transformer.ln_f.bias")
    else:
        yield "embedding.word_embeddings.weight", get("model.embed_tokens.weight")
        yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not arch["tie_embeddings"]:
        yield "output_layer.weight", get("lm_head.weight")


# ------------------------------------------------------------------------------ Megatron -> Hugging Face


def _pick(get: Getter, *names: str) -> torch.Tensor:
    for name in names[:-1]:
        try:
            return get(name)
        except KeyError:
            continue
    return get(names[-1])


def _llama_layer_out(family: str, i: int, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    src, dst = f"{L}.{i}", f"model.layers.{i}"
    a, m = f"{src}.self_attention", f"{src}.mlp"
    if family == "gemma3_text":
        # a dist checkpoint stores the two pre-norms under Transformer Engine's fused names (the local spec's
        # sharded_state_dict_keys_map), a converted directory under the module names: either is read
        fused = {"input_layernorm": f"{a}.linear_qkv.layer_norm_weight",
                 "pre_mlp_layernorm": f"{m}.linear_fc1.layer_norm_weight"}
        for theirs, ours in GEMMA3_NORMS.items():
            names = (f"{src}.{ours}.weight",) + ((fused[ours],) if ours in fused else ())
            yield f"{dst}.{theirs}.weight", _pick(get, *names)
    else:
        yield f"{dst}.input_layernorm.weight", _pick(get, f"{src}.input_layernorm.weight",
                                                     f"{a}.linear_qkv.layer_norm_weight")
    for name, t in zip("qkv", split_qkv(get(f"{a}.linear_qkv.weight"), arch)):
        yield f"{dst}.self_attn.{name}_proj.weight", t
    if arch["add_qkv_bias"]:
        for name, t in zip("qkv", split_qkv(get(f"{a}.linear_qkv.bias"), arch)):
            yield f"{dst}.self_attn.{name}_proj.bias", t
    if arch["qk_layernorm"]:
        yield f"{dst}.self_attn.q_norm.weight", get(f"{a}.q_layernorm.weight")
        yield f"{dst}.self_attn.k_norm.weight", get(f"{a}.k_layernorm.weight")
    yield f"{dst}.self_attn.o_proj.weight", get(f"{a}.linear_proj.weight")
    if family != "gemma3_text":
        yield f"{dst}.post_attention_layernorm.weight", _pick(get, f"{src}.pre_mlp_layernorm.weight",
                                                              f"{m}.linear_fc1.layer_norm_weight")
    if is_expert_layer(arch, i):
        yield from _moe_layer_out(family, src, dst, arch, get)
        return
    gate, up = torch.chunk(get(f"{m}.linear_fc1.weight"), 2, 0)
    yield f"{dst}.mlp.gate_proj.weight", gate
    yield f"{dst}.mlp.up_proj.weight", up
    yield f"{dst}.mlp.down_proj.weight", get(f"{m}.linear_fc2.weight")


def _moe_layer_out(family: str, src: str, dst: str, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    block, (gate, up, down) = _MOE_NAMES[family]
    yield f"{dst}.{block}.gate.weight", get(f"{src}.mlp.router.weight")
    for j in range(arch["experts"]):
        e, ours = f"{dst}.{block}.experts.{j}", f"{src}.mlp.experts.local_experts.{j}"
        g, u = torch.chunk(get(f"{ours}.linear_fc1.weight"), 2, 0)
        yield f"{e}.{gate}.weight", g
        yield f"{e}.{up}.weight", u
        yield f"{e}.{down}.weight", get(f"{ours}.linear_fc2.weight")


def _te_fused(name: str) -> tuple[str, ...]:
    """TE's fused name of a latent norm (`te_alias`), none for any other tensor."""
    alias = te_alias(name)
    return (alias,) if alias is not None else ()


def _gpt2_layer_out(i: int, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    src, dst = f"{L}.{i}", f"transformer.h.{i}"
    a, m = f"{src}.self_attention", f"{src}.mlp"
    for ln, ours, te in (("ln_1", "input_layernorm", f"{a}.linear_qkv.layer_norm_"),
                         ("ln_2", "pre_mlp_layernorm", f"{m}.linear_fc1.layer_norm_")):
        yield f"{dst}.{ln}.weight", _pick(get, f"{src}.{ours}.weight", te + "weight")
        yield f"{dst}.{ln}.bias", _pick(get, f"{src}.{ours}.bias", te + "bias")
    yield f"{dst}.attn.c_attn.weight", torch.cat(split_qkv(get(f"{a}.linear_qkv.weight"), arch), 0).t()
    yield f"{dst}.attn.c_attn.bias", torch.cat(split_qkv(get(f"{a}.linear_qkv.bias"), arch), 0)
    yield f"{dst}.attn.c_proj.weight", get(f"{a}.linear_proj.weight").t()
    yield f"{dst}.attn.c_proj.bias", get(f"{a}.linear_proj.bias")
    yield f"{dst}.mlp.c_fc.weight", get(f"{m}.linear_fc1.weight").t()
    yield f"{dst}.mlp.c_fc.bias", get(f"{m}.linear_fc1.bias")
    yield f"{dst}.mlp.c_proj.weight", get(f"{m}.linear_fc2.weight").t()
    yield f"{dst}.mlp.c_proj.bias", get(f"{m}.linear_fc2.bias")


def mcore_to_hf_layer(family: str, i: int, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    if family == "deepseek_v3":
        return _deepseek_layer_out(i, arch, get)
    return _gpt2_layer_out(i, arch, get) if family == "gpt2" else _llama_layer_out(family, i, arch, get)


def mcore_to_hf_mtp(depth: int, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Multi-token prediction depth `depth` (Megatron-Core `mtp.layers.{depth}`) -> DeepSeek-V3's
    `model.layers.{num_hidden_layers + depth}` (the layout of deepseek-ai/DeepSeek-V3's safetensors, which
    transformers' DeepseekV3ForCausalLM does not load): enorm, hnorm, eh_proj (the same [2h -> h] matrix: both
    concatenate the next token's normalised embedding before the normalised hidden state), the transformer layer
    (`transformer_layer.*` as a decoder layer of the last layer's kind), `final_layernorm` -> `shared_head.norm`,
    and the copies DeepSeek's checkpoint keeps of the shared embedding (`embed_tokens`) and output layer
    (`shared_head.head`, the embedding when tied)."""
    src, n = f"mtp.layers.{depth}", arch["layers"] + depth
    dst = f"model.layers.{n}"
    pattern_last = is_expert_layer(arch, arch["layers"] - 1)
    yield from _deepseek_layer_out(n, arch, get, expert=pattern_last, src=f"{src}.transformer_layer")
    for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                         ("final_layernorm", "shared_head.norm")):
        yield f"{dst}.{theirs}.weight", get(f"{src}.{ours}.weight")
    vocab = arch["vocab"]
    emb = get("embedding.word_embeddings.weight")[:vocab]
    yield f"{dst}.embed_tokens.weight", emb
    yield f"{dst}.shared_head.head.weight", emb if arch["tie_embeddings"] else get("output_layer.weight")[:vocab]


def mcore_to_hf_edges(family: str, arch: dict, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    vocab = arch["vocab"]
    emb = get("embedding.word_embeddings.weight")[:vocab]
    if family == "gpt2":
        yield "transformer.wte.weight", emb
        yield "transformer.wpe.weight", get("embedding.position_embeddings.weight")
        yield "transformer.ln_f.weight", get("decoder.final_layernorm.weight")
        yield "transformer.ln_f.bias", get("decoder.final_layernorm.bias")
    else:
        yield "model.embed_tokens.weight", emb
        yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not arch["tie_embeddings"]:
        yield "lm_head.weight", get("output_layer.weight")[:vocab]


# ------------------------------------------------------------------------------ tensor/pipeline sharding

# Column-parallel (split dim 0) and row-parallel (split dim 1) Megatron linear layers.
_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
           "word_embeddings.weight", "output_layer.weight",
           "eh_proj.weight",  # an MTP depth's 2h -> h projection (ColumnParallelLinear, gather_output = False)
           # MLA's projections: every one column-parallel in the local spec (gather_output = False; the down
           # projections' shards are gathered inside MLASelfAttention)
           "linear_q_proj.weight", "linear_q_down_proj.weight", "linear_q_up_proj.weight",
           "linear_kv_down_proj.weight", "linear_kv_up_proj.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Megatron pads the vocabulary to a multiple of 128 * TP; the extra rows are zeros (never sampled
    by a real token id; their logits are cut off on export)."""
    if t.shape[0] >= padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], 0)


def fit_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """`t`'s vocabulary rows fitted to this layout's padded vocabulary: zero rows added (`pad_vocab`), or the
    padding rows of a checkpoint padded for another TP size (more rows than `padded`, which is at least the
    tokenizer's vocabulary) dropped; the export drops every row past the vocabulary the same way. Rows are
    dropped only when they are all zero (padding): a non-zero one is a real token's embedding of a larger
    vocabulary than this model's, refused (MappingError) rather than cut."""
    rows = t.shape[0]
    if rows <= padded:
        return pad_vocab(t, padded)
    live = t[padded:].reshape(rows - padded, -1).ne(0).any(1).nonzero()
    if live.numel():
        needed = padded + int(live.max()) + 1
        raise MappingError(f"it has {rows} vocabulary rows, of which rows {padded}..{needed - 1} are not padding "
                           f"(non-zero), but this model is built for {padded} rows (the tokenizer's vocabulary, "
                           f"padded): it was likely trained with a larger tokenizer; use that tokenizer (at least "
                           f"{needed} tokens)")
    return t[:padded]


# Transformer Engine's MLA spec builds the down projections as TELinear(parallel_mode='duplicated'): every
# tensor-parallel rank holds them whole (the local spec's are column-parallel)
TE_WHOLE = ("self_attention.linear_q_down_proj.weight", "self_attention.linear_kv_down_proj.weight")


def shard_for_rank(name: str, full: torch.Tensor, *, tp: int, rank: int, swiglu: bool,
                   whole: tuple[str, ...] = ()) -> torch.Tensor:
    """The slice of a full Megatron tensor that tensor-parallel rank `rank` of `tp` holds.

    SwiGLU's fc1 is [gate; up]; each rank holds [gate_r; up_r] (Megatron's ColumnParallelLinear over
    the two halves separately), not the r-th contiguous chunk. Names ending in one of `whole` are held whole
    (the chunk's layer spec duplicates them: `TE_WHOLE`).
    """
    if tp == 1 or (whole and name.endswith(whole)):
        return full
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")) and swiglu:
        gate, up = torch.chunk(full, 2, 0)
        return torch.cat([torch.chunk(gate, tp, 0)[rank], torch.chunk(up, tp, 0)[rank]], 0)
    if name.endswith(_COLUMN):
        return torch.chunk(full, tp, 0)[rank]
    if name.endswith(_ROW):
        return torch.chunk(full, tp, 1)[rank]
    return full  # norms, row-parallel biases, position embeddings: replicated


EXPERT = ".mlp.experts.local_experts."


def expert_slice(experts: int, ep: int, ep_rank: int) -> tuple[int, int]:
    """(first global expert, expert count) held by expert-parallel rank ep_rank (Megatron's even split)."""
    if experts % ep:
        raise MappingError(f"experts({experts}) is not divisible by ep({ep})")
    per = experts // ep
    return ep_rank * per, per


def grouped_expert_name(name: str) -> str | None:
    """Expert j's name in Transformer Engine's grouped-GEMM experts (TEGroupedMLP, `moe_grouped_gemm = true`:
    one GroupedLinear per projection holding `weight0` .. `weight{E-1}`) for the SequentialMLP name this module
    writes: `...mlp.experts.local_experts.j.linear_fc1.weight` -> `...mlp.experts.linear_fc1.weightj` (the same
    tensor: TEGroupedMLP's sharded_state_dict maps onto SequentialMLP's, experts.py). None for any other name."""
    if EXPERT not in name:
        return None
    head, rest = name.split(EXPERT, 1)
    j, tail = rest.split(".", 1)
    linear, _, param = tail.rpartition(".")
    return f"{head}.mlp.experts.{linear}.{param}{j}" if linear in ("linear_fc1", "linear_fc2") else None


def layer_offset(layers: int, pp: int, pp_rank: int) -> tuple[int, int]:
    """(first global layer, layer count) of pipeline stage pp_rank with Megatron's even split."""
    if layers % pp:
        raise MappingError(f"layers({layers}) is not divisible by pp({pp})")
    per = layers // pp
    return pp_rank * per, per


# The pre-norm weights' names in Megatron-Core's local spec and in Transformer Engine's fused
# layernorm-linear modules (one tensor, two names: a checkpoint of either spec loads into the other).
TE_NORMS = ((".input_layernorm.", ".self_attention.linear_qkv.layer_norm_"),
             (".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"),
             # MLA's latent norms, fused into the up projections (TE's MLA spec: q_layernorm = kv_layernorm = IdentityOp)
             (".self_attention.q_layernorm.", ".self_attention.linear_q_up_proj.layer_norm_"),
             (".self_attention.kv_layernorm.", ".self_attention.linear_kv_up_proj.layer_norm_"))


def te_alias(name: str) -> str | None:
    """The other spec's name of a pre-norm tensor (local `...input_layernorm.weight` <-> TE's fused
    `...self_attention.linear_qkv.layer_norm_weight`, the same for the MLP's pre-norm and MLA's latent norms),
    None for any other. (Qwen3's `q_layernorm` also gets MLA's alias: a name the chunk lacks, never used.)"""
    for local, te in TE_NORMS:
        if local in name:
            return name.replace(local, te, 1)
        if te in name:
            return name.replace(te, local, 1)
    return None


def either_spec(get: Callable[[str], Any]) -> Callable[[str], Any]:
    """`get` that also finds a pre-norm stored under the other layer spec's name (`te_alias`): a converted
    Hugging Face directory or a local-spec checkpoint read into a TE-spec chunk, and the reverse. KeyError
    when neither name is there."""

    def getter(name: str):
        try:
            return get(name)
        except KeyError:
            alias = te_alias(name)
            if alias is None:
                raise
            return get(alias)

    return getter
