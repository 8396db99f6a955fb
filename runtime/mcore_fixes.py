"""Gradient fixes for Megatron-Core 0.16.1's multi-latent attention on the local layer spec at TP > 1 (GPU or CPU,
with or without Transformer Engine installed): the one place the runtime corrects what Megatron-Core computes.

Input:  the installed megatron-core; `apply()` is called by the training core before it builds a model
        (runtime/core/build.py `build_chunks`). Idempotent; a no-op on any other megatron-core version
        (`PATCHED_VERSIONS`), whose MLA code has not been checked.
Output: two patches of `megatron.core.transformer.multi_latent_attention`, each measured by
        tests/runtime/align/test_align_mla_tp2.py (every base-weight gradient at TP=2, with and without
        sequence parallelism, equals TP=1's; without them the last layer's linear_kv_down_proj RoPE-key rows and
        q_layernorm differ, and through the input gradient every weight below them):

* **The shared RoPE key's gradient** (`_sum_shared_rope_key_gradient`). The local spec builds
  linear_kv_down_proj column-parallel (output [s, b, (kv_lora_rank + qk_pos_emb_head_dim) / tp]);
  `MLASelfAttention.get_query_key_value_tensors` gathers it with `gather_from_tensor_model_parallel_region`,
  whose backward only splits the gradient along the last dimension. The latent part's gradient is complete
  on every rank (linear_kv_up_proj, column-parallel, all-reduces its input gradient, or reduce-scatters it
  under sequence parallelism), but the RoPE key k_pos_emb is expanded over this rank's heads only, so each
  rank holds the gradient of its own heads and the split keeps it: the key's rows of the weight, and the
  input gradient that flows to every earlier layer, miss the other ranks' heads. Megatron-LM issue #1699
  (open); the fix proposed upstream (NVIDIA/Megatron-LM PR #6839, not merged as of megatron-core 0.16.1)
  passes k_pos_emb through `copy_to_tensor_model_parallel_region` (forward identity, backward all-reduce)
  wherever it is replicated across the TP ranks. Here the same all-reduce sits in the gather's backward,
  on the RoPE columns only: `_GatherSummingSharedKey`. The kv gather is told from the query gather by
  identity (a forward hook on linear_kv_down_proj, LoRA wrapper included, marks its output for the call).
  This branch runs only when the down projection's output is sharded (ColumnParallelLinear); under
  sequence parallelism k_pos_emb is the gathered full sequence there too, so the sum is right with and
  without it. Transformer Engine's spec (duplicated TELinear) takes the other branch: with sequence
  parallelism it all-gathers k_pos_emb along the sequence, whose backward reduce-scatters (summed);
  without it the same partial gradient remains -- not patched here (no TE on the machines that test this;
  LoRA refuses those duplicated layers at TP > 1, and docs/planning.md W123 says so).
* **q_layernorm's gradient** (`_average_q_layernorm_gradient`). `finalize_model_grads`
  (`_allreduce_non_tensor_model_parallel_grads`) sums across the TP ranks the gradient of every parameter
  named `q_layernorm` / `k_layernorm` when `qk_layernorm` is on: right for standard attention's per-head
  norms (each rank normalises its own heads), wrong for MLA's q_layernorm, which normalises the gathered,
  replicated query latent whose gradient is already complete (linear_q_up_proj all-reduces its input
  gradient): at TP 2 without sequence parallelism it is doubled (measured: exactly 2x). Megatron's own
  per-parameter flag `average_gradients_across_tp_domain` (checked before the name rule) averages
  identical gradients instead, i.e. leaves them as they are. Under sequence parallelism the norm sees this
  rank's sequence chunk and the sum is right: left alone. kv_layernorm's name matches neither pattern.
"""

from __future__ import annotations

import contextvars
import functools

import torch

PATCHED_VERSIONS = ("0.16.1",)
_state = {"applied": False}
_original: dict = {}  # Megatron-Core's functions the patches wrap (tests read their source)
# (linear_kv_down_proj's output tensor, qk_pos_emb_head_dim, tp group) while an MLA layer derives its q/k/v
_KV_DOWN_OUTPUT: contextvars.ContextVar = contextvars.ContextVar("nemoc_mla_kv_down_output", default=None)


def needed() -> bool:
    from megatron.core import __version__

    return __version__ in PATCHED_VERSIONS


def is_applied() -> bool:
    return _state["applied"]


def apply() -> bool:
    """Patch Megatron-Core's MLA on the versions known to need it. Returns True if the patches are active."""
    if _state["applied"]:
        return True
    if not needed():
        return False
    _state["applied"] = True
    _sum_shared_rope_key_gradient()
    _average_q_layernorm_gradient()
    return True


class _GatherSummingSharedKey(torch.autograd.Function):
    """gather_from_tensor_model_parallel_region (forward: all-gather along the last dimension; backward: keep
    this rank's slice) whose backward first sums the last `shared` columns' gradient across the group: they
    feed every rank's heads, so each rank holds part of their gradient."""

    @staticmethod
    def forward(ctx, input_, shared: int, group):
        from megatron.core.tensor_parallel.mappings import _gather_along_last_dim

        ctx.shared, ctx.group = shared, group
        return _gather_along_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        from megatron.core.tensor_parallel.mappings import _split_along_last_dim

        keep, shared = grad_output[..., : -ctx.shared], grad_output[..., -ctx.shared:].contiguous()
        torch.distributed.all_reduce(shared, group=ctx.group)
        return _split_along_last_dim(torch.cat([keep, shared], dim=-1), ctx.group), None, None


def _sum_shared_rope_key_gradient() -> None:
    from megatron.core.transformer import multi_latent_attention as mla

    original_gather = _original["gather"] = mla.gather_from_tensor_model_parallel_region
    original_qkv = _original["qkv"] = mla.MLASelfAttention.get_query_key_value_tensors

    @functools.wraps(original_gather)
    def gather_from_tensor_model_parallel_region(input_, *args, **kwargs):
        marked = _KV_DOWN_OUTPUT.get()
        if marked is not None and input_ is marked[0]:
            return _GatherSummingSharedKey.apply(input_, marked[1], marked[2])
        return original_gather(input_, *args, **kwargs)

    @functools.wraps(original_qkv)
    def get_query_key_value_tensors(self, *args, **kwargs):
        def mark(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output  # Megatron's linears return (out, bias)
            _KV_DOWN_OUTPUT.set((out, self.config.qk_pos_emb_head_dim, self.tp_group))

        handle = self.linear_kv_down_proj.register_forward_hook(mark)
        token = _KV_DOWN_OUTPUT.set(None)
        try:
            return original_qkv(self, *args, **kwargs)
        finally:
            handle.remove()
            _KV_DOWN_OUTPUT.reset(token)

    mla.gather_from_tensor_model_parallel_region = gather_from_tensor_model_parallel_region
    mla.MLASelfAttention.get_query_key_value_tensors = get_query_key_value_tensors


def _average_q_layernorm_gradient() -> None:
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.utils import get_pg_size

    original_init = mla.MLASelfAttention.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        norm = getattr(self, "q_layernorm", None)
        if norm is not None and get_pg_size(self.tp_group) > 1 and not self.config.sequence_parallel:
            for p in norm.parameters():
                p.average_gradients_across_tp_domain = True

    mla.MLASelfAttention.__init__ = __init__
