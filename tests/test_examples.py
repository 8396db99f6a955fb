"""Every example is a test: it passes `nemoc check` and `nemoc fmt --check` through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from nemoc.compiler.lower import load_experiment
from nemoc.runtime.cli import cli

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.nemo"))
REQUIRED = {"quickstart", "pipeline", "llama3_8b_pretrain", "llama3_70b_sft_dpo", "mixtral_8x7b_pretrain",
            "gpt3_175b_a100", "nemotron4_340b"}


def test_the_required_examples_exist():
    assert REQUIRED <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_checks_clean(path):
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert "error[" not in result.output


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_formatted(path):
    result = CliRunner().invoke(cli, ["fmt", "--check", str(path)])
    assert result.exit_code == 0, result.output


def test_example_data_paths_exist_for_the_cpu_examples():
    for name in ("quickstart", "pipeline"):
        spec, _ = load_experiment(str(REPO / "examples" / f"{name}.nemo"))
        for data in spec.data:
            assert (Path(spec.root) / data.path).exists(), (name, data.path)


def test_gpt3_example_has_the_published_layout():
    spec, _ = load_experiment(str(REPO / "examples" / "gpt3_175b_a100.nemo"))
    p, stage = spec.parallel, spec.stage("pretrain")
    assert (p.tensor, p.pipeline, p.data) == (8, 16, 8) and spec.cluster.world_size == 1024
    assert (stage.global_batch, spec.model.seq_length, spec.cluster.gpu) == (1536, 2048, "A100-80GB")
