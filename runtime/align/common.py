"""What every stage after pretraining shares: process group, GPTModel construction, checkpoints, log-probs.

Input:  a compiled `Plan` (its `ModelSpec`, precision and a `StagePlan`'s layout).
Output: Megatron-Core objects: an initialised `parallel_state`, `GPTModel`s (policy, reference, reward,
critic) built by the training core (`runtime/core/build.py build_chunks`), and per-token
log-probabilities computed with Megatron's vocab-parallel cross entropy (so every function here is
correct under tensor parallelism: logits stay sharded on the vocabulary).
Invariants: the CPU adaptation (`nemoc.runtime.mcore_cpu.apply`) is applied before any Megatron object
is built when CUDA is absent; checkpoints are Megatron-Core `dist_checkpointing` directories, so a
checkpoint written under one TP/PP layout loads under any other (this is how export gathers shards).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nemoc.runtime import core  # noqa: F401  (the CPU adaptation, before any Megatron import)
from nemoc.runtime import mcore_cpu
from nemoc.runtime.atomic import atomic_write_json
from nemoc.runtime.core import dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from nemoc.compiler.plan import Layout  # noqa: E402
from nemoc.runtime import checkpoint as ckpt  # noqa: E402
from nemoc.runtime.core import build as core_build  # noqa: E402
from nemoc.runtime import megatron_args as margs  # noqa: E402
from nemoc.runtime import model as mmodel  # noqa: E402

MODEL_KEY = "model"  # top-level key of the model's sharded state dict inside a checkpoint
unwrap = mmodel.unwrap


class AlignError(RuntimeError):
    """A user-facing failure of an alignment stage (bad data, incompatible checkpoint): no traceback."""


# ------------------------------------------------------------------------------------ process group


def init_distributed(*, tp: int = 1, pp: int = 1, cp: int = 1, vp: int | None = None, ep: int = 1, etp: int = 1,
                     seed: int = 1234, host=None) -> None:
    """The training core's process group and model-parallel groups (runtime.core.dist, the one caller of
    initialize_model_parallel) for tp x pp x cp x (the rest: data parallel), with `vp` virtual pipeline
    stages per pipeline rank (the interleaved schedule) and the experts of a MoE model split over `ep`
    ranks (of the data-parallel ranks) x `etp` (their tensor-parallel group), then the core's seeding
    (graph-safe where the stage's `host` settings capture CUDA graphs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp * cp):
        raise AlignError(f"world size {world} is not a multiple of tp({tp}) * pp({pp}) * cp({cp})")
    dp = world // (tp * pp * cp)
    try:
        layout = dataclasses.replace(single_layout(tp=tp, pp=pp, cp=cp, vp=vp, ep=ep, dp=dp, global_batch=dp),
                                     etp=etp)
        dist.init_distributed(layout=layout)
    except dist.TaskError as exc:
        raise AlignError(str(exc)) from None
    dist.set_seed(seed, host)


def seed_all(seed: int) -> None:
    """The core's seeding (Python, NumPy, torch, the tensor-parallel RNG tracker)."""
    dist.set_seed(seed)


teardown_distributed = dist.teardown
device = dist.device


# ------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelShape:
    """The slice of a `ModelSpec` that decides the GPTModel's architecture (and checkpoint compatibility).

    `vocab` is the real vocabulary (what export keeps); Megatron holds it padded to 128 * tp rows.
    """

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
    experts: int = 0  # mixture of experts (0: dense); export refuses MoE models
    top_k: int = 0
    moe_ffn_hidden: int | None = None
    shared_expert_ffn_hidden: int = 0
    # a MoE model's dense layers (`ModelSpec.moe_layer_pattern` 0s), "0,1,2" ("" for none): a string, so the JSON
    # of a checkpoint compares equal; one saved before the field existed compares as "" (`_check_shape`)
    dense_layers: str = ""

    @classmethod
    def of(cls, spec, vocab: int | None = None, seq_length: int | None = None) -> "ModelShape":
        return cls(
            layers=spec.layers, hidden=spec.hidden, heads=spec.heads, query_groups=spec.query_groups,
            ffn_hidden=spec.ffn_hidden, vocab=vocab or spec.vocab, seq_length=seq_length or spec.seq_length,
            head_dim=spec.head_dim, activation=spec.activation, norm=spec.norm, position=spec.position,
            rotary_base=spec.rotary_base, tie_embeddings=spec.tie_embeddings, add_bias_linear=spec.add_bias_linear,
            add_qkv_bias=spec.add_qkv_bias, qk_layernorm=spec.qk_layernorm, norm_epsilon=spec.norm_epsilon,
            experts=spec.experts, top_k=spec.top_k, moe_ffn_hidden=spec.moe_ffn_hidden,
            shared_expert_ffn_hidden=spec.shared_expert_ffn_hidden,
            dense_layers=",".join(str(i) for i, v in enumerate(spec.moe_layer_pattern) if not v)
            if spec.has_dense_layers else "",
        )


def single_layout(*, tp: int = 1, pp: int = 1, dp: int = 1, micro_batch: int = 1, global_batch: int = 1,
                  sequence_parallel: bool = False, vp: int | None = None, cp: int = 1, ep: int = 1) -> Layout:
    """A resolved Layout for tests and one-process tools (export, evaluation)."""
    return Layout(tp=tp, pp=pp, vp=vp, cp=cp, ep=ep, etp=1, dp=dp, micro_batch=micro_batch,
                  global_batch=global_batch, num_microbatches=max(1, global_batch // (micro_batch * dp)),
                  sequence_parallel=sequence_parallel, distributed_optimizer=False, recompute="none")


def machine_facts() -> margs.MachineFacts:
    """The facts a model built outside a stage plan (tools, tests, `build_gpt` without `facts`) is built
    with: Megatron-Core's local layer spec. A stage builds with its plan's kernels instead
    (stage.build: `core.dist.machine_facts(stage.kernels)`, TE where installed)."""
    return margs.MachineFacts(cpu=mcore_cpu.is_applied(), have_te=False)


def build_gpt(spec, layout: Layout, *, precision: str = "fp32", vocab: int | None = None,
              seq_length: int | None = None, attention_backend: str = "unfused", scalar_head: bool = False,
              execution=None, facts: margs.MachineFacts | None = None):
    """This pipeline rank's GPTModel chunk, built by the training core (runtime.core.build
    `build_chunks`, the construction pretraining uses), so parameters and checkpoints match the
    pretraining stage's.

    A stage passes its `execution` (kernels, attention core, precision recipe, pipeline split, vocabulary
    padding: runtime/align/stage.py `build`); tools and tests pass `precision` and `attention_backend`
    (`unfused`, Megatron's DotProductAttention, honours an explicit attention mask). `scalar_head`
    replaces the vocabulary output layer by a one-output head (reward model, critic).
    Returns the chunk (Float16Module-wrapped for bf16/fp16); `unwrap(chunk)` is the GPTModel. With
    virtual pipeline stages (`layout.vp`) the rank holds vp chunks: a `Chunks` (torch ModuleList: one
    `.parameters()`, `.eval()`, `.train()`; `chunk_list` gives the list the schedules take).
    `vocab` is the tokenizer's vocabulary (padded like pretraining); `seq_length` sizes the learned
    position table exactly as runtime.train does (the stage's sequence length).
    """
    shape = ModelShape.of(spec, vocab, seq_length)
    try:
        built, _, _ = core_build.build_chunks(
            model=spec, layout=layout, vocab_size=shape.vocab, seq_length=shape.seq_length,
            facts=facts or machine_facts(), execution=execution, precision=precision,
            attention_backend=attention_backend, head=ScalarHead if scalar_head else None)
    except margs.UnsupportedPlan as exc:
        raise AlignError(str(exc)) from None
    for chunk in built:
        unwrap(chunk).nemoc_shape = shape  # checked against a checkpoint's nemoc_model.json on load
    return built[0] if len(built) == 1 else Chunks(built)


class Chunks(torch.nn.ModuleList):
    """The model chunks of one rank under virtual pipeline parallelism (Megatron's interleaved schedule:
    chunk i holds virtual stage i of this pipeline rank), handled as one model by the alignment code
    (parameters, train/eval, freezing, checkpoints, LoRA) and as `list(chunks)` by the schedules."""


def chunk_list(model) -> list:
    """The chunks of a model as the schedules take them: `Chunks` -> its list, a list as it is, else [model]."""
    if isinstance(model, (Chunks, list, tuple)):
        return list(model)
    return [model]


class ScalarHead(MegatronModule):
    """Replaces GPTModel.output_layer: hidden [s, b, h] -> one scalar per token [s, b, 1].

    The weight is replicated across tensor-parallel ranks (one output cannot be sharded); with sequence
    parallelism the hidden states are gathered first, as the vocabulary output layer would.
    Used for the reward model (score of the last token) and the PPO critic (a value per token).
    """

    scalar_head = True  # runtime/hf/load.py `load_full`: take a checkpoint's output_layer whole, no vocabulary

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, device=device(), dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, device=device(), dtype=config.params_dtype))
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden)
        return F.linear(hidden, self.weight, self.bias), None


