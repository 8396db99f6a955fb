"""The compiled plan: versioned, serializable data that is all the runtime ever sees.

Input:  built by the plan search (`nemoc.compiler.search`) from an `ExperimentSpec`.
Output: `to_json` gives deterministic, sorted JSON; `from_json(to_json(p)) == p`. The runtime reads
only this (never the AST, never the spec's spans); one function in the runtime turns a `StagePlan`
into Megatron-Core arguments.
Invariants: every parallel size is resolved (no `auto` left); `tp*pp*cp*dp == world size`;
memory figures are bytes per GPU on the most-loaded pipeline stage; each `StagePlan.execution` holds
every decision about how the stage runs (kernels, attention core, precision recipe, pipeline split,
vocabulary padding, overlaps, fusions, FLOPs per step), `params` only the stage kind's parameters, as
its typed record with every default filled (`nemoc.compiler.params`; serialised as a plain object,
read back as the kind's record); `from_dict` refuses a plan of another `PLAN_VERSION`, naming both versions.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from nemoc.compiler.params import StageParams
from nemoc.compiler.spec import (
    _empty,
    CheckpointSpec,
    ClusterSpec,
    DataSpec,
    LoraSpec,
    ModelSpec,
    OptimizerSpec,
    ScheduleSpec,
    TrackingSpec,
)

# 2: every StagePlan carries its `Execution` (kernels, attention core, precision, pipeline split, padded
# vocabulary, overlaps, fusions, FLOPs per step); `params` holds only the user's stage parameters.
# 3: `StagePlan.params` is the stage kind's typed record with every schema default filled (not only the
# parameters written), and `ClusterSpec.scheduler_options` the scheduler's, durations in seconds.
PLAN_VERSION = 3


@dataclass(frozen=True, slots=True)
class PipelineSplit:
    """How `layers` decoder layers are spread over `pp` stages (x `vp` model chunks each).

    Megatron-Core 0.16.1 builds `layers / pp` layers per stage, or, when
    `num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage` are set, those on
    the first / last stage and the rest evenly on the middle stages (transformer_block.py
    get_num_layers_to_build; transformer_config.py __post_init__ "Uneven PP"), or, with
    `account_for_embedding_in_pipeline_split` / `account_for_loss_in_pipeline_split`, counts the
    embedding / the loss as one more layer: (layers + e + l) / pp per stage (a multiple of vp), one
    fewer transformer layer in the first model chunk of the first stage / the last chunk of the last
    (NeMo's Llama 3.1 405B recipes: 126 + 2 = 128 = 8 stages x 8 chunks x 2). The two mechanisms
    exclude each other (transformer_config.py raises).
    """

    first: int | None  # num_layers_in_first_pipeline_stage (None = even split)
    last: int | None  # num_layers_in_last_pipeline_stage
    per_stage: int  # layers on every middle (or every, when even) stage
    embedding: bool = False  # account_for_embedding_in_pipeline_split
    loss: bool = False  # account_for_loss_in_pipeline_split
    stages: int = 0  # pp, for an accounted split (with pp = 2 there is no middle stage)

    @property
    def even(self) -> bool:
        return self.first is None and self.last is None and not self.embedding and not self.loss

    @property
    def max_layers(self) -> int:
        """Transformer layers on the most-loaded stage: it bounds both memory and the step time."""
        if self.embedding or self.loss:
            first, middle, last = self.stage_layers(self.stages)
            return max(first, last, middle if self.stages > 2 else 0)
        return max(self.per_stage, self.first or 0, self.last or 0)

    def stage_layers(self, pp: int) -> tuple[int, int, int]:
        """Transformer layers on the (first, middle, last) stage (what the memory and cost models take)."""
        if self.embedding or self.loss:
            return self.per_stage - self.embedding, self.per_stage, self.per_stage - self.loss
        return (self.first if self.first is not None else self.per_stage, self.per_stage,
                self.last if self.last is not None else self.per_stage)

    def params(self) -> dict[str, object]:
        """The TransformerConfig settings that produce this split (empty when even)."""
        if self.embedding or self.loss:
            return {k: True for k, on in (("account_for_embedding_in_pipeline_split", self.embedding),
                                          ("account_for_loss_in_pipeline_split", self.loss)) if on}
        if self.first is None:
            return {}
        return {"num_layers_in_first_pipeline_stage": self.first, "num_layers_in_last_pipeline_stage": self.last}

    def describe(self, pp: int) -> str:
        if self.even:
            return f"{pp} x {self.per_stage}"
        if self.embedding or self.loss:
            what = " and ".join(n for n, on in (("embedding", self.embedding), ("loss", self.loss)) if on)
            first, _, last = self.stage_layers(pp)
            return f"{pp} x {self.per_stage} counting the {what} as layers (first {first}, last {last})"
        middle = f" + {pp - 2} x {self.per_stage}" if pp > 2 else ""
        return f"first {self.first}{middle} + last {self.last}"



@dataclass(frozen=True, slots=True)
class Overlaps:
    """The communication the stage overlaps with compute (each a Megatron-Core switch)."""

    grad_reduce: bool  # the data-parallel gradient reduce with the backward pass (DDP overlap_grad_reduce)
    param_gather: bool  # the distributed optimizer's parameter all-gather with the forward pass
    p2p: bool  # the interleaved schedule's steady-state pipeline transfers (overlap_p2p_comm)
    tp_comm: bool  # Transformer Engine's tensor-parallel communication overlap (userbuffers)
    # The interleaved schedule starts every chunk's parameter all-gather itself (`param_sync_func`: chunks 0
    # and 1 when the step begins, chunk c + 1 at chunk c's first micro batch), on every pipeline stage at
    # once, instead of each first forward pre-hook (DDP `align_param_gather`; Megatron-LM turns it off
    # without interleaving, Megatron-Bridge's comm_overlap.py turns it on with VP > 1): set with
    # `param_gather` and VP > 1, as the recipes do.
    align_param_gather: bool = False


@dataclass(frozen=True, slots=True)
class Fusions:
    """The fused kernels the stage was costed with (all off on the local layer spec)."""

    rope: bool  # TE's fused rotary embedding
    bias_activation: bool  # Megatron's fused bias-SwiGLU / bias-GELU
    bias_dropout_add: bool
    grad_accumulation: bool  # weight-gradient accumulation into main_grad inside the GEMM (apex at run time)
    # the loss (the experiment's `cross_entropy_fusion`): "te" (Transformer Engine's fused vocab-parallel
    # cross entropy, Megatron-Bridge's performance recipes), "native" (Megatron-Core's own fused loss),
    # "none" (Megatron-Core's unfused vocab-parallel cross entropy); Megatron-Core `cross_entropy_loss_fusion`,
    # `cross_entropy_fusion_impl`
    cross_entropy: str = "none"


@dataclass(frozen=True, slots=True)
class MoeExecution:
    """How a mixture-of-experts layer runs (Megatron-Core TransformerConfig switches; None for dense
    models). Resolved by `execution.moe_execution` from the experiment's `moe_*` fields."""

    dispatcher: str  # moe_token_dispatcher_type: alltoall | allgather | flex (DeepEP)
    grouped_gemm: bool  # moe_grouped_gemm: the local experts' GEMMs as one grouped GEMM (TEGroupedMLP)
    permute_fusion: bool  # moe_permute_fusion: TE's fused token permute / unpermute


@dataclass(frozen=True, slots=True)
class HostExecution:
    """How the host drives the GPUs: CUDA graphs (Megatron-Core TransformerConfig `cuda_graph_impl`,
    `cuda_graph_scope`) and the training loop's garbage collection (Megatron-LM `manual_gc`,
    `manual_gc_interval`). Resolved by `execution.host_execution` from the experiment's fields."""

    cuda_graph_impl: str  # none | local | transformer_engine
    cuda_graph_scope: tuple[str, ...]  # () = the whole layer; attn, mlp, moe_router, moe_preprocess, full_iteration
    manual_gc: bool  # automatic GC off in training, gc.collect() on every rank at the same steps
    manual_gc_interval: int  # steps between those collections; 0 = none during training


@dataclass(frozen=True, slots=True)
class UbGemm:
    """How one GEMM overlaps its tensor-parallel communication in Transformer Engine's userbuffers: one
    entry of TE `initialize_ub`'s `ub_cfgs` (transformer_engine/pytorch/module/base.py), as Megatron-Bridge's
    `BulkOverlapCfg` / `PipelineOverlapCfg` / `RingExchangeOverlapCfg` (training/comm_overlap.py) give it."""

    name: str  # TE's GEMM name: qkv_fprop, qkv_dgrad, qkv_wgrad, proj_fprop, proj_dgrad, fc1_*, fc2_*
    method: str  # bulk | pipeline | ring_exchange
    num_sm: int  # SMs the communication kernel takes
    cga_size: int
    set_sm_margin: bool  # the GEMM leaves the communication's SMs free
    num_splits: int | None = None  # pipeline: chunks the GEMM is split into (None: TE's default)
    aggregate: bool = False  # ring_exchange: aggregate two chunks per GEMM
    atomic_gemm: bool = False
    fp8_buf: bool = False  # the communication buffer holds FP8 data (FP8 runs)


@dataclass(frozen=True, slots=True)
class Userbuffers:
    """Transformer Engine's userbuffers for `tp_comm_overlap` (what Megatron-LM's `_initialize_tp_communicators`
    and Megatron-Bridge's `initialize.py` hand to TE `initialize_ub` before the model is built), decided by
    `nemoc.compiler.catalog.userbuffers.userbuffers_of` from the stage's GPU, precision and shapes."""

    shape: tuple[int, int]  # (seq_length x micro_batch / cp, hidden): one layer input, sequence and batch merged
    tp: int  # ranks in the tensor-parallel group
    dtype: str  # bf16 | fp16: the buffers' non-FP8 type
    quantization: str  # fp8 | none: TE UserBufferQuantizationMode (fp8 for the fp8 / mxfp8 recipes)
    bootstrap_backend: str  # nccl | gloo | mpi: the process group TE bootstraps the buffers over
    preset: str  # the Megatron-Bridge preset the GEMM configs come from, or "te_default" (TE's own per GEMM)
    gemms: tuple[UbGemm, ...] = ()  # empty: TE's default configuration for every GEMM
    # Megatron-Core ModelParallelConfig tp_comm_* switches that match `gemms` (model_parallel_config.py)
    bulk_wgrad: bool = True
    bulk_dgrad: bool = True
    overlap_ag: bool = True
    overlap_rs: bool = True
    overlap_rs_dgrad: bool = False


@dataclass(frozen=True, slots=True)
class Execution:
    """Everything the planner decided about how a stage executes; the runtime translates it and
    re-derives none of it. Built by `nemoc.compiler.execution.stage_execution`."""

    kernels: str  # layer kernels: te | local
    attention: str  # the attention core built: auto | flash | fused | unfused
    precision: str  # the stage's precision recipe: bf16 | fp16 | fp32 | fp8 | mxfp8 | nvfp4 (eval never fp8)
    params_dtype: str  # bf16 | fp16 | fp32: weights and activations (fp8 keeps bf16 master weights)
    fp8_recipe: str | None  # delayed | tensorwise | blockwise | mxfp8 | None (execution.fp8_recipe_of)
    pipeline: PipelineSplit  # decoder layers per pipeline stage
    vocab_multiple: int  # the embedding is padded to a multiple of this (128 x tp)
    padded_vocab: int  # the model's vocabulary padded so
    overlaps: Overlaps
    fusions: Fusions
    model_flops_per_step: float  # what measured MFU divides (causal discount, the stage kind's work)
    peak_flops_per_gpu: float | None  # the planned GPU's dense peak at `precision` (None: unknown)
    moe: MoeExecution | None = None  # the MoE layer's dispatcher and kernels; None for a dense model
    host: HostExecution | None = None  # CUDA graphs and manual GC; None: a model built outside a stage plan
    userbuffers: Userbuffers | None = None  # TE userbuffers where the layout has tp_comm_overlap; else None
    # DDP / OptimizerConfig `reuse_grad_buf_for_mxfp8_param_ag`: the distributed optimizer's all-gather of MXFP8
    # parameters lands in the gradient buffer (execution.reuses_grad_buffer)
    reuse_grad_buf_for_mxfp8_param_ag: bool = False
    # TransformerConfig `num_layers_at_start_in_bf16` / `num_layers_at_end_in_bf16` (with `first_last_layers_bf16`):
    # the first / last layers kept in bf16; nonzero only under fp8 / mxfp8 / nvfp4
    bf16_first_layers: int = 0
    bf16_last_layers: int = 0
    # TransformerConfig `mtp_num_layers` for this stage (None there when 0) and the MTP block spec on its last
    # pipeline stage: the model's multi-token prediction depth where the stage kind trains it (pretrain, or an export
    # of a checkpoint that has it: rules.stages.stage_mtp_layers), else 0 (W128)
    mtp_num_layers: int = 0


DEFAULT_RECOMPUTE_MODULES = ("core_attn",)  # Megatron-Core's `recompute_modules` when None


def selective_modules(recompute: str | None, modules: tuple[str, ...] | None) -> tuple[str, ...]:
    """The modules selective recompute replays (`Layout.selective_modules`)."""
    if recompute != "selective":
        return ()
    return DEFAULT_RECOMPUTE_MODULES if modules is None else tuple(modules)


@dataclass(frozen=True, slots=True)
class Layout:
    tp: int
    pp: int
    vp: int | None  # virtual pipeline stages per rank; None = no interleaving
    cp: int
    ep: int
    etp: int
    dp: int
    micro_batch: int
    global_batch: int
    num_microbatches: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str  # none | selective | full
    # recompute = full only: layers per model chunk recomputed (Megatron `recompute_method = "block"`,
    # `recompute_num_layers`); None = every layer (`uniform`, 1)
    recompute_layers: int | None = None
    # recompute = selective only: the layer parts recomputed (Megatron `recompute_modules`); None = not
    # written, Megatron's default ("core_attn",). Read it through `selective_modules`.
    recompute_modules: tuple[str, ...] | None = None
    tp_comm_overlap: bool = False  # TE userbuffer TP overlap (`TransformerConfig.tp_comm_overlap`)
    # `ModelParallelConfig.defer_embedding_wgrad_compute` / `wgrad_deferral_limit` (0: every micro batch)
    defer_embedding_wgrad_compute: bool = False
    wgrad_deferral_limit: int = 0
    grad_reduce_in_fp32: bool = True  # `DistributedDataParallelConfig.grad_reduce_in_fp32`
    overlap_param_gather: bool = False  # `DistributedDataParallelConfig.overlap_param_gather`
    fp8_param_gather: bool = False  # `TransformerConfig.fp8_param` + `DistributedDataParallelConfig.fp8_param_gather`
    megatron_fsdp: bool = False  # DDP `use_megatron_fsdp`, sharding optim_grads_params (ZeRO-3)
    # `OptimizerConfig.exp_avg_dtype` / `exp_avg_sq_dtype` (bf16: `use_precision_aware_optimizer`)
    optimizer_state_dtype: str = "fp32"
    # `OptimizerConfig.use_precision_aware_optimizer` (Transformer Engine's FusedAdam), with moments of
    # `optimizer_state_dtype`: on with bf16 moments, and with fp32 ones where the experiment says so
    precision_aware_optimizer: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def selective_modules(self) -> tuple[str, ...]:
        """The layer parts selective recompute replays: `recompute_modules`, or Megatron-Core's default
        ["core_attn"] (transformer_config.py __post_init__); () unless recompute = selective."""
        return selective_modules(self.recompute, self.recompute_modules)


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Bytes per GPU. `parts` names every term inside `other` (logits, comm buffers, CUDA context...)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    other: int
    capacity: int
    parts: Mapping[str, int] = field(default_factory=_empty)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.other


@dataclass(frozen=True, slots=True)
class Estimate:
    step_time_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    mfu: float
    steps: int
    wall_time_s: float
    gpu_hours: float
    cost_usd: float | None
    parts: Mapping[str, float] = field(default_factory=_empty)  # step-time terms: compute, tp_comm, bubble, ...


@dataclass(frozen=True, slots=True)
class StagePlan:
    name: str
    kind: str
    after: tuple[str, ...]
    data: tuple[str, ...]
    layout: Layout
    memory: MemoryBreakdown
    estimate: Estimate
    seq_length: int
    steps: int
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    checkpoint: CheckpointSpec
    execution: Execution
    peft: LoraSpec | None = None
    log_every: int = 10
    eval_every: int | None = None
    seed: int = 1234
    # the stage kind's parameters: its typed record, every default filled (a mapping given becomes one)
    params: StageParams = None  # type: ignore[assignment]
    resident_models: tuple[str, ...] = ("policy",)  # which models the stage keeps in memory

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", StageParams.of(self.kind, self.params))

    @property
    def kernels(self) -> str:
        """The layer kernels the stage was costed with and the runtime builds: te | local."""
        return self.execution.kernels


@dataclass(frozen=True, slots=True)
class ImportEstimate:
    """One `hf_import:<dir>` task: sizes, its host memory peak and its time, with the terms
    (compiler/hfimport.py computes it; the runtime's import runs `workers` processes)."""

    directory: str  # as the plan names it (relative to the experiment root when inside it)
    checkpoint_bytes: int  # safetensors bytes (measured, or parameters x ASSUMED_BYTES_PER_PARAM)
    measured: bool  # checkpoint_bytes are the files' sizes
    layer_bytes: int  # one decoder layer (what a worker holds twice)
    edge_bytes: int  # embeddings + final norm + output layer (the parent holds them twice)
    workers: int
    host_memory_bytes: int  # max(workers x 2 x layer, 2 x edges)
    hash_s: float
    start_s: float
    convert_s: float

    @property
    def seconds(self) -> float:
        return self.hash_s + self.start_s + self.convert_s


@dataclass(frozen=True, slots=True)
class Plan:
    experiment: str
    model: ModelSpec
    cluster: ClusterSpec
    precision: str
    attention_backend: str  # auto | flash | fused | unfused (auto: TE picks flash or cuDNN fused; SDPA without TE)
    data: tuple[DataSpec, ...]
    stages: tuple[StagePlan, ...]
    root: str = "."
    version: int = PLAN_VERSION
    kernels: str = "te"  # the experiment's `kernels`, resolved: te | local (what pretraining runs)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)  # metric sinks (W&B, MLflow, TensorBoard)
    imports: tuple[ImportEstimate, ...] = ()  # one per `init = hf(DIR)` checkpoint: the hf_import task's cost

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


# ----------------------------------------------------------------------------------- serialization


def to_dict(obj: object) -> object:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_json(plan: Plan) -> str:
    return json.dumps(to_dict(plan), sort_keys=True, indent=2) + "\n"


def _freeze(value: object) -> object:
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _build(tp: object, value: object) -> object:
    """Rebuild `value` (plain JSON data) as type `tp`, following dataclass field annotations."""
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(args[0], value) if len(args) == 1 else _freeze(value)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value})
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v) for v in value)
        return tuple(_build(a, v) for a, v in zip(args, value))
    if tp is float and isinstance(value, int):
        return float(value)
    return _freeze(value)


def from_dict(data: Mapping) -> Plan:
    version = data.get("version")
    if version != PLAN_VERSION:
        older = isinstance(version, int) and version < PLAN_VERSION
        raise ValueError(f"plan version {version} is not supported: this nemoc reads plan version {PLAN_VERSION}"
                         + ("; re-plan the experiment (`nemoc plan` / `nemoc run` write a new plan.json)"
                            if older else "; use the nemoc that wrote it"))
    return _build(Plan, data)  # type: ignore[return-value]


def from_json(text: str) -> Plan:
    return from_dict(json.loads(text))
