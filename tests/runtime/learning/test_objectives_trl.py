"""GRPO, KTO, ORPO and IPO's logged rewards equal TRL's on identical log-probs (loss to 1e-6, gradients too).

TRL's loss code runs unchanged: its trainer methods are called unbound on a minimal stand-in for the
trainer (the attributes the method reads) whose model returns the log-probs we hand both sides.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from nemoc.runtime.objectives import grpo, kto, orpo, preference

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'nemoc[test]')")


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def unwrap_model(self, m):
        return m


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def _logps(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(*shape, generator=g, dtype=torch.float64) * 3


# ------------------------------------------------------------------------------------------------ GRPO


def _grpo_trainer(*, beta, loss_type, eps_low, eps_high, logps, max_len):
    from trl.trainer.grpo_trainer import GRPOTrainer

    fake = SimpleNamespace(
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, max_completion_length=max_len,
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    return fake, GRPOTrainer._compute_loss


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradient_equal_trls(loss_type, beta):
    b, t, groups = 8, 6, 2
    mask = torch.ones(b, t)
    mask[1, 4:] = 0
    mask[5, 2:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25])
    adv = grpo.group_advantages(rewards, b // groups)
    old = _logps(b, t, seed=1)
    ref = _logps(b, t, seed=2)
    base = old + 0.3 * torch.randn(b, t, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    ours_in = base.clone().requires_grad_(True)
    ours, metrics = grpo.grpo_loss(ours_in, mask, adv, old_logps=old, ref_logps=ref, beta=beta, epsilon_low=0.2,
                                   epsilon_high=0.28, loss_type=loss_type, max_completion_length=t)
    ours.backward()

    theirs_in = base.clone().requires_grad_(True)
    fake, compute = _grpo_trainer(beta=beta, loss_type=loss_type, eps_low=0.2, eps_high=0.28, logps=theirs_in, max_len=t)
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv.double(), "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    theirs = compute(fake, None, inputs)
    theirs.backward()

    _close(ours, theirs)
    _close(ours_in.grad, theirs_in.grad)
    assert float(metrics["clip_fraction"]) == pytest.approx(fake._metrics["train"]["clip_ratio/region_mean"][0], abs=1e-6)
    assert float(metrics["clip_fraction"]) > 0  # the test exercises clipping
    if beta:
        assert float(metrics["kl"]) == pytest.approx(fake._metrics["train"]["kl"][0], abs=1e-6)


def test_group_advantages_equal_trls_formula_with_its_nanstd():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25, 3.0, 3.0, 3.0, 3.0])
    n = 4
    mean = torch.nanmean(rewards.view(-1, n), dim=1).repeat_interleave(n)
    std = nanstd(rewards.view(-1, n), dim=1).repeat_interleave(n)
    _close(grpo.group_advantages(rewards, n), (rewards - mean) / (std + 1e-4))
    _close(grpo.group_advantages(rewards, n, "batch"), (rewards - mean) / (nanstd(rewards) + 1e-4))
    _close(grpo.group_advantages(rewards, n, "none"), rewards - mean)
    assert torch.all(grpo.group_advantages(rewards, n)[8:] == 0)  # a group with one reward teaches nothing


def test_clip_fraction_counts_only_tokens_whose_gradient_the_clip_removes():
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    # clipped: rho > 1.2 with A > 0 (first) and rho < 0.8 with A < 0 (fourth); |rho - 1| > eps counts 4
    assert float(grpo.clip_fraction(ratio, adv, torch.ones(1, 5), epsilon_low=0.2)) == pytest.approx(2 / 5)


# ------------------------------------------------------------------------------------------------- KTO


def _kto_call(*, per_token, kl_per_token, ref_sums, ref_kl_sums, labels, completion_mask, beta, loss_type, weights):
    from trl.trainer.kto_trainer import KTOTrainer

    b, s = completion_mask.shape
    input_ids = torch.zeros(b, s, dtype=torch.long)
    kl_ids = torch.ones(b, s, dtype=torch.long)

    def model(*, input_ids, labels, **_):
        lp = kl_per_token if input_ids is kl_ids else per_token
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros(b, s - 1), mean_logits=torch.zeros(b, s - 1))

    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(), calculate_KL=loss_type == "kto",
                           aux_loss_enabled=False, precompute_ref_logps=True, loss_type=loss_type, beta=beta,
                           desirable_weight=weights[0], undesirable_weight=weights[1], _total_train_tokens=0, _tp_size=1,
                           _metrics=defaultdict(lambda: defaultdict(list)))
    fake._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(fake, m, batch)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(b, s), "completion_mask": completion_mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(b, s), "KL_completion_mask": completion_mask,
             "label": labels, "ref_logps": ref_sums, "ref_KL_logps": ref_kl_sums}
    return KTOTrainer._compute_loss(fake, model, batch, return_outputs=False), fake._metrics["train"]


@pytest.mark.parametrize("loss_type", kto.LOSS_TYPES)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_loss_and_gradient_equal_trls(loss_type, weights):
    b, s = 6, 7
    mask = torch.ones(b, s)
    mask[:, :2] = 0  # the prompt
    mask[2, 5:] = 0
    labels = torch.tensor([True, False, True, True, False, False])
    token_mask = mask[:, 1:].double()
    base = _logps(b, s - 1, seed=4) * token_mask
    kl_tokens = _logps(b, s - 1, seed=5) * token_mask
    ref_sums = _logps(b, seed=6) * 4
    ref_kl_sums = kl_tokens.sum(-1) - 0.5  # policy above the reference on the mismatched pairs: z0 > 0

    ours_in = base.clone().requires_grad_(True)
    z0 = kto.kl_baseline(kl_tokens.sum(-1), ref_kl_sums)
    ours, metrics = kto.kto_loss(ours_in.sum(-1), ref_sums, labels, kl=z0, beta=0.1, desirable_weight=weights[0],
                                 undesirable_weight=weights[1], loss_type=loss_type)
    ours.backward()
    theirs_in = base.clone().requires_grad_(True)
    theirs, logged = _kto_call(per_token=theirs_in, kl_per_token=kl_tokens, ref_sums=ref_sums, ref_kl_sums=ref_kl_sums,
                               labels=labels, completion_mask=mask, beta=0.1, loss_type=loss_type, weights=weights)
    theirs.backward()
    _close(ours, theirs)
    _close(ours_in.grad, theirs_in.grad)
    assert float(metrics["reward_margin"]) == pytest.approx(logged["rewards/margins"][0], abs=1e-6)
    if loss_type == "kto":
        assert float(metrics["kl"]) == pytest.approx(logged["kl"][0], abs=1e-6) and float(metrics["kl"]) > 0


def test_kto_mismatched_pairs_shift_by_one():
    assert kto.mismatched([10, 11, 12]) == [11, 12, 10]


# ------------------------------------------------------------------------------------------------ ORPO


def test_orpo_loss_and_gradient_equal_trls():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    n = 5
    chosen = (_logps(n, seed=7) * 0.5 - 0.01)
    rejected = (_logps(n, seed=8) * 0.5 - 0.01)
    nll = torch.tensor(1.7, dtype=torch.float64)
    c1, r1, nll1 = (x.clone().requires_grad_(True) for x in (chosen, rejected, nll))
    ours, metrics = orpo.orpo_loss(c1, r1, nll1, beta=0.1)
    ours.backward()

    c2, r2, nll2 = (x.clone().requires_grad_(True) for x in (chosen, rejected, nll))
    fake = SimpleNamespace(beta=0.1, accelerator=_Accelerator(), aux_loss_enabled=False)
    fake.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(fake, c, r)
    fake.concatenated_forward = lambda model, batch: (c2, r2, torch.zeros(n, 3, 4), torch.zeros(n, 3, 4), nll2)
    theirs, logged = ORPOTrainer.get_batch_loss_metrics(fake, None, {})
    theirs.backward()
    _close(ours, theirs)
    for a, b in ((c1, c2), (r1, r2), (nll1, nll2)):
        _close(a.grad, b.grad)
    assert float(metrics["log_odds_chosen"]) == pytest.approx(logged["log_odds_chosen"], abs=1e-6)
    assert float(metrics["reward_margin"]) == pytest.approx(logged["rewards/margins"], abs=1e-6)


# ------------------------------------------------------------------------------------------- DPO / IPO


def _dpo_call(*, loss_type, per_token, ref_per_token, completion_mask, beta):
    from trl.trainer.dpo_trainer import DPOTrainer

    b, s = completion_mask.shape

    def model(**_):
        z = torch.zeros(b, s - 1)
        return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)

    args = SimpleNamespace(gradient_checkpointing_kwargs=None, use_logits_to_keep=False, padding_free=False)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), ref_model=None, accelerator=_Accelerator(), args=args,
                           beta=beta, loss_types=[loss_type], loss_weights=[1.0], f_divergence_type="reverse_kl",
                           ld_alpha=None, precompute_ref_logps=True, aux_loss_enabled=False, use_weighting=False,
                           label_smoothing=0.0, _total_train_tokens=0, _tp_size=1, rpo_alpha=None,
                           _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"input_ids": torch.zeros(b, s, dtype=torch.long), "attention_mask": torch.ones(b, s),
              "completion_mask": completion_mask}
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_per_token.sum(-1).chunk(2)
    return DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False), fake._metrics["train"]


@pytest.mark.parametrize("loss", preference.LOSSES)
def test_preference_loss_and_logged_rewards_equal_trls(loss):
    n, s = 3, 8
    mask = torch.ones(2 * n, s)
    mask[:, :3] = 0
    mask[1, 6:] = 0
    mask[4, 5:] = 0
    tm = mask[:, 1:].double()
    pol, ref = _logps(2 * n, s - 1, seed=9) * tm, _logps(2 * n, s - 1, seed=10) * tm
    ours, metrics = preference.preference_loss(pol.sum(-1), ref.sum(-1), tm.sum(-1), beta=0.1, loss=loss)
    theirs, logged = _dpo_call(loss_type={"dpo": "sigmoid", "ipo": "ipo"}[loss], per_token=pol,
                               ref_per_token=ref, completion_mask=mask, beta=0.1)
    _close(ours, theirs)
    for ours_key, trl_key in (("reward_margin", "rewards/margins"), ("reward_chosen", "rewards/chosen"),
                              ("reward_accuracy", "rewards/accuracies")):
        assert float(metrics[ours_key]) == pytest.approx(logged[trl_key][0], abs=1e-6)
