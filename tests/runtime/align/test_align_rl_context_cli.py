"""`nemoc run` of a tiny experiment whose PPO and GRPO stages run at context parallelism 2 on the CPU
box's two processes (pretrain -> sft -> reward -> ppo, grpo with LoRA: its reference is the policy with the
adapters off): `nemoc check` accepts context = 2 for ppo and grpo (the target's caps; the local spec's SDPA
core splits sequences), the plan keeps the stages' context = 2 with the rollout costed unsplit, and the
runtime decodes the whole rows on both ranks, then shards every experience pass and step over the two
ranks; each stage finishes with finite losses, the models the memory model planned and a final checkpoint.
The numbers are proven by tests/runtime/align/test_align_rl_pipeline.py (cp = 2 = one process)."""

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

experiment rl_context {
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
      context = 2
      micro_batch = 2
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
      context = 2
      micro_batch = 1
    }
  }
}
"""


def test_check_accepts_context_parallel_ppo_and_grpo_and_points_at_context_for_the_unfused_core(tmp_path):
    from click.testing import CliRunner

    from nemoc.runtime.cli import cli

    source = tmp_path / "rl_context.nemo"
    source.write_text(EXPERIMENT.replace("DATA", str(REPO / "examples" / "data")))
    ok = CliRunner().invoke(cli, ["check", str(source)])
    assert ok.exit_code == 0 and "error" not in ok.output, ok.output
    bad = CliRunner().invoke(cli, ["check", str(source), "--set", "attention_backend=unfused"])
    assert bad.exit_code == 1, bad.output
    ppo_context = EXPERIMENT.splitlines().index("  stage ppo after sft, reward {") + 1
    ppo_context += EXPERIMENT.splitlines()[ppo_context:].index("      context = 2") + 1
    assert f"rl_context.nemo:{ppo_context}:7: error[E113]" in bad.output, bad.output
    assert "hint: set attention_backend = auto, flash or fused" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_ppo_and_grpo_run_at_cp2_end_to_end(tmp_path):
    from nemoc.compiler.plan import from_json

    source = tmp_path / "rl_context.nemo"
    source.write_text(EXPERIMENT.replace("DATA", str(REPO / "examples" / "data")))
    workdir = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(source), "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=1200, env=dict(os.environ), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    plan = from_json((workdir / "plan.json").read_text())
    for kind in ("ppo", "grpo"):
        sp = plan.stage(kind)
        assert (sp.layout.cp, sp.layout.pp, sp.layout.dp) == (2, 1, 1)
        assert sp.execution.attention in ("auto", "flash", "fused")  # the SDPA core, which splits sequences
        assert sp.estimate.parts["rollout"] > 0 and sp.estimate.parts["cp_comm"] > 0
        done = json.loads((workdir / "tasks" / f"train_{kind}" / "DONE.json").read_text())
        assert done["steps"] == 2 and math.isfinite(done["final_loss"]) and math.isfinite(done["reward"])
        assert done["resident_models"] == list(sp.resident_models)
        assert (Path(done["checkpoint"]) / "metadata.json").exists()
        records = [json.loads(line) for line in
                   (workdir / "tasks" / f"train_{kind}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "step" in r and ("policy_loss" in r or "loss" in r)]
        assert [r["step"] for r in steps][-2:] == [1, 2]
        assert all(math.isfinite(r.get("policy_loss", r.get("loss"))) for r in steps)
