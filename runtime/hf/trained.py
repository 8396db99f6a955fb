"""Export a trained stage's Megatron-Core checkpoint as a Hugging Face directory, streamed layer by layer.

Input:  a stage's final dist_checkpointing directory (runtime/align/common.save_model, any TP/PP layout
        wrote it) or a Megatron-FSDP stage's fsdp_dtensor checkpoint (read by runtime/fsdp_checkpoint.py's
        `FullTensorReader`: `checkpoint_reader`; it stores the fp32 main weights, also for a bf16 stage, and its
        manifest names the training dtype the export defaults to), the
        plan's `ModelSpec`, the Hugging Face checkpoint the model started from when it has one
        (`init = hf(DIR)`: its config.json, generation_config.json and tokenizer files are carried), else the
        stage's tokenizer directory and end-of-document id.
Output: the same directory `convert.export_checkpoint` writes for HF -> nemoc -> HF (one export path):
        sharded safetensors, config.json with every field the model has (llama3 RoPE scaling, GPT-2's
        gelu_new, Mixtral / Qwen3-MoE experts, Qwen2 QKV bias, Qwen3 QK norm), generation_config.json
        with bos/eos/pad ids, the tokenizer files including tokenizer_config.json's chat template.
Streaming: `DistCheckpointReader.get` reads one decoder layer's tensors at a time with Megatron-Core's
        `dist_checkpointing.load`, asking for the layer's slice of each stacked tensor
        (`ShardedTensor.from_rank_offsets` on the prepended layer / expert axes), so the host holds one
        layer (in the stored dtype) plus the tensors being written, never a whole copy of the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nemoc.compiler import hfconfig
from nemoc.runtime.atomic import atomic_write_json
from nemoc.runtime.hf import convert

_INDEX = re.compile(r"\.(\d+)\.")


class TrainedExportError(RuntimeError):
    """A trained model that cannot be written as a Hugging Face checkpoint (the message says why)."""


class DistCheckpointReader:
    """`get(name)` of full (TP=1, PP=1) Megatron-Core tensors from a dist_checkpointing directory.

    Megatron stacks homogeneous decoder layers (and an MoE layer's experts) along prepended axes: the
    stored key `decoder.layers.mlp.linear_fc1.weight` has shape [layers, ...]. A name with indices
    (`decoder.layers.3.mlp.linear_fc1.weight`) reads that slice only. The tensors of one layer are
    loaded together on first access and dropped when another layer is asked for.
    """

    def __init__(self, directory: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = Path(directory)
        try:
            meta = FileSystemReader(str(self.directory)).read_metadata()
        except Exception as exc:  # a truncated or foreign .metadata raises whatever its unpickling meets
            raise TrainedExportError(f"{self.directory}: not a readable dist_checkpointing directory "
                                     f"({type(exc).__name__}: {exc})") from None
        self.meta = {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._layer: str | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self.loads = 0  # dist_checkpointing.load calls (one per layer + one per edge tensor)

    def dtype(self) -> torch.dtype:
        return self.meta["embedding.word_embeddings.weight"].properties.dtype if (
            "embedding.word_embeddings.weight" in self.meta) else next(iter(self.meta.values())).properties.dtype

    def _locate(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The stored key and prepended-axis indices of a full-model tensor name (KeyError when absent)."""
        if name in self.meta:
            return name, ()
        indices = tuple(int(i) for i in _INDEX.findall(name))
        stacked = _INDEX.sub(".", name)
        while _INDEX.search(stacked):  # overlapping matches (".3.5.") need a second pass
            stacked = _INDEX.sub(".", stacked)
        # a MoE model with dense layers stores each layer under its own index (the layers differ), the experts of
        # an expert layer still stacked: `decoder.layers.3.mlp.experts.experts.*` [experts, ...]
        # (and a multi-token prediction depth's layer likewise: `mtp.layers.0.transformer_layer.mlp.experts.experts.*`)
        m = re.match(r"(decoder|mtp)\.layers\.(\d+)\.", name)
        own = ((f"{m.group(1)}.layers.{m.group(2)}." + stacked[len(f"{m.group(1)}.layers."):], indices[1:]) if m
               else None)
        # Megatron's SequentialMLP stores expert j of `mlp.experts.local_experts.j.*` as `mlp.experts.experts.*`
        for key, idx in [c for c in ((stacked, indices), own) if c is not None]:
            for k in (key, key.replace(".experts.local_experts.", ".experts.experts.")):
                if k in self.meta and len(self.meta[k].size) > len(idx):
                    return k, idx
        raise KeyError(name)

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named slices in one pass of PyTorch's distributed-checkpoint reader (the format
        Megatron's torch_dist strategy writes). Megatron's own `dist_checkpointing.load` cannot be asked
        for a slice in a one-process group: its strategy places the other fragments on rank
        (rank + 1) % world, which is this rank when world = 1 (strategies/torch.py)."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        request = {}
        for name in names:
            key, idx = self._locate(name)
            size = tuple(self.meta[key].size)
            request[name] = (key, idx, torch.empty(size[len(idx):], dtype=self.meta[key].properties.dtype))
        from torch.distributed.checkpoint.api import CheckpointException

        self.loads += 1
        try:
            dcp_load({}, storage_reader=FileSystemReader(str(self.directory)), planner=_SlicePlanner(request),
                     no_dist=True)
        except (Exception, CheckpointException) as exc:  # CheckpointException derives from BaseException
            raise TrainedExportError(f"{self.directory}: reading {', '.join(names[:3])}"
                                     f"{' ...' if len(names) > 3 else ''} failed ({type(exc).__name__}: {exc}); "
                                     "the checkpoint's files are damaged or incomplete: export an earlier "
                                     "checkpoint of the stage") from None
        return {name: t for name, (_, _, t) in request.items()}

    def _layer_names(self, layer: str) -> list[str]:
        """Every full-model tensor name of decoder layer `layer` (an index string) the checkpoint holds."""
        out = []
        for key, md in self.meta.items():
            if key.startswith(f"decoder.layers.{layer}.") and ".experts.experts." in key and len(md.size) >= 3:
                head, rest = key.split(".experts.experts.")
                out += [f"{head}.experts.local_experts.{j}.{rest}" for j in range(md.size[0])]
            elif key.startswith(f"decoder.layers.{layer}."):
                out.append(key)
            elif key.startswith("decoder.layers.") and not _INDEX.search(key):
                tail = key[len("decoder.layers."):]
                if ".experts.experts." in tail and len(md.size) >= 3:
                    head, rest = tail.split(".experts.experts.")
                    head += ".experts"
                    out += [f"decoder.layers.{layer}.{head}.local_experts.{j}.{rest}" for j in range(md.size[1])]
                else:
                    out.append(f"decoder.layers.{layer}.{tail}")
        return out

    def get(self, name: str) -> torch.Tensor:
        self._locate(name)  # KeyError for a tensor the checkpoint lacks (convert's `_pick` relies on it)
        m = re.match(r"decoder\.layers\.(\d+)\.", name)
        if m is None:
            return self._load([name])[name]
        if self._layer != m.group(1):
            self._cache = {}  # drop the previous layer before reading the next
            self._layer = m.group(1)
            self._cache = self._load(self._layer_names(self._layer))
        if name not in self._cache:
            self._cache.update(self._load([name]))
        return self._cache[name]


def checkpoint_reader(directory: str | Path):
    """The full-tensor reader of a stage checkpoint: `DistCheckpointReader` for dist_checkpointing (torch_dist)
    directories, runtime/fsdp_checkpoint.py's `FullTensorReader` for a Megatron-FSDP stage's fsdp_dtensor one
    (its manifest says so). Both answer `get(name)` by GPTModel name and `dtype()`."""
    from nemoc.runtime import fsdp_checkpoint

    if not fsdp_checkpoint.is_fsdp_checkpoint(str(directory)):
        return DistCheckpointReader(directory)
    try:
        return fsdp_checkpoint.full_reader(str(directory))
    except fsdp_checkpoint.FullCheckpointError as exc:
        raise TrainedExportError(f"export: {exc}") from None


def _slice_planner_base():
    from torch.distributed.checkpoint.planner import LoadPlanner

    return LoadPlanner


class _SlicePlanner(_slice_planner_base()):
    """A LoadPlanner that reads, for each request (stored key, prepended-axis indices, destination), the
    chunk [i, j, ..., :, ...] of the stored tensor into the destination, and nothing else."""

    def __init__(self, request: dict[str, tuple[str, tuple[int, ...], torch.Tensor]]):
        self.request = request
        self._dest: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items = []
        for key, idx, dest in self.request.values():
            md = self.metadata.state_dict_metadata[key]
            offsets = torch.Size(list(idx) + [0] * dest.dim())
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size([1] * len(idx) + list(dest.shape)))
            self._dest[(key, tuple(offsets))] = dest.view(chunk.sizes)
            items += create_read_items_for_chunk_list(key, md, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("no byte items are requested")

    def resolve_tensor(self, read_item):
        from torch.distributed._shard._utils import narrow_tensor_by_index

        dest = self._dest[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place


# ------------------------------------------------------------------------------ config.json from the spec


def spec_config(spec, vocab: int) -> dict[str, Any]:
    """config.json of the transformers class that computes what `spec` builds (a model trained without a
    Hugging Face source); round-tripped through compiler.hfconfig, so every field is one nemoc reads back."""
    gemma = [name for name in ("norm_zero_centered", "post_block_norms", "embedding_scale", "softmax_scale",
                               "sliding_window", "local_rotary_base") if getattr(spec, name) not in (False, None, 0)]
    if gemma:  # a Llama / GPT-2 config.json would silently drop them
        raise TrainedExportError(f"export: {', '.join(gemma)} written without a Hugging Face source: nemoc writes "
                                 "Gemma 3's config.json only for a model that started from one (init = hf(...))")
    base = {"vocab_size": vocab, "tie_word_embeddings": spec.tie_embeddings, "initializer_range": 0.02}
    if spec.multi_latent_attention:
        return deepseek_v3_config(spec, base)
    if spec.norm == "layernorm" and spec.position == "learned" and spec.activation in ("gelu", "gelu_tanh"):
        family = "gpt2"
        config = base | {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": spec.hidden,
            "n_layer": spec.layers, "n_head": spec.heads, "n_inner": spec.ffn_hidden, "n_positions": spec.seq_length,
            "n_ctx": spec.seq_length, "layer_norm_epsilon": spec.norm_epsilon,
            # Megatron's F.gelu is the exact erf GELU; gelu_tanh is GPT-2's own gelu_new
            "activation_function": "gelu_new" if spec.activation == "gelu_tanh" else "gelu",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        }
    elif spec.norm == "rmsnorm" and spec.position == "rope" and spec.activation == "swiglu":
        if spec.experts:
            family = "qwen3_moe" if spec.qk_layernorm else "mixtral"
        else:
            family = "qwen3" if spec.qk_layernorm else "qwen2" if spec.add_qkv_bias else "llama"
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family]
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rotary_base}
        if spec.rope_scaling_factor != 1.0:
            rope = {"rope_type": "llama3", "factor": spec.rope_scaling_factor, "rope_theta": spec.rotary_base,
                    **hfconfig.LLAMA3_FIXED}
        config = base | {
            "architectures": [arch], "model_type": family, "hidden_size": spec.hidden,
            "intermediate_size": spec.ffn_hidden, "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads, "num_key_value_heads": spec.query_groups, "head_dim": spec.head_dim,
            "hidden_act": "silu", "max_position_embeddings": spec.seq_length, "rms_norm_eps": spec.norm_epsilon,
            "rope_theta": spec.rotary_base, "rope_scaling": None if rope["rope_type"] == "default" else rope,
            "rope_parameters": rope, "attention_dropout": 0.0,
        }
        if family in ("llama", "qwen2"):
            config |= {"attention_bias": spec.add_qkv_bias, "mlp_bias": False}
        if family in ("qwen2", "qwen3", "qwen3_moe", "mixtral"):
            config["sliding_window"] = None
        if family == "mixtral":
            if spec.shared_expert_ffn_hidden:
                raise TrainedExportError("export: Mixtral has no shared expert")
            if 0 in spec.moe_layer_pattern:  # compiler E208 refuses it at check time
                raise TrainedExportError("export: Mixtral makes every layer an expert layer; this model has dense "
                                         "layers (moe_first_dense_layers / moe_layer_freq)")
            # every layer is an expert layer: Mixtral's intermediate_size is the expert's FFN width
            config |= {"intermediate_size": spec.moe_ffn_hidden or spec.ffn_hidden,
                       "num_local_experts": spec.experts, "num_experts_per_tok": spec.top_k,
                       "router_jitter_noise": 0.0, "output_router_logits": False}
        if family == "qwen3_moe":
            if spec.shared_expert_ffn_hidden:
                raise TrainedExportError("export: Qwen3-MoE has no shared expert")
            config |= {"num_experts": spec.experts, "num_experts_per_tok": spec.top_k, "norm_topk_prob": True,
                       "moe_intermediate_size": spec.moe_ffn_hidden or spec.ffn_hidden, "decoder_sparse_step": 1,
                       # the dense layers (moe_first_dense_layers / moe_layer_freq), dense MLPs of intermediate_size
                       "mlp_only_layers": [i for i, p in enumerate(spec.moe_layer_pattern) if not p],
                       "output_router_logits": False,
                       # the weight the stage trained with (transformers adds the aux loss only with router logits)
                       "router_aux_loss_coef": spec.moe_aux_loss_coeff}
    else:
        raise TrainedExportError(
            f"export: no Hugging Face architecture for norm={spec.norm}, activation={spec.activation}, "
            f"position={spec.position} (supported: rmsnorm+swiglu+rope -> Llama / Qwen2 / Qwen3 / Mixtral / "
            "Qwen3-MoE, layernorm+gelu|gelu_tanh+learned -> GPT-2)")
    if family == "gpt2":
        problems = []
        if not spec.add_bias_linear:
            problems.append("GPT-2 has biases on every linear layer (add_bias_linear = true)")
        if spec.query_groups != spec.heads:
            problems.append(f"GPT-2 has multi-head attention (query_groups {spec.query_groups} != heads {spec.heads})")
        if spec.head_dim * spec.heads != spec.hidden:
            problems.append("GPT-2 needs head_dim * heads == hidden")
        if problems:
            raise TrainedExportError("export: " + "; ".join(problems))
    elif spec.add_bias_linear:
        raise TrainedExportError(f"export: {family} has no bias on o_proj / the MLP (add_bias_linear = false)")
    return config


