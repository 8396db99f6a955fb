"""E157: a stage at another sequence length than its parent is refused at `nemoc check` only when the
model's learned position embeddings depend on it; a RoPE model may pretrain at 2048 and fine-tune at 4096."""

from __future__ import annotations

import pytest

EXPERIMENT = """experiment longer {{
  cluster {{
    gpu = CPU
    gpus_per_node = 1
  }}
  model tiny {{
    layers = 2
    hidden = 64
    heads = 4
    ffn_hidden = 256
    vocab = 256
    seq_length = 4096
    position = {position}
  }}
  precision = fp32
  data web {{
    path = "web.txt"
    format = text
  }}
  data chat {{
    path = "chat.jsonl"
    format = chat
  }}
  stage pretrain {{
    data = [web]
    steps = 2
    seq_length = 2048
  }}
  stage sft after pretrain {{
    data = [chat]
    steps = 2
    seq_length = 4096
  }}
}}
"""


@pytest.mark.parametrize("position,codes", [("rope", []), ("none", []), ("learned", ["E157"])])
def test_a_longer_child_stage(tmp_path, position, codes):
    from nemoc.compiler.lower import compile_file
    from nemoc.compiler.rules.check import check_spec
    from nemoc.dsl.diagnostics import Severity

    text = EXPERIMENT.format(position=position)
    (tmp_path / "x.nemo").write_text(text)
    spec, diags, _ = compile_file(str(tmp_path / "x.nemo"))
    assert spec is not None, diags
    errors = [d for d in check_spec(spec) if d.severity == Severity.ERROR]
    assert [e.code for e in errors] == codes
    if codes:
        line = text.splitlines()[errors[0].span.line - 1].strip()
        assert line == "seq_length = 4096"
        assert "seq_length(4096) != pretrain.seq_length(2048), position = learned" in errors[0].equation
        assert errors[0].notes[0].message == "`pretrain` trains at seq_length 2048"
