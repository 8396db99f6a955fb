"""The execution record of one stage: every decision the runtime would otherwise re-derive.

Input:  the model, the planned GPU, the chosen `Layout` and its `PipelineSplit`, the stage kind,
        the experiment's precision / attention backend / resolved kernels, the `Target`.
Output: a `plan.Execution` (kernels, attention core, precision recipe, pipeline split, padded
        vocabulary, overlaps, fusions, model FLOPs per step and the GPU's peak for measured MFU).
Invariants: pure; the same facts the search costed the stage with (`Target.stage_kernels`,
        `stage_attention`, `stage_precision`), computed once here and carried by the plan.
"""

from __future__ import annotations

from nemoc.compiler.catalog.hardware import get_gpu
from nemoc.compiler.catalog.userbuffers import userbuffers_of
from nemoc.compiler.flops import (LOW_PRECISIONS, MEGATRON_VOCAB_DIVISOR, padded_vocab, stage_model_flops_per_step,
                                  stage_work)
from nemoc.compiler.plan import Execution, Fusions, HostExecution, Layout, MoeExecution, Overlaps, PipelineSplit
from nemoc.compiler.spec import LoraSpec, ModelSpec
from nemoc.compiler.target import MEGATRON_CORE, Target

# fp8 / nvfp4 training keeps bf16 master weights; TE casts inside the GEMMs
_DTYPE = {"fp8": "bf16", "mxfp8": "bf16", "nvfp4": "bf16"}
# The recipe an fp8 precision runs with when the experiment leaves `fp8_recipe` auto: what
# Megatron-Bridge's performance recipes use (FP8-CS, current scaling, on H100 / B200 / GB200:
# scripts/performance/configs/*_workload_base_configs.py `*_FP8_CS_*`; MXFP8 for precision mxfp8).
AUTO_FP8_RECIPE = {"fp8": "tensorwise", "mxfp8": "mxfp8"}


def fp8_recipe_of(precision: str, requested: str | None) -> str | None:
    """The FP8 recipe a stage of `precision` runs: the experiment's `fp8_recipe`, or the default
    above; None for a 16/32-bit stage (an alignment stage runs an fp8 model in bf16)."""
    if precision not in AUTO_FP8_RECIPE:
        return None
    return requested or AUTO_FP8_RECIPE[precision]


# What a MoE layer runs when the experiment leaves `moe_*` auto: Megatron-Bridge's MoE performance
# recipes on TE GPU clusters (alltoall dispatcher, grouped GEMM, permute fusion: its Mixtral, Qwen3-MoE
# and DeepSeek recipes); on the local spec what it can build (no grouped GEMM or fused permutation
# without TE) with Megatron-Core's default dispatcher unless experts are spread over ranks.
AUTO_MOE_TE = ("alltoall", True, True)


def moe_execution(model: ModelSpec, kernels: str, ep: int, dispatcher: str | None = None,
                  grouped_gemm: bool | None = None, permute_fusion: bool | None = None) -> MoeExecution | None:
    """The MoE settings of a stage on `kernels` (te | local) with expert-parallel size `ep`: the
    experiment's `moe_*` fields, each auto (None) resolved as above; None for a dense model."""
    if not model.is_moe:
        return None
    if kernels == "te":
        auto = AUTO_MOE_TE
    else:
        # moe_shared_expert_overlap runs with the alltoall dispatcher only (E145)
        alltoall = ep > 1 or model.moe_shared_expert_overlap
        auto = ("alltoall" if alltoall else "allgather", False, False)
    return MoeExecution(
        dispatcher=dispatcher or auto[0],
        grouped_gemm=auto[1] if grouped_gemm is None else grouped_gemm,
        permute_fusion=auto[2] if permute_fusion is None else permute_fusion,
    )


def moe_defaults_taken(model: ModelSpec, kernels: str, ep: int, dispatcher: str | None, grouped_gemm: bool | None,
                       permute_fusion: bool | None) -> tuple[str, ...]:
    """`name = value (auto)` for every MoE setting the experiment left auto (what `nemoc plan` reports)."""
    moe = moe_execution(model, kernels, ep, dispatcher, grouped_gemm, permute_fusion)
    if moe is None:
        return ()
    out = []
    if dispatcher is None:
        out.append(f"moe_dispatcher = {moe.dispatcher}")
    if grouped_gemm is None:
        out.append(f"moe_grouped_gemm = {str(moe.grouped_gemm).lower()}")
    if permute_fusion is None:
        out.append(f"moe_permute_fusion = {str(moe.permute_fusion).lower()}")
    return tuple(out)


