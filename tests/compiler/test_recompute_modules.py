"""Selective recompute of `parallel.recompute_modules`: the memory terms each module frees, the time and
FLOPs of exactly those modules' replayed forward, and what the language / search do with the field.
(The freed bytes against a real Megatron-Core layer: tests/runtime/test_train_recompute_modules.py.)"""

from __future__ import annotations

import dataclasses

import pytest

from nemoc.compiler.catalog import PRESETS, get_gpu
from nemoc.compiler.cost import layer_times
from nemoc.compiler.flops import flops_per_token, hardware_flops_per_step, param_counts
from nemoc.compiler.memory import layer_activations
from nemoc.compiler.plan import Layout

LLAMA = PRESETS["llama3_8b"]
MIXTRAL = PRESETS["mixtral_8x7b"]
S, B, T = 4096, 1, 4


def acts(model, modules=None, *, recompute="selective", kernels="te", **kw):
    return layer_activations(model, seq=S, micro_batch=B, tp=T, sp=True, recompute=recompute,
                             recompute_modules=modules, kernels=kernels, **kw)


def lay(modules=None, recompute="selective", **kw) -> Layout:
    base = dict(tp=T, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=B, global_batch=8, num_microbatches=8,
                sequence_parallel=True, distributed_optimizer=True, recompute=recompute, recompute_modules=modules)
    base.update(kw)
    return Layout(**base)


def test_old_files_mean_the_same():
    """No recompute_modules written = Megatron's default [core_attn] = what selective meant before."""
    for kernels in ("te", "local"):
        for backend in ("flash", "unfused"):
            kw = dict(kernels=kernels, attention_backend=backend)
            assert acts(LLAMA, None, **kw) == acts(LLAMA, ("core_attn",), **kw)
    hw = get_gpu("H100")
    kw = dict(seq=S, precision="bf16", attention_backend="flash", micro_batch=B)
    assert layer_times(LLAMA, lay(None), hw, **kw) == layer_times(LLAMA, lay(("core_attn",)), hw, **kw)
    assert lay(None).selective_modules == ("core_attn",) and lay(None, recompute="full").selective_modules == ()


def test_the_dense_mlp_keeps_only_its_input():
    """tensor_parallel.checkpoint(self.mlp, ...): the MLP input is kept, fc1 output and activation output are
    recomputed. On the local spec that input is the pre-MLP norm's 16-bit output; with Transformer Engine the
    norm is fused into fc1, so it is the residual stream, already counted once as the fused norm's input
    (`norms`): the MLP term goes to zero, the norms stay."""
    sbh = S * B * LLAMA.hidden
    none, mlp = acts(LLAMA, recompute="none"), acts(LLAMA, ("mlp",))
    assert mlp.mlp == 0.0
    assert none.mlp - mlp.mlp == pytest.approx(2 * sbh / T + 2 * S * B * LLAMA.ffn_hidden * 3 / T)  # fc1 in, 2f + f
    assert (mlp.norms, mlp.attention, mlp.scores) == (none.norms, none.attention, none.scores)
    assert none.norms == pytest.approx(2 * 2 * sbh / T)  # both norms' inputs, the pre-MLP one the MLP's input
    local_none, local = acts(LLAMA, recompute="none", kernels="local"), acts(LLAMA, ("mlp",), kernels="local")
    assert local.mlp == pytest.approx(2 * sbh / T) and local.norms == local_none.norms
    assert acts(MIXTRAL, ("mlp",)) == acts(MIXTRAL, recompute="none")  # no dense MLP in a MoE layer


def test_the_te_mlp_input_is_counted_once_at_llama3_8b_scale():
    """Llama 3 8B, 8,192 tokens, tp 2 with SP, 32 layers: the residual the TE MLP checkpoint keeps was counted a
    second time (2 B x s x h / tp per layer = 32 MiB, 1 GiB over the layers)."""
    kw = dict(seq=8192, micro_batch=1, tp=2, sp=True, recompute="selective", kernels="te")
    mlp = layer_activations(LLAMA, recompute_modules=("core_attn", "mlp"), **kw)
    assert mlp.mlp == 0.0
    assert LLAMA.layers * 2 * 8192 * LLAMA.hidden / 2 == 2**30


def test_layernorm_frees_only_norms_that_are_modules():
    """Transformer Engine fuses both norms of a dense layer into the next linear (IdentityOp): nothing to
    discard. The local spec's norms are modules: their outputs (the QKV and fc1 inputs) and torch
    RMSNorm's fp32 copy go; with the MLP recomputed too, the MLP's kept input is that norm output."""
    assert acts(LLAMA, ("layernorm",)) == acts(LLAMA, recompute="none")
    sbh = S * B * LLAMA.hidden
    none, ln = acts(LLAMA, recompute="none", kernels="local"), acts(LLAMA, ("layernorm",), kernels="local")
    assert none.total - ln.total == pytest.approx(2 * (2 + 4) * sbh / T)
    both = acts(LLAMA, ("mlp", "layernorm"), kernels="local")
    assert both.mlp == 0.0
    # a MoE layer's pre-MLP norm is a module of its own even with TE: its output (the MoE input) goes
    moe_none, moe_ln = acts(MIXTRAL, recompute="none"), acts(MIXTRAL, ("layernorm",))
    assert moe_none.mlp - moe_ln.mlp == pytest.approx(2 * S * B * MIXTRAL.hidden / T)


