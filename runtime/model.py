"""GPTModel construction on Megatron-Core's public API.

Input:  a TransformerConfig (from runtime.megatron_args), the plan's ModelSpec, the padded vocabulary,
the sequence length, the resolved attention backend.
Output: a list of model chunks (one per virtual pipeline stage; Float16Module-wrapped for bf16/fp16),
then Megatron DDP wrappers with the schedule hooks wired as Megatron-LM's training.py does.

Layer spec: Transformer Engine's when `transformer_engine` imports (TE then owns attention: flash,
fused or unfused per TransformerConfig.attention_backend); Megatron-Core's local spec otherwise, in
which attention is either
  * `unfused`: Megatron's DotProductAttention (materialises the [b, n, s, s] score matrix), or
  * `flash` (also `fused`/`auto` without TE): `SDPAttention` below, torch's
    scaled_dot_product_attention (FlashAttention-2 / memory-efficient kernels on GPU, a fused math
    kernel on CPU): O(s) activation memory instead of O(s^2). Packed sequences (`PackedSeqParams`,
    qkv_format `thd`, cu_seqlens) are attended segment by segment: still O(s), no [s, s] mask.
Both honour TP (each rank holds num_heads/tp heads and num_query_groups/tp KV groups), GQA (KV heads
repeated to the query heads, as DotProductAttention does), the causal mask and attention dropout under
the TP RNG tracker. Context parallelism (cp > 1): the SDPA core all-gathers the group's keys and values
and attends its load-balanced query shard causally (`SDPAttention._context_parallel`; TE's attention runs
ring attention instead); Megatron's unfused core supports cp = 1 only (megatron_args refuses the plan), and
neither local core splits packed (thd) sequences over CP ranks. `whole_sequences(model)` turns the CP split
off for a while (the rollout generator: every CP rank decodes the whole rows); `unsplit_sequence(model)`
likewise turns sequence parallelism off (a decode step's one token per row cannot be split over TP ranks).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.utils import is_layer_window_attention

from nemoc.compiler.spec import ModelSpec
from nemoc.runtime import gemma, mcore_fixes

_POSITION = {"rope": "rope", "learned": "learned_absolute", "none": "none"}


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing CUDA libs) -> treat as absent
        return False
    return True


def _drop_mla_channels(config, kwargs: dict) -> None:
    """Megatron-Core 0.16.1's MLASelfAttention builds its core with `k_channels` and `v_channels` (the
    query/key channels qk_head_dim + qk_pos_emb_head_dim and the value channels v_head_dim), which only
    TEDotProductAttention takes; the local DotProductAttention's __init__ has no such arguments (a
    TypeError). Both local cores read the query/key width from the tensors and size their output from
    `kv_channels`, which `megatron_args.transformer_config` sets to v_head_dim for MLA, so the two
    arguments carry nothing these cores need: check that and drop them."""
    v = kwargs.pop("v_channels", None)
    kwargs.pop("k_channels", None)
    if v is not None and v != config.kv_channels:
        raise ValueError(f"MLA core: v_channels({v}) != kv_channels({config.kv_channels}); the local attention "
                         "cores size their output by kv_channels")


class MLADotProductAttention(DotProductAttention):
    """Megatron's unfused DotProductAttention under multi-latent attention (`_drop_mla_channels`)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        _drop_mla_channels(config, kwargs)
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)


