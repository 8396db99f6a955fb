"""Readers for the alignment data formats, and their tokenisation into (ids, loss weights) samples.

Input:  JSONL files, one record per line:
  chat            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  prompt_response {"prompt": str, "response": str}
  preference      {"prompt": str, "chosen": str, "rejected": str}   (also "chosen"/"rejected" as chat lists)
  unpaired        {"prompt": str, "completion": str, "label": true|false}   (KTO; TRL's unpaired preference)
  prompt          {"prompt": str}   (PPO rollouts, eval generations)
Output: frozen records; `ChatTemplate.render` turns a conversation into token ids with a weight of 1 on
the assistant tokens only (the SFT loss mask) and 0 on everything else.
Invariants: a malformed record raises `DataError` whose message starts `file:line:` (blank lines are
skipped); nothing is tokenised before the whole file has been read and validated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# One error type and one list of chat roles for bad data, whether found at prepare time or by a trainer.
from nemoc.runtime.data_prep import CHAT_ROLES as ROLES
from nemoc.runtime.data_prep import DataError, chat_messages


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
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string")
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _conversation(where: str, record: Mapping) -> Conversation:
    """OpenAI `messages`, ShareGPT `conversations` (from/value) or `prompt`/`response` (data_prep.chat_messages)."""
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


# ------------------------------------------------------------------------------------ chat template


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A plain-text chat template: each turn is `prefix[role] + content + suffix`, then tokenised.

    The default is a simple role-tag template (`<|user|>\\n...\\n`); any prefixes/suffix can be given
    in the stage (`template = {user = "...", assistant = "...", system = "...", end = "..."}`).
    Only the assistant's content and its `end` suffix get loss weight 1.
    """

    system: str = "<|system|>\n"
    user: str = "<|user|>\n"
    assistant: str = "<|assistant|>\n"
    end: str = "\n"

    @classmethod
    def from_params(cls, params: Mapping | None) -> "ChatTemplate":
        given = {k: v for k, v in dict((params or {}).get("template") or {}).items() if k not in ("name", "tokenizer")}
        unknown = set(given) - {"system", "user", "assistant", "end"}
        if unknown:
            raise DataError(f"chat template: unknown keys {sorted(unknown)} (system, user, assistant, end)")
        return cls(**{k: str(v) for k, v in given.items()})

    def prefix(self, role: str) -> str:
        return getattr(self, role)

    def render(self, tokenizer, messages: Sequence[Message], *, eod: bool = True) -> tuple[list[int], list[int]]:
        """(token ids, weights): weights are 1 on assistant content+end tokens, 0 elsewhere."""
        ids: list[int] = []
        weights: list[int] = []
        for m in messages:
            head = tokenizer.tokenize(self.prefix(m.role))
            ids += head
            weights += [0] * len(head)
            body = tokenizer.tokenize(m.content + self.end)
            ids += body
            weights += [1 if m.role == "assistant" else 0] * len(body)
        if eod and messages and messages[-1].role == "assistant":
            ids.append(tokenizer.eod)
            weights.append(1)
        return ids, weights

    def prompt_ids(self, tokenizer, messages: Sequence[Message]) -> list[int]:
        """The context followed by the assistant prefix: what generation continues from."""
        ids, _ = self.render(tokenizer, messages, eod=False)
        return ids + tokenizer.tokenize(self.assistant)

    def reply_ids(self, tokenizer, reply: str, prompt: Sequence[Message] = ()) -> list[int]:
        return tokenizer.tokenize(reply + self.end) + [tokenizer.eod]

    def turn_end_text(self) -> str:
        """What follows an assistant reply's content: the `end` marker (then the EOD `render` appends)."""
        return self.end

    def fingerprint(self) -> str:
        return json.dumps(["markers", self.system, self.user, self.assistant, self.end])


