"""runtime.megatron_args: the one place plan fields become Megatron-Core arguments."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from nemoc.compiler.plan import Layout, MoeExecution, PipelineSplit
from nemoc.compiler.spec import ModelSpec, OptimizerSpec, ScheduleSpec
from nemoc.runtime import megatron_args as margs
from plan_factory import make_execution

CPU = margs.MachineFacts(cpu=True, have_te=False)
GPU_TE = margs.MachineFacts(cpu=False, have_te=True)
LLAMA_ISH = ModelSpec(name="m", layers=4, hidden=256, heads=8, query_groups=2, ffn_hidden=688, vocab=1000,
                      seq_length=128, activation="swiglu", norm="rmsnorm", norm_epsilon=1e-6, qk_layernorm=True)


def lay(**kw) -> Layout:
    base = dict(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=4, num_microbatches=4,
                sequence_parallel=False, distributed_optimizer=False, recompute="none")
    base.update(kw)
    return Layout(**base)


# what GPTModel's loss calls with cross_entropy_fusion_impl = "te" (None where TE is not installed)
_TE_CROSS_ENTROPY = "megatron.core.models.common.language_module.language_module.te_parallel_cross_entropy"
_TE_MOE_KERNELS = ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                   "fused_sort_chunks_by_index_with_probs", "fused_unpermute")


def config(model=LLAMA_ISH, layout=None, precision="bf16", backend="flash", facts=CPU, moe=None):
    if facts.have_te:  # TE is not installed here: its fused RoPE is what apply_rope_fusion looks for,
        # its fused MoE permutation what moe_permute_fusion looks for (moe_utils.py imports them from TE)
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch("megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb",
                                           lambda *a, **k: None))
            for name in _TE_MOE_KERNELS:
                stack.enter_context(mock.patch(f"megatron.core.transformer.moe.moe_utils.{name}",
                                               lambda *a, **k: None, create=True))
            stack.enter_context(mock.patch(_TE_CROSS_ENTROPY, lambda *a, **k: None))
            return _config(model, layout, precision, backend, facts, moe)
    return _config(model, layout, precision, backend, facts, moe)


def _config(model, layout, precision, backend, facts, moe=None):
    """What the runtime builds from a stage planned with `kernels = te` where the machine has TE, else local
    (`moe`: the plan's MoE settings instead of the auto ones)."""
    layout = layout or lay()
    execution = make_execution(model, layout, precision=precision, attention=backend,
                               kernels="te" if facts.have_te else "local", gpu="B200")
    if moe is not None:
        execution = dataclasses.replace(execution, moe=moe)
    return margs.transformer_config(model=model, layout=layout, execution=execution, facts=facts)


def test_architecture_fields_map_one_to_one():
    c = config()
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups) == (4, 256, 8, 2)
    assert c.ffn_hidden_size == 688 and c.kv_channels == 32
    assert c.gated_linear_unit and c.activation_func is F.silu  # SwiGLU
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6 and c.qk_layernorm
    assert c.bf16 and c.params_dtype is torch.bfloat16 and c.pipeline_dtype is torch.bfloat16
    gelu = config(model=dataclasses.replace(LLAMA_ISH, activation="gelu", norm="layernorm"), precision="fp32")
    assert not gelu.gated_linear_unit and gelu.activation_func is F.gelu and gelu.normalization == "LayerNorm"
    assert gelu.params_dtype is torch.float32 and not gelu.bf16


def test_parallel_fields_and_cpu_specifics():
    c = config(layout=lay(tp=2, pp=2, vp=2, sequence_parallel=True, recompute="full"))
    assert (c.tensor_model_parallel_size, c.pipeline_model_parallel_size) == (2, 2)
    assert c.virtual_pipeline_model_parallel_size == 2 and c.sequence_parallel
    assert c.recompute_granularity == "full" and c.recompute_method == "uniform" and c.recompute_num_layers == 1
    # block recompute: the plan's recompute_layers per model chunk (Megatron-Core's TransformerConfig
    # accepts the triple; transformer_block.py replays the chunk's first n layers)
    b = config(layout=lay(pp=2, vp=2, recompute="full", recompute_layers=1))
    assert (b.recompute_granularity, b.recompute_method, b.recompute_num_layers) == ("full", "block", 1)
    assert "--recompute-method block" in " ".join(margs._flags(margs._recompute_kwargs("full", 1)))
    # selective recompute: the plan's modules, or none written = Megatron's default ["core_attn"] (what
    # recompute = selective meant before recompute_modules); Megatron-Core 0.16.1 accepts both
    s = config(layout=lay(recompute="selective", recompute_modules=("mlp", "layernorm")))
    assert s.recompute_granularity == "selective" and s.recompute_modules == ["mlp", "layernorm"]
    assert config(layout=lay(recompute="selective")).recompute_modules == ["core_attn"]
    assert "--recompute-modules mlp layernorm" in " ".join(
        margs._flags(margs._recompute_kwargs("selective", None, ("mlp", "layernorm"))))
    # gloo: batched p2p is silently wrong for pp=2 + VPP; CPU init makes weights layout-independent
    assert c.batch_p2p_comm is False and c.use_cpu_initialization is True
    g = config(layout=lay(tp=2, sequence_parallel=True, recompute="selective"), facts=GPU_TE)
    assert g.batch_p2p_comm is True and g.use_cpu_initialization is False and g.recompute_granularity == "selective"
    assert not g.overlap_p2p_comm and c.overlap_p2p_comm  # overlap: the interleaved schedule only (c: pp 2 x vp 2)
    i = config(layout=lay(pp=2, vp=2, num_microbatches=4), facts=GPU_TE)  # overlapped transfers are unbatched
    assert i.overlap_p2p_comm and not i.batch_p2p_comm
    kw = margs.parallel_kwargs(layout=lay(tp=2, pp=4, vp=2, cp=2, ep=4, etp=1), timeout_minutes=5)
    assert kw["tensor_model_parallel_size"] == 2 and kw["pipeline_model_parallel_size"] == 4
    assert kw["virtual_pipeline_model_parallel_size"] == 2 and kw["context_parallel_size"] == 2
    assert kw["expert_model_parallel_size"] == 4 and kw["distributed_timeout_minutes"] == 5


def test_moe_builds_bias_free_experts_and_picks_dispatcher():
    moe = dataclasses.replace(LLAMA_ISH, experts=8, top_k=2, moe_ffn_hidden=128)
    c = config(model=moe, layout=lay(ep=2))
    assert c.num_moe_experts == 8 and c.moe_router_topk == 2 and c.moe_ffn_hidden_size == 128
    assert c.add_bias_linear is False and c.moe_token_dispatcher_type == "alltoall" and not c.moe_grouped_gemm
    assert config(model=moe).moe_token_dispatcher_type == "allgather"
    assert not c.moe_router_pre_softmax and c.moe_router_dtype is None


def test_top1_routing_builds_with_pre_softmax():
    """Megatron raises for top-1 softmax routing without moe_router_pre_softmax (W107 promises nemoc sets it)."""
    top1 = dataclasses.replace(LLAMA_ISH, experts=4, top_k=1, moe_ffn_hidden=128)
    c = config(model=top1)
    assert c.moe_router_topk == 1 and c.moe_router_pre_softmax


