"""Graph compile time: `build_graph(plan)` for the shipped examples and for a synthetic large plan.

    .venv/bin/python bench/bench_graph.py [--repeats 20]

For each example: the time to parse+check+lower (`load_spec`), plan (`plan_experiment`) and emit the
runtime graph (`build_graph`, which includes hashing the data files), best of `--repeats`. The synthetic
plan has 200 chained stages over 50 data sources (no files) to show how emission scales.
Writes bench/results/graph.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


FIRST: dict[str, float] = {}


def best(fn, repeats: int, label: str = "") -> tuple[float, object]:
    """Best wall time of `repeats` calls (the first call's time is kept in FIRST[label]: caches are cold)."""
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    FIRST[label] = times[0]
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "graph.json")
    args = parser.parse_args()

    from nemoc.compiler.graph import build_graph
    from nemoc.compiler.planner import plan_experiment
    from nemoc.compiler.spec import DataSpec
    from nemoc.runtime.cli.common import load_spec
    from plan_factory import make_plan, make_stage

    examples = {}
    for name in ("quickstart", "pipeline"):
        path = str(ROOT / "examples" / f"{name}.nemo")
        load_s, (spec, _) = best(lambda: load_spec(path), max(3, args.repeats // 4), "load")
        plan_s, result = best(lambda: plan_experiment(spec), max(3, args.repeats // 4), "plan")
        graph_s, graph = best(lambda: build_graph(result.plan), args.repeats, "graph")
        examples[name] = {"tasks": len(graph), "load_ms": round(1e3 * load_s, 2), "plan_ms": round(1e3 * plan_s, 2),
                          "graph_ms": round(1e3 * graph_s, 2),
                          "first_call_ms": {k: round(1e3 * v, 2) for k, v in FIRST.items()}}

    with tempfile.TemporaryDirectory() as tmp:
        data = tuple(DataSpec(name=f"d{i}", path=f"d{i}.jsonl", tokenizer="tiktoken:gpt2") for i in range(50))
        stages = [make_stage("s0", data=("d0",))]
        stages += [make_stage(f"s{i}", "sft", after=(f"s{i - 1}",), data=(f"d{i % 50}",)) for i in range(1, 200)]
        plan = make_plan(tmp, data=data, stages=stages)
        graph_s, graph = best(lambda: build_graph(plan), max(3, args.repeats // 4))
        json_s, _ = best(graph.to_json, max(3, args.repeats // 4))
    report = {
        "benchmark": "graph_compile",
        "examples": examples,
        "synthetic_200_stages_50_data": {"tasks": len(graph), "graph_ms": round(1e3 * graph_s, 2),
                                         "to_json_ms": round(1e3 * json_s, 2)},
        "machine": {"cpus": os.cpu_count(), "note": "best of repeats on a shared machine"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
