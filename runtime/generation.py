"""Batched autoregressive generation on a Megatron-Core GPTModel, with a KV cache.

Input:  a GPTModel chunk (any layer spec; TP ranks all call this with the same prompts and generator),
        prompts as token-id lists of any lengths, and the sampling settings.
Output: `Generation`: per prompt the generated ids (ending with the stop id when one was produced: `eod` is
        one id or several, e.g. the end-of-document id and the chat template's end-of-turn token that
        runtime/align/data.py `stop_ids` derives; a row stops at whichever it samples first) and the mean
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
Pipeline parallelism: every pipeline rank runs the same loop in step. Each forward (the prefill, then
        every decode step) runs the stages one after the other for the whole batch: a stage receives the
        previous stage's hidden states (`set_input_tensor`, as Megatron's schedules feed it), runs its
        layers against its own slice of the KV cache (the cache is keyed by layer, so each stage holds
        only its layers' keys and values) and sends its output on; the last stage samples and broadcasts
        the new tokens and their entropies over the pipeline group, so every stage feeds the same tokens
        next step. With virtual pipeline stages (a rank holds vp chunks: runtime/align/common.py `Chunks`)
        the chunks run in Megatron's interleaved order, chunk 0 on stages 0..pp-1, then chunk 1 on stages
        0..pp-1, ...: the hidden states go around the ring vp times per forward (pp x vp - 1 hops), and
        each chunk keeps its own layers' keys and values (the one StaticInferenceContext of a rank is keyed
        by the global layer number). The batch is not split into micro-batches: a stage idles while the
        others run, so a token costs the whole model's forward plus every hop (the plan's rollout estimate
        says so: compiler/cost.py `_rollout_time`, `_rollout_p2p`), but no stage ever holds more than its own
        layers' weights and cache.
Expert parallelism (MoE layers whose experts are split over the ranks of an expert-parallel group): each
        MoE layer exchanges tokens with the group's other ranks (all-to-all), so every rank of the group
        must run the same forwards although each decodes its own prompts. The group agrees on one prefill
        length (the shortest prompt of the group) and one sequence bound (the longest), and decoding goes on
        while any rank of the group has a row generating (one all-reduce of an "all done" flag per step);
        a rank whose rows all stopped keeps stepping with them (their extra tokens dropped, as above). A
        row computes what it computes alone, so the tokens do not depend on the group (tested: EP=2 equals
        EP=1 at DP=2, tests/runtime/align/test_align_rl_pipeline.py).
Invariants: sampling happens on the CPU from the full-vocabulary logits (gathered across TP ranks; the
        padded vocabulary rows masked out), with one CPU generator, in row order, only for rows that are
        generating: the cached and the recomputing paths draw the same random numbers, so they give the
        same tokens (tested), and every TP rank draws the same tokens. Under pipeline parallelism only the
        last stage draws from `generator` (the others receive its tokens), so the tokens equal one
        process's (tested at PP=2: tests/runtime/align/test_align_rl_pipeline.py).
Context parallelism: the rollout is not split over the CP group. Every CP rank runs the whole rows (the
        model under `model.whole_sequences`: the attention core's CP path and RoPE's CP slicing off), so each
        holds the whole sequence's KV cache, and every collective inside the model (TP, pipeline, MoE
        all-to-alls) sees all its ranks. Each CP rank draws with the same generator, and the first CP rank's
        tokens are broadcast to the group every step (`_from_first_context_rank`), so the group agrees on
        every token whatever the kernels' bitwise determinism; tokens equal one process's (tested at CP=2).
Sequence parallelism: off while decoding (the model under `model.unsplit_sequence`: the embedding's scatter,
        the linears' sequence gathers and reduce-scatters, the output layer's gather all switched off, then
        restored): a decode step feeds one token per row, which cannot be split over the TP group, and the
        same weights give the same sums (row-parallel outputs all-reduced instead of reduce-scattered). Every
        TP rank holds the whole window; the steps and experience passes around the rollout keep sequence
        parallelism (tested: PPO and GRPO at TP=2 with sequence parallelism = one process,
        tests/runtime/align/test_align_rl_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nemoc.runtime.model import unsplit_sequence, unwrap, whole_sequences


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
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, vocab: int, eod: int | Sequence[int],
             seq_length: int, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Generation:
    """Generate up to `max_new_tokens` per prompt, stopping a row at any id of `eod` or at `seq_length` tokens."""
    problem = None
    if any(len(p) == 0 for p in prompts):
        problem = "generation needs a non-empty prompt for every row"
    elif any(len(p) >= seq_length for p in prompts):
        problem = f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room within seq_length={seq_length}"
    elif not greedy and temperature <= 0:
        problem = f"temperature must be positive (got {temperature})"
    group = _expert_group()
    dev = _device(model)
    if group is not None:  # the group's ranks meet in every MoE layer: all decode, or all stop here
        flags = torch.tensor([int(problem is not None), int(bool(prompts)), int(not prompts)], dtype=torch.long,
                             device=dev)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
        if problem is None and int(flags[0]):
            problem = "another rank of the expert-parallel group refused its prompts (see its error)"
        elif problem is None and int(flags[1]) and int(flags[2]):  # some ranks have prompts, some none
            problem = "every rank of an expert-parallel group needs at least one prompt (some have none)"
    if problem is not None:
        raise ValueError(problem)
    if not prompts:
        return Generation([], [])
    unwrap(model).eval()
    stops = torch.tensor([eod] if isinstance(eod, int) else list(eod), dtype=torch.long)
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
    start, end = 0, int(lengths.min())
    if group is not None:  # one prefill and one step count for the whole expert-parallel group
        agreed = torch.tensor([-end, total], dtype=torch.long, device=dev)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=group)
        end, total = -int(agreed[0]), int(agreed[1])
        tokens = torch.cat([tokens, torch.zeros(b, total - tokens.shape[1], dtype=torch.long)], 1)
    context = _context(b, total) if use_cache else None
    # for the whole decode (set once, not per step): every context-parallel rank runs the whole rows, every
    # tensor-parallel rank the whole window (a decode step's one token per row cannot be split over the group)
    with whole_sequences(model), unsplit_sequence(model):
        while end < total and not _all_done(done, group, dev):
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
                nxt = ent = None
                if logits is not None:  # the last pipeline stage (every rank without pipelining)
                    nxt, ent = _next_tokens(logits[rows.to(dev), -1, :], vocab=vocab, greedy=greedy,
                                            temperature=temperature, top_k=top_k, generator=generator)
                nxt, ent = _from_first_context_rank(nxt, ent, len(rows), dev)
                nxt, ent = _from_last_stage(nxt, ent, len(rows), dev)
                tokens[rows, end] = nxt
                entropy_sum[rows] += ent
                entropy_n[rows] += 1
                stopped = rows[torch.isin(nxt, stops)]
                done[stopped] = True
                ends[stopped] = end + 1
            done |= (end + 1) >= limit
            start, end = end, end + 1
    pipe = _pipeline()
    for i, chunk in enumerate(_chunks(model)):
        if pipe is not None and not (pipe.first and i == 0):
            unwrap(chunk).set_input_tensor(None)  # no stale hidden states for the next caller
    out = [tokens[i, int(lengths[i]):int(ends[i])].tolist() for i in range(b)]
    return Generation(out, (entropy_sum / entropy_n.clamp(min=1)).tolist())


def _expert_group():
    """The expert-parallel group when experts are split over several ranks (their MoE layers exchange
    tokens with all-to-all collectives, so every rank of the group must run the same forwards); else None."""
    if not torch.distributed.is_initialized():
        return None
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_expert_model_parallel_world_size() == 1:
        return None
    return ps.get_expert_model_parallel_group()


def _all_done(done: torch.Tensor, group, dev: torch.device) -> bool:
    """Whether every row has stopped: this rank's rows, or with an expert-parallel group every rank's (a
    rank whose rows have stopped keeps stepping, its outputs dropped, until the group's last row stops)."""
    if group is None:
        return bool(done.all())
    flag = torch.tensor([0 if bool(done.all()) else 1], dtype=torch.long, device=dev)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    return int(flag) == 0


def _context(batch: int, length: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=length)


def _chunks(model) -> list:
    """A rank's model chunks in order: its virtual-pipeline chunks (a ModuleList: runtime/align/common.py
    `Chunks`), else the one model."""
    return list(model) if isinstance(model, (torch.nn.ModuleList, list, tuple)) else [model]


def _forward(model, tokens: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor | None:
    """Logits [b, s', v] (s' = 1 with a cache: Megatron materialises only the last position then) on the
    last pipeline stage; None on the others (their hidden states went to the next stage). Called under
    `whole_sequences` and `unsplit_sequence` (`generate`).

    A rank's chunks run in Megatron's interleaved order: chunk 0 on stages 0..pp-1, then chunk 1 on stages
    0..pp-1, ...; each chunk but the model's first (chunk 0 of stage 0) receives its input from the previous
    stage in the ring (stage pp-1's chunk i feeds stage 0's chunk i+1) and each but the model's last (chunk
    vp-1 of stage pp-1) sends its output to the next, so the hidden states go around the ring vp times."""
    pipe = _pipeline()
    chunks = _chunks(model)
    # no mask: GPTModel's attention is causal (tokens of a row never see later ones)
    kwargs = {} if context is None else {"inference_context": context}
    out = None
    for i, chunk in enumerate(chunks):
        if pipe is not None and not (pipe.first and i == 0):
            unwrap(chunk).set_input_tensor(_recv(pipe.prev, tokens.device))
        out = chunk(tokens, positions, None, runtime_gather_output=True, **kwargs)
        if pipe is not None and not (pipe.last and i == len(chunks) - 1):
            _send(out, pipe.next)
    return out if pipe is None or pipe.last else None


@dataclass(frozen=True)
class _Pipe:
    first: bool
    last: bool
    prev: int  # global ranks of the neighbouring stages
    next: int
    last_rank: int
    group: object


def _pipeline() -> _Pipe | None:
    """This rank's place in the pipeline; None without pipeline parallelism (or outside a process group)."""
    if not torch.distributed.is_initialized():
        return None
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return _Pipe(first=ps.is_pipeline_first_stage(ignore_virtual=True), last=ps.is_pipeline_last_stage(ignore_virtual=True),
                 prev=ps.get_pipeline_model_parallel_prev_rank(), next=ps.get_pipeline_model_parallel_next_rank(),
                 last_rank=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())


# The hidden states a stage sends are [s', b, h] (whole: `unsplit_sequence`) in the model's dtype:
# a header of (dtype code, 3 sizes) first, so the receiver needs no knowledge of the stage's layout.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _send(hidden: torch.Tensor, dst: int) -> None:
    hidden = hidden.contiguous()
    header = torch.tensor([_DTYPES.index(hidden.dtype), *hidden.shape], dtype=torch.long, device=hidden.device)
    torch.distributed.send(header, dst)
    torch.distributed.send(hidden, dst)


def _recv(src: int, dev: torch.device) -> torch.Tensor:
    header = torch.empty(4, dtype=torch.long, device=dev)
    torch.distributed.recv(header, src)
    code, *shape = header.tolist()
    hidden = torch.empty(shape, dtype=_DTYPES[code], device=dev)
    torch.distributed.recv(hidden, src)
    return hidden


def _from_first_context_rank(tokens: torch.Tensor | None, entropies: torch.Tensor | None, n: int,
                             dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first context-parallel rank's sampled tokens and entropies on every rank of its CP group (as
    they are without one; None on a stage that did not sample). Every CP rank computed the same whole rows
    and drew with the same generator, but nothing guarantees bit-equal logits across GPUs (non-deterministic
    kernels), and a single differing token would shard different sequences over the group: one rank's draw
    is kept."""
    if tokens is None or not torch.distributed.is_initialized():
        return tokens, entropies
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_context_parallel_world_size() == 1:
        return tokens, entropies
    box = torch.stack([tokens.to(torch.float64), entropies.to(torch.float64)]).to(dev)  # exact, as below
    torch.distributed.broadcast(box, ps.get_context_parallel_global_ranks()[0], group=ps.get_context_parallel_group())
    box = box.cpu()
    return box[0].long(), box[1].float()


def _from_last_stage(tokens: torch.Tensor | None, entropies: torch.Tensor | None, n: int,
                     dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The last stage's sampled tokens and entropies on every pipeline rank (as they are without one)."""
    pipe = _pipeline()
    if pipe is None:
        return tokens, entropies
    box = torch.empty(2, n, dtype=torch.float64, device=dev)
    if pipe.last:  # token ids < 2**53 and float32 entropies are exact in float64
        box[0], box[1] = tokens.to(dev, torch.float64), entropies.to(dev, torch.float64)
    torch.distributed.broadcast(box, pipe.last_rank, group=pipe.group)
    if pipe.last:
        return tokens, entropies
    box = box.cpu()
    return box[0].long(), box[1].float()
