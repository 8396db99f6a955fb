"""A huge single-line document (issue 16: 50 MB took 11 minutes and 2.8 GB to train a tokenizer on,
ignoring Ctrl-C, and 9.2 GB to prepare): long documents are tokenized in pieces with the very same ids,
written as they come; tokenizer training runs in a child process that Ctrl-C, SIGTERM and the
launcher's death stop. Time and memory are measured by bench/bench_data_prep.py --big-doc-mb."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemoc.runtime import data_prep
from nemoc.runtime.data_prep import DataError, Source, prepare_dataset, text_pieces, train_tokenizer
from nemoc.runtime.tokenizer import load_tokenizer

WORDS = ["cat", "mat", "sat", "the", "on", "a", "zebra", "ünïcode", "日本語", "42", "3.14", "!!", "--", "\t", "\n", "  "]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice([" ", " ", "", "  ", "\n", ". "]) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = out / "c.jsonl"
    rng = random.Random(1)
    corpus.write_text("".join(json.dumps({"text": random_text(rng, 200)}) + "\n" for _ in range(100)))
    return train_tokenizer([Source("c", str(corpus))], 400, out / "tokenizer.json")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), piece=st.integers(1, 40), words=st.integers(0, 300))
def test_pieces_tokenize_to_the_same_ids_as_the_whole(tokenizer, seed, piece, words):
    text = random_text(random.Random(seed), words)
    pieces = list(text_pieces(text, piece))
    assert "".join(pieces) == text
    assert all(len(p) >= piece for p in pieces[:-1])  # only the last piece may be short
    assert [i for p in pieces for i in tokenizer.tokenize(p)] == tokenizer.tokenize(text)


def test_a_long_document_prepares_to_the_same_bytes_in_pieces(tmp_path, tokenizer, monkeypatch):
    rng = random.Random(7)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "short one"}) + "\n" + json.dumps({"text": random_text(rng, 20000)}) + "\n"
                      + json.dumps({"text": "after it"}) + "\n")
    whole = prepare_dataset(Source("web", str(corpus)), tokenizer.source, tmp_path / "whole", workers=1)
    monkeypatch.setattr(data_prep, "PIECE_CHARS", 500)
    pieces = prepare_dataset(Source("web", str(corpus)), tokenizer.source, tmp_path / "pieces", workers=1)
    assert (whole.documents, whole.tokens) == (pieces.documents, pieces.tokens) == (3, whole.tokens)
    for ext in (".bin", ".idx"):
        assert Path(whole.prefix + ext).read_bytes() == Path(pieces.prefix + ext).read_bytes()


def test_training_in_a_worker_gives_the_same_tokenizer_and_reports_data_errors(tmp_path):
    corpus = tmp_path / "c.jsonl"
    rng = random.Random(3)
    corpus.write_text("".join(json.dumps({"text": random_text(rng, 100)}) + "\n" for _ in range(50)))
    seen = []
    here = train_tokenizer([Source("c", str(corpus))], 300, tmp_path / "here.json")
    there = train_tokenizer([Source("c", str(corpus))], 300, tmp_path / "there.json", in_worker=True,
                            progress=lambda done, total: seen.append((done, total)))
    assert (tmp_path / "here.json").read_bytes() == (tmp_path / "there.json").read_bytes()
    assert there.vocab_size == here.vocab_size and seen[-1] == (corpus.stat().st_size,) * 2
    with open(corpus, "a") as f:
        f.write('{"text": "\\ud800"}\n')
    with pytest.raises(DataError, match=rf"^{corpus}:51: lone surrogate"):
        train_tokenizer([Source("c", str(corpus))], 300, tmp_path / "bad.json", in_worker=True)


# the launcher's side: train a tokenizer in a worker on a large corpus, say "worker PID" once it runs
TRAINER = r"""
import sys, time, multiprocessing
from nemoc.runtime.data_prep import Source, train_tokenizer
def progress(done, total):
    children = multiprocessing.active_children()
    if children and not progress.said:
        print("worker", children[0].pid, flush=True)
        progress.said = True
progress.said = False
if __name__ == "__main__":
    try:
        train_tokenizer([Source("big", sys.argv[1])], 4096, sys.argv[2], in_worker=True, progress=progress)
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_tokenizer_training_stops_with_its_launcher(tmp_path, sig):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    corpus = tmp_path / "big.jsonl"
    corpus.write_text(json.dumps({"text": " ".join(rng.choice(words) for _ in range(4_000_000))}) + "\n")  # ~25 MB
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(corpus), str(tmp_path / "tok.json")],
                            stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().split()
        assert first[0] == "worker", first
        worker = int(first[1])
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        if sig == signal.SIGINT:
            assert out.strip() == "interrupted"
        deadline = time.monotonic() + 30
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker), "the tokenizer worker outlived its launcher"
        assert not (tmp_path / "tok.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