def deepseek_v3_config(spec, base: dict[str, Any]) -> dict[str, Any]:
    """DeepseekV3Config of a multi-latent attention model trained without a Hugging Face source. Compiler E170
    (compiler/rules/stages.py rule_mla_stage_kind) refuses at check time every model this export refuses: no
    latent norms, a router other than sigmoid plus expert bias, dense layers after an expert layer, and what
    the config's read-back (hfconfig._deepseek_router) refuses, top_k = 1 and group-limited routing with
    top_k // moe_router_group_topk != 2. A dense model is DeepseekV3 with every
    layer below first_k_dense_replace (dense MLPs of intermediate_size); a MoE model has its dense first layers (moe_first_dense_layers) below it and
    every other layer sparse:
    sigmoid scores plus e_score_correction_bias (Megatron's expert bias), renormalised over the top-k
    (norm_topk_prob), times routed_scaling_factor, n_group / topk_group, n_shared_experts of
    moe_intermediate_size each. transformers' latent norms use DeepseekV3RMSNorm's default epsilon (1e-6)."""
    problems = []
    if spec.norm != "rmsnorm" or spec.activation != "swiglu" or spec.add_bias_linear or not spec.qk_layernorm:
        problems.append("DeepseekV3 has RMSNorm, SwiGLU, no biases and RMSNorms on both latents")
    if spec.is_moe and (spec.moe_router_score != "sigmoid" or not spec.moe_expert_bias):
        problems.append("DeepseekV3 routes by sigmoid scores plus an expert bias")
    moe_ffn = spec.moe_ffn_hidden or spec.ffn_hidden
    pattern = tuple(spec.moe_layer_pattern) if spec.is_moe else ()
    first_dense = pattern.index(1) if 1 in pattern else 0
    if spec.is_moe and any(v == 0 for v in pattern[first_dense:]):
        problems.append("DeepseekV3's dense layers are its first first_k_dense_replace layers; this model has dense "
                        "layers after an expert layer (moe_layer_freq)")
    if spec.shared_expert_ffn_hidden % moe_ffn:
        problems.append(f"shared_expert_ffn_hidden {spec.shared_expert_ffn_hidden} is not a whole number of "
                        f"experts of {moe_ffn}")
    if problems:
        raise TrainedExportError("export: " + "; ".join(problems))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rotary_base}
    if spec.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": spec.rotary_base, "factor": spec.rope_scaling_factor,
                "original_max_position_embeddings": spec.original_max_position_embeddings,
                "beta_fast": spec.beta_fast, "beta_slow": spec.beta_slow, "mscale": spec.mscale,
                "mscale_all_dim": spec.mscale_all_dim}
    config = base | {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn_hidden, "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.heads, "hidden_act": "silu", "max_position_embeddings": spec.seq_length,
        "rms_norm_eps": spec.norm_epsilon, "rope_parameters": rope, "rope_interleave": True, "attention_bias": False,
        "attention_dropout": 0.0, "q_lora_rank": spec.q_lora_rank or None, "kv_lora_rank": spec.kv_lora_rank,
        "qk_nope_head_dim": spec.qk_head_dim, "qk_rope_head_dim": spec.qk_pos_emb_head_dim,
        "v_head_dim": spec.v_head_dim, "num_nextn_predict_layers": 0,
    }
    if not spec.is_moe:
        return config | {"first_k_dense_replace": spec.layers, "n_routed_experts": 1, "num_experts_per_tok": 1,
                         "n_shared_experts": 0, "n_group": 1, "topk_group": 1, "moe_intermediate_size": spec.ffn_hidden}
    return config | {
        "first_k_dense_replace": first_dense, "n_routed_experts": spec.experts, "num_experts_per_tok": spec.top_k,
        "moe_intermediate_size": moe_ffn, "n_shared_experts": spec.shared_expert_ffn_hidden // moe_ffn,
        "norm_topk_prob": True, "routed_scaling_factor": spec.moe_topk_scaling_factor or 1.0,
        "n_group": spec.moe_router_groups or 1, "topk_group": spec.moe_router_group_topk or 1,
    }


