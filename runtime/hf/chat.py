"""Chat templates and conversation formats, rendered exactly as transformers' `apply_chat_template`.

Input:  a conversation in one of the formats people fine-tune with (OpenAI `messages`, ShareGPT
        `conversations`, `prompt`/`response`, preference pairs whose `chosen`/`rejected` are
        conversations or responses), and a template: a Hugging Face tokenizer directory's own
        `chat_template` (tokenizer_config.json or chat_template.jinja) or a named built-in
        (`llama3`, `chatml`, `mistral`).
Output: the rendered text, and `(ids, loss_mask)` with loss on the assistant turns only (the tokens
        the assistant's messages render to, including the end-of-turn marker the template puts after
        them, as TRL's `assistant_only_loss` / axolotl's `train_on_inputs: false`).
Invariants: the jinja environment is transformers' own (`ImmutableSandboxedEnvironment`, trim_blocks,
        lstrip_blocks, `raise_exception`, `strftime_now`, `tojson` with ensure_ascii false), so a template
        renders to the same string (tests/runtime/hf/test_hf_chat.py compares with transformers).
        Assistant spans are found by rendering growing prefixes, so any template works without
        `{% generation %}` markers; a template whose prefix renders are not prefixes of the full render
        (it rewrites earlier turns) raises ChatError instead of masking the wrong tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

Message = dict[str, Any]

BUILTIN_TEMPLATES = {
    # Meta Llama 3 / 3.1 instruct (header ids, <|eot_id|> after every turn)
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # ChatML (Qwen2/2.5/3, many others)
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Mistral instruct v0.1-v0.3 ([INST] ... [/INST] answer</s>; a system message is prepended to the first user turn)
    "mistral": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{% if loop.first %}{{ '[INST] ' + system + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class ChatError(ValueError):
    """A conversation or template that cannot be rendered; the message says which record and why."""


@lru_cache(maxsize=32)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # tokenizer_config.json's AddedToken form
        return value.get("content", "")
    return value or ""


class ChatTemplate:
    """A jinja chat template with the special tokens its tokenizer_config.json defines."""

    def __init__(self, template: str, *, special: Mapping[str, Any] | None = None):
        self.template = template
        self.special = {k: _token_text(v) for k, v in (special or {}).items()}

    @classmethod
    def load(cls, name_or_dir: str | Path) -> ChatTemplate:
        """A built-in by name, or the chat template of a Hugging Face tokenizer directory."""
        if str(name_or_dir) in BUILTIN_TEMPLATES:
            return cls(BUILTIN_TEMPLATES[str(name_or_dir)], special=_builtin_special(str(name_or_dir)))
        directory = Path(name_or_dir)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            raise ChatError(f"{directory}: no chat_template in tokenizer_config.json or chat_template.jinja; name a "
                            f"built-in ({', '.join(BUILTIN_TEMPLATES)})")
        return cls(template, special=tokenizer_special(directory))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False, **extra) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return _compile(self.template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                  **self.special, **extra)
        except TemplateError as exc:
            raise ChatError(f"chat template: {exc}") from None

    def assistant_spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        """(full text, [(start, end) character span of each assistant turn as rendered])."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[: i + 1])
            if not full.startswith(upto) or not upto.startswith(before):
                raise ChatError("chat template renders earlier turns differently once later ones follow; "
                                "cannot find the assistant turns to train on")
            spans.append((len(before), len(upto)))
        return full, spans

    def tokenize(self, messages: Sequence[Message], encode: Callable[[str], Any]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask): `encode` is a `tokenizers.Tokenizer.encode`-like callable with offsets;
        a token is trained on when it starts inside an assistant span."""
        text, spans = self.assistant_spans(messages)
        enc = encode(text)
        mask = [int(any(a <= start < b for a, b in spans)) for start, _end in enc.offsets]
        return list(enc.ids), mask


def tokenizer_special(directory: str | Path) -> dict[str, Any]:
    """The bos/eos/pad/unk tokens a tokenizer directory's tokenizer_config.json names (those it sets)."""
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}


def _builtin_special(name: str) -> dict[str, str]:
    return {"llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
            "chatml": {"eos_token": "<|im_end|>"},
            "mistral": {"bos_token": "<s>", "eos_token": "</s>"}}[name]


# ---------------------------------------------------------------------------------- record formats


def _check_messages(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: expected a non-empty list of messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatError(f"{where}: message {k} needs string `role` and `content`")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_messages(record: Mapping[str, Any], *, where: str = "record",
                columns: Mapping[str, str] | None = None) -> list[Message]:
    """One SFT record -> OpenAI-style messages. Formats: `messages` (OpenAI), `conversations` (ShareGPT:
    from/value), `prompt`/`response` (optionally `system`). `columns` renames a record's keys first
    (e.g. {"instruction": "prompt", "output": "response"})."""
    record = {(columns or {}).get(k, k): v for k, v in record.items()}
    if "messages" in record:
        return _check_messages(record["messages"], where)
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ChatError(f"{where}: `conversations` is not a list")
        out = []
        for k, t in enumerate(turns):
            role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise ChatError(f"{where}: ShareGPT turn {k} needs `from` (human/gpt/system) and a string `value`")
            out.append({"role": role, "content": t["value"]})
        return _check_messages(out, where)
    if "prompt" in record and "response" in record:
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return _check_messages(system + [{"role": "user", "content": record["prompt"]},
                                         {"role": "assistant", "content": record["response"]}], where)
    raise ChatError(f"{where}: no `messages`, `conversations` or `prompt`/`response` (keys: {', '.join(sorted(record))})")


def to_preference(record: Mapping[str, Any], *, where: str = "record",
                  columns: Mapping[str, str] | None = None) -> tuple[list[Message], list[Message]]:
    """One preference record -> (chosen conversation, rejected conversation). `chosen`/`rejected` are
    either full conversations (lists of messages, TRL's conversational format) or responses to `prompt`
    (a string or a list of messages)."""
    record = {(columns or {}).get(k, k): v for k, v in record.items()}
    if "chosen" not in record or "rejected" not in record:
        raise ChatError(f"{where}: a preference record needs `chosen` and `rejected`")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    out = []
    for side in ("chosen", "rejected"):
        value = record[side]
        if isinstance(value, str):
            if prompt is None:
                raise ChatError(f"{where}: `{side}` is a string, so the record needs a `prompt`")
            value = [{"role": "assistant", "content": value}]
        out.append(_check_messages((prompt or []) + list(value), f"{where} ({side})"))
    return out[0], out[1]
