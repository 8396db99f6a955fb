"""Local Hugging Face datasets as record streams, and a tokenized, shuffled cache shared by all ranks.

Input:  a path: a `save_to_disk` folder (`dataset_dict.json` + one folder per split, each with
        `state.json` naming its Arrow files; or a single split's folder), a folder of data files named
        by split (`train-00000-of-00002.parquet`, `data/test.jsonl`, ...), or one file (`.parquet`,
        `.arrow`, `.jsonl` / `.json` lines); a split name; a column mapping (source key -> nemoc key,
        e.g. {"instruction": "prompt", "output": "response"}).
Output: `read_records` yields plain dicts, batch by batch (pyarrow record batches; never the whole table
        in memory). `tokenized_cache` tokenizes once into `<cache>/<key>.jsonl` (written atomically by
        the first caller; later callers, e.g. the other ranks, read it) and `shuffled_order` gives a
        seeded permutation, so training consumes samples in random order, not length order.
        `materialize` writes a split as one shuffled JSONL file (the `prepare` task of a data block with a
        Hugging Face dataset: run once, read by every rank of the stages that use it).
Errors: `DatasetError` (= compiler.hfdata.HfDataError) naming the path and what is missing (unknown split:
        the splits there are). The layouts themselves are compiler/hfdata.py's, so `nemoc check` reports an
        unknown split or a missing column at the data block's line.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from nemoc.compiler.hfdata import DATA_SUFFIXES, HfDataError, split_files  # noqa: F401  (re-exported)
from nemoc.runtime.atomic import atomic_write_text

DatasetError = HfDataError  # one error type for the layouts (compiler/hfdata.py) and the records


def _rename(record: dict, columns: Mapping[str, str] | None) -> dict:
    return {(columns or {}).get(k, k): v for k, v in record.items()} if columns else record


def _arrow_batches(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)  # what `datasets` writes
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def _file_records(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif path.suffix == ".arrow":
        for batch in _arrow_batches(path):
            yield from batch.to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        raise DatasetError(f"{path}:{n}: not a JSON line ({exc})") from None
    else:
        raise DatasetError(f"{path}: unknown data file type (expected {', '.join(DATA_SUFFIXES)})")


def read_records(path: str | Path, *, split: str | None = None,
                 columns: Mapping[str, str] | None = None) -> Iterator[dict]:
    for file in split_files(path, split):
        for record in _file_records(file):
            yield _rename(record, columns)


def tokenized_cache(cache_dir: str | Path, key: str, build: Callable[[], Iterator[dict[str, Any]]], *,
                    writer: bool = True, wait: Callable[[], None] | None = None) -> list[dict]:
    """Samples (e.g. {"ids": [...], "mask": [...]}) tokenized once under `key` (a content hash of the
    data, template and tokenizer) into `<cache_dir>/<key>.jsonl`.

    Ranks: the `writer` (rank 0) builds and writes the file atomically when it is not there yet; then every
    rank passes `wait` (a barrier) and reads it. A rank that still finds no file (a node that does not see
    the writer's filesystem, or every rank when the writer's build raised) builds the samples itself rather
    than wait forever. Without `wait` (one process) the caller builds when the file is missing."""
    path = Path(cache_dir) / f"{key}.jsonl"
    if writer and not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(s, separators=(",", ":")) + "\n" for s in build()))
        except BaseException:
            # a bad record (DataError naming its file:line): release the others from the barrier; finding no
            # file they build themselves and stop on the same record with the same message
            if wait is not None:
                wait()
            raise
    if wait is not None:
        wait()
    if not path.is_file():
        return list(build())
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


CACHE_VERSION = 1  # bumped when what a cached sample holds changes
# The files of a tokenizer directory that decide its tokens and chat template (weights are not hashed).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(spec: str | None) -> str:
    """What identifies a tokenizer's output: the digest of its file, or of a Hugging Face directory's
    tokenizer files; `tiktoken:NAME` is its own name."""
    if not spec:
        return "none"
    path = Path(spec)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return content_key(*[(name, file_digest(path / name)) for name in _TOKENIZER_FILES if (path / name).is_file()])
    return str(spec)


def content_key(*parts: Any) -> str:
    """A short hex key of JSON-able parts (with CACHE_VERSION)."""
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def shuffled_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def materialize(path: str | Path, out: str | Path, *, split: str | None = None,
                columns: Mapping[str, str] | None = None, seed: int = 0) -> int:
    """The records of `split` (columns renamed) as one JSONL file `out`, in a seeded random order.

    Streams: records are written once in file order, then copied line by line in the permuted order
    (only the line offsets are held, not the records). Returns the record count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ordered = out.with_name(out.name + ".ordered")
    offsets: list[int] = []
    with ordered.open("wb") as f:
        for record in read_records(path, split=split, columns=columns):
            offsets.append(f.tell())
            f.write(json.dumps(record, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
    tmp = out.with_name(out.name + ".tmp")
    with ordered.open("rb") as src, tmp.open("wb") as dst:
        for i in shuffled_order(len(offsets), seed):
            src.seek(offsets[i])
            dst.write(src.readline())
    tmp.replace(out)
    ordered.unlink()
    return len(offsets)
