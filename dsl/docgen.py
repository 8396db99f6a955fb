"""Generates docs/language.md from the schema, so the reference cannot drift from the checker.

    python -m nemoc.dsl.docgen > docs/language.md

Input:  `nemoc.dsl.schema` and `nemoc.dsl.codes`. Output: Markdown text. A test compares the file.
"""

from __future__ import annotations

from nemoc.dsl.codes import CODES
from nemoc.dsl.schema import BLOCKS, CALLS, STAGE_PARAMS, UNITS, FieldDef

INTRO = """\
# The `.nemo` language

One `.nemo` file describes one training experiment: where it runs, the model, the parallel layout,
the precision, the data, and a chain of stages. `nemoc check FILE` validates it; `nemoc fmt FILE`
prints it in canonical form; `nemoc plan FILE` resolves every `auto`.

This reference is generated from the checker's schema (`dsl/schema.py`) by
`python -m nemoc.dsl.docgen > docs/language.md`; a test fails when the two disagree. The grammar
itself is `grammar/nemo.lark`.

```
import "common/hardware.nemo"            # templates shared between experiments

experiment llama3_8b_chat {
  cluster dgx_h100 { nodes = 4 }          # a template from the import, with an override
  model llama3_8b { seq_length = 8192 }   # a preset, with an override
  parallel { tensor = auto  pipeline = auto  micro_batch = auto }
  precision = bf16
  data web { path = "data/web/*.jsonl"  format = jsonl  tokenizer = "tokenizer.json" }
  data chat { path = "data/chat.jsonl"  format = chat }
  stage pretrain {
    data = [web]  tokens = 1.2T  global_batch = 1024
    optimizer = adam(lr = 3e-4, betas = [0.9, 0.95], weight_decay = 0.1)
    schedule = cosine(warmup = 2000, min_lr = 3e-5)
    checkpoint { every = 1000  keep = 3  async = true }
  }
  stage sft after pretrain { data = [chat]  epochs = 2  peft = lora(rank = 16, alpha = 32) }
}
```

## Syntax

- A file holds `import "relative/path.nemo"` statements and blocks. A block is
  `KIND [NAME] [after A, B] { members }`; a member is a field `name = value` or a nested block.
  Fields are separated by whitespace (several may share a line). `#` starts a comment.
- Words such as `model`, `stage` or `data` are not reserved: the schema decides what is valid where.
  The only keywords are `import` (at the start of an item) and `after` (in a block header).
- Values:
  - numbers: `8`, `0.5`, `.5`, `3e-4`, optionally followed by a unit: `1.2T`, `80GiB`, `900GB/s`,
    `4h`, `90%` (what a unit means depends on the field's unit kind, below);
  - strings: `"data/web/*.jsonl"` (one line; escapes `\\"`, `\\\\`, `\\n`, `\\t`);
  - words: enum values (`bf16`), catalog ids (`H100`, `A100-80GB`; words may contain inner `-`),
    references to declarations (`web`), `true`, `false`, `auto`;
  - lists `[a, b, c]` (a trailing comma is allowed), calls `adam(lr = 3e-4, betas = [0.9, 0.95])`;
  - arithmetic on numbers: `4 * 128`, `(1 + 3) * 2`, `1h + 30min`, `-(2 * 3)`, with the usual precedence.
    It is exact (rational) arithmetic; units must agree (`80GiB / 2` is a size, `80GiB * 80GiB` an error).
- `auto` lets the planner choose; only fields marked *auto* below accept it.
- Lines end with LF, CRLF or a lone CR (old Mac editors), mixed freely: lines, columns and comments
  (which end at any of them) come out the same. Outside strings and comments the text is ASCII:
  digits are `0`-`9` only, so `layers = ４` (fullwidth) or `٤` (Arabic-Indic) is E014, naming the
  character (`U+FF14 FULLWIDTH DIGIT FOUR`) and the ASCII digit to write.
- Limits (each a diagnostic at the place it is exceeded, never a crash): a file is at most 1 MiB and
  50,000 tokens, comments included (E003, at the first token past it: `check`, `fmt` and `plan` then stay
  within a 10 s budget on any input, which `bench/bench_check.py` measures on adversarial files at both
  limits: at most ~7 s on a 2-core machine at load 8, most under 3 s);
  brackets and chained unary minus nest at most 64 deep (`- - 4` nests like `-(-(4))`; E004), while a
  flat `1 + 1 + ... + 1` may be as long as the file; a number literal has at most 64 digits and an
  exponent of at most 30, and every value lies between 1e-18 and 1e18 ("number too large", E032).

### Units

| unit kind | suffixes | base unit | notes |
|---|---|---|---|
"""

