"""Golden runtime graphs of every example (task ids, kinds, artifacts, hashes, settings slices).

A diff here means a change of what `nemoc run` would re-run: review it. Regenerate with
`pytest tests/compiler/test_graph_golden.py --update-golden`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nemoc.compiler.graph import build_graph
from nemoc.compiler.lower import load_experiment
from nemoc.compiler.planner import plan_experiment
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden_graph"
EXAMPLES = sorted((REPO / "examples").glob("*.nemo"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_golden_graph(path: Path, request):
    spec, _ = load_experiment(str(path))
    graph = build_graph(plan_experiment(spec, target=NEMOC_RUNTIME).plan)
    # data paths are hashed relative to the example's directory, so the golden is machine-independent
    actual = graph.to_json()
    golden = GOLDEN / f"{path.stem}.graph.json"
    if request.config.getoption("--update-golden"):
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(actual)
    assert golden.exists(), f"missing {golden}; run pytest {Path(__file__).name} --update-golden"
    assert golden.read_text() == actual, f"the runtime graph of {path.name} changed; review, then --update-golden"
