"""One runner per stage kind: sft (and lora), dpo, kto, orpo, reward, ppo (rlhf), grpo, eval, export.

Each takes the parsed `StageTask` inside an initialised process group and returns the DONE payload.
The algorithms live in their own modules (sft.py, lora.py, dpo.py, kto.py, orpo.py, reward.py, ppo.py,
grpo.py, evaluate.py; export: runtime/hf/trained.py); this module only wires data, models, the trainer,
metrics and checkpoints together.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from nemoc.compiler.params import StageParams
from nemoc.runtime import checkpoint as ckpt
from nemoc.runtime import lora_peft
from nemoc.runtime.align import common, data, dpo, grpo, kto, lora, orpo, ppo, reward, sft, stage, trainer
from nemoc.runtime.align.common import AlignError
from nemoc.runtime.align.data import read_preferences, read_prompts, read_sft, template_for
from nemoc.runtime.align.stage import StageTask
from nemoc.runtime.core import dist
from nemoc.runtime.core import loop as core_loop
from nemoc.runtime.target import NEMOC_RUNTIME


def resident_models(kind: str, params, peft) -> list[str]:
    """The models a stage keeps in memory while it trains, as the runners below build them.

    Agrees with `nemoc.compiler.memory.resident_models` (tested): DPO with `reference = "precomputed"` frees
    the reference after one scoring pass, and PPO with LoRA takes the reference policy from the actor with its
    adapters off (the critic is trained whole: no adapters on it).
    """
    if kind == "dpo":
        p = StageParams.of("dpo", params)  # a record, or a mapping of some of its fields (defaults filled)
        if peft is not None or p.reference_free or p.reference == "precomputed":
            return ["policy"]
        return ["policy", "reference"]
    if kind in ("ppo", "rlhf"):
        return ["actor", "critic", "reward"] + ([] if peft is not None else ["reference"])
    if kind == "reward":
        return ["reward"]
    return ["policy"]


def _template(task: StageTask):
    """The stage's chat template as the plan resolved it (data.template_for)."""
    return template_for(task.params, task.tokenizer)


def _sft_samples(task: StageTask, tok):
    """(train, held out) samples `(ids, weights)`, tokenized once for all ranks (stage.tokenized_once)."""
    template = _template(task)

    def build():
        for entry in stage.raw_datasets(task, stage.SFT_FORMATS):
            convs = read_sft(entry["path"], entry["format"])
            t, v = stage.split_held_out(convs, stage.validation_fraction(entry), task.stage.seed)
            for split, records in (("train", t), ("val", v)):
                for c in records:
                    ids, weights = template.render(tok, c.messages)
                    yield {"split": split, "ids": ids, "w": weights}

    rows = stage.tokenized_once(task, "sft", template, build, stage.SFT_FORMATS)
    return ([(r["ids"], r["w"]) for r in rows if r["split"] == "train"],
            [(r["ids"], r["w"]) for r in rows if r["split"] == "val"])


def _pairs(task: StageTask, tok, records):
    template = _template(task)
    return [dpo.Pair(prompt=template.prompt_ids(tok, r.prompt), chosen=template.reply_ids(tok, r.chosen, r.prompt),
                     rejected=template.reply_ids(tok, r.rejected, r.prompt)) for r in records]