def test_many_experts_route_in_fp32():
    """transformer_config.py warns from 32 experts on without moe_router_dtype: the runtime sets fp32."""
    many = dataclasses.replace(LLAMA_ISH, experts=32, top_k=2, moe_ffn_hidden=64)
    assert config(model=many, layout=lay(ep=1)).moe_router_dtype == "fp32"


@pytest.mark.parametrize("backend", ["auto", "flash", "fused", "unfused"])
def test_attention_backend_reaches_transformer_engine_as_planned(backend):
    """With TE, `auto` stays Megatron's AttnBackend.auto (TE picks flash-attn or cuDNN fused attention);
    an explicit choice pins it. Without TE the local spec decides (AttnBackend.local, SDPA for auto)."""
    from megatron.core.transformer.enums import AttnBackend

    assert config(backend=backend, facts=GPU_TE).attention_backend == getattr(AttnBackend, backend)
    assert config(backend=backend).attention_backend == AttnBackend.local
    with pytest.raises(margs.UnsupportedPlan, match="attention backend"):
        config(backend="sdpa", facts=GPU_TE)


@pytest.mark.parametrize("kwargs,message", [
    (dict(layout=lay(cp=2), backend="unfused"), "context parallelism"),  # the local flash (SDPA) core splits
    (dict(precision="fp8"), "Transformer Engine"),
    (dict(layout=lay(sequence_parallel=True)), "sequence_parallel needs tp > 1"),
    (dict(model=dataclasses.replace(LLAMA_ISH, experts=4, top_k=2, add_bias_linear=True)), "without linear biases"),
    (dict(model=dataclasses.replace(LLAMA_ISH, activation="tanh")), "activation"),
])
def test_unsupported_plans_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(margs.UnsupportedPlan, match=message):
        config(**kwargs)


def test_an_moe_model_at_tp2_without_sequence_parallelism_is_built_for_eval_but_not_trained():
    """Megatron's MoELayer refuses only to *train* at tp > 1 without sequence parallelism (moe_layer.py
    forward, in training mode): an eval stage at that layout (sequence_parallel = false in its block) builds it;
    an optimizer for it is refused."""
    moe = dataclasses.replace(LLAMA_ISH, experts=4, top_k=1)
    assert config(model=moe, layout=lay(tp=2)).num_moe_experts == 4
    with pytest.raises(margs.UnsupportedPlan, match="training an MoE model with tp=2 needs sequence_parallel"):
        margs.check_trainable(moe=True, layout=lay(tp=2))
    margs.check_trainable(moe=True, layout=lay(tp=2, sequence_parallel=True))
    margs.check_trainable(moe=False, layout=lay(tp=2))


def test_vocab_padding_follows_megatron():
    assert margs.padded_vocab_size(1000, 1) == 1024
    assert margs.padded_vocab_size(50257, 1) == 50304  # GPT-2's famous padded size
    assert margs.padded_vocab_size(50257, 8) == 51200
    assert margs.padded_vocab_size(256, 2) == 256


def test_optimizer_and_scheduler():
    opt = OptimizerSpec(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0)
    sched = ScheduleSpec(name="cosine", warmup=100, min_lr=6e-5)
    oc = margs.optimizer_config(optimizer=opt, schedule=sched, layout=lay(distributed_optimizer=True),
                                precision="fp16")
    assert oc.lr == 6e-4 and oc.min_lr == 6e-5 and oc.adam_beta2 == 0.95 and oc.clip_grad == 1.0
    assert oc.fp16 and oc.loss_scale is None and oc.use_distributed_optimizer  # dynamic loss scaling
    kw = margs.scheduler_kwargs(optimizer=opt, schedule=sched, steps=1000)
    assert kw["lr_warmup_steps"] == 100 and kw["lr_decay_steps"] == 1000 and kw["lr_decay_style"] == "cosine"
    assert margs.scheduler_kwargs(optimizer=opt, schedule=ScheduleSpec(name="wsd"), steps=1000)["wsd_decay_steps"] == 100
    # warmup longer than the run is clipped so Megatron's warmup < decay assertion holds
    short = margs.scheduler_kwargs(optimizer=opt, schedule=sched, steps=10)
    assert short["lr_warmup_steps"] < short["lr_decay_steps"]
    with pytest.raises(margs.UnsupportedPlan, match="optimizer"):
        margs.optimizer_config(optimizer=OptimizerSpec(name="lion"), schedule=sched, layout=lay(), precision="bf16")
    # Megatron's DistributedOptimizer wraps Adam only (E129 in `nemoc check`)
    sgd = OptimizerSpec(name="sgd", lr=1e-2)
    assert margs.optimizer_config(optimizer=sgd, schedule=sched, layout=lay(), precision="bf16").optimizer == "sgd"
    with pytest.raises(margs.UnsupportedPlan, match="Adam only"):
        margs.optimizer_config(optimizer=sgd, schedule=sched, layout=lay(distributed_optimizer=True), precision="bf16")


def test_uneven_pipeline_split_from_the_plans_execution():
    """The planner's split travels as a typed field (`Execution.pipeline`), translated to TransformerConfig's names."""
    ex = make_execution(LLAMA_ISH, lay(pp=3), precision="bf16", attention="flash")
    uneven = dataclasses.replace(ex, pipeline=PipelineSplit(1, 1, 2))
    c = margs.transformer_config(model=LLAMA_ISH, layout=lay(pp=3), execution=uneven, facts=CPU)
    assert (c.num_layers_in_first_pipeline_stage, c.num_layers_in_last_pipeline_stage) == (1, 1)
    even = margs.transformer_config(model=LLAMA_ISH, layout=lay(pp=2), execution=ex, facts=CPU)
    assert even.num_layers_in_first_pipeline_stage is None and margs.pipeline_split_kwargs(ex.pipeline) == {}
    accounted = margs.pipeline_split_kwargs(PipelineSplit(None, None, 2, embedding=True, loss=True, stages=3))
    assert accounted == {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}


def test_the_plans_execution_is_translated_not_rederived():
    """Precision, attention core, vocabulary padding, overlaps and fp8 recipe come from `Execution`."""
    ex = make_execution(LLAMA_ISH, lay(tp=2, dp=2), precision="bf16", attention="unfused")
    assert ex.vocab_multiple == 256 and ex.padded_vocab == 1024 and ex.overlaps.grad_reduce
    assert margs.padded_vocab_size(1000, multiple=ex.vocab_multiple) == 1024
    assert margs.ddp_config(layout=lay(dp=2), overlaps=ex.overlaps).overlap_grad_reduce
    assert not margs.ddp_config(layout=lay(dp=2), overlaps=dataclasses.replace(
        ex.overlaps, grad_reduce=False)).overlap_grad_reduce
    fp32 = margs.transformer_config(model=LLAMA_ISH, layout=lay(), facts=CPU,
                                    execution=dataclasses.replace(ex, precision="fp32", params_dtype="fp32"))
    assert fp32.params_dtype is torch.float32
    with pytest.raises(TypeError, match="execution"):
        margs.transformer_config(model=LLAMA_ISH, layout=lay(), facts=CPU)


