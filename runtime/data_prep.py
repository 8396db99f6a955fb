"""Data preparation: JSONL and plain-text sources -> tokenizer -> a Megatron-Core indexed dataset.

`prepare_dataset(...)` tokenizes every document of a data source in parallel worker processes (the files
are cut into chunks at line boundaries; spawned workers tokenize a chunk each into a numpy part file,
appending the end-of-document token to each document), then writes the parts' documents in order with
Megatron-Core's `IndexedDatasetBuilder` to `<out>/<name>_text_document.{bin,idx}` through `*.tmp` files
renamed only when complete; the output is byte-identical for any number of workers. Workers are
spawned (see `_run_jobs`), so a script that calls `prepare_dataset(workers=2+)` needs the usual
`if __name__ == "__main__":` guard of Python multiprocessing (the `nemoc` command has it). The
train/validation/test split and the blending weights are applied at training time by
`BlendedMegatronDatasetBuilder` / `GPTDataset` (the task.json carries them).

`validate_records(...)` checks chat / preference / prompt_response files record by record (these are
handed to the alignment stages as raw JSONL, see docs/data.md). `iter_texts(...)` yields the text of any
format, for training a tokenizer on the corpus itself.

Formats (a data source's `format`):
  text             plain UTF-8; one document per blank-line-separated paragraph (`options.documents =
                   "paragraph"`, the default), per line (`"line"`) or per file (`"file"`).
  jsonl            one JSON object per line; the document is the string in `text_field`.
  chat             {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} (or ShareGPT
                   {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}, or prompt + response)
  prompt_response  {"prompt": str, "response": str}
  preference       {"prompt": str, "chosen": str, "rejected": str}
  unpaired         {"prompt": str, "completion": str, "label": bool}   (TRL's unpaired preference format, KTO)
Every bad input (no file matched, unreadable file, invalid UTF-8, malformed JSON, a missing or non-string
field, an empty corpus) raises `DataError` whose message starts with `file:line:`.
"""

from __future__ import annotations

import glob
import itertools
import json
import mmap
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# the record formats, their readers and the one error type for bad data (re-exported: callers import them here)
from nemoc.runtime.records import CHAT_ROLES, DataError, chat_messages, read_preferences, read_sft, read_unpaired
from nemoc.runtime.tokenizer import NemocTokenizer, TokenizerError, load_tokenizer

TOKENIZED_FORMATS = ("text", "jsonl")
RAW_FORMATS = ("chat", "prompt_response", "preference", "unpaired")
FORMATS = TOKENIZED_FORMATS + RAW_FORMATS
TEXT_DOCUMENTS = ("paragraph", "line", "file")  # what one document of a plain-text file is
CHUNK_BYTES = 1 << 20  # ~1 MiB of source text per work item
PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of about this many characters
BYTES_PER_AUTO_WORKER = 4 << 20  # `workers=None`: one worker per 4 MiB of text, up to one per core




@dataclass(frozen=True, slots=True)
class Source:
    """What preparation needs from a `DataSpec` (plain values, so it pickles into worker processes)."""

    name: str
    pattern: str
    format: str = "jsonl"
    text_field: str = "text"
    documents: str = "paragraph"  # text format only: paragraph | line | file

    @classmethod
    def from_spec(cls, data, root: str) -> Source:
        pattern = data.path if os.path.isabs(data.path) else os.path.join(root, data.path)
        options = dict(data.options)
        return cls(name=data.name, pattern=pattern, format=data.format, text_field=data.text_field,
                   documents=str(options.get("documents", "paragraph")))


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    path: str
    offset: int
    length: int
    first_line: int  # 1-based line number of the chunk's first line


@dataclass(frozen=True, slots=True)
class PrepareResult:
    prefix: str
    documents: int
    tokens: int
    skipped_empty: int
    files: tuple[str, ...]
    bytes: int
    seconds: float
    workers: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), files=list(self.files), tokens_per_s=round(self.tokens_per_s, 1))


