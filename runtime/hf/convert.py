"""Streamed conversion: Hugging Face safetensors <-> Megatron-Core GPTModel tensors.

Input:  a Hugging Face checkpoint directory (config.json, model.safetensors or sharded
        model-0000i-of-0000n.safetensors + model.safetensors.index.json).
Output: `import_checkpoint` writes a *converted directory*: the full (TP=1, PP=1, unpadded vocabulary)
        Megatron-Core tensors as safetensors shards (one per decoder layer, plus one for the
        embeddings / final norm / output layer), `model.safetensors.index.json`, and `nemoc_hf.json`
        (family, architecture, the source directory and its config.json; the graph task content-hashes
        the source). `rank_state_dict` reads from it
        exactly the slices one TP/PP rank's GPTModel chunk holds (vocabulary padded for that TP), so any
        layout loads the same conversion. `export_checkpoint` streams Megatron tensors (from a converted
        directory or an in-memory state dict) back to sharded Hugging Face safetensors in a chosen dtype.
Invariants: tensors are read one at a time with safetensors' `safe_open` (memory-mapped; one decoder
        layer's tensors are resident at a time per worker), never the whole model; export writes each
        tensor to disk as it is produced (`ShardWriter`), so its host memory is one tensor, not one
        shard; every output file is written to a temporary name and renamed (nemoc.runtime.atomic);
        HF -> converted -> HF is
        bit-identical (the transforms are permutations, concatenations and transposes in the stored dtype).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from nemoc.compiler.hfconfig import LLAMA_LIKE, HfArchitecture, architecture, read_config
from nemoc.runtime.atomic import atomic_write_bytes, atomic_write_json, replace_durably
from nemoc.runtime.hf import mapping

INDEX = "model.safetensors.index.json"
MANIFEST = "nemoc_hf.json"
# Files export copies from the source checkpoint / tokenizer directory when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


class ConversionError(RuntimeError):
    """A checkpoint that cannot be converted; the message names the file or tensor."""


class SafetensorsReader:
    """`get(name)` over a single-file or sharded safetensors checkpoint, one tensor at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ConversionError(f"{index}: not a safetensors index (a JSON object with a `weight_map` "
                                      "of tensor name -> file)") from None
        elif (self.directory / "model.safetensors").is_file():
            with _open_safetensors(self.directory / "model.safetensors") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConversionError(f"{self.directory}: no model.safetensors and no {INDEX}")
        self.weight_map: dict[str, str] = weight_map
        self._open: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(name)
        if file not in self._open:
            path = self.directory / file
            if not path.is_file():
                raise ConversionError(f"{path}: listed in {INDEX} but missing")
            self._open[file] = _open_safetensors(path)
        try:
            return self._open[file].get_tensor(name)
        except SafetensorError as exc:  # a header that lists bytes the file does not hold
            raise ConversionError(f"{self.directory / file}: tensor {name!r} cannot be read ({exc})") from None


