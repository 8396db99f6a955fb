"""PPO: GAE maths, and the mean reward rising against a known rule (fraction of a target token)."""

from __future__ import annotations

import torch

from align_helpers import EOD, INSTR, LETTERS, SEP, clone_model, llama_spec, stage_settings

TARGET = 42


def test_gae_matches_hand_computation():
    from nemoc.runtime.align.ppo import gae

    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 0.2, 0.4, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d3 = 2.0 - 0.4
    d2 = 0.0 + 0.9 * 0.4 - 0.2
    d1 = 1.0 + 0.9 * 0.2 - 0.5
    a3, a2 = d3, d2 + 0.45 * d3
    a1 = d1 + 0.45 * a2
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.2, a3 + 0.4, 0.0]]))


def test_ppo_raises_mean_reward(mcore):
    from nemoc.runtime.align import ppo, trainer

    spec = llama_spec(seq_length=12)
    mcore.seed_all(11)
    actor = mcore.build_gpt(spec, mcore.single_layout())
    reference = ppo.reference_logprobs(clone_model(mcore, spec, actor))
    critic = mcore.build_gpt(spec, mcore.single_layout(), scalar_head=True)
    scorer = ppo.FunctionScorer(lambda prompt, response: sum(t == TARGET for t in response) / max(len(response), 1))
    cfg = ppo.PPOConfig(max_new_tokens=6, kl_coef=0.01, ppo_epochs=2)
    iterations = 25
    layout = mcore.single_layout(global_batch=16, micro_batch=16)
    actor_tr = trainer.Trainer(actor, layout=layout, **stage_settings(steps=iterations * 2, lr=3e-3))
    critic_tr = trainer.Trainer(critic, layout=layout, **stage_settings(steps=iterations * 2, lr=3e-3))
    gen = torch.Generator().manual_seed(0)
    prompts = [[INSTR, a, SEP] for a in LETTERS]
    history = []
    for it in range(iterations):
        batch = [prompts[(it * 16 + i) % len(prompts)] for i in range(16)]
        history.append(ppo.iteration(actor_trainer=actor_tr, critic_trainer=critic_tr, actor=actor, critic=critic,
                                     reference=reference, scorer=scorer, prompts=batch, seq_length=12,
                                     vocab=spec.vocab, eod=EOD, cfg=cfg, micro_batch=16, generator=gen))
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    print(f"PPO mean reward {first:.3f} -> {last:.3f}; KL {history[0]['kl']:.3f} -> {history[-1]['kl']:.3f}; "
          f"entropy {history[0]['entropy']:.2f} -> {history[-1]['entropy']:.2f}")
    assert first < 0.1  # a random policy emits the target about 1/50 of the time
    assert last > 0.4 and last > 4 * first
    assert history[-1]["kl"] > 0  # the policy moved away from the reference
    assert history[-1]["entropy"] < history[0]["entropy"]
