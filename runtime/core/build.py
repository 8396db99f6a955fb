"""Model chunks, optimizer, and the checkpoint around a stage: restore or initialise, final save.

`build_model` builds the stage's GPTModel chunks with runtime.model (TE or local spec per the plan's
kernels) wrapped in Megatron DDP; `build_optimizer` Megatron's optimizer and scheduler from the
stage's plan; `restore_or_initialize` resumes from the stage's own checkpoints (model, optimizer,
scheduler, RNG, data position) or loads `init_checkpoint` weights; `save_final` writes the last one.
"""

from __future__ import annotations

import dataclasses
import os

from nemoc.runtime.core.dist import machine_facts, rank0_print, set_phase

from megatron.core.optimizer import get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402

from nemoc.compiler.plan import Plan, StagePlan  # noqa: E402
from nemoc.runtime import checkpoint as ckpt  # noqa: E402
from nemoc.runtime import megatron_args as margs  # noqa: E402
from nemoc.runtime import model as mdl  # noqa: E402
from nemoc.runtime import userbuffers  # noqa: E402


def build_model(*, plan: Plan, stage: StagePlan, vocab_size: int, facts: margs.MachineFacts | None = None,
                dropout: float | None = None, head=None):
    """(model chunks wrapped in Megatron DDP, TransformerConfig, padded vocab) for a stage."""
    facts = facts or machine_facts(stage.kernels)
    chunks, config, padded = build_chunks(
        model=plan.model, layout=stage.layout, vocab_size=vocab_size, seq_length=stage.seq_length, facts=facts,
        execution=stage.execution, dropout=stage.params.dropout if dropout is None else dropout,
        head=head)
    return wrap(chunks, config=config, stage=stage), config, padded


def wrap(chunks: list, *, config, stage: StagePlan) -> list:
    """Megatron DDP around built chunks (parameters with requires_grad False get no gradient buffer), or
    Megatron-FSDP's FullyShardedDataParallel where the plan says `megatron_fsdp`."""
    from nemoc.runtime import mcore_cpu

    ddp_config = margs.ddp_config(layout=stage.layout, overlaps=stage.execution.overlaps, cpu=mcore_cpu.is_applied(),
                                  reuse_grad_buf=stage.execution.reuse_grad_buf_for_mxfp8_param_ag)
    if stage.layout.megatron_fsdp:
        return mdl.wrap_fsdp(chunks=chunks, config=config, ddp_config=ddp_config)
    return mdl.wrap_ddp(chunks=chunks, config=config, ddp_config=ddp_config)


def build_chunks(*, model, layout, vocab_size: int, seq_length: int, facts: margs.MachineFacts, execution=None,
                 precision: str | None = None, attention_backend: str | None = None, dropout: float = 0.0,
                 head=None) -> tuple[list, object, int]:
    """(this rank's GPTModel chunks, one per virtual-pipeline stage, not DDP-wrapped; TransformerConfig;
    padded vocabulary): every stage kind's model, from the stage's `execution` (kernels, attention core,
    precision recipe, pipeline split, vocabulary padding) -- or, for a model built outside a stage plan
    (tools, tests), `precision` and `attention_backend`. `head(config)` replaces the vocabulary output
    layer of the last pipeline stage (the reward model's and critic's scalar head; embeddings untied)."""
    set_phase("build model")
    if head is not None and model.tie_embeddings:
        model = dataclasses.replace(model, tie_embeddings=False)
    config = margs.transformer_config(model=model, layout=layout, execution=execution, precision=precision,
                                      attention_backend=attention_backend, facts=facts, dropout=dropout,
                                      deterministic=facts.cpu)
    if execution is not None:  # TE's userbuffers exist before TE's layers look them up (tp_comm_overlap)
        userbuffers.initialize(execution.userbuffers, facts)
    multiple = execution.vocab_multiple if execution is not None else None
    padded = margs.padded_vocab_size(vocab_size, layout.tp, multiple=multiple)
    attention = execution.attention if execution is not None else attention_backend
    chunks = mdl.build_model_chunks(config=config, model=model, vocab_size=padded, seq_length=seq_length,
                                    attention_backend=attention, have_te=facts.have_te)
    if head is not None:
        for chunk in chunks:
            gpt = mdl.unwrap(chunk)
            if gpt.post_process:
                gpt.output_layer = head(config)
    return chunks, config, padded


