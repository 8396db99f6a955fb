"""Stage rules (E150-E155, E157, E170, E207, E208, W126, W150): the stage settings that would otherwise fail only at run time
(`min_lr` above `lr`, an alignment stage without data in a format its records need, an export with no `after`,
a parent that never saves, a child at another sequence length than a parent with learned positions, a
multi-latent attention model exported without a DeepseekV3 equivalent or with peft's q / k / v LoRA targets, a warm-up longer than the stage).
"""

from __future__ import annotations

from dataclasses import replace

from nemoc.compiler.spec import ExperimentSpec, StageSpec
from nemoc.dsl.diagnostics import Diagnostic, Note, Severity
from nemoc.dsl.schema import PARENT_CHECKPOINT_KINDS, STAGE_DATA_FORMATS
from nemoc.compiler.rules.base import TRAINING_KINDS, Violation, stage_seq_length, to_diagnostic


_RECORDS = {"chat": '{"messages": [{"role", "content"}, ...]}', "prompt_response": '{"prompt", "response"}',
            "preference": '{"prompt", "chosen", "rejected"}', "unpaired": '{"prompt", "completion", "label"}'}


def _stage_diagnostic(v: Violation, spec: ExperimentSpec, stage: StageSpec, notes=()) -> Diagnostic:
    d = to_diagnostic(v, spec, stage)
    return replace(d, notes=tuple(notes)) if notes else d