def test_transformer_engine_runs_get_the_fused_kernels_the_plan_prices():
    """kernels = te is priced with fused RoPE, SwiGLU, bias-dropout-add (cost.py charges the unfused
    ones to `local` only): Megatron-Core leaves them off unless asked; the local spec never gets them."""
    te = config(facts=GPU_TE)
    assert te.apply_rope_fusion and te.bias_activation_fusion and te.bias_dropout_fusion
    local = config(facts=margs.MachineFacts(cpu=False, have_te=False))
    assert not (local.apply_rope_fusion or local.bias_activation_fusion or local.bias_dropout_fusion)
    assert not config(facts=CPU).apply_rope_fusion
    # TransformerConfig allows the fused bias-activation for SwiGLU / GeGLU and for GELU with biases only
    relu2 = config(model=dataclasses.replace(LLAMA_ISH, activation="squared_relu"), facts=GPU_TE)
    gelu = config(model=dataclasses.replace(LLAMA_ISH, activation="gelu", position="learned"), facts=GPU_TE)
    assert not relu2.bias_activation_fusion and not gelu.bias_activation_fusion and not gelu.apply_rope_fusion
    # MoE SwiGLU experts (weighted_bias_swiglu_impl) and GELU with linear biases (bias_gelu_impl) are valid
    moe = dataclasses.replace(LLAMA_ISH, experts=4, top_k=2, moe_ffn_hidden=64)
    assert config(model=moe, layout=lay(ep=1), facts=GPU_TE).bias_activation_fusion
    gelu_bias = dataclasses.replace(LLAMA_ISH, activation="gelu", add_bias_linear=True)
    assert config(model=gelu_bias, facts=GPU_TE).bias_activation_fusion
    # the output layer's fused weight-gradient accumulation needs apex's extension: on only where it imports
    from megatron.core.tensor_parallel import layers
    for available in (True, False):
        with mock.patch.object(layers, "_grad_accum_fusion_available", available):
            assert config(facts=GPU_TE).gradient_accumulation_fusion is available


def test_transformer_engine_runs_get_the_fused_cross_entropy_the_plan_prices():
    """kernels = te is priced with Transformer Engine's fused cross entropy (cost.CROSS_ENTROPY_BYTES_TE,
    memory.cross_entropy_bytes), as Megatron-Bridge's performance recipes run it: Megatron-Core 0.16.1's
    TransformerConfig takes the two fields (default off / native); the local spec keeps Megatron-Core's
    unfused vocab-parallel cross entropy; Megatron-LM's command line says the same."""
    te = config(facts=GPU_TE)
    assert te.cross_entropy_loss_fusion and te.cross_entropy_fusion_impl == "te"
    for facts in (CPU, margs.MachineFacts(cpu=False, have_te=False)):
        local = config(facts=facts)
        assert not local.cross_entropy_loss_fusion and local.cross_entropy_fusion_impl == "native"
    # a TE without parallel_cross_entropy: refused before the first step, not inside the loss
    with mock.patch(_TE_CROSS_ENTROPY, None), pytest.raises(margs.UnsupportedPlan, match="fused cross entropy"):
        _config(LLAMA_ISH, None, "bf16", "flash", GPU_TE)
    te_flags = margs._flags(margs._cross_entropy_kwargs(make_execution(LLAMA_ISH, lay(), kernels="te").fusions))
    assert te_flags == ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl te"]
    assert margs._flags(margs._cross_entropy_kwargs(make_execution(LLAMA_ISH, lay(), kernels="local").fusions)) == []


@pytest.mark.parametrize("facts", [GPU_TE, CPU], ids=["te", "cpu"])
@pytest.mark.parametrize("loss, fields", [("te", (True, "te")), ("native", (True, "native")), ("none", (False, "native"))])
def test_each_cross_entropy_fusion_is_the_megatron_core_loss_the_plan_prices(facts, loss, fields):
    """`cross_entropy_fusion` as Megatron-Core 0.16.1's TransformerConfig takes it (`cross_entropy_loss_fusion`,
    `cross_entropy_fusion_impl`; `none` is its default: fusion off, impl native): te where this machine builds
    TE's layers, native on either spec (plain PyTorch: it runs on the CPU), none anywhere. A te plan on a
    machine without TE falls back to the unfused loss with the rest of the local spec. Megatron-LM's command
    line states the plan."""
    execution = make_execution(LLAMA_ISH, lay(), kernels="te" if facts.have_te else "local", gpu="B200")
    execution = dataclasses.replace(execution, fusions=dataclasses.replace(execution.fusions, cross_entropy=loss))
    with mock.patch(_TE_CROSS_ENTROPY, lambda *a, **k: None), \
            mock.patch("megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb",
                       lambda *a, **k: None):
        for name in _TE_MOE_KERNELS:
            mock.patch(f"megatron.core.transformer.moe.moe_utils.{name}", lambda *a, **k: None, create=True).start()
        try:
            cfg = margs.transformer_config(model=LLAMA_ISH, layout=lay(), execution=execution, facts=facts)
        finally:
            mock.patch.stopall()
    expected = (False, "native") if loss == "te" and not facts.have_te else fields
    assert (cfg.cross_entropy_loss_fusion, cfg.cross_entropy_fusion_impl) == expected
    flags = margs._flags(margs._cross_entropy_kwargs(execution.fusions))
    assert flags == ([] if loss == "none" else ["--cross-entropy-loss-fusion", f"--cross-entropy-fusion-impl {loss}"])


def test_gradient_reduction_dtype_is_what_the_plan_says():
    """`grad_reduce_in_fp32 = false` (NeMo's FP8 recipes): Megatron-Core 0.16.1's DDP config takes it
    and keeps the gradient buffer in the parameter dtype; the default stays fp32 main grads."""
    assert margs.ddp_config(layout=lay()).grad_reduce_in_fp32 is True
    assert margs.ddp_config(layout=lay(grad_reduce_in_fp32=False)).grad_reduce_in_fp32 is False


def test_tp_comm_overlap_is_refused_on_the_cpu_not_ignored():
    """TE's userbuffer overlap needs CUDA and TE (tests/runtime/test_userbuffers_init.py has the GPU side): on the
    CPU the runtime refuses the plan with the reason rather than train without the overlap it was costed with."""
    with pytest.raises(margs.UnsupportedPlan, match=r"tp_comm_overlap = true needs CUDA GPUs.*CPU \(gloo\)"):
        config(layout=lay(tp=2, sequence_parallel=True, tp_comm_overlap=True), facts=CPU)


@pytest.mark.parametrize("sizes, aligned", [(dict(dp=2), False), (dict(dp=2, pp=2, vp=2), True),
                                            (dict(dp=2, pp=2), False)])
def test_overlap_param_gather_reaches_ddp_and_the_optimizer(sizes, aligned):
    """The plan's overlap becomes DDP's and the optimizer's `overlap_param_gather`; with the interleaved
    schedule the plan aligns the gathers (`align_param_gather`, Megatron-Bridge's comm_overlap.py with VP),
    which Megatron-LM turns off without it."""
    layout = lay(distributed_optimizer=True, overlap_param_gather=True, **sizes)
    ex = make_execution(LLAMA_ISH, layout, precision="bf16", attention="unfused")
    assert ex.overlaps.param_gather and ex.overlaps.align_param_gather == aligned
    config(layout=layout)  # runs: no refusal
    ddp = margs.ddp_config(layout=layout, overlaps=ex.overlaps)
    assert ddp.overlap_param_gather and ddp.overlap_grad_reduce and ddp.align_param_gather == aligned
    opt = margs.optimizer_config(optimizer=OptimizerSpec(), schedule=ScheduleSpec(), layout=layout, precision="bf16",
                                 overlap_param_gather=ddp.overlap_param_gather)
    assert opt.overlap_param_gather and not opt.overlap_param_gather_with_optimizer_step
    off = margs.ddp_config(layout=layout, overlaps=dataclasses.replace(ex.overlaps, param_gather=False))
    assert not off.overlap_param_gather and not off.align_param_gather


