"""Megatron-FSDP in the alignment stages, end to end through `nemoc run` on the CPU box's two processes (gloo):
a tiny pretraining feeds a DPO stage and a reward-model stage twice each (and an sft and an orpo stage once,
with FSDP: they train, score their held-out records and save in fsdp_dtensor), once with `megatron_fsdp = true`
(ZeRO-3 over data(2): runtime/align/trainer.py `_wrap`) and once with Megatron DDP and the distributed optimizer
(the same data, seed and initial weights). Per step, loss, grad norm and the stage's reports agree to fp32
reduction-order noise (`REL`); DPO's frozen reference is a plain model in both. The FSDP stages save their
training state and final model in the fsdp_dtensor format; the DPO stage, rerun after losing its final
checkpoint and DONE.json (what a kill after the last step leaves), resumes from step 2 and logs the steps the uninterrupted run
logged, bit for bit; its final checkpoint feeds the Hugging Face export (read as full tensors:
runtime/fsdp_checkpoint.py `FullTensorReader`), whose logits equal the DDP stage's export to the same noise; the
reward stages' final checkpoints load (scalar head whole, as ppo and eval load them) to equal weights.

Megatron-Core's FSDP adapter needs einops (an optional dependency of megatron-core): without it these skip."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nemoc.runtime import megatron_args as margs

pytestmark = [pytest.mark.slow, pytest.mark.long,
              pytest.mark.skipif(not margs.have_einops(), reason="Megatron-Core's FSDP adapter needs einops")]

REPO = Path(__file__).resolve().parents[3]
# fp32 reduction-order noise: FSDP reduce-scatters each layer's gradient bucket, scaled by 1/DP before the sum
# on gloo (runtime/megatron_args.py `ddp_config`), where DDP all-reduces one bucket (another summation order,
# ~1e-7 relative per gradient element), carried through Adam over 4 steps. Measured: DPO loss within 9e-8
# relative, grad norm within 2e-7 (tests/runtime/test_train_fsdp.py: 2e-5 over 6 pretraining steps). A wrong
# gradient scale (E181's doubling, a missing 1/DP) doubles the grad norm; a wrong gradient moves the loss by far
# more than REL from step 2 on.
REL = 2e-5

CHAIN = """
cluster cpu_box {
  gpu = CPU
  gpus_per_node = 2
}

experiment fsdp_align {
  cluster cpu_box {}

  model tiny_llama {
    layers = 2
    hidden = 64
    heads = 4
    query_groups = 2
    ffn_hidden = 128
    vocab = 4096
    seq_length = 64
    activation = swiglu
    norm = rmsnorm
    position = rope
  }

  precision = fp32

  data corpus {
    path = "DATA/quickstart/corpus.jsonl"
    format = jsonl
    text_field = "text"
    vocab_size = 4096
  }

  data prefs {
    path = "DATA/pipeline/prefs.jsonl"
    format = preference
  }

  data chat {
    path = "DATA/pipeline/sft.jsonl"
    format = chat
  }

  stage pretrain {
    data = [corpus]
    steps = 4
    global_batch = 4
    optimizer = adam(lr = 1e-3)
    parallel {
      tensor = 1
    }
  }
STAGES}
"""

ALIGN = """
  stage KIND_NAME after pretrain {
    kind = KIND
    data = [prefs]
    steps = STEPS
    global_batch = 4
    log_every = 1
    optimizer = adam(lr = 1e-3, weight_decay = 0.0)
    schedule = constant(warmup = 0)
    checkpoint {
      every = 2
    }
    parallel {
      tensor = 1
      micro_batch = 1
      PARALLEL
    }
  }
