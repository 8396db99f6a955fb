"""The target description: what the runtime that will execute a plan can run, handed to the planner as data.

Input:  built by whoever executes plans (the nemoc runtime describes itself in its own package) and
        passed to `check_spec` / `plan_experiment` by the CLI; `MEGATRON_CORE` (everything Megatron-Core
        0.16.1 runs, every stage kind alike) when none is given.
Output: per stage kind a `StageCaps` (pipeline, Transformer Engine, MoE, FP8, a forced attention core),
        the attention core built per (kernels, attention_backend) with what it splits over
        context-parallel ranks (`AttentionCore`), and the communication overlaps the target switches on. The rules, the search and the cost and
        memory models read it; the plan records what it implied (`plan.Execution`).
Invariants: pure data, frozen; the compiler knows no runtime code, only this description.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class StageCaps:
    """What the target runs for one stage kind (not what Megatron-Core could run)."""

    pipeline: bool = True  # pp > 1 (and so virtual pipeline stages, where `virtual_pipeline`)
    virtual_pipeline: bool = True  # vp > 1: the interleaved schedule (needs `pipeline`)
    context_parallel: bool = True  # cp > 1: the sequence split over a context-parallel group
    # cp > 1 for a stage that packs several samples per row (sft `pack = true`: variable-length `thd`
    # sequences, which Megatron-Core splits over CP ranks only with Transformer Engine's THD attention)
    packed_context_parallel: bool = True
    # tp > 1 with sequence parallelism (the activations split along the sequence over the TP group); a
    # KV-cached decode step feeds one token per row, which that split cannot divide
    sequence_parallel: bool = True
    te: bool = True  # builds Transformer Engine's layer spec when the plan says kernels = te
    moe: bool = True  # builds mixture-of-experts models
    fp8: bool = True  # runs fp8 / mxfp8 GEMMs (otherwise an fp8 model's stage runs in bf16)
    attention: str | None = None  # the attention core it always builds (None: the plan's attention_backend)
    one_process: bool = False  # eval / export: one process at TP = 1 (eval on one GPU, export on the host CPU)
    kv_cache_rollout: bool = True  # ppo: the rollout decodes with a KV cache (else one full forward per token)
    hf_init: bool = True  # starts from a converted Hugging Face checkpoint (`init = hf(DIR)`)
    megatron_fsdp: bool = True  # wraps a training stage in Megatron-FSDP where the plan says so (else DDP)
    # captures CUDA graphs where the plan says so (cuda_graph_impl; else the stage runs eagerly and its plan
    # prices no graphs)
    cuda_graphs: bool = True
    # overlaps the distributed optimizer's parameter all-gather with the next forward where the plan says so
    # (`overlap_param_gather`; else the gather runs after the optimizer step and the plan prices it there)
    overlap_param_gather: bool = True
    # ... and does so while it captures CUDA graphs (Megatron-LM switches the gather's forward pre-hooks off
    # around graph warm-up and capture: training.py train(), cuda_graph_warmup_steps); else a stage with
    # graphs gathers after the optimizer step and the plan prices it there
    graphed_param_gather: bool = True
    runs: str = "the target runs every Megatron-Core schedule"  # how it runs the kind, for messages
    source: str = ""  # where the target enforces its limits, cited by the diagnostics


@dataclass(frozen=True, slots=True)
class AttentionCore:
    """One attention core a target builds, and whether it splits a sequence over context-parallel ranks
    (each rank holding Megatron's load-balanced shard of every row, get_batch_on_this_cp_rank)."""

    name: str  # what it is, for messages ("Transformer Engine's attention", "Megatron-Core's unfused core")
    context_parallel: bool = False  # attends a cp > 1 shard of a causal sequence
    # ... and sliding-window layers (Gemma 3) at cp > 1 too
    sliding_window_context_parallel: bool = False
    source: str = ""  # where the core is, or where it refuses cp > 1


# Megatron-Core 0.16.1's own cores. Transformer Engine's DotProductAttention (flash-attn or cuDNN fused)
# runs ring attention over the CP group (extensions/transformer_engine.py TEDotProductAttention, cp_group);
# its unfused core and Megatron's local DotProductAttention assert context_parallel_size == 1.
TE_ATTENTION = AttentionCore(
    "Transformer Engine's flash / fused attention", context_parallel=True,
    source="megatron/core/extensions/transformer_engine.py TEDotProductAttention (cp_group, cp_comm_type)")
TE_UNFUSED = AttentionCore(
    "Transformer Engine's unfused attention",
    source="transformer_engine UnfusedDotProductAttention (no context parallelism)")
MEGATRON_UNFUSED = AttentionCore(
    "Megatron-Core's unfused DotProductAttention",
    source="megatron/core/transformer/dot_product_attention.py DotProductAttention (context_parallel_size == 1)")

_BACKENDS = ("auto", "flash", "fused", "unfused")


def attention_cores(local: AttentionCore) -> Mapping[tuple[str, str], AttentionCore]:
    """(kernels, attention_backend) -> core: TE's for every backend but `unfused` with `te` kernels, and
    `local` as the local spec's core for every backend but `unfused` (Megatron's DotProductAttention)."""
    cores = {("te", b): TE_UNFUSED if b == "unfused" else TE_ATTENTION for b in _BACKENDS}
    cores.update({("local", b): MEGATRON_UNFUSED if b == "unfused" else local for b in _BACKENDS})
    return MappingProxyType(cores)


@dataclass(frozen=True, slots=True)
class Target:
    """A runtime's capabilities; `stages` maps a stage kind to its caps (missing kinds: `StageCaps()`)."""

    name: str
    stages: Mapping[str, StageCaps] = field(default_factory=lambda: MappingProxyType({}))
    overlap_p2p: bool = True  # the interleaved schedule overlaps its pipeline transfers (overlap_p2p_comm)
    moe_linear_bias: bool = False  # builds MoE models with linear biases (Megatron-Core 0.16.1 mlp.py fails)
    # the attention core built per (kernels: te | local, the stage's attention_backend); Megatron-Core's
    # local spec builds its DotProductAttention for every backend
    attention_cores: Mapping[tuple[str, str], AttentionCore] = field(
        default_factory=lambda: attention_cores(MEGATRON_UNFUSED))

    def caps(self, stage_kind: str) -> StageCaps:
        return self.stages.get(stage_kind, _ALL)

    def stage_kernels(self, stage_kind: str, kernels: str) -> str:
        """The kernels a stage runs (and is costed) with: the experiment's resolved `kernels` (te |
        local), except where the target builds the kind with the local spec only."""
        return kernels if self.caps(stage_kind).te else "local"

    def stage_attention(self, stage_kind: str, attention_backend: str) -> str:
        """The attention core a stage runs (and is costed) with: the plan's, unless the target forces one."""
        return self.caps(stage_kind).attention or attention_backend

    def attention_core(self, stage_kind: str, kernels: str, attention_backend: str) -> AttentionCore:
        """The core a stage builds with the kernels it runs (`stage_kernels` of the experiment's, or
        `local` where no Transformer Engine runs: the CPU) and its attention backend (`stage_attention`)."""
        key = (self.stage_kernels(stage_kind, kernels), self.stage_attention(stage_kind, attention_backend))
        return self.attention_cores.get(key) or AttentionCore(f"an unknown core ({key[0]}, {key[1]})")

    def stage_precision(self, stage_kind: str, precision: str) -> str:
        """The precision a stage runs (and is costed) in: the experiment's, except that a kind the target
        runs without FP8 GEMMs runs an fp8 / mxfp8 / nvfp4 model (16-bit weights) in bf16."""
        return "bf16" if precision in ("fp8", "mxfp8", "nvfp4") and not self.caps(stage_kind).fp8 else precision


_ALL = StageCaps()

MEGATRON_CORE = Target(name="megatron-core")
