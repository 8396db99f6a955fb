"""No import cycles anywhere in nemoc, and the layering dsl <- compiler <- runtime, found by a static
walk of every module's imports: those run at import time (module body, `if` / `try` blocks) and,
separately, every import including the lazy ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grammar", "dsl", "compiler", "runtime")

# Cycles through lazy (function-level) imports allowed to stay; each entry is the sorted set of modules of
# one strongly connected component. Empty: runtime/align/data.py <-> runtime/data_prep.py was the last one
# (both now read records with runtime/records.py).
KNOWN: set[tuple[str, ...]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("nemoc",) + (parts[:-1] if parts[-1] == "__init__" else parts))
            out[name] = path
    return out


def _resolve(name: str, level: int, module: str, is_package: bool) -> str:
    if not level:
        return name
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _top_level_imports(node: ast.AST):
    """Import statements executed at import time: the module body, and `if`/`try` blocks in it (not
    `if TYPE_CHECKING:`), never function or class bodies' nested functions."""
    for stmt in getattr(node, "body", []):
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.If):
            if "TYPE_CHECKING" in ast.unparse(stmt.test):
                continue
            yield from _top_level_imports(stmt)
            for orelse in stmt.orelse:
                yield from _top_level_imports(ast.Module(body=[orelse], type_ignores=[]))
        elif isinstance(stmt, ast.Try):
            yield from _top_level_imports(stmt)
            for handler in stmt.handlers:
                yield from _top_level_imports(handler)
        elif isinstance(stmt, ast.ClassDef):
            yield from _top_level_imports(stmt)


def import_graph(lazy: bool = True) -> dict[str, set[str]]:
    """module -> the nemoc modules it imports; `lazy`: imports inside functions count too."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        stmts = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if lazy \
            else _top_level_imports(tree)
        for stmt in stmts:
            targets = []
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            else:
                base = _resolve(stmt.module or "", stmt.level, name, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in stmt.names]
            for t in targets:
                while t and t not in modules:  # `import nemoc.compiler.plan.x` -> the deepest module that exists
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("nemoc."):
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_whole_project_and_finds_a_planted_cycle():
    graph = import_graph()
    assert len(graph) > 60 and "nemoc.compiler.planner" in graph and "nemoc.runtime.megatron_args" in graph
    assert "nemoc.compiler.plan" in graph["nemoc.compiler.planner"]
    planted = dict(graph, **{"nemoc.compiler.plan": graph["nemoc.compiler.plan"] | {"nemoc.compiler.planner"}})
    assert any({"nemoc.compiler.plan", "nemoc.compiler.planner"} <= set(c) for c in cycles(planted))


def test_no_import_cycles_at_import_time():
    assert cycles(import_graph(lazy=False)) == []


def test_no_import_cycles_through_lazy_imports_beyond_the_known_ones():
    found = set(cycles(import_graph()))
    assert found - KNOWN == set(), f"import cycles: {sorted(found - KNOWN)}"


def test_layers_import_only_downwards():
    """dsl imports no compiler or runtime module; compiler imports no runtime module (not even lazily)."""
    below = {"dsl": ("nemoc.compiler", "nemoc.runtime"), "compiler": ("nemoc.runtime",)}
    bad = [(m, t) for m, targets in import_graph().items() for t in targets
           for layer, forbidden in below.items() if m.startswith(f"nemoc.{layer}.") and t.startswith(forbidden)]
    assert bad == []


def test_the_training_runtime_reads_only_the_plan_from_the_compiler():
    """The runtime translates the plan and re-derives nothing: every runtime module outside the commands
    (runtime/cli/, which compile, check and plan) imports only the plan's types from the compiler (no rules,
    cost, FLOPs or catalog at run time). Two modules that are not training code say more: the HTML report
    renders a plan's search result and pipeline schedule (`nemoc plan --html`, `nemoc report`), and
    runtime/target.py describes this runtime to the planner as a `compiler.target.Target`."""
    # hfconfig is the Hugging Face config.json format (a file format both the checker and the converter
    # read), not a planning decision: the converter reads the checkpoint's own config with it.
    # hfdata likewise: the on-disk layouts of Hugging Face datasets (which files hold a split).
    allowed = {"nemoc.compiler.plan", "nemoc.compiler.spec", "nemoc.compiler.params", "nemoc.compiler.graph",
               "nemoc.compiler.hfconfig", "nemoc.compiler.hfdata"}
    renderers = {"nemoc.runtime.html_report": {"nemoc.compiler.search", "nemoc.compiler.schedule"},
                 "nemoc.runtime.target": {"nemoc.compiler.target"}}
    graph = import_graph()
    seen = [m for m in graph if m.startswith("nemoc.runtime.") and not m.startswith("nemoc.runtime.cli")]
    bad = sorted((m, t) for m in seen for t in graph[m]
                 if t.startswith("nemoc.compiler") and t not in allowed | renderers.get(m, set()))
    assert len(seen) > 40 and {"nemoc.runtime.train", "nemoc.runtime.core.loop", "nemoc.runtime.align.dpo",
                               "nemoc.runtime.generation", "nemoc.runtime.objectives.kto"} <= set(seen)
    assert bad == []
    # what the test forbids is really there to forbid: the commands do import the planner and the rules
    assert {"nemoc.compiler.planner", "nemoc.compiler.rules"} & set().union(
        *(graph[m] for m in graph if m.startswith("nemoc.runtime.cli")))


def _closure(graph: dict[str, set[str]], roots) -> set[str]:
    seen, todo = set(), [r for r in roots if r in graph]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_the_layout_shows_the_architecture():
    """cli (commands) -> orchestrate (executor, run directory, launchers) -> training: orchestration never
    imports a command, nothing but the CLI imports the CLI, and the training entry points load neither
    at import time (they read a task file and the plan it names)."""
    graph = import_graph()
    cli = "nemoc.runtime.cli"
    upward = sorted((m, t) for m, ts in graph.items() for t in ts
                    if (t == cli or t.startswith(cli + ".")) and not (m == cli or m.startswith(cli + ".")))
    assert upward == []
    assert {m for m in graph if m.startswith("nemoc.runtime.orchestrate.")} >= {
        "nemoc.runtime.orchestrate.executor", "nemoc.runtime.orchestrate.rundir", "nemoc.runtime.orchestrate.launchers",
        "nemoc.runtime.orchestrate.launch_local", "nemoc.runtime.orchestrate.launch_slurm",
        "nemoc.runtime.orchestrate.launch_k8s", "nemoc.runtime.orchestrate.procs"}
    loaded = _closure(import_graph(lazy=False), ("nemoc.runtime.train", "nemoc.runtime.align",
                                                 "nemoc.runtime.align.__main__"))
    assert len(loaded) > 10
    assert sorted(m for m in loaded if m.startswith(("nemoc.runtime.orchestrate", cli))) == []
