"""Multi-token prediction on CPU/gloo: a tiny MLA MoE model with one MTP depth (DeepSeek-V3's shape: a dense first
layer, sigmoid routing with the expert bias, MTP loss weight) pretrains from the CLI at TP 2 x EP 2 with sequence
parallelism, and at PP 2 (the depth and a tied copy of the embedding on the last stage) where a resume from a
checkpoint continues bit for bit, the MTP loss included. Megatron-Core's MTP loss is logged per step as
"mtp_1 loss" (what Megatron-LM logs) and falls with the language-model loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtp_case import mtp_experiment
from nemoc.compiler.spec import ModelSpec
from nemoc.runtime.cli import cli


def _records(metrics: Path) -> dict[int, dict]:
    lines = metrics.read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "loss" in m and "event" not in m}


def _falls(records: dict[int, dict], key: str) -> bool:
    steps = sorted(records)
    return sum(records[s][key] for s in steps[-4:]) < 0.95 * sum(records[s][key] for s in steps[:4])


@pytest.mark.slow  # about 45 s on 2 CPU ranks (tokenizer, data preparation, 20 steps)
def test_mtp_pretrains_at_tp2_ep2_from_the_cli(tmp_path):
    path = mtp_experiment(tmp_path, "    tensor = 2\n    expert = 2\n    sequence_parallel = true\n"
                                    "    micro_batch = 2\n")
    workdir = tmp_path / "w"
    result = CliRunner().invoke(cli, ["run", str(path), "--workdir", str(workdir), "--set", "stage.pretrain.steps=20",
                                      "--set", "stage.pretrain.log_every=1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    task = json.loads((workdir / "tasks" / "train_pretrain" / "task.json").read_text())
    plan = json.loads(Path(task["plan"]).read_text())
    stage = plan["stages"][0]
    assert stage["execution"]["mtp_num_layers"] == 1 and plan["model"]["mtp_loss_scaling_factor"] == 0.3
    assert (stage["layout"]["tp"], stage["layout"]["ep"]) == (2, 2)
    records = _records(workdir / "tasks" / "train_pretrain" / "metrics.jsonl")
    assert sorted(records) == list(range(1, 21))
    assert all(r["mtp_1 loss"] > 0 for r in records.values())
    assert _falls(records, "loss") and _falls(records, "mtp_1 loss"), records


MODEL = ModelSpec(
    name="tiny_mla_moe_mtp", layers=2, hidden=64, heads=4, query_groups=4, ffn_hidden=128, vocab=200, seq_length=32,
    multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
    v_head_dim=16, qk_layernorm=True, experts=4, top_k=2, moe_ffn_hidden=64, shared_expert_ffn_hidden=64,
    moe_first_dense_layers=1, moe_router_score="sigmoid", moe_expert_bias=True, moe_load_balancing="seq_aux_loss",
    moe_aux_loss_coeff=1e-4, mtp_num_layers=1, mtp_loss_scaling_factor=0.3)


@pytest.mark.slow  # two runs of 2 CPU ranks, about 40 s
def test_pp2_resume_is_bit_identical(tmp_path, kit, train_data):
    """PP 2: the depth sits on the last stage with its own tied copy of the embedding (saved with Megatron-Core's
    dp_cp_group metadata); resuming the step-3 checkpoint reproduces steps 4-6 exactly, MTP loss included."""
    lay = kit.layout(pp=2, micro_batch=2, global_batch=8)
    plan = kit.make_plan(kit.stage_plan(lay=lay, steps=6, every=3), model=MODEL)
    assert plan.stages[0].execution.mtp_num_layers == 1
    base = kit.run_training(tmp_path / "base", plan, 2, data_prefix=train_data)
    assert base.returncode == 0, base.explain()
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    shutil.copytree(base.out / "checkpoints" / "iter_0000003", ckdir / "iter_0000003")
    (ckdir / "latest").write_text("iter_0000003\n")
    resumed = kit.run_training(tmp_path / "resumed", plan, 2, data_prefix=train_data, checkpoint_dir=ckdir)
    assert resumed.returncode == 0, resumed.explain()
    assert any(r.get("event") == "resumed" for r in resumed.records), resumed.records
    ours, theirs = _records(resumed.out / "metrics.jsonl"), _records(base.out / "metrics.jsonl")
    assert sorted(ours) == [4, 5, 6]
    for step in (4, 5, 6):
        assert ours[step]["loss"] == theirs[step]["loss"] and ours[step]["mtp_1 loss"] == theirs[step]["mtp_1 loss"]
        assert ours[step]["grad_norm"] == theirs[step]["grad_norm"]
    assert theirs[1]["mtp_1 loss"] != theirs[6]["mtp_1 loss"]
