"""Upper bounds on sizes that drive the plan search: an absurd value is a diagnostic at its line, not
a search that runs for minutes."""

from __future__ import annotations

import pytest

from nemoc.compiler.lower import compile_file

TEMPLATE = """experiment bounds {{
  cluster {{ gpu = H100  nodes = {nodes}  gpus_per_node = 8 }}
  model llama3_8b {{ layers = {layers} }}
  stage pretrain {{ steps = 10  global_batch = {global_batch} }}
}}
"""


@pytest.mark.parametrize(("field", "value", "line"), [("layers", "1e18", 3), ("nodes", "1e18", 2),
                                                     ("global_batch", "1e18", 4)])
def test_absurd_sizes_are_errors_at_their_line(tmp_path, field, value, line):
    values = {"nodes": 1, "layers": 32, "global_batch": 64, field: value}
    path = tmp_path / "bounds.nemo"
    path.write_text(TEMPLATE.format(**values))
    spec, diags, _sources = compile_file(str(path))
    errors = [d for d in diags if d.is_error]
    assert spec is None and len(errors) == 1
    assert errors[0].code == "E032" and f"`{field}` must be <=" in errors[0].message
    assert errors[0].span.line == line


def test_real_sizes_pass(tmp_path):
    path = tmp_path / "ok.nemo"
    path.write_text(TEMPLATE.format(nodes=2048, layers=126, global_batch=2048))
    spec, diags, _sources = compile_file(str(path))
    assert spec is not None and not [d for d in diags if d.is_error]