class SDPAttention(DotProductAttention):
    """DotProductAttention with the core replaced by torch.nn.functional.scaled_dot_product_attention.

    Inherits the head bookkeeping (heads / query groups per TP partition, softmax scale) and the
    sharded-state-dict behaviour, so checkpoints are interchangeable with the `unfused` core.
    Shapes follow Megatron: query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np * hn].
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        _drop_mla_channels(config, kwargs)
        # DotProductAttention asserts context_parallel_size == 1 (its core sees one sequence shard); this
        # core gathers the keys and values of the context-parallel group itself (`_context_parallel`).
        cp, config.context_parallel_size = config.context_parallel_size, 1
        try:
            super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        finally:
            config.context_parallel_size = cp
        if config.softmax_type != "vanilla":
            raise ValueError("the flash (SDPA) attention core supports the vanilla softmax; use attention_backend = "
                             "unfused")
        # sliding-window attention (Gemma 3): this layer's (before, after) window, as DotProductAttention
        # decides it (transformer/utils.py is_layer_window_attention); None = full causal attention
        self.window = (config.window_size if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                                                       layer_number) else None)
        if self.window is not None and self.window[1] != 0:
            raise ValueError(f"window_size {self.window}: the SDPA core's sliding window is causal (after = 0)")
        if self.window is not None and cp > 1:
            raise ValueError("the flash (SDPA) attention core does not split sliding-window attention over "
                             "context-parallel ranks; use context = 1")
        # off while generating: every context-parallel rank then attends whole sequences (`whole_sequences`)
        self.split_context = True
        # DotProductAttention folds the layer-number coefficient into softmax_scale and multiplies it
        # back inside the softmax; SDPA has one scale, so use the product.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("the flash (SDPA) attention core takes no attention bias; use attention_backend = unfused")
        cp = parallel_state.get_context_parallel_world_size() if self.split_context else 1
        if packed_seq_params is not None:
            if cp > 1:
                raise ValueError("the flash (SDPA) attention core cannot split packed (thd) sequences over context-"
                                 "parallel ranks; that needs Transformer Engine's THD attention with CP")
            return self._varlen(query, key, value, packed_seq_params)
        if cp > 1:
            if (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal:
                raise ValueError("the flash (SDPA) attention core splits only causal attention over context-parallel "
                                 "ranks")
            key, value = (_gather_context(t) for t in (key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # GQA: each KV group serves `groups` consecutive query heads
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None and not causal:
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
        if self.window is not None:
            if not causal:
                raise ValueError("the SDPA core's sliding window needs the causal mask type")
            window = self._window_mask(q.shape[2], q.device)
            # a given mask (packed rows' block-diagonal one) still applies inside the window
            mask = window if attention_mask is None else window & ~attention_mask
            causal = False
        dropout = self.config.attention_dropout if self.training else 0.0
        attend = self._context_parallel if cp > 1 else self._sdpa
        if dropout > 0 and not self.config.sequence_parallel:
            # Per-TP-rank dropout streams, as DotProductAttention does.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend(q, k, v, mask, causal, dropout)
        else:
            context = attend(q, k, v, mask, causal, dropout)
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _varlen(self, query, key, value, packed):
        """Packed sequences (Megatron's `thd` format: query [t, np, hn], key/value [t, ng, hn], the
        segments given by `cu_seqlens`): causal attention inside each segment, one SDPA call per
        segment, so a packed row never holds a [t, t] score or mask tensor (activation memory O(t))."""
        if packed.qkv_format != "thd" or packed.cu_seqlens_q_padded is not None:
            raise ValueError("the flash (SDPA) attention core takes packed sequences in the thd format without "
                             "padded cu_seqlens")
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        bounds = packed.cu_seqlens_q.tolist()  # host copy: the segment loop runs on the host
        dropout = self.config.attention_dropout if self.training else 0.0
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, np, n, hn]
            mask, causal = (None, True) if self.window is None else (self._window_mask(end - start, q.device), False)
            if dropout > 0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    context = self._sdpa(q, k, v, mask, causal, dropout)
            else:
                context = self._sdpa(q, k, v, mask, causal, dropout)
            pieces.append(context[0].transpose(0, 1))  # [n, np, hn]
        return torch.cat(pieces).reshape(query.shape[0], self.hidden_size_per_partition)

    def _context_parallel(self, q, k, v, mask, causal, dropout):
        """Causal attention of this context-parallel rank's queries over the whole sequence's keys and
        values (`_gather_context`: all-gathered, in sequence order). The rank holds Megatron's load-balanced
        shard (megatron.core.utils get_batch_on_this_cp_rank: the sequence cut into 2 x cp chunks, rank r
        holds chunks r and 2cp-1-r), so its query chunk g attends to keys [0, (g+1) c) with the causal
        boundary at its own offset: a [c, (g+1) c] boolean mask per chunk, O(c x s) memory (the all-gather
        form of context parallelism, as Transformer Engine's cp_comm_type = all_gather)."""
        cp, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
        c = q.shape[2] // 2
        pieces = []
        for i, g in enumerate((rank, 2 * cp - 1 - rank)):
            rows = torch.arange(g * c, (g + 1) * c, device=q.device).unsqueeze(1)
            allowed = torch.arange((g + 1) * c, device=q.device).unsqueeze(0) <= rows  # True = attend
            pieces.append(self._sdpa(q[:, :, i * c:(i + 1) * c], k[:, :, :(g + 1) * c], v[:, :, :(g + 1) * c],
                                     allowed, False, dropout))
        return torch.cat(pieces, dim=2)

    def _window_mask(self, s: int, device) -> torch.Tensor:
        return sliding_window_mask(s, self.window[0], device)

    def _sdpa(self, q, k, v, mask, causal, dropout):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and q.shape[2] > 1,
            scale=self.sdpa_scale,
        )


