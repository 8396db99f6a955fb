"""Plan search: resolve every `auto` of one stage into the fastest layout that is valid and fits.

Input:  a `Problem` (model, cluster, GPU, precision, attention backend, layer kernels (te | local),
        sequence length, global batch, stage kind, LoRA, what the user fixed in the stage's
        `parallel` block, the memory headroom, the step count).
Output: a `SearchResult`: the candidates that fit, fastest first (ties: less memory, then a fixed
        order of the sizes, so the answer is deterministic), and a summary of why every other
        candidate lost (which rule it broke, or by how much it overflowed memory and which term is
        largest).
Invariants: pure; every returned candidate satisfies tp*pp*cp*dp = world, every rule of
        `nemoc.compiler.rules`, and memory.total <= capacity x (1 - headroom).

Search space: TP x PP x VP x CP x EP x ETP x micro batch x recompute x distributed optimizer x
sequence parallel. `search` enumerates it by divisors (only sizes that divide the world, the
heads, the layers, the global batch are generated), checks a group's rules once, and prunes with
properties of the memory and cost models that tests/compiler/test_search.py asserts:
  (1) memory is monotone in micro batch and recompute: a (TP, PP, VP, CP, EP, ETP, SP, DO) group
      is rejected when its smallest micro batch with its strongest recompute does not fit; a micro
      batch that does not fit with the strongest recompute ends the micro-batch loop;
  (2) interleaving over the same layer split never saves memory: when no layout of (TP, PP, CP,
      EP, ETP) fits without it, no virtual-pipeline variant with the same per-stage layer counts is
      tried (decided before any step-time bound is computed: the non-interleaved group is checked
      first); a variant whose split differs (uneven: fewer layers on the first stage) is searched;
  (3) time is monotone in recompute: recompute levels are tried weakest first; the first that fits
      is that micro batch's fastest, and a stronger one is only costed while it could still enter
      the top list;
  (4) dominance of auto settings: with the parameter all-gather overlapped (`overlap_param_gather`)
      the distributed optimizer is never slower nor larger (same gradient traffic, 1/(dp x cp) of
      the optimizer states), so auto resolves to on (off for SGD in a training stage, which
      Megatron's DistributedOptimizer refuses: E129); without it (the nemoc runtime's default) the
      all-gather after the step is exposed, so auto tries both (`_do_domain`), and a group that
      overflows with it is not evaluated again without it (never larger); sequence parallelism is
      never slower (same TP traffic, 1/tp of the elementwise work), so auto tries
      on first and off only where on does not fit;
  (5) branch and bound: `cost.step_time_lower_bound` bounds the step time of every micro batch and
      recompute of a group; groups are searched in the order of their bound, and one whose bound is
      slower than the top list's last entry is skipped whole, with every later one (the bounds
      ascend; for Llama 3.1 405B on 16,384 GPUs, with (2) and (4), ~1,600 memory evaluations where
      the search without it made ~16,000: bench/bench_plan.py). The bound's parts that depend on a
      few sizes only (the layer times by TP, CP, EP, ETP, SP and the largest micro batch; the stage
      times; the trainable parameters) are kept in one memo per search (`_Context`), so two problems
      never share them; a test checks every bound with the memo against the bound without it. The
      exact bounds are computed lazily (`_lazy_bounds`): a group waits in a heap under a coarse bound
      (`_Context.coarse_bound`, never above its exact one, with layer times by (TP, CP, EP, ETP, SP)
      only) and gets its exact bound when that comes first; the groups come out in the order of their
      exact bounds, so the search and its rejections are those of sorting every exact bound (tested).
Prunings (6) to (9) (`search(prune=True)`, the default; `prune=False` is the search without them, which
tests/compiler/test_search_pruning.py compares with it: the same ranked candidates and candidate count on 300
random problems) skip work that cannot change the top list; a candidate they skip is counted under the reason
that let it go, so `space` is unchanged and the count moves between reasons (which reason a rejected candidate
is counted under depends on what the search asked first; so the "does not fit" notes, the four largest
reasons and their example layouts, may differ, while its closest layout does not):
  (6) a group whose model states alone overflow (`memory.states_lower_bound`: weights, gradients and
      optimizer of the first or last stage with the CUDA context and NCCL buffers, which no micro batch,
      recompute or SP value lowers) is rejected without the exact estimate, unless its overflow could be the
      smallest seen (`SearchResult.closest` stays exact);
  (7) bound (2)'s memory check of a non-interleaved group waits until a group of its family comes out of
      the heap (`_base_failed`): a family whose step-time bounds all lose is never sized;
  (8) the groups of one (TP, PP, CP, EP, ETP, preferred SP) enter the heap as one family under a bound of
      all its VP and DO values (`cost.step_time_lower_bound(any_vp=True)`: the mean stage's steady state,
      never above a member's bound) and get their own bounds only when the family comes first;
  (9) inside a searched group, a micro batch whose own step-time bound (`micro_batches=(mb, mb)`) is above
      the top list's last entry is skipped unsized (`_micro_batch_loses`; larger ones are still tried).
The rules are pure functions of the env and the sizes they read: each is asked through a per-search
decision tree of the fields it read (`_Decisions`), so a rule that reads neither VP nor SP answers once
per (TP, PP, CP, EP, ETP). Only candidates that fit reach the cost model. `enumerate_all` is the brute-force oracle: the raw
product of every size from 1 to its bound, each checked by every rule and the memory model, every
fitting one costed; tests assert both find the same best plan.
"""

from __future__ import annotations

import bisect
import gc
import heapq
import itertools
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache

from nemoc.compiler import cost, memory
from nemoc.compiler.catalog.hardware import TRAINING_PRECISIONS, HardwareSpec
from nemoc.compiler.flops import LOW_PRECISIONS, chunk_layers
from nemoc.compiler.execution import cross_entropy_of, host_execution, moe_execution
from nemoc.compiler.params import packs_sequences
from nemoc.compiler.plan import Estimate, HostExecution, Layout, MemoryBreakdown, MoeExecution
from nemoc.compiler.rules import (
    ERROR_RULES,
    Env,
    PipelineSplit,
    Sizes,
    Violation,
    layout_violations,
    pipeline_split,
    model_split,
    rule_ffn_tp,
    rule_fp8_tokens,
    rule_global_batch,
    rule_interleave_microbatches,
    rule_heads_tp,
    rule_query_groups_tp,
    rule_sgd_distributed_optimizer,
    te_auto_unfused,
    stage_dropout,
)
from nemoc.compiler.spec import ClusterSpec, LoraSpec, ModelSpec, ParallelSpec
from nemoc.compiler.target import MEGATRON_CORE, Target

GIB = 1 << 30
REL_TOL = 1e-9  # time monotonicity is exact in the model up to float rounding
DEFAULT_TOP = 5  # candidates kept (the best and its runner-ups)
DEFAULT_HEADROOM = 0.10  # 10 % of HBM kept free for allocator spikes and what no model sees
MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations", "other")
# the rejections of pruning (9) (`_micro_batch_loses`)
MB_SLOWER_REASON = "slower: a lower bound of the step time at this micro batch is already above the top list"
# the rejections of pruning (6) (`_states_overflow`)
STATES_REASON = "out of memory (weights, gradients and optimizer states alone, before activations)"
# Strongest memory saving first: the pruning relies on this order.
RECOMPUTE_ORDER = ("full", "selective", "none")
# Block recompute (`parallel.recompute_layers`) the search tries when `recompute` is auto, as shares of
# a model chunk's layers (a policy both the search and the oracle share, like auto expert-TP's 1 or
# tp): between full recompute of every layer and selective / none in memory and in time. Not tried
# with the unfused core, where selective recompute frees the s x s scores of every layer and may
# free more than block recompute of a few layers (memory would not be monotone in the order).
BLOCK_RECOMPUTE_SHARES = (0.75, 0.5, 0.25)


# ------------------------------------------------------------------------------------------ types