# What the host side runs when the experiment leaves it auto: Megatron-Bridge's recipes collect garbage
# manually every 100 steps (`cfg.train.manual_gc = True`, `manual_gc_interval = 100` in its recipes and
# performance configs) and leave CUDA graphs off in their base recipes (`cuda_graph_impl = "none"`).
AUTO_MANUAL_GC = (True, 100)
AUTO_CUDA_GRAPH_IMPL = "none"


def host_execution(*, cuda_graph_impl: str | None = None, cuda_graph_scope: tuple[str, ...] = (),
                   manual_gc: bool | None = None, manual_gc_interval: int | None = None) -> HostExecution:
    """The host-side settings of a stage: the experiment's fields, each auto (None) resolved as above.
    An interval written without manual_gc implies it (E175 refuses it with manual_gc = false)."""
    gc_on = AUTO_MANUAL_GC[0] if manual_gc is None else manual_gc
    if manual_gc is None and manual_gc_interval is not None:
        gc_on = True
    interval = AUTO_MANUAL_GC[1] if manual_gc_interval is None else manual_gc_interval
    impl = cuda_graph_impl or AUTO_CUDA_GRAPH_IMPL
    return HostExecution(cuda_graph_impl=impl, cuda_graph_scope=tuple(cuda_graph_scope) if impl != "none" else (),
                         manual_gc=gc_on, manual_gc_interval=interval if gc_on else 0)


def host_defaults_taken(*, cuda_graph_impl: str | None, manual_gc: bool | None,
                        manual_gc_interval: int | None, **_: object) -> tuple[str, ...]:
    """`name = value (auto)` for every host setting the experiment left auto (what `nemoc plan` reports)."""
    host = host_execution(cuda_graph_impl=cuda_graph_impl, manual_gc=manual_gc, manual_gc_interval=manual_gc_interval)
    out = []
    if cuda_graph_impl is None:
        out.append(f"cuda_graph_impl = {host.cuda_graph_impl}")
    if manual_gc is None:
        out.append(f"manual_gc = {str(host.manual_gc).lower()}")
    if manual_gc_interval is None and host.manual_gc:
        out.append(f"manual_gc_interval = {host.manual_gc_interval}")
    return tuple(out)


def stage_host(requested: tuple, stage_kernels: str, graphs: bool = True) -> HostExecution:
    """The host settings a stage runs with, from the experiment's `requested` (cuda_graph_impl,
    cuda_graph_scope, manual_gc, manual_gc_interval; None = auto): CUDA graphs only where the stage
    runs Transformer Engine's layers (E173 refuses graphs for a whole experiment without TE) and where
    the target captures them for the stage's kind (`graphs`: `StageCaps.cuda_graphs`)."""
    impl, scope, manual, interval = requested
    host = host_execution(cuda_graph_impl=impl, cuda_graph_scope=scope, manual_gc=manual,
                          manual_gc_interval=interval)
    if (stage_kernels != "te" or not graphs) and host.cuda_graph_impl != "none":
        host = HostExecution("none", (), host.manual_gc, host.manual_gc_interval)
    return host


