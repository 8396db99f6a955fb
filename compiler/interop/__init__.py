"""Bring existing training configurations into `.nemo` (no torch).

`import_text(text, path, gpu=None)` reads a Megatron-LM launch script (a `pretrain_gpt.py` command line as
a shell script holds it), a NeMo 1 YAML config (`trainer:` / `model:` with `model.optim`) or a
Megatron-Bridge `ConfigContainer` dump (`model:` / `train:` / `optimizer:` / `ddp:` ...), and returns an
`Imported`: the canonical `.nemo` text and the warnings to print. Modules: `shell` (the script reader),
`megatron_lm` and `nemo_yaml` (source -> `draft.Draft`), `draft` (Draft -> `.nemo` text through
dsl/format.py). The reverse direction, plan -> Megatron-LM arguments, lives in the runtime's one
plan -> Megatron adapter (`nemoc export --megatron-args`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nemoc.compiler.interop.draft import emit, infer_gpu
from nemoc.dsl.diagnostics import DiagnosticError

FORMATS = ("megatron-lm", "nemo1", "bridge")


class ImportProblem(ValueError):
    """The input cannot be imported; the message names the file and the reason."""


@dataclass(frozen=True)
class Imported:
    text: str  # canonical .nemo
    format: str  # one of FORMATS
    warnings: tuple[str, ...]
    dropped: tuple[str, ...]  # source settings not carried over (also listed in the text's header)


def detect_format(text: str) -> str:
    """`bridge` (a ConfigContainer dump), `nemo1` (trainer/model YAML) or `megatron-lm` (a shell script)."""
    if re.search(r"^_target_:\s*megatron\.bridge\.", text, re.M) or \
            all(re.search(rf"^{k}:", text, re.M) for k in ("model", "train", "optimizer")):
        return "bridge"
    if re.search(r"^model:", text, re.M) and re.search(r"^trainer:", text, re.M):
        return "nemo1"
    return "megatron-lm"


def import_text(text: str, path: str, gpu: str | None = None, name: str | None = None) -> Imported:
    """See the module docstring. Raises ImportProblem."""
    fmt = detect_format(text)
    if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ImportProblem(f"--name {name!r}: an experiment name is a letter or `_` followed by letters, digits, `_`")
    try:
        if fmt == "megatron-lm":
            from nemoc.compiler.interop.megatron_lm import import_launch
            from nemoc.compiler.interop.shell import ShellError, read_launch

            try:
                draft = import_launch(read_launch(text), path)
            except ShellError as exc:
                raise ImportProblem(f"{path}: {exc}") from None
        else:
            from nemoc.compiler.interop.nemo_yaml import import_yaml

            draft = import_yaml(text, path, fmt)
        draft.name = name or experiment_name(path)
        infer_gpu(draft, gpu)
        out = emit(draft)
    except ImportProblem:
        raise
    except DiagnosticError as exc:  # the generated text does not parse: a bug here, said so, never a traceback
        raise ImportProblem(f"{path}: internal error in nemoc import (please report it with the input): "
                            f"the generated .nemo does not parse: {exc}") from None
    except ValueError as exc:
        raise ImportProblem(str(exc) if str(exc).startswith(path) else f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug in nemoc is reported, not dumped (as check's E000)
        raise ImportProblem(f"{path}: internal error in nemoc import (please report it with the input): "
                            f"{type(exc).__name__}: {exc}") from None
    return Imported(out, fmt, tuple(draft.warnings), tuple(draft.dropped))


def experiment_name(path: str) -> str:
    """An identifier from the file name: `train_gpt3_175b_distributed.sh` -> `train_gpt3_175b_distributed`."""
    stem = re.split(r"[/\\]", path)[-1].rsplit(".", 1)[0]
    name = re.sub(r"\W+", "_", stem).strip("_") or "imported"
    return name if not name[0].isdigit() else f"x_{name}"
