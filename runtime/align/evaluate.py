"""The eval stage: validation loss and perplexity, preference accuracy, sample generations.

Input:  the parent stage's final checkpoint; the stage's datasets: indexed text (`prefix`, the
        validation documents of its train/valid/test split), chat / prompt_response (held-out
        conversations: loss on response tokens), preference (pairs); `prompts = [...]` in the stage
        params for generations (greedy unless `temperature` is given).
Output: `output_dir/results.json` and the DONE payload: per dataset `loss`, `perplexity` = exp(loss),
        `tokens`; per preference dataset `likelihood_accuracy` (P[log pi(chosen) > log pi(rejected)]);
        `generations` [{prompt, completion}].
Invariants: runs at the stage's layout (tensor and data parallel: the weights are sharded over the TP
        group, every DP replica evaluates the same rows, rank 0 writes; dist_checkpointing reshards
        whatever layout trained the model); losses are token-weighted means; nothing here changes the model.
"""

from __future__ import annotations

import math

import torch

from nemoc.runtime.align import common, dpo, ppo, sft, stage
from nemoc.runtime.align.data import ChatTemplate, Message, read_preferences, read_sft


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
    """Next-token loss over consecutive windows of seq_length+1 tokens of the concatenated documents."""
    stream = [t for doc in documents for t in doc]
    windows = [stream[i:i + seq_length + 1] for i in range(0, max(len(stream) - 1, 0), seq_length)]
    windows = [w for w in windows if len(w) >= 2][:max_windows]
    if not windows:
        return float("nan"), 0
    batches = sft.rows_to_batches([[(w, [1] * len(w))] for w in windows], seq_length, micro_batch)
    common.unwrap(chunk).eval()
    total, count = 0.0, 0.0
    for batch in batches:
        out = common.run(chunk, batch, labels=batch.labels).float()
        total += float((out * batch.loss_mask).sum())
        count += float(batch.loss_mask.sum())
    return total / max(count, 1.0), int(count)


def _loss_entry(loss: float, tokens: int) -> dict:
    return {"loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf"),
            "tokens": tokens}


def run(task: stage.StageTask) -> dict:
    tok = stage.tokenizer_of(task)
    # the stage's precision as planned (`Execution.precision`: the local spec has no FP8 GEMMs, so the
    # nemoc runtime's target plans an fp8 model's eval in bf16)
    start = stage.policy_start(task)  # a parent's checkpoint or `init = hf(DIR)`
    chunk = stage.build(task, checkpoint=start)  # at the stage's layout (TP shards; DP ranks evaluate alike)
    p, seq = task.params, task.stage.seq_length
    micro = max(task.stage.layout.micro_batch, 1)
    template = ChatTemplate.from_params(p)
    results: dict = {"stage": task.stage.name, "checkpoint": start.path, "datasets": {}}
    for entry in task.datasets:
        name, fmt = entry.get("name"), entry.get("format", "text")
        if entry.get("prefix"):
            docs = _validation_documents(entry["prefix"], entry.get("split"))
            loss, tokens = text_loss(chunk, docs, seq, micro, int(p.get("max_windows", 64)))
            results["datasets"][name] = {"format": fmt, **_loss_entry(loss, tokens)}
        elif fmt in stage.SFT_FORMATS:
            samples = [template.render(tok, c.messages) for c in read_sft(entry["path"], fmt)]
            batches = sft.rows_to_batches([[s] for s in sft.truncate(samples, seq)], seq, micro, tok.pad,
                                          varlen=stage.varlen_attention(task))
            tokens = int(sum(float(b.loss_mask.sum()) for b in batches))
            results["datasets"][name] = {"format": fmt, **_loss_entry(sft.response_loss(chunk, batches), tokens)}
        elif fmt == "preference":
            pairs = [dpo.Pair(template.prompt_ids(tok, r.prompt), template.reply_ids(tok, r.chosen),
                              template.reply_ids(tok, r.rejected)) for r in read_preferences(entry["path"])]
            acc = dpo.preference_accuracy(chunk, pairs, seq_length=seq, micro_batch=micro, pad_id=tok.pad,
                                          varlen=stage.varlen_attention(task))
            results["datasets"][name] = {"format": fmt, "pairs": len(pairs), **acc}
    results["generations"] = generations(chunk, tok, template, list(p.get("prompts") or ()), seq_length=seq,
                                         vocab=task.vocab_size, max_new_tokens=int(p.get("max_new_tokens", 32)),
                                         temperature=p.get("temperature"), seed=task.stage.seed)
    common.write_json(task.output_dir / "results.json", results)
    losses = [d["loss"] for d in results["datasets"].values() if "loss" in d]
    return {"results": str(task.output_dir / "results.json"), "steps": 0,
            "final_loss": losses[0] if losses else None, "resident_models": ["policy"], **results}


def generations(chunk, tok, template: ChatTemplate, prompts: list[str], *, seq_length: int, vocab: int,
                max_new_tokens: int, temperature, seed: int) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(seed)
    for prompt in prompts:
        ids = template.prompt_ids(tok, [Message("user", str(prompt))])[-(seq_length - 1):]
        (reply,), _ = ppo.generate(chunk, [ids], max_new_tokens=max_new_tokens, temperature=float(temperature or 1.0),
                                   vocab=vocab, eod=tok.eod, seq_length=seq_length, generator=gen,
                                   greedy=temperature is None)
        text_ids = [t for t in reply if t != tok.eod]
        out.append({"prompt": prompt, "completion": tok.detokenize(text_ids), "tokens": len(reply)})
    return out
