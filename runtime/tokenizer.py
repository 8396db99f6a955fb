"""Tokenizers for data preparation and training, all behind one small Megatron-compatible interface.

`load_tokenizer(spec)` accepts what a data source's `tokenizer` field may name:
  * a Hugging Face `tokenizer.json` (the `tokenizers` library), or a Hugging Face checkpoint / tokenizer
    directory holding one (else its SentencePiece `tokenizer.model`),
  * a SentencePiece `*.model` (the `sentencepiece` library),
  * `tiktoken:<encoding>` (e.g. `tiktoken:cl100k_base`; tiktoken downloads its BPE file once, so offline
    it must already be in tiktoken's cache, else a clear `TokenizerError`),
and `train_byte_level_bpe(texts, vocab_size, path)` trains a byte-level BPE with `tokenizers` from the
corpus itself (so the quickstart needs nothing downloaded) and saves it as a `tokenizer.json`.

Every tokenizer object offers what Megatron-Core's datasets and the training loop read from a
`MegatronTokenizer`: `vocab_size`, `eod`, `pad` (-1 when the tokenizer has none, which Megatron-Core's
datasets treat as "no pad token"), `unique_identifiers`, `vocab`, `inv_vocab`, `tokenize(text) -> list[int]`
and `detokenize(ids) -> str`, plus `tokenize_batch`. This module imports neither torch nor Megatron-Core.
"""

from __future__ import annotations

import abc
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Names the end-of-document token has in common tokenizer.json / SentencePiece vocabularies.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<eod>", "<|im_end|>")
PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or trained; the message says which file and why."""


class NemocTokenizer(abc.ABC):
    """The shared interface (see the module docstring). Subclasses set `_eod`, `_pad`, `_ids`."""

    kind = "base"

    def __init__(self, source: str) -> None:
        self.source = source
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [source])]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    # -- Megatron-Core attribute names
    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Implemented by each tokenizer kind."""

    @property
    @abc.abstractmethod
    def vocab(self) -> dict[str, int]:
        """Implemented by each tokenizer kind."""

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Implemented by each tokenizer kind."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    @abc.abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Implemented by each tokenizer kind."""

    @property
    def special_tokens(self) -> dict[str, int]:
        """The tokenizer's special (control) tokens, text -> id: what a chat template's end-of-turn marker is
        looked up in (runtime/align/data.py `stop_ids`). Subclasses list their own."""
        return {}

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


class HFTokenizer(NemocTokenizer):
    """A `tokenizer.json` loaded with the Hugging Face `tokenizers` library."""

    kind = "huggingface"

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        super().__init__(path)
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:  # the Rust side raises a bare Exception with a JSON parse message
            raise TokenizerError(f"{path}: not a valid Hugging Face tokenizer.json ({exc})") from None
        self._eod = _first_id(self._tok.token_to_id, EOD_CANDIDATES)
        if self._eod is None:
            raise TokenizerError(f"{path}: no end-of-document token (looked for {', '.join(EOD_CANDIDATES)})")
        pad = _first_id(self._tok.token_to_id, PAD_CANDIDATES)
        self._pad = -1 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str):
        """The `tokenizers` Encoding (`ids`, character `offsets`), special tokens not added, as
        transformers' `apply_chat_template(tokenize=True)` encodes a rendered conversation."""
        return self._tok.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The added tokens marked special in tokenizer.json (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...)."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}


class SentencePieceTokenizer(NemocTokenizer):
    """A SentencePiece `*.model`."""

    kind = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        super().__init__(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{path}: not a valid SentencePiece model ({exc})") from None
        self._eod = self._sp.eos_id()
        if self._eod < 0:
            raise TokenizerError(f"{path}: the SentencePiece model has no end-of-sentence token (eos_id = -1)")
        self._pad = self._sp.pad_id()  # -1 when absent, as Megatron-Core expects

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.IdToPiece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.EncodeAsIds(list(texts))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds(list(ids))

    @property
    def special_tokens(self) -> dict[str, int]:
        """The model's control and user-defined pieces (`<s>`, `</s>`, Gemma's `<end_of_turn>`, ...), read from
        the model proto (the processor has no user-defined test)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
        kinds = (sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
                 sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
        return {p.piece: i for i, p in enumerate(proto.pieces) if p.type in kinds}


class TiktokenTokenizer(NemocTokenizer):
    """A `tiktoken.Encoding`; `eod` is its end-of-text token."""

    kind = "tiktoken"

    def __init__(self, encoding, source: str | None = None) -> None:
        super().__init__(source or f"tiktoken:{encoding.name}")
        self._enc = encoding
        self._eod = encoding.eot_token
        self._pad = -1

    @classmethod
    def from_name(cls, name: str) -> TiktokenTokenizer:
        import tiktoken

        try:
            return cls(tiktoken.get_encoding(name), source=f"tiktoken:{name}")
        except ValueError as exc:  # unknown encoding name
            raise TokenizerError(f"tiktoken:{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - network/cache failures surface as many exception types
            raise TokenizerError(
                f"tiktoken:{name}: cannot load the BPE file ({type(exc).__name__}: {exc}); tiktoken downloads it on "
                "first use, so on an offline machine put it in tiktoken's cache (TIKTOKEN_CACHE_DIR) or use a "
                "tokenizer.json / SentencePiece model instead"
            ) from None

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def vocab(self) -> dict[str, int]:
        return {self._enc.decode_single_token_bytes(i).decode("utf-8", "replace"): i for i in range(self.vocab_size)
                if self._valid(i)}

    def _valid(self, i: int) -> bool:
        try:
            self._enc.decode_single_token_bytes(i)
            return True
        except KeyError:
            return False

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t: self._enc.encode_single_token(t) for t in self._enc.special_tokens_set}


def _first_id(lookup, names: Iterable[str]) -> int | None:
    for name in names:
        token_id = lookup(name)
        if token_id is not None:
            return token_id
    return None


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(spec: str, *, root: str | os.PathLike | None = None) -> NemocTokenizer:
    """The tokenizer named by `spec` (see the module docstring); relative paths are taken from `root`."""
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer.from_name(spec.split(":", 1)[1])
    path = Path(spec) if root is None or os.path.isabs(spec) else Path(root) / spec
    if path.is_dir():  # a Hugging Face checkpoint / tokenizer directory
        found = [path / n for n in HF_TOKENIZER_FILES if (path / n).is_file()]
        if not found:
            raise TokenizerError(f"{path}: a directory without {' or '.join(HF_TOKENIZER_FILES)}")
        path = found[0]
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    if path.suffix == ".model":
        return SentencePieceTokenizer(str(path))
    if path.suffix == ".json":
        return HFTokenizer(str(path))
    raise TokenizerError(
        f"{path}: unknown tokenizer type (expected a Hugging Face tokenizer.json, a SentencePiece .model or "
        "tiktoken:<encoding>)"
    )


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> HFTokenizer:
    """Train a byte-level BPE on `texts` and save it to `path` (a tokenizer.json); returns it loaded.

    Byte-level (GPT-2 style) means every string is representable, so no text is ever lost to an
    unknown token. The 256 byte symbols and the two special tokens (end-of-document, pad) are part
    of `vocab_size`; the trainer stops earlier if the corpus has no more merges to offer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + 2
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size {vocab_size} is too small for a byte-level BPE (needs at least {minimum})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return HFTokenizer(str(path))
