"""SFT runtime overhead per step on CPU, side by side in one process: the alignment runtime's SFT steps
on the training core's loop (runtime.align.trainer.fit -> core.loop.train_loop: the step's data-parallel
share, packed rows -> micro-batches, the core's NaN/Inf rerun, named reports, the agreed stop signal, a
record every `log_every` = 4 steps) vs a bare Megatron-Core loop
(get_forward_backward_func + optimizer + scheduler) on the same model, optimizer and rows; both sides
pack each step's rows into micro-batches inside the step (sft.rows_to_batches: the same data path).
Wall and process CPU time per step over each interval of 4 steps, the first dropped; rounds alternate
which side starts. Run by bench_runtime_overhead.py (the `sft` section of its JSON); `compare` is the
summary both sections use."""

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


def compare(runtime_wall: list[list[float]], bare_wall: list[list[float]], runtime_cpu: list[list[float]],
            bare_cpu: list[list[float]]) -> dict:
    """Ratios runtime / bare from per-round lists of per-step interval times: of the medians of all
    intervals, of the fastest intervals (the least disturbed), and of each round's medians (a round's
    two sides ran side by side in time: their spread is the host's noise), for wall and CPU time."""
    out = {}
    for prefix, rt_rounds, br_rounds in (("", runtime_wall, bare_wall), ("cpu_", runtime_cpu, bare_cpu)):
        rt_all = [t for x in rt_rounds for t in x]
        br_all = [t for x in br_rounds for t in x]
        rt, br = statistics.median(rt_all), statistics.median(br_all)
        paired = [statistics.median(r) / statistics.median(b) for r, b in zip(rt_rounds, br_rounds)]
        kind = "cpu_" if prefix else ""
        out.update({
            f"runtime_{kind}step_s_median": rt, f"bare_{kind}step_s_median": br,
            ("cpu_ratio" if prefix else "ratio_runtime_over_bare"): rt / br,
            f"{prefix}overhead": rt / br - 1.0,
            f"runtime_{kind}step_s_min": min(rt_all), f"bare_{kind}step_s_min": min(br_all),
            f"{prefix}ratio_min_intervals": min(rt_all) / min(br_all),
            f"{prefix}round_ratios": paired, f"{prefix}round_ratio_median": statistics.median(paired),
            f"{prefix}round_ratio_min": min(paired), f"{prefix}round_ratio_max": max(paired),
            f"runtime_{kind}intervals": rt_rounds, f"bare_{kind}intervals": br_rounds,
        })
    return out


def measure(*, steps: int = 24, rounds: int = 2, seq: int = 64, vocab: int = 256, micro_batch: int = 2,
            global_batch: int = 4, warmup: int = 4) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemoc.runtime.align import common, sft, trainer
    from nemoc.runtime.core.dist import StopSignal
    from nemoc.runtime.metrics import Metrics

    torch.set_num_threads(1)
    common.init_distributed(tp=1, pp=1, seed=1234)
    spec = _spec(seq, vocab)
    layout = common.single_layout(micro_batch=micro_batch, global_batch=global_batch)
    rows = _rows(steps * global_batch, seq, vocab, seed=0)
    per_step = global_batch // micro_batch

    def fresh():
        common.seed_all(1234)
        return trainer.Trainer(common.build_gpt(spec, layout), layout=layout, **_settings(steps))

    log_every = 4

    work = tempfile.mkdtemp(prefix="nemoc_sft_overhead_")
    console = open(os.devnull, "w")

    def runtime_side() -> tuple[list[float], list[float]]:
        tr = fresh()
        stamps = [(time.perf_counter(), time.process_time())]

        class Stamps(Metrics):  # the stage's sink (metrics.jsonl, console lines), stamped as each record arrives
            def log(self, record):
                stamps.append((time.perf_counter(), time.process_time()))
                super().log(record)

        path = os.path.join(work, "metrics.jsonl")
        if os.path.exists(path):
            os.remove(path)
        sink = Stamps(metrics_path=path, tensorboard_dir=None, total_steps=steps, console=console, use_rich=False)
        try:
            trainer.fit(tr, stage=trainer.Steps(layout=layout, seq_length=seq, log_every=log_every), items=rows,
                        to_microbatches=lambda share: sft.rows_to_batches(share, seq, micro_batch),
                        forward=sft.forward, start=0, end=steps, reports=sft.forward.reports, metrics=sink,
                        stop=StopSignal())
        finally:
            sink.close()
        per_step = [(b[0] - a[0]) / log_every for a, b in zip(stamps, stamps[1:])]
        cpu = [(b[1] - a[1]) / log_every for a, b in zip(stamps, stamps[1:])]
        return per_step[warmup // log_every:], cpu[warmup // log_every:]

    def bare_side() -> tuple[list[float], list[float]]:
        tr, times, cpu = fresh(), [], []
        model, optimizer, scheduler = tr.model, tr.optimizer, tr.scheduler
        fb = get_forward_backward_func()
        for step in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            batches = sft.rows_to_batches(rows[step * global_batch:(step + 1) * global_batch], seq, micro_batch)
            model.zero_grad_buffer()
            optimizer.zero_grad()
            fb(forward_step_func=lambda it, m: sft.forward(m, next(it)),
               data_iterator=iter(batches), model=[model],
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
    runtime, bare, runtime_cpu, bare_cpu, loads = [], [], [], [], []
    for round_ in range(rounds):  # the side that goes first alternates (the second finds warmer caches)
        if round_ % 2 == 0:
            (b, b_cpu), (r, r_cpu) = bare_side(), runtime_side()
        else:
            (r, r_cpu), (b, b_cpu) = runtime_side(), bare_side()
        runtime.append(r)
        bare.append(b)
        runtime_cpu.append(r_cpu)
        bare_cpu.append(b_cpu)
        loads.append(os.getloadavg()[0])
    return {"what": "sft", "model": "gpt-smoke (2 x 64, seq %d, vocab %d)" % (seq, vocab),
            "global_batch": global_batch, "micro_batch": micro_batch, "steps": steps, "rounds": rounds,
            "interval_steps": log_every, "warmup_steps_dropped": warmup,
            **compare(runtime, bare, runtime_cpu, bare_cpu), "load_average_1min_per_round": loads}


if __name__ == "__main__":
    import json
    import sys

    steps, rounds = (int(x) for x in (sys.argv[1:3] if len(sys.argv) > 2 else (24, 2)))
    try:
        print(json.dumps(measure(steps=steps, rounds=rounds), indent=1))
    finally:
        from nemoc.runtime.align import common

        common.teardown_distributed()
