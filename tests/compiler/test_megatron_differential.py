"""Differential test: every layout nemoc accepts, Megatron-Core 0.16.1 accepts.

For random small experiments (dense and MoE models, GQA/MHA/MQA, every cluster kind, precision,
attention backend, kernels, stage kind, optimizer, fixed or auto parallel settings) nemoc's own
planner (`rules.check_spec`, then `planner.plan_stage`, which runs `search.search`) picks a layout
and its runner-ups. For each of them this test builds exactly what the runtime builds from the plan
(`runtime/megatron_args`: TransformerConfig, DistributedDataParallelConfig, OptimizerConfig, the
scheduler kwargs) and runs Megatron-Core's pure-Python parallel checks on it:

* `parallel_state.initialize_model_parallel`'s arithmetic (world % (tp*pp*cp), vp needs pp > 1,
  world % (etp*ep*pp), the pp groups of the dense and the expert grid equal) with its own
  `RankGenerator`s (order tp-cp-ep-dp-pp);
* `ConstantNumMicroBatchesCalculator` (global batch = micro batch x dp x microbatches);
* `schedules.forward_backward_pipelining_with_interleaving`'s preconditions on num_microbatches;
* `transformer_block.get_num_layers_to_build` for every pipeline rank and virtual stage;
* the `divide()` calls the model's layers make (attention heads / query groups per TP rank, the
  QKV / proj / fc1 / fc2 / expert / shared-expert / vocabulary splits), the experts per EP rank,
  the sequence-parallel split;
* the runtime's own refusals (`UnsupportedPlan`; for alignment stages runtime/align's checks).

Memory never decides (the GPU gets 1 PB of HBM): this test is about layout rules. Each failure is a
missing nemoc rule or an adapter bug. The converse is checked for rules that mirror one Megatron
check 1:1 (E102, E109, E114, E142, E116 on a dense model): when `nemoc check` reports them, Megatron
raises too.

What it found (each now a rule, with a unit test at the end of this file): E141 (runtime/align builds
dense models only), E142 (rope with an odd head dimension fails in the first forward pass), E116 for
dense models (Megatron builds the expert grid with a fixed `expert_tensor` even without experts).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import replace
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron.core.num_microbatches_calculator import ConstantNumMicroBatchesCalculator  # noqa: E402
from megatron.core.parallel_state import RankGenerator  # noqa: E402
from megatron.core.transformer.transformer_block import get_num_layers_to_build  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.utils import divide  # noqa: E402

from nemoc.compiler.catalog.hardware import get_gpu  # noqa: E402
from nemoc.compiler.execution import moe_execution, stage_execution  # noqa: E402
from nemoc.compiler.plan import Layout  # noqa: E402
from nemoc.compiler.planner import plan_stage  # noqa: E402
from nemoc.compiler.rules import check_spec, pipeline_split  # noqa: E402
from nemoc.compiler.spec import (  # noqa: E402
    ClusterSpec,
    ExperimentSpec,
    ModelSpec,
    OptimizerSpec,
    ParallelSpec,
    StageSpec,
    resolve_kernels,
)
from nemoc.dsl.diagnostics import DiagnosticError  # noqa: E402
from nemoc.runtime import megatron_args as margs  # noqa: E402
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

ORDER = "tp-cp-ep-dp-pp"  # initialize_model_parallel's default order, which the runtime keeps
HUGE_HBM = 10**15


# ------------------------------------------------------------------------------------- strategies


@st.composite
def experiments(draw) -> ExperimentSpec:
    """Mostly settings the rules should accept (auto sizes, a precision the GPU has, dense models in
    alignment stages), and now and then anything the language can express."""
    wild = draw(st.integers(0, 4)) == 0  # one in five: no care to stay valid
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    divisors = [g for g in range(1, heads + 1) if heads % g == 0]
    groups = draw(st.sampled_from(divisors + [heads, heads, 1]))
    head_dim = draw(st.sampled_from([8, 9, 12, 16, 24, 25, 32, 40, 64, 96, 128, 160, 320]))
    if draw(st.integers(0, 4)) == 0:  # an explicit kv_channels: hidden need not be heads x head_dim
        kv_channels, hidden = head_dim, draw(st.sampled_from([64, 96, 128, 192, 256, 320]))
    else:
        kv_channels, hidden = None, heads * head_dim
    kind = draw(st.sampled_from(["pretrain"] * 6 + ["sft", "dpo"]))
    experts = draw(st.sampled_from([0, 0, 2, 4, 6, 8, 16, 32])) if kind == "pretrain" or wild else 0
    moe = dict(experts=experts)
    if experts:
        moe.update(top_k=draw(st.integers(1, min(experts, 4))),
                   moe_ffn_hidden=draw(st.sampled_from([None, 48, 64, 96, 100, 128])),
                   shared_expert_ffn_hidden=draw(st.sampled_from([0, 0, 64, 96, 100])))
        # token dropping and the router (E143-E148 mirror Megatron's checks of these): mostly valid, now
        # and then not (padding without a capacity, the overlap without a shared expert, Sinkhorn + capacity)
        rarely = [False] * 7 + [True]
        capacity = draw(st.sampled_from([None, None, None, 1.0, 1.5]))
        moe.update(moe_capacity_factor=capacity,
                   moe_pad_to_capacity=draw(st.sampled_from([False, True] if capacity else rarely)),
                   moe_load_balancing=draw(st.sampled_from(["aux_loss"] * 4 + ["seq_aux_loss", "none", "sinkhorn"])),
                   moe_aux_loss_coeff=draw(st.sampled_from([1e-2, 1e-2, 1e-3, 0.0])),
                   moe_shared_expert_overlap=draw(st.sampled_from([False, True] if moe["shared_expert_ffn_hidden"]
                                                                  else rarely)),
                   moe_router_score=draw(st.sampled_from(["softmax", "softmax", "sigmoid"])),
                   moe_expert_bias=draw(st.sampled_from(rarely)),
                   moe_router_groups=draw(st.sampled_from([0] * 6 + [2, 3])),
                   # dense layers among the expert layers (TransformerConfig moe_layer_freq: int or 0 / 1 list)
                   moe_layer_freq=draw(st.sampled_from([1, 1, 1, 2])),
                   moe_first_dense_layers=draw(st.sampled_from([0, 0, 0, 1])))
        if moe["moe_router_groups"] or draw(st.sampled_from(rarely)):
            moe["moe_router_group_topk"] = draw(st.sampled_from([1, 1, 2, 4, 0]))
    mla = {}
    if draw(st.integers(0, 5)) == 0:  # multi-latent attention (MLATransformerConfig): its own head dimensions
        mla = dict(multi_latent_attention=True, q_lora_rank=draw(st.sampled_from([0, 16, 24, 33])),
                   kv_lora_rank=draw(st.sampled_from([16, 32, 31])), qk_head_dim=draw(st.sampled_from([8, 16])),
                   qk_pos_emb_head_dim=draw(st.sampled_from([4, 8, 8, 7])),
                   v_head_dim=draw(st.sampled_from([8, 12, 16])), rope_type=draw(st.sampled_from(["rope", "yarn"])),
                   rope_scaling_factor=draw(st.sampled_from([1.0, 4.0])))
        if not wild:
            groups, kv_channels = heads, None
    model = ModelSpec(
        name="rand", layers=draw(st.integers(1, 16)), hidden=hidden, heads=heads, query_groups=groups,
        kv_channels=kv_channels, **mla,
        ffn_hidden=draw(st.sampled_from([hidden * 4, hidden * 2, hidden * 3, 96, 100, 344, 512])),
        vocab=draw(st.sampled_from([1000, 32000, 50257])),
        seq_length=draw(st.sampled_from([256, 512, 1024, 2048])),
        activation=draw(st.sampled_from(["swiglu", "swiglu", "gelu", "relu", "squared_relu"])),
        norm=draw(st.sampled_from(["rmsnorm", "layernorm"])),
        position=draw(st.sampled_from(["rope", "rope", "learned", "none"])),
        tie_embeddings=draw(st.booleans()),
        add_bias_linear=draw(st.sampled_from([False, False, True])) if wild or not experts else False,
        add_qkv_bias=draw(st.booleans()),
        qk_layernorm=draw(st.booleans()),
        **moe,
    )
    gpu_id = draw(st.sampled_from(["H100", "H100", "B200", "GB200", "A100-80GB", "CPU"]))
    gpu = get_gpu(gpu_id)
    gpn = draw(st.sampled_from([1, 2, 4, 8]))
    cluster = ClusterSpec(gpu=gpu_id, nodes=draw(st.sampled_from([1, 1, 2, 3, 4] if gpn <= 4 else [1, 1, 2])),
                          gpus_per_node=gpn)
    precisions = ["bf16", "bf16", "fp16", "fp32", "fp8", "fp8", "mxfp8", "nvfp4"]
    if not wild:
        precisions = [p for p in precisions
                      if gpu.supports(p) and (kind == "pretrain" or p not in ("fp8", "mxfp8", "nvfp4"))]
    precision = draw(st.sampled_from(precisions))
    kernels = draw(st.sampled_from(["auto", "auto", "te", "local"] if wild or gpu_id != "CPU" else ["auto", "local"]))
    fixed = 1 if wild else 6  # auto weight per field

    def maybe(*values):
        return draw(st.sampled_from([None] * fixed + list(values)))

    pipelined = kind == "pretrain" or wild
    parallel = ParallelSpec(
        tensor=maybe(1, 2, 4), pipeline=maybe(1, 2, 3, 4) if pipelined else None,
        virtual_pipeline=maybe(2, 3) if pipelined else None,
        context=draw(st.sampled_from([1, 1, 1, None, 2] if wild or kind == "pretrain" else [1])),
        expert=maybe(1, 2, 4) if experts or wild else 1, expert_tensor=maybe(1, 2),
        data=maybe(1, 2) if wild else None, sequence_parallel=maybe(True, False),
        distributed_optimizer=maybe(True, False), recompute=maybe("none", "selective", "full"),
        recompute_layers=maybe(1, 2),
        recompute_modules=maybe(("core_attn",), ("mlp", "layernorm"), ("core_attn", "mlp"), ("moe",), ("moe_act",),
                                ("shared_experts", "layernorm"), ("moe", "moe_act")),
        fp8_param_gather=draw(st.sampled_from([False, False, True])),
        overlap_param_gather=draw(st.sampled_from([False, False, True])),
        micro_batch=maybe(1, 2, 3),
    )
    seq = draw(st.sampled_from([None, None, 128, 250, 256, 512, 1000]))
    stage = StageSpec(name="s", kind=kind, global_batch=draw(st.sampled_from([None, 1, 4, 8, 12, 16, 32, 64])),
                      seq_length=min(seq, model.seq_length) if seq else None, steps=10,
                      optimizer=OptimizerSpec(name=draw(st.sampled_from(["adam", "adam", "sgd"]))))
    moe_settings = {}
    if experts or wild:  # the MoE layer's dispatcher and kernels (None: auto)
        moe_settings = dict(moe_dispatcher=draw(st.sampled_from([None, None, "alltoall", "allgather", "flex"])),
                            moe_grouped_gemm=draw(st.sampled_from([None, None, True, False])),
                            moe_permute_fusion=draw(st.sampled_from([None, None, True, False])))
    scopes = [(), (), ("attn",), ("attn", "mlp"), ("full_iteration",), ("moe_router",),
              ("attn", "moe_router", "moe_preprocess"), ("moe_preprocess",), ("moe",)]
    host_settings = dict(cuda_graph_impl=draw(st.sampled_from([None, None, "none", "local", "transformer_engine"])),
                         cuda_graph_scope=draw(st.sampled_from(scopes)),
                         manual_gc=draw(st.sampled_from([None, None, True, False])),
                         manual_gc_interval=draw(st.sampled_from([None, None, 0, 10])))
    return ExperimentSpec(
        name="diff", model=model, cluster=cluster, parallel=parallel, precision=precision,
        attention_backend=draw(st.sampled_from(["auto", "auto", "flash", "fused", "unfused"])),
        kernels=kernels, stages=(stage,), **moe_settings, **host_settings,
    )


# ---------------------------------------------------------------------- what Megatron would check


def megatron_parallel_state(world: int, layout) -> None:
    """The arithmetic of parallel_state.initialize_model_parallel (core/parallel_state.py, 0.16.1,
    lines ~711-790) for the sizes `margs.parallel_kwargs` passes, with Megatron's RankGenerator."""
    kw = margs.parallel_kwargs(layout=layout)
    tp, pp, cp = kw["tensor_model_parallel_size"], kw["pipeline_model_parallel_size"], kw["context_parallel_size"]
    vp, ep, etp = (kw["virtual_pipeline_model_parallel_size"], kw["expert_model_parallel_size"],
                   kw["expert_tensor_parallel_size"])
    model_size = tp * pp * cp
    if world % model_size != 0:
        raise RuntimeError(f"world_size ({world}) is not divisible by {model_size}")
    dp = world // model_size
    if vp is not None and not pp > 1:
        raise RuntimeError("pipeline-model-parallel size should be greater than 1 with interleaved schedule")
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=ORDER, rank_offset=0)
    if etp is None:
        etp = tp
    if world % (etp * ep * pp) != 0:
        raise RuntimeError(f"world_size ({world}) is not divisible by expert_tensor_model_pipeline_parallel size "
                           f"({etp * ep * pp})")
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order=ORDER, rank_offset=0)
    assert dense.get_ranks("pp") == expert.get_ranks("pp"), "pipeline groups differ between the dense and expert grids"
    for token in ("tp", "cp", "dp", "dp-cp", "tp-pp"):
        groups = dense.get_ranks(token)
        assert sorted(r for g in groups for r in g) == list(range(world)), token
    for token in ("tp", "ep", "dp"):
        groups = expert.get_ranks(token)
        assert sorted(r for g in groups for r in g) == list(range(world)), token
    assert dp == layout.dp, (dp, layout.dp)


