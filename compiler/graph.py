"""Runtime-graph emission: a compiled `Plan` -> a `RuntimeGraph` of tasks joined by artifacts.

Input:  a `nemoc.compiler.plan.Plan` (every `auto` resolved) and the data files it names (read only to
        hash their bytes).
Output: a `RuntimeGraph`: a small wrapper over `networkx.DiGraph` keyed by string task ids
        (`tokenizer:local`, `prepare:<data>`, `hf_import:<dir>`, `train:<stage>`, `eval:<stage>`,
        `export:<stage>`); edges are artifacts (`tokenizer`, `dataset`, `checkpoint`). A stage that starts
        from a Hugging Face checkpoint (`init = hf(DIR)` on the stage, or on the model for a stage without
        `after`) gets the checkpoint edge from the `hf_import` task converting DIR; an export stage whose
        only input is that import runs as kind `hf_export` (HF -> Megatron-Core -> HF, docs/huggingface.md). Deterministic, versioned JSON; DOT; mermaid.
Invariants: pure (the plan is not mutated; the same plan and files give byte-identical JSON); acyclic
(a cycle raises `GraphError("a -> b -> a")`); every task's `hash` covers its settings slice of the plan,
its input files' content and its upstream tasks' hashes, so editing a later stage changes only the
hashes of that stage and its descendants. No torch, no Megatron (the compiler layer).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import networkx as nx

from nemoc.compiler.plan import Plan, StagePlan, to_dict
from nemoc.compiler.spec import DataSpec, _empty

GRAPH_VERSION = 1
# Bumped when what a task produces changes shape, so old outputs are not taken for new ones.
HASH_SALT = "nemoc-task-v1"
LOCAL_TOKENIZER = "tokenizer:local"
# stage kind -> task id prefix; every other (training) kind is `train:`.
PREFIX_BY_KIND = {"eval": "eval", "export": "export"}


class GraphError(ValueError):
    """The plan cannot be turned into a runtime graph (a cycle, an unknown stage or data source)."""


@dataclass(frozen=True, slots=True)
class Task:
    """One node. `kind` selects the runner (`tokenizer`, `prepare`, or the stage kind)."""

    id: str
    kind: str
    hash: str
    stage: str | None = None
    settings: Mapping[str, object] = field(default_factory=_empty, compare=False)

    @property
    def short_hash(self) -> str:
        return self.hash[:8]


@dataclass(frozen=True, slots=True)
class Artifact:
    """One edge: what `src` hands to `dst`."""

    src: str
    dst: str
    type: str  # tokenizer | dataset | checkpoint
    name: str  # the data source or stage it belongs to


class RuntimeGraph:
    """A DAG of `Task`s keyed by id; edges carry an `Artifact`. Build with `build_graph`."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self._g = nx.DiGraph()

    # ----------------------------------------------------------------------------------- building
    def add_task(self, task: Task) -> None:
        if task.id in self._g:
            raise GraphError(f"duplicate task id {task.id!r}")
        self._g.add_node(task.id, task=task)

    def add_artifact(self, artifact: Artifact) -> None:
        for end in (artifact.src, artifact.dst):
            if end not in self._g:
                raise GraphError(f"edge {artifact.src} -> {artifact.dst}: unknown task {end!r}")
        self._g.add_edge(artifact.src, artifact.dst, artifact=artifact)

    # ----------------------------------------------------------------------------------- queries
    def __contains__(self, task_id: str) -> bool:
        return task_id in self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def task(self, task_id: str) -> Task:
        return self._g.nodes[task_id]["task"]

    def tasks(self) -> list[Task]:
        """All tasks in deterministic topological order (ties broken by id)."""
        return [self.task(t) for t in self.order()]

    def order(self) -> list[str]:
        self.check_acyclic()
        return list(nx.lexicographical_topological_sort(self._g))

    def inputs(self, task_id: str) -> list[Artifact]:
        """The artifacts flowing into `task_id`, sorted by source id."""
        return [self._g.edges[src, task_id]["artifact"] for src in sorted(self._g.predecessors(task_id))]

    def artifacts(self) -> list[Artifact]:
        return sorted((d["artifact"] for _, _, d in self._g.edges(data=True)), key=lambda a: (a.src, a.dst))

    def descendants(self, task_id: str) -> set[str]:
        return nx.descendants(self._g, task_id)

    def find_cycle(self) -> list[str] | None:
        """A cycle as a closed path `[a, b, a]`, or None."""
        try:
            edges = nx.find_cycle(self._g)
        except nx.NetworkXNoCycle:
            return None
        return [edges[0][0]] + [v for _, v in edges]

    def check_acyclic(self) -> None:
        cycle = self.find_cycle()
        if cycle:
            raise GraphError("the stages form a cycle: " + " -> ".join(cycle))

    # ----------------------------------------------------------------------------------- output
    def to_dict(self) -> dict:
        return {
            "version": GRAPH_VERSION,
            "experiment": self.experiment,
            "tasks": [
                {"id": t.id, "kind": t.kind, "stage": t.stage, "hash": t.hash, "settings": to_dict(t.settings)}
                for t in self.tasks()
            ],
            "edges": [{"src": a.src, "dst": a.dst, "artifact": a.type, "name": a.name} for a in self.artifacts()],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping) -> RuntimeGraph:
        if data.get("version") != GRAPH_VERSION:
            raise GraphError(f"graph version {data.get('version')} is not supported (this nemoc reads {GRAPH_VERSION})")
        graph = cls(data["experiment"])
        for t in data["tasks"]:
            graph.add_task(Task(id=t["id"], kind=t["kind"], hash=t["hash"], stage=t["stage"], settings=t["settings"]))
        for e in data["edges"]:
            graph.add_artifact(Artifact(src=e["src"], dst=e["dst"], type=e["artifact"], name=e["name"]))
        return graph

    @classmethod
    def from_json(cls, text: str) -> RuntimeGraph:
        return cls.from_dict(json.loads(text))

    def to_dot(self) -> str:
        lines = [f"digraph {_quote(self.experiment)} {{", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
        for t in self.tasks():
            label = t.id + "\\n" + t.short_hash  # DOT's own line-break escape
            lines.append(f"  {_quote(t.id)} [label={_quote(label)}];")
        for a in self.artifacts():
            lines.append(f"  {_quote(a.src)} -> {_quote(a.dst)} [label={_quote(a.type)}];")
        return "\n".join(lines + ["}"]) + "\n"

    def to_mermaid(self) -> str:
        ids = {t: f"t{i}" for i, t in enumerate(self.order())}
        lines = ["flowchart LR"]
        for t in self.tasks():
            lines.append(f'  {ids[t.id]}["{t.id}<br/>{t.short_hash}"]')
        for a in self.artifacts():
            lines.append(f"  {ids[a.src]} -->|{a.type}| {ids[a.dst]}")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


# --------------------------------------------------------------------------------------- hashing


def content_hash(payload: object) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace) of `payload`."""
    text = json.dumps({"salt": HASH_SALT, "payload": to_dict(payload)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_files(data: DataSpec, root: str) -> list[str]:
    """The files a data source's glob matches (sorted, absolute); [] when it matches nothing."""
    pattern = data.path if os.path.isabs(data.path) else os.path.join(root, data.path)
    if os.path.isdir(os.path.expanduser(pattern)):  # a Hugging Face dataset folder: every file in it
        pattern = os.path.join(pattern, "**", "*")
    return sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))


