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


def test_the_launchers_take_the_schemas_compiled_options():
    """The Slurm and Kubernetes launchers read the record generated from the schema's call (no copy of
    its fields or defaults of their own)."""
    from nemoc.compiler.params import SCHEDULER_OPTIONS_TYPES
    from nemoc.runtime.orchestrate import launch_k8s, launch_slurm

    assert launch_slurm.SlurmOptions is SCHEDULER_OPTIONS_TYPES["slurm"]
    assert launch_k8s.K8sOptions is SCHEDULER_OPTIONS_TYPES["k8s"]


def _names_read_by(paths) -> set[str]:
    """Stage-param names the runtime / planner read: attributes of the typed record (`params.beta`,
    `stage.params.reference_free`), `params.get("x"` style calls and PPOConfig / GRPOParams fields."""
    import ast as pyast
    import re

    mapping_methods = {"get", "items", "keys", "values", "of", "build"}
    names = set()
    for path in paths:
        text = path.read_text()
        names |= set(re.findall(r'(?:\bp|params|params or \{\}\))\.get\("(\w+)"', text))
        names |= set(re.findall(r'\bparams\.([a-z_]+)\b(?!\()', text)) - mapping_methods
        for node in pyast.walk(pyast.parse(text)):
            if isinstance(node, pyast.ClassDef) and node.name in ("PPOConfig", "GRPOParams"):
                names |= {n.target.id for n in node.body if isinstance(n, pyast.AnnAssign)}
    return names


def test_stage_params_are_the_ones_the_runtime_reads():
    sources = sorted((REPO / "runtime" / "align").glob("*.py")) + sorted((REPO / "runtime" / "core").glob("*.py")) + [
                                                                    REPO / "runtime" / "train.py",
                                                                    REPO / "compiler" / "planner.py",
                                                                    REPO / "compiler" / "flops.py",
                                                                    REPO / "compiler" / "memory.py",
                                                                    REPO / "compiler" / "graph.py"]  # `init`
    read = _names_read_by(sources)
    declared = {f.name for params in STAGE_PARAMS.values() for f in params}
    # export `format` has one value, huggingface, which is what the export runner always writes
    assert declared - read == {"format"}, "declared but never read"
    assert read - declared == set(), ("read by the runtime but not settable from the language: add it to "
                                      "STAGE_PARAMS in dsl/schema.py, then `python -m nemoc.dsl.docgen > docs/language.md`")


# A value of every scheduler argument as a user writes it, and what the launcher must then hold.
_SLURM_USE = {
    "partition": ('"batch"', "batch"), "account": ('"llm"', "llm"), "qos": ('"high"', "high"),
    "time": ("4h", 14400), "reservation": ('"r1"', "r1"), "constraint": ('"h100"', "h100"),
    "container": ('"nvcr.io/x:1"', "nvcr.io/x:1"), "mem": ('"0"', "0"), "cpus_per_task": ("16", 16),
    "signal_lead": ("10min", 600), "max_failures": ("3", 3), "torchrun_restarts": ("1", 1),
    "port_base": ("30000", 30000), "extra": ('["--exclusive", "--gres=gpu:8"]', ("--exclusive", "--gres=gpu:8")),
}
_K8S_USE = {
    "namespace": ('"ml"', "ml"), "image": ('"reg/nemoc:1"', "reg/nemoc:1"), "queue": ('"team-a"', "team-a"),
    "data_pvc": ('"data"', "data"), "checkpoint_pvc": ('"ckpt"', "ckpt"), "max_restarts": ("5", 5),
    "backoff_limit": ("2", 2), "service_account": ('"trainer"', "trainer"), "priority_class": ('"high"', "high"),
    "shm_size": ('"32Gi"', "32Gi"), "cpu": ('"8"', "8"), "memory": ('"64Gi"', "64Gi"),
}


def _lowered_options(tmp_path, function: str, uses: dict):
    from nemoc.runtime.cli.common import load_spec

    args = ", ".join(f"{k} = {text}" for k, (text, _) in uses.items())
    (tmp_path / "x.nemo").write_text(f"""experiment x {{
  cluster {{ gpu = H100  scheduler = {function}({args}) }}
  model llama3_8b {{}}
  data d {{ path = "d.jsonl" }}
  stage pretrain {{ data = [d]  steps = 10  global_batch = 8 }}
}}
""")
    spec, _ = load_spec(str(tmp_path / "x.nemo"))
    return spec.cluster.scheduler_options


def test_every_scheduler_argument_written_in_the_language_reaches_the_launcher(tmp_path):
    """Each `slurm(...)` / `k8s(...)` argument, written as the docs show, type-checks and lowers into the
    launcher's record with the value meant (durations in seconds); what is not written is the schema's default."""
    from nemoc.runtime.orchestrate.launch_k8s import K8sOptions
    from nemoc.runtime.orchestrate.launch_slurm import SlurmOptions

    for function, uses, cls in (("slurm", _SLURM_USE, SlurmOptions), ("k8s", _K8S_USE, K8sOptions)):
        assert set(uses) == {f.name for f in CALLS[function]}, function  # every argument is exercised
        options = _lowered_options(tmp_path, function, uses)
        assert type(options) is cls
        for key, (_, want) in uses.items():
            assert getattr(options, key) == want, (function, key)
        assert cls() == cls.of(function) and all(getattr(cls(), f.name) == f.default for f in CALLS[function])


def test_a_stage_kind_is_one_entry_of_the_schema_and_every_per_kind_table_derives_from_it():
    from nemoc.compiler import rules
    from nemoc.dsl import schema

    table = schema.STAGE_KIND_TABLE
    assert tuple(table) == schema.STAGE_KINDS
    assert schema.TRAINING_KINDS == rules.TRAINING_KINDS == tuple(k for k, d in table.items() if d.trains)
    assert {k: d.params for k, d in table.items()} == dict(schema.STAGE_PARAMS)
    assert schema.STAGE_DATA_FORMATS["dpo"] == table["dpo"].data_formats and "pretrain" not in schema.STAGE_DATA_FORMATS
    assert schema.PARENT_CHECKPOINT_KINDS == tuple(k for k, d in table.items() if d.parent_checkpoint)


def test_every_code_the_reference_names_exists():
    """A code cited in a field's doc (`(E202)`) is a front-end code or a compiler rule's, never a made-up one."""
    import re

    from nemoc.compiler.rules.registry import CODES as RULE_CODES
    from nemoc.dsl.codes import CODES

    named = set(re.findall(r"\b([EW]\d{3})\b", render()))
    assert named and not named - set(CODES) - set(RULE_CODES), sorted(named - set(CODES) - set(RULE_CODES))
