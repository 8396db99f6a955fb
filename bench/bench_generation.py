"""Benchmark generation: tokens/s with Megatron-Core's KV cache (StaticInferenceContext) and without it
(the whole sequence recomputed for every new token), on the same model, prompts and seeds. Wall-clock
and CPU time (process time: less distorted than wall time on a shared, oversubscribed machine).

For each model shape and reply length: a batch of prompts of different lengths, greedy decoding with
no early stop (every row generates `new` tokens), best of `--repeat` runs; the two paths are checked
to give the same tokens before their times are reported.

    python bench/bench_generation.py [--repeat 1] [--threads 2]

Prints a table and writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CASES = [  # (name, layers, hidden, heads, query_groups, ffn, batch, prompt tokens, new tokens)
    ("tiny-2L-128h", 2, 128, 4, 2, 384, 4, 16, 32),
    ("tiny-2L-128h", 2, 128, 4, 2, 384, 4, 16, 96),
    ("small-4L-256h", 4, 256, 8, 4, 768, 4, 32, 64),
]


def measure(case, repeat: int) -> dict:
    import torch

    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import generation
    from nemoc.runtime.align import common

    name, layers, hidden, heads, groups, ffn, batch, prompt, new = case
    seq = prompt + new + 8
    spec = ModelSpec(name=name, layers=layers, hidden=hidden, heads=heads, query_groups=groups, ffn_hidden=ffn,
                     vocab=4096, seq_length=seq, activation="swiglu", norm="rmsnorm", position="rope")
    torch.manual_seed(0)
    chunk = common.build_gpt(spec, common.single_layout(), seq_length=seq)
    prompts = [torch.randint(1, 4096, (prompt - (i % 4) * 4,)).tolist() for i in range(batch)]
    generation.generate(chunk, prompts, max_new_tokens=2, vocab=4096, eod=-1, seq_length=seq, greedy=True)  # warm-up
    out = {}
    tokens = {}
    for use_cache in (True, False):
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            gen = generation.generate(chunk, prompts, max_new_tokens=new, vocab=4096, eod=-1, seq_length=seq,
                                      greedy=True, use_cache=use_cache)
            best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
        tokens[use_cache] = gen.tokens
        generated = sum(len(t) for t in gen.tokens)
        out["cached" if use_cache else "recompute"] = {"seconds": best, "tokens_per_s": generated / best,
                                                       "cpu_seconds": best_cpu, "tokens_per_cpu_s": generated / best_cpu}
    assert tokens[True] == tokens[False], f"{name}: cached and recomputed generation differ"
    return {"model": name, "layers": layers, "hidden": hidden, "batch": batch, "prompt_tokens": prompt,
            "new_tokens": new, **out, "speedup": out["recompute"]["seconds"] / out["cached"]["seconds"],
            "cpu_speedup": out["recompute"]["cpu_seconds"] / out["cached"]["cpu_seconds"],
            "same_tokens": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from nemoc.runtime.align import common

    torch.set_num_threads(args.threads)
    common.init_distributed(tp=1, pp=1, seed=1)
    try:
        rows = []
        for case in CASES:
            rows.append(measure(case, args.repeat))
            print(f"measured {case[0]} new={case[-1]}", file=sys.stderr, flush=True)
    finally:
        common.teardown_distributed()
    header = (f"{'model':<15}{'batch':>6}{'prompt':>8}{'new':>6}{'cached tok/s':>14}{'recompute tok/s':>17}{'speedup':>9}"
              f"{'cached tok/cpu-s':>18}{'recompute tok/cpu-s':>21}{'cpu speedup':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<15}{r['batch']:>6}{r['prompt_tokens']:>8}{r['new_tokens']:>6}"
              f"{r['cached']['tokens_per_s']:>14.1f}{r['recompute']['tokens_per_s']:>17.1f}{r['speedup']:>8.1f}x"
              f"{r['cached']['tokens_per_cpu_s']:>18.1f}{r['recompute']['tokens_per_cpu_s']:>21.1f}{r['cpu_speedup']:>12.1f}x")
    result = {"benchmark": "generation", "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
              "threads": args.threads, "python": sys.version.split()[0], "torch": torch.__version__,
              "machine": platform.machine(), "load_average": list(os.getloadavg()), "rows": rows}
    out = REPO / "bench" / "results" / "generation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from nemoc.runtime.atomic import atomic_write_json

    atomic_write_json(out, result)
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