def test_overlap_param_gather_without_data_parallel_ranks_gathers_nothing():
    """Megatron-LM needs `--overlap-grad-reduce` with the overlapped gather; with DP x CP 1 the plan overlaps
    no reduce and there is no other rank to gather from: DDP gets neither."""
    layout = lay(distributed_optimizer=True, overlap_param_gather=True)
    ex = make_execution(LLAMA_ISH, layout, precision="bf16", attention="unfused")
    assert not ex.overlaps.grad_reduce
    assert not margs.ddp_config(layout=layout, overlaps=ex.overlaps).overlap_param_gather


def test_context_parallel_ranks_reduce_and_gather_overlapped_at_dp_1():
    """Megatron-Core 0.16.1's DDP reduces over the DP x CP group (`intra_dp_cp_group`) and the distributed
    optimizer shards over it: at dp 1 x cp 2 the plan overlaps both, as the cost model prices them (shard
    dp x cp), and DDP and the optimizer get the same overlap (Megatron-LM copies one flag into both)."""
    from nemoc.runtime.core.build import _ddp_overlaps_gather

    layout = lay(distributed_optimizer=True, overlap_param_gather=True, cp=2)
    ex = make_execution(LLAMA_ISH, layout, precision="bf16", attention="unfused")
    assert ex.overlaps.grad_reduce and ex.overlaps.param_gather
    ddp = margs.ddp_config(layout=layout, overlaps=ex.overlaps)
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather
    assert _ddp_overlaps_gather([SimpleNamespace(ddp_config=ddp)]) and not _ddp_overlaps_gather([object()])


def test_overlap_param_gather_is_refused_without_the_distributed_optimizer():
    with pytest.raises(margs.UnsupportedPlan, match="distributed_optimizer"):
        margs._check_param_gather(lay(dp=2, overlap_param_gather=True, distributed_optimizer=False))


def test_overlap_param_gather_under_megatron_fsdp_runs_as_fsdp_runs_it():
    """`nemoc check` and the planner accept overlap_param_gather = true with megatron_fsdp = true; so does the
    runtime: Megatron-FSDP with optim_grads_params overlaps its all-gathers (prefetch from its forward pre-hooks)
    whatever the flag says (megatron_fsdp.py `MegatronFSDP.__init__` sets `overlap_param_gather = True`), and
    the DDP hooks the runtime switches (core/param_gather.py) are not on its wrapper. The config reaches
    Megatron-Core as planned, sharding strategy optim_grads_params."""
    from nemoc.runtime.core.param_gather import ParamGather

    for gather in (True, False):
        layout = lay(dp=2, megatron_fsdp=True, distributed_optimizer=True, overlap_param_gather=gather)
        margs._check_param_gather(layout)  # no UnsupportedPlan
        ex = make_execution(LLAMA_ISH, layout, precision="bf16", attention="unfused")
        cfg = margs.ddp_config(layout=layout, overlaps=ex.overlaps)
        assert (cfg.use_megatron_fsdp, cfg.data_parallel_sharding_strategy) == (True, "optim_grads_params")
        assert cfg.overlap_param_gather is gather and not cfg.align_param_gather
    fsdp_wrapper = torch.nn.Module()  # FullyShardedDataParallel has no `use_forward_hook` (DDP's attribute)
    assert not ParamGather([fsdp_wrapper]).active


def test_fp8_recipes_reach_megatron_cores_transformer_config():
    """The plan's `Execution.fp8_recipe` (auto: tensorwise for fp8, Megatron-Bridge's FP8-CS; mxfp8 for
    mxfp8) becomes TransformerConfig.fp8_recipe, which Megatron-Core 0.16.1 accepts for every recipe
    nemoc plans; a Transformer Engine too old for the recipe is refused before the run."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    for precision, recipe in (("fp8", "delayed"), ("fp8", "tensorwise"), ("fp8", "blockwise"), ("mxfp8", "mxfp8")):
        kw = margs._fp8_kwargs(precision, recipe)
        c = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **kw)
        assert (c.fp8, c.fp8_recipe) == ("hybrid", recipe)
    assert make_execution(LLAMA_ISH, lay(), precision="fp8", kernels="te", gpu="H100").fp8_recipe == "tensorwise"
    assert make_execution(LLAMA_ISH, lay(), precision="mxfp8", kernels="te", gpu="B200").fp8_recipe == "mxfp8"
    assert make_execution(LLAMA_ISH, lay(), precision="bf16", kernels="te", gpu="H100").fp8_recipe is None
    with mock.patch("megatron.core.utils.is_te_min_version", lambda version, *a, **k: False):
        with pytest.raises(margs.UnsupportedPlan, match="tensorwise needs Transformer Engine >= 2.2"):
            margs._check_fp8_recipe("tensorwise", GPU_TE)
    margs._check_fp8_recipe("tensorwise", CPU)  # no TE: fp8 itself is refused elsewhere (E127)


def test_fp8_parameters_reach_megatron_cores_configs():
    """The plan's fp8_param_gather sets TransformerConfig.fp8_param and the DDP config's
    fp8_param_gather; Megatron-Core 0.16.1 accepts both (fp8_param needs fp8 mode, E165)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = margs._ddp_kwargs(lay(dp=2, distributed_optimizer=True, fp8_param_gather=True), None)
    assert DistributedDataParallelConfig(**kw).fp8_param_gather
    c = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, fp8_param=True,
                          **margs._fp8_kwargs("fp8", "tensorwise"))
    assert c.fp8_param
    with pytest.raises(ValueError, match="fp8_param must be used together with fp8"):
        TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, fp8_param=True)
    assert "--fp8-param-gather" in margs._flags(kw)


def test_moe_dispatcher_and_kernels_reach_megatron_cores_config():
    """The plan's `Execution.moe` becomes TransformerConfig's moe_token_dispatcher_type (flex: the DeepEP
    backend), moe_grouped_gemm and moe_permute_fusion, which Megatron-Core 0.16.1 accepts; auto on
    Transformer Engine is Megatron-Bridge's (alltoall, grouped GEMM, fused permutation), on the local
    spec what it can build. What this machine cannot build is refused before the run."""
    moe = dataclasses.replace(LLAMA_ISH, experts=8, top_k=2, moe_ffn_hidden=128)
    te = config(model=moe, layout=lay(ep=2), facts=GPU_TE)
    assert (te.moe_token_dispatcher_type, te.moe_grouped_gemm, te.moe_permute_fusion) == ("alltoall", True, True)
    local = config(model=moe, layout=lay(ep=2))
    assert (local.moe_token_dispatcher_type, local.moe_grouped_gemm, local.moe_permute_fusion) == (
        "alltoall", False, False)
    gathered = config(model=moe, layout=lay(ep=2), facts=GPU_TE,
                      moe=MoeExecution(dispatcher="allgather", grouped_gemm=False, permute_fusion=True))
    assert gathered.moe_token_dispatcher_type == "allgather" and not gathered.moe_grouped_gemm
    flex = MoeExecution(dispatcher="flex", grouped_gemm=True, permute_fusion=True)
    with mock.patch.object(margs, "have_deep_ep", lambda: True):
        c = config(model=moe, layout=lay(ep=2), facts=GPU_TE, moe=flex)
    assert c.moe_token_dispatcher_type == "flex" and c.moe_flex_dispatcher_backend == "deepep"
    with mock.patch.object(margs, "have_deep_ep", lambda: False):
        with pytest.raises(margs.UnsupportedPlan, match="flex needs DeepEP"):
            config(model=moe, layout=lay(ep=2), facts=GPU_TE, moe=flex)
    with pytest.raises(margs.UnsupportedPlan, match="moe_grouped_gemm = true needs Transformer Engine"):
        config(model=moe, layout=lay(ep=2), moe=MoeExecution("alltoall", True, False))
    flags = margs._flags(margs._moe_kwargs(moe, lay(ep=2), MoeExecution("alltoall", True, True)))
    assert {"--moe-grouped-gemm", "--moe-permute-fusion", "--moe-token-dispatcher-type alltoall"} <= set(flags)


