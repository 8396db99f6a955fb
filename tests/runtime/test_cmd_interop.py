"""`nemoc export --megatron-args` of every example, the round trip import(export(plan)) == the plan's layout,
`nemoc presets`, and shell completion."""

from __future__ import annotations

import re

import json

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemoc.compiler.catalog.models import PRESETS
from nemoc.compiler.interop import import_text
from nemoc.compiler.lower import load_experiment
from nemoc.compiler.planner import plan_experiment
from nemoc.dsl.diagnostics import DiagnosticError
from nemoc.runtime.cli import cli
from nemoc.runtime.cli.interop import TRAINING_KINDS
from nemoc.runtime.megatron_args import megatron_lm_command
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.nemo"))


def _plan(path: Path):
    spec, _ = load_experiment(str(path))
    return plan_experiment(spec, target=NEMOC_RUNTIME).plan


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_export_of_every_example(path):
    result = CliRunner().invoke(cli, ["export", "--megatron-args", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    launch = next(i for i, line in enumerate(lines) if line.startswith("torchrun "))
    assert all(line.startswith("# ") for line in lines[:launch])  # the header is comments only
    flags = lines[launch + 1:]
    assert all(line.startswith("    --") for line in flags)  # one flag per line
    assert all(line.endswith(" \\") for line in lines[launch:-1]) and not lines[-1].endswith("\\")
    plan = _plan(path)
    stage = next(s for s in plan.stages if s.kind in TRAINING_KINDS)
    text = result.stdout
    assert f"--tensor-model-parallel-size {stage.layout.tp} " in text
    assert f"--global-batch-size {stage.layout.global_batch} " in text and f"--num-layers {plan.model.layers} " in text


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_import_of_the_export_plans_the_same_layout(path, tmp_path):
    original, _ = load_experiment(str(path))
    plan = plan_experiment(original, target=NEMOC_RUNTIME).plan
    for stage in (s for s in plan.stages if s.kind in TRAINING_KINDS):
        command = megatron_lm_command(plan, stage.name)
        imported = import_text(command, f"{stage.name}.sh", gpu=plan.cluster.gpu)
        target = tmp_path / f"{stage.name}.nemo"
        target.write_text(imported.text)
        spec, _ = load_experiment(str(target))
        if stage.kind != "pretrain":
            # pretrain_gpt.py has no SFT / DPO / LoRA: the command line carries everything but the stage's
            # kind and its kind-specific settings (the source's whole typed record), which the test puts back
            # before planning.
            # The data's record format (chat, preference...) and the checkpoint it starts from are the stage's too.
            source = original.stage(stage.name)
            formats = {d.name: d.format for d in original.data}
            data = spec.data
            if source.data:
                data = tuple(replace(d, format=formats[source.data[0]]) for d in spec.data)
            spec = replace(spec, data=data, model=replace(spec.model, init=original.model.init or str(tmp_path)), stages=(replace(spec.stages[0], kind=source.kind, peft=source.peft,
                                                            params=source.params),))
        again = plan_experiment(spec, target=NEMOC_RUNTIME).plan
        assert again.stages[0].layout == stage.layout, (stage.name, imported.text)
        assert again.model.layers == plan.model.layers and again.model.vocab == plan.model.vocab
        assert (again.cluster.nodes, again.cluster.gpus_per_node, again.cluster.gpu) == \
            (plan.cluster.nodes, plan.cluster.gpus_per_node, plan.cluster.gpu)
        assert again.stages[0].steps == stage.steps and again.stages[0].optimizer == stage.optimizer
        # the model round-trips exactly (a preset stays that preset)
        assert {k: v for k, v in vars_of(again.model).items() if k not in ("name", "source", "init")} == \
            {k: v for k, v in vars_of(plan.model).items() if k not in ("name", "source", "init")}, imported.text


def vars_of(model) -> dict:
    import dataclasses

    d = dataclasses.asdict(model)
    d["kv_channels"] = model.head_dim
    d["add_qkv_bias"] = model.add_qkv_bias or model.add_bias_linear
    d["moe_ffn_hidden"] = (model.moe_ffn_hidden or model.ffn_hidden) if model.is_moe else None
    return d


def test_export_stage_selection_errors():
    path = str(REPO / "examples" / "pipeline.nemo")
    plan = _plan(REPO / "examples" / "pipeline.nemo")
    non_training = next(s.name for s in plan.stages if s.kind not in TRAINING_KINDS)
    result = CliRunner().invoke(cli, ["export", "--megatron-args", path, "--stage", non_training])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "training stage" in result.stderr
    result = CliRunner().invoke(cli, ["export", "--megatron-args", path, "--stage", "nope"])
    assert result.exit_code == 2 and "no stage `nope`" in result.stderr
    result = CliRunner().invoke(cli, ["export", path])
    assert result.exit_code == 2  # --megatron-args is required (the only format)


def test_presets_lists_every_preset_with_its_source():
    result = CliRunner().invoke(cli, ["presets"])
    assert result.exit_code == 0
    for name, spec in PRESETS.items():
        assert name in result.stdout
    json_result = CliRunner().invoke(cli, ["presets", "--json"])
    import json

    rows = json.loads(json_result.stdout)["presets"]
    assert [r["name"] for r in rows] == list(PRESETS)
    assert all(r["source"] == PRESETS[r["name"]].source and r["source"] for r in rows)
    llama = next(r for r in rows if r["name"] == "llama3_8b")
    assert 8.0e9 < llama["parameters"] < 8.1e9  # Llama 3 8B: 8.03B parameters
    mixtral = next(r for r in rows if r["name"] == "mixtral_8x7b")
    assert 46e9 < mixtral["parameters"] < 47e9 and 12.8e9 < mixtral["active_parameters"] < 13e9  # 46.7B / 12.9B


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_script_generates(shell):
    env = dict(os.environ, _NEMOC_COMPLETE=f"{shell}_source")
    out = subprocess.run([sys.executable, "-c", "from nemoc.runtime.cli import main; main()"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "_NEMOC_COMPLETE" in out.stdout and len(out.stdout) > 200


def test_completion_offers_the_commands():
    env = dict(os.environ, _NEMOC_COMPLETE="bash_complete", COMP_WORDS="nemoc pre", COMP_CWORD="1")
    out = subprocess.run([sys.executable, "-c", "from nemoc.runtime.cli import main; main()"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert "plain,presets" in out.stdout.split() and "plain,plan" not in out.stdout.split()


def test_import_and_presets_stay_off_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom nemoc.runtime.cli import cli\n"
            f"assert CliRunner().invoke(cli, ['import', {str(REPO / 'tests/data/interop/megatron_gpt3_175b.sh')!r}]).exit_code == 0\n"
            "assert CliRunner().invoke(cli, ['presets']).exit_code == 0\n"
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, 'imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


INTEROP = sorted(p for p in (REPO / "tests" / "data" / "interop").iterdir() if p.suffix in (".sh", ".yaml"))


@pytest.mark.parametrize("path", INTEROP, ids=[p.name for p in INTEROP])
def test_published_input_round_trips_through_export(path, tmp_path):
    """plan(import(X)) == plan(import(export(plan(import(X))))) for every published input that plans as written."""
    first = tmp_path / "first.nemo"
    text = import_text(path.read_text(), path.name).text
    if 'init = hf("' in text:  # a hub checkpoint: a local directory with its config.json stands in for it
        from hf_configs import LLAMA3_8B_CONFIG

        local = tmp_path / "hf"
        local.mkdir()
        (local / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
        text = re.sub(r'init = hf\("[^"]*"\)', f'init = hf("{local}")', text)
    first.write_text(text)
    spec, _ = load_experiment(str(first))
    try:
        plan = plan_experiment(spec, target=NEMOC_RUNTIME).plan
    except DiagnosticError as err:  # the two inputs nemoc's runtime cannot fit as written (test_interop.py)
        assert [d.code for d in err.diagnostics if d.is_error] == ["E130"]
        pytest.skip("does not fit as written (E130)")
    stage = plan.stages[0]
    second = tmp_path / "second.nemo"
    second.write_text(import_text(megatron_lm_command(plan, stage.name), "x.sh", gpu=plan.cluster.gpu).text)
    spec2, _ = load_experiment(str(second))
    if stage.kind != "pretrain":  # a Megatron-LM command line pretrains: the fine-tuning stage's kind, data,
        # parameters and starting checkpoint are the first file's (what the command cannot say)
        spec2 = replace(spec2, model=replace(spec2.model, init=spec.model.init), data=spec.data,
                        stages=(replace(spec2.stages[0], kind=stage.kind, data=spec.stages[0].data,
                                        params=spec.stages[0].params),))
    again = plan_experiment(spec2, target=NEMOC_RUNTIME).plan
    assert again.stages[0].layout == stage.layout and again.stages[0].steps == stage.steps


@pytest.mark.parametrize("vp, aligned", [(None, False), (2, True)])
def test_export_says_overlap_param_gather_and_leaves_align_to_megatron_lms_default(vp, aligned):
    """`--overlap-param-gather` when the plan overlaps the gather; `align_param_gather` is Megatron-LM's
    default (on, turned off by its validate_args without interleaving: the plan's own rule), so no flag."""
    from plan_factory import with_executions

    plan = _plan(REPO / "examples" / "quickstart.nemo")
    stage = plan.stages[-1]
    layout = replace(stage.layout, distributed_optimizer=True, overlap_param_gather=True, dp=2,
                     pp=2 if vp else 1, vp=vp, num_microbatches=2)
    plan = with_executions(replace(plan, stages=plan.stages[:-1] + (replace(stage, layout=layout),)))
    assert plan.stages[-1].execution.overlaps.align_param_gather == aligned
    command = megatron_lm_command(plan, stage.name)
    assert "--overlap-param-gather" in command and "align-param-gather" not in command


_OVERLAPS = """
experiment d {
  cluster { gpu = H100  nodes = 8  gpus_per_node = 8 }
  model llama3_70b { seq_length = 8192 }
  parallel { tensor = 4  pipeline = 4  context = 2  data = auto  micro_batch = 1  sequence_parallel = true
             distributed_optimizer = true  overlap_param_gather = true  tp_comm_overlap = true
             defer_embedding_wgrad_compute = true  wgrad_deferral_limit = 22
             recompute = selective  recompute_modules = [core_attn, mlp] }
  precision = bf16
  data web { path = "data/web/*.jsonl"  tokenizer = "tokenizer.json" }
  stage pretrain { data = [web]  steps = 100  global_batch = 128  optimizer = adam(lr = 3e-4) }
}
"""


def test_the_overlap_and_deferral_flags_round_trip(tmp_path):
    """import(export(plan)) carries `--overlap-param-gather --tp-comm-overlap --defer-embedding-wgrad-compute
    --wgrad-deferral-limit N --recompute-modules ...` back into their fields (the bootstrap backend and
    `--overlap-grad-reduce` are the plan's own choices), and the re-imported file plans the same layout."""
    path = tmp_path / "d.nemo"
    path.write_text(_OVERLAPS)
    spec, _ = load_experiment(str(path))
    plan = plan_experiment(spec, target=NEMOC_RUNTIME).plan
    stage = plan.stages[0]
    lay = stage.layout
    assert lay.overlap_param_gather and lay.tp_comm_overlap and lay.defer_embedding_wgrad_compute
    command = megatron_lm_command(plan, "pretrain")
    for flag in ("--overlap-param-gather", "--overlap-grad-reduce", "--tp-comm-overlap", "--tp-comm-bootstrap-backend",
                 "--defer-embedding-wgrad-compute", "--wgrad-deferral-limit 22", "--recompute-modules core_attn mlp"):
        assert flag in command
    imported = import_text(command, "x.sh", gpu=plan.cluster.gpu)
    assert not any(w.split()[0] in ("--overlap-param-gather", "--overlap-grad-reduce", "--tp-comm-overlap",
                                    "--tp-comm-bootstrap-backend", "--defer-embedding-wgrad-compute",
                                    "--wgrad-deferral-limit", "--recompute-modules") for w in imported.dropped)
    again_path = tmp_path / "again.nemo"
    again_path.write_text(imported.text)
    again, _ = load_experiment(str(again_path))
    assert plan_experiment(again, target=NEMOC_RUNTIME).plan.stages[0].layout == lay, imported.text


def test_a_deferral_limit_without_the_deferral_is_named_not_imported():
    imported = import_text("torchrun pretrain_gpt.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 "
                           "--seq-length 128 --vocab-size 1000 --micro-batch-size 1 --global-batch-size 8 "
                           "--lr 1e-4 --train-iters 10 --mock-data --wgrad-deferral-limit 4", "x.sh", gpu="H100")
    assert "wgrad_deferral_limit" not in imported.text
    assert any("--wgrad-deferral-limit 4 without --defer-embedding-wgrad-compute" in w for w in imported.warnings)
