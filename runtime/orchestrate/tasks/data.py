"""Built-in inline kinds: `tokenizer` (train the local byte-level BPE) and `prepare` (tokenize a text /
JSONL source into a Megatron-Core indexed dataset, or validate a chat / preference / prompt_response
source record by record and pass its path on)."""

from __future__ import annotations

import os
import sys

from nemoc.compiler.hfdata import is_hf_dataset
from nemoc.compiler.spec import DataSpec
from nemoc.runtime.data_prep import RAW_FORMATS, Source, prepare_dataset, train_tokenizer, validate_records
from nemoc.runtime.orchestrate.tasks import TaskContext, TaskError, TaskKind, register
from nemoc.runtime.tokenizer import load_tokenizer


def _data(ctx: TaskContext, name: str) -> DataSpec:
    for data in ctx.plan.data:
        if data.name == name:
            return data
    raise TaskError(f"{ctx.task.id}: data {name!r} is not in the plan")


def run_tokenizer(ctx: TaskContext) -> dict:
    settings = ctx.task.settings
    root = os.path.abspath(ctx.plan.root)
    sources = [Source.from_spec(_data(ctx, s["name"]), root) for s in settings["sources"]]
    path = ctx.out_dir / "tokenizer.json"
    tokenizer = train_tokenizer(sources, int(settings["vocab_size"]), path, in_worker=True,
                                progress=_progress_printer(ctx, "training the tokenizer on", "corpus"))
    ctx.log(f"trained a byte-level BPE: {tokenizer.vocab_size} tokens (asked for {settings['vocab_size']})")
    return {"tokenizer": str(path), "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}


def _tokenizer_spec(ctx: TaskContext, data: DataSpec) -> str:
    if data.tokenizer is None:
        local = ctx.inputs_of("tokenizer")
        if not local:
            raise TaskError(f"{ctx.task.id}: no tokenizer given and no local tokenizer task upstream")
        return local[0][1]["tokenizer"]
    if data.tokenizer.startswith("tiktoken:") or os.path.isabs(data.tokenizer):
        return data.tokenizer
    return os.path.abspath(os.path.join(ctx.plan.root, data.tokenizer))


# the seed of a Hugging Face dataset's record order (fixed: the order is part of the prepared data's content)
HF_SHUFFLE_SEED = 1234


def _hf_dataset(ctx: TaskContext, data: DataSpec) -> DataSpec:
    """A local Hugging Face dataset (compiler/hfdata.py layouts) read once: its split, columns renamed,
    in a seeded random order, as `records.jsonl` in this task's folder; the data set as that file."""
    from dataclasses import replace

    from nemoc.runtime.hf.datasets import DatasetError, materialize

    path = data.path if os.path.isabs(data.path) else os.path.join(os.path.abspath(ctx.plan.root), data.path)
    out = ctx.out_dir / "records.jsonl"
    try:
        n = materialize(path, out, split=data.hf_split, columns=dict(data.columns), seed=HF_SHUFFLE_SEED)
    except (DatasetError, OSError) as exc:
        raise TaskError(f"{ctx.task.id}: {exc}") from None
    ctx.log(f"read {n} records of {data.path}" + (f" split {data.hf_split}" if data.hf_split else "")
            + f" (shuffled, seed {HF_SHUFFLE_SEED})")
    fmt = "jsonl" if data.format == "text" else data.format  # records carry the text under text_field
    return replace(data, path=str(out), format=fmt, hf_split=None, columns=())


def run_prepare(ctx: TaskContext) -> dict:
    data = _data(ctx, ctx.task.settings["name"])
    if is_hf_dataset(data.path if os.path.isabs(data.path) else os.path.join(ctx.plan.root, data.path)) \
            or data.hf_split or data.columns:
        data = _hf_dataset(ctx, data)
    source = Source.from_spec(data, os.path.abspath(ctx.plan.root))
    spec = _tokenizer_spec(ctx, data)
    tokenizer = load_tokenizer(spec)
    common = {"format": data.format, "tokenizer": spec, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}
    if data.format in RAW_FORMATS:
        checked = validate_records(source)
        ctx.log(f"validated {checked['records']} {data.format} records in {len(checked['files'])} file(s)")
        return dict(common, path=checked["files"][0], paths=checked["files"], records=checked["records"])
    result = prepare_dataset(source, spec, ctx.out_dir, workers=ctx.options.get("workers"),
                             progress=_progress_printer(ctx, "tokenizing", data.name))
    ctx.log(f"{result.documents} documents, {result.tokens} tokens from {len(result.files)} file(s) in "
            f"{result.seconds:.1f} s ({result.tokens_per_s:,.0f} tokens/s, {result.workers} worker{'s' if result.workers > 1 else ''})")
    return dict(common, prefix=result.prefix, **{k: v for k, v in result.to_dict().items() if k != "prefix"})


def _progress_printer(ctx: TaskContext, verb: str, name: str):
    """A rich progress bar over the source bytes when stderr is a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = Progress(f"  {verb} {name}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                                    transient=True)
            state["bar"].start()
            state["id"] = state["bar"].add_task(name, total=total)
        state["bar"].update(state["id"], completed=done)
        if done >= total:
            state["bar"].stop()

    return update


register(TaskKind(name="tokenizer", run_inline=run_tokenizer))
register(TaskKind(name="prepare", run_inline=run_prepare))