def _gather_context(local: torch.Tensor) -> torch.Tensor:
    """[s / cp, b, n, h] keys or values of this context-parallel rank -> [s, b, n, h] in sequence order.
    Forward: an all-gather over the CP group; backward: the reduce-scatter of the gradient (each rank's
    keys are attended by every rank's queries). Rank j holds the load-balanced chunks j and 2cp-1-j."""
    cp = parallel_state.get_context_parallel_world_size()
    gathered = tensor_parallel.gather_from_sequence_parallel_region(
        local, tensor_parallel_output_grad=True, group=parallel_state.get_context_parallel_group())
    c = local.shape[0] // 2
    where = {}  # chunk index in the sequence -> its position in the gathered tensor
    for j in range(cp):
        where[j], where[2 * cp - 1 - j] = 2 * j, 2 * j + 1
    order = torch.cat([torch.arange(where[g] * c, (where[g] + 1) * c) for g in range(2 * cp)]).to(local.device)
    return gathered.index_select(0, order)


def whole_sequences(model):
    """A context in which every context-parallel rank runs whole sequences through `model` (its chunks'
    modules), as the rollout generator does: each CP rank decodes the full rows, so nothing may split them.
    Off for its duration, restored after: the SDPA core's all-gather of the CP group's keys and values
    (`SDPAttention.split_context`), Transformer Engine's ring attention (its DotProductAttention's
    `set_context_parallel_group(None, ...)`, as Megatron-Core's TEDotProductAttention turns CP off for a
    packed batch with local_cp_size = 1) and RoPE's slicing of the position table to the rank's load-
    balanced chunks (RotaryEmbedding.cp_group; its `forward` is lru-cached on its arguments, not on the
    group, so the cache is cleared on entry and exit). A no-op without context parallelism."""
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_context_parallel_world_size() == 1:
        return contextlib.nullcontext()
    return _context_parallel_off(_modules(model))


def _modules(model) -> list:
    """Every module of a model or of a rank's list of chunks."""
    return [m for chunk in (model if isinstance(model, (list, tuple)) else [model]) for m in chunk.modules()]


@contextlib.contextmanager
def _switched(flips):
    """Each (object, attribute, value) of `flips` set for the context's duration, and each attribute back
    to the value it had after it, also after an exception half-way through."""
    before = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in flips]
    try:
        for obj, attr, value in flips:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in before:
            setattr(obj, attr, value)


@contextlib.contextmanager
def _context_parallel_off(modules):
    rotary = [m for m in modules if isinstance(m, RotaryEmbedding) and m.cp_group is not None]
    flips = [(m, "split_context", False) for m in modules if isinstance(m, SDPAttention) and m.split_context]
    flips += [(m, "cp_group", None) for m in rotary]
    te = [(m, m.cp_group, getattr(m, "cp_global_ranks", None), getattr(m, "cp_stream", None),
           getattr(m, "cp_comm_type", "p2p"))
          for m in modules if hasattr(m, "set_context_parallel_group") and getattr(m, "cp_group", None) is not None]
    with _switched(flips):
        try:
            for m, _, _, _, comm in te:
                m.set_context_parallel_group(None, None, None, comm)
            _clear_rotary_caches(rotary)
            yield
        finally:  # TE's groups back (a method, not an attribute), RoPE's cache emptied again
            for m, group, ranks, stream, comm in te:
                m.set_context_parallel_group(group, ranks, stream, comm)
            _clear_rotary_caches(rotary)


