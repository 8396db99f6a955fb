"""RLHF with PPO (Schulman et al. 2017; Ouyang et al. 2022): actor, critic, reward model, reference.

Input:  prompts (token ids); an actor chunk (trained), a critic chunk (scalar head per token, trained),
        a scorer for whole sequences (the reward model, or any `(prompt, response) -> float`), and a
        frozen reference policy (a GPTModel, or the actor with its LoRA adapters off).
Output: per iteration: mean reward (score), KL to the reference, entropy of the sampling distribution,
        policy and value losses, clip fraction.
Invariants (one iteration):
  1. rollout: responses sampled from the actor with a KV cache (`runtime/generation.py`; temperature, up
     to `max_new_tokens`, stop at EOD) with logits gathered across TP ranks and the padded vocabulary rows
     masked out; every TP rank samples with the same generator, so the ranks agree on every token.
  2. experience: old log-probs (actor), reference log-probs, values (critic), per-token rewards
     r_t = -kl_coef * (log pi_old - log ref)_t, plus the sequence score on the last response token.
  3. GAE (gamma, lambda) over response tokens; advantages whitened over the batch.
  4. `ppo_epochs` passes: clipped surrogate -min(rho A, clip(rho, 1 +- eps) A) for the actor
     (`objectives.grpo.grpo_loss`: loss_type bnpo, beta 0, TRL's clip_fraction), and the clipped value
     loss 0.5 * max((V - R)^2, (V_clip - R)^2) for the critic, each a Megatron step.
Any pipeline layout: the rollout decodes across the stages (runtime/generation.py), the experience passes
are forward-only schedules whose last stage broadcasts its results (`common.forward_everywhere`, the reward
model's `reward.score`), so every rank computes the same advantages, and each step is Megatron's 1F1B
schedule over the micro-batches (`Trainer.step`), or its interleaved schedule over a rank's virtual-pipeline
chunks (the rollout then walks the chunks in the interleaved order); MoE models too, their rollouts kept in
step over an expert-parallel group; tests/runtime/align/test_align_rl_pipeline.py.
Context parallelism: the rollout decodes the whole rows on every CP rank (runtime/generation.py); the
experience passes and the steps run on each rank's shard of the rows (`make_batch`), the rewards and GAE
along whole rows gathered over the group (`cp_gather`, then `cp_shard` back), the losses' token sums over
the group (`cp_sum`, each rank's `cp_share`): one process's metrics at CP=2 (the same test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nemoc.runtime import generation
from nemoc.runtime.align.common import (AlignError, Batch, cp_gather, cp_shard, cp_share, cp_sum, forward_everywhere,
                                        make_batch, token_logprobs, unwrap)
from nemoc.runtime.align.reward import score as reward_score
from nemoc.runtime.align.reward import sequence_batch
from nemoc.runtime.objectives import grpo as objectives_grpo


@dataclass(frozen=True)
class PPOConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    kl_coef: float = 0.05
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 2

    @classmethod
    def from_params(cls, params) -> "PPOConfig":
        p = dict(params or {})
        known = {f: p[f] for f in cls.__dataclass_fields__ if f in p}
        cfg = cls(**known)
        if cfg.max_new_tokens <= 0 or cfg.temperature <= 0 or cfg.ppo_epochs <= 0:
            raise AlignError("ppo: max_new_tokens, temperature and ppo_epochs must be positive")
        return cfg


# ------------------------------------------------------------------------------------------ rollout


@torch.no_grad()
def generate(model, prompts: Sequence[list[int]], *, max_new_tokens: int, temperature: float, vocab: int,
             eod: int | Sequence[int], seq_length: int, generator: torch.Generator,
             greedy: bool = False) -> tuple[list[list[int]], list[float]]:
    """Sample a response per prompt (no KV cache: one full forward per new token, fine for short replies).
    Returns the responses (ending with a stop id of `eod` when one was sampled) and the mean entropy per response."""
    unwrap(model).eval()
    stops = {eod} if isinstance(eod, int) else set(eod)
    seqs = [list(p) for p in prompts]
    responses: list[list[int]] = [[] for _ in prompts]
    entropies: list[list[float]] = [[] for _ in prompts]
    live = [True] * len(prompts)
    for _ in range(max_new_tokens):
        rows = [i for i, alive in enumerate(live) if alive and len(seqs[i]) < seq_length]
        if not rows:
            break
        batch, last = sequence_batch([seqs[i] for i in rows], seq_length)
        logits = model(batch.tokens, batch.position_ids, batch.attention_mask, runtime_gather_output=True)
        logits = logits[torch.arange(len(rows), device=last.device), last, :vocab].float().cpu() / temperature
        probs = torch.softmax(logits, -1)  # sampled on the CPU with a CPU generator: identical on every TP rank
        entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1)
        nxt = probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator).squeeze(1)
        for j, i in enumerate(rows):
            token = int(nxt[j])
            seqs[i].append(token)
            responses[i].append(token)
            entropies[i].append(float(entropy[j]))
            if token in stops:
                live[i] = False
    return responses, [sum(e) / max(len(e), 1) for e in entropies]


# --------------------------------------------------------------------------------------- experience


def _rows(prompts, responses, seq_length):
    rows = []
    for p, r in zip(prompts, responses):
        ids = (p + r)[: seq_length + 1]
        rows.append((ids, ([0] * len(p) + [1] * len(r))[: seq_length + 1]))
    return rows


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) along the last dim over masked tokens."""
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], device=rewards.device)
    next_adv = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # outside the response (padding after it) nothing propagates; inside, carry to t-1
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(next_value))
        next_adv = torch.where(m > 0, a, torch.zeros_like(next_adv))
    return adv, (adv + values) * mask