# ------------------------------------------------------------------------------------------ reading


def resolve_files(source: Source) -> list[str]:
    if source.format not in FORMATS:
        raise DataError(f"{source.pattern}: unknown data format {source.format!r} (expected one of {', '.join(FORMATS)})")
    if source.format == "text" and source.documents not in TEXT_DOCUMENTS:
        raise DataError(f"{source.pattern}: options documents = {source.documents!r} is not one of "
                        f"{', '.join(TEXT_DOCUMENTS)} (data {source.name!r})")
    files = sorted(p for p in glob.glob(os.path.expanduser(source.pattern), recursive=True) if os.path.isfile(p))
    if not files:
        what = "file not found" if not glob.has_magic(source.pattern) else "the pattern matches no file"
        if os.path.isdir(os.path.expanduser(source.pattern)):
            what = f"is a directory: name its files, e.g. with the pattern {os.path.join(source.pattern, '*')}"
        raise DataError(f"{source.pattern}: {what} (data {source.name!r})")
    return [os.path.abspath(f) for f in files]


def _decode(raw: bytes, path: str, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{line_no}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None


def _lines(chunk: Chunk) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without the newline) of a chunk."""
    try:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.offset)
            data = f.read(chunk.length)
    except OSError as exc:
        raise DataError(f"{chunk.path}:{chunk.first_line}: cannot read ({exc.strerror})") from None
    start, line_no = 0, chunk.first_line
    while start < len(data):  # one line at a time: a huge line is not copied with all the others
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        yield line_no, _decode(data[start:end].rstrip(b"\r"), chunk.path, line_no)
        start, line_no = end + 1, line_no + 1


_LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                             r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _json_object(line: str, path: str, line_no: int) -> dict | None:
    if not line.strip():
        return None  # blank lines in JSONL are tolerated
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # an integer of more than 4,300 digits (Python's int-from-string limit)
        raise DataError(f"{path}:{line_no}: unreadable JSON value ({str(exc).split(':')[0]})") from None
    except RecursionError:  # the C decoder's depth limit (Python's recursion limit)
        raise DataError(f"{path}:{line_no}: JSON nested too deeply (the reader stops near {sys.getrecursionlimit()} "
                        "levels of arrays / objects); a record is one object with string fields") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    if "\\u" in line:  # only an escape can make a lone surrogate (raw ones are invalid UTF-8, caught earlier)
        _check_surrogates(record, line, path, line_no)
    return record


def _check_surrogates(record: dict, line: str, path: str, line_no: int) -> None:
    """A `\\ud800` escape without its pair decodes to a string no UTF-8 encoder accepts: the tokenizer
    would fail later without naming the line."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        match = _LONE_SURROGATE.search(line)
        where = f" {match.group(0)} at column {match.start() + 1}" if match else ""
        raise DataError(f"{path}:{line_no}: lone surrogate escape{where}: half of a UTF-16 pair is not a "
                        "character (invalid Unicode text)") from None


def _string_field(record: dict, key: str, path: str, line_no: int) -> str:
    if key not in record:
        present = ", ".join(sorted(record)) or "none"
        raise DataError(f"{path}:{line_no}: missing field {key!r} (fields present: {present})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{path}:{line_no}: field {key!r} must be a string, got {type(value).__name__}")
    return value




