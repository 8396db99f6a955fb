"""Run under `torchrun --nproc-per-node 2`: a TP=2 model's logits + checkpoint (for export), and two LoRA
SFT steps under TP=2 (losses, adapters, merged checkpoint), compared at TP=1 by test_align_tp2.py (a Llama-style
model) and test_align_mla_tp2.py (argument `mla`: multi-latent attention, its column-parallel projections'
adapters with and without sequence parallelism, and one SGD step on every base weight, with and without it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from align_helpers import instruction_samples, llama_spec, mapping, mla_spec, mla_tp_settings, stage_settings  # noqa: E402

from nemoc.compiler.spec import LoraSpec  # noqa: E402
from nemoc.runtime.align import common, lora, sft, trainer  # noqa: E402


def main(out: Path, model_kind: str = "llama") -> None:
    torch.set_num_threads(1)
    common.init_distributed(tp=2, pp=1, seed=0)
    rank = torch.distributed.get_rank()
    # no vocabulary padding at tp=1 or tp=2: same softmax
    spec = (mla_spec if model_kind == "mla" else llama_spec)(seq_length=16, vocab=256)
    settings = mla_tp_settings() if model_kind == "mla" else stage_settings(steps=3, lr=1e-2)
    layout = common.single_layout(tp=2)
    common.seed_all(21)
    model = common.build_gpt(spec, layout)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "layernorm" in name:  # same perturbation on both ranks (norms are replicated)
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    tokens = torch.randint(0, spec.vocab, (2, 13), generator=torch.Generator().manual_seed(4))
    batch = common.make_batch([(t, [1] * len(t)) for t in tokens.tolist()], 12)
    with torch.no_grad():
        logits = common.gather_logits(model, batch)[..., : spec.vocab]
    common.save_model(model, out / "base")
    if rank == 0:
        torch.save({"tokens": tokens, "logits": logits}, out / "logits_tp2.pt")

    lora.apply_lora(model, LoraSpec(rank=4, alpha=8.0, dropout=0.0), seed=7)
    samples = instruction_samples(16, seed=1, f=mapping(0))
    tr = trainer.Trainer(model, layout=common.single_layout(tp=2, global_batch=8, micro_batch=4),
                         **settings)
    history = trainer.run_steps(tr, items=[[s] for s in samples], steps=3, global_batch=8,
                                to_microbatches=lambda share: sft.rows_to_batches(share, 16, 4),
                                forward=sft.forward, seq_length=16)
    lora.save_adapters(model, out / "adapters", info={})
    lora.merge(model)
    common.save_model(model, out / "merged")
    if rank == 0:
        (out / "lora_tp2.json").write_text(json.dumps([h["loss"] for h in history]))

    # the same LoRA run with sequence parallelism (adapters gather / scatter along the sequence)
    sp_layout = common.single_layout(tp=2, global_batch=8, micro_batch=4, sequence_parallel=True)
    sp_model = common.build_gpt(spec, sp_layout)
    common.load_model(sp_model, out / "base")
    lora.apply_lora(sp_model, LoraSpec(rank=4, alpha=8.0, dropout=0.0), seed=7)
    tr = trainer.Trainer(sp_model, layout=sp_layout, **settings)
    history = trainer.run_steps(tr, items=[[s] for s in samples], steps=3, global_batch=8,
                                to_microbatches=lambda share: sft.rows_to_batches(share, 16, 4),
                                forward=sft.forward, seq_length=16)
    if model_kind == "mla":
        lora.save_adapters(sp_model, out / "adapters_sp", info={})
    if rank == 0:
        (out / "lora_tp2_sp.json").write_text(json.dumps([h["loss"] for h in history]))
    if model_kind == "mla":
        for sp in (False, True):
            base_sgd_step(spec, common.single_layout(tp=2, global_batch=8, micro_batch=4, sequence_parallel=sp),
                          base=out / "base", samples=samples, out=out / f"sgd_tp2{'_sp' if sp else ''}")
    common.teardown_distributed()


def base_sgd_step(spec, layout, *, base: Path, samples, out: Path) -> None:
    """One plain SGD step (mla_tp_settings: lr 0.5, no clipping) on every base weight from `base`, saved to
    `out`: W - lr * grad, so the test reads the gradient back at any TP size through the checkpoint's
    resharding (test_align_mla_tp2.py: the base-weight gradients at TP=2, with and without sequence
    parallelism, against TP=1's)."""
    model = common.build_gpt(spec, layout)
    common.load_model(model, base)
    tr = trainer.Trainer(model, layout=layout, **mla_tp_settings())
    trainer.run_steps(tr, items=[[s] for s in samples], steps=1, global_batch=8,
                      to_microbatches=lambda share: sft.rows_to_batches(share, 16, 4),
                      forward=sft.forward, seq_length=16)
    common.save_model(model, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