@dataclass(frozen=True, slots=True)
class Problem:
    model: ModelSpec
    cluster: ClusterSpec
    gpu: HardwareSpec
    fixed: ParallelSpec  # None fields are auto
    global_batch: int | None  # None: Megatron's default, micro_batch x dp
    seq_length: int
    precision: str = "bf16"
    fp8_recipe: str | None = None  # the stage's resolved recipe (execution.fp8_recipe_of); None: not fp8
    attention_backend: str = "flash"  # the plan's: auto | flash | fused | unfused (auto is costed as flash)
    stage_kind: str = "pretrain"
    peft: LoraSpec | None = None
    params: object = None  # stage params (DPO reference_free, ...)
    parents: tuple[str, ...] = ()  # the kinds of the stages it runs after (eval holds a reference's model too)
    headroom: float = DEFAULT_HEADROOM
    steps: int = 1
    kernels: str = "te"  # the experiment's resolved `kernels` (te | local); the stage's own: `stage_kernels`
    optimizer: str = "adam"  # the stage's optimizer (adam | sgd): the distributed optimizer wraps Adam only
    target: Target = MEGATRON_CORE  # what the runtime executing the plan can run
    hf_conversion: bool = False  # Env.hf_conversion: the export stage only converts its initial checkpoint
    # the experiment's (moe_dispatcher, moe_grouped_gemm, moe_permute_fusion), None = auto; resolved per
    # layout by `moe_of` (the local spec's auto dispatcher depends on the expert-parallel size)
    moe_requested: tuple = (None, None, None)
    # the experiment's (cuda_graph_impl, cuda_graph_scope, manual_gc, manual_gc_interval), None = auto
    # (rules.Env.host_requested); `host` is what the stage runs with (execution.host_execution)
    host_requested: tuple = (None, (), None, None)
    host: HostExecution = field(default_factory=host_execution)
    # the experiment's `cross_entropy_fusion` (te | native | none; None = auto); `cross_entropy` is what
    # the stage runs (execution.cross_entropy_of of its kernels)
    cross_entropy_requested: str | None = None
    # layers kept in bf16 at the start and the end (the experiment's bf16_first_layers / bf16_last_layers)
    bf16_layers: tuple[int, int] = (0, 0)
    costed_backend: str = field(init=False, repr=False, compare=False, default="")  # see __post_init__
    # what the cost and memory models read of the stage's params, once per problem (see __post_init__)
    attention_span: float | None = field(init=False, repr=False, compare=False, default=None)
    dropout: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        """`costed_backend`, the attention class the memory and cost models price, once per problem
        (every candidate asks for it): the stage's attention core (`Target.stage_attention`: a target may
        force one for a stage kind); `auto` is Transformer Engine's choice between flash-attn and cuDNN
        fused attention (both flash-class: no s x s scores, the masked half skipped) or torch SDPA
        without TE, so it is costed as `flash`, except where TE falls back to its unfused core
        (`rules.te_auto_unfused`: fp32, head_dim % 8, head_dim > 256)."""
        backend = self.target.stage_attention(self.stage_kind, self.attention_backend)
        if backend == "auto":
            backend = "unfused" if te_auto_unfused(self.env) else "flash"
        object.__setattr__(self, "costed_backend", backend)
        object.__setattr__(self, "attention_span", self._attention_span())
        object.__setattr__(self, "dropout", self._dropout())

    @property
    def env(self) -> Env:
        arch = self.gpu.generation
        precisions = tuple(p for p in TRAINING_PRECISIONS if self.gpu.supports(p))
        return Env(self.model, self.cluster, self.precision, self.attention_backend, arch, precisions, self.stage_kind,
                   self.kernels, self.optimizer, self.target, self.fp8_recipe, self.hf_conversion, self.moe_requested,
                   self.host_requested, packs_sequences(self.stage_kind, self.params),
                   cross_entropy_fusion=self.cross_entropy_requested, bf16_layers=self.bf16_layers,
                   dropout=self.dropout)

    @property
    def splits_sequences(self) -> bool:
        """Whether the target runs this stage context-parallel (a stage that packs samples per row needs
        `packed_context_parallel` too)."""
        caps = self.target.caps(self.stage_kind)
        return caps.context_parallel and (caps.packed_context_parallel or not packs_sequences(self.stage_kind, self.params))

    def moe_of(self, layout: Layout) -> MoeExecution | None:
        """The MoE settings a stage runs with `layout` (execution.moe_execution); None for dense models."""
        if not self.model.is_moe:
            return None
        return moe_execution(self.model, self.stage_kernels, layout.ep, *self.moe_requested)

    @property
    def auto_distributed_optimizer(self) -> bool:
        """What an auto `distributed_optimizer` resolves to: on (dominance, below) except where E129
        refuses it: SGD in a stage that trains (Megatron's DistributedOptimizer wraps Adam only; a stage
        without an optimizer step, eval or export, builds none). Asked of the rule itself, so the
        search's domain and the oracle's rule check cannot disagree."""
        return rule_sgd_distributed_optimizer(self.env, Sizes(distributed_optimizer=True)) is None

    def _dropout(self) -> bool:
        """`dropout`: hidden and attention dropout on (the stage's `dropout` > 0, which the runtime sets as
        TransformerConfig `hidden_dropout` / `attention_dropout`): their masks join the stored
        activations and the unfused core drops out every score (`cost.layer_times`, `memory`)."""
        return stage_dropout(self.params)

    def _attention_span(self) -> float | None:
        """`attention_span`: the mean sample length each token attends over, when the stage packs samples of a stated
        length (`sft` params `pack = true` with `sample_tokens`) into a variable-length attention core
        (Transformer Engine's or the SDPA core: `PackedSeqParams`, cu_seqlens, so a token attends only
        within its own sample: the sft runner packs rows so); None (the whole sequence) otherwise, Megatron's
        unfused core included: it masks the packed samples but still computes the s x s scores."""
        params = self.params
        if params is None or self.costed_backend == "unfused" or "sample_tokens" not in params:
            return None
        tokens = params.sample_tokens
        return float(min(tokens, self.seq_length)) if tokens and params.pack else None

    @property
    def costed_bf16_layers(self) -> tuple[int, int]:
        """The bf16 layers the cost and memory models price: those written, where the stage runs a precision
        below 16 bits (fp8 / mxfp8 / nvfp4); none otherwise (Megatron-Core reads them only in those contexts)."""
        return self.bf16_layers if self.precision in LOW_PRECISIONS else (0, 0)

    @property
    def cross_entropy(self) -> str:
        """The loss the memory and cost models price (te | native | none)."""
        return cross_entropy_of(self.stage_kernels, self.cross_entropy_requested, self.host,
                                self.target.stage_precision(self.stage_kind, self.precision))

    @property
    def stage_kernels(self) -> str:
        """What the memory and cost models price: the kernels the runtime builds this stage with."""
        return self.target.stage_kernels(self.stage_kind, self.kernels)

    @property
    def budget(self) -> int:
        """Bytes a GPU may use: capacity x (1 - headroom)."""
        return int(self.gpu.hbm_bytes * (1.0 - self.headroom))


