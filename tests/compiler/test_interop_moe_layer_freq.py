"""`nemoc import` of Megatron-LM's `--moe-layer-freq` values Megatron rejects, and of hostile list expressions:
a pattern is shortened (to `moe_first_dense_layers`, or dropped when every layer is MoE) only when it is valid
(one 0 / 1 entry per layer); any other list is written as `moe_layer_freq` so `nemoc check` refuses it at its
line (E202 length, E032 range). An expression too long, too deep or too large is a one-line error naming the
flag, never "internal error" (RecursionError in ast.parse) and never a list of 1e10 ints built in memory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nemoc.compiler.interop import ImportProblem, import_text
from nemoc.compiler.interop.draft import moe_layer_freq_value, set_moe_layers
from nemoc.runtime.cli.lang import check_file

DATA = Path(__file__).resolve().parents[1] / "data" / "interop"


def _script(freq: str) -> str:  # Mixtral 8x7B's script cut to 2 layers, with the pattern added
    text = (DATA / "megatron_mixtral_8x7b.sh").read_text()
    return text.replace("--moe-router-topk 2", f"--moe-router-topk 2 --moe-layer-freq \"{freq}\"", 1)


@pytest.mark.parametrize("freq,code", [
    ("[2]*2", "E032"),         # not 0 / 1: Megatron's "Invalid layer pattern" (gpt_layer_specs.py)
    ("[0]*1+[1]*30", "E202"),  # a valid prefix, but 31 entries for 2 layers: Megatron asserts the length
    ("[1]*7", "E202"),         # every layer MoE, 7 entries for 2 layers
    ("[0]*2", "E203"),         # no expert layer
])
def test_a_pattern_megatron_rejects_is_written_for_check_to_refuse_at_its_line(tmp_path, freq, code):
    imported = import_text(_script(freq), "x.sh", gpu="H100")
    path = tmp_path / "x.nemo"
    path.write_text(imported.text)
    diags, _ = check_file(str(path))  # what `nemoc check` reports
    errors = [d for d in diags if d.is_error]
    assert {d.code for d in errors} == {code}, [(d.code, d.message) for d in errors]
    assert re.match(r"\s*moe_layer_freq = ", imported.text.splitlines()[errors[0].span.line - 1])


@pytest.mark.parametrize("freq,written", [
    ("[0]*1+[1]*1", "moe_first_dense_layers = 1"),
    ("[1]*2", None),
    ("[1]*1+[0]*1", "moe_layer_freq = [1, 0]"),
])
def test_a_valid_pattern_is_written_most_readably(freq, written):
    text = import_text(_script(freq), "x.sh", gpu="H100").text
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("moe_")]
    assert [line for line in lines if "layer" in line] == ([written] if written else []), text


@pytest.mark.parametrize("freq", [
    "+".join(["[1]"] * 50000),  # RecursionError inside ast.parse before
    "[1]*4000000000",           # 4e9 ints (32 GB) before
    "([1]*100000)*100000",      # 1e10 ints
    "[" * 200 + "]" * 200,      # nesting
    "[1]*" + "9" * 5000,        # a number of 5,000 digits
])
def test_a_hostile_expression_is_a_one_line_error_naming_the_flag(freq):
    with pytest.raises(ImportProblem) as err:
        import_text(_script(freq), "x.sh", gpu="H100")
    message = str(err.value)
    assert "--moe-layer-freq" in message and "internal error" not in message, message
    assert len(message) < 400 and "\n" not in message


def test_the_value_reader_caps_input_and_result():
    with pytest.raises(ValueError, match="longer than"):
        moe_layer_freq_value("[1]" + "+[1]" * 5000)
    with pytest.raises(ValueError, match="more than"):
        moe_layer_freq_value("[0, 1]*600000")
    with pytest.raises(ValueError, match="more than"):
        moe_layer_freq_value([1] * 2_000_000)
    assert moe_layer_freq_value("[1]*100000") == (1,) * 100000


def test_the_pattern_is_shortened_only_when_valid():
    set_moe_layers(model := {"layers": 4}, (0, 0, 1, 1))
    assert model == {"layers": 4, "moe_first_dense_layers": 2}
    set_moe_layers(model := {"layers": 4}, (1, 1, 1, 1))
    assert model == {"layers": 4}
    for bad in ((0, 0, 1), (0, 1, 1, 1, 1), (2, 2, 2, 2), (1, 1, 1)):
        set_moe_layers(model := {"layers": 4}, bad)
        assert model == {"layers": 4, "moe_layer_freq": list(bad)}
    set_moe_layers(model := {}, (0, 1))  # the layer count unknown: nothing to check the length against
    assert model == {"moe_layer_freq": [0, 1]}
