"""compiler/graph.py: task ids, artifacts, hashes that change only where they should, cycles, formats."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from plan_factory import make_plan, make_stage, with_stage

from nemoc.compiler.graph import GraphError, RuntimeGraph, build_graph
from nemoc.compiler.spec import DataSpec, OptimizerSpec


@pytest.fixture
def root(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    return tmp_path


def pipeline(root, **sft_changes):
    data = (DataSpec(name="web", path="corpus.jsonl", format="jsonl"),
            DataSpec(name="chat", path="sft.jsonl", format="prompt_response"))
    stages = (make_stage("pretrain", data=("web",)),
              make_stage("sft", "sft", after=("pretrain",), data=("chat",), **sft_changes),
              make_stage("final", "eval", after=("sft",), data=()))
    return make_plan(root, data=data, stages=stages)


def hashes(graph: RuntimeGraph) -> dict[str, str]:
    return {t.id: t.hash for t in graph.tasks()}


def test_tasks_edges_and_order(root):
    graph = build_graph(pipeline(root))
    assert graph.order() == ["tokenizer:local", "prepare:chat", "prepare:web", "train:pretrain", "train:sft",
                             "eval:final"]
    assert [(a.src, a.dst, a.type) for a in graph.inputs("train:sft")] == [
        ("prepare:chat", "train:sft", "dataset"), ("train:pretrain", "train:sft", "checkpoint")]
    assert graph.task("train:sft").kind == "sft" and graph.task("train:sft").stage == "sft"
    assert graph.task("eval:final").kind == "eval"


def test_editing_a_later_stage_changes_only_it_and_its_descendants(root):
    before = hashes(build_graph(pipeline(root)))
    after = hashes(build_graph(pipeline(root, optimizer=OptimizerSpec(lr=1e-5))))
    changed = {t for t in before if before[t] != after[t]}
    assert changed == {"train:sft", "eval:final"}


def test_layout_and_intervals_do_not_change_the_hash_but_steps_do(root):
    plan = make_plan(root)
    base = hashes(build_graph(plan))
    from plan_factory import make_layout
    relaid = with_stage(plan, "pretrain", layout=make_layout(tp=2, micro_batch=1), log_every=1)
    assert hashes(build_graph(relaid)) == base
    longer = hashes(build_graph(with_stage(plan, "pretrain", steps=21)))
    assert longer["train:pretrain"] != base["train:pretrain"] and longer["prepare:web"] == base["prepare:web"]


def test_data_content_changes_propagate(root):
    base = hashes(build_graph(make_plan(root)))
    (root / "corpus.jsonl").write_text('{"text": "hello world!"}\n')
    edited = hashes(build_graph(make_plan(root)))
    assert all(base[t] != edited[t] for t in base)  # tokenizer, prepare and train all depend on the bytes


def test_named_tokenizer_has_no_local_tokenizer_task(root):
    (root / "tok.json").write_text("{}")
    plan = make_plan(root, data=(DataSpec(name="web", path="corpus.jsonl", format="jsonl", tokenizer="tok.json"),))
    graph = build_graph(plan)
    assert "tokenizer:local" not in graph
    before = graph.task("prepare:web").hash
    (root / "tok.json").write_text('{"changed": 1}')
    assert build_graph(plan).task("prepare:web").hash != before


def test_cycle_is_reported_as_a_path(root):
    stages = (make_stage("a", after=("b",)), make_stage("b", after=("a",)))
    with pytest.raises(GraphError, match=r"a -> b -> a|b -> a -> b"):
        build_graph(make_plan(root, stages=stages))


def test_unknown_parent_and_data(root):
    with pytest.raises(GraphError, match="'nope', which is not a stage"):
        build_graph(make_plan(root, stages=(make_stage(after=("nope",)),)))
    with pytest.raises(GraphError, match="uses data 'missing'"):
        build_graph(make_plan(root, stages=(make_stage(data=("missing",)),)))


def test_json_is_deterministic_versioned_and_round_trips(root):
    graph = build_graph(pipeline(root))
    text = graph.to_json()
    assert text == build_graph(pipeline(root)).to_json()
    data = json.loads(text)
    assert data["version"] == 1 and data["experiment"] == "exp"
    assert RuntimeGraph.from_json(text).to_json() == text
    with pytest.raises(GraphError, match="version 99"):
        RuntimeGraph.from_dict(dict(data, version=99))


def test_dot_and_mermaid(root):
    graph = build_graph(pipeline(root))
    dot = graph.to_dot()
    assert dot.startswith('digraph "exp" {') and '"train:pretrain" -> "train:sft" [label="checkpoint"];' in dot
    mermaid = graph.to_mermaid()
    assert mermaid.startswith("flowchart LR") and "-->|checkpoint|" in mermaid


def test_graph_module_imports_no_torch():
    code = "import sys, nemoc.compiler.graph; sys.exit('torch' in sys.modules or 'megatron' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_model_labels_do_not_change_the_hash(root):
    from dataclasses import replace

    plan = make_plan(root)
    relabelled = replace(plan, model=replace(plan.model, name="renamed", source="another citation"))
    assert hashes(build_graph(relabelled)) == hashes(build_graph(plan))
    wider = replace(plan, model=replace(plan.model, hidden=128))
    assert hashes(build_graph(wider))["train:pretrain"] != hashes(build_graph(plan))["train:pretrain"]
