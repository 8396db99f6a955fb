"""The model presets match published sizes; the hardware table is complete and consistent."""

from __future__ import annotations

import pytest

from nemoc.compiler.catalog import GPUS, PRESETS, get_gpu, get_preset
from nemoc.compiler.flops import param_counts

# Published parameter counts (model cards / papers).
PUBLISHED = {
    "llama3_8b": 8.03e9, "llama31_8b": 8.03e9, "llama3_70b": 70.6e9, "llama31_70b": 70.6e9,
    "llama31_405b": 405.8e9, "gpt3_175b": 174.6e9, "nemotron4_340b": 341e9, "nemotron4_15b": 15.6e9,
    "llama2_7b": 6.74e9, "llama2_13b": 13.0e9, "llama2_70b": 69.0e9, "mistral_7b": 7.24e9,
    "mixtral_8x7b": 46.7e9, "mixtral_8x22b": 140.6e9, "qwen25_7b": 7.61e9, "qwen25_72b": 72.7e9,
    "qwen25_0p5b": 0.494e9, "qwen3_8b": 8.19e9, "qwen3_32b": 32.8e9, "qwen3_0p6b": 0.596e9,
    "gpt3_126m": 125e6, "gpt3_13b": 12.85e9,
}


@pytest.mark.parametrize("name,nominal", [("gpt3_350m", 0.35), ("gpt3_760m", 0.76), ("gpt3_1p3b", 1.3),
                                          ("gpt3_2p7b", 2.7), ("gpt3_6p7b", 6.7)])
def test_gpt3_sizes_match_brown_et_al_table_2_1_nominal_sizes(name: str, nominal: float) -> None:
    # Table 2.1 prints rounded, nominal sizes: within 2.5 %
    assert abs(param_counts(PRESETS[name]).total / 1e9 / nominal - 1) < 0.025


@pytest.mark.parametrize("name,published", sorted(PUBLISHED.items()))
def test_preset_parameter_counts_match_published(name: str, published: float) -> None:
    total = param_counts(PRESETS[name]).total
    assert abs(total / published - 1) < 0.01, f"{name}: {total / 1e9:.3f}B vs published {published / 1e9:.3f}B"


def test_mixtral_active_parameters() -> None:
    counts = param_counts(PRESETS["mixtral_8x7b"])
    assert abs(counts.total / 46.7e9 - 1) < 0.01
    assert abs(counts.active / 12.9e9 - 1) < 0.01


def test_every_preset_is_cited_and_named_as_an_identifier() -> None:
    for name, model in PRESETS.items():
        assert name.isidentifier() and model.name == name
        assert model.source, name
        assert model.heads % model.query_groups == 0, name


def test_required_presets_exist() -> None:
    required = ["gpt3_126m", "gpt3_350m", "gpt3_760m", "gpt3_1p3b", "gpt3_2p7b", "gpt3_6p7b", "gpt3_13b", "gpt3_175b",
                "llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama3_70b", "llama31_8b", "llama31_70b",
                "llama31_405b", "mistral_7b", "mixtral_8x7b", "mixtral_8x22b", "nemotron4_15b", "nemotron4_340b",
                "qwen25_0p5b", "qwen25_72b", "qwen3_0p6b", "qwen3_32b"]
    assert all(get_preset(n) is not None for n in required)
    assert get_preset("no_such_model") is None


def test_llama31_and_nemotron_details() -> None:
    m = PRESETS["llama31_405b"]
    assert (m.vocab, m.rotary_base, m.seq_length, m.query_groups) == (128256, 500000.0, 8192, 8)
    n = PRESETS["nemotron4_340b"]
    assert (n.activation, n.norm, n.vocab) == ("squared_relu", "layernorm", 256000)
    q = PRESETS["qwen3_8b"]
    assert q.qk_layernorm and q.kv_channels == 128


def test_hardware_table() -> None:
    assert set(GPUS) >= {"A100-40GB", "A100-80GB", "H100", "H200", "B200", "B300", "GB200", "GB300", "CPU"}
    for hw in GPUS.values():
        assert hw.source and hw.hbm_bytes > 0 and hw.hbm_bw > 0 and hw.nvlink_bw > 0 and hw.net_bw > 0
        assert hw.peak_tflops["bf16"] > 0
    assert get_gpu("GB200").nvlink_domain == 72 and get_gpu("H100").nvlink_domain == 8
    assert get_gpu("h100").peak("bf16") == pytest.approx(989.4e12)
    assert get_gpu("H100").nvlink_bw == 450e9  # unidirectional half of 900 GB/s
    assert not get_gpu("A100-80GB").supports("fp8")
    assert get_gpu("H100").supports("fp8") and not get_gpu("H100").supports("mxfp8")
    assert get_gpu("B200").supports("mxfp8")
    assert get_gpu("a100_80gb") is get_gpu("A100-80GB")
    assert get_gpu("TPUv5") is None