@dataclass(frozen=True, slots=True)
class Candidate:
    layout: Layout
    split: PipelineSplit
    memory: MemoryBreakdown
    estimate: Estimate

    @property
    def rank_key(self) -> tuple:
        return (self.estimate.step_time_s, self.memory.total, layout_key(self.layout))


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why candidates lost, aggregated: `count` candidates lost for `reason`; `example` is the
    closest one (for memory: the smallest overflow)."""

    reason: str
    count: int
    example: str
    layout: str
    over_bytes: int = 0
    hint: str | None = None  # for a rule: the rule's own hint


@dataclass(frozen=True, slots=True)
class Overflow:
    """The candidate that came closest to fitting, for the "nothing fits" diagnostic."""

    layout: Layout
    memory: MemoryBreakdown
    budget: int

    @property
    def over_bytes(self) -> int:
        return self.memory.total - self.budget

    @property
    def largest_term(self) -> str:
        return max(MEMORY_TERMS, key=lambda t: getattr(self.memory, t))


@dataclass(frozen=True, slots=True)
class SearchResult:
    ranked: tuple[Candidate, ...]  # the best fitting candidates, fastest first
    rejections: tuple[Rejection, ...]  # most frequent reason first
    closest: Overflow | None  # best non-fitting candidate (smallest overflow)
    evaluated: int  # memory-model evaluations
    space: int  # candidates the search covered (evaluated, or rejected / pruned as a block)
    fitting: int = 0  # fitting candidates whose time was estimated

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None


def layout_key(layout: Layout) -> tuple:
    """A fixed total order on layouts, the last tie-break of the ranking."""
    return (layout.tp, layout.pp, layout.vp or 0, layout.cp, layout.ep, layout.etp, layout.micro_batch,
            RECOMPUTE_ORDER.index(layout.recompute), -(layout.recompute_layers or 0), not layout.distributed_optimizer,
            not layout.sequence_parallel)


def describe(layout: Layout) -> str:
    vp = f" vp={layout.vp}" if layout.vp else ""
    ep = f" ep={layout.ep} etp={layout.etp}" if layout.ep > 1 or layout.etp != layout.tp else ""
    return (f"tp={layout.tp} pp={layout.pp}{vp} cp={layout.cp}{ep} dp={layout.dp} mb={layout.micro_batch} "
            f"sp={'on' if layout.sequence_parallel else 'off'} dopt={'on' if layout.distributed_optimizer else 'off'} "
            f"recompute={recompute_text(layout.recompute, layout.recompute_layers, layout.recompute_modules)}"
            + (" fsdp=on" if layout.megatron_fsdp else ""))


def recompute_text(recompute: str, layers: int | None, modules: tuple[str, ...] | None = None) -> str:
    if layers is not None:
        return f"{recompute}({layers} layers per chunk)"
    if recompute == "selective" and modules is not None:  # written modules (None: Megatron's core_attn)
        return f"selective({', '.join(modules)})"
    return recompute


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# -------------------------------------------------------------------------------- the evaluation


def _stage_layers(p: Problem, layout: Layout) -> tuple[int, int, int] | None:
    """(first, middle, last) transformer layers of the split nemoc gives Megatron for this layout
    (None when even): the memory model then sizes each stage by its own layers (and embedding or
    loss), the cost model the slowest stage."""
    split = model_split(p.model, layout.pp, layout.vp)
    return None if split is None or split.even else split.stage_layers(layout.pp)


def pipeline_memory(p: Problem, layout: Layout) -> tuple[MemoryBreakdown, ...]:
    """`evaluate_memory` for every pipeline stage (its largest total is `evaluate_memory`'s)."""
    return memory.pipeline_stages(
        p.model, layout, precision=p.precision, attention_backend=p.costed_backend, seq_length=p.seq_length,
        stage_kind=p.stage_kind, peft=p.peft, gpu=p.gpu, params=p.params, split=_stage_layers(p, layout),
        kernels=p.stage_kernels, grad_bytes=_grad_bytes(layout), moe_dispatcher=_dispatcher(p, layout),
        cuda_graph_share=_graph_share(p),
        parents=p.parents, fp8_recipe=p.fp8_recipe, dropout=p.dropout, cross_entropy=p.cross_entropy,
        bf16_layers=p.costed_bf16_layers,
    )


def _graph_share(p: Problem) -> float:
    """The share of each layer the stage's CUDA graphs capture (memory's static graph buffers)."""
    return cost.cuda_graph_share(p.host, p.model)


def _dispatcher(p: Problem, layout: Layout) -> str:
    moe = p.moe_of(layout)
    return moe.dispatcher if moe is not None else "alltoall"


def _grad_bytes(layout: Layout) -> int:
    """Bytes per element of the DDP gradient buffer: fp32 main grads, or 16-bit (grad_reduce_in_fp32 = false)."""
    return 4 if layout.grad_reduce_in_fp32 else 2


def evaluate_memory(p: Problem, layout: Layout) -> MemoryBreakdown:
    return memory.estimate(
        p.model, layout, precision=p.precision, attention_backend=p.costed_backend, seq_length=p.seq_length,
        stage_kind=p.stage_kind, peft=p.peft, gpu=p.gpu, params=p.params, split=_stage_layers(p, layout),
        kernels=p.stage_kernels, grad_bytes=_grad_bytes(layout), moe_dispatcher=_dispatcher(p, layout),
        cuda_graph_share=_graph_share(p),
        parents=p.parents, fp8_recipe=p.fp8_recipe, dropout=p.dropout, cross_entropy=p.cross_entropy,
        bf16_layers=p.costed_bf16_layers,
    )


def evaluate_time(p: Problem, layout: Layout, params: cost.EfficiencyParams = cost.DEFAULT_PARAMS) -> Estimate:
    """`cost.estimate` of `layout` under `p`; `params`: the efficiencies (bench/calibrate.py --fit varies them)."""
    return cost.estimate(
        p.model, layout, cluster=p.cluster, gpu=p.gpu, precision=p.precision, attention_backend=p.costed_backend,
        seq_length=p.seq_length, steps=p.steps, stage_kind=p.stage_kind, peft=p.peft, stage_params=p.params,
        split=_stage_layers(p, layout), kernels=p.stage_kernels, grad_bytes=_grad_bytes(layout),
        overlap_tp=layout.tp_comm_overlap, overlap_param_gather=layout.overlap_param_gather, params=params,
        overlap_p2p=p.target.overlap_p2p, fp8_recipe=p.fp8_recipe, moe=p.moe_of(layout), host=p.host,
        attention_span=p.attention_span, dropout=p.dropout, cross_entropy=p.cross_entropy,
        bf16_layers=p.costed_bf16_layers,
    )


def bound_time(p: Problem, layout: Layout, micro_batches: tuple[int, int]) -> float:
    """`cost.step_time_lower_bound` of `layout`'s group over the micro batches (smallest, largest)."""
    return cost.step_time_lower_bound(
        p.model, layout, micro_batches=micro_batches, cluster=p.cluster, gpu=p.gpu, precision=p.precision,
        attention_backend=p.costed_backend, seq_length=p.seq_length, stage_kind=p.stage_kind, peft=p.peft,
        stage_params=p.params, split=_stage_layers(p, layout), kernels=p.stage_kernels,
        overlap_tp=layout.tp_comm_overlap, overlap_p2p=p.target.overlap_p2p, moe=p.moe_of(layout), host=p.host,
        attention_span=p.attention_span, cross_entropy=p.cross_entropy,
    )


class _Recorder:
    """Aggregates rejections by reason and remembers the closest non-fitting candidate."""

    def __init__(self, budget: int):
        self.budget = budget
        self.by_reason: dict[str, list] = {}
        self.closest: Overflow | None = None
        self.evaluated = 0
        self.space = 0

    def rule(self, short, reason: str, layout, count: int = 1, hint: str | None = None) -> None:
        """Count `count` candidates lost for `reason`; `short` / `layout` (text, or a Layout / a
        callable giving the text) are formatted only for a reason's first example."""
        self.space += count
        entry = self.by_reason.get(reason)
        if entry is None:
            text = describe(layout) if isinstance(layout, Layout) else layout() if callable(layout) else layout
            entry = self.by_reason[reason] = [0, short() if callable(short) else short, text, 0, hint]
        entry[0] += count

    def states(self, layout: Layout, states: tuple[int, int, int, int], count: int) -> None:
        """Count `count` candidates whose model states alone overflow (`memory.states_lower_bound`: (bound,
        weights, gradients, optimizer)); the example is the smallest such overflow."""
        self.space += count
        bound, weights, gradients, optimizer = states
        over = bound - self.budget
        entry = self.by_reason.get(STATES_REASON)
        if entry is None:
            entry = self.by_reason[STATES_REASON] = [0, "", "", None, None]
        entry[0] += count
        if entry[3] is None or over < entry[3]:
            example = (f"at least {gib(bound)} > budget {gib(self.budget)} by {gib(over)}: weights {gib(weights)} + "
                       f"gradients {gib(gradients)} + optimizer {gib(optimizer)} + CUDA context and NCCL "
                       f"{gib(bound - weights - gradients - optimizer)}")
            entry[1:4] = [example, describe(layout), over]

    def memory(self, layout: Layout, mem: MemoryBreakdown, count: int = 1) -> None:
        self.space += count
        total = mem.total
        over = total - self.budget
        terms = (mem.weights, mem.gradients, mem.optimizer, mem.activations, mem.other)
        term = MEMORY_TERMS[terms.index(max(terms))]
        reason = f"out of memory (largest term: {term})"
        entry = self.by_reason.get(reason)
        if entry is None:
            entry = self.by_reason[reason] = [0, "", "", None, None]
        entry[0] += count
        if entry[3] is None or over < entry[3]:  # format only the closest example
            example = f"total {gib(total)} > budget {gib(self.budget)} by {gib(over)}; {term} {gib(getattr(mem, term))}"
            entry[1:4] = [example, describe(layout), over]
        if self.closest is None or over < self.closest.over_bytes or (
                over == self.closest.over_bytes and layout_key(layout) < layout_key(self.closest.layout)):
            self.closest = Overflow(layout, mem, self.budget)

    def result(self, top: "_Top") -> SearchResult:
        rej = sorted((Rejection(r, e[0], e[1], e[2], e[3] or 0, e[4]) for r, e in self.by_reason.items()),
                     key=lambda r: (-r.count, r.reason))
        return SearchResult(tuple(top.items), tuple(rej), self.closest, self.evaluated, self.space + top.seen, top.seen)


def _make_layout(p: Problem, tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rc: tuple[str, int | None]) -> Layout:
    gb = p.global_batch if p.global_batch is not None else mb * dp
    return Layout(tp=tp, pp=pp, vp=vp, cp=cp, ep=ep, etp=etp, dp=dp, micro_batch=mb, global_batch=gb,
                  num_microbatches=max(1, gb // (mb * dp)), sequence_parallel=sp, distributed_optimizer=do,
                  recompute=rc[0], recompute_layers=rc[1], recompute_modules=p.fixed.recompute_modules,
                  tp_comm_overlap=p.fixed.tp_comm_overlap,
                  defer_embedding_wgrad_compute=p.fixed.defer_embedding_wgrad_compute,
                  wgrad_deferral_limit=p.fixed.wgrad_deferral_limit,
                  grad_reduce_in_fp32=p.fixed.grad_reduce_in_fp32,
                  overlap_param_gather=p.fixed.overlap_param_gather, fp8_param_gather=p.fixed.fp8_param_gather,
                  megatron_fsdp=p.fixed.megatron_fsdp, optimizer_state_dtype=p.fixed.optimizer_state_dtype,
                  precision_aware_optimizer=p.fixed.precision_aware)


def _sizes(p: Problem, layout: Layout) -> Sizes:
    return Sizes(tp=layout.tp, pp=layout.pp, vp=layout.vp, cp=layout.cp, ep=layout.ep, etp=layout.etp,
                 dp=layout.dp, micro_batch=layout.micro_batch, global_batch=layout.global_batch,
                 sequence_parallel=layout.sequence_parallel, distributed_optimizer=layout.distributed_optimizer,
                 recompute=layout.recompute, recompute_layers=layout.recompute_layers,
                 recompute_modules=layout.recompute_modules, seq_length=p.seq_length,
                 tp_comm_overlap=layout.tp_comm_overlap,
                 defer_embedding_wgrad_compute=layout.defer_embedding_wgrad_compute,
                 overlap_param_gather=layout.overlap_param_gather, fp8_param_gather=layout.fp8_param_gather,
                 megatron_fsdp=layout.megatron_fsdp, optimizer_state_dtype=layout.optimizer_state_dtype,
                 precision_aware_optimizer=layout.precision_aware_optimizer)


# ------------------------------------------------------------------------------------ the domains


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _pick(fixed, auto: list) -> list:
    return [fixed] if fixed is not None else auto


def _tp_domain(p: Problem, env: Env) -> list[int]:
    world = p.cluster.world_size
    ok = [t for t in divisors(world)
          if all(r(env, Sizes(tp=t)) is None for r in (rule_heads_tp, rule_query_groups_tp, rule_ffn_tp))]
    return _pick(p.fixed.tensor, ok)


def _pp_domain(p: Problem, tp: int) -> list[int]:
    """Auto PP: divisors of world / tp up to the layer count, or only 1 for a stage kind the
    target runs without a pipeline (`Target.caps`); a fixed PP is kept (the rules judge it)."""
    if not p.target.caps(p.stage_kind).pipeline:
        return _pick(p.fixed.pipeline, [1])
    return _pick(p.fixed.pipeline, [d for d in divisors(p.cluster.world_size // tp) if d <= p.model.layers])


def _vp_domain(p: Problem, pp: int) -> list[int | None]:
    v = p.fixed.virtual_pipeline
    if v is not None:
        return [None] if v <= 1 else [v]
    caps = p.target.caps(p.stage_kind)
    if pp == 1 or not caps.pipeline or not caps.virtual_pipeline:
        return [None]
    return [None] + [v for v in range(2, p.model.layers // pp + 1) if model_split(p.model, pp, v)]


def _expert_domain(p: Problem, tp: int, pp: int, rest: int, rec: _Recorder | None = None) -> list[tuple[int, int]]:
    """(ep, etp) pairs. Dense: (1, tp), Megatron's default etp = tp. MoE: ep divides the experts
    and the expert grid etp x ep x pp divides the world (E116; each pair that does not is recorded
    in `rec`, so a search that finds nothing says why); auto etp tries 1 and tp."""
    world = p.cluster.world_size
    if not p.model.is_moe:
        return [(p.fixed.expert or 1, p.fixed.expert_tensor or tp)]
    eps = _pick(p.fixed.expert, divisors(p.model.experts))
    etps = _pick(p.fixed.expert_tensor, sorted({1, tp}))
    pairs = []
    for e in eps:
        for t in etps:
            if world % (e * t * pp) == 0:
                pairs.append((e, t))
            elif rec is not None:
                rec.rule(f"world size {world} % (etp({t}) * ep({e}) * pp({pp})) = {world % (e * t * pp)} != 0",
                         "E116 the expert grid etp x ep x pp does not divide the world size",
                         f"tp={tp} pp={pp} ep={e} etp={t}", hint="choose expert (and expert_tensor) so that "
                         "etp x ep x pp divides the number of GPUs")
    return pairs


def _micro_batches(p: Problem, dp: int) -> list[int]:
    if p.global_batch is None:
        return _pick(p.fixed.micro_batch, [1])
    if p.global_batch % dp:
        return []
    return _pick(p.fixed.micro_batch, divisors(p.global_batch // dp))


def _recomputes(p: Problem, pp: int = 1, vp: int | None = None) -> list[tuple[str, int | None]]:
    """(recompute, recompute_layers) levels, strongest first: full recompute of every layer, block
    recompute of 3/4, 1/2, 1/4 of a model chunk's layers (`BLOCK_RECOMPUTE_SHARES`, only with
    recompute auto and a flash-class core), selective, none. A fixed `recompute_layers` is the
    one level (E162 refuses it with another recompute); so are written `recompute_modules`, which
    only selective recompute reads (E192 refuses them with none or full): the modules are taken as
    the user states them, never searched."""
    f = p.fixed
    if f.recompute_modules is not None and f.recompute is None:
        return [("selective", None)]
    levels = list(_recompute_levels(f.recompute, f.recompute_layers, p.costed_backend == "unfused",
                                    chunk_layers(p.model.layers, pp, vp)))
    if f.recompute is None and f.recompute_layers is None and _layer_graphs(p):
        # Megatron-Core graphs full recompute only inside a whole-iteration graph (E174): auto
        # recompute searches the levels per-layer CUDA graphs can run
        levels = [rc for rc in levels if rc[0] != "full"]
    return levels


def _layer_graphs(p: Problem) -> bool:
    """The stage captures per-layer CUDA graphs (not one whole-iteration graph)."""
    return p.host.cuda_graph_impl != "none" and tuple(p.host.cuda_graph_scope) != ("full_iteration",)


@lru_cache(maxsize=1024)  # the search asks once per group
def _recompute_levels(recompute: str | None, layers: int | None, unfused: bool,
                      chunk: int) -> tuple[tuple[str, int | None], ...]:
    if layers is not None:
        return (("full", layers),)
    levels: list[tuple[str, int | None]] = [(rc, None) for rc in _pick(recompute, list(RECOMPUTE_ORDER))]
    if recompute is not None or unfused:
        return tuple(levels)
    blocks = sorted({max(1, round(chunk * q)) for q in BLOCK_RECOMPUTE_SHARES} - {chunk}, reverse=True)
    return tuple(levels[:1] + [("full", n) for n in blocks] + levels[1:])


def _with_recompute(layout: Layout, rc: tuple[str, int | None]) -> Layout:
    return replace(layout, recompute=rc[0], recompute_layers=rc[1])


def _bools(fixed: bool | None, allowed: bool = True) -> list[bool]:
    if fixed is not None:
        return [fixed]
    return [True, False] if allowed else [False]


# ------------------------------------------------------------------------------------ fast search


class _Top:
    """The `n` best candidates seen so far (by `rank_key`), and how many fitting ones were seen."""

    def __init__(self, n: int):
        self.n = n
        self.items: list[Candidate] = []
        self.seen = 0

    def threshold(self) -> tuple | None:
        return self.items[-1].rank_key if len(self.items) >= self.n else None

    def push(self, c: Candidate) -> None:
        self.seen += 1
        bisect.insort(self.items, c, key=lambda x: x.rank_key)
        del self.items[self.n:]


def search(p: Problem, *, top: int = DEFAULT_TOP, prune: bool = True) -> SearchResult:
    """The `top` fastest fitting candidates, with pruning (see module docstring).

    Exact with respect to `enumerate_all` for the best candidate, given three properties of the
    memory and cost models that tests assert: memory is monotone in micro batch and recompute;
    time is monotone in recompute; with `distributed_optimizer` / `sequence_parallel` auto, the
    distributed optimizer is never slower nor larger, and sequence parallelism is never slower.
    Branch and bound (5): groups are searched in the order of `cost.step_time_lower_bound`, and a
    group whose bound is slower than the top list's last entry is skipped whole; the bound holds
    for every micro batch and recompute of the group (tested), so the top list is exact.
    `prune`: prunings (6) to (9) as well (module docstring); False searches without them (the same ranked
    candidates and candidate count, tests/compiler/test_search_pruning.py; the rejections split otherwise).
    """
    # The search allocates ~1M short-lived objects and makes no reference cycles (the 405B search: 43
    # collections, nothing collected): the cyclic collector's passes over the process's objects only
    # cost time (~4 % of the search), so it pauses for the search and resumes as it was.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _search(p, top, prune)
    finally:
        if enabled:
            gc.enable()


def _search(p: Problem, top: int, prune: bool = True) -> SearchResult:
    ctx = _Context(p, prune)
    rec = _Recorder(ctx.budget)
    best = _Top(max(1, top))
    # (bound, order, level, sizes, SP values): a group enters with its coarse bound (or, pruning (8), in a
    # family with the family's bound) and is popped in the order of its exact bound (`_lazy_bounds`)
    heap = (_families(ctx, rec) if prune else
            [(coarse, order, _COARSE, args, sps) for coarse, order, args, sps in _coarse_groups(ctx, rec)])
    heapq.heapify(heap)
    for bound, _, args, sps in _lazy_bounds(ctx, heap):
        if ctx.base_pending and _base_failed(ctx, rec, args, sps, checked_only=True):
            continue  # a non-interleaved group whose deferred bound (2) failed: recorded by `_base_fits`
        threshold = best.threshold()
        if threshold is not None and bound > threshold[0] * (1 + REL_TOL):
            # the bounds ascend and only a searched group joins the top list, so every later group is
            # slower too: all are recorded at once, with this one as the example
            _record_slower(ctx, rec, best.n, threshold[0], [(bound, 0, args, sps)] + _waiting(heap))
            break
        if ctx.base_pending and _base_failed(ctx, rec, args, sps):
            continue
        _search_group(ctx, rec, best, *args, sps)
    return rec.result(best)


def _base_failed(ctx: _Context, rec: _Recorder, args: tuple, sps: list[bool], checked_only: bool = False) -> bool:
    """Pruning (7), bound (2) deferred: whether the group `args` is out because its family's non-interleaved
    group (same tp, pp, cp, ep, etp and DO) has no member that fits, checked (`_base_fits`, which records its
    rejections) the first time a group of the family comes out of the heap, so a family whose every group's
    step-time bound loses is never sized. The non-interleaved group itself is then out (already recorded); an
    interleaved one with the same per-stage layers is recorded as bound (2) rejects it; one with another split
    stays. The DO values are checked in `_do_domain`'s order (on first) up to the group's, as `_groups`
    checks them without the deferral (dominance (4) then answers for off). `checked_only`: answer for a
    non-interleaved group from the checks made so far (False where none was), checking nothing."""
    tp, pp, vp, cp, ep, etp, dp, do = args
    family = ctx.base_pending.get((tp, pp, cp, ep, etp))
    if family is None or (vp is not None and not ctx.same_split(pp, vp)):
        return False
    _, dos, base_sps = family
    if checked_only:
        if (tp, pp, cp, ep, etp, do) not in ctx.base_checked or vp is not None:
            return False
    else:
        for d in dos[:dos.index(do) + 1]:
            if (tp, pp, cp, ep, etp, d) not in ctx.base_checked:
                ctx.base_checked[(tp, pp, cp, ep, etp, d)] = _base_fits(ctx, rec, tp, pp, cp, ep, etp, dp, d, base_sps)
    if ctx.base_checked[(tp, pp, cp, ep, etp, do)]:
        return False
    if vp is not None:
        rec.rule("interleaving only adds activation memory (and the failed rules do not depend on it)",
                 "rejected: interleaved variant of a layout that fails memory or rules without interleaving",
                 f"tp={tp} pp={pp} cp={cp} vp>1", len(ctx.micro_batches(dp)) * len(ctx.recomputes(pp, vp)) * len(sps))
    return True


def _lazy_bounds(ctx: _Context, heap: list):
    """The groups of `heap` in the order of their exact bound (`_Context.group_bound`; ties: in `_groups`'
    order), as (bound, order, sizes, SP values), computing an exact bound only when its group's coarse one
    (`_Context.coarse_bound`, never above it) comes first. The order is `sorted` by exact bound: when an
    entry with its exact bound b comes first, every other has a key >= b, and its exact bound >= its key.
    A group the search ends before (bound (5)) never has its exact bound computed."""
    while heap:
        bound, order, level, args, sps = heapq.heappop(heap)
        if level == _EXACT:
            yield bound, order, args, sps
        elif level == _COARSE:
            heapq.heappush(heap, (ctx.group_bound(args, sps), order, _EXACT, args, sps))
        else:  # a family (`_families`): its groups, each under its exact bound
            for order, args, sps in args:
                heapq.heappush(heap, (ctx.group_bound(args, sps), order, _EXACT, args, sps))


# the levels of the heap's entries (`_lazy_bounds`): a family of groups under the family's bound, a group under
# its coarse bound, a group under its exact bound
_FAMILY, _COARSE, _EXACT = 0, 1, 2


def _families(ctx: _Context, rec: _Recorder) -> list[tuple]:
    """Pruning (8): `_groups` as heap entries of `_lazy_bounds`, one per family of groups that differ only in VP
    and DO (the same tp, pp, cp, ep, etp, so dp and the micro batches, and the same preferred SP value) under
    the family's bound (`_Context.family_bound`: never above a member's exact bound) and its members' first
    order; a family whose bound loses is never expanded, so its members' bounds are never computed. The
    order of the yielded groups is that of sorting every exact bound, as with coarse bounds: a family's key
    (bound, order) is at or below each member's (exact bound, order)."""
    families: dict[tuple, list] = {}
    groups = _groups(ctx, rec, bounds=False)
    ctx.coarsest = max((ctx.micro_batches(args[6])[-1] for _, _, args, _ in groups), default=1)
    for _, order, args, sps in groups:
        tp, pp, vp, cp, ep, etp, dp, do = args
        families.setdefault((tp, pp, cp, ep, etp, sps[0]), []).append((order, args, sps))
    return [(ctx.family_bound(members[0][1], members[0][2]), members[0][0], _FAMILY, tuple(members), None)
            for members in families.values()]


def _waiting(heap: list) -> list[tuple]:
    """The groups still in the heap, as (bound, order, sizes, SP values), a family's groups under its bound."""
    out = []
    for bound, order, level, args, sps in heap:
        if level == _FAMILY:
            out.extend((bound, order, a, s) for order, a, s in args)
        else:
            out.append((bound, order, args, sps))
    return out


def _coarse_groups(ctx: _Context, rec: _Recorder) -> list[tuple]:
    """`_groups` with each group's coarse bound (`_Context.coarse_bound`) in place of its exact one."""
    groups = _groups(ctx, rec, bounds=False)
    ctx.coarsest = max((ctx.micro_batches(args[6])[-1] for _, _, args, _ in groups), default=1)
    return [(ctx.coarse_bound(args, sps), order, args, sps) for _, order, args, sps in groups]


def _record_slower(ctx: _Context, rec: _Recorder, n: int, threshold: float, groups: list[tuple]) -> None:
    """Bound (5): the `groups` whose step-time bound is above the top list's last entry (`threshold`),
    counted by their candidates; the first (the lowest bound) is the example."""
    count = 0
    for _, _, (tp, pp, vp, cp, ep, etp, dp, do), sps in groups:
        if vp is None and ctx.base_checked.get((tp, pp, cp, ep, etp, do)) is False:
            continue  # pruning (7): a non-interleaved group whose deferred bound (2) failed, recorded by `_base_fits`
        if vp is None and (tp, pp, cp, ep, etp, do) in ctx.base_fits:  # SP values `_base_fits` rejected are counted
            sps = sum(ctx.base_fits[(tp, pp, cp, ep, etp, do)], [])
        count += len(ctx.micro_batches(dp)) * len(ctx.recomputes(pp, vp)) * len(sps)
    bound, _, (tp, pp, vp, cp, ep, etp, dp, do), _ = groups[0]
    rec.rule(lambda: f"its step time is at least {bound:.3g} s, slower than the top {n} ({threshold:.3g} s and "
             "faster)", "slower: a lower bound of the step time is already above the top list",
             f"tp={tp} pp={pp}{f' vp={vp}' if vp else ''} cp={cp} dp={dp}", count)


class _Context:
    """What one `search` asks again and again, computed once: the problem's domains per size (micro
    batches per dp, recompute levels per (pp, vp), VP values per pp), the per-problem arguments of the
    memory and cost models, and the per-layout ones that depend on a few sizes only (the pipeline split
    per (pp, vp), the MoE dispatcher per ep). Pure caching: every value is what the module-level
    function (`_micro_batches`, `_recomputes`, `evaluate_memory`, `evaluate_time`, `bound_time`)
    returns for the same arguments; the oracle (`enumerate_all`) calls those functions directly."""

    def __init__(self, p: Problem, prune: bool = False):
        self.p = p
        self.prune = prune  # prunings (6) to (9) (`search`'s `prune`)
        self.env = p.env
        self.budget = p.budget
        self._mbs: dict[int, list[int]] = {}
        self._rcs: dict[tuple, list] = {}
        self._vps: dict[int, list] = {}
        self._splits: dict[tuple, tuple[int, int, int] | None] = {}
        self._same_split: dict[tuple, bool] = {}
        self._moe: dict[int, MoeExecution | None] = {}
        self._layouts: dict[tuple, Layout] = {}  # `layout` by its sizes
        # `cost.step_time_lower_bound`'s memo (the bound's layer times, stage times and trainable parameters,
        # by the few sizes each depends on): one per search, so two problems never share one
        self._bound_memo: dict = {}
        self._group_bounds: dict[tuple, float] = {}
        self._time_memo: dict = {}  # `cost.estimate`'s memo of the layer times (one per search, as the bound's)  # `group_bound` / `coarse_bound` by the sizes they read
        self.coarsest = 1  # the largest micro batch of any group (`coarse_bound`; set by `_coarse_groups`)
        # (tp, pp, vp, cp, ep, etp, sp) groups whose distributed-optimizer member overflows at its
        # smallest micro batch and strongest recompute (`_group_fits`)
        self.dopt_overflows: set[tuple] = set()
        self.rules = [_Decisions(rule) for rule in _GROUP_RULES]  # their results, by the sizes they read
        self.mb_rules = [_Decisions(rule) for rule in _MB_RULES]  # the same for `rules_mb`
        # (tp, pp, cp, ep, etp, do) -> (the SP values whose non-interleaved group passed bound (1), those
        # not checked yet) (`_base_fits`)
        self.base_fits: dict[tuple, tuple[list[bool], list[bool]]] = {}
        # pruning (7): (tp, pp, cp, ep, etp) -> (dp, DO values, SP values) of the families whose bound (2) check
        # waits (`_base_failed`), and (tp, pp, cp, ep, etp, do) -> whether `_base_fits` passed, once checked
        self.base_pending: dict[tuple, tuple[int, list[bool], list[bool]]] = {}
        self.base_checked: dict[tuple, bool] = {}
        f = p.fixed
        kernels = p.stage_kernels
        # Layout and Sizes fields every candidate takes from the problem
        self.fixed_layout = dict(recompute_modules=f.recompute_modules, tp_comm_overlap=f.tp_comm_overlap,
                                 grad_reduce_in_fp32=f.grad_reduce_in_fp32,
                                 defer_embedding_wgrad_compute=f.defer_embedding_wgrad_compute,
                                 wgrad_deferral_limit=f.wgrad_deferral_limit,
                                 overlap_param_gather=f.overlap_param_gather, fp8_param_gather=f.fp8_param_gather,
                                 megatron_fsdp=f.megatron_fsdp, optimizer_state_dtype=f.optimizer_state_dtype,
                                 precision_aware_optimizer=f.precision_aware)
        self.fixed_sizes = dict(seq_length=p.seq_length, recompute_modules=f.recompute_modules,
                                tp_comm_overlap=f.tp_comm_overlap,
                                defer_embedding_wgrad_compute=f.defer_embedding_wgrad_compute,
                                overlap_param_gather=f.overlap_param_gather, fp8_param_gather=f.fp8_param_gather,
                                megatron_fsdp=f.megatron_fsdp, optimizer_state_dtype=f.optimizer_state_dtype,
                                precision_aware_optimizer=f.precision_aware)
        self.grad_bytes = 4 if f.grad_reduce_in_fp32 else 2  # `_grad_bytes` of every candidate
        self.states_kw = dict(precision=p.precision, stage_kind=p.stage_kind, peft=p.peft, params=p.params,
                              grad_bytes=self.grad_bytes, parents=p.parents, fp8_recipe=p.fp8_recipe)
        self._states: dict[tuple, tuple[int, int, int, int]] = {}  # `states_bound` by the sizes it reads
        self.memory_kw = dict(precision=p.precision, attention_backend=p.costed_backend, seq_length=p.seq_length,
                              stage_kind=p.stage_kind, peft=p.peft, gpu=p.gpu, params=p.params, kernels=kernels,
                              grad_bytes=self.grad_bytes, cuda_graph_share=_graph_share(p), parents=p.parents,
                              fp8_recipe=p.fp8_recipe, dropout=p.dropout, cross_entropy=p.cross_entropy,
                              bf16_layers=p.costed_bf16_layers)
        self.time_kw = dict(cluster=p.cluster, gpu=p.gpu, precision=p.precision, attention_backend=p.costed_backend,
                            seq_length=p.seq_length, steps=p.steps, stage_kind=p.stage_kind, peft=p.peft,
                            stage_params=p.params, kernels=kernels, grad_bytes=self.grad_bytes,
                            overlap_tp=f.tp_comm_overlap, overlap_param_gather=f.overlap_param_gather,
                            overlap_p2p=p.target.overlap_p2p, fp8_recipe=p.fp8_recipe, host=p.host,
                            attention_span=p.attention_span, dropout=p.dropout, cross_entropy=p.cross_entropy,
                            bf16_layers=p.costed_bf16_layers)
        self.bound_kw = dict(cluster=p.cluster, gpu=p.gpu, precision=p.precision, attention_backend=p.costed_backend,
                             seq_length=p.seq_length, stage_kind=p.stage_kind, peft=p.peft, stage_params=p.params,
                             kernels=kernels, overlap_tp=f.tp_comm_overlap, overlap_p2p=p.target.overlap_p2p,
                             host=p.host, attention_span=p.attention_span, cross_entropy=p.cross_entropy)

    def micro_batches(self, dp: int) -> list[int]:
        mbs = self._mbs.get(dp)
        if mbs is None:
            mbs = self._mbs[dp] = _micro_batches(self.p, dp)
        return mbs

    def recomputes(self, pp: int = 1, vp: int | None = None) -> list[tuple[str, int | None]]:
        rcs = self._rcs.get((pp, vp))
        if rcs is None:
            rcs = self._rcs[(pp, vp)] = _recomputes(self.p, pp, vp)
        return rcs

    def vps(self, pp: int) -> list[int | None]:
        vps = self._vps.get(pp)
        if vps is None:
            vps = self._vps[pp] = _vp_domain(self.p, pp)
        return vps

    def stage_layers(self, pp: int, vp: int | None) -> tuple[int, int, int] | None:
        key = (pp, vp)
        if key not in self._splits:
            split = model_split(self.p.model, pp, vp)
            self._splits[key] = None if split is None or split.even else split.stage_layers(pp)
        return self._splits[key]

    def same_split(self, pp: int, vp: int) -> bool:
        """Whether the interleaved split of (pp, vp) gives every pipeline stage the layers of the
        non-interleaved one (bound (2) compares only such layouts)."""
        same = self._same_split.get((pp, vp))
        if same is None:
            same = self._same_split[(pp, vp)] = _split(self.p, pp, vp) == _split(self.p, pp, None)
        return same

    def moe(self, layout: Layout) -> MoeExecution | None:
        """`p.moe_of(layout)`, which depends on the expert-parallel size only."""
        if layout.ep not in self._moe:
            self._moe[layout.ep] = self.p.moe_of(layout)
        return self._moe[layout.ep]

    def layout(self, tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rc: tuple[str, int | None]) -> Layout:
        """`_make_layout(p, ...)`, kept by its sizes (the search builds one layout up to three times: a group's
        bound, its memory bound (1) and its first candidate; a frozen dataclass of ~30 fields is slow to build)."""
        key = (tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rc)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._make_layout(tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rc)
        return layout

    def _make_layout(self, tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rc: tuple[str, int | None]) -> Layout:
        gb = self.p.global_batch if self.p.global_batch is not None else mb * dp
        return Layout(tp=tp, pp=pp, vp=vp, cp=cp, ep=ep, etp=etp, dp=dp, micro_batch=mb, global_batch=gb,
                      num_microbatches=max(1, gb // (mb * dp)), sequence_parallel=sp, distributed_optimizer=do,
                      recompute=rc[0], recompute_layers=rc[1], **self.fixed_layout)

    def sizes(self, tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rc: tuple[str, int | None]) -> Sizes:
        """`_sizes(p, _make_layout(p, ...))`, without the layout."""
        gb = self.p.global_batch if self.p.global_batch is not None else mb * dp
        return Sizes(tp=tp, pp=pp, vp=vp, cp=cp, ep=ep, etp=etp, dp=dp, micro_batch=mb, global_batch=gb,
                     sequence_parallel=sp, distributed_optimizer=do, recompute=rc[0], recompute_layers=rc[1],
                     **self.fixed_sizes)

    def rules_mb(self, layout: Layout) -> Violation | None:
        """The first broken micro-batch rule of `layout` (`_MB_RULES`: global batch divisibility, interleaved
        microbatch count, fp8 tokens per GEMM), each asked through its decision tree (`_Decisions`)."""
        values = dict(self.fixed_sizes, tp=layout.tp, pp=layout.pp, vp=layout.vp, cp=layout.cp, ep=layout.ep,
                      etp=layout.etp, dp=layout.dp, micro_batch=layout.micro_batch, global_batch=layout.global_batch,
                      sequence_parallel=layout.sequence_parallel, distributed_optimizer=layout.distributed_optimizer,
                      recompute=layout.recompute, recompute_layers=layout.recompute_layers)
        for decisions in self.mb_rules:
            v = decisions.ask(self.env, values)
            if v is not None:
                return v
        return None

    def memory(self, layout: Layout) -> MemoryBreakdown:
        """`evaluate_memory(p, layout)`."""
        moe = self.moe(layout)
        return memory.estimate(self.p.model, layout, split=self.stage_layers(layout.pp, layout.vp),
                               moe_dispatcher=moe.dispatcher if moe is not None else "alltoall", **self.memory_kw)

    def states_bound(self, layout: Layout) -> tuple[int, int, int, int]:
        """`memory.states_lower_bound` of `layout`, kept by the sizes it reads (not micro batch, recompute or SP)."""
        key = (layout.tp, layout.pp, layout.vp, layout.cp, layout.ep, layout.etp, layout.dp,
               layout.distributed_optimizer)
        states = self._states.get(key)
        if states is None:
            states = self._states[key] = memory.states_lower_bound(
                self.p.model, layout, split=self.stage_layers(layout.pp, layout.vp), **self.states_kw)
        return states

    def time(self, layout: Layout) -> Estimate:
        """`evaluate_time(p, layout)`."""
        return cost.estimate(self.p.model, layout, split=self.stage_layers(layout.pp, layout.vp),
                             moe=self.moe(layout), memo=self._time_memo, **self.time_kw)

    def group_bound(self, args: tuple, sps: list[bool]) -> float:
        """The step-time bound of the group `args` = (tp, pp, vp, cp, ep, etp, dp, do) over its micro batches
        and recompute levels (`bound_time` of its layout at its largest micro batch, with recompute none).
        One bound serves every DO and SP value of the group: the distributed optimizer's sharded step is
        the smaller optimizer term (the bound leaves DP traffic out), and sequence parallelism, preferred
        first (`sps[0]`), is never slower."""
        key = args[:7] + (sps[0],)
        bound = self._group_bounds.get(key)
        if bound is None:
            tp, pp, vp, cp, ep, etp, dp, _ = args
            mbs = self.micro_batches(dp)
            bound = self._group_bounds[key] = self.bound(
                self.layout(tp, pp, vp, cp, ep, etp, dp, mbs[-1], sps[0], True, ("none", None)), (mbs[0], mbs[-1]))
        return bound

    def coarse_bound(self, args: tuple, sps: list[bool]) -> float:
        """A lower bound of `group_bound(args, sps)` that is cheap to compute for every group: the same bound
        over the micro batches from the group's smallest to `coarsest` (the largest micro batch of any
        group), a superset of its own. Its layer times (the bound's costly part) then depend on (tp, cp,
        ep, etp, SP) only, not on dp, and the bound's memo answers for every pp, vp and dp; it is no
        larger than the group's own bound because every term's time per row never grows with the micro
        batch (`cost.step_time_lower_bound`), so a larger 'largest' only lowers it."""
        key = ("coarse",) + args[:7] + (sps[0],)
        bound = self._group_bounds.get(key)
        if bound is None:
            tp, pp, vp, cp, ep, etp, dp, _ = args
            mbs = self.micro_batches(dp)
            bound = self._group_bounds[key] = self.bound(
                self.layout(tp, pp, vp, cp, ep, etp, dp, mbs[-1], sps[0], True, ("none", None)),
                (mbs[0], max(self.coarsest, mbs[-1])))
        return bound

    def family_bound(self, args: tuple, sps: list[bool]) -> float:
        """A lower bound of `group_bound` for every group that differs from `args` only in VP and DO (pruning
        (8)): `cost.step_time_lower_bound(any_vp=True)` of its layout without VP, over the micro batches from
        its smallest to `coarsest` (a superset of its own, as `coarse_bound`: the layer times then depend on
        (tp, cp, ep, etp, SP) only and one memo entry serves every pp and dp)."""
        tp, pp, _, cp, ep, etp, dp, _ = args
        mbs = self.micro_batches(dp)
        layout = self.layout(tp, pp, None, cp, ep, etp, dp, mbs[-1], sps[0], True, ("none", None))
        return cost.step_time_lower_bound(self.p.model, layout, micro_batches=(mbs[0], max(self.coarsest, mbs[-1])),
                                          split=self.stage_layers(pp, None), moe=self.moe(layout),
                                          memo=self._bound_memo, any_vp=True, **self.bound_kw)

    def bound(self, layout: Layout, micro_batches: tuple[int, int]) -> float:
        """`bound_time(p, layout, micro_batches)`."""
        return cost.step_time_lower_bound(self.p.model, layout, micro_batches=micro_batches,
                                          split=self.stage_layers(layout.pp, layout.vp), moe=self.moe(layout),
                                          memo=self._bound_memo, **self.bound_kw)


def _groups(ctx: _Context, rec: _Recorder, bounds: bool = True) -> list[tuple]:
    """Every (tp, pp, vp, cp, ep, etp, dp, do) group whose micro-batch-independent rules hold for
    some sequence-parallel value and that bound (2) leaves, as (lower bound (`_Context.group_bound`;
    None without `bounds`), order, sizes, SP values); the groups that break the world size, a rule or
    bound (2) are recorded in `rec`."""
    p = ctx.p
    world = p.cluster.world_size
    out = []
    rcs, dos = ctx.recomputes(), _do_domain(p)
    splits = p.splits_sequences  # policy: auto CP only where the target splits this stage's rows
    for tp in _tp_domain(p, ctx.env):
        if world % tp:
            rec.rule(f"world size {world} % tp({tp}) = {world % tp} != 0", "E101 world size", f"tp={tp}")
            continue
        sp_domain = _sp_domain(p, tp)
        tp_rules = None  # the group rules asked once for this TP (`_GroupRules`), at its first layout
        for pp in _pp_domain(p, tp):
            rest = world // (tp * pp) if world % (tp * pp) == 0 else 0
            cps = _pick(p.fixed.context, [c for c in divisors(rest) if c == 1 or (splits and p.seq_length % (2 * c) == 0)]
                        if rest else [])
            for cp in cps:
                if world % (tp * pp * cp):
                    rec.rule(f"world size {world} % (tp({tp}) * pp({pp}) * cp({cp})) != 0", "E101 world size",
                             f"tp={tp} pp={pp} cp={cp}")
                    continue
                dp = world // (tp * pp * cp)
                if p.fixed.data is not None and p.fixed.data != dp:
                    rec.rule(f"tp({tp}) * pp({pp}) * cp({cp}) * dp({p.fixed.data}) != world size {world}",
                             "E101 world size", f"tp={tp} pp={pp} cp={cp}")
                    continue
                mbs = ctx.micro_batches(dp)
                expert_rules = None  # the same for this (tp, pp, cp), every expert layout (MoE: EP x ETP)
                for ep, etp in _expert_domain(p, tp, pp, dp, rec):
                    vps = ctx.vps(pp)
                    if not mbs:
                        for vp in vps:
                            rec.rule(f"global_batch({p.global_batch}) % dp({dp}) != 0", "E111 global batch % "
                                     "(micro_batch x dp)", f"tp={tp} pp={pp} cp={cp} dp={dp}",
                                     len(ctx.recomputes(pp, vp)) * len(dos) * len(sp_domain))
                        continue
                    # With two DO values neither DO rule can fire (E129: where it refuses on, auto
                    # tries off only; E161 needs overlap_param_gather, which tries on only): one check
                    # serves both.
                    args = (tp, pp, vps[0], cp, ep, etp, dp, mbs[0], sp_domain[0], dos[0], rcs[0])
                    if tp_rules is None:
                        tp_rules = _GroupRules(ctx, args, _WITHIN_TP)
                    if expert_rules is None:
                        expert_rules = _GroupRules(ctx, args, _WITHIN_EXPERT, parent=tp_rules)
                    rules = _GroupRules(ctx, args, parent=expert_rules)
                    failed: set[bool] = set()  # DO values whose non-interleaved group has no member that fits
                    for vp in vps:
                        count = len(mbs) * len(ctx.recomputes(pp, vp)) * len(dos)  # candidates per SP value
                        sps = [sp for sp in sp_domain
                               if rules.hold(rec, (tp, pp, vp, cp, ep, etp, dp, mbs[0], sp, dos[0], rcs[0]), count)]
                        if not sps:
                            continue
                        if vp is None and len(vps) > 1:
                            if ctx.prune:
                                # Pruning (7): bound (2)'s check waits until a group of the family comes out
                                # of the heap (`_base_failed`); most never do (their step-time bound loses)
                                ctx.base_pending[(tp, pp, cp, ep, etp)] = (dp, dos, sps)
                            else:
                                # Bound (2), decided before any bound is computed: the non-interleaved group
                                # is checked first, and when none of it fits, its interleaved variants are
                                # rejected whole (interleaving only adds memory), the group too (its
                                # memory rejections are recorded by `_group_fits`).
                                failed = {do for do in dos
                                          if not _base_fits(ctx, rec, tp, pp, cp, ep, etp, dp, do, sps)}
                        same_split = vp is not None and ctx.same_split(pp, vp)
                        if failed and same_split:
                            rec.rule("interleaving only adds activation memory (and the failed rules do not depend "
                                     "on it)", "rejected: interleaved variant of a layout that fails memory or rules "
                                     "without interleaving", f"tp={tp} pp={pp} cp={cp} vp>1",
                                     len(mbs) * len(ctx.recomputes(pp, vp)) * len(sps) * len(failed))
                        # an interleaved split other than the non-interleaved one (uneven: fewer layers on the
                        # first stage, which holds the most micro-batches) can fit where that one does not
                        # (the non-interleaved group of a failed DO value is out too: `_base_fits` recorded it)
                        live = [do for do in dos if not (same_split or vp is None) or do not in failed]
                        if not live:
                            continue
                        # one bound serves every DO value (`_Context.group_bound`)
                        bound = ctx.group_bound((tp, pp, vp, cp, ep, etp, dp, True), sps) if bounds else None
                        for do in live:
                            out.append((bound, len(out), (tp, pp, vp, cp, ep, etp, dp, do), sps))
    return out


def _do_domain(p: Problem) -> list[bool]:
    """Distributed-optimizer values to try. Fixed: that one. Auto: off for SGD in a training stage,
    which Megatron's DistributedOptimizer refuses (E129; `Problem.auto_distributed_optimizer`); on
    alone when the parameter all-gather overlaps the forward (`overlap_param_gather`; dominance: the reduce-scatter + all-gather move what the all-reduce
    moves, as hidden, and the states shrink by dp x cp); otherwise both, on first: an all-gather
    after the optimizer step is exposed, so plain DDP's overlapped all-reduce can be faster."""
    if p.fixed.distributed_optimizer is not None:
        return [p.fixed.distributed_optimizer]
    if p.fixed.megatron_fsdp:  # Megatron-FSDP shards the optimizer state itself (E176)
        return [True]
    if not p.auto_distributed_optimizer:
        return [False]
    return [True] if p.fixed.overlap_param_gather else [True, False]


def _sp_domain(p: Problem, tp: int) -> list[bool]:
    """Sequence parallelism to try, preferred first: auto tries on (never slower: same TP traffic,
    1/tp of the elementwise and all-to-all work) and falls back to off where on does not fit."""
    return _bools(p.fixed.sequence_parallel, tp > 1)


_MB_RULES = (rule_global_batch, rule_interleave_microbatches, rule_fp8_tokens)
_GROUP_RULES = tuple(r for r in ERROR_RULES if r not in _MB_RULES)


class _GroupRules:
    """Every rule that does not depend on the micro batch (all but E108 / E111, checked per micro
    batch by `_Context.rules_mb`): together they are exactly `layout_violations`. `_groups` asks them for
    every VP and SP value of one (tp, pp, cp, ep, etp) layout (`args`: `_make_layout`'s sizes). Each
    rule is asked through its `_Decisions` (the search's memo of its results by the sizes it reads):
    one that reads no field of `stop` answers for every value of those fields at once, and only the
    others are asked per value, in the same order. `parent`: the same rules asked at an outer loop
    (one TP, every other size varying; then one (tp, pp, cp), the expert sizes varying: a MoE search
    asks each of those for up to 2 x 9 (EP, ETP) pairs): only the rules that varied there are asked again."""

    def __init__(self, ctx: _Context, args: tuple, stop: frozenset = frozenset({"vp", "sequence_parallel"}),
                 parent: "_GroupRules | None" = None):
        self.ctx = ctx
        sizes = ctx.sizes(*args)
        self.values = {name: getattr(sizes, name) for name in _SIZES_FIELDS}  # the sizes, by field
        # the first rule that fails for every value of the `stop` fields, and the rules before it that read one
        self.first: Violation | None = parent.first if parent is not None else None
        self.varying: list[_Decisions] = []
        for decisions in (parent.varying if parent is not None else ctx.rules):
            v = decisions.ask(ctx.env, self.values, stop)
            if v is _VARIES:
                self.varying.append(decisions)
            elif v is not None:
                self.first = v
                break

    def hold(self, rec: _Recorder, args: tuple, count: int) -> bool:
        """The rules hold for the candidate of `args`; otherwise the first broken one is recorded."""
        v = None
        if self.varying:
            values, env = self.values, self.ctx.env
            values["vp"], values["sequence_parallel"] = args[2], args[8]
            for decisions in self.varying:
                node = decisions.root  # `decisions.ask` inlined (the 405B search asks ~37k times)
                while node is not None and node[0] is not None:
                    node = node[1].get(values[node[0]])
                v = node[1] if node is not None else decisions.ask(env, values)
                if v is not None:
                    break
        v = v or self.first
        if v is None:
            return True
        rec.rule(v.short, f"{v.code} {v.message}", lambda: describe(self.ctx.layout(*args)), count, v.hint)
        return False


_SIZES_FIELDS = tuple(f.name for f in fields(Sizes))
# the sizes `_groups` varies inside one TP (the micro batch and global batch follow dp)
_WITHIN_TP = frozenset({"pp", "vp", "cp", "ep", "etp", "dp", "micro_batch", "global_batch", "sequence_parallel"})
# the sizes `_groups` varies inside one (tp, pp, cp) (and so dp)
_WITHIN_EXPERT = frozenset({"vp", "ep", "etp", "sequence_parallel"})
_VARIES = object()
_MISSING = object()


class _Decisions:
    """The results of one rule in one search, as the decision tree of the sizes it read: a rule is a
    pure function of the env (fixed for the search) and the sizes fields it reads, so two candidates
    that agree on every field it read, in the order it read them, get the same result. A node is
    [field, {value: node}] or, a leaf, [None, result]; `ask` walks it with the candidate's values and
    calls the rule (through `_Reads`) only where the walk leaves the tree."""

    __slots__ = ("rule", "root")

    def __init__(self, rule):
        self.rule = rule
        self.root: list | None = None

    def ask(self, env: Env, values: dict, stop: frozenset = frozenset()):
        """The rule's result for the sizes `values` (field -> value), or `_VARIES` when it reads a field of `stop`."""
        node = self.root
        while node is not None:
            name = node[0]
            if name is None:
                return node[1]
            if name in stop:
                return _VARIES
            node = node[1].get(values[name], _MISSING)
            if node is _MISSING:
                break
        reads = _Reads(values)
        result = self.rule(env, reads)
        self._grow(reads.trace, result)
        return _VARIES if any(name in stop for name, _ in reads.trace) else result

    def _grow(self, trace: list, result) -> None:
        node = [None, result]
        if self.root is None:
            for name, value in reversed(trace):
                node = [name, {value: node}]
            self.root = node
            return
        at = self.root
        for i, (name, value) in enumerate(trace):
            assert at[0] == name, "a rule read different sizes for the same values: it is not pure"
            child = at[1].get(value, _MISSING)
            if child is _MISSING:
                for later, later_value in reversed(trace[i + 1:]):
                    node = [later, {later_value: node}]
                at[1][value] = node
                return
            at = child
        raise AssertionError("a rule gave two results for the same sizes: it is not pure")


class _Reads:
    """Sizes (field -> value) read as attributes, recording each field at its first read, with its value."""

    __slots__ = ("_values", "_seen", "trace")

    def __init__(self, values: dict):
        self._values = values
        self._seen: set[str] = set()
        self.trace: list[tuple[str, object]] = []

    def __getattr__(self, name: str):
        try:
            value = self._values[name]
        except KeyError:
            raise AttributeError(f"'Sizes' object has no attribute {name!r}") from None
        if name not in self._seen:
            self._seen.add(name)
            self.trace.append((name, value))
        return value


def _search_group(ctx: _Context, rec: _Recorder, best: _Top, tp, pp, vp, cp, ep, etp, dp, do, sps) -> bool:
    """Search one (tp, pp, vp, cp, ep, etp, do) group whose rules hold for the sequence-parallel
    values `sps`; False when its memory bound rules out every member."""
    mbs, rcs = ctx.micro_batches(dp), ctx.recomputes(pp, vp)
    passed, sps = ctx.base_fits.get((tp, pp, cp, ep, etp, do), ([], sps)) if vp is None else ([], sps)
    sps = passed + [
        sp for sp in sps
        if _group_fits(ctx, rec, ctx.layout(tp, pp, vp, cp, ep, etp, dp, mbs[0], sp, do, rcs[0]), len(mbs) * len(rcs))]
    if not sps:  # every sequence-parallel value failed memory, recorded by _group_fits for the whole group
        return False
    weakest = {sp: len(rcs) - 1 for sp in sps}  # per SP: the weakest recompute that can still fit
    for i, mb in enumerate(mbs):
        if i and _micro_batch_loses(ctx, rec, best, (tp, pp, vp, cp, ep, etp, dp, mb, sps[0], do), len(rcs) * len(sps)):
            continue  # a larger micro batch may be faster per row: the loop goes on
        any_fit = False
        for sp in sps:
            layout = ctx.layout(tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rcs[0])
            v = ctx.rules_mb(layout)
            if v is not None:
                rec.rule(v.short, f"{v.code} {v.message}", layout, len(rcs), v.hint)
                any_fit = True  # a rule, not memory, stopped this micro batch: larger ones may pass
                continue  # the fp8 token rule (E138) depends on sequence parallelism: try the other value
            k = _search_recompute(ctx, rec, best, tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rcs, weakest[sp])
            fitted = k >= 0
            if fitted:
                weakest[sp] = k
            any_fit = any_fit or fitted
            if fitted and ctx.p.fixed.sequence_parallel is None and sp and len(sps) > 1:
                rec.rule("sequence_parallel = on fits and is never slower", "dominated: sequence_parallel = off "
                         "(on fits and is never slower)", lambda: describe(replace(layout, sequence_parallel=False)), len(rcs))
                break
        if not any_fit:
            rest = len(mbs) - i - 1
            if rest:
                rec.rule("larger micro batches need more memory", "out of memory (a larger micro batch than "
                         "one that already overflows)", f"tp={tp} pp={pp} cp={cp} dp={dp} mb>{mb}",
                         rest * len(rcs) * len(sps))
            break
    return bool(sps)


def _base_fits(ctx: _Context, rec: _Recorder, tp, pp, cp, ep, etp, dp, do, sps) -> bool:
    """Bound (1) for the non-interleaved group (vp = None), ahead of the search (`_groups`): whether
    some SP value of `sps` passes it. The SP values are checked in order until one passes; the values
    checked so far that pass, and those not checked yet, are kept for `_search_group`."""
    mbs, rcs = ctx.micro_batches(dp), ctx.recomputes(pp, None)
    for i, sp in enumerate(sps):
        if _group_fits(ctx, rec, ctx.layout(tp, pp, None, cp, ep, etp, dp, mbs[0], sp, do, rcs[0]), len(mbs) * len(rcs)):
            ctx.base_fits[(tp, pp, cp, ep, etp, do)] = ([sp], sps[i + 1:])
            return True
    return False


def _group_fits(ctx: _Context, rec: _Recorder, bound: Layout, count: int) -> bool:
    """Bound (1): its smallest micro batch with its strongest recompute fits (otherwise no member
    fits: memory is monotone in both); the group's rules were checked by `_groups`."""
    if ctx.rules_mb(bound) is not None:
        return True  # the smallest micro batch breaks a micro-batch rule: the bound says nothing
    key = (bound.tp, bound.pp, bound.vp, bound.cp, bound.ep, bound.etp, bound.sequence_parallel)
    if not bound.distributed_optimizer and key in ctx.dopt_overflows:
        # Dominance (4): the distributed optimizer never needs more memory, and with it this group
        # already overflowed (both DO values share a bound, so `search` takes the on group first)
        rec.rule("distributed_optimizer = on needs no more memory and already overflows", "out of memory (the "
                 "distributed optimizer, never larger, already overflows)", bound, count)
        return False
    if ctx.prune and _states_overflow(ctx, rec, bound, count):
        if bound.distributed_optimizer and ctx.p.fixed.distributed_optimizer is None:
            ctx.dopt_overflows.add(key)
        return False
    rec.evaluated += 1
    mem = ctx.memory(bound)
    if mem.total > ctx.budget:
        rec.memory(bound, mem, count)
        if bound.distributed_optimizer and ctx.p.fixed.distributed_optimizer is None:
            ctx.dopt_overflows.add(key)
        return False
    return True


def _states_overflow(ctx: _Context, rec: _Recorder, bound: Layout, count: int) -> bool:
    """Pruning (6): the group of `bound` (its `count` candidates) is rejected without the exact estimate
    when its model states alone (`memory.states_lower_bound`: never above the exact total of any micro
    batch, recompute or SP value) overflow, and by more than the closest overflow seen so far: the exact
    estimate overflows by at least as much, so it could not have become `SearchResult.closest` (the
    "nothing fits" diagnostic's layout), which stays the unpruned search's."""
    states = ctx.states_bound(bound)
    over = states[0] - ctx.budget
    if over <= 0 or rec.closest is None or over <= rec.closest.over_bytes:
        return False
    rec.states(bound, states, count)
    return True


def _search_recompute(ctx: _Context, rec: _Recorder, best: _Top, tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rcs,
                      weakest: int) -> int:
    """Recompute levels of one (group, micro batch), weakest first, starting at index `weakest`
    (levels weaker than the weakest that fitted a smaller micro batch cannot fit: memory is
    monotone in the micro batch). The first that fits is the fastest (time is monotone in
    recompute) and every stronger one fits too; a stronger one is costed only while it could still
    enter the top list. Returns the index of the weakest level that fits, or -1."""
    for k in range(weakest, -1, -1):
        layout = ctx.layout(tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rcs[k])
        rec.evaluated += 1
        mem = ctx.memory(layout)
        if mem.total > ctx.budget:
            rec.memory(layout, mem)
            continue
        split = _split(ctx.p, pp, vp)
        first = Candidate(layout, split, mem, ctx.time(layout))
        best.push(first)
        for j in range(k - 1, -1, -1):
            threshold = best.threshold()
            if threshold is not None and first.estimate.step_time_s > threshold[0] * (1 + REL_TOL):
                rec.rule(lambda: f"{first.estimate.step_time_s:.3g} s with recompute = {recompute_text(*rcs[k])} is "
                         f"already slower than the top {best.n}", "slower: more recompute of a layout already outside "
                         "the top list", lambda: describe(_with_recompute(layout, rcs[j])), j + 1)
                break
            stronger = ctx.layout(tp, pp, vp, cp, ep, etp, dp, mb, sp, do, rcs[j])
            rec.evaluated += 1
            best.push(Candidate(stronger, split, ctx.memory(stronger), ctx.time(stronger)))
        _record_weaker(rec, layout, rcs, weakest)
        return k
    _record_weaker(rec, layout, rcs, weakest)
    return -1


def _micro_batch_loses(ctx: _Context, rec: _Recorder, best: _Top, sizes: tuple, count: int) -> bool:
    """Pruning (9): the `count` candidates of one group and micro batch (every recompute level and SP value)
    are out, unsized, when `cost.step_time_lower_bound` of that micro batch alone (at the preferred SP value,
    never slower) is above the top list's last entry: none could enter the list. Off without `ctx.prune`."""
    threshold = best.threshold() if ctx.prune else None
    if threshold is None:
        return False
    tp, pp, vp, cp, ep, etp, dp, mb, sp, do = sizes
    layout = ctx.layout(tp, pp, vp, cp, ep, etp, dp, mb, sp, do, ("none", None))
    bound = ctx.bound(layout, (mb, mb))
    if bound <= threshold[0] * (1 + REL_TOL):
        return False
    rec.rule(lambda: f"its step time is at least {bound:.3g} s, slower than the top {best.n} ({threshold[0]:.3g} s "
             "and faster)", MB_SLOWER_REASON,
             lambda: describe(layout).rsplit(" recompute=", 1)[0] + " (every recompute level)", count)
    return True


def _record_weaker(rec: _Recorder, layout: Layout, rcs: list, weakest: int) -> None:
    """The recompute levels weaker than `weakest`, which a smaller micro batch already overflowed with."""
    if weakest < len(rcs) - 1:
        rec.rule("a smaller micro batch already needed this much recompute", "out of memory (less recompute "
                 "than a smaller micro batch needed)", lambda: describe(_with_recompute(layout, rcs[-1])),
                 len(rcs) - 1 - weakest)


def _split(p: Problem, pp: int, vp: int | None) -> PipelineSplit:
    split = model_split(p.model, pp, vp)
    assert split is not None  # the rules guarantee it
    return split


# --------------------------------------------------------------------------------- brute force


def enumerate_all(p: Problem, *, top: int = 10**9, max_vp: int | None = None,
                  max_micro_batch: int | None = None) -> SearchResult:
    """The oracle: every size from 1 to its bound (no divisor generation, no pruning), each
    candidate checked by every rule and the memory model; same result type as `search`.

    Only three policies of the search's domains are shared (they are choices, not pruning): auto
    sequence parallelism is tried only with tp > 1, auto expert-TP only takes 1 or tp, and auto
    PP / VP stay 1 / none for stage kinds the target does not pipeline (`Target.caps`).
    """
    env = p.env
    rec = _Recorder(p.budget)
    fits = _Top(top)
    world = p.cluster.world_size
    f = p.fixed
    rng = lambda fixed, hi: [fixed] if fixed is not None else list(range(1, hi + 1))  # noqa: E731
    piped = p.target.caps(p.stage_kind).pipeline  # policy: auto PP / VP only where the target pipelines
    interleaves = piped and p.target.caps(p.stage_kind).virtual_pipeline
    vps = ([f.virtual_pipeline if f.virtual_pipeline > 1 else None] if f.virtual_pipeline is not None
           else [None] + list(range(2, (max_vp or p.model.layers) + 1)) if interleaves else [None])
    mb_hi = max_micro_batch or p.global_batch or 1
    experts = p.model.experts if p.model.is_moe else 1
    for tp, pp, cp, vp, ep, mb in itertools.product(
            rng(f.tensor, world), rng(f.pipeline, world if piped else 1),
            rng(f.context, world if p.splits_sequences else 1), vps,
            rng(f.expert, max(experts, 1)), rng(f.micro_batch, mb_hi)):
        dp = f.data if f.data is not None else (world // (tp * pp * cp) if world % (tp * pp * cp) == 0 else None)
        etps = rng(f.expert_tensor, world) if p.model.is_moe else [f.expert_tensor or tp]
        for etp, sp, do, rc in itertools.product(etps, _bools(f.sequence_parallel), _bools(f.distributed_optimizer),
                                                 _recomputes(p, pp, vp)):
            if p.model.is_moe and f.expert_tensor is None and etp not in (1, tp):
                continue  # policy: auto expert-TP is 1 or tp
            if f.sequence_parallel is None and tp == 1 and sp:
                continue  # policy: auto sequence parallelism only with tp > 1
            gb = p.global_batch if p.global_batch is not None else mb * (dp or 1)
            sizes = Sizes(tp=tp, pp=pp, vp=vp, cp=cp, ep=ep, etp=etp, dp=dp, micro_batch=mb, global_batch=gb,
                          sequence_parallel=sp, distributed_optimizer=do, recompute=rc[0], recompute_layers=rc[1],
                          recompute_modules=f.recompute_modules, seq_length=p.seq_length,
                          tp_comm_overlap=f.tp_comm_overlap, overlap_param_gather=f.overlap_param_gather,
                          defer_embedding_wgrad_compute=f.defer_embedding_wgrad_compute,
                          fp8_param_gather=f.fp8_param_gather, megatron_fsdp=f.megatron_fsdp,
                          optimizer_state_dtype=f.optimizer_state_dtype,
                          precision_aware_optimizer=f.precision_aware)
            v = layout_violations(env, sizes)
            layout = _make_layout(p, tp, pp, vp, cp, ep, etp, dp or 1, mb, sp, do, rc)
            if v is not None:
                rec.rule(v.short, f"{v.code} {v.message}", layout, 1, v.hint)
                continue
            rec.evaluated += 1
            mem = evaluate_memory(p, layout)
            if mem.total > p.budget:
                rec.memory(layout, mem)
                continue
            fits.push(Candidate(layout, _split(p, pp, vp), mem, evaluate_time(p, layout)))
    return rec.result(fits)
