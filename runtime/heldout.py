"""Held-out evaluation: the split that keeps evaluation data out of training, and the metrics per stage kind.

Input:  a data source's records (any JSON-able values), its validation fraction and the stage seed; per-row
        log-prob sums / token counts / scores computed by a stage's model.
Output: `split` -> (train, held_out); metric dicts: `lm_metrics` (loss, perplexity), `preference_metrics`
        (preference accuracy = implicit-reward accuracy, reward margin, likelihood accuracy),
        `reward_model_metrics` (pair accuracy, margin); `lm_eval` runs lm-eval-harness on an exported
        Hugging Face directory for the tasks a user names, when `lm-eval` is installed.
Invariants: a held-out record is never a training record: the split is the seeded shuffle the alignment
        stages use (`random.Random(seed).shuffle`, first round(fraction * n) held out, at least one when
        n >= 2), and then every held-out record *equal* to a training record is dropped from the held-out
        side (a data file that repeats a record would otherwise score a trained pair as "held out").
        Ties count 1/2 in accuracies, so an untrained policy (policy == reference) scores exactly 0.5.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections.abc import Sequence

import torch


def _key(record) -> str:
    return json.dumps(record, sort_keys=True, default=repr)


def split(records: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): held_out shares no record (by value) with train."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = len(records)
    n_val = min(n - 1, max(1 if n >= 2 and fraction > 0 else 0, round(fraction * n)))
    train = [records[i] for i in order[n_val:]]
    seen = {_key(r) for r in train}
    held_out = [records[i] for i in order[:n_val] if _key(records[i]) not in seen]
    return train, held_out


def lm_metrics(nll_sum: float, tokens: int) -> dict:
    loss = nll_sum / tokens if tokens else float("nan")
    ppl = math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf")
    return {"loss": loss, "perplexity": ppl, "tokens": int(tokens)}


def _wins(diff: torch.Tensor) -> float:
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor | None = None, *, beta: float = 0.1) -> dict:
    """policy / reference: [2n] sequence log-prob sums, chosen rows first. With a reference: preference
    accuracy P[r_w > r_l] and the mean reward margin, r = beta (log pi - log ref); always the likelihood
    accuracy P[log pi(y_w) > log pi(y_l)]."""
    n = policy.shape[0] // 2
    out = {"pairs": n, "likelihood_accuracy": _wins(policy[:n] - policy[n:])}
    if reference is not None:
        r = beta * (policy - reference)
        margin = r[:n] - r[n:]
        out.update(preference_accuracy=_wins(margin), reward_margin=float(margin.mean()),
                   reward_chosen=float(r[:n].mean()), reward_rejected=float(r[n:].mean()))
    return out


def reward_model_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    diff = chosen - rejected
    return {"pairs": int(diff.numel()), "accuracy": _wins(diff), "margin": float(diff.mean())}


def lm_eval(hf_dir: str, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 8,
            device: str = "cpu", include_path: str | None = None, prefix_token_id: int | None = None) -> dict:
    """lm-eval-harness scores of an exported model for `tasks`, or {"skipped": reason} when lm-eval is not
    installed (an optional extra: pip install 'nemoc[eval]') or no task was named. `include_path`: a
    directory of task YAMLs; then only its tasks are indexed (not lm-eval's built-in thousands).
    `prefix_token_id`: the token before an empty context (lm-eval's default is the tokenizer's BOS / EOS,
    which a nemoc export's tokenizer.json does not name: pass its end-of-document id)."""
    if not tasks:
        return {"skipped": "no lm_eval_tasks named"}
    if importlib.util.find_spec("lm_eval") is None:
        return {"skipped": "lm-eval is not installed (pip install 'nemoc[eval]')"}
    import lm_eval as harness
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    args = f"pretrained={hf_dir},dtype=float32" + (f",prefix_token_id={prefix_token_id}" if prefix_token_id is not None else "")
    out = harness.simple_evaluate(model="hf", model_args=args, tasks=list(tasks),
                                  limit=limit, batch_size=batch_size, device=device, task_manager=manager)
    return {"tasks": {name: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                      for name, metrics in out["results"].items()}}
