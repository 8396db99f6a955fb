"""KV-cached generation (Megatron-Core's StaticInferenceContext) gives the tokens that recomputing the
whole sequence for every new token gives: greedy and sampled, prompts of different lengths, stop at eod;
standard attention and multi-latent attention (MLASelfAttention appends its keys and values to the same
context: the rollouts of PPO and GRPO on an MLA model)."""

from __future__ import annotations

import pytest
import torch
from align_helpers import gpt2_spec, llama_spec, mla_spec

from nemoc.runtime import generation

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20]]


def _model(mcore, spec):
    torch.manual_seed(7)
    chunk = mcore.build_gpt(spec, mcore.single_layout(), seq_length=spec.seq_length)
    # a sharper distribution than the init's (std 0.02) so that greedy and sampling differ from run to run
    with torch.no_grad():
        for p in mcore.unwrap(chunk).parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return chunk


def _both(chunk, **kw):
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(3)
        runs.append(generation.generate(chunk, PROMPTS, vocab=50, seq_length=32, generator=gen, use_cache=use_cache, **kw))
    return runs


@pytest.mark.parametrize("spec", [llama_spec, gpt2_spec, mla_spec, lambda: mla_spec(q_lora_rank=0, rope_type="rope",
                                                                                     rope_scaling_factor=1.0)],
                         ids=["llama-rope", "gpt2-learned", "mla-yarn", "mla-no-q-latent"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_cached_generation_equals_recomputation(mcore, spec, greedy):
    chunk = _model(mcore, spec())
    cached, recomputed = _both(chunk, max_new_tokens=12, eod=-1, greedy=greedy, temperature=1.0)
    assert cached.tokens == recomputed.tokens
    assert cached.entropies == pytest.approx(recomputed.entropies, abs=1e-4)
    assert [len(t) for t in cached.tokens] == [12] * 4
    assert len({tuple(t) for t in cached.tokens}) > 1


def test_generation_stops_at_eod_and_at_the_sequence_length(mcore):
    chunk = _model(mcore, llama_spec())
    free = generation.generate(chunk, PROMPTS, vocab=50, seq_length=32, max_new_tokens=12, eod=-1, greedy=True)
    eod = free.tokens[1][4]  # a token row 1 produces at its fifth step
    cached, recomputed = _both(chunk, max_new_tokens=12, eod=eod, greedy=True)
    assert cached.tokens == recomputed.tokens
    row = cached.tokens[1]
    assert row[-1] == eod and eod not in row[:-1] and len(row) <= 5
    # the model's sequence length bounds prompt + reply: 7 prompt tokens + at most 25 new ones in 32
    long = generation.generate(chunk, PROMPTS, vocab=50, seq_length=32, max_new_tokens=100, eod=-1, greedy=True)
    assert [len(p) + len(t) for p, t in zip(PROMPTS, long.tokens)] == [32] * 4


def test_cached_greedy_generation_equals_the_ppo_samplers(mcore):
    """An independent implementation (runtime/align/ppo.generate: right-padded rows, one full forward per
    token) produces the same greedy tokens."""
    from nemoc.runtime.align import ppo

    chunk = _model(mcore, llama_spec())
    ours = generation.generate(chunk, PROMPTS, vocab=50, seq_length=32, max_new_tokens=10, eod=-1, greedy=True)
    theirs, _ = ppo.generate(chunk, PROMPTS, max_new_tokens=10, temperature=1.0, vocab=50, eod=-1, seq_length=32,
                             generator=torch.Generator().manual_seed(0), greedy=True)
    assert ours.tokens == theirs


def test_bad_prompts_are_refused_with_a_message(mcore):
    chunk = _model(mcore, llama_spec())
    with pytest.raises(ValueError, match="non-empty prompt"):
        generation.generate(chunk, [[1], []], vocab=50, seq_length=32, max_new_tokens=2, eod=0)
    with pytest.raises(ValueError, match="no room within seq_length=32"):
        generation.generate(chunk, [list(range(32))], vocab=50, seq_length=32, max_new_tokens=2, eod=0)


def test_the_cached_prefill_computes_only_the_last_positions_logits(mcore):
    """What the plan prices for the rollout's prefill (compiler/cost.py `_rollout_time`: the output GEMM on one
    position per row): with the KV cache, Megatron-Core's StaticInferenceContext materialises only the last
    position's logits (`materialize_only_last_token_logits`), so the output layer sees one token per row;
    the recomputing path (no cache) computes every position's."""
    chunk = _model(mcore, llama_spec())
    seen = []
    layer = mcore.unwrap(chunk).output_layer
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        generation.generate(chunk, PROMPTS, vocab=50, seq_length=32, max_new_tokens=2, eod=-1, greedy=True)
        cached, seen[:] = list(seen), []
        generation.generate(chunk, PROMPTS, vocab=50, seq_length=32, max_new_tokens=2, eod=-1, greedy=True,
                            use_cache=False)
    finally:
        handle.remove()
    shortest = min(len(p) for p in PROMPTS)
    assert cached[0][0] == 1 and all(s[0] == 1 for s in cached)  # [s, b, h]: one position, prefill included
    assert seen[0][0] == shortest  # without the cache the prefill's output layer sees every position


@pytest.mark.parametrize("q_lora_rank", [24, 0], ids=["q-latent", "no-q-latent"])
def test_the_mla_rollout_cache_is_what_the_memory_model_plans(mcore, q_lora_rank):
    """compiler/memory.py `rollout_kv_cache` for a multi-latent attention model: every head's key of qk + pe
    channels and value of v_head_dim, as Megatron-Core's StaticInferenceContext holds them (no latent cache):
    the elements the context allocates over every layer, at 16-bit, equal the planned bytes."""
    from nemoc.compiler.memory import rollout_kv_cache

    spec = mla_spec(q_lora_rank=q_lora_rank)
    chunk = _model(mcore, spec)
    rows, length = 3, 20
    context = generation._context(rows, length)
    tokens = torch.randint(0, 50, (rows, 5))
    positions = torch.arange(5).expand(rows, 5)
    chunk.eval()
    with torch.no_grad():
        generation._forward(chunk, tokens, positions, context)
    cached = [t for kv in context.key_value_memory_dict.values() for t in kv if isinstance(t, torch.Tensor)]
    assert len(cached) == 2 * spec.layers  # one key and one value per layer
    planned = rollout_kv_cache(spec, mcore.single_layout(), seq=length, rows=rows, layers=spec.layers)
    assert sum(t.numel() for t in cached) * 2 == planned  # 16-bit in the plan; the test model is fp32
    assert {tuple(t.shape[-2:]) for t in cached} == {(4, 24), (4, 12)}  # heads x (16 + 8), heads x 12
