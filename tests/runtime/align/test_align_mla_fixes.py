"""runtime/mcore_fixes.py's premises, checked fast and in-process (the fixes' effect needs 2 processes:
tests/runtime/align/test_align_mla_tp2.py): on megatron-core 0.16.1 the MLA code still gathers the kv down
projection without reducing the RoPE key's gradient and finalize_model_grads still sums every `q_layernorm`
gradient by name, the patches are installed once an MLA model is built, and the gather they install sums
exactly the shared columns' gradient."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch


def test_the_bugs_are_in_this_megatron_core():
    """If a release fixes either, PATCHED_VERSIONS must not name it (the fixes would then double count)."""
    from megatron.core import __version__
    from megatron.core.transformer import multi_latent_attention as mla

    from nemoc.runtime import mcore_fixes

    finalize_model_grads = importlib.import_module("megatron.core.distributed.finalize_model_grads")

    assert mcore_fixes.needed() == (__version__ in mcore_fixes.PATCHED_VERSIONS)
    if not mcore_fixes.needed():
        pytest.skip(f"megatron-core {__version__} is not patched")
    source = inspect.getsource(mcore_fixes._original["qkv"] if mcore_fixes.is_applied()
                               else mla.MLASelfAttention.get_query_key_value_tensors)
    assert "kv_combined = gather_from_tensor_model_parallel_region(kv_combined)" in source
    assert "copy_to_tensor_model_parallel_region" not in source  # the upstream fix (PR #6839) is absent
    reduce = inspect.getsource(finalize_model_grads._allreduce_non_tensor_model_parallel_grads)
    assert '"q_layernorm" in name' in reduce and "average_gradients_across_tp_domain" in reduce


def test_building_an_mla_model_applies_the_fixes(mcore):
    from megatron.core.transformer import multi_latent_attention as mla

    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import mcore_fixes

    if not mcore_fixes.needed():
        pytest.skip("megatron-core is not patched")
    spec = ModelSpec(name="tiny-mla", layers=1, hidden=64, heads=4, query_groups=4, ffn_hidden=96, vocab=64,
                     seq_length=16, activation="swiglu", norm="rmsnorm", position="rope",
                     multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=16,
                     qk_pos_emb_head_dim=8, v_head_dim=12, qk_layernorm=True)
    model = mcore.build_gpt(spec, mcore.single_layout())
    assert mcore_fixes.is_applied()
    assert mla.MLASelfAttention.get_query_key_value_tensors is not mcore_fixes._original["qkv"]
    assert mla.gather_from_tensor_model_parallel_region is not mcore_fixes._original["gather"]
    # at TP 1 nothing is gathered and q_layernorm keeps Megatron's rule (there is nothing to reduce)
    norm = [p for n, p in model.named_parameters() if "q_layernorm" in n]
    assert norm and not any(getattr(p, "average_gradients_across_tp_domain", False) for p in norm)
    tokens = torch.randint(0, 64, (1, 16))
    logits = model(tokens, torch.arange(16)[None], None)
    assert logits.shape[:2] == (1, 16) and torch.isfinite(logits).all()


def test_the_gather_sums_only_the_shared_columns_gradient(mcore):
    """World size 1: the all-reduce is the identity, so the gradient passes through unchanged and whole
    (the 2-process sum is what test_align_mla_tp2.py measures)."""
    from megatron.core import parallel_state

    from nemoc.runtime.mcore_fixes import _GatherSummingSharedKey

    x = torch.randn(3, 2, 10, requires_grad=True)
    y = _GatherSummingSharedKey.apply(x, 4, parallel_state.get_tensor_model_parallel_group())
    assert torch.equal(y, x)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)
