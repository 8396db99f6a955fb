"""The one adapter from the compiled plan to Megatron-Core arguments.

Input:  slices of a `nemoc.compiler.plan.Plan` (ModelSpec, a StagePlan's Layout / OptimizerSpec /
ScheduleSpec and its `Execution`: precision recipe, attention core, pipeline split, vocabulary
padding, overlaps and fusions, all decided by the planner) plus two facts about the machine
(`cpu`: the gloo/CPU adaptation is active; `have_te`: build with Transformer Engine, which
`choose_kernels` decides from the plan's `kernels` and whether TE imports).
Output: plain Megatron-Core objects and keyword dicts: `initialize_model_parallel` kwargs,
`TransformerConfig`, `DistributedDataParallelConfig`, `OptimizerConfig`, `OptimizerParamScheduler`
kwargs, the padded vocabulary size; and the same settings as a Megatron-LM `pretrain_gpt.py` command
line (`megatron_lm_arguments`, `megatron_lm_command`: `nemoc export --megatron-args`). Nothing else in
the runtime turns plan fields into Megatron arguments.
Invariants: pure functions (no process groups touched); the plan's decisions are translated, never
re-derived (no compiler rule, cost or catalog call); a plan this machine cannot run (fp8 without
TE, context parallelism with the local attention, an unknown activation) raises `UnsupportedPlan`
with the reason, never a Megatron assertion later.
"""

from __future__ import annotations

from collections.abc import Mapping

import math
from dataclasses import dataclass

from nemoc.compiler.plan import Execution, Fusions, HostExecution, Layout, MoeExecution, Overlaps, PipelineSplit
from nemoc.compiler.spec import ModelSpec, OptimizerSpec, ScheduleSpec

# Megatron-LM's --make-vocab-size-divisible-by default: the embedding is padded to a multiple of
# 128 * tp so that every TP shard of the vocabulary is the same size and GEMM-friendly.
VOCAB_DIVISIBLE_BY = 128

# torch is imported inside the functions that build Megatron-Core objects: the Megatron-LM command line
# (`megatron_lm_arguments`, `nemoc export --megatron-args`) is built from the same keyword sets without
# torch, so it works where only `pip install nemoc` is (tests/test_install_extras.py).
_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # torch dtype names


class UnsupportedPlan(ValueError):
    """The plan asks for something this runtime/machine cannot execute; the message says why."""


@dataclass(frozen=True)
class MachineFacts:
    cpu: bool  # gloo on CPU (runtime.mcore_cpu applied)
    have_te: bool  # build with Transformer Engine: it imports and the plan asks for it (`choose_kernels`)


@dataclass(frozen=True)
class KernelChoice:
    """What the runtime builds for a stage: `use_te` (Transformer Engine's layer spec) or Megatron-Core's
    local spec, and a warning to print once at task start when that is not what the plan assumed."""

    use_te: bool
    warning: str | None = None

    @property
    def kernels(self) -> str:
        return "te" if self.use_te else "local"


def choose_kernels(*, planned: str, te_importable: bool, cpu: bool) -> KernelChoice:
    """The plan's kernels (StagePlan.kernels: te | local) x whether transformer_engine imports x the
    CPU adaptation -> what to build. `local` is always honoured (a valid choice even where TE is
    installed). `te` without TE, or on the CPU, falls back to the local spec with a warning: the plan's
    step time and activation memory assumed TE's fused kernels."""
    if planned == "local":
        return KernelChoice(use_te=False)
    if planned != "te":
        raise UnsupportedPlan(f"unknown kernels {planned!r} in the plan (te | local)")
    if te_importable and not cpu:
        return KernelChoice(use_te=True)
    why = "this run is on the CPU (gloo)" if cpu else "transformer_engine does not import here"
    return KernelChoice(use_te=False, warning=(
        f"warning: the plan assumed Transformer Engine kernels (kernels = te) but {why}: building "
        "Megatron-Core's local spec instead; expect a slower step and more activation memory than "
        "`nemoc plan` predicted (up to 2-3x). Re-plan with `--set kernels=local` (or write "
        "`kernels = local` in the experiment) for estimates that match this machine, or install "
        "Transformer Engine."))


def padded_vocab_size(vocab: int, tp: int = 1, *, multiple: int | None = None) -> int:
    """Megatron-LM `_vocab_size_with_padding`: round the tokenizer's vocabulary up to the plan's
    `Execution.vocab_multiple` (`multiple`), or to 128 x tp for a model built outside a stage plan."""
    multiple = multiple or VOCAB_DIVISIBLE_BY * tp
    return int(math.ceil(vocab / multiple) * multiple)


def params_dtype(precision: str) -> torch.dtype:
    import torch

    if precision in ("fp8", "mxfp8", "nvfp4"):
        return torch.bfloat16  # fp8 / nvfp4 training keeps bf16 master weights; TE casts inside the GEMMs
    try:
        return getattr(torch, _PRECISION_DTYPES[precision])
    except KeyError:
        raise UnsupportedPlan(f"unknown precision {precision!r} (bf16 | fp16 | fp32 | fp8 | mxfp8 | nvfp4)") from None


def parallel_kwargs(*, layout: Layout, timeout_minutes: int = 5) -> dict:
    """Keyword arguments for `parallel_state.initialize_model_parallel`."""
    return dict(_parallel_sizes(layout), distributed_timeout_minutes=max(1, int(timeout_minutes)))


def _parallel_sizes(layout: Layout) -> dict:
    """The six parallel sizes, named as initialize_model_parallel and TransformerConfig both name them."""
    return dict(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def _te_fusions(fusions: Fusions | None, facts: MachineFacts) -> dict:
    """The plan's fused kernels (`Execution.fusions`, which the `te` cost and memory models price) as
    TransformerConfig flags, when this machine builds Transformer Engine's layers. The weight-gradient
    accumulation into main_grad is a single Megatron flag for TE's layers (TE's own
    `fuse_wgrad_accumulation`) and for the output layer (apex's fused_weight_gradient_mlp_cuda, which
    raises without apex), so without apex it is off for every layer (docs/runtime.md: ~10 B per
    parameter and micro batch the `te` cost model does not charge). Megatron-Core leaves all of them off
    by default; nothing on the local spec. The loss is `_cross_entropy_kwargs`'s (on either spec)."""
    if fusions is None or not facts.have_te or facts.cpu:
        return {}
    from megatron.core.tensor_parallel import layers

    out = dict(apply_rope_fusion=fusions.rope, bias_dropout_fusion=fusions.bias_dropout_add,
               gradient_accumulation_fusion=fusions.grad_accumulation and bool(layers._grad_accum_fusion_available))
    if fusions.bias_activation:
        out["bias_activation_fusion"] = True
    return out


def _cross_entropy_kwargs(fusions: Fusions | None, facts: MachineFacts | None = None) -> dict:
    """The plan's loss (`Execution.fusions.cross_entropy`, the experiment's `cross_entropy_fusion`) as
    Megatron-Core fields (model_parallel_config.py `cross_entropy_loss_fusion`, `cross_entropy_fusion_impl`;
    language_module.py `compute_language_model_loss` then calls `te_parallel_cross_entropy` for "te",
    fusions/fused_cross_entropy.py `fused_vocab_parallel_cross_entropy` for "native", and the unfused
    `tensor_parallel.vocab_parallel_cross_entropy` with the fusion off: "none", Megatron-Core's default).
    The native loss is plain PyTorch (torch.compile) and runs on either spec, the CPU included; "te" only
    where this machine builds Transformer Engine's layers (`facts`; None: Megatron-LM's command line, which
    states the plan)."""
    impl = fusions.cross_entropy if fusions is not None else "none"
    if impl == "te" and facts is not None and (not facts.have_te or facts.cpu):
        return {}
    if impl in ("te", "native"):
        return dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl=impl)
    return {}


def have_te_cross_entropy() -> bool:
    """Whether Megatron-Core found Transformer Engine's parallel_cross_entropy (extensions/transformer_engine.py
    `te_parallel_cross_entropy`; None where TE or its Triton kernels do not import)."""
    from megatron.core.models.common.language_module import language_module

    return getattr(language_module, "te_parallel_cross_entropy", None) is not None


# TE's loss in the form Megatron-Core calls under a whole-iteration CUDA graph (`is_cg_capturable`, no
# torch.equal host check): language_module.py `compute_language_model_loss` asserts TE >= 2.7.0 there
TE_CAPTURABLE_CROSS_ENTROPY = "2.7.0"


