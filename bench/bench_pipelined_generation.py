"""Benchmark the KV-cached generator across pipeline stages (PPO / GRPO rollouts at PP > 1): the same
model, prompts and greedy decoding at PP=1 (one process), PP=2 (two processes, each holding half the
layers and their KV cache; hidden states sent stage to stage, the last stage samples) and PP=2 VP=2 (each
rank two chunks of one layer: the hidden states go around the two stages twice per token, 3 transfers
instead of 1). Checks that all give the same tokens, then reports wall and CPU seconds (one thread per
process).

    python bench/bench_pipelined_generation.py            # runs both layouts, writes the results file
    (each layout under torchrun: bench_pipelined_generation.py --worker OUT --pp N [--vp V])

Prints a table and writes bench/results/pipelined_generation.json. What it shows: the stages take turns
(no micro-batching), so PP=2 does not decode faster than PP=1; the extra cost is the stage-to-stage
transfers (on gloo over loopback here) -- what compiler/cost.py `_rollout_time` charges.
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

REPO = Path(__file__).resolve().parent.parent
LAYERS, HIDDEN, HEADS, GROUPS, FFN, BATCH, PROMPT, NEW = 4, 256, 8, 4, 768, 8, 32, 64


def _run(pp: int, out: Path, vp: int | None = None) -> None:
    import torch

    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import generation
    from nemoc.runtime.align import common

    torch.set_num_threads(1)
    common.init_distributed(tp=1, pp=pp, vp=vp, seed=1)
    seq = PROMPT + NEW + 8
    spec = ModelSpec(name="small", layers=LAYERS, hidden=HIDDEN, heads=HEADS, query_groups=GROUPS, ffn_hidden=FFN,
                     vocab=4096, seq_length=seq, activation="swiglu", norm="rmsnorm", position="rope")
    base = out / "base"
    if pp == 1:
        common.seed_all(0)
        common.save_model(common.build_gpt(spec, common.single_layout(), seq_length=seq), base)
    chunk = common.build_gpt(spec, common.single_layout(pp=pp, vp=vp), seq_length=seq)
    common.load_model(chunk, base)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 4096, (PROMPT - (i % 4) * 4,), generator=g).tolist() for i in range(BATCH)]
    kw = dict(vocab=4096, eod=-1, seq_length=seq, greedy=True)
    generation.generate(chunk, prompts, max_new_tokens=2, **kw)  # warm-up
    best = best_cpu = float("inf")
    for _ in range(3):
        torch.distributed.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        gen = generation.generate(chunk, prompts, max_new_tokens=NEW, **kw)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
    if torch.distributed.get_rank() == 0:
        (out / f"{_name(pp, vp)}.json").write_text(json.dumps({"seconds": best, "cpu_seconds_rank0": best_cpu,
                                                      "tokens": gen.tokens}))
    common.teardown_distributed()


LAYOUTS = ((1, None), (2, None), (2, 2))


def _name(pp: int, vp: int | None) -> str:
    return f"pp{pp}" + (f"vp{vp}" if vp else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, default=None)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--vp", type=int, default=None)
    args = parser.parse_args()
    if args.worker is not None:
        _run(args.pp, args.worker, args.vp)
        return
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for pp, vp in LAYOUTS:  # PP=1 first: it writes the weights every layout loads
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(pp),
                            __file__, "--worker", str(out), "--pp", str(pp)] + (["--vp", str(vp)] if vp else []),
                           check=True, env=env)
        runs = {_name(pp, vp): json.loads((out / f"{_name(pp, vp)}.json").read_text()) for pp, vp in LAYOUTS}
    one = runs["pp1"]
    for name, r in runs.items():
        assert r["tokens"] == one["tokens"], f"{name} generated different tokens from PP=1"
    tokens = BATCH * NEW
    result = {"model": f"{LAYERS}L-{HIDDEN}h", "batch": BATCH, "prompt_tokens": PROMPT, "new_tokens": NEW,
              "same_tokens": True, "host": platform.node(), "cpus": os.cpu_count(),
              **{name: {"seconds": r["seconds"], "tokens_per_s": tokens / r["seconds"],
                        "cpu_seconds_rank0": r["cpu_seconds_rank0"]} for name, r in runs.items()}}
    result["pp2_over_pp1"] = runs["pp2"]["seconds"] / one["seconds"]
    result["pp2vp2_over_pp2"] = runs["pp2vp2"]["seconds"] / runs["pp2"]["seconds"]
    print(f"{'layout':8} {'seconds':>8} {'tokens/s':>9} {'cpu s (rank 0)':>15}")
    for name in runs:
        r = result[name]
        print(f"{name:8} {r['seconds']:8.3f} {r['tokens_per_s']:9.1f} {r['cpu_seconds_rank0']:15.3f}")
    print(f"PP=2 / PP=1 wall time: {result['pp2_over_pp1']:.2f}, PP=2 VP=2 / PP=2: {result['pp2vp2_over_pp2']:.2f} "
          "(same tokens)")
    (REPO / "bench" / "results" / "pipelined_generation.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
