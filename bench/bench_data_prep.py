"""Data-preparation throughput: tokens/s of `prepare_dataset` with 1 and 2 worker processes.

    .venv/bin/python bench/bench_data_prep.py [--copies 4] [--repeats 3]

Workers are spawned processes (see runtime/data_prep.py), so 2 workers pay two interpreter start-ups.
Corpus: the quickstart corpus (examples/data/quickstart/corpus.jsonl) concatenated `--copies` times;
tokenizer: the byte-level BPE trained on it (as `nemoc run` does). Megatron-Core is imported before
timing (a one-off ~5 s per process, reported separately). Each configuration is run `--repeats` times and
the best and median wall times are kept (the machine is shared). Writes bench/results/data_prep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_prep.json")
    args = parser.parse_args()

    from nemoc.runtime.data_prep import Source, _builder, prepare_dataset, train_tokenizer

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    _builder(1000)
    import_s = time.perf_counter() - t0
    corpus_text = (ROOT / "examples" / "data" / "quickstart" / "corpus.jsonl").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text(corpus_text * args.copies)
        source = Source("web", str(corpus))
        t0 = time.perf_counter()
        tok = train_tokenizer([Source("web", str(ROOT / "examples/data/quickstart/corpus.jsonl"))], 4096, tmp / "tok.json")
        tokenizer_s = time.perf_counter() - t0
        results = {}
        for workers in (1, 2):
            times, last = [], None
            for r in range(args.repeats):
                last = prepare_dataset(source, tok.source, tmp / f"w{workers}_{r}", workers=workers, chunk_bytes=256 << 10)
                times.append(last.seconds)
            results[f"workers_{workers}"] = {
                "workers": workers,
                "seconds_best": round(min(times), 3),
                "seconds_median": round(statistics.median(times), 3),
                "tokens_per_s_best": round(last.tokens / min(times)),
                "tokens_per_s_median": round(last.tokens / statistics.median(times)),
                "mb_per_s_best": round(last.bytes / min(times) / 1e6, 2),
            }
        report = {
            "benchmark": "data_prep",
            "corpus_bytes": last.bytes,
            "documents": last.documents,
            "tokens": last.tokens,
            "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": tok.vocab_size, "train_s": round(tokenizer_s, 3)},
            "megatron_import_s": round(import_s, 2),
            "results": results,
            "speedup_2_workers": round(results["workers_1"]["seconds_best"] / results["workers_2"]["seconds_best"], 2),
            "speedup_2_workers_median": round(results["workers_1"]["seconds_median"] / results["workers_2"]["seconds_median"], 2),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                        "note": "shared machine: other processes compete for the cores"},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