def test_token_dropping_and_router_settings_reach_megatron_cores_config():
    """The model's capacity factor, padding, drop policy, load balancing, aux-loss weight and shared-expert
    overlap become the TransformerConfig fields of the same meaning, which Megatron-Core 0.16.1 accepts
    (dropless by default, as before); the combinations nemoc refuses (E143, E144, E145, E146) are the ones
    its __post_init__ raises for, and the CPU refuses the overlap's CUDA side stream (E148)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = dataclasses.replace(LLAMA_ISH, experts=8, top_k=2, moe_ffn_hidden=128)
    c = config(model=moe, layout=lay(ep=2), facts=GPU_TE)
    assert (c.moe_expert_capacity_factor, c.moe_pad_expert_input_to_capacity, c.moe_token_drop_policy) == (
        None, False, "probs")
    assert (c.moe_router_load_balancing_type, c.moe_aux_loss_coeff, c.moe_shared_expert_overlap) == (
        "aux_loss", 1e-2, False)
    dp = dataclasses.replace(moe, moe_capacity_factor=1.0, moe_pad_to_capacity=True, moe_token_drop_policy="position",
                             moe_load_balancing="seq_aux_loss", moe_aux_loss_coeff=1e-3, shared_expert_ffn_hidden=256,
                             moe_shared_expert_overlap=True)
    c = config(model=dp, layout=lay(ep=2), facts=GPU_TE)
    assert (c.moe_expert_capacity_factor, c.moe_pad_expert_input_to_capacity, c.moe_token_drop_policy) == (
        1.0, True, "position")
    assert (c.moe_router_load_balancing_type, c.moe_aux_loss_coeff, c.moe_shared_expert_overlap) == (
        "seq_aux_loss", 1e-3, True)
    flags = set(margs._flags(margs._moe_kwargs(dp, lay(ep=2), MoeExecution("alltoall", True, True))))
    assert {"--moe-expert-capacity-factor 1", "--moe-pad-expert-input-to-capacity", "--moe-token-drop-policy position",
            "--moe-router-load-balancing-type seq_aux_loss", "--moe-shared-expert-overlap"} <= flags
    # the converse: what the rules refuse, Megatron-Core raises for
    kw = margs._moe_kwargs(moe, lay(ep=2), MoeExecution("alltoall", False, False))
    base = dict(num_layers=2, hidden_size=256, num_attention_heads=8, **kw)
    for bad, message in (
            (dict(moe_pad_expert_input_to_capacity=True), "moe_expert_capacity_factor must be set"),  # E143
            (dict(moe_expert_capacity_factor=1.0, moe_router_load_balancing_type="sinkhorn"), "only works with aux_loss"),
            (dict(moe_shared_expert_intermediate_size=256, moe_shared_expert_overlap=True,
                  moe_token_dispatcher_type="allgather"), "only works with alltoall"),  # E145
            (dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True,
                  moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="deepep"),
             "does not support moe_pad_expert_input_to_capacity")):  # E146
        with pytest.raises(ValueError, match=message):
            TransformerConfig(**{**base, **bad})
    with pytest.raises(margs.UnsupportedPlan, match="CUDA side stream"):
        config(model=dp, layout=lay(ep=2))
    # DeepSeek-V3's router: sigmoid scores, aux-loss-free expert bias, group-limited routing, scaled weights
    v3 = dataclasses.replace(moe, moe_router_score="sigmoid", moe_router_pre_softmax=True, moe_expert_bias=True,
                             moe_expert_bias_update_rate=1e-4, moe_router_groups=4, moe_router_group_topk=2,
                             moe_topk_scaling_factor=2.5)
    c = config(model=v3, layout=lay(ep=2), facts=GPU_TE)
    assert (c.moe_router_score_function, c.moe_router_pre_softmax, c.moe_router_enable_expert_bias,
            c.moe_router_bias_update_rate, c.moe_router_num_groups, c.moe_router_group_topk,
            c.moe_router_topk_scaling_factor) == ("sigmoid", True, True, 1e-4, 4, 2, 2.5)
    c = config(model=moe, layout=lay(ep=2), facts=GPU_TE)
    assert (c.moe_router_score_function, c.moe_router_enable_expert_bias, c.moe_router_num_groups) == (
        "softmax", False, None)
    for bad, message in (
            (dict(moe_router_enable_expert_bias=True), "only supports sigmoid"),  # E149
            (dict(moe_router_group_topk=2), "moe_router_num_groups must be specified"),  # E156
            (dict(moe_router_group_topk=1, moe_router_num_groups=3), "should be divisible"),  # E156
            (dict(moe_router_group_topk=5, moe_router_num_groups=4), "should be smaller")):  # E156
        with pytest.raises((ValueError, AssertionError), match=message):
            TransformerConfig(**{**base, **bad})


def test_cuda_graphs_reach_megatron_cores_transformer_config():
    """The plan's `Execution.host` CUDA graphs become TransformerConfig.cuda_graph_impl / cuda_graph_scope,
    which Megatron-Core 0.16.1 accepts for every implementation and scope nemoc plans (E174 mirrors its
    checks); the whole layer is an empty scope."""
    from megatron.core.transformer.enums import CudaGraphScope
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemoc.compiler.plan import HostExecution

    dense = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
    for impl, scope in (("local", ()), ("local", ("attn",)), ("local", ("full_iteration",)),
                        ("transformer_engine", ()), ("transformer_engine", ("attn", "mlp"))):
        kw = margs._cuda_graph_kwargs(HostExecution(impl, scope, True, 100))
        c = TransformerConfig(**dense, **kw)
        assert c.cuda_graph_impl == impl and c.cuda_graph_scope == [CudaGraphScope[s] for s in scope]
    moe = dict(dense, num_moe_experts=4, moe_router_topk=2, add_bias_linear=False)
    kw = margs._cuda_graph_kwargs(HostExecution("transformer_engine", ("attn", "moe_router", "moe_preprocess"), True, 100))
    assert TransformerConfig(**moe, **kw).cuda_graph_scope[-1] == CudaGraphScope.moe_preprocess
    # what E174 refuses, Megatron-Core refuses too
    for impl, scope, cfg in (("transformer_engine", ["full_iteration"], dense), ("local", ["moe_router"], dense),
                             ("local", ["mlp"], moe), ("local", ["moe"], moe)):
        with pytest.raises(AssertionError):
            TransformerConfig(**cfg, cuda_graph_impl=impl, cuda_graph_scope=scope)
    with pytest.raises(AssertionError, match="full recompute"):
        TransformerConfig(**dense, cuda_graph_impl="local", cuda_graph_scope=["attn"], recompute_granularity="full",
                          recompute_method="uniform", recompute_num_layers=1)
    assert margs._cuda_graph_kwargs(HostExecution("none", (), True, 100)) == {}


def test_cuda_graphs_are_refused_where_the_runtime_cannot_capture_them():
    """Every implementation and scope runs on CUDA with Transformer Engine's layers (runtime/core/graphs.py);
    the CPU, a machine without TE's layers and a TE without make_graphed_callables are refused by name."""
    from nemoc.compiler.plan import HostExecution

    with pytest.raises(margs.UnsupportedPlan, match="CPU"):
        margs._check_cuda_graphs(HostExecution("local", (), True, 100), CPU)
    margs._check_cuda_graphs(HostExecution("none", (), True, 100), CPU)
    with mock.patch("torch.cuda.is_available", lambda: True):
        with pytest.raises(margs.UnsupportedPlan, match="do not import here"):
            margs._check_cuda_graphs(HostExecution("local", (), True, 100), margs.MachineFacts(cpu=False, have_te=False))
        with mock.patch.object(margs, "have_te_graphs", lambda: False):
            with pytest.raises(margs.UnsupportedPlan, match="make_graphed_callables"):
                margs._check_cuda_graphs(HostExecution("transformer_engine", (), True, 100), GPU_TE)
        with mock.patch.object(margs, "have_te_graphs", lambda: True):
            margs._check_cuda_graphs(HostExecution("transformer_engine", ("attn", "mlp"), True, 100), GPU_TE)
        margs._check_cuda_graphs(HostExecution("local", ("full_iteration",), True, 100), GPU_TE)
        margs._check_cuda_graphs(HostExecution("local", ("attn",), True, 100), GPU_TE)
    ex = dataclasses.replace(make_execution(LLAMA_ISH, lay(), kernels="local"),
                             host=HostExecution("local", (), True, 100))
    with pytest.raises(margs.UnsupportedPlan, match="CPU"):
        margs.transformer_config(model=LLAMA_ISH, layout=lay(), execution=ex, facts=CPU)