def _preference_pairs(task: StageTask, tok):
    """(train, held out) `dpo.Pair`s, tokenized once for all ranks (stage.tokenized_once)."""
    def build():
        for entry in stage.raw_datasets(task, ("preference",)):
            recs = read_preferences(entry["path"])
            t, v = stage.split_held_out(recs, stage.validation_fraction(entry), task.stage.seed)
            for split, records in (("train", t), ("val", v)):
                for p in _pairs(task, tok, records):
                    yield {"split": split, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}

    rows = stage.tokenized_once(task, "preference", _template(task), build, ("preference",))
    pairs = {split: [dpo.Pair(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"])
                     for r in rows if r["split"] == split] for split in ("train", "val")}
    return pairs["train"], pairs["val"]


def _policy(task: StageTask, checkpoint: str | stage.Start):
    """The trained model: full weights, or LoRA adapters on a frozen base when the stage has `peft`."""
    chunk = stage.build(task, checkpoint=checkpoint)
    peft = _peft(task)
    if peft is not None:
        lora_peft.apply_peft(chunk, peft, seed=task.stage.seed)  # fused (NeMo) or peft-granular adapters, rsLoRA
    return chunk


def _peft(task: StageTask):
    """The stage's LoRA settings; a stage of kind `lora` without a `peft` block gets the defaults."""
    if task.stage.peft is None and task.stage.kind == "lora":
        from nemoc.compiler.spec import LoraSpec

        return LoraSpec()
    return task.stage.peft


# The kinds whose every pass runs through Megatron's schedules (training: trainer.fit, or Trainer.step for
# PPO's epochs and GRPO's iterations; the rest: common.forward_only), so they run at any pipeline layout;
# a kind joins when it does too. PPO's and GRPO's rollouts decode across the pipeline stages
# (runtime/generation.py: each stage's layers and KV cache stay on it, the last stage samples).
PIPELINED = ("sft", "lora", "dpo", "reward", "kto", "orpo", "ppo", "rlhf", "grpo")


def _trainer(task: StageTask, chunk, steps: int | None = None):
    s = task.stage
    if s.layout.pp > 1 and s.kind not in PIPELINED:
        # a kind whose passes call the whole model directly cannot run on one pipeline stage's layers
        raise AlignError(f"stage {s.name} ({s.kind}): {s.kind} runs with pipeline parallelism 1 "
                         f"(got pp={s.layout.pp}); use tp/dp")
    if s.layout.megatron_fsdp and not NEMOC_RUNTIME.caps(s.kind).megatron_fsdp:
        # the planner plans these kinds without FSDP (runtime/target.py): a plan that says otherwise was not its
        raise AlignError(f"stage {s.name} ({s.kind}): megatron_fsdp = true, but the nemoc runtime wraps {s.kind} "
                         f"models in Megatron-Core DDP ({NEMOC_RUNTIME.caps(s.kind).source}); re-plan with nemoc plan")
    return trainer.Trainer(chunk, layout=s.layout, optimizer=s.optimizer, schedule=s.schedule,
                           steps=steps or s.steps, execution=s.execution)


def _finish_policy(task: StageTask, chunk, payload: dict) -> dict:
    """Save adapters (LoRA), merge, save the full final checkpoint."""
    peft = _peft(task)
    if peft is not None:
        adapter_dir = task.checkpoint_dir / "adapters"
        lora.save_adapters(chunk, adapter_dir, info={"rank": peft.rank, "alpha": peft.alpha, "targets": list(peft.targets),
                                                     "base_checkpoint": stage.policy_start(task).path})
        payload["adapter_checkpoint"] = str(adapter_dir)
        payload["adapter_parameters"] = sum(p.numel() for p in lora.adapters(chunk).values())
        lora.merge(chunk)
    payload["checkpoint"] = stage.save_final(task, chunk)
    return payload


STOP = dist.StopSignal()  # the core's, installed by __main__: SIGTERM/SIGINT/SIGUSR1 -> save, exit 143


def _fit(task: StageTask, tr, metrics, *, items, to_microbatches, forward, tokens_per_step: int,
         reports: tuple[str, ...] | None = None):
    """Train to the stage's steps on the training core's loop (trainer.fit -> core.loop.train_loop),
    resuming from `checkpoint_dir/latest` (model, optimizer, scheduler, data position) and saving every
    `checkpoint.every` steps and on a stop signal. Returns (the loop's final state, first step of this
    invocation)."""
    s = task.stage
    restored = ckpt.resume(root=str(task.checkpoint_dir), chunks=tr.chunks, optimizer=tr.optimizer,
                           scheduler=tr.scheduler, distributed_optimizer=s.layout.distributed_optimizer,
                           warn=lambda line: metrics.event("warning", message=line))
    start = restored.iteration if restored is not None else 0
    if restored is not None:
        metrics.rewind(start)  # the steps after the checkpoint are logged again: one record per step
        metrics.event("resumed", path=restored.path, iteration=start)
    checkpointer = _Checkpointer(root=str(task.checkpoint_dir), keep=s.checkpoint.keep, async_save=False,
                                 metrics=metrics)

    def training_state(state) -> dict:
        return ckpt.training_state(chunks=tr.chunks, optimizer=tr.optimizer, scheduler=tr.scheduler,
                                   iteration=state.iteration, consumed_samples=state.consumed_samples,
                                   extra={"stage": s.name, "kind": s.kind})

    throughput = dataclasses.replace(core_loop.throughput_for(plan=task.plan, stage=s), tokens_per_step=tokens_per_step)
    try:
        state = trainer.fit(tr, stage=s, items=items, to_microbatches=to_microbatches, forward=forward, start=start,
                            end=task.steps, reports=reports or getattr(forward, "reports", ("loss",)),
                            metrics=metrics, checkpointer=checkpointer, make_checkpoint_state=training_state,
                            throughput=throughput, stop=STOP)
        if state.preempted_by:
            if state.iteration < task.steps:
                checkpointer.save(training_state(state), iteration=state.iteration)
            raise trainer.Preempted(state.iteration, state.preempted_by)
    finally:
        checkpointer.close()
    return state, start


class _Checkpointer(ckpt.Checkpointer):
    """The core's checkpointer, with a `checkpoint` event in the stage's metrics per save."""

    def __init__(self, *, metrics, **kwargs):
        super().__init__(**kwargs)
        self._metrics = metrics

    def save(self, state, *, iteration: int):
        result = super().save(state, iteration=iteration)
        self._metrics.event("checkpoint", iteration=iteration)
        return result


def _last(state, key):
    """A report at the last logged step (the interval's mean); None when this invocation trained no step."""
    if not state.losses:
        return None
    return state.last_loss if key == "loss" else state.reports.get(key)


def run_sft(task: StageTask) -> dict:
    tok = stage.tokenizer_of(task)
    train, val = _sft_samples(task, tok)
    s, seq = task.stage, task.stage.seq_length
    packing = task.stage.params.pack
    if packing and s.layout.cp > 1:  # `nemoc check` says so too (E126, the target's packed_context_parallel)
        raise AlignError(f"stage {s.name}: context parallelism (cp={s.layout.cp}) with packed rows (pack = true): "
                         "packed sequences are split over CP ranks only by Transformer Engine's THD attention, "
                         "which this runtime does not drive; set pack = false for this stage, or context = 1")
    rows = sft.shuffled(sft.pack(sft.truncate(train, seq), seq, packing), s.seed)
    chunk = _policy(task, stage.policy_start(task))
    varlen = stage.varlen_attention(task)
    val_batches = sft.rows_to_batches([[x] for x in sft.truncate(val, seq)], seq, s.layout.micro_batch, tok.pad,
                                      varlen=varlen) if val else []
    before = sft.response_loss(chunk, val_batches) if val_batches else None
    tr = _trainer(task, chunk)
    total = task.steps
    with stage.open_stage_metrics(task, total) as metrics:
        state, start = _fit(task, tr, metrics, items=rows, forward=sft.forward,
                              to_microbatches=lambda share: sft.rows_to_batches(share, seq, s.layout.micro_batch, tok.pad,
                                                                                  varlen=varlen),
                              tokens_per_step=s.layout.global_batch * seq)
        after = sft.response_loss(tr.trained, val_batches) if val_batches else None
        if after is not None:
            metrics.log({"step": total, "val_loss": after})
    payload = {"final_loss": _last(state, "loss"), "steps": total, "resumed_from": start or None,
               "val_response_loss_before": before,  # the parent model, even when resumed
               "val_response_loss": after, "packing": packing, "rows": len(rows), "train_samples": len(train),
               "resident_models": resident_models("sft", task.params, s.peft)}
    return _finish_policy(task, tr.trained, payload)


def run_dpo(task: StageTask) -> dict:
    tok = stage.tokenizer_of(task)
    train, val = _preference_pairs(task, tok)
    params, s, seq = task.stage.params, task.stage, task.stage.seq_length
    beta, loss = params.beta, params.loss
    reference_mode = "none" if params.reference_free else params.reference
    if reference_mode not in ("model", "precomputed", "none"):
        raise AlignError(f"dpo: reference = {reference_mode!r}; expected model | precomputed (or reference_free = true)")
    parent = stage.policy_start(task)
    varlen = stage.varlen_attention(task)  # chosen and rejected rows as variable-length segments: no [s, s] mask
    chunk = _policy(task, parent)
    resident = resident_models("dpo", params, s.peft)
    if reference_mode == "none":
        reference = dpo.ReferenceScores(zero=True, loss=loss)
    elif s.peft is not None:
        reference = dpo.ReferenceScores(policy=chunk, lora_disabled=True, loss=loss)
    else:
        reference = dpo.ReferenceScores(model=stage.build_frozen(task, checkpoint=parent), loss=loss)
    table = val_table = None
    if reference_mode == "precomputed":
        table = dpo.precompute(reference, train, seq, s.layout.micro_batch, tok.pad, varlen=varlen)
        val_table = dpo.precompute(reference, val, seq, s.layout.micro_batch, tok.pad, varlen=varlen) if val else None
        reference.model = None  # freed: only the policy stays resident while training
    before = dpo.preference_accuracy(chunk, val, seq_length=seq, reference=reference if table is None else None,
                                     table=val_table, loss=loss, pad_id=tok.pad, varlen=varlen) if val else {}
    tr = _trainer(task, chunk)
    total = task.steps
    with stage.open_stage_metrics(task, total) as metrics:
        def to_mb(share):
            return dpo.microbatches(share, seq_length=seq, micro_batch=s.layout.micro_batch,
                                    reference=reference, table=table, pad_id=tok.pad, varlen=varlen)

        forward = dpo.make_forward(beta=beta, loss=loss, label_smoothing=params.label_smoothing)
        state, start = _fit(task, tr, metrics, items=list(enumerate(train)), to_microbatches=to_mb,
                              forward=forward, tokens_per_step=2 * s.layout.global_batch * seq)
        after = dpo.preference_accuracy(tr.trained, val, seq_length=seq, reference=reference if table is None else None,
                                        table=val_table, loss=loss, pad_id=tok.pad, varlen=varlen) if val else {}
        if after:
            metrics.log({"step": total, **{f"val_{k}": v for k, v in after.items()}})
    payload = {"final_loss": _last(state, "loss"), "steps": total, "loss_type": loss, "beta": beta,
               "reward_accuracy": _last(state, "reward_accuracy"), "reward_margin": _last(state, "reward_margin"),
               "resumed_from": start or None, "val_before": before, "val": after, "reference": reference_mode,
               "resident_models": resident}
    return _finish_policy(task, tr.trained, payload)


def run_reward(task: StageTask) -> dict:
    tok = stage.tokenizer_of(task)
    train, val = _preference_pairs(task, tok)
    s, seq = task.stage, task.stage.seq_length
    chunk = stage.build(task, checkpoint=stage.policy_start(task), scalar_head=True, skip_output=True)
    before = reward.accuracy(chunk, val, seq_length=seq, pad_id=tok.pad) if val else {}
    tr = _trainer(task, chunk)
    total = task.steps
    with stage.open_stage_metrics(task, total) as metrics:
        def to_mb(share):
            return reward.pair_microbatches(share, seq_length=seq, micro_batch=s.layout.micro_batch, pad_id=tok.pad)

        state, start = _fit(task, tr, metrics, items=train, to_microbatches=to_mb, forward=reward.forward,
                              tokens_per_step=2 * s.layout.global_batch * seq)
        after = reward.accuracy(tr.trained, val, seq_length=seq, pad_id=tok.pad) if val else {}
        if after:
            metrics.log({"step": total, "val_accuracy": after["accuracy"]})
    payload = {"final_loss": _last(state, "loss"), "steps": total, "train_accuracy": _last(state, "accuracy"),
               "resumed_from": start or None, "val_before": before, "val": after, "scalar_head": True,
               "resident_models": resident_models("reward", task.params, None)}
    payload["checkpoint"] = stage.save_final(task, tr.trained, extra={"scalar_head": True})
    return payload


def run_ppo(task: StageTask) -> dict:
    tok = stage.tokenizer_of(task)
    s, seq = task.stage, task.stage.seq_length
    cfg = ppo.PPOConfig.from_params(task.params)
    template = _template(task)
    formats = ("prompt", "chat", "prompt_response", "preference")

    def build():  # tokenized once for all ranks (stage.tokenized_once)
        for entry in stage.raw_datasets(task, formats):
            yield from ({"prompt": template.prompt_ids(tok, r.prompt)} for r in read_prompts(entry["path"]))

    rows = stage.tokenized_once(task, "ppo", template, build, formats)
    prompts = [r["prompt"] for r in rows if len(r["prompt"]) + 1 < seq]
    if not prompts:
        raise AlignError(f"ppo: no prompt leaves room for a response within seq_length={seq}")
    reward_ckpt = stage.parent_checkpoint(task, kind="reward")
    actor_ckpt = stage.Start(task.hf_init, hf=True) if task.hf_init else next(
        (task.parents[n] for n in s.after if task.plan.stage(n).kind != "reward" and n in task.parents), None)
    if actor_ckpt is None:
        raise AlignError(f"ppo stage {s.name} needs a policy parent (e.g. an sft stage) besides the reward stage")
    actor = _policy(task, actor_ckpt)
    critic = stage.build(task, checkpoint=reward_ckpt, scalar_head=True)  # critic starts from the reward model
    reward_model = stage.build_frozen(task, checkpoint=reward_ckpt, scalar_head=True)
    if s.peft is not None:
        reference = ppo.reference_logprobs(actor=actor, lora_disabled=True)
    else:
        reference = ppo.reference_logprobs(stage.build_frozen(task, checkpoint=actor_ckpt))
    scorer = ppo.ModelScorer(reward_model, seq)
    stop = data.stop_ids(template, tok)  # EOD and the template's end-of-turn token
    total = task.steps
    actor_tr = _trainer(task, actor, steps=total * cfg.ppo_epochs)
    critic_tr = _trainer(task, critic, steps=total * cfg.ppo_epochs)
    # the rollout and the experience passes run the trained models: under Megatron-FSDP their wrappers, whose
    # forward hooks all-gather each layer's shards (the bare chunks hold this rank's only)
    actor, critic = actor_tr.trained, critic_tr.trained
    dp_rank, _ = stage.dp_info()
    history = []
    with stage.open_stage_metrics(task, total) as metrics:
        saver = _PPOCheckpoints(task, actor_tr, critic_tr, metrics, epochs=cfg.ppo_epochs)
        start = saver.resume()
        try:
            for it in range(start, total):
                # the sampling generator is a pure function of (seed, DP rank, iteration), like the prompts:
                # a resumed run samples what the uninterrupted one did
                gen = torch.Generator().manual_seed(s.seed + 1000 * dp_rank + 1_000_003 * it)  # same on TP peers
                share = trainer.dp_shard(prompts, it, s.layout.global_batch)
                m = ppo.iteration(actor_trainer=actor_tr, critic_trainer=critic_tr, actor=actor, critic=critic,
                                  reference=reference, scorer=scorer, prompts=share, seq_length=seq,
                                  vocab=task.vocab_size, eod=stop, cfg=cfg, micro_batch=s.layout.micro_batch,
                                  generator=gen)
                m["step"] = it + 1
                history.append(m)
                stage.log_step(metrics, m, tokens=0, log_every=s.log_every, total=total)
                signum = STOP.agreed()
                every = s.checkpoint.every
                if it + 1 < total and (signum or (every and (it + 1) % every == 0)):
                    saver.save(it + 1)
                if signum:
                    raise trainer.Preempted(it + 1, signum)
        finally:
            saver.close()
    first, last = (history[0], history[-1]) if history else ({}, {})
    payload = {"final_loss": last.get("policy_loss"), "steps": total, "reward_first": first.get("reward"),
               "reward": last.get("reward"), "kl": last.get("kl"), "entropy": last.get("entropy"),
               "resumed_from": start or None, "resident_models": resident_models(s.kind, task.params, s.peft)}
    return _finish_policy(task, actor, payload)


class _PPOCheckpoints:
    """PPO's training state: the actor's and the critic's (model, optimizer, scheduler, RNG) under
    `checkpoint_dir/actor` and `checkpoint_dir/critic`, saved at the same iteration; a resume takes the
    newest iteration both hold (a kill between the two saves leaves the actor one ahead)."""

    def __init__(self, task: StageTask, actor_tr, critic_tr, metrics, *, epochs: int):
        self.task, self.metrics, self.epochs = task, metrics, epochs
        self.parts = {"actor": actor_tr, "critic": critic_tr}
        self.savers = {name: ckpt.Checkpointer(root=self._root(name), keep=task.stage.checkpoint.keep, async_save=False)
                       for name in self.parts}

    def _root(self, name: str) -> str:
        return str(self.task.checkpoint_dir / name)

    def resume(self) -> int:
        s = self.task.stage
        both = set.intersection(*({int(os.path.basename(p)[5:]) for p in ckpt.complete_checkpoints(self._root(n))}
                                  for n in self.parts))
        restored = None
        for name, tr in self.parts.items():
            wanted = both if restored is None else {restored.iteration}
            restored = ckpt.resume(root=self._root(name), chunks=tr.chunks, optimizer=tr.optimizer,
                                   scheduler=tr.scheduler, distributed_optimizer=s.layout.distributed_optimizer,
                                   warn=lambda line: self.metrics.event("warning", message=line), iterations=wanted)
            if restored is None:
                return 0
            tr.step_count = restored.iteration * self.epochs
        self.metrics.rewind(restored.iteration)
        self.metrics.event("resumed", path=str(self.task.checkpoint_dir), iteration=restored.iteration)
        return restored.iteration

    def save(self, iteration: int) -> None:
        s = self.task.stage
        for name, tr in self.parts.items():
            state = ckpt.training_state(chunks=tr.chunks, optimizer=tr.optimizer, scheduler=tr.scheduler,
                                        iteration=iteration, consumed_samples=iteration * s.layout.global_batch,
                                        extra={"stage": s.name, "kind": s.kind, "part": name})
            self.savers[name].save(state, iteration=iteration)
        self.metrics.event("checkpoint", iteration=iteration)

    def close(self) -> None:
        for saver in self.savers.values():
            saver.close()


def run_eval(task: StageTask) -> dict:
    from nemoc.runtime.align import evaluate

    return evaluate.run(task)


def run_export(task: StageTask) -> dict:
    """Stream the parent's checkpoint into a Hugging Face directory (runtime/hf/trained.py: one layer
    resident at a time, in the stored dtype unless the stage names `dtype`); a LoRA parent's adapter is
    also written in peft's format under `hf/adapter` when the LoRA stage started from a Hugging Face
    checkpoint (peft applies it to that base)."""
    from nemoc.runtime.hf import peft_export

    checkpoint = str(common.resolve_checkpoint(stage.parent_checkpoint(task)))
    dtype = task.params.get("dtype")
    if dtype is not None and str(dtype) not in ("float32", "bfloat16", "float16"):
        raise AlignError(f"export: dtype {dtype!r}; expected float32 | bfloat16 | float16")
    path, manifest = stage.write_hf(task, checkpoint, task.output_dir / "hf", dtype=str(dtype) if dtype else None)
    payload = {"export": str(path), "format": "huggingface", "architecture": manifest["config"].get("architectures", [None])[0],
               "family": manifest["family"], "dtype": manifest["dtype"], "source_checkpoint": checkpoint,
               "steps": 0, "final_loss": None, "resident_models": ["policy"]}
    adapter = _export_adapter(task, manifest, path, peft_export)
    if adapter:
        payload["adapter"] = adapter
    return payload


def _export_adapter(task: StageTask, manifest: dict, out, peft_export) -> str | None:
    """peft's adapter of the direct LoRA parent (its `checkpoints/adapters`), or None without one."""
    import json
    from pathlib import Path

    parent = Path(stage.parent_checkpoint(task))
    adapters = parent.parent / "adapters"
    info_path = adapters / "nemoc_adapter.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    base = info.get("base_checkpoint")
    if not base or not (Path(base) / "nemoc_hf.json").is_file() or manifest.get("source") is None \
            or manifest["family"] == "gpt2":
        # the adapter's base is not a Hugging Face checkpoint (a nemoc parent stage), or GPT-2's Conv1D
        return None
    from nemoc.runtime.hf.trained import adapter_state

    state = adapter_state(adapters, manifest["architecture"]["layers"])
    try:
        peft_export.write_adapter(state, manifest, out / "adapter", rank=int(info["rank"]), alpha=float(info["alpha"]),
                                  base_model=manifest["source"], dtype=manifest["dtype"])
    except peft_export.AdapterError as exc:
        raise AlignError(f"export: {exc}") from None
    return str(out / "adapter")


def run_kto(task: StageTask) -> dict:
    """Desirable / undesirable examples -> the policy (kto.py: micro-batches with the step's KL baseline,
    the forward step on objectives.kto), trained on the core's loop."""
    tok = stage.tokenizer_of(task)
    train, val = kto.examples_of(task, tok)
    s, seq = task.stage, task.stage.seq_length
    params = s.params  # the kind's typed record (nemoc.compiler.params)
    beta, loss = float(params.beta), str(params.loss)
    weights = dict(desirable_weight=float(params.desirable_weight),
                   undesirable_weight=float(params.undesirable_weight))
    if not any(e.desirable for e in train) or all(e.desirable for e in train):
        raise AlignError(f"kto stage {s.name}: the training examples are all "
                         f"{'desirable' if train and train[0].desirable else 'undesirable'}; KTO needs both kinds")
    start_from = stage.policy_start(task)  # a parent's checkpoint or `init = hf(DIR)`
    varlen = stage.varlen_attention(task)
    chunk = _policy(task, start_from)
    if s.peft is not None:
        reference = kto.Reference(policy=chunk)
    else:
        reference = kto.Reference(model=stage.build_frozen(task, checkpoint=start_from))
    score = (lambda model: kto.held_out_metrics(model, reference, val, seq_length=seq, beta=beta, varlen=varlen,
                                                micro_batch=s.layout.micro_batch, pad_id=tok.pad)) if val else (
        lambda model: {})
    before = score(chunk)
    tr = _trainer(task, chunk)
    n_good = sum(e.desirable for e in train)
    advice = kto.weight_advice(n_good, len(train) - n_good, **weights)
    with stage.open_stage_metrics(task, task.steps) as metrics:
        if advice:
            metrics.event("warning", message=f"kto stage {s.name}: {advice}")

        def to_mb(share):  # the KL pairs through the trained model (under FSDP its wrapper gathers the shards)
            return kto.microbatches(share, policy=tr.trained, reference=reference, seq_length=seq, varlen=varlen,
                                    micro_batch=s.layout.micro_batch, loss=loss, pad_id=tok.pad)

        state, start = _fit(task, tr, metrics, items=train, to_microbatches=to_mb,
                            forward=kto.make_forward(beta=beta, loss=loss, **weights),
                            tokens_per_step=s.layout.global_batch * seq)
        after = score(tr.trained)
        if after:
            metrics.log({"step": task.steps, **{f"val_{k}": v for k, v in after.items()}})
    payload = {"final_loss": _last(state, "loss"), "steps": task.steps, "loss_type": loss, "beta": beta, **weights,
               "kl": _last(state, "kl"), "reward_margin": _last(state, "reward_margin"), "resumed_from": start or None,
               "val_before": before, "val": after, "train_examples": len(train), "val_examples": len(val),
               "desirable_share": n_good / len(train), "resident_models": kto.resident_models(params, s.peft)}
    return _finish_policy(task, tr.trained, payload)


def run_orpo(task: StageTask) -> dict:
    """Preference pairs -> the policy trained with SFT + odds ratio, no reference (orpo.py), on the core's loop."""
    tok = stage.tokenizer_of(task)
    train, val = _preference_pairs(task, tok)
    s, seq = task.stage, task.stage.seq_length
    beta = float(s.params.beta)
    varlen = stage.varlen_attention(task)
    chunk = _policy(task, stage.policy_start(task))
    score = (lambda model: orpo.preference_accuracy(model, val, seq_length=seq, beta=beta, pad_id=tok.pad,
                                                    varlen=varlen, micro_batch=s.layout.micro_batch)) if val else (
        lambda model: {})
    before = score(chunk)
    tr = _trainer(task, chunk)
    with stage.open_stage_metrics(task, task.steps) as metrics:
        state, start = _fit(
            task, tr, metrics, items=train, forward=orpo.make_forward(beta=beta),
            tokens_per_step=2 * s.layout.global_batch * seq,
            to_microbatches=lambda share: orpo.microbatches(share, seq_length=seq, micro_batch=s.layout.micro_batch,
                                                            pad_id=tok.pad, varlen=varlen))
        after = score(tr.trained)
        if after:
            metrics.log({"step": task.steps, **{f"val_{k}": v for k, v in after.items()}})
    payload = {"final_loss": _last(state, "loss"), "steps": task.steps, "beta": beta,
               "nll_loss": _last(state, "nll_loss"), "log_odds_ratio": _last(state, "log_odds_ratio"),
               "reward_accuracy": _last(state, "reward_accuracy"), "reward_margin": _last(state, "reward_margin"),
               "resumed_from": start or None, "val_before": before, "val": after, "val_pairs": len(val),
               "train_pairs": len(train), "resident_models": orpo.resident_models(task.params, s.peft)}
    return _finish_policy(task, tr.trained, payload)


def run_grpo(task: StageTask) -> dict:
    """The `grpo` stage: prompts -> the policy trained on its own group-normalised samples."""
    tok = stage.tokenizer_of(task)
    s, seq = task.stage, task.stage.seq_length
    cfg = grpo.GRPOParams.from_params(task.params)
    train, val = grpo.queries_of(task, tok)
    stop = data.stop_ids(_template(task), tok)  # rollouts end at EOD or the template's end-of-turn token
    if cfg.reward is not None:
        missing = sum(q.reference is None for q in train + val)
        if missing:
            raise AlignError(f"grpo: reward = {cfg.reward} compares each completion with the record's reference "
                             f"answer, but {missing} prompt(s) have none (prompt_response `response`, preference "
                             "`chosen`, or a chat's last assistant turn)")
        score = grpo.VerifierReward(cfg.reward, tok, _template(task).end, stop)
        policy_ckpt = stage.policy_start(task)  # a parent's checkpoint or `init = hf(DIR)`
    else:
        score = grpo.ModelReward(stage.build_frozen(task, checkpoint=stage.parent_checkpoint(task, kind="reward"),
                                                    scalar_head=True), seq, tok.pad)
        policy_ckpt = stage.Start(task.hf_init, hf=True) if task.hf_init else next(
            (task.parents[n] for n in s.after if task.plan.stage(n).kind != "reward" and n in task.parents), None)
        if policy_ckpt is None:
            raise AlignError(f"grpo stage {s.name} needs a policy parent (e.g. an sft stage) besides the reward stage")
    policy = _policy(task, policy_ckpt)
    reference = None
    if cfg.beta != 0.0:
        reference = "lora" if s.peft is not None else stage.build_frozen(task, checkpoint=policy_ckpt)
    common_args = dict(vocab=task.vocab_size, eod=stop, seq_length=seq)
    evaluate = (lambda model: grpo.held_out_reward(model, val, score, cfg, **common_args)) if val else (
        lambda model: {})
    before = evaluate(policy)
    total = task.steps
    tr = _trainer(task, policy, steps=total * cfg.iterations)
    # from here on the rollouts and the experience passes run the trained model: under Megatron-FSDP its
    # wrapper, whose forward hooks all-gather each layer's shards (the bare chunk holds this rank's only)
    policy = tr.trained
    dp_rank, _ = stage.dp_info()
    history = []
    with stage.open_stage_metrics(task, total) as metrics:
        restored = ckpt.resume(root=str(task.checkpoint_dir), chunks=tr.chunks, optimizer=tr.optimizer,
                               scheduler=tr.scheduler, distributed_optimizer=s.layout.distributed_optimizer,
                               warn=lambda line: metrics.event("warning", message=line))
        start = restored.iteration if restored is not None else 0
        if restored is not None:
            tr.step_count = start * cfg.iterations
            metrics.rewind(start)
            metrics.event("resumed", path=restored.path, iteration=start)
        tr.warn = lambda line: metrics.event("transient_fault", message=line)
        saver = ckpt.Checkpointer(root=str(task.checkpoint_dir), keep=s.checkpoint.keep, async_save=False)

        def save(it: int) -> None:
            state = ckpt.training_state(chunks=tr.chunks, optimizer=tr.optimizer, scheduler=tr.scheduler,
                                        iteration=it, consumed_samples=it * s.layout.global_batch,
                                        extra={"stage": s.name, "kind": s.kind})
            saver.save(state, iteration=it)
            metrics.event("checkpoint", iteration=it)

        try:
            for it in range(start, total):
                gen = torch.Generator().manual_seed(s.seed + 1000 * dp_rank + 1_000_003 * it)  # same on TP peers
                share = trainer.dp_shard(train, it, s.layout.global_batch)
                # a micro-batch holds `micro_batch` prompts' groups: micro_batch x G rows, as the plan costs it
                # (flops.stage_work: G rows per prompt)
                m = grpo.iteration(tr, policy, reference, share, score, cfg,
                                   micro_batch=s.layout.micro_batch * cfg.num_generations, pad_id=tok.pad,
                                   generator=gen, **common_args)
                m["step"] = it + 1
                history.append(m)
                stage.log_step(metrics, m, tokens=0, log_every=s.log_every, total=total)
                signum = STOP.agreed()
                if it + 1 < total and (signum or (s.checkpoint.every and (it + 1) % s.checkpoint.every == 0)):
                    save(it + 1)
                if signum:
                    raise trainer.Preempted(it + 1, signum)
        finally:
            saver.close()
        after = evaluate(policy)
        if after:
            metrics.log({"step": total, **{f"val_{k}": v for k, v in after.items()}})
    first, last = (history[0], history[-1]) if history else ({}, {})
    payload = {"final_loss": last.get("loss"), "steps": total, "reward_first": first.get("reward"),
               "reward": last.get("reward"), "kl": last.get("kl"), "clip_fraction": last.get("clip_fraction"),
               "num_generations": cfg.num_generations, "reward_source": cfg.reward or "reward_model",
               "resumed_from": start or None, "val_before": before, "val": after, "val_prompts": len(val),
               "resident_models": grpo.resident_models(task.params, s.peft)}
    return _finish_policy(task, policy, payload)


RUNNERS = {"sft": run_sft, "lora": run_sft, "dpo": run_dpo, "reward": run_reward, "ppo": run_ppo,
           "rlhf": run_ppo, "eval": run_eval, "export": run_export, "kto": run_kto, "orpo": run_orpo,
           "grpo": run_grpo}
SINGLE_PROCESS = ("export",)
