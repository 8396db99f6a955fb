"""The alignment stages' data: the record readers (runtime/records.py: chat, prompt_response, preference,
unpaired and prompt JSONL records, re-exported here) and the chat templates that tokenise them into
(ids, loss weights) samples.

Input:  records read by runtime/records.py; the stage's template params and tokenizer.
Output: `ChatTemplate.render` / `JinjaChat.render` turn a conversation into token ids with a weight of 1
on the assistant tokens only (the SFT loss mask) and 0 on everything else.
Invariants: a malformed record raises `DataError` whose message starts `file:line:` (blank lines are
skipped); nothing is tokenised before the whole file has been read and validated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# The record types and readers (runtime/records.py, shared with data preparation), re-exported here for
# the stages; one error type for bad data, whether found at prepare time or by a trainer.
from nemoc.runtime.records import (  # noqa: F401
    Conversation, DataError, Message, Preference, Prompt, Unpaired, read_preferences, read_prompts, read_sft,
    read_unpaired, unpair,
)


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