def megatron_interleaving(config, num_microbatches: int) -> None:
    """core/pipeline_parallel/schedules.py forward_backward_pipelining_with_interleaving (0.16.1,
    lines 921-1015): the p2p flags and the micro-batch group checks, with pp from the config."""
    if config.overlap_p2p_comm and config.batch_p2p_comm:
        raise ValueError("Can not use both overlap_p2p_comm and batch_p2p_comm")
    pp = config.pipeline_model_parallel_size
    group = config.microbatch_group_size_per_vp_stage
    if group > num_microbatches or group < pp:
        raise ValueError(f"microbatch group {group} not in [PP={pp}, M={num_microbatches}]")
    final = num_microbatches % group
    if 0 < final < pp:
        raise RuntimeError(f"final micro-batch group {final} < pp {pp}")


def megatron_rope(model: ModelSpec, config) -> None:
    """Rotary embeddings as GPTModel builds them (rotary_pos_embedding.py RotaryEmbedding with
    kv_channels, rotary_percent 1.0: 2 * ceil(d / 2) frequencies) applied to one head the way the
    unfused path does (rope_utils.py _apply_rotary_pos_emb_bshd: t * cos + rotate_half(t) * sin)."""
    if model.position != "rope":
        return
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    with mock.patch("torch.cuda.current_device", lambda: "cpu"):  # get_emb moves inv_freq to the GPU
        rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                               rotary_base=int(model.rotary_base), use_cpu_initialization=True)
        emb = rope.get_emb(4)
    _apply_rotary_pos_emb_bshd(torch.zeros(4, 1, 1, config.kv_channels), emb)


