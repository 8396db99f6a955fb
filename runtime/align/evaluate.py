"""The eval stage: validation loss and perplexity, preference accuracy, sample generations.

Input:  the parent stage's final checkpoint (a second parent: the reference of the implicit rewards; a
        `reward` parent: its scalar-head model); the stage's datasets: indexed text (`prefix`, the
        validation documents of its train/valid/test split), chat / prompt_response (loss on response
        tokens) and preference pairs, each on its held-out records only (`eval_heldout.held_out`: what no
        upstream stage trained on); `prompts = [...]` for generations (greedy unless `temperature` is
        given); `lm_eval_tasks` for lm-eval-harness on the model exported to `hf/`.
Output: `output_dir/results.json` and the DONE payload: per dataset its `split` (how the held-out records
        were chosen), `loss`, `perplexity` = exp(loss), `tokens`; per preference dataset
        `likelihood_accuracy` (P[log pi(chosen) > log pi(rejected)]), `likelihood_margin`, and with a
        reference `preference_accuracy` and `reward_margin` (r = beta (log pi - log ref), summed log-probs),
        or with a reward model `accuracy` and `margin` of its scores; `generations` [{prompt,
        completion}] (KV-cached, each ending at EOD or the template's end-of-turn token: data.stop_ids);
        `lm_eval` {task: metrics} or {"skipped": reason}.
Invariants: runs at the stage's layout, built as every align stage builds its model (runtime/core/build.py:
        the plan's kernels, TE's layer spec where installed; MoE layers): the weights are sharded over the
        TP group, split into one pipeline stage per PP rank (no virtual stages: the generator runs one
        chunk per rank) and a MoE model's experts over the EP ranks; every DP replica evaluates the same
        rows; dist_checkpointing reshards whatever layout trained the model. Every loss and log-prob
        pass runs through forward-only schedules (common.forward_only): the last pipeline stage computes
        the sums and broadcasts them, so every rank holds the same numbers and rank 0 writes them once;
        generations decode across the pipeline stages (runtime/generation.py, KV-cached, the last stage
        samples). lm-eval needs the whole model in one process (the exported `hf/`, run by rank 0);
        losses are token-weighted means; nothing here changes the model.
"""

from __future__ import annotations

import math

import torch

from nemoc.runtime import generation
from nemoc.runtime.align import common, dpo, sft, stage
from nemoc.runtime.align.common import AlignError
from nemoc.runtime.align.data import ChatTemplate, Message, read_preferences, read_sft, stop_ids, template_for


def _validation_documents(prefix: str, split: str | None) -> list[list[int]]:
    """The documents of the validation range of Megatron's document split (weights normalised)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    n = len(ds)
    weights = [float(x) for x in (split or "98,2,0").split(",")]
    total = sum(weights) or 1.0
    start = int(round(n * weights[0] / total))
    end = int(round(n * (weights[0] + weights[1]) / total)) if len(weights) > 1 else n
    if end <= start:  # no validation share: evaluate the tail document rather than nothing
        start, end = max(0, n - 1), n
    return [ds[i].tolist() for i in range(start, end)]


@torch.no_grad()
def text_loss(chunk, documents: list[list[int]], seq_length: int, micro_batch: int, max_windows: int) -> tuple[float, int]:
    """Next-token loss over consecutive windows of seq_length+1 tokens of the concatenated documents, at any
    pipeline layout (forward-only schedules: the last stage's sums, broadcast, so every rank returns them)."""
    stream = [t for doc in documents for t in doc]
    windows = [stream[i:i + seq_length + 1] for i in range(0, max(len(stream) - 1, 0), seq_length)]
    windows = [w for w in windows if len(w) >= 2][:max_windows]
    if not windows:
        return float("nan"), 0
    batches = sft.rows_to_batches([[(w, [1] * len(w))] for w in windows], seq_length, micro_batch)
    chunk.eval()  # every virtual-pipeline chunk of a `Chunks`
    sums = common.forward_only(chunk, [(b, {"labels": b.labels}) for b in batches],
                               lambda b, out: (float((out.float() * b.loss_mask).sum()), float(b.loss_mask.sum())),
                               everywhere=True)
    total, count = sum(x for x, _ in sums), sum(n for _, n in sums)
    return total / max(count, 1.0), int(count)


def _loss_entry(loss: float, tokens: int) -> dict:
    return {"loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf"),
            "tokens": tokens}


