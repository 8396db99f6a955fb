"""Load a converted Hugging Face checkpoint (runtime/hf/convert.py) into this rank's GPTModel chunk.

The entry point a training or eval stage calls when its input `hf` (an `hf_import` task's DONE record,
`converted`; task.json `hf_init`) replaces a parent checkpoint: every rank reads only its own TP/PP
slices, memory-mapped, so no rank holds the whole model. The chunk's layers are read off the built
chunk (Megatron numbers them globally), so uneven pipeline splits and virtual-pipeline chunks load
their own layers. The vocabulary is padded as Megatron pads it for this TP size (zero rows).
`load_full` slices any other source of full Megatron-Core tensors the same way (a Megatron-FSDP stage's
fsdp_dtensor checkpoint: runtime/fsdp_checkpoint.py `FullTensorReader`).
"""

from __future__ import annotations

from pathlib import Path

from nemoc.runtime.hf import convert
from nemoc.runtime.hf.mapping import TE_NORMS, grouped_expert_name, te_alias  # noqa: F401  (TE_NORMS: re-exported)


class LoadError(RuntimeError):
    pass


def converted_vocab(converted: str | Path) -> int:
    """The vocabulary rows of a converted checkpoint (its config.json's `vocab_size`)."""
    return int(convert.read_manifest(converted)["architecture"]["vocab"])


def _te_names(state: dict, ours: dict) -> dict:
    """The source's pre-norm names renamed to the chunk's, in either direction: a converted directory or a
    local-spec checkpoint (`input_layernorm`) into a chunk built with TE's spec (fused `layer_norm_weight`),
    and an FSDP checkpoint saved under TE's spec into a local-spec chunk (eval stages build local); and the
    experts' SequentialMLP names into a chunk built with grouped GEMM (TEGroupedMLP's `weight{j}`)."""
    out = {}
    for name, tensor in state.items():
        if name not in ours:
            name = next((a for a in (te_alias(name), grouped_expert_name(name)) if a is not None and a in ours), name)
        out[name] = tensor
    return out


def _chunk_layers(gpt) -> tuple[int, int] | None:
    layers = list(getattr(gpt.decoder, "layers", []))
    if not layers:
        return None
    return layers[0].layer_number - 1, len(layers)  # layer_number is global and 1-based


def load_converted(chunk, converted: str | Path, *, vocab: int, skip_output: bool = False) -> None:
    """Copy the converted tensors into `chunk` (a GPTModel, possibly Float16Module- or DDP-wrapped: cast on
    copy). `vocab` is the vocabulary the chunk was built for (before padding); `skip_output` keeps the
    chunk's own output layer (a scalar head on a language-model trunk: reward model, critic)."""
    from megatron.core import parallel_state as ps

    from nemoc.runtime.megatron_args import padded_vocab_size

    gpt = unwrap_gpt(chunk)
    tp = ps.get_tensor_model_parallel_world_size()
    padded = int(gpt.vocab_size) if hasattr(gpt, "vocab_size") else padded_vocab_size(vocab, tp)
    _check_rows(converted, vocab=vocab, padded=padded)
    state = convert.rank_state_dict(converted, padded_vocab=padded, **_rank(gpt))
    _load_rank_state(gpt, state, where=str(converted), skip_output=skip_output,
                     hint="does the model block match config.json?")


def _check_rows(converted, *, vocab: int, padded: int) -> None:
    rows = converted_vocab(converted)
    if rows > padded:
        raise LoadError(f"{converted}: the Hugging Face checkpoint has {rows} vocabulary rows, but the model is "
                        f"built for {vocab} tokens (padded to {padded}); use the checkpoint's own tokenizer, or "
                        "one with at least as many tokens")


