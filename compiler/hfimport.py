"""The `hf_import` task planned like the others: its host memory and time (no torch).

Input:  the model (its exact parameter counts, compiler/flops.py), the checkpoint directory (the bytes of
        its safetensors files when they are there), the worker count.
Output: `ImportEstimate`, a cited breakdown `nemoc plan` prints and plan.json carries (`Plan.imports`).
Invariants: pure arithmetic over file sizes; every constant below is measured (bench/bench_hf_import.py,
        bench/results/hf_import.json) or derived from what the runtime's converter does (below).

What the runtime's import task does:
  1. the graph content-hashes every safetensors file (sha256, compiler/graph.py hf_checkpoint_digest);
  2. `workers` spawned processes each convert a set of decoder layers, one layer at a time: the layer's
     tensors are read (safetensors `get_tensor` copies out of the memory map), fused (QKV, [gate; up]),
     and serialised whole by `safetensors.torch.save` before the write: two copies of one layer per worker;
  3. the parent then converts the edges (embedding, final norm, output layer) the same way: two copies.
"""

from __future__ import annotations

import json
import os
from nemoc.compiler.flops import param_counts
from nemoc.compiler.plan import ImportEstimate
from nemoc.compiler.spec import ModelSpec

# The import's worker processes the plan asks for (the runtime runs min(this, the host's CPUs)).
DEFAULT_IMPORT_WORKERS = 4
# sha256 of the graph's content hash: "about 10 s per 16 GB on one core" (docs/huggingface.md), 1.6 GB/s.
HASH_BYTES_PER_S = 1.6e9
# Conversion throughput of one worker (read, fuse, serialise, write) and the start-up of the spawned
# workers (a fresh interpreter importing torch), measured by bench/bench_hf_import.py on the shared 2-CPU
# development VM: 0.305 GB bf16 checkpoint, 1 worker 0.215 GB/s (the repository's first record) and
# 0.127 GB/s (bench/results/hf_import.json, a busier machine); the 2-worker runs take 12.1 s and 14.5 s,
# i.e. 11.4 s and 13.3 s of spawn beyond half the 1-worker time. The throughput is the best measured,
# the start-up their mean; a host with more free cores and a faster disk converts faster.
CONVERT_BYTES_PER_S_PER_WORKER = 0.215e9
WORKER_START_S = 12.0
# Bytes per parameter when the checkpoint's files are not there to measure (published checkpoints: bf16).
ASSUMED_BYTES_PER_PARAM = 2


def checkpoint_bytes(directory: str) -> int | None:
    """The safetensors bytes of a checkpoint directory: its index's `total_size` (tensor bytes), else the
    files' sizes; None when there are no weights there (yet)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    try:
        with open(index, encoding="utf-8") as f:
            total = json.load(f).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    except (OSError, ValueError):
        pass
    try:
        files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    except OSError:
        return None
    return sum(os.path.getsize(os.path.join(directory, f)) for f in files) or None


def checkpoint_tensor_names(directory: str) -> set[str]:
    """The tensor names of a checkpoint directory without reading a tensor: its index's weight_map, else each
    .safetensors file's JSON header (8-byte little-endian length, then the header); empty when unreadable."""
    try:
        with open(os.path.join(directory, "model.safetensors.index.json"), encoding="utf-8") as f:
            return set(json.load(f).get("weight_map", {}))
    except (OSError, ValueError, AttributeError):
        pass
    names: set[str] = set()
    try:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if 0 < size < (100 << 20):
                    names |= {k for k in json.loads(f.read(size)) if k != "__metadata__"}
    except (OSError, ValueError):
        return names
    return names


def mtp_depths_in(directory: str, config: dict, family: str, layers: int) -> int:
    """The multi-token prediction depths a DeepSeek-V3 checkpoint holds: `num_nextn_predict_layers` whose weights
    are there (`model.layers.{layers + i}.eh_proj.weight`: the depths the Hugging Face import converts).
    A checkpoint transformers saved holds none, though its config.json keeps DeepseekV3Config's default 1."""
    if family != "deepseek_v3":
        return 0
    names = checkpoint_tensor_names(directory)
    n = 0
    while n < int(config.get("num_nextn_predict_layers") or 0) and f"model.layers.{layers + n}.eh_proj.weight" in names:
        n += 1
    return n


def estimate_import(model: ModelSpec, directory: str, *, shown_as: str | None = None,
                    workers: int = DEFAULT_IMPORT_WORKERS) -> ImportEstimate:
    counts = param_counts(model)
    measured = checkpoint_bytes(directory)
    # DeepSeek-V3 stores each MTP depth with copies of the embedding and the output layer (model.layers.61.*)
    stored = counts.total + (counts.mtp + model.mtp_num_layers * (counts.embedding + (counts.output or counts.embedding))
                             if model.mtp_num_layers else 0)
    total = measured if measured is not None else stored * ASSUMED_BYTES_PER_PARAM
    per_param = total / max(1, stored)
    layer = int(counts.per_layer * per_param)
    edges = int((counts.embedding + counts.output + counts.final_norm) * per_param)
    # the MTP depths: one shard each, converted after the edges in the parent process (the import)
    mtp = int(counts.mtp / max(1, model.mtp_num_layers) * per_param)
    workers = max(1, min(workers, model.layers))
    # layers spread over the workers (ceil: the slowest worker has the most), then the edges in the parent
    layer_s = -(-model.layers // workers) * layer / CONVERT_BYTES_PER_S_PER_WORKER
    return ImportEstimate(
        directory=shown_as or directory, checkpoint_bytes=int(total), measured=measured is not None,
        layer_bytes=layer, edge_bytes=edges, workers=workers,
        host_memory_bytes=max(workers * 2 * layer, 2 * edges, 2 * mtp),
        hash_s=total / HASH_BYTES_PER_S, start_s=WORKER_START_S if workers > 1 else 0.0,
        convert_s=layer_s + (edges + model.mtp_num_layers * mtp) / CONVERT_BYTES_PER_S_PER_WORKER,
    )