def megatron_layer_splits(config, layout, seq: int, padded_vocab: int, local_attention: bool) -> None:
    """The divide() calls the model's layers make (core/utils.py divide asserts divisibility):
    attention.py Attention.__init__ (lines 285-303), ColumnParallelLinear (layers.py 842) for the
    fused QKV and fc1, RowParallelLinear (layers.py 1166) for proj and fc2, the MoE layer's experts
    per EP rank (moe_layer.py 101), the expert MLPs over the expert-TP group (experts.py 133-136, and
    SequentialMLP's MLP), the shared expert over TP, the vocabulary over TP (VocabParallelEmbedding),
    the sequence-parallel split (mappings.py _split_along_first_dim)."""
    tp, heads, groups = layout.tp, config.num_attention_heads, config.num_query_groups
    query_projection = config.kv_channels * heads
    kv_projection = config.kv_channels * groups
    divide(query_projection, heads)
    if groups < tp:
        divide(heads, groups)
    else:
        divide(groups, tp)
        divide(heads, tp)
    # get_query_key_value_tensors: [sq, b, ng, (np/ng + 2) * hn]
    divide(heads, groups)
    if local_attention:
        # the local core (Megatron's DotProductAttention, or nemoc's SDPAttention, its subclass) is
        # built with num_query_groups = tp when the groups are fewer (attention.py 310-315);
        # dot_product_attention.py 78-81 divides the projection, the heads and the groups over TP
        divide(query_projection, tp)
        divide(heads, tp)
        divide(max(groups, tp), tp)
    divide(query_projection + 2 * kv_projection, tp)  # linear_qkv
    divide(query_projection, tp)  # linear_proj
    glu = 2 if config.gated_linear_unit else 1
    if config.num_moe_experts:
        local = divide(config.num_moe_experts, layout.ep)
        assert local > 0
        divide(config.moe_ffn_hidden_size * glu, layout.etp)  # SequentialMLP: one MLP per expert
        divide(config.moe_ffn_hidden_size, layout.etp)
        divide(config.moe_ffn_hidden_size * local * glu, layout.etp)  # experts.py (grouped)
        if config.moe_shared_expert_intermediate_size:
            divide(config.moe_shared_expert_intermediate_size * glu, tp)
            divide(config.moe_shared_expert_intermediate_size, tp)
        assert 1 <= config.moe_router_topk <= config.num_moe_experts
    else:
        divide(config.ffn_hidden_size * glu, tp)
        divide(config.ffn_hidden_size, tp)
    divide(padded_vocab, tp)
    if config.sequence_parallel:
        divide(divide(seq, layout.cp), tp)


