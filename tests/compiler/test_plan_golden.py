"""Golden plans of every example: the chosen layout, memory and estimates of each stage.

A diff here means a change of what `nemoc plan` decides or predicts (a cost- or memory-model change that
moves a chosen layout, or an estimate): review it as a diff, then regenerate with
`pytest tests/compiler/test_plan_golden.py --update-golden`.

The golden is the plan JSON the runtime reads (`compiler.plan.to_json`), made machine-independent (the
experiment's root directory is dropped) and with floats rounded to 4 significant digits, so a diff shows a
real change rather than the last bits of a sum.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemoc.compiler.lower import load_experiment
from nemoc.compiler.plan import from_json, to_json
from nemoc.compiler.planner import plan_experiment
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden_plan"
EXAMPLES = sorted((REPO / "examples").glob("*.nemo"))


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def golden_text(plan_json: str) -> str:
    data = json.loads(plan_json)
    data.pop("root", None)
    return json.dumps(_rounded(data), indent=1, sort_keys=True) + "\n"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_golden_plan(path: Path, request):
    spec, _ = load_experiment(str(path))
    plan = plan_experiment(spec, target=NEMOC_RUNTIME).plan
    text = to_json(plan)
    assert from_json(text) == plan  # the golden is of the exact data the runtime reads
    actual = golden_text(text)
    golden = GOLDEN / f"{path.stem}.plan.json"
    if request.config.getoption("--update-golden"):
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(actual)
    assert golden.exists(), f"missing {golden}; run pytest {Path(__file__).name} --update-golden"
    assert golden.read_text() == actual, f"the plan of {path.name} changed; review the diff, then --update-golden"
