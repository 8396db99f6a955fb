"""Lowering: units, presets, templates, overrides, spans, and the spec every field lands in."""

from __future__ import annotations

import textwrap

import pytest

from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.lower import load_experiment
from nemoc.compiler.params import StageParams
from nemoc.dsl.diagnostics import DiagnosticError

BASE = """
experiment t {
  cluster { gpu = H100  nodes = 2 }
  model llama3_8b { seq_length = 4096 }
  data web { path = "web.jsonl" }
  stage pretrain { data = [web]  steps = 10 }
}
"""


def spec_of(text: str, sets=(), tmp_path=None, name="t.nemo"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_experiment(str(path), tuple(sets))[0]


def errors_of(text: str, tmp_path, sets=()):
    with pytest.raises(DiagnosticError) as info:
        spec_of(text, sets, tmp_path)
    return info.value.diagnostics


@pytest.mark.parametrize("literal, field, expected", [
    ("1.2T", "tokens", 1_200_000_000_000), ("500M", "tokens", 500_000_000), ("4K", "tokens", 4000),
    ("2B", "tokens", 2_000_000_000), ("4 * 128", "global_batch", 512), ("(3 + 1) * 2", "global_batch", 8),
    ("1K / 4", "global_batch", 250),
])
def test_count_units(literal, field, expected, tmp_path):
    spec = spec_of(BASE.replace("steps = 10", f"{field} = {literal}"), tmp_path=tmp_path)
    assert getattr(spec.stage("pretrain"), field) == expected


def test_duration_fraction_and_call_units(tmp_path):
    text = BASE.replace("nodes = 2", 'nodes = 2  scheduler = slurm(partition = "b", time = 1h + 30min)')
    text = text.replace('path = "web.jsonl"', 'path = "web.jsonl"  split = [90%, 9.5%, 0.5%]')
    spec = spec_of(text, tmp_path=tmp_path)
    assert spec.cluster.scheduler == "slurm" and spec.cluster.scheduler_options["time"] == 5400.0
    assert spec.data[0].split == pytest.approx((0.9, 0.095, 0.005))


def test_preset_with_overrides(tmp_path):
    spec = spec_of(BASE, tmp_path=tmp_path)
    preset = get_preset("llama3_8b")
    assert spec.model.layers == preset.layers and spec.model.seq_length == 4096
    assert spec.cluster.world_size == 16 and spec.cluster.gpu == "H100"
    assert spec.spans["model.seq_length"].line == 4 and "model.layers" not in spec.spans
    assert {"experiment", "model", "cluster", "parallel", "stage.pretrain", "data.web"} <= set(spec.spans)


def test_overrides_replace_add_and_create(tmp_path):
    spec = spec_of(BASE, ["parallel.tensor=8", "model.layers=40", "stage.pretrain.steps=2 * 50",
                          "stage.pretrain.checkpoint.every=5", "precision=fp8", "cluster.nodes=4"], tmp_path)
    assert spec.parallel.tensor == 8 and spec.model.layers == 40 and spec.precision == "fp8"
    assert spec.stage("pretrain").steps == 100 and spec.stage("pretrain").checkpoint.every == 5
    assert spec.cluster.nodes == 4
    assert spec.spans["parallel.tensor"].path == "<--set 1>"


def test_override_errors_point_into_the_override(tmp_path):
    diags = errors_of(BASE, tmp_path, ["parallel.tensor=3GiB", "stage.pretrian.steps=1", "nonsense"])
    by_path = {d.span.path: d for d in diags}
    assert by_path["<--set 1>"].code == "E031" and by_path["<--set 1>"].span.col == 17
    assert by_path["<--set 2>"].code == "E050" and "did you mean `pretrain`" in by_path["<--set 2>"].hint
    assert by_path["<--set 3>"].code == "E050"


def test_every_stage_field_lands_in_the_spec(tmp_path):
    text = """
    experiment t {
      cluster { gpu = A100-80GB }
      model tiny { layers = 2  hidden = 64  heads = 4  query_groups = 2  ffn_hidden = 128  vocab = 1000
                   seq_length = 128  kv_channels = 16  experts = 4  top_k = 2  moe_ffn_hidden = 64 }
      parallel { tensor = 2  pipeline = auto  recompute = selective  sequence_parallel = true }
      data prefs { path = "p.jsonl"  format = preference  weight = 2 }
      data notes { path = "n.txt"  documents = line }
      stage dpo {
        data = [prefs]  epochs = 1.5  global_batch = 16  seq_length = 64  beta = 0.2  loss = ipo
        template = template(user = "U: ", assistant = "A: ")
        optimizer = sgd(lr = 0.1)  schedule = wsd(warmup = 10)  peft = lora(rank = 4, targets = [qkv])
        log_every = 5  eval_every = 50  seed = 7
        checkpoint { every = 10  keep = 1  async = true }
        parallel { tensor = 1 }
      }
      stage check after dpo { kind = eval  data = [notes]  prompts = ["hi"] }
      stage out after dpo { kind = export  dtype = bfloat16 }
    }
    """
    spec = spec_of(text, tmp_path=tmp_path)
    dpo = spec.stage("dpo")
    assert spec.model.query_groups == 2 and spec.model.vocab == 1000 and spec.model.experts == 4
    assert spec.parallel.tensor == 2 and spec.parallel.pipeline is None and spec.parallel.recompute == "selective"
    assert dpo.kind == "dpo" and dpo.epochs == 1.5
    # the kind's typed record: what was written, every other parameter (and call argument) at the schema's default
    assert dpo.params.beta == 0.2 and dpo.params.loss == "ipo" and dpo.params.reference == "model"
    # (the chat template's `name` and `tokenizer` are decided by lowering: markers were written, no tokenizer)
    assert dict(dpo.params.template) == {"system": "<|system|>\n", "user": "U: ", "assistant": "A: ", "end": "\n",
                                         "name": "markers", "tokenizer": None}
    assert dpo.params == StageParams.of("dpo", {"beta": 0.2, "loss": "ipo", "template": dpo.params.template})
    assert dpo.optimizer.name == "sgd" and dpo.optimizer.lr == 0.1 and dpo.schedule.name == "wsd"
    assert dpo.peft.rank == 4 and dpo.peft.targets == ("qkv",)
    assert dpo.checkpoint.async_save and dpo.checkpoint.keep == 1
    assert dpo.parallel.tensor == 1 and dpo.parallel.recompute == "selective"  # inherits the experiment's
    assert spec.data[0].weight == 2.0 and spec.data[1].options == {"documents": "line"}
    assert spec.stage("out").after == ("dpo",) and spec.stage("out").params == StageParams.of("export", {"dtype": "bfloat16"})
    check = spec.stage("check").params
    assert check == StageParams.of("eval", {"prompts": ("hi",), "template": check.template})
    assert check.template["name"] == "markers"  # no template written and no tokenizer directory
    assert spec.spans["stage.dpo.parallel.tensor"].line == 15
    assert spec.spans["stage.dpo.optimizer.lr"].line == 12


def test_templates_from_an_import(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "hw.nemo").write_text('cluster box { gpu = H200  gpus_per_node = 4 }\n'
                                            'data shared { path = "s.jsonl"  format = jsonl }\n')
    text = 'import "lib/hw.nemo"\n' + BASE.replace("cluster { gpu = H100  nodes = 2 }", "cluster box { nodes = 3 }")
    text = text.replace("data = [web]", "data = [shared]").replace('data web { path = "web.jsonl" }', "")
    spec = spec_of(text, tmp_path=tmp_path)
    assert (spec.cluster.gpu, spec.cluster.gpus_per_node, spec.cluster.nodes) == ("H200", 4, 3)
    assert spec.data[0].name == "shared" and spec.spans["cluster.gpu"].path.endswith("hw.nemo")


def test_all_errors_are_reported_at_once(tmp_path):
    text = BASE.replace("nodes = 2", "nodes = 2GiB  gpu_per_node = 8").replace("steps = 10", "steps = x")
    codes = sorted(d.code for d in errors_of(text, tmp_path))
    assert codes == ["E021", "E030", "E031"]


def test_an_invalid_data_block_is_still_declared(tmp_path):
    """No cascade: a data set with a bad field is reported once, not again as an undefined reference."""
    codes = [d.code for d in errors_of(BASE.replace('path = "web.jsonl"', "path = web"), tmp_path)]
    assert codes == ["E030"]