def _clear_rotary_caches(rotary) -> None:
    for cls in {type(m) for m in rotary} | {RotaryEmbedding}:
        clear = getattr(cls.forward, "cache_clear", None)
        if clear is not None:
            clear()


# The attributes through which Megatron-Core 0.16.1 modules act on sequence parallelism, each a copy of
# `config.sequence_parallel` (or derived from it) taken at construction, so changing the config alone does
# not reach them. Megatron-Core's own inference switch (transformer/utils.py `set_model_to_sequence_parallel`)
# flips the first three; it keeps the modules in a process-global cache keyed by id(model) (stale once a model
# is freed and its id reused) and sets every attribute to one value on the way back, so it is not used here.
_SEQUENCE_PARALLEL_SWITCHES = (
    # ColumnParallelLinear / RowParallelLinear (tensor_parallel/layers.py: the column layer all-gathers its
    # input along the sequence, the row layer reduce-scatters its output instead of all-reducing it),
    # Transformer Engine's linears (TELinear, TELayerNormColumnParallelLinear: te.pytorch reads
    # `self.sequence_parallel` in every forward), FusedLayerNorm, the multi-token-prediction block, and
    # this runtime's own: runtime/align/common.py ScalarHead (gathers before its one-output head),
    # runtime/align/lora.py and runtime/lora_peft.py adapters (gather / scatter around the low-rank path)
    "sequence_parallel",
    # LanguageModelEmbedding: scatter the embeddings over the TP group (language_model_embedding.py)
    "scatter_to_sequence_parallel",
    # LanguageModelEmbedding and its VocabParallelEmbedding (models without learned positions): reduce-
    # scatter the embedding lookup instead of all-reducing it (tensor_parallel/layers.py)
    "reduce_scatter_embeddings",
)


def unsplit_sequence(model):
    """A context in which `model` (its chunks' modules) runs without sequence parallelism, as the rollout
    generator needs: a decode step feeds one token per row, which cannot be scattered over the TP group
    (Megatron-Core: "First dimension of the tensor should be divisible by tensor parallel size"). Off for its
    duration, restored after (each to the value it had):
      * `config.sequence_parallel` of every TransformerConfig the modules hold (read at every forward by
        LanguageModelEmbedding, TransformerBlock's RNG fork, the shared experts, RoPE's sequence length, the
        MTP block, DotProductAttention's dropout RNG);
      * the module attributes copied from it at construction (`_SEQUENCE_PARALLEL_SWITCHES`);
      * ColumnParallelLinear's `allreduce_dgrad` (set at construction to `tp > 1 and not sequence_parallel`:
        the input-gradient all-reduce that replaces the sequence gather's reduce-scatter backward);
      * the parameters' `sequence_parallel` tag (the norms' and routers' replicated weights whose gradients
        finalize_model_grads all-reduces over the TP group under sequence parallelism).
    So every module computes what it computes when built with sequence_parallel = False: the weights are
    the same and every rank holds the whole sequence; row-parallel outputs are all-reduced instead of
    reduce-scattered, the same sums. MoE layers then route each TP rank's copy of the tokens (the dispatchers
    gather over their TP x EP group and reduce-scatter back: duplicated work, the same results; tested with
    etp = 1: tests/runtime/align/test_align_eval_layout.py). Meant for forward passes (no gradient flows in
    the generator); a no-op without sequence parallelism."""
    modules = _modules(model)
    configs = {id(c): c for c in (getattr(m, "config", None) for m in modules)
               if getattr(c, "sequence_parallel", False) is True}
    if not configs and not any(getattr(m, "sequence_parallel", False) is True for m in modules):
        return contextlib.nullcontext()
    return _sequence_parallel_off(modules, list(configs.values()))


def _sequence_parallel_off(modules, configs):
    flips = [(c, "sequence_parallel", False) for c in configs]  # (object, attribute, its value while off)
    flips += [(m, attr, False) for m in modules for attr in _SEQUENCE_PARALLEL_SWITCHES if getattr(m, attr, None) is True]
    flips += [(m, "allreduce_dgrad", True) for m in modules if isinstance(m, tensor_parallel.ColumnParallelLinear)
              and m.sequence_parallel and not m.allreduce_dgrad and not m.disable_grad_reduce]
    flips += [(p, "sequence_parallel", False) for m in modules for p in m.parameters(recurse=False)
              if getattr(p, "sequence_parallel", False) is True]
    return _switched(flips)


