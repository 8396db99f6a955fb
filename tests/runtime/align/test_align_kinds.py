"""The kto, orpo and grpo stages' step functions on Megatron's trainer: held-out metrics move on the tiny
CPU model (learning signal), and their data readers' errors name the file and line."""

from __future__ import annotations

import json

import pytest
import torch

from align_helpers import EOD, INSTR, LETTERS, SEP, llama_spec, mapping, preference_pairs, stage_settings


def _trainer(mcore, chunk, steps, lr, global_batch=16, micro_batch=8):
    from nemoc.runtime.align import trainer

    layout = mcore.single_layout(global_batch=global_batch, micro_batch=micro_batch)
    return trainer.Trainer(chunk, layout=layout, **stage_settings(steps=steps, lr=lr))


def test_orpo_raises_held_out_preference_accuracy(mcore):
    from nemoc.runtime.align import orpo, trainer

    f = mapping(2)
    train, held_out = preference_pairs(256, 1, f), preference_pairs(64, 2, f)
    mcore.seed_all(7)
    policy = mcore.build_gpt(llama_spec(seq_length=8), mcore.single_layout())
    before = orpo.preference_accuracy(policy, held_out, seq_length=8)
    steps = 40
    history = trainer.run_steps(_trainer(mcore, policy, steps, 2e-3), items=train, steps=steps, global_batch=16,
                                to_microbatches=lambda share: orpo.microbatches(share, seq_length=8, micro_batch=8),
                                forward=orpo.make_forward(beta=0.1), seq_length=8)
    after = orpo.preference_accuracy(policy, held_out, seq_length=8)
    print(f"orpo held-out reward accuracy {before['reward_accuracy']:.2f} -> {after['reward_accuracy']:.2f}, "
          f"nll {before['nll']:.3f} -> {after['nll']:.3f}; train loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")
    assert before["reward_accuracy"] < 0.7
    assert after["reward_accuracy"] >= 0.9 and after["nll"] < before["nll"]
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["log_odds_ratio"] > history[0]["log_odds_ratio"]


def _examples(pairs, start=0):
    from nemoc.runtime.align.kto import Example

    return [Example(p.prompt, c, good, start + i) for i, p in enumerate(pairs)
            for c, good in ((p.chosen, True), (p.rejected, False))]


@pytest.mark.parametrize("loss", ["kto", pytest.param("apo_zero_unpaired", marks=pytest.mark.slow)])
def test_kto_separates_held_out_desirable_from_undesirable(mcore, loss):
    from nemoc.runtime.align import kto, trainer

    f = mapping(2)
    train, held_out = _examples(preference_pairs(256, 1, f)), _examples(preference_pairs(48, 2, f))
    mcore.seed_all(7)
    spec = llama_spec(seq_length=8)
    policy = mcore.build_gpt(spec, mcore.single_layout())
    frozen = mcore.build_gpt(spec, mcore.single_layout())
    frozen.load_state_dict(policy.state_dict())
    reference = kto.Reference(model=frozen)
    before = kto.held_out_metrics(policy, reference, held_out, seq_length=8, beta=0.1)
    assert before == {"reward_margin": 0.0, "reward_auc": 0.5, "reward_accuracy": 0.5}  # policy == reference
    steps = 120
    history = trainer.run_steps(
        _trainer(mcore, policy, steps, 2e-3), items=train, steps=steps, global_batch=16, seq_length=8,
        to_microbatches=lambda share: kto.microbatches(share, policy=policy, reference=reference, seq_length=8,
                                                       micro_batch=8, loss=loss),
        forward=kto.make_forward(beta=0.1, loss=loss))
    after = kto.held_out_metrics(policy, reference, held_out, seq_length=8, beta=0.1)
    print(f"{loss}: held-out reward AUC 0.50 -> {after['reward_auc']:.2f}, pair accuracy -> {after['reward_accuracy']:.2f}, "
          f"margin -> {after['reward_margin']:.3f}; z0 {history[0]['kl']:.4f} -> {history[-1]['kl']:.4f}")
    assert after["reward_auc"] >= 0.85 and after["reward_accuracy"] >= 0.85 and after["reward_margin"] > 0
    assert history[-1]["loss"] < history[0]["loss"]
    if loss == "kto":
        assert history[0]["kl"] == 0.0 and history[-1]["kl"] >= 0.0  # policy == reference at the first step


class _LetterTokenizer:
    """Token i detokenises to one character, so a verifier sees exactly the sampled ids."""

    eod = EOD

    def detokenize(self, ids):
        return "".join(chr(ord("A") + i) for i in ids)


