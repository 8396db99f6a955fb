"""Dense layers inside a MoE model (`moe_layer_freq`, `moe_first_dense_layers`) against Megatron-Core 0.16.1 on
the CPU: the parameters of the GPTModel the runtime builds (`model.build_model_chunks` with
`megatron_args.transformer_config`) equal `flops.param_counts` and those of the model Megatron-Core builds
itself from the same TransformerConfig (gpt_layer_specs.py `get_gpt_decoder_block_spec`, which reads
`moe_layer_freq`), for an integer frequency, a 0 / 1 list and a dense prefix; the layers it builds are the
pattern's (a dense MLP where it says 0, a MoELayer where it says 1).

Run in a subprocess: building Megatron models needs the CPU adaptation and a process group, which must not
leak into the pytest process.
"""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from nemoc.compiler.flops import param_counts
from nemoc.compiler.spec import ModelSpec

from mcore_models_script import run_models_script

BASE = ModelSpec(name="t", layers=4, hidden=32, heads=4, query_groups=2, ffn_hidden=96, vocab=128, seq_length=16,
                 experts=4, top_k=2, moe_ffn_hidden=24, shared_expert_ffn_hidden=40)
MODELS = {
    "every_second": dataclasses.replace(BASE, moe_layer_freq=2),  # layers 0 and 2 expert layers
    "list": dataclasses.replace(BASE, moe_layer_freq=(0, 1, 1, 0)),
    "first_dense": dataclasses.replace(BASE, moe_first_dense_layers=1),  # DeepSeek's first_k_dense_replace
    "all_moe": BASE,
}

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from nemoc.runtime import mcore_cpu
    mcore_cpu.apply()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from nemoc.compiler.plan import Layout
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import megatron_args as margs, model as mdl

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    facts = margs.MachineFacts(cpu=True, have_te=False)
    layout = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=1, num_microbatches=1,
                    sequence_parallel=False, distributed_optimizer=False, recompute="none")
    out = {}
    for name, fields in json.loads(sys.argv[1]).items():
        if isinstance(fields["moe_layer_freq"], list):
            fields["moe_layer_freq"] = tuple(fields["moe_layer_freq"])
        spec = ModelSpec(**fields)
        cfg = margs.transformer_config(model=spec, layout=layout, precision="fp32", attention_backend="unfused",
                                       facts=facts)
        (ours,) = mdl.build_model_chunks(config=cfg, model=spec, vocab_size=spec.vocab, seq_length=spec.seq_length,
                                         attention_backend="unfused", have_te=False)
        block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
        theirs = GPTModel(config=cfg, transformer_layer_spec=block,
                          vocab_size=spec.vocab, max_sequence_length=spec.seq_length,
                          position_embedding_type="rope")
        out[name] = dict(
            freq=cfg.moe_layer_freq, ours=sum(p.numel() for p in ours.parameters()),
            theirs=sum(p.numel() for p in theirs.parameters()),
            layers=[int(isinstance(layer.mlp, MoELayer)) for layer in ours.decoder.layers])
        tokens = torch.randint(0, spec.vocab, (1, spec.seq_length))
        position = torch.arange(spec.seq_length)[None]
        loss = ours(tokens, position, None, labels=tokens).float().mean()
        loss.backward()  # forward and backward through both kinds of layers
        out[name]["loss"] = float(loss)
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def measured():
    return run_models_script(SCRIPT, MODELS)


@pytest.mark.slow  # one Megatron subprocess, ~20 s
def test_parameter_counts_equal_megatron_cores_models(measured):
    """Exact, three ways: nemoc's count = the runtime's model = Megatron-Core's own `get_gpt_decoder_block_spec`
    model. The dense layers hold ffn_hidden MLPs (96) instead of 4 experts of 24, a shared expert of 40 and a
    router, so the counts differ between the patterns (and from every layer MoE)."""
    for name, model in MODELS.items():
        m = measured[name]
        assert m["ours"] == m["theirs"] == param_counts(model).total, (name, m, param_counts(model))
    assert len({measured[n]["ours"] for n in MODELS}) == 3  # every_second and list both have 2 expert layers
    assert measured["every_second"]["ours"] == measured["list"]["ours"] != measured["all_moe"]["ours"]


@pytest.mark.slow
def test_the_runtime_builds_the_plans_pattern(measured):
    assert measured["every_second"]["freq"] == 2 and measured["all_moe"]["freq"] == 1  # an int stays an int
    assert measured["list"]["freq"] == [0, 1, 1, 0]
    assert measured["first_dense"]["freq"] == [0, 1, 1, 1]  # the dense prefix as Megatron-Bridge writes it
    for name, model in MODELS.items():
        assert tuple(measured[name]["layers"]) == model.moe_layer_pattern, name
        assert measured[name]["loss"] > 0


def test_megatron_lm_flag_is_a_list_expression():
    """Megatron-LM's --moe-layer-freq (arguments.py moe_freq_type) takes an int or a Python list expression."""
    from nemoc.runtime.megatron_args import _flags

    assert _flags({"moe_layer_freq": [0, 0, 0] + [1] * 58}) == ["--moe-layer-freq '[0]*3+[1]*58'"]
    assert _flags({"moe_layer_freq": 2}) == ["--moe-layer-freq 2"]
    assert _flags({"moe_layer_freq": 1}) == []
