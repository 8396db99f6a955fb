"""Multi-latent attention's parameter count, FLOPs, activations and GEMM times against hand counts
(DeepSeek-V3's and DeepSeek-V2-Lite's attention shapes, from their Hugging Face config.json). The same
terms against a real Megatron-Core MLA model: tests/runtime/test_mla_layer.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nemoc.compiler import cost
from nemoc.compiler.catalog.hardware import get_gpu
from nemoc.compiler.flops import flops_per_token, param_counts
from nemoc.compiler.memory import layer_activations
from nemoc.compiler.plan import Layout
from nemoc.compiler.spec import ModelSpec

# DeepSeek-V3's attention (hidden 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128,
# qk_rope 64, v 128) on a dense 1-layer stand-in (the MLP is not what these tests count)
V3_ATTN = ModelSpec(name="v3_attn", layers=1, hidden=7168, heads=128, query_groups=128, ffn_hidden=18432,
                    vocab=129280, seq_length=4096, multi_latent_attention=True, q_lora_rank=1536,
                    kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, qk_layernorm=True)
# DeepSeek-V2-Lite's (hidden 2048, 16 heads, no query latent)
LITE_ATTN = replace(V3_ATTN, name="lite_attn", hidden=2048, heads=16, query_groups=16, q_lora_rank=0)


def test_attention_parameters_by_hand():
    # q_down 7168 x 1536 + q_up 1536 x 128 x 192 + kv_down 7168 x 576 + kv_up 512 x 128 x 256
    # + proj 128 x 128 x 7168 + the latents' RMSNorms 1536 + 512
    v3 = 11_010_048 + 37_748_736 + 4_128_768 + 16_777_216 + 117_440_512 + 2_048
    assert param_counts(V3_ATTN).attention == v3 == 187_107_328
    # q 2048 x 16 x 192 + kv_down 2048 x 576 + kv_up 512 x 16 x 256 + proj 16 x 128 x 2048 + norm 512
    assert param_counts(LITE_ATTN).attention == 6_291_456 + 1_179_648 + 2_097_152 + 4_194_304 + 512
    # without the latents' norms (qk_layernorm = false: IdentityOp) and with the output projection's bias
    assert param_counts(replace(LITE_ATTN, qk_layernorm=False, add_bias_linear=True)).attention == (
        6_291_456 + 1_179_648 + 2_097_152 + 4_194_304 + 2048)


def test_attention_core_flops_use_the_query_and_value_head_dims():
    # QK^T over 128 + 64 channels, attention x V over 128, per head: 2 s a (192 + 128), causally halved
    s = 4096
    f = flops_per_token(V3_ATTN, s, True)
    assert f.attention_core == 2 * s * 128 * (192 + 128) * 0.5
    assert flops_per_token(V3_ATTN, s, False).attention_core == 2 * s * 128 * 320
    assert f.dense_gemm == 2 * param_counts(V3_ATTN).attention + 2 * param_counts(V3_ATTN).mlp_active
    # a standard model of the same head dim keeps its 4 s a d
    std = ModelSpec(name="std", layers=1, hidden=4096, heads=32, query_groups=8, ffn_hidden=14336, vocab=128256,
                    seq_length=s)
    assert flops_per_token(std, s, True).attention_core == 4 * s * 32 * 128 * 0.5


def test_mla_activations_by_hand():
    """bf16, TE kernels, s 4096, b 1, TP 8 with SP: the down projections' input sbh/8 x 2; the latents
    (1536 + 512) twice (norm input, up-projection input) / 8; Q, K (128 x 192 each) and V, the core's output
    (128 x 128 each) / 8."""
    s, b, tp = 4096, 1, 8
    acts = layer_activations(V3_ATTN, seq=s, micro_batch=b, tp=tp, sp=True, attention_backend="flash")
    latents = 2 * 2 * s * b * (1536 + 512) / tp
    heads = 2 * s * b * 128 * (2 * 192 + 2 * 128) / tp
    assert acts.attention == 2 * s * b * 7168 / tp + latents + heads
    freed = (acts.total - layer_activations(V3_ATTN, seq=s, micro_batch=b, tp=tp, sp=True, attention_backend="flash",
                                            recompute="selective", recompute_modules=("core_attn", "mla_up_proj")
                                            ).total)
    # mla_up_proj frees Q, K and V (the core's output stays, linear_proj's input); core_attn the softmax stats
    assert freed == 2 * s * b * 128 * (2 * 192 + 128) / tp + 4.0 * s * b * 128 / tp


@pytest.mark.parametrize("model", [V3_ATTN, LITE_ATTN], ids=["v3", "lite"])
def test_every_mla_gemm_is_costed(model):
    """`_layer_gemm_shapes` at TP 1: the GEMMs' weights are exactly the attention and MLP parameters
    (less the norms and biases), MLA's extra GEMMs appended after the MLP's."""
    shapes = cost._layer_gemm_shapes(model, 1, 1, 1)
    counts = param_counts(model)
    norms = 1536 + 512 if model.q_lora_rank else 512
    assert sum(n * k * share for n, k, share in shapes) == counts.attention - norms + counts.mlp
    assert len(shapes) == 4 + (3 if model.q_lora_rank else 2)
    # index 1 stays the output projection, 2 and 3 the MLP
    assert shapes[1] == (7168 if model.q_lora_rank else 2048, 128 * model.heads, 1.0)
    assert shapes[2][0] == 2 * model.ffn_hidden


def test_mla_layer_time_counts_the_extra_gemms_and_wider_core():
    """The MLA layer's GEMM time exceeds a standard layer with the same output projection and MLP (more
    GEMM FLOPs: the up projections), and its flash core time scales with (qk + pe + v) / 2d."""
    hw = get_gpu("H100")
    lay = Layout(tp=8, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=8, num_microbatches=8,
                 sequence_parallel=True, distributed_optimizer=True, recompute="none")
    std = ModelSpec(name="std", layers=1, hidden=7168, heads=128, query_groups=128, ffn_hidden=18432, vocab=129280,
                    seq_length=4096)
    mla = cost.layer_times(V3_ATTN, lay, hw, seq=4096, precision="bf16", attention_backend="flash", micro_batch=1)
    ref = cost.layer_times(std, lay, hw, seq=4096, precision="bf16", attention_backend="flash", micro_batch=1)
    assert mla.attention == pytest.approx(ref.attention * (192 + 128) / (2 * 56))
    # standard QKV 7168 x 3 x 7168 = 154.1M weights vs MLA's down / up projections 69.7M: fewer GEMM FLOPs
    assert mla.gemm < ref.gemm
    recomputed = cost.layer_times(V3_ATTN, replace(lay, recompute="selective", recompute_modules=("mla_up_proj",)),
                                  hw, seq=4096, precision="bf16", attention_backend="flash", micro_batch=1)
    assert recomputed.gemm > mla.gemm  # the up projections' forward runs again


@pytest.mark.parametrize("name, dense_layers, published, published_active", [
    # DeepSeek-V3 without its MTP module: 671B total, 37B active (arXiv:2412.19437 Sec. 1); HF's safetensors
    # add the routers' e_score_correction_bias (256 x 58 = 14,848), which Megatron-Core keeps as a buffer
    ("deepseek_v3", 3, 671_026_404_352, 37_552_282_624),
    # DeepSeek-V2-Lite: 15.7B total (arXiv:2405.04434 Appendix B; HF deepseek-ai/DeepSeek-V2-Lite)
    ("deepseek_v2_lite", 1, 15_706_484_224, 2_661_150_208),
])
def test_deepseek_presets_equal_the_published_models(name, dense_layers, published, published_active):
    """The presets build the published architectures: the first layers dense (`moe_first_dense_layers`, HF
    first_k_dense_replace), so the totals and the parameters a token touches equal the published counts."""
    from nemoc.compiler.catalog.models import get_preset

    m = get_preset(name)
    counts = param_counts(m)
    assert m.moe_first_dense_layers == dense_layers
    assert m.moe_layer_pattern[:dense_layers + 1] == (0,) * dense_layers + (1,)
    assert counts.dense_layers == dense_layers
    assert counts.total == published
    assert counts.active == published_active
    assert round(published / 1e9) == {"deepseek_v3": 671, "deepseek_v2_lite": 16}[name]


def test_mla_tp_collectives():
    """The local spec's MLA gathers the hidden state twice (query and key/value down projections) and the
    latents; Transformer Engine's gathers the latents instead of the hidden state (cheaper for DeepSeek-V3:
    1536 + 512 + 64 < 7168)."""
    assert cost._mla_tp_widths(V3_ATTN, True, "local") == (7168 + 1536 + 576 + 1536 + 512, 7168 + 1536 + 512)
    assert cost._mla_tp_widths(V3_ATTN, False, "local") == (7168 + 1536 + 576, 7168 + 1536 + 512)
    assert cost._mla_tp_widths(V3_ATTN, True, "te") == (1536 + 576 - 7168, 1536 + 576 - 7168)
    hw = get_gpu("H100")
    lay = Layout(tp=8, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=8, num_microbatches=8,
                 sequence_parallel=True, distributed_optimizer=True, recompute="none")
    std = ModelSpec(name="std", layers=1, hidden=7168, heads=128, query_groups=128, ffn_hidden=18432, vocab=129280,
                    seq_length=4096)
    kw = dict(seq=4096, precision="bf16", attention_backend="flash", micro_batch=1)
    base = cost.layer_times(std, lay, hw, **kw).tp_comm
    te = cost.layer_times(V3_ATTN, lay, hw, **kw).tp_comm
    local = cost.layer_times(V3_ATTN, lay, hw, kernels="local", **kw).tp_comm
    # standard: 8 transfers of h per layer (4 forward, 4 backward); MLA adds its widths on top
    assert te == pytest.approx(base * (8 * 7168 + 2 * (1536 + 576 - 7168)) / (8 * 7168))
    assert local == pytest.approx(base * (8 * 7168 + 7168 * 2 + 1536 * 3 + 576 + 512 * 2) / (8 * 7168))


def test_lora_adapters_on_mla_projections_by_hand():
    """`qkv` on MLA adapts each query/key/value projection (runtime/align/lora.py MLA_QKV), `proj` reads
    heads x v_head_dim: rank x (in + out) each (the runtime's count: tests/runtime/align/test_align_mla_lora.py)."""
    from nemoc.compiler.flops import lora_params_per_layer
    from nemoc.compiler.spec import LoraSpec

    r = 16
    # q_down 7168 -> 1536, q_up 1536 -> 128 x 192, kv_down 7168 -> 576, kv_up 512 -> 128 x 256
    qkv = r * ((7168 + 1536) + (1536 + 24_576) + (7168 + 576) + (512 + 32_768))
    proj = r * (128 * 128 + 7168)
    assert lora_params_per_layer(V3_ATTN, LoraSpec(rank=r, targets=("qkv",))) == qkv == 1_213_440
    assert lora_params_per_layer(V3_ATTN, LoraSpec(rank=r, targets=("proj",))) == proj
    assert lora_params_per_layer(V3_ATTN, LoraSpec(rank=r, targets=("o",))) == proj  # peft's name, one adapter
    # V2-Lite, no query latent: q 2048 -> 16 x 192 directly
    lite = r * ((2048 + 3072) + (2048 + 576) + (512 + 4096))
    assert lora_params_per_layer(LITE_ATTN, LoraSpec(rank=r, targets=("qkv",))) == lite


def test_w124_keeps_mscale_all_dim_which_sets_the_softmax_scale_with_plain_rope():
    """MLASelfAttention's softmax scale is `_yarn_get_mscale(rotary_scaling_factor, mscale_all_dim)^2 / sqrt(d)`
    whatever the rope type: with rope_scaling_factor > 1, mscale_all_dim is not an unused YaRN field (review
    finding: the hint said to remove it, which changes every attention layer by x1.59 on DeepSeek-V2-Lite)."""
    from dataclasses import replace

    from nemoc.compiler.catalog.models import get_preset
    from nemoc.compiler.rules.base import Env, Sizes
    from nemoc.compiler.rules.mla import warn_yarn_fields_without_yarn
    from nemoc.compiler.spec import ClusterSpec

    m = replace(get_preset("deepseek_v2_lite"), rope_type="rope")
    assert m.rope_scaling_factor > 1 and m.mscale_all_dim != 0
    v = warn_yarn_fields_without_yarn(Env(model=m, cluster=ClusterSpec(gpu="H100", nodes=1, gpus_per_node=8)), Sizes())
    assert v is not None and "mscale_all_dim" not in v.hint and "mscale_all_dim" not in v.equation
    flat = replace(m, rope_scaling_factor=1.0)  # no scaling: mscale_all_dim does nothing either
    v = warn_yarn_fields_without_yarn(Env(model=flat, cluster=ClusterSpec(gpu="H100", nodes=1, gpus_per_node=8)),
                                      Sizes())
    assert v is not None and "mscale_all_dim" in v.hint
