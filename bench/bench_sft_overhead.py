"""SFT runtime overhead per step on CPU, side by side in one process: the alignment runtime's SFT steps
on the training core's loop (runtime.align.trainer.fit -> core.loop.train_loop: the step's data-parallel
share, packed rows -> micro-batches, the core's NaN/Inf rerun, named reports, the agreed stop signal, a
record every `log_every` = 4 steps) vs a bare Megatron-Core loop
(get_forward_backward_func + optimizer + scheduler on pre-built micro-batches) on the same model,
optimizer and batches. Imported by bench_runtime_overhead.py (the `sft` section of its JSON)."""

from __future__ import annotations

import random
import statistics
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


def measure(*, steps: int = 24, rounds: int = 2, seq: int = 64, vocab: int = 256, micro_batch: int = 2,
            global_batch: int = 4, warmup: int = 4) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemoc.runtime.align import common, sft, trainer
    from nemoc.runtime.core.dist import StopSignal
    from nemoc.runtime.metrics import NullMetrics

    torch.set_num_threads(1)
    common.init_distributed(tp=1, pp=1, seed=1234)
    spec = _spec(seq, vocab)
    layout = common.single_layout(micro_batch=micro_batch, global_batch=global_batch)
    rows = _rows(steps * global_batch, seq, vocab, seed=0)
    batches = sft.rows_to_batches(rows, seq, micro_batch)  # the bare loop's pre-built micro-batches
    per_step = global_batch // micro_batch

    def fresh():
        common.seed_all(1234)
        return trainer.Trainer(common.build_gpt(spec, layout), layout=layout, **_settings(steps))

    log_every = 4

    def runtime_side() -> tuple[list[float], list[float]]:
        tr = fresh()
        stamps = [(time.perf_counter(), time.process_time())]

        class Stamps(NullMetrics):  # a record every log_every steps: the loop's whole iterations between them
            def log(self, record):
                stamps.append((time.perf_counter(), time.process_time()))

        trainer.fit(tr, stage=trainer.Steps(layout=layout, seq_length=seq, log_every=log_every), items=rows,
                    to_microbatches=lambda share: sft.rows_to_batches(share, seq, micro_batch), forward=sft.forward,
                    start=0, end=steps, reports=sft.forward.reports, metrics=Stamps(), stop=StopSignal())
        per_step = [(b[0] - a[0]) / log_every for a, b in zip(stamps, stamps[1:])]
        cpu = [(b[1] - a[1]) / log_every for a, b in zip(stamps, stamps[1:])]
        return per_step[warmup // log_every:], cpu[warmup // log_every:]

    def bare_side() -> tuple[list[float], list[float]]:
        tr, times, cpu = fresh(), [], []
        model, optimizer, scheduler = tr.model, tr.optimizer, tr.scheduler
        fb = get_forward_backward_func()
        for step in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            fb(forward_step_func=lambda it, m: sft.forward(m, next(it)),
               data_iterator=iter(batches[step * per_step:(step + 1) * per_step]), model=[model],
               num_microbatches=per_step, seq_length=seq, micro_batch_size=micro_batch, forward_only=False)
            ok, _, _ = optimizer.step()
            if ok:
                scheduler.step(increment=1)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)

        def grouped(values):  # the same intervals as the runtime side: mean step time over each log_every steps
            return [sum(values[i:i + log_every]) / log_every
                    for i in range(0, len(values) - log_every + 1, log_every)][warmup // log_every:]

        return grouped(times), grouped(cpu)

    # Wall time on a shared host counts other processes' time slices; the process's CPU time (this
    # process's threads only) does not, so both are reported: on a loaded host the CPU-time ratio is
    # the one that measures the runtime's own work.
    runtime, bare, paired, runtime_cpu, bare_cpu, paired_cpu = [], [], [], [], [], []
    for round_ in range(rounds):  # the side that goes first alternates (the second finds warmer caches)
        if round_ % 2 == 0:
            (b, b_cpu), (r, r_cpu) = bare_side(), runtime_side()
        else:
            (r, r_cpu), (b, b_cpu) = runtime_side(), bare_side()
        bare += b
        runtime += r
        bare_cpu += b_cpu
        runtime_cpu += r_cpu
        paired.append(statistics.median(r) / statistics.median(b))  # this round's ratio, side by side in time
        paired_cpu.append(statistics.median(r_cpu) / statistics.median(b_cpu))
    rt, br = statistics.median(runtime), statistics.median(bare)
    rt_cpu, br_cpu = statistics.median(runtime_cpu), statistics.median(bare_cpu)
    return {"what": "sft", "model": "gpt-smoke (2 x 64, seq %d, vocab %d)" % (seq, vocab),
            "global_batch": global_batch, "micro_batch": micro_batch, "steps": steps, "rounds": rounds,
            "warmup_steps_dropped": warmup, "runtime_step_s_median": rt, "bare_step_s_median": br,
            "ratio_runtime_over_bare": rt / br, "overhead": rt / br - 1.0,
            "runtime_step_s_min": min(runtime), "bare_step_s_min": min(bare),
            "ratio_min_steps": min(runtime) / min(bare),
            "round_ratios": paired, "round_ratio_median": statistics.median(paired),
            "round_ratio_min": min(paired), "round_ratio_max": max(paired),
            "runtime_cpu_step_s_median": rt_cpu, "bare_cpu_step_s_median": br_cpu, "cpu_ratio": rt_cpu / br_cpu,
            "cpu_round_ratios": paired_cpu, "cpu_round_ratio_median": statistics.median(paired_cpu),
            "cpu_round_ratio_min": min(paired_cpu), "cpu_round_ratio_max": max(paired_cpu)}


if __name__ == "__main__":
    import json
    import sys

    steps, rounds = (int(x) for x in (sys.argv[1:3] if len(sys.argv) > 2 else (24, 2)))
    try:
        print(json.dumps(measure(steps=steps, rounds=rounds), indent=1))
    finally:
        from nemoc.runtime.align import common

        common.teardown_distributed()
