"""`pip install nemoc` (no extras) gives check, fmt, plan and graph; `nemoc run` asks for `nemoc[train]`.

The CLI runs in a subprocess in which the `train` extra's packages cannot be imported (a meta-path finder
refuses them, as on a machine where they were never installed), so a command that reaches for torch or
Megatron-Core fails here even though the test environment has them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.nemo"

BLOCKED = ("torch", "megatron", "transformer_engine", "numpy", "tokenizers", "safetensors", "sentencepiece",
           "tiktoken", "tensorboard", "pyarrow")
HF_FINETUNE = REPO / "examples" / "hf_finetune_cpu.nemo"  # a local Hugging Face dataset (Parquet files)

WITHOUT_TRAIN = f"""
import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
from nemoc.runtime.cli import cli
cli(prog_name="nemoc")
"""


def nemoc_without_train(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TRAIN, *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_the_blocker_really_blocks_torch():
    out = subprocess.run([sys.executable, "-c", WITHOUT_TRAIN.replace("from nemoc.runtime.cli import cli\n"
                                                                      "cli(prog_name=\"nemoc\")", "import torch")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr


@pytest.mark.parametrize("example", [QUICKSTART, HF_FINETUNE], ids=["quickstart", "hf_finetune_cpu"])
@pytest.mark.parametrize("command", [("check",), ("fmt", "--check"), ("plan",), ("graph",)])
def test_language_and_planning_commands_need_no_torch(command, example):
    out = nemoc_without_train(*command, str(example))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr


def test_html_plan_report_without_numpy(tmp_path):
    """The pipeline timeline's segments fall back to JSON lists (numpy comes with the train extra)."""
    out = nemoc_without_train("plan", "--html", str(tmp_path / "plan.html"), str(REPO / "examples" / "pipeline.nemo"))
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "plan.html").read_text()
    assert "pipeline" in page and "Plotly" in page


def test_megatron_lm_command_line_without_torch():
    """`nemoc export --megatron-args` translates the plan with runtime/megatron_args.py's keyword sets, which
    import torch only where they build Megatron-Core objects."""
    out = nemoc_without_train("export", "--megatron-args", str(REPO / "examples" / "llama3_8b_pretrain.nemo"))
    assert out.returncode == 0, out.stderr
    assert "pretrain_gpt.py" in out.stdout and "--tensor-model-parallel-size" in out.stdout


def test_check_without_pyarrow_says_which_columns_it_did_not_check():
    """The split's Parquet files exist, but their schema needs pyarrow (the `train` extra): a warning at the
    data block's path, not an error claiming the file is unreadable."""
    out = nemoc_without_train("check", str(HF_FINETUNE))
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "warning[W003]: data sums: columns not checked" in text and "pyarrow" in text, text
    assert "error" not in text.replace("0 errors", ""), text


def test_plan_json_without_torch_is_the_full_plan():
    out = nemoc_without_train("plan", "--json", str(QUICKSTART))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)


def test_run_without_the_train_extra_names_it(tmp_path):
    out = nemoc_without_train("run", "--workdir", str(tmp_path / "run"), str(QUICKSTART))
    assert out.returncode == 2
    assert "pip install 'nemoc[train]'" in out.stderr and "torch" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
