"""Pretraining runtime overhead per step on CPU, side by side in one process: the training core's loop
as `nemoc.runtime.train` runs it (core.loop.train_loop over GPTDataset micro-batches from
runtime.train.micro_batches, gpt_forward_step, the NaN/Inf check and rerun snapshot, the stop signal,
a record every `log_every` = 4 steps into a real metrics.jsonl and console sink) vs a bare Megatron-Core
loop (get_forward_backward_func + optimizer + scheduler) fed the same GPTDataset samples collated by
torch's default_collate inside the step, each side on its own model, optimizer and scheduler built
the same way (runtime.core.build, same seed). The two loops alternate in chunks of 4 steps
(side_by_side.interleave: the runtime's chunk is one train_loop call ending in its metrics record);
wall and process CPU time per chunk, the first pairs dropped. The fresh-process comparison
(bench_runtime_overhead.py) adds torchrun and the whole stage around the loop; this one pairs the two
loops within a fraction of a second, so that the noise of a shared host cancels in each pair's ratio. Run by
bench_runtime_overhead.py (the `pretrain_in_process` section of its JSON)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(*, task_path: str, pairs: int, warmup_pairs: int = 2, log_every: int = 4) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from torch.utils.data import default_collate

    from side_by_side import interleave
    from nemoc.runtime import train as T
    from nemoc.runtime.core.dist import StopSignal
    from nemoc.runtime.metrics import Metrics

    torch.set_num_threads(1)
    task = T.load_task(task_path)
    stage, plan = task.stage, task.plan
    T.init_distributed(layout=stage.layout)
    facts, _ = T.kernel_setup(stage.kernels)
    dataset, _ = T.build_gpt_datasets(task=task, stage=stage, seed=stage.seed)
    lay = stage.layout
    seq, mb, n_micro = stage.seq_length, lay.micro_batch, lay.num_microbatches
    work = tempfile.mkdtemp(prefix="nemoc_pretrain_overhead_")
    console = open(os.devnull, "w")
    total_steps = (pairs + warmup_pairs) * log_every

    def fresh():
        T.set_seed(stage.seed)
        model, _, _ = T.build_model(plan=plan, stage=stage, vocab_size=task.vocab_size, facts=facts)
        optimizer, scheduler = T.build_optimizer(model=model, stage=stage, precision=stage.execution.precision,
                                                 steps=total_steps)
        return model, optimizer, scheduler

    # the runtime side: the stage's loop, sink and iterators, `log_every` steps per call (one record each)
    rt_model, rt_optimizer, rt_scheduler = fresh()
    sink = Metrics(metrics_path=os.path.join(work, "metrics.jsonl"), tensorboard_dir=None, total_steps=total_steps,
                   console=console, use_rich=False)
    rt_iterators = T.chunk_iterators(lambda: T.ReplayableIterator(T.micro_batches(
        dataset, start_sample=0, micro_batch=mb, dp_rank=0, dp_size=1)), len(rt_model))
    rt_state, stop = T.LoopState(), StopSignal().install()
    throughput = T.throughput_for(plan=plan, stage=stage)

    def runtime_chunk():
        T.train_loop(model=rt_model, optimizer=rt_optimizer, scheduler=rt_scheduler, stage=stage,
                     forward_step=T.gpt_forward_step, train_iterators=rt_iterators, state=rt_state,
                     end_iteration=rt_state.iteration + log_every, checkpointer=None, make_checkpoint_state=None,
                     metrics=sink, throughput=throughput, stop=stop)

    def loss_func(loss_mask, output_tensor):  # = runtime.train.masked_lm_loss
        losses = output_tensor.float().view(-1)
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        tokens = mask.sum()
        return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens.detach()])}

    def forward_step(data_iterator, module):
        batch = next(data_iterator)
        output = module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, lambda out, mask=batch["loss_mask"]: loss_func(mask, out)

    # the bare side: the same samples in the same order, default_collate, the schedule and the optimizer
    bare_model, bare_optimizer, bare_scheduler = fresh()
    fb = get_forward_backward_func()
    bare_step = [0]

    def bare_chunk():
        for _ in range(log_every):
            first = bare_step[0] * n_micro * mb
            batches = (default_collate([dataset[(first + i * mb + k) % len(dataset)] for k in range(mb)])
                       for i in range(n_micro))
            for chunk in bare_model:
                chunk.zero_grad_buffer()
            bare_optimizer.zero_grad()
            fb(forward_step_func=forward_step, data_iterator=batches, model=bare_model, num_microbatches=n_micro,
               seq_length=seq, micro_batch_size=mb, decoder_seq_length=seq, forward_only=False)
            ok, _, _ = bare_optimizer.step()
            if ok:
                bare_scheduler.step(increment=1)
            bare_step[0] += 1

    try:
        result = interleave(runtime_chunk, bare_chunk, pairs=pairs, warmup_pairs=warmup_pairs,
                            steps_per_chunk=log_every)
    finally:
        stop.uninstall()
        sink.close()
    return {"what": "pretraining, one process: chunks of 4 steps of each loop, alternating", **result,
            "runtime_final_loss": rt_state.last_loss}


if __name__ == "__main__":
    import json

    from nemoc.runtime.core.dist import teardown

    try:
        print(json.dumps(measure(task_path=sys.argv[1], pairs=int(sys.argv[2])), indent=1))
    finally:
        teardown()