def test_grpo_raises_the_verifier_reward_on_held_out_prompts(mcore):
    """Toy verifiable task: the completion must contain the letter of TARGET (a random policy of 50
    tokens samples it in 6 tokens with probability ~0.11). GRPO with the `contains` verifier, 4
    completions per prompt sampled with the KV cache, reference KL (beta 0.04), Megatron steps."""
    from nemoc.runtime.align import grpo

    target = 7
    tok = _LetterTokenizer()
    reference_text = tok.detokenize([target])
    train = [grpo.Query([INSTR, a, SEP], reference_text) for a in LETTERS[:12]]
    held_out = [grpo.Query([INSTR, a, SEP], reference_text) for a in LETTERS[12:]]
    mcore.seed_all(3)
    spec = llama_spec(seq_length=16)
    policy = mcore.build_gpt(spec, mcore.single_layout(), seq_length=16)
    reference = mcore.build_gpt(spec, mcore.single_layout(), seq_length=16)
    reference.load_state_dict(policy.state_dict())
    for p in reference.parameters():
        p.requires_grad_(False)
    cfg = grpo.GRPOParams(num_generations=4, max_new_tokens=6, reward="contains", beta=0.04, temperature=1.0)
    score = grpo.VerifierReward("contains", tok, end="")
    common = dict(vocab=50, eod=-1, seq_length=16)
    before = grpo.held_out_reward(policy, held_out, score, cfg, **common)
    iterations = 25
    tr = _trainer(mcore, policy, iterations, 1e-2, global_batch=8, micro_batch=16)
    from nemoc.runtime.align import trainer

    rewards, kls = [], []
    for it in range(iterations):
        gen = torch.Generator().manual_seed(100 + it)
        share = trainer.dp_shard(train, it, 8)
        m = grpo.iteration(tr, policy, reference, share, score, cfg, micro_batch=16, pad_id=0, generator=gen, **common)
        rewards.append(m["reward"])
        kls.append(m["kl"])
    after = grpo.held_out_reward(policy, held_out, score, cfg, **common)
    print(f"grpo: sampled reward {sum(rewards[:3]) / 3:.2f} -> {sum(rewards[-3:]) / 3:.2f}; held-out greedy reward "
          f"{before['reward']:.2f} -> {after['reward']:.2f}; kl {kls[0]:.4f} -> {kls[-1]:.4f}")
    assert sum(rewards[:3]) / 3 < 0.4
    assert sum(rewards[-3:]) / 3 > 0.8, rewards
    assert before["reward"] < 0.5 and after["reward"] == 1.0
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0.0  # moved away from the reference


def test_grpo_microbatch_loss_is_the_objective_on_the_model_log_probs(mcore):
    """The stage's loss_func hands the objective exactly the completion tokens' log-probs and the group
    advantages: one microbatch, recomputed by hand with objectives.grpo."""
    from nemoc.runtime.align import grpo
    from nemoc.runtime.objectives import grpo as objective

    mcore.seed_all(5)
    policy = mcore.build_gpt(llama_spec(seq_length=16), mcore.single_layout(), seq_length=16)
    queries = [grpo.Query([INSTR, 10, SEP], None), grpo.Query([INSTR, 10, SEP], None),
               grpo.Query([INSTR, 11, SEP], None), grpo.Query([INSTR, 11, SEP], None)]
    completions = [[12, 13, EOD], [14], [15, 16], [17, 18, 19, EOD]]
    adv = objective.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0]), 2)
    cfg = grpo.GRPOParams(num_generations=2, beta=0.0, max_new_tokens=4)
    (mb,) = grpo.microbatches(queries, completions, adv, policy=policy, reference=None, cfg=cfg, seq_length=16,
                              micro_batch=8, pad_id=0)
    output, loss_func = grpo.make_forward(cfg, 4)(policy, mb)
    loss, metrics = loss_func(output)
    assert mb["batch"].loss_mask.sum(-1).tolist() == [3.0, 1.0, 2.0, 4.0]  # the completion tokens only
    expected, _ = objective.grpo_loss(-output.float(), mb["batch"].loss_mask, adv, beta=0.0)
    torch.testing.assert_close(loss, expected)
    assert float(metrics["clip_fraction"]) == 0.0  # one iteration: ratio 1 everywhere


