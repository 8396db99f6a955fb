"""Data-preparation throughput: tokens/s of `prepare_dataset` with 1 and 2 worker processes.

    .venv/bin/python bench/bench_data_prep.py [--copies 4] [--repeats 3]
    .venv/bin/python bench/bench_data_prep.py --big-doc-mb 10 [--label after]

`--big-doc-mb N`: one JSONL line whose document is N MB of text (issue 16: a 50 MB line took 11 minutes
and 2.8 GB to train a tokenizer on, 132 s and 9.2 GB to prepare). Tokenizer training and preparation
(1 worker, with the tokenizer just trained) each run in a fresh child process; their wall time and
peak resident memory (the child's ru_maxrss; `baseline`: a child that only imports what preparation
imports, Megatron-Core and torch) are written to bench/results/data_prep_big_doc.json
under `--label` (so a run before and after a change sit side by side), with the child's CPU time
(user + system, including the import), which a loaded machine disturbs less than the wall time.

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
    parser.add_argument("--big-doc-mb", type=float, default=None)
    parser.add_argument("--label", default="current")
    args = parser.parse_args()
    if args.big_doc_mb:
        return big_document(args.big_doc_mb, args.label)

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


_CHILD = r"""
import json, resource, sys, time
from nemoc.runtime.data_prep import Source, prepare_dataset, train_tokenizer
what, corpus, out = sys.argv[1:4]
t0 = time.perf_counter()
if what == "baseline":  # what preparation costs before any data: Megatron-Core (and torch) imported
    from nemoc.runtime.data_prep import _builder
    _builder(1000)
    extra = {}
elif what == "train_tokenizer":
    tok = train_tokenizer([Source("big", corpus)], 4096, out + "/tokenizer.json")
    extra = {"vocab_size": tok.vocab_size}
else:
    result = prepare_dataset(Source("big", corpus), out + "/tokenizer.json", out + "/prepared", workers=1)
    extra = {"tokens": result.tokens, "documents": result.documents}
seconds = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(extra, seconds=round(seconds, 2), cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
                      peak_rss_mb=round(usage.ru_maxrss / 1024))))
"""


def big_document(megabytes: float, label: str) -> None:
    """One document of `megabytes` MB on one JSONL line: time and peak memory of each step."""
    import random
    import subprocess

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    target = int(megabytes * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "big.jsonl"
        pieces, size = [], 0
        while size < target:
            sentence = " ".join(rng.choice(words) for _ in range(12)) + ". "
            pieces.append(sentence)
            size += len(sentence)
        small = "".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}) + "\n" for _ in range(200))
        corpus.write_text(small + json.dumps({"text": "".join(pieces)}) + "\n")
        row = {"document_mb": megabytes, "corpus_bytes": corpus.stat().st_size}
        for what in ("baseline", "train_tokenizer", "prepare"):
            proc = subprocess.run([sys.executable, "-c", _CHILD, what, str(corpus), tmp], capture_output=True,
                                  text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
            row[what] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{label:>8} {what:<16} {row[what]['seconds']:>8.1f} s wall {row[what]['cpu_s']:>8.1f} s CPU "
                  f"{row[what]['peak_rss_mb']:>7} MB", flush=True)
    out = ROOT / "bench" / "results" / "data_prep_big_doc.json"
    report = json.loads(out.read_text()) if out.exists() else {"benchmark": "data_prep_big_doc", "runs": {}}
    report["runs"][label] = dict(row, machine={"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                                               "note": "shared machine: other processes compete for the cores"})
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
