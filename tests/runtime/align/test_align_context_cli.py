"""Context parallelism from the CLI on the CPU: `nemoc check` accepts `context = 2` on the local spec's
SDPA core (the target says it splits sequences) and refuses it on Megatron's unfused core (E113 at the
user's line), and `nemoc run` trains pretrain -> sft (pack = false) -> dpo at cp = 2 on two gloo ranks, and
at tp 2 x cp 2 and pp 2 x cp 2 on four.
The numbers are proven elsewhere: tests/runtime/test_train_parallel.py (pretraining, cp = 2 vs one
process) and tests/runtime/align/test_align_parallel.py (the alignment kinds)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[3]

SPEC = """import "common/hardware.nemo"

experiment context_parallel {{
  cluster cpu_box {{}}
  model tiny_llama {{
    layers = 2
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
    context = 2
    data = 1
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
    steps = 6
    global_batch = 8
    optimizer = adam(lr = 1e-3)
  }}
  stage sft after pretrain {{
    data = [chat]
    steps = 3
    global_batch = 8
    pack = false
    optimizer = adam(lr = 3e-4, weight_decay = 0.0)
  }}
  stage dpo after sft {{
    data = [prefs]
    steps = 2
    global_batch = 8
    beta = 0.1
    optimizer = adam(lr = 1e-5, weight_decay = 0.0)
  }}
}}
"""


def _write(tmp_path: Path) -> Path:
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "hardware.nemo").write_text((REPO / "examples" / "common" / "hardware.nemo").read_text())
    spec = tmp_path / "cp.nemo"
    spec.write_text(SPEC.format(data=REPO / "examples" / "data"))
    return spec


def test_check_accepts_the_sdpa_core_and_points_at_context_for_the_unfused_one(tmp_path):
    from nemoc.runtime.cli import cli

    spec = _write(tmp_path)
    ok = CliRunner().invoke(cli, ["check", str(spec)])
    assert ok.exit_code == 0 and "E113" not in ok.output, ok.output
    bad = CliRunner().invoke(cli, ["check", str(spec), "--set", "attention_backend=unfused"])
    assert bad.exit_code == 1, bad.output
    line = SPEC.splitlines().index("    context = 2") + 1
    assert f"cp.nemo:{line}:5: error[E113]" in bad.output, bad.output
    assert "Megatron-Core's unfused DotProductAttention" in bad.output
    assert "hint: set attention_backend = auto, flash or fused" in bad.output
    assert "Traceback" not in bad.output


def test_sft_without_packing_is_the_only_sft_at_cp2(tmp_path):
    """Packed rows (the sft default) need Transformer Engine's THD attention with CP: E126, not E113."""
    from nemoc.runtime.cli import cli

    spec = _write(tmp_path)
    spec.write_text(spec.read_text().replace("    pack = false\n", ""))
    out = CliRunner().invoke(cli, ["check", str(spec)]).output
    assert "error[E126]" in out and "pack = true" in out and "E113" not in out, out


# cp 2 alone on the file's two processes, and with tensor or pipeline parallelism 2 on four
# (`--set cluster.gpus_per_node=4`): (overrides, the (tp, pp, cp, dp) every stage must run)
LAYOUTS = {"cp2": ((), (1, 1, 2, 1)),
           "tp2-cp2": (("cluster.gpus_per_node=4", "parallel.tensor=2"), (2, 1, 2, 1)),
           "pp2-cp2": (("cluster.gpus_per_node=4", "parallel.pipeline=2"), (1, 2, 2, 1))}


@pytest.mark.slow
# CI runs pp2-cp2; cp 2 alone is in it, and TP 2 + SP with CP 2 is in test_align_parallel.py's
# dpo-tp2sp-cp2 case (two processes equal one): the other two are `long`, out of CI
@pytest.mark.parametrize("layout_id", [pytest.param(k, marks=pytest.mark.long) if k != "pp2-cp2" else k for k in LAYOUTS])
def test_pretrain_sft_dpo_run_context_parallel_end_to_end(tmp_path, layout_id):
    from nemoc.compiler.plan import from_json

    overrides, sizes = LAYOUTS[layout_id]
    spec = _write(tmp_path)
    workdir = tmp_path / "run"
    sets = [word for o in overrides for word in ("--set", o)]
    run = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(spec), "--workdir", str(workdir),
                          *sets], capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    plan = from_json((workdir / "plan.json").read_text())
    for name in ("pretrain", "sft", "dpo"):
        layout = plan.stage(name).layout
        assert (layout.tp, layout.pp, layout.cp, layout.dp) == sizes, (name, layout)
        assert plan.stage(name).execution.attention in ("auto", "flash", "fused")
    assert "cp=2" in run.stdout and "attention=torch:scaled_dot_product_attention" in run.stdout, run.stdout[-3000:]
    done = {k: json.loads((workdir / "tasks" / f"train_{k}" / "DONE.json").read_text()) for k in ("pretrain", "sft", "dpo")}
    assert (done["pretrain"]["steps"], done["sft"]["steps"], done["dpo"]["steps"]) == (6, 3, 2)
    padded = int(re.search(r"vocab=\d+->(\d+)", run.stdout).group(1))
    # a sane loss: finite and below a uniform guess over the (padded) vocabulary
    assert math.isfinite(done["pretrain"]["final_loss"]) and done["pretrain"]["final_loss"] < math.log(padded)
    assert math.isfinite(done["sft"]["final_loss"])
    # the policy starts as its reference: DPO's loss is log 2 at the first step and stays near it at lr 1e-5
    assert done["dpo"]["final_loss"] == pytest.approx(math.log(2), abs=0.01)
