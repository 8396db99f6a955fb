"""KTO (Ethayarajh et al. 2024, eq. 7) as TRL's KTOTrainer computes it.

Input:  per-example sequence log-probs (sum over completion tokens) of the policy and the reference for
        desirable (chosen) and undesirable (rejected) examples, and the KL baseline's log-probs: the policy
        and reference on *mismatched* pairs (prompt i with completion i+1 of the batch, TRL's KL dataset).
Output: (loss, metrics): loss = mean over all examples of
          desirable:    w_d * (1 - sigmoid(beta * ((logp - ref) - z0)))
          undesirable:  w_u * (1 - sigmoid(beta * (z0 - (logp - ref))))
        with z0 = max(0, mean(kl_logps - ref_kl_logps)), detached (no gradient through the baseline; TRL
        averages it over data-parallel ranks before the clamp: pass `reduce` to do the same).
        `loss_type = "apo_zero_unpaired"` drops z0 (D'Oosterlinck et al. 2024).
Invariants: equal to trl.KTOTrainer._compute_loss (TRL 1.16); rewards = beta * (logp - ref), their
        means per class and `reward_margin` = mean desirable - mean undesirable reward, as TRL logs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_baseline(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """z0 = max(0, mean(policy - reference) on the mismatched pairs), no gradient."""
    kl = (kl_logps - ref_kl_logps).mean().detach()
    if reduce is not None:
        kl = reduce(kl)
    return kl.clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, *, kl: torch.Tensor | None,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logps / ref_logps: [B] sequence sums; desirable: [B] bool; kl: z0 from `kl_baseline` (kto only)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"kto loss_type {loss_type!r}; expected {' | '.join(LOSS_TYPES)}")
    desirable = desirable.to(torch.bool)
    z0 = torch.zeros((), device=logps.device) if loss_type != "kto" or kl is None else kl
    ratio = logps - ref_logps
    chosen, rejected = ratio[desirable], ratio[~desirable]
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen - z0))
        rejected_losses = 1 - F.sigmoid(beta * (z0 - rejected))
    else:
        chosen_losses = 1 - F.sigmoid(beta * chosen)
        rejected_losses = F.sigmoid(beta * rejected)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    loss = losses.nanmean()
    r_c, r_r = beta * chosen.detach(), beta * rejected.detach()
    metrics = {"loss": loss.detach().clone(), "kl": z0.detach().reshape(())}
    if r_c.numel():
        metrics["reward_chosen"] = r_c.mean()
    if r_r.numel():
        metrics["reward_rejected"] = r_r.mean()
    if r_c.numel() and r_r.numel():
        metrics["reward_margin"] = r_c.mean() - r_r.mean()
    return loss, metrics


def mismatched(indices: list[int]) -> list[int]:
    """TRL's KL pairs: example i's prompt with the completion of example (i + 1) mod n of the batch."""
    n = len(indices)
    return [indices[(i + 1) % n] for i in range(n)]