def _te_present():
    """Transformer Engine is not installed here: TransformerConfig's TE version gates (MoE with fp8,
    transformer_config.py ~1599) see a current TE, and its apply_rope_fusion check finds TE's fused
    RoPE, as on the machines the te path runs on."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("megatron.core.transformer.transformer_config.is_te_min_version",
                                   lambda *a, **k: True))
    stack.enter_context(mock.patch("megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb",
                                   lambda *a, **k: None))
    # TE's fused MoE permutation kernels (moe_utils.py imports them from TE >= 2.1; TransformerConfig
    # checks they exist when moe_permute_fusion is on) and DeepEP (the flex dispatcher's kernels)
    for name in ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                 "fused_sort_chunks_by_index_with_probs", "fused_unpermute"):
        stack.enter_context(mock.patch(f"megatron.core.transformer.moe.moe_utils.{name}", lambda *a, **k: None,
                                       create=True))
    stack.enter_context(mock.patch.object(margs, "have_deep_ep", lambda: True))
    # TE's fused vocab-parallel cross entropy (GPTModel's loss with cross_entropy_fusion_impl = "te")
    stack.enter_context(mock.patch("megatron.core.models.common.language_module.language_module."
                                   "te_parallel_cross_entropy", lambda *a, **k: None))
    return stack


def megatron_lm_param_gather(ddp, optimizer, layout) -> None:
    """Megatron-LM's checks of the overlapped parameter all-gather (megatron/training/arguments.py
    validate_args), which Megatron-Core's configs do not repeat: `--overlap-param-gather` needs the
    distributed optimizer (or Megatron-FSDP) and `--overlap-grad-reduce`; `align_param_gather` is turned
    off without the interleaved schedule; the optimizer's copy of the flag equals the DDP config's."""
    if ddp.overlap_param_gather:
        assert ddp.use_distributed_optimizer or ddp.use_megatron_fsdp, ddp
        assert ddp.overlap_grad_reduce, ddp
    if ddp.align_param_gather:
        assert ddp.overlap_param_gather and layout.pp > 1 and (layout.vp or 1) > 1, (ddp, layout)
    assert optimizer.overlap_param_gather == ddp.overlap_param_gather, (optimizer, ddp)
    assert not optimizer.overlap_param_gather_with_optimizer_step  # needs a non-dist checkpoint (see docs)


def check_layout(spec: ExperimentSpec, stage: StageSpec, kernels: str, seq: int, layout, execution) -> None:
    """Build what the runtime builds for `layout` and run Megatron-Core's checks on it."""
    model = spec.model
    world = spec.cluster.world_size
    cpu = spec.cluster.gpu == "CPU"
    # every stage kind builds through the training core (runtime/core/build.py) from the plan's Execution
    choice = margs.choose_kernels(planned=kernels, te_importable=True, cpu=cpu)
    facts = margs.MachineFacts(cpu=cpu, have_te=choice.use_te)
    # CUDA graphs and NVFP4 are checked against this machine (CUDA, a Blackwell GPU) before the build:
    # here Megatron-Core's own checks of the fields decide (E173 / E174 / E121 mirror them)
    with _te_present() if facts.have_te else contextlib.nullcontext(), \
            mock.patch.object(margs, "_check_cuda_graphs", lambda *a: None), \
            mock.patch.object(margs, "_check_nvfp4", lambda *a: None):
        config = margs.transformer_config(model=model, layout=layout, execution=execution, facts=facts)
    if not facts.have_te and config.context_parallel_size > 1:
        # the local spec splits a sequence only on nemoc's SDPA core (runtime/model.py SDPAttention gathers
        # the CP group's keys and values); Megatron's DotProductAttention (unfused) asserts cp == 1 (E113)
        assert execution.attention != "unfused", execution
        assert not model.sliding_window, model  # the SDPA core's window is not split over CP (E113)
    ddp = margs.ddp_config(layout=layout, overlaps=execution.overlaps, cpu=cpu)
    optimizer = margs.optimizer_config(optimizer=stage.optimizer, schedule=stage.schedule, layout=layout,
                                       precision=spec.precision, overlap_param_gather=ddp.overlap_param_gather)
    megatron_lm_param_gather(ddp, optimizer, layout)
    margs.scheduler_kwargs(optimizer=stage.optimizer, schedule=stage.schedule, steps=10)

    megatron_parallel_state(world, layout)
    calc = ConstantNumMicroBatchesCalculator(layout.global_batch, layout.micro_batch, layout.dp,
                                             decrease_batch_size_if_needed=False, rank=1)
    assert calc.get() == layout.num_microbatches
    if layout.vp is not None:
        megatron_interleaving(config, calc.get())
    per_stage = [sum(get_num_layers_to_build(config, vp_stage=v if layout.vp else None, pp_rank=r)
                     for v in range(layout.vp or 1)) for r in range(layout.pp)]
    assert sum(per_stage) == model.layers, per_stage
    split = pipeline_split(model.layers, layout.pp, layout.vp)
    assert split is not None and max(per_stage) == split.max_layers, (per_stage, split)
    megatron_rope(model, config)
    megatron_layer_splits(config, layout, seq, margs.padded_vocab_size(model.vocab, layout.tp),
                          local_attention=not facts.have_te)
    if model.is_moe:  # Megatron's per-layer specs from moe_layer_freq (its length and 0 / 1 checks) = the plan's
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

        specs = get_gpt_decoder_layer_specs(config, use_transformer_engine=False)
        assert tuple(int(sp.submodules.mlp.module.__name__ == "MoELayer") for sp in specs) == model.moe_layer_pattern