# ------------------------------------------------------------------------------------- checkpoints


def model_sharded_state_dict(model, *, skip_output: bool = False) -> dict:
    """{"model": GPTModel sharded state dict} ({"model0": ..., "model1": ...} for virtual-pipeline chunks):
    the layout `runtime.checkpoint` saves for pretraining. Tensors are matched by their global keys, so a
    checkpoint written under one TP/PP/VP layout loads under any other."""
    states = ckpt.model_sharded_state_dict(chunk_list(model))
    if skip_output:
        states = {key: {k: v for k, v in state.items() if not k.startswith("output_layer.")}
                  for key, state in states.items()}
    return states


def _is_checkpoint(path: Path) -> bool:
    """A dist_checkpointing directory (`metadata.json`), or a Megatron-FSDP stage's fsdp_dtensor checkpoint
    (torch.distributed.checkpoint's `.metadata`, its manifest naming the format)."""
    if (path / "metadata.json").exists():
        return True
    return (path / ".metadata").exists() and ckpt.checkpoint_format(str(path)) == "fsdp_dtensor"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory (dist_checkpointing `metadata.json`, or an fsdp_dtensor checkpoint), or a root
    with a `latest` marker."""
    path = Path(path)
    if _is_checkpoint(path):
        return path
    latest = ckpt.read_latest(str(path))
    if latest and _is_checkpoint(Path(latest)):
        return Path(latest)
    if not path.exists():
        raise AlignError(f"checkpoint {path} does not exist")
    raise AlignError(f"{path}: not a Megatron-Core checkpoint (no metadata.json and no `latest` marker)")


def load_model(model, checkpoint: str | os.PathLike, *, skip_output: bool = False) -> Path:
    """Load the model weights of a dist_checkpointing directory into `model`, whatever TP/PP layout wrote
    it. `skip_output` keeps this model's own output layer (a scalar head on a language-model trunk). A
    Megatron-FSDP stage's fsdp_dtensor checkpoint is read as full tensors and sliced for this layout
    (runtime/checkpoint.py `load_full_weights`)."""
    path = resolve_checkpoint(checkpoint)
    if (path / ckpt.MANIFEST).exists():
        reason = ckpt.verify_on_all_ranks(str(path))
        if reason is not None:
            raise AlignError(f"checkpoint {path} is unusable: {reason}")
    _check_shape(model, path)
    if ckpt.checkpoint_format(str(path)) == "fsdp_dtensor":
        try:
            ckpt.load_full_weights(str(path), chunks=chunk_list(model), skip_output=skip_output)
        except ckpt.CheckpointError as exc:
            raise AlignError(str(exc)) from None
        return path
    loaded = dist_checkpointing.load(ckpt.fresh_tensors(model_sharded_state_dict(model, skip_output=skip_output)),
                                     str(path))
    chunks = chunk_list(model)
    keys = [MODEL_KEY] if len(chunks) == 1 else [f"{MODEL_KEY}{i}" for i in range(len(chunks))]
    missing = [k for chunk, key in zip(chunks, keys) for k in unwrap(chunk).load_state_dict(loaded[key], strict=False)[0]]
    missing = [k for k in missing if not k.endswith("_extra_state") and not (skip_output and k.startswith("output_layer."))]
    if missing:
        raise AlignError(f"checkpoint {path} lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    return path


def save_model(model, directory: str | os.PathLike, *, extra: Mapping | None = None) -> Path:
    """Model-only checkpoint (runtime.checkpoint.save_weights' layout) plus `nemoc_model.json`, which
    records the architecture so a later stage can refuse an incompatible checkpoint with a clear message."""
    directory = Path(directory)
    ckpt.save_weights(str(directory), chunks=chunk_list(model))
    if torch.distributed.get_rank() == 0:
        info = {"shape": dataclasses.asdict(unwrap(chunk_list(model)[0]).nemoc_shape), **(extra or {})}
        (directory / "nemoc_model.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    torch.distributed.barrier()
    return directory


def _check_shape(model, path: Path) -> None:
    info_path = path / "nemoc_model.json"
    shape = getattr(unwrap(chunk_list(model)[0]), "nemoc_shape", None)
    if shape is None or not info_path.exists():
        return
    saved = json.loads(info_path.read_text()).get("shape", {})
    # a checkpoint saved before `dense_layers` was recorded had every layer of a MoE model an expert layer (the
    # DeepSeek presets too, before their dense first layers): compared as "" rather than skipped, so a model
    # with dense layers refuses it here, not inside dist_checkpointing with missing keys
    saved.setdefault("dense_layers", "")
    # the sequence length sizes a weight only as learned absolute position embeddings ([seq, hidden]);
    # with RoPE or no positions a child stage may train longer or shorter sequences than its parent
    free = () if shape.position == "learned" else ("seq_length",)
    diffs = [f"{k}: checkpoint {saved[k]!r} != model {v!r}" for k, v in dataclasses.asdict(shape).items()
             if k in saved and saved[k] != v and k not in free]
    if diffs:
        raise AlignError(f"{path}: incompatible architecture ({'; '.join(diffs)})")


# ------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """Token-level batch, [b, s] each. `loss_mask` marks the label positions that count.

    Either an explicit `attention_mask` (Megatron's unfused core), or `packed_seq_params` (variable-length
    attention: the b rows run as one `thd` sequence of b * s tokens whose segments are the packed samples
    and each row's padding; no [s, s] tensor anywhere). `run` hands either to the model."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # [b, 1, s, s] bool, True = masked out
    packed_seq_params: object | None = None  # megatron.core.packed_seq_params.PackedSeqParams
    cp: int = 1  # context parallelism: the [b, s / cp] tensors are this rank's shard (`on_this_cp_rank`)

    def to(self, dev) -> "Batch":
        moved = {f: getattr(self, f).to(dev) for f in ("tokens", "labels", "loss_mask", "position_ids")}
        mask = self.attention_mask.to(dev) if self.attention_mask is not None else None
        packed = self.packed_seq_params
        if packed is not None:
            packed = dataclasses.replace(packed, cu_seqlens_q=packed.cu_seqlens_q.to(dev),
                                         cu_seqlens_kv=packed.cu_seqlens_kv.to(dev))
        return Batch(**moved, attention_mask=mask, packed_seq_params=packed, cp=self.cp)

    def shaped(self, output: torch.Tensor) -> torch.Tensor:
        """A last-stage output of a packed batch ([1, b * s, ...]) back in rows ([b, s, ...]); anything
        else (an unpacked batch's output, a pipeline stage's hidden states [t, 1, h]) as it is."""
        b, s = self.tokens.shape
        if self.packed_seq_params is None or output.dim() < 2 or output.shape[0] != 1 or output.shape[1] != b * s:
            return output
        return output.reshape(b, s, *output.shape[2:])

    def pipeline_shape(self) -> tuple[int, int]:
        """(sequence, micro-batch) of the activations the pipeline sends: a packed batch is one row of b x s;
        the whole sequence under context parallelism (the schedule divides it by cp)."""
        b, s = self.tokens.shape
        return (b * s, 1) if self.packed_seq_params is not None else (s * self.cp, b)


def cp_size() -> int:
    """The context-parallel group's size (1 outside a process group)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def on_this_cp_rank(batch: Batch, *, segments: torch.Tensor | None = None) -> Batch:
    """This context-parallel rank's shard of a batch of whole rows, as pretraining shards its batches
    (megatron.core.utils get_batch_on_this_cp_rank: the sequence cut into 2 x cp chunks, rank r keeps
    chunks r and 2cp-1-r, balancing the causal work). Attention is plain causal (the attention core
    gathers the group's keys and values); `segments` [b, s] (0 = padding) must hold one sample per row:
    rows packed with several samples need Transformer Engine's THD attention with CP, refused here. The
    batch as it is when cp = 1."""
    cp = cp_size()
    if cp == 1:
        return batch
    s = batch.tokens.shape[1]
    if s % (2 * cp):
        raise AlignError(f"context parallelism: seq_length({s}) must be a multiple of 2 x cp({cp}) = {2 * cp} "
                         "(each rank holds two of 2 x cp equal chunks)")
    if segments is not None and int(segments.max()) > 1:
        raise AlignError(f"context parallelism (cp={cp}) with packed rows (several samples per row): packed "
                         "sequences are split over CP ranks only by Transformer Engine's THD attention, which this "
                         "runtime does not drive; set pack = false for this stage, or context = 1")
    from megatron.core.utils import get_batch_on_this_cp_rank

    shard = get_batch_on_this_cp_rank({"tokens": batch.tokens, "labels": batch.labels, "loss_mask": batch.loss_mask,
                                       "position_ids": batch.position_ids})
    return Batch(**shard, attention_mask=None, packed_seq_params=None, cp=cp)


def cp_gather(x: torch.Tensor) -> torch.Tensor:
    """This context-parallel rank's shard of whole rows ([b, s / cp, ...], `on_this_cp_rank`) -> the whole
    rows [b, s, ...] in sequence order, on every rank of the group: for what runs along a row's tokens in
    order (PPO's rewards at each row's last token and its GAE scan). Not differentiable (experience
    passes). The tensor as it is when cp = 1."""
    cp = cp_size()
    if cp == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(cp)]
    torch.distributed.all_gather(shards, x.contiguous(), group=parallel_state.get_context_parallel_group())
    c = x.shape[1] // 2
    pieces = [None] * (2 * cp)
    for rank, shard in enumerate(shards):  # rank r holds chunks r and 2cp-1-r (get_batch_on_this_cp_rank)
        pieces[rank], pieces[2 * cp - 1 - rank] = shard[:, :c], shard[:, c:]
    return torch.cat(pieces, dim=1)


def cp_shard(x: torch.Tensor) -> torch.Tensor:
    """Whole rows [b, s, ...] -> this context-parallel rank's shard (the inverse of `cp_gather`; the split
    of `on_this_cp_rank`, Megatron's get_batch_on_this_cp_rank). The tensor as it is when cp = 1."""
    if cp_size() == 1:
        return x
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank({"rows": x})["rows"]


def cp_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over the context-parallel group of each rank's partial sums (per-row sums of its tokens).
    Differentiable: the backward sums every rank's gradient, the adjoint of a total that every rank's loss
    uses. The identity when cp = 1."""
    if cp_size() == 1:
        return x
    return _ContextSum.apply(x, parallel_state.get_context_parallel_group())


class _ContextSum(torch.autograd.Function):
    """All-reduce (sum) over a group; backward: the all-reduce of the gradients (`cp_sum`)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def cp_share(loss: torch.Tensor) -> torch.Tensor:
    """A loss every context-parallel rank computes in full (from `cp_sum`s) as this rank's share: Megatron's
    schedule multiplies a loss function's (loss, reports) loss by cp and DDP averages gradients over
    dp x cp (schedules.py forward_step_calc_loss), so the shares of the cp ranks add up to the loss once."""
    return loss / cp_size()


def row_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b] masked per-row sums over the whole sequence (the CP group's shards added)."""
    return cp_sum((values * mask).sum(-1))


def run(model, batch: Batch, **kwargs):
    """model(batch) on the model's last pipeline stage: per-token loss [b, s] (with `labels=`), logits or
    values [b, s, ...]; a packed batch runs as one `thd` sequence and comes back in rows."""
    if batch.packed_seq_params is None:
        return model(batch.tokens, batch.position_ids, batch.attention_mask, **kwargs)
    b, s = batch.tokens.shape
    if kwargs.get("labels") is not None:
        kwargs["labels"] = kwargs["labels"].reshape(1, b * s)
    out = model(batch.tokens.reshape(1, b * s), batch.position_ids.reshape(1, b * s), None,
                packed_seq_params=batch.packed_seq_params, **kwargs)
    return batch.shaped(out)


def logprob_forward(loss_of: Callable, *, reports: tuple[str, ...]) -> Callable:
    """The forward step of the kinds whose loss is a function of the policy's token log-probs (DPO/IPO,
    KTO, ORPO): the micro-batch `mb["batch"]` runs with its labels (Megatron's vocab-parallel cross
    entropy, no [b, s, v] logits leave the last stage), and the last stage's loss function is
    `loss_of(mb, token_logps [b, s])` -> (this rank's loss share, reports); `reports` names them for the
    core's loop (the loss first)."""

    def forward(model, mb):
        batch = mb["batch"]
        token_loss = run(model, batch, labels=batch.labels)
        return token_loss, lambda output: loss_of(mb, -batch.shaped(output).float())

    forward.reports = reports
    return forward


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


def make_batch(rows: Iterable[tuple[list[int], list[int]]], seq_length: int, pad_id: int = 0, *,
               varlen: bool = False) -> Batch:
    """Rows of (token ids, per-token loss weight 0/1 on the *input* positions) -> a padded batch.

    Labels are the next tokens; `loss_mask[t]` is the weight of predicting token t+1 (taken from the
    weight of token t+1). Each row is one segment; see `pack_rows` for several samples per row.
    """
    return pack_rows([[row] for row in rows], seq_length, pad_id, varlen=varlen)


def pack_rows(packs: Iterable[list[tuple[list[int], list[int]]]], seq_length: int, pad_id: int = 0, *,
              varlen: bool = False) -> Batch:
    """Each pack (a list of samples) becomes one row of `seq_length` tokens, attended block-diagonally:
    with a [b, 1, s, s] mask (Megatron's unfused core), or with `varlen` as variable-length segments
    (`PackedSeqParams`, cu_seqlens over the samples and each row's padding: the SDPA core of
    runtime/model.py or Transformer Engine's attention; O(s) memory).

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
    inputs = segments[:, :-1]
    if cp_size() > 1:  # this rank's shard of whole rows, plain causal attention (no mask, no thd)
        batch = Batch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask,
                      position_ids=positions[:, :-1].contiguous(), attention_mask=None)
        return on_this_cp_rank(batch, segments=inputs).to(device())
    batch = Batch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask,
                  position_ids=positions[:, :-1].contiguous(),
                  attention_mask=None if varlen else causal_mask(inputs),
                  packed_seq_params=packed_segments(inputs) if varlen else None)
    return batch.to(device())


def packed_segments(segments: torch.Tensor):
    """[b, s] segment ids -> PackedSeqParams (thd) over the b rows laid end to end: one segment per run
    of equal ids in a row (a sample, or the row's padding, which attends only among itself and whose
    outputs no loss reads)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = segments.shape
    flat = segments.reshape(-1)
    starts = torch.ones(b * s, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # every row starts a segment
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([b * s])]).to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds.clone(),
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def forward_only(model, batches, fn, *, everywhere: bool = False) -> list:
    """`fn(batch, last-stage output)` for each batch, forward only, under any pipeline layout
    (core.loop.forward_only): on the last pipeline stage, or everywhere (broadcast). `fn` should return
    host values when `everywhere` (they are pickled over the pipeline group)."""
    from nemoc.runtime.core.loop import forward_only as scheduled

    def step(chunk, item):
        batch, extra = item if isinstance(item, tuple) else (item, None)
        output = run(chunk, batch, **(extra or {}))
        return output, (lambda out: fn(batch, batch.shaped(out)))

    return scheduled(model, list(batches), step, shape=lambda item: (item[0] if isinstance(item, tuple) else item)
                     .pipeline_shape(), everywhere=everywhere)


def token_logprobs(model, batch: Batch) -> torch.Tensor:
    """[b, s] log p(label_t | tokens_<=t), via Megatron's (vocab-parallel) cross entropy, on every rank at
    any pipeline layout (a forward-only schedule whose last stage broadcasts them: `forward_only`); this
    context-parallel rank's shard of the sequence under cp."""
    return forward_everywhere(model, batch, lambda b, out: -out.float(), labels=batch.labels)


def forward_everywhere(model, batch: Batch, fn, **kwargs) -> torch.Tensor:
    """`fn(batch, last-stage output)` of one forward-only pass, a tensor on the batch's device of every
    rank: called directly without pipelining, else through `forward_only` (one micro-batch, the last
    stage's result sent to the others; PPO's and GRPO's experience passes)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return fn(batch, run(model, batch, **kwargs))
    (out,) = forward_only(model, [(batch, kwargs)], lambda b, o: fn(b, o).cpu(), everywhere=True)
    return out.to(batch.tokens.device)


def sequence_logprobs(model, batch: Batch) -> torch.Tensor:
    """[b] sum of masked label log-probs per row (over the whole sequence)."""
    return row_sums(token_logprobs(model, batch), batch.loss_mask)


def gather_logits(model, batch: Batch) -> torch.Tensor:
    """Full-vocabulary logits [b, s, v] (gathered across tensor-parallel ranks)."""
    return run(model, batch, runtime_gather_output=True)


def masked_mean_loss(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (token_loss * mask).sum() / mask.sum().clamp(min=1)


def write_json(path: str | os.PathLike, data: Mapping) -> None:
    """Atomic JSON write (rank 0 only)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    atomic_write_json(path, data)