def even_split(layers: int, pp: int) -> PipelineSplit:
    """The split of a stage whose search did not choose one (pp = 1, or layers % pp == 0)."""
    return PipelineSplit(None, None, layers // max(pp, 1))


# The loss a stage runs when the experiment leaves `cross_entropy_fusion` auto: Transformer Engine's fused
# vocab-parallel cross entropy with TE (Megatron-Bridge's performance recipes: `cross_entropy_loss_fusion =
# True`, `cross_entropy_fusion_impl = "te"`, docs/cost-model.md cites the files); on the local spec
# Megatron-Core's unfused one. Megatron-Core's native fused loss runs on the CPU too (torch.compile), but it
# rounds the logits' gradient to bf16 whatever the precision (rules W112) and compiles for ~20 s per
# process on this machine's CPUs, so auto does not pick it there.
AUTO_CROSS_ENTROPY = {"te": "te", "local": "none"}
CROSS_ENTROPY_FUSIONS = ("te", "native", "none")
# Under a whole-iteration CUDA graph (cuda_graph_impl = local, cuda_graph_scope = [full_iteration]) Megatron-Core
# 0.16.1 calls TE's loss in its capturable form, which needs Transformer Engine >= 2.7 (language_module.py
# `compute_language_model_loss`: "CUDA graph compatible cross entropy requires TransformerEngine >= 2.7.0", an
# AssertionError at the first step). The plan does not know the target's TE version, so auto takes
# Megatron-Core's native fused loss there (no host synchronisation, so capturable on any TE); a written `te`
# stays, and the nemoc runtime refuses it on an older TE before the first step. With precision fp32 or fp16 the
# native loss would round the logits' gradient to bf16 (rules W112), so auto takes Megatron-Core's unfused
# vocab-parallel loss there (`tensor_parallel.vocab_parallel_cross_entropy`: plain torch ops with no host
# synchronisation, capturable too): the run keeps its precision's gradient for 20 + 4 more bytes per logit.
AUTO_CROSS_ENTROPY_FULL_ITERATION = "native"
NATIVE_ROUNDS_TO_BF16 = ("fp32", "fp16")  # precisions whose logit gradient the native loss rounds (W112)


def full_iteration_graph(host: HostExecution | None) -> bool:
    """Whether the stage captures its whole forward-backward step in one CUDA graph."""
    return host is not None and host.cuda_graph_impl == "local" and "full_iteration" in host.cuda_graph_scope


def cross_entropy_of(kernels: str, requested: str | None, host: HostExecution | None = None,
                     precision: str | None = None) -> str:
    """The cross entropy a stage on `kernels` (te | local) with the host settings `host` and the stage's
    `precision` runs: the experiment's `cross_entropy_fusion`, or the default above (native under a
    whole-iteration CUDA graph, unfused there with fp32 / fp16). `te` on the local spec is refused for training
    stages (rules E183); eval and export stages always run the local spec, and run Megatron-Core's unfused
    loss there."""
    if requested == "te" and kernels != "te":
        return "none"
    if requested is None and kernels == "te" and full_iteration_graph(host):
        return "none" if precision in NATIVE_ROUNDS_TO_BF16 else AUTO_CROSS_ENTROPY_FULL_ITERATION
    return requested or AUTO_CROSS_ENTROPY[kernels]


def fusions(model: ModelSpec, kernels: str, cross_entropy: str | None = None,
            host: HostExecution | None = None, precision: str | None = None) -> Fusions:
    """The fused kernels NeMo / Megatron-LM switch on with Transformer Engine, which the `te` cost and
    memory models price: TE's fused RoPE, the fused bias-SwiGLU / bias-GELU (TransformerConfig allows
    it for SwiGLU, GeGLU, and GELU with biases), the fused bias-dropout-add and the weight-gradient
    accumulation into main_grad inside the GEMM (MLA: RoPE fused with YaRN only); none of them on the local spec
    (its unfused kernels are what `kernels = local` prices). The cross entropy is the experiment's `cross_entropy_fusion`
    (`cross_entropy_of`: te | native | none, which reads `host`'s CUDA graphs and the `precision`), on either
    spec."""
    ce = cross_entropy_of(kernels, cross_entropy, host, precision)
    if kernels != "te":
        return Fusions(rope=False, bias_activation=False, bias_dropout_add=False, grad_accumulation=False,
                       cross_entropy=ce)
    act = model.activation == "swiglu" or (model.activation == "gelu" and model.add_bias_linear)
    # MLA fuses only its YaRN RoPE (MLATransformerConfig.__post_init__: "apply_rope_fusion for MLA only works
    # with YARN RoPE"; found by tests/compiler/test_megatron_differential.py)
    rope = model.position == "rope" and (not model.multi_latent_attention or model.rope_type == "yarn")
    return Fusions(rope=rope, bias_activation=act, bias_dropout_add=True, grad_accumulation=True,
                   cross_entropy=ce)


def reuses_grad_buffer(precision: str, layout: Layout) -> bool:
    """Whether the stage's MXFP8 parameter all-gather reuses the gradient buffer (Megatron-Core 0.16.1 DDP /
    OptimizerConfig `reuse_grad_buf_for_mxfp8_param_ag`; Megatron-Bridge's MXFP8 recipes switch it on with
    `fp8_param_gather`: training/mixed_precision.py `bf16_with_mxfp8_mixed`). With MXFP8 parameters the
    distributed optimizer's 16-bit all-gather buffer *is* the gradient buffer (param_and_grad_buffer.py: one
    `shared_buffer` of the gradient dtype, bf16 parameters in its first half under fp32 gradients), whatever the
    flag; the flag keeps the model's MXFP8 parameters out of it (all-gather, `param.data.copy_`, then zero the
    buffer for the next gradients; the optimizer step writes the main parameters into it:
    `_copy_main_params_to_param_buffer`). Without it Megatron-Core maps the parameters' storage into that shared
    buffer, where the gradients accumulate over them, so the plan sets it exactly where MXFP8 parameters are
    all-gathered: precision mxfp8 with fp8_param_gather (which needs the distributed optimizer: rules E166),
    and Megatron-Core's own check holds (DistributedDataParallelConfig: "Reuse grad buffer only when keeping
    params in MXFP8", i.e. fp8_param_gather). Never under Megatron-FSDP: its distributed optimizer keeps no DDP
    buffers (distrib_optimizer.py `__init__` returns before `self.buffers` when `use_megatron_fsdp`, so the step's
    `_copy_main_params_to_param_buffer` would fail), and Megatron-FSDP all-gathers MXFP8 parameters through its
    own buffers. No field: no other value runs."""
    return (precision == "mxfp8" and layout.fp8_param_gather and layout.distributed_optimizer
            and not layout.megatron_fsdp)


def reduces_gradients(layout: Layout) -> bool:
    """Whether the stage's DDP reduces gradients over other ranks, which it overlaps with the backward (DDP
    `overlap_grad_reduce`), and so whether the distributed optimizer's parameter all-gather can overlap the
    forward. Megatron-Core 0.16.1's DDP builds its gradient buffers over the DP x CP group
    (distributed_data_parallel.py: `intra_dp_cp_group`; context-parallel ranks see different tokens of the same
    sequences), and the distributed optimizer shards over that group: dp(1) x cp(2) reduces and gathers over
    two ranks, as `cost._dp_exposed` prices it (shard = dp x cp)."""
    return layout.dp * layout.cp > 1


def stage_execution(*, model: ModelSpec, gpu: str, layout: Layout, split: PipelineSplit | None, stage_kind: str,
                    precision: str, attention_backend: str, kernels: str, seq_length: int,
                    peft: LoraSpec | None = None, params: object = None,
                    target: Target = MEGATRON_CORE, fp8_recipe: str | None = None,
                    moe: MoeExecution | None = None, host: HostExecution | None = None,
                    cross_entropy: str | None = None, bf16_layers: tuple[int, int] = (0, 0)) -> Execution:
    """The `Execution` of a stage planned with `layout` (precision, attention and kernels are the
    experiment's; the target decides what the stage kind runs). `bf16_layers`: the experiment's first / last
    layers kept in bf16, recorded where the stage runs below 16 bits."""
    stage_kernels = target.stage_kernels(stage_kind, kernels)
    stage_precision = target.stage_precision(stage_kind, precision)
    interleaved = layout.pp > 1 and (layout.vp or 1) > 1
    hw = get_gpu(gpu)
    peak = hw.peak(stage_precision) if hw is not None and hw.supports(stage_precision) else None
    host = host if host is not None else host_execution()
    params_dtype = _DTYPE.get(stage_precision, stage_precision)
    userbuffers = userbuffers_of(
        generation=hw.generation if hw is not None else None, precision=stage_precision, params_dtype=params_dtype,
        hidden=model.hidden, tp=layout.tp, cp=layout.cp, seq_length=seq_length,
        micro_batch=layout.micro_batch * stage_work(stage_kind, params, peft).rows) if layout.tp_comm_overlap else None
    return Execution(
        kernels=stage_kernels,
        attention=target.stage_attention(stage_kind, attention_backend),
        precision=stage_precision,
        params_dtype=params_dtype,
        fp8_recipe=fp8_recipe_of(stage_precision, fp8_recipe),
        pipeline=split if split is not None else even_split(model.layers, layout.pp),
        vocab_multiple=MEGATRON_VOCAB_DIVISOR * layout.tp,
        padded_vocab=padded_vocab(model.vocab, layout.tp),
        overlaps=Overlaps(grad_reduce=reduces_gradients(layout), param_gather=layout.overlap_param_gather,
                          p2p=interleaved and target.overlap_p2p, tp_comm=layout.tp_comm_overlap,
                          align_param_gather=layout.overlap_param_gather and interleaved),
        fusions=fusions(model, stage_kernels, cross_entropy, host, stage_precision),
        model_flops_per_step=stage_model_flops_per_step(model, seq_length, layout.global_batch, stage_kind=stage_kind,
                                                        peft=peft, params=params, causal_discount=True),
        peak_flops_per_gpu=peak,
        moe=moe if moe is not None else moe_execution(model, stage_kernels, layout.ep),
        host=host,
        userbuffers=userbuffers,
        reuse_grad_buf_for_mxfp8_param_ag=reuses_grad_buffer(stage_precision, layout),
        mtp_num_layers=model.mtp_num_layers,
        **_bf16_layers(stage_precision, bf16_layers),
    )


def _bf16_layers(precision: str, bf16_layers: tuple[int, int]) -> dict:
    """`Execution.bf16_first_layers` / `bf16_last_layers`: as written under fp8 / mxfp8 / nvfp4, where
    Megatron-Core reads them; 0 otherwise (rules W113)."""
    first, last = bf16_layers if precision in LOW_PRECISIONS else (0, 0)
    return dict(bf16_first_layers=first, bf16_last_layers=last)