# ------------------------------------------------------------------------------- converse checks


def _fixed_config(spec: ExperimentSpec, **override):
    """A TransformerConfig with the model's sizes and the user's fixed parallel sizes (auto -> 1)."""
    m, p = spec.model, spec.parallel
    kw = dict(num_layers=m.layers, hidden_size=m.hidden, num_attention_heads=m.heads, num_query_groups=m.query_groups,
              kv_channels=m.head_dim, ffn_hidden_size=m.ffn_hidden, tensor_model_parallel_size=p.tensor or 1,
              expert_model_parallel_size=p.expert or 1, sequence_parallel=bool(p.sequence_parallel),
              pipeline_dtype=torch.bfloat16)
    if m.is_moe:
        kw.update(num_moe_experts=m.experts, moe_router_topk=m.top_k, moe_ffn_hidden_size=m.moe_ffn_hidden or m.ffn_hidden,
                  moe_router_pre_softmax=m.top_k == 1)
    kw.update(override)
    return TransformerConfig(**kw)


def _rope_of(spec: ExperimentSpec) -> None:
    m = spec.model
    megatron_rope(m, _fixed_config(spec, tensor_model_parallel_size=1, sequence_parallel=False,
                                   expert_model_parallel_size=1, num_query_groups=m.heads, kv_channels=m.head_dim))


def _grid_of(spec: ExperimentSpec) -> None:
    """initialize_model_parallel's expert-grid check with the fixed sizes (auto pp -> 1, ep -> 1)."""
    p = spec.parallel
    etp, ep, pp = p.expert_tensor, p.expert or 1, p.pipeline or 1
    if spec.cluster.world_size % (etp * ep * pp):
        raise RuntimeError("world_size is not divisible by expert_tensor_model_pipeline_parallel size "
                           "(parallel_state.py initialize_model_parallel)")


CONVERSE = {
    # code: (what to build, the message Megatron raises with). E102 heads % tp (transformer_config.py
    # 924), E109 SP without TP (model_parallel_config.py 411), E114 EP on a dense model
    # (transformer_config.py 1049), E142 rope on an odd head dimension (rope_utils.py
    # _apply_rotary_pos_emb_bshd); E116 on a dense model with a fixed expert_tensor (parallel_state.py) below
    "E102": (lambda spec: _fixed_config(spec, sequence_parallel=False, expert_model_parallel_size=1),
             "must be a multiple of tensor_model_parallel_size"),
    "E109": (lambda spec: _fixed_config(spec, tensor_model_parallel_size=1, expert_model_parallel_size=1),
             "Cannot use sequence parallelism without tensor parallelism"),
    "E114": (lambda spec: _fixed_config(spec, tensor_model_parallel_size=1, sequence_parallel=False),
             "num_moe_experts must be non None to use expert-parallel"),
    "E142": (_rope_of, "must match the size of tensor"),
    # E143-E146: transformer_config.py __post_init__'s MoE token-dropping and shared-expert checks, each
    # built with the fields it reads only (Megatron checks flex + padding before the others)
    "E143": (lambda spec: _moe_config(spec, moe_pad_expert_input_to_capacity=True),
             "moe_expert_capacity_factor must be set"),
    # E144 and E156 also mirror checks of the router's first forward (`_route`), after the config's
    "E144": (lambda spec: (_moe_config(spec, moe_expert_capacity_factor=spec.model.moe_capacity_factor,
                                       moe_router_load_balancing_type=spec.model.moe_load_balancing),
                          _route(spec, groups=False)),
             "moe_expert_capacity_factor only works with aux_loss|Sinkhorn routing does not support aux loss"),
    "E145": (lambda spec: _moe_config(spec, moe_token_dispatcher_type=spec.moe_dispatcher,
                                      moe_shared_expert_intermediate_size=spec.model.shared_expert_ffn_hidden,
                                      moe_shared_expert_overlap=True),
             "moe_shared_expert_overlap only works with alltoall"),
    "E146": (lambda spec: _moe_config(spec, moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="deepep",
                                      moe_expert_capacity_factor=spec.model.moe_capacity_factor,
                                      moe_pad_expert_input_to_capacity=True),
             "does not support moe_pad_expert_input_to_capacity"),
    "E149": (lambda spec: _moe_config(spec, moe_router_enable_expert_bias=True,
                                      moe_router_score_function=spec.model.moe_router_score),
             "only supports sigmoid score function"),
    # (E156 for groups without a group top-k is nemoc's own: Megatron ignores the groups; see converse)
    "E156": (lambda spec: (_moe_config(spec, moe_router_num_groups=spec.model.moe_router_groups or None,
                                       moe_router_group_topk=spec.model.moe_router_group_topk),
                          _route(spec, sinkhorn=False)),
             "moe_router_num_groups must be specified|should be divisible|should be smaller|"
             "selected index k out of range|a masked expert"),
}


