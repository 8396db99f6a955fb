"""Local Hugging Face datasets (save_to_disk folders, parquet, arrow, JSONL) with a split and a column
mapping; a tokenized cache built once; a shuffled order."""

from __future__ import annotations

import json

import pytest

pa = pytest.importorskip("pyarrow")

from nemoc.runtime.hf import chat, datasets  # noqa: E402

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
COLUMNS = {"instruction": "prompt", "output": "response"}


def _arrow_stream(path, rows):
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _save_to_disk_layout(root):
    """The layout `DatasetDict.save_to_disk` writes: dataset_dict.json, then per split state.json + arrow."""
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for split, rows in (("train", ROWS), ("test", ROWS[:2])):
        (root / split).mkdir()
        _arrow_stream(root / split / "data-00000-of-00001.arrow", rows)
        (root / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))


def test_every_layout_reads_the_same_records(tmp_path):
    import pyarrow.parquet as pq

    _save_to_disk_layout(tmp_path / "disk")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "pq" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), tmp_path / "pq" / "test-00000-of-00001.parquet")
    _arrow_stream(tmp_path / "one.arrow", ROWS)
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    want = [{"prompt": r["instruction"], "response": r["output"]} for r in ROWS]
    for path, split in ((tmp_path / "disk", "train"), (tmp_path / "pq", "train"), (tmp_path / "one.arrow", None),
                        (tmp_path / "one.jsonl", None)):
        assert list(datasets.read_records(path, split=split, columns=COLUMNS)) == want, path
    assert len(list(datasets.read_records(tmp_path / "disk", split="test"))) == 2
    assert len(list(datasets.read_records(tmp_path / "pq", split="test"))) == 2


def test_an_unknown_split_names_the_splits(tmp_path):
    _save_to_disk_layout(tmp_path / "disk")
    with pytest.raises(datasets.DatasetError, match="no split 'validation' \\(splits: train, test\\)"):
        list(datasets.read_records(tmp_path / "disk", split="validation"))


def test_tokenized_once_and_shuffled(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    template = chat.ChatTemplate.load("chatml")
    text = template.render(chat.to_messages(ROWS[0], columns=COLUMNS))
    chars = sorted(set(text) | set("0123456789qa"))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    calls = []

    def build():
        calls.append(1)
        for r in datasets.read_records(tmp_path / "d.jsonl", columns=COLUMNS):
            ids, mask = template.tokenize(chat.to_messages(r), tok.encode)
            yield {"ids": ids, "mask": mask}

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    first = datasets.tokenized_cache(tmp_path / "cache", "k1", build)
    second = datasets.tokenized_cache(tmp_path / "cache", "k1", build)  # another rank: reads the cache
    assert first == second and len(first) == 5 and calls == [1]
    assert all(sum(s["mask"]) == len("a0<|im_end|>\n") for s in first)
    order = datasets.shuffled_order(100, seed=1)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert order == datasets.shuffled_order(100, seed=1)