def _files_digest(data: DataSpec, root: str) -> list[list[str]] | str:
    files = data_files(data, root)
    if not files:
        return f"no match: {data.path}"  # the prepare task reports it with the pattern; the graph still builds
    return [[os.path.relpath(f, root), file_digest(f)] for f in files]


def _tokenizer_digest(name: str, root: str) -> str:
    """A tokenizer named by a file is identified by its bytes; `tiktoken:<enc>` by its name."""
    if name.startswith("tiktoken:"):
        return name
    path = name if os.path.isabs(name) else os.path.join(root, name)
    if os.path.isdir(path):  # a Hugging Face tokenizer directory: its tokenizer files and chat template
        files = [f for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
                 if os.path.isfile(os.path.join(path, f))]
        return content_hash([[f, file_digest(os.path.join(path, f))] for f in files]) if files else f"missing: {name}"
    return file_digest(path) if os.path.isfile(path) else f"missing: {name}"


# --------------------------------------------------------------------------------------- emission


def task_id_for_stage(stage: StagePlan) -> str:
    return f"{PREFIX_BY_KIND.get(stage.kind, 'train')}:{stage.name}"


def build_graph(plan: Plan, *, root: str | None = None) -> RuntimeGraph:
    """Emit the runtime graph of `plan`. `root` (default `plan.root`) anchors relative data paths."""
    root = os.path.abspath(root if root is not None else plan.root)
    graph = RuntimeGraph(plan.experiment)
    data_by_name = {d.name: d for d in plan.data}
    used = sorted({name for s in plan.stages for name in s.data})
    for name in used:
        if name not in data_by_name:
            stage = next(s for s in plan.stages if name in s.data)
            raise GraphError(f"stage {stage.name!r} uses data {name!r}, which is not declared")
    digests = {name: _files_digest(data_by_name[name], root) for name in used}

    local = [data_by_name[n] for n in used if data_by_name[n].tokenizer is None]
    if local:
        _add_tokenizer_task(graph, plan, local, digests)
    prepare_hashes = {name: _add_prepare_task(graph, data_by_name[name], digests[name], root) for name in used}
    imports = _add_hf_import_tasks(graph, plan, root)
    _add_stage_tasks(graph, plan, data_by_name, prepare_hashes, imports, root)
    graph.check_acyclic()
    return graph