def load_converted_into_fsdp(chunks, converted: str | Path, *, vocab: int) -> None:
    """A converted Hugging Face checkpoint into a Megatron-FSDP stage's chunk (runtime/fsdp_checkpoint.py
    `load_full_into_fsdp`: each rank copies its shard of each full tensor)."""
    from nemoc.runtime import fsdp_checkpoint

    gpt = unwrap_gpt(chunks[0])
    _check_rows(converted, vocab=vocab, padded=int(gpt.vocab_size))
    try:
        fsdp_checkpoint.load_full_into_fsdp(chunks, convert.SafetensorsReader(converted).get, where=str(converted))
    except ValueError as exc:
        raise LoadError(str(exc)) from None


def load_full(chunk, reader, *, where: str, skip_output: bool = False) -> None:
    """Copy full (TP=1, PP=1) Megatron-Core tensors into `chunk` (any layout, cast on copy), sliced as for a
    converted directory: `reader.names()` / `reader.get(name)` by GPTModel state-dict name (an fsdp_dtensor
    checkpoint's `FullTensorReader`); `where` names the source in errors. The fc1 layout, layer count,
    experts and tied embedding are the built chunk's (a checkpoint of another model fails the shape check)."""
    from nemoc.runtime.hf.mapping import MappingError

    gpt = unwrap_gpt(chunk)
    config = gpt.config
    try:
        state = convert.rank_slices(reader, swiglu=bool(config.gated_linear_unit), total_layers=config.num_layers,
                                    experts=config.num_moe_experts or 1,
                                    tie=bool(gpt.share_embeddings_and_output_weights),
                                    padded_vocab=int(gpt.vocab_size), **_rank(gpt),
                                    scalar_head=bool(getattr(getattr(gpt, "output_layer", None), "scalar_head", False)))
    except MappingError as exc:
        raise LoadError(f"{where}: {exc}") from None
    _load_rank_state(gpt, state, where=where, skip_output=skip_output,
                     hint="was it trained with this stage's model block?")


def unwrap_gpt(chunk):
    from nemoc.runtime.model import unwrap

    return unwrap(chunk)


def _rank(gpt) -> dict:
    """This rank's place in the layout and the chunk's edges and layers (`convert.rank_slices`' keywords)."""
    from megatron.core import parallel_state as ps

    return dict(tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
                etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
                pre_process=gpt.pre_process, post_process=gpt.post_process, layers=_chunk_layers(gpt),
                mtp=bool(getattr(gpt, "mtp_process", False)),
                whole=whole_projections(gpt.config, gpt.state_dict()))


def whole_projections(config, ours: dict) -> tuple[str, ...]:
    """The MLA down projections this chunk holds whole on every tensor-parallel rank (mapping.TE_WHOLE: Transformer
    Engine's spec builds them as TELinear(parallel_mode='duplicated'); the local spec's are column-parallel): read
    off the built chunk, a down projection whose rows are the full latent (q_lora_rank, kv_lora_rank +
    qk_pos_emb_head_dim) where TP > 1."""
    from nemoc.runtime.hf.mapping import TE_WHOLE

    if not getattr(config, "multi_latent_attention", False) or getattr(config, "tensor_model_parallel_size", 1) == 1:
        return ()
    rows = {TE_WHOLE[0]: config.q_lora_rank, TE_WHOLE[1]: config.kv_lora_rank + config.qk_pos_emb_head_dim}
    return tuple(end for end, full in rows.items()
                 if full and any(n.endswith(end) and tuple(t.shape)[0] == full for n, t in ours.items()))


def _load_rank_state(gpt, state: dict, *, where: str, skip_output: bool, hint: str) -> None:
    """`state` (this rank's slices) into the GPTModel: every shape checked first, nothing missing."""
    if skip_output:
        state = {k: v for k, v in state.items() if not k.startswith("output_layer.")}
    ours = gpt.state_dict()
    state = _te_names(state, ours)
    for name, tensor in state.items():
        if name in ours and tuple(ours[name].shape) != tuple(tensor.shape):
            raise LoadError(f"{where}: {name} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(ours[name].shape)} ({hint})")
    result = gpt.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys
               if not k.endswith("_extra_state") and not (skip_output and k.startswith("output_layer."))]
    if missing or result.unexpected_keys:
        raise LoadError(f"{where}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
