"""The stable diagnostic codes of the language front end (tests and tools match on these)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

CODES: Mapping[str, str] = MappingProxyType({
    "E000": "internal compiler error (a bug in nemoc; please report it with the input)",
    "E001": "the file cannot be read (missing, a directory, a FIFO or device, permission denied) - exit code 2",
    "E002": "the file is not valid UTF-8 - exit code 2",
    "E003": "the file is too large (over 1 MiB, or over 50,000 tokens counting comments)",
    "E004": "nesting is too deep (over 64 levels of brackets and chained unary `-`), at the place it is exceeded",
    "E005": "an imported file cannot be read (missing, not a regular file, a NUL or control character in its path)",
    "E006": "import cycle",
    "E007": "an import leaves the project tree (the root file's directory)",
    "E010": "syntax error: unexpected token",
    "E011": "syntax error: missing `}` to close a block",
    "E012": "syntax error: missing `=` or missing value",
    "E013": "syntax error: unterminated string",
    "E014": "syntax error: unexpected character (a non-ASCII one is named, e.g. a fullwidth digit)",
    "E015": "syntax error: missing `]` or `)`",
    "E016": "syntax error: unmatched closing bracket",
    "E020": "unknown block, or a block in the wrong place",
    "E021": "unknown field (with a suggestion)",
    "E022": "duplicate field or call argument",
    "E023": "duplicate block or template",
    "E024": "block header: a missing or unexpected name, or `after` outside a stage",
    "E025": "missing required field or block",
    "E026": "not exactly one experiment in the root file, or an experiment in an imported file",
    "E027": "a stage's length is given twice (more than one of `steps`, `tokens`, `epochs`)",
    "E028": "a ppo stage does not run after both a reward stage and a policy stage",
    "E029": "a grpo stage has no reward (neither a verifier nor a reward stage it runs after) or both",
    "E030": "wrong type",
    "E031": "wrong or unknown unit",
    "E032": "value out of range (also a number literal too large: over 64 digits, or beyond 1e18)",
    "E033": "not one of the allowed words",
    "E034": "unknown function or argument in a call value",
    "E035": "arithmetic error (units that do not combine, division by zero)",
    "E036": "an integer field got a fractional value",
    "E037": "LoRA targets name a fused layer and its parts (`qkv` with `q`/`k`/`v`, `fc1` with `gate`/`up`)",
    "E040": "undefined reference (data set, stage, template)",
    "E041": "`after` cycle between stages",
    "E042": "unknown model preset",
    "E043": "unknown accelerator id",
    "E044": "a model that is not a preset lacks required architecture fields",
    "E045": "`init = hf(DIR)`: the directory does not exist, has no readable config.json, or its architecture "
            "has no exact Megatron-Core equivalent",
    "E046": "a model field disagrees with the `init` checkpoint's config.json (both values shown)",
    "E204": "`mtp_num_layers` above the multi-token prediction layers the `init` checkpoint holds (its "
            "num_nextn_predict_layers with their weights present; a checkpoint transformers saved holds none)",
    "E047": "a scheduler option its scheduler cannot take: a control character, an `extra` entry that is not an "
            "sbatch option, a fraction of a second, a Kubernetes name that is not a DNS-1123 label",
    "E048": "a Hugging Face dataset: unknown split, a column the format needs is missing, or a malformed "
            "`columns` entry (the message names what the dataset has)",
    "E049": "a stage's chat template: `template(tokenizer)` but the tokenizer has no chat_template, or a named "
            "template (`llama3`, `chatml`, `mistral`, `tokenizer`) together with marker arguments",
    "E050": "malformed `--set` override, unknown override path or unknown call argument",
    "W001": "a data set no stage uses",
    "W002": "a training stage without a length (`steps`, `tokens` or `epochs`): plan and run cannot size it",
    "W003": "a Hugging Face dataset's columns not checked: its Parquet / Arrow schema needs pyarrow, which "
            "`pip install nemoc` alone does not install (the `train` extra does)",
    "W050": "a `--set` call of another function replaces the file's call (its arguments are dropped)",
})
