"""Load a converted Hugging Face checkpoint (runtime/hf/convert.py) into this rank's GPTModel chunk.

The entry point a training stage calls when its input `hf` (an `hf_import` task's DONE record,
`converted`) replaces a parent checkpoint: every rank reads only its own TP/PP slices, memory-mapped,
so no rank holds the whole model. The vocabulary is padded as Megatron pads it for this TP size.
"""

from __future__ import annotations

from pathlib import Path

from nemoc.runtime.hf import convert


class LoadError(RuntimeError):
    pass


def load_converted(chunk, converted: str | Path, *, vocab: int) -> None:
    """Copy the converted tensors into `chunk` (a GPTModel, possibly Float16Module-wrapped: cast on copy)."""
    from megatron.core import parallel_state as ps

    from nemoc.runtime.megatron_args import padded_vocab_size
    from nemoc.runtime.model import unwrap

    gpt = unwrap(chunk)
    tp = ps.get_tensor_model_parallel_world_size()
    state = convert.rank_state_dict(converted, tp=tp, tp_rank=ps.get_tensor_model_parallel_rank(),
                                    pp=ps.get_pipeline_model_parallel_world_size(),
                                    pp_rank=ps.get_pipeline_model_parallel_rank(),
                                    ep=ps.get_expert_model_parallel_world_size(),
                                    ep_rank=ps.get_expert_model_parallel_rank(),
                                    etp=ps.get_expert_tensor_parallel_world_size(),
                                    etp_rank=ps.get_expert_tensor_parallel_rank(),
                                    padded_vocab=padded_vocab_size(vocab, tp),
                                    pre_process=gpt.pre_process, post_process=gpt.post_process)
    ours = gpt.state_dict()
    for name, tensor in state.items():
        if name in ours and tuple(ours[name].shape) != tuple(tensor.shape):
            raise LoadError(f"{converted}: {name} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(ours[name].shape)} (does the model block match config.json?)")
    result = gpt.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise LoadError(f"{converted}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
