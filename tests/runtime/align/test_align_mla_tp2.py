"""LoRA on a multi-latent attention model under tensor parallelism (2 processes): Megatron-Core's local spec
builds every MLA projection column-parallel (the down projections' output shards are gathered inside
MLASelfAttention), and each adapter follows the column rule (A replicated, B sharded with the output rows).
Three LoRA SFT steps at TP=2, with and without sequence parallelism, lose what they lose at TP=1 (plain SGD)
and the TP=2 adapters reshard into the TP=1 model and equal its adapters -- all but the rows of the RoPE key,
where Megatron-Core 0.16.1 itself drops part of the gradient (second test, a strict xfail that says why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align_helpers import instruction_samples, mapping, mla_spec, mla_tp_settings

HERE = Path(__file__).parent


KV_LORA = 16  # mla_spec's kv_lora_rank: rows [0, 16) of linear_kv_down_proj are the latent, [16, 24) the RoPE key


@pytest.fixture(scope="module")
def mla_tp2(tmp_path_factory, mcore):
    """The TP=2 worker's run on the MLA model, and the same three LoRA steps at TP=1 (model, losses)."""
    from nemoc.compiler.spec import LoraSpec
    from nemoc.runtime.align import lora, sft, trainer

    out = tmp_path_factory.mktemp("mla_tp2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "tp2_worker.py"), str(out), "mla"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    spec = mla_spec(seq_length=16, vocab=256)
    model = mcore.build_gpt(spec, mcore.single_layout())
    mcore.load_model(model, out / "base")
    names = lora.apply_lora(model, LoraSpec(rank=4, alpha=8.0, dropout=0.0), seed=7)
    assert any(n.endswith("linear_kv_down_proj") for n in names)
    samples = instruction_samples(16, seed=1, f=mapping(0))
    tr = trainer.Trainer(model, layout=mcore.single_layout(global_batch=8, micro_batch=4), **mla_tp_settings())
    history = trainer.run_steps(tr, items=[[s] for s in samples], steps=3, global_batch=8,
                                to_microbatches=lambda share: sft.rows_to_batches(share, 16, 4),
                                forward=sft.forward, seq_length=16)
    fresh = mcore.build_gpt(spec, mcore.single_layout())
    mcore.load_model(fresh, out / "base")
    lora.apply_lora(fresh, LoraSpec(rank=4, alpha=8.0, dropout=0.0), seed=99)
    lora.load_adapters(fresh, out / "adapters")
    return out, spec, model, fresh, [h["loss"] for h in history]


@pytest.mark.slow
def test_mla_lora_under_tp2_matches_tp1(mcore, mla_tp2):
    """About 40 s (a 2-process torchrun). Every adapter but the RoPE-key rows of linear_kv_down_proj's B (next
    test) equals TP=1's after three steps, and so does the merge."""
    from nemoc.runtime.align import lora

    out, spec, model, fresh, tp1 = mla_tp2
    assert tp1[-1] < tp1[0]
    for name in ("lora_tp2.json", "lora_tp2_sp.json"):
        tp2 = json.loads((out / name).read_text())
        assert len(tp2) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(tp1, tp2)), (name, tp1, tp2)
    for (name, mine), (_, theirs) in zip(lora.adapters(model).items(), lora.adapters(fresh).items()):
        if name.endswith("linear_kv_down_proj.lora_b"):
            mine, theirs = mine[:KV_LORA], theirs[:KV_LORA]
        torch.testing.assert_close(mine, theirs, atol=2e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="Megatron-Core 0.16.1's MLA on the local spec at TP > 1 gathers "
                   "linear_kv_down_proj's column-parallel output with gather_from_tensor_model_parallel_region, whose "
                   "backward only splits: the shared RoPE key's gradient keeps the local heads' part, the other "
                   "ranks' heads' part is dropped (the latent part is complete: linear_kv_up_proj all-reduces its "
                   "input gradient). Strict: passes the day Megatron-Core sums it.")
def test_the_rope_key_rows_under_tp2_match_tp1(mla_tp2):
    from nemoc.runtime.align import lora

    _, _, model, fresh, _ = mla_tp2
    for (name, mine), (_, theirs) in zip(lora.adapters(model).items(), lora.adapters(fresh).items()):
        if name.endswith("linear_kv_down_proj.lora_b"):
            torch.testing.assert_close(mine[KV_LORA:], theirs[KV_LORA:], atol=2e-4, rtol=1e-3)
