"""SFT runtime overhead per step on CPU, side by side in one process: the alignment runtime's SFT steps
on the training core's loop (runtime.align.trainer.fit -> core.loop.train_loop: the step's data-parallel
share, packed rows -> micro-batches, the core's NaN/Inf rerun, named reports, the agreed stop signal, a
record every `log_every` = 4 steps into a real metrics.jsonl and console sink) vs a bare Megatron-Core
loop (get_forward_backward_func + optimizer + scheduler) on the same rows, each side on its own model
and optimizer built the same way (same seed); both sides pack each step's rows into micro-batches
inside the step (sft.rows_to_batches: the same data path). The two loops alternate in chunks of 4
steps (side_by_side.interleave), wall and process CPU time per chunk, the first pairs dropped. Run by
bench_runtime_overhead.py (the `sft` section of its JSON)."""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time

import torch


def _rows(n: int, seq: int, vocab: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(seq // 2, seq)  # one sample per row, prompt half masked out
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        rows.append([(ids, [0] * (length // 2) + [1] * (length - length // 2))])
    return rows


def _spec(seq: int, vocab: int):
    from nemoc.compiler.spec import ModelSpec

    return ModelSpec(name="gpt-smoke", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=128, vocab=vocab,
                     seq_length=seq, activation="swiglu", norm="rmsnorm", position="rope", rotary_base=10000.0)


def _settings(steps: int):
    from nemoc.compiler.spec import OptimizerSpec, ScheduleSpec

    return dict(optimizer=OptimizerSpec(lr=1e-3, weight_decay=0.0, grad_clip=1.0),
                schedule=ScheduleSpec(name="constant", warmup=0), steps=steps)


def measure(*, pairs: int = 60, warmup_pairs: int = 2, seq: int = 64, vocab: int = 256, micro_batch: int = 2,
            global_batch: int = 4, log_every: int = 4) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from side_by_side import interleave
    from nemoc.runtime.align import common, sft, trainer
    from nemoc.runtime.core.dist import StopSignal
    from nemoc.runtime.metrics import Metrics

    torch.set_num_threads(1)
    common.init_distributed(tp=1, pp=1, seed=1234)
    spec = _spec(seq, vocab)
    layout = common.single_layout(micro_batch=micro_batch, global_batch=global_batch)
    steps = (pairs + warmup_pairs) * log_every
    rows = _rows(steps * global_batch, seq, vocab, seed=0)
    per_step = global_batch // micro_batch

    def fresh():
        common.seed_all(1234)
        return trainer.Trainer(common.build_gpt(spec, layout), layout=layout, **_settings(steps))

    work = tempfile.mkdtemp(prefix="nemoc_sft_overhead_")
    console = open(os.devnull, "w")
    # the runtime side: the stage's fit (core loop), sink and stop signal, `log_every` steps per call
    rt = fresh()
    sink = Metrics(metrics_path=os.path.join(work, "metrics.jsonl"), tensorboard_dir=None, total_steps=steps,
                   console=console, use_rich=False)
    stop, done = StopSignal().install(), [0]
    stage = trainer.Steps(layout=layout, seq_length=seq, log_every=log_every)

    def runtime_chunk():
        trainer.fit(rt, stage=stage, items=rows, to_microbatches=lambda share: sft.rows_to_batches(share, seq, micro_batch),
                    forward=sft.forward, start=done[0], end=done[0] + log_every, reports=sft.forward.reports,
                    metrics=sink, stop=stop)
        done[0] += log_every

    # the bare side: the same rows packed in the step, the schedule and the optimizer
    bare = fresh()
    fb, bare_step = get_forward_backward_func(), [0]

    def bare_chunk():
        for _ in range(log_every):
            step = bare_step[0]
            batches = sft.rows_to_batches(rows[step * global_batch:(step + 1) * global_batch], seq, micro_batch)
            bare.model.zero_grad_buffer()
            bare.optimizer.zero_grad()
            fb(forward_step_func=lambda it, m: sft.forward(m, next(it)), data_iterator=iter(batches),
               model=[bare.model], num_microbatches=per_step, seq_length=seq, micro_batch_size=micro_batch,
               forward_only=False)
            ok, _, _ = bare.optimizer.step()
            if ok:
                bare.scheduler.step(increment=1)
            bare_step[0] += 1

    try:
        result = interleave(runtime_chunk, bare_chunk, pairs=pairs, warmup_pairs=warmup_pairs,
                            steps_per_chunk=log_every)
    finally:
        stop.uninstall()
        sink.close()
    return {"what": "sft, one process: chunks of 4 steps of each loop, alternating",
            "model": "gpt-smoke (2 x 64, seq %d, vocab %d)" % (seq, vocab), "global_batch": global_batch,
            "micro_batch": micro_batch, **result}


if __name__ == "__main__":
    import json
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        print(json.dumps(measure(pairs=int(sys.argv[1]) if len(sys.argv) > 1 else 60), indent=1))
    finally:
        from nemoc.runtime.align import common

        common.teardown_distributed()