def run(task: stage.StageTask) -> dict:
    tok = stage.tokenizer_of(task)
    p, seq = task.params, task.stage.seq_length
    micro = max(task.stage.layout.micro_batch, 1)
    template = template_for(p, task.tokenizer)
    scorer = _parent_kind(task) == "reward"
    prompts = [] if scorer else list(p.get("prompts") or ())
    if prompts and task.stage.layout.vp:
        # the pipelined generator runs one model chunk per rank (runtime/generation.py); the nemoc runtime's
        # target never plans eval with virtual stages (runtime/target.py `_EVAL`), a hand-made plan might
        raise AlignError(f"stage {task.stage.name}: generations (`prompts`) run one model chunk per pipeline "
                         f"rank; this plan gives the stage virtual_pipeline = {task.stage.layout.vp}: drop it, "
                         "or the prompts")
    start = stage.policy_start(task)  # a parent's checkpoint or `init = hf(DIR)`
    # the stage's execution as planned (runtime/core/build.py, as every align stage): its layout (TP / EP
    # shards, a rank's pipeline stage; DP ranks evaluate alike), kernels (TE's layer spec where installed)
    # and precision (an fp8 model's eval is planned in bf16: runtime/target.py `_EVAL`)
    chunk = stage.build(task, checkpoint=start, scalar_head=scorer)
    reference = _reference(task)
    results: dict = {"stage": task.stage.name, "checkpoint": start.path, "datasets": {}}
    if reference is not None:
        results["reference"] = reference[0]
    for entry in task.datasets:
        name, fmt = entry.get("name"), entry.get("format", "text")
        if entry.get("prefix"):
            if scorer:
                continue
            docs = _validation_documents(entry["prefix"], entry.get("split"))
            loss, tokens = text_loss(chunk, docs, seq, micro, int(p.get("max_windows", 64)))
            results["datasets"][name] = {"format": fmt, "split": "the data set's validation documents",
                                         **_loss_entry(loss, tokens)}
            continue
        scored = _score_records(task, entry, chunk, tok, template, scorer=scorer,
                                reference=reference[1] if reference else None, micro=micro)
        if scored is not None:
            results["datasets"][name] = {"format": fmt, **scored}
    if not scorer:
        results["generations"] = generations(chunk, tok, template, prompts, seq_length=seq,
                                             vocab=task.vocab_size, max_new_tokens=int(p.get("max_new_tokens", 32)),
                                             temperature=p.get("temperature"), seed=task.stage.seed)
        tasks = list(p.get("lm_eval_tasks") or ())
        if tasks:
            results["lm_eval"] = _lm_eval(task, start, tasks, p.get("lm_eval_limit"), p.get("lm_eval_include"))
    common.write_json(task.output_dir / "results.json", results)
    losses = [d["loss"] for d in results["datasets"].values() if "loss" in d]
    return {"results": str(task.output_dir / "results.json"), "steps": 0,
            "final_loss": losses[0] if losses else None,
            "resident_models": ["reward"] if scorer else ["policy"] + (["reference"] if reference else []), **results}


def _parent_kind(task) -> str | None:
    first = next((n for n in task.stage.after if n in task.parents), None)
    return task.plan.stage(first).kind if first else None


def _reference(task):
    """`eval after POLICY, REFERENCE`: the second parent's model scores the implicit rewards r = beta (log pi -
    log ref) of held-out preference pairs (None with one parent)."""
    names = [n for n in task.stage.after if n in task.parents]
    if len(names) < 2 or "reward" in (task.plan.stage(names[0]).kind, task.plan.stage(names[1]).kind):
        return None
    model = stage.build_frozen(task, checkpoint=task.parents[names[1]])  # at the stage's layout
    return names[1], model