UNIT_NOTES = {
    "count": ("tokens / samples / steps", "decimal SI: `1.2T` = 1.2e12; `B` = billion here; a plain number is a count"),
    "size": ("bytes", "SI (`GB` = 1e9) and IEC (`GiB` = 2^30); a plain number is an error"),
    "bandwidth": ("bytes/s", "`Gb/s` is bits"),
    "duration": ("seconds", "a plain number is an error"),
    "percent": ("fraction", "`90%` = 0.9; a plain number is a fraction"),
}


def _default(f: FieldDef) -> str:
    if f.required:
        return "**required**"
    if f.default is None:
        return "auto" if f.auto else "-"
    if isinstance(f.default, bool):
        return f"`{str(f.default).lower()}`"
    if isinstance(f.default, tuple):
        return "`[" + ", ".join(str(x) for x in f.default) + "]`"
    if isinstance(f.default, str):
        return f"`{f.default}`"
    return f"`{f.default:g}`" if isinstance(f.default, float) else f"`{f.default}`"


def _type(f: FieldDef) -> str:
    text = f.type.describe()
    return text + ("; or `auto`" if f.auto else "")


def field_markdown(f: FieldDef, owner: str) -> str:
    """One field as the reference documents it (its type, default and meaning), for `nemoc lsp` hovers."""
    return f"**`{f.name}`** in `{owner}`: {_type(f)}; default {_default(f)}\n\n{f.doc}"


def _table(fields: tuple[FieldDef, ...]) -> list[str]:
    if not fields:
        return ["(no fields)", ""]
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        rows.append(f"| `{f.name}` | {_type(f)} | {_default(f)} | {f.doc} |")
    return rows + [""]


KERNELS_SECTION = [
    "## Layer kernels (`kernels`)", "",
    "`kernels` (an experiment field, next to `precision`) says which layer kernels `nemoc run` builds and",
    "`nemoc plan` costs. Write it when the machine that runs the plan differs from the default, e.g. a GPU",
    "cluster whose Python has no Transformer Engine: `kernels = local` (or `--set kernels=local`).", "",
    "| value | the runtime builds | the plan assumes |",
    "|---|---|---|",
    "| `te` | Transformer Engine's layer spec: fused norms, RoPE and SwiGLU, TE attention, fused Adam, "
    "gradient-accumulation fusion (where apex is installed) | the cost and memory models' defaults |",
    "| `local` | Megatron-Core's local spec on plain PyTorch: torch norms, RoPE and SwiGLU; torch SDPA "
    "(`flash`) or Megatron's DotProductAttention (`unfused`) | their unfused kernels: more HBM traffic and "
    "launches per layer, torch's foreach Adam, more activation memory (docs/cost-model.md, \"The local spec\") |",
    "| `auto` (default) | `te` on a GPU cluster, `local` with `gpu = CPU` | the same |", "",
    "fp8 and mxfp8 need Transformer Engine (E127 with `local`); `te` with `gpu = CPU` is E128. `context` > 1",
    "needs an attention core that splits sequences over the context-parallel ranks (E113): with `te`",
    "Transformer Engine's flash / fused attention, with `local` (so on the CPU) the runtime's SDPA core",
    "(`attention_backend` auto, flash or fused), never Megatron's `unfused` core. Eval and export stages",
    "build the local spec (export with the unfused core) whatever `kernels` and `attention_backend` say, and",
    "the plan costs them so. The plan records the choice (`Plan.kernels`,",
    "`StagePlan.kernels`; `nemoc plan` prints it, `--json` has `kernels` at the top and per stage). A `te`",
    "plan run where `transformer_engine` does not import falls back to the local spec and warns once at task",
    "start; a `local` plan builds the local spec even where Transformer Engine is installed.", "",
]


