"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023).

Input:  preference samples (prompt ids, chosen ids, rejected ids), a policy chunk, and the reference
        log-probabilities of every pair, from one of
          * a frozen reference model (a second GPTModel loaded from the same checkpoint), or
          * the policy itself with its LoRA adapters switched off (`lora.disabled`: no extra memory), or
          * `reference = "precomputed"`: computed once with the initial policy before the first step
            and stored, so only the policy stays resident while training, or
          * `reference_free = true`: no reference (log ref = 0).
Output: per-step loss, reward accuracy and margin; held-out preference accuracy.
Invariants: a microbatch holds the chosen rows then the rejected rows of the same pairs (so a pair is
never split across microbatches or DP ranks); sequence log-probs sum over the reply tokens only.

Losses, with h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x)):
  dpo: -log sigmoid(beta * h)                      (Rafailov et al. 2023, eq. 7)
  ipo: (h - 1 / (2 beta))^2 with per-token *mean* log-probs (Azar et al. 2023, eq. 17; as TRL does)
Implicit rewards r = beta * (log pi - log ref) on summed log-probs for both losses (as TRL logs them);
reward accuracy = mean[r_w > r_l], margin = mean[r_w - r_l]. The step's loss and metrics come from
`runtime/objectives/preference.py` (equal to TRL's DPOTrainer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemoc.runtime.align.common import (AlignError, Batch, cp_share, cp_sum, forward_only, logprob_forward, make_batch,
                                        row_sums)
from nemoc.runtime.align.trainer import chunks
from nemoc.runtime.objectives import preference as objectives_preference

LOSSES = ("dpo", "ipo")
REPORTS = ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")  # preference_loss's


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _row(prompt: list[int], reply: list[int], seq_length: int) -> tuple[list[int], list[int]]:
    ids = (prompt + reply)[: seq_length + 1]
    weights = ([0] * len(prompt) + [1] * len(reply))[: seq_length + 1]
    return ids, weights


def pair_batch(pairs: Sequence[Pair], seq_length: int, pad_id: int = 0, *, varlen: bool = False) -> Batch:
    """2n rows: the chosen replies of `pairs`, then their rejected replies (`varlen`: attended as
    variable-length segments, no [s, s] mask: common.pack_rows)."""
    rows = [_row(p.prompt, p.chosen, seq_length) for p in pairs] + [_row(p.prompt, p.rejected, seq_length) for p in pairs]
    for ids, w in rows:
        if sum(w[1:]) == 0:
            raise AlignError(f"a preference pair's prompt fills seq_length={seq_length}: no reply token is left")
    return make_batch(rows, seq_length, pad_id, varlen=varlen)


def sequence_scores(token_lp: torch.Tensor, mask: torch.Tensor, loss: str) -> torch.Tensor:
    """Sum (dpo) or mean (ipo) of reply-token log-probs per row (over the whole sequence: the shards of a
    context-parallel group added)."""
    total = row_sums(token_lp, mask)
    return total / cp_sum(mask.sum(-1)).clamp(min=1) if loss == "ipo" else total


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, *, beta: float, loss: str = "dpo",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy/reference: [2n] sequence scores (chosen first). Returns (mean loss, metrics)."""
    n = policy.shape[0] // 2
    pi_c, pi_r, ref_c, ref_r = policy[:n], policy[n:], reference[:n], reference[n:]
    h = (pi_c - pi_r) - (ref_c - ref_r)
    if loss == "dpo":
        # conservative DPO (label smoothing eps): (1-eps) * -logsig(beta h) + eps * -logsig(-beta h)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise AlignError(f"unknown preference loss {loss!r} ({' | '.join(LOSSES)})")
    r_c, r_r = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    metrics = {
        "loss": losses.mean().detach(),
        "reward_accuracy": (r_c > r_r).float().mean(),
        "reward_margin": (r_c - r_r).mean(),
        "reward_chosen": r_c.mean(),
        "reward_rejected": r_r.mean(),
    }
    return losses.mean(), metrics


class ReferenceScores:
    """Reference sequence scores for a microbatch: from a frozen model, a LoRA-disabled policy, or a table."""

    def __init__(self, *, model=None, policy=None, lora_disabled: bool = False, zero: bool = False, loss: str = "dpo"):
        self.model, self.policy, self.lora_disabled, self.zero, self.loss = model, policy, lora_disabled, zero, loss

    @torch.no_grad()
    def __call__(self, batch: Batch, *, everywhere: bool = False) -> torch.Tensor | None:
        """[2n] scores; under pipeline parallelism only the last stage has them (None elsewhere) unless
        `everywhere`. Every pipeline rank calls it alike (a forward-only schedule), outside a training step."""
        (scores,) = self.many([batch], everywhere=everywhere)
        return scores

    @torch.no_grad()
    def many(self, batches: Sequence[Batch], *, everywhere: bool = False) -> list:
        """The scores of each batch, in one forward-only schedule (a step's micro-batches together: the
        interleaved schedule takes micro-batches in groups of pp)."""
        if self.zero:  # reference-free DPO: log ref = 0 (a uniform reference)
            return [torch.zeros(b.tokens.shape[0], device=b.tokens.device) for b in batches]
        # sums for both losses: IPO's per-token means are taken inside objectives.preference (TRL logs rewards on sums)
        if self.lora_disabled:
            from nemoc.runtime.align import lora

            was_training = self.policy.training
            self.policy.eval()
            with lora.disabled(self.policy):
                scores = self._scores(self.policy, batches, everywhere)
            self.policy.train(was_training)
            return scores
        self.model.eval()
        return self._scores(self.model, batches, everywhere)

    def _scores(self, model, batches: Sequence[Batch], everywhere: bool) -> list:
        scores = forward_only(model, [(b, {"labels": b.labels}) for b in batches],
                              lambda b, out: sequence_scores(-out.float(), b.loss_mask, "dpo").cpu(),
                              everywhere=everywhere)
        return [s.to(b.tokens.device) if s is not None else None for s, b in zip(scores, batches)]


def precompute(reference: ReferenceScores, pairs: Sequence[Pair], seq_length: int, micro_batch: int,
               pad_id: int = 0, *, varlen: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Reference (chosen, rejected) scores for every pair index, computed once."""
    table = {}
    for start in range(0, len(pairs), micro_batch):
        group = pairs[start:start + micro_batch]
        scores = reference(pair_batch(group, seq_length, pad_id, varlen=varlen))
        n = len(group)
        for i in range(n):  # (None off the last pipeline stage, which alone computes the loss)
            table[start + i] = (scores[i], scores[n + i]) if scores is not None else None
    return table


