"""KTO stage (Ethayarajh et al. 2024): desirable / undesirable completions scored against a reference.

Input:  examples (prompt ids, completion ids, desirable?) from `unpaired` records, or from `preference`
        pairs split as TRL's `unpair_preference_dataset` does (chosen -> desirable, rejected ->
        undesirable, same prompt); the policy chunk; the reference (a frozen copy of the parent, or the
        policy with its LoRA adapters off); beta, the class weights, the loss (kto | apo_zero_unpaired).
Output: per step `loss`, `kl` (z0), `reward_chosen` / `reward_rejected` / `reward_margin` (beta x (log pi -
        log ref) summed over completion tokens, class means, as TRL logs them); held-out `reward_margin`
        and `reward_auc` (P[r(desirable) > r(undesirable)] over the held-out examples, ties 1/2: exactly
        0.5 before training, when policy = reference), and for paired data `reward_accuracy` on the
        held-out pairs.
Invariants: the KL baseline z0 uses TRL's mismatched pairs (example i's prompt with example i+1's
        completion, within this DP rank's share of the step), scored by the policy without gradient and by
        the reference, averaged over the share and over data-parallel ranks before the clamp at 0
        (`objectives.kto.kl_baseline`): one z0 per step, as TRL computes one per batch. The loss is
        `objectives.kto.kto_loss`, equal to TRL's (tests/runtime/learning/test_objectives_trl.py).
        A pair's two halves land on the same side of the held-out split (records are split before they
        are unpaired).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from nemoc.runtime.align import stage
from nemoc.runtime.align.common import (AlignError, Batch, cp_share, forward_only, logprob_forward, make_batch,
                                        row_sums)
from nemoc.runtime.align.data import read_preferences, read_unpaired, template_for, unpair
from nemoc.runtime.align.trainer import chunks
from nemoc.runtime.objectives import kto as objective

FORMATS = ("unpaired", "preference")
REPORTS = ("loss", "kl", "reward_chosen", "reward_rejected", "reward_margin")  # make_forward's, averaged by the loop


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    completion: list[int]
    desirable: bool
    pair: int | None = None  # the index of the preference pair it came from (held-out pair accuracy)


def resident_models(params, peft) -> list[str]:
    """What `run_kto` holds: the policy and a frozen reference, or the policy alone under LoRA (its
    adapters switched off give the reference)."""
    return ["policy"] if peft is not None else ["policy", "reference"]


def _row(prompt: list[int], completion: list[int], seq_length: int) -> tuple[list[int], list[int]]:
    ids = (prompt + completion)[: seq_length + 1]
    return ids, ([0] * len(prompt) + [1] * len(completion))[: seq_length + 1]


def rows_batch(pairs: Sequence[tuple[list[int], list[int]]], seq_length: int, pad_id: int = 0, *,
               varlen: bool = False) -> Batch:
    """One row per (prompt, completion); `varlen`: attended as variable-length segments (common.pack_rows)."""
    rows = [_row(p, c, seq_length) for p, c in pairs]
    for _, w in rows:
        if sum(w[1:]) == 0:
            raise AlignError(f"a KTO example's prompt fills seq_length={seq_length}: no completion token is left")
    return make_batch(rows, seq_length, pad_id, varlen=varlen)


def sums(model, batches: Sequence[Batch], *, everywhere: bool = True) -> list[torch.Tensor | None]:
    """[b] summed completion log-probs per batch, through a forward-only schedule (common.forward_only:
    any pipeline layout; with `everywhere` every rank gets them, else only the last pipeline stage)."""
    out = forward_only(model, [(b, {"labels": b.labels}) for b in batches],
                       lambda b, o: row_sums(-o.float(), b.loss_mask).cpu(), everywhere=everywhere)
    return [x.to(b.tokens.device) if x is not None else None for x, b in zip(out, batches)]


class Reference:
    """Reference sequence sums: a frozen model, or the policy with its LoRA adapters off."""

    def __init__(self, *, model=None, policy=None):
        self.model, self.policy = model, policy

    @torch.no_grad()
    def __call__(self, batches: Sequence[Batch], *, everywhere: bool = True) -> list[torch.Tensor | None]:
        if self.model is not None:
            self.model.eval()
            return sums(self.model, batches, everywhere=everywhere)
        from nemoc.runtime.align import lora

        was_training = self.policy.training
        self.policy.eval()
        with lora.disabled(self.policy):
            out = sums(self.policy, batches, everywhere=everywhere)
        self.policy.train(was_training)
        return out


def _dp_mean(x: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_data_parallel_world_size() > 1:
        x = x.clone()
        torch.distributed.all_reduce(x, group=parallel_state.get_data_parallel_group())
        x /= parallel_state.get_data_parallel_world_size()
    return x


@torch.no_grad()
def microbatches(share: Sequence[Example], *, policy, reference: Reference, seq_length: int, micro_batch: int,
                 loss: str = "kto", pad_id: int = 0, varlen: bool = False) -> list[dict]:
    """This rank's share of a step -> microbatches {"batch", "ref", "desirable", "z0"}; z0 (one per step)
    from the mismatched pairs of the whole share, averaged over DP ranks. Made before the step's schedule
    runs (trainer.StepBatches), every pass forward-only, so every pipeline rank calls it alike."""
    share = list(share)
    z0 = None
    if loss == "kto":
        kl_pairs = [(e.prompt, share[j].completion) for e, j in zip(share, objective.mismatched(list(range(len(share)))))]
        kl_batches = [rows_batch(group, seq_length, pad_id, varlen=varlen) for group in chunks(kl_pairs, micro_batch)]
        was_training = policy.training
        policy.eval()
        kl = sums(policy, kl_batches)
        policy.train(was_training)
        ref_kl = reference(kl_batches)
        z0 = objective.kl_baseline(torch.cat(kl), torch.cat(ref_kl), reduce=_dp_mean)
    groups = list(chunks(share, micro_batch))
    batches = [rows_batch([(e.prompt, e.completion) for e in group], seq_length, pad_id, varlen=varlen)
               for group in groups]
    refs = reference(batches, everywhere=False)  # the loss runs on the last pipeline stage only
    return [{"batch": batch, "ref": ref, "z0": z0,
             "desirable": torch.tensor([e.desirable for e in group], device=batch.tokens.device)}
            for group, batch, ref in zip(groups, batches, refs)]


def make_forward(*, beta: float, loss: str = "kto", desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    if loss not in objective.LOSS_TYPES:
        raise AlignError(f"kto loss {loss!r}; expected {' | '.join(objective.LOSS_TYPES)}")

    def loss_of(mb, token_logps):
        policy = row_sums(token_logps, mb["batch"].loss_mask)  # the CP group's shards added
        value, metrics = objective.kto_loss(policy, mb["ref"], mb["desirable"], kl=mb["z0"], beta=beta,
                                            desirable_weight=desirable_weight,
                                            undesirable_weight=undesirable_weight, loss_type=loss)
        # a class absent from this micro-batch reports no mean reward: the core's loop averages each
        # report over the micro-batches that have it ([sum, count], core.loop._report_sums)
        return cp_share(value), metrics

    return logprob_forward(loss_of, reports=REPORTS)


@torch.no_grad()
def held_out_metrics(policy, reference: Reference, examples: Sequence[Example], *, seq_length: int, beta: float,
                     micro_batch: int = 32, pad_id: int = 0, varlen: bool = False) -> dict[str, float]:
    """Implicit rewards r = beta (log pi - log ref) of the held-out examples: the desirable-minus-undesirable
    mean (`reward_margin`), `reward_auc` over every (desirable, undesirable) couple, and for examples
    that came from pairs `reward_accuracy` = P[r(chosen) > r(rejected)] per pair (ties count 1/2)."""
    policy.eval()
    batches = [rows_batch([(e.prompt, e.completion) for e in group], seq_length, pad_id, varlen=varlen)
               for group in chunks(list(examples), micro_batch)]
    pi, ref = sums(policy, batches), reference(batches)
    r = (beta * (torch.cat(pi) - torch.cat(ref))).float().cpu()
    good = torch.tensor([e.desirable for e in examples])
    out: dict[str, float] = {}
    if good.any() and (~good).any():
        d, u = r[good], r[~good]
        out["reward_margin"] = float(d.mean() - u.mean())
        diff = d[:, None] - u[None, :]
        out["reward_auc"] = float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
    pairs: dict[int, dict[bool, float]] = {}
    for e, value in zip(examples, r.tolist()):
        if e.pair is not None:
            pairs.setdefault(e.pair, {})[e.desirable] = value
    both = [v for v in pairs.values() if len(v) == 2]
    if both:
        out["reward_accuracy"] = sum(1.0 if v[True] > v[False] else 0.5 if v[True] == v[False] else 0.0
                                     for v in both) / len(both)
    return out


def examples_of(task, tok) -> tuple[list[Example], list[Example]]:
    """(train, held out) examples of every unpaired / preference data set of the stage; records are split
    first (the dataset's validation fraction, seeded), so a pair is never half trained on. Tokenized once
    for all ranks (stage.tokenized_once: rank 0 writes the cache, the others read it)."""
    template = template_for(task.params, task.tokenizer)

    def build():
        pair_index = 0
        for entry in stage.raw_datasets(task, FORMATS):
            paired = entry["format"] == "preference"
            records = read_preferences(entry["path"]) if paired else read_unpaired(entry["path"])
            t, v = stage.split_held_out(records, stage.validation_fraction(entry), task.stage.seed)
            for split, recs in (("train", t), ("val", v)):
                for rec in recs:
                    pair = pair_index if paired else None
                    pair_index += paired
                    for u in (unpair([rec]) if paired else [rec]):
                        yield {"split": split, "prompt": template.prompt_ids(tok, u.prompt),
                               "completion": template.reply_ids(tok, u.completion, u.prompt),
                               "desirable": u.desirable, "pair": pair}

    rows = stage.tokenized_once(task, "kto", template, build, FORMATS)
    out = {split: [Example(r["prompt"], r["completion"], r["desirable"], r["pair"])
                   for r in rows if r["split"] == split] for split in ("train", "val")}
    return out["train"], out["val"]


def weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """TRL's KTOTrainer check (Ethayarajh et al. 2024, eq. 8): with unbalanced classes, lambda_D n_D /
    (lambda_U n_U) should lie in [1, 4/3]; the advice when neither weight is in its range, else None."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    if n_d == n_u:
        return None
    d_lo, d_hi = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_lo <= desirable_weight <= d_hi or u_lo <= undesirable_weight <= u_hi:
        return None
    return (f"{n_d} desirable / {n_u} undesirable training examples with desirable_weight {desirable_weight:g}, "
            f"undesirable_weight {undesirable_weight:g}: set EITHER desirable_weight in [{d_lo}, {d_hi}] OR "
            f"undesirable_weight in [{u_lo}, {u_hi}] (Ethayarajh et al. 2024, eq. 8; TRL's advice)")
