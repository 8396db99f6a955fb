"""runtime/data_prep.py: JSONL / text -> Megatron-Core indexed datasets, parallel = serial, and bad data
stops with file:line."""

from __future__ import annotations

import filecmp
import json

import pytest

from nemoc.runtime.data_prep import (
    DataError,
    Source,
    iter_texts,
    make_chunks,
    prepare_dataset,
    resolve_files,
    train_tokenizer,
    validate_records,
)

DOCS = [f"Story {i}: {'Anna' if i % 2 else 'Ben'} saw {i % 5} birds near the river." for i in range(400)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:250]))
    (root / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS[250:]) + "\n\n")  # blank line ok
    tokenizer = train_tokenizer([Source("a", str(root / "a.jsonl"))], 400, root / "tok" / "tokenizer.json")
    return root, tokenizer


def read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def test_jsonl_to_indexed_dataset_with_eod_per_document(corpus, tmp_path):
    root, tok = corpus
    result = prepare_dataset(Source("web", str(root / "a.jsonl")), tok.source, tmp_path, workers=1)
    assert result.documents == 250 and result.prefix == str(tmp_path / "web_text_document")
    dataset = read(result.prefix)
    assert len(dataset) == 250 and sum(len(dataset[i]) for i in range(250)) == result.tokens
    first = list(dataset[0])
    assert first[-1] == tok.eod and tok.detokenize(first[:-1]) == DOCS[0]
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "parts.tmp").exists()


def test_two_workers_and_many_chunks_give_identical_bytes(corpus, tmp_path):
    root, tok = corpus
    source = Source("web", str(root / "*.jsonl"), text_field="text")
    source_b = Source("web", str(root / "a.jsonl"))
    one = prepare_dataset(source_b, tok.source, tmp_path / "one", workers=1)
    two = prepare_dataset(source_b, tok.source, tmp_path / "two", workers=2, chunk_bytes=2000)
    assert two.workers == 2 and len(make_chunks(resolve_files(source_b), source_b, 2000)) > 4
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(one.prefix + ext, two.prefix + ext, shallow=False)
    with pytest.raises(DataError, match=r"b\.jsonl:1: missing field 'text' \(fields present: body\)"):
        prepare_dataset(source, tok.source, tmp_path / "three", workers=2)