def _check_cross_entropy(fusions: Fusions | None, facts: MachineFacts, host: HostExecution | None = None) -> None:
    """Refuse, before the first step, a plan priced with TE's fused cross entropy on a TE that lacks it:
    Megatron-Core would raise "Trying to use a TE block when it's not present." inside the loss; or, under a
    whole-iteration CUDA graph (cuda_graph_impl = local, cuda_graph_scope = [full_iteration]), on a TE older
    than 2.7, where Megatron-Core asserts at the first step ("CUDA graph compatible cross entropy requires
    TransformerEngine >= 2.7.0"). The planner's auto never picks te there (compiler/execution.py
    `cross_entropy_of`); a written `cross_entropy_fusion = te` reaches this check."""
    if fusions is None or fusions.cross_entropy != "te" or not facts.have_te or facts.cpu:
        return
    if not have_te_cross_entropy():
        raise UnsupportedPlan("the plan prices Transformer Engine's fused cross entropy (cross_entropy_fusion_impl = "
                              "te, Megatron-Bridge's performance recipes), but this Transformer Engine has no "
                              "transformer_engine.pytorch.cross_entropy.parallel_cross_entropy (TE >= 2.1 with "
                              "Triton); upgrade Transformer Engine, or plan with cross_entropy_fusion = native (Megatron-Core's "
                              "own fused loss) or none")
    if host is None or host.cuda_graph_impl != "local" or "full_iteration" not in host.cuda_graph_scope:
        return
    from megatron.core.utils import get_te_version, is_te_min_version

    try:
        new_enough, found = is_te_min_version(TE_CAPTURABLE_CROSS_ENTROPY), get_te_version()
    except (TypeError, ImportError):  # TE's version unreadable here: Megatron-Core checks it again at the step
        return
    if not new_enough:
        raise UnsupportedPlan(f"cross_entropy_fusion = te under cuda_graph_scope = [full_iteration] needs Transformer "
                              f"Engine >= 2.7 (Megatron-Core calls its CUDA-graph-capturable loss there: "
                              f"language_module.py compute_language_model_loss), but this one is {found}; set "
                              "cross_entropy_fusion = native (Megatron-Core's own fused loss, capturable on any TE) "
                              "or none, or upgrade Transformer Engine")


def _activation(model: ModelSpec) -> tuple[object, bool]:
    """(activation_func, gated_linear_unit). SwiGLU = SiLU-gated GLU (Shazeer 2020)."""
    import torch.nn.functional as F

    if model.activation == "swiglu":
        return F.silu, True
    if model.activation == "gelu":
        return F.gelu, False
    if model.activation == "gelu_tanh":
        return gelu_tanh, False
    if model.activation == "geglu_tanh":  # Gemma: gelu_pytorch_tanh(gate) * up
        return gelu_tanh, True
    if model.activation == "relu":
        return F.relu, False
    if model.activation == "squared_relu":
        from megatron.core.activations import squared_relu

        return squared_relu, False
    raise UnsupportedPlan(f"activation {model.activation!r} is not supported (swiglu | geglu_tanh | gelu | gelu_tanh | "
                          "relu | squared_relu)")


def gelu_tanh(x):
    """GELU's tanh approximation (Hendrycks & Gimpel 2016, eq. 2; GPT-2's `gelu_new`). Megatron-Core's own
    (transformer/utils.py openai_gelu, Megatron-LM's --openai-gelu) is the same function, but it is
    compiled by jit_fuser (torch.compile in 0.16.1) at call time, which the CPU runtime avoids."""
    import torch.nn.functional as F

    return F.gelu(x, approximate="tanh")


def _window_kwargs(model: ModelSpec) -> dict:
    """Sliding-window attention (Gemma 3): a query attends to itself and the window - 1 keys before it, in every
    layer but each full_attention_every-th (Megatron's window_size = (before, after) and window_attn_skip_freq,
    read per layer by transformer/utils.py is_layer_window_attention)."""
    if not model.sliding_window:
        return {}
    return dict(window_size=(model.sliding_window - 1, 0), window_attn_skip_freq=model.full_attention_every or None)


def _recompute_kwargs(recompute: str, layers: int | None = None, modules: tuple[str, ...] | None = None) -> dict:
    """The plan's `recompute`, `recompute_layers` and `recompute_modules` as TransformerConfig fields."""
    if recompute in ("none", "", None):
        return {}
    if recompute == "selective":
        # the modules the plan names (Megatron's default, the attention core alone, when it names none:
        # Korthikanti et al. 2022, sec. 5)
        if modules is None:
            return dict(recompute_granularity="selective")
        return dict(recompute_granularity="selective", recompute_modules=list(modules))
    if recompute == "full" and layers is not None:
        # block: the first `layers` layers of every model chunk checkpoint their input and replay in
        # backward, the chunk's other layers keep their activations (transformer_block.py
        # _checkpointed_forward, recompute_method == "block")
        return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=layers)
    if recompute == "full":  # checkpoint every layer's input, replay the layer in backward
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    raise UnsupportedPlan(f"recompute {recompute!r} is not supported (none | selective | full)")


def check_trainable(*, moe: bool, layout: Layout) -> None:
    """What Megatron-Core runs forward-only (eval) but refuses to train: MoELayer.forward raises in training
    mode for an MoE model at tp > 1 without sequence parallelism (megatron/core/transformer/moe/moe_layer.py,
    "During training, performance may degrade ..."); `nemoc check` says so first (E123). Called where an
    optimizer is built (core/build.py `optimizer_for`), so the error comes before the first step."""
    if moe and layout.tp > 1 and not layout.sequence_parallel:
        raise UnsupportedPlan(f"training an MoE model with tp={layout.tp} needs sequence_parallel (Megatron-Core's "
                              "MoELayer rejects it otherwise)")


def _check_supported(*, model: ModelSpec, layout: Layout, precision: str, facts: MachineFacts,
                     attention: str | None = None) -> None:
    if precision in ("fp8", "mxfp8", "nvfp4") and not facts.have_te:
        raise UnsupportedPlan(f"precision {precision} needs Transformer Engine, which is not installed here")
    if layout.cp > 1 and not facts.have_te and attention in ("unfused", None):
        raise UnsupportedPlan(
            f"context parallelism (cp={layout.cp}) needs Transformer Engine's attention (TEDotProductAttention) "
            "or the local spec's flash (SDPA) core; Megatron-Core's unfused DotProductAttention supports cp=1 only"
        )
    if layout.precision_aware_optimizer and not facts.have_te:
        # `nemoc check` refuses it on the local spec (E191); Megatron-Core's OptimizerConfig raises without TE
        what = (f"optimizer_state_dtype = {layout.optimizer_state_dtype}" if layout.optimizer_state_dtype != "fp32"
                else "precision_aware_optimizer = true (fp32 moments)")
        raise UnsupportedPlan(f"{what} needs Transformer Engine's FusedAdam (Megatron-Core's precision-aware "
                              "optimizer), which is not installed here; plan precision_aware_optimizer = false for "
                              "Megatron-Core's own Adam (the same update with fp32 moments)")
    if layout.sequence_parallel and layout.tp == 1:
        raise UnsupportedPlan("sequence_parallel needs tp > 1")
    if layout.tp_comm_overlap:
        # `nemoc check` refuses it without TE, TP or SP (E160); runtime/userbuffers.py initialises TE's
        # userbuffers from the plan (`Execution.userbuffers`) before the model is built
        check_tp_comm_overlap(facts)
    _check_param_gather(layout)
    _check_fsdp(layout)
    if model.is_moe and model.add_bias_linear:
        # `nemoc check` refuses this spec (E140): the MoE build below has no linear biases.
        raise UnsupportedPlan("MoE models are built without linear biases (add_bias_linear = false); "
                              "expert MLPs with a bias fail in Megatron-Core 0.16.1 (mlp.py)")


# TE `initialize_ub`'s `bootstrap_backend` (TE 1.9): before it TE bootstrapped its userbuffers over MPI only,
# for which Megatron-LM creates an MPI process group that this runtime does not
TE_UB_BOOTSTRAP = "1.9.0"


def check_tp_comm_overlap(facts: MachineFacts) -> None:
    """Refuse, with the reason, `tp_comm_overlap` where it cannot run: Transformer Engine's userbuffers need
    CUDA GPUs (CUDA IPC / multicast buffers) and TE's layers, and a TE whose `initialize_ub` takes a bootstrap
    backend. Megatron-Bridge instead turns the overlap off with a warning (comm_overlap.py
    `_get_model_comm_overlap_cfgs`); the plan was costed with it, so nemoc refuses rather than run slower."""
    if facts.cpu:
        raise UnsupportedPlan("tp_comm_overlap = true needs CUDA GPUs and Transformer Engine's userbuffers (TE "
                              "initialize_ub); this run is on the CPU (gloo), which has neither: set "
                              "tp_comm_overlap = false (and re-plan: the step time assumed the overlap)")
    if not facts.have_te:
        raise UnsupportedPlan("tp_comm_overlap = true needs Transformer Engine's userbuffers (TE initialize_ub) and "
                              "layers, and transformer_engine does not import here: install Transformer Engine, or "
                              "set tp_comm_overlap = false")
    from megatron.core.utils import get_te_version, is_te_min_version

    try:
        new_enough, found = is_te_min_version(TE_UB_BOOTSTRAP), get_te_version()
    except (TypeError, ImportError):  # TE's version unreadable here: runtime/userbuffers.py imports TE itself
        return
    if not new_enough:
        raise UnsupportedPlan(f"tp_comm_overlap = true needs Transformer Engine >= {TE_UB_BOOTSTRAP} (initialize_ub's "
                              f"bootstrap_backend; older TEs bootstrap over MPI only), but this one is {found}: "
                              "upgrade Transformer Engine, or set tp_comm_overlap = false")


