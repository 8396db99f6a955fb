"""docs/language.md is generated from the schema; it must not drift, and must cover every field."""

from __future__ import annotations

from lang_helpers import REPO

from nemoc.dsl.docgen import render
from nemoc.dsl.schema import BLOCKS, CALLS, STAGE_PARAMS


def test_language_reference_is_up_to_date():
    text = (REPO / "docs" / "language.md").read_text()
    assert text == render(), "run: python -m nemoc.dsl.docgen > docs/language.md"


def test_every_field_is_documented():
    text = render()
    everything = [f for b in BLOCKS.values() for f in b.fields] + \
                 [f for p in STAGE_PARAMS.values() for f in p] + [f for a in CALLS.values() for f in a]
    for f in everything:
        assert f"| `{f.name}` |" in text
        assert f.doc, f"field {f.name} has no doc"


def test_schema_matches_the_spec():
    """Every spec field is settable from the language (names equal, except async -> async_save)."""
    from dataclasses import fields

    from nemoc.compiler.spec import CheckpointSpec, ClusterSpec, DataSpec, LoraSpec, ModelSpec, OptimizerSpec, \
        ParallelSpec, ScheduleSpec, StageSpec

    def names(cls, skip=()):
        return {f.name for f in fields(cls)} - set(skip)

    def schema(kind):
        return {f.name for f in BLOCKS[kind].fields}

    assert names(ModelSpec, ("name", "source")) == schema("model")
    assert names(ClusterSpec, ("scheduler_options",)) == schema("cluster")
    assert names(ParallelSpec) == schema("parallel")
    assert names(DataSpec, ("name", "options")) <= schema("data")
    assert names(StageSpec, ("name", "after", "params", "checkpoint", "parallel")) == schema("stage")
    assert names(CheckpointSpec, ("async_save",)) | {"async"} == {f.name for f in BLOCKS["checkpoint"].fields}
    assert names(OptimizerSpec, ("name",)) == {f.name for f in CALLS["adam"]}
    assert names(ScheduleSpec, ("name",)) == {f.name for f in CALLS["cosine"]}
    assert names(LoraSpec) == {f.name for f in CALLS["lora"]}


def test_scheduler_arguments_match_the_launchers():
    """The language accepts exactly the options the Slurm and Kubernetes launchers understand."""
    from nemoc.runtime import launch_k8s, launch_slurm

    assert {f.name for f in CALLS["slurm"]} == set(launch_slurm._KNOWN_OPTIONS)
    assert {f.name for f in CALLS["k8s"]} == set(launch_k8s._KNOWN)


def _names_read_by(paths) -> set[str]:
    """Stage-param names the runtime / planner read: `params.get("x"` style calls and PPOConfig fields."""
    import ast as pyast
    import re

    names = set()
    for path in paths:
        text = path.read_text()
        names |= set(re.findall(r'(?:\bp|params|params or \{\}\))\.get\("(\w+)"', text))
        for node in pyast.walk(pyast.parse(text)):
            if isinstance(node, pyast.ClassDef) and node.name == "PPOConfig":
                names |= {n.target.id for n in node.body if isinstance(n, pyast.AnnAssign)}
    return names


def test_stage_params_are_the_ones_the_runtime_reads():
    sources = sorted((REPO / "runtime" / "align").glob("*.py")) + [REPO / "runtime" / "train.py",
                                                                    REPO / "compiler" / "planner.py"]
    read = _names_read_by(sources)
    declared = {f.name for params in STAGE_PARAMS.values() for f in params}
    # export `format` has one value, huggingface, which is what the export runner always writes
    assert declared - read == {"format"}, "declared but never read"
    assert read - declared == set(), ("read by the runtime but not settable from the language: add it to "
                                      "STAGE_PARAMS in dsl/schema.py, then `python -m nemoc.dsl.docgen > docs/language.md`")