def test_cuda_graphs_seed_transformer_engines_graph_safe_rng_tracker():
    """With CUDA graphs the TransformerConfig asks for TE's RNG tracker and the seeding makes it graph-safe
    (Megatron-LM `_set_random_seed(..., use_cudagraphable_rng=args.cuda_graph_impl != "none")`), so a replayed
    dropout draws new numbers; nothing changes without graphs, nor on the CPU (where the plan is refused)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemoc.compiler.plan import HostExecution

    graphs = HostExecution("transformer_engine", (), True, 100)
    assert margs._cuda_graph_kwargs(graphs)["use_te_rng_tracker"] is True
    assert margs.cuda_graph_rng_kwargs(HostExecution("none", (), True, 100)) == {}
    assert margs.cuda_graph_rng_kwargs(graphs) == {}  # no CUDA here
    with mock.patch("torch.cuda.is_available", lambda: True):
        kw = margs.cuda_graph_rng_kwargs(graphs)
    assert kw == {"te_rng_tracker": True, "use_cudagraphable_rng": True}
    assert set(kw) <= set(inspect.signature(model_parallel_cuda_manual_seed).parameters)
    assert "--te-rng-tracker" in margs._lm_host(graphs)


def test_nvfp4_reaches_megatron_cores_fp4_fields():
    """precision = nvfp4: TransformerConfig(fp4 = "e2m1", fp4_recipe = "nvfp4") with bf16 weights, which
    Megatron-Core 0.16.1 accepts; refused without TE, with a TE older than 2.7 and off Blackwell."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = margs._fp8_kwargs("nvfp4")
    c = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, bf16=True, params_dtype=torch.bfloat16,
                          **kw)
    assert (c.fp4, c.fp4_recipe, c.fp8) == ("e2m1", "nvfp4", None)
    assert margs.params_dtype("nvfp4") is torch.bfloat16
    with pytest.raises(margs.UnsupportedPlan, match="Transformer Engine"):
        config(precision="nvfp4", facts=margs.MachineFacts(cpu=False, have_te=False))
    with mock.patch("megatron.core.utils.is_te_min_version", lambda version, *a, **k: False):
        with pytest.raises(margs.UnsupportedPlan, match=">= 2.7"):
            margs._check_nvfp4("nvfp4", GPU_TE)
    with mock.patch("megatron.core.utils.is_te_min_version", lambda version, *a, **k: True), \
            mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.cuda.get_device_capability", lambda *a: (9, 0)):
        with pytest.raises(margs.UnsupportedPlan, match="Blackwell"):
            margs._check_nvfp4("nvfp4", GPU_TE)
    assert margs._flags(kw) == ["--fp4-format e2m1", "--fp4-recipe nvfp4"]


def test_host_settings_as_megatron_lm_flags():
    from nemoc.compiler.plan import HostExecution

    assert margs._lm_host(HostExecution("transformer_engine", ("attn", "mlp"), True, 100)) == [
        "--cuda-graph-impl transformer_engine", "--cuda-graph-scope attn mlp", "--te-rng-tracker", "--manual-gc",
        "--manual-gc-interval 100"]
    assert margs._lm_host(HostExecution("none", (), False, 0)) == []


def test_megatron_fsdp_reaches_megatron_cores_ddp_config():
    """parallel.megatron_fsdp: DistributedDataParallelConfig(use_megatron_fsdp=True,
    data_parallel_sharding_strategy="optim_grads_params"), which Megatron-Core 0.16.1 accepts; on gloo the
    gradients are scaled before a plain sum (NCCL's PREMUL_SUM does not exist there). The runtime refuses it
    without einops (Megatron-Core's FSDP adapter builds its device mesh with it) and with pipeline stages."""
    from megatron.core.distributed import DistributedDataParallelConfig

    layout = lay(dp=2, distributed_optimizer=True, megatron_fsdp=True)
    kw = margs._ddp_kwargs(layout, None)
    c = DistributedDataParallelConfig(**kw)
    assert c.use_megatron_fsdp and c.data_parallel_sharding_strategy == "optim_grads_params"
    assert c.use_distributed_optimizer and c.gradient_reduce_div_fusion  # Megatron-Core's default on NCCL
    assert not margs.ddp_config(layout=layout, cpu=True).gradient_reduce_div_fusion
    assert margs.ddp_config(layout=lay(dp=2), cpu=True).gradient_reduce_div_fusion  # DDP untouched
    assert "--use-megatron-fsdp" in margs._flags(kw)
    assert "--data-parallel-sharding-strategy optim_grads_params" in margs._flags(kw)
    assert "use_megatron_fsdp" not in margs._ddp_kwargs(lay(dp=2), None)
    with mock.patch.object(margs, "have_einops", lambda: True):
        assert config(layout=layout).num_layers == LLAMA_ISH.layers
        with pytest.raises(margs.UnsupportedPlan, match="one model chunk"):
            margs._check_fsdp(lay(dp=2, pp=2, distributed_optimizer=True, megatron_fsdp=True))
        # without Transformer Engine Megatron-Core's adapter cannot tag tensor-parallel weights (TypeError at build)
        from nemoc.runtime.model import have_transformer_engine

        assert margs.fsdp_tensor_parallel_builds() == have_transformer_engine()
        if not margs.fsdp_tensor_parallel_builds():
            with pytest.raises(margs.UnsupportedPlan, match=r"tensor\(2\): .*TELinear.*run it with tensor = 1"):
                margs._check_fsdp(lay(tp=2, dp=2, distributed_optimizer=True, megatron_fsdp=True))
        margs._check_fsdp(lay(dp=2, distributed_optimizer=True, megatron_fsdp=True))  # tensor = 1 builds anywhere
        # a shard group of one rank (E181): Megatron-Core 0.16.1 doubles the gradients there
        # (test_train_fsdp.py test_megatron_fsdp_doubles_gradients_at_a_shard_group_of_one_rank)
        with pytest.raises(margs.UnsupportedPlan, match=r"data\(1\) x context\(1\) = 1 rank to shard over: "
                                                        r".*use the distributed optimizer"):
            margs._check_fsdp(lay(dp=1, distributed_optimizer=True, megatron_fsdp=True))
        with pytest.raises(margs.UnsupportedPlan, match=r"experts' data-parallel group .* = 1 rank"):
            margs._check_fsdp(lay(dp=2, ep=2, distributed_optimizer=True, megatron_fsdp=True))
        margs._check_fsdp(lay(dp=1, cp=2, distributed_optimizer=True, megatron_fsdp=True))  # shards over DP x CP
    with mock.patch.object(margs, "have_einops", lambda: False):
        with pytest.raises(margs.UnsupportedPlan, match="needs the einops package"):
            config(layout=layout)