def _tp_comm_kwargs(layout: Layout, execution: Execution | None) -> dict:
    """The plan's userbuffer overlap (`Execution.userbuffers`) as ModelParallelConfig fields: `tp_comm_overlap`,
    the bootstrap backend TE builds its group with, and the tp_comm_* switches Megatron-Core 0.16.1's TE layers
    read (extensions/transformer_engine.py: ub_overlap_ag / ub_overlap_rs / ub_overlap_rs_dgrad / ub_bulk_dgrad
    / ub_bulk_wgrad), set to match the per-GEMM configs the buffers were initialised with."""
    if not layout.tp_comm_overlap:
        return {}
    ub = execution.userbuffers if execution is not None else None
    if ub is None:
        raise UnsupportedPlan("tp_comm_overlap = true but the stage's plan has no userbuffers (Execution.userbuffers): "
                              "re-plan the experiment with this nemoc")
    return dict(tp_comm_overlap=True, tp_comm_bootstrap_backend=ub.bootstrap_backend,
                tp_comm_bulk_wgrad=ub.bulk_wgrad, tp_comm_bulk_dgrad=ub.bulk_dgrad, tp_comm_overlap_ag=ub.overlap_ag,
                tp_comm_overlap_rs=ub.overlap_rs, tp_comm_overlap_rs_dgrad=ub.overlap_rs_dgrad)


def _defer_wgrad_kwargs(layout: Layout, *, fused_wgrad: bool) -> dict:
    """The plan's `defer_embedding_wgrad_compute` / `wgrad_deferral_limit` as ModelParallelConfig fields. Megatron-Core
    0.16.1 refuses them without gradient_accumulation_fusion (model_parallel_config.py __post_init__; `nemoc check`
    E197 on the local spec): with TE's kernels that fusion is apex's fused_weight_gradient_mlp_cuda here
    (`_te_fusions`), so a machine without it is refused with the reason before the model is built."""
    if not layout.defer_embedding_wgrad_compute:
        return {}
    if not fused_wgrad:
        raise UnsupportedPlan("defer_embedding_wgrad_compute = true needs Megatron-Core's gradient_accumulation_fusion "
                              "(the deferred output-layer weight gradients are accumulated by apex's "
                              "fused_weight_gradient_mlp_cuda), which this machine does not have (the CPU, the local "
                              "spec, or no apex): set defer_embedding_wgrad_compute = false")
    return dict(defer_embedding_wgrad_compute=True, wgrad_deferral_limit=layout.wgrad_deferral_limit)


def _check_param_gather(layout: Layout) -> None:
    """`overlap_param_gather = true` runs where Megatron-LM runs it (arguments.py: the distributed optimizer,
    with `overlap_grad_reduce`; `nemoc check` E161 refuses it without the distributed optimizer). Under
    Megatron-FSDP it is what FSDP does anyway: with `optim_grads_params` Megatron-FSDP sets its config's
    `overlap_param_gather = True` itself (megatron_fsdp.py `MegatronFSDP.__init__`) and prefetches the next
    layer's all-gather from its forward pre-hooks; the DDP forward pre-hooks this runtime switches
    (runtime/core/param_gather.py) do not exist on the FSDP wrapper, so nothing else changes."""
    if not layout.overlap_param_gather or layout.megatron_fsdp:
        return
    if not layout.distributed_optimizer:
        raise UnsupportedPlan("overlap_param_gather = true needs distributed_optimizer = true (Megatron-Core's DDP "
                              "overlaps that optimizer's parameter all-gather; E161)")


def have_einops() -> bool:
    """Whether einops imports (Megatron-Core's FSDP adapter builds its device mesh with it)."""
    import importlib.util

    return importlib.util.find_spec("einops") is not None


def _check_fsdp(layout: Layout) -> None:
    """Megatron-FSDP (runtime/model.py `wrap_fsdp`, runtime/fsdp_checkpoint.py) on what this machine has:
    Megatron-Core 0.16.1's adapter (distributed/fsdp/mcore_fsdp_adapter.py `_get_dp_tp_mesh`) asserts
    einops, an optional dependency of megatron-core; one model chunk (no pipeline: `nemoc check` E177); more
    than one rank in each shard group (E181); tensor parallelism only where TELinear is a class (E182)."""
    if not layout.megatron_fsdp:
        return
    if not have_einops():
        raise UnsupportedPlan("megatron_fsdp = true needs the einops package (Megatron-Core's mcore_fsdp_adapter.py "
                              "builds the FSDP device mesh with einops.rearrange), which is not installed here: "
                              "pip install einops, or run with megatron_fsdp = false (distributed_optimizer shards "
                              "the optimizer state)")
    if layout.pp > 1 or (layout.vp or 1) > 1:
        raise UnsupportedPlan(f"megatron_fsdp = true with pipeline({layout.pp}): nemoc runs Megatron-FSDP on one "
                              "model chunk per rank (pipeline = 1), as Megatron-Bridge's FSDP recipes do")
    dense, expert = layout.dp * layout.cp, layout.tp * layout.cp * layout.dp // (layout.ep * layout.etp)
    if min(dense, expert) == 1:
        # compiler/rules/host.py rule_fsdp_shard_group (E181): at a shard group of one rank Megatron-Core
        # 0.16.1's FSDP adds each reduced gradient back into the buffer it reduced (param_and_grad_buffer.py
        # `_bucket_group_gradient_reduce`), doubling the accumulated gradient at every micro batch.
        group = (f"data({layout.dp}) x context({layout.cp})" if dense == 1 else
                 f"the experts' data-parallel group tensor({layout.tp}) x context({layout.cp}) x data({layout.dp}) / "
                 f"(expert({layout.ep}) x expert_tensor({layout.etp}))")
        raise UnsupportedPlan(f"megatron_fsdp = true with {group} = 1 rank to shard over: Megatron-Core 0.16.1's "
                              "FSDP doubles the gradients at a shard group of one rank (param_and_grad_buffer.py "
                              "`_bucket_group_gradient_reduce`), and FSDP saves no memory there; use the distributed "
                              "optimizer (megatron_fsdp = false), or give data parallelism more ranks")
    if max(layout.tp, layout.etp) > 1 and not fsdp_tensor_parallel_builds():
        raise UnsupportedPlan(f"megatron_fsdp = true with tensor({layout.tp}): Megatron-Core 0.16.1's FSDP adapter "
                              "tags tensor-parallel weights by testing for Transformer Engine's TELinear "
                              "(mcore_fsdp_adapter.py `_fix_tensor_parallel_attributes`), which does not import "
                              "here; run it with tensor = 1 (FSDP shards over data parallelism alone), or with "
                              "megatron_fsdp = false, or where Transformer Engine is installed")


def fsdp_tensor_parallel_builds() -> bool:
    """Whether Megatron-Core's FSDP adapter can wrap a tensor-parallel model here: its
    `_fix_tensor_parallel_attributes` runs `isinstance(module, (TELinear,))`, and without Transformer Engine
    `TELinear` is a placeholder, not a class (TypeError at build time)."""
    try:
        from megatron.core.extensions.transformer_engine import TELinear
    except Exception:  # no megatron-core extensions at all: the adapter's own import fails the same way
        return False
    return isinstance(TELinear, type)


def pipeline_split_kwargs(split: PipelineSplit | None) -> dict:
    """The TransformerConfig fields of the plan's pipeline split (`Execution.pipeline`; none when even).
    Megatron-Core 0.16.1 validates and applies them (transformer_config.py __post_init__,
    transformer_block.get_num_layers_to_build)."""
    return split.params() if split is not None else {}