_COMPARED = ("layers", "hidden", "heads", "query_groups", "ffn_hidden", "activation", "norm", "position",
             "rotary_base", "rope_scaling_factor", "tie_embeddings", "add_bias_linear", "add_qkv_bias",
             "qk_layernorm", "experts", "top_k")


def manifest_for(spec, *, vocab: int, source: str | Path | None, dtype: str,
                 special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest `convert.export_checkpoint` takes: the source's config.json when the model started from
    one (every key it had), else one built from the spec; checked against the spec either way."""
    if source is not None:
        config = hfconfig.read_config(source)
    else:
        config = spec_config(spec, vocab)
    try:
        arch = hfconfig.architecture(config)
    except hfconfig.HfConfigError as exc:
        raise TrainedExportError(f"export: {exc}") from None
    ours = {k: getattr(spec, k) for k in _COMPARED}
    if spec.experts:  # the experts' width is compared, the dense one only where the model has dense layers
        if all(spec.moe_layer_pattern):
            del ours["ffn_hidden"]
        ours["moe_ffn_hidden"] = spec.moe_ffn_hidden or spec.ffn_hidden
    if arch.fields.get("position") == "rope" and not spec.multi_latent_attention:  # MLA: no head_dim
        ours["head_dim"] = spec.head_dim
    theirs = dict(arch.fields, head_dim=arch.fields.get("kv_channels"))
    bad = [f"{k}: model {v!r}, config.json {theirs.get(k)!r}" for k, v in ours.items()
           if (k in theirs or k in ("experts", "top_k")) and (theirs.get(k) or 0) != (v or 0)]
    if bad:
        raise TrainedExportError("export: the trained model and its config.json disagree (" + "; ".join(bad) + ")")
    fields = dict(arch.fields, vocab=int(config.get("vocab_size", vocab)))
    ids = dict(arch.special_ids)
    for key, value in (special_ids or {}).items():
        ids.setdefault(key, value)
    config = dict(config)
    for key, value in ids.items():
        config.setdefault(key, value)
    return {"family": arch.family, "architecture": fields, "special_ids": ids, "dtype": dtype,
            "source": str(source) if source is not None else None, "config": config}


def export_trained(checkpoint: str | Path, spec, out: str | Path, *, vocab: int, source: str | Path | None,
                   tokenizer_dir: str | Path | None, dtype: str | None = None,
                   special_ids: dict[str, int] | None = None, stop_ids: Sequence[int] = (),
                   get: Callable[[str], torch.Tensor] | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the Hugging Face directory of a trained checkpoint; returns (out, manifest).

    `dtype` defaults to the training dtype: the one a torch_dist checkpoint stores, the one an fsdp_dtensor
    checkpoint's manifest names (it stores fp32 main weights; an older one without the name: fp32).
    `tokenizer_dir` supplies the tokenizer files when the source has none (a model trained from scratch on a
    local tokenizer); `stop_ids` (the chat template's end-of-turn token) join generation_config.json's
    `eos_token_id`."""
    reader = checkpoint_reader(checkpoint) if get is None else None
    # the training dtype: a torch_dist checkpoint stores it, an FSDP one stores the fp32 main weights and names it
    trained = getattr(reader, "training_dtype", None) or getattr(reader, "dtype", None)
    stored = str(trained()).removeprefix("torch.") if trained is not None else "float32"
    manifest = manifest_for(spec, vocab=vocab, source=source, dtype=dtype or stored, special_ids=special_ids)
    out = convert.export_checkpoint(get or reader.get, manifest, out, dtype=dtype or stored,
                                    tokenizer_dir=tokenizer_dir, stop_ids=stop_ids)
    if source is not None and tokenizer_dir is not None:
        convert.copy_tokenizer_files(source, Path(out))  # the source's own files win over the stage's
    if not (Path(out) / "tokenizer_config.json").is_file() and not (Path(out) / "tokenizer.json").is_file():
        convert.copy_tokenizer_files(tokenizer_dir, Path(out))
    return Path(out), manifest


def adapter_state(directory: str | Path, layers: int) -> dict[str, torch.Tensor]:
    """The LoRA adapters of an adapter checkpoint (runtime/align/lora.py save_adapters, any layout), as the
    full per-layer tensors `peft_export.write_adapter` takes (`decoder.layers.<i>.<module>.lora_a|b`)."""
    reader = DistCheckpointReader(directory)
    state = {}
    for key, md in reader.meta.items():
        head, tail = key.split(".layers.", 1) if ".layers." in key else (key, None)
        names = [f"{head}.layers.{i}.{tail}" for i in range(layers)] if tail and len(md.size) == 3 else [key]
        for name in names:
            state[name.removeprefix("model.")] = reader.get(name)
    return state


def write_tokenizer_config(out: str | Path, eod: int | None) -> Path | None:
    """tokenizer_config.json for a bare tokenizer.json (a tokenizer nemoc trained: no config of its own), so
    `AutoTokenizer.from_pretrained(out)` loads it as a PreTrainedTokenizerFast with its end-of-document
    token as eos (not the defaults of the model family's tokenizer class). None when it is not needed."""
    out = Path(out)
    if (out / "tokenizer_config.json").exists() or not (out / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eod is not None:
        token = Tokenizer.from_file(str(out / "tokenizer.json")).id_to_token(int(eod))
        if token is not None:
            config["eos_token"] = token
    atomic_write_json(out / "tokenizer_config.json", config)
    return out / "tokenizer_config.json"


def tokenizer_special_ids(tokenizer_dir: str | Path | None, eod: int | None) -> dict[str, int]:
    """bos/eos/pad ids of a tokenizer directory (its tokenizer_config.json's tokens looked up in
    tokenizer.json), with the stage's end-of-document id as eos when the directory names none."""
    ids: dict[str, int] = {}
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        cfg_path, tok_path = Path(tokenizer_dir) / "tokenizer_config.json", Path(tokenizer_dir) / "tokenizer.json"
        if cfg_path.is_file() and tok_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_path))
            for key in ("bos", "eos", "pad"):
                token = cfg.get(f"{key}_token")
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str) and tok.token_to_id(token) is not None:
                    ids[f"{key}_token_id"] = tok.token_to_id(token)
    if eod is not None:
        ids.setdefault("eos_token_id", int(eod))
    return ids