def test_unpaired_reader_and_validation_name_the_line(tmp_path):
    from nemoc.runtime.align.data import DataError, read_preferences, read_unpaired, unpair
    from nemoc.runtime.data_prep import Source, validate_records

    good = tmp_path / "u.jsonl"
    good.write_text('{"prompt": "Hi", "completion": "Hello.", "label": true}\n'
                    '{"prompt": "Hi", "completion": "Go away.", "label": false}\n')
    assert [u.desirable for u in read_unpaired(good)] == [True, False]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "completion": "Hello.", "label": true}\n'
                   '{"prompt": "Hi", "completion": "Hello.", "label": "yes"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'label' must be true .* got str 'yes'"):
        read_unpaired(bad)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'label'"):
        validate_records(Source(name="fb", pattern=str(bad), format="unpaired"))
    assert validate_records(Source(name="fb", pattern=str(good), format="unpaired"))["records"] == 2
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    split = unpair(read_preferences(prefs))
    assert [(u.completion, u.desirable) for u in split] == [("Hello.", True), ("Go.", False)]


class _FixedModel:
    """Stands in for the GPT model in a forward step: returns the given per-token losses (-log-probs)."""

    def __init__(self, token_loss):
        self.token_loss = token_loss

    def __call__(self, *args, **kwargs):
        return self.token_loss


def test_ipo_logs_rewards_on_sums_as_trl_and_its_loss_on_means(mcore):
    """IPO's loss is on per-token mean log-ratios, its logged rewards and margin on sums (TRL's DPOTrainer)."""
    from nemoc.runtime.align import dpo

    pairs = [dpo.Pair([INSTR, 10, SEP], [11, 12, 13, EOD], [14, EOD])]
    batch = dpo.pair_batch(pairs, 8)
    mask = batch.loss_mask
    logp = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))
    ref = torch.tensor([-3.0, -1.0])  # reference sums, chosen then rejected
    _, loss_func = dpo.make_forward(beta=0.5, loss="ipo")(_FixedModel(-logp), {"batch": batch, "ref": ref})
    loss, metrics = loss_func(-logp)
    sums, lengths = (logp * mask).sum(-1), mask.sum(-1)
    assert lengths.tolist() == [4.0, 2.0]
    h_mean = (sums[0] - ref[0]) / 4 - (sums[1] - ref[1]) / 2
    assert float(loss) == pytest.approx(float((h_mean - 1 / (2 * 0.5)) ** 2), rel=1e-6)
    assert float(metrics["reward_margin"]) == pytest.approx(float(0.5 * ((sums[0] - ref[0]) - (sums[1] - ref[1]))), rel=1e-6)


def test_ppo_clip_fraction_counts_only_tokens_whose_gradient_the_clip_removes(mcore):
    from nemoc.runtime.align import ppo

    batch = mcore.make_batch([([1, 2, 3, 4, 5], [0, 1, 1, 1, 1])], 4)
    mask = batch.loss_mask  # 4 response labels
    old = torch.zeros_like(mask)
    # ratios exp(logp - old): 1.5 (A > 0: clipped), 1.5 (A < 0: not clipped), 0.5 (A < 0: clipped), 1.0
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    exp = ppo.Experience(batch, old, torch.zeros_like(mask), adv, torch.zeros_like(mask))
    _, loss_func = ppo.actor_forward(ppo.PPOConfig(clip=0.2))(_FixedModel(-logp), exp)
    loss, metrics = loss_func(-logp)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 4)  # |rho - 1| > eps would say 3 / 4
    surrogate = torch.min(torch.exp(logp) * adv, torch.clamp(torch.exp(logp), 0.8, 1.2) * adv)
    assert float(loss) == pytest.approx(float(-surrogate.mean()), rel=1e-6)


def test_kto_weight_advice_is_trls():
    from nemoc.runtime.align.kto import weight_advice

    assert weight_advice(50, 50, 1.0, 1.0) is None
    # ranges: desirable_weight in [n_u/n_d, 1.33 n_u/n_d] x undesirable_weight, or undesirable_weight in
    # [n_d/n_u / 1.33, n_d/n_u] x desirable_weight; TRL warns when neither weight is in its range
    assert weight_advice(100, 120, 1.3, 1.0) is None
    assert "desirable_weight in [1.2, 1.6] OR undesirable_weight in [0.63, 0.83]" in weight_advice(100, 120, 1.0, 1.0)
    assert weight_advice(20, 80, 1.0, 1.0) == ("20 desirable / 80 undesirable training examples with desirable_weight 1, "
                                               "undesirable_weight 1: set EITHER desirable_weight in [4.0, 5.32] OR "
                                               "undesirable_weight in [0.19, 0.25] (Ethayarajh et al. 2024, eq. 8; TRL's advice)")
    assert weight_advice(20, 80, 4.5, 1.0) is None
