"""Benchmark `nemoc check`: compile time per example, after start-up, and the adversarial inputs.

For every `examples/*.nemo`: the first in-process compile (parser tables already loaded), then the
median and p95 of N repeated compiles (read + parse + imports + schema + lowering + layout rules,
exactly what `nemoc check` does after start-up), and the wall-clock time of one `nemoc check`
process (Python start-up and imports included) for reference.

Adversarial inputs (issue 16): files under the size limits built to be slow or to allocate: thousands
of unknown or duplicate fields (one per line, or all on one line), a flat sum, chained unary minus,
brackets nested to the limit, 64-digit literals, one long string, a sea of comments, many unused data
blocks, thousands of stages; each at about 1 MiB (MAX_BYTES) and again just under MAX_TOKENS. For each: `check` (compile +
layout rules + render every diagnostic, as the CLI prints them), `fmt`, and `plan` where the input is
clean; the peak of traced Python memory (tracemalloc) against the input size; and whether it meets
the budget: BUDGET_S seconds and BUDGET_BYTES_PER_CHAR x input + BUDGET_CONSTANT_MIB.

    python bench/bench_check.py [--repeat 50] [--no-process] [--no-adversarial]

Prints tables and writes bench/results/check.json.
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
BUDGET_S = 10.0  # any input under the size limits, on one loaded core of a shared 2-core CI box
BUDGET_BYTES_PER_CHAR = 200
BUDGET_CONSTANT_MIB = 64  # lark's tree is ~1 KB a token: MAX_TOKENS bounds it near 50 MB


def measure(path: Path, repeat: int) -> dict:
    from nemoc.runtime.cli.lang import check_file

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


# ----------------------------------------------------------------------------------- adversarial

_HEAD = ("# adversarial\nexperiment adv {\n  cluster {\n    gpu = CPU\n    nodes = 1\n    gpus_per_node = 2\n  }\n"
         "  model tiny {\n    layers = 2\n    hidden = 64\n    heads = 2\n    ffn_hidden = 256\n    vocab = 256\n"
         "    seq_length = 64\n  }\n  precision = fp32\n  data web {\n    path = \"web.jsonl\"\n  }\n"
         "  stage pretrain {\n    data = [web]\n    steps = 10\n    global_batch = 4\n")
_TAIL = "  }\n}\n"
_DEEP = "[" * 60 + "1" + "]" * 60

# name -> (line or repeated piece, tokens in it, prefix inside the stage block, suffix); `{i}` is numbered
SHAPES = {
    "unknown fields, one per line": ("    f{i} = 1\n", 3, "", ""),
    "duplicate fields, one line": ("steps = 1 ", 3, "    ", "\n"),
    "flat sum": ("1 + ", 2, "    log_every = ", "1\n"),
    "unary minus chains": ("    a{i} = - - - - - - - - - - 1\n", 13, "", ""),
    "brackets at the limit": ("    b{i} = " + _DEEP + "\n", 124, "", ""),
    "64-digit literals": ("    seed = " + "9" * 64 + "\n", 3, "", ""),
    "comments": ("    # a comment line\n", 1, "", ""),
    "unused data blocks": ("  }\n  data d{i} {\n    path = \"x\"\n", 7, "", ""),
    "many stages": ("  }\n  stage s{i} {\n    kind = pretrain\n    data = [web]\n    steps = 10\n    global_batch = 4\n",
                    18, "", ""),
}


def adversarial_inputs() -> dict[str, str]:
    """Each shape at ~1 MiB of text and just under MAX_TOKENS tokens, plus one long string."""
    from nemoc.dsl.parser import MAX_BYTES, MAX_TOKENS

    out = {}
    room = MAX_BYTES - len(_HEAD) - len(_TAIL) - 200
    for name, (piece, tokens, prefix, suffix) in SHAPES.items():
        by_size = _repeat(piece, max_chars=room)
        by_tokens = _repeat(piece, max_chars=room, count=(MAX_TOKENS - 200) // tokens)
        out[f"{name} (~1 MiB)"] = _HEAD + prefix + by_size + suffix + _TAIL
        out[f"{name} (<{MAX_TOKENS // 1000}k tokens)"] = _HEAD + prefix + by_tokens + suffix + _TAIL
    out["one long string (~1 MiB)"] = _HEAD + '    kind = "' + "x" * (room - 20) + '"\n' + _TAIL
    return out


def _repeat(piece: str, *, max_chars: int, count: int | None = None) -> str:
    """`piece` repeated (`{i}` numbered) up to `max_chars` characters or `count` times."""
    parts, size, i = [], 0, 0
    while count is None or i < count:
        part = piece.replace("{i}", str(i))
        if size + len(part) > max_chars:
            break
        parts.append(part)
        size += len(part)
        i += 1
    return "".join(parts)


def measure_adversarial(name: str, text: str, tmp: Path) -> dict:
    import tracemalloc

    from nemoc.dsl.diagnostics import has_errors, render_all
    from nemoc.runtime.cli.lang import check_file, format_file

    path = tmp / "adversarial.nemo"
    path.write_text(text, encoding="utf-8")

    def check():
        diags, sources = check_file(str(path))
        return diags, render_all(diags, sources)

    start = time.perf_counter()
    diags, rendered = check()
    check_s = time.perf_counter() - start
    start = time.perf_counter()
    format_file(str(path))
    fmt_s = time.perf_counter() - start
    plan_s = None
    if not has_errors(diags):
        from nemoc.compiler.planner import plan_experiment
        from nemoc.runtime.cli.common import load_spec

        start = time.perf_counter()
        plan_experiment(load_spec(str(path))[0])
        plan_s = time.perf_counter() - start
    tracemalloc.start()
    check()
    format_file(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    seconds = max(check_s, fmt_s, plan_s or 0.0)
    memory_budget = BUDGET_BYTES_PER_CHAR * len(text) + (BUDGET_CONSTANT_MIB << 20)
    return {"chars": len(text), "diagnostics": len(diags), "rendered_chars": len(rendered),
            "first": diags[0].code if diags else None, "check_s": check_s, "fmt_s": fmt_s, "plan_s": plan_s,
            "peak_mib": peak / 2**20, "within_budget": seconds < BUDGET_S and peak < memory_budget}


def bench_adversarial() -> dict:
    import tempfile

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in adversarial_inputs().items():
            rows[name] = measure_adversarial(name, text, Path(tmp))
            r = rows[name]
            plan = f"{r['plan_s']:.2f}" if r["plan_s"] is not None else "-"
            print(f"{name:44} {r['chars']:>9,} {r['diagnostics']:>6,} {str(r['first']):>5} {r['check_s']:8.2f} "
                  f"{r['fmt_s']:6.2f} {plan:>6} {r['peak_mib']:8.1f}  {'ok' if r['within_budget'] else 'OVER'}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--no-process", action="store_true", help="skip the whole-process timing")
    parser.add_argument("--no-adversarial", action="store_true", help="skip the adversarial inputs")
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
    if not args.no_adversarial:
        import os

        print(f"\nadversarial inputs (budget: {BUDGET_S:g} s for check, fmt and plan; traced memory "
              f"< {BUDGET_BYTES_PER_CHAR} x chars + {BUDGET_CONSTANT_MIB} MiB; load average {os.getloadavg()[0]:.1f})")
        header = f"{'input':44} {'chars':>9} {'diags':>6} {'first':>5} {'check s':>8} {'fmt s':>6} {'plan s':>6} {'peak MiB':>8}"
        print(header)
        print("-" * len(header))
        adversarial = bench_adversarial()
        out["adversarial"] = {"budget_s": BUDGET_S, "budget_bytes_per_char": BUDGET_BYTES_PER_CHAR, "budget_constant_mib": BUDGET_CONSTANT_MIB,
                              "load_average": list(os.getloadavg()), "inputs": adversarial,
                              "all_within_budget": all(r["within_budget"] for r in adversarial.values())}
    target = REPO / "bench" / "results" / "check.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
