"""Benchmark the Hugging Face import: GB/s of safetensors converted to Megatron-Core tensors, 1 vs 2 workers.

Builds a random Llama-shaped checkpoint with transformers (sharded safetensors + index, bf16 by
default), then times `nemoc.runtime.hf.convert.import_checkpoint` (read, QKV interleave / SwiGLU fuse,
write) with each worker count, best of --repeat, and the export back (Megatron -> HF, one process).
Worker processes are spawned, so their start-up (importing torch) is part of the 2-worker time.

    python bench/bench_hf_import.py [--hidden 1024] [--layers 8] [--vocab 32000] [--repeat 2]

Prints a table and writes bench/results/hf_import.json (or --results). Recorded: the default case
(0.3 GB, hf_import.json) and --hidden 2048 --layers 16 (1.7 GB, hf_import_1.7gb.json); compiler/hfimport.py
takes its per-worker throughput and worker start-up from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "hf_import.json"


def build(directory: Path, hidden: int, layers: int, vocab: int, dtype: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                                  num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                  num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                                  max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory, max_shard_size="100MB")
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--results", default=str(RESULTS), help="where to write the JSON rows")
    args = parser.parse_args()

    from nemoc.runtime.hf import convert

    tmp = Path(tempfile.mkdtemp(prefix="nemoc-hf-bench-"))
    try:
        size = build(tmp / "hf", args.hidden, args.layers, args.vocab, args.dtype)
        rows = []
        for workers in args.workers:
            times = []
            for _ in range(args.repeat):
                shutil.rmtree(tmp / "conv", ignore_errors=True)
                t0 = time.perf_counter()
                convert.import_checkpoint(tmp / "hf", tmp / "conv", workers=workers)
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append({"direction": "import", "workers": workers, "bytes": size, "seconds": best,
                         "gb_per_s": size / best / 1e9})
        t0 = time.perf_counter()
        convert.export_converted(tmp / "conv", tmp / "out")
        took = time.perf_counter() - t0
        rows.append({"direction": "export", "workers": 1, "bytes": size, "seconds": took, "gb_per_s": size / took / 1e9})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'direction':<10}{'workers':>8}{'GB':>10}{'seconds':>10}{'GB/s':>10}")
    for r in rows:
        print(f"{r['direction']:<10}{r['workers']:>8}{r['bytes'] / 1e9:>10.3f}{r['seconds']:>10.2f}{r['gb_per_s']:>10.3f}")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"machine": platform.node(), "cpus": __import__("os").cpu_count(),
                                   "args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