@dataclass
class Experience:
    batch: Batch
    old_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@torch.no_grad()
def critic_values(critic, batch: Batch) -> torch.Tensor:
    unwrap(critic).eval()
    return forward_everywhere(critic, batch, lambda b, values: values.squeeze(-1).float())


@torch.no_grad()
def make_experience(*, actor, critic, reference: Callable[[Batch], torch.Tensor], scores: torch.Tensor,
                    prompts, responses, seq_length: int, cfg: PPOConfig) -> tuple[Experience, dict[str, float]]:
    batch = make_batch(_rows(prompts, responses, seq_length), seq_length)
    unwrap(actor).eval()
    # the passes run on this context-parallel rank's shard of the rows (the batch's); the rewards and the
    # GAE scan run along whole rows (`cp_gather`, identical on every CP rank), the loss on the shard again
    old_shard = token_logprobs(actor, batch) * batch.loss_mask
    ref_shard = reference(batch) * batch.loss_mask
    values_shard = critic_values(critic, batch) * batch.loss_mask
    mask, old, ref, values = (cp_gather(x) for x in (batch.loss_mask, old_shard, ref_shard, values_shard))
    kl = (old - ref) * mask
    rewards = -cfg.kl_coef * kl
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # each row's last response label
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(mask.device)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    n = mask.sum().clamp(min=1)
    mean = (advantages * mask).sum() / n
    std = (((advantages - mean) * mask) ** 2).sum().div(n).sqrt()
    advantages = (advantages - mean) / (std + 1e-8) * mask
    stats = {"reward": float(scores.mean()), "kl": float(kl.sum(-1).mean()),
             "response_length": float(mask.sum(-1).mean())}
    return Experience(batch, old_shard, values_shard, cp_shard(advantages), cp_shard(returns)), stats


# ----------------------------------------------------------------------------------- loss functions


def actor_forward(cfg: PPOConfig):
    def forward(model, exp: Experience):
        b = exp.batch
        out = model(b.tokens, b.position_ids, b.attention_mask, labels=b.labels)

        def loss_func(output):
            # the clipped surrogate, token mean over the microbatch, from the shared objective (GRPO's with
            # per-token GAE advantages, no KL term: PPO's KL is in the reward); its clip_fraction is TRL's:
            # tokens whose gradient the clip removes (rho < 1-eps with A < 0, rho > 1+eps with A > 0)
            # (context parallelism: token sums over the CP group's shards, each rank's share of the loss)
            loss, m = objectives_grpo.grpo_loss(-output.float(), b.loss_mask, exp.advantages,
                                                old_logps=exp.old_logprobs, beta=0.0, epsilon_low=cfg.clip,
                                                epsilon_high=cfg.clip, loss_type="bnpo", seq_sum=cp_sum)
            return cp_share(loss), {"policy_loss": loss.detach().clone(), "clip_fraction": m["clip_fraction"]}

        return out, loss_func

    return forward


