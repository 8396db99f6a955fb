"""GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1) as TRL's GRPOTrainer computes it.

Input:  per completion token log-probs [B, T] of the policy (with grad), of the policy that sampled the
        completions (`old`, none when each batch is used for one step: then old = policy.detach()), of
        the reference (for the KL term); the completion mask [B, T]; one scalar reward per completion,
        B = prompts * num_generations with a prompt's completions contiguous.
Output: `group_advantages` -> [B]; `grpo_loss` -> (loss, metrics).
Invariants (equal to trl.GRPOTrainer._compute_loss, TRL 1.16, importance_sampling_level = "token"):
  advantage  A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)   (std with Bessel's correction;
             scale_rewards = "batch": the batch std; "none": not divided)
  ratio      rho_t = exp(logp_t - old_t);  per-token loss -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A)
  KL         k3 estimator (Schulman 2020, "Approximating KL divergence"):
             exp(ref_t - logp_t) - (ref_t - logp_t) - 1, added as beta * KL_t to every token's loss
  aggregate  "grpo":    mean over sequences of the per-sequence token mean
             "bnpo":    token mean over the batch
             "dr_grpo": token sum / (B * max_completion_length)       (Liu et al. 2025, Dr. GRPO)
             "dapo":    token sum / number of completion tokens of the whole generation batch (Yu et al. 2025)
  clip_fraction (TRL's clip_ratio/region_mean): the fraction of completion tokens whose gradient the clip
             removes: rho < 1-eps_low with A < 0, or rho > 1+eps_high with A > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass(frozen=True)
class GRPOConfig:
    """The GRPO stage's parameters (TRL's names and defaults where TRL has them)."""

    num_generations: int = 4
    beta: float = 0.04          # KL coefficient (TRL's default is 0.0: no reference model)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO's asymmetric clip; None = epsilon
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    max_new_tokens: int = 32
    temperature: float = 1.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo loss_type {self.loss_type!r}; expected {' | '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"grpo scale_rewards {self.scale_rewards!r}; expected {' | '.join(SCALE_REWARDS)}")
        if self.num_generations < 2:
            raise ValueError(f"grpo num_generations must be at least 2 (got {self.num_generations}): "
                             "a group of one has no baseline")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_up(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def _std(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Standard deviation with Bessel's correction (TRL's nanstd on NaN-free input)."""
    return x.std(dim=dim, unbiased=True) if x.numel() > 1 else torch.zeros(())


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """[B] rewards, B = groups * num_generations (a group contiguous) -> [B] advantages."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {num_generations}")
    grouped = rewards.float().view(-1, num_generations)
    mean = grouped.mean(1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = _std(rewards.float()).expand_as(rewards)
    else:
        std = grouped.std(1, unbiased=True).repeat_interleave(num_generations)
    advantages = rewards.float() - mean
    return advantages if scale_rewards == "none" else advantages / (std + 1e-4)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, *, old_logps=None,
              ref_logps=None, beta: float = 0.04, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              loss_type: str = "grpo", max_completion_length: int | None = None,
              num_items_in_batch: float | None = None, seq_sum=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one microbatch (see the module docstring). `num_items_in_batch` (dapo): the
    completion tokens of the whole generation batch across ranks (default: this microbatch's).
    `seq_sum`: completes a sum over this tensor's tokens to the sum over the whole rows, when the [B, T]
    tensors hold a shard of every row (context parallelism: runtime/align/common.py `cp_sum`, summed over
    the CP group, differentiable); every token sum and count goes through it. Default: the identity."""
    total = seq_sum or (lambda x: x)
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    tokens = total(mask.sum()).clamp(min=1.0)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo with beta != 0 needs the reference log-probs")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = (total((kl * mask).sum().detach()) / tokens).detach()
    if loss_type == "grpo":
        loss = (total((per_token * mask).sum(-1)) / total(mask.sum(-1)).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = total((per_token * mask).sum()) / tokens
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = total((per_token * mask).sum()) / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = total((per_token * mask).sum()) / (tokens if num_items_in_batch is None
                                                  else max(float(num_items_in_batch), 1.0))
    else:
        raise ValueError(f"grpo loss_type {loss_type!r}; expected {' | '.join(LOSS_TYPES)}")
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
    metrics.update(
        loss=loss.detach().clone(),
        clip_ratio_low=total((low * mask).sum()) / tokens,
        clip_ratio_high=total((high * mask).sum()) / tokens,
        clip_fraction=total((torch.maximum(low, high) * mask).sum()) / tokens,
        completion_length=total(mask.sum(-1)).mean(),
    )
    return loss, metrics


def clip_fraction(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, epsilon_low: float,
                  epsilon_high: float | None = None) -> torch.Tensor:
    """TRL's clip fraction for any clipped-surrogate loss (PPO included): the share of masked tokens where
    the clipped term is the minimum, so the token's gradient is zero. `|rho - 1| > eps` alone over-counts:
    rho > 1+eps with a negative advantage is *not* clipped by min(rho A, clip(rho) A)."""
    eh = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    hit = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + eh) & (adv > 0))
    mask = mask.to(torch.float32)
    return (hit.float() * mask).sum() / mask.sum().clamp(min=1.0)
