"""LoRA adapters (Hu et al. 2021) on Megatron-Core's tensor-parallel linear layers.

Input:  a GPTModel (local or Transformer Engine layer spec) whose base weights are already loaded; a `LoraSpec` (rank r,
        alpha, dropout, targets among qkv, proj, fc1, fc2).
Output: the same model with `linear_qkv` / `linear_proj` / `linear_fc1` / `linear_fc2` wrapped in
        `LoraLinear`; every base parameter frozen (`requires_grad=False`, so Megatron DDP gives it no
        gradient buffer and `get_megatron_optimizer` never sees it); adapter-only checkpoints; `merge`
        folds `B @ A * alpha / r` into the base weights and removes the wrappers.

How the adapter matrices follow tensor parallelism (y = base(x) + B A dropout(x) * alpha / r):
  * column-parallel base (linear_qkv, linear_fc1; W sharded on the output dim): A [r, in] is
    replicated, B [out/tp, r] is sharded on the output dim like W. `copy_to_tensor_model_parallel_region`
    between A and B all-reduces the gradient of A x in backward, so A's gradient (and the input's) is
    the full sum over the B shards, identical on every rank. Under sequence parallelism the input is
    all-gathered first (its gradient split back, not reduce-scattered, since it is already complete).
  * row-parallel base (linear_proj, linear_fc2; W sharded on the input dim, x arrives sharded): A
    [r, in/tp] is sharded on the input dim like W, B [out, r] is replicated. The rank-r partial sums
    A_i x_i are all-reduced (r numbers per token instead of `out`), then B is applied on every rank;
    under sequence parallelism the result is scattered along the sequence like the base output.
  * SwiGLU fc1 rows are [gate; up] per rank, so B's rows are too; its checkpoint uses Megatron's
    swiglu sharded factory, exactly like the base weight, so adapter checkpoints reshard across TP.
Multi-latent attention (DeepSeek-V2/V3, Megatron-Core's MLASelfAttention) has no fused linear_qkv: the target
`qkv` adapts each of its query/key/value projections, one adapter each (`MLA_QKV`: linear_q_proj without a
query latent, else linear_q_down_proj and linear_q_up_proj; linear_kv_down_proj, linear_kv_up_proj), the
way peft adapts a DeepSeek model's q_a_proj, q_b_proj, kv_a_proj_with_mqa and kv_b_proj; `proj` adapts
linear_proj as for standard attention. The local spec builds all four (six) as ColumnParallelLinear with
gather_output=False (the down projections' shards are gathered by MLA itself after the GEMM), so the
column rule above holds for each. Transformer Engine's spec runs the down projections duplicated on every
tensor-parallel rank (TELinear parallel_mode='duplicated'): no column rule fits them, so LoRA refuses them
at TP > 1 (at TP 1 they are plain linears).
On TE's layer spec linear_qkv / linear_fc1 fuse the pre-norm (LayerNormColumnParallelLinear): the adapter
normalises its input with the base's norm parameters itself (`LoraLinear._adapter_input`), so it adds
B A norm(x) as on the local spec (tests/runtime/align/test_align_lora_te.py, GPU with TE only).
A is initialised from a generator seeded by (seed, layer name) over the *full* [r, in] matrix and then
sliced, so the initial adapters are identical for any TP size; B starts at zero (the wrapped model
initially computes exactly the base model).
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

from nemoc.runtime.align.common import AlignError, Chunks, unwrap

TARGETS = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1", "fc2": "linear_fc2"}
# Megatron-Core 0.16.1 multi_latent_attention.py MLASelfAttention's query/key/value projections (what `qkv` adapts
# on an MLA layer; linear_q_proj exists without a query latent, linear_q_down/up_proj with one)
MLA_QKV = ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
COLUMN = {"linear_qkv", "linear_fc1", *MLA_QKV}
ROW = {"linear_proj", "linear_fc2"}
ADAPTER_MARK = ".lora_"


class LoraLinear(torch.nn.Module):
    """A frozen Column/RowParallelLinear plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base, *, name: str, rank: int, alpha: float, dropout: float, seed: int, gated: bool):
        super().__init__()
        self.base = base
        self.name = name.rsplit(".", 1)[-1]
        if self.name not in COLUMN | ROW:
            raise AlignError(f"LoRA: no adapter rule for {name}")
        self.column = self.name in COLUMN
        self.gated = gated and self.name == "linear_fc1"
        self.scale = alpha / rank
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        if tp > 1 and getattr(base, "parallel_mode", None) == "duplicated":
            raise AlignError(f"LoRA: {name} is duplicated on every tensor-parallel rank (Transformer Engine's MLA down "
                             f"projection): no adapter rule at tp={tp}; use kernels = local or tensor = 1")
        weight = base.weight
        out_local, in_local = weight.shape
        in_full = in_local if self.column else in_local * tp
        gen = torch.Generator().manual_seed(seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        a_full = torch.empty(rank, in_full)
        torch.nn.init.kaiming_uniform_(a_full, a=math.sqrt(5), generator=gen)  # nn.Linear's default, as in peft
        if not self.column:
            a_full = a_full[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        b_rows = out_local  # column: the local output shard; row: the full output
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.lora_a = torch.nn.Parameter(a_full.to(**kw).contiguous())
        self.lora_b = torch.nn.Parameter(torch.zeros(b_rows, rank, **kw))
        for p in base.parameters():
            p.requires_grad_(False)
        self.enabled = True

    # -------------------------------------------------------------------------------------- forward

    def forward(self, x, *args, **kwargs):
        if hasattr(self.base, "post_layernorm"):
            # Gemma 3's post-attention / post-MLP norm (runtime/gemma.py) follows the whole projection, adapter
            # included: norm(W x + B A x), as peft's adapter on o_proj / down_proj before the HF model's norm
            out = self.base.forward_linear(x, *args, **kwargs)
            if self.enabled:
                out = out + self._delta(x).to(out.dtype)
            return self.base.post_layernorm(out), None
        out, bias = self.base(x, *args, **kwargs)
        if not self.enabled:
            return out, bias
        return out + self._delta(x).to(out.dtype), bias

    def _adapter_input(self, x):
        """What the base GEMM multiplies. Transformer Engine's LayerNormColumnParallelLinear (linear_qkv and
        linear_fc1 in TE's layer spec) takes the un-normalised residual stream and normalises inside the
        fused kernel; the adapter must see the normalised input, so it applies the same norm (the base's
        own `layer_norm_weight` / `layer_norm_bias`, epsilon and zero-centred gamma) itself, in fp32 as TE
        does. A plain Column/RowParallelLinear (the local spec) gets its input normalised already."""
        weight = getattr(self.base, "layer_norm_weight", None)
        if weight is None:
            return x
        cfg = self.base.config
        gamma = weight.float() + 1 if cfg.layernorm_zero_centered_gamma else weight.float()
        shape = (x.shape[-1],)
        if cfg.normalization == "RMSNorm":
            normed = torch.nn.functional.rms_norm(x.float(), shape, gamma, cfg.layernorm_epsilon)
        else:
            bias = getattr(self.base, "layer_norm_bias", None)
            normed = torch.nn.functional.layer_norm(x.float(), shape, gamma, None if bias is None else bias.float(),
                                                    cfg.layernorm_epsilon)
        return normed.to(x.dtype)

    def _delta(self, x):
        x = self.dropout(self._adapter_input(x))
        if self.column:
            if self.sequence_parallel:
                x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            h = torch.nn.functional.linear(x, self.lora_a)
            h = tensor_parallel.copy_to_tensor_model_parallel_region(h)
            return torch.nn.functional.linear(h, self.lora_b) * self.scale
        h = tensor_parallel.reduce_from_tensor_model_parallel_region(torch.nn.functional.linear(x, self.lora_a))
        delta = torch.nn.functional.linear(h, self.lora_b) * self.scale
        if self.sequence_parallel:
            delta = tensor_parallel.scatter_to_sequence_parallel_region(delta)
        return delta

    # ---------------------------------------------------------------------------------- checkpoints

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base layer's tensors under their plain checkpoint keys (`...linear_proj.weight`, so a
        LoRA model loads a base checkpoint and its own training checkpoints alike) but under this
        module's state-dict names (`...linear_proj.base.weight`), so that `load_state_dict` of a
        loaded training checkpoint matches `state_dict()`; plus the adapters."""
        base = self.base.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        state = {f"{prefix}base.{key[len(prefix):]}": value for key, value in base.items()}
        state.update(self.adapter_sharded_state_dict(prefix, sharded_offsets))
        return state

    def adapter_sharded_state_dict(self, prefix, sharded_offsets=()):
        a_key, b_key = f"{prefix}lora_a", f"{prefix}lora_b"
        if self.column:
            a = make_sharded_tensor_for_checkpoint(self.lora_a, a_key, prepend_offsets=sharded_offsets)
            b = make_tp_sharded_tensor_for_checkpoint(self.lora_b, b_key, tp_axis=0, prepend_offsets=sharded_offsets)
            if self.gated:
                b = apply_swiglu_sharded_factory(b, sharded_offsets)
        else:
            a = make_tp_sharded_tensor_for_checkpoint(self.lora_a, a_key, tp_axis=1, prepend_offsets=sharded_offsets)
            b = make_sharded_tensor_for_checkpoint(self.lora_b, b_key, prepend_offsets=sharded_offsets)
        return {a_key: a, b_key: b}

    # ---------------------------------------------------------------------------------------- merge

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of W + B A * alpha / r (column: B_i A; row: B A_i)."""
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


# ------------------------------------------------------------------------------------------ apply


def _layers(model):
    gpt = unwrap(model)
    return gpt.decoder.layers


def is_mla(attention) -> bool:
    """A multi-latent attention layer (MLASelfAttention: a key/value latent instead of linear_qkv)."""
    return getattr(attention, "linear_kv_down_proj", None) is not None


def target_linears(layer, target: str) -> list[tuple[object, str]]:
    """(parent module, attribute) of each linear layer a fused-name target adapts in `layer`: one, or on a
    multi-latent attention layer every MLA query/key/value projection for `qkv`."""
    attr = TARGETS[target]
    if attr in ("linear_qkv", "linear_proj"):
        attn = layer.self_attention
        if attr == "linear_qkv" and is_mla(attn):
            return [(attn, a) for a in MLA_QKV if getattr(attn, a, None) is not None]
        return [(attn, attr)]
    return [(layer.mlp, attr)]


def apply_lora(model, peft, *, seed: int = 1234) -> list[str]:
    """Wrap the target projections of every layer, freeze everything else. Returns the wrapped names
    (virtual-pipeline chunks: each chunk's layers; names and seeds use global layer numbers)."""
    if isinstance(model, Chunks):
        return [name for chunk in model for name in apply_lora(chunk, peft, seed=seed)]
    if peft.rank <= 0:
        raise AlignError(f"LoRA rank must be positive (got {peft.rank})")
    unknown = [t for t in peft.targets if t not in TARGETS]
    if unknown:
        raise AlignError(f"LoRA targets {unknown} are unknown (choose from {', '.join(TARGETS)})")
    gpt = unwrap(model)
    for p in gpt.parameters():
        p.requires_grad_(False)
    gated = bool(gpt.config.gated_linear_unit)
    wrapped = []
    for layer in _layers(model):
        for target in peft.targets:
            for parent, attr in target_linears(layer, target):
                base = getattr(parent, attr, None)
                if base is None or isinstance(base, LoraLinear):
                    continue
                if not hasattr(base, "weight") or base.weight is None or base.weight.dim() != 2:
                    raise AlignError(f"LoRA: layer {layer.layer_number} {attr} is not a plain linear layer (MoE?)")
                name = f"decoder.layers.{layer.layer_number - 1}.{'self_attention' if parent is layer.self_attention else 'mlp'}.{attr}"
                setattr(parent, attr, LoraLinear(base, name=name, rank=peft.rank, alpha=peft.alpha,
                                                 dropout=peft.dropout, seed=seed, gated=gated))
                wrapped.append(name)
    if not wrapped:
        raise AlignError("LoRA: no layer was wrapped")
    return wrapped


@contextlib.contextmanager
def disabled(model):
    """The base model: adapters switched off (DPO's reference policy under LoRA costs no extra memory)."""
    wrappers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in wrappers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in wrappers:
            m.enabled = True


def adapters(model) -> dict[str, torch.nn.Parameter]:
    """The adapter parameters by name (virtual-pipeline chunks: `chunk{i}.` before each chunk's names)."""
    if isinstance(model, Chunks):
        return {f"chunk{i}.{n}": p for i, chunk in enumerate(model) for n, p in adapters(chunk).items()}
    return {n: p for n, p in unwrap(model).named_parameters() if ADAPTER_MARK in n}


def adapter_sharded_state_dict(model, prefix: str = "model.") -> dict:
    """Only the adapters (what an adapter checkpoint holds). The sharded tensors' keys are global (layer
    numbers with the chunk's offset), so virtual-pipeline chunks save under their own dict keys
    (`chunk{i}.`) into the same checkpoint any other layout reads."""
    if isinstance(model, Chunks):
        return {f"chunk{i}.{k}": v for i, chunk in enumerate(model)
                for k, v in adapter_sharded_state_dict(chunk, prefix).items()}
    state = unwrap(model).sharded_state_dict(prefix=prefix)
    return {k: v for k, v in state.items() if ADAPTER_MARK in k}


def save_adapters(model, directory, *, info: dict) -> None:
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from nemoc.runtime.align.common import write_json

    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(adapter_sharded_state_dict(model), str(directory))
    write_json(Path(directory) / "nemoc_adapter.json", info)
    torch.distributed.barrier()


def load_adapters(model, directory) -> None:
    from megatron.core import dist_checkpointing

    state = adapter_sharded_state_dict(model)
    loaded = dist_checkpointing.load(state, str(directory))
    params = {(k.split(".", 1)[0] + ".model." + k.split(".", 1)[1]) if isinstance(model, Chunks) else f"model.{k}": p
              for k, p in adapters(model).items()}
    with torch.no_grad():
        for key, value in loaded.items():
            params[key].copy_(value)


@torch.no_grad()
def merge(model) -> int:
    """Fold every adapter into its base weight and unwrap it; returns the number of merged layers."""
    if isinstance(model, Chunks):
        return sum(merge(chunk) for chunk in model)
    merged = 0
    for layer in _layers(model):
        for parent in (layer.self_attention, layer.mlp):
            for attr in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", *MLA_QKV):
                module = getattr(parent, attr, None)
                if isinstance(module, LoraLinear):
                    module.base.weight.copy_(module.merged_weight())
                    setattr(parent, attr, module.base)
                    merged += 1
    for p in unwrap(model).parameters():
        p.requires_grad_(True)
    return merged
