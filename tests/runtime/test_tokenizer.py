"""runtime/tokenizer.py: every tokenizer family behind one interface, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nemoc.runtime.tokenizer import (
    EOD_TOKEN,
    PAD_TOKEN,
    HFTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    load_tokenizer,
    train_byte_level_bpe,
)

TEXTS = [f"The {c} cat number {i} sat on the {m} mat." for i in range(300)
         for c, m in [("red", "blue"), ("green", "small")]]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_byte_level_bpe(TEXTS, 400, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_local_byte_level_bpe_round_trips_and_has_special_tokens(bpe):
    assert bpe.eod == bpe.vocab[EOD_TOKEN] and bpe.pad != bpe.eod and bpe.pad >= 0
    assert 258 < bpe.vocab_size <= 400
    text = "The red cat sat. Ünïcödé and emoji 🙂 survive byte-level BPE."
    ids = bpe.tokenize(text)
    assert bpe.detokenize(ids) == text
    assert bpe.tokenize_batch([text, "x"]) == [ids, bpe.tokenize("x")]
    assert len(bpe.tokenize(TEXTS[0])) < len(TEXTS[0].encode()) / 2  # it learned merges from the corpus
    assert bpe.unique_identifiers["class"] == "HFTokenizer" and bpe.inv_vocab[bpe.eod] == EOD_TOKEN
    assert bpe.special_tokens == {EOD_TOKEN: bpe.eod, PAD_TOKEN: bpe.pad}  # what end-of-turn tokens are sought in


def test_load_tokenizer_json_by_path(bpe, tmp_path):
    again = load_tokenizer(bpe.source)
    assert isinstance(again, HFTokenizer) and again.tokenize("red cat") == bpe.tokenize("red cat")
    relative = load_tokenizer("tokenizer.json", root=bpe.source.rsplit("/", 1)[0])
    assert relative.vocab_size == bpe.vocab_size


def test_vocab_too_small_is_rejected(tmp_path):
    with pytest.raises(TokenizerError, match="too small"):
        train_byte_level_bpe(TEXTS, 100, tmp_path / "t.json")


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", pad_id=3, minloglevel=2, user_defined_symbols=["<end_of_turn>"])
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.kind == "sentencepiece" and tok.vocab_size == 60 and tok.eod == 2 and tok.pad == 3
    assert tok.detokenize(tok.tokenize("The red cat sat.")) == "The red cat sat."
    # control and user-defined pieces (a Gemma-style end-of-turn marker), not <unk>
    assert tok.special_tokens == {"<s>": 1, "</s>": 2, "<pad>": 3, "<end_of_turn>": 4}


def test_tiktoken_with_a_locally_built_encoding():
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"th"] = 256
    enc = tiktoken.Encoding(name="tiny", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 257})
    tok = TiktokenTokenizer(enc)
    assert tok.vocab_size == 258 and tok.eod == 257 and tok.pad == -1
    ids = tok.tokenize("the cat")
    assert ids[0] == 256 and tok.detokenize(ids) == "the cat"
    assert tok.special_tokens == {"<|endoftext|>": 257}


def test_tiktoken_unavailable_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: it would have to download
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and the download cannot succeed
    with pytest.raises(TokenizerError, match=r"tiktoken:cl100k_base: cannot load the BPE file"):
        load_tokenizer("tiktoken:cl100k_base")
    with pytest.raises(TokenizerError, match="tiktoken:nonsense"):
        load_tokenizer("tiktoken:nonsense")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))


def test_tokenizer_without_an_end_of_document_token(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(TokenizerError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path / "t.json"))


def test_module_imports_neither_torch_nor_megatron():
    code = "import sys, nemoc.runtime.tokenizer; sys.exit('torch' in sys.modules or 'megatron' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
