"""Model presets: exact published architectures, each with its source.

Input:  nothing (reference data).
Output: `PRESETS`, a read-only mapping from a preset id (a valid identifier, e.g. `llama31_405b`) to a
`ModelSpec`; `get_preset(name)`.
Invariants: every preset carries a `source` citation; numbers are copied from the model's published
config (Hugging Face `config.json`, paper table or NeMo/Megatron-Bridge recipe), never rounded.
`seq_length` is the preset's default *training* sequence length (what the NeMo / Megatron-Bridge
pretraining recipe uses), not the maximum context after long-context extension.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from nemoc.compiler.spec import ModelSpec

# ------------------------------------------------------------------------------------------- GPT-3
# Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (n_layers, d_model, n_heads,
# d_head; n_ctx = 2048; d_ff = 4 d_model), as implemented by NeMo's GPT-3 configs (learned absolute
# positions, GELU, LayerNorm, biases, tied input/output embeddings). Table 2.1 lists n_heads=24 with
# d_head=128 for the 1.3B model, which does not multiply to d_model=2048; NeMo (and every Megatron
# reimplementation) uses 16 heads x 128, which is what we use. 13B: the paper prints d_model 5140;
# NeMo uses 5120 = 40 x 128 (5140 is not divisible by 40 heads). The GPT-2 BPE vocabulary has 50257
# entries; Megatron pads it to a multiple of 128 x TP at build time.
_GPT3_SRC = "Brown et al. 2020 (arXiv:2005.14165) Table 2.1; NeMo GPT-3 configs (gpt3_*)"


def _gpt3(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, query_groups=heads,
        ffn_hidden=4 * hidden, vocab=50257, seq_length=2048, activation="gelu", norm="layernorm",
        position="learned", tie_embeddings=True, add_bias_linear=True, add_qkv_bias=True,
        source=_GPT3_SRC,
    )


def _llama(name: str, layers: int, hidden: int, heads: int, groups: int, ffn: int, vocab: int,
           seq: int, rope: float, source: str, eps: float = 1e-5, rope_scaling: float = 1.0) -> ModelSpec:
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, query_groups=groups, ffn_hidden=ffn,
        vocab=vocab, seq_length=seq, activation="swiglu", norm="rmsnorm", position="rope",
        rotary_base=rope, rope_scaling_factor=rope_scaling, norm_epsilon=eps, source=source,
    )


_LLAMA2 = "Touvron et al. 2023 (arXiv:2307.09288); HF meta-llama/Llama-2-{}-hf config.json"
_LLAMA3 = "Llama 3 Herd of Models (arXiv:2407.21783) Table 3; HF meta-llama/Meta-Llama-3-{} config.json"
# Llama 3.1: rope_scaling {rope_type llama3, factor 8, low/high frequency factors 1/4, original 8192} in
# every size's config.json
_LLAMA31 = "Llama 3 Herd of Models (arXiv:2407.21783) Table 3; HF meta-llama/Llama-3.1-{} config.json"

# ------------------------------------------------------------------------------------------ Qwen
# Qwen2.5 (Qwen Team 2024, arXiv:2412.15115 Table 1; HF Qwen/Qwen2.5-*/config.json): SwiGLU, RMSNorm
# eps 1e-6, RoPE base 1e6, bias on QKV only, tied embeddings for <= 3B; vocab 151936 (small models)
# or 152064 (>= 7B, padded). Pretraining used 4096-token sequences before long-context extension.
_QWEN25 = "Qwen2.5 Technical Report (arXiv:2412.15115) Table 1; HF Qwen/Qwen2.5-{} config.json"


def _qwen25(name: str, layers: int, hidden: int, heads: int, groups: int, ffn: int, vocab: int,
            tie: bool, size: str) -> ModelSpec:
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, query_groups=groups, ffn_hidden=ffn,
        vocab=vocab, seq_length=4096, rotary_base=1_000_000.0, tie_embeddings=tie,
        add_qkv_bias=True, norm_epsilon=1e-6, source=_QWEN25.format(size),
    )


# Qwen3 dense (Qwen Team 2025, arXiv:2505.09388 Table 1; HF Qwen/Qwen3-*/config.json): head_dim 128
# for every size (so heads x 128 != hidden for several), QK-RMSNorm, no QKV bias, RoPE base 1e6,
# RMSNorm eps 1e-6, tied embeddings for <= 4B; stage-1 pretraining at 4096 tokens.
_QWEN3 = "Qwen3 Technical Report (arXiv:2505.09388) Table 1; HF Qwen/Qwen3-{} config.json"


def _qwen3(name: str, layers: int, hidden: int, heads: int, ffn: int, tie: bool, size: str) -> ModelSpec:
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, query_groups=8, ffn_hidden=ffn,
        vocab=151936, seq_length=4096, kv_channels=128, rotary_base=1_000_000.0, tie_embeddings=tie,
        qk_layernorm=True, norm_epsilon=1e-6, source=_QWEN3.format(size),
    )


# Qwen3-MoE (Qwen Team 2025, arXiv:2505.09388 Table 2; HF Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B
# config.json): Qwen3's attention (head_dim 128, QK-RMSNorm, 4 KV heads, no QKV bias, RoPE base 1e6, RMSNorm
# eps 1e-6) with every layer's MLP a mixture of 128 SwiGLU experts of moe_intermediate_size, top-8 routing,
# no shared expert (decoder_sparse_step 1, mlp_only_layers []); untied embeddings. norm_topk_prob = true:
# the chosen experts weighted by their softmax over the top 8, which is Megatron-Core's TopKRouter with
# moe_router_pre_softmax = false (the language's default). `ffn_hidden` is config.json's intermediate_size,
# which no layer uses (every MLP is an expert layer; Megatron-Bridge's provider copies it all the same).
# The router's auxiliary loss as Megatron-Bridge's Qwen3-MoE bridge sets it (models/qwen/qwen3_moe_bridge.py:
# moe_router_load_balancing_type "aux_loss", moe_aux_loss_coeff 1e-3 = config.json's router_aux_loss_coef).
# Stage-1 pretraining at 4096 tokens (the report; Bridge's pretraining recipes' seq_length).
_QWEN3_MOE = "Qwen3 Technical Report (arXiv:2505.09388) Table 2; HF Qwen/Qwen3-{} config.json"


def _qwen3_moe(name: str, layers: int, hidden: int, heads: int, ffn: int, moe_ffn: int, size: str) -> ModelSpec:
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, query_groups=4, ffn_hidden=ffn,
        vocab=151936, seq_length=4096, kv_channels=128, rotary_base=1_000_000.0, tie_embeddings=False,
        qk_layernorm=True, norm_epsilon=1e-6, experts=128, top_k=8, moe_ffn_hidden=moe_ffn,
        moe_load_balancing="aux_loss", moe_aux_loss_coeff=1e-3, source=_QWEN3_MOE.format(size),
    )


_QWEN3_MOE_PRESETS = (
    _qwen3_moe("qwen3_30b_a3b", 48, 2048, 32, 6144, 768, "30B-A3B"),
    _qwen3_moe("qwen3_235b_a22b", 94, 4096, 64, 12288, 1536, "235B-A22B"),
)


def _nemotron4(name: str, layers: int, hidden: int, heads: int, ffn: int, source: str) -> ModelSpec:
    # Nemotron-4: squared-ReLU MLP (no gating), LayerNorm, RoPE, no biases, untied embeddings,
    # GQA with 8 KV heads, 256k SentencePiece vocabulary, 4096-token pretraining sequences.
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, query_groups=8, ffn_hidden=ffn,
        vocab=256000, seq_length=4096, activation="squared_relu", norm="layernorm", position="rope",
        rotary_base=10000.0, source=source,
    )


def _mixtral(name: str, layers: int, hidden: int, heads: int, ffn: int, vocab: int, source: str) -> ModelSpec:
    # Mixtral: Mistral attention (GQA 8 KV heads) with 8 SwiGLU experts, top-2 routing, no shared
    # expert; every layer is MoE. RoPE base 1e6. Training seq 4096 as in the NeMo recipes.
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, query_groups=8, ffn_hidden=ffn,
        vocab=vocab, seq_length=4096, rotary_base=1_000_000.0, experts=8, top_k=2,
        moe_ffn_hidden=ffn, source=source,
    )


_ALL: tuple[ModelSpec, ...] = (
    _gpt3("gpt3_126m", 12, 768, 12),
    _gpt3("gpt3_350m", 24, 1024, 16),
    _gpt3("gpt3_760m", 24, 1536, 16),
    _gpt3("gpt3_1p3b", 24, 2048, 16),
    _gpt3("gpt3_2p7b", 32, 2560, 32),
    _gpt3("gpt3_6p7b", 32, 4096, 32),
    _gpt3("gpt3_13b", 40, 5120, 40),
    _gpt3("gpt3_175b", 96, 12288, 96),
    # Llama 2: MHA for 7B/13B, GQA (8 groups) for 70B; 32000 SentencePiece vocab; 4096 context.
    _llama("llama2_7b", 32, 4096, 32, 32, 11008, 32000, 4096, 10000.0, _LLAMA2.format("7b")),
    _llama("llama2_13b", 40, 5120, 40, 40, 13824, 32000, 4096, 10000.0, _LLAMA2.format("13b")),
    _llama("llama2_70b", 80, 8192, 64, 8, 28672, 32000, 4096, 10000.0, _LLAMA2.format("70b")),
    # Llama 3 / 3.1: GQA (8 groups), 128256 tiktoken vocab, RoPE base 500000, 8192 pretraining seq.
    _llama("llama3_8b", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, _LLAMA3.format("8B")),
    _llama("llama3_70b", 80, 8192, 64, 8, 28672, 128256, 8192, 500000.0, _LLAMA3.format("70B")),
    _llama("llama31_8b", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, _LLAMA31.format("8B"), rope_scaling=8.0),
    _llama("llama31_70b", 80, 8192, 64, 8, 28672, 128256, 8192, 500000.0, _LLAMA31.format("70B"), rope_scaling=8.0),
    _llama("llama31_405b", 126, 16384, 128, 8, 53248, 128256, 8192, 500000.0, _LLAMA31.format("405B"), rope_scaling=8.0),
    # Mistral 7B v0.1 (Jiang et al. 2023, arXiv:2310.06825 Table 1; HF mistralai/Mistral-7B-v0.1).
    _llama("mistral_7b", 32, 4096, 32, 8, 14336, 32000, 4096, 10000.0,
           "Jiang et al. 2023 (arXiv:2310.06825) Table 1; HF mistralai/Mistral-7B-v0.1 config.json"),
    _mixtral("mixtral_8x7b", 32, 4096, 32, 14336, 32000,
             "Jiang et al. 2024 (arXiv:2401.04088); HF mistralai/Mixtral-8x7B-v0.1 config.json"),
    _mixtral("mixtral_8x22b", 56, 6144, 48, 16384, 32000,
             "Mistral AI 2024; HF mistralai/Mixtral-8x22B-v0.1 config.json"),
    _nemotron4("nemotron4_15b", 32, 6144, 48, 24576,
               "Parmar et al. 2024, Nemotron-4 15B (arXiv:2402.16819) Table 1; NeMo nemotron4_15b recipe"),
    _nemotron4("nemotron4_340b", 96, 18432, 96, 73728,
               "NVIDIA 2024, Nemotron-4 340B (arXiv:2406.11704) Table 1; NeMo nemotron4_340b recipe"),
    _qwen25("qwen25_0p5b", 24, 896, 14, 2, 4864, 151936, True, "0.5B"),
    _qwen25("qwen25_1p5b", 28, 1536, 12, 2, 8960, 151936, True, "1.5B"),
    _qwen25("qwen25_3b", 36, 2048, 16, 2, 11008, 151936, True, "3B"),
    _qwen25("qwen25_7b", 28, 3584, 28, 4, 18944, 152064, False, "7B"),
    _qwen25("qwen25_14b", 48, 5120, 40, 8, 13824, 152064, False, "14B"),
    _qwen25("qwen25_32b", 64, 5120, 40, 8, 27648, 152064, False, "32B"),
    _qwen25("qwen25_72b", 80, 8192, 64, 8, 29568, 152064, False, "72B"),
    _qwen3("qwen3_0p6b", 28, 1024, 16, 3072, True, "0.6B"),
    _qwen3("qwen3_1p7b", 28, 2048, 16, 6144, True, "1.7B"),
    _qwen3("qwen3_4b", 36, 2560, 32, 9728, True, "4B"),
    _qwen3("qwen3_8b", 36, 4096, 32, 12288, False, "8B"),
    _qwen3("qwen3_14b", 40, 5120, 40, 17408, False, "14B"),
    _qwen3("qwen3_32b", 64, 5120, 64, 25600, False, "32B"),
)
_ALL += _QWEN3_MOE_PRESETS

# ------------------------------------------------------------------------------------ DeepSeek (MLA)
# DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434) and DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437):
# multi-latent attention (Sec. 2.1 of each) and DeepSeekMoE with shared experts. Numbers from the HF
# config.json of deepseek-ai/DeepSeek-V2-Lite and deepseek-ai/DeepSeek-V3 (V2-Lite's also in Megatron-LM's
# deepseek_v2_lite.yaml): the latents' RMSNorms (q_a_layernorm, kv_a_layernorm: qk_layernorm), YaRN
# RoPE (rope_scaling: factor 40 over an original 4096-token context, beta_fast 32, beta_slow 1, mscale /
# mscale_all_dim), RMSNorm eps 1e-6, untied embeddings, no biases, pretraining at 4096 tokens. Routing as
# Megatron-Bridge's DeepSeek providers set it: sequence-level auxiliary loss; V3's sigmoid scores with the
# aux-loss-free expert bias, group-limited routing (8 groups, the best 4) and scaling factor 2.5.
#
# Dense layers: HF first_k_dense_replace (V2-Lite 1, V3 3) makes the first layers dense MLPs of
# intermediate_size (10944 / 18432): `moe_first_dense_layers`, i.e. Megatron-Core `moe_layer_freq = [0] * k + [1] * ...`
# as Megatron-Bridge's DeepSeek recipes set it. The parameter counts then equal the published architectures: V3
# 671,026,404,352 total and 37,552,282,624 activated (the paper's 671B / 37B, Sec. 1, without the MTP module; HF's
# safetensors add the routers' e_score_correction_bias buffers), V2-Lite 15,706,484,224 (15.7B, arXiv:2405.04434
# Appendix B); tests/compiler/test_mla_terms.py checks them.
# Multi-token prediction: V3 trains with one MTP depth (Sec. 2.2; config.json `num_nextn_predict_layers` 1;
# Megatron-Bridge's DeepSeek-V3 recipe `mtp_num_layers = 1`, `mtp_loss_scaling_factor = 0.1`): 11,610,067,968 more
# parameters (an expert layer, enorm, hnorm, eh_proj 2h x h, final norm; with the shared embedding and output
# layer that HF's checkpoint stores again at model.layers.61, 13.46B: the model card's "14B of MTP module weights",
# 684.5B in all, its "685B"). V2-Lite has none (num_nextn_predict_layers absent).
_DEEPSEEK_V2 = ("DeepSeek-V2 (arXiv:2405.04434) Sec. 2; HF deepseek-ai/DeepSeek-V2-Lite config.json (first layer dense: "
                "first_k_dense_replace 1; 15.71B)")
_DEEPSEEK_V3 = ("DeepSeek-V3 (arXiv:2412.19437) Sec. 2, 4.2; HF deepseek-ai/DeepSeek-V3 config.json (first 3 layers "
                "dense: first_k_dense_replace 3; 671.03B without the MTP module, which adds 11.61B: mtp_num_layers 1)")


def _deepseek(name: str, layers: int, hidden: int, heads: int, ffn: int, vocab: int, q_lora: int, experts: int,
              top_k: int, expert_ffn: int, shared: int, mscale: float, source: str, **moe) -> ModelSpec:
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, query_groups=heads, ffn_hidden=ffn, vocab=vocab,
        seq_length=4096, norm_epsilon=1e-6, qk_layernorm=True, multi_latent_attention=True, q_lora_rank=q_lora,
        kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, rope_type="yarn",
        rope_scaling_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
        mscale=mscale, mscale_all_dim=mscale, experts=experts, top_k=top_k, moe_ffn_hidden=expert_ffn,
        shared_expert_ffn_hidden=shared, moe_load_balancing="seq_aux_loss", moe_router_pre_softmax=True,
        source=source, **moe,
    )


_ALL = _ALL + (
    # 27 layers, 16 heads, no query latent, 64 routed experts (top 6) of 1408 and 2 shared (2 x 1408)
    _deepseek("deepseek_v2_lite", 27, 2048, 16, 10944, 102400, 0, 64, 6, 1408, 2816, 0.707, _DEEPSEEK_V2,
              moe_aux_loss_coeff=1e-3, moe_first_dense_layers=1),
    # 61 layers, 128 heads, query latent 1536, 256 routed experts (top 8) of 2048 and 1 shared
    _deepseek("deepseek_v3", 61, 7168, 128, 18432, 129280, 1536, 256, 8, 2048, 2048, 1.0, _DEEPSEEK_V3,
              moe_aux_loss_coeff=1e-4, moe_router_score="sigmoid", moe_expert_bias=True, moe_router_groups=8,
              moe_router_group_topk=4, moe_topk_scaling_factor=2.5, moe_first_dense_layers=3,
              mtp_num_layers=1),
)

PRESETS: Mapping[str, ModelSpec] = MappingProxyType({m.name: m for m in _ALL})


def get_preset(name: str) -> ModelSpec | None:
    """The preset called `name` (e.g. "llama31_8b"), or None if there is no such preset."""
    return PRESETS.get(name)
