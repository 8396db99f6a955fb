"""Tiny model specs and helpers shared by the alignment tests (imported as `align_helpers`)."""

from __future__ import annotations


def llama_spec(**overrides):
    from nemoc.compiler.spec import ModelSpec

    base = dict(name="tiny-llama", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=96, vocab=50,
                seq_length=32, activation="swiglu", norm="rmsnorm", position="rope", rotary_base=10000.0)
    base.update(overrides)
    return ModelSpec(**base)


def gpt2_spec(**overrides):
    from nemoc.compiler.spec import ModelSpec

    base = dict(name="tiny-gpt2", layers=2, hidden=64, heads=4, query_groups=4, ffn_hidden=128, vocab=50,
                seq_length=32, activation="gelu", norm="layernorm", position="learned", add_bias_linear=True,
                tie_embeddings=True)
    base.update(overrides)
    return ModelSpec(**base)