def microbatches(indexed_pairs: Sequence[tuple[int, Pair]], *, seq_length: int, micro_batch: int,
                 reference: ReferenceScores | None, table: dict | None, pad_id: int = 0,
                 varlen: bool = False) -> list[dict]:
    """Microbatches of `micro_batch` pairs: {"batch": 2n rows, "ref": [2n] reference scores}."""
    groups = chunks(indexed_pairs, micro_batch)
    batches = [pair_batch([p for _, p in group], seq_length, pad_id, varlen=varlen) for group in groups]
    if table is not None:
        refs = [_from_table(table, [i for i, _ in group]) for group in groups]
    else:
        refs = reference.many(batches)
    return [{"batch": batch, "ref": ref} for batch, ref in zip(batches, refs)]


def _from_table(table: dict, indices: list[int]) -> torch.Tensor | None:
    rows = [table[i] for i in indices]
    if any(r is None for r in rows):
        return None  # not the last pipeline stage
    return torch.stack([r[0] for r in rows] + [r[1] for r in rows])


def make_forward(*, beta: float, loss: str, label_smoothing: float = 0.0):
    if loss not in LOSSES:
        raise AlignError(f"unknown preference loss {loss!r} ({' | '.join(LOSSES)})")
    if beta <= 0:
        raise AlignError(f"dpo beta must be positive (got {beta})")

    def loss_of(mb, token_logps):
        mask = mb["batch"].loss_mask
        sums = row_sums(token_logps, mask)  # whole-sequence sums under context parallelism
        # the shared objective (equal to TRL's DPOTrainer): IPO's loss on per-token means, the logged
        # rewards and margins on sums for both losses, as TRL logs them
        value, reports = objectives_preference.preference_loss(
            sums, mb["ref"].float(), cp_sum(mask.sum(-1)), beta=beta, loss=loss, label_smoothing=label_smoothing)
        return cp_share(value), reports

    return logprob_forward(loss_of, reports=REPORTS)


@torch.no_grad()
def preference_accuracy(chunk, pairs: Sequence[Pair], *, seq_length: int, micro_batch: int = 32,
                        reference: ReferenceScores | None = None, table: dict | None = None,
                        loss: str = "dpo", pad_id: int = 0, varlen: bool = False) -> dict[str, float]:
    """Held-out pairs: `likelihood_accuracy` = P[log pi(y_w) > log pi(y_l)] and, with a reference,
    `reward_accuracy` = P[r_w > r_l] (ties count 1/2, so an untrained policy scores exactly 0.5), with
    log-probs summed over the reply (the implicit reward TRL logs, for DPO and IPO alike)."""
    chunk.eval()
    batches = [pair_batch(list(pairs[start:start + micro_batch]), seq_length, pad_id, varlen=varlen)
               for start in range(0, len(pairs), micro_batch)]
    policy = forward_only(chunk, [(b, {"labels": b.labels}) for b in batches],
                          lambda b, out: sequence_scores(-out.float(), b.loss_mask, "dpo").cpu(), everywhere=True)  # sums, as the reference's
    wins, reward_wins, margin = 0.0, 0.0, 0.0
    for k, (batch, pi) in enumerate(zip(batches, policy)):
        start, n = k * micro_batch, pi.shape[0] // 2
        wins += float((pi[:n] > pi[n:]).float().sum() + 0.5 * (pi[:n] == pi[n:]).float().sum())
        if reference is not None or table is not None:
            if table is not None:
                ref = _from_table(table, list(range(start, start + n)))
                ref = _broadcast_from_last_stage(ref)
            else:
                ref = reference(batch, everywhere=True)
            ref = ref.cpu()
            d = (pi[:n] - ref[:n]) - (pi[n:] - ref[n:])
            reward_wins += float((d > 0).float().sum() + 0.5 * (d == 0).float().sum())
            margin += float(d.sum())
    result = {"likelihood_accuracy": wins / len(pairs)}
    if reference is not None or table is not None:
        result.update(reward_accuracy=reward_wins / len(pairs), log_ratio_margin=margin / len(pairs))
    return result


def _broadcast_from_last_stage(value):
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    box = [value.cpu() if value is not None else None]
    torch.distributed.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                            group=ps.get_pipeline_model_parallel_group())
    return box[0]
