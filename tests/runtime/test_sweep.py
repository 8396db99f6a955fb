"""Sweeps: `nemoc plan --sweep` side by side, `nemoc run --sweep` one run directory per point, `nemoc status`."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from test_cmd_run import invoke, quickstart  # noqa: F401  (the CLI runner and the quickstart-copy fixture)

from nemoc.runtime.cli.sweep import Axis, Point, parse_axes, points_of, short_names, split_values

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LLAMA = str(EXAMPLES / "llama3_8b_pretrain.nemo")


# ------------------------------------------------------------------------------------------ points


def test_values_split_at_top_level_commas_only():
    assert split_values("2,4, 8") == ["2", "4", "8"]
    assert split_values('adam(lr = 1e-4, eps = 1e-6),sgd(lr = 0.1)') == ["adam(lr = 1e-4, eps = 1e-6)", "sgd(lr = 0.1)"]
    assert split_values('[0.9, 0.95],[0.9, 0.99]') == ["[0.9, 0.95]", "[0.9, 0.99]"]
    assert split_values('"a,b","c\\",d"') == ['"a,b"', '"c\\",d"']


def test_points_are_the_cartesian_product_in_command_line_order():
    axes = parse_axes(["parallel.tensor=2,4", "parallel.micro_batch=1,2,1"])
    assert axes[1] == Axis("parallel.micro_batch", ("1", "2"))  # a repeated value is one point
    points = points_of(axes)
    assert [p.sets for p in points] == [
        ("parallel.tensor=2", "parallel.micro_batch=1"), ("parallel.tensor=2", "parallel.micro_batch=2"),
        ("parallel.tensor=4", "parallel.micro_batch=1"), ("parallel.tensor=4", "parallel.micro_batch=2")]
    short = short_names(axes)
    assert points[1].dirname(short) == "sweep-tensor=2,micro_batch=2"


def test_directory_names_are_short_safe_and_unique():
    axes = parse_axes(["stage.sft.optimizer.lr=1e-4", "stage.dpo.optimizer.lr=1e-5"])
    short = short_names(axes)
    assert short == {"stage.sft.optimizer.lr": "stage.sft.optimizer.lr", "stage.dpo.optimizer.lr": "stage.dpo.optimizer.lr"}
    odd = [Point((("data.web.path", v),)) for v in ('"a/b"', '"a b"')]
    names = [p.dirname({"data.web.path": "path"}) for p in odd]
    assert len(set(names)) == 2 and all("/" not in n and " " not in n and n.startswith("sweep-path=") for n in names)


@pytest.mark.parametrize("bad, message", [
    ("parallel.tensor", "is not KEY=V1,V2"), ("parallel.tensor=2,,4", "empty value"), ("=2", "is not KEY=V1,V2"),
])
def test_malformed_sweeps_are_usage_errors(bad, message):
    with pytest.raises(click.BadParameter, match=message):
        parse_axes([bad])
    result = invoke("plan", LLAMA, "--sweep", bad)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_one_key_swept_twice_and_too_many_points_are_refused():
    with pytest.raises(click.BadParameter, match="swept twice"):
        parse_axes(["parallel.tensor=1", "parallel.tensor=2"])
    with pytest.raises(click.BadParameter, match="at most 1000"):
        points_of(parse_axes(["a.b=" + ",".join(map(str, range(40))), "a.c=" + ",".join(map(str, range(40)))]))


# -------------------------------------------------------------------------------------- nemoc plan


def test_plan_sweep_prints_every_point_side_by_side_and_why_one_failed():
    result = invoke("plan", LLAMA, "--sweep", "parallel.tensor=2,3,8")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "3 sweep points" in out and "tensor" in out
    assert "tp=2 pp=" in out and "tp=8 pp=" in out and "error[E101]" in out and "tp(3)" in out
    assert "fastest: tensor=" in out


def test_plan_sweep_json_is_a_list_of_points_with_the_plan_contract():
    result = invoke("plan", LLAMA, "--sweep", "parallel.tensor=2,3", "--sweep", "parallel.micro_batch=1,2", "--json")
    assert result.exit_code == 0
    points = json.loads(result.output)
    assert [p["point"] for p in points] == [
        {"parallel.tensor": t, "parallel.micro_batch": m} for t in ("2", "3") for m in ("1", "2")]
    good, bad = points[0], points[2]
    assert good["ok"] and good["plan"]["stages"][0]["layout"]["tp"] == 2 and good["plan"]["stages"][0]["layout"]["micro_batch"] == 1
    assert {"memory", "estimate", "layout"} <= set(good["plan"]["stages"][0]) and good["diagnostics"] == []
    assert not bad["ok"] and bad["plan"] is None and "E101" in {d["code"] for d in bad["diagnostics"]}
    single = json.loads(invoke("plan", LLAMA, "--set", "parallel.tensor=2", "--set", "parallel.micro_batch=1", "--json").output)
    assert single["stages"][0]["layout"] == good["plan"]["stages"][0]["layout"]  # a point plans as --set would


def test_plan_sweep_exits_1_when_no_point_plans_and_2_for_an_unreadable_file(tmp_path):
    result = invoke("plan", LLAMA, "--sweep", "parallel.tensor=3,5")
    assert result.exit_code == 1 and "error[E101]" in result.output
    assert invoke("plan", str(tmp_path / "missing.nemo"), "--sweep", "parallel.tensor=1,2").exit_code == 2
    assert invoke("plan", LLAMA, "--sweep", "parallel.tensor=1,2", "--emit", str(tmp_path / "p.json")).exit_code == 2


def test_plan_sweep_over_a_call_argument():
    result = invoke("plan", LLAMA, "--sweep", "stage.pretrain.optimizer.lr=1e-4,3e-4", "--json")
    points = json.loads(result.output)
    assert [p["point"]["stage.pretrain.optimizer.lr"] for p in points] == ["1e-4", "3e-4"] and all(p["ok"] for p in points)


# --------------------------------------------------------------------------------- nemoc run/status


def _on_slurm(quickstart):
    path = quickstart / "quickstart.nemo"
    path.write_text(path.read_text().replace("gpus_per_node = 2\n", 'gpus_per_node = 2\n    scheduler = slurm(partition = "p")\n', 1))
    return path


def test_run_sweep_gives_each_point_its_own_run_directory(quickstart, monkeypatch):
    path = _on_slurm(quickstart)
    monkeypatch.setenv("PATH", str(quickstart))  # no sbatch/squeue reachable: a submission would fail
    result = invoke("run", str(path), "--sweep", "stage.pretrain.steps=5,10", "--dry-run", "--json", cwd=quickstart)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    root = quickstart / "runs" / "quickstart"
    assert report["sweep_dir"] == str(root) and report["ok"]
    dirs = [Path(p["dir"]) for p in report["points"]]
    assert dirs == [root / "sweep-steps=5", root / "sweep-steps=10"]
    scripts = [d / "tasks" / "train_pretrain" / "job.sbatch" for d in dirs]
    assert all(s.is_file() for s in scripts) and scripts[0].read_text() != scripts[1].read_text()
    hashes = [{t["id"]: t["hash"] for t in p["result"]["tasks"]} for p in report["points"]]
    assert hashes[0]["prepare:corpus"] == hashes[1]["prepare:corpus"]
    assert hashes[0]["train:pretrain"] != hashes[1]["train:pretrain"]
    assert not (root / "sweep.json").exists()  # a dry run records no sweep


def test_run_sweep_starts_nothing_when_one_point_does_not_compile(quickstart):
    result = invoke("run", str(quickstart / "quickstart.nemo"), "--sweep", "parallel.tensor=1,3", cwd=quickstart)
    assert result.exit_code == 1
    assert "sweep point tensor=3 does not compile; nothing was started" in result.output
    assert "<--set 1>" in result.output and not (quickstart / "runs").exists()


def test_status_of_a_sweep_lists_its_points(tmp_path):
    root = tmp_path / "runs" / "x"
    (root / "sweep-tensor=1").mkdir(parents=True)
    (root / "sweep-tensor=1" / "status.json").write_text(json.dumps(
        {"tasks": {"train:pretrain": {"state": "done", "hash": "abc"}}, "order": ["train:pretrain"]}))
    (root / "sweep.json").write_text(json.dumps({"version": 1, "points": [
        {"dir": "sweep-tensor=1", "settings": {"parallel.tensor": "1"}},
        {"dir": "sweep-tensor=2", "settings": {"parallel.tensor": "2"}}]}))
    text = invoke("status", str(root))
    assert text.exit_code == 0 and "sweep of 2 points" in text.output
    assert "1 done" in text.output and "not started" in text.output
    data = json.loads(invoke("status", str(root), "--json").output)
    assert [p["states"] for p in data["points"]] == [{"done": 1}, {}]
    assert data["points"][1]["tasks"] is None


@pytest.mark.slow
def test_run_sweep_trains_each_point_and_status_lists_them(quickstart):
    """Two real quickstart runs of 2 and 3 steps (about 45 s on 2 cores)."""
    path = quickstart / "quickstart.nemo"
    result = invoke("run", str(path), "--sweep", "stage.pretrain.steps=2,3", "--workdir", str(quickstart / "sw"))
    assert result.exit_code == 0, result.output
    data = json.loads(invoke("status", str(quickstart / "sw"), "--json").output)
    assert [p["dir"] for p in data["points"]] == ["sweep-steps=2", "sweep-steps=3"]
    assert all(p["states"] == {"done": 3} and p["exit_code"] == 0 for p in data["points"])
    steps = [next(t for t in p["tasks"] if t["id"] == "train:pretrain")["steps_done"] for p in data["points"]]
    assert steps == [2, 3]


def test_a_point_refused_as_a_usage_error_stops_the_sweep(quickstart):
    result = invoke("run", str(quickstart / "quickstart.nemo"), "--sweep", "stage.pretrain.steps=1,2", "--detach",
                    "--workdir", str(quickstart / "sw"))
    assert result.exit_code == 2  # the point's own message goes to the terminal (its stderr is not captured here)
    assert "sweep point steps=1 was refused (exit 2); the points after it were not started" in result.output
    index = json.loads((quickstart / "sw" / "sweep.json").read_text())
    assert [p.get("exit_code") for p in index["points"]] == [2, None]
