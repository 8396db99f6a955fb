"""Runtime overhead per step on CPU: nemoc's training stage vs a bare Megatron-Core loop, same config.

Both sides build the identical TransformerConfig / GPTModel / DDP / optimizer (through
runtime.megatron_args and runtime.model; `settings_diff` compares their fingerprints and must be
empty) and read the same data: the runtime side runs `python -m nemoc.runtime.train` under torchrun
(GPTDataset pipeline, the core loop's NaN/Inf check and rerun snapshot, stop signal, logging,
metrics.jsonl, console), the bare side a minimal get_forward_backward_func loop fed the same
GPTDataset samples, collated by torch's default_collate inside the step (bench/gpu_1b.py --bare
--bare-task). Both are measured alike: wall and process CPU time per step over each interval of
`log_every` = 4 steps (the runtime's stamped as each metrics record reaches its sink, so an interval
holds everything the loop does, the previous record's writing included; the bare loop's summed per
step), the first interval (warm-up) dropped. Rounds alternate which side starts, each in a fresh
process (OMP_NUM_THREADS=1). Reported: ratios of the medians of all intervals, of the fastest
intervals, and per round (the spread is the host's noise), for wall and CPU time; on a shared host
the CPU time (this process's own threads) is the less disturbed measure; the load average is
recorded. The same run then pairs the two pretraining loops in one process, alternating 4-step
chunks (bench_pretrain_overhead.py, key `pretrain_in_process`), and SFT the same way
(bench_sft_overhead.py, key `sft`), each in a fresh process. JSON to bench/results/runtime_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_1b  # noqa: E402  (shared runtime/bare runners)
from side_by_side import compare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _slim(run: dict) -> dict:
    """A run's record without its settings fingerprint (compared once, in `settings_diff`)."""
    return {k: v for k, v in run.items() if k not in ("settings", "record_stamps")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "runtime_overhead.json"))
    parser.add_argument("--work", default="/tmp/nemoc_bench_overhead")
    parser.add_argument("--pairs", type=int, default=60, help="chunk pairs of the one-process comparisons")
    parser.add_argument("--skip-sft", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started, load_start = time.monotonic(), os.getloadavg()[0]
    log_every = 4
    plan = gpu_1b.build_plan(smoke=True, backend="unfused", steps=args.steps, log_every=log_every, micro_batch=2,
                             num_micro=2, gpu="CPU")
    prefix = work / "synthetic_text_document"
    gpu_1b.write_dataset(prefix, vocab=plan.model.vocab, tokens=(args.steps + 2) * 4 * (plan.model.seq_length + 1) * 2)
    runtime, bare, loads = [], [], []
    for r in range(args.rounds):  # the side that starts alternates (the second may find a warmer page cache)
        sides = [("bare", lambda: gpu_1b.run_bare_subprocess(plan, work=work / f"bare{r}", timeout_s=600, smoke=True,
                                                             prefix=prefix)),
                 ("runtime", lambda: gpu_1b.run_runtime(plan, work=work / f"runtime{r}", prefix=prefix, timeout_s=600,
                                                        smoke=True))]
        for name, run in (sides if r % 2 == 0 else sides[::-1]):
            (bare if name == "bare" else runtime).append(run())
        loads.append(os.getloadavg()[0])
    result = {
        "description": __doc__.splitlines()[0],
        "machine": f"{platform.machine()} {platform.processor() or ''} CPU, gloo, OMP_NUM_THREADS=1 (shared host)",
        "model": gpu_1b.MODEL_SMOKE, "global_batch": 4, "micro_batch": 2, "steps": args.steps,
        "interval_steps": log_every, "warmup_steps_dropped": log_every, "rounds": args.rounds,
        "data": "both sides read the same GPTDataset samples",
        **compare([x["interval_step_s"] for x in runtime], [x["interval_step_s"] for x in bare],
                  [x["interval_cpu_step_s"] for x in runtime], [x["interval_cpu_step_s"] for x in bare]),
        "settings_diff": gpu_1b.settings_diff(runtime[0].get("settings", {}), bare[0].get("settings", {})),
        "load_average_1min_start": load_start, "load_average_1min_per_round": loads,
        "runtime_runs": [_slim(x) for x in runtime], "bare_runs": [_slim(x) for x in bare],
    }
    # the same two loops side by side in one process, each pair's two chunks close in time
    task = gpu_1b.write_task(plan, work=work / "inproc", prefix=prefix)
    inproc = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_pretrain_overhead.py")), str(task),
                             str(args.pairs)], capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if inproc.returncode != 0:
        print(inproc.stderr[-4000:], file=sys.stderr)
        return 1
    result["pretrain_in_process"] = json.loads(inproc.stdout[inproc.stdout.index("{"):])
    if not args.skip_sft:
        sft = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_sft_overhead.py")),
                              str(args.pairs)], capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if sft.returncode != 0:
            print(sft.stderr[-4000:], file=sys.stderr)
            return 1
        result["sft"] = json.loads(sft.stdout[sft.stdout.index("{"):])
    result["load_average_1min_end"] = os.getloadavg()[0]
    result["wall_s"] = time.monotonic() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    sections = [("pretraining (fresh processes)", result), ("pretraining (one process)", result["pretrain_in_process"])]
    for name, entry in sections + ([("sft (one process)", result["sft"])] if "sft" in result else []):
        print(summary_line(name, entry))
    print(f"-> {args.out}")
    return 0


def summary_line(name: str, r: dict) -> str:
    return (f"{name}: wall median {r['runtime_step_s_median'] * 1e3:.2f} vs {r['bare_step_s_median'] * 1e3:.2f} ms/step "
            f"= {r['ratio_runtime_over_bare']:.3f} (fastest {r['ratio_min_intervals']:.3f}, per round "
            f"{r['round_ratio_min']:.3f}..{r['round_ratio_max']:.3f}); CPU median "
            f"{r['runtime_cpu_step_s_median'] * 1e3:.2f} vs {r['bare_cpu_step_s_median'] * 1e3:.2f} ms/step "
            f"= {r['cpu_ratio']:.3f} (fastest {r['cpu_ratio_min_intervals']:.3f}, per round "
            f"{r['cpu_round_ratio_min']:.3f}..{r['cpu_round_ratio_max']:.3f}, median {r['cpu_round_ratio_median']:.3f})")


if __name__ == "__main__":
    sys.exit(main())