class JinjaChat:
    """A jinja chat template (the tokenizer directory's own `chat_template`, or a built-in llama3 / chatml /
    mistral) behind the interface of `ChatTemplate`: rendered exactly as transformers'
    `apply_chat_template` renders it (runtime/hf/chat.py), with the template's own BOS / end-of-turn
    tokens (no EOD is appended: the template decides), loss weight 1 on the assistant turns only."""

    def __init__(self, template):  # a runtime.hf.chat.ChatTemplate
        self.template = template
        self.end = template.special.get("eos_token", "")  # what GRPO's verifiers strip from a completion

    @staticmethod
    def _dicts(messages: Sequence[Message]) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in messages]

    def _error(self, exc) -> DataError:
        return DataError(f"chat template: {exc}")

    def render(self, tokenizer, messages: Sequence[Message], *, eod: bool = True) -> tuple[list[int], list[int]]:
        """(token ids, weights) of the whole rendered conversation; the text is tokenized once, as
        `apply_chat_template(tokenize=True)` does, and a token is trained on when it starts inside an
        assistant turn. A tokenizer without character offsets (SentencePiece, tiktoken) tokenizes the
        trained and untrained pieces of the text separately."""
        from nemoc.runtime.hf.chat import ChatError

        try:
            text, spans = self.template.assistant_spans(self._dicts(messages))
        except ChatError as exc:
            raise self._error(exc) from None
        encode = getattr(tokenizer, "encode_with_offsets", None)
        if encode is not None:
            enc = encode(text)
            return list(enc.ids), [int(any(a <= start < b for a, b in spans)) for start, _ in enc.offsets]
        ids: list[int] = []
        weights: list[int] = []
        cut = 0
        for a, b in spans:
            for piece, w in ((text[cut:a], 0), (text[a:b], 1)):
                if piece:
                    got = tokenizer.tokenize(piece)
                    ids += got
                    weights += [w] * len(got)
            cut = b
        tail = tokenizer.tokenize(text[cut:]) if text[cut:] else []
        return ids + tail, weights + [0] * len(tail)

    def prompt_text(self, messages: Sequence[Message]) -> str:
        from nemoc.runtime.hf.chat import ChatError

        try:
            return self.template.render(self._dicts(messages), add_generation_prompt=True)
        except ChatError as exc:
            raise self._error(exc) from None

    def prompt_ids(self, tokenizer, messages: Sequence[Message]) -> list[int]:
        """The context rendered with the generation prompt (`add_generation_prompt=True`)."""
        return tokenizer.tokenize(self.prompt_text(messages))

    def reply_ids(self, tokenizer, reply: str, prompt: Sequence[Message] = ()) -> list[int]:
        """The tokens the template renders for one assistant reply after `prompt` (its end-of-turn marker
        included): the full render minus the prompt's render, tokenized on its own (as TRL's DPO
        tokenizes prompt and completion apart)."""
        from nemoc.runtime.hf.chat import ChatError

        before = self.prompt_text(prompt)
        try:
            full = self.template.render(self._dicts([*prompt, Message("assistant", reply)]))
        except ChatError as exc:
            raise self._error(exc) from None
        if not full.startswith(before):
            raise DataError("chat template: the reply's render does not extend the prompt's generation prompt; "
                            "cannot split prompt and reply")
        return tokenizer.tokenize(full[len(before):])

    def turn_end_text(self) -> str:
        """What the template renders right after an assistant reply's content (ChatML: `<|im_end|>\\n`,
        Llama 3: `<|eot_id|>`, Mistral: `</s>`): a one-turn conversation rendered with a probe reply, read
        after the probe. "" when the probe does not appear (a template that rewrites the reply)."""
        from nemoc.runtime.hf.chat import ChatError

        probe = "nemoc-end-of-turn-probe"
        try:
            text = self.template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
        except ChatError as exc:
            raise self._error(exc) from None
        at = text.rfind(probe)
        return text[at + len(probe):] if at >= 0 else ""

    def fingerprint(self) -> str:
        return json.dumps(["jinja", self.template.template, sorted(self.template.special.items())])


def end_of_turn(template, tokenizer) -> int | None:
    """The id of the special token that ends an assistant turn in `template`: the longest of the tokenizer's
    special tokens that the text after an assistant reply starts with (leading whitespace skipped), or None
    when that text starts with none (role markers ending in a newline: the EOD that `render` appends ends
    the turn)."""
    text = template.turn_end_text().lstrip()
    specials = tokenizer.special_tokens
    found = max((t for t in specials if t and text.startswith(t)), key=len, default=None)
    return specials[found] if found is not None else None


def stop_ids(template, tokenizer) -> tuple[int, ...]:
    """Every id generation stops at, as transformers' `generate` stops at each `eos_token_id` of an instruct
    model's generation_config: the tokenizer's end-of-document id, the eos its tokenizer_config.json names
    (Llama 3 Instruct: `<|eot_id|>` while EOD is `<|end_of_text|>`), and the template's end-of-turn token
    (ChatML's `<|im_end|>` while eos is `<|endoftext|>`). No table of model names: read from the template
    and the tokenizer actually used."""
    ids = [tokenizer.eod]
    specials = tokenizer.special_tokens
    eos = template.template.special.get("eos_token") if isinstance(template, JinjaChat) else None
    if eos in specials:
        ids.append(specials[eos])
    turn = end_of_turn(template, tokenizer)
    if turn is not None:
        ids.append(turn)
    return tuple(dict.fromkeys(ids))


def template_for(params: Mapping | None, tokenizer: str | None):
    """The stage's chat template as the compiler resolved it (compiler/chattemplate.py: `name` is
    tokenizer | llama3 | chatml | mistral | markers); `tokenizer` is the stage's tokenizer path."""
    from nemoc.runtime.hf import chat

    given = dict((params or {}).get("template") or {})
    name = given.get("name") or "markers"
    if name == "markers":
        return ChatTemplate.from_params(params)
    directory = Path(tokenizer) if tokenizer and os.path.isdir(tokenizer) else None
    try:
        if name == "tokenizer":
            if directory is None:
                raise DataError(f"chat template `tokenizer`: the stage's tokenizer {tokenizer!r} is not a Hugging "
                                "Face tokenizer directory")
            return JinjaChat(chat.ChatTemplate.load(directory))
        template = chat.ChatTemplate.load(name)
    except chat.ChatError as exc:
        raise DataError(str(exc)) from None
    if directory is None:  # a tokenizer.json / SentencePiece / tiktoken: the family's own special tokens
        return JinjaChat(template)
    # as `tokenizer.apply_chat_template(chat_template=...)`: the tokenizer directory's bos/eos (those it sets)
    return JinjaChat(chat.ChatTemplate(template.template, special=chat.tokenizer_special(directory)))
