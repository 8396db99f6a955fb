"""`nemoc run` of an export-only experiment: HF -> Megatron-Core -> HF, bit-identical, cached on rerun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_models import make_hf_model, read_tensors

NEMOC = str(Path(sys.executable).parent / "nemoc")

EXPERIMENT = """experiment roundtrip {
  cluster {
    gpu = CPU
    gpus_per_node = 1
  }
  model qwen {
    init = hf("ckpt")
  }
  precision = fp32
  stage export {
  }
}
"""




@pytest.mark.parametrize("family", ["qwen2", "mixtral", "qwen3_moe", "gemma3"])
def test_export_only_experiment_round_trips_bit_identically(tmp_path, family):
    make_hf_model(family, tmp_path / "ckpt", dtype=torch.bfloat16)
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (tmp_path / "rt.nemo").write_text(EXPERIMENT)
    run = [NEMOC, "run", "rt.nemo", "--workdir", "runs", "--workers", "1"]
    first = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "runs" / "tasks" / "export_export" / "hf"
    before, after = read_tensors(tmp_path / "ckpt"), read_tensors(out)
    assert sorted(before) == sorted(after)
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    again = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 cached" in again.stdout and "running" not in again.stdout, again.stdout


def test_a_broken_checkpoint_fails_the_import_task_with_one_line(tmp_path):
    make_hf_model("llama", tmp_path / "ckpt")
    tensors = read_tensors(tmp_path / "ckpt")
    del tensors["model.norm.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    (tmp_path / "rt.nemo").write_text(EXPERIMENT)
    proc = subprocess.run([NEMOC, "run", "rt.nemo", "--workdir", "runs", "--workers", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "model.norm.weight" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
