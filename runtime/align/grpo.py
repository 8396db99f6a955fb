"""GRPO stage (Shao et al. 2024, DeepSeekMath sec. 4.1): group sampling, group-normalised advantages, KL
to a reference, rewards from a verifier or a reward model.

Input:  prompts (with their reference answers: prompt_response `response`, preference `chosen`, a chat's
        last assistant turn), the policy chunk (from the first non-reward parent), the reward source
        (`reward = exact_match | contains | prefix`: `objectives.verifiers` on the detokenised
        completion against the reference; or the scalar-head model of the `reward` parent stage), the
        reference (a frozen copy of the parent, the policy with its LoRA adapters off, or none when
        beta = 0).
Output: per iteration `reward` (mean), `reward_std`, `loss`, `kl`, `clip_fraction` (TRL's
        clip_ratio/region_mean), `completion_length`, `entropy`; held-out `reward` of greedy completions
        before and after; the trained policy.
Invariants (one iteration, TRL 1.16 GRPOTrainer with num_iterations = `iterations`):
  1. this DP rank's share of `global_batch` prompts (a pure function of the iteration, so a resumed run
     sees what the uninterrupted one saw); each repeated `num_generations` times (a group is contiguous
     and never split across ranks); completions sampled with the KV-cached generator
     (`runtime/generation.py`, Megatron-Core's StaticInferenceContext) at `temperature`, from a CPU
     generator seeded by (seed, DP rank, iteration) and identical on TP peers;
  2. rewards -> `objectives.grpo.group_advantages` (scale_rewards group | batch | none);
  3. without gradient: the reference's per-token log-probs (beta != 0) and, when `iterations` > 1, the
     sampling policy's (the ratio's denominator; with one iteration old = policy.detach(), as TRL);
  4. `iterations` Megatron steps of `objectives.grpo.grpo_loss` (equal to TRL's to 1e-6) on the same
     completions.
Any pipeline layout: sampling decodes across the stages (runtime/generation.py), the log-probs of step 3
and a reward model's scores come from forward-only schedules broadcast from the last stage, the steps run
Megatron's 1F1B schedule, or the interleaved one over virtual-pipeline chunks; MoE policies too, with
experts split over ranks (tests/runtime/align/test_align_rl_pipeline.py: PP=2 and PP=2 VP=2 = one process,
EP=2 = EP=1 at DP=2).
Context parallelism: sampling decodes the whole rows on every CP rank (runtime/generation.py), the passes
of step 3 and the steps run on each rank's shard of the rows, every token sum of the loss over the group
(`grpo_loss(seq_sum=cp_sum)`, each rank's `cp_share`): CP=2 = one process (the same test).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from nemoc.runtime import generation
from nemoc.runtime.align import reward as reward_model
from nemoc.runtime.align import stage
from nemoc.runtime.align.common import AlignError, Batch, cp_share, cp_sum, make_batch, token_logprobs
from nemoc.runtime.align.data import read_prompts, template_for
from nemoc.runtime.align.trainer import chunks
from nemoc.runtime.objectives import grpo as objective
from nemoc.runtime.objectives import verifiers

FORMATS = ("prompt_response", "chat", "preference")


@dataclass(frozen=True)
class Query:
    prompt: list[int]
    reference: str | None


@dataclass(frozen=True)
class GRPOParams:
    """The stage's parameters (dsl.schema's grpo entry; TRL's names where TRL has them)."""

    num_generations: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    reward: str | None = None
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss: str = "grpo"
    scale_rewards: str = "group"
    iterations: int = 1

    @classmethod
    def from_params(cls, params) -> "GRPOParams":
        p = dict(params or {})
        cfg = cls(**{f: p[f] for f in cls.__dataclass_fields__ if f in p})
        if cfg.num_generations < 2:
            raise AlignError(f"grpo: num_generations = {cfg.num_generations}; a group needs at least 2 completions")
        if cfg.loss not in objective.LOSS_TYPES or cfg.scale_rewards not in objective.SCALE_REWARDS:
            raise AlignError(f"grpo: loss {cfg.loss!r} / scale_rewards {cfg.scale_rewards!r}; expected "
                             f"{' | '.join(objective.LOSS_TYPES)} / {' | '.join(objective.SCALE_REWARDS)}")
        if cfg.reward is not None:
            verifiers.verifier(cfg.reward)  # an unknown name fails before any model is built
        return cfg

    @property
    def epsilon_up(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def resident_models(params, peft) -> list[str]:
    """What `run_grpo` holds: the policy, a reference unless beta = 0 or LoRA (adapters off), and the
    reward model unless a verifier scores the completions."""
    cfg = GRPOParams.from_params(params)
    reference = [] if peft is not None or cfg.beta == 0 else ["reference"]
    return ["policy"] + reference + ([] if cfg.reward else ["reward"])


# ----------------------------------------------------------------------------------------- rewards


class VerifierReward:
    """A named rule on the detokenised completion (its stop ids, EOD and the template's end-of-turn token
    (data.stop_ids), and the template's `end` suffix stripped)."""

    def __init__(self, name: str, tokenizer, end: str, stop: Sequence[int] = ()):
        self.rule, self.tok, self.end = verifiers.verifier(name), tokenizer, end
        self.stop = {tokenizer.eod, *stop}

    def text(self, completion: Sequence[int]) -> str:
        ids = [t for t in completion if t not in self.stop]
        text = self.tok.detokenize(ids)
        return text[: -len(self.end)] if self.end and text.endswith(self.end) else text

    def __call__(self, queries: Sequence[Query], completions: Sequence[list[int]]) -> torch.Tensor:
        return torch.tensor([self.rule(self.text(c), q.reference) for q, c in zip(queries, completions)])


class ModelReward:
    """The reward model's score of prompt + completion (the head at the last real token)."""

    def __init__(self, model, seq_length: int, pad_id: int):
        self.model, self.seq, self.pad = model, seq_length, pad_id

    def __call__(self, queries: Sequence[Query], completions: Sequence[list[int]]) -> torch.Tensor:
        return reward_model.score(self.model, [q.prompt + c for q, c in zip(queries, completions)], self.seq,
                                  pad_id=self.pad).float().cpu()


# ------------------------------------------------------------------------------------- micro-batches


def completion_batch(queries: Sequence[Query], completions: Sequence[list[int]], seq_length: int, pad_id: int) -> Batch:
    rows = []
    for q, c in zip(queries, completions):
        ids = (q.prompt + c)[: seq_length + 1]
        rows.append((ids, ([0] * len(q.prompt) + [1] * len(c))[: seq_length + 1]))
    return make_batch(rows, seq_length, pad_id)


@torch.no_grad()
def _token_logps(model, batch: Batch, *, lora_disabled: bool = False) -> torch.Tensor:
    was_training = model.training
    model.eval()
    if lora_disabled:
        from nemoc.runtime.align import lora

        with lora.disabled(model):
            out = token_logprobs(model, batch)
    else:
        out = token_logprobs(model, batch)
    model.train(was_training)
    return out


def microbatches(queries: Sequence[Query], completions: Sequence[list[int]], advantages: torch.Tensor, *,
                 policy, reference, cfg: GRPOParams, seq_length: int, micro_batch: int, pad_id: int) -> list[dict]:
    """Rows of `micro_batch` completions: {"batch", "adv", "ref" (or None), "old" (or None)}; `reference`
    is a frozen model, "lora" (the policy with adapters off) or None."""
    out = []
    for idx in chunks(list(range(len(queries))), micro_batch):
        batch = completion_batch([queries[i] for i in idx], [completions[i] for i in idx], seq_length, pad_id)
        ref = None
        if cfg.beta != 0.0:
            ref = _token_logps(policy, batch, lora_disabled=True) if reference == "lora" else _token_logps(reference, batch)
        old = _token_logps(policy, batch) if cfg.iterations > 1 else None
        out.append({"batch": batch, "adv": advantages[idx].to(batch.tokens.device), "ref": ref, "old": old})
    tokens = sum(float(cp_sum(mb["batch"].loss_mask.sum())) for mb in out)  # whole rows under context parallelism
    for mb in out:  # dapo: the token sum over the rank's whole generation batch (Megatron divides by m again)
        mb["items"] = tokens / len(out)
    return out


def make_forward(cfg: GRPOParams, max_completion_length: int):
    def forward(model, mb):
        batch = mb["batch"]
        token_loss = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels)

        def loss_func(output):
            loss, metrics = objective.grpo_loss(
                -output.float(), batch.loss_mask, mb["adv"], old_logps=mb["old"], ref_logps=mb["ref"], beta=cfg.beta,
                epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_up, loss_type=cfg.loss,
                max_completion_length=max_completion_length, num_items_in_batch=mb["items"], seq_sum=cp_sum)
            metrics.pop("clip_ratio_low", None)
            metrics.pop("clip_ratio_high", None)
            if "kl" not in metrics:
                metrics["kl"] = torch.zeros((), device=loss.device)
            # context parallelism: the token sums are the CP group's (seq_sum), each rank returns its share
            return cp_share(loss), metrics

        return token_loss, loss_func

    return forward


