"""No input, however malformed, escapes as anything but diagnostics: random bytes, random text,
mutated examples (token deletions, insertions, swaps), huge and deeply nested files, bad paths."""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lang_helpers import EXAMPLES

from nemoc.compiler.lower import compile_file
from nemoc.dsl.diagnostics import DiagnosticError, render_all
from nemoc.dsl.format import format_module
from nemoc.dsl.parser import _scan, parse

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = ["{", "}", "[", "]", "(", ")", "=", ",", "+", "-", "*", "/", "after", "import", "auto", "true", "stage",
         "model", "cluster", "parallel", "data", "experiment", "x", "8", "1.2T", "80GiB", '"s"', '"', "#", "\n",
         "\x00", "\xff", "é", "llama3_8b", "H100", "kind", "pretrain", "sft", "1e99999999", "9" * 40, "1e-30"]


def compile_text(data: bytes | str, sets: tuple[str, ...] = ()):
    """compile_file on a temporary file; asserts it returns (never raises) and renders cleanly."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(EXAMPLES[0].parent / "common", os.path.join(tmp, "common"))  # so imports resolve
        shutil.copytree(EXAMPLES[0].parent / "checkpoints", os.path.join(tmp, "checkpoints"))  # init = hf(...)
        path = os.path.join(tmp, "fuzz.nemo")
        with open(path, "wb") as fh:
            fh.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        spec, diags, sources = compile_file(path, sets)
        render_all(diags, sources)  # the renderer must cope with every span it is given
        assert spec is not None or any(d.is_error for d in diags)
        return spec, diags


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes(data):
    compile_text(data)


@SETTINGS
@given(st.text(max_size=300))
def test_random_text(text):
    compile_text(text.encode("utf-8", "replace"))


def _tokens(path) -> list[str]:
    return [t.text for t in _scan(path.read_text())]


EXAMPLE_TOKENS = [_tokens(p) for p in EXAMPLES]


@st.composite
def mutated_examples(draw) -> str:
    tokens = list(draw(st.sampled_from(EXAMPLE_TOKENS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "insert", "swap", "duplicate"]))
        i = draw(st.integers(0, len(tokens) - 1))
        if op == "delete":
            del tokens[i]
        elif op == "insert":
            tokens.insert(i, draw(st.sampled_from(VOCAB)))
        elif op == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        else:
            tokens.insert(i, tokens[i])
    return " ".join(tokens)


@SETTINGS
@given(mutated_examples())
def test_mutated_examples(text):
    compile_text(text)
    try:
        module = parse(text, "m.nemo")
    except DiagnosticError:
        return
    out = format_module(module, text)  # whatever parses also formats, and round-trips
    assert parse(out, "m.nemo") == module and format_module(parse(out, "m.nemo"), out) == out


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=3))
def test_random_overrides(sets):
    compile_text((EXAMPLES[0].parent / "quickstart.nemo").read_text(), tuple(sets))


@SETTINGS
@given(st.sampled_from(["parallel.tensor", "model.layers", "stage.pretrain.steps", "cluster.nodes", "precision",
                        "stage.pretrain.checkpoint.every", "data.corpus.path", "stage.pretrain.optimizer"]),
       st.sampled_from(VOCAB + ["4", "auto", "adam(lr = 1e-3)", "[1, 2]", "3GiB", "fp8", "2 * 4"]))
def test_overrides_with_known_paths(key, value):
    compile_text((EXAMPLES[0].parent / "quickstart.nemo").read_text(), (f"{key}={value}",))


def test_unmutated_examples_compile():
    """The mutation baseline: every example, re-joined from its tokens, still compiles."""
    for path, tokens in zip(EXAMPLES, EXAMPLE_TOKENS):
        if path.parent.name == "examples":
            spec, diags = compile_text(" ".join(tokens))
            assert spec is not None, (path, diags)


def test_ten_megabytes():
    _spec, diags = compile_text(b"experiment x { " + b"a = 1 " * 1_800_000 + b"}")
    assert [d.code for d in diags] == ["E003"]


def test_ten_thousand_levels_of_nesting():
    for text in ("experiment x { " + "b { " * 10_000 + "}" * 10_001,
                 "experiment x { a = " + "(" * 10_000 + "1" + ")" * 10_000 + " }",
                 "experiment x { a = " + "-" * 10_000 + "1 }"):
        _spec, diags = compile_text(text)
        assert diags and all(d.is_error for d in diags)


def test_invalid_utf8_is_reported_with_its_position():
    _spec, diags = compile_text(b"experiment x {\n  a = \"\xff\"\n}\n")
    (d,) = diags
    assert d.code == "E002" and (d.span.line, d.span.col) == (2, 8)


def test_directory_and_missing_file():
    with tempfile.TemporaryDirectory() as tmp:
        assert [d.code for d in compile_file(tmp)[1]] == ["E001"]
        assert [d.code for d in compile_file(os.path.join(tmp, "nope.nemo"))[1]] == ["E001"]


def _schema_paths() -> list[str]:
    from nemoc.dsl.schema import BLOCKS, STAGE_PARAMS

    paths = [f.name for f in BLOCKS["experiment"].fields]
    paths += [f"{kind}.{f.name}" for kind in ("cluster", "model", "parallel") for f in BLOCKS[kind].fields]
    paths += [f"data.corpus.{f.name}" for f in BLOCKS["data"].fields]
    paths += [f"stage.pretrain.{f.name}" for f in BLOCKS["stage"].fields]
    paths += [f"stage.pretrain.{f.name}" for params in STAGE_PARAMS.values() for f in params]
    paths += [f"stage.pretrain.checkpoint.{f.name}" for f in BLOCKS["checkpoint"].fields]
    paths += [f"stage.pretrain.parallel.{f.name}" for f in BLOCKS["parallel"].fields]
    return paths


VALUES = ["4", "0", "-1", "1.5", "4GiB", "1h", "90%", "1.2T", "auto", "true", '"s"', "corpus", "[corpus]", "[]",
          "[1, 2, 3]", "[0.5, 0.5, 0]", "adam(lr = 1)", "lora(rank = 2)", "slurm(time = 1h)", "none", "local",
          "bf16", "gelu", "pretrain", "dpo", "2 * 4", "1 / 3", "H100", "ipo", "huggingface", "[qkv]"]


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(_schema_paths()), st.sampled_from(VALUES)), min_size=1, max_size=4))
def test_every_field_with_every_kind_of_value(pairs):
    """Each schema field set to each kind of value (via --set): a spec or diagnostics, never a crash."""
    compile_text((EXAMPLES[0].parent / "quickstart.nemo").read_text(), tuple(f"{k}={v}" for k, v in pairs))