def critic_forward(cfg: PPOConfig):
    def forward(model, exp: Experience):
        b = exp.batch
        out = model(b.tokens, b.position_ids, b.attention_mask)

        def loss_func(output):
            v = output.squeeze(-1).float()
            mask = b.loss_mask
            v_clip = exp.values + torch.clamp(v - exp.values, -cfg.value_clip, cfg.value_clip)
            loss_v = torch.max((v - exp.returns) ** 2, (v_clip - exp.returns) ** 2)
            loss = 0.5 * cp_sum((loss_v * mask).sum()) / cp_sum(mask.sum()).clamp(min=1)
            return cp_share(loss), {"value_loss": loss.detach().clone()}

        return out, loss_func

    return forward


# ------------------------------------------------------------------------------------------- scorers


class ModelScorer:
    """Scores (prompt, response) pairs with a reward model (scalar head at the last token)."""

    def __init__(self, model, seq_length: int):
        self.model, self.seq_length = model, seq_length

    def __call__(self, prompts, responses) -> torch.Tensor:
        return reward_score(self.model, [p + r for p, r in zip(prompts, responses)], self.seq_length)


class FunctionScorer:
    """Scores with a Python function of (prompt ids, response ids): for tests and rule-based rewards."""

    def __init__(self, fn: Callable[[list[int], list[int]], float]):
        self.fn = fn

    def __call__(self, prompts, responses) -> torch.Tensor:
        return torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses)])


def iteration(*, actor_trainer, critic_trainer, actor, critic, reference, scorer, prompts: Sequence[list[int]],
              seq_length: int, vocab: int, eod: int | Sequence[int], cfg: PPOConfig, micro_batch: int,
              generator: torch.Generator) -> dict[str, float]:
    """One PPO iteration on this rank's prompts: rollout, experience, `ppo_epochs` actor + critic steps."""
    # KV-cached (runtime/generation.py): the same tokens as `generate` above, which recomputes every prefix
    rollout = generation.generate(actor, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  vocab=vocab, eod=eod, seq_length=seq_length, generator=generator)
    responses, entropy = rollout.tokens, rollout.entropies
    scores = scorer(list(prompts), responses).float()
    stats = {"entropy": sum(entropy) / len(entropy)}
    exps = []
    for start in range(0, len(prompts), micro_batch):
        sl = slice(start, start + micro_batch)
        exp, s = make_experience(actor=actor, critic=critic, reference=reference, scores=scores[sl],
                                 prompts=list(prompts[sl]), responses=responses[sl], seq_length=seq_length, cfg=cfg)
        exps.append(exp)
        for k, v in s.items():
            stats[k] = stats.get(k, 0.0) + v * len(prompts[sl]) / len(prompts)
    stats = _dp_mean(stats)  # rollout statistics of every data-parallel rank's prompts
    for _ in range(cfg.ppo_epochs):
        stats.update(actor_trainer.step(exps, actor_forward(cfg), seq_length=seq_length))
        stats.update(critic_trainer.step(exps, critic_forward(cfg), seq_length=seq_length))
    stats.pop("lr", None)
    stats.pop("grad_norm", None)
    return stats


def _dp_mean(stats: dict[str, float]) -> dict[str, float]:
    from megatron.core import parallel_state

    from nemoc.runtime.align.common import device

    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return stats
    names = sorted(stats)
    values = torch.tensor([stats[n] for n in names], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return {n: float(v) / dp for n, v in zip(names, values)}


def reference_logprobs(model=None, *, actor=None, lora_disabled: bool = False):
    """Callable batch -> reference token log-probs [b, s]."""
    @torch.no_grad()
    def ref(batch: Batch) -> torch.Tensor:
        if lora_disabled:
            from nemoc.runtime.align import lora

            unwrap(actor).eval()
            with lora.disabled(actor):
                return token_logprobs(actor, batch)
        unwrap(model).eval()
        return token_logprobs(model, batch)

    return ref