def _score_records(task, entry, chunk, tok, template, *, scorer: bool, reference, micro: int) -> dict | None:
    """Held-out records of one chat / prompt_response / preference data set, scored by the parent's model."""
    from nemoc.runtime import heldout
    from nemoc.runtime.align import eval_heldout, reward

    fmt, seq = entry.get("format", "text"), task.stage.seq_length
    if fmt in stage.SFT_FORMATS and not scorer:
        records, how = eval_heldout.held_out(task, entry, read_sft(entry["path"], fmt))
        samples = [template.render(tok, c.messages) for c in records]
        batches = sft.rows_to_batches([[x] for x in sft.truncate(samples, seq)], seq, micro, tok.pad,
                                      varlen=stage.varlen_attention(task))
        tokens = int(sum(float(b.loss_mask.sum()) for b in batches))
        loss = sft.response_loss(chunk, batches) if batches else float("nan")
        return {"split": how, "records": len(records), **_loss_entry(loss, tokens)}
    if fmt != "preference":
        return None
    records, how = eval_heldout.held_out(task, entry, read_preferences(entry["path"]))
    pairs = [dpo.Pair(template.prompt_ids(tok, r.prompt), template.reply_ids(tok, r.chosen, r.prompt),
                      template.reply_ids(tok, r.rejected, r.prompt)) for r in records]
    out: dict = {"split": how}
    if not pairs:
        return {**out, "pairs": 0}
    if scorer:  # a reward model: pair accuracy of its scores
        chosen = reward.score(chunk, [x.prompt + x.chosen for x in pairs], seq, micro, tok.pad)
        rejected = reward.score(chunk, [x.prompt + x.rejected for x in pairs], seq, micro, tok.pad)
        return {**out, **heldout.reward_model_metrics(chosen.float().cpu(), rejected.float().cpu())}
    varlen = stage.varlen_attention(task)
    policy = _pair_sums(chunk, pairs, seq, micro, tok.pad, varlen)
    ref = _pair_sums(reference, pairs, seq, micro, tok.pad, varlen) if reference is not None else None
    metrics = heldout.preference_metrics(policy, ref, beta=float(task.params.get("beta", 0.1)))
    n = len(pairs)
    metrics["likelihood_margin"] = float((policy[:n] - policy[n:]).mean())
    return {**out, **metrics}


@torch.no_grad()
def _pair_sums(model, pairs, seq_length: int, micro: int, pad_id: int, varlen: bool) -> torch.Tensor:
    """[2n] summed reply log-probs: the chosen replies of every pair, then the rejected ones (every rank)."""
    model.eval()
    groups = [pairs[start:start + micro] for start in range(0, len(pairs), micro)]
    batches = [dpo.pair_batch(group, seq_length, pad_id, varlen=varlen) for group in groups]
    sums = common.forward_only(model, [(b, {"labels": b.labels}) for b in batches],
                               lambda b, out: (-out.float() * b.loss_mask).sum(-1).cpu(), everywhere=True)
    chosen = [x[: len(g)] for x, g in zip(sums, groups)]
    rejected = [x[len(g):] for x, g in zip(sums, groups)]
    return torch.cat(chosen + rejected)


def _lm_eval(task, start: stage.Start, tasks: list[str], limit, include) -> dict:
    """lm-eval-harness on the evaluated weights written as a Hugging Face model next to results.json
    (`hf/`: streamed from the checkpoint the stage loaded, whatever its layout); `include` (a task YAML
    directory) is relative to the .nemo file (plan.root). {"skipped": reason} when lm-eval is not installed."""
    import importlib.util
    import os

    from nemoc.runtime import heldout

    if importlib.util.find_spec("lm_eval") is None:
        return heldout.lm_eval("", tasks)  # the skip record, naming the package
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {}  # rank 0 runs lm-eval and writes results.json (every rank evaluates the same model)
    from nemoc.runtime.hf import convert

    out = task.output_dir / "hf"
    if start.hf:  # the converted Hugging Face checkpoint itself, written back
        convert.export_converted(start.path, out)
    else:
        stage.write_hf(task, str(common.resolve_checkpoint(start.path)), out)
    include_path = os.path.abspath(os.path.join(task.plan.root, include)) if include else None
    return heldout.lm_eval(str(out), tasks, limit=int(limit) if limit else None, include_path=include_path,
                           prefix_token_id=stage.tokenizer_of(task).eod)


def generations(chunk, tok, template: ChatTemplate, prompts: list[str], *, seq_length: int, vocab: int,
                max_new_tokens: int, temperature, seed: int) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(seed)
    stop = stop_ids(template, tok)  # EOD and the template's end-of-turn token (ChatML's <|im_end|>, ...)
    for prompt in prompts:
        ids = template.prompt_ids(tok, [Message("user", str(prompt))])[-(seq_length - 1):]
        out_ids = generation.generate(chunk, [ids], max_new_tokens=max_new_tokens, vocab=vocab, eod=stop,
                                      seq_length=seq_length, greedy=temperature is None,
                                      temperature=float(temperature or 1.0), generator=gen)  # KV-cached
        (reply,) = out_ids.tokens
        text_ids = [t for t in reply if t not in stop]
        out.append({"prompt": prompt, "completion": tok.detokenize(text_ids), "tokens": len(reply)})
    return out
