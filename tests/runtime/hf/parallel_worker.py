"""torchrun worker: load a converted checkpoint at TP=2 or PP=2 and save the full logits (rank 0 / last)."""

from __future__ import annotations

import sys

import torch


def main(converted: str, mode: str, out: str) -> None:
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime.align import common
    from nemoc.runtime.hf import convert
    from nemoc.runtime.hf.load import load_converted
    from nemoc.runtime.model import unwrap

    torch.set_num_threads(1)
    tp, pp = (2, 1) if mode == "tp" else (1, 2)
    common.init_distributed(tp=tp, pp=pp, seed=1)
    from megatron.core import parallel_state as ps

    arch = convert.read_manifest(converted)["architecture"]
    spec = ModelSpec(name="hf", **arch)
    model = common.build_gpt(spec, common.single_layout(tp=tp, pp=pp))
    gpt = unwrap(model)
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