@functools.lru_cache(maxsize=16)
def sliding_window_mask(s: int, before: int, device) -> torch.Tensor:
    """[s, s], True = attend: key j for query i when i - before <= j <= i (Megatron's
    get_sliding_window_causal_mask with window (before, 0), negated). s^2 booleans, unlike the causal case
    (torch's SDPA takes no window argument); cached, so every sliding layer of a step shares one tensor (what
    autograd saves of it is a reference, not a copy per layer)."""
    i = torch.arange(s, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance <= before)


def layer_spec(*, config, model: ModelSpec, attention_backend: str, have_te: bool):
    """The transformer-layer ModuleSpec for this machine and backend."""
    experts = model.experts or None
    if have_te and not model.local_layer_only:
        # the plan's moe_grouped_gemm (Execution.moe, set on the config by megatron_args): TEGroupedMLP
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=bool(getattr(config, "moe_grouped_gemm", False)),
            qk_layernorm=model.qk_layernorm, multi_latent_attention=model.multi_latent_attention,
        )
    spec = get_gpt_layer_local_spec(
        num_experts=experts,
        moe_grouped_gemm=False,
        qk_layernorm=model.qk_layernorm,
        multi_latent_attention=model.multi_latent_attention,
        normalization=config.normalization,
    )
    if attention_backend != "unfused":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif model.multi_latent_attention:
        spec.submodules.self_attention.submodules.core_attention = MLADotProductAttention
    return spec


