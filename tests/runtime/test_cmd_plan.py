"""`nemoc plan`: the --json contract, --emit, --headroom, --top, the readable report, exit codes."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from nemoc.compiler.plan import from_json
from nemoc.runtime.cli import cli

EXAMPLE = "examples/llama3_8b_pretrain.nemo"
LAYOUT = {"tp", "pp", "vp", "cp", "ep", "etp", "dp", "micro_batch", "global_batch", "num_microbatches",
          "sequence_parallel", "distributed_optimizer", "recompute"}
MEMORY = {"weights", "gradients", "optimizer", "activations", "other", "total", "capacity"}
ESTIMATE = {"step_time_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu", "steps", "wall_time_s",
            "gpu_hours", "cost_usd"}


def run(*args):
    return CliRunner().invoke(cli, ["plan", *args])


@pytest.mark.parametrize("path", sorted(glob.glob("examples/*.nemo")))
def test_json_contract_for_every_example(path):
    res = run(path, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert isinstance(doc["experiment"], str)
    assert set(doc["total"]) >= {"wall_time_s", "gpu_hours", "cost_usd"}
    for st in doc["stages"]:
        assert {"name", "kind", "layout", "memory", "estimate"} <= set(st)
        assert LAYOUT <= set(st["layout"]) and MEMORY <= set(st["memory"]) and ESTIMATE <= set(st["estimate"])
        m = st["memory"]
        assert m["total"] == sum(m[k] for k in ("weights", "gradients", "optimizer", "activations", "other"))
        assert all(isinstance(m[k], int) for k in MEMORY)
        lay = st["layout"]
        assert lay["tp"] * lay["pp"] * lay["cp"] * lay["dp"] == doc["cluster"]["nodes"] * doc["cluster"]["gpus_per_node"]
    # the hf_import tasks (init = hf(DIR)) run before the stages, inside the same run
    imports = sum(i["seconds"] for i in doc["imports"])
    assert doc["total"]["import_s"] == pytest.approx(imports)
    assert doc["total"]["wall_time_s"] == pytest.approx(sum(s["estimate"]["wall_time_s"] for s in doc["stages"]) + imports)


def test_emit_writes_the_plan_the_runtime_reads(tmp_path):
    out = tmp_path / "plan.json"
    res = run(EXAMPLE, "--emit", str(out), "--json")
    assert res.exit_code == 0
    plan = from_json(out.read_text())
    doc = json.loads(res.stdout)
    assert plan.experiment == doc["experiment"] == "llama3_8b_pretrain"
    assert plan.stages[0].layout.tp == doc["stages"][0]["layout"]["tp"]


def test_headroom_changes_the_budget_and_can_make_a_layout_not_fit():
    tight = json.loads(run(EXAMPLE, "--json", "--headroom", "40%").stdout)
    loose = json.loads(run(EXAMPLE, "--json", "--headroom", "0.05").stdout)
    assert tight["headroom"] == pytest.approx(0.4) and loose["headroom"] == pytest.approx(0.05)
    assert tight["stages"][0]["memory"]["total"] <= tight["stages"][0]["memory"]["budget"]
    assert tight["stages"][0]["memory"]["budget"] < loose["stages"][0]["memory"]["budget"]
    assert run(EXAMPLE, "--headroom", "150%").exit_code == 2


def test_top_limits_the_runner_ups():
    doc = json.loads(run(EXAMPLE, "--json", "--top", "2").stdout)
    assert len(doc["stages"][0]["runner_ups"]) == 2
    assert doc["stages"][0]["rejections"]


def test_readable_report():
    res = run(EXAMPLE)
    assert res.exit_code == 0, res.output
    for text in ("experiment llama3_8b_pretrain", "memory per GPU", "runner-ups", "why the others lost", "total",
                 "GPU-hours", "step time terms"):
        assert text in res.stdout


def _same_layout(doc: dict) -> list[str]:
    """--set arguments that fix every size of the first stage's chosen layout."""
    lay = doc["stages"][0]["layout"]
    fixed = {"tensor": lay["tp"], "pipeline": lay["pp"], "virtual_pipeline": lay["vp"] or 1, "context": lay["cp"],
             "data": lay["dp"], "micro_batch": lay["micro_batch"], "recompute": lay["recompute"],
             "sequence_parallel": str(lay["sequence_parallel"]).lower(),
             "distributed_optimizer": str(lay["distributed_optimizer"]).lower()}
    return [arg for k, v in fixed.items() for arg in ("--set", f"parallel.{k}={v}")]