def _add_tokenizer_task(graph: RuntimeGraph, plan: Plan, sources: list[DataSpec], digests: dict) -> None:
    vocab = max((d.vocab_size for d in sources if d.vocab_size), default=plan.model.vocab)
    settings = {
        "algorithm": "byte-level-bpe",
        "vocab_size": vocab,
        "sources": [{"name": d.name, "format": d.format, "text_field": d.text_field} for d in sources],
    }
    hashed = dict(settings, files={d.name: digests[d.name] for d in sources})
    graph.add_task(Task(id=LOCAL_TOKENIZER, kind="tokenizer", hash=content_hash(hashed), settings=settings))


def _add_prepare_task(graph: RuntimeGraph, data: DataSpec, digest: object, root: str) -> str:
    settings = {
        "name": data.name,
        "path": data.path,
        "format": data.format,
        "text_field": data.text_field,
        "tokenizer": data.tokenizer,
        "options": dict(data.options),
    }
    if data.hf_split or data.columns:  # a Hugging Face dataset's split and column renames change the records
        settings["hf"] = {"split": data.hf_split, "columns": [list(c) for c in data.columns]}
    hashed: dict = dict(settings, path=None, files=digest)  # the bytes matter, not where they live
    if data.tokenizer is None:
        hashed["tokenizer"] = graph.task(LOCAL_TOKENIZER).hash
    else:
        hashed["tokenizer"] = [data.tokenizer, _tokenizer_digest(data.tokenizer, root)]
    task = Task(id=f"prepare:{data.name}", kind="prepare", hash=content_hash(hashed), settings=settings)
    graph.add_task(task)
    if data.tokenizer is None:
        graph.add_artifact(Artifact(LOCAL_TOKENIZER, task.id, "tokenizer", "local"))
    return task.hash


def _stage_settings(plan: Plan, stage: StagePlan, data_by_name: Mapping[str, DataSpec]) -> dict:
    """What changes a stage's result. The parallel layout and intervals are left out on purpose."""
    # name/source are labels, not maths; `init` (a path) enters as the hf_import task's content hash instead
    model = {k: v for k, v in to_dict(plan.model).items() if k not in ("name", "source", "init")}
    return {
        "model": model,
        "precision": plan.precision,
        "kind": stage.kind,
        "after": list(stage.after),
        "data": [{"name": n, "weight": data_by_name[n].weight, "split": list(data_by_name[n].split)} for n in stage.data],
        "seq_length": stage.seq_length,
        "steps": stage.steps,
        "global_batch": stage.layout.global_batch,
        "optimizer": stage.optimizer,
        "schedule": stage.schedule,
        "peft": stage.peft,
        "seed": stage.seed,
        "params": dict(stage.params),
    }


HF_WEIGHT_SUFFIXES = (".safetensors", ".json")


