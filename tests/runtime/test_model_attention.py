"""The SDPA attention core (`flash`) computes what Megatron's DotProductAttention (`unfused`) does.

Run in a subprocess: building Megatron models needs the CPU adaptation and a process group, which
must not leak into the pytest process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, torch
    from nemoc.runtime import mcore_cpu
    mcore_cpu.apply()
    from megatron.core import parallel_state, tensor_parallel
    from nemoc.compiler.plan import Layout
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import megatron_args as margs, model as mdl

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    spec = ModelSpec(name="t", layers=2, hidden=64, heads=8, query_groups=2, ffn_hidden=128, vocab=128,
                     seq_length=48)
    lay = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=2, global_batch=2,
                 num_microbatches=1, sequence_parallel=False, distributed_optimizer=False, recompute="none")
    facts = margs.MachineFacts(cpu=True, have_te=False)
    out = {}
    models = {}
    for backend in ("unfused", "flash"):
        torch.manual_seed(7); tensor_parallel.model_parallel_cuda_manual_seed(7)
        cfg = margs.transformer_config(model=spec, layout=lay, precision="fp32", attention_backend=backend,
                                       facts=facts)
        (m,) = mdl.build_model_chunks(config=cfg, model=spec, vocab_size=128, seq_length=48,
                                      attention_backend=backend, have_te=False)
        models[backend] = m
        out[backend + "_core"] = type(m.decoder.layers[0].self_attention.core_attention).__name__
    models["flash"].load_state_dict(models["unfused"].state_dict())
    tokens = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(48).expand(2, -1)
    logits, grads = {}, {}
    for backend, m in models.items():
        y = m(tokens, pos, None)
        y.float().pow(2).mean().backward()
        logits[backend] = y.detach()
        grads[backend] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    out["logit_max_abs_diff"] = float((logits["flash"] - logits["unfused"]).abs().max())
    out["logit_scale"] = float(logits["unfused"].abs().max())
    out["grad_max_abs_diff"] = float((grads["flash"] - grads["unfused"]).abs().max())
    out["grad_scale"] = float(grads["unfused"].abs().max())
    # causality: changing the last token must not change earlier positions' logits
    t2 = tokens.clone(); t2[:, -1] = (t2[:, -1] + 1) % 128
    with torch.no_grad():
        y2 = models["flash"](t2, pos, None)
    out["causal_leak"] = float((y2[:, :-1] - logits["flash"][:, :-1]).abs().max())
    print("RESULT " + json.dumps(out))
''')


def test_sdpa_core_matches_megatron_dot_product_attention():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[0][len("RESULT "):])
    assert res["flash_core"] == "SDPAttention" and res["unfused_core"] == "DotProductAttention"
    assert res["logit_max_abs_diff"] <= 1e-5 * max(res["logit_scale"], 1.0), res
    assert res["grad_max_abs_diff"] <= 1e-5 * max(res["grad_scale"], 1.0), res
    assert res["causal_leak"] == 0.0, res
