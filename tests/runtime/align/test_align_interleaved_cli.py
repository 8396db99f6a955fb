"""`nemoc run` of an sft -> dpo chain whose stages run pipeline 2 x virtual pipeline 2 (Megatron's
interleaved schedule, two model chunks per rank) on the CPU box: both stages finish, the plan carries the
interleaved layout, the LoRA SFT stage saves the adapters of all four chunks (global layer names) and
merges them, and its checkpoint, written by two ranks of two chunks, loads into one process's model (the
DPO stage loaded it at its own layout)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

SPEC = """import "common/hardware.nemo"

experiment interleaved {{
  cluster cpu_box {{}}
  model tiny_llama {{
    layers = 4
    hidden = 64
    heads = 4
    query_groups = 2
    ffn_hidden = 128
    vocab = 4096
    seq_length = 128
    activation = swiglu
    norm = rmsnorm
    position = rope
  }}
  parallel {{
    tensor = 1
    pipeline = 1
    data = auto
    micro_batch = auto
  }}
  precision = fp32
  data corpus {{
    path = "{data}/quickstart/corpus.jsonl"
    format = jsonl
    text_field = "text"
    vocab_size = 4096
  }}
  data chat {{
    path = "{data}/pipeline/sft.jsonl"
    format = chat
  }}
  data prefs {{
    path = "{data}/pipeline/prefs.jsonl"
    format = preference
  }}
  stage pretrain {{
    data = [corpus]
    steps = 5
    global_batch = 8
    optimizer = adam(lr = 1e-3)
  }}
  stage sft after pretrain {{
    data = [chat]
    steps = 4
    global_batch = 8
    optimizer = adam(lr = 3e-4, weight_decay = 0.0)
    peft = lora(rank = 8, alpha = 16)
    parallel {{
      pipeline = 2
      virtual_pipeline = 2
      data = 1
    }}
  }}
  stage dpo after sft {{
    data = [prefs]
    steps = 3
    global_batch = 8
    beta = 0.1
    optimizer = adam(lr = 1e-5, weight_decay = 0.0)
    parallel {{
      pipeline = 2
      virtual_pipeline = 2
      data = 1
    }}
  }}
}}
"""


@pytest.mark.slow
def test_sft_then_dpo_run_interleaved_end_to_end(mcore, tmp_path):
    from nemoc.compiler.plan import from_json

    spec = tmp_path / "interleaved.nemo"
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "hardware.nemo").write_text((REPO / "examples" / "common" / "hardware.nemo").read_text())
    spec.write_text(SPEC.format(data=REPO / "examples" / "data"))
    workdir = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(spec), "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=1500, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    plan = from_json((workdir / "plan.json").read_text())
    for name in ("sft", "dpo"):
        layout = plan.stage(name).layout
        assert (layout.pp, layout.vp, layout.num_microbatches % layout.pp) == (2, 2, 0), layout
    done = {k: json.loads((workdir / "tasks" / f"train_{k}" / "DONE.json").read_text()) for k in ("sft", "dpo")}
    assert done["sft"]["steps"] == 4 and math.isfinite(done["sft"]["final_loss"])
    # the adapters rank 0 holds (the first and third of the four layers: its two chunks)
    assert done["sft"]["adapter_parameters"] > 0 and Path(done["sft"]["adapter_checkpoint"]).is_dir()
    assert done["dpo"]["steps"] == 3 and done["dpo"]["final_loss"] == pytest.approx(math.log(2), abs=0.01)
    assert done["dpo"]["val_before"]["reward_accuracy"] == 0.5  # the policy starts as its reference

    one = mcore.build_gpt(plan.model, mcore.single_layout(), vocab=json.loads(
        (workdir / "tasks" / "train_sft" / "checkpoints" / "final" / "nemoc_model.json").read_text())["shape"]["vocab"],
        seq_length=plan.stage("sft").seq_length)
    mcore.load_model(one, done["sft"]["checkpoint"])  # every layer of both ranks' chunks, into one model
