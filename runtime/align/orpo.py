"""ORPO stage (Hong et al. 2024): supervised fine-tuning plus an odds-ratio preference term, no reference.

Input:  preference pairs (`dpo.Pair`: prompt, chosen, rejected token ids), the policy chunk, `beta` (the
        paper's lambda; TRL's name).
Output: per step `loss`, `nll_loss`, `log_odds_ratio`, `log_odds_chosen`, `reward_chosen` /
        `reward_rejected` / `reward_margin` / `reward_accuracy` (beta x per-token mean log-probs, as TRL
        logs them); held-out preference accuracy (`preference_accuracy`).
Invariants: a microbatch holds the chosen rows then the rejected rows of the same pairs (a pair is never
        split across microbatches or DP ranks); the odds ratio uses per-token *mean* log-probs of the
        completion tokens; the NLL is the token mean over the chosen rows' prompt *and* completion, as
        trl.experimental.orpo.ORPOTrainer.concatenated_forward computes it ("orpo chosen nll loss is
        computed over the full prompt and response"); the loss itself is `objectives.orpo.orpo_loss`,
        equal to TRL's on identical log-probs (tests/runtime/learning/test_objectives_trl.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nemoc.runtime.align.common import (AlignError, cp_share, cp_sum, forward_only, logprob_forward, make_batch,
                                        row_sums)
from nemoc.runtime.align.dpo import Pair, pair_batch
from nemoc.runtime.align.trainer import chunks
from nemoc.runtime.objectives import orpo as objective

REPORTS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "reward_chosen", "reward_rejected",
           "reward_accuracy", "reward_margin")  # objectives.orpo.orpo_loss's, averaged by the core's loop


def resident_models(params, peft) -> list[str]:
    """What `run_orpo` holds: the policy only (ORPO has no reference model)."""
    return ["policy"]


def _full_mask(pairs: Sequence[Pair], seq_length: int, pad_id: int) -> torch.Tensor:
    """[2n, s] weight 1 on every real label token (prompt and completion) of the chosen and rejected rows."""
    seqs = [(p.prompt + p.chosen)[: seq_length + 1] for p in pairs] + [(p.prompt + p.rejected)[: seq_length + 1] for p in pairs]
    return make_batch([(ids, [1] * len(ids)) for ids in seqs], seq_length, pad_id).loss_mask  # this CP rank's shard


def microbatches(pairs: Sequence[Pair], *, seq_length: int, micro_batch: int, pad_id: int = 0,
                 varlen: bool = False) -> list[dict]:
    """Microbatches of `micro_batch` pairs: {"batch": 2n rows (completion loss mask), "full": prompt+completion mask}."""
    out = []
    for group in chunks(list(pairs), micro_batch):
        batch = pair_batch(group, seq_length, pad_id, varlen=varlen)
        out.append({"batch": batch, "full": _full_mask(group, seq_length, pad_id).to(batch.loss_mask.device)})
    return out


def _mean_logps(token_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean over the whole sequence (the shards of a context-parallel group added)."""
    return row_sums(token_lp, mask) / cp_sum(mask.sum(-1)).clamp(min=1.0)


def loss_from_logps(token_lp: torch.Tensor, mask: torch.Tensor, full: torch.Tensor, *, beta: float):
    """ORPO on [2n, s] token log-probs (chosen rows first): TRL's loss and metrics (the loss as this
    context-parallel rank's share: common.cp_share)."""
    n = token_lp.shape[0] // 2
    means = _mean_logps(token_lp, mask)
    nll = -cp_sum((token_lp[:n] * full[:n]).sum()) / cp_sum(full[:n].sum()).clamp(min=1.0)
    value, metrics = objective.orpo_loss(means[:n], means[n:], nll, beta=beta)
    return cp_share(value), metrics


def make_forward(*, beta: float):
    if beta <= 0:
        raise AlignError(f"orpo beta must be positive (got {beta})")

    return logprob_forward(lambda mb, token_logps: loss_from_logps(token_logps, mb["batch"].loss_mask, mb["full"],
                                                                   beta=beta), reports=REPORTS)


@torch.no_grad()
def preference_accuracy(chunk, pairs: Sequence[Pair], *, seq_length: int, micro_batch: int = 32, beta: float = 0.1,
                        pad_id: int = 0, varlen: bool = False) -> dict[str, float]:
    """Held-out pairs: `reward_accuracy` = P[mean log pi(y_w) > mean log pi(y_l)] (ORPO's implicit reward is
    beta x the per-token mean log-prob; ties count 1/2), `reward_margin` (beta x the mean difference),
    `likelihood_accuracy` on summed log-probs (as DPO's), and `nll` of the chosen rows (prompt + completion)."""
    chunk.eval()
    groups = list(chunks(list(pairs), micro_batch))
    batches = [pair_batch(group, seq_length, pad_id, varlen=varlen) for group in groups]
    full_of = {id(b): _full_mask(g, seq_length, pad_id) for b, g in zip(batches, groups)}

    def per_pair(batch, out):  # (per-token means, sums, nll sum and tokens of the chosen rows), on the host
        lp, n = -out.float(), out.shape[0] // 2
        full = full_of[id(batch)].to(lp.device)
        nll = cp_sum(torch.stack([-(lp[:n] * full[:n]).sum(), full[:n].sum()]))
        return _mean_logps(lp, batch.loss_mask).cpu(), row_sums(lp, batch.loss_mask).cpu(), nll.cpu()

    wins = like_wins = margin = nll_sum = nll_tokens = 0.0
    # a forward-only schedule (common.forward_only): any pipeline layout, every rank gets the values
    for group, (means, sums, nll) in zip(groups, forward_only(chunk, [(b, {"labels": b.labels}) for b in batches],
                                                              per_pair, everywhere=True)):
        n = len(group)
        d = means[:n] - means[n:]
        wins += float((d > 0).float().sum() + 0.5 * (d == 0).float().sum())
        like_wins += float((sums[:n] > sums[n:]).float().sum() + 0.5 * (sums[:n] == sums[n:]).float().sum())
        margin += float(beta * d.sum())
        nll_sum += float(nll[0])
        nll_tokens += float(nll[1])
    count = max(len(pairs), 1)
    return {"reward_accuracy": wins / count, "reward_margin": margin / count, "likelihood_accuracy": like_wins / count,
            "nll": nll_sum / max(nll_tokens, 1.0)}