# ------------------------------------------------------------------------------------------ the loop


def rollout(policy, queries: Sequence[Query], cfg: GRPOParams, *, vocab: int, eod: int | Sequence[int],
            seq_length: int, generator: torch.Generator | None, greedy: bool = False, repeat: int | None = None):
    """Each query repeated `repeat` (default num_generations) times, contiguous; -> (queries, completions,
    entropies) of the KV-cached generator; a completion ends at any id of `eod` (data.stop_ids)."""
    n = cfg.num_generations if repeat is None else repeat
    rows = [q for q in queries for _ in range(n)]
    out = generation.generate(policy, [q.prompt for q in rows], max_new_tokens=cfg.max_new_tokens, vocab=vocab, eod=eod,
                              seq_length=seq_length, greedy=greedy, temperature=cfg.temperature, generator=generator)
    return rows, out.tokens, out.entropies


@torch.no_grad()
def held_out_reward(policy, queries: Sequence[Query], score, cfg: GRPOParams, *, vocab: int,
                    eod: int | Sequence[int], seq_length: int, micro_batch: int = 32) -> dict[str, float]:
    """Mean reward of one greedy completion per held-out prompt (never trained on), and its mean length."""
    rewards, lengths = [], []
    for group in chunks(list(queries), micro_batch):
        rows, completions, _ = rollout(policy, group, cfg, vocab=vocab, eod=eod, seq_length=seq_length,
                                       generator=None, greedy=True, repeat=1)
        rewards.append(score(rows, completions))
        lengths += [len(c) for c in completions]
    return {"reward": float(torch.cat(rewards).float().mean()), "completion_length": sum(lengths) / max(len(lengths), 1)}


