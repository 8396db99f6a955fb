"""Benchmark and tally `nemoc import` / `nemoc export --megatron-args`.

For every published input in tests/data/interop/: the median in-process import time (shell or YAML
reading, mapping, preset matching, formatting), how many source settings were not carried over and how
many warnings were raised, and whether the imported file plans. For every training stage of every
example: the median export time (after Megatron-Core's import) and whether import(export(plan)) plans
the same layout.

    python bench/bench_interop.py [--repeat 20]

Prints a table and writes bench/results/interop.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINING = ("pretrain", "sft", "dpo", "reward", "ppo")


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _plans(text: str) -> tuple[bool, object]:
    from nemoc.compiler.lower import load_experiment
    from nemoc.compiler.planner import plan_experiment
    from nemoc.dsl.diagnostics import DiagnosticError

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.nemo"
        path.write_text(text)
        spec, _ = load_experiment(str(path))
        try:
            return True, plan_experiment(spec).plan
        except DiagnosticError as err:
            return False, err.diagnostics[0].code


def imports(repeat: int) -> list[dict]:
    from nemoc.compiler.interop import import_text

    rows = []
    for path in sorted((REPO / "tests" / "data" / "interop").iterdir()):
        if path.suffix not in (".sh", ".yaml"):
            continue
        text = path.read_text()
        result = import_text(text, path.name)
        ok, outcome = _plans(result.text)
        rows.append({"input": path.name, "format": result.format, "import_ms": _median_ms(
            lambda: import_text(text, path.name), repeat), "not_carried_over": len(result.dropped),
            "warnings": len(result.warnings), "plans": ok, "diagnostic": None if ok else outcome})
    return rows


def exports(repeat: int) -> list[dict]:
    from nemoc.compiler.interop import import_text
    from nemoc.compiler.lower import load_experiment
    from nemoc.compiler.planner import plan_experiment
    from nemoc.runtime.megatron_args import megatron_lm_command

    rows = []
    for path in sorted((REPO / "examples").glob("*.nemo")):
        plan = plan_experiment(load_experiment(str(path))[0]).plan
        for stage in (s for s in plan.stages if s.kind == "pretrain"):
            command = megatron_lm_command(plan, stage.name)
            ok, again = _plans(import_text(command, "x.sh", gpu=plan.cluster.gpu).text)
            rows.append({"example": path.stem, "stage": stage.name, "flags": command.count("\n    --"),
                         "export_ms": _median_ms(lambda: megatron_lm_command(plan, stage.name), repeat),
                         "round_trip_same_layout": ok and again.stages[0].layout == stage.layout})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    imp, exp = imports(args.repeat), exports(args.repeat)
    print(f"{'input':42} {'format':12} {'import ms':>9} {'dropped':>7} {'warn':>4}  plans")
    for r in imp:
        print(f"{r['input']:42} {r['format']:12} {r['import_ms']:9.2f} {r['not_carried_over']:7} {r['warnings']:4}  "
              f"{'yes' if r['plans'] else r['diagnostic']}")
    print(f"\n{'example':24} {'stage':10} {'flags':>5} {'export ms':>9}  round trip")
    for r in exp:
        print(f"{r['example']:24} {r['stage']:10} {r['flags']:5} {r['export_ms']:9.2f}  "
              f"{'same layout' if r['round_trip_same_layout'] else 'DIFFERENT'}")
    out = REPO / "bench" / "results" / "interop.json"
    out.write_text(json.dumps({"python": sys.version.split()[0], "machine": platform.machine(), "repeat": args.repeat,
                               "imports": imp, "exports": exp}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