def build_optimizer(*, model, stage: StagePlan, precision: str, steps: int | None = None):
    """(Megatron optimizer, OptimizerParamScheduler) for a stage's model chunks; `steps` sizes the LR
    schedule (default: the stage's steps)."""
    return optimizer_for(model=model, optimizer=stage.optimizer, schedule=stage.schedule, layout=stage.layout,
                         reuse_grad_buf=stage.execution.reuse_grad_buf_for_mxfp8_param_ag,
                         fp8_recipe=stage.execution.fp8_recipe,
                         precision=precision, steps=stage.steps if steps is None else steps)


def _ddp_overlaps_gather(model) -> bool:
    """The wrapped chunks' DDP `overlap_param_gather` (built from the plan's `Execution.overlaps`: ddp_config),
    which Megatron-LM copies into the OptimizerConfig too."""
    ddp = getattr(model[0], "ddp_config", None) if model else None
    return bool(ddp is not None and ddp.overlap_param_gather)


def optimizer_for(*, model, optimizer, schedule, layout, precision: str, steps: int, reuse_grad_buf: bool = False,
                  fp8_recipe: str | None = None):
    """(Megatron optimizer, OptimizerParamScheduler) from a stage plan's optimizer, schedule and layout
    (frozen parameters, requires_grad False, get no gradient buffer and are not optimised)."""
    set_phase("build optimizer")
    margs.check_trainable(moe=bool(mdl.unwrap(model[0]).config.num_moe_experts), layout=layout)
    megatron_optimizer = get_megatron_optimizer(
        margs.optimizer_config(optimizer=optimizer, schedule=schedule, layout=layout, precision=precision,
                               reuse_grad_buf=reuse_grad_buf, fp8_recipe=fp8_recipe,
                               overlap_param_gather=_ddp_overlaps_gather(model)), model)
    scheduler = OptimizerParamScheduler(
        megatron_optimizer, **margs.scheduler_kwargs(optimizer=optimizer, schedule=schedule, steps=max(steps, 1)))
    return megatron_optimizer, scheduler


def restore_or_initialize(*, root: str, init_checkpoint: str | None, distributed_optimizer: bool, model, optimizer,
                          scheduler, metrics, hf_init: str | None = None,
                          vocab_size: int | None = None) -> ckpt.Restored | None:
    """Resume from the stage's own checkpoints if any; otherwise load `init_checkpoint` weights, or the
    converted Hugging Face checkpoint `hf_init` (`init = hf(DIR)`; `vocab_size`: the tokenizer's)."""
    set_phase("restore checkpoint")
    warn = rank0_print
    restored = ckpt.resume(root=root, chunks=model, optimizer=optimizer, scheduler=scheduler,
                           distributed_optimizer=distributed_optimizer, warn=warn)
    if restored is not None:
        metrics.rewind(restored.iteration)  # steps after the checkpoint are logged again: one record per step
        metrics.event("resumed", checkpoint=restored.path, iteration=restored.iteration,
                      optimizer_restored=restored.optimizer_restored, rng_restored=restored.rng_restored)
        return restored
    if init_checkpoint:
        set_phase(f"load init checkpoint {init_checkpoint}")
        ckpt.load_weights(init_checkpoint, chunks=model, optimizer=optimizer)
        metrics.event("initialized", checkpoint=init_checkpoint)
    elif hf_init:
        from nemoc.runtime.hf.load import LoadError, load_converted, load_converted_into_fsdp

        set_phase(f"load Hugging Face checkpoint {hf_init}")
        try:
            if mdl.is_fsdp(model):  # each rank copies its Megatron-FSDP shard of each full tensor
                load_converted_into_fsdp(model, hf_init, vocab=vocab_size)
            else:
                for chunk in model:  # every virtual-pipeline chunk reads its own layers
                    load_converted(chunk, hf_init, vocab=vocab_size)
        except LoadError as exc:  # a one-line error, like an unusable init checkpoint
            raise ckpt.CheckpointError(str(exc)) from None
        optimizer.reload_model_params()  # the fp32 main copy follows the loaded weights
        metrics.event("initialized", hf_checkpoint=hf_init)
    return None


def save_final(checkpointer: ckpt.Checkpointer, checkpoint_state, state,
                restored: ckpt.Restored | None) -> str:
    """Save at the current iteration unless this run saved that checkpoint or resumed from it (both
    verified); wait for it to land. A checkpoint of that name that `latest` names but the resume
    skipped as damaged is replaced, never handed on."""
    set_phase(f"final checkpoint at step {state.iteration}")
    target = os.path.join(checkpointer.root, ckpt.iteration_name(state.iteration))
    saved = checkpointer.has_saved(target)
    resumed_there = restored is not None and restored.path == target
    if not saved and not resumed_there:
        checkpointer.save(checkpoint_state(state), iteration=state.iteration)
    checkpointer.close()
    return target
