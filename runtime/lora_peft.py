"""LoRA with peft's granularity: separate q, k, v (and gate, up) adapters on Megatron's fused layers, rsLoRA.

Input:  a GPTModel (local layer spec, base weights loaded), `rank`, `alpha`, `targets` named as peft names
        Llama's projections (q k v o gate up down), `rslora`, `dropout`, `seed`.
Output: the model with adapters installed, every base parameter frozen. Megatron fuses q, k and v into
        one `linear_qkv` and SwiGLU's gate and up into one `linear_fc1`; peft, adapting Hugging Face's
        separate `q_proj`/`k_proj`/`v_proj`/`gate_proj`/`up_proj`, gives each its *own* pair (A, B). So
        do we: `SplitLoraLinear` keeps one (A_p, B_p) per part p and scatters each part's update into the
        fused output layout ([q_1..q_{h/g}, k, v] per query group for linear_qkv; [gate; up] for
        linear_fc1), so the adapted model computes what peft computes on the exported model (tested to
        1e-5 against peft on identical weights). o (linear_proj) and down (linear_fc2) have one adapter
        each (runtime/align/lora.py's row-parallel `LoraLinear`).
Scaling: alpha / r (Hu et al. 2021), or alpha / sqrt(r) with `rslora` (Kalajdzievski 2023), as peft's
        `use_rslora`. A: kaiming-uniform (a = sqrt 5, nn.Linear's and peft's init), B: zeros.
Invariants: `SplitLoraLinear` is a `lora.LoraLinear`, so lora.disabled / adapters / save_adapters /
        load_adapters / merge treat it like the fused adapters (merge folds sum_p scatter(B_p A_p) * s).
        Tensor parallelism: each part follows the column-parallel rule (A_p replicated, B_p sharded on
        its output rows, which are this rank's query groups / ffn shard).
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

from nemoc.runtime.align import lora
from nemoc.runtime.align.common import Chunks
from nemoc.runtime.model import unwrap

PEFT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
QKV, FC1 = ("q", "k", "v"), ("gate", "up")


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _init_a(rank: int, fan_in: int, seed: int, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    a = torch.empty(rank, fan_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return a


class SplitLoraLinear(lora.LoraLinear):
    """A frozen column-parallel fused layer (linear_qkv or a gated linear_fc1) with one adapter per part."""

    def __init__(self, base, *, name: str, parts: tuple[str, ...], rank: int, scale: float, dropout: float,
                 seed: int, config):
        torch.nn.Module.__init__(self)
        self.base, self.name, self.column, self.gated, self.scale = base, name.rsplit(".", 1)[-1], True, False, scale
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        tp = parallel_state.get_tensor_model_parallel_world_size()
        out_local, fan_in = base.weight.shape
        if self.name == "linear_qkv":
            self.groups = config.num_query_groups // tp
            d = config.kv_channels
            self.sizes = {"q": config.num_attention_heads // config.num_query_groups * d, "k": d, "v": d}
        else:
            self.groups = 1
            self.sizes = {"gate": out_local // 2, "up": out_local // 2}
        assert self.groups * sum(self.sizes.values()) == out_local, (name, self.sizes, out_local)
        self.parts = tuple(p for p in self.sizes if p in parts)
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        for p in self.parts:
            setattr(self, f"lora_a_{p}", torch.nn.Parameter(_init_a(rank, fan_in, seed, f"{name}.{p}").to(**kw)))
            setattr(self, f"lora_b_{p}", torch.nn.Parameter(torch.zeros(self.groups * self.sizes[p], rank, **kw)))
        for param in base.parameters():
            param.requires_grad_(False)
        self.enabled = True

    def _assemble(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-part updates [..., groups * size_p] -> the fused layout [..., out_local] (zeros for parts
        without an adapter)."""
        some = next(iter(deltas.values()))
        lead = some.shape[:-1]
        pieces = [deltas[p].reshape(*lead, self.groups, size) if p in deltas
                  else some.new_zeros(*lead, self.groups, size) for p, size in self.sizes.items()]
        return torch.cat(pieces, dim=-1).reshape(*lead, -1)

    def _delta(self, x):
        x = self.dropout(x)
        if self.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        deltas = {}
        for p in self.parts:
            h = tensor_parallel.copy_to_tensor_model_parallel_region(torch.nn.functional.linear(x, getattr(self, f"lora_a_{p}")))
            deltas[p] = torch.nn.functional.linear(h, getattr(self, f"lora_b_{p}")) * self.scale
        return self._assemble(deltas)

    def adapter_sharded_state_dict(self, prefix, sharded_offsets=()):
        state = {}
        for p in self.parts:
            a_key, b_key = f"{prefix}lora_a_{p}", f"{prefix}lora_b_{p}"
            state[a_key] = make_sharded_tensor_for_checkpoint(getattr(self, f"lora_a_{p}"), a_key, prepend_offsets=sharded_offsets)
            state[b_key] = make_tp_sharded_tensor_for_checkpoint(getattr(self, f"lora_b_{p}"), b_key, tp_axis=0,
                                                                 prepend_offsets=sharded_offsets)
        return state

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        deltas = {p: (getattr(self, f"lora_b_{p}").float() @ getattr(self, f"lora_a_{p}").float()).t() * self.scale
                  for p in self.parts}
        return (self.base.weight.float() + self._assemble(deltas).t()).to(self.base.weight.dtype)


