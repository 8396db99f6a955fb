"""The memory model: bytes per GPU on the most-loaded pipeline stage, as a named breakdown.

Input:  a `ModelSpec`, a resolved `Layout`, the precision, attention backend, sequence length,
stage kind (pretrain | sft | dpo | reward | ppo | eval | export), optional LoRA, and the GPU.
Output: `MemoryBreakdown` (weights, gradients, optimizer, activations, other + named `parts`), so a
diagnostic can say which term overflows and by how much.
Invariants: pure; every term is a small function with its derivation and citation; more TP/PP/EP
never increases a per-GPU term; recompute never increases activations.

Model states (Megatron-Core `docs/source/api-guide/dist_optimizer.md`, "bf16 param, fp32 grads"):
  weights 2 B/param (bf16/fp16; fp8 training keeps bf16 weights, Transformer Engine casts per GEMM),
  gradients 4 B/param: Megatron DDP accumulates and reduces "main grads" in fp32
  (`DistributedDataParallelConfig(grad_reduce_in_fp32=True)`, which the nemoc runtime sets and
  Megatron-LM forces for bf16); the gradient buffer is also the DDP bucket storage,
  optimizer 12 B/param: fp32 master weights, Adam m and v; the distributed optimizer shards them over
  the data-parallel(-with-context-parallel) group: 2 + 4 + 12 = 18 B/param vs 6 + 12/DP.
  fp32 training: 4 + 4 + 8 (no master copy) = 16 vs 8 + 8/DP.
Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", Sec. 4, Table 2): per layer s b h (34 + 5 a s / h) bytes with 16-bit activations, dropout and
an unfused softmax; we keep each of its terms and generalise them (GQA: K and V are g/a of Q; gated
MLP: fc1 output is 2f wide; flash attention never materialises the s x s scores; no dropout masks
when dropout is 0, as in every modern recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from nemoc.compiler.catalog.hardware import HardwareSpec, get_gpu
from nemoc.compiler.catalog.userbuffers import buffer_bytes, userbuffers_of
from nemoc.compiler.flops import (LOW_PRECISIONS, bf16_dense_layers_per_stage, bf16_layers_per_stage,
                                  dense_layers_per_stage, mtp_stage_params, recomputed_fraction)
from nemoc.compiler.flops import (  # noqa: F401 - lora_params_per_layer is re-exported
    is_gated,
    layers_on_stage,
    lora_params_of_layers,
    lora_params_per_layer,
    padded_vocab,
    param_counts,
    stage_work,
)
from nemoc.compiler.plan import Layout, MemoryBreakdown, selective_modules
from nemoc.compiler.params import StageParams
from nemoc.compiler.spec import LoraSpec, ModelSpec
from nemoc.dsl.schema import TRAINING_KINDS  # the one table of stage kinds (dsl.schema.STAGE_KIND_TABLE)

MIB = 1 << 20
GIB = 1 << 30

# CUDA context, cuBLAS/cuDNN workspaces and Transformer Engine workspaces: the driver-side memory a
# training process holds before the first tensor (about 0.5-0.8 GiB on Hopper/Blackwell; we round up).
CUDA_CONTEXT_BYTES = 1 * GIB
# NCCL buffers per communicator that carries traffic: NCCL_BUFFSIZE (4 MiB) x up to 32 channels x
# 2 ring peers, for the Simple protocol (plus LL/LL128) -> order 256 MiB per active group.
NCCL_BYTES_PER_GROUP = 256 * MIB
# PyTorch caching-allocator fragmentation of the dynamic (activation-like) memory: a documented
# fraction, not fitted (Megatron-LM reports 5-10 % between reserved and allocated in long runs).
FRAGMENTATION = 0.05



# ----------------------------------------------------------------------------------- model states


@dataclass(frozen=True, slots=True)
class StateBytes:
    """Bytes per trainable parameter: weights, gradients, optimizer (already divided by the shard),
    held through the step; `step`: what the optimizer step allocates on top and frees before the next
    forward (not part of `total`)."""

    weights: float
    gradients: float
    optimizer: float
    step: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


# NVFP4 (Transformer Engine NVFP4BlockScaling): E2M1 values, 0.5 B, and one E4M3 scale per 16 elements.
NVFP4_BYTES = 0.5 + 1.0 / 16.0
# CUDA graphs: a captured region's temporaries (tensors eager mode frees inside the layer: GEMM
# workspaces, casts, intermediate norms and activations) stay allocated in the graph's private pool
# for the graph's lifetime. NeMo's CUDA-graph guide measures this as ~20 % more activation memory
# (GPT-3 20B: +15 GB; docs.nvidia.com NeMo "Cudagraphs for NeMo"); applied to the captured share.
CUDA_GRAPH_TEMPORARY_SHARE = 0.20


def cross_entropy_bytes(cross_entropy: str) -> float:
    """Bytes per logit the loss keeps for the backward pass, by `cross_entropy_fusion` (te | native | none).
    `none`, the local spec's vocab-parallel cross entropy (Megatron-Core `tensor_parallel/cross_entropy.py`),
    keeps the fp32 softmax (exp logits); the 16-bit logits are freed once cast. Measured on H200 with
    Megatron-Core 0.16.1: the dynamic memory of a fully recomputed model is inputs + 4 B x s x b x V
    (docs/calibration.md). `native`, Megatron-Core's fused loss (fusions/fused_cross_entropy.py), saves the
    same fp32 softmax (`ctx.save_for_backward(exp_logits, ...)`): 4 B. `te`, Transformer Engine's fused
    cross entropy (Megatron-Bridge's performance recipes): TE 2.1-2.17 write the softmax gradient over the
    16-bit logits in place in the forward and keep that tensor, 2 B (TE 2.18 keeps an fp32 gradient
    instead: 4 B, as the local spec)."""
    return 2.0 if cross_entropy == "te" else 4.0


def cuda_graph_buffers(activations: float, captured_share: float) -> float:
    """Bytes the CUDA graphs' static pools hold beyond the eager activations: the captured share of
    each layer times the measured temporary fraction above, over the activations the stage holds."""
    return CUDA_GRAPH_TEMPORARY_SHARE * captured_share * activations


# Megatron-FSDP (optim_grads_params) gathers one FSDP unit (a transformer layer, or the embedding /
# output layer) at a time and prefetches the next one: two units' 16-bit weights are whole on the GPU,
# and in the backward two units' unsharded gradients wait for their reduce-scatter.
FSDP_UNITS_IN_FLIGHT = 2


def fsdp_buffers(unit_params: float, weight_bytes_: float, grad_bytes: float) -> float:
    """Bytes of Megatron-FSDP's gathered weights and unsharded gradients (FSDP_UNITS_IN_FLIGHT units)."""
    return FSDP_UNITS_IN_FLIGHT * unit_params * (weight_bytes_ + grad_bytes)


def weight_bytes(precision: str) -> int:
    """Bytes per stored weight: fp32 training keeps fp32 weights, every other mode keeps 16-bit
    weights (fp8/mxfp8 GEMMs cast from bf16; the fp8 copies are counted in `fp8_weight_cache`)."""
    return 4 if precision == "fp32" else 2


def state_bytes_per_param(precision: str, *, distributed_optimizer: bool, shard: int,
                          grad_bytes: int = 4, moment_bytes: int = 4, master_bytes: int = 4,
                          grad_copy: bool = True) -> StateBytes:
    """Mixed-precision Adam (Megatron dist_optimizer.md table): 2 + 4 + 12 = 18 B/param, or with the
    distributed optimizer 6 + 12/shard; fp32: 4 + 4 + 8 = 16, or 8 + 8/shard. `shard` is the size of
    the group the optimizer state is sharded over (DP x CP for dense, expert-DP for experts).
    `grad_bytes=2` (16-bit gradient buffer, `grad_reduce_in_fp32=False`, as NeMo's FP8 performance
    recipes set): 2 + 2 + 12 = 16 B/param, or 4 + 12/shard, held through the step, and an fp32 copy
    of the gradient shard (4, or 4/shard) that only the optimizer step holds: the table's "fp16 param,
    fp16 grads" row counts 16/shard, but Megatron-Core 0.16.1 allocates that copy in the step
    (distrib_optimizer.py `shard_main_param.grad = shard_model_grad.float()`) and frees it in
    `zero_grad(set_to_none=True)` before the next forward-backward, so it never meets the activations.
    `moment_bytes` / `master_bytes`: bytes of each Adam moment and of the master weight (`optimizer_bytes`:
    2 / 2 with 16-bit moments and the master kept as a 16-bit remainder). `grad_copy = False`: Transformer
    Engine's FusedAdam owns the master weight and reads the 16-bit gradient shard in place (`optimizer_bytes`),
    so the step makes no fp32 copy of it."""
    w = weight_bytes(precision)
    moments = 2 * moment_bytes
    if precision == "fp32":
        return StateBytes(w, 4, moments / shard if distributed_optimizer else moments)  # m + v, no master copy
    div = shard if distributed_optimizer else 1
    return StateBytes(w, grad_bytes, (master_bytes + moments) / div,
                      (4.0 if grad_bytes == 2 and grad_copy else 0.0) / div)  # master + m + v


def optimizer_bytes(layout: Layout, precision: str, fp8_recipe: str | None) -> tuple[int, int, bool]:
    """(bytes per Adam moment, bytes per master weight, whether the step copies a 16-bit gradient shard to
    fp32) of the distributed optimizer. 4 / 4 / copy by default (Megatron-Core's own Adam:
    distrib_optimizer.py `shard_main_param.grad = shard_model_grad.float()`). The precision-aware optimizer
    (`layout.precision_aware_optimizer`, Transformer Engine's FusedAdam): moments of `optimizer_state_dtype`
    (`exp_avg_dtype`, `exp_avg_sq_dtype`: 2 bytes with bf16, 4 with fp32, as the recipes' bf16 Adam), and
    where Megatron-Core lets FusedAdam own the master weight (`use_precision_aware_optimizer_no_fp8_or_ds_fp8`:
    no FP8 recipe -- bf16, fp16, and nvfp4, whose recipe is TransformerConfig's fp4_recipe -- or FP8 with
    delayed scaling) with bf16 weights, the fp32 master stored as its low 16 bits beside the
    bf16 weight (`store_param_remainders`, on by default; TE >= 2.1; distrib_optimizer.py `master_param` as
    int16) and the gradient shard handed over in place (`decoupled_grad = shard_model_grad`: no fp32 copy);
    else a 4-byte fp32 master kept by Megatron-Core, and its fp32 gradient copy."""
    if not layout.precision_aware_optimizer:
        return 4, 4, True
    moment = 2 if layout.optimizer_state_dtype == "bf16" else 4
    # nvfp4 sets no fp8_recipe (Megatron-Core's FP4 recipe lives in TransformerConfig.fp4_recipe, and the
    # runtime passes OptimizerConfig.fp8_recipe = None), so Megatron-Core lets FusedAdam own its master weights
    owned = (precision in ("bf16", "fp16", "nvfp4")
             or (precision in ("fp8", "mxfp8") and fp8_recipe == "delayed"))
    remainders = owned and precision != "fp16"  # the remainder completes a bf16 weight, not an fp16 one
    return moment, (2 if remainders else 4), not owned


# ----------------------------------------------------------------------------------- activations


@dataclass(frozen=True, slots=True)
class LayerActivations:
    """Bytes one transformer layer keeps for backward, for one micro batch, on one GPU."""

    norms: float  # inputs of the two pre-norms (and of Gemma 3's two post-block norms)
    attention: float  # QKV input, Q/K/V, core-attention output (= output-projection input)
    scores: float  # unfused attention: softmax output (+ dropout mask and output), a x s x s
    mlp: float  # MLP input, fc1 output, activation output (MoE: routed tokens and expert tensors)
    dropout: float  # 1-byte dropout masks after attention and MLP

    @property
    def total(self) -> float:
        return self.norms + self.attention + self.scores + self.mlp + self.dropout


KERNELS = ("te", "local")


@lru_cache(maxsize=4096)  # pure; the plan search asks for the same layer many times (memory.estimate)
def layer_activations(model: ModelSpec, *, seq: int, micro_batch: int, tp: int, sp: bool, cp: int = 1,
                      etp: int = 1, recompute: str = "none", attention_backend: str = "flash",
                      dropout: bool = False, act_bytes: int = 2, kernels: str = "te",
                      fp8: bool = False, recompute_modules: tuple[str, ...] | None = None) -> LayerActivations:
    """Korthikanti et al. 2022 Sec. 4.1, generalised (see module docstring). With SP every term is
    divided by TP; without SP the norm/dropout inputs and the QKV/MLP inputs (10 sbh in Table 2)
    are replicated and the rest divided (24 sbh / t). CP divides the sequence. Selective recompute
    (Megatron `recompute_modules=["core_attn"]`) drops the s x s term; full recompute keeps only the
    layer input (2 sbh, / t with SP).

    `kernels`: "te" = Transformer Engine's fused kernels (what NeMo / Megatron-Bridge run, and what
    Korthikanti's formula assumes); "local" = Megatron-Core's local layer spec on plain PyTorch (the
    nemoc runtime where TE is not installed), which keeps more, as measured on an H200
    (docs/calibration.md): the unfused GLU also keeps act(x1) (+f), GQA expands K and V to every
    head before the attention kernel (+2 (a - g) d), torch's RMSNorm keeps an fp32 copy of its input
    (+4 h per norm), and the unfused softmax keeps fp32 probabilities and their 16-bit copy (6 B per
    score instead of 2).

    `fp8` (FP8/MXFP8 with Transformer Engine): a linear layer keeps the quantised copy of its input
    for the weight gradient (1 byte; TE `Linear`/`LayerNormLinear`/`LayerNormMLP` save the FP8 input
    or its transpose), so the QKV input, the MLP input and the fc2 input take 1 byte per element;
    the attention output is kept twice, 16-bit by the attention kernel and FP8 by the projection.

    `recompute_modules` (recompute = selective; None = Megatron's default [core_attn]): what each
    module's recompute frees, from the layer code that honours it (`_selective_freed`)."""
    s, b, h = seq / cp, micro_batch, model.hidden
    a, g, d = model.heads, model.query_groups, model.head_dim
    rep = tp if sp else 1  # divisor of the terms that live in the sequence-parallel region
    if recompute == "full":
        return LayerActivations(act_bytes * s * b * h / rep, 0.0, 0.0, 0.0, 0.0)
    local = kernels == "local"
    fp8 = fp8 and not local
    gemm_in = 1 if fp8 else act_bytes  # bytes of a saved linear-layer input
    sbh = s * b * h
    n_norms = 4 if model.post_block_norms else 2  # Gemma 3's sandwich norms keep their inputs too
    norms = n_norms * act_bytes * sbh / rep
    if model.multi_latent_attention:
        attention = gemm_in * sbh / rep + mla_activations(model, s=s, b=b, tp=tp, rep=rep, act_bytes=act_bytes,
                                                          local=local)
    else:
        attention = gemm_in * sbh / rep + act_bytes * s * b * d * (2 * a + 2 * g) / tp
    if fp8:
        attention += s * b * a * model.v_dim / tp  # the projection's FP8 copy of the attention output
    if local or model.norm_zero_centered:  # the runtime's (1 + w) RMSNorm computes in fp32 too
        norms += n_norms * 4.0 * sbh / rep if model.norm == "rmsnorm" else 0.0
        attention += act_bytes * s * b * d * 2 * (a - g) / tp if not model.multi_latent_attention else 0.0
    modules = selective_modules(recompute, recompute_modules)
    if attention_backend == "unfused" and "core_attn" not in modules:
        softmax = 3 * act_bytes if local else act_bytes
        per_score = softmax + (1 + act_bytes if dropout else 0)  # softmax out (+ mask + dropout out)
        scores = per_score * a * s * (seq / cp) * b / tp
    elif attention_backend != "unfused" and "core_attn" not in modules:
        scores = 4.0 * s * b * a / tp  # flash: fp32 softmax stats (log-sum-exp), inside a core_attn checkpoint
    else:
        scores = 0.0
    mlp = gemm_in * sbh / rep + _mlp_activations(model, s * b, tp=tp, rep=rep, etp=etp, act_bytes=act_bytes)
    if fp8 and not model.is_moe:  # fc2 input (activation output) kept in FP8
        mlp -= (act_bytes - 1) * s * b * model.ffn_hidden / tp
    if local and is_gated(model) and not model.is_moe:
        mlp += act_bytes * s * b * model.ffn_hidden / tp
    drop = 2.0 * sbh / rep if dropout else 0.0
    if modules:
        freed = _selective_freed(model, modules, s=s, b=b, tp=tp, rep=rep, etp=etp, act_bytes=act_bytes,
                                 gemm_in=gemm_in, local=local, unfused=attention_backend == "unfused",
                                 mlp=mlp)
        norms, attention, mlp = norms - freed[0], attention - freed[1], mlp - freed[2]
    return LayerActivations(norms, attention, scores, mlp, drop)


def mla_activations(model: ModelSpec, *, s: float, b: int, tp: int, rep: int, act_bytes: int,
                    local: bool) -> float:
    """Bytes one multi-latent attention layer keeps beyond its input (the down projections' shared input,
    counted by the caller), from Megatron-Core 0.16.1's MLASelfAttention.get_query_key_value_tensors and
    forward (no recompute, no RoPE fusion):

    - the query latent (q_lora_rank wide) twice, the input of q_layernorm and of linear_q_up_proj (the
      norm's output), and the key/value latent (kv_lora_rank) twice, the input of kv_layernorm and of
      linear_kv_up_proj; both gathered over TP and scattered back to the sequence-parallel region, so
      divided by `rep` (no query latent: linear_q_proj reads the layer input, already counted). Without
      `qk_layernorm` the norms are IdentityOp: one copy each. The local spec's torch RMSNorm keeps an
      fp32 copy of each latent too.
    - query and key, heads x (qk_head_dim + qk_pos_emb_head_dim) each (`torch.cat` of the no-PE part and
      the rotated part, the key's RoPE part expanded to every head: real copies), and the value,
      heads x v_head_dim (`.contiguous()`), all saved by the core attention, / TP;
    - the core's output, heads x v_head_dim / TP (linear_proj's input).
    The RoPE multiplications save only the cos / sin tables (constants)."""
    copies = 2 if model.qk_layernorm else 1
    latents = (model.q_lora_rank + model.kv_lora_rank) * s * b / rep
    kept = copies * act_bytes * latents
    if local and model.qk_layernorm and model.norm == "rmsnorm":
        kept += 4.0 * latents
    heads = act_bytes * s * b * model.heads * (2 * model.qk_dim + 2 * model.v_dim) / tp
    return kept + heads


def mla_up_proj_freed(model: ModelSpec, *, s: float, b: int, tp: int, act_bytes: int) -> float:
    """What `recompute_modules = [mla_up_proj]` frees (multi_latent_attention.py: the up projections and
    RoPE run inside `CheckpointWithoutOutput`, whose outputs query, key and value are discarded once the
    core attention has run, `discard_output_and_register_recompute`); the latents stay (the checkpoint's
    inputs)."""
    return act_bytes * s * b * model.heads * (2 * model.qk_dim + model.v_dim) / tp


def _selective_freed(model: ModelSpec, modules: tuple[str, ...], *, s: float, b: int, tp: int, rep: int,
                     etp: int, act_bytes: int, gemm_in: float, local: bool, unfused: bool,
                     mlp: float) -> tuple[float, float, float]:
    """Bytes selective recompute of `modules` frees from the (norms, attention, mlp) terms of one layer
    (Megatron-Core 0.16.1; the s x s scores of `core_attn` are dropped by the caller):

    - `core_attn` (attention.py `_checkpointed_attention_forward`, `tensor_parallel.checkpoint`): keeps
      Q, K, V (its inputs, already counted); the local core's GQA copies of K and V expanded to every
      head (dot_product_attention.py `repeat_interleave`) are made inside the checkpoint, so are freed.
    - `layernorm` (transformer_layer.py `CheckpointWithoutOutput`, `discard_output_and_register_recompute`):
      the norm runs under no_grad and its output's storage is released once the next module has run, so
      the next linear's saved input (the norm output) and the norm's own saved tensors (torch RMSNorm's
      fp32 copy) go; the norm's input stays (the checkpoint's input, the residual). Only norms that are
      modules of their own (not IdentityOp): both with the local spec, only a MoE layer's pre-MLP norm
      with Transformer Engine, which fuses the others into the next linear.
    - `mlp` (dense layers; `tensor_parallel.checkpoint(self.mlp, ...)`): keeps only its input: the local
      spec's 16-bit norm output (itself freed with `layernorm`); with Transformer Engine the pre-MLP norm is
      fused into fc1 (TELayerNormColumnParallelLinear), so the input is the residual stream, which `norms`
      counts as that norm's input: nothing more is kept.
    - `moe` (moe_layer.py `tensor_parallel.checkpoint` of the whole MoELayer): keeps only its input.
    - `moe_act` (experts.py `CheckpointWithoutOutput` around the activation): the experts' activation
      output (fc2 input), routed rows x f / etp.
    - `shared_experts` (moe_layer.py, `tensor_parallel.checkpoint` of the shared expert MLP): its fc1
      output and activation output; its input is the MoE layer's."""
    a, g, d, h = model.heads, model.query_groups, model.head_dim, model.hidden
    sbh = s * b * h
    norms = attention = mlp_freed = 0.0
    if "core_attn" in modules and local and unfused and not model.multi_latent_attention:
        attention += act_bytes * s * b * d * 2 * (a - g) / tp
    if "mla_up_proj" in modules and model.multi_latent_attention:
        attention += mla_up_proj_freed(model, s=s, b=b, tp=tp, act_bytes=act_bytes)
    own_pre_norm = local or model.is_moe  # the pre-MLP norm is a module of its own
    if "layernorm" in modules:
        if local:  # the input norm: QKV's saved input and the fp32 copy of torch's RMSNorm
            attention += gemm_in * sbh / rep
            norms += 4.0 * sbh / rep if model.norm == "rmsnorm" else 0.0
        if own_pre_norm:
            mlp_freed += gemm_in * sbh / rep
            norms += 4.0 * sbh / rep if local and model.norm == "rmsnorm" else 0.0
    # what the MLP / MoE checkpoint keeps: its input, the pre-MLP norm's output where that norm is a module of
    # its own (unless `layernorm` frees it); with TE a dense layer's norm is fused into fc1, so the checkpoint's
    # input is the residual stream, the fused norm's input that `norms` counts already
    kept_input = 0.0 if ("layernorm" in modules or not own_pre_norm) else act_bytes * sbh / rep
    whole = ("mlp" in modules and not model.is_moe) or ("moe" in modules and model.is_moe)
    if whole:
        return norms, attention, mlp - kept_input
    if model.is_moe and "moe_act" in modules:
        f = (model.moe_ffn_hidden or model.ffn_hidden) / etp
        mlp_freed += act_bytes * s * b * model.top_k / rep * etp * _capacity_rows(model) * f
    if model.is_moe and "shared_experts" in modules and model.shared_expert_ffn_hidden:
        mlp_freed += act_bytes * s * b * (model.shared_expert_ffn_hidden / tp) * (3 if is_gated(model) else 2)
    return norms, attention, mlp_freed


def _capacity_rows(model: ModelSpec) -> float:
    """The expert tensors' rows over the balanced mean load: 1 dropless (memory sizes the mean, as
    before), c drop-and-pad (`moe_pad_to_capacity`), min(1, c) with dropping only."""
    c = model.moe_capacity_factor
    if c is None:
        return 1.0
    return c if model.moe_pad_to_capacity else min(1.0, c)


def _mlp_activations(model: ModelSpec, tokens: float, *, tp: int, rep: int, etp: int, act_bytes: int) -> float:
    """fc1 output (2f wide when gated) and activation output (fc2 input), Korthikanti's 16 sbh for a
    4h GELU MLP. MoE (Megatron-Core MoELayer, alltoall dispatcher, dropless with balanced routing):
    each GPU receives on average tokens x top_k / rep routed copies (SP-sharded tokens sent over EP),
    all-gathered over ETP; it keeps the permuted expert input, the expert tensors (width / ETP), the
    expert output for unpermute, and fp32 router logits. With a capacity factor c the expert tensors hold
    c x the mean rows when padded to capacity (drop-and-pad: every expert exactly its capacity), at most
    min(1, c) x them when tokens are only dropped."""
    if not model.is_moe:
        f = model.ffn_hidden / tp
        return act_bytes * tokens * f * (3 if is_gated(model) else 2)
    f = (model.moe_ffn_hidden or model.ffn_hidden) / etp
    routed = tokens * model.top_k / rep * etp * _capacity_rows(model)
    experts = routed * (2 * act_bytes * model.hidden + act_bytes * f * (3 if is_gated(model) else 2))
    router = 4.0 * tokens * model.experts / rep
    shared = 0.0
    if model.shared_expert_ffn_hidden:
        shared = act_bytes * tokens * (model.shared_expert_ffn_hidden / tp) * (3 if is_gated(model) else 2)
    return experts + router + shared


def in_flight_microbatches(pp: int, vp: int | None, num_microbatches: int, stage: int = 0) -> float:
    """Micro batches whose activations a pipeline stage holds at its peak. 1F1B: stage i holds
    min(pp - i, m) (Narayanan et al. 2021 Sec. 2.2.1); the interleaved schedule multiplies the first
    stage's by (1 + (pp - 1) / (pp x vp)) (Korthikanti et al. 2022 Sec. 4.2.3; Megatron-LM
    `theoretical_memory_usage.py`)."""
    held = float(min(pp - stage, num_microbatches))
    if vp and vp > 1 and pp > 1 and stage == 0:
        held *= 1 + (pp - 1) / (pp * vp)
    return held


# ------------------------------------------------------------------------------------ resident models


# Models that end in a scalar head (h -> 1, the nemoc runtime's `ScalarHead`) instead of the vocabulary
# output layer: the reward model (its score at the last token) and the PPO critic (a value per token).
SCALAR_HEAD_MODELS = frozenset({"reward", "critic"})


def resident_models(stage_kind: str, params: object = None, *, peft: LoraSpec | None = None,
                    parents: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Which models a stage keeps in GPU memory. DPO (Rafailov et al. 2023) needs a frozen reference
    policy unless its log-probabilities are precomputed (`reference = precomputed`); with LoRA the reference is the base model with adapters
    disabled (NeMo/Megatron-Bridge), so it costs nothing extra. PPO (Ouyang et al. 2022) keeps the
    actor and critic (trained) and the reward and reference models (frozen), all resident; with LoRA
    no reference (the actor with its adapters off), and the critic is still trained whole. KTO needs a
    reference as DPO does; ORPO (Hong et al. 2024) none; GRPO a reference (beta > 0, no LoRA) and a
    reward model unless a verifier scores the completions. An eval stage (`parents`: the kinds of the
    stages it runs after, in order) holds the first parent's model, and for `eval after POLICY, REFERENCE`
    the second's too (implicit rewards of held-out pairs); after a reward stage, the reward model."""
    params = StageParams.of(stage_kind, params)
    if stage_kind == "eval":
        if parents and parents[0] == "reward":
            return ("reward",)
        return ("policy", "reference") if len(parents) >= 2 and parents[1] != "reward" else ("policy",)
    if stage_kind == "dpo":
        precomputed = params.reference == "precomputed" or params.reference_free
        return ("policy",) if (precomputed or peft is not None) else ("policy", "reference")
    if stage_kind == "kto":  # KTO (Ethayarajh et al. 2024) scores against a reference as DPO does
        return ("policy",) if peft is not None else ("policy", "reference")
    if stage_kind == "grpo":
        # GRPO (Shao et al. 2024): the KL term needs the reference unless beta = 0 (or LoRA: adapters off);
        # rewards come from a verifier (no model) or the reward model of the stage's `reward` parent.
        reference = () if peft is not None or params.beta == 0 else ("reference",)
        return ("policy",) + reference + (() if params.reward else ("reward",))
    if stage_kind == "ppo":  # with LoRA the reference is the actor with its adapters off (`runners.run_ppo`)
        return ("actor", "critic", "reward") + (() if peft is not None else ("reference",))
    if stage_kind == "reward":
        return ("reward",)
    return ("policy",)


# ----------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True, slots=True)
class _Stage:
    """One pipeline stage's local parameter counts (after TP / EP sharding)."""

    dense: float
    expert: float
    layers: int
    first: bool
    last: bool
    dense_layers: int = 0  # of `layers`, a MoE model's dense ones (flops.dense_layers_per_stage)
    mtp: int = 0  # multi-token prediction depths built here (the last stage: flops.mtp_stage_params)


def rollout_kv_cache(model: ModelSpec, layout: Layout, *, seq: int, rows: int, layers: float) -> float:
    """Bytes of the KV cache a pipeline stage holds while decoding a rollout (the nemoc runtime's
    generator on Megatron-Core's StaticInferenceContext, one key and one value tensor per layer of this stage, each
    [sequence, batch, query groups / tp, head dim] in 16-bit; MLA: every head's key of qk + pe and value of
    v_head_dim channels, as Megatron-Core caches them without `cache_mla_latents`): the DP rank's whole batch at once
    (m micro batches x micro batch x rows sequences, no micro-batching), up to `seq` positions. Under
    pipeline parallelism each stage caches only its own `layers`. Not divided by context parallelism:
    every CP rank decodes the whole rows (the sequence is split only for the training passes), so each
    holds the whole sequence's cache."""
    batch = layout.num_microbatches * layout.micro_batch * rows
    groups = max(1.0, model.kv_heads / layout.tp)  # MLA (no latent cache in training): keys and values per head
    return seq * batch * groups * (model.qk_dim + model.v_dim) * 2.0 * layers


def _local_stage(model: ModelSpec, layout: Layout, stage: int, vocab: int, scalar_head: bool,
                 split: tuple[int, int, int] | None = None) -> _Stage:
    counts = param_counts(model)
    n = layers_on_stage(model.layers, layout.pp, stage, split)
    d = dense_layers_per_stage(model, layout.pp, layout.vp, split)[stage]
    first, last = stage == 0, stage == layout.pp - 1
    expert = (n - d) * counts.expert / (layout.ep * layout.etp)
    dense = (counts.layer_params(n - d, d) - (n - d) * counts.expert) / layout.tp
    if first:
        dense += vocab * model.hidden / layout.tp + (model.seq_length * model.hidden if model.position == "learned" else 0)
    if last:
        dense += counts.final_norm
        if scalar_head:
            dense += model.hidden
        elif not model.tie_embeddings or layout.pp > 1:
            dense += vocab * model.hidden / layout.tp
    mtp = model.mtp_num_layers if last and not scalar_head else 0
    if mtp:  # the MTP depths: their layers sharded as the decoder's, eh_proj column-parallel; + the embedding copy
        mtp_dense, mtp_expert, mtp_embedding = mtp_stage_params(model, counts, layout.pp)
        expert += mtp_expert / (layout.ep * layout.etp)
        dense += mtp_dense / layout.tp + (vocab * model.hidden / layout.tp if mtp_embedding else 0.0)
    return _Stage(dense, expert, n, first, last, d, mtp)


def mtp_depth_activations(model: ModelSpec, layout: Layout, *, seq: int, micro_batch: int, backend: str,
                          dropout: bool, kernels: str, fp8: bool) -> float:
    """Bytes one multi-token prediction depth keeps for backward per micro batch (Megatron-Core 0.16.1
    transformer/multi_token_prediction.py `MultiTokenPredictionLayer`): its transformer layer (the last layer's kind:
    `layer_activations`) plus the inputs of enorm and hnorm, eh_proj's 2h input, the final norm's input and the
    shared output layer's input (2 + 2 + 4 + 2 + 2 = 12 sbh bytes in 16 bits, / t under sequence parallelism; the
    local spec's torch RMSNorm keeps an fp32 copy of each of its three norms' inputs). Full recompute: Megatron's
    uniform method checkpoints the depth (`_checkpointed_forward`), keeping its two inputs (4 sbh) and the output
    layer's; the block method (`recompute_layers`) skips it ("not supported for MTP yet"), so the depth keeps
    everything. Selective recompute acts inside its layer as in any other."""
    s, b, h = seq / layout.cp, micro_batch, model.hidden
    rep = layout.tp if layout.sequence_parallel else 1
    sbh = s * b * h / rep
    kind = model if model.mtp_layer_is_moe or not model.is_moe else model.dense_layer_model
    if layout.recompute == "full" and layout.recompute_layers is None:
        return 4.0 * sbh + 2.0 * sbh
    recompute = "none" if layout.recompute == "full" else layout.recompute
    layer = layer_activations(kind, seq=seq, micro_batch=b, tp=layout.tp, sp=layout.sequence_parallel, cp=layout.cp,
                              etp=layout.etp, recompute=recompute, attention_backend=backend, dropout=dropout,
                              kernels=kernels, fp8=fp8, recompute_modules=layout.recompute_modules).total
    fp32_norms = 3 * 4.0 * sbh if kernels == "local" and model.norm == "rmsnorm" else 0.0
    return layer + 12.0 * sbh + fp32_norms


def _layer_params(model: ModelSpec, layout: Layout, layers: int, dense_layers: int = 0) -> float:
    """Local parameters of `layers` transformer layers (after TP / EP x ETP sharding), `dense_layers` of them
    dense layers of a MoE model (no experts): a stage's less its embedding, output layer or scalar head, and
    final norm."""
    counts = param_counts(model)
    moe = layers - dense_layers
    return ((counts.layer_params(moe, dense_layers) - moe * counts.expert) / layout.tp
            + moe * counts.expert / (layout.ep * layout.etp))


def _shards(layout: Layout) -> tuple[int, int]:
    """(dense, expert) optimizer shard sizes: DP x CP, and expert-DP = TP x CP x DP / (EP x ETP)."""
    return layout.dp * layout.cp, max(1, layout.tp * layout.cp * layout.dp // (layout.ep * layout.etp))


def estimate(model: ModelSpec, layout: Layout, *, precision: str = "bf16", attention_backend: str = "flash",
             seq_length: int | None = None, stage_kind: str = "pretrain", peft: LoraSpec | None = None,
             gpu: HardwareSpec | str | None = None, params: object = None, dropout: bool = False,
             kernels: str = "te", grad_bytes: int = 4, split: tuple[int, int, int] | None = None,
             moe_dispatcher: str = "alltoall", parents: tuple[str, ...] = (),
             cuda_graph_share: float = 0.0, fp8_recipe: str | None = None,
             cross_entropy: str | None = None, bf16_layers: tuple[int, int] = (0, 0)) -> MemoryBreakdown:
    """Per-GPU memory of the most-loaded pipeline stage (the max total over first and last stage;
    middle stages hold fewer micro batches than the first and no embedding or logits; with an
    uneven `split` = (first, middle, last) layer counts, the second stage too, which may hold more
    layers than the first). `kernels`: see `layer_activations` ("te" unless the runtime has no
    Transformer Engine). `fp8_recipe`: the stage's FP8 recipe (`optimizer_bytes`). `cross_entropy`: the
    loss (`cross_entropy_bytes`; None: the default of `kernels`, execution.AUTO_CROSS_ENTROPY). `bf16_layers`:
    the first / last layers kept in bf16 under fp8 / mxfp8 / nvfp4 (`_bf16_layer_bytes`), which sit on the
    first and last stages (with virtual stages, on the stages' first / last chunks); with them, or with a MoE
    model's dense layers, the earliest stage holding the fewest of them is compared too (it may be heavier)."""
    stages = {0, layout.pp - 1} | ({1} if split is not None and layout.pp > 2 and split[1] > split[0] else set())
    if layout.pp > 2 and _has_dense_layers(model):
        # a MoE model's dense layers make the stages holding them lighter (DeepSeek's first layers on stage 0):
        # the earliest stage with the fewest dense layers holds the most in-flight micro batches of the heaviest
        dense = dense_layers_per_stage(model, layout.pp, layout.vp, split)
        stages.add(min(range(layout.pp - 1), key=lambda s: (dense[s], s)))
    if layout.pp > 2 and precision in LOW_PRECISIONS and any(bf16_layers):
        # the bf16 first / last layers hold no FP8 / FP4 weight caches (and keep 16-bit GEMM inputs), so the stages
        # holding them can be lighter than a middle one: the earliest stage with the fewest bf16 layers, likewise
        bf16 = bf16_layers_per_stage(model.layers, layout.pp, layout.vp, split, *bf16_layers)
        stages.add(min(range(layout.pp - 1), key=lambda s: (bf16[s], s)))
    best = None  # the first stage of the largest total, as `MemoryBreakdown.total` sums it (one breakdown built)
    for terms in _breakdowns(sorted(stages), model, layout, precision, attention_backend, seq_length, stage_kind,
                             peft, gpu, params, dropout, kernels, grad_bytes, split, moe_dispatcher, parents,
                             cuda_graph_share, fp8_recipe, cross_entropy, bf16_layers, raw=True):
        if best is None or terms[0] > best[0]:
            best = terms
    return _breakdown_of(best)  # type: ignore[arg-type]


def states_lower_bound(model: ModelSpec, layout: Layout, *, precision: str = "bf16", stage_kind: str = "pretrain",
                       peft: LoraSpec | None = None, params: object = None, grad_bytes: int = 4,
                       split: tuple[int, int, int] | None = None, parents: tuple[str, ...] = (),
                       fp8_recipe: str | None = None) -> tuple[int, int, int, int]:
    """(a lower bound of `estimate(...).total` for `layout` and every micro batch, recompute level and
    sequence-parallel value; the weights, gradients and optimizer bytes it counts): the model states
    (weights, gradients, optimizer) of the first or the last pipeline stage, whichever is larger, plus the
    CUDA context and the NCCL buffers. The plan search rejects a layout group with it before the exact estimate.

    Why it bounds: `estimate` is the largest total of a set of stages that always holds the first and the
    last (0 and pp - 1), and one stage's total is int(weights) + int(gradients) + int(optimizer) +
    int(activations) + the int of each part (`_stage_terms`); activations and every part are >= 0, the
    parts include `cuda_context` and `nccl`, and the three states are `_model_states`' (the same cached
    call `_stage_terms` makes) except the weights under fp8_param_gather, which `_stage_terms` lowers by
    the trainable linear weights' extra bytes of the stage's FP8 layers: here by those of all its layers
    (the bf16 first / last layers, which keep 16-bit weights, are not known here), which is no less. None of it reads the micro batch, the recompute or
    sequence parallelism. tests/compiler/test_search_pruning.py checks bound <= exact on random layouts."""
    resident, _ = _resident_and_work(stage_kind, params, peft, parents)
    common = _StageCommon.of(model, layout, stage_kind, resident, precision, fp8_recipe)
    fsdp = bool(layout.megatron_fsdp and common.trainable and peft is None)
    lowers_weights = precision in ("fp8", "mxfp8") and layout.fp8_param_gather and common.trainable
    best = (-1, 0, 0, 0)
    for stage in sorted({0, layout.pp - 1}):
        st, weights, gradients, optimizer, _ = _model_states(
            model, layout.tp, layout.pp, layout.cp, layout.dp, layout.ep, layout.etp, layout.distributed_optimizer,
            stage, common.vocab, common.scalar, split, precision, peft, common.trainable, common.frozen, grad_bytes,
            fsdp, common.opt_bytes, vp=common.states_vp)
        if lowers_weights:  # at most what `_stage_terms` takes off: every layer's linear weights (no bf16 layer)
            weights -= common.trainable * _layer_params(model, layout, st.layers, st.dense_layers) * (
                weight_bytes(precision) - 1)
        w = int(weights)
        if w + int(gradients) + int(optimizer) > best[0]:
            best = (w + int(gradients) + int(optimizer), w, int(gradients), int(optimizer))
    return (best[0] + int(CUDA_CONTEXT_BYTES) + int(common.nccl),) + best[1:]


def pipeline_stages(model: ModelSpec, layout: Layout, *, precision: str = "bf16", attention_backend: str = "flash",
                    seq_length: int | None = None, stage_kind: str = "pretrain", peft: LoraSpec | None = None,
                    gpu: HardwareSpec | str | None = None, params: object = None, dropout: bool = False,
                    kernels: str = "te", grad_bytes: int = 4,
                    split: tuple[int, int, int] | None = None,
                    moe_dispatcher: str = "alltoall", parents: tuple[str, ...] = (),
                    cuda_graph_share: float = 0.0, fp8_recipe: str | None = None,
                    cross_entropy: str | None = None,
                    bf16_layers: tuple[int, int] = (0, 0)) -> tuple[MemoryBreakdown, ...]:
    """Per-GPU memory of every pipeline stage 0 .. pp - 1 (`estimate` is the largest of them)."""
    return tuple(_breakdowns(range(layout.pp), model, layout, precision, attention_backend, seq_length, stage_kind,
                             peft, gpu, params, dropout, kernels, grad_bytes, split, moe_dispatcher, parents,
                             cuda_graph_share, fp8_recipe, cross_entropy, bf16_layers))


def _breakdowns(stages, model, layout, precision, attention_backend, seq_length, stage_kind, peft, gpu, params,
                dropout, kernels, grad_bytes, split, moe_dispatcher="alltoall", parents=(), cuda_graph_share=0.0,
                fp8_recipe=None, cross_entropy=None, bf16_layers=(0, 0), raw: bool = False):
    """Each of `stages`' `_stage_memory`; `raw`: its `_stage_terms` instead (`estimate` builds one breakdown)."""
    hw = get_gpu(gpu) if isinstance(gpu, str) else gpu
    capacity = hw.hbm_bytes if hw else 0
    seq = seq_length or model.seq_length
    resident, work = _resident_and_work(stage_kind, params, peft, parents)
    stage_memory = _stage_terms if raw else _stage_memory
    rows = work.rows  # preference pairs: chosen + rejected
    ub = 0.0
    if layout.tp_comm_overlap and layout.tp > 1:  # TE's userbuffers, the shapes and preset the plan records
        ub = buffer_bytes(userbuffers_of(
            generation=hw.generation if hw else None, precision=precision,
            params_dtype=precision if precision in ("fp16", "fp32") else "bf16", hidden=model.hidden, tp=layout.tp,
            cp=layout.cp, seq_length=seq, micro_batch=layout.micro_batch * rows))
    bf16 = (bf16_layers_per_stage(model.layers, layout.pp, layout.vp, split, *bf16_layers)
            if precision in LOW_PRECISIONS and any(bf16_layers) else None)
    bf16_dense = (bf16_dense_layers_per_stage(model, layout.pp, layout.vp, split, *bf16_layers)
                  if bf16 is not None else None)
    common = _StageCommon.of(model, layout, stage_kind, resident, precision, fp8_recipe)
    for stage in stages:
        yield stage_memory(model, layout, stage, precision, attention_backend, seq, stage_kind, peft, params, dropout,
                            capacity, kernels, grad_bytes, split, resident, rows, moe_dispatcher, cuda_graph_share,
                            fp8_recipe, generates=bool(work.generated), cross_entropy=cross_entropy, userbuffers=ub,
                            bf16_here=bf16[stage] if bf16 is not None else 0,
                            bf16_dense_here=bf16_dense[stage] if bf16_dense is not None else 0, common=common)


class _StageCommon:
    """What `_stage_memory` computes alike for every pipeline stage of one layout (`estimate` sizes two to four
    of them): the padded vocabulary, which resident models train and which end in a scalar head, the
    optimizer's bytes, the NCCL groups, and (filled by the first stage that needs them) one layer's
    activations and the backward's working set. Pure caching: each value is the expression `_stage_memory`
    would evaluate, for the same layout."""

    __slots__ = ("vocab", "trains", "trainable", "frozen", "scalar", "scalar_head", "opt_bytes", "states_vp",
                 "nccl", "per_layer", "working")

    @classmethod
    def of(cls, model: ModelSpec, layout: Layout, kind: str, resident: tuple[str, ...], precision: str,
           fp8_recipe: str | None) -> _StageCommon:
        c = cls()
        c.vocab = padded_vocab(model.vocab, layout.tp)
        c.trains = kind in TRAINING_KINDS
        c.trainable = (2 if kind == "ppo" else 1) if c.trains else 0  # PPO trains actor and critic
        c.frozen = len(resident) - c.trainable  # references / reward model; eval's models, export
        # which of them end in a scalar head (h -> 1) instead of the vocabulary output layer: the trained ones
        # come first in `resident_models` (ppo: actor, critic; reward: reward), the frozen ones after them
        heads = tuple(name in SCALAR_HEAD_MODELS for name in resident)
        c.scalar = (sum(heads[:c.trainable]), sum(heads[c.trainable:]))
        c.scalar_head = all(heads)  # no model of the stage computes logits
        c.opt_bytes = optimizer_bytes(layout, precision, fp8_recipe)
        c.states_vp = layout.vp if _has_dense_layers(model) else None  # which layers a stage holds
        c.nccl = NCCL_BYTES_PER_GROUP * ((layout.tp > 1) + (layout.pp > 1) + (layout.cp > 1) + (layout.dp > 1)
                                         + (layout.ep > 1))
        c.per_layer = None  # one layer's activations (`_stage_memory`)
        c.working = {}  # the backward's working set, by whether it is an FP8 layer's
        return c


def _resident_and_work(stage_kind: str, params: object, peft: LoraSpec | None, parents: tuple[str, ...]):
    """(`resident_models`, `flops.stage_work`) of the stage, cached where its arguments hash (a search asks for
    every layout it sizes)."""
    try:
        return _resident_and_work_cached(stage_kind, params, peft, parents)
    except TypeError:  # unhashable stage parameters
        return resident_models(stage_kind, params, peft=peft, parents=parents), stage_work(stage_kind, params, peft)


@lru_cache(maxsize=256)
def _resident_and_work_cached(stage_kind, params, peft, parents):
    return resident_models(stage_kind, params, peft=peft, parents=parents), stage_work(stage_kind, params, peft)


@lru_cache(maxsize=256)
def _has_dense_layers(model: ModelSpec) -> bool:
    """`model.has_dense_layers`, cached (the property sums the layer pattern; `estimate` asks for every layout)."""
    return model.has_dense_layers


@lru_cache(maxsize=4096)  # pure; independent of micro batch, recompute and SP, which the search varies most
def _model_states(model, tp, pp, cp, dp, ep, etp, distributed_optimizer, stage, vocab, scalar, split, precision,
                  peft, trainable, frozen, grad_bytes, fsdp=False,
                  opt_bytes=(4, 4, True), vp=None) -> tuple[_Stage, float, float, float, float]:
    """(the stage's local parameters, weights, gradients, optimizer bytes, optimizer-step transient
    bytes): trainable models get full states, frozen ones weights only; LoRA trains the adapters only.
    `scalar` = (trainable, frozen) models of those that end in a scalar head (h -> 1: the PPO critic, the
    reward model; the nemoc runtime's `ScalarHead`) instead of the vocabulary output layer; the
    returned stage is a vocabulary-headed model's unless every model has a scalar head.
    `fsdp` (Megatron-FSDP, optim_grads_params): the trained model's 16-bit weights and its gradient
    buffer are sharded over the same group as the optimizer state (ZeRO-3); the layers being computed
    are gathered into `fsdp_buffers` (`_stage_memory`)."""
    layout = _StatesLayout(tp, pp, cp, dp, ep, etp, vp)  # vp: which layers a stage holds (dense ones of a MoE model)
    lm = _local_stage_of(model, tp, pp, ep, etp, vp, stage, vocab, False, split)
    head = _local_stage_of(model, tp, pp, ep, etp, vp, stage, vocab, True, split)
    st = head if sum(scalar) == trainable + frozen else lm
    dense_shard, expert_shard = _shards(layout)
    wb = weight_bytes(precision)
    weights = gradients = optimizer = step = 0.0
    for i in range(trainable):
        st_i = head if i < scalar[0] else lm
        params_local = st_i.dense + st_i.expert
        weights += params_local * wb
        if peft is not None and i >= scalar[0]:  # LoRA adapts the vocabulary-headed model (PPO: the actor only)
            adapter = lora_params_of_layers(model, peft, st.layers, st.dense_layers) / tp
            a_state = state_bytes_per_param(precision, distributed_optimizer=distributed_optimizer, shard=dense_shard,
                                            grad_bytes=grad_bytes, moment_bytes=opt_bytes[0],
                                            master_bytes=opt_bytes[1], grad_copy=opt_bytes[2])
            weights += adapter * a_state.weights
            gradients += adapter * a_state.gradients
            optimizer += adapter * a_state.optimizer
            step += adapter * a_state.step
        else:
            for count, shard in ((st_i.dense, dense_shard), (st_i.expert, expert_shard)):
                s = state_bytes_per_param(precision, distributed_optimizer=distributed_optimizer, shard=shard,
                                          grad_bytes=grad_bytes, moment_bytes=opt_bytes[0], master_bytes=opt_bytes[1],
                                          grad_copy=opt_bytes[2])
                if fsdp:  # the weights counted above in full are held as this shard
                    weights -= count * wb * (1.0 - 1.0 / shard)
                gradients += count * s.gradients / (shard if fsdp else 1)
                optimizer += count * s.optimizer
                step += count * s.step
    weights += (scalar[1] * (head.dense + head.expert) + (frozen - scalar[1]) * (lm.dense + lm.expert)) * wb
    return st, weights, gradients, optimizer, step


@lru_cache(maxsize=4096)  # pure; `_model_states` asks again for every dp, cp and distributed-optimizer value
def _local_stage_of(model, tp, pp, ep, etp, vp, stage, vocab, scalar_head, split) -> _Stage:
    """`_local_stage` of a layout with these sizes (the only ones it reads)."""
    return _local_stage(model, _StatesLayout(tp, pp, 1, 1, ep, etp, vp), stage, vocab, scalar_head, split)


@dataclass(frozen=True, slots=True)
class _StatesLayout:
    """The layout fields `_local_stage` and `_shards` read."""

    tp: int
    pp: int
    cp: int
    dp: int
    ep: int
    etp: int
    vp: int | None = None


def _bf16_layer_params(model: ModelSpec, layout: Layout, bf16_here: int, dense_here: int = 0) -> float:
    """Parameters one GPU holds of `bf16_here` transformer layers kept in bf16 (dense by TP, experts by EP x
    ETP), `dense_here` of them dense layers of a MoE model (no experts): their weights get no FP8 / FP4 copies."""
    return _layer_params(model, layout, bf16_here, dense_here) if bf16_here else 0.0


def _bf16_activation_extra(model, *, replayed: float, recompute: str, **kw) -> float:
    """Bytes one bf16 layer keeps for backward beyond an FP8 one (its saved GEMM inputs are 16-bit, not the
    1-byte FP8 copies `layer_activations(fp8=True)` counts), for one micro batch; under block recompute the
    `replayed` share of layers keeps only its input (the same at either precision)."""
    def extra(rc: str) -> float:
        return (layer_activations(model, recompute=rc, fp8=False, **kw).total
                - layer_activations(model, recompute=rc, fp8=True, **kw).total)
    if recompute == "full" and replayed < 1.0:
        return replayed * extra("full") + (1.0 - replayed) * extra("none")
    return extra(recompute)


def _dense_layer_activations(model: ModelSpec, *, recompute_modules: tuple[str, ...] | None, **kw) -> float:
    """One dense layer's saved tensors in a MoE model: a layer of `ModelSpec.dense_layer_model`, whose
    selective recompute replays the modules a dense layer has (`mlp` for its MLP, the MoE ones do nothing)."""
    mods = None if recompute_modules is None else tuple(m for m in recompute_modules
                                                        if m not in ("moe", "moe_act", "shared_experts"))
    return layer_activations(model.dense_layer_model, recompute_modules=mods, **kw).total


def _stage_memory(*args, **kw) -> MemoryBreakdown:
    """One pipeline stage's breakdown (`_stage_terms`' arguments)."""
    return _breakdown_of(_stage_terms(*args, **kw))


def _breakdown_of(terms: tuple) -> MemoryBreakdown:
    _, weights, gradients, optimizer, activations, other, capacity, ints = terms
    return MemoryBreakdown(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                           other=other, capacity=capacity, parts=MappingProxyType(ints))


def _stage_terms(model, layout, stage, precision, backend, seq, kind, peft, params, dropout, capacity,
                 kernels, grad_bytes, split, resident: tuple[str, ...], rows: int,
                  moe_dispatcher: str = "alltoall", cuda_graph_share: float = 0.0,
                  fp8_recipe: str | None = None, generates: bool = False,
                  cross_entropy: str | None = None, userbuffers: float = 0.0, bf16_here: int = 0,
                 bf16_dense_here: int = 0, common: _StageCommon | None = None) -> tuple:
    """One pipeline stage's breakdown as (total, weights, gradients, optimizer, activations, other, capacity,
    parts), in the integers of `MemoryBreakdown` (`_breakdown_of`); `resident`: the models the stage keeps (`resident_models`; the critic
    and the reward model end in a scalar head, `SCALAR_HEAD_MODELS`),
    `rows`: sequences per micro-batch sample (`flops.stage_work`); `cuda_graph_share`: the share of
    each layer captured as CUDA graphs (`cost.cuda_graph_share`; 0 without graphs); `generates`: the
    stage decodes rollouts (ppo, grpo: `rollout_kv_cache`); `bf16_here`: how many of the stage's layers stay in
    bf16 under fp8 / mxfp8 / nvfp4 (`flops.bf16_layers_per_stage`): no FP8 / FP4 weight copies and (fp8 /
    mxfp8) 16-bit saved GEMM inputs for them, and 16-bit weights where fp8_param_gather keeps the others in FP8
    (Megatron-Core builds them outside the fp8 / fp4 context: fp8_utils.py `get_fp8_context(is_init=True)`);
    `bf16_dense_here`: how many of those are dense layers of a MoE model (`flops.bf16_dense_layers_per_stage`);
    `common`: what every stage of the layout shares (`_StageCommon`; computed here when None)."""
    if common is None:
        common = _StageCommon.of(model, layout, kind, resident, precision, fp8_recipe)
    vocab, trains, trainable, frozen, scalar, scalar_head = (
        common.vocab, common.trains, common.trainable, common.frozen, common.scalar, common.scalar_head)
    st, weights, gradients, optimizer, step_transient = _model_states(
        model, layout.tp, layout.pp, layout.cp, layout.dp, layout.ep, layout.etp, layout.distributed_optimizer,
        stage, vocab, scalar, split, precision, peft, trainable, frozen, grad_bytes,
        bool(layout.megatron_fsdp and trainable and peft is None), common.opt_bytes, vp=common.states_vp)
    params_local = st.dense + st.expert

    parts: dict[str, float] = {"cuda_context": CUDA_CONTEXT_BYTES, "nccl": common.nccl}
    if layout.megatron_fsdp and trainable and peft is None:
        embedding = vocab * model.hidden / layout.tp  # the input embedding or the output layer, one unit each
        units = (1 if st.first else 0) + (1 if st.last and not model.tie_embeddings and not scalar_head else 0)
        per_layer = (params_local - units * embedding) / max(st.layers, 1)
        parts["fsdp_buffers"] = fsdp_buffers(max(per_layer, embedding), weight_bytes(precision), grad_bytes)
    # the weights of Transformer Engine's FP8 / FP4 linear layers: the transformer layers' alone. The input
    # embedding is no GEMM, and the output layer is a plain `tensor_parallel.ColumnParallelLinear`
    # (Megatron-Core models/gpt/gpt_model.py), not a TE module, so it is neither quantised nor held in FP8
    # (nor is a scalar head): every resident model has the same FP8 linear weights on this stage
    linear = _layer_params(model, layout, st.layers, st.dense_layers) if precision in LOW_PRECISIONS else 0.0
    if linear and st.mtp:  # the MTP layers run in the global FP8 context too (MultiTokenPredictionLayer)
        linear += _layer_params(model, layout, st.mtp, 0 if model.mtp_layer_is_moe or not model.is_moe else st.mtp)
    if precision == "nvfp4":
        # Transformer Engine caches the NVFP4 weight and its transpose across micro batches: 4-bit
        # values plus one FP8 (E4M3) scale per 16-element block, 0.5 + 1/16 B each.
        parts["fp4_weight_cache"] = 2.0 * NVFP4_BYTES * (
            linear - _bf16_layer_params(model, layout, bf16_here, bf16_dense_here))
    if precision in ("fp8", "mxfp8"):
        # Transformer Engine caches the quantised weight and its transpose across micro batches.
        linear -= _bf16_layer_params(model, layout, bf16_here, bf16_dense_here)  # those layers hold no FP8 copies
        parts["fp8_weight_cache"] = 2.0 * linear
        if layout.fp8_param_gather and trainable:
            # FP8 parameters (Megatron-Core `fp8_param`): the linear weights are TE Float8Tensors, 1 byte
            # (the FP8 copy itself) plus the cached transpose, instead of a 16-bit weight plus both FP8
            # copies; the optimizer's fp32 master shard is unchanged. The distributed optimizer's 16-bit
            # all-gather buffer is no term of its own: FP8 tensors are gathered in their 1-byte buffer (the
            # weights), MXFP8 ones through the gradient buffer (`reuse_grad_buf_for_mxfp8_param_ag`, which the
            # plan sets: execution.reuses_grad_buffer; bf16 parameters fill half of an fp32 gradient buffer,
            # all of a bf16 one), so the bf16 buffer the distributed optimizer otherwise keeps beside the
            # weights is never allocated.
            weights -= trainable * linear * (weight_bytes(precision) - 1)
            parts["fp8_weight_cache"] = 1.0 * linear

    activations = 0.0
    if kind != "export":
        b = layout.micro_batch * rows
        per_layer = common.per_layer
        if per_layer is None:  # the same for every stage of the layout: computed by its first
            per_layer = common.per_layer = layer_activations(
                model, seq=seq, micro_batch=b, tp=layout.tp, sp=layout.sequence_parallel, cp=layout.cp,
                etp=layout.etp, recompute=layout.recompute if trains else "none", attention_backend=backend,
                recompute_modules=layout.recompute_modules,
                dropout=dropout, kernels=kernels, fp8=precision in ("fp8", "mxfp8")).total
        rep = layout.tp if layout.sequence_parallel else 1
        s_local = seq / layout.cp
        if trains:
            held = in_flight_microbatches(layout.pp, layout.vp, layout.num_microbatches, stage)
            replayed = st.layers * recomputed_fraction(model.layers, layout.pp, layout.vp, layout.recompute,
                                                       layout.recompute_layers)
            if layout.recompute == "full" and replayed < st.layers:
                # block recompute (Megatron `recompute_method = "block"`): the first n layers of each
                # model chunk keep only their input, the chunk's other layers keep everything
                kept = layer_activations(
                    model, seq=seq, micro_batch=b, tp=layout.tp, sp=layout.sequence_parallel, cp=layout.cp,
                    etp=layout.etp, recompute="none", attention_backend=backend, dropout=dropout, kernels=kernels,
                    fp8=precision in ("fp8", "mxfp8")).total
                activations = (per_layer * replayed + kept * (st.layers - replayed)) * held
                if st.dense_layers:  # a dense layer's tensors in place of an expert layer's, in the same shares
                    share = replayed / st.layers
                    dense_kw = dict(seq=seq, micro_batch=b, tp=layout.tp, sp=layout.sequence_parallel, cp=layout.cp,
                                    etp=layout.etp, attention_backend=backend, dropout=dropout, kernels=kernels,
                                    fp8=precision in ("fp8", "mxfp8"))
                    dm = model.dense_layer_model
                    dense_per = (share * layer_activations(dm, recompute="full", **dense_kw).total
                                 + (1 - share) * layer_activations(dm, recompute="none", **dense_kw).total)
                    activations += st.dense_layers * held * (dense_per - (share * per_layer + (1 - share) * kept))
            else:
                activations = per_layer * st.layers * held
                if st.dense_layers:  # a dense layer's tensors in place of an expert layer's
                    activations += st.dense_layers * held * (_dense_layer_activations(
                        model, seq=seq, micro_batch=b, tp=layout.tp, sp=layout.sequence_parallel, cp=layout.cp,
                        etp=layout.etp, recompute=layout.recompute, attention_backend=backend, dropout=dropout,
                        recompute_modules=layout.recompute_modules, kernels=kernels,
                        fp8=precision in ("fp8", "mxfp8")) - per_layer)
            if bf16_here and precision in ("fp8", "mxfp8"):  # those layers save 16-bit GEMM inputs
                extra_kw = dict(seq=seq, micro_batch=b, tp=layout.tp, sp=layout.sequence_parallel, cp=layout.cp,
                                etp=layout.etp, recompute=layout.recompute, attention_backend=backend,
                                dropout=dropout, kernels=kernels, replayed=replayed / max(st.layers, 1))
                activations += (bf16_here - bf16_dense_here) * held * _bf16_activation_extra(model, **extra_kw)
                if bf16_dense_here:  # a dense layer's GEMM inputs (a MoE model's dense layers kept in bf16)
                    activations += bf16_dense_here * held * _bf16_activation_extra(model.dense_layer_model,
                                                                                   **extra_kw)
            # Backward works on one layer at a time: it rematerialises that layer (full recompute) or
            # allocates gradients of its activations (otherwise), about one layer's activations
            # without the s x s scores, plus (unfused attention) the scores of the layer whose core
            # attention is being recomputed or differentiated; the same for every recompute mode,
            # so memory stays monotone in it.
            fp8_working = precision in ("fp8", "mxfp8") and not bf16_here  # a bf16 layer's, the larger, where held
            working_bytes = common.working.get(fp8_working)
            if working_bytes is None:
                working = layer_activations(
                    model, seq=seq, micro_batch=b, tp=layout.tp, sp=layout.sequence_parallel, cp=layout.cp,
                    etp=layout.etp, recompute="none", attention_backend=backend, dropout=dropout, kernels=kernels,
                    fp8=fp8_working)
                working_bytes = common.working[fp8_working] = (
                    working.total - (working.scores if backend != "unfused" else 0.0))
            parts["backward_working"] = working_bytes
            if st.last:  # final norm input + output-layer input (Korthikanti: 4 sbh / t)
                activations += 4.0 * s_local * b * model.hidden / rep
            if st.mtp:
                activations += st.mtp * held * mtp_depth_activations(
                    model, layout, seq=seq, micro_batch=b, backend=backend, dropout=dropout, kernels=kernels,
                    fp8=precision in ("fp8", "mxfp8"))
        else:  # forward only: one layer's tensors live at a time
            activations = per_layer
        if st.last and not scalar_head:
            ce = cross_entropy or ("te" if kernels == "te" else "none")
            # each MTP depth computes its own logits and loss through the shared output layer, and keeps what its
            # cross entropy saves until the backward (gpt_model.py `_postprocess`)
            parts["logits"] = s_local * b * vocab / layout.tp * cross_entropy_bytes(ce) * (1 + st.mtp)
        if st.last and not scalar_head and trains and peft is None and layout.defer_embedding_wgrad_compute \
                and layout.pp > 1:
            # defer_embedding_wgrad_compute: the last stage keeps, for each deferred micro batch, the output layer's
            # input (its SP shard) and its logits gradient until the drain (tensor_parallel/layers.py
            # `embedding_activation_buffer`, `grad_output_buffer`; the first wgrad_deferral_limit, 0: all)
            m = layout.num_microbatches
            deferred = m if layout.wgrad_deferral_limit == 0 else min(layout.wgrad_deferral_limit, m)
            act_bytes = weight_bytes(precision)
            parts["deferred_wgrad_buffers"] = deferred * act_bytes * s_local * b * (
                model.hidden / rep + vocab / layout.tp)
        if userbuffers:
            # tp_comm_overlap: the all-gathered GEMM inputs and the reduce-scatter outputs live in TE's userbuffers,
            # one (s x b / cp, h) buffer per GEMM of a layer, registered once outside PyTorch's allocator
            # (catalog/userbuffers.py `userbuffer_bytes`) instead of PyTorch's gathered-input buffers
            parts["tp_comm_userbuffers"] = userbuffers
        elif layout.tp > 1 and layout.sequence_parallel:
            parts["tp_comm_buffers"] = 2.0 * 2 * s_local * b * model.hidden  # all-gathered GEMM input (+ its grad)
        if layout.pp > 1:
            parts["pp_p2p_buffers"] = 2.0 * 2 * s_local * b * model.hidden / rep  # send + recv
        if model.is_moe and st.layers > st.dense_layers:  # a stage of dense layers only dispatches nothing
            # padded to a capacity factor c the buffers hold c x the routed rows (`_capacity_rows`)
            routed = s_local * b * model.top_k / rep * layout.etp * _capacity_rows(model)
            parts["moe_dispatch"] = 2.0 * 2 * routed * model.hidden  # all-to-all send + receive
            if moe_dispatcher == "allgather" and layout.ep * layout.etp > 1:
                # the hidden states of the whole expert-parallel x expert-TP group, gathered (and the
                # gradient of that buffer in backward) before the local experts' tokens are picked
                gathered = s_local * b / rep * layout.ep * layout.etp
                parts["moe_dispatch"] += 2.0 * 2 * gathered * model.hidden
        if cuda_graph_share and trains:
            parts["cuda_graph_buffers"] = cuda_graph_buffers(activations, cuda_graph_share)
        dynamic = activations + sum(parts.get(k, 0.0) for k in ("logits", "moe_dispatch", "backward_working"))
        parts["fragmentation"] = FRAGMENTATION * dynamic
        if step_transient > dynamic:  # the optimizer step's fp32 gradient copies outgrow the freed activations
            parts["optimizer_step_fp32_grads"] = step_transient - dynamic
        if generates:  # the rollout runs before the step, when no training activation is held
            kv = rollout_kv_cache(model, layout, seq=seq, rows=rows, layers=st.layers)
            prefill = per_layer if layout.cp == 1 else layer_activations(  # whole rows on every CP rank
                model, seq=seq, micro_batch=b, tp=layout.tp, sp=layout.sequence_parallel, cp=1, etp=layout.etp,
                recompute=layout.recompute if trains else "none", attention_backend=backend, dropout=dropout,
                recompute_modules=layout.recompute_modules,
                kernels=kernels, fp8=precision in ("fp8", "mxfp8")).total
            rollout = kv + prefill * layout.num_microbatches  # + one layer's prefill tensors of the whole batch
            if rollout > dynamic:
                parts["rollout_kv_cache"] = rollout - dynamic

    ints = {k: int(v) for k, v in parts.items()}
    other = sum(ints.values())
    w, g, o, a = int(weights), int(gradients), int(optimizer), int(activations)
    return w + g + o + a + other, w, g, o, a, other, int(capacity), ints  # total as `MemoryBreakdown.total`
