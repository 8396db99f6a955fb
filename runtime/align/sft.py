"""Supervised fine-tuning: next-token loss on the response tokens only, optionally with sequence packing.

Input:  samples `(ids, weights)` from `data.ChatTemplate.render` (weight 1 on assistant tokens), a
        policy chunk (full model, or LoRA-wrapped: the same code trains adapters only).
Output: the trained chunk in place; per-step metrics; held-out response loss before and after.
Invariants: the loss is the mean over response label tokens of a microbatch (prompt, template and
padding tokens have weight 0). With `pack = true` several samples share one row of `seq_length` tokens
with a block-diagonal causal attention mask and per-sample position ids (`common.pack_rows`), so a
packed row computes exactly what the samples would compute alone (tested).

Packed rows run as variable-length attention (Megatron-Core's `PackedSeqParams`, cu_seqlens, the `thd`
layout) wherever the stage's attention core takes it: Transformer Engine's attention, or the SDPA core
of runtime/model.py, which attends segment by segment; a packed row then never materialises an [s, s]
tensor (tests/runtime/align/test_align_varlen.py measures it). Only Megatron's `unfused` core (an
`attention_backend = unfused` the user chose) gets the explicit [b, 1, s, s] block-diagonal mask.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from nemoc.runtime.align.common import AlignError, Batch, cp_share, cp_sum, forward_only, pack_rows, run
from nemoc.runtime.align.trainer import chunks

Sample = tuple[list[int], list[int]]


def truncate(samples: Sequence[Sample], seq_length: int) -> list[Sample]:
    """Cut each sample to seq_length + 1 tokens (inputs + the last label); drop those with no response left."""
    out = []
    for ids, w in samples:
        ids, w = ids[: seq_length + 1], w[: seq_length + 1]
        if sum(w[1:]) > 0:
            out.append((ids, w))
    if not out:
        raise AlignError(f"no sample keeps a response token within seq_length={seq_length}")
    return out


def pack(samples: Sequence[Sample], seq_length: int, enabled: bool) -> list[list[Sample]]:
    """First-fit-decreasing bins of at most seq_length + 1 tokens (or one sample per row)."""
    if not enabled:
        return [[s] for s in samples]
    capacity = seq_length + 1
    bins: list[list[Sample]] = []
    room: list[int] = []
    for s in sorted(samples, key=lambda x: -len(x[0])):
        for i, free in enumerate(room):
            if len(s[0]) <= free:
                bins[i].append(s)
                room[i] -= len(s[0])
                break
        else:
            bins.append([s])
            room.append(capacity - len(s[0]))
    return bins


def shuffled(rows: Sequence[list[Sample]], seed: int) -> list[list[Sample]]:
    """The rows in a seeded random order. `pack` fills bins longest sample first, so its rows (and unpacked
    rows, when the data file happens to be sorted) would otherwise run from long to short and the logged
    loss would trace the length distribution, not learning. Packing stays first-fit-decreasing over the
    whole data set (the densest rows); only the order in which rows are consumed is shuffled."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order]


def rows_to_batches(rows: Sequence[list[Sample]], seq_length: int, micro_batch: int, pad_id: int = 0, *,
                    varlen: bool = False) -> list[Batch]:
    """Micro-batches of `micro_batch` rows; `varlen`: variable-length attention (common.pack_rows)."""
    return [pack_rows(group, seq_length, pad_id, varlen=varlen) for group in chunks(rows, micro_batch)]


def forward(model, batch: Batch):
    """Megatron forward step: per-token loss from GPTModel, masked mean over response tokens."""
    token_loss = run(model, batch, labels=batch.labels)

    def loss_func(output):
        # the mean over the micro-batch's response tokens; under context parallelism the token sums of the
        # CP group's shards (common.cp_sum), each rank returning its share of the loss (common.cp_share)
        tokens = cp_sum(batch.loss_mask.sum())
        loss = cp_sum((batch.shaped(output).float() * batch.loss_mask).sum()) / tokens.clamp(min=1)
        return cp_share(loss), {"loss": loss.detach().clone(), "response_tokens": tokens.detach()}

    return token_loss, loss_func


forward.reports = ("loss", "response_tokens")  # what loss_func reports, the loss first (core.loop)


@torch.no_grad()
def response_loss(chunk, batches: Sequence[Batch]) -> float:
    """Mean per-token loss over all response tokens of `batches` (token-weighted, not batch-weighted), at
    any pipeline layout (common.forward_only; every rank gets the value)."""
    chunk.eval()
    sums = forward_only(chunk, [(b, {"labels": b.labels}) for b in batches],
                        lambda batch, out: (float(cp_sum((out.float() * batch.loss_mask).sum())),
                                            float(cp_sum(batch.loss_mask.sum()))),
                        everywhere=True)
    total, count = sum(x for x, _ in sums), sum(n for _, n in sums)
    return total / max(count, 1.0)
