"""Typed stage parameters and scheduler options: generated from the schema, every default from it,
filled by lowering, carried by the plan JSON and read back typed; unknown names refused loudly."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nemoc.compiler.lower import load_experiment
from nemoc.compiler.params import (SCHEDULER_OPTIONS_TYPES, STAGE_PARAMS_TYPES, SchedulerOptions, StageParams,
                                   UnknownParameter)
from nemoc.compiler.plan import PLAN_VERSION, from_dict, from_json, to_dict, to_json
from nemoc.compiler.planner import plan_experiment
from nemoc.dsl.schema import CALLS, STAGE_KIND_TABLE

EVERY_KIND = """experiment every {
  cluster { gpu = CPU  gpus_per_node = 1 }
  model m { layers = 2  hidden = 64  heads = 4  ffn_hidden = 128  vocab = 512  seq_length = 64 }
  precision = fp32
  data text { path = "t.jsonl"  format = jsonl }
  data chat { path = "c.jsonl"  format = chat }
  data prefs { path = "p.jsonl"  format = preference }
  stage pretrain { data = [text]  steps = 2  global_batch = 1 }
  stage sft after pretrain { data = [chat]  steps = 2  global_batch = 1 }
  stage dpo after sft { data = [prefs]  steps = 2  global_batch = 1 }
  stage reward after sft { data = [prefs]  steps = 2  global_batch = 1 }
  stage ppo after sft, reward { data = [chat]  steps = 2  global_batch = 1 }
  stage eval after dpo { data = [text] }
  stage export after eval { }
}
"""


def _spec(tmp_path, text: str):
    (tmp_path / "x.nemo").write_text(text)
    spec, _ = load_experiment(str(tmp_path / "x.nemo"))
    return spec


def test_every_stage_kind_has_a_record_with_every_schema_field_at_its_schema_default():
    """Walk the schema: the record of each kind has exactly the kind's fields, in order, each default
    equal to the schema's (the records are generated from it, so a new kind or field needs no edit here)."""
    assert tuple(STAGE_PARAMS_TYPES) == tuple(STAGE_KIND_TABLE)
    for kind, entry in STAGE_KIND_TABLE.items():
        record = StageParams.of(kind)
        assert type(record) is STAGE_PARAMS_TYPES[kind] and record.KIND == kind
        assert tuple(f.name for f in dataclasses.fields(record)) == tuple(f.name for f in entry.params), kind
        for f in entry.params:
            assert getattr(record, f.name) == f.default, (kind, f.name)
    for name, cls in SCHEDULER_OPTIONS_TYPES.items():
        record = SchedulerOptions.of(name)
        assert type(record) is cls
        assert {f.name: getattr(record, f.name) for f in CALLS[name]} == {f.name: f.default for f in CALLS[name]}


def test_lowering_fills_every_default_and_keeps_what_was_written(tmp_path):
    spec = _spec(tmp_path, EVERY_KIND)
    markers = {**{a.name: a.default for a in CALLS["template"]}, "name": "markers", "tokenizer": None}
    for stage in spec.stages:  # nothing kind-specific written: each record is the schema's defaults, except
        # the chat template, which lowering always decides (compiler/chattemplate.py): here role markers
        template = dict(stage.params.template) if "template" in stage.params else None
        defaults = StageParams.of(stage.kind)
        if template is not None:
            assert template == markers, stage.name
            defaults = StageParams.of(stage.kind, {**dict(defaults), "template": stage.params.template})
        assert stage.params == defaults, stage.name
    written = _spec(tmp_path, EVERY_KIND.replace("stage dpo after sft { ", "stage dpo after sft { beta = 1  "
                                                 "template = template(user = \"U: \")  "))
    dpo = written.stage("dpo").params
    assert dpo.beta == 1.0 and isinstance(dpo.beta, float) and dpo.loss == "dpo"  # written, and a default
    assert dict(dpo.template) == {**markers, "user": "U: "}


