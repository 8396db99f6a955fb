"""Bad data and name collisions end as a failed task with `file:line`, never a traceback or a status left
"running" (issue 16). The red-team inputs are kept under tests/runtime/faults/. Inline stage kinds stand
in for training, so no torchrun is started: fast."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_factory import make_plan, make_stage

from nemoc.compiler.graph import build_graph
from nemoc.compiler.spec import DataSpec
from nemoc.runtime.data_prep import DataError, Source, iter_texts, prepare_dataset, train_tokenizer, validate_records
from nemoc.runtime.orchestrate.executor import Executor
from nemoc.runtime.orchestrate.rundir import RunDir, read_json
from nemoc.runtime.orchestrate.tasks import TaskKind, register

FAULTS = Path(__file__).resolve().parent / "faults"


def _inline_train(ctx):
    """A stand-in training stage: a "checkpoint" directory, and the data set it was handed. Like a trainer
    that finds its final checkpoint there already, it writes only what is not there (or all with FULL)."""
    (ctx.out_dir / "ckpt").mkdir(exist_ok=True)
    if os.environ.get("FAKE_WRITE_ALL") or not (ctx.out_dir / "ckpt" / "extra.bin").exists():
        (ctx.out_dir / "ckpt" / "weights.bin").write_bytes(b"w" * 1000)
    (ctx.out_dir / "ckpt" / "extra.bin").write_bytes(b"x")
    prefix = next(rec["prefix"] for _, rec in ctx.inputs_of("dataset"))
    return {"steps": ctx.stage.steps, "checkpoint": str(ctx.out_dir / "ckpt"), "data_prefix": prefix}


def _broken_train(ctx):
    return {}["no such key"]  # a bug in a task: must end as a failed task, not a traceback


register(TaskKind(name="inlinetrain", run_inline=_inline_train), replace=True)
register(TaskKind(name="brokentrain", run_inline=_broken_train), replace=True)


def execute(plan, run_root):
    lines = []
    executor = Executor(plan, build_graph(plan), RunDir(run_root), echo=lines.append, options={"workers": 1})
    return executor.run(), lines


def bad_corpus(tmp_path: Path, name: str) -> Path:
    """A JSONL corpus with good records, then the red-team line `name` at line 3."""
    good = [json.dumps({"text": f"document {i} about cats and mats"}) for i in range(2)]
    bad = (FAULTS / name).read_bytes().rstrip(b"\n")
    path = tmp_path / name
    path.write_bytes("\n".join(good).encode() + b"\n" + bad + b"\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = out / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n" for i in range(50)))
    train_tokenizer([Source("c", str(corpus))], 300, out / "tokenizer.json")
    return str(out / "tokenizer.json")


CASES = [
    ("deep_nesting.jsonl", r"nested too deeply"),
    ("lone_surrogate.jsonl", r"lone surrogate escape \\ud800 at column 11"),
    ("lone_low_surrogate.jsonl", r"lone surrogate escape \\udc00"),
    ("huge_integer.jsonl", r"unreadable JSON value \(Exceeds the limit \(4300 digits\)"),
]


def test_red_team_lines_are_kept():
    assert (FAULTS / "deep_nesting.jsonl").stat().st_size > 100_000


@pytest.mark.parametrize("name,message", CASES)
def test_every_reader_names_file_and_line(tmp_path, tokenizer, name, message):
    path = bad_corpus(tmp_path, name)
    where = rf"^{path}:3: "
    with pytest.raises(DataError, match=where + ".*" + message):
        list(iter_texts([Source("web", str(path))]))  # tokenizer training reads this
    with pytest.raises(DataError, match=where + ".*" + message):
        prepare_dataset(Source("web", str(path)), tokenizer, tmp_path / "out", workers=1)
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(path.read_bytes().replace(b'{"text": "document', b'{"messages": [{"role": "assistant", '
                                               b'"content": "x"}], "d": "document'))
    with pytest.raises(DataError, match=rf"^{chat}:3: .*" + message):
        validate_records(Source("chat", str(chat), format="chat"))


def test_a_valid_surrogate_pair_is_text(tmp_path):
    path = tmp_path / "pair.jsonl"
    path.write_text('{"text": "smile \\ud83d\\ude00 and a literal \\\\ud800"}\n')
    assert list(iter_texts([Source("web", str(path))])) == ["smile \U0001F600 and a literal \\ud800"]


@pytest.mark.parametrize("name", ["deep_nesting.jsonl", "lone_surrogate.jsonl"])
def test_a_data_error_fails_the_task_and_status_is_true(tmp_path, name):
    shutil.copy(bad_corpus(tmp_path, name), tmp_path / "corpus.jsonl")
    plan = make_plan(tmp_path, stages=(make_stage("pretrain", "inlinetrain", steps=2),))
    outcome, lines = execute(plan, tmp_path / "run")
    assert outcome.states() == {"tokenizer:local": "failed", "prepare:web": "skipped", "train:pretrain": "skipped"}
    error = outcome.tasks[0].error
    assert error.startswith(f"{tmp_path / 'corpus.jsonl'}:3: ") and "Traceback" not in "\n".join(lines)
    status = read_json(tmp_path / "run" / "status.json")
    assert {rec["state"] for rec in status["tasks"].values()} == {"failed", "skipped"} and status["finished"]


def test_a_bug_in_a_task_fails_it_with_a_one_line_error_not_running(workspace):
    plan = make_plan(workspace, stages=(make_stage("pretrain", "brokentrain", steps=2),))
    outcome, lines = execute(plan, workspace / "run")
    assert outcome.states()["train:pretrain"] == "failed"
    error = outcome.tasks[-1].error
    assert error.startswith("internal error (KeyError): 'no such key'") and "traceback in" in error
    rd = RunDir(workspace / "run")
    assert "Traceback" in (rd.task_dir("train:pretrain") / "log.txt").read_text()
    assert read_json(rd.status_path)["tasks"]["train:pretrain"]["state"] == "failed"


def test_a_data_set_named_tokenizer_does_not_collide_with_the_tokenizer(workspace):
    data = (DataSpec(name="tokenizer", path="corpus.jsonl", format="jsonl", vocab_size=300),)
    plan = make_plan(workspace, data=data, stages=(make_stage("pretrain", "inlinetrain", data=("tokenizer",), steps=2),))
    graph = build_graph(plan)
    rd = RunDir(workspace / "run")
    dirs = [rd.task_dir(t.id) for t in graph.tasks()]
    assert len(set(dirs)) == len(dirs)
    outcome, lines = execute(plan, workspace / "run")
    assert outcome.ok, lines
    assert (rd.root / "data" / "tokenizer" / "tokenizer_text_document.idx").exists()
    outcome, lines = execute(plan, workspace / "run")
    assert set(outcome.states().values()) == {"cached"}, lines
    assert not any(".prev-" in p.name for p in rd.root.rglob("*")) and not any("moved" in line for line in lines)


def test_a_run_directory_from_before_keeps_its_trained_tokenizer(workspace):
    plan = make_plan(workspace, stages=(make_stage("pretrain", "inlinetrain", steps=2),))
    outcome, _ = execute(plan, workspace / "run")
    rd = RunDir(workspace / "run")
    (rd.root / "data").mkdir(exist_ok=True)
    shutil.move(rd.root / "tokenizers" / "local", rd.root / "data" / "tokenizer")  # the old layout
    shutil.rmtree(rd.root / "tokenizers")
    assert rd.task_dir("tokenizer:local") == rd.root / "data" / "tokenizer"
    outcome, lines = execute(plan, workspace / "run")
    assert outcome.states()["tokenizer:local"] == "cached", lines


def test_deleted_or_changed_outputs_are_not_cached(workspace, monkeypatch):
    monkeypatch.setenv("FAKE_WRITE_ALL", "1")
    plan = make_plan(workspace, stages=(make_stage("pretrain", "inlinetrain", steps=2),))
    outcome, lines = execute(plan, workspace / "run")
    assert outcome.ok, lines
    rd = RunDir(workspace / "run")
    record = read_json(rd.task_dir("prepare:web") / "DONE.json")
    assert set(record["outputs"]) == {"web_text_document.bin", "web_text_document.idx"}
    assert record["relative"]["prefix"] == "data/web/web_text_document"
    assert set(read_json(rd.task_dir("train:pretrain") / "DONE.json")["outputs"]) == {"ckpt/extra.bin", "ckpt/weights.bin"}
    bin_path = rd.task_dir("prepare:web") / "web_text_document.bin"
    original = bin_path.read_bytes()
    bin_path.unlink()
    outcome, lines = execute(plan, workspace / "run")
    assert outcome.states() == {"tokenizer:local": "cached", "prepare:web": "done", "train:pretrain": "cached"}
    assert any(f"{bin_path} is missing: running it again" in line for line in lines), lines
    assert bin_path.read_bytes() == original
    idx = rd.task_dir("prepare:web") / "web_text_document.idx"
    data = bytearray(idx.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    idx.write_bytes(bytes(data))
    weights = rd.task_dir("train:pretrain") / "ckpt" / "weights.bin"
    weights.write_bytes(b"w" * 999)
    outcome, lines = execute(plan, workspace / "run")
    assert outcome.states() == {"tokenizer:local": "cached", "prepare:web": "done", "train:pretrain": "done"}
    assert any("content digest differs" in line for line in lines) and any("size 999 bytes" in line for line in lines)
    outcome, lines = execute(plan, workspace / "run")
    assert set(outcome.states().values()) == {"cached"}, lines


def test_a_moved_run_directory_reads_its_own_files(workspace):
    plan = make_plan(workspace, stages=(make_stage("pretrain", "inlinetrain", steps=2),))
    execute(plan, workspace / "run")
    shutil.move(workspace / "run", workspace / "moved")
    rd = RunDir(workspace / "moved")
    assert rd.done_record("prepare:web")["prefix"] == str(rd.root / "data" / "web" / "web_text_document")
    assert rd.done_record("train:pretrain")["checkpoint"] == str(rd.root / "tasks" / "train_pretrain" / "ckpt")
    (rd.task_dir("train:pretrain") / "DONE.json").unlink()
    outcome, lines = execute(plan, workspace / "moved")
    assert outcome.states() == {"tokenizer:local": "cached", "prepare:web": "cached", "train:pretrain": "done"}
    assert rd.done_record("train:pretrain")["data_prefix"].startswith(str(rd.root) + "/")
    assert not (workspace / "run").exists()


def test_a_full_disk_at_the_end_of_a_task_leaves_no_task_running(workspace, monkeypatch):
    import errno

    def full(self, task_id, task_hash, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.task_dir(task_id) / "DONE.json"))

    monkeypatch.setattr(RunDir, "mark_done", full)
    plan = make_plan(workspace, stages=(make_stage("pretrain", "inlinetrain", steps=2),))
    with pytest.raises(OSError, match="No space left"):
        execute(plan, workspace / "run")
    status = read_json(workspace / "run" / "status.json")
    assert status["tasks"]["tokenizer:local"]["state"] == "failed"
    assert "No space left on device" in status["tasks"]["tokenizer:local"]["error"] and status["finished"]
    assert "running" not in {rec["state"] for rec in status["tasks"].values()}


_FRAGMENTS = st.sampled_from(['{"text": ', '"', "\\ud800", "\\udc00", "\\u0041", "[", "]", "{", "}", ",", ":",
                              "1" * 5000, "1e999", "NaN", "null", "\\", "\x00", "é", "\n", "\r", " ", "text", '"text"'])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.one_of(st.lists(_FRAGMENTS, max_size=40).map("".join).map(str.encode), st.binary(max_size=200),
                      st.integers(1, 5000).map(lambda n: b'{"text": ' + b"[" * n)))
def test_any_line_is_a_document_or_an_error_at_its_file_and_line(tmp_path, line):
    path = tmp_path / "any.jsonl"
    path.write_bytes(b'{"text": "first"}\n' + line.replace(b"\n", b" ") + b"\n")
    try:
        texts = list(iter_texts([Source("web", str(path))]))
    except DataError as exc:
        assert str(exc).startswith(f"{path}:2: ") or str(exc).startswith(f"{path}:1: the corpus"), str(exc)
        return
    for text in texts:
        text.encode("utf-8")  # every text the tokenizer gets is valid Unicode


def test_a_rerun_that_does_not_write_the_missing_output_again_is_not_done(workspace):
    """A task re-run for a missing output that it then does not write (a trainer that takes its final
    checkpoint for existing) must not be recorded done with the hole in it."""
    plan = make_plan(workspace, stages=(make_stage("pretrain", "inlinetrain", steps=2),))
    execute(plan, workspace / "run")
    rd = RunDir(workspace / "run")
    weights = rd.task_dir("train:pretrain") / "ckpt" / "weights.bin"
    weights.unlink()
    outcome, lines = execute(plan, workspace / "run")
    assert outcome.states()["train:pretrain"] == "failed"
    assert f"because {weights} was missing, but finished without writing it again" in outcome.tasks[-1].error
    assert not rd.is_done("train:pretrain", outcome.tasks[-1].hash)
