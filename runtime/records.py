"""The raw record formats of the alignment stages: their types, the readers that validate a JSONL file of
them, and the one error type for bad input data.

Input:  JSONL files, one record per line:
  chat            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} (also ShareGPT
                  `conversations`, or `prompt` + `response`: `chat_messages`)
  prompt_response {"prompt": str, "response": str}
  preference      {"prompt": str, "chosen": str, "rejected": str}   (also "chosen"/"rejected" as chat lists)
  unpaired        {"prompt": str, "completion": str, "label": true|false}   (KTO; TRL's unpaired preference)
  prompt          {"prompt": str}   (PPO rollouts, eval generations)
Output: frozen records (`Conversation`, `Preference`, `Unpaired`, `Prompt`).
Invariants: a malformed record raises `DataError` whose message starts `file:line:` (blank lines are
skipped). No torch and no tokenizer: data preparation (runtime/data_prep.py `validate_records`) checks
the files with these readers before any stage trains, and the stages (runtime/align/data.py, which adds
the chat templates) read them with the same ones; neither module imports the other's caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nemoc.runtime.hf.chat import SHAREGPT_ROLES  # ShareGPT speaker names -> chat roles

CHAT_ROLES = ("system", "user", "assistant")  # the roles the chat template renders (runtime/align/sft.py)


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:` (or `pattern:` when no file matched)."""


def chat_messages(record: dict) -> object:
    """A chat record's messages: OpenAI `messages`, else ShareGPT `conversations` (`from`/`value` turns
    become `role`/`content`; an unknown speaker keeps its name, so the role check names it), else
    `prompt` + `response` (with an optional `system`) as one exchange. None when it has none of them."""
    if "messages" in record or "conversations" not in record:
        pair = isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str)
        if "messages" not in record and pair:
            system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
            return system + [{"role": "user", "content": record["prompt"]},
                             {"role": "assistant", "content": record["response"]}]
        return record.get("messages")
    turns = record["conversations"]
    if not isinstance(turns, list):
        return turns
    return [{"role": SHAREGPT_ROLES.get(str(t.get("from", "")).lower(), t.get("from")), "content": t.get("value")}
            if isinstance(t, dict) and "from" in t else t for t in turns]


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Preference:
    prompt: tuple[Message, ...]  # the shared context (usually one user turn)
    chosen: str
    rejected: str


@dataclass(frozen=True, slots=True)
class Prompt:
    prompt: tuple[Message, ...]
    reference: str | None = None  # the answer a GRPO verifier compares with (response / chosen / last assistant turn)


@dataclass(frozen=True, slots=True)
class Unpaired:
    prompt: tuple[Message, ...]
    completion: str
    desirable: bool


def _records(path: str | Path) -> Iterator[tuple[str, Mapping]]:
    path = Path(path)
    try:
        handle = path.open("rb")  # decoded per line, so an encoding error names its own line
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _text(where: str, record: Mapping, key: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _messages(where: str, value: object, key: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: {key}[{i}].role is {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string")
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _conversation(where: str, record: Mapping) -> Conversation:
    """OpenAI `messages`, ShareGPT `conversations` (from/value) or `prompt`/`response` (`chat_messages`)."""
    found = chat_messages(dict(record))
    if found is None:
        raise DataError(f"{where}: missing field 'messages' (or ShareGPT 'conversations', or 'prompt' + 'response')")
    messages = _messages(where, found, "conversations" if "messages" not in record and "conversations" in record
                         else "messages")
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to train on)")
    return Conversation(messages)


def _prompt_messages(where: str, record: Mapping) -> tuple[Message, ...]:
    if "prompt" in record and isinstance(record["prompt"], list):
        return _messages(where, record["prompt"], "prompt")
    return (Message("user", _text(where, record, "prompt")),)


def _reply(where: str, record: Mapping, key: str) -> str:
    value = record.get(key)
    if isinstance(value, list):  # a chat list: take the last assistant turn
        msgs = _messages(where, value, key)
        if msgs[-1].role != "assistant":
            raise DataError(f"{where}: the last message of '{key}' must be the assistant's")
        return msgs[-1].content
    return _text(where, record, key)


def read_sft(path: str | Path, fmt: str = "chat") -> list[Conversation]:
    """chat or prompt_response records -> conversations."""
    out = []
    for where, record in _records(path):
        if fmt == "prompt_response":
            out.append(Conversation((*_prompt_messages(where, record), Message("assistant", _text(where, record, "response")))))
        elif fmt == "chat":
            out.append(_conversation(where, record))
        else:
            raise DataError(f"{path}: format '{fmt}' cannot be used for SFT (chat | prompt_response)")
    return _non_empty(path, out)


def read_preferences(path: str | Path) -> list[Preference]:
    out = []
    for where, record in _records(path):
        chosen, rejected = _reply(where, record, "chosen"), _reply(where, record, "rejected")
        if chosen == rejected:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
        out.append(Preference(_prompt_messages(where, record), chosen, rejected))
    return _non_empty(path, out)


def read_unpaired(path: str | Path) -> list[Unpaired]:
    """Unpaired preference records: one completion labelled desirable (true) or undesirable (false)."""
    out = []
    for where, record in _records(path):
        label = record.get("label")
        if not isinstance(label, bool):
            got = "missing" if "label" not in record else f"{type(label).__name__} {label!r}"
            raise DataError(f"{where}: field 'label' must be true (desirable) or false (undesirable), got {got}")
        out.append(Unpaired(_prompt_messages(where, record), _reply(where, record, "completion"), label))
    return _non_empty(path, out)


def unpair(preferences: Sequence[Preference]) -> list[Unpaired]:
    """Pairs split as TRL's `unpair_preference_dataset`: each pair gives its chosen completion as a desirable
    example and its rejected one as an undesirable example of the same prompt."""
    return [u for p in preferences for u in (Unpaired(p.prompt, p.chosen, True), Unpaired(p.prompt, p.rejected, False))]


_REFERENCE_KEYS = ("response", "chosen", "answer", "solution")


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts for rollouts/generation; any record with a 'prompt' (or 'messages' minus its reply) works.
    Each keeps its reference answer when it has one (prompt_response `response`, preference `chosen`, a
    chat's last assistant turn), which GRPO's verifiers compare completions with."""
    out = []
    for where, record in _records(path):
        if "prompt" in record:
            key = next((k for k in _REFERENCE_KEYS if k in record), None)
            out.append(Prompt(_prompt_messages(where, record), _reply(where, record, key) if key else None))
        else:
            conv = _conversation(where, record)
            last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
            out.append(Prompt(conv.messages[:last], conv.messages[last].content))
    return _non_empty(path, out)


def _non_empty(path, records: list) -> list:
    if not records:
        raise DataError(f"{path}: no records")
    return records
