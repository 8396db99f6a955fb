"""Alignment objectives as pure functions on log-probabilities (no model, no Megatron, no process group).

Each module takes per-token or per-sequence log-probs (and masks, rewards, reference log-probs) as
tensors and returns `(loss, metrics)`; a stage's step function computes the log-probs with the model and
hands them here. Every loss equals Hugging Face TRL's on identical inputs (tests/runtime/learning/test_objectives_trl.py).

  grpo.py        group-normalised advantages, clipped-ratio loss, k3 KL to the reference (GRPOTrainer)
  kto.py         desirable / undesirable losses around the KL baseline (KTOTrainer)
  orpo.py        odds-ratio term on the SFT loss (ORPOTrainer)
  preference.py  DPO / IPO loss with TRL's logged rewards (sums of log-probs, also for IPO)
  verifiers.py   named rule-based rewards for GRPO (exact match against a reference field)
"""