"""


def _chain() -> str:
    stages = ""
    for kind, steps in (("dpo", 4), ("reward", 2)):
        for name, parallel in (("fsdp", "megatron_fsdp = true"), ("ddp", "distributed_optimizer = true")):
            stages += (ALIGN.replace("KIND_NAME", f"{kind}_{name}").replace("KIND", kind)
                       .replace("STEPS", str(steps)).replace("PARALLEL", parallel))
    for kind in ("sft", "orpo"):  # the other kinds the runtime wraps in FSDP: they run, save and report
        stages += (ALIGN.replace("KIND_NAME", f"{kind}_fsdp").replace("KIND", kind).replace("STEPS", "2")
                   .replace("PARALLEL", "megatron_fsdp = true").replace("[prefs]", "[chat]" if kind == "sft" else "[prefs]"))
    stages += "\n  stage export_fsdp after dpo_fsdp {\n    kind = export\n  }\n"
    stages += "\n  stage export_ddp after dpo_ddp {\n    kind = export\n  }\n"
    return CHAIN.replace("DATA", str(REPO / "examples" / "data")).replace("STAGES", stages)


def _run(source: Path, workdir: Path) -> str:
    run = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(source), "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=1200, env=dict(os.environ), cwd=source.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    return run.stdout


def _steps(task: Path) -> list[dict]:
    records = [json.loads(line) for line in (task / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "step" in r and "loss" in r]


def _done(task: Path) -> dict:
    return json.loads((task / "DONE.json").read_text())


def _manifest(checkpoint) -> dict:
    return json.loads((Path(checkpoint) / "nemoc_checkpoint.json").read_text())


def _same(fsdp: list[dict], ddp: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] and fsdp
    for a, b in zip(fsdp, ddp):
        for key in keys:
            assert math.isfinite(a[key]), (key, a)
            assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-7), (key, a["step"], a[key], b[key])


def test_dpo_and_reward_stages_train_under_megatron_fsdp_as_under_ddp_resume_and_export(tmp_path, mcore):
    import torch
    from transformers import AutoModelForCausalLM

    from nemoc.compiler.plan import from_json

    source = tmp_path / "fsdp_align.nemo"
    source.write_text(_chain())
    workdir = tmp_path / "run"
    _run(source, workdir)
    plan = from_json((workdir / "plan.json").read_text())
    tasks = workdir / "tasks"
    for kind in ("dpo", "reward"):
        assert plan.stage(f"{kind}_fsdp").layout.megatron_fsdp and plan.stage(f"{kind}_fsdp").layout.dp == 2
        assert not plan.stage(f"{kind}_ddp").layout.megatron_fsdp
        assert "fsdp_buffers" in plan.stage(f"{kind}_fsdp").memory.parts

    dpo_fsdp, dpo_ddp = _steps(tasks / "train_dpo_fsdp"), _steps(tasks / "train_dpo_ddp")
    assert [r["step"] for r in dpo_fsdp] == [1, 2, 3, 4]
    _same(dpo_fsdp, dpo_ddp, ("loss", "grad_norm", "reward_accuracy", "reward_margin"))
    assert abs(dpo_fsdp[-1]["loss"] - dpo_fsdp[0]["loss"]) > 1e-3  # the policy moved: the comparison can fail
    _same(_steps(tasks / "train_reward_fsdp"), _steps(tasks / "train_reward_ddp"), ("loss", "grad_norm", "accuracy"))
    done = _done(tasks / "train_dpo_fsdp")
    assert done["resident_models"] == list(plan.stage("dpo_fsdp").resident_models) == ["policy", "reference"]
    assert done["val"]["reward_accuracy"] == pytest.approx(_done(tasks / "train_dpo_ddp")["val"]["reward_accuracy"])
    for kind in ("dpo", "reward"):
        final = _done(tasks / f"train_{kind}_fsdp")["checkpoint"]
        assert _manifest(final)["format"] == "fsdp_dtensor" and _manifest(final)["layout"]["dp"] == 2
    for kind, metric in (("sft", "val_response_loss"), ("orpo", "val")):
        done = _done(tasks / f"train_{kind}_fsdp")
        assert plan.stage(f"{kind}_fsdp").layout.megatron_fsdp and done["steps"] == 2
        assert math.isfinite(done["final_loss"]) and done[metric], done  # held-out scores through the wrapper
        assert _manifest(done["checkpoint"])["format"] == "fsdp_dtensor"
    # the reward stages' final checkpoints, as ppo (critic, reward model) and eval load them: equal weights
    vocab = json.loads((tasks / "train_reward_fsdp" / "task.json").read_text())["vocab_size"]
    weights = []
    for name in ("fsdp", "ddp"):
        model = mcore.build_gpt(plan.model, mcore.single_layout(), vocab=vocab, seq_length=64, scalar_head=True)
        mcore.load_model(model, _done(tasks / f"train_reward_{name}")["checkpoint"])
        weights.append(dict(mcore.unwrap(model).named_parameters()))
    assert weights[0]["output_layer.weight"].shape == (1, 64) and weights[0]["output_layer.weight"].abs().sum() > 0
    # per element, Adam turns the summation-order noise of a near-zero gradient into a move of up to lr per step
    # (lr 1e-3 x 2 steps = 2e-3 at most): 1 % of that; measured 8.2e-6 (3 embedding elements of 49,152 above
    # 1e-6), the scalar head within 3e-10
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=0, atol=2e-5, msg=key)
    torch.testing.assert_close(weights[0]["output_layer.weight"], weights[1]["output_layer.weight"], rtol=0,
                               atol=1e-8)
    periodic = tasks / "train_dpo_fsdp" / "checkpoints"
    assert _manifest(periodic / "iter_0000002")["format"] == "fsdp_dtensor"

    # the export of the FSDP stage's checkpoint computes what the DDP stage's export computes
    tokens = torch.randint(0, 700, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for name in ("export_fsdp", "export_ddp"):
        assert _done(tasks / f"export_{name}")["source_checkpoint"] == _done(
            tasks / f"train_dpo_{name.split('_')[1]}")["checkpoint"]
        hf = AutoModelForCausalLM.from_pretrained(_done(tasks / f"export_{name}")["export"], dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(hf(tokens).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    assert logits[0].std() > 0.1

    # a kill after step 4 before the stage finished: its final checkpoint and DONE.json lost, `latest` the
    # periodic one of step 2; the rerun resumes from it (model, optimizer, scheduler, RNG, data position) and
    # logs steps 3 and 4 as the uninterrupted run did, bit for bit
    first = {r["step"]: r for r in dpo_fsdp}
    assert (periodic / "latest").read_text().strip() == "iter_0000002"
    shutil.rmtree(periodic / "final")
    (tasks / "train_dpo_fsdp" / "DONE.json").unlink()
    out = _run(source, workdir)
    assert "train:dpo_fsdp" in out
    again = _done(tasks / "train_dpo_fsdp")
    assert again["resumed_from"] == 2
    resumed = {r["step"]: r for r in _steps(tasks / "train_dpo_fsdp")}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "reward_margin"):
            assert resumed[step][key] == first[step][key], (step, key)