def test_the_first_bad_line_in_file_order_is_reported_with_parallel_workers(corpus, tmp_path):
    root, tok = corpus
    lines = [json.dumps({"text": d}) for d in DOCS]
    lines[300] = '{"text": "unterminated'
    lines[350] = "[1, 2]"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:301: malformed JSON \(Unterminated string"):
        prepare_dataset(Source("x", str(tmp_path / "bad.jsonl")), tok.source, tmp_path / "out", workers=2,
                        chunk_bytes=1000)
    assert not (tmp_path / "out" / "x_text_document.idx").exists()


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: invalid UTF-8 \(byte 0xe9 at column 14\)"),
    (b'{"text": "ok"}\n"just a string"\n', r"bad\.jsonl:2: expected a JSON object, got str"),
    (b'{"text": 3}\n', r"bad\.jsonl:1: field 'text' must be a string, got int"),
    (b'{"text": ""}\n\n', r"bad\.jsonl:1: the corpus is empty"),
    (b"", r"bad\.jsonl:1: the corpus is empty"),
])
def test_bad_data_messages(corpus, tmp_path, content, message):
    _, tok = corpus
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare_dataset(Source("x", str(tmp_path / "bad.jsonl")), tok.source, tmp_path / "out", workers=1)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found \(data 'x'\)"):
        resolve_files(Source("x", str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"\*\.jsonl: the pattern matches no file"):
        resolve_files(Source("x", str(tmp_path / "*.jsonl")))
    (tmp_path / "shards").mkdir()
    with pytest.raises(DataError, match=r"shards: is a directory: name its files, e.g. with the pattern .*shards/\*"):
        resolve_files(Source("x", str(tmp_path / "shards")))
    with pytest.raises(DataError, match=r"options documents = 'sentence' is not one of paragraph, line, file"):
        resolve_files(Source("x", str(tmp_path / "*.txt"), format="text", documents="sentence"))
    with pytest.raises(DataError, match=r"unknown data format 'csv'"):
        resolve_files(Source("x", str(tmp_path / "*.csv"), format="csv"))


def test_plain_text_documents(corpus, tmp_path):
    _, tok = corpus
    (tmp_path / "t.txt").write_text("First paragraph\nstill first.\n\n\nSecond one.\n\nThird.\n")
    paragraphs = list(iter_texts([Source("t", str(tmp_path / "t.txt"), format="text")]))
    assert paragraphs == ["First paragraph\nstill first.", "Second one.", "Third."]
    lines = list(iter_texts([Source("t", str(tmp_path / "t.txt"), format="text", documents="line")]))
    assert lines == ["First paragraph", "still first.", "Second one.", "Third."]
    whole = list(iter_texts([Source("t", str(tmp_path / "t.txt"), format="text", documents="file")]))
    assert len(whole) == 1
    big = "\n\n".join(f"Paragraph {i} about cats." for i in range(500))
    (tmp_path / "big.txt").write_text(big)
    source = Source("t", str(tmp_path / "big.txt"), format="text")
    one = prepare_dataset(source, tok.source, tmp_path / "1", workers=1)
    two = prepare_dataset(source, tok.source, tmp_path / "2", workers=2, chunk_bytes=3000)
    assert one.documents == two.documents == 500
    assert filecmp.cmp(one.prefix + ".bin", two.prefix + ".bin", shallow=False)


def test_raw_formats_are_validated_record_by_record(tmp_path):
    good = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good * 3))
    assert validate_records(Source("c", str(tmp_path / "chat.jsonl"), format="chat"))["records"] == 3
    cases = {
        "chat": ({"messages": [{"role": "robot", "content": "x"}]}, r":2: messages\[0\]\.role 'robot' is not one of"),
        "preference": ({"prompt": "p", "chosen": "c"}, r":2: missing field 'rejected'"),
        "prompt_response": ({"prompt": "p", "response": None}, r":2: field 'response' must be a string, got NoneType"),
    }
    for fmt, (bad, message) in cases.items():
        ok = {"chat": good[0], "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
              "prompt_response": {"prompt": "p", "response": "r"}}[fmt]
        (tmp_path / f"{fmt}.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=message):
            validate_records(Source(fmt, str(tmp_path / f"{fmt}.jsonl"), format=fmt))
    no_assistant = {"messages": [{"role": "user", "content": "hi"}]}
    (tmp_path / "na.jsonl").write_text(json.dumps(no_assistant) + "\n")
    with pytest.raises(DataError, match=r"na\.jsonl:1: the conversation has no 'assistant' message"):
        validate_records(Source("c", str(tmp_path / "na.jsonl"), format="chat"))
    # what the DPO / SFT trainers refuse is refused here too, before any stage trains
    trainer_cases = {
        "preference": ({"prompt": "p", "chosen": "same", "rejected": "same"}, r":2: 'chosen' and 'rejected' are identical"),
        "prompt_response": ({"prompt": "p", "response": "  "}, r":2: field 'response' is empty"),
    }
    for fmt, (bad, message) in trainer_cases.items():
        ok = {"preference": {"prompt": "p", "chosen": "c", "rejected": "r"}, "prompt_response": {"prompt": "p", "response": "r"}}[fmt]
        (tmp_path / f"{fmt}.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=message + r".*\(data 'x'\)"):
            validate_records(Source("x", str(tmp_path / f"{fmt}.jsonl"), format=fmt))


def test_shipped_example_data_is_valid():
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / "examples" / "data"
    assert validate_records(Source("chat", str(data / "pipeline" / "sft.jsonl"), format="chat"))["records"] == 600
    assert validate_records(Source("p", str(data / "pipeline" / "prefs.jsonl"), format="preference"))["records"] == 400
    corpus = data / "quickstart" / "corpus.jsonl"
    assert corpus.stat().st_size < 5_000_000
    assert sum(1 for _ in iter_texts([Source("web", str(corpus))])) == 4000


def test_pool_workers_do_not_inherit_the_parents_signal_handlers(corpus, tmp_path, capfd):
    """`nemoc run` turns SIGTERM into KeyboardInterrupt; the pool's own SIGTERM at shutdown must not print
    a traceback from every worker."""
    import signal

    root, tok = corpus

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        prepare_dataset(Source("web", str(root / "a.jsonl")), tok.source, tmp_path, workers=2, chunk_bytes=4000)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "Traceback" not in capfd.readouterr().err
