"""bench/gpu_1b.py (the one-shot ~1B GPU benchmark) on the CPU: its helpers, and `--cpu-smoke`, which
runs every sub-run of the real mode (runtime and bare loop, flash and unfused, the repeat round, the
host-batch diagnostic) on a tiny model over gloo, so the script cannot first fail on a lent GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_1b  # noqa: E402


def test_settings_diff_names_every_differing_leaf():
    a = {"transformer_config": {"hidden_size": 64, "bf16": True}, "model": {"core_attention": ["x.SDPAttention"]}}
    b = {"transformer_config": {"hidden_size": 64, "bf16": False}, "model": {"core_attention": ["x.DotProductAttention"]},
         "environment": {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}}
    assert gpu_1b.settings_diff(a, a) == []
    diff = gpu_1b.settings_diff(a, b)
    assert any(d.startswith("transformer_config.bf16: true != false") for d in diff)
    assert any(d.startswith("model.core_attention:") for d in diff)
    assert any(d.startswith("environment:") for d in diff)
    nan = {"x": float("nan")}
    assert gpu_1b.settings_diff(nan, nan) == []


def test_summary_is_the_median_and_rates_follow_it():
    s = gpu_1b.summarise([0.5, 0.9, 0.4])
    assert s["step_time_s"] == 0.5 and s["measured_steps"] == 3 and s["step_time_s_max"] == 0.9
    r = gpu_1b.rates(0.5, tokens_per_step=1000, flops_per_step=1e12, peak_flops=4e12)
    assert r["tokens_per_s"] == 2000 and r["tflops_per_gpu"] == 2.0 and r["mfu"] == 0.5
    assert gpu_1b.gpu_id("NVIDIA H200") == "H200" and gpu_1b.gpu_id("cpu") == "CPU"


@pytest.mark.slow
@pytest.mark.long  # ~1.5 min: run with `pytest -m long` before taking bench/gpu_1b.py to a GPU
def test_cpu_smoke_runs_all_four_variants_on_identical_settings(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_1b.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=str(REPO))
    path = tmp_path / "gpu_1b_smoke.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    errors = {f"{b}/{k}": v["error"][-1500:] for b, e in result.get("runs", {}).items() for k, v in e.items()
              if isinstance(v, dict) and "error" in v}
    assert proc.returncode == 0, (errors, proc.stdout[-2000:], proc.stderr[-2000:])
    for b, e in result["runs"].items():  # a retried sub-run is fine, but say why it was retried
        for k, v in e.items():
            if isinstance(v, dict) and "first_attempt_error" in v:
                print(f"{b}/{k} needed a retry: {v['first_attempt_error'][-1500:]}")
    cores = {"flash": "nemoc.runtime.model.SDPAttention",
             "unfused": "megatron.core.transformer.dot_product_attention.DotProductAttention"}
    for backend, core in cores.items():
        entry = result["runs"][backend]
        kinds = ("runtime", "bare") + (("runtime_repeat", "bare_repeat") if backend == "flash" else ())
        for kind in kinds:
            run = entry[kind]
            assert run.get("step_time_s", 0) > 0, (backend, kind, run.get("error"))
            assert run["tokens_per_s"] > 0 and run["measured_steps"] >= 1
            assert run["settings"]["model"]["core_attention"] == [core], (backend, kind)
            assert run["settings"]["environment"]["launcher"] == "torchrun"
        assert entry["settings_diff"] == [], entry["settings_diff"]  # apples to apples
        assert "runtime_overhead" in entry
        assert entry["bare"]["host_batches_step_time_s"] > 0
        assert isinstance(entry["predicted"], dict)
    assert "runtime_overhead_repeat" in result["runs"]["flash"]
    assert set(result["flash_vs_unfused"]) == {"runtime", "bare"}
    table = (tmp_path / "gpu_1b_smoke_table.md").read_text()
    assert "| runtime/unfused | DotProductAttention |" in table and "runtime overhead (flash)" in table
    assert not (tmp_path / "data").exists()
