"""Multi-latent attention (DeepSeek-V2/V3) against a real Megatron-Core 0.16.1 MLA model on the CPU.

Differential tests of the compiler's MLA terms: the parameter count (`flops.param_counts`) against the
parameters of a GPTModel built as the runtime builds it (`megatron_args.transformer_config` ->
MLATransformerConfig, `model.layer_spec` -> the local spec with `multi_latent_attention=True`), with and
without a query latent (DeepSeek-V3 / DeepSeek-V2-Lite style); the activations one bf16 MLA layer keeps for
backward (`memory.layer_activations`) against the distinct storages its forward saves
(`torch.autograd.graph.saved_tensors_hooks`, as tests/runtime/test_recompute_modules.py measures them),
and what `recompute_modules = [mla_up_proj]` frees.

Run in a subprocess: building Megatron models needs the CPU adaptation and a process group, which must not
leak into the pytest process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

from nemoc.compiler.flops import param_counts
from nemoc.compiler.memory import layer_activations
from nemoc.compiler.spec import ModelSpec

S, B = 64, 2
# qk_head_dim + qk_pos_emb_head_dim = 24 != v_head_dim = 12: every MLA width differs from the others
MLA = ModelSpec(name="t", layers=2, hidden=64, heads=4, query_groups=4, ffn_hidden=160, vocab=128, seq_length=S,
                activation="gelu", norm="layernorm", multi_latent_attention=True, q_lora_rank=48, kv_lora_rank=32,
                qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12, qk_layernorm=True, rope_type="yarn",
                rope_scaling_factor=4.0, original_max_position_embeddings=16, mscale_all_dim=1.0)
NO_Q_LATENT = dataclasses.replace(MLA, q_lora_rank=0, rope_type="rope",
                                  rope_scaling_factor=1.0)
# the SDPA core on the CPU runs its flash kernel only for equal query and value head dims (else torch's
# math fallback, which keeps the scores); DeepSeek's are unequal, which GPUs' memory-efficient kernel takes
EQUAL_DIMS = dataclasses.replace(MLA, v_head_dim=24)

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from nemoc.runtime import mcore_cpu
    mcore_cpu.apply()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from nemoc.compiler.plan import Layout
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import megatron_args as margs, model as mdl

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    args = json.loads(sys.argv[1])
    S, B = args["s"], args["b"]
    facts = margs.MachineFacts(cpu=True, have_te=False)

    def layout(mods):
        return Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=B, global_batch=B, num_microbatches=1,
                      sequence_parallel=False, distributed_optimizer=False,
                      recompute="none" if mods is None else "selective", recompute_modules=mods)

    out = {"params": {}, "kept": {}}
    for name, fields in args["models"].items():
        spec = ModelSpec(**fields)
        cfg = margs.transformer_config(model=spec, layout=layout(None), precision="fp32", attention_backend="flash",
                                       facts=facts)
        (m,) = mdl.build_model_chunks(config=cfg, model=spec, vocab_size=spec.vocab, seq_length=S,
                                      attention_backend="flash", have_te=False)
        out["params"][name] = [type(cfg).__name__, sum(p.numel() for p in m.parameters())]
    for name, backend, mods in args["cases"]:
        spec = ModelSpec(**args["models"][name])
        mods = tuple(mods) if mods else None
        cfg = margs.transformer_config(model=spec, layout=layout(mods), precision="bf16", attention_backend=backend,
                                       facts=facts)
        ls = mdl.layer_spec(config=cfg, model=spec, attention_backend=backend, have_te=False)
        layer = TransformerLayer(cfg, ls.submodules, layer_number=1).to(torch.bfloat16)
        x = torch.randn(S, B, spec.hidden, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), diagonal=1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, _ = layer(x, attention_mask=mask)
        seen, kept = {p.untyped_storage().data_ptr() for p in layer.parameters()}, 0
        for t in saved:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                kept += st.nbytes()
        y.float().sum().backward()  # the recompute of the up projections runs (and must not fail)
        out["kept"][f"{name}/{backend}/{','.join(mods or ())}"] = kept
    print("RESULT " + json.dumps(out))
''')

MODELS = {"mla": MLA, "no_q_latent": NO_Q_LATENT, "equal_dims": EQUAL_DIMS}
CASES = [("mla", "unfused", None), ("mla", "unfused", ["mla_up_proj"]), ("no_q_latent", "unfused", None),
         ("no_q_latent", "unfused", ["mla_up_proj"]), ("equal_dims", "flash", None)]


@pytest.fixture(scope="module")
def measured():
    fields = {name: {f.name: getattr(m, f.name) for f in dataclasses.fields(m)} for name, m in MODELS.items()}
    args = dict(s=S, b=B, models=fields, cases=CASES)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def _modelled(model: ModelSpec, backend: str, modules) -> float:
    return layer_activations(model, seq=S, micro_batch=B, tp=1, sp=False, attention_backend=backend, act_bytes=2,
                             kernels="local", recompute="selective" if modules else "none",
                             recompute_modules=tuple(modules) if modules else None).total


@pytest.mark.slow  # one Megatron subprocess, ~25 s
def test_parameter_count_equals_megatrons_mla_model(measured):
    """Exact: 2 layers, h 64, 4 heads, q_lora 48 / none, kv_lora 32, qk 16 + pe 8, v 12 / 24, with the latents'
    LayerNorms (qk_layernorm): 92,096 (query latent), 88,832 (none), 101,312 (v 24)."""
    for name, model in MODELS.items():
        config_type, n = measured["params"][name]
        assert config_type == "MLATransformerConfig"
        assert n == param_counts(model).total, (name, n, param_counts(model))


@pytest.mark.slow
def test_activations_match_the_saved_tensors_of_megatrons_mla_layer(measured):
    """Measured on this tree (bf16, s 64, b 2; bytes kept by one layer, model in brackets): unfused core,
    query latent 471,040 (458,752), mla_up_proj frees 63,488 (61,440); no query latent 445,952 (434,176), frees
    63,488 (61,440); SDPA core with equal head dims 296,960 (288,768). The residuals: LayerNorm's per-token fp32
    mean and rstd (8 B per token per norm, four norms with the latents'), the rotary tables. Tolerance: 4 % of
    the layer's activations (the latents' norms are LayerNorms here: the local spec's torch RMSNorm on the CPU
    keeps more than the 4 B per element the model charges every local RMSNorm, latent or not)."""
    kept = measured["kept"]
    for name, backend, mods in CASES:
        model = MODELS[name]
        key = f"{name}/{backend}/{','.join(mods or ())}"
        assert abs(kept[key] - _modelled(model, backend, mods)) <= 0.04 * kept[key], (key, kept[key],
                                                                                     _modelled(model, backend, mods))
    for name in ("mla", "no_q_latent"):
        freed = kept[f"{name}/unfused/"] - kept[f"{name}/unfused/mla_up_proj"]
        modelled = _modelled(MODELS[name], "unfused", None) - _modelled(MODELS[name], "unfused", ["mla_up_proj"])
        assert abs(freed - modelled) <= 0.05 * freed, (name, freed, modelled)
