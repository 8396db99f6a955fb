"""Benchmark `nemoc check`: compile time per example, after start-up.

For every `examples/*.nemo`: the first in-process compile (parser tables already loaded), then the
median and p95 of N repeated compiles (read + parse + imports + schema + lowering + layout rules,
exactly what `nemoc check` does after start-up), and the wall-clock time of one `nemoc check`
process (Python start-up and imports included) for reference.

    python bench/bench_check.py [--repeat 50] [--no-process]

Prints a table and writes bench/results/check.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(path: Path, repeat: int) -> dict:
    from nemoc.runtime.cmd_lang import check_file

    start = time.perf_counter()
    diags, _ = check_file(str(path))
    first = time.perf_counter() - start
    assert not any(d.is_error for d in diags), f"{path} does not check clean"
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        check_file(str(path))
        times.append(time.perf_counter() - start)
    times.sort()
    return {"first_ms": first * 1e3, "median_ms": statistics.median(times) * 1e3,
            "p95_ms": times[int(0.95 * (len(times) - 1))] * 1e3, "repeat": repeat,
            "lines": len(path.read_text().splitlines())}


def process_ms(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "check", str(path)], check=True,
                   capture_output=True, timeout=120)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--no-process", action="store_true", help="skip the whole-process timing")
    args = parser.parse_args()

    start = time.perf_counter()
    from nemoc.dsl.parser import grammar

    grammar()
    startup_ms = (time.perf_counter() - start) * 1e3
    rows = {}
    for path in sorted((REPO / "examples").glob("*.nemo")):
        rows[path.name] = measure(path, args.repeat)
        if not args.no_process:
            rows[path.name]["process_ms"] = process_ms(path)

    print(f"parser start-up (import + grammar load): {startup_ms:.1f} ms")
    header = f"{'example':28} {'lines':>5} {'first ms':>9} {'median ms':>10} {'p95 ms':>8} {'process ms':>11}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        proc = f"{r['process_ms']:.0f}" if "process_ms" in r else "-"
        print(f"{name:28} {r['lines']:5d} {r['first_ms']:9.2f} {r['median_ms']:10.2f} {r['p95_ms']:8.2f} {proc:>11}")
    out = {"python": platform.python_version(), "machine": platform.machine(), "startup_ms": startup_ms,
           "examples": rows, "max_median_ms": max(r["median_ms"] for r in rows.values())}
    target = REPO / "bench" / "results" / "check.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
