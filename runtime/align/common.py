"""What every stage after pretraining shares: process group, GPTModel construction, checkpoints, log-probs.

Input:  a compiled `Plan` (its `ModelSpec`, precision and a `StagePlan`'s layout).
Output: Megatron-Core objects: an initialised `parallel_state`, `GPTModel`s (policy, reference, reward,
critic), per-token log-probabilities computed with Megatron's vocab-parallel cross entropy (so every
function here is correct under tensor parallelism: logits stay sharded on the vocabulary).
Invariants: the CPU adaptation (`nemoc.runtime.mcore_cpu.apply`) is applied before any Megatron object
is built when CUDA is absent; checkpoints are Megatron-Core `dist_checkpointing` directories, so a
checkpoint written under one TP/PP layout loads under any other (this is how export gathers shards).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nemoc.runtime import mcore_cpu

mcore_cpu.apply()

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

MODEL_KEY = "model"  # top-level key of the model's sharded state dict inside a checkpoint


class AlignError(RuntimeError):
    """A user-facing failure of an alignment stage (bad data, incompatible checkpoint): no traceback."""


# ------------------------------------------------------------------------------------ process group


def init_distributed(*, tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Initialise torch.distributed (torchrun env, or a 1-process HashStore group) and parallel_state."""
    if not torch.distributed.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if world == 1 and "MASTER_ADDR" not in os.environ:
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group(backend)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def teardown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------------------------------ models

_ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
    "squared_relu": (lambda x: torch.pow(F.relu(x), 2), False),
}
_POSITIONS = {"rope": "rope", "learned": "learned_absolute", "none": "none"}


@dataclass(frozen=True)
class ModelShape:
    """The slice of a `ModelSpec` that decides the GPTModel's architecture (and checkpoint compatibility)."""

    layers: int
    hidden: int
    heads: int
    query_groups: int
    ffn_hidden: int
    vocab: int
    seq_length: int
    head_dim: int
    activation: str
    norm: str
    position: str
    rotary_base: float
    tie_embeddings: bool
    add_bias_linear: bool
    add_qkv_bias: bool
    qk_layernorm: bool
    norm_epsilon: float

    @classmethod
    def of(cls, spec) -> "ModelShape":
        if getattr(spec, "experts", 0):
            raise AlignError(f"model '{spec.name}': alignment stages support dense models only (experts={spec.experts})")
        return cls(
            layers=spec.layers, hidden=spec.hidden, heads=spec.heads, query_groups=spec.query_groups,
            ffn_hidden=spec.ffn_hidden, vocab=spec.vocab, seq_length=spec.seq_length, head_dim=spec.head_dim,
            activation=spec.activation, norm=spec.norm, position=spec.position, rotary_base=spec.rotary_base,
            tie_embeddings=spec.tie_embeddings, add_bias_linear=spec.add_bias_linear,
            add_qkv_bias=spec.add_qkv_bias, qk_layernorm=spec.qk_layernorm, norm_epsilon=spec.norm_epsilon,
        )


def transformer_config(shape: ModelShape, *, tp: int = 1, pp: int = 1, precision: str = "fp32",
                       sequence_parallel: bool = False) -> TransformerConfig:
    """Megatron-Core's TransformerConfig for `shape` (dropout off: alignment runs are deterministic)."""
    activation, gated = _ACTIVATIONS[shape.activation]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.query_groups, ffn_hidden_size=shape.ffn_hidden, kv_channels=shape.head_dim,
        normalization="RMSNorm" if shape.norm == "rmsnorm" else "LayerNorm", layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=gated, activation_func=activation, add_bias_linear=shape.add_bias_linear,
        add_qkv_bias=shape.add_qkv_bias, qk_layernorm=shape.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(), init_method_std=0.02,
    )


