"""Local Hugging Face dataset layouts: which files hold a split, which columns they have (no torch).

Input:  a data path: a `save_to_disk` folder (`dataset_dict.json` + one folder per split, each with
        `state.json` naming its Arrow files; or a single split's folder with `state.json`), a folder of
        data files named by split (`train-00000-of-00002.parquet`, `data/test.jsonl`, `train/0.parquet`),
        or one file (`.parquet`, `.arrow`, `.jsonl` / `.json` lines); a split name.
Output: `split_files` the data files of the split; `columns_of` the column names of those files (Arrow /
        Parquet schema, or the keys of the first JSON line; `SchemaUnreadable` without pyarrow, which only
        the `train` extra installs); `missing_columns` what a record format needs and the records lack.
Invariants: pure reads of small metadata (a schema, one JSON line), never a whole table, so `nemoc check`
        can report an unknown split or a missing column at the data block's line; the runtime
        reads the records with the same `split_files`. Errors are `HfDataError`
        naming the path and what is there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json")
_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")

# What each record format reads (the runtime's conversation, preference and corpus readers): a
# tuple of alternatives, each a set of columns that must all be present.
FORMAT_COLUMNS: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "chat": (("messages",), ("conversations",), ("prompt", "response")),
    "prompt_response": (("prompt", "response"),),
    "preference": (("chosen", "rejected"),),
}


class HfDataError(ValueError):
    """A dataset path, split or column that is not there; the message says what is."""


class SchemaUnreadable(HfDataError):
    """The split's files are there but their columns cannot be read on this machine: Parquet and Arrow
    schemas need pyarrow, which `pip install nemoc` alone does not bring (the `train` extra does)."""


def is_hf_dataset(path: str | Path) -> bool:
    """A folder (a `save_to_disk` dataset or split-named data files) or a Parquet / Arrow file: read as a
    Hugging Face dataset. A JSONL file or glob stays an ordinary nemoc data source."""
    path = Path(path)
    return path.is_dir() or path.suffix in (".parquet", ".arrow")


def split_files(path: str | Path, split: str | None) -> list[Path]:
    """The data files of `split` under `path` (see the module doc for the layouts). `split` None: the
    `train` split of a `save_to_disk` folder, every data file otherwise."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise HfDataError(f"{path}: no such dataset file or folder")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        split = split or ("train" if "train" in splits else None)
        if split not in splits:
            raise HfDataError(f"{path}: no split {split!r} (splits: {', '.join(splits)})")
        return split_files(path / split, None)
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        return [path / f["filename"] for f in state.get("_data_files", [])]
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file() and p.name not in _METADATA)
    if split is None:
        return files
    chosen = [p for p in files if p.stem == split or p.stem.startswith(split + "-") or p.parent.name == split]
    if not chosen:
        found = sorted({p.stem.split("-")[0] for p in files})
        raise HfDataError(f"{path}: no files for split {split!r} (found: {', '.join(found) or 'no data files'})")
    return chosen


def _schema_names(path: Path) -> list[str]:
    import pyarrow as pa

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(str(path)).names)
    with pa.memory_map(str(path)) as source:
        try:
            return list(pa.ipc.open_stream(source).schema.names)  # what `datasets` writes
        except pa.ArrowInvalid:
            return list(pa.ipc.open_file(source).schema.names)


def columns_of(files: list[Path]) -> list[str]:
    """The column names of the first data file (a split's files share one schema)."""
    if not files:
        return []
    first = files[0]
    if first.suffix in (".parquet", ".arrow"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SchemaUnreadable(f"{first}: the columns of {first.suffix[1:]} files are read with pyarrow, which "
                                   "is not installed") from None
        try:
            return _schema_names(first)
        except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError) for a corrupt file
            raise HfDataError(f"{first}: unreadable ({exc})") from None
    with first.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise HfDataError(f"{first}:1: not a JSON line ({exc})") from None
                return list(record) if isinstance(record, dict) else []
    return []


def missing_columns(columns: list[str], fmt: str, renames: Mapping[str, str], text_field: str = "text") -> list[str] | None:
    """None when the records, after `renames` (source -> nemoc name), carry what `fmt` reads; else the
    columns of the closest alternative that are missing."""
    have = {renames.get(c, c) for c in columns}
    options = FORMAT_COLUMNS.get(fmt, ((text_field,),))
    gaps = [[c for c in option if c not in have] for option in options]
    if any(not gap for gap in gaps):
        return None
    return min(gaps, key=len)
