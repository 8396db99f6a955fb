"""The planner: an `ExperimentSpec` in, a compiled `Plan` (every `auto` resolved) out.

Input:  an `ExperimentSpec` (from `nemoc.compiler.lower`), the memory headroom.
Output: a `PlanResult`: the `Plan` the runtime consumes, and per stage the runner-up layouts and why
        the other candidates lost, plus every warning (rules Megatron would rewrite, estimates made).
Invariants: pure (reads only the data files' sizes, to estimate epoch-based step counts); raises
        `DiagnosticError` once with every error: broken rules (anchored at the user's spans), or a
        stage that fits nowhere (naming the overflowing term and the cheapest change that fits).

Per stage: the stage's `parallel` block overrides the experiment's (`rules.stage_parallel`); training
stages (pretrain, sft, dpo, reward, ppo) are searched (`nemoc.compiler.search`); eval and export do
not train: they get the least model parallelism that fits (tp = pp = 1 unless the model needs more)
and, for eval, a forward-only estimate; export gets no time estimate (it runs no steps). Every stage
is costed with the layer kernels the target builds it with (`Target.stage_kernels`: the experiment's
`kernels`, `auto` -> te on GPUs / local on the CPU; local where the target has no TE path for the kind).
The `Target` (what the runtime can execute) is data handed in by the caller (the CLI passes the nemoc
runtime's); each stage plan records what was decided in its `Execution` (`nemoc.compiler.execution`).
"""

from __future__ import annotations

import glob
import math
import os
import time
from dataclasses import dataclass, replace

from nemoc.compiler import chattemplate
from nemoc.compiler.catalog.hardware import HardwareSpec, get_gpu
from nemoc.compiler.execution import (fp8_recipe_of, full_iteration_graph, host_defaults_taken, moe_defaults_taken,
                                      reuses_grad_buffer, stage_execution, stage_host)
from nemoc.compiler.flops import param_counts
from nemoc.compiler.memory import resident_models, weight_bytes
from nemoc.compiler.plan import Estimate, Plan, StagePlan
from nemoc.compiler.rules import (
    TRAINING_KINDS,
    WARNING_RULES,
    check_spec,
    env_of,
    stage_parallel,
    stage_seq_length,
    to_diagnostic,
    violations,
)
from nemoc.compiler.hfimport import ImportEstimate, estimate_import
from nemoc.compiler.rules.check import host_requested
from nemoc.compiler.rules.stages import _initial_checkpoint, is_hf_conversion, stage_mtp_layers
from nemoc.compiler.search import (
    DEFAULT_HEADROOM,
    DEFAULT_TOP,
    MEMORY_TERMS,
    Candidate,
    Problem,
    SearchResult,
    _sizes,
    describe,
    divisors,
    evaluate_time,
    gib,
    search,
)
from nemoc.compiler.params import packs_sequences
from nemoc.compiler.spec import ExperimentSpec, ParallelSpec, StageSpec, resolve_kernels
from nemoc.compiler.target import MEGATRON_CORE, Target
from nemoc.dsl.diagnostics import Diagnostic, DiagnosticError, Note, Severity

BYTES_PER_TOKEN = 4.0  # ~4 bytes of UTF-8 text per BPE token (GPT-2/Llama tokenizers on English)


@dataclass(frozen=True, slots=True)
class StageResult:
    name: str
    kind: str
    search: SearchResult | None  # None for a stage that needs no search
    chosen: Candidate
    notes: tuple[str, ...] = ()  # how steps / estimates were derived
    problem: Problem | None = None  # what the search solved (bench/calibrate.py re-costs the chosen layout)

    @property
    def runner_ups(self) -> tuple[Candidate, ...]:
        if self.search is None:
            return ()
        return tuple(c for c in self.search.ranked if c.layout != self.chosen.layout)


@dataclass(frozen=True, slots=True)
class PlanResult:
    plan: Plan
    stages: tuple[StageResult, ...]
    warnings: tuple[Diagnostic, ...]
    elapsed_s: float = 0.0

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)


# --------------------------------------------------------------------------------------- helpers


def _imports(spec: ExperimentSpec) -> tuple[ImportEstimate, ...]:
    """The hf_import task of every checkpoint a stage starts from (`init = hf(DIR)`; one per directory,
    as compiler.graph adds them), with its host memory and time (compiler/hfimport.py)."""
    dirs = sorted({d for stage in spec.stages if (d := _initial_checkpoint(spec, stage))})
    return tuple(estimate_import(spec.model, os.path.join(spec.root, d), shown_as=d) for d in dirs)