def transformer_config(
    *,
    model: ModelSpec,
    layout: Layout,
    facts: MachineFacts,
    execution: Execution | None = None,
    precision: str | None = None,
    attention_backend: str | None = None,
    dropout: float = 0.0,
    deterministic: bool = False,
):
    """The TransformerConfig for one stage: the plan's `execution` (precision recipe, attention core,
    pipeline split, p2p overlap, fusions) translated. Models built outside a stage plan (the
    alignment runtime's own copies, tests) pass `precision` and `attention_backend` instead: an even
    split, no overlap, no fusions."""
    import torch
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    if execution is not None:
        precision, attention_backend = execution.precision, execution.attention
    if precision is None or attention_backend is None:
        raise TypeError("transformer_config needs the stage's execution, or precision and attention_backend")
    _check_supported(model=model, layout=layout, precision=precision, facts=facts, attention=attention_backend)
    _check_fp8_recipe(execution.fp8_recipe if execution is not None else None, facts)
    moe = execution.moe if execution is not None else None
    _check_moe(moe, facts)
    if model.is_moe and model.moe_shared_expert_overlap and facts.cpu:  # E148 in `nemoc check`
        raise UnsupportedPlan("moe_shared_expert_overlap runs the shared expert on a CUDA side stream "
                              "(shared_experts.py); remove it on the CPU")
    _check_nvfp4(precision, facts)
    host = execution.host if execution is not None else None
    _check_cuda_graphs(host, facts)
    if host is not None and host.cuda_graph_impl != "none" and layout.overlap_param_gather:
        # Megatron-LM switches the DDP forward pre-hooks off and on around the warm-up and capture
        # (training.py train(): cuda_graph_warmup_steps); the nemoc loop does not do that dance yet.
        raise UnsupportedPlan(f"cuda_graph_impl = {host.cuda_graph_impl} with overlap_param_gather = true: the nemoc "
                              "runtime does not switch the parameter all-gather's forward pre-hooks around graph "
                              "capture yet; run one of them off")
    _check_cross_entropy(execution.fusions if execution is not None else None, facts, host)
    overlap_p2p = execution.overlaps.p2p if execution is not None else False
    activation, glu = _activation(model)
    dtype = params_dtype(precision)
    kwargs = dict(
        num_layers=model.layers,
        hidden_size=model.hidden,
        num_attention_heads=model.heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden,
        activation_func=activation,
        gated_linear_unit=glu,
        normalization="RMSNorm" if model.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=model.norm_epsilon,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        softmax_scale=model.softmax_scale,  # None: 1/sqrt(kv_channels); Gemma 3: query_pre_attn_scalar^-1/2
        **_window_kwargs(model),
        hidden_dropout=dropout,
        attention_dropout=dropout,
        init_method_std=0.02,
        # parallelism (validation inside TransformerConfig reads these too)
        **_parallel_sizes(layout),
        sequence_parallel=layout.sequence_parallel,
        # precision
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        # Initialise on the CPU with the global RNG: the weights are then independent of the TP/PP
        # layout, so differently parallelised runs start from the same model (and it is required on CPU).
        use_cpu_initialization=facts.cpu,
        # The plan's `overlaps.p2p`: the interleaved schedule overlaps its steady-state pipeline
        # transfers with compute (`overlap_p2p_comm`, as NeMo's recipes run it), which needs unbatched
        # isend/irecv. Otherwise batched on GPUs; on gloo never batched: it pairs the two messages of a
        # batched isend/irecv wrongly when the previous and the next pipeline rank are the same peer
        # (pp=2 with VPP): gradients silently wrong. Unbatched is exact.
        overlap_p2p_comm=overlap_p2p,
        batch_p2p_comm=not facts.cpu and not overlap_p2p and not _interleaved(layout),
        deterministic_mode=deterministic,
        attention_backend=_megatron_attention_backend(attention_backend, facts, AttnBackend),
        **_recompute_kwargs(layout.recompute, layout.recompute_layers, layout.recompute_modules),
        **pipeline_split_kwargs(execution.pipeline if execution is not None else None),
        **_te_fusions(execution.fusions if execution is not None else None, facts),
        **_cross_entropy_kwargs(execution.fusions if execution is not None else None, facts),
    )
    if model.is_moe:
        kwargs.update(_moe_kwargs(model, layout, moe))
    config_type = TransformerConfig
    if model.multi_latent_attention:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        kwargs.update(mla_kwargs(model))
        config_type = MLATransformerConfig
    kwargs.update(_fp8_kwargs(precision, execution.fp8_recipe if execution is not None else None))
    kwargs.update(bf16_layer_kwargs(execution))
    kwargs.update(mtp_kwargs(model, execution))
    kwargs.update(_cuda_graph_kwargs(host))
    kwargs.update(_tp_comm_kwargs(layout, execution))
    kwargs.update(_defer_wgrad_kwargs(layout, fused_wgrad=bool(kwargs.get("gradient_accumulation_fusion"))))
    if layout.fp8_param_gather and precision in ("fp8", "mxfp8"):
        kwargs["fp8_param"] = True  # the linear weights are TE FP8 tensors (plan: fp8_param_gather)
    return config_type(**kwargs)


def mla_kwargs(model: ModelSpec) -> dict:
    """The MLATransformerConfig fields of a multi-latent attention model (Megatron-Core 0.16.1
    transformer_config.py `MLATransformerConfig`, same names; q_lora_rank 0 is Megatron's None). MLA has
    no query groups (every head has its own key and value: num_query_groups = heads) and sizes its core's
    output by v_head_dim: kv_channels = v_head_dim, which the local attention cores read
    (`model._drop_mla_channels`); MLA computes its own softmax scale (YaRN's mscale^2 / sqrt(qk + pe))."""
    return dict(
        multi_latent_attention=True, q_lora_rank=model.q_lora_rank or None, kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim, qk_pos_emb_head_dim=model.qk_pos_emb_head_dim, v_head_dim=model.v_head_dim,
        num_query_groups=model.heads, kv_channels=model.v_head_dim, softmax_scale=None,
        rope_type=model.rope_type, rotary_base=model.rotary_base, rotary_scaling_factor=model.rope_scaling_factor,
        original_max_position_embeddings=model.original_max_position_embeddings, beta_fast=model.beta_fast,
        beta_slow=model.beta_slow, mscale=model.mscale, mscale_all_dim=model.mscale_all_dim,
    )


def mtp_kwargs(model: ModelSpec, execution: Execution | None) -> dict:
    """The stage's multi-token prediction (`Execution.mtp_num_layers`: the model's depth where the stage kind
    trains it, else 0) as TransformerConfig's `mtp_num_layers` (None for none, Megatron's default) and
    `mtp_loss_scaling_factor`. Models built outside a stage plan build none."""
    if execution is None or not execution.mtp_num_layers:
        return {}
    return dict(mtp_num_layers=execution.mtp_num_layers, mtp_loss_scaling_factor=model.mtp_loss_scaling_factor)


def bf16_layer_kwargs(execution: Execution | None) -> dict:
    """The plan's first / last layers kept in bf16 (`Execution.bf16_first_layers`, `bf16_last_layers`; nonzero
    only under fp8 / mxfp8 / nvfp4) as TransformerConfig's `first_last_layers_bf16` and its two counts."""
    if execution is None or not (execution.bf16_first_layers or execution.bf16_last_layers):
        return {}
    return dict(first_last_layers_bf16=True, num_layers_at_start_in_bf16=execution.bf16_first_layers,
                num_layers_at_end_in_bf16=execution.bf16_last_layers)