def _route(spec: ExperimentSpec, *, sinkhorn: bool = True, groups: bool = True) -> None:
    """The router's first forward on random logits, through Megatron-Core's own functions: Sinkhorn
    routing (router.py `TopKRouter.sinkhorn_load_balancing`, which asserts moe_aux_loss_coeff == 0) and
    group-limited top-k (moe_utils.py `group_limited_topk`: a RuntimeError where a group holds fewer than
    top_k // group_topk experts; a masked (-inf) expert chosen where the chosen groups hold fewer than top_k,
    raised here as an error: the token would be routed to an expert outside its groups with weight 0)."""
    import torch
    from types import SimpleNamespace

    from megatron.core.transformer.moe.moe_utils import group_limited_topk
    from megatron.core.transformer.moe.router import TopKRouter

    m = spec.model
    if not m.is_moe:
        return
    logits = torch.randn(16, m.experts)
    if sinkhorn and m.moe_load_balancing == "sinkhorn":
        router = SimpleNamespace(config=SimpleNamespace(moe_aux_loss_coeff=m.moe_aux_loss_coeff), topk=m.top_k,
                                 training=True)
        TopKRouter.sinkhorn_load_balancing(router, logits)
    if groups and m.moe_router_group_topk:
        probs, _ = group_limited_topk(logits.softmax(-1), m.top_k, 16, m.experts, m.moe_router_groups,
                                      m.moe_router_group_topk)
        if torch.isinf(probs).any():
            raise RuntimeError("group_limited_topk chose a masked expert")


def _moe_config(spec: ExperimentSpec, **override):
    """A config of the model's sizes (tp, ep, sp 1 / off: no other check fires) with the MoE fields given."""
    return _fixed_config(spec, tensor_model_parallel_size=1, sequence_parallel=False, expert_model_parallel_size=1,
                         **override)


def converse(spec: ExperimentSpec, codes: set[str]) -> None:
    """A spec nemoc rejects with a code that mirrors one Megatron check: Megatron raises that check."""
    for code in sorted(codes & set(CONVERSE)):
        if code == "E156" and not spec.model.moe_router_group_topk:
            continue  # groups without a group top-k: Megatron-Core routes as if there were none
        build, message = CONVERSE[code]
        event(f"converse {code}")
        with pytest.raises((ValueError, AssertionError, RuntimeError), match=message):
            build(spec)
    if "E116" in codes and not spec.model.is_moe and spec.parallel.pipeline is not None:
        with pytest.raises(RuntimeError, match="expert_tensor_model_pipeline_parallel"):
            _grid_of(spec)


# ------------------------------------------------------------------------------------------ tests


STATS: dict[str, int] = {}


def run_case(spec: ExperimentSpec, top: int = 4) -> None:
    diagnostics = check_spec(spec, target=NEMOC_RUNTIME)
    errors = {d.code for d in diagnostics if d.is_error}
    if errors:
        STATS["rejected by check"] = STATS.get("rejected by check", 0) + 1
        event("nemoc check rejects")
        converse(spec, errors)
        return
    stage = spec.stages[0]
    gpu = replace(get_gpu(spec.cluster.gpu), hbm_bytes=HUGE_HBM)
    try:
        result, stage_plan, _ = plan_stage(spec, stage, gpu, spec.attention_backend, 0.1, top, NEMOC_RUNTIME)
    except DiagnosticError as e:
        codes = {d.code for d in e.diagnostics}
        assert "E130" not in codes, "memory must never decide here"
        STATS["no valid layout"] = STATS.get("no valid layout", 0) + 1
        event("the search finds no valid layout")
        return
    STATS["planned"] = STATS.get("planned", 0) + 1
    try:
        _route(spec)
    except Exception as exc:  # noqa: BLE001 - report what Megatron's router raised
        raise AssertionError(f"nemoc accepted, Megatron-Core's router refused: {type(exc).__name__}: {exc}\n"
                             f"  spec.model={spec.model}") from exc
    event(f"planned ({stage.kind}, {'moe' if spec.model.is_moe else 'dense'}, {stage_plan.kernels})")
    layouts = [(stage_plan.layout, stage_plan.execution)]
    layouts += [(c.layout, stage_execution(
        model=spec.model, gpu=spec.cluster.gpu, layout=c.layout, split=c.split, stage_kind=stage.kind,
        precision=spec.precision, attention_backend=spec.attention_backend, kernels=resolve_kernels(spec.kernels,
        spec.cluster.gpu), seq_length=stage_plan.seq_length, target=NEMOC_RUNTIME,
        moe=moe_execution(spec.model, stage_plan.kernels, c.layout.ep, spec.moe_dispatcher, spec.moe_grouped_gemm,
                          spec.moe_permute_fusion), host=stage_plan.execution.host)) for c in result.runner_ups]
    for layout, params in layouts:
        STATS["layouts"] = STATS.get("layouts", 0) + 1
        try:
            check_layout(spec, stage, stage_plan.kernels, stage_plan.seq_length, layout, params)
        except Exception as exc:  # noqa: BLE001 - report the layout with whatever Megatron raised
            raise AssertionError(f"nemoc accepted, Megatron-Core / the runtime refused: {type(exc).__name__}: {exc}\n"
                                 f"  layout={layout}\n  params={params}\n  kernels={stage_plan.kernels}\n"
                                 f"  spec.model={spec.model}\n  cluster={spec.cluster} precision={spec.precision} "
                                 f"attention={spec.attention_backend} kind={stage.kind} "
                                 f"optimizer={stage.optimizer.name}") from exc