def test_json_says_which_kernels_and_local_kernels_are_slower_and_larger_for_the_same_layout():
    te = json.loads(run(EXAMPLE, "--json").stdout)
    assert te["kernels"] == "te" and te["stages"][0]["kernels"] == "te"
    res = run(EXAMPLE, "--json", "--set", "kernels=local", *_same_layout(te))
    assert res.exit_code == 0, res.output
    local = json.loads(res.stdout)
    assert local["kernels"] == "local" and local["stages"][0]["kernels"] == "local"
    (a,), (b,) = te["stages"], local["stages"]
    assert b["layout"] == a["layout"]
    step_ratio = b["estimate"]["step_time_s"] / a["estimate"]["step_time_s"]
    activation_ratio = b["memory"]["activations"] / a["memory"]["activations"]
    assert step_ratio > 1.05 and activation_ratio > 1.2, (step_ratio, activation_ratio)
    assert b["estimate"]["tokens_per_s_per_gpu"] < a["estimate"]["tokens_per_s_per_gpu"]


def test_the_report_names_the_kernels():
    assert "kernels te (Transformer Engine)" in run(EXAMPLE).stdout
    assert "kernels local (Megatron-Core local spec)" in run(EXAMPLE, "--set", "kernels=local").stdout
    assert "kernels local (Megatron-Core local spec)" in run("examples/quickstart.nemo").stdout
    sft = run("examples/llama3_70b_sft_dpo.nemo").stdout
    # sft and dpo run on the training core with the experiment's kernels; only export builds the local spec
    assert "kernels te (Transformer Engine)" in sft and "builds sft stages" not in sft
    assert "builds export stages with Megatron-Core's local spec" in sft


def test_fp8_with_local_kernels_is_an_error_at_the_line():
    res = run(EXAMPLE, "--set", "cluster.gpu=B200", "--set", "precision=fp8", "--set", "kernels=local")
    assert res.exit_code == 1
    assert "error[E127]: precision = fp8 needs Transformer Engine" in res.stderr
    assert "<--set 3>" in res.stderr and "hint: use precision = bf16" in res.stderr


def test_not_fitting_exits_1_with_the_term_and_the_fix():
    res = run(EXAMPLE, "--set", "parallel.tensor=1", "--set", "parallel.pipeline=1", "--set", "parallel.recompute=none")
    assert res.exit_code == 1
    assert "error[E130]" in res.stderr and "activations is the largest term" in res.stderr
    assert "hint: set recompute = full" in res.stderr
    as_json = run(EXAMPLE, "--json", "--set", "parallel.tensor=1", "--set", "parallel.pipeline=1",
                  "--set", "parallel.recompute=none")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["diagnostics"][0]["code"] == "E130"


def test_a_broken_rule_points_at_the_users_text():
    res = run(EXAMPLE, "--set", "parallel.tensor=3")
    assert res.exit_code == 1
    assert "error[E102]" in res.stderr and "heads(32) % tp(3) = 2 != 0" in res.stderr


def test_unreadable_file_is_a_usage_error(tmp_path):
    assert run(str(tmp_path / "missing.nemo")).exit_code == 2


def test_plan_runs_well_under_a_second_without_torch():
    code = ("import sys, time\nfrom nemoc.runtime.cli import cli\nt = time.process_time()\n"
            "try:\n    cli(['plan', 'examples/mixtral_8x7b_pretrain.nemo', '--json'], standalone_mode=False)\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print(time.process_time() - t, file=sys.stderr)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stderr.strip().splitlines()[-1]) < 1.0
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("path", ["examples/pipeline.nemo", "examples/quickstart.nemo"])
def test_emitted_plan_builds_the_runtime_graph(path, tmp_path):
    from nemoc.compiler.graph import build_graph, iter_stage_tasks

    out = tmp_path / "plan.json"
    assert run(path, "--emit", str(out), "--json").exit_code == 0
    plan = from_json(out.read_text())
    graph = build_graph(plan)
    assert {t.id for t in iter_stage_tasks(graph)}  # every stage became a task
    assert len(list(iter_stage_tasks(graph))) == len(plan.stages)


def test_language_warnings_are_reported_with_the_plan(tmp_path):
    src = tmp_path / "w.nemo"
    src.write_text('experiment w {\n  cluster {\n    gpu = H100\n  }\n  model llama3_8b {}\n'
                   '  data web {\n    path = "web.jsonl"\n  }\n  data unused {\n    path = "x.jsonl"\n  }\n'
                   '  stage pretrain {\n    data = [web]\n    tokens = 1B\n    global_batch = 64\n  }\n}\n')
    res = run(str(src))
    assert res.exit_code == 0 and "warning[W001]" in res.stderr
    doc = json.loads(run(str(src), "--json").stdout)
    assert any(w["code"] == "W001" for w in doc["warnings"])
