"""torchrun worker: load a converted checkpoint at TP=2 (tpsp: with sequence parallelism), PP=2 or EP=2 (MoE) and
save the full logits (last rank)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(converted: str, mode: str, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from build import build, layout

    from nemoc.runtime.align import common
    from nemoc.runtime.core import dist
    from nemoc.runtime.hf import convert
    from nemoc.runtime.hf.load import load_converted
    from nemoc.runtime.model import unwrap

    torch.set_num_threads(1)
    arch = convert.read_manifest(converted)["architecture"]
    # Megatron-Core needs sequence parallelism for MoE with TP > 1 (runtime/megatron_args.py _check_supported)
    sizes = {"tp": dict(tp=2, sequence_parallel=bool(arch.get("experts"))), "pp": dict(pp=2),
             "ep": dict(ep=2, dp=2), "tpsp": dict(tp=2, sequence_parallel=True)}[mode]
    lay = layout(**sizes)
    dist.init_distributed(layout=lay)
    dist.set_seed(1)
    from megatron.core import parallel_state as ps

    model = build(arch, lay)
    gpt = unwrap(model)
    pp = lay.pp
    load_converted(model, converted, vocab=arch["vocab"])  # what a stage starting from `init` calls
    tokens = torch.load(out + "/tokens.pt")
    batch = common.make_batch([(t, [1] * len(t)) for t in tokens.tolist()], tokens.shape[1] - 1)
    model.eval()
    with torch.no_grad():
        if pp == 1:
            logits = common.gather_logits(model, batch)
        elif ps.is_pipeline_first_stage():
            hidden = model(batch.tokens, batch.position_ids, batch.attention_mask)
            torch.distributed.send(hidden.contiguous(), dst=1)
            return
        else:
            s, b = batch.tokens.shape[1], batch.tokens.shape[0]
            hidden = torch.empty(s, b, arch["hidden"])
            torch.distributed.recv(hidden, src=0)
            gpt.set_input_tensor(hidden)
            logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        torch.save(logits[..., : arch["vocab"]].contiguous(), out + f"/logits_{mode}.pt")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:4])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
