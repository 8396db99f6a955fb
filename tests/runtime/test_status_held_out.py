"""`nemoc status` shows the held-out metrics that finished alignment stages report in DONE.json."""

from __future__ import annotations

import json

import jsonschema
from click.testing import CliRunner

from nemoc.runtime.cli import cli
from nemoc.runtime.orchestrate.status import held_out_metrics

DPO_DONE = {"hash": "h2", "steps": 30, "val_before": {"reward_accuracy": 0.5, "likelihood_accuracy": 0.9},
            "val": {"reward_accuracy": 0.975, "likelihood_accuracy": 0.95, "log_ratio_margin": 3.4}}


def _run_dir(tmp_path):
    run = tmp_path / "run"
    tasks = {"train:sft": {"state": "done", "hash": "h1"}, "train:dpo": {"state": "done", "hash": "h2"},
             "train:pretrain": {"state": "done", "hash": "h0"}}
    (run / "tasks" / "train_sft").mkdir(parents=True)
    (run / "tasks" / "train_dpo").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"finished": 1.0, "order": list(tasks), "tasks": tasks}))
    (run / "tasks" / "train_sft" / "DONE.json").write_text(json.dumps(
        {"hash": "h1", "steps": 10, "val_response_loss_before": 4.16, "val_response_loss": 0.6}))
    (run / "tasks" / "train_dpo" / "DONE.json").write_text(json.dumps(DPO_DONE))
    return run


def test_status_lists_held_out_metrics_before_and_after(tmp_path):
    run = _run_dir(tmp_path)
    out = CliRunner().invoke(cli, ["status", str(run)], catch_exceptions=False).output
    assert "train:dpo: preference_accuracy 0.5 -> 0.975, likelihood_accuracy 0.9 -> 0.95" in out, out
    assert "train:sft: response_loss 4.16 -> 0.6" in out


def test_status_json_carries_them_and_validates(tmp_path):
    from importlib.resources import files

    run = _run_dir(tmp_path)
    data = json.loads(CliRunner().invoke(cli, ["status", str(run), "--json"], catch_exceptions=False).output)
    schema = json.loads((files("nemoc.runtime") / "schemas" / "status.schema.json").read_text())
    jsonschema.validate(data, schema)
    rows = {r["id"]: r for r in data["tasks"]}
    assert rows["train:dpo"]["held_out"]["preference_accuracy"] == {"before": 0.5, "after": 0.975}
    assert rows["train:pretrain"]["held_out"] is None


def test_held_out_metrics_of_empty_and_damaged_records():
    assert held_out_metrics({}) is None
    assert held_out_metrics({"val": "damaged", "datasets": {"corpus": {"perplexity": 2.5}}}) == {
        "corpus.perplexity": {"before": None, "after": 2.5}}
