"""Batched autoregressive generation on a Megatron-Core GPTModel, with a KV cache.

Input:  a GPTModel chunk (any layer spec; TP ranks all call this with the same prompts and generator),
        prompts as token-id lists of any lengths, and the sampling settings.
Output: `Generation`: per prompt the generated ids (ending with `eod` when it was produced) and the mean
        entropy of the sampling distribution over the generated tokens (PPO/GRPO log it).
How (use_cache=True): Megatron-Core's own `StaticInferenceContext` holds the keys and values of every
        layer; the attention layers append to it and attend over it when `inference_context` is passed
        to `GPTModel.forward`. As in Megatron's static-batch controller, the batch is prefilled up to the
        *shortest* prompt; then each step feeds one token per row: a row still inside its prompt is fed
        its next prompt token (what it "generated" there is discarded), a row past it is fed its sample.
        So prompts of different lengths need no padding mask and no position shift: every row computes
        exactly what it would compute alone. Rows that ended (eod, or the model's sequence length) keep
        stepping with the batch, and their extra tokens are dropped (right padding of the output).
        use_cache=False recomputes the whole sequence for every new token (the reference the cached path
        is tested against, and the baseline of bench/bench_generation.py).
Invariants: sampling happens on the CPU from the full-vocabulary logits (gathered across TP ranks; the
        padded vocabulary rows masked out), with one CPU generator, in row order, only for rows that are
        generating: the cached and the recomputing paths draw the same random numbers, so they give the
        same tokens (tested), and every TP rank draws the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nemoc.runtime.model import unwrap


@dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]
    entropies: list[float]


def _device(model) -> torch.device:
    return next(unwrap(model).parameters()).device


def _next_tokens(logits: torch.Tensor, *, vocab: int, greedy: bool, temperature: float, top_k: int,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, v_padded] last-position logits -> ([n] tokens, [n] entropies) of the sampling distribution."""
    logits = logits[:, :vocab].float().cpu() / (1.0 if greedy else temperature)
    if top_k and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    probs = logp.exp()
    entropy = -(probs * logp.masked_fill(probs == 0, 0.0)).sum(-1)
    if greedy:
        return probs.argmax(-1), entropy
    return torch.multinomial(probs, 1, generator=generator).squeeze(1), entropy


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, vocab: int, eod: int, seq_length: int,
             greedy: bool = False, temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
             use_cache: bool = True) -> Generation:
    """Generate up to `max_new_tokens` per prompt, stopping a row at `eod` or at `seq_length` tokens."""
    if not prompts:
        return Generation([], [])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs a non-empty prompt for every row")
    if any(len(p) >= seq_length for p in prompts):
        raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room within seq_length={seq_length}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be positive (got {temperature})")
    unwrap(model).eval()
    dev = _device(model)
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    total = min(seq_length, int(lengths.max()) + max_new_tokens)
    tokens = torch.zeros(b, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p)[:total])
    limit = torch.minimum(lengths + max_new_tokens, torch.full_like(lengths, total))  # exclusive end per row
    done = torch.zeros(b, dtype=torch.bool)
    ends = limit.clone()
    entropy_sum, entropy_n = torch.zeros(b), torch.zeros(b)
    context = _context(b, total) if use_cache else None
    start, end = 0, int(lengths.min())
    while end < total and not bool(done.all()):
        window = tokens[:, start:end] if use_cache else tokens[:, :end]
        offset = start if use_cache else 0
        positions = torch.arange(offset, end).expand(b, -1)
        logits = _forward(model, window.to(dev), positions.to(dev), context)
        if use_cache:
            context.increment_sequence_len_offset(end - start)
            context.enable_decode_mode()
        # rows generating at position `end`: past their prompt, not finished, within their budget
        generating = (lengths <= end) & ~done & (end < limit)
        rows = generating.nonzero().squeeze(1)
        if len(rows):
            nxt, ent = _next_tokens(logits[rows.to(dev), -1, :], vocab=vocab, greedy=greedy, temperature=temperature,
                                    top_k=top_k, generator=generator)
            tokens[rows, end] = nxt
            entropy_sum[rows] += ent
            entropy_n[rows] += 1
            stopped = rows[nxt == eod]
            done[stopped] = True
            ends[stopped] = end + 1
        done |= (end + 1) >= limit
        start, end = end, end + 1
    out = [tokens[i, int(lengths[i]):int(ends[i])].tolist() for i in range(b)]
    return Generation(out, (entropy_sum / entropy_n.clamp(min=1)).tolist())


def _context(batch: int, length: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=length)


def _forward(model, tokens: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor:
    """Logits [b, s', v] (s' = 1 with a cache: Megatron materialises only the last position then)."""
    if context is None:
        # no mask: GPTModel's attention is causal (tokens of a row never see later ones)
        return model(tokens, positions, None, runtime_gather_output=True)
    return model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
