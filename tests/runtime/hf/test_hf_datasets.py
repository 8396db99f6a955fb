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


def test_materialize_writes_the_split_renamed_in_a_seeded_random_order(tmp_path):
    hf = pytest.importorskip("datasets")
    rows = [{"instruction": f"q{i}", "output": "a" * i} for i in range(40)]  # length grows with i
    hf.DatasetDict({"train": hf.Dataset.from_list(rows), "test": hf.Dataset.from_list(rows[:3])}).save_to_disk(
        str(tmp_path / "ds"))
    n = datasets.materialize(tmp_path / "ds", tmp_path / "a.jsonl", split="train", columns=COLUMNS, seed=7)
    again = datasets.materialize(tmp_path / "ds", tmp_path / "b.jsonl", split="train", columns=COLUMNS, seed=7)
    out = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert n == again == 40 and (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    expected = [{"prompt": r["instruction"], "response": r["output"]} for r in rows]
    assert sorted(out, key=lambda r: r["prompt"]) == sorted(expected, key=lambda r: r["prompt"])
    assert out == [expected[i] for i in datasets.shuffled_order(40, 7)] and out != expected  # not file order
    assert not list(tmp_path.glob("*.ordered")) and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(datasets.DatasetError, match="no split 'validation' .splits: train, test"):
        datasets.materialize(tmp_path / "ds", tmp_path / "c.jsonl", split="validation")


EXPERIMENT = """experiment ft {{
  cluster {{
    gpu = CPU
    gpus_per_node = 1
  }}
  model tiny {{
    init = hf("ckpt")
  }}
  precision = fp32
  data alpaca {{
    path = "ds"
    format = prompt_response
{fields}
    tokenizer = "tok"
  }}
  stage sft {{
    data = [alpaca]
    steps = 2
    global_batch = 2
  }}
}}
"""


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}


def _check(tmp_path, fields: str):
    from nemoc.compiler.lower import compile_file
    from nemoc.dsl.diagnostics import Severity

    hf = pytest.importorskip("datasets")
    if not (tmp_path / "ds").exists():
        hf.DatasetDict({"train": hf.Dataset.from_list(ROWS), "test": hf.Dataset.from_list(ROWS[:2])}).save_to_disk(
            str(tmp_path / "ds"))
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(LLAMA))
    text = EXPERIMENT.format(fields=fields)
    (tmp_path / "ft.nemo").write_text(text)
    spec, diags, _ = compile_file(str(tmp_path / "ft.nemo"))
    errors = [d for d in diags if d.severity == Severity.ERROR]
    return spec, errors, text.splitlines()


def test_a_hf_dataset_with_split_and_columns_checks_and_reaches_the_graph(tmp_path):
    from nemoc.compiler.graph import build_graph
    from nemoc.compiler.planner import plan_experiment

    spec, errors, _ = _check(tmp_path, '    hf_split = "test"\n    columns = ["instruction:prompt", "output:response"]')
    assert errors == []
    assert spec.data[0].hf_split == "test" and spec.data[0].columns == (("instruction", "prompt"), ("output", "response"))
    graph = build_graph(plan_experiment(spec).plan, root=str(tmp_path))
    task = graph.task("prepare:alpaca")
    assert task.settings["hf"] == {"split": "test", "columns": [["instruction", "prompt"], ["output", "response"]]}
    _, errors, _ = _check(tmp_path, '    hf_split = "train"\n    columns = ["instruction:prompt", "output:response"]')
    assert graph.task("prepare:alpaca").hash != build_graph(plan_experiment(_check(
        tmp_path, '    hf_split = "train"\n    columns = ["instruction:prompt", "output:response"]')[0]).plan,
        root=str(tmp_path)).task("prepare:alpaca").hash  # the split is part of the content


@pytest.mark.parametrize("fields,line,message", [
    ('    hf_split = "validation"\n    columns = ["instruction:prompt", "output:response"]', "hf_split",
     r"no split 'validation' \(splits: train, test\)"),
    ('    hf_split = "train"', "format", r"needs columns prompt, response; the dataset has instruction, output"),
    ('    columns = ["instruction:prompt"]', "columns", r"needs column response"),
    ('    columns = ["question:prompt", "output:response"]', "columns", r"no column 'question' to rename"),
    ('    columns = ["instruction=prompt"]', "columns", r"not `source:target`"),
])
def test_dataset_errors_are_at_the_users_line(tmp_path, fields, line, message):
    import re

    _, errors, lines = _check(tmp_path, fields)
    assert [e.code for e in errors] == ["E048"], errors
    assert re.search(message, errors[0].message), errors[0].message
    assert lines[errors[0].span.line - 1].strip().startswith(line)
