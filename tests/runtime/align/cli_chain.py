"""The tiny pretrain -> sft -> reward -> ppo, grpo (LoRA) experiment the alignment CLI tests run with
`nemoc run` on the CPU box's two processes, each test choosing the ppo and grpo stages' `parallel` block
(pipeline, virtual stages, context, tensor), and the checks every such run must pass."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

RL_CHAIN = """
cluster cpu_box {
  gpu = CPU
  gpus_per_node = 2
}

experiment NAME {
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
      PARALLEL
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
      PARALLEL
      micro_batch = 1
    }
  }
EXTRA}
"""


def rl_chain(name: str, parallel: str, *, layers: int = 2, extra: str = "") -> str:
    """The experiment's text: `parallel` the ppo and grpo stages' parallel settings (e.g. "pipeline = 2"),
    `extra` more stages inside the experiment block."""
    return (RL_CHAIN.replace("DATA", str(REPO / "examples" / "data")).replace("NAME", name)
            .replace("LAYERS", str(layers)).replace("PARALLEL", parallel).replace("EXTRA", extra))


def nemoc_run(tmp_path: Path, text: str, filename: str):
    """`nemoc run` of `text` written to tmp_path/filename: (the run directory, its plan); the run must finish
    without a traceback."""
    from nemoc.compiler.plan import from_json

    source = tmp_path / filename
    source.write_text(text)
    workdir = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(source), "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=1200, env=dict(os.environ), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    return workdir, from_json((workdir / "plan.json").read_text())


def assert_rl_stage_finished(workdir: Path, plan, kind: str) -> None:
    """The ppo / grpo stage trained its 2 steps with finite losses and reward, held the models the memory
    model planned and wrote a final checkpoint."""
    sp = plan.stage(kind)
    assert sp.estimate.parts["rollout"] > 0  # the rollout is costed (cost._rollout_time)
    done = json.loads((workdir / "tasks" / f"train_{kind}" / "DONE.json").read_text())
    assert done["steps"] == 2 and math.isfinite(done["final_loss"]) and math.isfinite(done["reward"])
    assert done["resident_models"] == list(sp.resident_models)
    assert (Path(done["checkpoint"]) / "metadata.json").exists()
    records = [json.loads(line) for line in
               (workdir / "tasks" / f"train_{kind}" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r and ("policy_loss" in r or "loss" in r)]
    assert [r["step"] for r in steps][-2:] == [1, 2]
    assert all(math.isfinite(r.get("policy_loss", r.get("loss"))) for r in steps)
