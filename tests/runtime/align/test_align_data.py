"""Alignment data: malformed chat / preference / prompt records stop with `file:line`; the chat template's mask."""

from __future__ import annotations

import json

import pytest

from nemoc.runtime.align.data import ChatTemplate, DataError, Message, read_preferences, read_prompts, read_sft


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
GOOD_PREF = json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"})


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"invalid JSON"),
    ("[1, 2]", r"expected a JSON object"),
    (json.dumps({"text": "x"}), r"missing field 'messages'"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), r"messages\[0\]\.role is 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), r"no assistant turn"),
    (json.dumps({"messages": [{"role": "user"}]}), r"'role' and 'content'"),
])
def test_malformed_chat_record_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, "chat.jsonl", [GOOD_CHAT, "", bad])
    with pytest.raises(DataError, match=rf"^{path}:3: .*{message}"):
        read_sft(path, "chat")


@pytest.mark.parametrize("bad, message", [
    (json.dumps({"prompt": "q", "chosen": "a"}), r"missing field 'rejected'"),
    (json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}), r"'chosen' must be a string"),
    (json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}), r"identical"),
    (json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}), r"'prompt' is empty"),
])
def test_malformed_preference_record_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, "prefs.jsonl", [GOOD_PREF, GOOD_PREF, bad])
    with pytest.raises(DataError, match=rf"^{path}:3: .*{message}"):
        read_preferences(path)


def test_invalid_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD_PREF.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: invalid UTF-8"):
        read_preferences(path)
    with pytest.raises(DataError, match="cannot read"):
        read_sft(tmp_path / "nope.jsonl")
    empty = _write(tmp_path, "empty.jsonl", [""])
    with pytest.raises(DataError, match="no records"):
        read_preferences(empty)


def test_readers_accept_good_records(tmp_path):
    chat = read_sft(_write(tmp_path, "c.jsonl", [GOOD_CHAT]), "chat")
    assert chat[0].messages[1] == Message("assistant", "hello")
    pr = read_sft(_write(tmp_path, "p.jsonl", [json.dumps({"prompt": "q", "response": "r"})]), "prompt_response")
    assert [m.role for m in pr[0].messages] == ["user", "assistant"]
    prefs = read_preferences(_write(tmp_path, "pref.jsonl", [GOOD_PREF]))
    assert prefs[0].chosen == "4" and prefs[0].prompt == (Message("user", "2+2?"),)
    prompts = read_prompts(_write(tmp_path, "q.jsonl", [GOOD_CHAT, json.dumps({"prompt": "x"})]))
    assert prompts[0].prompt == (Message("user", "hi"),) and prompts[1].prompt == (Message("user", "x"),)


class CharTokenizer:
    eod = 0

    def tokenize(self, text):
        return [ord(c) for c in text]


def test_chat_template_masks_everything_but_the_assistant():
    template = ChatTemplate(system="S:", user="U:", assistant="A:", end="|")
    ids, weights = template.render(CharTokenizer(), [Message("user", "hi"), Message("assistant", "yo")])
    text = "".join(chr(i) if i else "<eod>" for i in ids)
    assert text == "U:hi|A:yo|<eod>"
    trained = "".join(chr(i) if i else "<eod>" for i, w in zip(ids, weights) if w)
    assert trained == "yo|<eod>"
    with pytest.raises(DataError, match="unknown keys"):
        ChatTemplate.from_params({"template": {"bot": "x"}})
    assert ChatTemplate.from_params({"template": {"user": "[INST]"}}).user == "[INST]"


@pytest.mark.parametrize("kind, params, lora", [
    ("sft", {}, False), ("sft", {}, True), ("reward", {}, False), ("dpo", {}, False), ("dpo", {}, True),
    ("dpo", {"reference_free": True}, False), ("ppo", {}, False), ("ppo", {}, True),
])
def test_runtime_and_memory_model_agree_on_resident_models(kind, params, lora):
    from nemoc.compiler.memory import resident_models as planned
    from nemoc.compiler.spec import LoraSpec
    from nemoc.runtime.align.runners import resident_models as held

    peft = LoraSpec() if lora else None
    assert tuple(held(kind, params, peft)) == tuple(planned(kind, params, peft=peft))
