"""Which chat template a stage renders its conversations with (no torch, no jinja).

Input:  the stage's `template(...)` as written (its arguments, or nothing), and the stage's tokenizer: the
        first `tokenizer` of its data blocks, else its `init` (or the model's) checkpoint directory: the
        tokenizer the stage's task is handed (its datasets' tokenizer, else its checkpoint's).
Output: `resolve` -> (the `template` mapping with `name` decided, an error message or None);
        `describe` -> the one line `nemoc plan` prints (W140 note).
Decision (issue 12; TRL's SFTTrainer and axolotl's `chat_template: tokenizer_default` do the same):
        nothing written -> the tokenizer directory's own `chat_template` when it has one, else role markers;
        `template(name = tokenizer)` -> the tokenizer's own, an error when it has none; `template(name = llama3 |
        chatml | mistral)` -> that built-in jinja; marker arguments -> role markers. A name together with marker
        arguments is an error (the markers would be ignored).
Invariants: reads only `tokenizer_config.json` and `chat_template.jinja` (small metadata files); the
        plan carries the decision and the stage runtime renders what `name` says, never deciding again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

MARKER_ARGS = ("system", "user", "assistant", "end")
BUILTINS = ("llama3", "chatml", "mistral")


def chat_template_file(directory: str | Path | None) -> Path | None:
    """The file holding a Hugging Face tokenizer directory's chat template (chat_template.jinja wins over
    tokenizer_config.json's `chat_template`, as in transformers), or None."""
    if directory is None:
        return None
    d = Path(directory)
    if not d.is_dir():
        return None
    if (d / "chat_template.jinja").is_file():
        return d / "chat_template.jinja"
    config = d / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return config if template else None


def resolve(written: Mapping[str, object] | None, args: Mapping[str, object],
            tokenizer: str | None, tokenizer_dir: Path | None) -> tuple[dict, str | None]:
    """(template mapping with `name` and `tokenizer` set, error or None).

    `written`: the arguments the user wrote (None: no `template` field); `args`: every argument with the
    schema's defaults filled; `tokenizer`: the tokenizer as the plan names it; `tokenizer_dir`: it on disk."""
    out = dict(args)
    own = chat_template_file(tokenizer_dir)
    out["tokenizer"] = tokenizer
    name = (written or {}).get("name")
    markers = [k for k in MARKER_ARGS if k in (written or {})]
    if name is not None and name != "markers" and markers:
        plural = "s" * (len(markers) > 1)
        return out, (f"template(name = {name}) renders with its own jinja; the marker argument{plural} "
                     f"{', '.join(markers)} would be ignored")
    if name == "tokenizer" and own is None:
        where = f"the tokenizer {tokenizer!r}" if tokenizer else "this stage (no data block names a tokenizer)"
        return out, (f"template(name = tokenizer): {where} has no chat_template (tokenizer_config.json "
                     f"`chat_template` or chat_template.jinja)")
    if name is None:
        name = "markers" if written is not None or own is None else "tokenizer"
    out["name"] = name
    return out, None


def describe(template: Mapping[str, object], root: str | Path = ".") -> str:
    """`nemoc plan`'s line for a stage's chat template (`root`: the experiment's, which tokenizer paths are
    relative to)."""
    name, tokenizer = template.get("name"), template.get("tokenizer")
    if name == "tokenizer":
        return f"chat template: the tokenizer's own chat_template ({tokenizer}), as apply_chat_template renders it"
    if name in BUILTINS:
        return f"chat template: the built-in `{name}` (jinja)"
    shown = " ".join(repr(str(template.get(k, ""))) for k in ("user", "assistant", "end"))
    why = ""
    if tokenizer and not str(tokenizer).startswith("tiktoken:"):
        on_disk = Path(root) / str(tokenizer)
        if not on_disk.exists():
            why = f"; the tokenizer {tokenizer} is not on this machine, so its chat_template could not be read"
        elif chat_template_file(on_disk) is None:
            why = f"; the tokenizer {tokenizer} has no chat_template"
    return f"chat template: role markers (user, assistant, end = {shown}){why}"