def _moe_kwargs(model: ModelSpec, layout: Layout, moe: MoeExecution | None = None) -> dict:
    """The TransformerConfig fields of a mixture-of-experts model (also exported as Megatron-LM flags).
    `moe`: the plan's dispatcher and kernels (`Execution.moe`); without a plan (the alignment runtime's
    own copies, tests) the local spec's: alltoall with expert parallelism, else allgather, no grouped
    GEMM, no fused permutation."""
    if moe is None:
        alltoall = layout.ep > 1 or model.moe_shared_expert_overlap
        moe = MoeExecution(dispatcher="alltoall" if alltoall else "allgather", grouped_gemm=False,
                           permute_fusion=False)
    extra = dict(moe_flex_dispatcher_backend="deepep") if moe.dispatcher == "flex" else {}
    if model.moe_capacity_factor is not None:  # read only when tokens are dropped
        extra["moe_token_drop_policy"] = model.moe_token_drop_policy
    if model.moe_router_score != "softmax":  # Megatron-Core's default: softmax
        extra["moe_router_score_function"] = model.moe_router_score
    if model.moe_expert_bias:  # read only with the expert bias
        extra["moe_router_bias_update_rate"] = model.moe_expert_bias_update_rate
    return dict(
        num_moe_experts=model.experts,
        moe_router_topk=model.top_k,
        moe_ffn_hidden_size=model.moe_ffn_hidden or model.ffn_hidden,
        moe_shared_expert_intermediate_size=model.shared_expert_ffn_hidden or None,
        # which layers are expert layers (an int, or 0 / 1 per layer with a dense prefix): read by the layer specs
        # (runtime/model.py moe_dense_block_spec builds them) and by dist_checkpointing (non-homogeneous layers)
        moe_layer_freq=model.megatron_moe_layer_freq,
        moe_token_dispatcher_type=moe.dispatcher,
        **extra,
        moe_router_load_balancing_type=model.moe_load_balancing,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,  # default 1e-2: Switch Transformer's alpha (Fedus et al. 2021)
        # token dropping (None: dropless) and drop-and-pad; E143 / E144 / E146 mirror __post_init__'s checks
        moe_expert_capacity_factor=model.moe_capacity_factor,
        moe_pad_expert_input_to_capacity=model.moe_pad_to_capacity,
        moe_shared_expert_overlap=model.moe_shared_expert_overlap,  # E145: shared expert + alltoall only
        moe_grouped_gemm=moe.grouped_gemm,  # TEGroupedMLP (TE's GroupedLinear): runtime/model.py layer_spec
        moe_permute_fusion=moe.permute_fusion,
        # Top-1 softmax routing raises unless the softmax comes before the top-k
        # (transformer_config.py __post_init__: "Please use --moe-router-pre-softmax when topk is 1").
        moe_router_pre_softmax=model.moe_router_pre_softmax or model.top_k == 1,
        # the router's scores, aux-loss-free expert bias and group-limited routing (E149 / E156 mirror
        # __post_init__'s checks of them)
        moe_router_topk_scaling_factor=model.moe_topk_scaling_factor,
        moe_router_enable_expert_bias=model.moe_expert_bias,
        moe_router_num_groups=model.moe_router_groups or None,
        moe_router_group_topk=model.moe_router_group_topk or None,
        # Megatron warns from 32 experts on without fp32 routing (numerical stability of the
        # router's softmax and aux loss; transformer_config.py __post_init__); below, the default.
        moe_router_dtype="fp32" if model.experts >= 32 else None,
        # Expert MLPs with a bias hit an autograd view+inplace error in 0.16.1 (mlp.py) and
        # production MoE models (Mixtral, Qwen-MoE) have none; _check_supported refuses a MoE
        # model with add_bias_linear (E140 in `nemoc check`).
        add_bias_linear=False,
    )


def _check_moe(moe: MoeExecution | None, facts: MachineFacts) -> None:
    """Refuse MoE kernels this machine cannot build (`nemoc check` refuses them on the local spec, E172;
    here the machine decides: a plan made for TE GPUs run where TE or DeepEP is missing)."""
    if moe is None:
        return
    need_te = [name for name, on in (("moe_grouped_gemm = true", moe.grouped_gemm),
                                     ("moe_permute_fusion = true", moe.permute_fusion),
                                     ("moe_dispatcher = flex", moe.dispatcher == "flex")) if on]
    if need_te and not facts.have_te:
        raise UnsupportedPlan(f"{need_te[0]} needs Transformer Engine, which this machine does not build (local "
                              "layer spec); plan with kernels = local or leave the MoE settings auto")
    if moe.dispatcher == "flex" and not have_deep_ep():
        raise UnsupportedPlan("moe_dispatcher = flex needs DeepEP (the deep_ep package; Megatron-Core "
                              "moe_flex_dispatcher_backend = deepep), which is not installed here; use "
                              "moe_dispatcher = alltoall")


def have_deep_ep() -> bool:
    """Whether DeepEP (the flex dispatcher's kernels) is importable on this machine."""
    import importlib.util

    return importlib.util.find_spec("deep_ep") is not None


# Transformer Engine versions Megatron-Core 0.16.1 builds each FP8 recipe with (fp8_utils.py
# get_fp8_recipe: Float8CurrentScaling from 2.2, Float8BlockScaling from 2.3, MXFP8 and delayed from 2.1).
_FP8_RECIPE_TE = {"delayed": "2.1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0"}


def _check_fp8_recipe(recipe: str | None, facts: MachineFacts) -> None:
    """Refuse a plan whose FP8 recipe this machine's Transformer Engine cannot build (Megatron-Core would
    raise inside the first forward)."""
    if recipe is None or not facts.have_te:
        return  # no fp8, or no TE at all: _check_supported refuses fp8 without TE
    from megatron.core.utils import is_te_min_version

    need = _FP8_RECIPE_TE[recipe]
    try:
        new_enough = is_te_min_version(need)
    except (TypeError, ImportError):  # TE's version unreadable here: Megatron-Core checks it again at the run
        return
    if not new_enough:
        raise UnsupportedPlan(f"fp8_recipe = {recipe} needs Transformer Engine >= {need.split('.dev')[0]} "
                              "(megatron/core/fp8_utils.py get_fp8_recipe); set fp8_recipe = delayed or upgrade "
                              "Transformer Engine")


def _fp8_kwargs(precision: str, recipe: str | None = None) -> dict:
    """The plan's fp8 recipe (`Execution.fp8_recipe`) as TransformerConfig fields; nvfp4 as Megatron-Core
    0.16.1's FP4 fields (`fp4 = "e2m1"`, `fp4_recipe = "nvfp4"`: TE's NVFP4BlockScaling)."""
    if precision in ("fp8", "mxfp8"):
        return dict(fp8="hybrid", fp8_recipe=recipe or ("mxfp8" if precision == "mxfp8" else "delayed"))
    if precision == "nvfp4":
        return dict(fp4="e2m1", fp4_recipe="nvfp4")
    return {}


# Megatron-Core 0.16.1's NVFP4 recipe needs Transformer Engine >= 2.7.0.dev0 (transformer_config.py
# `fp4_recipe`, fp4_utils.py) and a Blackwell GPU (sm >= 10.0; TE check_nvfp4_support).
NVFP4_TE = "2.7.0.dev0"


def _check_nvfp4(precision: str, facts: MachineFacts) -> None:
    """Refuse an nvfp4 plan this machine cannot run (no TE is `_check_supported`'s)."""
    if precision != "nvfp4" or not facts.have_te:
        return
    from megatron.core.utils import is_te_min_version

    try:
        new_enough = is_te_min_version(NVFP4_TE)
    except (TypeError, ImportError):  # TE's version unreadable: Megatron-Core checks it again
        new_enough = True
    if not new_enough:
        raise UnsupportedPlan("precision = nvfp4 needs Transformer Engine >= 2.7 (Megatron-Core fp4_recipe = nvfp4); "
                              "upgrade Transformer Engine or use precision = mxfp8 / fp8")
    import torch

    major, _ = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    if major < 10:
        raise UnsupportedPlan(f"precision = nvfp4 needs a Blackwell GPU (compute capability >= 10.0); this one is "
                              f"{major}.x (transformer_engine check_nvfp4_support)")


# CUDA graphs (Execution.host), driven as Megatron-LM's training loop drives them (runtime/core/graphs.py):
# the `local` implementation captures per layer through the schedules (Megatron-Core's CudaGraphManager,
# `create_cudagraphs()` after the warm-up steps), or the whole forward-backward step with
# `cuda_graph_scope = [full_iteration]` (megatron/core/full_cuda_graph.py FullCudaGraphWrapper around the
# schedule); `transformer_engine` captures every graphable layer with TE's make_graphed_callables through
# Megatron-Core's TECudaGraphHelper once the warm-up steps have run. All of them replay CUDA kernels:
# refused on the CPU and without Transformer Engine's layers (`nemoc check`: E173).
def _check_cuda_graphs(host: HostExecution | None, facts: MachineFacts) -> None:
    if host is None or host.cuda_graph_impl == "none":
        return
    import torch

    if facts.cpu or not torch.cuda.is_available():
        raise UnsupportedPlan(f"cuda_graph_impl = {host.cuda_graph_impl} needs CUDA GPUs; this run is on the CPU "
                              "(gloo), where there are no CUDA streams to capture: remove cuda_graph_impl")
    if not facts.have_te:
        raise UnsupportedPlan(f"cuda_graph_impl = {host.cuda_graph_impl}: the plan graphs Transformer Engine's layers, "
                              "which do not import here")
    if host.cuda_graph_impl == "transformer_engine" and not have_te_graphs():
        raise UnsupportedPlan("cuda_graph_impl = transformer_engine needs Transformer Engine's make_graphed_callables "
                              "(megatron/core/transformer/cuda_graphs.py HAVE_TE_GRAPHS), which does not import here; "
                              "use cuda_graph_impl = local")


def have_te_graphs() -> bool:
    """Whether Megatron-Core found Transformer Engine's make_graphed_callables (TECudaGraphHelper's)."""
    from megatron.core.transformer import cuda_graphs

    return bool(getattr(cuda_graphs, "HAVE_TE_GRAPHS", False))