def _run(spec: ExperimentSpec) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerConfig warns a lot (deprecations, MoE advice)
        run_case(spec)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                derandomize=False)


@settings(max_examples=1000, **SETTINGS)
@given(experiments())
def test_every_layout_nemoc_accepts_megatron_core_accepts(spec):
    _run(spec)


# CI runs 5,000 (~16 s); NEMOC_DIFFERENTIAL_EXAMPLES raises it for a deeper local run (20,000: ~62 s,
# 18k layouts, nothing found).
@pytest.mark.slow
@settings(max_examples=int(os.environ.get("NEMOC_DIFFERENTIAL_EXAMPLES", "5000")), **SETTINGS)
@given(experiments())
def test_every_layout_nemoc_accepts_megatron_core_accepts_many(spec):
    _run(spec)



# ------------------------------------------------------------------ the rules this test turned up


def _env(model, cluster=ClusterSpec(gpu="H100", nodes=1), kind="pretrain"):
    from nemoc.compiler import rules

    arch, precisions = rules.gpu_facts(cluster.gpu)
    return rules.Env(model=model, cluster=cluster, gpu_arch=arch, gpu_precisions=precisions, stage_kind=kind,
                     target=NEMOC_RUNTIME)


_LAYOUT = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=1, num_microbatches=1,
                 sequence_parallel=False, distributed_optimizer=False, recompute="none")
DENSE = ModelSpec(name="d", layers=4, hidden=256, heads=4, query_groups=4, ffn_hidden=512, vocab=1000, seq_length=512)
MOE = replace(DENSE, experts=4, top_k=2, moe_ffn_hidden=128)


def test_a_target_that_builds_dense_models_only_refuses_moe_models():
    """E141 reads the target: a runtime that builds a kind dense-only refuses an MoE model for it."""
    from types import MappingProxyType

    from nemoc.compiler import rules
    from nemoc.compiler.target import StageCaps, Target

    dense_eval = Target(name="dense-eval", stages=MappingProxyType({"eval": StageCaps(moe=False)}))
    v = rules.rule_runtime_moe(replace(_env(MOE, kind="eval"), target=dense_eval), rules.Sizes())
    assert v.code == "E141" and v.equation == "experts(4) > 0, but stage kind eval runs dense models only"
    assert rules.rule_runtime_moe(replace(_env(DENSE, kind="eval"), target=dense_eval), rules.Sizes()) is None


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto", "orpo", "reward", "ppo", "grpo", "eval", "export"])
def test_sft_dpo_and_reward_run_moe_models(kind):
    """They build through the training core (Megatron's MoELayer); tests/runtime/align/test_align_sft.py;
    PPO and GRPO decode MoE rollouts with an expert-parallel group in step (test_align_rl_pipeline.py).
    Eval runs them at the layout's expert parallelism (tests/runtime/align/test_align_eval_layout.py).
    Export streams MoE checkpoints as Mixtral / Qwen3-MoE (tests/runtime/align/test_align_export.py)."""
    from nemoc.compiler import rules

    assert rules.rule_runtime_moe(_env(MOE, kind=kind), rules.Sizes()) is None