def _fake_te_fused_adam() -> dict:
    """sys.modules entries for a `transformer_engine` whose only content is a FusedAdam with TE's signature
    (transformer_engine/pytorch/optimizers/fused_adam.py): what Megatron-Core's OptimizerConfig checks for."""
    import types

    class FusedAdam:
        def __init__(self, params, master_weight_dtype=None, exp_avg_dtype=None, exp_avg_sq_dtype=None,
                     use_decoupled_grad=False):
            pass

    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.pytorch.optimizers = types.ModuleType("transformer_engine.pytorch.optimizers")
    te.pytorch.optimizers.FusedAdam = FusedAdam
    return {"transformer_engine": te, "transformer_engine.pytorch": te.pytorch,
            "transformer_engine.pytorch.optimizers": te.pytorch.optimizers}


def test_bf16_optimizer_state_reaches_megatron_cores_optimizer_config():
    """The plan's optimizer_state_dtype = bf16 sets Megatron-Core 0.16.1's precision-aware optimizer
    (bf16 exp_avg / exp_avg_sq, store_param_remainders at its default, on), which its OptimizerConfig
    accepts with Transformer Engine's FusedAdam (stood in here by a class with TE's signature) and refuses
    without it, as E191 and the runtime's own check do; fp32 sets nothing."""
    import sys

    from megatron.core.optimizer import OptimizerConfig

    sched, opt = ScheduleSpec(), OptimizerSpec()
    layout = lay(dp=2, distributed_optimizer=True, optimizer_state_dtype="bf16", precision_aware_optimizer=True)
    assert margs.precision_aware_optimizer_kwargs(lay(dp=2, distributed_optimizer=True)) == {}
    te_version = "megatron.core.optimizer.optimizer_config.is_te_min_version"
    with mock.patch(te_version, lambda *a, **k: False), \
            pytest.raises(RuntimeError, match="requires FusedAdam from TransformerEngine"):
        margs.optimizer_config(optimizer=opt, schedule=sched, layout=layout, precision="bf16")
    with pytest.raises(margs.UnsupportedPlan, match="needs Transformer Engine's FusedAdam"):
        margs._check_supported(model=LLAMA_ISH, layout=layout, precision="bf16", facts=CPU)

    with mock.patch.dict(sys.modules, _fake_te_fused_adam()), mock.patch(te_version, lambda *a, **k: True):
        oc = margs.optimizer_config(optimizer=opt, schedule=sched, layout=layout, precision="bf16")
    assert isinstance(oc, OptimizerConfig) and oc.use_precision_aware_optimizer
    assert oc.exp_avg_dtype is torch.bfloat16 and oc.exp_avg_sq_dtype is torch.bfloat16
    assert oc.main_params_dtype is torch.float32 and oc.store_param_remainders


def test_fp32_moment_precision_aware_optimizer_reaches_megatron_cores_optimizer_config():
    """precision_aware_optimizer = true with fp32 moments (Megatron-Bridge's bf16 Adam recipes): Megatron-Core
    0.16.1's OptimizerConfig with use_precision_aware_optimizer and fp32 exp_avg / exp_avg_sq, main params and
    grads fp32, accepted with Transformer Engine's FusedAdam (a class with TE's signature stands in) and refused
    without it, where the runtime refuses first with a message naming the fix."""
    import sys

    from megatron.core.optimizer import OptimizerConfig

    sched, opt = ScheduleSpec(), OptimizerSpec()
    layout = lay(dp=2, distributed_optimizer=True, precision_aware_optimizer=True)
    assert margs.precision_aware_optimizer_kwargs(layout) == dict(
        use_precision_aware_optimizer=True, exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32)
    te_version = "megatron.core.optimizer.optimizer_config.is_te_min_version"
    with mock.patch(te_version, lambda *a, **k: False), \
            pytest.raises(RuntimeError, match="requires FusedAdam from TransformerEngine"):
        margs.optimizer_config(optimizer=opt, schedule=sched, layout=layout, precision="bf16")
    with pytest.raises(margs.UnsupportedPlan, match=r"precision_aware_optimizer = true \(fp32 moments\) needs "
                                                    r"Transformer Engine's FusedAdam.*precision_aware_optimizer = false"):
        margs._check_supported(model=LLAMA_ISH, layout=layout, precision="bf16", facts=CPU)

    with mock.patch.dict(sys.modules, _fake_te_fused_adam()), mock.patch(te_version, lambda *a, **k: True):
        oc = margs.optimizer_config(optimizer=opt, schedule=sched, layout=layout, precision="bf16")
    assert isinstance(oc, OptimizerConfig) and oc.use_precision_aware_optimizer
    assert oc.exp_avg_dtype is torch.float32 and oc.exp_avg_sq_dtype is torch.float32
    assert oc.main_params_dtype is torch.float32 and oc.main_grads_dtype is torch.float32
    assert oc.use_precision_aware_optimizer_no_fp8_or_ds_fp8 and oc.store_param_remainders
    # the plan's FP8 recipe reaches OptimizerConfig (as Megatron-LM copies it): FusedAdam owns the master weight
    # with delayed scaling, Megatron-Core keeps it with current scaling, as memory.optimizer_bytes sizes them
    with mock.patch.dict(sys.modules, _fake_te_fused_adam()), mock.patch(te_version, lambda *a, **k: True):
        owned = {recipe: margs.optimizer_config(optimizer=opt, schedule=sched, layout=layout, precision="fp8",
                                                fp8_recipe=recipe).use_precision_aware_optimizer_no_fp8_or_ds_fp8
                 for recipe in ("delayed", "tensorwise")}
    assert owned == {"delayed": True, "tensorwise": False}
    # memory.optimizer_bytes sizes every precision as the runtime's OptimizerConfig runs it: FusedAdam owns the
    # master weight (2-byte remainder, no fp32 gradient copy) exactly where Megatron-Core says so -- nvfp4
    # included, whose recipe is no fp8_recipe (10 B per parameter with fp32 moments, not 12)
    from nemoc.compiler.memory import optimizer_bytes

    for precision, recipe in (("bf16", None), ("fp8", "delayed"), ("fp8", "tensorwise"), ("mxfp8", "mxfp8"),
                              ("nvfp4", None)):
        with mock.patch.dict(sys.modules, _fake_te_fused_adam()), mock.patch(te_version, lambda *a, **k: True):
            oc = margs.optimizer_config(optimizer=opt, schedule=sched, layout=layout, precision=precision,
                                        fp8_recipe=recipe)
        moment, master, copy = optimizer_bytes(layout, precision, recipe)
        runtime_owns = oc.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        assert (not copy, master == 2) == (runtime_owns, runtime_owns and oc.store_param_remainders and oc.bf16), \
            precision
    assert sum(optimizer_bytes(layout, "nvfp4", None)[:2]) + optimizer_bytes(layout, "nvfp4", None)[0] == 10