def _cuda_graph_kwargs(host: HostExecution | None) -> dict:
    """The plan's CUDA graphs as TransformerConfig fields (an empty scope: the whole layer). Graphs need
    Transformer Engine's RNG tracker (model_parallel_config.py `use_te_rng_tracker`: "Required for CUDA
    graphs support"; Megatron-Bridge's GPT provider asserts it), seeded graph-safe (`cuda_graph_rng_kwargs`)."""
    if host is None or host.cuda_graph_impl == "none":
        return {}
    return dict(cuda_graph_impl=host.cuda_graph_impl, cuda_graph_scope=list(host.cuda_graph_scope),
                use_te_rng_tracker=True)


def cuda_graph_rng_kwargs(host: HostExecution | None) -> dict:
    """`tensor_parallel.model_parallel_cuda_manual_seed` keywords for a stage: with CUDA graphs, TE's RNG
    tracker with graph-safe generator states (Megatron-LM initialize.py `_set_random_seed(...,
    te_rng_tracker, use_cudagraphable_rng=args.cuda_graph_impl != "none")`), so a captured dropout
    draws fresh numbers at each replay; none otherwise, and none without CUDA (`_check_cuda_graphs` then
    refuses the plan when the stage's model is built)."""
    if host is None or host.cuda_graph_impl == "none":
        return {}
    import torch

    if not torch.cuda.is_available():
        return {}
    return dict(te_rng_tracker=True, use_cudagraphable_rng=True)


_TE_ATTENTION = ("auto", "flash", "fused", "unfused")  # the plan's values, named as Megatron's AttnBackend


def _megatron_attention_backend(backend: str, facts: MachineFacts, AttnBackend):
    """With TE the plan's choice goes to TE: `auto` -> AttnBackend.auto (TE picks flash-attn or cuDNN
    fused attention per call; Megatron leaves NVTE_*_ATTN alone), an explicit `flash` / `fused` /
    `unfused` -> that backend only (language_module.py sets NVTE_FLASH_ATTN / NVTE_FUSED_ATTN /
    NVTE_UNFUSED_ATTN). Without TE the layer spec decides (runtime.model: our SDPA core for auto,
    flash and fused; Megatron's DotProductAttention for unfused), and Megatron must not steer TE:
    `local`."""
    if not facts.have_te:
        return AttnBackend.local
    if backend not in _TE_ATTENTION:
        raise UnsupportedPlan(f"unknown attention backend {backend!r} in the plan (auto | flash | fused | unfused)")
    return getattr(AttnBackend, backend)


def _interleaved(layout: Layout) -> bool:
    return layout.pp > 1 and (layout.vp or 1) > 1


def ddp_config(*, layout: Layout, overlaps: Overlaps | None = None, cpu: bool = False,
               reuse_grad_buf: bool = False):
    """Megatron DDP: gradient reduction in fp32 main grads or the 16-bit parameter dtype, as planned
    (`grad_reduce_in_fp32`); the plan's overlaps of the gradient reduce and the parameter gather
    (`Execution.overlaps`; none for a model built outside a stage plan). Megatron-FSDP on gloo (`cpu`)
    scales the gradients before a plain sum: its default folds the 1/DP into NCCL's PREMUL_SUM
    reduction (fsdp param_and_grad_buffer.py `gradient_reduce_preprocessing`), which gloo lacks.
    `reuse_grad_buf`: the plan's `Execution.reuse_grad_buf_for_mxfp8_param_ag`."""
    from megatron.core.distributed import DistributedDataParallelConfig

    extra = dict(gradient_reduce_div_fusion=False) if cpu and layout.megatron_fsdp else {}
    return DistributedDataParallelConfig(**_ddp_kwargs(layout, overlaps, reuse_grad_buf), check_for_nan_in_grad=False,
                                         **extra)


def _ddp_kwargs(layout: Layout, overlaps: Overlaps | None, reuse_grad_buf: bool = False) -> dict:
    # Megatron-LM overlaps the parameter all-gather only together with the gradient reduce (arguments.py:
    # "Must use --overlap-param-gather with --overlap-grad-reduce"); the plan overlaps the reduce where the
    # DP x CP group DDP reduces over has more than one rank (execution.reduces_gradients), and with one rank
    # there is nothing to gather.
    gather = bool(overlaps and overlaps.param_gather and overlaps.grad_reduce)
    kw = dict(grad_reduce_in_fp32=layout.grad_reduce_in_fp32, overlap_grad_reduce=bool(overlaps and overlaps.grad_reduce),
              overlap_param_gather=gather, align_param_gather=gather and overlaps.align_param_gather,
              use_distributed_optimizer=layout.distributed_optimizer, fp8_param_gather=layout.fp8_param_gather)
    if reuse_grad_buf:  # MXFP8 parameters all-gathered through the gradient buffer (execution.reuses_grad_buffer)
        kw.update(reuse_grad_buf_for_mxfp8_param_ag=True)
    if layout.megatron_fsdp:  # ZeRO-3: weights, gradients and optimizer state sharded (Megatron-Bridge's FSDP recipes)
        kw.update(use_megatron_fsdp=True, data_parallel_sharding_strategy="optim_grads_params")
    return kw


# fp16's dynamic loss scaling (Micikevicius et al. 2018): start 2^16, halve on overflow, double after
# 1000 clean steps; a scale is lowered only after `hysteresis` overflows in a row.
LOSS_SCALING = dict(initial_loss_scale=2.0**16, min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2)


def optimizer_config(*, optimizer: OptimizerSpec, schedule: ScheduleSpec, layout: Layout, precision: str,
                     reuse_grad_buf: bool = False, fp8_recipe: str | None = None, overlap_param_gather: bool = False):
    """Adam(W) or SGD with grad clipping; bf16/fp16 keep fp32 main params; fp16 uses dynamic loss
    scaling (Micikevicius et al. 2018): start 2^16, halve on overflow, double after 1000 clean steps.
    `reuse_grad_buf` (the plan's `Execution.reuse_grad_buf_for_mxfp8_param_ag`): the step writes the main
    parameters into the shared parameter / gradient buffer for the next all-gather. `fp8_recipe` (the plan's
    `Execution.fp8_recipe`, under fp8 / mxfp8): OptimizerConfig's, as Megatron-LM copies it from its arguments;
    the distributed optimizer reads it (`use_precision_aware_optimizer_no_fp8_or_ds_fp8`: FusedAdam owns the
    master weights only without FP8 or with delayed scaling, what `memory.optimizer_bytes` sizes).
    `overlap_param_gather`: the model's DDP config's (`ddp_config`: the plan's overlapped gather, where its DP x CP
    group reduces), which the optimizer must agree with."""
    import torch
    from megatron.core.optimizer import OptimizerConfig

    if optimizer.name not in ("adam", "sgd"):
        raise UnsupportedPlan(f"optimizer {optimizer.name!r} is not supported (adam | sgd)")
    if optimizer.name == "sgd" and layout.distributed_optimizer:
        # distrib_optimizer.py asserts Adam (`nemoc check`: E129; an auto setting plans off for SGD).
        raise UnsupportedPlan("Megatron-Core's distributed optimizer supports Adam only: "
                              "plan SGD with distributed_optimizer = false")
    dtype = params_dtype(precision)
    return OptimizerConfig(
        optimizer=optimizer.name,
        lr=optimizer.lr,
        min_lr=schedule.min_lr,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.betas[0],
        adam_beta2=optimizer.betas[1],
        adam_eps=optimizer.eps,
        clip_grad=optimizer.grad_clip,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        params_dtype=dtype,
        loss_scale=None,  # dynamic
        **LOSS_SCALING,
        use_distributed_optimizer=layout.distributed_optimizer,
        # the DDP config's value (Megatron-LM copies one flag into both); the optimizer reads it only for
        # MXFP8 parameters gathered through the gradient buffer
        overlap_param_gather=layout.distributed_optimizer and overlap_param_gather,
        **precision_aware_optimizer_kwargs(layout),
        **(dict(reuse_grad_buf_for_mxfp8_param_ag=True) if reuse_grad_buf else {}),
        **(dict(fp8_recipe=fp8_recipe) if fp8_recipe is not None and precision in ("fp8", "mxfp8") else {}),
    )


def precision_aware_optimizer_kwargs(layout: Layout) -> dict:
    """The plan's `precision_aware_optimizer` and `optimizer_state_dtype` as OptimizerConfig fields: Megatron-Core's
    precision-aware optimizer (Transformer Engine's FusedAdam; `store_param_remainders` stays at its default,
    on) with bf16 or fp32 Adam moments (main params and main grads at their fp32 defaults, as Megatron-Bridge's
    recipes). Nothing without it (Megatron-Core's defaults)."""
    if not layout.precision_aware_optimizer:
        return {}
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[layout.optimizer_state_dtype]
    return dict(use_precision_aware_optimizer=True, exp_avg_dtype=dtype, exp_avg_sq_dtype=dtype)


