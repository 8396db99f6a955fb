"""Learning signal: each objective, minimised with Adam on a tiny GPTModel, moves the policy the right way.

GRPO samples with the KV-cached generator and is rewarded by a rule (the share of a target token in the
completion); KTO and ORPO see fixed desirable / undesirable completions.
"""

from __future__ import annotations

import torch
from align_helpers import llama_spec

from nemoc.runtime import generation
from nemoc.runtime.objectives import grpo, kto, orpo

TARGET, AVOID = 7, 9


def _policy(mcore, seed=0):
    torch.manual_seed(seed)
    chunk = mcore.build_gpt(llama_spec(), mcore.single_layout(), seq_length=32)
    return chunk, torch.optim.Adam([p for p in chunk.parameters() if p.requires_grad], lr=1e-2)


def _token_logps(mcore, chunk, rows, seq_length=16):
    batch = mcore.make_batch(rows, seq_length)
    mcore.unwrap(chunk).train()
    return -chunk(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels).float(), batch.loss_mask


def _rows(prompts, completions):
    return [(p + c, [0] * len(p) + [1] * len(c)) for p, c in zip(prompts, completions)]


def test_grpo_raises_the_verifier_reward(mcore):
    chunk, opt = _policy(mcore)
    prompts = [[1, 2, 3], [4, 5, 6], [10, 11, 12], [13, 14, 15]]
    groups = 4
    gen = torch.Generator().manual_seed(0)
    rewards_seen = []
    for _ in range(20):
        batch_prompts = [p for p in prompts for _ in range(groups)]
        out = generation.generate(chunk, batch_prompts, max_new_tokens=6, vocab=50, eod=-1, seq_length=32,
                                  temperature=1.0, generator=gen)
        rewards = torch.tensor([c.count(TARGET) / len(c) for c in out.tokens])
        rewards_seen.append(float(rewards.mean()))
        adv = grpo.group_advantages(rewards, groups)
        logps, mask = _token_logps(mcore, chunk, _rows(batch_prompts, out.tokens))
        loss, metrics = grpo.grpo_loss(logps, mask, adv, beta=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(rewards_seen[:3]) / 3 < 0.1  # about 1/50 for the untrained policy
    assert sum(rewards_seen[-3:]) / 3 > 0.4, rewards_seen


def test_kto_raises_desirable_and_lowers_undesirable_completions(mcore):
    chunk, opt = _policy(mcore, seed=1)
    reference, _ = _policy(mcore, seed=5)
    reference.load_state_dict(chunk.state_dict())
    prompts = [[1, 2], [3, 4], [5, 6], [10, 11]] * 2
    completions = [[TARGET, 20, TARGET]] * 4 + [[AVOID, 21, AVOID]] * 4
    desirable = torch.tensor([True] * 4 + [False] * 4)
    rows = _rows(prompts, completions)
    kl_rows = _rows(prompts, [completions[i] for i in kto.mismatched(list(range(8)))])
    with torch.no_grad():
        ref_lp, mask = _token_logps(mcore, reference, rows)
        ref_sums = (ref_lp * mask).sum(-1)
        ref_kl_lp, kl_mask = _token_logps(mcore, reference, kl_rows)
        ref_kl = (ref_kl_lp * kl_mask).sum(-1)
    margins = []
    for _ in range(15):
        with torch.no_grad():
            kl_lp, _ = _token_logps(mcore, chunk, kl_rows)
        z0 = kto.kl_baseline((kl_lp * kl_mask).sum(-1), ref_kl)
        lp, _ = _token_logps(mcore, chunk, rows)
        loss, metrics = kto.kto_loss((lp * mask).sum(-1), ref_sums, desirable, kl=z0, beta=0.1)
        margins.append(float(metrics["reward_margin"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert margins[0] == 0.0 and margins[-1] > 0.5, margins


def test_orpo_raises_the_odds_of_the_chosen_completion(mcore):
    chunk, opt = _policy(mcore, seed=2)
    prompts = [[1, 2], [3, 4], [5, 6], [10, 11]]
    chosen, rejected = [[TARGET, 20, TARGET]] * 4, [[AVOID, 21, AVOID]] * 4
    rows = _rows(prompts, chosen) + _rows(prompts, rejected)
    log_odds = []
    for _ in range(15):
        lp, mask = _token_logps(mcore, chunk, rows)
        mean = (lp * mask).sum(-1) / mask.sum(-1)
        nll = -(lp[:4] * mask[:4]).sum() / mask[:4].sum()
        loss, metrics = orpo.orpo_loss(mean[:4], mean[4:], nll, beta=0.1)
        log_odds.append(float(metrics["log_odds_chosen"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(log_odds[0]) < 0.5 and log_odds[-1] > 2.0, log_odds