def test_an_export_only_experiment_keeps_the_checkpoints_dtype(tmp_path):
    """dtype's default float32 is for a trained stage's checkpoint; HF -> nemoc -> HF keeps the source's,
    decided at compile time so the plan says it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    (ckpt / "model.safetensors").write_bytes(b"")
    spec = _spec(tmp_path, 'experiment e {\n  cluster { gpu = CPU  gpus_per_node = 1 }\n'
                           '  model m { init = hf("ckpt") }\n  stage export { }\n}\n')
    assert spec.stage("export").params.dtype == "bfloat16"
    assert StageParams.of("export").dtype == "float32"


def test_unknown_names_are_refused_loudly():
    dpo = StageParams.of("dpo", {"beta": 0.2})
    with pytest.raises(AttributeError):
        dpo.bta  # noqa: B018
    with pytest.raises(UnknownParameter, match="stage kind `dpo` has no parameter `bta`"):
        dpo.get("bta", 0.1)
    with pytest.raises(UnknownParameter, match="has no parameter `bta`"):
        dpo["bta"]  # noqa: B018
    with pytest.raises(UnknownParameter, match="stage kind `dpo` has no parameter `pack`"):
        StageParams.of("dpo", {"pack": False})
    with pytest.raises(UnknownParameter):
        SchedulerOptions.of("slurm", {"partiton": "batch"})
    # the transition: `.get(name, default)` of another kind's parameter answers the default, as the
    # mapping did (code shared between kinds reads `dropout` of an eval stage)
    assert StageParams.of("eval").get("dropout", 0.0) == 0.0 and dpo.get("beta", 9.0) == 0.2
    assert dict(dpo)["beta"] == 0.2 and "beta" in dpo and "pack" not in dpo


def test_replacing_the_kind_keeps_shared_values_and_refuses_lost_ones():
    sft = StageParams.of("sft", {"dropout": 0.1})
    assert StageParams.of("dpo", sft).dropout == 0.1
    with pytest.raises(UnknownParameter, match="`pack`"):
        StageParams.of("dpo", StageParams.of("sft", {"pack": False}))


def test_the_plan_json_carries_the_typed_records_and_reads_them_back(tmp_path):
    spec = _spec(tmp_path, EVERY_KIND.replace("stage eval after dpo { ", "stage eval after dpo { prompts = [\"a\", "
                                              "\"b\"]  template = template(end = \"|\")  ")
                 .replace("gpus_per_node = 1 }", "gpus_per_node = 1  scheduler = slurm(time = 90min, "
                          "extra = [\"--exclusive\"]) }"))
    plan = plan_experiment(spec).plan
    assert plan.version == PLAN_VERSION
    data = json.loads(to_json(plan))
    assert data["stages"][0]["params"]["eval_iters"] == 10  # every default is in the JSON
    back = from_json(to_json(plan))
    assert back == plan
    for stage in back.stages:
        assert type(stage.params) is STAGE_PARAMS_TYPES[stage.kind]
    ev = back.stage("eval").params
    assert ev.prompts == ("a", "b") and ev.template["end"] == "|"
    options = back.cluster.scheduler_options
    assert type(options) is SCHEDULER_OPTIONS_TYPES["slurm"]
    assert options.time == 5400 and isinstance(options.time, int) and options.signal_lead == 300
    assert options.extra == ("--exclusive",)


def test_an_older_plan_is_refused_naming_both_versions(tmp_path):
    plan = plan_experiment(_spec(tmp_path, EVERY_KIND)).plan
    old = to_dict(plan)
    old["version"] = 2
    for stage in old["stages"]:  # a v2 plan held only the parameters written
        stage["params"] = {}
    with pytest.raises(ValueError, match=f"plan version 2 is not supported: this nemoc reads plan version "
                                         f"{PLAN_VERSION}; re-plan"):
        from_dict(old)


def test_a_plugin_stage_kind_outside_the_schema_has_no_parameters():
    """A task kind registered by a plug-in (no .nemo file can name it) gets a record with no fields."""
    record = StageParams.of("faketrain")
    assert dict(record) == {} and record.KIND == "faketrain" and record.get("dropout", 0.0) == 0.0
    with pytest.raises(UnknownParameter, match="stage kind `faketrain`"):
        StageParams.of("faketrain", {"beta": 1.0})


def test_a_launcher_other_than_the_clusters_scheduler_takes_its_defaults_or_refuses_written_options():
    from nemoc.compiler.params import OptionsMismatch, options_for
    from nemoc.compiler.spec import ClusterSpec

    assert options_for(ClusterSpec(gpu="H100"), "slurm") == SchedulerOptions.of("slurm")
    assert options_for(ClusterSpec(gpu="H100", scheduler="slurm"), "k8s") == SchedulerOptions.of("k8s")
    with pytest.raises(OptionsMismatch, match=r"`slurm\(...\)` options \(partition\) do not apply to the k8s"):
        options_for(ClusterSpec(gpu="H100", scheduler="slurm", scheduler_options={"partition": "batch"}), "k8s")


# Readers still on `.get(name, default)` while the training core moves (issue 11; h1's slice): remove
# each path from this list once its readers use attributes.
_TRANSITION = ("runtime/align/", "runtime/core/", "runtime/train.py")


def test_no_reader_outside_the_transition_repeats_a_default_with_get():
    """Outside the modules in transition, stage parameters are read as attributes of the typed record:
    no `params.get("beta", 0.1)` that repeats (and can drift from) the schema's default."""
    import re
    from pathlib import Path

    from nemoc.dsl.schema import STAGE_PARAMS

    repo = Path(__file__).resolve().parents[2]
    names = "|".join(sorted({f.name for fields in STAGE_PARAMS.values() for f in fields}))
    pattern = re.compile(rf'params\.get\(\s*["\']({names})["\']')
    found = []
    for top in ("compiler", "runtime", "bench"):
        for path in sorted((repo / top).rglob("*.py")):
            rel = str(path.relative_to(repo))
            if not rel.startswith(_TRANSITION):
                found += [f"{rel}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    assert found == []


def test_record_types_are_made_on_first_use_once_and_unpickle_in_a_fresh_process(tmp_path):
    """The record types are made when first asked for (`nemoc plan` of a pretraining file needs one of
    thirteen, each a ~1.5 ms dataclass): a fresh process that imports the module has made none, asking
    twice gives the same class, and a record pickled elsewhere unpickles by its class name."""
    import pickle
    import subprocess
    import sys

    path = tmp_path / "records.pickle"
    path.write_bytes(pickle.dumps([StageParams.of("dpo", {"beta": 0.3}), SchedulerOptions.of("k8s")]))
    script = (
        "import pickle, sys, nemoc.compiler.params as p\n"
        "assert not p.STAGE_PARAMS_TYPES._made and not p.SCHEDULER_OPTIONS_TYPES._made\n"
        "assert 'grpo' in p.STAGE_PARAMS_TYPES and not p.STAGE_PARAMS_TYPES._made\n"
        "dpo, k8s = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "assert type(dpo) is p.STAGE_PARAMS_TYPES['dpo'] is p.DpoParams and dpo.beta == 0.3\n"
        "assert type(k8s) is p.SCHEDULER_OPTIONS_TYPES['k8s'] and list(p.STAGE_PARAMS_TYPES._made) == ['dpo']\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert STAGE_PARAMS_TYPES["sft"] is STAGE_PARAMS_TYPES["sft"] is type(StageParams.of("sft"))
    with pytest.raises(KeyError):
        STAGE_PARAMS_TYPES["nope"]
