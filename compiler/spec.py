"""The compiler's typed input: an experiment with every preset expanded and every unit resolved.

Input:  produced from the frozen AST by `nemoc.compiler.lower` (the only module that reads the AST).
Output: consumed by the layout rules, the memory and cost models, the plan search and graph emission.
Invariants: plain frozen data, no torch; sizes are integers in base units (bytes, tokens, samples,
seconds); `None` in a `ParallelSpec` field means `auto` (the search chooses it). `spans` maps a dotted
path of what the user wrote (`"parallel.tensor"`, `"stage.pretrain.global_batch"`, `"model.heads"`,
`"cluster.nodes"`) to its source span, so a rule can anchor its diagnostic at the user's line; a field
that came from a preset or a default has no entry (anchor at the enclosing block instead, e.g.
`"model"` or `"stage.pretrain"`, which are always present).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from types import MappingProxyType

from nemoc.compiler.params import SchedulerOptions, StageParams
from nemoc.dsl.diagnostics import Span

EMPTY: Mapping = MappingProxyType({})


def _empty() -> Mapping:
    return EMPTY


@lru_cache(maxsize=256)
def moe_layer_pattern(layers: int, experts: int, freq: int | tuple[int, ...], first_dense: int) -> tuple[int, ...]:
    """`ModelSpec.moe_layer_pattern` (cached: the cost and memory models read it for every candidate layout)."""
    if experts <= 0:
        return (0,) * layers
    if isinstance(freq, int):
        pattern = [1 if i % max(freq, 1) == 0 else 0 for i in range(layers)]
    else:
        pattern = [int(v) for v in freq][:layers] + [1] * max(0, layers - len(freq))  # E202 reports a bad length
    return tuple(0 if i < first_dense else v for i, v in enumerate(pattern))


@lru_cache(maxsize=256)
def _dense_layer_model(model: ModelSpec) -> ModelSpec:
    return replace(model, name=model.name + "/dense", experts=0, top_k=0, moe_ffn_hidden=None,
                   shared_expert_ffn_hidden=0, moe_layer_freq=1, moe_first_dense_layers=0,
                   moe_shared_expert_overlap=False, mtp_num_layers=0)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer. Dense when `experts == 0`."""

    name: str
    layers: int
    hidden: int
    heads: int
    query_groups: int  # = heads for multi-head attention, 1 for multi-query, else grouped-query
    ffn_hidden: int
    vocab: int
    seq_length: int
    kv_channels: int | None = None  # head dim; None = hidden // heads
    # swiglu | geglu_tanh (tanh-GELU-gated GLU, Gemma) | gelu (erf) | gelu_tanh (tanh approximation, GPT-2) | relu |
    # squared_relu
    activation: str = "swiglu"
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    position: str = "rope"  # rope | learned | none
    rotary_base: float = 10000.0
    # Llama 3.1/3.2 RoPE frequency scaling (rope_type "llama3"): low frequencies divided by this factor,
    # with low/high frequency factors 1 and 4 over an original context of 8192 (the values Megatron-Core
    # 0.16.1's RotaryEmbedding fixes). 1 = unscaled.
    rope_scaling_factor: float = 1.0
    tie_embeddings: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False  # Qwen2/2.5 use a bias on the QKV projection only
    qk_layernorm: bool = False  # Qwen3
    experts: int = 0  # 0 = dense MLP
    top_k: int = 0
    moe_ffn_hidden: int | None = None
    shared_expert_ffn_hidden: int = 0
    # Which layers are expert layers (Megatron-Core TransformerConfig `moe_layer_freq`, same semantics: an int N
    # makes layers 0, N, 2N, ... expert layers, a tuple gives 0 / 1 per layer) after the first
    # `moe_first_dense_layers` dense ones (HF `first_k_dense_replace`); the rest are dense MLPs of ffn_hidden.
    # `moe_layer_pattern` is the per-layer result the compiler and the runtime read.
    moe_layer_freq: int | tuple[int, ...] = 1
    moe_first_dense_layers: int = 0
    # token dropping and the router (Megatron-Core TransformerConfig `moe_expert_capacity_factor`,
    # `moe_pad_expert_input_to_capacity`, `moe_token_drop_policy`, `moe_router_load_balancing_type`,
    # `moe_aux_loss_coeff`, `moe_shared_expert_overlap`); None capacity = dropless
    moe_capacity_factor: float | None = None
    moe_pad_to_capacity: bool = False
    moe_token_drop_policy: str = "probs"  # probs | position
    moe_load_balancing: str = "aux_loss"  # aux_loss | seq_aux_loss | global_aux_loss | sinkhorn | none
    moe_aux_loss_coeff: float = 1e-2
    moe_shared_expert_overlap: bool = False
    # the router (Megatron-Core `moe_router_score_function`, `moe_router_pre_softmax`,
    # `moe_router_topk_scaling_factor`, `moe_router_enable_expert_bias`, `moe_router_bias_update_rate`,
    # `moe_router_num_groups`, `moe_router_group_topk`): DeepSeek-V3's sigmoid, aux-loss-free, group-limited
    moe_router_score: str = "softmax"  # softmax | sigmoid
    moe_router_pre_softmax: bool = False  # forced on for top_k = 1 by the runtime (W107)
    moe_topk_scaling_factor: float | None = None
    moe_expert_bias: bool = False
    moe_expert_bias_update_rate: float = 1e-3
    moe_router_groups: int = 0  # 0 = no group-limited routing
    moe_router_group_topk: int = 0
    norm_epsilon: float = 1e-5
    # Gemma 3 (Gemma3ForCausalLM): RMSNorm scales by (1 + w) (weights stored zero-centred); a norm after the
    # attention and after the MLP output too (sandwich norms, before each residual add); the input
    # embedding multiplied by sqrt(hidden); attention scores scaled by softmax_scale (None = 1/sqrt(head_dim));
    # sliding-window attention of `sliding_window` tokens (0 = none) in every layer but each
    # `full_attention_every`-th (1-based; 0 = every layer slides), whose RoPE base is `local_rotary_base`
    # (None = rotary_base).
    norm_zero_centered: bool = False
    post_block_norms: bool = False
    embedding_scale: bool = False
    softmax_scale: float | None = None
    sliding_window: int = 0
    full_attention_every: int = 0
    local_rotary_base: float | None = None
    # Multi-latent attention (DeepSeek-V2/V3; Megatron-Core 0.16.1 MLATransformerConfig, same names): the
    # query through a q_lora_rank latent (0 = projected directly, Megatron's None), keys and values through
    # one kv_lora_rank latent; per head qk_head_dim + qk_pos_emb_head_dim query/key channels (the RoPE part
    # of the key shared by every head) and v_head_dim value channels. rope_type yarn reads
    # rope_scaling_factor as YaRN's factor and the four YaRN fields below.
    multi_latent_attention: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    rope_type: str = "rope"  # rope | yarn
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # Multi-token prediction (DeepSeek-V3 Sec. 2.2; Megatron-Core TransformerConfig `mtp_num_layers` (0 here for
    # Megatron's None), `mtp_loss_scaling_factor`): depth and loss weight. Each depth is one transformer layer of
    # the last layer's kind plus enorm, hnorm, eh_proj (2h -> h) and a final norm, on the last pipeline stage.
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    source: str = ""  # citation for a preset (paper / model card)
    init: str | None = None  # a Hugging Face checkpoint directory every stage starts from (absolute path)

    def __hash__(self) -> int:
        # The memory and cost models' caches hash the model on every call (~16k times in the 405B
        # search); three fields instead of all of them: equal models still hash equal (dataclass eq
        # compares every field), so only the rare collision of two variants costs an equality check.
        return hash((self.name, self.layers, self.hidden))

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    @property
    def qk_dim(self) -> int:
        """Channels per head of a query and a key in the attention core (MLA: qk_head_dim + qk_pos_emb_head_dim)."""
        return self.qk_head_dim + self.qk_pos_emb_head_dim if self.multi_latent_attention else self.head_dim

    @property
    def v_dim(self) -> int:
        """Channels per head of a value (and of the core's output) in the attention core."""
        return self.v_head_dim if self.multi_latent_attention else self.head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads the core attends with: query_groups, every head under MLA (keys are per head)."""
        return self.heads if self.multi_latent_attention else self.query_groups

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def moe_layer_pattern(self) -> tuple[int, ...]:
        """1 (expert layer) or 0 (dense MLP) per layer, in Megatron-Core's global layer order
        (gpt_layer_specs.py `get_gpt_decoder_layer_specs`: `1 if i % moe_layer_freq == 0` for an int, the list as
        given), with the first `moe_first_dense_layers` dense. All 0 for a dense model."""
        freq = self.moe_layer_freq  # a list where the fields came from JSON (a Hugging Face manifest)
        freq = freq if isinstance(freq, int) else tuple(freq)
        return moe_layer_pattern(self.layers, self.experts, freq, self.moe_first_dense_layers)

    @property
    def moe_layer_count(self) -> int:
        """Expert layers of the model (= layers for a MoE model with every layer sparse, 0 for a dense one)."""
        return sum(self.moe_layer_pattern)

    @property
    def has_dense_layers(self) -> bool:
        """A MoE model some of whose layers are dense MLPs (Megatron-Core builds them from the dense layer spec)."""
        return self.is_moe and self.moe_layer_count < self.layers

    @property
    def megatron_moe_layer_freq(self) -> int | list[int]:
        """TransformerConfig's `moe_layer_freq` for this model: the int as written when no dense prefix is added,
        else the per-layer list (Megatron-Bridge's DeepSeek-V3 recipe: `[0] * 3 + [1] * 58`)."""
        if isinstance(self.moe_layer_freq, int) and not self.moe_first_dense_layers:
            return self.moe_layer_freq
        return list(self.moe_layer_pattern)

    @property
    def dense_layer_model(self) -> ModelSpec:
        """The same model with every layer dense (experts 0, MLPs of ffn_hidden): one of its layers is what a
        dense layer of this MoE model computes, holds and stores, so the FLOPs, memory and cost models price a
        dense layer as a layer of it."""
        return _dense_layer_model(self)

    @property
    def mtp_layer_is_moe(self) -> bool:
        """Whether a multi-token prediction layer is an expert layer: Megatron-Core builds it from the decoder
        block's last layer spec (gpt_layer_specs.py `get_gpt_mtp_block_spec_for_backend`: `spec.layer_specs[-1]`)."""
        return self.is_moe and bool(self.moe_layer_pattern[-1])

    def without_mtp(self) -> ModelSpec:
        """The same model without multi-token prediction (what a stage kind that does not train it builds); the MTP
        loss weight back at its default, since nothing reads it there (W127 is about what the user wrote)."""
        if not self.mtp_num_layers:
            return self
        default = ModelSpec.__dataclass_fields__["mtp_loss_scaling_factor"].default
        return replace(self, mtp_num_layers=0, mtp_loss_scaling_factor=default)

    @property
    def drop_and_pad(self) -> bool:
        """Every expert's input padded to its capacity (fixed shapes: the CUDA-graph scope `moe`)."""
        return self.moe_capacity_factor is not None and self.moe_pad_to_capacity

    def is_sliding_layer(self, layer: int) -> bool:
        """Whether 1-based layer `layer` attends through the sliding window (Gemma 3's layer_types)."""
        if not self.sliding_window:
            return False
        return not (self.full_attention_every and layer % self.full_attention_every == 0)

    @property
    def local_layer_only(self) -> bool:
        """Gemma 3's parts that Megatron-Core's GPTModel has no switch for: the nemoc runtime builds them as its
        own modules on the local layer spec, never Transformer Engine's layers."""
        return bool(self.norm_zero_centered or self.post_block_norms or self.embedding_scale
                    or self.local_rotary_base is not None)

    @property
    def sliding_layers(self) -> int:
        return sum(self.is_sliding_layer(i) for i in range(1, self.layers + 1))


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    gpu: str  # catalog id: A100-40GB, A100-80GB, H100, H200, B200, B300, GB200, GB300, CPU
    nodes: int = 1
    gpus_per_node: int = 8
    usd_per_gpu_hour: float | None = None
    scheduler: str = "local"  # local | slurm | k8s
    # the scheduler's options, typed, every default filled and durations in seconds (compiler/params.py);
    # a mapping given here (tests, a plan read back) becomes the scheduler's record
    scheduler_options: SchedulerOptions = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler_options", SchedulerOptions.of(self.scheduler, self.scheduler_options))

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, slots=True)
class ParallelSpec:
    """What the user asked for; `None` = auto."""

    tensor: int | None = None
    pipeline: int | None = None
    virtual_pipeline: int | None = None
    context: int | None = 1
    expert: int | None = 1
    expert_tensor: int | None = None
    data: int | None = None
    sequence_parallel: bool | None = None
    distributed_optimizer: bool | None = None  # auto: on, off with sgd in a training stage (search, E129)
    recompute: str | None = None  # none | selective | full
    # With recompute = full: transformer layers per model chunk whose input is checkpointed and
    # replayed (Megatron `recompute_method = "block"`); None = auto (the search), all layers when fixed
    # to full without it.
    recompute_layers: int | None = None
    # With recompute = selective: the layer parts recomputed (Megatron `recompute_modules`); None = not
    # written, Megatron's default ("core_attn",).
    recompute_modules: tuple[str, ...] | None = None
    micro_batch: int | None = None
    # Recipe performance settings (fixed, not searched): Transformer Engine's userbuffer TP
    # communication overlap, and Megatron DDP's gradient reduction dtype (fp32 main grads, or the
    # parameters' 16-bit dtype as NeMo's FP8 performance recipes reduce).
    tp_comm_overlap: bool = False
    # the output layer's weight-gradient GEMMs of the last pipeline stage run in the drain (Megatron-Core
    # `defer_embedding_wgrad_compute`), for the first `wgrad_deferral_limit` micro batches (0: all)
    defer_embedding_wgrad_compute: bool = False
    wgrad_deferral_limit: int = 0
    grad_reduce_in_fp32: bool = True
    overlap_param_gather: bool = False  # the distributed optimizer's parameter all-gather in the forward
    fp8_param_gather: bool = False  # linear weights kept (and all-gathered) in FP8
    megatron_fsdp: bool = False  # Megatron-FSDP, optim_grads_params (ZeRO-3)
    optimizer_state_dtype: str = "fp32"  # Adam moments: fp32 | bf16 (precision-aware optimizer)
    precision_aware_optimizer: bool | None = None  # None = auto: on exactly with bf16 moments

    @property
    def precision_aware(self) -> bool:
        """Whether the stage runs Megatron-Core's precision-aware optimizer: as written, or (auto) exactly
        when the Adam moments are 16-bit (the meaning `optimizer_state_dtype = bf16` always had)."""
        if self.precision_aware_optimizer is not None:
            return self.precision_aware_optimizer
        return self.optimizer_state_dtype != "fp32"


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    name: str = "adam"  # adam | sgd
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    name: str = "cosine"  # cosine | linear | constant | wsd
    warmup: int = 0  # steps
    min_lr: float = 0.0
    decay_steps: int | None = None  # None = all remaining steps