def stage_init(plan: Plan, stage: StagePlan, root: str | None = None) -> str | None:
    """The Hugging Face checkpoint directory a stage starts from (absolute): its own `init`, else the
    model's (for a stage with no parent; a stage `after` another starts from its parent's checkpoint).
    Relative paths are relative to the experiment's root (`root`, default `plan.root`)."""
    own = stage.params.init if "init" in stage.params else None
    found = own or (plan.model.init if not stage.after else None)
    if not found:
        return None
    return os.path.abspath(os.path.join(root if root is not None else plan.root, str(found)))


def hf_checkpoint_digest(directory: str) -> list[list[str]] | str:
    """sha256 of config.json, the index and every safetensors file (reads every byte: a 16 GB
    checkpoint takes ~10 s per graph build on one core)."""
    if not os.path.isdir(directory):
        return f"missing: {directory}"
    files = sorted(f for f in os.listdir(directory) if f.endswith(HF_WEIGHT_SUFFIXES) and f != "nemoc_hf.json")
    return [[f, file_digest(os.path.join(directory, f))] for f in files]


def _add_hf_import_tasks(graph: RuntimeGraph, plan: Plan, root: str) -> dict[str, tuple[str, str]]:
    """One `hf_import` task per distinct checkpoint directory: directory -> (task id, hash)."""
    out: dict[str, tuple[str, str]] = {}
    for directory in sorted({d for s in plan.stages if (d := stage_init(plan, s, root))}):
        base = os.path.basename(os.path.normpath(directory)) or "checkpoint"
        task_id, n = f"hf_import:{base}", 2
        while task_id in graph:
            task_id, n = f"hf_import:{base}-{n}", n + 1
        settings = {"path": os.path.relpath(directory, root) if directory.startswith(root + os.sep) else directory}
        task = Task(id=task_id, kind="hf_import", hash=content_hash({"files": hf_checkpoint_digest(directory)}),
                    settings=settings)
        graph.add_task(task)
        out[directory] = (task.id, task.hash)
    return out


def _add_stage_tasks(graph: RuntimeGraph, plan: Plan, data_by_name: dict, prepare_hashes: dict,
                     imports: Mapping[str, tuple[str, str]] | None = None, root: str = ".") -> None:
    imports = imports or {}
    stages = {s.name: s for s in plan.stages}
    for s in plan.stages:
        for parent in s.after:
            if parent not in stages:
                raise GraphError(f"stage {s.name!r} runs after {parent!r}, which is not a stage")
    order = _stage_order(plan)
    hashes: dict[str, str] = {}
    for name in order:
        stage = stages[name]
        settings = _stage_settings(plan, stage, data_by_name)
        upstream = {f"prepare:{d}": prepare_hashes[d] for d in stage.data}
        upstream.update({task_id_for_stage(stages[p]): hashes[p] for p in stage.after})
        init = stage_init(plan, stage, root)
        if init:
            upstream[imports[init][0]] = imports[init][1]
        hashes[name] = content_hash({"settings": settings, "inputs": upstream})
        task_id = task_id_for_stage(stage)
        kind = "hf_export" if stage.kind == "export" and init and not stage.after else stage.kind
        graph.add_task(Task(id=task_id, kind=kind, hash=hashes[name], stage=name, settings=settings))
        if init:
            graph.add_artifact(Artifact(imports[init][0], task_id, "checkpoint", "hf"))
        for d in stage.data:
            graph.add_artifact(Artifact(f"prepare:{d}", task_id, "dataset", d))
        for p in stage.after:
            graph.add_artifact(Artifact(task_id_for_stage(stages[p]), task_id, "checkpoint", p))


def _stage_order(plan: Plan) -> list[str]:
    """Stages in dependency order; a cycle among `after` raises with the closed path."""
    deps = nx.DiGraph()
    deps.add_nodes_from(s.name for s in plan.stages)
    deps.add_edges_from((p, s.name) for s in plan.stages for p in s.after)
    try:
        edges = nx.find_cycle(deps)
        raise GraphError("the stages form a cycle: " + " -> ".join([edges[0][0]] + [v for _, v in edges]))
    except nx.NetworkXNoCycle:
        pass
    position = {s.name: i for i, s in enumerate(plan.stages)}
    return list(nx.lexicographical_topological_sort(deps, key=position.__getitem__))


def iter_stage_tasks(graph: RuntimeGraph) -> Iterator[Task]:
    return (t for t in graph.tasks() if t.stage is not None)
