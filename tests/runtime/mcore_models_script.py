"""Run a script that builds Megatron-Core models in a fresh interpreter (Megatron's global parallel state stays out
of the test process) and read the JSON it prints after `RESULT `: the ModelSpecs go in as its first argument."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys


def run_models_script(script: str, models: dict) -> dict:
    """`script` run with `{name: ModelSpec fields}` of `models`; its `RESULT {...}` line, parsed."""
    fields = {name: {f.name: getattr(m, f.name) for f in dataclasses.fields(m)} for name, m in models.items()}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(fields)], capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])
