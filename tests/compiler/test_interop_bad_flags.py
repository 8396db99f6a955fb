"""`nemoc import` of a Megatron-LM launch script or NeMo 1 YAML with one value made bad: each is a one-line
error naming the flag (or left for `nemoc check` to refuse at its line), never "internal error in nemoc
import" (a ZeroDivisionError / OverflowError / TypeError caught at the boundary) and never an import that
does not return. Before: `--context-parallel-size 0`, `--num-attention-heads 0`, `--global-batch-size 0`
divided by zero; `--adam-beta1 inf` overflowed; `--lr-decay-samples` without a value multiplied None;
`--tensor-model-parallel-size 99999999999999999999` searched ~1e20 node counts; `--num-layers 2.5` imported
silently as 2 layers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nemoc.compiler.interop import ImportProblem, import_text
from nemoc.compiler.lower import compile_file

DATA = Path(__file__).resolve().parents[1] / "data" / "interop"
SCRIPT = "megatron_llama3_8b_h100_fp8.sh"


def _with(flag: str, value: str, name: str = SCRIPT) -> str:
    text = (DATA / name).read_text()
    changed = re.sub(rf"{flag}(\s+)[^\s\\]+", lambda m: f"{flag}{m.group(1)}{value}", text, count=1)
    assert changed != text, f"{flag} not in {name}"
    return changed


@pytest.mark.parametrize("name,flag,value,message", [
    (SCRIPT, "--adam-beta1", "inf", "--adam-beta1 inf: not a finite number"),
    (SCRIPT, "--lr", "nan", "--lr nan: not a finite number"),
    (SCRIPT, "--num-layers", "2.5", "--num-layers 2.5: not a whole number"),
    (SCRIPT, "--global-batch-size", "0", "--global-batch-size 0: must be at least 1"),
    (SCRIPT, "--global-batch-size", "-8", "--global-batch-size -8: must be at least 1"),
    (SCRIPT, "--lr-decay-samples", "--", "--lr-decay-samples has no value"),
    ("megatron_gpt_345m_mp.sh", "--lr-warmup-fraction", "--", "--lr-warmup-fraction has no value"),
])
def test_a_bad_number_is_a_one_line_error_naming_the_flag(name, flag, value, message):
    with pytest.raises(ImportProblem) as err:
        import_text(_with(flag, value, name), "x.sh", gpu="H100")
    assert message in str(err.value) and "internal error" not in str(err.value), str(err.value)


@pytest.mark.parametrize("name,flag,value,field", [
    (SCRIPT, "--context-parallel-size", "0", "context"),
    (SCRIPT, "--tensor-model-parallel-size", "-2", "tensor"),
    ("megatron_gpt_345m_mp.sh", "--num-attention-heads", "0", "heads"),
    (SCRIPT, "--tensor-model-parallel-size", "99999999999999999999", "tensor"),
])
def test_an_impossible_size_is_imported_as_written_and_refused_by_check_at_its_line(tmp_path, name, flag, value, field):
    imported = import_text(_with(flag, value, name), "x.sh", gpu="H100")
    path = tmp_path / "x.nemo"
    path.write_text(imported.text)
    _spec, diags, _ = compile_file(str(path))
    errors = [d for d in diags if d.is_error]
    assert errors and all(d.code != "E000" for d in errors), [(d.code, d.message) for d in errors]
    line = imported.text.splitlines()[errors[0].span.line - 1]
    assert re.match(rf"\s*{field} = ", line), (line, errors[0].message)


def test_nemo1_yaml_refuses_infinite_and_fractional_numbers():
    text = (DATA / "nemo1_megatron_gpt_config.yaml").read_text()
    inf = re.sub(r"(\n  hidden_size:)\s*\S+", r"\1 .inf", text, count=1)
    with pytest.raises(ImportProblem, match="hidden_size = inf is not a finite number"):
        import_text(inf, "gpt.yaml")
    half = re.sub(r"(\n  num_layers:)\s*\S+", r"\1 2.5", text, count=1)
    with pytest.raises(ImportProblem, match="num_layers = 2.5 is not a whole number"):
        import_text(half, "gpt.yaml")
