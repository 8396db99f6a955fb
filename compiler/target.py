"""The target description: what the runtime that will execute a plan can run, handed to the planner as data.

Input:  built by whoever executes plans (the nemoc runtime describes itself in its own package) and
        passed to `check_spec` / `plan_experiment` by the CLI; `MEGATRON_CORE` (everything Megatron-Core
        0.16.1 runs, every stage kind alike) when none is given.
Output: per stage kind a `StageCaps` (pipeline, Transformer Engine, MoE, FP8, a forced attention core),
        and the communication overlaps the target switches on. The rules, the search and the cost and
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
    te: bool = True  # builds Transformer Engine's layer spec when the plan says kernels = te
    moe: bool = True  # builds mixture-of-experts models
    fp8: bool = True  # runs fp8 / mxfp8 GEMMs (otherwise an fp8 model's stage runs in bf16)
    attention: str | None = None  # the attention core it always builds (None: the plan's attention_backend)
    one_process: bool = False  # eval / export: one process at TP = 1 (eval on one GPU, export on the host CPU)
    kv_cache_rollout: bool = True  # ppo: the rollout decodes with a KV cache (else one full forward per token)
    hf_init: bool = True  # starts from a converted Hugging Face checkpoint (`init = hf(DIR)`)
    runs: str = "the target runs every Megatron-Core schedule"  # how it runs the kind, for messages
    source: str = ""  # where the target enforces its limits, cited by the diagnostics


@dataclass(frozen=True, slots=True)
class Target:
    """A runtime's capabilities; `stages` maps a stage kind to its caps (missing kinds: `StageCaps()`)."""

    name: str
    stages: Mapping[str, StageCaps] = field(default_factory=lambda: MappingProxyType({}))
    overlap_p2p: bool = True  # the interleaved schedule overlaps its pipeline transfers (overlap_p2p_comm)
    moe_linear_bias: bool = False  # builds MoE models with linear biases (Megatron-Core 0.16.1 mlp.py fails)

    def caps(self, stage_kind: str) -> StageCaps:
        return self.stages.get(stage_kind, _ALL)

    def stage_kernels(self, stage_kind: str, kernels: str) -> str:
        """The kernels a stage runs (and is costed) with: the experiment's resolved `kernels` (te |
        local), except where the target builds the kind with the local spec only."""
        return kernels if self.caps(stage_kind).te else "local"

    def stage_attention(self, stage_kind: str, attention_backend: str) -> str:
        """The attention core a stage runs (and is costed) with: the plan's, unless the target forces one."""
        return self.caps(stage_kind).attention or attention_backend

    def stage_precision(self, stage_kind: str, precision: str) -> str:
        """The precision a stage runs (and is costed) in: the experiment's, except that a kind the target
        runs without FP8 GEMMs runs an fp8 / mxfp8 / nvfp4 model (16-bit weights) in bf16."""
        return "bf16" if precision in ("fp8", "mxfp8", "nvfp4") and not self.caps(stage_kind).fp8 else precision


_ALL = StageCaps()

MEGATRON_CORE = Target(name="megatron-core")