@dataclass(frozen=True, slots=True)
class CheckpointSpec:
    every: int | None = None  # steps; None = only at the end
    keep: int = 3
    async_save: bool = False


@dataclass(frozen=True, slots=True)
class TrackingSpec:
    """Where the runtime sends metrics besides metrics.jsonl (the runtime's tracking sinks)."""

    wandb: bool = False
    mlflow: str | None = None  # a directory (file store, relative to the .nemo file) or a tracking URI
    project: str | None = None  # None: the experiment's name
    tensorboard: bool = True


@dataclass(frozen=True, slots=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")  # or peft's q k v o gate up down
    rslora: bool = False  # scale alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank


@dataclass(frozen=True, slots=True)
class DataSpec:
    name: str
    path: str  # glob, relative to the .nemo file's directory unless absolute
    format: str = "text"  # text | jsonl | chat | preference | prompt_response | unpaired
    text_field: str = "text"
    tokenizer: str | None = None  # path to tokenizer.json / *.model / "tiktoken:cl100k_base"; None = train a byte-level BPE
    vocab_size: int | None = None  # for a locally trained tokenizer
    weight: float = 1.0  # blending weight
    split: tuple[float, float, float] = (0.98, 0.02, 0.0)  # train / validation / test
    options: Mapping[str, object] = field(default_factory=_empty)
    # a local Hugging Face dataset (compiler/hfdata.py layouts): the split to read and column renames
    hf_split: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # (source column, the key the format reads)


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str
    kind: str  # pretrain | sft | dpo | kto | orpo | reward | ppo | grpo | eval | export
    after: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    tokens: int | None = None  # total training tokens
    steps: int | None = None
    epochs: float | None = None
    global_batch: int | None = None  # sequences per step
    seq_length: int | None = None  # None = model.seq_length
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    peft: LoraSpec | None = None
    parallel: ParallelSpec | None = None  # a stage-level override of the experiment's parallel block
    log_every: int = 10
    eval_every: int | None = None
    seed: int = 1234
    # kind-specific parameters (beta, loss, prompts, ...): the kind's typed record with every default filled
    # (compiler/params.py); a mapping given here (tests) becomes the kind's record, refusing unknown names
    params: StageParams = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", StageParams.of(self.kind, self.params))


@dataclass(frozen=True, slots=True)
class ExperimentSpec:
    name: str
    model: ModelSpec
    cluster: ClusterSpec
    parallel: ParallelSpec
    precision: str = "bf16"  # bf16 | fp16 | fp32 | fp8 | mxfp8 | nvfp4
    fp8_recipe: str | None = None  # delayed | tensorwise | blockwise | mxfp8; None = auto (execution.fp8_recipe_of)
    moe_dispatcher: str | None = None  # alltoall | allgather | flex; None = auto (execution.moe_execution)
    moe_grouped_gemm: bool | None = None  # None = auto
    moe_permute_fusion: bool | None = None  # None = auto
    cuda_graph_impl: str | None = None  # none | local | transformer_engine; None = auto (execution.host_execution)
    cuda_graph_scope: tuple[str, ...] = ()  # () = the whole layer
    manual_gc: bool | None = None  # None = auto
    manual_gc_interval: int | None = None  # None = auto
    cross_entropy_fusion: str | None = None  # te | native | none; None = auto (execution.cross_entropy_of)
    bf16_first_layers: int = 0  # layers at the start kept in bf16 under fp8 / mxfp8 / nvfp4
    bf16_last_layers: int = 0  # ... at the end
    attention_backend: str = "auto"  # auto | flash | fused | unfused
    kernels: str = "auto"  # auto | te | local (resolve_kernels)
    data: tuple[DataSpec, ...] = ()
    stages: tuple[StageSpec, ...] = ()
    root: str = "."  # directory of the .nemo file; data paths are relative to it
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    spans: Mapping[str, Span] = field(default_factory=_empty, compare=False)

    def span(self, *paths: str) -> Span | None:
        """The span of the first path the user wrote, e.g. span("parallel.tensor", "parallel")."""
        for path in paths:
            if path in self.spans:
                return self.spans[path]
        return None

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


# ------------------------------------------------------------------------------------------ kernels

KERNELS = ("te", "local")  # the layer kernel sets the cost / memory models and the runtime know


def resolve_kernels(kernels: str, gpu: str, model: ModelSpec | None = None) -> str:
    """The experiment's `kernels` setting resolved for the cluster's accelerator: `auto` is
    Transformer Engine (`te`) on GPUs, where NGC / NeMo containers ship it, and Megatron-Core's
    local spec (`local`) on the CPU (the gloo runtime has no Transformer Engine) and for a model whose
    layer exists on the local spec only (`ModelSpec.local_layer_only`: Gemma 3; a written `te` is E179)."""
    if kernels != "auto":
        return kernels
    return "local" if gpu == "CPU" or (model is not None and model.local_layer_only) else "te"
