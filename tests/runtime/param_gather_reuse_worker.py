"""Worker of test_train_param_gather.py's gradient-buffer test (torchrun, 2 ranks, DP 2): the same tiny GPT
trained 4 steps by the training core's `train_step` with the distributed optimizer and the overlapped
parameter all-gather, once with `reuse_grad_buf_for_mxfp8_param_ag` off and once on (the gather lands in the
gradient buffer, as the plan sets it for MXFP8 parameters; the gather path is the same for bf16 ones). A
checkpoint-style read (`ParamGather.synced()`) after step 2 and the loop's end (`release()`) record the
whole parameters, and after each step whether the parameter buffer still holds anything; rank 0 saves them to
ARGV[1] (torch.save: {mode: {"steps": [...], "left_in_buffer": [...], "saved": ..., "final": ...}}).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from nemoc.runtime import mcore_cpu

mcore_cpu.apply()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402

from nemoc.compiler.plan import Layout, Overlaps  # noqa: E402
from nemoc.compiler.spec import ModelSpec, OptimizerSpec, ScheduleSpec  # noqa: E402
from nemoc.runtime import megatron_args as margs  # noqa: E402
from nemoc.runtime import model as mdl  # noqa: E402
from nemoc.runtime.core import loop  # noqa: E402
from nemoc.runtime.core.build import optimizer_for  # noqa: E402
from nemoc.runtime.core.param_gather import ParamGather  # noqa: E402

SPEC = ModelSpec(name="t", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=128, vocab=128, seq_length=32)
LAYOUT = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=2, micro_batch=2, global_batch=4, num_microbatches=1,
                sequence_parallel=False, distributed_optimizer=True, recompute="none", overlap_param_gather=True,
                fp8_param_gather=True)  # DDP asserts fp8_param_gather with the reuse; bf16 parameters here (no TE)
OVERLAPS = Overlaps(grad_reduce=True, param_gather=True, p2p=False, tp_comm=False, align_param_gather=False)


def whole(chunks) -> dict:
    return {n: p.detach().float().clone() for n, p in chunks[0].module.named_parameters()}


def train(reuse: bool) -> dict:
    torch.manual_seed(7)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    facts = margs.MachineFacts(cpu=True, have_te=False)
    config = margs.transformer_config(model=SPEC, layout=dataclasses.replace(LAYOUT, fp8_param_gather=False),
                                      precision="bf16", attention_backend="unfused", facts=facts)
    built = mdl.build_model_chunks(config=config, model=SPEC, vocab_size=128, seq_length=32,
                                   attention_backend="unfused", have_te=False)
    chunks = mdl.wrap_ddp(chunks=built, config=config, ddp_config=margs.ddp_config(
        layout=LAYOUT, overlaps=OVERLAPS, cpu=True, reuse_grad_buf=reuse))
    optimizer, scheduler = optimizer_for(model=chunks, optimizer=OptimizerSpec(lr=1e-2), schedule=ScheduleSpec(),
                                         layout=LAYOUT, precision="bf16", steps=4, reuse_grad_buf=reuse)
    gather = ParamGather(chunks, config, optimizer)
    gather.hold()
    rank = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(100 + rank)
    positions = torch.arange(32).unsqueeze(0).expand(2, -1)

    def forward_step(data, chunk):
        tokens = next(data)
        out = chunk(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        return out, lambda o: (o.float().mean(), {"lm loss": torch.stack([o.float().sum().detach(),
                                                                          torch.tensor(float(o.numel()))])})

    record = {"steps": [], "left_in_buffer": []}
    for step in range(1, 5):
        batch = torch.randint(0, 128, (2, 33), generator=generator)
        _, grad_norm, ok, _ = loop.train_step(forward_step=forward_step, iterators=iter([batch]), model=chunks,
                                              optimizer=optimizer, scheduler=scheduler, layout=LAYOUT,
                                              seq_length=32, step=step, gather=gather)
        gather.after_step(ok)
        record["steps"].append(grad_norm)
        # the parameter buffer is the MXFP8 gradients' (shared_buffer): nothing may be left in it after a step's
        # forward (the pre-hooks zero what they gathered; on this bf16 CPU model it is a buffer of its own)
        record["left_in_buffer"].append(any(bool(b.param_data.count_nonzero()) for c in chunks
                                            for g in c.bucket_groups for b in g.buckets) if reuse else False)
        if step == 2:
            with gather.synced():  # what a checkpoint save reads
                record["saved"] = whole(chunks)
    gather.release()  # the loop's end: the final save reads these
    record["final"] = whole(chunks)
    return record


def main() -> None:
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1)
    results = {mode: train(mode == "reuse") for mode in ("plain", "reuse")}
    if torch.distributed.get_rank() == 0:
        torch.save(results, sys.argv[1])
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