def moe_dense_block_spec(moe_spec, dense_spec, *, config, model: ModelSpec, vp_stage: int | None):
    """The block of a MoE model with dense layers (`ModelSpec.moe_layer_pattern`, TransformerConfig
    `moe_layer_freq`): the expert-layer spec where the pattern says 1, the dense one where it says 0, for the
    layers this pipeline (virtual) stage builds, sliced at Megatron's own layer offset as
    gpt_layer_specs.py `get_gpt_decoder_block_spec` slices its per-layer specs; the final norm as Megatron-Core
    builds it from a single layer spec (transformer_block.py `_get_block_submodules`: LayerNormImpl)."""
    from megatron.core.transformer.transformer_block import (LayerNormImpl, TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    pattern = model.moe_layer_pattern
    specs = [moe_spec if pattern[offset + i] else dense_spec for i in range(count)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LayerNormImpl)


def mtp_block_spec(config, block, *, have_te: bool, vp_stage: int | None):
    """The multi-token prediction block of this (virtual) pipeline stage, as Megatron-Core 0.16.1 builds it
    (gpt_layer_specs.py `get_gpt_mtp_block_spec`: its layer of the decoder's last layer spec, Transformer Engine's
    or the local backend's norms and eh_proj; None on every stage but the last, its last virtual chunk), or None
    without MTP (`TransformerConfig.mtp_num_layers`: the plan's `Execution.mtp_num_layers`). A decoder built from
    one layer spec passes that spec; one of expert and dense layers its block, whose last layer spec is the
    model's last layer (`moe_dense_block_spec` slices the whole pattern's specs, so the last stage's last one)."""
    if not getattr(config, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    return get_gpt_mtp_block_spec(config, block, use_transformer_engine=have_te, vp_stage=vp_stage)


def attention_core_name(*, attention_backend: str, have_te: bool, model: ModelSpec | None = None) -> str:
    """What actually computes attention, for logs and bench results."""
    if have_te and not (model is not None and model.local_layer_only):
        return f"transformer_engine:{attention_backend}"
    return "megatron:DotProductAttention" if attention_backend == "unfused" else "torch:scaled_dot_product_attention"


def build_model_chunks(*, config, model: ModelSpec, vocab_size: int, seq_length: int, attention_backend: str,
                       have_te: bool) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (Megatron-LM's get_model). Multi-latent attention
    is built with the runtime's gradient fixes for Megatron-Core 0.16.1 (runtime/mcore_fixes.py)."""
    if model.multi_latent_attention:
        mcore_fixes.apply()  # idempotent; before MLASelfAttention.__init__ runs
    spec = layer_spec(config=config, model=model, attention_backend=attention_backend, have_te=have_te)
    dense_spec = (layer_spec(config=config, model=model.dense_layer_model, attention_backend=attention_backend,
                             have_te=have_te) if model.has_dense_layers else None)
    vp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for i in range(vp or 1):
        vp_stage = i if vp else None
        block = (gemma.gemma_block_spec(spec, config=config, model=model, vp_stage=vp_stage)
                 if model.local_layer_only else spec)
        if dense_spec is not None:
            block = moe_dense_block_spec(spec, dense_spec, config=config, model=model, vp_stage=vp_stage)
        chunk = GPTModel(
            mtp_block_spec=mtp_block_spec(config, block, have_te=have_te and not model.local_layer_only,
                                          vp_stage=vp_stage),
            config=config,
            transformer_layer_spec=block,
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=_POSITION[model.position],
            rotary_base=int(model.rotary_base),
            # Llama 3.1/3.2 frequency scaling; its other three constants are fixed in Megatron-Core
            # (compiler/hfconfig.py LLAMA3_FIXED refuses a config.json with other values).
            rope_scaling=model.rope_scaling_factor != 1.0,
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=vp_stage,
        )
        if model.embedding_scale and chunk.pre_process:
            gemma.scale_embedding(chunk, model.hidden)  # Gemma: word embeddings x sqrt(hidden)
        if not config.use_cpu_initialization:
            chunk = chunk.to(torch.cuda.current_device())
        if config.bf16 or config.fp16:
            # Casts the parameters to the half dtype and the fp32 inputs/outputs at the chunk edges.
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    return chunks


def wrap_ddp(*, chunks: list[torch.nn.Module], config, ddp_config) -> list[torch.nn.Module]:
    """Megatron DDP per chunk, and the hooks the schedules call (Megatron-LM training.py)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    wrapped = [
        # Only the first chunk buckets its gradients; later chunks reduce in one go (as get_model()).
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    if ddp_config.overlap_grad_reduce:
        one = len(wrapped) == 1
        config.no_sync_func = wrapped[0].no_sync if one else [m.no_sync for m in wrapped]
        config.grad_sync_func = wrapped[0].start_grad_sync if one else [m.start_grad_sync for m in wrapped]
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        # The interleaved schedule starts each chunk's all-gather (schedules.py: chunks 0 and 1 at the start,
        # chunk c + 1 at chunk c's first micro batch); without it each chunk's first forward pre-hook does.
        # The training loop holds it back until its first step has run (core/loop.py ParamGather).
        config.param_sync_func = wrapped[0].start_param_sync if len(wrapped) == 1 else [
            m.start_param_sync for m in wrapped]
    return wrapped


def wrap_fsdp(*, chunks: list[torch.nn.Module], config, ddp_config) -> list[torch.nn.Module]:
    """Megatron-FSDP (ZeRO-3, `optim_grads_params`) around the stage's one model chunk: Megatron-Core's
    FullyShardedDataParallel (distributed/fsdp/mcore_fsdp_adapter.py) shards the weights, gradients and
    optimizer state over the DP x CP group per TransformerLayer unit, all-gathering a layer's weights before
    its forward and backward and reduce-scattering its gradients after (Megatron-LM training.py get_model
    with --use-megatron-fsdp). The schedule hooks are DDP's (`wrap_ddp`)."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

    from nemoc.runtime import mcore_cpu

    if len(chunks) != 1:
        raise ValueError(f"Megatron-FSDP wraps one model chunk per rank, got {len(chunks)} (virtual pipeline)")
    device = torch.device("cpu") if mcore_cpu.is_applied() else torch.device("cuda", torch.cuda.current_device())
    with mcore_cpu.cuda_device_index():
        wrapped = [FullyShardedDataParallel(config=config, ddp_config=ddp_config, module=chunks[0], device=device)]
    config.finalize_model_grads_func = finalize_model_grads
    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = wrapped[0].no_sync
        config.grad_sync_func = wrapped[0].start_grad_sync
    return wrapped


def is_fsdp(chunks) -> bool:
    """The chunks are wrapped in Megatron-FSDP (checkpoints in its `fsdp_dtensor` format)."""
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

    return bool(chunks) and isinstance(chunks[0], FullyShardedDataParallel)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    """Parameters held by this rank (all chunks)."""
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())