def test_moe_modules():
    f = MIXTRAL.moe_ffn_hidden or MIXTRAL.ffn_hidden
    none = acts(MIXTRAL, recompute="none")
    whole = acts(MIXTRAL, ("moe",))
    assert whole.mlp == pytest.approx(2 * S * B * MIXTRAL.hidden / T)  # only the MoE layer's input
    act = acts(MIXTRAL, ("moe_act",))
    routed = S * B * MIXTRAL.top_k / T  # SP-sharded tokens x top_k, etp 1
    assert none.mlp - act.mlp == pytest.approx(2 * routed * f)  # the experts' activation output
    shared = dataclasses.replace(MIXTRAL, shared_expert_ffn_hidden=4096)
    freed = acts(shared, recompute="none").mlp - acts(shared, ("shared_experts",)).mlp
    assert freed == pytest.approx(2 * S * B * 4096 / T * 3)
    assert acts(shared, ("moe", "shared_experts")) == acts(shared, ("moe",))


@pytest.mark.parametrize("model,modules", [(LLAMA, ("mlp",)), (LLAMA, ("core_attn", "mlp")),
                                           (MIXTRAL, ("moe",)), (MIXTRAL, ("moe_act",))])
def test_memory_between_none_and_full(model, modules):
    full = acts(model, recompute="full").total
    none = acts(model, recompute="none").total
    assert full <= acts(model, modules).total < none


def test_recomputing_the_mlp_replays_its_forward_gemms():
    """The backward of a layer with `mlp` recomputed runs the MLP's forward GEMMs once more: the extra
    GEMM time is fc1 + fc2 forward, the MLP's share of the layer's forward GEMM time (its share of the
    layer's GEMM FLOPs, up to the projections' different tile efficiency)."""
    hw = get_gpu("H100")
    kw = dict(seq=S, precision="bf16", attention_backend="flash", micro_batch=B)
    none = layer_times(LLAMA, lay(recompute="none"), hw, **kw)
    mlp = layer_times(LLAMA, lay(("mlp",)), hw, **kw)
    forward = layer_times(LLAMA, lay(recompute="none"), hw, **dict(kw, backward=0.0))
    counts = param_counts(LLAMA)
    share = counts.mlp_active / (counts.attention + counts.mlp_active)
    # below the FLOP share: the forward's `gemm` also carries the layer's launch overhead, not replayed
    assert 0.95 * share < (mlp.gemm - none.gemm) / forward.gemm < share
    assert mlp.attention == none.attention  # the attention core is not replayed
    assert mlp.elementwise > none.elementwise and mlp.tp_comm > none.tp_comm
    full = layer_times(LLAMA, lay(recompute="full"), hw, **kw)
    assert none.total < mlp.total
    # layernorm under TE on a dense model recomputes nothing: it costs nothing
    assert layer_times(LLAMA, lay(("layernorm",)), hw, **kw) == layer_times(LLAMA, lay(()), hw, **kw)
    assert full.gemm > mlp.gemm


def test_moe_recompute_replays_the_dispatch():
    hw = get_gpu("H100")
    kw = dict(seq=S, precision="bf16", attention_backend="flash", micro_batch=B)
    none = layer_times(MIXTRAL, lay(recompute="none", ep=8, sequence_parallel=True), hw, **kw)
    moe = layer_times(MIXTRAL, lay(("moe",), ep=8), hw, **kw)
    assert moe.ep_comm == pytest.approx(none.ep_comm * 4 / 3)  # one more forward pass of dispatch + combine
    assert moe.gemm > none.gemm and moe.attention == none.attention


def test_hardware_flops_count_exactly_the_recomputed_modules():
    s, gb = 8192, 128
    f = flops_per_token(LLAMA, s, False)
    base = hardware_flops_per_step(LLAMA, s, gb, recompute="none", causal_discount=False)
    sel = hardware_flops_per_step(LLAMA, s, gb, recompute="selective", causal_discount=False)
    assert sel - base == pytest.approx(f.attention_core * s * gb)  # default: core_attn
    mlp = hardware_flops_per_step(LLAMA, s, gb, recompute="selective", causal_discount=False,
                                  recompute_modules=("mlp", "layernorm"))
    assert mlp - base == pytest.approx(2 * LLAMA.layers * param_counts(LLAMA).mlp_active * s * gb)


def test_written_modules_with_auto_recompute_take_selective_and_are_never_searched():
    from nemoc.compiler.catalog.models import get_preset
    from nemoc.compiler.search import Problem, search
    from nemoc.compiler.spec import ClusterSpec, ParallelSpec
    from nemoc.runtime.target import NEMOC_RUNTIME

    auto = ParallelSpec(*(None,) * len(ParallelSpec.__dataclass_fields__))
    p = Problem(model=get_preset("llama3_8b"), cluster=ClusterSpec(gpu="H100", nodes=1), gpu=get_gpu("H100"),
                fixed=dataclasses.replace(auto, context=1, expert=1, recompute_modules=("mlp", "layernorm")),
                global_batch=64, seq_length=8192, target=NEMOC_RUNTIME)
    ranked = search(p, top=10).ranked
    assert ranked and all(c.layout.recompute == "selective" for c in ranked)
    assert all(c.layout.selective_modules == ("mlp", "layernorm") for c in ranked)
