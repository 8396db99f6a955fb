"""What the training core's loop adds to a bare Megatron-Core step, piece by piece, timed in isolation
on CPU (process CPU time, best of 5 repetitions of many calls: deterministic enough to resolve the few
tens of microseconds that timing whole steps on a shared host cannot).

Per step: the step's report sums and stop flags (`core.loop._step_sums_and_stop`: one stack, one host
read), the rerun's RNG snapshot (`step_rng_state`), the runtime's collate of a micro-batch against
torch's default_collate (what a bare loop collates with; per micro-batch). Per record (every log_every
steps): the record (`_step_record`), the metrics sink's `log` (JSON line, flush, console line) and the
CPU time of the fsync its background thread makes. The sum, per step, against the bare loop's CPU time
per step from bench/results/runtime_overhead.json. JSON to bench/results/runtime_step_bookkeeping.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _cpu_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n)
    return best * 1e6


def _fsync_cpu_us(path: str, records: int = 40) -> float:
    """CPU time of one fsync after one appended record, records spaced as a log interval spaces them."""
    total = 0.0
    with open(path, "a") as handle:
        for _ in range(records):
            handle.write(json.dumps({"step": 1, "loss": 5.5, "lr": 3e-4, "pad": "x" * 120}) + "\n")
            handle.flush()
            start = time.process_time()
            os.fsync(handle.fileno())
            total += time.process_time() - start
            time.sleep(0.03)
    return total / records * 1e6


def main() -> int:
    import gpu_1b
    from torch.utils.data import default_collate

    from nemoc.runtime import train as T
    from nemoc.runtime.core import loop
    from nemoc.runtime.core.dist import StopSignal
    from nemoc.runtime.metrics import Metrics

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="nemoc_bookkeeping_"))
    log_every, n_micro = 4, 2
    plan = gpu_1b.build_plan(smoke=True, backend="unfused", steps=48, log_every=log_every, micro_batch=2,
                             num_micro=n_micro, gpu="CPU")
    prefix = work / "synthetic_text_document"
    gpu_1b.write_dataset(prefix, vocab=plan.model.vocab, tokens=50 * 4 * (plan.model.seq_length + 1) * 2)
    task = T.load_task(str(gpu_1b.write_task(plan, work=work / "task", prefix=prefix)))
    T.init_distributed(layout=task.stage.layout)
    try:
        dataset, _ = T.build_gpt_datasets(task=task, stage=task.stage, seed=task.stage.seed)
        samples = [dataset[0], dataset[1]]
        pretrain = [{"lm loss": torch.stack([torch.tensor(350.0), torch.tensor(128.0)])} for _ in range(n_micro)]
        sft = [{"loss": torch.tensor(5.5), "response_tokens": torch.tensor(40.0)} for _ in range(n_micro)]
        stop = StopSignal()
        sink = Metrics(metrics_path=str(work / "metrics.jsonl"), tensorboard_dir=None, total_steps=48,
                       console=open(os.devnull, "w"), use_rich=False)
        state = loop.LoopState(iteration=4, consumed_samples=16, last_loss=5.5)

        class Optimizer:  # what _step_record reads of one
            param_groups = [{"lr": 3e-4}]

        throughput = loop.Throughput(256, 4.0e8, None, 1)
        record = loop._step_record(state, 4, 0.13, 0.7, Optimizer(), 0, throughput)
        per_step = {
            "report_sums_and_stop_pretraining_us": _cpu_us(lambda: loop._step_sums_and_stop(pretrain, ("lm loss",), stop)),
            "report_sums_and_stop_sft_us": _cpu_us(
                lambda: loop._step_sums_and_stop(sft, ("loss", "response_tokens"), stop)),
            "rerun_rng_snapshot_us": _cpu_us(loop.step_rng_state),
        }
        per_micro_batch = {
            "runtime_collate_us": _cpu_us(lambda: T.collate(samples, torch.device("cpu"))),
            "default_collate_us": _cpu_us(lambda: default_collate(samples)),
        }
        per_record = {
            "step_record_us": _cpu_us(lambda: loop._step_record(state, 4, 0.13, 0.7, Optimizer(), 0, throughput)),
            "metrics_log_us": _cpu_us(lambda: sink.log(record), n=200),
            "fsync_cpu_us": _fsync_cpu_us(str(work / "fsync.jsonl")),
        }
        sink.close()
    finally:
        T.teardown()
    collate_delta = (per_micro_batch["runtime_collate_us"] - per_micro_batch["default_collate_us"]) * n_micro
    records = sum(per_record.values()) / log_every
    totals = {}
    results = json.loads((REPO / "bench" / "results" / "runtime_overhead.json").read_text())
    for kind, sums_key, bare_step in (
            ("pretraining", "report_sums_and_stop_pretraining_us", results["pretrain_in_process"]["bare_cpu_step_s_median"]),
            ("sft", "report_sums_and_stop_sft_us", results["sft"]["bare_cpu_step_s_median"])):
        # SFT packs rows in both loops (no collate difference); pretraining collates differently
        added = per_step[sums_key] + per_step["rerun_rng_snapshot_us"] + records + (
            collate_delta if kind == "pretraining" else 0.0)
        totals[kind] = {"added_cpu_us_per_step": added, "bare_cpu_step_s_median": bare_step,
                        "added_fraction_of_bare_step": added * 1e-6 / bare_step}
    out = {"description": __doc__.splitlines()[0], "log_every": log_every, "micro_batches_per_step": n_micro,
           "per_step": per_step, "per_micro_batch": per_micro_batch, "per_record": per_record,
           "totals": totals, "load_average_1min": os.getloadavg()[0]}
    path = REPO / "bench" / "results" / "runtime_step_bookkeeping.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(totals, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
