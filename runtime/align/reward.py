"""Reward model: a scalar head on the GPT trunk trained with the Bradley-Terry loss (Ouyang et al. 2022).

Input:  preference pairs (prompt, chosen, rejected) as token ids; a chunk built with
        `common.build_gpt(..., scalar_head=True)` (the vocabulary output layer replaced by one output,
        trunk initialised from the parent checkpoint with `load_model(..., skip_output=True)`).
Output: trained model; per-step loss/accuracy; held-out accuracy. `score(model, sequences)` gives one
        scalar per sequence (used by PPO and eval).
Invariants: the score of a sequence is the head's output at its last real token (causal attention, so
        it has seen the whole sequence; right padding after it cannot influence it).
Loss: -log sigmoid(r(x, y_w) - r(x, y_l)) (Bradley & Terry 1952; InstructGPT eq. 1), mean over pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nemoc.runtime.align.common import (AlignError, Batch, causal_mask, cp_share, cp_size, device, forward_only,
                                        on_this_cp_rank, row_sums)
from nemoc.runtime.align.dpo import Pair
from nemoc.runtime.align.trainer import chunks


def sequence_batch(sequences: Sequence[list[int]], seq_length: int, pad_id: int = 0) -> tuple[Batch, torch.Tensor]:
    """Right-padded rows of whole sequences (no label shift) and the index of each row's last token."""
    b = len(sequences)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    segments = torch.zeros((b, seq_length), dtype=torch.long)
    last = torch.zeros(b, dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = seq[:seq_length]  # keep the prompt side; a truncated reply still ends in a real token
        if not seq:
            raise AlignError("empty sequence cannot be scored")
        tokens[i, : len(seq)] = torch.tensor(seq)
        segments[i, : len(seq)] = 1
        last[i] = len(seq) - 1
    positions = torch.arange(seq_length).expand(b, -1).contiguous()
    batch = Batch(tokens=tokens, labels=tokens, loss_mask=segments.float(), position_ids=positions,
                  attention_mask=None if cp_size() > 1 else causal_mask(segments))
    batch = on_this_cp_rank(batch, segments=segments)  # context parallelism: this rank's shard of the rows
    return batch.to(device()), last.to(device())


@torch.no_grad()
def score(model, sequences: Sequence[list[int]], seq_length: int, micro_batch: int = 32, pad_id: int = 0) -> torch.Tensor:
    """The score of each sequence (its last token's value), at any pipeline layout (every rank gets them)."""
    model.eval()
    items = [sequence_batch(group, seq_length, pad_id) for group in chunks(list(sequences), micro_batch)]
    lasts = {id(batch): last for batch, last in items}
    out = forward_only(model, [batch for batch, _ in items],
                       lambda b, values: last_values(values, b, lasts[id(b)]).cpu(),
                       everywhere=True)
    return torch.cat(out)


def pair_microbatches(pairs: Sequence[Pair], *, seq_length: int, micro_batch: int, pad_id: int = 0) -> list[dict]:
    out = []
    for group in chunks(list(pairs), micro_batch):
        seqs = [p.prompt + p.chosen for p in group] + [p.prompt + p.rejected for p in group]
        batch, last = sequence_batch(seqs, seq_length, pad_id)
        out.append({"batch": batch, "last": last})
    return out


def last_values(values: torch.Tensor, batch: Batch, last: torch.Tensor) -> torch.Tensor:
    """[b] the value at each row's last real token from [b, s, 1] values; under context parallelism the
    rank holding that position gives it (its shard's position ids are the tokens' sequence positions)."""
    at_last = (batch.position_ids == last.to(batch.position_ids.device).unsqueeze(1)).float()
    return row_sums(values.squeeze(-1).float(), at_last)


def bradley_terry(scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    n = scores.shape[0] // 2
    diff = scores[:n] - scores[n:]
    loss = -F.logsigmoid(diff).mean()
    return loss, {"loss": loss.detach().clone(), "accuracy": (diff > 0).float().mean(), "margin": diff.mean().detach()}


def forward(model, mb):
    batch, last = mb["batch"], mb["last"]
    values = model(batch.tokens, batch.position_ids, batch.attention_mask)

    def loss_func(output):
        value, reports = bradley_terry(last_values(output, batch, last))
        return cp_share(value), reports

    return values, loss_func


forward.reports = ("loss", "accuracy", "margin")  # bradley_terry's, the loss first (core.loop)


@torch.no_grad()
def accuracy(model, pairs: Sequence[Pair], *, seq_length: int, micro_batch: int = 32, pad_id: int = 0) -> dict[str, float]:
    """Held-out pairs: fraction with r(chosen) > r(rejected), and the mean margin."""
    chosen = score(model, [p.prompt + p.chosen for p in pairs], seq_length, micro_batch, pad_id)
    rejected = score(model, [p.prompt + p.rejected for p in pairs], seq_length, micro_batch, pad_id)
    diff = chosen - rejected
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()  # ties count 1/2: an untrained head scores 0.5
    return {"accuracy": float(wins.mean()), "margin": float(diff.mean())}
