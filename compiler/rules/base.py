"""The data every layout rule sees: `Sizes` (one stage's parallel sizes, None = auto), `Env` (model,
cluster, precision, kernels, target), `Violation` (one broken rule, as plain data) and small helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nemoc.compiler.spec import ClusterSpec, ExperimentSpec, ModelSpec, StageSpec
from nemoc.compiler.target import MEGATRON_CORE, Target
from nemoc.dsl.diagnostics import Diagnostic, Severity
from nemoc.dsl.schema import TRAINING_KINDS as SCHEMA_TRAINING_KINDS


TRAINING_KINDS = SCHEMA_TRAINING_KINDS  # the stage kinds that train (dsl.schema.STAGE_KIND_TABLE)


RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True, slots=True)
class Sizes:
    """The parallel sizes of one stage as the rules see them; `None` = auto (unknown yet)."""

    tp: int | None = None
    pp: int | None = None
    vp: int | None = None  # None = auto or no interleaving (see `interleaved`)
    cp: int | None = 1
    ep: int | None = 1
    etp: int | None = None
    dp: int | None = None
    micro_batch: int | None = None
    global_batch: int | None = None
    sequence_parallel: bool | None = None
    distributed_optimizer: bool | None = True
    recompute: str | None = None
    recompute_layers: int | None = None
    recompute_modules: tuple[str, ...] | None = None  # None = not written (Megatron's ["core_attn"])
    seq_length: int = 0
    tp_comm_overlap: bool = False
    defer_embedding_wgrad_compute: bool = False
    wgrad_deferral_limit: int = 0
    overlap_param_gather: bool = False
    fp8_param_gather: bool = False
    megatron_fsdp: bool = False
    optimizer_state_dtype: str = "fp32"
    precision_aware_optimizer: bool = False  # resolved (ParallelSpec.precision_aware)


@dataclass(frozen=True, slots=True)
class Env:
    """What the rules need besides the sizes: model, cluster and experiment-wide settings."""

    model: ModelSpec
    cluster: ClusterSpec
    precision: str = "bf16"
    attention_backend: str = "flash"  # resolved or "auto"
    gpu_arch: str | None = None  # ampere | hopper | blackwell | cpu (HardwareSpec.generation)
    gpu_precisions: tuple[str, ...] | None = None  # precisions the GPU runs (None = GPU unknown)
    stage_kind: str = "pretrain"
    kernels: str = "te"  # the experiment's resolved `kernels`: te | local
    optimizer: str = "adam"  # the stage's optimizer: adam | sgd
    target: Target = MEGATRON_CORE  # what the runtime that executes the plan can run
    fp8_recipe: str | None = None  # the recipe the user wrote (None = auto)
    # an export stage with an initial checkpoint and no parent: the hf_import -> hf_export conversion
    # (compiler.graph), which builds no model, so the stage kind's model limits (dense only) do not apply
    hf_conversion: bool = False
    # the MoE settings the user wrote (None = auto): moe_dispatcher, moe_grouped_gemm, moe_permute_fusion
    moe_requested: tuple = (None, None, None)
    # the host settings the user wrote: (cuda_graph_impl | None, cuda_graph_scope, manual_gc | None,
    # manual_gc_interval | None)
    host_requested: tuple = (None, (), None, None)
    packed: bool = False  # the stage packs several samples per row (sft `pack = true`)
    cross_entropy_fusion: str | None = None  # the loss the user wrote: te | native | none (None = auto)
    bf16_layers: tuple[int, int] = (0, 0)  # layers kept in bf16 at the start and the end (as written)
    dropout: bool = False  # the stage's hidden / attention dropout is on (its `dropout` > 0)

    @property
    def stage_kernels(self) -> str:
        """The kernels this stage runs with on the target."""
        return self.target.stage_kernels(self.stage_kind, self.kernels)


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule, as plain data; `anchors` are spec span paths, most specific first."""

    code: str
    message: str
    equation: str
    hint: str | None = None
    anchors: tuple[str, ...] = ()
    severity: Severity = Severity.ERROR
    source: str = ""  # the Megatron source it mirrors

    @property
    def short(self) -> str:
        return f"{self.code} {self.equation}"


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


Rule = Callable[[Env, Sizes], "Violation | None"]


_P = "parallel."


def _tp_hint(env: Env) -> str:
    """Tensor-parallel sizes within one node that pass E102, E103 and E104 together."""
    m = env.model
    f = m.shared_expert_ffn_hidden if m.is_moe else m.ffn_hidden
    ok = [t for t in range(1, env.cluster.gpus_per_node + 1)
          if m.heads % t == 0 and (m.query_groups % t == 0 or t % m.query_groups == 0) and (not f or f % t == 0)]
    return f"use tensor = one of {', '.join(map(str, ok))} (they divide heads, query groups and the MLP, within a node)"


def _divisors_upto(n: int, limit: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, limit) + 1) if n % d == 0)


def stage_seq_length(spec: ExperimentSpec, stage: StageSpec) -> int:
    return stage.seq_length or spec.model.seq_length


def to_diagnostic(v: Violation, spec: ExperimentSpec, stage: StageSpec | None = None) -> Diagnostic:
    """Anchor a violation at the most specific span the user wrote (stage-level first)."""
    paths: list[str] = []
    for a in v.anchors:
        if stage is not None and a.startswith("stage."):
            paths.append(f"stage.{stage.name}.{a[len('stage.'):]}")
        elif stage is not None and a.startswith(_P):
            paths += [f"stage.{stage.name}.{a}", a]
        else:
            paths.append(a)
    fallback = ([f"stage.{stage.name}.parallel", f"stage.{stage.name}"] if stage else []) + ["parallel", "model"]
    where = f" (stage `{stage.name}`)" if stage is not None else ""
    return Diagnostic(
        code=v.code, message=v.message + where, span=spec.span(*paths, *fallback), severity=v.severity,
        equation=v.equation, hint=v.hint,
    )
