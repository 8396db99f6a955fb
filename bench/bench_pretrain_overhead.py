"""Pretraining runtime overhead per step on CPU, side by side in one process: the training core's loop
as `nemoc.runtime.train` runs it (core.loop.train_loop over GPTDataset micro-batches from
runtime.train.micro_batches, gpt_forward_step, the NaN/Inf check and rerun snapshot, the stop signal,
a record every `log_every` = 4 steps into a real metrics.jsonl and console sink) vs a bare Megatron-Core
loop (get_forward_backward_func + optimizer + scheduler) fed the same GPTDataset samples collated by
torch's default_collate inside the step, on a model, optimizer and scheduler built the same way
(runtime.core.build) afresh for each side of each round. Rounds alternate which side starts; wall and
process CPU time per step over each interval of 4 steps, the first interval dropped. The fresh-process
comparison (bench_runtime_overhead.py) adds torchrun and the whole stage around the loop; this one pairs
the two loops closely in time, so that the noise of a shared host cancels better. Run by
bench_runtime_overhead.py (the `pretrain_in_process` section of its JSON)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(*, task_path: str, steps: int, rounds: int, log_every: int = 4, warmup: int = 4) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from torch.utils.data import default_collate

    from bench_sft_overhead import compare
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

    def fresh():
        T.set_seed(stage.seed)
        model, _, _ = T.build_model(plan=plan, stage=stage, vocab_size=task.vocab_size, facts=facts)
        optimizer, scheduler = T.build_optimizer(model=model, stage=stage, precision=stage.execution.precision)
        return model, optimizer, scheduler

    def runtime_side():
        model, optimizer, scheduler = fresh()
        stamps = [(time.perf_counter(), time.process_time())]

        class Stamped(Metrics):  # the stage's sink, stamped as each record arrives
            def log(self, record):
                stamps.append((time.perf_counter(), time.process_time()))
                super().log(record)

        path = os.path.join(work, "metrics.jsonl")
        if os.path.exists(path):
            os.remove(path)
        sink = Stamped(metrics_path=path, tensorboard_dir=None, total_steps=steps, console=console, use_rich=False)
        iterators = T.chunk_iterators(lambda: T.ReplayableIterator(T.micro_batches(
            dataset, start_sample=0, micro_batch=mb, dp_rank=0, dp_size=1)), len(model))
        stop = StopSignal().install()
        try:
            T.train_loop(model=model, optimizer=optimizer, scheduler=scheduler, stage=stage,
                         forward_step=T.gpt_forward_step, train_iterators=iterators, state=T.LoopState(),
                         end_iteration=steps, checkpointer=None, make_checkpoint_state=None, metrics=sink,
                         throughput=T.throughput_for(plan=plan, stage=stage), stop=stop)
        finally:
            stop.uninstall()
            sink.close()
        wall = [(b[0] - a[0]) / log_every for a, b in zip(stamps, stamps[1:])]
        cpu = [(b[1] - a[1]) / log_every for a, b in zip(stamps, stamps[1:])]
        return wall[warmup // log_every:], cpu[warmup // log_every:]

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

    def bare_side():
        model, optimizer, scheduler = fresh()
        fb = get_forward_backward_func()
        times, cpu = [], []
        for step in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            first = step * n_micro * mb
            batches = (default_collate([dataset[(first + i * mb + k) % len(dataset)] for k in range(mb)])
                       for i in range(n_micro))
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            fb(forward_step_func=forward_step, data_iterator=batches, model=model, num_microbatches=n_micro,
               seq_length=seq, micro_batch_size=mb, decoder_seq_length=seq, forward_only=False)
            ok, _, _ = optimizer.step()
            if ok:
                scheduler.step(increment=1)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)

        def grouped(values):
            return [sum(values[i:i + log_every]) / log_every
                    for i in range(0, len(values) - log_every + 1, log_every)][warmup // log_every:]

        return grouped(times), grouped(cpu)

    runtime, bare, runtime_cpu, bare_cpu, loads = [], [], [], [], []
    for round_ in range(rounds):
        if round_ % 2 == 0:
            (b, b_cpu), (r, r_cpu) = bare_side(), runtime_side()
        else:
            (r, r_cpu), (b, b_cpu) = runtime_side(), bare_side()
        runtime.append(r)
        bare.append(b)
        runtime_cpu.append(r_cpu)
        bare_cpu.append(b_cpu)
        loads.append(os.getloadavg()[0])
    return {"what": "pretraining, one process", "steps": steps, "rounds": rounds, "interval_steps": log_every,
            "warmup_steps_dropped": warmup, **compare(runtime, bare, runtime_cpu, bare_cpu),
            "load_average_1min_per_round": loads}


if __name__ == "__main__":
    import json

    from nemoc.runtime.core.dist import teardown

    try:
        print(json.dumps(measure(task_path=sys.argv[1], steps=int(sys.argv[2]), rounds=int(sys.argv[3])), indent=1))
    finally:
        teardown()