def test_rope_needs_an_even_head_dim_and_megatron_agrees():
    from nemoc.compiler import rules

    odd = replace(DENSE, kv_channels=25)
    v = rules.rule_rope_head_dim(_env(odd), rules.Sizes())
    assert v.code == "E142" and "head_dim(25) % 2 = 1" in v.equation
    assert rules.rule_rope_head_dim(_env(replace(odd, position="learned")), rules.Sizes()) is None
    assert rules.rule_rope_head_dim(_env(replace(DENSE, kv_channels=26)), rules.Sizes()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(num_layers=1, hidden_size=100, num_attention_heads=4, kv_channels=25)
        with pytest.raises(RuntimeError):
            megatron_rope(odd, config)
        even = TransformerConfig(num_layers=1, hidden_size=104, num_attention_heads=4, kv_channels=26)
        megatron_rope(replace(DENSE, kv_channels=26), even)


def test_a_fixed_expert_tensor_on_a_dense_model_must_fit_the_expert_grid():
    from nemoc.compiler import rules

    one = ClusterSpec(gpu="H100", nodes=1, gpus_per_node=1)
    v = rules.rule_expert_grid(_env(DENSE, one), rules.Sizes(tp=1, pp=1, etp=2))
    assert v.code == "E116" and v.equation == "world size 1 % (etp(2) * ep(1) * pp(1) = 2) = 1 != 0"
    assert rules.rule_expert_grid(_env(DENSE, one), rules.Sizes(tp=1, pp=1)) is None  # auto etp = tp
    eight = ClusterSpec(gpu="H100", nodes=1, gpus_per_node=8)
    assert rules.rule_expert_grid(_env(DENSE, eight), rules.Sizes(tp=1, pp=2, etp=2)) is None
    layout = replace(_LAYOUT, etp=2)
    with pytest.raises(RuntimeError, match="expert_tensor_model_pipeline_parallel"):
        megatron_parallel_state(1, layout)


def test_e156_refuses_exactly_the_groups_megatron_cores_group_limited_topk_cannot_route():
    """Differential against Megatron-Core 0.16.1's own routing function (moe_utils.py group_limited_topk):
    over every group split of 4, 8 and 16 experts, E156 refuses a (groups, group top-k, top-k) exactly
    where the function raises (a group holds fewer than top_k // group_topk experts) or picks a masked
    (-inf) expert (the chosen groups hold fewer than top_k)."""
    import types

    import torch
    from megatron.core.transformer.moe.moe_utils import group_limited_topk

    from nemoc.compiler.rules.moe import rule_moe_router_groups

    torch.manual_seed(0)
    seen = set()
    for experts in (4, 8, 16):
        scores = torch.rand(8, experts).softmax(-1)
        for groups in (g for g in range(1, experts + 1) if experts % g == 0):
            for group_topk in range(1, groups + 1):
                for top_k in range(1, min(experts, 8) + 1):
                    try:
                        probs, _ = group_limited_topk(scores, top_k, 8, experts, groups, group_topk)
                        routes = not torch.isinf(probs).any()
                    except RuntimeError:
                        routes = False
                    m = ModelSpec(name="m", layers=1, hidden=64, heads=4, query_groups=4, ffn_hidden=128, vocab=128, seq_length=64,
                                  experts=experts, top_k=top_k, moe_router_groups=groups,
                                  moe_router_group_topk=group_topk)
                    refused = rule_moe_router_groups(types.SimpleNamespace(model=m), None) is not None
                    assert refused == (not routes), (experts, groups, group_topk, top_k)
                    seen.add(routes)
    assert seen == {True, False}


@pytest.mark.parametrize("coeff", [0.0, 1e-3, 1e-2])
def test_e144_refuses_sinkhorn_with_an_aux_loss_exactly_where_megatron_cores_router_asserts(coeff):
    """Megatron-Core 0.16.1's Sinkhorn routing (router.py TopKRouter.sinkhorn_load_balancing) asserts
    moe_aux_loss_coeff == 0 at the first forward; E144 refuses exactly those models (1e-2 is the language's
    default, so `moe_load_balancing = sinkhorn` alone is refused)."""
    import types

    from nemoc.compiler.rules.moe import rule_moe_capacity_balancing

    m = ModelSpec(name="m", layers=1, hidden=64, heads=4, query_groups=4, ffn_hidden=128, vocab=128, seq_length=64,
                  experts=4, top_k=2, moe_load_balancing="sinkhorn", moe_aux_loss_coeff=coeff)
    refused = rule_moe_capacity_balancing(types.SimpleNamespace(model=m), None)
    spec = types.SimpleNamespace(model=m)
    if refused is None:
        _route(spec)
    else:
        assert "moe_aux_loss_coeff" in refused.equation
        with pytest.raises(AssertionError, match="Sinkhorn routing does not support aux loss"):
            _route(spec)


def _megatron_layer_runs(layers: int, pp: int, vp, split):
    """(stage, first layer, count) of every model chunk by Megatron-Core's own functions (transformer_layer.py
    `get_transformer_layer_offset`, transformer_block.py `get_num_layers_to_build`) on the split's config."""
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    settings = dict(num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
                    account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False)
    settings.update(split.params())
    config = SimpleNamespace(num_layers=layers, pipeline_model_parallel_size=pp, pipeline_model_parallel_layout=None,
                             virtual_pipeline_model_parallel_size=vp, mtp_num_layers=None, **settings)
    return [(s, get_transformer_layer_offset(config, c if vp else None, s),
             get_num_layers_to_build(config, c if vp else None, s)) for c in range(vp or 1) for s in range(pp)]


def test_bf16_layers_sit_on_the_stages_where_megatron_core_builds_them():
    """`flops.chunk_runs` / `bf16_layers_per_stage` against Megatron-Core 0.16.1's own layer offsets and
    counts, for every split nemoc gives Megatron (even, uneven first / last, the embedding and / or the loss
    counted as layers) with and without virtual stages, and first / last bf16 ranges that overlap (a layer
    among both is one bf16 layer: fp8_utils.py `is_first_last_bf16_layer` is `first OR last`). Before, with
    virtual stages and an accounted split each chunk got floor(stage / vp) layers (layers lost), and an
    overlapping layer counted twice."""
    from nemoc.compiler.flops import bf16_layers_per_stage, chunk_runs
    from nemoc.compiler.rules.pipeline import pipeline_split

    checked = accounted = 0
    for layers in (8, 12, 16, 24, 30, 32, 62, 126):
        for pp in (2, 3, 4, 8):
            for vp in (None, 2, 4, 8):
                split = pipeline_split(layers, pp, vp)
                if split is None:
                    continue
                stages = None if split.even else split.stage_layers(pp)
                try:
                    truth_runs = sorted(_megatron_layer_runs(layers, pp, vp, split))
                except ZeroDivisionError:  # Megatron's own offset arithmetic divides by zero middle stages
                    continue
                assert sorted(chunk_runs(layers, pp, vp, stages)) == truth_runs, (layers, pp, vp, split)
                accounted += bool(vp and (split.embedding or split.loss))
                for first, last in ((1, 0), (0, 1), (2, 2), (3, 1), (layers - 1, 2), (layers, layers)):
                    truth = [0] * pp
                    for stage, lo, n in truth_runs:
                        truth[stage] += sum(1 for i in range(lo, lo + n) if i < first or i >= layers - last)
                    assert bf16_layers_per_stage(layers, pp, vp, stages, first, last) == tuple(truth), \
                        (layers, pp, vp, split, first, last)
                    checked += 1
    assert checked > 300 and accounted >= 5  # the cases the old code got wrong are among them