def _open_safetensors(path: Path):
    """safe_open, or ConversionError naming the file when it is truncated or not safetensors at all (before,
    safetensors' own SafetensorError escaped `nemoc run` as a traceback)."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as exc:
        raise ConversionError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None


class MissingTensor(ConversionError, KeyError):
    """A tensor the checkpoint lacks: a ConversionError for the user, a KeyError for mapping's `_pick`
    (which tries the local spec's norm names, then Transformer Engine's fused ones)."""

    __str__ = ConversionError.__str__


def _strict(get: Callable[[str], torch.Tensor], where: str, arch: Mapping[str, Any] | None = None,
            family: str | None = None) -> Callable[[str], torch.Tensor]:
    def checked(name: str) -> torch.Tensor:
        try:
            tensor = get(name)
        except KeyError:
            raise MissingTensor(f"{where}: checkpoint has no tensor {name!r}") from None
        if arch is not None:
            _check_tensor(name, tensor, arch, family, where)
        return tensor
    return checked


def _check_tensor(name: str, tensor: torch.Tensor, arch: Mapping[str, Any], family: str | None, where: str) -> None:
    """A source tensor of the wrong dtype class or shape for config.json is a ConversionError naming both (before,
    a transposed or narrower expert matrix was converted silently and failed, or worse, loaded, later)."""
    if not tensor.is_floating_point():
        raise ConversionError(f"{where}: tensor {name!r} has dtype {tensor.dtype}, not a floating-point type")
    want = expected_shape(name, arch, family)
    if want is not None and tuple(tensor.shape) != want:
        raise ConversionError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, but config.json "
                              f"({family}) makes it {want}")


def expected_shape(name: str, arch: Mapping[str, Any], family: str | None) -> tuple[int, ...] | None:
    """The shape transformers' modules give `name` in a llama-like checkpoint (LlamaForCausalLM and the
    families built like it, Mixtral's and Qwen3-MoE's experts included); None for names not checked."""
    if family not in LLAMA_LIKE:
        return None
    h, heads, groups = arch["hidden"], arch["heads"], arch["query_groups"]
    hd = arch.get("kv_channels") or h // heads
    ffn, moe_ffn = arch["ffn_hidden"], arch.get("moe_ffn_hidden") or arch["ffn_hidden"]
    tail = name.split(".self_attn.")[-1] if ".self_attn." in name else None
    shapes = {"q_proj.weight": (heads * hd, h), "k_proj.weight": (groups * hd, h), "v_proj.weight": (groups * hd, h),
              "o_proj.weight": (h, heads * hd), "q_proj.bias": (heads * hd,), "k_proj.bias": (groups * hd,),
              "v_proj.bias": (groups * hd,), "q_norm.weight": (hd,), "k_norm.weight": (hd,)}
    if tail is not None:
        return shapes.get(tail)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (arch["vocab"], h)
    if name == "model.norm.weight" or name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
        return (h,)
    if ".experts." in name:  # Qwen3-MoE gate/up/down_proj, Mixtral w1/w3 (in) and w2 (out)
        return (h, moe_ffn) if name.endswith(("down_proj.weight", ".w2.weight")) else (moe_ffn, h)
    if name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight")):
        return (arch["experts"], h)
    if ".mlp." in name:
        return (h, ffn) if name.endswith("down_proj.weight") else (ffn, h)
    return None


def _write_shard(path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    data = {name: t.contiguous() for name, t in tensors}
    atomic_write_bytes(path, st_save(data, metadata={"format": "pt"}))
    return {name: t.numel() * t.element_size() for name, t in data.items()}


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class ShardWriter:
    """A safetensors file written one tensor at a time (the format: an 8-byte little-endian header length,
    the JSON header of names, dtypes, shapes and data offsets, then the tensors' bytes back to back).

    The header needs every tensor, so the bytes go to `<path>.data` as they arrive; `close` writes the
    header to `<path>.tmp`, appends the data file in 16 MiB blocks and renames it over `path`. The host
    never holds more than the tensor being added (the disk holds the shard twice, briefly)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.size = 0
        self._data = open(self.path.with_name(self.path.name + ".data"), "wb")

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ConversionError(f"{name}: dtype {t.dtype} has no safetensors code")
        nbytes = t.numel() * t.element_size()
        self.header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.size, self.size + nbytes]}
        if nbytes:
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.size += nbytes

    def close(self) -> None:
        self._data.close()
        data_path = self._data.name
        head = json.dumps(self.header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes with trailing spaces
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f, open(data_path, "rb") as data:
                f.write(len(head).to_bytes(8, "little"))
                f.write(head)
                shutil.copyfileobj(data, f, 16 << 20)
                f.flush()
                os.fsync(f.fileno())
            replace_durably(tmp, self.path)
        finally:
            for leftover in (tmp, data_path):
                if os.path.exists(leftover):
                    os.remove(leftover)


def _convert_layers(src: str, family: str, arch: dict, layers: list[int], out: str) -> dict[str, dict[str, int]]:
    """A worker: each layer of `layers` -> its own shard `layer-NNNNN.safetensors` under `out`, so one
    layer's tensors are resident at a time (returns file -> tensor name -> bytes)."""
    torch.set_num_threads(1)
    get = _strict(SafetensorsReader(src).get, src, arch, family)
    return {f"layer-{i:05d}.safetensors": _write_shard(Path(out) / f"layer-{i:05d}.safetensors",
                                                       mapping.hf_to_mcore_layer(family, i, arch, get))
            for i in layers}


def _ranges(n: int, parts: int) -> list[list[int]]:
    parts = max(1, min(parts, n))
    return [list(range(n))[k::parts] for k in range(parts)] if n else []


def import_checkpoint(src: str | Path, out: str | Path, *, workers: int = 1) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint directory into a converted directory (see module doc).

    Returns the manifest. `workers` processes convert disjoint layer sets in parallel.
    """
    src, out = Path(src), Path(out)
    config = read_config(src)
    arch = architecture(config)
    out.mkdir(parents=True, exist_ok=True)
    layer_sets = [sorted(s) for s in _ranges(arch.fields["layers"], workers)]
    sizes: dict[str, tuple[str, int]] = {}
    results: dict[str, dict[str, int]] = {}
    if workers > 1 and len(layer_sets) > 1:
        with ProcessPoolExecutor(len(layer_sets), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_convert_layers, str(src), arch.family, arch.fields, layers, str(out))
                       for layers in layer_sets]
            for f in futures:
                results.update(f.result())
    else:
        for layers in layer_sets:
            results.update(_convert_layers(str(src), arch.family, arch.fields, layers, str(out)))
    get = _strict(SafetensorsReader(src).get, str(src), arch.fields, arch.family)
    results["edges.safetensors"] = _write_shard(out / "edges.safetensors",
                                                mapping.hf_to_mcore_edges(arch.family, arch.fields, get))
    mtp = hf_mtp_depths(SafetensorsReader(src), arch.family, config, arch.fields["layers"])
    for depth in range(mtp):
        results[f"mtp-{depth:05d}.safetensors"] = _write_shard(out / f"mtp-{depth:05d}.safetensors",
                                                              mapping.hf_to_mcore_mtp(depth, arch.fields, get))
    for file, names in results.items():
        for name, size in names.items():
            sizes[name] = (file, size)
    atomic_write_json(out / INDEX, {"metadata": {"total_size": sum(s for _, s in sizes.values())},
                                    "weight_map": {k: f for k, (f, _) in sorted(sizes.items())}})
    manifest = {"family": arch.family, "architecture": arch.fields, "special_ids": arch.special_ids,
                "dtype": arch.dtype, "source": str(src), "config": config, "mtp_num_layers": mtp}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def hf_mtp_depths(reader, family: str, config: Mapping[str, Any], layers: int) -> int:
    """The multi-token prediction depths a DeepSeek-V3 checkpoint holds: config.json's `num_nextn_predict_layers`
    whose weights are there (`model.layers.{num_hidden_layers + i}.eh_proj.weight`). deepseek-ai/DeepSeek-V3 has
    its one; a checkpoint transformers saved has none, though its config keeps the default 1 (DeepseekV3ForCausalLM
    builds no MTP module)."""
    if family != "deepseek_v3":
        return 0
    n = 0
    while n < int(config.get("num_nextn_predict_layers") or 0) and f"model.layers.{layers + n}.eh_proj.weight" in \
            set(reader.names()):
        n += 1
    return n


def read_manifest(converted: str | Path) -> dict[str, Any]:
    path = Path(converted) / MANIFEST
    if not path.is_file():
        raise ConversionError(f"{converted}: no {MANIFEST} (not a converted Hugging Face checkpoint)")
    return json.loads(path.read_text())


def rank_state_dict(converted: str | Path, *, tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0,
                    ep: int = 1, ep_rank: int = 0, etp: int = 1, etp_rank: int = 0,
                    padded_vocab: int, pre_process: bool = True, post_process: bool = True,
                    layers: tuple[int, int] | None = None, whole: tuple[str, ...] = (),
                    mtp: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of the GPTModel chunk held by (tp_rank, pp_rank; ep_rank, etp_rank for the experts of
    an MoE model), read slice by slice. `layers` (first global layer, count) names the chunk's layers when
    the split is not Megatron's even one (an uneven pipeline split, a virtual-pipeline chunk): the loader
    reads it off the built chunk."""
    arch = read_manifest(converted)["architecture"]
    return rank_slices(SafetensorsReader(converted), swiglu=arch["activation"] in mapping.GATED,
                       total_layers=arch["layers"], experts=arch.get("experts") or 1, tie=arch["tie_embeddings"],
                       tp=tp, tp_rank=tp_rank, pp=pp, pp_rank=pp_rank, ep=ep, ep_rank=ep_rank, etp=etp,
                       etp_rank=etp_rank, padded_vocab=padded_vocab, pre_process=pre_process,
                       post_process=post_process, layers=layers, whole=whole, mtp=mtp)


def rank_slices(reader, *, swiglu: bool, total_layers: int, experts: int, tie: bool, tp: int = 1, tp_rank: int = 0,
                pp: int = 1, pp_rank: int = 0, ep: int = 1, ep_rank: int = 0, etp: int = 1, etp_rank: int = 0,
                padded_vocab: int, pre_process: bool = True, post_process: bool = True,
                layers: tuple[int, int] | None = None, scalar_head: bool = False,
                whole: tuple[str, ...] = (), mtp: bool = False) -> dict[str, torch.Tensor]:
    """`rank_state_dict` over any source of full (TP=1, PP=1) Megatron-Core tensors by GPTModel state-dict
    name: `reader.names()`, `reader.get(name)` (a converted directory, or an fsdp_dtensor checkpoint:
    runtime/fsdp_checkpoint.py `FullTensorReader`). `swiglu`: fc1 is [gate; up] (each TP rank holds
    [gate_r; up_r]); `tie`: the output layer is the word embedding; `scalar_head`: the output layer is a reward
    model's / critic's scalar head (runtime/align/common.py `ScalarHead`: [1, h] weight and [1] bias, whole on
    every TP rank), taken as it is (a reward stage's fsdp_dtensor checkpoint feeding ppo or eval); `whole`: name
    endings the chunk holds whole on every TP rank (TE's duplicated MLA down projections, mapping.TE_WHOLE); `mtp`:
    the chunk builds the multi-token prediction depths (`mtp.*`, sliced as any layer, and the word embedding they
    embed the next tokens with, a copy past the first stage); a chunk without them skips a source's."""
    first, count = layers if layers is not None else mapping.layer_offset(total_layers, pp, pp_rank)
    first_expert, local_experts = mapping.expert_slice(experts, ep, ep_rank)
    state: dict[str, torch.Tensor] = {}
    for name in reader.names():
        key = name
        if name.startswith("mtp.") and not mtp:
            continue
        if name.startswith(mapping.L + "."):
            i = int(name.split(".")[2])
            if not first <= i < first + count:
                continue
            key = f"{mapping.L}.{i - first}." + name.split(".", 3)[3]
        if mapping.EXPERT in key:
            head, rest = key.split(mapping.EXPERT)
            j, tail = rest.split(".", 1)
            if not first_expert <= int(j) < first_expert + local_experts:
                continue
            key = f"{head}{mapping.EXPERT}{int(j) - first_expert}.{tail}"
            state[key] = mapping.shard_for_rank(name, reader.get(name), tp=etp, rank=etp_rank, swiglu=swiglu)
            continue
        elif name.startswith("embedding.") and not (pre_process or mtp):
            continue
        elif name.startswith(("decoder.final_layernorm", "output_layer")) and not post_process:
            continue
        elif scalar_head and name.startswith("output_layer."):
            state[key] = reader.get(name)  # replicated over TP, no vocabulary rows
            continue
        t = reader.get(name)
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            t = mapping.fit_vocab(t, padded_vocab)
        state[key] = mapping.shard_for_rank(name, t, tp=tp, rank=tp_rank, swiglu=swiglu, whole=whole)
    if tie and post_process and not pre_process:
        # Megatron's last pipeline stage holds its own copy of the tied embedding as output_layer
        emb = mapping.fit_vocab(reader.get("embedding.word_embeddings.weight"), padded_vocab)
        state["output_layer.weight"] = mapping.shard_for_rank("output_layer.weight", emb, tp=tp, rank=tp_rank,
                                                              swiglu=swiglu)
    return state


def _hf_tensors(family: str, arch: dict, get: Callable[[str], torch.Tensor],
                mtp: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    for i in range(arch["layers"]):
        yield from mapping.mcore_to_hf_layer(family, i, arch, get)
    yield from mapping.mcore_to_hf_edges(family, arch, get)
    for depth in range(mtp):
        yield from mapping.mcore_to_hf_mtp(depth, arch, get)


def mtp_depths(get: Callable[[str], torch.Tensor], family: str) -> int:
    """The multi-token prediction depths a Megatron-Core checkpoint holds (`mtp.layers.{i}.eh_proj.weight`) that the
    export writes: DeepSeek-V3's layout has a place for them (`mapping.mcore_to_hf_mtp`); a checkpoint of a stage
    that ran without them (compiler W128) has none."""
    if family != "deepseek_v3":
        return 0
    n = 0
    while True:
        try:
            get(f"mtp.layers.{n}.eh_proj.weight")
        except Exception:  # the readers raise KeyError / ConversionError for a name they do not hold
            return n
        n += 1


def hf_config(manifest: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json for export: the source's own config (every key it had), with the dtype it is written in."""
    config = dict(manifest["config"])
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = dtype
    return config


def generation_config(manifest: Mapping[str, Any], source: str | Path | None,
                      stop_ids: Sequence[int] = ()) -> dict[str, Any]:
    """generation_config.json: the source's own when it has one, else bos/eos/pad from config.json; then
    `eos_token_id` lists every id of `stop_ids` too (the chat template's end-of-turn token: transformers'
    `generate` stops at any id of a list, as the published instruct models' configs list them, e.g.
    [<|im_end|>, <|endoftext|>]). One id stays an int."""
    if source and (Path(source) / "generation_config.json").is_file():
        config = json.loads((Path(source) / "generation_config.json").read_text())
    else:
        config = {"_from_model_config": True, **dict(manifest.get("special_ids") or {})}
    have = config.get("eos_token_id")
    ids = [have] if isinstance(have, int) else list(have or [])
    ids += [int(i) for i in stop_ids if int(i) not in ids]
    if ids:
        config["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    return config


def export_checkpoint(get: Callable[[str], torch.Tensor], manifest: Mapping[str, Any], out: str | Path, *,
                      dtype: str | None = None, max_shard_bytes: int = 2 << 30,
                      tokenizer_dir: str | Path | None = None, stop_ids: Sequence[int] = ()) -> Path:
    """Stream full Megatron tensors (`get`) to a sharded Hugging Face checkpoint in `out`.

    `dtype` defaults to the source checkpoint's; shards hold at most `max_shard_bytes` each (one tensor
    larger than that gets a shard of its own), named like transformers' `save_pretrained`; `stop_ids` join
    generation_config.json's `eos_token_id` (`generation_config`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or manifest.get("dtype", "float32")
    torch_dtype = getattr(torch, dtype)
    family, arch = manifest["family"], manifest["architecture"]
    mtp = mtp_depths(get, family)
    get = _strict(get, "export")
    weight_map: dict[str, str] = {}
    total = 0
    tmp_names: list[str] = []
    shard: ShardWriter | None = None
    for name, t in _hf_tensors(family, arch, get, mtp):
        t = t.to(torch_dtype)
        size = t.numel() * t.element_size()
        if shard is not None and shard.size and shard.size + size > max_shard_bytes:
            shard.close()
            shard = None
        if shard is None:
            tmp_names.append(f"part-{len(tmp_names):05d}.safetensors")
            shard = ShardWriter(out / tmp_names[-1])
        shard.add(name, t)  # written to disk now: the host holds one tensor of the output at a time
        weight_map[name] = tmp_names[-1]
        total += size
        del t
    if shard is not None:
        shard.close()
    final = _final_names(out, tmp_names, weight_map)
    atomic_write_json(out / INDEX, {"metadata": {"total_size": total},
                                    "weight_map": dict(sorted((k, final[v]) for k, v in weight_map.items()))})
    config = hf_config(manifest, dtype)
    if mtp:  # the depths written above (DeepSeek-V3's own checkpoint: 1); without any, the source's value stays
        config["num_nextn_predict_layers"] = mtp  # (transformers writes its default 1 with no MTP weights)
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "generation_config.json", generation_config(manifest, manifest.get("source"), stop_ids))
    copy_tokenizer_files(tokenizer_dir or manifest.get("source"), out)
    return out


def _final_names(out: Path, tmp_names: list[str], weight_map: dict[str, str]) -> dict[str, str]:
    n = len(tmp_names)
    final = {t: f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k, t in enumerate(tmp_names)}
    for tmp, name in final.items():
        os.replace(out / tmp, out / name)
    return final


def copy_tokenizer_files(source: str | Path | None, out: Path) -> list[str]:
    """Copy the tokenizer files (incl. the chat template in tokenizer_config.json) next to the weights."""
    if not source or not Path(source).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.is_file() and path.resolve() != (out / name).resolve():
            shutil.copyfile(path, out / name)
            copied.append(name)
    return copied


def export_converted(converted: str | Path, out: str | Path, **kw) -> Path:
    """A converted directory back to Hugging Face (the export-only experiment's round trip)."""
    return export_checkpoint(SafetensorsReader(converted).get, read_manifest(converted), out, **kw)


def full_state_getter(state: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """`get` over an in-memory full (TP=1, PP=1) GPTModel state dict (e.g. a trained stage's)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors.__getitem__


def architecture_of(manifest: Mapping[str, Any]) -> HfArchitecture:
    return HfArchitecture(family=manifest["family"], fields=dict(manifest["architecture"]),
                          special_ids=dict(manifest.get("special_ids") or {}), dtype=manifest.get("dtype", "float32"))
