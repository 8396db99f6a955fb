"""A GPTModel chunk for the conversion tests, built by the runtime's own adapters (runtime.megatron_args,
runtime.model: what pretraining builds) with Megatron-Core's local layer spec and the unfused attention
core, so MoE models (which the alignment stages' build_gpt refuses) are built the same way as dense ones."""

from __future__ import annotations

from nemoc.compiler.plan import Layout
from nemoc.compiler.spec import ModelSpec


def layout(*, tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 1, sequence_parallel: bool = False) -> Layout:
    return Layout(tp=tp, pp=pp, vp=None, cp=1, ep=ep, etp=1, dp=dp, micro_batch=1, global_batch=dp,
                  num_microbatches=1, sequence_parallel=sequence_parallel, distributed_optimizer=False,
                  recompute="none")


def build(arch: dict, lay: Layout):
    from nemoc.runtime import mcore_cpu
    from nemoc.runtime import megatron_args as margs
    from nemoc.runtime import model as mmodel

    spec = ModelSpec(name="hf", **arch)
    facts = margs.MachineFacts(cpu=mcore_cpu.is_applied(), have_te=False)
    config = margs.transformer_config(model=spec, layout=lay, precision="fp32", attention_backend="unfused",
                                      facts=facts)
    (chunk,) = mmodel.build_model_chunks(config=config, model=spec, vocab_size=margs.padded_vocab_size(spec.vocab, lay.tp),
                                         seq_length=spec.seq_length, attention_backend="unfused", have_te=False)
    return chunk
