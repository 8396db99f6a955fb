"""DPO / IPO on sequence log-probs, with the rewards TRL logs (a drop-in for the preference step's loss).

Input:  [2n] sums of completion-token log-probs of the policy and the reference (chosen rows first), the
        [2n] completion lengths (IPO's per-token normalisation), beta, the loss.
Output: (loss, metrics). Losses, with h = (pi_w - pi_l) - (ref_w - ref_l) on sums:
          dpo: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     (Rafailov et al. 2023, eq. 7)
          ipo: (h' - 1 / (2 beta))^2 with h' on per-token *means*            (Azar et al. 2023, eq. 17)
Invariants: as trl.DPOTrainer: the logged rewards are beta * (log pi - log ref) on *sums* for both losses
        (IPO's loss is on means, its rewards/margin are not); reward_accuracy = mean[r_w > r_l].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo")


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor, *, beta: float,
                    loss: str = "dpo", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    n = policy.shape[0] // 2
    ratios = policy - reference
    chosen, rejected = ratios[:n], ratios[n:]
    if loss == "dpo":
        h = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss == "ipo":
        per_token = ratios / lengths.to(ratios.dtype).clamp(min=1.0)
        losses = (per_token[:n] - per_token[n:] - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r} ({' | '.join(LOSSES)})")
    r_c, r_r = beta * chosen.detach(), beta * rejected.detach()
    metrics = {"loss": losses.mean().detach(), "reward_accuracy": (r_c > r_r).float().mean(),
               "reward_margin": (r_c - r_r).mean(), "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean()}
    return losses.mean(), metrics
