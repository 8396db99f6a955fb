"""HTML report cost: `nemoc plan --html` for the shipped examples.

    .venv/bin/python bench/bench_report.py [--repeats 3]

For each example: the schedule simulation (`compiler.schedule.stage_schedule`, all stages), the page
(`runtime.html_report.plan_html`, which includes the simulation and the pipeline memory), best of
`--repeats`, the page's size, and the number of schedule ops drawn. Writes bench/results/report.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def best(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from nemoc.compiler.lower import load_experiment
    from nemoc.compiler.planner import plan_experiment
    from nemoc.compiler.schedule import stage_schedule
    from nemoc.runtime.html_report import plan_html

    rows = []
    for path in sorted((ROOT / "examples").glob("*.nemo")):
        spec, _ = load_experiment(str(path))
        result = plan_experiment(spec)
        plan = result.plan
        t_sched, schedules = best(lambda: [stage_schedule(s) for s in plan.stages], args.repeats)
        t_page, page = best(lambda: plan_html(plan, results=result.stages), args.repeats)
        ops = sum(len(s.ops) for s in schedules if s is not None)
        rows.append({"example": path.name, "stages": len(plan.stages), "schedule_ops": ops,
                     "schedule_s": round(t_sched, 4), "page_s": round(t_page, 4), "page_bytes": len(page.encode())})
    print(f"{'example':34} {'stages':>6} {'ops':>7} {'schedule':>9} {'page':>7} {'size MiB':>9}")
    for r in rows:
        print(f"{r['example']:34} {r['stages']:>6} {r['schedule_ops']:>7} {r['schedule_s']:>8.3f}s "
              f"{r['page_s']:>6.2f}s {r['page_bytes'] / 2**20:>9.2f}")
    out = ROOT / "bench" / "results" / "report.json"
    out.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
