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
Errors: `DatasetError` naming the path and what is missing (unknown split: the splits there are).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from nemoc.runtime.atomic import atomic_write_text

DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json")


class DatasetError(ValueError):
    pass


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


def split_files(path: str | Path, split: str | None) -> list[Path]:
    """The data files of `split` under `path` (see the module doc for the layouts)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset file or folder")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        split = split or ("train" if "train" in splits else None)
        if split not in splits:
            raise DatasetError(f"{path}: no split {split!r} (splits: {', '.join(splits)})")
        return split_files(path / split, None)
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        return [path / f["filename"] for f in state.get("_data_files", [])]
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                   and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if split is None:
        return files
    chosen = [p for p in files if p.stem == split or p.stem.startswith(split + "-") or p.parent.name == split]
    if not chosen:
        found = sorted({p.stem.split("-")[0] for p in files})
        raise DatasetError(f"{path}: no files for split {split!r} (found: {', '.join(found) or 'no data files'})")
    return chosen


def read_records(path: str | Path, *, split: str | None = None,
                 columns: Mapping[str, str] | None = None) -> Iterator[dict]:
    for file in split_files(path, split):
        for record in _file_records(file):
            yield _rename(record, columns)


def tokenized_cache(cache_dir: str | Path, key: str, build: Callable[[], Iterator[dict[str, Any]]]) -> list[dict]:
    """Samples (e.g. {"ids": [...], "mask": [...]}) tokenized once under `key` (a content hash of the
    data, template and tokenizer); the first caller builds and writes atomically, the others read."""
    path = Path(cache_dir) / f"{key}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(s, separators=(",", ":")) + "\n" for s in build()))
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def shuffled_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