def render() -> str:
    """The whole of docs/language.md."""
    out = [INTRO.rstrip("\n")]
    for kind, (base, note) in UNIT_NOTES.items():
        suffixes = ", ".join(f"`{s}`" for s in UNITS[kind] if s)
        out.append(f"| {kind} | {suffixes} | {base} | {note} |")
    out += ["", "## Blocks", ""]
    for kind, b in BLOCKS.items():
        header = f"### `{kind}`"
        out += [header, "", b.doc, ""]
        traits = []
        if b.name != "forbidden":
            traits.append(f"name: {b.name}")
        if b.repeat:
            traits.append("may repeat (distinct names)")
        if b.after:
            traits.append("takes `after A, B`")
        if b.template:
            traits.append("may be declared at top level as a named template")
        if b.blocks:
            traits.append("nested blocks: " + ", ".join(f"`{x}`" for x in b.blocks))
        if traits:
            out += ["- " + t for t in traits] + [""]
        out += _table(b.fields)
    out += ["## Stage kinds and their fields", "",
            "A stage's `kind` defaults to its name when the name is a kind (`stage pretrain { }`). Besides the",
            "common stage fields above, each kind accepts its own fields. They become the kind's typed record",
            "(`StagePlan.params` in the plan), every field not written at the default shown. A `ppo` stage runs `after` a `reward`",
            "stage (its reward model and critic) and a policy stage (e.g. `sft`).", ""]
    for kind, params in STAGE_PARAMS.items():
        out += [f"### `kind = {kind}`", ""] + _table(params)
    out += ["## Call values", "", "Arguments are written `name = value`; omitted ones take the default.", ""]
    for func, args in CALLS.items():
        out += [f"### `{func}(...)`", ""] + _table(args)
    out += KERNELS_SECTION
    out += [
        "## Imports and templates", "",
        "`import \"path\"` is resolved relative to the importing file and must stay inside the project tree",
        "(the directory of the file given to `nemoc`). Imported files hold templates only. A top-level",
        "`cluster NAME { }`, `model NAME { }`, `parallel NAME { }` or `data NAME { }` block is a template; inside",
        "the experiment, `cluster NAME { fields }` starts from it and the fields written override it.",
        "`model NAME` falls back to the catalog's presets (`nemoc.compiler.catalog.models`). A stage may",
        "name a data template directly (`data = [web]`) without redeclaring it.", "",
        "Only regular files are imported: a directory, a FIFO or a device is E005 at the import (never a",
        "hang), as is a path holding a NUL byte or another control character. The project tree is compared",
        "by real paths, so a project reached through a symlinked directory imports normally.", "",
        "A file without an `experiment` (such as `examples/common/hardware.nemo`) is a *module*: `nemoc",
        "check` checks it on its own (its imports, every template's fields, types and units, duplicate",
        "templates, blocks that belong inside an experiment, the accelerator ids of its cluster templates)",
        "and exits 0 when it is clean. `plan` and `run` need an experiment and say so (E026).", "",
        "## Overrides", "",
        "Every command accepts `--set KEY=VALUE` (repeatable). `KEY` is a dotted path: `parallel.tensor`,",
        "`model.layers`, `cluster.nodes`, `precision`, `kernels`, `data.web.path`, `stage.pretrain.steps`,",
        "`stage.pretrain.checkpoint.every`, `stage.sft.parallel.tensor`. `VALUE` uses the same value syntax",
        "as the file (`--set stage.pretrain.optimizer='adam(lr = 1e-4)'`), and errors in it are reported",
        "against a pseudo-file `<--set N>` with a caret. A missing `parallel` or `checkpoint` block is created.",
        "",
        "An override never resets the arguments of a call. `--set stage.sft.optimizer.lr=2e-5` sets one",
        "argument and keeps the others the file (or the template the block extends) wrote; a whole call of the",
        "same function, `--set \"stage.sft.optimizer=adam(lr = 2e-5)\"`, is merged the same way: the arguments",
        "it names win, the others stay. When the file writes no call there, `FIELD.ARG` starts from the first of",
        "the field's functions that takes `ARG` (`adam`, `cosine`, `lora`, `slurm` for `partition`, `k8s` for",
        "`namespace`). Only a call of another function (`sgd(...)` over the file's `adam(...)`) replaces the",
        "file's call, with a warning (W050) naming the arguments dropped; to reset an argument, give its value.",
        "An unknown argument is an error (E050) naming it and listing the ones the function takes.",
        "",
        "## Sweeps", "",
        "`nemoc plan` and `nemoc run` take `--sweep KEY=V1,V2,...` (repeatable): `KEY` is any `--set` path,",
        "the values are written as in the file and separated by commas outside brackets and strings",
        "(`--sweep \"stage.sft.optimizer=adam(lr = 1e-4),adam(lr = 3e-4)\"`). Several `--sweep`s give their",
        "cartesian product (at most 1,000 points); each point is compiled exactly as the same `--set`s after",
        "the command's own would be.", "",
        "- `nemoc plan FILE --sweep parallel.tensor=2,4,8` plans every point and prints them side by side:",
        "  the point's settings, each stage's chosen layout, memory per GPU against capacity, step time,",
        "  tokens/s per GPU, MFU and cost, then the fastest point. A point that breaks a layout rule, does not",
        "  fit or has a bad value is a row with the first error (code, message, equation, hint). `--json`",
        "  prints a list: `{\"point\": {KEY: VALUE}, \"sets\", \"ok\", \"plan\": the nemoc plan --json document",
        "  or null, \"diagnostics\"}`. Exit 0 when at least one point planned, 1 when none did.",
        "- `nemoc run FILE --sweep ...` first compiles and plans every point (one that fails stops the sweep",
        "  before anything starts), then runs each point as its own `nemoc run` in its own run directory under",
        "  `--workdir` (default `runs/<experiment>`): `sweep-tensor=2/`, `sweep-tensor=4/`, ... (a key by its",
        "  last segment unless two share it; a value unfit for a path gets a digest). `sweep.json` there indexes",
        "  the points (settings, `--set`s, exit code). Each point caches, resumes and logs on its own (data",
        "  preparation too). A failed point does not stop the others (exit 1 at the end); Ctrl-C, or a point",
        "  refused as a usage error (exit 2, e.g. `--detach` without Slurm), stops the sweep there.",
        "  `nemoc status runs/<experiment>` lists the points with their task states and last loss;",
        "  `nemoc status runs/<experiment>/sweep-tensor=2` shows one point.", "",
        "Sweeps are given on the command line only: a list in the file would be a second meaning for list",
        "values (`betas = [0.9, 0.95]` is already a list), so the language keeps one value per field.", "", "## Diagnostics", "",
        "`path:line:col: error[E0xx]: message`, the source line with a caret, then `= equation`, `= hint`",
        "and `note:` lines. All errors are reported, not only the first. `nemoc check` exits 0 when clean",
        "(warnings allowed), 1 on errors, 2 when the file cannot be read or the command line is wrong;",
        "`--json` prints the diagnostics as JSON. Layout rules (`nemoc.compiler.rules`) add their own codes.",
        "Rendering is linear in the input: at most 50 diagnostics are printed per file, then `... and N",
        "more` (the summary line and `--json` count and list all of them), and a source line longer than",
        "160 characters is shown as a window around the caret.", "",
        "| code | meaning |", "|---|---|",
    ]
    out += [f"| {code} | {text} |" for code, text in CODES.items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