def record_texts(record: dict, fmt: str, text_field: str, path: str, line_no: int) -> list[str]:
    """Validate one JSON record of `fmt` and return its text pieces."""
    if fmt == "jsonl":
        return [_string_field(record, text_field, path, line_no)]
    if fmt == "prompt_response":
        return [_string_field(record, k, path, line_no) for k in ("prompt", "response")]
    if fmt == "preference":
        return [_string_field(record, k, path, line_no) for k in ("prompt", "chosen", "rejected")]
    if fmt == "unpaired":
        if not isinstance(record.get("label"), bool):
            got = "missing" if "label" not in record else f"{type(record['label']).__name__} {record['label']!r}"
            raise DataError(f"{path}:{line_no}: field 'label' must be true (desirable) or false (undesirable), got {got}")
        return [_string_field(record, k, path, line_no) for k in ("prompt", "completion")]
    if fmt == "chat":
        messages = chat_messages(record)
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{path}:{line_no}: field 'messages' must be a non-empty list of {{role, content}} objects")
        texts = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{path}:{line_no}: messages[{i}] must be an object with 'role' and 'content'")
            role = _string_field(message, "role", path, line_no)
            if role not in CHAT_ROLES:
                raise DataError(f"{path}:{line_no}: messages[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}")
            texts.append(_string_field(message, "content", path, line_no))
        if not any(m.get("role") == "assistant" for m in messages):
            raise DataError(f"{path}:{line_no}: the conversation has no 'assistant' message to train on")
        return texts
    raise DataError(f"{path}:{line_no}: unknown data format {fmt!r}")


def iter_documents(chunk: Chunk, source: Source) -> Iterator[tuple[int, str]]:
    """(line number, document text) for every document that starts in `chunk`."""
    if source.format != "text":
        for line_no, line in _lines(chunk):
            record = _json_object(line, chunk.path, line_no)
            if record is not None:
                yield line_no, "\n".join(record_texts(record, source.format, source.text_field, chunk.path, line_no))
        return
    if source.documents == "line":
        yield from ((n, line) for n, line in _lines(chunk) if line.strip())
        return
    paragraph: list[str] = []
    start = chunk.first_line
    for line_no, line in _lines(chunk):
        if source.documents == "paragraph" and not line.strip():
            if paragraph:
                yield start, "\n".join(paragraph)
            paragraph = []
            continue
        if not paragraph:
            start = line_no
        paragraph.append(line)
    if paragraph:
        yield start, "\n".join(paragraph)