def _error(code: str, message: str, spec: ExperimentSpec, stage: StageSpec | None, *paths: str,
           equation: str | None = None, hint: str | None = None, notes: tuple[Note, ...] = ()) -> Diagnostic:
    anchors = [f"stage.{stage.name}.{p}" for p in paths] if stage else []
    anchors += list(paths) + ([f"stage.{stage.name}"] if stage else []) + ["parallel", "model"]
    return Diagnostic(code, message, spec.span(*anchors), Severity.ERROR, equation, hint, notes)


def _dataset_bytes(spec: ExperimentSpec, stage: StageSpec) -> int | None:
    names = stage.data or tuple(d.name for d in spec.data)
    total, found = 0, False
    for d in spec.data:
        if d.name not in names:
            continue
        pattern = d.path if os.path.isabs(d.path) else os.path.join(spec.root, d.path)
        for f in glob.glob(pattern, recursive=True):
            if os.path.isfile(f):
                total += os.path.getsize(f)
                found = True
    return total if found else None


def stage_steps(spec: ExperimentSpec, stage: StageSpec, global_batch: int, seq: int) -> tuple[int, str | None]:
    """Optimizer steps of a stage, and a note when it is an estimate.

    `steps` as written; else ceil(tokens / (global_batch x seq_length)); else epochs x samples /
    global_batch where samples = `params.samples` if given, else the data files' bytes / 4 bytes per
    token / seq_length (packed sequences): an estimate, since the data is not tokenized at plan time.
    """
    if stage.steps is not None:
        return stage.steps, None
    if stage.tokens is not None:
        steps = max(1, math.ceil(stage.tokens / (global_batch * seq)))
        return steps, None
    if stage.epochs is not None:
        samples = stage.params.samples if "samples" in stage.params else None
        if isinstance(samples, int) and samples > 0:
            return max(1, math.ceil(stage.epochs * samples / global_batch)), (
                f"steps = ceil(epochs({stage.epochs}) x samples({samples}) / global_batch({global_batch}))")
        size = _dataset_bytes(spec, stage)
        if size:
            samples = max(1, int(size / BYTES_PER_TOKEN / seq))
            return max(1, math.ceil(stage.epochs * samples / global_batch)), (
                f"steps estimated: data {size} bytes / {BYTES_PER_TOKEN:g} bytes per token / seq_length({seq}) "
                f"~= {samples} samples x epochs({stage.epochs}) / global_batch({global_batch}); "
                "set `steps` or params `samples` for an exact count")
        return 0, "epochs given but the dataset size is unknown at plan time: time and cost exclude this stage"
    return 0, "no tokens, steps or epochs: time and cost exclude this stage"


# bytes per element of the weights an export writes (the stage's `dtype`, resolved at compile time)
_EXPORT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _export_host_note(spec: ExperimentSpec, stage: StageSpec, target: Target) -> str:
    """Host memory of a streamed export: one decoder layer is read and converted at a time (two copies:
    the slice read and the tensor written) and the largest tensor, the embedding or output matrix, is held
    read, converted and written (three copies); fp32 is the upper bound of what the checkpoint stores."""
    counts = param_counts(spec.model)
    width = max(_EXPORT_BYTES.get(str(stage.params.dtype), 4) if "dtype" in stage.params else 4, 4)
    largest = max(counts.embedding, counts.output)
    peak = (2 * counts.per_layer + 3 * largest) * width
    return (f"the target `{target.name}` exports in one process on the host CPU, streaming one layer at a time: "
            f"about {peak / 2**30:,.1f} GiB of host memory at most (2 x one layer {counts.per_layer * width / 2**30:,.2f} "
            f"GiB + 3 x the largest matrix {largest * width / 2**30:,.2f} GiB, fp32); the stage's GPU layout and "
            "memory do not apply to it")


def _packing_note(stage: StageSpec, probe: Problem) -> str | None:
    """What the plan assumed of packed samples' attention (`sft` params `pack`, `sample_tokens`)."""
    params = stage.params
    if stage.kind != "sft" or not params.pack:
        return None
    if probe.attention_span is not None:
        return (f"attention costed within packed samples of {probe.attention_span:,.0f} tokens (sample_tokens; "
                f"variable-length attention), not over the whole {probe.seq_length:,}-token sequence")
    if params.sample_tokens is None and probe.costed_backend != "unfused":
        return (f"pack = true: attention costed over the whole {probe.seq_length:,}-token sequence (an upper "
                "bound); set `sample_tokens` to the mean tokens per sample to cost it within each sample")
    return None