def scheduler_kwargs(*, optimizer: OptimizerSpec, schedule: ScheduleSpec, steps: int) -> dict:
    """OptimizerParamScheduler kwargs (minus the optimizer). Steps are optimizer steps: the scheduler
    is stepped with increment=1 per iteration. Warmup is linear from 0; decay runs to min_lr over
    `decay_steps` (default: everything after warmup); WSD decays over the last 10 % linearly."""
    styles = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}
    if schedule.name not in styles:
        raise UnsupportedPlan(f"lr schedule {schedule.name!r} is not supported (cosine | linear | constant | wsd)")
    warmup = min(schedule.warmup, max(steps - 1, 0))
    decay = schedule.decay_steps if schedule.decay_steps is not None else steps
    decay = max(decay, warmup + 1)
    kwargs = dict(
        init_lr=0.0,
        max_lr=optimizer.lr,
        min_lr=schedule.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=styles[schedule.name],
        start_wd=optimizer.weight_decay,
        end_wd=optimizer.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    if schedule.name == "wsd":
        kwargs.update(wsd_decay_steps=max(1, decay // 10), lr_wsd_decay_style="linear")
    return kwargs


# ------------------------------------------------------------------ the plan as a Megatron-LM command line

# TransformerConfig / initialize_model_parallel names whose Megatron-LM flag is not `--` + the name.
_LM_FLAG = {
    "virtual_pipeline_model_parallel_size": "--num-virtual-stages-per-pipeline-rank",
    "num_layers_in_first_pipeline_stage": "--decoder-first-pipeline-num-layers",
    "num_layers_in_last_pipeline_stage": "--decoder-last-pipeline-num-layers",
    "num_moe_experts": "--num-experts",
    "grad_reduce_in_fp32": "--accumulate-allreduce-grads-in-fp32",
    "fp8": "--fp8-format",
    "fp4": "--fp4-format",
}
# Settings Megatron-LM has no flag for, or that are its default; left out of the command line.
# `align_param_gather`: Megatron-LM's default (`--no-align-param-gather` turns it off), which its
# arguments.py turns off itself without interleaving, as the plan does.
_LM_SKIP = {"moe_router_dtype", "add_bias_linear", "align_param_gather", "use_distributed_optimizer"}


def _flags(kwargs: Mapping[str, object]) -> list[str]:
    """Megatron-Core keyword arguments -> Megatron-LM flags (`True` -> a bare flag; False/None left out)."""
    out = []
    for name, value in kwargs.items():
        if name in _LM_SKIP or value is None or value is False:
            continue
        flag = _LM_FLAG.get(name, "--" + name.replace("_", "-"))
        if name == "moe_layer_freq":  # Megatron-LM's moe_freq_type: an int, or a Python list expression
            if value != 1:
                out.append(f"{flag} {_shell_word(value if isinstance(value, int) else _list_expression(value))}")
            continue
        if isinstance(value, (list, tuple)):  # an nargs="*" flag: `--recompute-modules core_attn mlp`
            out.append(" ".join([flag] + [_shell_word(v) for v in value]))
            continue
        out.append(flag if value is True else f"{flag} {_shell_word(value)}")
    return out


def _list_expression(values) -> str:
    """A 0 / 1 list as the run-length Python expression Megatron-LM's `--moe-layer-freq` evaluates
    (arguments.py `moe_freq_type`): [0, 0, 0, 1, 1] -> `[0]*3+[1]*2`."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return "+".join(f"[{v}]*{n}" for v, n in runs)


def _shell_word(value: object) -> str:
    import shlex

    if isinstance(value, float):
        return repr(value) if value != int(value) else str(int(value))
    return shlex.quote(str(value))


def megatron_lm_arguments(plan, stage_name: str) -> tuple[list[str], list[str]]:
    """The Megatron-LM `pretrain_gpt.py` arguments that run `stage_name` of `plan` as planned:
    (one `--flag value` per item, notes). Built from the same keyword sets as `transformer_config`,
    `ddp_config`, `optimizer_config` and `scheduler_kwargs`, so the command line and nemoc's own runtime
    cannot disagree. `notes` say what does not translate (a tokenizer nemoc trains, raw data paths)."""
    stage = plan.stage(stage_name)
    model, lay = plan.model, stage.layout
    notes: list[str] = []
    args = [f"--num-layers {model.layers}", f"--hidden-size {model.hidden}", f"--ffn-hidden-size {model.ffn_hidden}",
            f"--num-attention-heads {model.heads}"]
    if model.query_groups != model.heads:
        args += ["--group-query-attention", f"--num-query-groups {model.query_groups}"]
    if model.kv_channels:
        args.append(f"--kv-channels {model.kv_channels}")
    args += [f"--seq-length {stage.seq_length}", f"--max-position-embeddings {stage.seq_length}",
             f"--vocab-size {model.vocab}", f"--make-vocab-size-divisible-by {VOCAB_DIVISIBLE_BY}"]
    args += _lm_architecture(model, notes)
    args += _flags(mtp_kwargs(model, stage.execution))  # the stage's MTP depth (none where it runs without: W128)
    if model.mtp_num_layers and not stage.execution.mtp_num_layers:
        notes.append(f"mtp_num_layers = {model.mtp_num_layers} is not set for this {stage.kind} stage, which runs the "
                     "model without its multi-token prediction layers (W128)")
    dropout = float(stage.params.dropout) if "dropout" in stage.params else 0.0  # a kind that trains has it
    args += [f"--hidden-dropout {_shell_word(dropout)}", f"--attention-dropout {_shell_word(dropout)}"]
    sizes = _parallel_sizes(lay)
    sizes["virtual_pipeline_model_parallel_size"] = lay.vp if _interleaved(lay) else None
    if not model.is_moe:
        sizes.pop("expert_tensor_parallel_size")
    args += _flags(sizes)
    args += _flags(dict(sequence_parallel=lay.sequence_parallel))
    args += _lm_tp_comm(stage, notes)
    if lay.defer_embedding_wgrad_compute:
        args += ["--defer-embedding-wgrad-compute", f"--wgrad-deferral-limit {lay.wgrad_deferral_limit}"]
    if lay.distributed_optimizer:
        args.append("--use-distributed-optimizer")
    args += _flags(_recompute_kwargs(lay.recompute, lay.recompute_layers, lay.recompute_modules))
    args += _flags(pipeline_split_kwargs(stage.execution.pipeline))
    ddp = _ddp_kwargs(lay, stage.execution.overlaps, stage.execution.reuse_grad_buf_for_mxfp8_param_ag)
    args += _flags({k: v for k, v in ddp.items() if k != "use_distributed_optimizer"})
    if model.is_moe:
        args += _flags(_moe_kwargs(model, lay, stage.execution.moe))
    args += [f"--micro-batch-size {lay.micro_batch}", f"--global-batch-size {lay.global_batch}",
             f"--train-iters {stage.steps}"]
    args += _lm_precision(plan, stage)
    args += _lm_optimizer(stage)
    args += _lm_data(plan, stage, notes)
    args += [f"--log-interval {stage.log_every}", f"--seed {stage.seed}"]
    if stage.eval_every and "eval_iters" in stage.params:
        args += [f"--eval-interval {stage.eval_every}", f"--eval-iters {stage.params.eval_iters}"]
    else:
        args.append("--eval-iters 0")  # nemoc evaluates only with eval_every; Megatron-LM every 1000 steps
    if stage.checkpoint.every:
        args.append(f"--save-interval {stage.checkpoint.every}")
    if stage.peft is not None:
        notes.append(f"LoRA (rank {stage.peft.rank}, alpha {stage.peft.alpha:g}) has no pretrain_gpt.py flag: these "
                     "arguments train every weight")
    if stage.kind != "pretrain":
        notes.append(f"stage {stage.name} is a {stage.kind} stage: pretrain_gpt.py trains on next-token loss over "
                     "every token; nemoc's runtime/align runs this kind with its own loss")
    return args, notes


def _lm_tp_comm(stage, notes: list[str]) -> list[str]:
    """`--tp-comm-overlap` and its bootstrap backend; the per-GEMM userbuffer configs are a YAML file in
    Megatron-LM (`--tp-comm-overlap-cfg`, read by initialize.py `_initialize_tp_communicators`), named in a note."""
    ub = stage.execution.userbuffers
    if not stage.layout.tp_comm_overlap or ub is None:
        return []
    if ub.gemms:
        notes.append(f"tp_comm_overlap: the plan's per-GEMM userbuffer configs are Megatron-Bridge's {ub.preset} "
                     "(TransformerLayerTPOverlapCfg); Megatron-LM reads them from a YAML file given with "
                     "--tp-comm-overlap-cfg, which this command line does not write (without it TE's defaults run)")
    return ["--tp-comm-overlap", f"--tp-comm-bootstrap-backend {ub.bootstrap_backend}"]


def _lm_mla(model: ModelSpec, notes: list[str]) -> list[str]:
    """Multi-latent attention as Megatron-LM's MLA flags (`--multi-latent-attention` and the
    MLATransformerConfig fields of the same names; `mla_kwargs` is what the nemoc runtime sets)."""
    kw = mla_kwargs(model)
    out = ["--multi-latent-attention"]
    out += _flags({k: kw[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                                      "v_head_dim", "rope_type")})
    if model.rope_type == "yarn":
        out += _flags({k: kw[k] for k in ("rotary_scaling_factor", "mscale", "mscale_all_dim")})
        notes.append(f"YaRN original_max_position_embeddings {model.original_max_position_embeddings}, beta_fast "
                     f"{model.beta_fast:g}, beta_slow {model.beta_slow:g}: MLATransformerConfig fields, not written as "
                     "flags here (check that your Megatron-LM's defaults or flags match)")
    return out


def _lm_architecture(model: ModelSpec, notes: list[str]) -> list[str]:
    out = {"swiglu": ["--swiglu"], "squared_relu": ["--squared-relu"], "gelu": [],
           "gelu_tanh": ["--openai-gelu"]}.get(model.activation)
    if out is None:
        notes.append(f"activation {model.activation}: Megatron-LM has no flag for it (GELU is its default)")
        out = []
    out += [f"--normalization {'RMSNorm' if model.norm == 'rmsnorm' else 'LayerNorm'}",
            f"--norm-epsilon {_shell_word(model.norm_epsilon)}"]
    position = {"rope": "rope", "learned": "learned_absolute", "none": "none"}[model.position]
    out.append(f"--position-embedding-type {position}")
    if model.position == "rope":
        out.append(f"--rotary-base {_shell_word(model.rotary_base)}")
        if model.rope_scaling_factor != 1.0 and not model.multi_latent_attention:
            out += ["--use-rope-scaling", f"--rope-scaling-factor {_shell_word(model.rope_scaling_factor)}"]
    if model.multi_latent_attention:
        out += _lm_mla(model, notes)
    if not model.tie_embeddings:
        out.append("--untie-embeddings-and-output-weights")
    if not model.add_bias_linear or model.is_moe:
        out.append("--disable-bias-linear")
        if model.add_qkv_bias:
            out.append("--add-qkv-bias")
    if model.qk_layernorm:
        out.append("--qk-layernorm")
    if model.softmax_scale is not None:
        notes.append(f"softmax_scale {model.softmax_scale:g}: Megatron-LM has no flag for it (TransformerConfig."
                     "softmax_scale; it scales by 1/sqrt(kv_channels))")
    if model.sliding_window:
        notes.append(f"sliding_window {model.sliding_window} (full attention every {model.full_attention_every or 'no'} "
                     f"layer): TransformerConfig window_size = ({model.sliding_window - 1}, 0), window_attn_skip_freq = "
                     f"{model.full_attention_every or None}; not written as flags here")
    gemma = [name for name in ("norm_zero_centered", "post_block_norms", "embedding_scale", "local_rotary_base")
             if getattr(model, name) not in (False, None)]
    if gemma:
        notes.append(f"{', '.join(gemma)}: Gemma 3's layer is nemoc's own modules on the local spec "
                     "(runtime/gemma.py); Megatron-LM's pretrain_gpt.py builds none of them")
    return out


def _lm_precision(plan, stage) -> list[str]:
    precision = stage.execution.precision
    dtype = {"bf16": "--bf16", "fp16": "--fp16", "fp32": None, "fp8": "--bf16", "mxfp8": "--bf16",
             "nvfp4": "--bf16"}[precision]
    out = [dtype] if dtype else []
    out += _flags(_fp8_kwargs(precision, stage.execution.fp8_recipe))
    out += _flags(bf16_layer_kwargs(stage.execution))
    out += _lm_host(stage.execution.host)
    if precision == "fp16":
        out += _flags(LOSS_SCALING)
    out.append(f"--transformer-impl {'transformer_engine' if stage.kernels == 'te' else 'local'}")
    if stage.kernels == "te":
        out.append(f"--attention-backend {stage.execution.attention}")
    out += _flags(_cross_entropy_kwargs(stage.execution.fusions))  # Megatron-LM leaves it off by default
    return out


def _lm_optimizer(stage) -> list[str]:
    opt, sched = stage.optimizer, stage.schedule
    out = [f"--optimizer {opt.name}", f"--lr {_shell_word(opt.lr)}", f"--min-lr {_shell_word(sched.min_lr)}"]
    if opt.name == "adam":
        out += [f"--adam-beta1 {_shell_word(opt.betas[0])}", f"--adam-beta2 {_shell_word(opt.betas[1])}",
                f"--adam-eps {_shell_word(opt.eps)}"]
    out += [f"--weight-decay {_shell_word(opt.weight_decay)}", f"--clip-grad {_shell_word(opt.grad_clip)}"]
    if stage.layout.precision_aware_optimizer:
        dtype = stage.layout.optimizer_state_dtype
        out += ["--use-precision-aware-optimizer", f"--exp-avg-dtype {dtype}", f"--exp-avg-sq-dtype {dtype}"]
    kw = scheduler_kwargs(optimizer=opt, schedule=sched, steps=stage.steps)
    out += [f"--lr-decay-style {kw['lr_decay_style']}", f"--lr-warmup-iters {kw['lr_warmup_steps']}",
            f"--lr-decay-iters {kw['lr_decay_steps']}"]
    if "wsd_decay_steps" in kw:
        out += [f"--lr-wsd-decay-iters {kw['wsd_decay_steps']}", f"--lr-wsd-decay-style {kw['lr_wsd_decay_style']}"]
    return out


def _lm_data(plan, stage, notes: list[str]) -> list[str]:
    data = [d for d in plan.data if d.name in stage.data]
    if not data:
        return ["--mock-data"]
    words = []
    for d in data:
        words += ([_shell_word(d.weight)] if len(data) > 1 else []) + [_shell_word(d.path)]
    out = ["--data-path " + " ".join(words)]
    notes.append("--data-path: Megatron-LM reads indexed datasets (.bin/.idx prefixes); these are the raw files "
                 "nemoc's prepare task tokenizes (`nemoc run` writes the prefixes under its run directory)")
    split = data[0].split
    out.append("--split " + ",".join(_shell_word(x) for x in split))
    tok = data[0].tokenizer
    if tok is None:
        notes.append("no tokenizer: nemoc trains a byte-level BPE on the data first; pass its tokenizer.json "
                     "(--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH)")
    elif tok.startswith("tiktoken:"):
        out += ["--tokenizer-type TikTokenizer", f"--tiktoken-pattern {_shell_word(tok.split(':', 1)[1])}"]
    else:
        kind = "SentencePieceTokenizer" if tok.endswith(".model") else "HuggingFaceTokenizer"
        out += [f"--tokenizer-type {kind}", f"--tokenizer-model {_shell_word(tok)}"]
    return out


def _lm_host(host: HostExecution | None) -> list[str]:
    """CUDA graphs and manual GC as Megatron-LM flags (`--cuda-graph-scope` takes its values space-separated)."""
    if host is None:
        return []
    out = []
    if host.cuda_graph_impl != "none":
        out.append(f"--cuda-graph-impl {host.cuda_graph_impl}")
        if host.cuda_graph_scope:
            out.append("--cuda-graph-scope " + " ".join(host.cuda_graph_scope))
        out.append("--te-rng-tracker")  # use_te_rng_tracker (_cuda_graph_kwargs)
    if host.manual_gc:
        out += ["--manual-gc", f"--manual-gc-interval {host.manual_gc_interval}"]
    return out


def megatron_lm_command(plan, stage_name: str) -> str:
    """A runnable shell command: torchrun over the plan's cluster, then `megatron_lm_arguments`, one flag
    per line with `\\`, after a comment header (experiment, stage, cluster, notes)."""
    stage = plan.stage(stage_name)
    c = plan.cluster
    args, notes = megatron_lm_arguments(plan, stage_name)
    head = [f"# nemoc export --megatron-args: experiment {plan.experiment}, stage {stage.name} ({stage.kind}),",
            f"# planned for {c.nodes} node(s) x {c.gpus_per_node} {c.gpu}; Megatron-LM's pretrain_gpt.py arguments"]
    head += [f"# note: {n}" for n in notes]
    launch = [f"torchrun --nproc_per_node {c.gpus_per_node} --nnodes {c.nodes} pretrain_gpt.py"] + args
    return "\n".join(head) + "\n" + " \\\n    ".join(launch) + "\n"
