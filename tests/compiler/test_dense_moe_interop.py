"""Dense layers of a MoE model through Megatron-LM command lines and configs: `nemoc export --megatron-args` writes
`--moe-layer-freq` (an int, or the list as Megatron-LM's Python list expression), `nemoc import` reads it back
without evaluating code, a dense prefix as `moe_first_dense_layers`; the DeepSeek presets match only with it."""

from __future__ import annotations

import dataclasses

import pytest

from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.interop import import_text
from nemoc.compiler.interop.draft import moe_layer_freq_value, set_moe_layers
from nemoc.compiler.lower import load_experiment
from nemoc.compiler.spec import ModelSpec
from nemoc.runtime.megatron_args import megatron_lm_command
from plan_factory import make_plan, with_executions

TINY = ModelSpec(name="tiny_moe", layers=4, hidden=64, heads=4, query_groups=4, ffn_hidden=128, vocab=256,
                 seq_length=64, experts=4, top_k=2, moe_ffn_hidden=32)


def _round_trip(tmp_path, model: ModelSpec):
    command = megatron_lm_command(with_executions(make_plan(tmp_path, model=model)), "pretrain")
    imported = import_text(command, "run.sh", gpu="H100")
    path = tmp_path / "imported.nemo"
    path.write_text(imported.text)
    spec, _ = load_experiment(str(path))
    return command, imported, spec.model


@pytest.mark.parametrize("freq,first,flag", [
    (2, 0, "--moe-layer-freq 2"),
    ((1, 0, 1, 1), 0, "--moe-layer-freq '[1]*1+[0]*1+[1]*2'"),
    (1, 1, "--moe-layer-freq '[0]*1+[1]*3'"),
])
def test_the_pattern_round_trips_through_a_megatron_lm_command(tmp_path, freq, first, flag):
    model = dataclasses.replace(TINY, moe_layer_freq=freq, moe_first_dense_layers=first)
    command, imported, back = _round_trip(tmp_path, model)
    assert flag in command
    assert back.moe_layer_pattern == model.moe_layer_pattern, imported.text
    assert not any(d.startswith("--moe-layer-freq") for d in imported.dropped)


def test_deepseek_v3_is_its_preset_only_with_its_dense_layers(tmp_path):
    command, imported, back = _round_trip(tmp_path, get_preset("deepseek_v3"))
    assert "--moe-layer-freq '[0]*3+[1]*58'" in command and "exactly the deepseek_v3 preset" in imported.text
    assert back.moe_first_dense_layers == 3
    every = import_text(command.replace("--moe-layer-freq '[0]*3+[1]*58'", ""), "run.sh", gpu="H100")
    assert "exactly the deepseek_v3 preset" not in every.text  # every layer MoE: another architecture


def test_values_are_read_without_evaluating_code():
    assert moe_layer_freq_value("([0]*3+[1]*58)") == (0,) * 3 + (1,) * 58
    assert moe_layer_freq_value("([1]*3+[0]*1)*3") == ((1, 1, 1, 0) * 3)
    assert moe_layer_freq_value("2") == 2 and moe_layer_freq_value([0, 1]) == (0, 1)
    for bad in ("__import__('os').system('true')", "[0.5]*2", "[0]*x"):
        with pytest.raises(ValueError, match="moe_layer_freq"):
            moe_layer_freq_value(bad)
    model: dict = {"layers": 4}
    set_moe_layers(model, (0, 0, 1, 1))
    assert model == {"layers": 4, "moe_first_dense_layers": 2}
    set_moe_layers(model := {"layers": 4}, (1, 0, 1, 0))
    assert model == {"layers": 4, "moe_layer_freq": [1, 0, 1, 0]}
    set_moe_layers(model := {"layers": 4}, 1)
    assert model == {"layers": 4}