def parent_kinds(spec: ExperimentSpec, stage: StageSpec) -> tuple[str, ...]:
    """The kinds of the stages `stage` runs after, in the order written."""
    return tuple(spec.stage(name).kind for name in stage.after)


def _problem(spec: ExperimentSpec, stage: StageSpec, gpu: HardwareSpec, backend: str, headroom: float,
             parallel: ParallelSpec, steps: int, target: Target = MEGATRON_CORE) -> Problem:
    return Problem(
        model=spec.model, cluster=spec.cluster, gpu=gpu, fixed=parallel, global_batch=stage.global_batch,
        seq_length=stage_seq_length(spec, stage), precision=target.stage_precision(stage.kind, spec.precision),
        fp8_recipe=fp8_recipe_of(target.stage_precision(stage.kind, spec.precision), spec.fp8_recipe),
        attention_backend=backend,
        stage_kind=stage.kind, peft=stage.peft, params=stage.params, headroom=headroom, steps=steps,
        parents=parent_kinds(spec, stage),
        kernels=resolve_kernels(spec.kernels, spec.cluster.gpu, spec.model), optimizer=stage.optimizer.name, target=target,
        hf_conversion=is_hf_conversion(spec, stage),
        moe_requested=(spec.moe_dispatcher, spec.moe_grouped_gemm, spec.moe_permute_fusion),
        host_requested=host_requested(spec), cross_entropy_requested=spec.cross_entropy_fusion,
        bf16_layers=(spec.bf16_first_layers, spec.bf16_last_layers),
        host=stage_host(host_requested(spec), target.stage_kernels(stage.kind, resolve_kernels(spec.kernels,
                                                                                              spec.cluster.gpu)),
                        target.caps(stage.kind).cuda_graphs),
    )


def _graphs(spec: ExperimentSpec, stage: StageSpec, target: Target) -> bool:
    """Whether the stage runs CUDA graphs (its host settings as `_problem` resolves them)."""
    kernels = target.stage_kernels(stage.kind, resolve_kernels(spec.kernels, spec.cluster.gpu))
    return stage_host(host_requested(spec), kernels, target.caps(stage.kind).cuda_graphs).cuda_graph_impl != "none"


def _inference_parallel(parallel: ParallelSpec, kind: str, target: Target) -> ParallelSpec:
    """Eval/export: no optimizer (so no gradient or parameter-gather settings), no recompute, no
    context split, no TP overlap; the user's TP/EP stay fixed. Where the target runs them without a
    pipeline (`Target.caps`) a pipeline size inherited from the
    experiment's block is dropped (one the stage's own block fixes is an E126 error of check_spec), and so
    is sequence parallelism where the target keeps whole sequences (eval's KV-cached decode)."""
    caps = target.caps(kind)
    pipeline = parallel.pipeline if caps.pipeline else 1
    sp = parallel.sequence_parallel if caps.sequence_parallel else False
    return replace(parallel, context=parallel.context if parallel.context is not None else 1, sequence_parallel=sp,
                   distributed_optimizer=False, recompute="none", recompute_layers=None, recompute_modules=None,
                   virtual_pipeline=1, pipeline=pipeline,
                   micro_batch=parallel.micro_batch or 1, tp_comm_overlap=False, overlap_param_gather=False, fp8_param_gather=False,
                   grad_reduce_in_fp32=True, megatron_fsdp=False, optimizer_state_dtype="fp32",
                   defer_embedding_wgrad_compute=False, wgrad_deferral_limit=0, precision_aware_optimizer=False)


# ------------------------------------------------------------------------------- not fitting: why


_RELAX_ORDER = ("recompute_layers", "recompute_modules", "recompute", "micro_batch", "sequence_parallel",
                "distributed_optimizer", "tensor", "pipeline",
                "virtual_pipeline", "context", "expert", "expert_tensor", "data")
_FIELD_OF = {"tensor": "tp", "pipeline": "pp", "virtual_pipeline": "vp", "context": "cp", "expert": "ep",
             "expert_tensor": "etp", "data": "dp", "micro_batch": "micro_batch", "recompute": "recompute",
             "recompute_layers": "recompute_layers", "recompute_modules": "recompute_modules",
             "sequence_parallel": "sequence_parallel", "distributed_optimizer": "distributed_optimizer"}


