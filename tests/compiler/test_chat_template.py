"""Which chat template a stage renders with is decided at compile time (compiler/chattemplate.py): the
tokenizer directory's own `chat_template` by default, a named built-in or role markers when written;
`nemoc plan` says which (W140); an impossible choice is E049 at the `template` line."""

from __future__ import annotations

import json

import pytest

EXPERIMENT = """experiment ft {{
  cluster {{
    gpu = CPU
    gpus_per_node = 1
  }}
  model tiny {{
    init = hf("ckpt")
  }}
  precision = fp32
  data chat {{
    path = "chat.jsonl"
    format = chat
    tokenizer = "{tokenizer}"
  }}
  stage sft {{
    data = [chat]
    steps = 2
    global_batch = 2
{template}
  }}
}}
"""
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}
OWN = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"


def _compile(tmp_path, *, template: str = "", own: bool = True):
    from nemoc.compiler.lower import compile_file
    from nemoc.dsl.diagnostics import Severity

    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "tok").mkdir(exist_ok=True)
    config = {"eos_token": "</s>", **({"chat_template": OWN} if own else {})}
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    text = EXPERIMENT.format(tokenizer="tok", template=f"    template = {template}" if template else "")
    (tmp_path / "ft.nemo").write_text(text)
    spec, diags, _ = compile_file(str(tmp_path / "ft.nemo"))
    errors = [d for d in diags if d.severity == Severity.ERROR]
    return spec, errors, text.splitlines()


@pytest.mark.parametrize("template,own,name", [
    ("", True, "tokenizer"),                                   # default: the tokenizer's own
    ("", False, "markers"),                                    # default, the tokenizer has none
    ("template(name = chatml)", True, "chatml"),               # a named built-in wins
    ("template(name = tokenizer)", True, "tokenizer"),
    ('template(user = "U: ")', True, "markers"),               # markers written
    ("template(name = markers)", True, "markers"),
])
def test_the_stage_template_is_decided_at_compile_time(tmp_path, template, own, name):
    spec, errors, _ = _compile(tmp_path, template=template, own=own)
    assert errors == []
    chosen = spec.stage("sft").params.template
    assert chosen["name"] == name and chosen["tokenizer"] == "tok"


def test_the_plan_says_which_template(tmp_path):
    from nemoc.compiler.planner import plan_experiment

    for own, expected in ((True, "the tokenizer's own chat_template (tok)"),
                          (False, "role markers (user, assistant, end = '<|user|>\\n' '<|assistant|>\\n' '\\n'); "
                                  "the tokenizer tok has no chat_template")):
        spec, errors, _ = _compile(tmp_path, own=own)
        notes = [d.message for d in plan_experiment(spec).warnings if "chat template" in d.message]
        assert len(notes) == 1 and expected in notes[0], notes


@pytest.mark.parametrize("template,own,message", [
    ("template(name = tokenizer)", False, r"template\(name = tokenizer\): the tokenizer 'tok' has no chat_template"),
    ('template(name = llama3, user = "U: ")', True, r"the marker argument user would be ignored"),
])
def test_an_impossible_template_is_an_error_at_its_line(tmp_path, template, own, message):
    import re

    _, errors, lines = _compile(tmp_path, template=template, own=own)
    assert [e.code for e in errors] == ["E049"], errors
    assert re.search(message, errors[0].message), errors[0].message
    assert lines[errors[0].span.line - 1].strip().startswith("template =")