def rule_min_lr(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """megatron/core/optimizer_param_scheduler.py OptimizerParamScheduler.__init__: `assert max_lr >= min_lr`."""
    lr, min_lr = stage.optimizer.lr, stage.schedule.min_lr
    if stage.kind not in TRAINING_KINDS or min_lr <= lr:
        return None
    return _stage_diagnostic(Violation(
        "E150", "the schedule's `min_lr` is above the optimizer's peak `lr`",
        f"min_lr({min_lr:g}) > lr({lr:g})",
        f"the schedule decays from lr to min_lr: use min_lr <= {lr:g} (often lr / 10 = {lr / 10:g})",
        anchors=("stage.schedule.min_lr", "stage.optimizer.lr", "stage.schedule"),
        source="megatron/core/optimizer_param_scheduler.py (assert self.max_lr >= self.min_lr)"), spec, stage)


def rule_data_format(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """An alignment stage reads only data sets of its record formats (the runtime's data loader)."""
    wanted = STAGE_DATA_FORMATS.get(stage.kind)
    formats = {d.name: d.format for d in spec.data}
    given = [(name, formats.get(name, "text")) for name in stage.data]
    if wanted is None or not given or any(fmt in wanted for _, fmt in given):
        return None  # (a stage that names no data at all is not this rule's: nothing was misdeclared)
    shown = ", ".join(f"{name} ({fmt})" for name, fmt in given)
    example = f"`format = {wanted[0]}` ({_RECORDS[wanted[0]]} records)"
    return _stage_diagnostic(Violation(
        "E151", f"a `{stage.kind}` stage needs data in format {' | '.join(wanted)}",
        f"data = [{shown}]; {stage.kind} reads {' | '.join(wanted)}",
        f"declare `data {given[0][0]}` with {example}, or give the stage such a data set",
        anchors=("stage.data", "stage")), spec, stage)


# the fix of each E170 reason, by its anchor
_E170_FIX = {
    "model.qk_layernorm": "set qk_layernorm = true (DeepseekV3 normalises both latents)",
    "model.moe_router_score": "use moe_router_score = sigmoid with moe_expert_bias = true (DeepseekV3's router)",
    "model.moe_layer_freq": "make the dense layers a prefix (moe_first_dense_layers = k: DeepseekV3's "
                            "first_k_dense_replace)",
    "model.top_k": "use top_k >= 2",
    "model.moe_router_groups": "choose moe_router_group_topk = top_k / 2, or remove moe_router_groups",
}


def rule_mla_stage_kind(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """The nemoc runtime, not Megatron: multi-latent attention models run in every stage kind (pretrain, sft,
    dpo, kto, orpo, reward, ppo, grpo, with or without LoRA; eval; `init = hf(...)` of a DeepseekV3 checkpoint
    and export to one: docs/alignment.md, docs/huggingface.md) except an export of a model whose DeepseekV3ForCausalLM would compute something else: transformers'
    DeepseekV3 always has the latents' RMSNorms (qk_layernorm = false has none) and routes its experts with
    sigmoid scores plus a correction bias (a softmax router, or one without the expert bias, has no
    DeepseekV3Config); its dense layers are a prefix (first_k_dense_replace); its norm_topk_prob renormalises a
    single expert's score to 1 where Megatron's sigmoid router keeps it (top_k = 1); and it ranks a router group
    by its top-2 scores where Megatron takes the top top_k // moe_router_group_topk (hfconfig._deepseek_router:
    the export's config.json is read back through it)."""
    m = spec.model
    if not m.multi_latent_attention or m.init:  # a DeepSeek source: its own config.json is exported
        return None
    if not _exports(stage):
        return None
    why = []
    if not m.qk_layernorm:
        why.append(("model.qk_layernorm", "qk_layernorm = false (DeepseekV3 always normalises the latents)"))
    if m.is_moe and (m.moe_router_score != "sigmoid" or not m.moe_expert_bias):
        why.append(("model.moe_router_score", f"moe_router_score = {m.moe_router_score}, moe_expert_bias = "
                    f"{str(m.moe_expert_bias).lower()} (DeepseekV3 routes by sigmoid scores plus an expert bias)"))
    pattern = m.moe_layer_pattern if m.is_moe else ()
    if 1 in pattern and 0 in pattern[pattern.index(1):]:
        why.append(("model.moe_layer_freq", "dense layers after an expert layer (DeepseekV3's dense layers are its "
                    "first first_k_dense_replace layers)"))
    if m.is_moe and m.top_k == 1:
        why.append(("model.top_k", "top_k = 1 (transformers' norm_topk_prob renormalises a single expert's score to "
                    "1, Megatron-Core's sigmoid router keeps the raw score)"))
    if m.is_moe and m.moe_router_groups > 1 and m.top_k // (m.moe_router_group_topk or 1) != 2:
        why.append(("model.moe_router_groups", f"moe_router_groups = {m.moe_router_groups} with top_k({m.top_k}) // "
                    f"moe_router_group_topk({m.moe_router_group_topk}) = {m.top_k // (m.moe_router_group_topk or 1)} "
                    "!= 2 (transformers ranks a group by its top-2 scores, Megatron-Core by its top "
                    "top_k // moe_router_group_topk)"))
    if not why:
        return None
    what = "`export` stages" if stage.kind == "export" else "lm-eval-harness tasks (which export the model)"
    return _stage_diagnostic(Violation(
        "E170", f"{what} cannot write this multi-latent attention model as DeepseekV3",
        "; ".join(w for _, w in why),
        "; ".join(_E170_FIX[a] for a in dict.fromkeys(a for a, _ in why))
        + ", or keep the Megatron-Core checkpoint",
        anchors=(("stage.lm_eval_tasks",) if stage.kind == "eval" else ("stage.kind",)) + ("stage",)
        + tuple(a for a, _ in why)), spec, stage)


def _exports(stage: StageSpec) -> bool:
    """Whether the stage writes a Hugging Face checkpoint: an export stage, or lm-eval-harness tasks."""
    return stage.kind == "export" or (stage.kind == "eval" and "lm_eval_tasks" in stage.params
                                      and bool(stage.params.lm_eval_tasks))


def rule_mixtral_export_dense_layers(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """An MoE model trained without a Hugging Face source exports as Qwen3-MoE with the QK norms (whose
    mlp_only_layers holds dense layers) and as Mixtral without them (the export builds its config.json from the
    model block). MixtralForCausalLM makes every layer a sparse MoE block (MixtralDecoderLayer: no dense-layer
    option), so a model with dense layers (moe_first_dense_layers, moe_layer_freq) has no MixtralConfig."""
    m = spec.model
    mixtral = m.norm == "rmsnorm" and m.position == "rope" and m.activation == "swiglu" and not m.qk_layernorm
    if m.init or m.multi_latent_attention or not m.is_moe or not mixtral or 0 not in m.moe_layer_pattern or not (
            _exports(stage)):
        return None
    dense = [i for i, p in enumerate(m.moe_layer_pattern) if not p]
    what = "`export` stages" if stage.kind == "export" else "lm-eval-harness tasks (which export the model)"
    return _stage_diagnostic(Violation(
        "E208", f"{what} cannot write this MoE model as Mixtral: it has dense layers",
        f"experts({m.experts}) without qk_layernorm exports as MixtralForCausalLM, every layer sparse; "
        f"moe_first_dense_layers / moe_layer_freq make layer(s) {dense} dense MLPs",
        "set qk_layernorm = true (exports as Qwen3-MoE, whose mlp_only_layers holds dense layers), make every "
        "layer an expert layer, or keep the Megatron-Core checkpoint",
        anchors=(("stage.lm_eval_tasks",) if stage.kind == "eval" else ("stage.kind",)) + ("stage",),
        source="transformers models/mixtral/modeling_mixtral.py MixtralDecoderLayer (every layer a "
               "MixtralSparseMoeBlock)"), spec, stage)


DEEPSEEK_LATENT_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, which q_a_layernorm / kv_a_layernorm keep


def warn_mla_latent_norm_epsilon(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """transformers builds DeepseekV3's latent norms (q_a_layernorm, kv_a_layernorm) with DeepseekV3RMSNorm's
    default epsilon, 1e-6, whatever rms_norm_eps says; Megatron-Core builds q_layernorm / kv_layernorm with the
    model's layernorm_epsilon (multi_latent_attention.py MLASelfAttention.__init__). An MLA model whose
    norm_epsilon is not 1e-6 therefore computes its latent norms slightly differently from transformers, when it
    starts from a DeepseekV3 checkpoint (rms_norm_eps != 1e-6; said at the first stage) and when it is exported
    as one. nemoc has no separate latent-norm epsilon, so this is a warning, not a refusal: the difference is
    eps inside a square root next to the latent's mean square."""
    m = spec.model
    if not m.multi_latent_attention or not m.qk_layernorm or m.norm_epsilon == DEEPSEEK_LATENT_EPS:
        return None
    imports = bool(m.init) and stage is spec.stages[0]
    exports = _exports(stage) and not m.init and rule_mla_stage_kind(spec, stage) is None  # E170: no export at all
    if not (imports or exports):
        return None
    what = ("starts from a DeepseekV3 checkpoint" if imports else
            "is exported as DeepseekV3" if stage.kind == "export" else "is exported as DeepseekV3 for lm-eval-harness")
    return _stage_diagnostic(Violation(
        "W126", f"this multi-latent attention model {what}, whose latent norms use epsilon 1e-6",
        f"norm_epsilon({m.norm_epsilon:g}) != 1e-6: Megatron-Core normalises the query and key-value latents with "
        f"eps {m.norm_epsilon:g}, transformers' q_a_layernorm / kv_a_layernorm with 1e-6 (DeepseekV3RMSNorm's "
        "default; rms_norm_eps sets only the other norms)",
        "nothing to do if a small difference in the latent norms is acceptable; norm_epsilon = 1e-6 makes them equal",
        anchors=(("model.norm_epsilon", "model.init", "model") if imports else
                 (("stage.lm_eval_tasks",) if stage.kind == "eval" else ("stage.kind",)) + ("stage",)),
        severity=Severity.WARNING,
        source="transformers models/deepseek_v3/modeling_deepseek_v3.py DeepseekV3Attention "
               "(DeepseekV3RMSNorm(q_lora_rank)); megatron/core/transformer/multi_latent_attention.py MLASelfAttention.__init__ (eps=layernorm_epsilon)"),
        spec, stage)


def rule_mla_lora_targets(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """peft's `q`, `k`, `v` adapt standard attention's separate query, key and value projections (inside
    Megatron's fused linear_qkv); a multi-latent attention layer has none: its keys and values both come from
    one latent (multi_latent_attention.py MLASelfAttention: linear_kv_down_proj, then linear_kv_up_proj to
    heads x (qk_head_dim + v_head_dim)). `qkv` adapts each MLA projection (docs/alignment.md, LoRA)."""
    if not spec.model.multi_latent_attention or stage.peft is None:
        return None
    split = [t for t in ("q", "k", "v") if t in stage.peft.targets]
    if not split:
        return None
    kept = [t for t in stage.peft.targets if t not in split]
    fixed = ["qkv"] + [t for t in kept if t != "qkv"]
    return _stage_diagnostic(Violation(
        "E207", f"LoRA targets {', '.join(f'`{t}`' for t in split)} do not exist in a multi-latent attention model",
        f"multi_latent_attention = true with targets = [{', '.join(stage.peft.targets)}]: MLA has no separate q, k "
        "and v projections (keys and values share the latent of linear_kv_down_proj / linear_kv_up_proj)",
        f"write `targets = [{', '.join(fixed)}]`: `qkv` puts one adapter on each MLA projection (linear_q_down_proj, "
        "linear_q_up_proj or linear_q_proj, linear_kv_down_proj, linear_kv_up_proj)",
        anchors=("stage.peft", "stage"),
        source="megatron/core/transformer/multi_latent_attention.py MLASelfAttention.__init__"), spec, stage)


def rule_export_after(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """An export writes the checkpoint of the stage it follows (the runtime's parent checkpoint lookup),
    or, with `init = hf(DIR)`, converts that checkpoint (docs/huggingface.md)."""
    if stage.kind != "export" or stage.after or _initial_checkpoint(spec, stage):
        return None
    trained = [s.name for s in spec.stages if s.kind in TRAINING_KINDS]
    return _stage_diagnostic(Violation(
        "E152", f"export stage `{stage.name}` has no `after`: there is no checkpoint to export",
        "after = []", f"write `stage {stage.name} after {trained[-1] if trained else 'NAME'} {{ ... }}`",
        anchors=("stage",)), spec, stage)


def _initial_checkpoint(spec: ExperimentSpec, stage: StageSpec) -> str | None:
    """The Hugging Face checkpoint a stage starts from: its own `init`, else the model's when it has no
    parent stage (as `compiler.graph.stage_init` wires it)."""
    own = stage.params.init if "init" in stage.params else None
    return own or (spec.model.init if not stage.after else None)


def stage_mtp_layers(spec: ExperimentSpec, stage: StageSpec, _seen: frozenset[str] = frozenset()) -> int:
    """The multi-token prediction depths a stage builds: the model's in a `pretrain` stage (what DeepSeek-V3 and
    Megatron-Bridge's recipe train with them), and in an export of a checkpoint that has them (a parent that trained
    them, or the hf_import -> hf_export conversion of a checkpoint with `num_nextn_predict_layers`); 0 elsewhere.
    Fine-tuning, preference, RL and eval stages run the model without them, as Megatron-Bridge's fine-tuning
    recipes switch MTP off (and the nemoc runtime's alignment losses read the main head's logits only): W128 says
    so, and their checkpoints hold no MTP weights."""
    n = spec.model.mtp_num_layers
    if not n or stage.kind == "pretrain":
        return n
    if stage.kind != "export" or not spec.model.multi_latent_attention:
        return 0  # only DeepSeek-V3's Hugging Face layout (what an MLA model exports as) has a place for MTP weights
    if is_hf_conversion(spec, stage):
        return n
    parents = [spec.stage(name) for name in stage.after if name not in _seen]
    return n if any(stage_mtp_layers(spec, p, _seen | {stage.name}) for p in parents) else 0


def warn_mtp_stage_kind(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """A stage that runs the model without its multi-token prediction depths (`stage_mtp_layers`), said at the stage."""
    n = spec.model.mtp_num_layers
    if not n or stage_mtp_layers(spec, stage):
        return None
    why = ("only pretrain stages train multi-token prediction" if stage.kind != "export" else
           "its parent checkpoint has no MTP weights" if spec.model.multi_latent_attention else
           "the Hugging Face layout it writes (a Llama-like family) has no MTP weights; DeepSeek-V3's (an MLA "
           "model's) has")
    return _stage_diagnostic(Violation(
        "W128", f"this {stage.kind} stage runs the model without its multi-token prediction layers",
        f"model.mtp_num_layers = {n}, stage kind {stage.kind}: {why}",
        "nothing to do if intended (Megatron-Bridge's fine-tuning recipes switch MTP off); its plan, memory and time "
        "are the model's without the MTP depths",
        anchors=("stage.kind",), severity=Severity.WARNING,
        source="megatron/core/models/gpt/gpt_model.py _postprocess (the MTP loss needs the pretraining labels)"),
        spec, stage, notes=[Note(f"mtp_num_layers = {n} here", spec.span("model.mtp_num_layers", "model"))])


def is_hf_conversion(spec: ExperimentSpec, stage: StageSpec) -> bool:
    """An export stage with an initial checkpoint and no parent converts that checkpoint (HF -> Megatron-Core
    -> HF: the graph's hf_import -> hf_export, compiler.graph) and builds no model."""
    return stage.kind == "export" and not stage.after and bool(_initial_checkpoint(spec, stage))


def rule_starting_checkpoint(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """A fine-tuning or eval stage starts from a checkpoint: a parent stage's or `init = hf(DIR)`."""
    if stage.kind not in PARENT_CHECKPOINT_KINDS or stage.kind == "export" or stage.after:
        return None
    if _initial_checkpoint(spec, stage):
        return None
    return _stage_diagnostic(Violation(
        "E155", f"{stage.kind} stage `{stage.name}` has neither a parent stage nor an initial checkpoint",
        "after = [], init = none",
        f"write `stage {stage.name} after PARENT {{ ... }}`, or start from a Hugging Face checkpoint: "
        "`init = hf(\"DIR\")` in the model block or the stage", anchors=("stage",)), spec, stage)


def hf_init_not_loaded(spec: ExperimentSpec, target) -> tuple[Diagnostic, ...]:
    """W156: a stage that would start from `init = hf(DIR)` on a target that converts the checkpoint but
    does not load it into that stage kind yet (`StageCaps.hf_init`); `nemoc run` refuses such a plan
    before launching anything (docs/huggingface.md)."""
    out = []
    for stage in spec.stages:
        start = _initial_checkpoint(spec, stage)
        if not start or target.caps(stage.kind).hf_init:
            continue
        d = _stage_diagnostic(Violation(
            "W156", f"{stage.kind} stage `{stage.name}` starts from `init = hf(...)`, which {target.name} converts "
            f"but does not load into {stage.kind} stages yet",
            f"init = hf({start!r}), {stage.kind} stages load a parent stage's checkpoint only",
            "`nemoc run` refuses this plan before launching; start the stage `after` a stage with a checkpoint, "
            "or use the converted checkpoint in an export-only experiment", anchors=("stage",),
            severity=Severity.WARNING), spec, stage)
        out.append(d)
    return tuple(out)


def rule_parent_saves(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """The runtime's parent checkpoint lookup: the first parent with a checkpoint (ppo: every parent:
    the reward model and the policy)."""
    if stage.kind not in PARENT_CHECKPOINT_KINDS or not stage.after:
        return None
    names = {s.name for s in spec.stages}
    parents = [spec.stage(n) for n in stage.after if n in names]
    silent = [p for p in parents if "save_checkpoints" in p.params and not p.params.save_checkpoints]
    if not silent or (stage.kind != "ppo" and len(silent) < len(parents)):
        return None
    parent = silent[0]
    notes = [Note(f"`{parent.name}` saves no checkpoints here", spec.span(f"stage.{parent.name}.save_checkpoints"))]
    return _stage_diagnostic(Violation(
        "E153", f"stage `{stage.name}` starts from the checkpoint of `{parent.name}`, which saves none",
        f"{parent.name}.save_checkpoints = false",
        f"remove `save_checkpoints = false` from `{parent.name}` (it is meant for benchmark runs)",
        anchors=("stage",)), spec, stage, notes)


def rule_parent_seq_length(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """A stage may train at another sequence length than its parent (pretrain at 2048, SFT at 4096) when
    no weight depends on it: RoPE and no position embeddings. Learned absolute position embeddings are a
    [seq_length, hidden] table (megatron/core/models/common/embeddings/language_model_embedding.py
    `position_embeddings = torch.nn.Embedding(max_sequence_length, hidden)`), so the parent's checkpoint
    cannot load into a model of another length."""
    if spec.model.position != "learned" or stage.kind not in PARENT_CHECKPOINT_KINDS:
        return None
    names = {s.name for s in spec.stages}
    seq = stage_seq_length(spec, stage)
    for parent in (spec.stage(n) for n in stage.after if n in names):
        theirs = stage_seq_length(spec, parent)
        if theirs != seq:
            notes = [Note(f"`{parent.name}` trains at seq_length {theirs}", spec.span(f"stage.{parent.name}"))]
            return _stage_diagnostic(Violation(
                "E157", f"stage `{stage.name}` runs at another sequence length than its parent `{parent.name}`, "
                "and the model's learned position embeddings have one row per position",
                f"seq_length({seq}) != {parent.name}.seq_length({theirs}), position = learned",
                f"keep seq_length = {theirs} in `{stage.name}`, or use rotary positions (`position = rope`), "
                "whose weights do not depend on the length", anchors=("stage.seq_length", "stage")),
                spec, stage, notes)
    return None


def warn_warmup_longer_than_stage(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """Megatron's scheduler clamps: a warm-up longer than the stage never reaches the peak `lr`."""
    warmup, steps = stage.schedule.warmup, _stage_steps(spec, stage)
    if stage.kind not in TRAINING_KINDS or steps is None or warmup <= steps:
        return None
    return _stage_diagnostic(Violation(
        "W150", "the warm-up is longer than the stage: the learning rate never reaches its peak",
        f"warmup({warmup:,}) > steps({steps:,})" + ("" if stage.steps else
                                                     f" = tokens({stage.tokens:,}) / (global_batch x seq_length)"),
        f"use a warm-up shorter than the stage, e.g. warmup = {max(1, steps // 10):,} (10%)",
        anchors=("stage.schedule.warmup", "stage.schedule", "stage"), severity=Severity.WARNING), spec, stage)


def warn_sample_tokens_unpacked(spec: ExperimentSpec, stage: StageSpec) -> Diagnostic | None:
    """`sample_tokens` prices attention within packed samples; with `pack = false` every sample is a row
    of its own, padded to seq_length, so the stated length changes nothing the plan costs."""
    params = stage.params
    if "sample_tokens" not in params or params.sample_tokens is None or params.pack:
        return None
    return _stage_diagnostic(Violation(
        "W157", "sample_tokens has no effect with pack = false: each sample is padded to seq_length",
        f"sample_tokens({params.sample_tokens:,}) with pack = false",
        "set pack = true to pack samples (the plan then costs attention within each), or remove sample_tokens",
        anchors=("stage.sample_tokens", "stage.pack", "stage"), severity=Severity.WARNING), spec, stage)


def _stage_steps(spec: ExperimentSpec, stage: StageSpec) -> int | None:
    """The stage's optimizer steps when known without the data: `steps`, or `tokens` with a batch."""
    if stage.steps is not None:
        return stage.steps
    if stage.tokens is not None and stage.global_batch:
        return max(1, stage.tokens // (stage.global_batch * stage_seq_length(spec, stage)))
    return None


STAGE_RULES = (rule_min_lr, rule_mla_stage_kind, warn_mtp_stage_kind, rule_mixtral_export_dense_layers, warn_mla_latent_norm_epsilon,
               rule_mla_lora_targets,
               rule_data_format, rule_export_after, rule_starting_checkpoint,
               rule_parent_saves, rule_parent_seq_length, warn_warmup_longer_than_stage, warn_sample_tokens_unpacked)


MAX_STAGES = 100  # real chains have a handful; the planner searches each stage (~5 ms), so 2,500 would take 15 s


def rule_stage_count(spec: ExperimentSpec) -> Diagnostic | None:
    """An experiment is a page: at most MAX_STAGES stages, so `plan` stays within seconds on any file."""
    if len(spec.stages) <= MAX_STAGES:
        return None
    first_over = spec.stages[MAX_STAGES]
    return _stage_diagnostic(Violation(
        "E154", f"too many stages: {len(spec.stages):,} (the limit is {MAX_STAGES})",
        f"stages({len(spec.stages):,}) > {MAX_STAGES}",
        "an experiment is a short chain of stages: split it into several experiments",
        anchors=("stage",)), spec, first_over)


def stage_diagnostics(spec: ExperimentSpec) -> tuple[Diagnostic, ...]:
    """Every stage rule over every stage (none when there are too many stages to be a real experiment)."""
    too_many = rule_stage_count(spec)
    if too_many is not None:
        return (too_many,)
    return tuple(d for stage in spec.stages for rule in STAGE_RULES if (d := rule(spec, stage)) is not None)


STAGE_CODES = {
    "E154": rule_stage_count,
    "E150": rule_min_lr,
    "E151": rule_data_format,
    "E152": rule_export_after,
    "E153": rule_parent_saves,
    "E155": rule_starting_checkpoint,
    "E157": rule_parent_seq_length,
    "E170": rule_mla_stage_kind,
    "E208": rule_mixtral_export_dense_layers,
    "W126": warn_mla_latent_norm_epsilon,
    "E207": rule_mla_lora_targets,
    "W150": warn_warmup_longer_than_stage,
    "W157": warn_sample_tokens_unpacked,
    "W128": warn_mtp_stage_kind,
}