def build_gpt(shape: ModelShape, config: TransformerConfig, *, untie: bool = False) -> GPTModel:
    """A GPTModel (local layer spec) for this pipeline rank. `untie` forces a separate output layer."""
    spec = get_gpt_layer_local_spec(
        normalization="RMSNorm" if shape.norm == "rmsnorm" else "LayerNorm", qk_layernorm=shape.qk_layernorm
    )
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=shape.vocab, max_sequence_length=shape.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tie_embeddings and not untie,
        position_embedding_type=_POSITIONS[shape.position], rotary_base=int(shape.rotary_base),
    )
    model.nemoc_shape = shape  # checked against a checkpoint's nemoc_model.json on load
    return model.to(device())


class ScalarHead(MegatronModule):
    """Replaces GPTModel.output_layer: hidden [s, b, h] -> one scalar per token [s, b, 1].

    The weight is replicated across tensor-parallel ranks (one output cannot be sharded); with sequence
    parallelism the hidden states are gathered first, as the vocabulary output layer would.
    Used for the reward model (score of the last token) and the PPO critic (a value per token).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, device=device(), dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, device=device(), dtype=config.params_dtype))
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden)
        return F.linear(hidden, self.weight, self.bias), None


def attach_scalar_head(model: GPTModel) -> GPTModel:
    """Turn a (post-process) GPTModel into a scalar model: forward(..., labels=None) -> [b, s, 1]."""
    if model.post_process:
        model.output_layer = ScalarHead(model.config)
    return model


# ------------------------------------------------------------------------------------- checkpoints


def model_sharded_state_dict(model: GPTModel, *, skip_output: bool = False) -> dict:
    state = model.sharded_state_dict(prefix=f"{MODEL_KEY}.")
    if skip_output:
        state = {k: v for k, v in state.items() if ".output_layer." not in k}
    return state


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory holding a `latest` marker / `iter_*` subdirectories."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    marker = path / "latest"
    if marker.exists():
        name = marker.read_text().strip()
        candidate = path / name if not name.isdigit() else path / f"iter_{int(name):07d}"
        if (candidate / "metadata.json").exists():
            return candidate
    iters = sorted(p for p in path.glob("iter_*") if (p / "metadata.json").exists())
    if iters:
        return iters[-1]
    raise AlignError(f"{path}: no Megatron-Core checkpoint (no metadata.json, `latest` marker or iter_* directory)")


def load_model(model: GPTModel, checkpoint: str | os.PathLike, *, skip_output: bool = False) -> Path:
    """Load the model weights of a dist_checkpointing directory into `model` (any TP/PP layout)."""
    ckpt = resolve_checkpoint(checkpoint)
    _check_shape(model, ckpt)
    state = model_sharded_state_dict(model, skip_output=skip_output)
    loaded = dist_checkpointing.load(state, str(ckpt))
    prefix = f"{MODEL_KEY}."
    weights = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
    missing, _ = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and not (skip_output and "output_layer" in k)]
    if missing:
        raise AlignError(f"{ckpt}: checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    return ckpt


def save_model(model: GPTModel, directory: str | os.PathLike, *, shape: ModelShape, extra: Mapping | None = None) -> Path:
    """Save `model` with dist_checkpointing plus `nemoc_model.json` (architecture, for compatibility checks)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(model), str(directory))
    if torch.distributed.get_rank() == 0:
        info = {"shape": shape.__dict__, **(extra or {})}
        (directory / "nemoc_model.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    torch.distributed.barrier()
    return directory


def _check_shape(model: GPTModel, ckpt: Path) -> None:
    info_path = ckpt / "nemoc_model.json"
    shape = getattr(model, "nemoc_shape", None)
    if shape is None or not info_path.exists():
        return
    saved = json.loads(info_path.read_text()).get("shape", {})
    diffs = [f"{k}: checkpoint {saved[k]!r} != model {v!r}" for k, v in shape.__dict__.items()
             if k in saved and k not in ("seq_length",) and saved[k] != v]
    if diffs:
        raise AlignError(f"{ckpt}: incompatible architecture ({'; '.join(diffs)})")


# ------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """Token-level batch, [b, s] each. `loss_mask` marks the label positions that count."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor  # [b, 1, s, s] bool, True = masked out

    def to(self, dev) -> "Batch":
        return Batch(*(getattr(self, f).to(dev) for f in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")))


def causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids (0 = padding, 1.. = packed samples) -> [b, 1, s, s] bool mask, True = blocked.

    A token attends to earlier tokens of its own segment only (block-diagonal causal), so samples
    packed into one row never see each other; padding attends only to itself (its outputs are unused).
    """
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments.unsqueeze(2) == segments.unsqueeze(1)
    allowed = causal.unsqueeze(0) & same
    allowed |= torch.eye(s, dtype=torch.bool, device=segments.device).unsqueeze(0)
    return (~allowed).unsqueeze(1)


def make_batch(rows: Iterable[tuple[list[int], list[int]]], seq_length: int, pad_id: int = 0) -> Batch:
    """Rows of (token ids, per-token loss weight 0/1 on the *input* positions) -> a padded batch.

    Labels are the next tokens; `loss_mask[t]` is the weight of predicting token t+1 (taken from the
    weight of token t+1). Each row is one segment; see `pack_rows` for several samples per row.
    """
    return pack_rows([[row] for row in rows], seq_length, pad_id)


def pack_rows(packs: Iterable[list[tuple[list[int], list[int]]]], seq_length: int, pad_id: int = 0) -> Batch:
    """Each pack (a list of samples) becomes one row of `seq_length` tokens with a block-diagonal mask.

    Position ids restart at 0 for every sample (learned positions see each sample as if alone; RoPE is
    relative, so within a block it is unaffected by the offset either way).
    """
    packs = list(packs)
    b, s = len(packs), seq_length
    tokens = torch.full((b, s + 1), pad_id, dtype=torch.long)
    weights = torch.zeros((b, s + 1), dtype=torch.float)
    segments = torch.zeros((b, s + 1), dtype=torch.long)
    positions = torch.zeros((b, s + 1), dtype=torch.long)
    for i, pack in enumerate(packs):
        offset = 0
        for seg, (ids, w) in enumerate(pack, start=1):
            n = len(ids)
            if offset + n > s + 1:
                raise AlignError(f"pack of {sum(len(x) for x, _ in pack)} tokens exceeds seq_length+1={s + 1}")
            tokens[i, offset:offset + n] = torch.tensor(ids)
            weights[i, offset:offset + n] = torch.tensor(w, dtype=torch.float)
            segments[i, offset:offset + n] = seg
            positions[i, offset:offset + n] = torch.arange(n)
            offset += n
    # the label at t is token t+1, and it counts only inside the same segment
    same_segment = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    loss_mask = weights[:, 1:] * same_segment
    return Batch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask,
                 position_ids=positions[:, :-1].contiguous(), attention_mask=causal_mask(segments[:, :-1]))


def token_logprobs(model, batch: Batch) -> torch.Tensor:
    """[b, s] log p(label_t | tokens_<=t), via Megatron's (vocab-parallel) cross entropy."""
    return -model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels).float()


def sequence_logprobs(model, batch: Batch) -> torch.Tensor:
    """[b] sum of masked label log-probs per row."""
    return (token_logprobs(model, batch) * batch.loss_mask).sum(-1)


def gather_logits(model, batch: Batch) -> torch.Tensor:
    """Full-vocabulary logits [b, s, v] (gathered across tensor-parallel ranks)."""
    return model(batch.tokens, batch.position_ids, batch.attention_mask, runtime_gather_output=True)


def masked_mean_loss(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (token_loss * mask).sum() / mask.sum().clamp(min=1)


def write_json(path: str | os.PathLike, data: Mapping) -> None:
    """Atomic JSON write (rank 0 only)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