def iteration(tr, policy, reference, queries: Sequence[Query], score, cfg: GRPOParams, *, vocab: int,
              eod: int | Sequence[int], seq_length: int, micro_batch: int, pad_id: int,
              generator: torch.Generator) -> dict[str, float]:
    """Sample, score, normalise, then `iterations` optimizer steps; the iteration's metrics."""
    rows, completions, entropies = rollout(policy, queries, cfg, vocab=vocab, eod=eod, seq_length=seq_length,
                                           generator=generator)
    rewards = score(rows, completions).float()
    advantages = objective.group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
    mbs = microbatches(rows, completions, advantages, policy=policy, reference=reference, cfg=cfg,
                       seq_length=seq_length, micro_batch=micro_batch, pad_id=pad_id)
    forward = make_forward(cfg, cfg.max_new_tokens)
    steps = [tr.step(mbs, forward, seq_length=seq_length) for _ in range(cfg.iterations)]
    metrics = dict(steps[-1])
    metrics.update(reward=float(_dp_mean(rewards.mean())), reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
                   entropy=sum(entropies) / max(len(entropies), 1), first_loss=steps[0]["loss"])
    return metrics


def _dp_mean(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(()).to(torch.float32).clone()
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(x, group=parallel_state.get_data_parallel_group())
        x /= parallel_state.get_data_parallel_world_size()
    return x


def queries_of(task, tok) -> tuple[list[Query], list[Query]]:
    """(train, held out) prompts of the stage's data sets, split by each data set's validation fraction,
    tokenized once for all ranks (stage.tokenized_once)."""
    template = template_for(task.params, task.tokenizer)
    seq = task.stage.seq_length

    def build():
        for entry in stage.raw_datasets(task, FORMATS):
            records = read_prompts(entry["path"])
            t, v = stage.split_held_out(records, stage.validation_fraction(entry), task.stage.seed)
            for split, recs in (("train", t), ("val", v)):
                for r in recs:
                    yield {"split": split, "prompt": template.prompt_ids(tok, r.prompt), "reference": r.reference}

    rows = stage.tokenized_once(task, "grpo", template, build, FORMATS)
    train = [Query(r["prompt"], r["reference"]) for r in rows if r["split"] == "train" and len(r["prompt"]) + 1 < seq]
    val = [Query(r["prompt"], r["reference"]) for r in rows if r["split"] == "val" and len(r["prompt"]) + 1 < seq]
    if not train:
        raise AlignError(f"grpo: no prompt leaves room for a completion within seq_length={seq}")
    return train, val
