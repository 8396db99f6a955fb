"""A Qwen3-MoE Hugging Face checkpoint that does not match its config.json, or whose files are damaged: the
import is a ConversionError naming the file or tensor (the `hf_import` task reports it as a one-line
failure), never a safetensors exception escaping `nemoc run` and never a silent conversion. Before: a
truncated, empty or non-safetensors file raised SafetensorError; a transposed or narrower expert matrix, an
int32 tensor, or config.json claiming wider experts was converted without a word; a corrupt index.json
raised JSONDecodeError."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import make_hf_model
from nemoc.runtime.hf import convert

EXPERT = "model.layers.0.mlp.experts.0.down_proj.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3m") / "hf"
    make_hf_model("qwen3_moe", d)
    return d


def _tensors(d):
    return load_file(str(d / "model.safetensors"))


def _save(d, tensors):
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _config(d, **change):
    c = json.loads((d / "config.json").read_text())
    c.update({k: v(c) for k, v in change.items()})
    (d / "config.json").write_text(json.dumps(c))


CASES = {
    "narrower_expert": (lambda d: _save(d, _tensors(d) | {EXPERT: _tensors(d)[EXPERT][:, :-1].contiguous()}),
                        f"tensor '{EXPERT}' has shape (64, 47), but config.json (qwen3_moe) makes it (64, 48)"),
    "transposed_expert": (lambda d: _save(d, _tensors(d) | {EXPERT: _tensors(d)[EXPERT].t().contiguous()}),
                          f"tensor '{EXPERT}' has shape (48, 64)"),
    "int_tensor": (lambda d: _save(d, _tensors(d) | {EXPERT: _tensors(d)[EXPERT].to(torch.int32)}),
                   "has dtype torch.int32, not a floating-point type"),
    "config_wider_experts": (lambda d: _config(d, moe_intermediate_size=lambda c: c["moe_intermediate_size"] + 8),
                             "makes it (56, 64)"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                  "not a readable safetensors file, truncated or corrupt"),
    "empty": (lambda d: (d / "model.safetensors").write_bytes(b""), "not a readable safetensors file"),
    "corrupt_index": (lambda d: (d / convert.INDEX).write_text("{not json"), "not a safetensors index"),
    # a weight_map whose values are not file names (review finding: a TypeError traceback from `directory / 5`)
    "non_string_file": (lambda d: (d / convert.INDEX).write_text(
        '{"weight_map": {"model.embed_tokens.weight": 5}}'), "not a safetensors index"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_or_mismatched_checkpoint_is_a_conversion_error(source, tmp_path, case):
    damaged = tmp_path / "hf"
    shutil.copytree(source, damaged)
    mutate, message = CASES[case]
    mutate(damaged)
    with pytest.raises(convert.ConversionError) as err:
        convert.import_checkpoint(damaged, tmp_path / "converted")
    assert message in str(err.value), str(err.value)


def test_the_undamaged_checkpoint_converts(source, tmp_path):
    manifest = convert.import_checkpoint(source, tmp_path / "converted")
    assert manifest["family"] == "qwen3_moe" and manifest["architecture"]["experts"] == 4
