"""The compiled plan: versioned, serializable data that is all the runtime ever sees.

Input:  built by the plan search (`nemoc.compiler.search`) from an `ExperimentSpec`.
Output: `to_json` gives deterministic, sorted JSON; `from_json(to_json(p)) == p`. The runtime reads
only this (never the AST, never the spec's spans); one function in the runtime turns a `StagePlan`
into Megatron-Core arguments.
Invariants: every parallel size is resolved (no `auto` left); `tp*pp*cp*dp == world size`;
memory figures are bytes per GPU on the most-loaded pipeline stage.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from nemoc.compiler.rules import stage_kernels
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
    resolve_kernels,
)

PLAN_VERSION = 1


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
    tp_comm_overlap: bool = False  # TE userbuffer TP overlap (`TransformerConfig.tp_comm_overlap`)
    grad_reduce_in_fp32: bool = True  # `DistributedDataParallelConfig.grad_reduce_in_fp32`
    overlap_param_gather: bool = False  # `DistributedDataParallelConfig.overlap_param_gather`

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


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
    peft: LoraSpec | None = None
    log_every: int = 10
    eval_every: int | None = None
    seed: int = 1234
    params: Mapping[str, object] = field(default_factory=_empty)
    resident_models: tuple[str, ...] = ("policy",)  # which models the stage keeps in memory
    # The layer kernels the stage was costed with and the runtime builds: te | local (rules.stage_kernels).
    kernels: str = "te"


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
    tracking: TrackingSpec = field(default_factory=TrackingSpec)  # metric sinks (runtime/tracking.py)

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
        raise ValueError(f"plan version {version} is not supported (this nemoc reads version {PLAN_VERSION})")
    return _build(Plan, _with_kernels(data))  # type: ignore[return-value]


def _with_kernels(data: Mapping) -> Mapping:
    """Plans written before `kernels` existed: the default the planner would have resolved (`auto`:
    Transformer Engine on GPUs, local on the CPU) and, per stage, what the runtime runs that kind with."""
    if "kernels" in data and all("kernels" in s for s in data.get("stages", ())):
        return data
    kernels = data.get("kernels") or resolve_kernels("auto", (data.get("cluster") or {}).get("gpu", ""))
    stages = [s if "kernels" in s else dict(s, kernels=stage_kernels(s.get("kind", "pretrain"), kernels))
              for s in data.get("stages", ())]
    return dict(data, kernels=kernels, stages=stages)


def from_json(text: str) -> Plan:
    return from_dict(json.loads(text))
