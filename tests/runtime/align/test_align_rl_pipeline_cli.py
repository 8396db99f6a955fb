"""`nemoc run` of a tiny experiment whose PPO and GRPO stages run at pipeline parallelism 2 on the CPU
box's two processes (pretrain -> sft -> reward -> ppo, grpo with LoRA: its reference is the policy with the
adapters off, scored by a forward-only schedule): the plan keeps the stages' pipeline = 2, the runtime
trains them through Megatron's schedules with rollouts decoded across the two stages, and each stage
finishes with finite losses, the models the memory model planned and a final checkpoint. The same with 4
layers and 2 virtual pipeline stages per rank for ppo and grpo (`virtual_pipeline = 2`): the interleaved
schedule trains them and the rollouts go around the two stages twice per decoded token. And at tensor
parallelism 2 (ppo, grpo with LoRA, an eval of the sft model): the planner turns sequence parallelism on,
the steps and scoring passes run split along the sequence, the rollouts and generations decode with it
switched off (runtime/model.py `unsplit_sequence`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

EXPERIMENT = """
cluster cpu_box {
  gpu = CPU
  gpus_per_node = 2
}

experiment rl_pipeline {
  cluster cpu_box {}

  model tiny_llama {
    layers = LAYERS
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

  parallel {
    tensor = 1
    pipeline = 1
    data = auto
    micro_batch = auto
  }

  precision = fp32

  data corpus {
    path = "DATA/quickstart/corpus.jsonl"
    format = jsonl
    text_field = "text"
    vocab_size = 4096
  }

  data chat {
    path = "DATA/pipeline/sft.jsonl"
    format = chat
  }

  data prefs {
    path = "DATA/pipeline/prefs.jsonl"
    format = preference
  }

  data sums {
    path = "DATA/pipeline/sums.jsonl"
    format = prompt_response
    split = [0.8, 0.2, 0.0]
  }

  stage pretrain {
    data = [corpus]
    steps = 4
    global_batch = 4
    optimizer = adam(lr = 1e-3)
  }

  stage sft after pretrain {
    data = [chat]
    steps = 2
    global_batch = 4
    optimizer = adam(lr = 1e-3)
  }

  stage reward after sft {
    data = [prefs]
    steps = 2
    global_batch = 4
    optimizer = adam(lr = 1e-4)
  }

  stage ppo after sft, reward {
    data = [sums]
    steps = 2
    global_batch = 4
    max_new_tokens = 6
    optimizer = adam(lr = 1e-5, weight_decay = 0.0)
    parallel {
      pipeline = 2
      micro_batch = 2VIRTUAL
    }
  }

  stage grpo after sft {
    data = [sums]
    steps = 2
    global_batch = 4
    num_generations = 2
    max_new_tokens = 6
    reward = contains
    peft = lora(rank = 4, alpha = 8)
    optimizer = adam(lr = 1e-5, weight_decay = 0.0)
    parallel {
      pipeline = 2
      micro_batch = 1VIRTUAL
    }
  }
}
"""


@pytest.mark.slow
@pytest.mark.parametrize("vp", [None, 2])
def test_ppo_and_grpo_run_at_pp2_end_to_end(tmp_path, vp):
    from nemoc.compiler.plan import from_json

    source = tmp_path / "rl_pipeline.nemo"
    text = EXPERIMENT.replace("DATA", str(REPO / "examples" / "data")).replace("LAYERS", "4" if vp else "2")
    source.write_text(text.replace("VIRTUAL", f"\n      virtual_pipeline = {vp}" if vp else ""))
    workdir = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(source), "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=1200, env=dict(os.environ), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    plan = from_json((workdir / "plan.json").read_text())
    for kind in ("ppo", "grpo"):
        sp = plan.stage(kind)
        assert (sp.layout.pp, sp.layout.dp, sp.layout.vp) == (2, 1, vp)
        assert sp.estimate.parts["rollout"] > 0  # decoded stage after stage (cost._rollout_time)
        done = json.loads((workdir / "tasks" / f"train_{kind}" / "DONE.json").read_text())
        assert done["steps"] == 2 and math.isfinite(done["final_loss"]) and math.isfinite(done["reward"])
        assert done["resident_models"] == list(sp.resident_models)
        assert (Path(done["checkpoint"]) / "metadata.json").exists()
        records = [json.loads(line) for line in
                   (workdir / "tasks" / f"train_{kind}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "step" in r and ("policy_loss" in r or "loss" in r)]
        assert [r["step"] for r in steps][-2:] == [1, 2]


EVAL = """
  stage eval_sft after sft {
    kind = eval
    data = [corpus]
    max_windows = 4
    prompts = ["What is 3 plus 2?"]
    max_new_tokens = 6
    parallel {
      tensor = 2
    }
  }
}
"""


@pytest.mark.slow
def test_ppo_grpo_and_eval_run_at_tp2_with_sequence_parallelism_end_to_end(tmp_path):
    from nemoc.compiler.plan import from_json

    source = tmp_path / "rl_tp.nemo"
    text = EXPERIMENT.replace("DATA", str(REPO / "examples" / "data")).replace("LAYERS", "2").replace("VIRTUAL", "")
    text = text.replace("      pipeline = 2\n", "      tensor = 2\n")
    source.write_text(text.rstrip()[:-1] + EVAL)  # the eval stage inside the experiment block
    workdir = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(source), "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=1200, env=dict(os.environ), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    plan = from_json((workdir / "plan.json").read_text())
    for kind in ("ppo", "grpo", "eval_sft"):
        layout = plan.stage(kind).layout
        assert (layout.tp, layout.pp, layout.sequence_parallel) == (2, 1, True), (kind, layout)
    for kind in ("ppo", "grpo"):
        done = json.loads((workdir / "tasks" / f"train_{kind}" / "DONE.json").read_text())
        assert done["steps"] == 2 and math.isfinite(done["final_loss"]) and math.isfinite(done["reward"])
    results = next(workdir.glob("tasks/*eval_sft*/results.json"))
    generations = json.loads(results.read_text())["generations"]
    assert generations and all(g["tokens"] > 0 for g in generations)
