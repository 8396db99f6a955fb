"""Benchmark `nemoc plan --sweep`: time to plan every point of a sweep, in process.

Each point is compiled and planned exactly as `nemoc plan --set KEY=VALUE` would (runtime/cli/sweep.py's
`plan_point`); the table shows the points, how many planned, and the total and per-point time.

    python bench/bench_sweep.py

Prints a table and writes bench/results/sweep.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = [
    ("llama3_8b_pretrain.nemo", ["parallel.tensor=1,2,4,8", "parallel.micro_batch=1,2,4"]),
    ("llama3_70b_sft_dpo.nemo", ["parallel.tensor=2,4,8", "stage.sft.optimizer.lr=1e-5,2e-5"]),
    ("mixtral_8x7b_pretrain.nemo", ["parallel.expert=1,2,4,8"]),
    ("gpt3_175b_a100.nemo", ["parallel.pipeline=4,8,16", "parallel.micro_batch=1,2"]),
]


def main() -> None:
    from nemoc.runtime.cli.sweep import parse_axes, plan_point, points_of

    rows = {}
    for name, sweeps in CASES:
        points = points_of(parse_axes(sweeps))
        times, planned = [], 0
        for point in points:
            start = time.perf_counter()
            result = plan_point(str(REPO / "examples" / name), (), point, 0.1, 4)
            times.append(time.perf_counter() - start)
            planned += result.result is not None
        rows[name] = {"sweeps": sweeps, "points": len(points), "planned": planned, "total_s": sum(times),
                      "median_point_ms": statistics.median(times) * 1e3, "max_point_ms": max(times) * 1e3}
    header = f"{'example':28} {'sweep':58} {'points':>6} {'planned':>7} {'total s':>8} {'median ms':>10} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(f"{name:28} {' '.join(r['sweeps']):58} {r['points']:6d} {r['planned']:7d} {r['total_s']:8.2f} "
              f"{r['median_point_ms']:10.1f} {r['max_point_ms']:8.1f}")
    out = {"python": platform.python_version(), "machine": platform.machine(), "cases": rows}
    target = REPO / "bench" / "results" / "sweep.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