def _value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def cheapest_fix(problem: Problem) -> str | None:
    """The cheapest change that makes `problem` fit: free one setting the user fixed (each alone,
    in `_RELAX_ORDER`), else the fewest extra nodes found with the user's other settings kept (every
    count up to +16, in steps of nodes/16 beyond 16 nodes, then 2x, 3x, 4x, 6x, 8x), else the fewest
    extra nodes with every fixed parallel setting freed (`_freed_nodes_fix`)."""
    for name in _RELAX_ORDER:
        if getattr(problem.fixed, name) is None:
            continue
        freed = replace(problem, fixed=replace(problem.fixed, **{name: None}))
        best = search(freed).best
        if best is not None:
            value = getattr(best.layout, _FIELD_OF[name])
            value = "none" if name == "virtual_pipeline" and value is None else value
            if name == "recompute_layers" and value is None:
                return (f"remove recompute_layers (instead of {problem.fixed.recompute_layers}): "
                        f"{describe(best.layout)} fits")
            if name == "recompute_modules":  # freed: the search's recompute levels (selective = core_attn)
                return (f"remove recompute_modules (instead of [{', '.join(problem.fixed.recompute_modules)}]): "
                        f"{describe(best.layout)} fits")
            return f"set {name} = {_value(value)} (instead of {_value(getattr(problem.fixed, name))})"
    c = problem.cluster
    fixed = replace(problem.fixed, data=None)
    step = max(1, c.nodes // 16)  # 16 evenly spaced tries, then multiples: bounded work at any scale
    tries = sorted({c.nodes + k * step for k in range(1, 17)} | {c.nodes * k for k in (2, 3, 4, 6, 8)})
    for nodes in tries:
        bigger = replace(problem, cluster=replace(c, nodes=nodes), fixed=fixed)
        best = search(bigger).best
        if best is not None:
            extra = nodes - c.nodes
            return (f"needs {extra} more node{'s' * (extra != 1)} (nodes = {nodes}): "
                    f"{describe(best.layout)} uses {gib(best.memory.total)}")
    return _freed_nodes_fix(problem, [c.nodes] + tries)


def _freed_nodes_fix(problem: Problem, tries: list[int]) -> str | None:
    """The fewest nodes (the current count first) with every parallel setting the user fixed freed
    (the model-parallel sizes above all), naming the settings whose value must change.

    Bounded work at any scale: the node count is found with feasibility searches that fix the
    settings that only cost memory to vary (micro batch 1, full recompute, no interleaving: memory is
    monotone in the first two and interleaving never saves memory, so where these fit nothing, nothing
    fits), galloping then bisecting over `tries` (feasibility grows with the GPU count, up to the
    divisibility of the sizes); then one search without interleaving picks the layout shown
    (~0.3 s of CPU for Llama 3.1 405B on 16,384 GPUs)."""
    names = [n for n in _RELAX_ORDER if n != "data" and getattr(problem.fixed, n) is not None]
    if not names:
        return None  # the previous step already searched with nothing fixed
    free = replace(problem.fixed, data=None, **{n: None for n in names})
    c = problem.cluster
    seen: dict[int, bool] = {}

    def feasible(i: int) -> bool:
        if i not in seen:
            probe = replace(problem, cluster=replace(c, nodes=tries[i]),
                            fixed=replace(free, micro_batch=1, recompute="full", virtual_pipeline=1))
            seen[i] = search(probe, top=1).best is not None
        return seen[i]

    lo, hi = 0, 0  # gallop: 0, 1, 3, 7, ... then bisect (lo, hi]
    while not feasible(hi):
        if hi == len(tries) - 1:
            return None
        lo, hi = hi + 1, min(2 * hi + 1, len(tries) - 1)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if feasible(mid) else (mid + 1, hi)
    nodes = tries[hi]
    bigger = replace(problem, cluster=replace(c, nodes=nodes), fixed=replace(free, virtual_pipeline=1))
    best = search(bigger).best
    if best is None:
        return None
    changed, removed = [], []
    for n in names:
        old, new = getattr(problem.fixed, n), getattr(best.layout, _FIELD_OF[n])
        if n == "recompute_modules":  # freed: the search's own recompute levels
            removed.append(f"remove recompute_modules (instead of [{', '.join(old)}])")
            continue
        if n == "virtual_pipeline":
            old, new = (old if old > 1 else "none"), (new or "none")
        if new != old:
            changed.append(f"{n} = {_value(new)} (instead of {_value(old)})")
    extra = nodes - c.nodes
    more = f"add {extra} node{'s' * (extra != 1)} (nodes = {nodes})" if extra else ""
    what = ", ".join(removed + ["set " + ", ".join(changed)] if changed else removed)
    return f"{more}{' and ' if more and what else ''}{what}: {describe(best.layout)} uses {gib(best.memory.total)}"


def not_fit_diagnostic(spec: ExperimentSpec, stage: StageSpec, problem: Problem, result: SearchResult) -> Diagnostic:
    """E130 (memory) or E131 (no layout passes the rules), with the failing equation and the cheapest fix."""
    notes = tuple(Note(f"{r.count} candidate{'s' * (r.count != 1)}: {r.reason} (e.g. {r.layout}: {r.example})")
                  for r in result.rejections[:4])
    if result.closest is None:
        top = result.rejections[0] if result.rejections else None
        return _error("E131", f"no parallel layout of stage `{stage.name}` satisfies Megatron-Core's rules"
                      + (f" (most often: {top.reason})" if top else ""),
                      spec, stage, "parallel", equation=top.example if top else None,
                      hint=(top.hint if top and top.hint else "leave more of the parallel sizes `auto`"), notes=notes)
    o = result.closest
    m = o.memory
    terms = " + ".join(f"{t} {gib(getattr(m, t))}" for t in MEMORY_TERMS)
    cap = problem.gpu.hbm_bytes
    budget = f"{gib(o.budget)} ({problem.gpu.id} {gib(cap)} x (1 - {problem.headroom:.0%} headroom))"
    fix = cheapest_fix(problem)
    return _error(
        "E130",
        f"stage `{stage.name}` does not fit in GPU memory: {o.largest_term} is the largest term "
        f"({gib(getattr(m, o.largest_term))}); the closest layout overflows by {gib(o.over_bytes)}",
        spec, stage, "parallel", "model",
        equation=f"{terms} = {gib(m.total)} > budget {budget} [closest: {describe(o.layout)}]",
        hint=fix or "use a larger GPU or a smaller model", notes=notes,
    )


# ------------------------------------------------------------------------------------- the planner


def _stage_warnings(spec: ExperimentSpec, stage: StageSpec, problem: Problem, chosen: Candidate) -> list[Diagnostic]:
    env = env_of(spec, stage.kind, problem.attention_backend, problem.optimizer, problem.target, problem.hf_conversion,
                 packs_sequences(stage.kind, stage.params), problem.dropout)
    return [to_diagnostic(v, spec, stage) for v in violations(env, _sizes(problem, chosen.layout), WARNING_RULES)]


def _stage_plan(spec: ExperimentSpec, stage: StageSpec, chosen: Candidate, steps: int, seq: int, estimate: Estimate,
                problem: Problem) -> StagePlan:
    execution = stage_execution(
        model=spec.model, gpu=spec.cluster.gpu, layout=chosen.layout, split=chosen.split, stage_kind=stage.kind,
        precision=spec.precision, attention_backend=problem.attention_backend, kernels=problem.kernels,
        seq_length=seq, peft=stage.peft, params=stage.params, target=problem.target, fp8_recipe=spec.fp8_recipe,
        moe=problem.moe_of(chosen.layout), host=problem.host, cross_entropy=spec.cross_entropy_fusion,
        bf16_layers=(spec.bf16_first_layers, spec.bf16_last_layers))
    return StagePlan(
        name=stage.name, kind=stage.kind, after=stage.after, data=stage.data, layout=chosen.layout,
        memory=chosen.memory, estimate=estimate, seq_length=seq, steps=steps, optimizer=stage.optimizer,
        schedule=stage.schedule, checkpoint=stage.checkpoint, execution=execution, peft=stage.peft,
        log_every=stage.log_every, eval_every=stage.eval_every, seed=stage.seed,
        params=stage.params,
        resident_models=resident_models(stage.kind, stage.params, peft=stage.peft, parents=parent_kinds(spec, stage)),
    )


def _inference_search(probe: Problem, top: int = DEFAULT_TOP) -> SearchResult:
    """Eval / export: the least model parallelism that fits. Model-parallel sizes (tp, pp) are
    tried in increasing tp x pp (the user's fixed values stay fixed); the first that fits wins,
    and inside it the fastest layout. Returns the last search when nothing fits (for diagnostics)."""
    f = probe.fixed
    world = probe.cluster.world_size
    tps = [f.tensor] if f.tensor is not None else [t for t in divisors(world) if probe.model.heads % t == 0]
    pps = [f.pipeline] if f.pipeline is not None else [q for q in divisors(world) if q <= probe.model.layers
                                                       and (q == 1 or probe.target.caps(probe.stage_kind).pipeline)]
    result = None
    for tp, pp in sorted(((t, q) for t in tps for q in pps if world % (t * q) == 0), key=lambda x: (x[0] * x[1], x[0])):
        result = search(replace(probe, fixed=replace(f, tensor=tp, pipeline=pp)), top=top)
        if result.best is not None:
            return result
    return result if result is not None else search(probe)


def plan_stage(spec: ExperimentSpec, stage: StageSpec, gpu: HardwareSpec, backend: str, headroom: float,
               top: int = DEFAULT_TOP, target: Target = MEGATRON_CORE):
    """(StageResult, StagePlan, warnings) for one stage, or raises DiagnosticError."""
    if spec.model.mtp_num_layers and not stage_mtp_layers(spec, stage):
        # a stage kind that does not train multi-token prediction builds, sizes and costs the model without it (W128)
        spec = replace(spec, model=spec.model.without_mtp())
    parallel = stage_parallel(spec, stage)
    trains = stage.kind in TRAINING_KINDS
    caps = target.caps(stage.kind)
    if not trains:
        parallel = _inference_parallel(parallel, stage.kind, target)
    fsdp_note = None
    if trains and parallel.megatron_fsdp and not caps.megatron_fsdp:
        # the target wraps this kind in DDP: plan (size, cost) what it runs, and say so
        parallel = replace(parallel, megatron_fsdp=False)
        fsdp_note = (f"megatron_fsdp = false for this {stage.kind} stage: {target.name} wraps its models in "
                     f"Megatron-Core DDP ({caps.source or caps.runs})")
    elif trains and parallel.megatron_fsdp and stage.peft is not None:
        # LoRA trains adapters on a frozen base: FSDP would shard an optimizer state of a few adapters while
        # the base, the bulk of the memory, stays whole; the nemoc runtime wraps adapters in DDP and the
        # memory model prices FSDP for fully trained models only
        parallel = replace(parallel, megatron_fsdp=False)
        fsdp_note = (f"megatron_fsdp = false for this {stage.kind} stage: its LoRA adapters train on a frozen "
                     f"base, which {target.name} wraps in Megatron-Core DDP")
    gather_note = None
    if trains and parallel.overlap_param_gather and not caps.overlap_param_gather and not parallel.megatron_fsdp:
        # the target gathers this kind's parameters after the optimizer step: plan (cost) that, and say so. Under
        # Megatron-FSDP the gathers are FSDP's own, per layer before each forward (rollouts included), prefetched
        # whatever the flag says (`cost.fsdp_exposed` prices them so): nothing to change
        parallel = replace(parallel, overlap_param_gather=False)
        gather_note = (f"overlap_param_gather = false for this {stage.kind} stage: {target.name} gathers the "
                       f"distributed optimizer's parameters after each step ({caps.source or caps.runs})")
    elif trains and parallel.overlap_param_gather and not caps.graphed_param_gather and _graphs(spec, stage, target):
        # the target does not overlap the gather while it captures CUDA graphs: plan (cost) the gather after
        # the optimizer step, which it runs, and say so
        parallel = replace(parallel, overlap_param_gather=False)
        gather_note = (f"overlap_param_gather = false for this {stage.kind} stage: {target.name} does not overlap "
                       f"the parameter all-gather with cuda_graph_impl = {spec.cuda_graph_impl}; it gathers after "
                       f"each optimizer step ({caps.source or caps.runs})")
    defer_note = None
    if trains and parallel.defer_embedding_wgrad_compute and stage.peft is not None:
        # LoRA freezes the output layer: Megatron-Core 0.16.1's ColumnParallelLinear hands a frozen weight's
        # linear_with_frozen_weight the deferral's grad_output_buffer, which it asserts is None
        # (tensor_parallel/layers.py); there is no weight gradient to defer, so plan (cost, size) without it
        parallel = replace(parallel, defer_embedding_wgrad_compute=False, wgrad_deferral_limit=0)
        defer_note = (f"defer_embedding_wgrad_compute = false for this {stage.kind} stage: its LoRA adapters train "
                      "on a frozen base, whose output layer has no weight gradient to defer")
    seq = stage_seq_length(spec, stage)
    probe = _problem(spec, stage, gpu, backend, headroom, parallel, steps=1, target=target)
    result = search(probe, top=top) if trains else _inference_search(probe, top)
    if result.best is None:
        raise DiagnosticError([not_fit_diagnostic(spec, stage, probe, search(probe) if not trains else result)])
    chosen = result.best
    notes: list[str] = [note for note in (fsdp_note, gather_note, defer_note) if note]
    if not caps.cuda_graphs and host_requested(spec)[0] not in (None, "none"):
        notes.append(f"cuda_graph_impl = none for this {stage.kind} stage: {target.name} runs it without CUDA "
                     f"graphs ({caps.source or caps.runs})")
    gb = chosen.layout.global_batch
    if stage.kind == "export":
        steps = 0
        notes.append("export runs no training steps: no time estimate")
        if caps.one_process:
            notes.append(_export_host_note(spec, stage, target))
    else:
        steps, note = stage_steps(spec, stage, gb, seq)
        if note:
            notes.append(note)
        if stage.kind == "eval":
            notes.append("eval: forward-only time estimate")
            one = param_counts(spec.model).total * weight_bytes(spec.precision)
            fits = "" if one < gpu.hbm_bytes else (f", more than one {gpu.id}'s {gpu.hbm_bytes / 2**30:.0f} GiB: "
                                                   "`nemoc run` would run out of memory at this stage")
            if caps.one_process:
                notes.append(f"the target `{target.name}` evaluates in one process on one GPU (TP=1, not the "
                             f"stage's layout): the weights alone take {one / 2**30:,.1f} GiB{fits}")
        if stage.kind == "ppo" and not caps.kv_cache_rollout:
            notes.append(f"ppo: the rollout is estimated as KV-cached decoding (memory-bandwidth bound); "
                         f"the target `{target.name}` recomputes the whole sequence for every new token, "
                         "so `nemoc run` spends up to max_new_tokens forward passes there instead")
    packed = _packing_note(stage, probe)
    if packed:
        notes.append(packed)
    template = getattr(stage.params, "template", None)  # the kinds that render conversations
    if template is not None:
        notes.append(chattemplate.describe(template, spec.root))
    taken = moe_defaults_taken(spec.model, probe.stage_kernels, chosen.layout.ep, *probe.moe_requested)
    if taken:
        notes.append(f"MoE defaults taken ({'Transformer Engine, as Megatron-Bridge recipes' if probe.stage_kernels == 'te' else 'the local spec'}): "
                     + ", ".join(taken))
    if trains:
        taken = host_defaults_taken(cuda_graph_impl=spec.cuda_graph_impl, manual_gc=spec.manual_gc,
                                    manual_gc_interval=spec.manual_gc_interval)
        if taken:
            notes.append("host defaults taken (Megatron-Bridge recipes): " + ", ".join(taken))
        stage_precision = target.stage_precision(stage.kind, spec.precision)
        if reuses_grad_buffer(stage_precision, chosen.layout):
            notes.append("MXFP8 parameters all-gathered through the gradient buffer (reuse_grad_buf_for_mxfp8_param_ag, "
                         "as Megatron-Bridge's MXFP8 recipes; Megatron-Core 0.16.1 shares the buffer with MXFP8 "
                         "parameters, so the plan counts no separate all-gather buffer)")
        elif stage_precision == "mxfp8" and chosen.layout.fp8_param_gather and chosen.layout.megatron_fsdp:
            notes.append("MXFP8 parameters all-gathered by Megatron-FSDP's own buffers (reuse_grad_buf_for_mxfp8_param_ag "
                         "off: the distributed optimizer under Megatron-FSDP keeps no DDP gradient buffer to reuse)")
        if spec.cross_entropy_fusion is None and full_iteration_graph(probe.host) and probe.stage_kernels == "te":
            notes.append(f"loss default taken: cross_entropy_fusion = {probe.cross_entropy}, not te: under a whole-iteration "
                         "CUDA graph (cuda_graph_scope full_iteration) Megatron-Core runs TE's CUDA-graph-capturable cross "
                         "entropy, which needs Transformer Engine >= 2.7, and the plan does not know the target's TE "
                         "version (write cross_entropy_fusion = te where it is >= 2.7)"
                         + ("; not native either: it rounds the logits' gradient to bf16 (W112) and this stage runs "
                            "fp32 / fp16" if probe.cross_entropy == "none" else ""))
        elif spec.cross_entropy_fusion is None:
            notes.append(f"loss default taken ({'Transformer Engine, as Megatron-Bridge recipes' if probe.stage_kernels == 'te' else 'the local spec'}): "
                         f"cross_entropy_fusion = {probe.cross_entropy}")
        if spec.cuda_graph_impl not in (None, "none") and probe.host.cuda_graph_impl == "none":
            notes.append(f"cuda_graph_impl = {spec.cuda_graph_impl} does not apply to this {stage.kind} stage: "
                         f"it runs the local layer spec on the target `{target.name}` (no CUDA graphs)")
    # The search ranked with steps = 1; the chosen layout's estimate is redone with the real steps.
    chosen = replace(chosen, estimate=evaluate_time(replace(probe, steps=steps), chosen.layout))
    rollout = chosen.estimate.parts.get("rollout", 0.0)
    if rollout and chosen.layout.pp > 1:
        vp = chosen.layout.vp or 1
        chunks = f" and {vp} virtual stages each (around the ring {vp} times)" if vp > 1 else ""
        notes.append(f"{stage.kind}: rollouts decode stage after stage across the {chosen.layout.pp} pipeline stages"
                     f"{chunks} (the whole batch at once, no micro-batches: a decode step costs the whole model's "
                     f"forward, plus {chosen.layout.pp * vp - 1} hidden-state transfer(s)); rollout {rollout:.3g} s "
                     f"of the {chosen.estimate.step_time_s:.3g} s step")
    if stage.global_batch is None and trains:
        notes.append(f"global_batch not set: Megatron uses micro_batch x dp = {gb}")
    warnings = _stage_warnings(spec, stage, probe, chosen)
    for n in notes:
        warnings.append(Diagnostic("W140", f"stage `{stage.name}`: {n}", spec.span(f"stage.{stage.name}"),
                                   Severity.NOTE))
    plan = _stage_plan(spec, stage, chosen, steps, seq, chosen.estimate, probe)
    ub = plan.execution.userbuffers
    if ub is not None:
        notes.append(_userbuffers_note(ub, gpu))
        warnings.append(Diagnostic("W140", f"stage `{stage.name}`: {notes[-1]}", spec.span(f"stage.{stage.name}"),
                                   Severity.NOTE))
    return StageResult(stage.name, stage.kind, result, chosen, tuple(notes), replace(probe, steps=steps)), plan, warnings


def _userbuffers_note(ub, gpu: HardwareSpec) -> str:
    """Which TE userbuffer configuration `tp_comm_overlap` runs with (compiler/catalog/userbuffers.py)."""
    shape = f"{ub.shape[0]} x {ub.shape[1]} {ub.dtype}{', fp8 buffers' if ub.quantization == 'fp8' else ''}"
    if ub.gemms:
        return f"tp_comm_overlap userbuffers ({shape}): Megatron-Bridge's tuned preset {ub.preset}"
    kind = "fp8" if ub.quantization == "fp8" else "bf16"
    return (f"tp_comm_overlap userbuffers ({shape}): Transformer Engine's default per-GEMM configuration "
            f"(Megatron-Bridge has no tuned preset for {gpu.generation} {kind}, hidden {ub.shape[1]}, tp {ub.tp})")


def plan_experiment(spec: ExperimentSpec, *, headroom: float = DEFAULT_HEADROOM, top: int = DEFAULT_TOP,
                    target: Target = MEGATRON_CORE) -> PlanResult:
    """Resolve every `auto` of every stage for `target`; raise DiagnosticError (all errors at once) if
    impossible."""
    t0 = time.perf_counter()
    diagnostics = list(check_spec(spec, target))
    gpu = get_gpu(spec.cluster.gpu)
    if gpu is None:
        diagnostics.append(Diagnostic("E132", f"unknown GPU `{spec.cluster.gpu}`", spec.span("cluster.gpu", "cluster"),
                                      hint="use one of A100-40GB, A100-80GB, H100, H200, B200, B300, GB200, GB300, CPU"))
    if not 0.0 <= headroom < 1.0:
        diagnostics.append(Diagnostic("E133", f"headroom {headroom:.0%} must be in [0 %, 100 %)"))
    if any(d.is_error for d in diagnostics):
        raise DiagnosticError(diagnostics)
    # The plan keeps the user's attention backend, `auto` included: with Transformer Engine the runtime
    # passes `auto` on as Megatron's `AttnBackend.auto` (TE picks flash-attn or cuDNN fused attention),
    # without TE `auto`, `flash` and `fused` are torch SDPA. What the models price
    # per stage is `search.Problem.costed_backend`.
    backend = spec.attention_backend
    results, plans, warnings, errors = [], [], [d for d in diagnostics], []
    for stage in spec.stages:
        try:
            r, p, w = plan_stage(spec, stage, gpu, backend, headroom, top, target)
        except DiagnosticError as e:
            errors += e.diagnostics
            continue
        results.append(r)
        plans.append(p)
        warnings += w
    if errors:
        raise DiagnosticError(errors + warnings)
    plan = Plan(experiment=spec.name, model=spec.model, cluster=spec.cluster, precision=spec.precision,
                attention_backend=backend, data=spec.data, stages=tuple(plans), root=spec.root,
                kernels=resolve_kernels(spec.kernels, spec.cluster.gpu, spec.model), tracking=spec.tracking,
                imports=_imports(spec))
    return PlanResult(plan, tuple(results), _dedupe(warnings), time.perf_counter() - t0)


def _dedupe(diagnostics: list[Diagnostic]) -> tuple[Diagnostic, ...]:
    seen, out = set(), []
    for d in diagnostics:
        key = (d.code, d.equation) if d.equation else (d.code, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return tuple(out)
