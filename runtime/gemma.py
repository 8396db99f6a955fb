"""Gemma 3's layer on Megatron-Core: the parts GPTModel 0.16.1 has no switch for, as small modules.

Input:  the stage's TransformerConfig (runtime.megatron_args: GeGLU, softmax_scale = query_pre_attn_scalar^-1/2,
        window_size / window_attn_skip_freq for the sliding layers) and its ModelSpec (compiler.spec:
        norm_zero_centered, post_block_norms, embedding_scale, local_rotary_base).
Output: a transformer-block spec of Megatron-Core's local layer with
  * `ZeroCenteredRMSNorm` for every norm (input, pre-MLP, Q/K, final): x / rms(x) * (1 + w), computed in fp32
    and cast back, as transformers' Gemma3RMSNorm (Megatron's WrappedTorchNorm asserts
    layernorm_zero_centered_gamma off; Transformer Engine's RMSNorm has it, but nemoc builds this layer on the
    local spec only);
  * `PostNormRowParallelLinear` for the attention output projection and fc2: the row-parallel linear followed
    by Gemma's post_attention_layernorm / post_feedforward_layernorm, before the residual add (the sandwich
    norms; TransformerLayerSubmodules has no post-block norm). Their weights are
    `self_attention.linear_proj.post_layernorm.weight` and `mlp.linear_fc2.post_layernorm.weight`;
  * `SlidingRopeSelfAttention`: SelfAttention whose sliding-window layers rotate with their own RoPE base
    (Gemma 3's rope_local_base_freq; GPTModel holds one RotaryEmbedding, the full-attention layers' base);
  * the attention core of the stage's backend with the window: runtime.model.SDPAttention masks it per layer
    (per packed segment too); for the unfused backend `WindowedDotProductAttention`, Megatron's DotProductAttention
    with the window added to the mask it is given (its FusedScaleMaskSoftmax replaces the given mask by the
    window's, so rows that pack several samples would attend across them).
`scale_embedding` multiplies the word embedding's output by sqrt(hidden) in the activation dtype
(Gemma3TextScaledWordEmbedding), as a forward hook, so the state dict and the tied output layer are untouched.

Invariants: the state dict is GPTModel's plus the two post-norm weights per layer; every norm's weight is
zero-centred (0 = identity scale), so the checkpoint's values load unchanged (HF -> nemoc -> HF bit-identical).
"""

from __future__ import annotations

import copy
import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.utils import is_layer_window_attention


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm scaling by (1 + weight) (Gemma; Megatron's layernorm_zero_centered_gamma for RMSNorm)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        # under sequence parallelism every TP rank sees a different slice of the sequence: Megatron's
        # finalize_model_grads all-reduces the grads of parameters marked so (the Q/K norms by their names)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class PostNormRowParallelLinear(RowParallelLinear):
    """A row-parallel linear whose (reduced) output goes through a zero-centred RMSNorm: the attention output
    projection + post_attention_layernorm, fc2 + post_feedforward_layernorm. The bias (none in Gemma) is added
    before the norm, so the layer's bias-dropout-add gets none."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_layernorm = ZeroCenteredRMSNorm(config, output_size, eps=config.layernorm_epsilon)

    def forward_linear(self, input_):
        """The linear's output before the norm (bias added): what a LoRA adapter adds its update to."""
        output, bias = super().forward(input_)
        return output if bias is None else output + bias

    def forward(self, input_):
        return self.post_layernorm(self.forward_linear(input_)), None


class SlidingRopeSelfAttention(SelfAttention):
    """SelfAttention whose sliding-window layers use RoPE of base `local_rotary_base` (the other layers take
    GPTModel's rotary embedding, of the full-attention base)."""

    def __init__(self, config, submodules, layer_number, *args, local_rotary_base: float | None = None, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.local_rotary = None
        if local_rotary_base is not None and is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, layer_number):
            self.local_rotary = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                                rotary_base=local_rotary_base,
                                                use_cpu_initialization=config.use_cpu_initialization)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if self.local_rotary is not None and rotary_pos_emb is not None:
            if isinstance(rotary_pos_emb, tuple):
                raise ValueError("Gemma 3's local RoPE takes one rotary embedding for queries and keys")
            # same positions (GPTModel's rotary_seq_len), the sliding layers' base
            rotary_pos_emb = self.local_rotary(rotary_pos_emb.shape[0])
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class WindowedDotProductAttention(DotProductAttention):
    """Megatron's unfused attention core, the sliding window applied on top of the mask it is given (the
    block-diagonal causal mask of packed rows), not instead of it."""

    def __init__(self, config, layer_number, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        self.window = self.scale_mask_softmax.window_size  # (before, after) on a sliding layer, else None
        self.scale_mask_softmax.window_size = None  # the mask below carries it

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if self.window is not None:
            sq, sk = query.shape[0], key.shape[0]
            i, j = torch.arange(sq, device=query.device)[:, None], torch.arange(sk, device=query.device)[None, :]
            distance = i + (sk - sq) - j
            outside = (distance < -self.window[1]) | (distance > self.window[0])  # True = blocked (Megatron)
            attention_mask = outside[None, None] if attention_mask is None else attention_mask | outside
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


def gemma_block_spec(local_layer_spec: ModuleSpec, *, config, model, vp_stage: int | None) -> TransformerBlockSubmodules:
    """Megatron-Core's local layer spec (its attention core already chosen) with Gemma 3's modules swapped in,
    for the layers this pipeline (virtual) stage builds, and the zero-centred final norm."""
    if model.norm != "rmsnorm":
        raise ValueError("the Gemma layer's zero-centred norm is an RMSNorm (norm = rmsnorm)")
    spec = copy.deepcopy(local_layer_spec)
    layer = spec.submodules
    norm = ZeroCenteredRMSNorm if model.norm_zero_centered else layer.input_layernorm
    layer.input_layernorm = norm
    layer.pre_mlp_layernorm = norm
    attention = layer.self_attention
    attention.module = SlidingRopeSelfAttention
    if attention.submodules.core_attention is DotProductAttention:
        attention.submodules.core_attention = WindowedDotProductAttention
    attention.params = {**attention.params, "local_rotary_base": model.local_rotary_base}
    if model.qk_layernorm and model.norm_zero_centered:
        attention.submodules.q_layernorm = ZeroCenteredRMSNorm
        attention.submodules.k_layernorm = ZeroCenteredRMSNorm
    if model.post_block_norms:
        attention.submodules.linear_proj = PostNormRowParallelLinear
        layer.mlp.submodules.linear_fc2 = PostNormRowParallelLinear
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * count, layer_norm=norm)


def scale_embedding(chunk, hidden: int) -> None:
    """Multiply the word embedding's output by sqrt(hidden), rounded to the activation dtype first, as
    transformers' Gemma3TextScaledWordEmbedding does (`embed_scale.to(weight.dtype)`)."""
    scale = math.sqrt(hidden)

    def hook(_module, _inputs, output):
        return output * torch.tensor(scale, dtype=output.dtype, device=output.device)

    chunk.embedding.register_forward_hook(hook)
