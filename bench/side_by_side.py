"""Side-by-side timing of two training loops on a shared host: the runtime's and a bare one.

`interleave` alternates chunks of `steps_per_chunk` steps of each side (which side starts alternates
per pair), timing each chunk's wall and process CPU time, so that a pair's two chunks run within a
fraction of a second of each other and the host's load, which drifts over seconds, mostly cancels in
the pair's ratio. `compare` summarises per-pair (or per-round) ratios."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def interleave(runtime_chunk: Callable[[], None], bare_chunk: Callable[[], None], *, pairs: int, warmup_pairs: int,
               steps_per_chunk: int) -> dict:
    """Run `pairs + warmup_pairs` pairs of chunks; per side, per measured pair: [wall s/step], [CPU s/step]."""
    sides = {"runtime": runtime_chunk, "bare": bare_chunk}
    times = {name: ([], []) for name in sides}
    loads = []
    for pair in range(warmup_pairs + pairs):
        for name in (("bare", "runtime") if pair % 2 == 0 else ("runtime", "bare")):
            wall, cpu = time.perf_counter(), time.process_time()
            sides[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if pair >= warmup_pairs:
                times[name][0].append([wall / steps_per_chunk])
                times[name][1].append([cpu / steps_per_chunk])
        if pair % 8 == 0:
            loads.append(os.getloadavg()[0])
    return {**compare(times["runtime"][0], times["bare"][0], times["runtime"][1], times["bare"][1]),
            "pairs": pairs, "warmup_pairs_dropped": warmup_pairs, "steps_per_chunk": steps_per_chunk,
            "load_average_1min_samples": loads}


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def compare(runtime_wall: list[list[float]], bare_wall: list[list[float]], runtime_cpu: list[list[float]],
            bare_cpu: list[list[float]]) -> dict:
    """Ratios runtime / bare from per-round (or per-pair) lists of per-step times: of the medians of all
    intervals, of the fastest intervals (the least disturbed), and of each round's medians (a round's
    two sides ran close in time: the spread of these is the host's noise; their median is the
    estimate least moved by it), for wall time and for process CPU time (`cpu_` keys)."""
    out = {}
    for prefix, rt_rounds, br_rounds in (("", runtime_wall, bare_wall), ("cpu_", runtime_cpu, bare_cpu)):
        rt_all = [t for x in rt_rounds for t in x]
        br_all = [t for x in br_rounds for t in x]
        rt, br = statistics.median(rt_all), statistics.median(br_all)
        paired = [statistics.median(r) / statistics.median(b) for r, b in zip(rt_rounds, br_rounds)]
        low, high = _quartiles(paired)
        kind = "cpu_" if prefix else ""
        out.update({
            f"runtime_{kind}step_s_median": rt, f"bare_{kind}step_s_median": br,
            ("cpu_ratio" if prefix else "ratio_runtime_over_bare"): rt / br,
            f"{prefix}overhead": rt / br - 1.0,
            f"runtime_{kind}step_s_min": min(rt_all), f"bare_{kind}step_s_min": min(br_all),
            f"{prefix}ratio_min_intervals": min(rt_all) / min(br_all),
            f"{prefix}round_ratios": paired, f"{prefix}round_ratio_median": statistics.median(paired),
            f"{prefix}round_ratio_q1": low, f"{prefix}round_ratio_q3": high,
            f"{prefix}round_ratio_min": min(paired), f"{prefix}round_ratio_max": max(paired),
            f"runtime_{kind}intervals": rt_rounds, f"bare_{kind}intervals": br_rounds,
        })
    return out