def test_bf16_optimizer_state_in_the_megatron_lm_command_line():
    """`nemoc export --megatron-args`: the same setting as Megatron-LM's flags."""
    import types

    stage = types.SimpleNamespace(optimizer=OptimizerSpec(), schedule=ScheduleSpec(), steps=10,
                                  layout=lay(dp=2, distributed_optimizer=True, optimizer_state_dtype="bf16",
                                             precision_aware_optimizer=True))
    flags = margs._lm_optimizer(stage)
    assert {"--use-precision-aware-optimizer", "--exp-avg-dtype bf16", "--exp-avg-sq-dtype bf16"} <= set(flags)
    stage.layout = lay(dp=2, distributed_optimizer=True, precision_aware_optimizer=True)
    assert {"--use-precision-aware-optimizer", "--exp-avg-dtype fp32", "--exp-avg-sq-dtype fp32"} <= set(
        margs._lm_optimizer(stage))
    stage.layout = lay(dp=2, distributed_optimizer=True)
    assert not any("precision-aware" in f for f in margs._lm_optimizer(stage))


def test_te_cross_entropy_under_a_whole_iteration_graph_needs_te_2_7():
    """Megatron-Core 0.16.1 calls TE's CUDA-graph-capturable loss under cuda_graph_scope = [full_iteration] and
    asserts TE >= 2.7.0 at the first step (language_module.py compute_language_model_loss): the runtime refuses
    a te plan there on an older TE before building anything, naming native; other scopes, or TE 2.7, pass."""
    from packaging.version import Version

    from nemoc.compiler.plan import HostExecution

    fusions = make_execution(LLAMA_ISH, lay(), kernels="te").fusions
    assert fusions.cross_entropy == "te"
    whole = HostExecution("local", ("full_iteration",), False, 0)
    layers = HostExecution("transformer_engine", ("attn",), False, 0)
    for version, refused in (("2.6.0", True), ("2.7.0", False)):
        with mock.patch(_TE_CROSS_ENTROPY, lambda *a, **k: None), \
                mock.patch("megatron.core.utils.get_te_version", lambda: Version(version)):
            if refused:
                with pytest.raises(margs.UnsupportedPlan, match=r"needs Transformer Engine >= 2.7.*native"):
                    margs._check_cross_entropy(fusions, GPU_TE, whole)
            else:
                margs._check_cross_entropy(fusions, GPU_TE, whole)
            margs._check_cross_entropy(fusions, GPU_TE, layers)  # no whole-iteration graph: any TE with the loss


def test_mxfp8_parameters_reuse_the_gradient_buffer_in_megatron_cores_configs():
    """The plan's `reuse_grad_buf_for_mxfp8_param_ag` (precision mxfp8 with fp8_param_gather:
    compiler/execution.py `reuses_grad_buffer`) reaches Megatron-Core 0.16.1's DistributedDataParallelConfig
    and OptimizerConfig, which accept it with fp8_param_gather and refuse it without (the DDP config's own
    check); `nemoc export --megatron-args` writes the flag."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from nemoc.compiler.execution import reuses_grad_buffer

    fp8p = lay(dp=2, distributed_optimizer=True, fp8_param_gather=True)
    assert reuses_grad_buffer("mxfp8", fp8p)
    assert not reuses_grad_buffer("fp8", fp8p) and not reuses_grad_buffer("mxfp8", lay(dp=2, distributed_optimizer=True))
    ddp = margs.ddp_config(layout=fp8p, reuse_grad_buf=True)
    assert isinstance(ddp, DistributedDataParallelConfig) and ddp.reuse_grad_buf_for_mxfp8_param_ag
    assert not margs.ddp_config(layout=fp8p).reuse_grad_buf_for_mxfp8_param_ag
    with pytest.raises(AssertionError, match="Reuse grad buffer only when keeping params in MXFP8"):
        DistributedDataParallelConfig(**margs._ddp_kwargs(lay(dp=2, distributed_optimizer=True), None, True))
    oc = margs.optimizer_config(optimizer=OptimizerSpec(), schedule=ScheduleSpec(), layout=fp8p, precision="mxfp8",
                                reuse_grad_buf=True)
    assert oc.reuse_grad_buf_for_mxfp8_param_ag
    assert "--reuse-grad-buf-for-mxfp8-param-ag" in margs._flags(margs._ddp_kwargs(fp8p, None, True))


def test_bf16_layers_reach_megatron_cores_transformer_config():
    """The plan's bf16 first / last layers (`Execution.bf16_first_layers`, `bf16_last_layers`) become
    TransformerConfig's first_last_layers_bf16 and counts, which Megatron-Core 0.16.1 accepts under fp8
    (tensorwise) and refuses as the rules do: with delayed scaling (E185) and beyond layers // pp (E186);
    `nemoc export --megatron-args` writes the flags. Nothing without them."""
    import types

    from megatron.core.transformer.transformer_config import TransformerConfig

    execution = types.SimpleNamespace(bf16_first_layers=1, bf16_last_layers=2)
    kw = margs.bf16_layer_kwargs(execution)
    assert kw == dict(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=2)
    assert margs.bf16_layer_kwargs(types.SimpleNamespace(bf16_first_layers=0, bf16_last_layers=0)) == {}
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4)
    c = TransformerConfig(**base, **kw, **margs._fp8_kwargs("fp8", "tensorwise"))
    assert c.first_last_layers_bf16 and (c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16) == (1, 2)
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer in BF16"):
        TransformerConfig(**base, **kw, **margs._fp8_kwargs("fp8", "delayed"))
    with pytest.raises(ValueError, match="num_layers_at_end_in_bf16 \\(3\\) must be between 0 and"):
        TransformerConfig(**base, **margs.bf16_layer_kwargs(types.SimpleNamespace(bf16_first_layers=0,
                                                                                   bf16_last_layers=3)),
                          pipeline_model_parallel_size=2, pipeline_dtype=torch.bfloat16,
                          **margs._fp8_kwargs("fp8", "tensorwise"))
    assert {"--first-last-layers-bf16", "--num-layers-at-start-in-bf16 1", "--num-layers-at-end-in-bf16 2"} <= set(
        margs._flags(kw))
