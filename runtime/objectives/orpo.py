"""ORPO (Hong et al. 2024, eqs. 4-7) as TRL's ORPOTrainer computes it.

Input:  per-token *mean* log-probs of the chosen and rejected completions under the policy ([n] each),
        and the SFT negative log-likelihood of the chosen sequences (a scalar; TRL takes the token mean
        over the chosen prompt *and* completion).
Output: (loss, metrics) with
          log_odds = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr)))
          loss     = nll - mean(beta * log sigmoid(log_odds))
        (no reference model). Rewards beta * mean log-probs, as TRL logs them.
Invariants: equal to trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics (TRL 1.16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: branch at -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    return (c - r) - (log1mexp(c) - log1mexp(r))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, nll: torch.Tensor, *,
              beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    log_odds = odds_ratio(chosen_mean_logps, rejected_mean_logps)
    ratio = F.logsigmoid(log_odds)
    loss = nll - (beta * ratio).mean()
    r_c, r_r = beta * chosen_mean_logps.detach().float(), beta * rejected_mean_logps.detach().float()
    return loss, {
        "loss": loss.detach().clone(),
        "nll_loss": nll.detach().clone(),
        "log_odds_ratio": ratio.mean().detach(),
        "log_odds_chosen": log_odds.mean().detach(),
        "reward_chosen": r_c.mean(),
        "reward_rejected": r_r.mean(),
        "reward_accuracy": (r_c > r_r).float().mean(),
        "reward_margin": (r_c - r_r).mean(),
    }