def apply_lora(model, *, rank: int, alpha: float, targets=PEFT_TARGETS, rslora: bool = False, dropout: float = 0.0,
               seed: int = 1234) -> list[str]:
    """Install adapters on every layer's targeted projections; freeze everything else. Returns the names."""
    unknown = sorted(set(targets) - set(PEFT_TARGETS))
    if unknown or not targets:
        raise lora.AlignError(f"LoRA targets {unknown or '[]'} are unknown (choose from {', '.join(PEFT_TARGETS)})")
    if rank <= 0:
        raise lora.AlignError(f"LoRA rank must be positive (got {rank})")
    gpt = unwrap(model)
    for p in gpt.parameters():
        p.requires_grad_(False)
    scale, gated = scaling(alpha, rank, rslora), bool(gpt.config.gated_linear_unit)
    split_qkv = [t for t in QKV if t in targets]
    if split_qkv and any(lora.is_mla(layer.self_attention) for layer in gpt.decoder.layers):
        raise lora.AlignError(f"LoRA targets {split_qkv}: a multi-latent attention layer has no separate q, k and v "
                              "projections (its keys and values come from one latent); use `qkv` (an adapter on each "
                              "MLA projection)")
    wrapped = []
    for layer in gpt.decoder.layers:
        prefix = f"decoder.layers.{layer.layer_number - 1}"
        attn, mlp = layer.self_attention, layer.mlp
        plan = [(attn, "linear_qkv", tuple(t for t in QKV if t in targets), True),
                (attn, "linear_proj", ("o",) if "o" in targets else (), False),
                (mlp, "linear_fc1", tuple(t for t in FC1 if t in targets), gated),
                (mlp, "linear_fc2", ("down",) if "down" in targets else (), False)]
        for parent, attr, parts, split in plan:
            base = getattr(parent, attr, None)
            if not parts or base is None or isinstance(base, lora.LoraLinear):
                continue
            name = f"{prefix}.{'self_attention' if parent is attn else 'mlp'}.{attr}"
            if split:
                module = SplitLoraLinear(base, name=name, parts=parts, rank=rank, scale=scale, dropout=dropout,
                                         seed=seed, config=gpt.config)
            else:  # one adapter: o, down, or a non-gated fc1 (its "up")
                module = lora.LoraLinear(base, name=name, rank=rank, alpha=alpha, dropout=dropout, seed=seed, gated=False)
                module.scale = scale
            setattr(parent, attr, module)
            wrapped.append(name)
    return wrapped


FUSED = {"qkv": QKV, "fc1": FC1}  # Megatron/NeMo names of one adapter on a fused layer, and its peft parts
SAME = {"proj": "o", "fc2": "down"}  # one layer, one adapter, two names


def check_targets(targets) -> str | None:
    """Why a LoRA target list is inconsistent (a fused layer named with its parts), or None."""
    for fused, parts in FUSED.items():
        both = [t for t in parts if t in targets]
        if fused in targets and both:
            return f"`{fused}` (one adapter on the fused layer) and {', '.join(f'`{t}`' for t in both)} (separate adapters) adapt the same layer"
    return None


def apply_peft(model, peft, *, seed: int = 1234) -> list[str]:
    """A stage's `peft = lora(...)`: Megatron/NeMo's fused adapters (targets qkv proj fc1 fc2, scale
    alpha / r) through `lora.apply_lora`, unchanged; with peft's names (q k v o gate up down) or `rslora`,
    the adapters above (fused names there keep one adapter on their fused layer)."""
    if isinstance(model, Chunks):  # virtual-pipeline chunks: each its own layers (global names and seeds)
        return [name for chunk in model for name in apply_peft(chunk, peft, seed=seed)]
    targets = tuple(peft.targets)
    rslora = bool(getattr(peft, "rslora", False))
    if not rslora and set(targets) <= set(lora.TARGETS):
        return lora.apply_lora(model, peft, seed=seed)
    problem = check_targets(targets)
    if problem:
        raise lora.AlignError(f"LoRA targets: {problem}")
    split = tuple(dict.fromkeys(SAME.get(t, t) for t in targets if t not in FUSED))
    wrapped = apply_lora(model, rank=peft.rank, alpha=peft.alpha, targets=split, rslora=rslora, dropout=peft.dropout,
                         seed=seed) if split else []
    fused = [t for t in targets if t in FUSED]
    if fused:
        gpt = unwrap(model)
        if not split:  # apply_lora froze every base parameter; here nothing has yet
            for p in gpt.parameters():
                p.requires_grad_(False)
        for layer in gpt.decoder.layers:
            for t in fused:
                for parent, attr in lora.target_linears(layer, t):  # MLA: `qkv` is each MLA q/kv projection
                    base = getattr(parent, attr)
                    name = f"decoder.layers.{layer.layer_number - 1}.{'self_attention' if t == 'qkv' else 'mlp'}.{attr}"
                    module = lora.LoraLinear(base, name=name, rank=peft.rank, alpha=peft.alpha, dropout=peft.dropout,
                                             seed=seed, gated=bool(gpt.config.gated_linear_unit))
                    module.scale = scaling(peft.alpha, peft.rank, rslora)
                    setattr(parent, attr, module)
                    wrapped.append(name)
    return wrapped