def text_pieces(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of about `piece_chars` characters, each cut just before a space that follows a
    non-space character (the whole text when there is no such space). A byte-level BPE pre-tokenizer
    (GPT-2's, tiktoken's, the local tokenizer's) never puts a non-space and the space after it in one
    pre-token, so tokenizing the pieces one by one gives exactly the ids of the whole text, and a
    tokenizer trained on the pieces is the one trained on the whole; memory and the time between two
    returns to Python (where Ctrl-C is handled) stay bounded by the piece, not the document."""
    start = 0
    while len(text) - start > piece_chars:
        cut = text.find(" ", start + piece_chars)
        while cut > 0 and text[cut - 1].isspace():
            cut = text.find(" ", cut + 1)
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def iter_texts(sources: Sequence[Source]) -> Iterator[str]:
    """Every document's text (validated) of every source, in file order, long documents in pieces
    (`text_pieces`): a tokenizer-training corpus."""
    for source in sources:
        for chunk in make_chunks(resolve_files(source), source):
            for _, text in iter_documents(chunk, source):
                yield from text_pieces(text)


def make_chunks(files: Sequence[str], source: Source, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut files into ~`chunk_bytes` pieces at line boundaries (paragraph boundaries for paragraph text,
    whole files for `documents = "file"`), remembering each piece's first line number."""
    chunks: list[Chunk] = []
    for path in files:
        if source.format == "text" and source.documents == "file":
            chunks.append(Chunk(len(chunks), path, 0, os.path.getsize(path), 1))
            continue
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    continue
                # mmap: boundaries are found without reading a large file into memory
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    _cut(chunks, path, data, size, source, chunk_bytes)
        except OSError as exc:
            raise DataError(f"{path}:1: cannot read ({exc.strerror})") from None
    return chunks


def _cut(chunks: list[Chunk], path: str, data, size: int, source: Source, chunk_bytes: int) -> None:
    separator = b"\n\n" if source.format == "text" and source.documents == "paragraph" else b"\n"
    offset, line = 0, 1
    while offset < size:
        end = min(offset + chunk_bytes, size)
        if end < size:
            cut = data.find(separator, end)
            end = size if cut < 0 else cut + len(separator)
        chunks.append(Chunk(len(chunks), path, offset, end - offset, line))
        line += data[offset:end].count(b"\n")
        offset = end


# ------------------------------------------------------------------------------------------ writing

_worker_tokenizer: NemocTokenizer | None = None


def _init_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    _worker_tokenizer = load_tokenizer(tokenizer_spec)


def _init_pool_worker(tokenizer_spec: str) -> None:
    """A pool worker: default SIGTERM (the pool's terminate) and no SIGINT (the parent handles Ctrl-C and
    stops the pool), so neither prints a traceback; SIGKILL when the parent dies (even by SIGKILL)."""
    from nemoc.runtime.orchestrate.procs import set_parent_death_signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGKILL)
    _init_worker(tokenizer_spec)


def _tokenize_chunk(args: tuple[Chunk, Source, str, str]) -> tuple[int, int, int, int]:
    """Tokenize one chunk into `<part>.tokens.bin` (every document + EOD, concatenated, raw `dtype`,
    written as it goes) and `<part>.lengths.npy`; returns (index, documents, tokens, empty documents
    dropped). Memory: a batch of small documents, or one piece of a long one (`text_pieces`), as ids."""
    import numpy as np

    chunk, source, part, dtype = args
    dtype = np.dtype(dtype)
    eod = _worker_tokenizer.eod
    lengths: list[int] = []
    empty = 0
    batch: list[str] = []

    with open(part + ".tokens.bin", "wb") as out:
        def flush() -> None:
            nonlocal empty
            for ids in _worker_tokenizer.tokenize_batch(batch):
                if ids:
                    ids.append(eod)
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                    lengths.append(len(ids))
                else:
                    empty += 1
            batch.clear()

        for _, text in iter_documents(chunk, source):
            if len(text) <= PIECE_CHARS:
                batch.append(text)
                if len(batch) >= 256:
                    flush()
                continue
            flush()  # documents stay in order
            count = 0
            for piece in text_pieces(text):
                ids = _worker_tokenizer.tokenize(piece)
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                count += len(ids)
            out.write(np.asarray([eod], dtype=dtype).tobytes())
            lengths.append(count + 1)
        flush()
    np.save(part + ".lengths.npy", np.asarray(lengths, dtype=np.int64))
    return chunk.index, len(lengths), int(sum(lengths)), empty


def _builder(vocab_size: int):
    """Megatron-Core's IndexedDatasetBuilder and the token dtype for `vocab_size` (imported on first use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" on import
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return IndexedDatasetBuilder, DType.optimal_dtype(vocab_size)


def dataset_prefix(out_dir: str | os.PathLike, name: str) -> str:
    return str(Path(out_dir) / f"{name}_text_document")


def prepare_dataset(
    source: Source,
    tokenizer_spec: str,
    out_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Tokenize `source` into `<out_dir>/<name>_text_document.{bin,idx}` (see the module docstring).

    `progress(done_bytes, total_bytes)` is called after every chunk. Raises `DataError` / `TokenizerError`.
    """
    if source.format not in TOKENIZED_FORMATS:
        raise DataError(f"{source.pattern}: format {source.format!r} is not tokenized at preparation time")
    started = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_spec)  # fail here, in the parent, with a clear message
    _, dtype = _builder(tokenizer.vocab_size)
    files = resolve_files(source)
    chunks = make_chunks(files, source, chunk_bytes)
    total = sum(c.length for c in chunks)
    if workers is None:  # a spawned worker costs ~1 s to start: only worth it for a few MiB each
        workers = min(os.cpu_count() or 1, -(-total // BYTES_PER_AUTO_WORKER))
    workers = max(1, min(workers, len(chunks) or 1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = out_dir / "parts.tmp"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    jobs = [(c, source, str(parts / f"{c.index:06d}"), dtype.__name__) for c in chunks]
    counts = [0, 0, 0]
    done = 0
    for index, docs, toks, empty in _run_jobs(jobs, tokenizer_spec, workers):
        counts[0] += docs
        counts[1] += toks
        counts[2] += empty
        done += chunks[index].length
        if progress:
            progress(done, total)
    if counts[0] == 0:
        shutil.rmtree(parts, ignore_errors=True)
        raise DataError(f"{files[0]}:1: the corpus is empty: no non-empty document in {len(files)} file(s) of data "
                        f"{source.name!r}")
    prefix = dataset_prefix(out_dir, source.name)
    _merge(parts, [j[2] for j in jobs], prefix, tokenizer.vocab_size)
    shutil.rmtree(parts, ignore_errors=True)
    return PrepareResult(prefix=prefix, documents=counts[0], tokens=counts[1], skipped_empty=counts[2],
                         files=tuple(files), bytes=total, seconds=time.perf_counter() - started, workers=workers)


def _run_jobs(jobs: list, tokenizer_spec: str, workers: int) -> Iterator[tuple[int, int, int, int]]:
    """Results in chunk order, so the first bad line in file order is the error reported."""
    if workers == 1:
        _init_worker(tokenizer_spec)
        yield from map(_tokenize_chunk, jobs)
        return
    # spawn, not fork: this process holds torch / Megatron-Core / tokenizer threads, and forking a
    # threaded process can deadlock the child. Workers import only this module, numpy and tokenizers.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_pool_worker, initargs=(tokenizer_spec,)) as pool:
        yield from pool.imap(_tokenize_chunk, jobs)


def _merge(parts: Path, part_prefixes: list[str], prefix: str, vocab_size: int) -> None:
    """Write the chunks' documents in order into `prefix.{bin,idx}` with Megatron-Core's
    IndexedDatasetBuilder, via `.tmp` files renamed when complete."""
    import numpy as np

    builder_cls, dtype = _builder(vocab_size)
    tmp = str(parts / "merged")
    builder = builder_cls(tmp + ".bin", dtype=dtype)
    for part in part_prefixes:
        lengths = np.load(part + ".lengths.npy")
        if not len(lengths):
            continue
        flat = np.memmap(part + ".tokens.bin", dtype=dtype, mode="r")
        ends = np.cumsum(lengths)
        for start, end in zip(ends - lengths, ends):
            builder.add_document(flat[start:end], [int(end - start)])
    builder.finalize(tmp + ".idx")
    for ext in (".idx", ".bin"):
        os.replace(tmp + ext, prefix + ext + ".tmp")
    for ext in (".bin", ".idx"):  # .idx last: a reader that sees the .idx sees a complete .bin
        os.replace(prefix + ext + ".tmp", prefix + ext)


def validate_records(source: Source) -> dict:
    """Check every record of a chat / prompt_response / preference / unpaired source; returns counts and paths."""
    if source.format not in RAW_FORMATS:
        raise DataError(f"{source.pattern}: format {source.format!r} is tokenized, not validated as raw records")
    files = resolve_files(source)
    records = 0
    for chunk in make_chunks(files, source):
        records += sum(1 for _ in iter_documents(chunk, source))
    if records == 0:
        raise DataError(f"{files[0]}:1: the data set is empty: no record in {len(files)} file(s) of data {source.name!r}")
    # and what the SFT / DPO trainers will refuse (an empty reply, chosen == rejected), now rather than after
    # the stages before them have trained
    for path in files:
        try:
            if source.format == "preference":
                read_preferences(path)
            elif source.format == "unpaired":
                read_unpaired(path)
            else:
                read_sft(path, source.format)
        except ValueError as exc:
            raise DataError(f"{exc} (data {source.name!r})") from None
    return {"records": records, "files": files, "format": source.format}


def train_tokenizer(sources: Sequence[Source], vocab_size: int, path: str | os.PathLike, *, in_worker: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> NemocTokenizer:
    """Train the local byte-level BPE on the sources' texts (validating them on the way; long documents
    in pieces, `text_pieces`). With `in_worker`, the training (native code that holds on to the thread
    for a long time and does not see Ctrl-C) runs in a spawned child process that this one waits on:
    Ctrl-C or SIGTERM here terminates it at once, and it dies with this process even by SIGKILL;
    `progress(text_bytes_read, source_bytes)` is called about five times a second meanwhile."""
    if not in_worker:
        return _train_tokenizer_here(sources, vocab_size, path)
    context = multiprocessing.get_context("spawn")  # see _run_jobs: never fork a threaded process
    receiver, sender = context.Pipe(duplex=False)
    seen = context.Value("q", 0, lock=False)
    total = sum(os.path.getsize(f) for source in sources for f in resolve_files(source))
    worker = context.Process(target=_tokenizer_worker, daemon=True, name="nemoc-tokenizer",
                             args=(sender, list(sources), vocab_size, str(path), seen, os.getpid()))
    worker.start()
    sender.close()
    try:
        while not receiver.poll(0.2):
            if progress is not None:
                progress(min(seen.value, total), total)
            if not worker.is_alive() and not receiver.poll(0):
                raise TokenizerError(f"{path}: the tokenizer-training process ended without a result "
                                     f"(exit code {worker.exitcode}; out of memory?)")
        outcome, kind, message = receiver.recv()
        worker.join()
    except BaseException:
        _stop(worker)
        raise
    finally:
        receiver.close()
    if outcome != "ok":
        raise {"DataError": DataError, "TokenizerError": TokenizerError}.get(kind, RuntimeError)(message)
    if progress is not None:
        progress(total, total)
    from nemoc.runtime.tokenizer import HFTokenizer

    return HFTokenizer(str(path))


def _stop(worker) -> None:
    worker.terminate()
    worker.join(5)
    if worker.is_alive():
        worker.kill()
        worker.join()


def _tokenizer_worker(sender, sources, vocab_size: int, path: str, seen, parent: int) -> None:
    """The child of `train_tokenizer(in_worker=True)`: ignores SIGINT (the parent stops it), dies with
    the parent, sends ("ok" | "error", exception class, message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from nemoc.runtime.orchestrate.procs import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL, parent=parent)
    try:
        _train_tokenizer_here(sources, vocab_size, path, seen)
        sender.send(("ok", "", ""))
    except (DataError, TokenizerError) as exc:
        sender.send(("error", type(exc).__name__, str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported by the parent as an internal error
        import traceback

        sender.send(("error", type(exc).__name__, "".join(traceback.format_exception(exc))[-4000:]))


def _train_tokenizer_here(sources: Sequence[Source], vocab_size: int, path: str | os.PathLike, seen=None):
    from nemoc.runtime.tokenizer import train_byte_level_bpe

    texts = iter_texts(sources)
    first = next(texts, None)
    if first is None:
        names = ", ".join(s.name for s in sources)
        raise DataError(f"{sources[0].pattern}: the corpus is empty: no text to train a tokenizer on (data {names})")

    def all_texts() -> Iterator[str]:
        for text in itertools.chain((first,), texts):
            if seen is not None:
                seen.value += len(text)
            yield text

    return train_byte_level_bpe(all_texts(), vocab_size, path)


__all__ = [
    "DataError", "PrepareResult", "Source", "TokenizerError", "dataset_prefix", "iter_texts", "make_chunks",
    "prepare_dataset", "record_texts", "resolve_files", "text_pieces", "train_tokenizer", "validate_records",
]
