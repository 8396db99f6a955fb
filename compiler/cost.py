"""The cost model: step time, throughput, MFU and cost of one stage under a resolved layout.

Input:  a `ModelSpec`, a resolved `Layout`, the `ClusterSpec` and its `HardwareSpec`, precision,
attention backend, sequence length, number of steps, stage kind and optional LoRA.
Output: `Estimate` with `parts` (seconds per step): compute, elementwise, tp_comm, cp_comm, ep_comm,
pp_imbalance, pp_bubble, pp_p2p, dp_comm_exposed, optimizer, step_overhead (+ other_passes: DPO
reference, PPO critic and experience forwards; rollout: PPO generation);
host_bound (only when the host issues a layer's kernels slower than the GPU runs them);
`step_time_s == sum(parts)`.
Invariants: pure, no torch; a few tens of microseconds per call (the planner calls it thousands of
times); every term is a small function with its physics stated; the few efficiency parameters live
in `EfficiencyParams` (docs/cost-model.md) and are per GPU generation, never per row.

Time of one step on the slowest pipeline stage (Narayanan et al. 2021, Sec. 2-3):
    t_step = m x t_mb(slowest stage) + (pp - 1) / vp x t_mb(mean stage)          [1F1B / interleaved]
           + pp_p2p + dp_comm_exposed + optimizer + step_overhead (+ other passes, rollout)
    t_mb   = GEMMs (roofline: max(FLOPs / (peak x e_gemm), bytes / HBM bw))
           + attention core (flash: FLOPs / (bf16 peak x e_attn), the masked half skipped; unfused:
             batched GEMMs at the GEMM rate + the s x s score matrix's traffic / HBM bw)
           + elementwise (kappa x activation bytes / HBM bw; the local spec's unfused kernels'
             extra bytes / HBM bw)
           + exposed TP / CP / EP communication (+ CP ring-step latency)
           + host wait: max(0, the host's issue time of the layer's kernels - the device time above)
             (eager mode; CUDA graphs remove the captured share; `host_issue_time`).
MFU = model FLOPs (what the stage needs, no recompute: `flops.stage_model_flops_per_step`)
      / (step time x GPUs x dense peak of the precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from types import MappingProxyType

from nemoc.compiler.catalog.hardware import HardwareSpec, get_gpu
from nemoc.compiler.flops import (
    FORWARD,
    FROZEN,
    FULL,
    LOW_PRECISIONS,
    ModelPass,
    StageWork,
    bf16_dense_layers_per_stage,
    bf16_layers_per_stage,
    dense_layers_per_stage,
    is_gated,
    layers_on_stage,
    lora_params_of_layers,
    mla_projection_shapes,
    padded_vocab,
    param_counts,
    recomputed_fraction,
    stage_model_flops_per_step,
    stage_work,
)
from nemoc.compiler.memory import NVFP4_BYTES, layer_activations
from nemoc.compiler.plan import Estimate, HostExecution, Layout, MoeExecution
from nemoc.compiler.spec import ClusterSpec, LoraSpec, ModelSpec


@dataclass(frozen=True, slots=True)
class EfficiencyParams:
    """The cost model's only tunable numbers, each a physical quantity (docs/cost-model.md).

    gemm_*:   achievable fraction of the dense datasheet peak for large GEMMs, per GPU generation
              and precision class (16-bit / 8-bit). There are no Blackwell 16-bit rows in the
              calibration set; Blackwell 16-bit takes the Hopper 16-bit value (stated assumption).
    attn:     achievable fraction of the 16-bit peak for flash / fused attention, forward + backward
              (backward does 2.5x the forward FLOPs; Transformer Engine runs attention in 16-bit
              even in FP8 recipes).
    kappa:    HBM passes over the stored activation bytes per training step: bytes moved by the
              memory-bound kernels (norms, residual adds, activation functions, RoPE, FP8 casts,
              the optimizer-free rest) = kappa x activation bytes of the layer.
    link:     fraction of the link bandwidth NCCL achieves (bus bandwidth / link bandwidth).
    tp_exposed: fraction of TP collective time not hidden behind GEMMs on Hopper and newer
              (Transformer Engine userbuffer TP-communication overlap, on in NeMo/Megatron-Bridge
              recipes); Ampere-era Megatron (2021-22) did not overlap TP communication: 1.0.
    gemm_n_half: GEMM tile-quantisation penalty: a GEMM whose smallest tiled dimension is n runs at
              e_gemm / (1 + n_half / n) (half a 128-wide tensor-core tile): the smaller of N, K (per GPU,
              after TP) and the token rows of one kernel launch (userbuffer chunks, per-expert rows:
              `gemm_rows_split`).
    layer_overhead: seconds per layer per micro batch (forward + backward) that no kernel's
              FLOPs or bytes explain: device-side launch gaps, synchronisation, small kernels (tens of
              kernels per layer and pass). The host's issue time of those kernels is not in it: it is
              counted (`host_issue_time`) and costs time only where it exceeds the layer's device time.
    attn_kv_half: keys per query tile at which a flash-class attention kernel runs at half its
              long-sequence rate (`attn_kernel_eff`): the fixed per-tile cost of loading the query
              tile and writing the output, read off FlashAttention-3's throughput-vs-length curve.
              It is what makes context parallelism's short ring steps (s / 2cp keys each) slow.
    ring_step_latency: seconds per step of the context-parallel ring that overlap cannot hide: a
              dependent NCCL send/recv (~5-10 us small-message latency over InfiniBand, nccl-tests
              sendrecv) plus the launch and synchronisation of that step's attention kernel (~5 us).
              Not fitted: no calibration row constrains it (their CP rings have 2-8 long steps).
    step_overhead: seconds per optimizer step of host-side work no kernel explains: the optimizer's
              launch loop, gradient-norm and loss all-reduces, timers (~40 ms measured with the
              unfused optimizer on bare Megatron-Core, docs/calibration.md; fused optimizers less).

    Values: chosen once, globally, by a coordinate search over these numbers on the reliable rows of
    the calibration set (bench/calibrate.py `fit_parameters`, docs/calibration.md), kept inside
    physically plausible ranges and rounded; the byte counts of the memory-bound kernels
    (SCORE_BYTES, LOCAL_*, ADAM_BYTES below) are counted from the kernels, not fitted. They are
    end-to-end achieved fractions (clock throttling under the power cap, kernel tails, FP8 scaling
    bookkeeping included), hence below single-GEMM microbenchmarks.
    """

    gemm_ampere_16: float = 0.715
    gemm_hopper_16: float = 0.68
    gemm_hopper_8: float = 0.484
    gemm_blackwell_8: float = 0.406
    attn: float = 0.428
    kappa: float = 4.55
    link: float = 0.75
    tp_exposed: float = 0.118
    gemm_n_half: float = 62.8
    layer_overhead: float = 50e-6
    ring_step_latency: float = 15e-6
    step_overhead: float = 0.02
    attn_kv_half: float = 512.0

    def attn_kernel_eff(self, generation: str, kv_tokens: float) -> float:
        """Achievable fraction of the 16-bit peak for a flash-class attention kernel whose query
        tiles each sweep `kv_tokens` keys (mean): `attn` x L / (L + attn_kv_half). A CTA loads its
        128-row query tile, sweeps the keys in 128-token blocks, then rescales and writes its output
        and log-sum-exp: the prologue / epilogue cost about four key blocks, so a kernel over 512
        keys runs at half its long-sequence rate (FlashAttention-3, Shah et al. 2024, Fig. 5: BF16
        head dim 128, non-causal forward on H100, ~330 TFLOP/s at 512 tokens vs ~650 at 16k; ~0.7 at
        1k, ~0.85 at 2k, ~0.95 at 8k). `attn` is the asymptotic value."""
        return self.attn * kv_tokens / (kv_tokens + self.attn_kv_half)

    def gemm_eff(self, generation: str, precision: str) -> float:
        # NVFP4 has no calibration row: its GEMMs take the Blackwell 8-bit fraction of the FP4 peak
        # (stated assumption, docs/cost-model.md)
        low = precision in ("fp8", "mxfp8", "nvfp4")
        if generation == "ampere":
            return self.gemm_ampere_16
        if generation == "hopper":
            return self.gemm_hopper_8 if low else self.gemm_hopper_16
        if generation == "blackwell":
            return self.gemm_blackwell_8 if low else self.gemm_hopper_16
        return 0.5  # CPU quickstart: illustrative

    def tp_exposure(self, generation: str) -> float:
        return 1.0 if generation in ("ampere", "cpu") else self.tp_exposed


DEFAULT_PARAMS = EfficiencyParams()

# The defaults of `estimate` (the planner passes its `Target`'s overlap_tp / overlap_p2p): no Transformer Engine userbuffer TP
# overlap (`tp_comm_overlap` unset), and the interleaved schedule's steady-state pipeline transfers
# overlapped with compute (`overlap_p2p_comm`, unbatched; the 1F1B schedule has no such overlap and
# `_pp_p2p` charges all of its transfers either way). Plans are for `nemoc run`, so these are the
# defaults; the calibration passes what each published run used.
RUNTIME_OVERLAPS_TP = False
RUNTIME_OVERLAPS_P2P = True
# The runtime's DDP overlaps the gradient reduce-scatter with the backward (`overlap_grad_reduce`);
# the distributed optimizer's parameter all-gather only where the plan says `parallel.overlap_param_gather`
# (default false: it runs after the optimizer step).
RUNTIME_OVERLAPS_PARAM_GATHER = False

# ------------------------------------------------------------------ memory-bound kernel traffic
# HBM bytes moved per element by the kernels around the GEMMs, counted read by read and write by
# write from the kernel sequence each code path launches (16-bit tensors 2 B, fp32 4 B). These are
# not fitted: they are what the kernels must move; time = bytes / HBM bandwidth.
KERNELS = ("te", "local")

# Unfused attention core (materialises the b x heads x s x s score matrix; docs/cost-model.md):
# (forward, backward) bytes per score element, the batched GEMMs' own reads and writes of the
# scores included (their FLOPs are charged separately, at the GEMM rate).
#  "te":    one fused scale-mask-softmax kernel (Megatron `ScaledUpperTriangMaskedSoftmax`, the
#           Megatron-LM 2021-22 runs; TE's UnfusedDotProductAttention): forward QK^T writes 2,
#           softmax reads 2 writes 2, PV reads 2 (8); backward dP written 2, P read for dV 2,
#           softmax backward reads P and dP writes dS (6), dQ and dK read dS (4) (14).
#  "local": Megatron-Core's torch fallback (`FusedScaleMaskSoftmax.forward_torch_softmax`, no
#           apex/TE kernel): baddbmm writes 2; .float() reads 2 writes 4; masked_fill_ reads 4
#           writes 4; fp32 softmax reads 4 writes 4; .bfloat16() reads 4 writes 2; PV reads 2 (32).
#           Backward: dP written 2, P read 2; cast back to fp32 reads 2 writes 4; softmax backward
#           is two kernels in PyTorch (`softmax_backward_cuda_out`: `tmp = grad * output` reads 8
#           writes 4, then `cunn_SoftMaxBackwardSmem` reads tmp and output 8 writes 4: 24);
#           masked_fill_'s backward is the out-of-place `grad.masked_fill(mask, 0)`
#           (derivatives.yaml), which ATen runs as `clone()` (reads 4 writes 4) then the in-place
#           fill (reads 4 writes 4: 16); cast to 16-bit reads 4 writes 2; dQ, dK read dS 4 (60).
#           The causal mask (bool, s x s, broadcast over batch and heads) is re-read by masked_fill_
#           and its backward for every head: each head's fp32 scores (64 MiB at s = 4096) evict it
#           from L2: +1 each way (33, 61).
# Checks (docs/calibration.md): a public Nsight profile of this local path on an A40 shows both
# backward kernels (`BinaryFunctor Mul<float>` and `cunn_SoftMaxBackwardSmem`, one call each per
# layer and step).
SCORE_BYTES = {"te": (8.0, 14.0), "local": (33.0, 61.0)}
# The score matrix (b x heads x s x s, gigabytes per layer) is streamed through HBM many times the
# size of L2, so its kernels run at the bandwidth a streaming kernel achieves, not the datasheet
# peak: the public A40 profile above times PyTorch's kernels over the scores of its run at 0.75-0.82
# of the A40's 696 GB/s (grad x output multiply 0.80, shared-memory softmax backward 0.82, softmax
# forward 0.79, dropout and its backward 0.75), as STREAM-type copies reach ~0.8-0.9 of the peak on
# every recent NVIDIA GPU. The per-token tensors of the other memory-bound terms (tens of MiB, the
# size of L2) are not derated: part of their traffic stays on chip.
SCORE_STREAM_FRACTION = 0.8
# The local spec rebuilds the causal mask in every layer's forward (`get_default_causal_mask` is not
# cached in Megatron-Core 0.16.1: torch.ones(s, s) in fp32 written 4, triu read 4 written 4, .bool()
# read 4 written 1): 17 bytes per s x s element per layer forward, shared by the batch and heads.
LOCAL_CAUSAL_MASK_BYTES = 17.0
# Megatron-Core's vocab-parallel cross entropy (`tensor_parallel/cross_entropy.py`, what the local spec
# runs: `cross_entropy_loss_fusion` off), bytes per logit: forward, the 16-bit logits cast to fp32
# (read 2 write 4), max (read 4), subtract the max in place (4 + 4), exp in place (4 + 4), sum
# (read 4), divide in place (4 + 4) = 38; backward, the saved softmax scaled in place by the loss
# gradient (4 + 4) and autograd's cast of that fp32 gradient to the logits' 16-bit dtype (4 + 2) = 14.
CROSS_ENTROPY_BYTES = (38.0, 14.0)
# Transformer Engine's fused vocab-parallel cross entropy (`cross_entropy_loss_fusion = True`,
# `cross_entropy_fusion_impl = "te"`: Megatron-Bridge's performance recipes; `Execution.fusions`), the
# Triton kernels of TE 2.1-2.17 (transformer_engine/pytorch/triton/cross_entropy.py): forward,
# `online_softmax_kernel` reads the 16-bit logits once for the row's max / sum / target logit (2), then
# `cross_entropy_kernel` reads them again and writes the softmax gradient over them in place (2 + 2) = 6
# (the per-row max, sum and target logit TP ranks all-gather are 12 B a row, not a logit); backward,
# `element_mul_kernel` scales that stored gradient by the per-token loss gradient in place (2 + 2) = 4
# (Megatron passes an unreduced [s, b] loss, so the kernel runs: TE skips it only for a scalar 1.0).
CROSS_ENTROPY_BYTES_TE = (6.0, 4.0)
# Megatron-Core's native fused cross entropy (`cross_entropy_fusion = native`: `cross_entropy_loss_fusion =
# True`, `cross_entropy_fusion_impl = "native"`; megatron/core/fusions/fused_cross_entropy.py, 0.11-0.16.1):
# the unfused loss's steps in three `jit_fuser` (torch.compile) functions, each one pass over the logits:
# forward, `calculate_logits_max` returns the fp32 cast of the 16-bit logits and their max (read 2 write 4),
# `calculate_predicted_logits` subtracts the max and exponentiates in place, summing as it goes (read 4 write
# 4), `calculate_cross_entropy_loss` divides by the sum in place (read 4 write 4) = 22; backward,
# `calculate_gradients` scales the saved fp32 softmax in place (the mutated input written back, read 4 write
# 4) and returns it cast to bf16 (write 2; the one-per-row target update is not per logit) = 10.
CROSS_ENTROPY_BYTES_NATIVE = (22.0, 10.0)
# bytes per logit (forward, backward) of each `cross_entropy_fusion` (plan `Execution.fusions.cross_entropy`)
CROSS_ENTROPY_BYTES_OF = {"te": CROSS_ENTROPY_BYTES_TE, "native": CROSS_ENTROPY_BYTES_NATIVE,
                          "none": CROSS_ENTROPY_BYTES}
# FP8 current scaling (`fp8_recipe = tensorwise`, TE `Float8CurrentScaling`): a tensor's scale comes from
# its own amax, so each quantised GEMM operand is read once more (2 B per 16-bit element) by the amax
# kernel before the cast kernel; delayed scaling takes the scale from the amax history and fuses the
# amax into the cast, and blockwise / mxfp8 compute each block's scale inside the cast. Forward: each
# GEMM's input (QKV, projection, fc1, fc2); backward: each GEMM's output gradient. Weights are
# quantised once per step and cached (not counted per micro batch).
FP8_CURRENT_SCALING_BYTES = 2.0
# Attention dropout on the probabilities (Megatron-LM's GPT-3-era default 0.1, outside the fused
# softmax kernel): forward reads 2, writes the 1-byte mask and the 2-byte output (5); backward reads
# the gradient 2 and the mask 1, writes 2 (5).
DROPOUT_SCORE_BYTES = (5.0, 5.0)

# Megatron-Core's local layer spec on plain PyTorch (no Transformer Engine / apex; the nemoc runtime
# where TE is not installed): extra bytes per element, forward + backward, over TE's fused kernels.
#  RMSNorm: torch's composite rms_norm (fp32 upcast; cast, pow, mean, mul, cast back, weight mul:
#           36 B forward, ~64 B through autograd backward) vs TE's fused kernel (4 + 6): +90 per
#           hidden element, two norms per layer. LayerNorm is torch's fused native kernel: +0.
#  SwiGLU:  chunk, silu, mul (10 B forward; 26 B backward with the chunk's concatenated gradient) vs
#           Megatron's fused bias-SwiGLU (6 + 10): +20 per FFN element.
#  RoPE:    Megatron's `_apply_rotary_pos_emb_bshd` in torch (mul, rotate_half = neg + cat, mul,
#           add, cat: 24 B forward, 20 B backward) vs TE's fused RoPE (4 + 4): +36 per query and
#           key element.
#  GQA:     K and V repeated to every query head before the attention core (repeat_interleave,
#           read g writes a heads; backward sums them back): 4 (a + g) d forward and backward.
LOCAL_NORM_BYTES = (32.0, 58.0)
LOCAL_GLU_BYTES = (4.0, 16.0)
LOCAL_ROPE_BYTES = (20.0, 16.0)
# Without gradient-accumulation fusion (apex/TE `fused_weight_gradient_mlp_cuda`) every weight
# gradient GEMM writes a 16-bit .grad that Megatron's DDP hook adds into the fp32 main_grad:
# reads 2 + 4, writes 4 per local parameter and micro batch.
LOCAL_GRAD_ACCUM_BYTES = 10.0
# Adam, bytes per (sharded) parameter. Fused (TE / apex FusedAdam, what NeMo runs): fp32 master, m,
# v read and written (24), fp32 gradient read (4), 16-bit parameter written (2) = 30. Torch's
# foreach AdamW (Megatron's fallback without TE / apex) runs one pass per operation: weight decay
# mul_ 8, lerp_ (m) 12, mul_ + addcmul_ (v) 20, sqrt 8, div_ 8, add_ (eps) 8, addcdiv_ 16 = 80, plus
# Megatron's fp32 -> 16-bit parameter copy 6 = 86.
ADAM_BYTES = {"te": 30.0, "local": 86.0}
# MoE kernels (execution.moe_execution): the settings a caller that passes none is costed with
# (Megatron-Bridge's MoE recipes on TE: alltoall dispatcher, grouped GEMM, fused permutation; what the
# calibration's MoE rows ran). Without grouped GEMM, Megatron-Core's SequentialMLP launches fc1, the
# activation and fc2 per local expert (MOE_EXPERT_KERNELS), each at the per-kernel gap below. Without
# permute fusion (moe_utils.py permute / unpermute on plain PyTorch) the permutation materialises the
# index-selected copy and the unpermutation multiplies by the routing probabilities in a kernel of its
# own: one more read and write of every routed 16-bit hidden element in each (2 x (2 + 2) B) that TE's
# fused permute / unpermute fold into their single pass; per forward, backward and recomputed forward.
DEFAULT_MOE = MoeExecution(dispatcher="alltoall", grouped_gemm=True, permute_fusion=True)
MOE_EXPERT_KERNELS = 3
MOE_UNFUSED_PERMUTE_BYTES = 8.0
# Kernel launches per layer and micro batch (forward + backward) beyond TE's: composite RMSNorm
# (7 forward, ~12 backward kernels, x2 norms, vs 2 + 2 fused), torch RoPE on q and k (7 + 6 each vs
# 2 + 2), unfused SwiGLU (3 + 5 vs 1 + 1), the GQA repeat and its reduction (4), one main_grad add
# per weight (6). Each costs the per-kernel gap implied by `layer_overhead` (~30 kernels per layer).
TE_KERNELS_PER_LAYER = 30.0


def _local_extra_kernels(model: ModelSpec) -> float:
    n = 6.0  # main_grad adds
    n += 2 * (7 + 12 - 4) if model.norm == "rmsnorm" else 0.0
    n += 2 * (7 + 6 - 4) if model.position == "rope" else 0.0
    n += (3 + 5 - 2) if is_gated(model) else 0.0
    n += 4.0 if model.query_groups < model.heads and not model.multi_latent_attention else 0.0
    if model.multi_latent_attention and model.qk_layernorm and model.norm == "rmsnorm":
        n += (2 if model.q_lora_rank else 1) * (7 + 12 - 4)  # the latents' composite RMSNorms
    return n


def _local_traffic(model: ModelSpec, tokens: float, tp: int, rep: int) -> tuple[float, float]:
    """(forward, backward) extra HBM bytes of one layer and micro batch on the local spec over TE's
    fused kernels (constants above); `rep` divides the sequence-parallel region (norms)."""
    h, d, a, g = model.hidden, model.head_dim, model.heads, model.query_groups
    fwd = bwd = 0.0
    if model.norm == "rmsnorm":
        fwd += 2 * LOCAL_NORM_BYTES[0] * tokens * h / rep
        bwd += 2 * LOCAL_NORM_BYTES[1] * tokens * h / rep
    if is_gated(model) and not model.is_moe:
        fwd += LOCAL_GLU_BYTES[0] * tokens * model.ffn_hidden / tp
        bwd += LOCAL_GLU_BYTES[1] * tokens * model.ffn_hidden / tp
    if model.multi_latent_attention:
        # torch RoPE on every head's query PE part and the one shared key PE part; no GQA expansion; the
        # latents' RMSNorms (local spec: composite) like the layer's own
        pe = (a + 1) * model.qk_pos_emb_head_dim
        fwd += LOCAL_ROPE_BYTES[0] * tokens * pe / tp
        bwd += LOCAL_ROPE_BYTES[1] * tokens * pe / tp
        if model.qk_layernorm and model.norm == "rmsnorm":
            fwd += LOCAL_NORM_BYTES[0] * tokens * (model.q_lora_rank + model.kv_lora_rank) / rep
            bwd += LOCAL_NORM_BYTES[1] * tokens * (model.q_lora_rank + model.kv_lora_rank) / rep
        return fwd, bwd
    if model.position == "rope":
        fwd += LOCAL_ROPE_BYTES[0] * tokens * (a + g) * d / tp
        bwd += LOCAL_ROPE_BYTES[1] * tokens * (a + g) * d / tp
    if g < a:
        fwd += 4.0 * tokens * (a + g) * d / tp
        bwd += 4.0 * tokens * (a + g) * d / tp
    return fwd, bwd



# ----------------------------------------------------------------------------------- per-layer terms


@dataclass(frozen=True, slots=True)
class LayerTimes:
    """Seconds for one transformer layer and one micro batch on one GPU (forward + backward)."""

    gemm: float
    attention: float
    elementwise: float
    tp_comm: float
    cp_comm: float
    ep_comm: float
    forward_fraction: float  # share of the layer's compute that is forward (for recompute / overlap windows)
    host_issue: float = 0.0  # host seconds to issue the layer's kernels in eager mode (`host_issue_time`)

    @property
    def device(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.tp_comm + self.cp_comm + self.ep_comm

    @property
    def host_wait(self) -> float:
        """Seconds the GPU idles waiting for the host: the host issues kernels asynchronously and runs
        ahead of the GPU while the layer's device time exceeds its issue time; the layer is host bound
        only where issuing its kernels takes longer than running them."""
        return max(0.0, self.host_issue - self.device)

    @property
    def total(self) -> float:
        return max(self.device, self.host_issue)


# The query x key tile of the flash-class attention kernels at head dim 128: 128 x 128 for causal masks
# (FlashAttention-3 `hopper/tile_size.h` `tile_size_fwd_sm90`, 16-bit, head dim <= 128: kBlockM 128, kBlockN 128
# when causal, 176 otherwise). cuDNN's fused attention, which Transformer Engine runs on Hopper, is closed source:
# the same tile is a stated assumption for it.
ATTN_TILE = 128


def causal_tiles(length: float, tile: float = ATTN_TILE) -> tuple[float, float]:
    """(score elements a causal flash kernel computes over one sequence of `length` tokens, mean keys each query
    tile sweeps). The kernel runs whole tile x tile blocks: query tile i (of n = ceil(length / tile)) sweeps key
    blocks 0 .. i, the diagonal one masked inside, rows and keys past the end of the sequence masked too, so it
    computes n (n + 1) / 2 blocks where the causal triangle has length^2 / 2 elements."""
    n = math.ceil(length / tile)
    blocks = n * (n + 1) / 2.0
    return blocks * tile * tile, blocks * tile / n


def packed_attention_tiles(span: float, seq: float, tile: float = ATTN_TILE) -> tuple[float, float]:
    """(computed score elements over the causal ones, relative to an unpacked sequence of `seq` tokens; mean keys
    per query tile, in the unit of a whole sequence's seq / 2) for samples of `span` tokens packed into `seq` (THD,
    `cu_seqlens`: every sample its own causal kernel problem, tiled from its first token). Both are counted in
    whole tiles for the sample and for the sequence and taken relative to the sequence's, which `attn` and
    `attn_kernel_eff` were fitted on (a whole sequence is priced at its causal elements and seq / 2 keys): so a
    sample with the sequence's tiles (511 tokens of 512) costs what the sequence does, and one count serves both.
    A ~200-token sample is 2 query tiles and 3 blocks: 2.46x its 20,100 causal elements, against 1.03x for a whole
    4,096-token sequence; each query tile sweeps 192 keys, against 2,112 for the sequence's (2,048 in that unit:
    186 keys)."""
    computed, kv = causal_tiles(span, tile)
    whole, whole_kv = causal_tiles(seq, tile)
    return (computed / (span * span / 2.0)) / (whole / (seq * seq / 2.0)), kv * (seq / 2.0) / whole_kv


def gemm_time(m: float, n: float, k: float, *, flops_per_s: float, bytes_per_s: float, in_bytes: float,
              n_half: float = 0.0, weights: float = 1.0, rows: float | None = None) -> float:
    """Roofline time of an (m x k) @ (k x n) GEMM: the larger of its FLOPs at the achievable rate and
    its operand/result traffic at HBM bandwidth (Williams et al. 2009). Small or skinny GEMMs
    (small hidden / TP, small micro batch) become memory bound: that is the shape penalty. `weights`:
    how many (k x n) matrices it reads (a grouped GEMM over the local experts reads each of theirs).
    Tile quantisation (`n_half`) applies to the smallest dimension one kernel tiles: N, K, and `rows`,
    the token rows of one kernel launch (m unless the GEMM is split into chunks, `gemm_rows_split`, or
    grouped over experts, each with its own rows); `rows=None` leaves the token dimension out (the
    output layer's GEMM, priced as before)."""
    flops = 2.0 * m * n * k
    traffic = in_bytes * (m * k + weights * k * n) + 2.0 * m * n
    smallest = min(n, k) if rows is None else min(n, k, rows)
    return max(flops / flops_per_s * (1.0 + n_half / smallest), traffic / bytes_per_s)


# Transformer Engine's userbuffer TP overlap (`tp_comm_overlap`) splits the overlapped GEMMs along their
# token rows: the all-gather-overlapped ones (QKV and fc1 forward, the output projection's and fc2's
# input-gradient GEMMs: `ring_exchange`) run one chunk per TP rank, tokens / tp rows each, as the
# gathered chunks arrive; the reduce-scatter-overlapped forward GEMMs (projection and fc2: `pipeline`)
# run `num_splits` = 4 chunks on Hopper, and on Blackwell a ring exchange too (tp chunks). The QKV / fc1
# input-gradient and every weight-gradient GEMM overlap a `bulk` collective and are not split.
# (NeMo-Framework-Launcher 24.07 `conf/training/tp_overlap/ub_cfg_h100_*.yaml`, every H100 config:
# `proj_fprop` / `fc2_fprop` `method: pipeline, num_splits: 4`; NeMo 2.x
# `collections/llm/recipes/tp_overlap_configs/userbuffers.py`, the `*_b200_*` configs: `proj_fprop` /
# `fc2_fprop` `RingExchangeOverlapCfg`; TE `CommOverlapP2P` / `CommOverlap`, Megatron-Core
# `extensions/transformer_engine.py` userbuffer names `qkv`, `proj`, `fc1`, `fc2`.)
UB_PIPELINE_SPLITS = 4


def gemm_rows_split(index: int, tp: int, overlap: bool, generation: str = "hopper") -> tuple[float, float]:
    """(forward, input-gradient) chunks of layer GEMM `index` (QKV, projection, fc1, fc2, then shared
    experts as fc1 / fc2) under TE's userbuffer overlap, or (1, 1) without it."""
    if not overlap or tp == 1:
        return 1.0, 1.0
    if index % 2 == 0:  # QKV / fc1: ring-exchange all-gather forward, bulk backward
        return float(tp), 1.0
    # projection / fc2: reduce-scatter forward (pipelined on Hopper, ring exchange on Blackwell),
    # ring-exchange all-gather backward
    return (float(tp) if generation == "blackwell" else float(UB_PIPELINE_SPLITS)), float(tp)


@lru_cache(maxsize=256)
def _layer_gemm_shapes(model: ModelSpec, tp: int, ep: int, etp: int) -> tuple[tuple[float, float, float], ...]:
    """(n, k, m_multiplier) of every forward GEMM of one layer on one GPU, per token of the micro
    batch: QKV, output projection, MLP fc1/fc2 (MoE: grouped GEMMs over the local experts)."""
    h, d = model.hidden, model.head_dim
    if model.multi_latent_attention:
        attn = _mla_gemm_shapes(model, tp)
    else:
        attn = ((((model.heads + 2 * model.query_groups) * d) / tp, h, 1.0), (h, model.heads * d / tp, 1.0))
    gate = 2 if is_gated(model) else 1
    if model.is_moe:
        f = (model.moe_ffn_hidden or model.ffn_hidden) / etp
        # each GPU receives tokens x top_k routed copies (balanced), grouped over E/ep local experts
        share = model.top_k / tp * etp
        mlp = ((gate * f, h, share), (h, f, share))
        if model.shared_expert_ffn_hidden:
            fs = model.shared_expert_ffn_hidden / tp
            mlp += ((gate * fs, h, 1.0), (h, fs, 1.0))
    else:
        f = model.ffn_hidden / tp
        mlp = ((gate * f, h, 1.0), (h, f, 1.0))
    return attn[:2] + mlp + attn[2:]


def _mla_gemm_shapes(model: ModelSpec, tp: int) -> tuple[tuple[float, float, float], ...]:
    """Multi-latent attention's GEMMs (`flops.mla_projection_shapes`), ordered so indices 0 and 1 stay the
    GEMMs on either side of the core as for standard attention (0: the key/value up projection, which
    produces the core's K and V; 1: the output projection) and the down projections and the query's own
    projection follow the MLP's (`_layer_gemm_shapes` appends them), leaving the MLP / expert indices 2-5
    of `layer_times` and `selective_replay` as they are. Every one is column-parallel in the local spec
    (divided by TP); Transformer Engine's spec runs the down projections duplicated on the
    sequence-parallel shard of the tokens instead (the same FLOPs per GPU with sequence parallelism)."""
    shapes = {name: (n_out, n_in) for name, n_in, n_out in mla_projection_shapes(model)}
    first = (shapes["kv_up"][0] / tp, shapes["kv_up"][1], 1.0)
    proj = (shapes["proj"][0], shapes["proj"][1] / tp, 1.0)
    rest = tuple((n / tp, k, 1.0) for name, (n, k) in shapes.items() if name not in ("kv_up", "proj"))
    return (first, proj) + rest

def layer_times(model: ModelSpec, layout: Layout, hw: HardwareSpec, *, seq: int, precision: str,
                attention_backend: str, micro_batch: int, backward: float = 2.0,
                params: EfficiencyParams = DEFAULT_PARAMS, attention_span: float | None = None,
                overlap_tp: bool = False, kernels: str = "te", dropout: bool = False,
                fp8_recipe: str | None = None, moe: MoeExecution | None = None) -> LayerTimes:
    """Forward + backward time of one layer for one micro batch. `backward` is the backward/forward
    GEMM ratio: 2 (input and weight gradients), 1 for a frozen base under LoRA (input gradients
    only), 0 for forward-only stages. `attention_span`: the mean length of the samples packed into
    one sequence (THD packing: each token attends only within its own sample, Megatron-Core
    `PackedSeqParams` / TE `cu_seqlens`), None when every row is one sample of `seq` tokens.
    `kernels`: "te" (Transformer Engine's / Megatron's fused kernels) or "local" (Megatron-Core's
    local spec on plain PyTorch: the extra memory-bound traffic and launches of its unfused kernels).
    `dropout`: hidden and attention dropout are on (a stage's `dropout` > 0; GPT-3-era training):
    their masks join the stored activations, and the unfused core drops out every score.
    Block recompute (`layout.recompute_layers`: n layers of each model chunk replay their forward,
    Megatron `recompute_method = "block"`) is the mean of a fully recomputed and a kept layer,
    weighted by the replayed share (`flops.recomputed_fraction`)."""
    if layout.recompute == "full" and layout.recompute_layers is not None:
        frac = recomputed_fraction(model.layers, layout.pp, layout.vp, "full", layout.recompute_layers)
        kw = dict(seq=seq, precision=precision, attention_backend=attention_backend, micro_batch=micro_batch,
                  backward=backward, params=params, attention_span=attention_span, overlap_tp=overlap_tp,
                  kernels=kernels, dropout=dropout, fp8_recipe=fp8_recipe, moe=moe)
        full = layer_times(model, replace(layout, recompute_layers=None), hw, **kw)
        if frac >= 1.0:
            return full
        kept = layer_times(model, replace(layout, recompute="none", recompute_layers=None), hw, **kw)
        mix = [frac * a + (1.0 - frac) * b for a, b in zip(_fields(full), _fields(kept))]
        return LayerTimes(*mix[:6], full.forward_fraction, mix[7])
    tokens = micro_batch * seq / layout.cp  # GEMM rows on this GPU (SP re-gathers the sequence)
    gen = hw.generation
    low = precision in ("fp8", "mxfp8")
    rate = hw.peak(precision if hw.supports(precision) else "bf16") * params.gemm_eff(gen, precision)
    in_bytes = 1.0 if low else (4.0 if precision == "fp32" else 2.0)
    if precision == "nvfp4":
        in_bytes = NVFP4_BYTES  # E2M1 values + one E4M3 scale per 16 elements
    passes = 1.0 + backward
    gemm = 0.0
    shapes = _layer_gemm_shapes(model, layout.tp, layout.ep, layout.etp)
    # MLA's down projections and query projection come after the MLP's GEMMs (`_mla_gemm_shapes`): no
    # userbuffer split (they have no TP collective of their own), never a shared expert
    n_standard = len(shapes) - (len(mla_projection_shapes(model)) - 2 if model.multi_latent_attention else 0)
    # the userbuffer overlap splits GEMMs only where it runs (TP group inside one NVLink domain, as _tp_comm)
    ub_overlap = overlap_tp and layout.tp > 1 and layout.tp <= hw.nvlink_domain and gen not in ("ampere", "cpu")
    moe = moe or DEFAULT_MOE
    local_experts = model.experts // layout.ep if model.is_moe else 1
    sequential = model.is_moe and not moe.grouped_gemm and local_experts > 1
    # the busiest EP rank's routed rows over the mean (`moe_rows_factor`: dropless `moe_max_load`, capped by
    # a capacity, exactly the capacity when padded), which the layer waits for
    busiest = moe_rows_factor(model, layout, tokens / (layout.tp if layout.sequence_parallel else 1))
    shared_gemm = 0.0  # the shared expert's GEMMs (indices 4, 5), which moe_shared_expert_overlap can hide
    forward_gemm = [0.0] * len(shapes)  # each GEMM's forward seconds (what selective recompute replays)
    for i, (n, k, share) in enumerate(shapes):
        before = gemm
        if model.is_moe and i in (2, 3):
            share *= busiest
        if sequential and i in (2, 3):
            # SequentialMLP (no grouped GEMM): one GEMM per local expert over its share of the routed
            # tokens, one after another, each reading its own weights: the sum of per-expert rooflines
            # (>= the grouped GEMM's single roofline over all rows)
            rows = tokens * share / local_experts
            one = local_experts * gemm_time(rows, n, k, flops_per_s=rate, bytes_per_s=hw.hbm_bw,
                                            in_bytes=in_bytes, n_half=params.gemm_n_half, rows=rows)
            gemm += passes * one
            forward_gemm[i] = one
            continue
        grouped = model.is_moe and i in (2, 3)
        experts_read = local_experts if grouped else 1  # grouped: every local expert's weights
        m = tokens * share
        per_expert = m / experts_read  # a grouped GEMM tiles each expert's rows separately
        split_f, split_d = gemm_rows_split(i, layout.tp, ub_overlap and not grouped and i < n_standard, gen)
        # `gemm_time` of the forward, input-gradient and weight-gradient GEMMs (the weight gradient's
        # token rows are its reduction dimension, never split), their FLOPs and bytes computed once
        flop_t = 2.0 * m * n * k / rate
        byte_t = (in_bytes * (m * k + experts_read * k * n) + 2.0 * m * n) / hw.hbm_bw
        nk, n_half = min(n, k), params.gemm_n_half
        forward_gemm[i] = max(flop_t * (1.0 + n_half / min(nk, per_expert / split_f)), byte_t)
        gemm += forward_gemm[i]
        if backward:
            gemm += min(backward, 1.0) * max(flop_t * (1.0 + n_half / min(nk, per_expert / split_d)), byte_t)
        if backward > 1.0:
            gemm += (backward - 1.0) * max(flop_t * (1.0 + n_half / min(nk, per_expert)), byte_t)
        if model.is_moe and 4 <= i < n_standard:
            shared_gemm += gemm - before
    span = min(seq, attention_span) if attention_span else seq
    # QK^T over qk_dim and attention x V over v_dim channels per head (both head_dim but for MLA)
    attn_flops = 2.0 * tokens * span * model.heads * (model.qk_dim + model.v_dim) / layout.tp
    modules = layout.selective_modules
    # the core's forward runs again (full recompute, or selective with core_attn)
    recomputed = bool(backward) and (layout.recompute == "full" or "core_attn" in modules)
    acts = layer_activations(model, seq=seq, micro_batch=micro_batch, tp=layout.tp, sp=layout.sequence_parallel,
                             cp=layout.cp, etp=layout.etp, attention_backend=attention_backend, dropout=dropout)
    act = acts.total
    if attention_backend == "unfused":
        # Batched GEMMs (QK^T, PV; backward dP, dV, dQ, dK: 2x forward) over the full s x s matrix
        # at the 16-bit GEMM rate, each with the head dimension as its smaller of N, K (the same
        # tile-quantisation penalty as every GEMM), plus the score matrix's memory-bound traffic
        # (SCORE_BYTES, which includes these GEMMs' reads and writes of the scores).
        rate16 = hw.peak("bf16" if hw.supports("bf16") else precision) * params.gemm_eff(gen, "bf16")
        rate16 /= 1.0 + params.gemm_n_half / min(model.qk_dim, model.v_dim)
        scores = tokens * span * model.heads / layout.tp
        fwd_b, bwd_b = SCORE_BYTES[kernels]
        if dropout:  # torch dropout on the 16-bit probabilities: mask and output written, read back
            fwd_b, bwd_b = fwd_b + DROPOUT_SCORE_BYTES[0], bwd_b + DROPOUT_SCORE_BYTES[1]
        stream = hw.hbm_bw * SCORE_STREAM_FRACTION
        fwd = attn_flops / rate16 + fwd_b * scores / stream
        if kernels == "local":  # the causal mask, rebuilt once per layer forward
            fwd += LOCAL_CAUSAL_MASK_BYTES * span * seq / layout.cp / stream
        bwd = 2.0 * attn_flops / rate16 + bwd_b * scores / stream
        attention = fwd * (1.0 + (1.0 if recomputed else 0.0)) + (bwd if backward else 0.0)
        attn_fwd = fwd
        act -= acts.scores  # charged explicitly above
    else:
        # flash / fused: the kernel skips the masked upper triangle (causal), 2.5x forward for backward;
        # each query tile sweeps span / 2 keys on average (causal), and with context parallelism each
        # ring step's kernel covers one load-balanced chunk of s / 2cp keys (Megatron-Core / TE
        # `cp_comm_type="p2p"` splits the sequence into 2cp chunks): short kernels, lower efficiency.
        kv = span / 2.0 if layout.cp == 1 else min(span, seq / (2.0 * layout.cp))
        computed = 1.0
        if span < seq and layout.cp == 1:
            # packed samples (THD): each sample's causal triangle is tiled on its own, whole tiles
            # (`packed_attention_tiles`, the elements and the keys each query tile sweeps both relative to the
            # whole sequence's tiles, which `attn` and `attn_kernel_eff` were fitted on): a sample that spans
            # the sequence's tiles costs what the whole sequence does (511 tokens in a 512-token row)
            computed, kv = packed_attention_tiles(span, seq)
        attn_rate = hw.peak("bf16" if hw.supports("bf16") else precision) * params.attn_kernel_eff(gen, kv)
        attn_fwd = 0.5 * attn_flops * computed / attn_rate
        attention = attn_fwd * (1.0 + (2.5 if backward else 0.0) + (1.0 if recomputed else 0.0))
    elementwise = params.kappa * act * (passes / 3.0) / hw.hbm_bw
    if layout.recompute == "full":
        gemm *= (passes + 1.0) / passes
        elementwise *= 4.0 / 3.0
    if fp8_recipe == "tensorwise" and precision == "fp8":
        inputs = tokens * sum(k * share for _, k, share in shapes)
        grads = tokens * sum(n * share for n, _, share in shapes)
        replays = 2.0 if layout.recompute == "full" and backward else 1.0
        elementwise += FP8_CURRENT_SCALING_BYTES * (replays * inputs + (grads if backward else 0.0)) / hw.hbm_bw
    overhead = params.layer_overhead * passes / 3.0
    launches = TE_KERNELS_PER_LAYER  # kernels per layer and micro batch (forward + backward), for the host
    if sequential:  # fc1, activation, fc2 launched per local expert instead of once for all of them
        overhead += (params.layer_overhead / TE_KERNELS_PER_LAYER * MOE_EXPERT_KERNELS * (local_experts - 1)
                     * passes / 3.0)
        launches += MOE_EXPERT_KERNELS * (local_experts - 1)
    if model.is_moe and not moe.permute_fusion and moe.dispatcher != "flex":
        rep = layout.tp if layout.sequence_parallel else 1
        routed = tokens / rep * model.top_k * model.hidden  # routed hidden elements entering this GPU's MoE
        replays = 1.0 + (1.0 if backward else 0.0) + (1.0 if layout.recompute == "full" and backward else 0.0)
        elementwise += MOE_UNFUSED_PERMUTE_BYTES * routed * replays / hw.hbm_bw
    if kernels == "local":
        rep = layout.tp if layout.sequence_parallel else 1
        fwd_x, bwd_x = _local_traffic(model, tokens, layout.tp, rep)
        elementwise += (fwd_x * (2.0 if layout.recompute == "full" and backward else 1.0)
                        + (bwd_x if backward else 0.0)) / hw.hbm_bw
        overhead += params.layer_overhead / TE_KERNELS_PER_LAYER * _local_extra_kernels(model) * passes / 3.0
        launches += _local_extra_kernels(model)
    gemm += overhead
    replays = passes + (1.0 if layout.recompute == "full" and backward else 0.0)  # recompute replays the forward
    host = host_issue_time(launches * replays / 3.0, hw)
    tp_comm = _tp_comm(model, layout, hw, tokens, passes, params, overlap_tp)
    tp_comm = max(0.0, tp_comm + _mla_tp_comm(model, layout, hw, tokens, passes, params, overlap_tp, kernels))
    cp_comm = _cp_comm(model, layout, hw, tokens, passes, attn_fwd, attention, params)
    ep_comm = _ep_comm(model, layout, hw, tokens, passes, params, moe.dispatcher)
    if backward and set(modules) - {"core_attn"}:
        extra = selective_replay(model, layout, hw, modules, forward_gemm=forward_gemm, tp_comm=tp_comm,
                                 ep_comm=ep_comm, passes=passes, params=params, seq=seq, micro_batch=micro_batch,
                                 attention_backend=attention_backend, dropout=dropout, kernels=kernels)
        gemm, elementwise, tp_comm, ep_comm = (gemm + extra[0], elementwise + extra[1], tp_comm + extra[2],
                                               ep_comm + extra[3])
    if model.is_moe and model.moe_shared_expert_overlap and moe.dispatcher == "alltoall":
        # Megatron-Core's MoELayer runs the shared expert on its own stream between the router and the
        # routed experts (moe_layer.py, shared_experts.py `pre_forward_comm` / `post_forward_comm`): the
        # dispatch and combine exchanges run under its GEMMs; what is left exposed is the longer of the two
        hidden = min(shared_gemm, ep_comm)
        ep_comm -= hidden
    return LayerTimes(gemm, attention, elementwise, tp_comm, cp_comm, ep_comm, 1.0 / passes, host)


def selective_replay(model: ModelSpec, layout: Layout, hw: HardwareSpec, modules: tuple[str, ...], *,
                     forward_gemm: list[float], tp_comm: float, ep_comm: float, passes: float,
                     params: EfficiencyParams, seq: int, micro_batch: int, attention_backend: str, dropout: bool,
                     kernels: str) -> tuple[float, float, float, float]:
    """(gemm, elementwise, tp_comm, ep_comm) seconds that selective recompute of `modules` other than
    `core_attn` (priced with the attention core in `layer_times`) adds to one layer's backward: the
    replayed forward of exactly those modules (Megatron-Core runs the module's forward again inside
    the backward: `tensor_parallel.checkpoint` for mlp / moe / shared_experts, `CheckpointWithoutOutput`
    for layernorm / moe_act).
    GEMMs: the forward GEMMs of the module (`layer_times`' own forward times, indices of
    `_layer_gemm_shapes`: 2, 3 the MLP or the routed experts, 4, 5 the shared experts; `mla_up_proj`: MLA's
    up projections, 0 and the one before the key/value down projection).
    Element-wise: the activations the module frees are what its forward writes (memory.layer_activations
    with and without it), streamed at the same `kappa` per byte as every forward (`elementwise`
    is kappa x activations x passes / 3).
    Communication: the MLP's forward all-gather and reduce-scatter (2 of the 8 TP collectives of a
    layer's forward and backward, `_tp_comm`); the MoE layer's forward dispatch and combine (one pass
    of `_ep_comm`)."""
    whole_mlp = ("mlp" in modules and not model.is_moe) or ("moe" in modules and model.is_moe)
    gemm = forward_gemm[2] + forward_gemm[3] if whole_mlp else 0.0
    if model.is_moe and ("moe" in modules or "shared_experts" in modules):
        gemm += sum(forward_gemm[4:6])
    if "mla_up_proj" in modules and model.multi_latent_attention:
        # the key/value up projection (index 0) and the query's up projection (or its direct projection
        # without a query latent), the GEMM just before the key/value down projection (`_mla_gemm_shapes`)
        gemm += forward_gemm[0] + forward_gemm[-2]
    kw = dict(seq=seq, micro_batch=micro_batch, tp=layout.tp, sp=layout.sequence_parallel, cp=layout.cp,
              etp=layout.etp, attention_backend=attention_backend, dropout=dropout, kernels=kernels)
    others = tuple(m for m in modules if m != "core_attn")
    freed = (layer_activations(model, recompute="none", **kw).total
             - layer_activations(model, recompute="selective", recompute_modules=others, **kw).total)
    elementwise = params.kappa * freed / 3.0 / hw.hbm_bw
    tp = tp_comm * 2.0 / (4.0 * passes / 1.5) if whole_mlp and not model.is_moe else 0.0
    ep = ep_comm / passes if "moe" in modules and model.is_moe else 0.0
    return gemm, elementwise, tp, ep


def _fields(lt: LayerTimes) -> tuple[float, ...]:
    return (lt.gemm, lt.attention, lt.elementwise, lt.tp_comm, lt.cp_comm, lt.ep_comm, lt.forward_fraction,
            lt.host_issue)


_DOMAINS: dict[tuple[str, int], HardwareSpec] = {}
HGX_DOMAIN = 8  # NVLink domains up to one HGX board live inside one node; larger ones are racks (NVL72)


def _node_domain(hw: HardwareSpec, gpus_per_node: int | None) -> HardwareSpec:
    """The NVLink domain as this cluster has it: on HGX-class systems (domain <= 8) NVLink never
    leaves the node, so a cluster built with fewer GPUs per node (4 x H100 per node, or PCIe
    pairs) has a domain of `gpus_per_node`; rack-scale domains (GB200/GB300 NVL72: 4 GPUs per
    compute tray, 72 per NVLink domain) span nodes and stay as catalogued."""
    if gpus_per_node is None or hw.nvlink_domain > HGX_DOMAIN or gpus_per_node >= hw.nvlink_domain:
        return hw
    key = (hw.id, gpus_per_node)
    if key not in _DOMAINS:
        import dataclasses

        _DOMAINS[key] = dataclasses.replace(hw, nvlink_domain=gpus_per_node)
    return _DOMAINS[key]


def _link_bw(hw: HardwareSpec, size: int, stride: int, params: EfficiencyParams) -> float:
    """Per-GPU bus bandwidth of a ring over `size` ranks spaced `stride` apart (Megatron rank order
    tp-cp-ep-dp-pp). Inside one NVLink domain: NVLink. Across domains, NCCL runs one ring per NIC
    and every GPU has its own NIC (rail-optimised HGX / NVL72), so a group with k members per domain
    crosses domains over k NICs in parallel: min(NVLink, k x NIC) (NCCL ring algorithm)."""
    if size * stride <= hw.nvlink_domain or size == 1:
        return hw.nvlink_bw * params.link
    members = max(1, min(size, hw.nvlink_domain // stride))
    return min(hw.nvlink_bw, members * hw.net_bw) * params.link


def _tp_comm(model, layout, hw, tokens, passes, params, overlap: bool = False) -> float:
    """Megatron TP (with or without SP) moves, per layer, 2 all-gathers + 2 reduce-scatters (or the
    equivalent 2 all-reduces) of the s x b x h activation forward and as many backward (Korthikanti
    et al. 2022 Sec. 4.2.2); a ring collective moves (tp - 1)/tp of the tensor per GPU."""
    if layout.tp == 1:
        return 0.0
    size = tokens * model.hidden * 2.0
    volume = 4.0 * passes / 1.5 * size * (layout.tp - 1) / layout.tp  # 4 fwd, 4 bwd (passes = 3)
    # Transformer Engine's userbuffer overlap needs the TP group inside one NVLink domain (CUDA IPC /
    # NVLink SHARP); a TP group that spans domains runs NCCL collectives on the critical path.
    # Without `tp_comm_overlap` (the nemoc runtime today) every collective is on the critical path.
    exposure = params.tp_exposure(hw.generation) if overlap and layout.tp <= hw.nvlink_domain else 1.0
    return volume / _link_bw(hw, layout.tp, 1, params) * exposure


def _mla_tp_widths(model: ModelSpec, sp: bool, kernels: str) -> tuple[float, float]:
    """(forward, backward) element widths per token that multi-latent attention's TP collectives move
    beyond standard attention's (an all-gather of h before QKV forward, its reduce-scatter / all-reduce
    backward), from multi_latent_attention.py `get_query_key_value_tensors`:

    - local spec (every MLA linear column-parallel, gpt_layer_specs.py): the query's and the key/value's
      down projections each gather the hidden state (h more than one QKV) and reduce its gradient; their
      outputs are all-gathered (`gather_from_tensor_model_parallel_region`: q_lora_rank and kv_lora_rank +
      qk_pos_emb_head_dim forward, a split backward); the up projections gather their latents with SP
      (q_lora_rank + kv_lora_rank) and reduce their input gradients either way (q_lora_rank + kv_lora_rank).
      Without a query latent the query projection reads the hidden state (the same h more).
    - Transformer Engine's spec (down projections duplicated, TELinear): no collective at the down
      projections; the up projections gather the latents (SP) instead of the hidden state and the key's
      RoPE part is gathered from the SP region (q_lora_rank + kv_lora_rank + qk_pos_emb_head_dim - h, usually
      negative: cheaper than standard attention); backward the mirror (without SP only the up projections'
      input gradients are reduced: q_lora_rank + kv_lora_rank - h)."""
    h, rq, rkv, pe = model.hidden, model.q_lora_rank, model.kv_lora_rank, model.qk_pos_emb_head_dim
    if kernels == "local":
        forward = h + rq + rkv + pe + ((rq + rkv) if sp else 0.0)
        backward = h + rq + rkv
        return forward, backward
    if sp:
        return rq + rkv + pe - h, rq + rkv + pe - h
    return 0.0, rq + rkv - h


def _mla_tp_comm(model, layout, hw, tokens, passes, params, overlap: bool, kernels: str) -> float:
    """Seconds of MLA's TP collectives beyond standard attention's (`_mla_tp_widths`), priced as `_tp_comm`
    prices the standard ones (16-bit, (tp - 1) / tp of the tensor per GPU on a ring)."""
    if layout.tp == 1 or not model.multi_latent_attention:
        return 0.0
    forward, backward = _mla_tp_widths(model, layout.sequence_parallel, kernels)
    width = forward + (backward if passes > 1 else 0.0)  # forward-only passes (eval, rollouts) gather only
    volume = tokens * 2.0 * width * (layout.tp - 1) / layout.tp
    exposure = params.tp_exposure(hw.generation) if overlap and layout.tp <= hw.nvlink_domain else 1.0
    return volume / _link_bw(hw, layout.tp, 1, params) * exposure


# Context-parallel ring (Transformer Engine `AttnFuncWithCPAndKVP2P`, `cp_comm_type="p2p"`, 16-bit dot-product
# attention: NeMo's FP8 recipes leave `fp8_dot_product_attention` off), counted from TE's code (v2.1
# `pytorch/attention.py`, v2.3-2.4 `pytorch/attention/dot_product_attention/context_parallel.py`: the
# releases NeMo 25.02-25.07 shipped). The causal load-balanced split gives each rank r two of the 2cp
# sequence chunks; every ring step runs ONE attention kernel of two chunk blocks (forward step 0: the
# local causal block, q and kv full; steps i <= r: all q rows against the first kv chunk; steps i > r:
# the second q chunk against all kv), so the cp kernels of a pass are equal (`layer_times` prices them at
# s / 2cp keys per query row). Around the kernels, memory-bound passes over the 16-bit tensors (the
# accumulators are 16-bit: `out = zeros_like(q)`, `dq = empty_like(q)`, `dkv` in the 16-bit p2p buffer;
# `jit_fuser` = torch.compile fuses each correction into one kernel):
#   forward, per rank: `torch.cat` of K and V into the ring buffer (read 2 + write 2 B per kv element);
#     per step the output correction `out += out_step x exp(lse_step - lse)` (read the step's partial 2,
#     read and write the accumulator 2 + 2 = 6 B per query-side element it covers; the first step writes
#     out from the partial: 4 B, TE 2.2-2.4 `flash_attn_fwd_out_correction_init`; TE 2.1 zero-fills it
#     and adds, 4 B more once; steps i > r cover the second half of the rows only:
#     `flash_attn_fwd_second_half_out_correction`). The log-sum-exp corrections move ~20 B per query row
#     and head (< 0.2 B per element at head dim 128): not counted.
#   backward, per rank: `p2p_comm_buffers[0][0].copy_(kv)` (4 B per kv element); per step dq.add_(dq_)
#     (6 B per element covered, a copy 4 B on the first, q full or second half as in the forward) and
#     dkv.add_(dkv_) into the buffer that travels the ring (6 B, copy 4 B, kv full or first half).
# The kernels' own epilogues (writing each step's partial output, lse, dq/dkv; flash backward's dO . O
# preprocessing and fp32 dq accumulation) are per-kernel fixed costs, priced once per step by
# `attn_kernel_eff` (its `attn_kv_half` is that per-tile cost: at 512 keys' worth of compute per query row
# it equals ~16-17 B of HBM traffic per query element forward and ~40-43 B backward on H100 and B200, more
# than those passes move): not counted again here. Until this revision the model charged 12 B per element
# and step (a 16-bit partial written and read, an fp32 accumulator read and written) on every step
# for q and, backward, for q + kv: about twice what TE's code moves.


@lru_cache(maxsize=256)
def cp_ring_bytes(cp: int, rank: int) -> tuple[float, float, float, float]:
    """HBM bytes that TE's p2p ring moves around its attention kernels on CP rank `rank` of `cp`, per
    element of this rank's query-side tensor (tokens x heads x head_dim / tp) and key/value tensor
    (2 x tokens x query_groups x head_dim / tp): (forward per q, forward per kv, backward per q,
    backward per kv), walking TE's branches step by step (constants above). Ranks differ: the
    query-side work grows with the rank, the key/value side shrinks (`cp_ring_ranks`)."""
    fq = sum((4.0 if i == 0 else 6.0) * (1.0 if i <= rank else 0.5) for i in range(cp))
    bq = bkv = 0.0
    first = cp - rank - 1  # the backward step where this rank's first q chunk starts to get gradients
    for i in range(cp):
        # dq: steps after `first` add into all of dq, before it into the second half only
        if i > first:
            bq += 6.0
        elif i == first:
            bq += 4.0 if rank == cp - 1 else 2.0 + 3.0
        else:
            bq += 3.0 if i > 0 else 2.0
        # dkv (the travelling buffer): the last step is the local block, steps >= first the first kv
        # half, the others all of it
        if i == cp - 1:
            bkv += 3.0 + 2.0 if rank == 0 else 6.0
        elif i >= first:
            bkv += 2.0 if (i == 0 and rank == cp - 1) else 3.0
        else:
            bkv += 6.0 if i > 0 else 4.0
    return fq, 4.0, bq, 4.0 + bkv


@lru_cache(maxsize=64)
def cp_ring_ranks(cp: int) -> tuple[tuple[float, float, float, float], ...]:
    """The ranks that can be the slowest: every count is linear in the rank on 1 .. cp - 2 (the two
    ends differ by a copy instead of an add), so any weighted sum peaks at 0, 1, cp - 2 or cp - 1."""
    return tuple(cp_ring_bytes(cp, rank) for rank in sorted({0, 1, max(0, cp - 2), cp - 1}))


def _cp_comm(model, layout, hw, tokens, passes, attn_fwd, attention, params) -> float:
    """Ring context parallelism (Megatron-Core / Transformer Engine `cp_comm_type="p2p"`,
    `AttnFuncWithCPAndKVP2P`). Forward: cp - 1 transfers of this rank's K, V chunk; TE starts step
    i + 1's exchange before step i's kernel and waits for it after, so each transfer hides behind one
    step's kernel only (the cp kernels of a pass are equal, attention / cp each; the last has no
    transfer behind it): (cp - 1) x max(0, transfer - attention / cp) exposed, the forward's transfers
    behind the forward's kernels (`attn_fwd`; a recomputed forward rings K, V again). Backward: cp
    transfers, each behind one backward kernel: step 0 sends K, V only, steps 1 .. cp - 2 K, V and the
    dK, dV accumulated so far (one buffer, twice the bytes), step cp - 1 dK, dV only. Each transfer is
    a point-to-point send to one neighbour: across nodes it runs over one NIC (the sender's rail;
    NCCL's p2p does not stripe one send over the node's other NICs), unlike a ring collective that
    runs one ring per NIC. Not hidden either: a fixed latency per dependent ring step (cp - 1
    forward, cp backward) and the memory-bound corrections of the slowest rank (`cp_ring_bytes`)."""
    if layout.cp == 1:
        return 0.0
    cp = layout.cp
    kv_elems = tokens * model.kv_heads * (model.qk_dim + model.v_dim) / layout.tp
    crosses = cp * layout.tp > hw.nvlink_domain
    bw = (hw.net_bw if crosses else hw.nvlink_bw) * params.link
    step = kv_elems * 2.0 / bw  # one ring step's K, V (or dK, dV) transfer, 16-bit
    replays = layout.recompute == "full" or "core_attn" in layout.selective_modules
    forwards = 1.0 + (1.0 if passes > 1 and replays else 0.0)
    exposed = forwards * (cp - 1) * max(0.0, step - attn_fwd / cp)
    steps = forwards * (cp - 1)
    if passes > 1:
        attn_bwd = (attention - forwards * attn_fwd) / cp
        exposed += 2.0 * max(0.0, step - attn_bwd) + (cp - 2) * max(0.0, 2.0 * step - attn_bwd)
        steps += cp
    q_elems = tokens * model.heads * model.qk_dim / layout.tp
    back = 1.0 if passes > 1 else 0.0
    # the slowest rank: the ring's steps are dependent, so every rank waits for it at the next layer's ring
    merge = max(forwards * (fq * q_elems + fkv * kv_elems) + back * (bq * q_elems + bkv * kv_elems)
                for fq, fkv, bq, bkv in cp_ring_ranks(cp))
    return exposed + steps * params.ring_step_latency + merge / hw.hbm_bw


@lru_cache(maxsize=64)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normal variables] (0 for one): the integral of
    x n phi(x) Phi(x)^(n-1) over x by the midpoint rule on [-10, 10], step 1e-3 (1 / sqrt(pi) =
    0.5642 for two, 1.4236 for eight, 2.3437 for 64). The midpoints with their phi(x) and Phi(x) do not
    depend on n and are computed once per process (`_normal_grid`): a search over every expert-parallel
    size asks for up to nine n (the divisors of 256 experts)."""
    if n <= 1:
        return 0.0
    step, total = 1e-3, 0.0
    for x, phi, cdf in _normal_grid():
        total += x * n * phi * cdf ** (n - 1)
    return total * step


@lru_cache(maxsize=1)
def _normal_grid() -> tuple[tuple[float, float, float], ...]:
    """(x, phi(x), Phi(x)) at the 20,000 midpoints of `expected_max_normal`'s rule on [-10, 10], step 1e-3."""
    step, grid = 1e-3, []
    for i in range(20000):
        x = -10.0 + (i + 0.5) * step
        grid.append((x, math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi), 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))))
    return tuple(grid)


def moe_max_load(model: ModelSpec, layout: Layout, tokens_per_rank: float) -> float:
    """Expected routed-token load of the busiest expert-parallel rank over the mean load (>= 1), for
    dropless routing (no `moe_expert_capacity_factor`: what Megatron-Core runs by default and what the
    nemoc runtime runs). Every layer's combine all-to-all waits for the rank that received the most
    tokens, so the all-to-all and that rank's grouped GEMM, not the mean, set the layer's time.

    A router balanced in expectation (the aux loss's aim) still draws each micro batch's routing
    afresh: the rank's load is a sum over the N = tokens_per_rank x ep x etp tokens the ETP x EP group
    dispatches of the number of each token's top_k (distinct) experts that live on the rank's
    L = experts / ep; for a uniformly balanced router that number is hypergeometric, mean k L / E,
    variance k (L/E)(1 - L/E)(E - k)/(E - 1). The ep loads sum to N k (each token sends k copies), an
    exchangeable normal vector with correlation -1/(ep - 1); its maximum is the mean plus
    sigma sqrt(ep / (ep - 1)) x E[max of ep standard normals] (`expected_max_normal`). This is the
    imbalance of a perfectly balanced router: exactly Megatron-Core's benchmark router
    `moe_router_force_load_balancing` (iid normal logits per token: NeMo's "force-balanced,
    token-dropless" MoE benchmarks, Megatron-Bridge's MoE performance configs), a lower bound of a
    trained router's (whose per-expert preferences add a systematic part no published statistic here
    fixes); drop-and-pad runs (`moe_pad_expert_input_to_capacity`) have none (`moe_rows_factor`). It
    shrinks with the tokens (1 / sqrt(N)), so the time per row never grows with the micro batch (the
    search's lower bound holds). Mixtral (8 experts, top 2), EP 8: +1.0 % at 8,192 tokens per rank (8x7B,
    micro batch 2 x 4,096), +1.5 % at 4,096 (8x22B at 64K: CP 8, SP over TP 2); 128 experts, top 8, EP 8,
    4,096 tokens: +0.8 %; 256 experts, top 8, EP 64, 4,096 tokens: +1.3 %."""
    ep, experts, k = layout.ep, model.experts, model.top_k
    if not model.is_moe or ep <= 1 or experts <= k:
        return 1.0
    share = (experts // ep) / experts  # L / E
    n = tokens_per_rank * ep * layout.etp
    mean = n * k * share
    var = n * k * share * (1.0 - share) * (experts - k) / (experts - 1)
    return 1.0 + math.sqrt(var * ep / (ep - 1)) * expected_max_normal(ep) / mean


def moe_rows_factor(model: ModelSpec, layout: Layout, tokens_per_rank: float) -> float:
    """Routed rows of the busiest expert-parallel rank over the mean load (the factor the grouped GEMMs
    and the all-to-all carry). Dropless (no `moe_capacity_factor`): `moe_max_load`. Drop-and-pad
    (`moe_pad_to_capacity`, Megatron-Core `moe_pad_expert_input_to_capacity`): every expert's input is
    padded to exactly its capacity, c x its mean load (`token_dispatcher.py`: capacity = ceil(tokens x
    top_k / experts x c) per expert, `get_capacity`), on every rank alike: c, no busiest-rank factor.
    A capacity without padding only drops tokens: the busiest rank's rows are its dropless load capped
    at c x the mean, min(moe_max_load, c)."""
    dropless = moe_max_load(model, layout, tokens_per_rank)
    c = model.moe_capacity_factor
    if not model.is_moe or c is None:
        return dropless
    return c if model.moe_pad_to_capacity else min(dropless, c)


def _ep_comm(model, layout, hw, tokens, passes, params, dispatcher: str = "alltoall") -> float:
    """MoE token dispatch, not overlapped (Megatron-Core 0.16 overlaps it only with the optional 1F1B
    A2A overlap, which nemoc does not enable). `alltoall` and `flex` (DeepEP: the same bytes in fused
    kernels): dispatch and combine of tokens x top_k hidden vectors forward, the same backward;
    (ep - 1)/ep of it leaves the GPU. `allgather` (MoEAllGatherTokenDispatcher): every rank all-gathers
    the hidden states of the whole expert-parallel x expert-TP group and reduce-scatters the combined
    output, (group - 1) x its own tokens each way whatever top_k is: cheaper than all-to-all only when
    top_k x (ep - 1) / ep > group - 1 (many experts per token over few ranks).

    Where the groups sit: Megatron-Core 0.16.1 builds the expert groups from a rank grid of their own
    (`parallel_state.initialize_model_parallel`, `expert_decoder_rank_generator`: tp = etp, ep,
    dp = world / (etp x ep x pp), pp, cp = 1, the same order tp-cp-ep-dp-pp), not from the dense
    layers' TP x CP grid: an EP group's ranks are etp apart and the ETP x EP group (allgather) is
    etp x ep consecutive ranks, whatever TP and CP the attention uses. With TP 2, CP 8, EP 8, ETP 1
    (Mixtral 8x22B at 64K) the EP group is eight consecutive ranks: one HGX node, over NVLink."""
    if not model.is_moe:
        return 0.0
    rep = layout.tp if layout.sequence_parallel else 1
    if dispatcher == "allgather":
        group = layout.ep * layout.etp
        if group == 1:
            return 0.0
        size = tokens / rep * model.hidden * 2.0
        return 2.0 * (passes / 1.5) * size * (group - 1) / _link_bw(hw, group, 1, params)
    if layout.ep == 1:
        return 0.0
    # the busiest rank's share of the routed tokens (`moe_rows_factor`: dropless, capped, or padded to the
    # capacity): the exchange ends when its receive (dispatch) and send (combine) end
    size = tokens * model.top_k / rep * model.hidden * 2.0 * moe_rows_factor(model, layout, tokens / rep)
    volume = 2.0 * (passes / 1.5) * size * (layout.ep - 1) / layout.ep
    return volume / _alltoall_bw(hw, layout.ep, layout.etp, params)


def _alltoall_bw(hw: HardwareSpec, size: int, stride: int, params: EfficiencyParams) -> float:
    """Per-GPU bandwidth of an all-to-all over `size` ranks spaced `stride` apart, per byte of the (size - 1) /
    size of its buffer a rank sends. Inside one NVLink domain: NVLink (as `_link_bw`). Across domains it is not
    a ring: every rank sends each peer its own share point to point (NCCL's all-to-all; DeepEP's RDMA
    kernels alike), the `members - 1` peers of its domain over NVLink and the `size - members` others through
    its own NIC (rail-optimised HGX / NVL72: one NIC per GPU, so the NICs of a domain carry their own GPUs'
    traffic and do not add up as a ring's parallel rings do), both at once: the slower of the two ends it.
    EP 128 on HGX H100 (8 per node): 127 / max(7 / NVLink, 120 / NIC) = 53 GB/s, where a ring over the same
    ranks gets min(NVLink, 8 NICs) = 400 GB/s. Pessimistic for DeepEP's internode kernels (flex), which send
    a token once per destination node and forward it over NVLink: not modelled."""
    if size * stride <= hw.nvlink_domain or size == 1:
        return hw.nvlink_bw * params.link
    members = max(1, min(size, hw.nvlink_domain // stride))
    seconds_per_byte = max((members - 1) / hw.nvlink_bw, (size - members) / hw.net_bw)
    return (size - 1) / seconds_per_byte * params.link


# ----------------------------------------------------------------------------------- the estimate


def _output_gemm_time(model, layout, hw, *, seq, micro_batch, params, scalar_head: bool = False,
                      last_logits: bool = False) -> float:
    """One GEMM of the output layer for a micro batch (forward, dgrad and wgrad are each one): tokens x
    (V / TP) x h (`last_logits`: one position per row, `_head_tokens`); 0 for a scalar head."""
    vocab = 0 if scalar_head else padded_vocab(model.vocab, layout.tp)
    if not vocab:
        return 0.0
    tokens = micro_batch * seq / layout.cp
    head = _head_tokens(tokens, micro_batch, last_logits)
    # the output layer stays in 16-bit in FP8 recipes (Transformer Engine / NeMo keep the first and
    # last layers out of FP8)
    rate = hw.peak("bf16" if hw.supports("bf16") else "fp32") * params.gemm_eff(hw.generation, "bf16")
    return gemm_time(head, vocab / layout.tp, model.hidden, flops_per_s=rate, bytes_per_s=hw.hbm_bw, in_bytes=2.0)


def _defers_wgrad(layout: Layout, backward: float, scalar_head: bool = False) -> bool:
    """Whether the last stage's output-layer weight gradients leave the steady state for the drain
    (`defer_embedding_wgrad_compute`: pipelined training of a trainable output layer)."""
    return layout.defer_embedding_wgrad_compute and layout.pp > 1 and backward == FULL and not scalar_head


def _stage_times(model, layout, hw, lt: LayerTimes, *, seq, micro_batch, backward, params,
                 scalar_head: bool = False, split: tuple[int, int, int] | None = None,
                 kernels: str = "te", cross_entropy: str | None = None,
                 loss: bool = True, last_logits: bool = False,
                 bf16: tuple[tuple[int, ...], float] | None = None,
                 deferred_wgrad: bool = False,
                 dense: tuple[tuple[tuple[int, ...], float], ...] | None = None,
                 mtp_layer: float | None = None) -> tuple[float, float, float]:
    """(slowest, mean, output) micro-batch times over pipeline stages: layers plus, on the last
    stage, the output GEMM (h x V / TP, never recomputed) and its cross entropy (`output`: the
    `cross_entropy` fusion, CROSS_ENTROPY_BYTES_OF; None: TE's fused kernels with `kernels = te`,
    Megatron-Core's unfused one on the local spec; none at all with `loss = False`); a scalar (reward /
    value) head costs nothing next to a layer. `last_logits`: the output GEMM runs on one position per row
    (`_head_tokens`: a KV-cached prefill). `bf16`: (bf16 layers per stage, extra seconds per such layer and
    micro batch) where the first / last layers stay in bf16 (`_bf16_layers`): each stage is costed with its own.
    `deferred_wgrad`: the slowest stage with the last stage's output-layer wgrad GEMM taken out of its micro
    batch (`defer_embedding_wgrad_compute`, `_deferred_wgrad`). `dense`: for a MoE model with dense layers
    (`_dense_layers`), (dense layers per stage, seconds a dense layer takes more than an expert layer, usually
    negative) and (bf16 dense layers per stage, their extra seconds), priced per stage as the bf16 layers are.
    The last stage also runs the multi-token prediction depths (`_mtp_time`; `mtp_layer`: one MTP layer's seconds
    where they differ from the decoder's, else from `lt` and `dense`)."""
    vocab = 0 if scalar_head else padded_vocab(model.vocab, layout.tp)
    tokens = micro_batch * seq / layout.cp
    head = _head_tokens(tokens, micro_batch, last_logits)
    gemm = _output_gemm_time(model, layout, hw, seq=seq, micro_batch=micro_batch, params=params,
                             scalar_head=scalar_head, last_logits=last_logits)
    logits = (1.0 + backward) * gemm
    ce_fwd, ce_bwd = CROSS_ENTROPY_BYTES_OF[cross_entropy or ("te" if kernels == "te" else "none")]
    ce = (ce_fwd + (ce_bwd if backward else 0.0)) if loss else 0.0
    logits += ce * head * vocab / layout.tp / hw.hbm_bw
    per_layer = lt.total
    deferred = gemm if deferred_wgrad and _defers_wgrad(layout, backward, scalar_head) else 0.0
    mtp = _mtp_time(model, layout, hw, lt, logits, seq=seq, micro_batch=micro_batch, backward=backward,
                    params=params, scalar_head=scalar_head, dense=dense, mtp_layer=mtp_layer)
    if bf16 is not None or dense is not None:
        extras = ((bf16,) if bf16 is not None else ()) + (dense or ())
        slow, mean, _ = _stage_times_mixed(model.layers, layout.pp, per_layer, logits + mtp, split, extras,
                                           last_less=deferred)
        return slow, mean, logits
    if layout.pp == 1:
        t = model.layers * per_layer + logits + mtp
        return t, t, logits
    first = layers_on_stage(model.layers, layout.pp, 0, split) * per_layer
    last = layers_on_stage(model.layers, layout.pp, layout.pp - 1, split) * per_layer + logits + mtp - deferred
    middle = layers_on_stage(model.layers, layout.pp, 1, split) * per_layer if layout.pp > 2 else 0.0
    mean = (model.layers * per_layer + logits + mtp) / layout.pp
    return max(first, last, middle, mean), mean, logits


def _mtp_time(model, layout, hw, lt: LayerTimes, logits: float, *, seq, micro_batch, backward, params,
              scalar_head: bool = False, dense=None, mtp_layer: float | None = None) -> float:
    """Seconds the multi-token prediction depths add to the last pipeline stage per micro batch (Megatron-Core
    0.16.1 builds them there: multi_token_prediction.py `get_mtp_num_layers_to_build`). Each depth
    (`MultiTokenPredictionLayer`) runs one layer of the last layer's kind (`mtp_layer`, else the expert layer's `lt`,
    or a dense one's: `lt` plus `dense`'s extra), eh_proj (tokens x 2h x h / TP, forward and backward like any GEMM,
    at the 16-bit rate as the output layer: its 0.3 % of a DeepSeek-V3 layer's FLOPs make the precision moot) and
    the shared output layer with its loss again (`logits`: GEMM and cross entropy, as the main head). The
    norms and eh_proj's TP all-gather of an h-wide output are left out (elementwise, one layer's input each)."""
    n = model.mtp_num_layers
    if not n or scalar_head:
        return 0.0
    if mtp_layer is None:
        mtp_layer = lt.total
        if model.is_moe and not model.mtp_layer_is_moe and dense:
            mtp_layer += dense[0][1]  # a dense layer's extra seconds (`_dense_layers`)
    tokens = micro_batch * seq / layout.cp
    rate = hw.peak("bf16" if hw.supports("bf16") else "fp32") * params.gemm_eff(hw.generation, "bf16")
    eh_proj = gemm_time(tokens, model.hidden / layout.tp, 2 * model.hidden, flops_per_s=rate, bytes_per_s=hw.hbm_bw,
                        in_bytes=2.0)
    return n * (mtp_layer + (1.0 + backward) * eh_proj + logits)


def _deferred_wgrad(model, layout, hw, lt: LayerTimes, *, seq, micro_batch, backward, params, slow, mean,
                    scalar_head=False, split=None, kernels="te", cross_entropy=None,
                    bf16: tuple[tuple[int, ...], float] | None = None,
                    dense: tuple[tuple[tuple[int, ...], float], ...] | None = None,
                    mtp_layer: float | None = None) -> tuple[float, float]:
    """(saved, drained): what `defer_embedding_wgrad_compute` takes off the step and what it adds after the
    pipeline's drain. Megatron-Core's last stage keeps the output layer's input and logits gradient of the
    first d micro batches (d = `wgrad_deferral_limit`, 0: all m; tensor_parallel/layers.py) and runs their
    weight-gradient GEMMs (`w` each) in `finish_embedding_wgrad_compute` (pipeline_parallel/schedules.py),
    after its last backward, while the earlier stages still run theirs: in 1F1B's cooldown the last stage
    waits (pp - 1) / vp backward passes of a mean stage. Saved: the last stage's steady state gets shorter by
    `w` for d micro batches, which shortens the step only while the last stage is the slowest (at most
    m x (slowest - slowest without the GEMM): `_stage_times(deferred_wgrad=True)`); drained: the d GEMMs that do
    not fit the wait."""
    if not _defers_wgrad(layout, backward, scalar_head):
        return 0.0, 0.0
    m = layout.num_microbatches
    d = m if layout.wgrad_deferral_limit == 0 else min(layout.wgrad_deferral_limit, m)
    w = _output_gemm_time(model, layout, hw, seq=seq, micro_batch=micro_batch, params=params)
    slow_deferred, _, _ = _stage_times(model, layout, hw, lt, seq=seq, micro_batch=micro_batch, backward=backward,
                                       params=params, scalar_head=scalar_head, split=split, kernels=kernels,
                                       cross_entropy=cross_entropy, bf16=bf16, deferred_wgrad=True, dense=dense,
                                       mtp_layer=mtp_layer)
    saved = min(d * w, m * (slow - slow_deferred))
    wait = (layout.pp - 1) / (layout.vp or 1) * mean * backward / (1.0 + backward)
    return saved, max(0.0, d * w - wait)
def _stage_times_mixed(layers: int, pp: int, per_layer: float, logits: float, split,
                       extras: tuple[tuple[tuple[int, ...], float], ...],
                       last_less: float = 0.0) -> tuple[float, float, float]:
    """`_stage_times` where, for each (counts, extra) of `extras`, stage s runs counts[s] of its layers `extra`
    seconds slower than `per_layer` (the bf16 layers under a low precision: `flops.bf16_layers_per_stage`; a
    MoE model's dense layers, extra usually negative: `flops.dense_layers_per_stage`): the busiest stage is
    whichever holds most work, the mean spreads the extras over the stages. `last_less`: the deferred
    output-layer wgrad GEMM taken out of the last stage's micro batch (`_stage_times`)."""
    times = [layers_on_stage(layers, pp, s, split) * per_layer + sum(c[s] * x for c, x in extras)
             + (logits - last_less if s == pp - 1 else 0.0) for s in range(pp)]
    mean = (layers * per_layer + sum(sum(c) * x for c, x in extras) + logits) / pp
    return max(max(times), mean), mean, logits


def _dense_layers(model, layout, hw, lt: LayerTimes, split, precision: str,
                  graph: tuple[float, float] | None = None, bf16_layers: tuple[int, int] = (0, 0),
                  dense_times=None, **layer_kw) -> tuple[tuple[tuple[tuple[int, ...], float], ...], LayerTimes, float] | None:
    """(per-stage extras for `_stage_times`' `dense`, the dense layer's times, the bf16 dense layers' extra
    seconds per micro batch summed over the stages) for a MoE model with dense layers (`moe_layer_freq`,
    `moe_first_dense_layers`); None otherwise. A dense layer is a layer of `ModelSpec.dense_layer_model` (its
    MLP of ffn_hidden, no router, no token dispatch: no expert-parallel all-to-all), on the stages Megatron-Core
    builds it (`flops.dense_layers_per_stage`): (dense layers per stage, seconds a dense layer takes more than an
    expert layer); where `bf16_layers` keeps some of them in bf16 under a low precision, also (those per stage,
    the dense layer's extra seconds in bf16), as `_bf16_layers` prices the expert layers. `graph` as there.
    `dense_times`: a callable giving the dense layer's `layer_times` (before `graph`) where the caller keeps
    them (`step_time_lower_bound`'s memo); computed here otherwise."""
    if not model.has_dense_layers:
        return None
    counts = dense_layers_per_stage(model, layout.pp, layout.vp, split)
    kw = {k: v for k, v in layer_kw.items() if k not in ("moe", "fp8_recipe")}  # a dense layer dispatches nothing
    recipe = layer_kw.get("fp8_recipe")
    dense = (dense_times() if dense_times is not None else
             layer_times(model.dense_layer_model, layout, hw, precision=precision, fp8_recipe=recipe, **kw))
    if graph is not None:
        dense = graphed(dense, layer_kw["params"], *graph)
    extras = ((counts, dense.total - lt.total),)
    bf16_total = 0.0
    if precision in LOW_PRECISIONS and any(bf16_layers):
        in_bf16 = bf16_dense_layers_per_stage(model, layout.pp, layout.vp, split, *bf16_layers)
        slow = layer_times(model.dense_layer_model, layout, hw, precision="bf16", fp8_recipe=None, **kw)
        if graph is not None:
            slow = graphed(slow, layer_kw["params"], *graph)
        extra = max(0.0, slow.total - dense.total)
        extras += ((in_bf16, extra),)
        bf16_total = sum(in_bf16) * extra
    return extras, dense, bf16_total


def _bf16_layers(model, layout, hw, lt: LayerTimes, bf16_layers: tuple[int, int], split, precision: str,
                 graph: tuple[float, float] | None = None, **layer_kw) -> tuple[tuple[int, ...], float] | None:
    """(bf16 layers per pipeline stage, extra seconds per such layer and micro batch) where the experiment
    keeps its first / last layers in bf16 under a precision below 16 bits (Megatron-Core
    `first_last_layers_bf16`: those layers run outside the fp8 / fp4 context, so their GEMMs take bf16's rate
    and no quantisation passes); None otherwise. `layer_kw`: `layer_times`' other arguments, as the stage's;
    `graph`: (captured share, passes) where CUDA graphs shorten `lt` (`graphed`), applied to the bf16 layer too."""
    if precision not in LOW_PRECISIONS or not any(bf16_layers):
        return None
    counts = bf16_layers_per_stage(model.layers, layout.pp, layout.vp, split, *bf16_layers)
    if model.has_dense_layers:  # the dense ones among them are priced as dense layers (`_dense_layers`)
        dense = bf16_dense_layers_per_stage(model, layout.pp, layout.vp, split, *bf16_layers)
        counts = tuple(c - d for c, d in zip(counts, dense))
    slow = layer_times(model, layout, hw, precision="bf16", fp8_recipe=None, **layer_kw)
    if graph is not None:
        slow = graphed(slow, layer_kw["params"], *graph)
    return counts, max(0.0, slow.total - lt.total)


def _head_tokens(tokens: float, micro_batch: float, last_logits: bool) -> float:
    """The positions the output layer runs on in one micro batch: every token, or with `last_logits` one per
    row: a prefill with Megatron-Core's StaticInferenceContext (the nemoc runtime's generator) materialises
    only the last position's logits (gpt_model.py `_postprocess`: `materialize_only_last_token_logits`,
    True for the static context; tested in the runtime's generation tests)."""
    return float(micro_batch) if last_logits else tokens


def _dp_exposed(model, layout, hw, t_mb_stage: float, fwd_fraction: float, params, trainable_params: float,
                grad_bytes: int = 4, overlap: bool = True, overlap_gather: bool = True,
                expert_params: float = 0.0, embedding: float = 0.0) -> float:
    # (FP8 parameters, `layout.fp8_param_gather`: the all-gather moves 1 byte per parameter, not 2)
    """Data-parallel gradient reduce-scatter (fp32 main grads) + parameter all-gather (bf16) with the
    distributed optimizer, or an fp32 all-reduce without it. Megatron overlaps them with the last
    micro batch's backward and the first micro batch's forward (`overlap_grad_reduce`,
    `overlap_param_gather`); what exceeds those windows is exposed. The group spans TP x CP x DP
    consecutive ranks (rank order tp-cp-ep-dp-pp). `overlap=False`: the reduction runs after the
    backward, fully exposed (Megatron-LM before its 2023 `overlap_grad_reduce`: the 2021 runs
    all-reduced the gradients after the pipeline flush, Narayanan et al. 2021 Sec. 2.2).
    `overlap_gather=False`: the parameter all-gather runs after the optimizer step (Megatron DDP
    without `overlap_param_gather`, the nemoc runtime's default), fully exposed. `expert_params`: the
    routed experts' share of `trainable_params` (MoE), whose gradients Megatron-Core's DDP reduces over
    the expert-data-parallel group (`expert_data_parallel_group`, its own buckets), one after the other
    with the dense ones on the same links. `embedding`: the input embedding's parameters on one GPU of
    this stage when the optimizer updates them (1F1B: `_embedding_bucket`), else 0."""
    shard = layout.dp * layout.cp
    expert_shard = layout.dp * layout.cp * layout.tp // (layout.ep * layout.etp)
    if (shard == 1 and expert_shard <= 1) or trainable_params == 0:
        return 0.0
    gathered = 1.0 if layout.fp8_param_gather else 2.0
    # (group size, rank stride, parameters): the dense parameters reduce over DP x CP (ranks tp apart);
    # routed experts over the expert-data-parallel group of Megatron-Core's expert rank grid (tp x cp x
    # dp / (ep x etp) ranks, etp x ep apart: `_ep_comm`), which with EP spans more nodes
    groups = [(shard, layout.tp, trainable_params - expert_params)]
    if expert_params:
        groups.append((expert_shard, layout.ep * layout.etp, expert_params))
    rs = ag = 0.0
    last_bucket = None  # one 40M-parameter bucket's reduce-scatter (1F1B: the last cannot overlap)
    for size, stride, n in groups:
        if size == 1 or n == 0:
            continue
        frac, bw = (size - 1) / size, _link_bw(hw, size, stride, params)
        if last_bucket is None:
            last_bucket = 40e6 * grad_bytes * frac / bw
        if layout.distributed_optimizer:
            rs, ag = rs + n * grad_bytes * frac / bw, ag + n * gathered * frac / bw
        else:
            rs += 2.0 * n * grad_bytes * frac / bw
    if not overlap:
        return rs + ag
    vp = layout.vp or 1
    if vp > 1:
        return _interleaved_dp_exposed(rs, ag, vp, layout.pp, t_mb_stage, fwd_fraction, overlap_gather)
    # 1F1B (Megatron-Core 0.16.1 schedules.py, forward_backward_pipelining_without_interleaving): grad
    # sync is enabled only for the first stage's last backward (`no_sync` before it; with
    # `align_grad_reduce` the later stages start theirs after their cool-down, which ends earlier), so
    # the window is one micro batch's backward; the first stage is bucketed (DDP: `ddp_bucket_params` per
    # bucket, `disable_bucketing or pp_rank > 0` makes the other stages one bucket) and the last bucket,
    # ready when the backward ends, cannot overlap: the input embedding's where it is trained
    # (`_embedding_bucket`), one 40M-parameter bucket otherwise (LoRA's adapters). The parameter
    # all-gathers mirror this in the forward (the embedding's, first, exposed).
    bwd_window = t_mb_stage * (1.0 - fwd_fraction)
    fwd_window = t_mb_stage * fwd_fraction
    bucket = min(rs, last_bucket or 0.0)  # the last bucket cannot overlap
    gather = max(0.0, ag - fwd_window) if overlap_gather else ag
    if embedding and groups[0][0] > 1:  # the dense group reduces: the embedding is in its last bucket
        size, stride, _ = groups[0]
        last = embedding_bucket_params(embedding, dp=layout.dp, shared=model.tie_embeddings and layout.pp > 1,
                                       distributed=layout.distributed_optimizer)
        bucket, gather = _embedding_bucket(last, grad_bytes, gathered, (size - 1) / size,
                                           _link_bw(hw, size, stride, params), rs, ag, fwd_window,
                                           layout.distributed_optimizer, overlap_gather)
    return max(0.0, rs - bwd_window) + gather + bucket


def ddp_bucket_params(dp_size: int) -> float:
    """Megatron-Core DDP's default bucket size in parameters (distributed_data_parallel.py:
    `bucket_size = max(40000000, 1000000 * dp_group.size())`, the data-parallel group without the
    context-parallel ranks, though the buffers reduce over DP x CP; NeMo and Megatron-Bridge leave it unset)."""
    return max(40e6, 1e6 * dp_size)


def embedding_bucket_params(embedding: float, *, dp: int, shared: bool, distributed: bool) -> float:
    """Parameters in the last gradient bucket of the stage that holds the input embedding (`embedding`
    parameters on one GPU). With tied embeddings split over a pipeline (`shared`: Megatron-Core marks the first
    stage's word embeddings `shared_embedding`, language_module.py) and the distributed optimizer, the embedding
    gets a bucket of exactly its size (param_and_grad_buffer.py `_does_param_require_new_bucket` closes the
    bucket before it and the one it is in). Otherwise it joins the last default-sized bucket (`ddp_bucket_params`
    of the DP size): at least that bucket, at least the embedding."""
    if shared and distributed:
        return embedding
    return max(ddp_bucket_params(dp), embedding)


def _embedding_bucket(bucket: float, grad_bytes: int, gathered: float, frac: float, bw: float,
                      rs: float, ag: float, fwd_window: float, distributed: bool,
                      overlap_gather: bool) -> tuple[float, float]:
    """(last gradient bucket's reduction, exposed parameter all-gather) of the 1F1B stage that holds the
    input embedding (its last bucket: `bucket` parameters on one GPU, `embedding_bucket_params`), as
    Megatron-Core 0.16.1's DDP buckets and schedules them. Buckets are filled in reverse registration
    order (param_and_grad_buffer.py `for param in params[::-1]`; a bucket closes once it holds `ddp_bucket_params`), so the input
    embedding, registered first, lands in the LAST bucket. Its gradient is complete only when the
    backward ends (the embedding's backward is the step's last kernel), so that bucket's reduction
    cannot overlap: at least the embedding's reduce-scatter (an all-reduce, twice the bytes, without
    the distributed optimizer). The all-gathers run in the opposite order, one in flight at a time
    (distributed_data_parallel.py `next_param_gather_bucket_group`; param_and_grad_buffer.py
    `finish_param_sync`: the first forward pre-hook dispatches the embedding's bucket and waits for
    it): nothing precedes it, so it is exposed in full, and the other buckets hide behind the forward
    as before. With Nemotron-4's 256K vocabulary that bucket is 0.5-1.6 billion parameters per GPU
    (13-25 default buckets); with 32K-128K vocabularies one to a few.
    Not counted: an untied output layer (registered last) is gathered last, behind one bucket of layer
    forward (~10 ms exposed on Nemotron-4 15B on 64 B200, 0.5 points of C05); plain DDP has no such
    gather, so it would break the search's dominance of the overlapped distributed optimizer over
    plain DDP (`search._do_domain`)."""
    last = min(rs, (1.0 if distributed else 2.0) * bucket * grad_bytes * frac / bw)
    if not (distributed and overlap_gather):
        return last, ag  # plain DDP gathers nothing (ag = 0); an unoverlapped gather is exposed whole
    first = min(ag, bucket * gathered * frac / bw)
    return last, first + max(0.0, ag - first - fwd_window)


def _interleaved_dp_exposed(rs: float, ag: float, vp: int, pp: int, t_mb_stage: float, fwd_fraction: float,
                            overlap_gather: bool) -> float:
    """Exposed data-parallel communication of the interleaved schedule, as Megatron-Core 0.16.1
    schedules it (pipeline_parallel/schedules.py, forward_backward_pipelining_with_interleaving, with
    Megatron-LM's / Megatron-Bridge's `align_grad_reduce` and, for virtual pipelines, NeMo's
    `align_param_gather`). Each model chunk has its own DDP (1/vp of the stage's parameters: `rs`, `ag`
    are the whole stage's).

    Reduce-scatter: `grad_sync_func[c]` (the whole chunk at once; per-bucket hooks are off) starts
    when chunk c's last micro-batch backward is done, aligned across stages. Chunk 0 finishes last,
    with nothing left to hide its reduction: it is exposed in full. Chunk c + 1 finishes pp chunk
    backwards before chunk c (the schedule runs each chunk for pp consecutive micro batches), so each
    earlier chunk's reduction hides behind pp chunk backwards; the excess queues on the one DP
    communicator and is exposed.

    All-gather (`overlap_param_gather`): `param_sync_func` starts chunks 0 and 1 when the schedule
    begins and chunk c + 1 at chunk c's first forward; the first forward waits for chunk 0's gather
    (exposed in full; no forward precedes it), and each later chunk's gather hides behind pp chunk
    forwards. Without `overlap_param_gather` the gather runs after the optimizer step, fully exposed."""
    t_chunk_fwd = t_mb_stage * fwd_fraction / vp
    t_chunk_bwd = t_mb_stage * (1.0 - fwd_fraction) / vp
    rs_chunk, ag_chunk = rs / vp, ag / vp
    reduce = rs_chunk + (vp - 1) * max(0.0, rs_chunk - pp * t_chunk_bwd)
    gather = ag_chunk + (vp - 1) * max(0.0, ag_chunk - pp * t_chunk_fwd) if overlap_gather else ag
    return reduce + gather


def fsdp_exposed(model: ModelSpec, layout: Layout, hw: HardwareSpec, lt: LayerTimes, micro_batches: int,
                 params: EfficiencyParams, trainable_params: float, grad_bytes: int = 4,
                 dense: tuple[LayerTimes, int] | None = None) -> float:
    """Exposed data-parallel communication of one step under Megatron-FSDP (optim_grads_params,
    ZeRO-3; pipeline = 1, E177). Every micro batch all-gathers each layer's 16-bit weights (1 byte
    with FP8 parameters) before its forward and again before its backward (they are freed after use)
    and reduce-scatters the layer's gradients after its backward, over the DP x CP group. Megatron-FSDP
    prefetches the next layer's gather while a layer computes, so per layer the forward hides one
    all-gather and the backward one all-gather plus one reduce-scatter; what exceeds them is exposed,
    plus the first layer's gather, which nothing precedes. The embedding and output layers are units
    too; they are counted as layers' share of `trainable_params` here (a stated simplification). `dense`: a MoE
    model's dense layers (their `LayerTimes`, how many): each hides its gathers behind its own compute."""
    shard = layout.dp * layout.cp
    if shard == 1 or trainable_params == 0:
        return 0.0
    frac = (shard - 1) / shard
    bw = _link_bw(hw, shard, layout.tp, params)
    unit = trainable_params / model.layers
    gather = unit * (1.0 if layout.fp8_param_gather else 2.0) * frac / bw
    reduce = unit * grad_bytes * frac / bw

    def per_layer(t: LayerTimes) -> float:
        fwd = t.total * t.forward_fraction
        return max(0.0, gather - fwd) + max(0.0, gather + reduce - (t.total - fwd))
    lt_dense, n_dense = dense or (lt, 0)
    return micro_batches * ((model.layers - n_dense) * per_layer(lt) + n_dense * per_layer(lt_dense)) + gather


def fsdp_forward_gathers(model: ModelSpec, layout: Layout, hw: HardwareSpec, params: EfficiencyParams,
                         trainable_params: float, work, *, lt: LayerTimes, micro_batches: int,
                         rollout: tuple[float, float] | None = None,
                         dense: tuple[LayerTimes, int] | None = None) -> float:
    """Exposed all-gathers of the trained models' forwards outside their updates under Megatron-FSDP: the
    runtime runs them through the FSDP wrapper, whose forward pre-hooks gather each layer's 16-bit weights
    (freed after the layer), so every such forward gathers the whole model once. They are the no-gradient
    passes of a trained model (`work.passes` after the first, named after a trained model: KTO's KL pairs,
    GRPO's and PPO's old log-probs, the critic's values), one forward per micro batch, each layer's gather
    hidden behind the previous layer's forward as in `fsdp_exposed`; and the rollout (GRPO, PPO): one prefill
    and one forward per decoded token over the whole rank's batch (the runtime's KV-cached generator), each gathering
    every layer, hidden behind that forward's per-layer time (a decode step is short: mostly exposed).
    Frozen models (references, the reward model) are not sharded: they gather nothing. `dense` as in
    `fsdp_exposed` (a dense layer's gather hides behind a dense layer's forward)."""
    shard = layout.dp * layout.cp
    if shard == 1 or trainable_params == 0:
        return 0.0
    bw = _link_bw(hw, shard, layout.tp, params)
    gather = trainable_params / model.layers * (1.0 if layout.fp8_param_gather else 2.0) * (shard - 1) / shard / bw

    def exposed(forward_per_layer: float) -> float:  # one forward over every layer
        return model.layers * max(0.0, gather - forward_per_layer) + gather

    trained = {p.model for p in work.passes if p.backward != FORWARD}
    forwards = sum(p.count for p in work.passes[1:] if p.backward == FORWARD and p.model.split(" ")[0] in trained)
    lt_dense, n_dense = dense or (lt, 0)
    hidden_behind = ((model.layers - n_dense) * max(0.0, gather - lt.total * lt.forward_fraction)
                     + n_dense * max(0.0, gather - lt_dense.total * lt_dense.forward_fraction))
    total = forwards * micro_batches * (hidden_behind + gather)
    if rollout is not None:
        prefill, step = rollout
        total += exposed(prefill / model.layers) + work.generated * exposed(step / model.layers)
    return total


def _busiest_stage_layers(model: ModelSpec, layout: Layout, split: tuple[int, int, int] | None) -> int:
    """Layers on the most-loaded pipeline stage (the first or a middle one; the last has as many or fewer)."""
    return max(layers_on_stage(model.layers, layout.pp, i, split) for i in {0, min(1, layout.pp - 1)})


def _stage_mixes(model: ModelSpec, layout: Layout, split: tuple[int, int, int] | None) -> list[tuple[int, int]]:
    """(expert layers, dense layers) of each pipeline stage of a MoE model with dense layers
    (`flops.dense_layers_per_stage`, at Megatron's offsets)."""
    dense = dense_layers_per_stage(model, layout.pp, layout.vp, split)
    return [(layers_on_stage(model.layers, layout.pp, s, split) - d, d) for s, d in enumerate(dense)]


def _busiest_stage_mix(model: ModelSpec, layout: Layout, split: tuple[int, int, int] | None) -> tuple[int, int]:
    """(expert layers, dense layers) of the stage with the most expert layers (fewest dense ones at a tie): the
    one holding the most expert parameters (`_expert_params`); otherwise `_busiest_stage_layers` (every layer
    alike). The stage with the most parameters in all is `_local_params`' (dense layers may outweigh)."""
    if not model.has_dense_layers:
        return _busiest_stage_layers(model, layout, split), 0
    return max(_stage_mixes(model, layout, split), key=lambda mix: (mix[0], mix[1]))


def _local_params(model: ModelSpec, layout: Layout, split: tuple[int, int, int] | None = None) -> float:
    """Parameters on one GPU of the most-loaded stage (after TP, EP x ETP sharding). With dense layers in a MoE
    model, the stage whose layers hold the most on one GPU (memory's `_local_stage` count): a dense layer's MLP,
    sharded by TP only, can outweigh an expert layer's EP x ETP share (DeepSeek-V3 at TP 1 / EP 64: 583M vs 409M
    per GPU), so the stage with the most expert layers is not always the busiest."""
    counts = param_counts(model)

    def on_gpu(n: int, d: int) -> float:  # n expert layers, d dense layers
        return (counts.layer_params(n, d) - n * counts.expert) / layout.tp + n * counts.expert / (layout.ep * layout.etp)
    mixes = _stage_mixes(model, layout, split) if model.has_dense_layers else [
        (_busiest_stage_layers(model, layout, split), 0)]
    embed = padded_vocab(model.vocab, layout.tp) * model.hidden / layout.tp
    return max(on_gpu(n, d) for n, d in mixes) + embed * (2 if layout.pp == 1 and not model.tie_embeddings else 1)


def _embedding_params(model: ModelSpec, layout: Layout) -> float:
    """The input embedding's parameters on one GPU of the first stage (vocabulary-parallel over TP)."""
    return padded_vocab(model.vocab, layout.tp) * model.hidden / layout.tp


def _expert_params(model: ModelSpec, layout: Layout, split: tuple[int, int, int] | None = None) -> float:
    """Routed-expert parameters on one GPU of the most-loaded stage (`_local_params`' expert part)."""
    if not model.is_moe:
        return 0.0
    n, _ = _busiest_stage_mix(model, layout, split)
    return n * param_counts(model).expert / (layout.ep * layout.etp)


def _trainable_params(model: ModelSpec, layout: Layout, split, peft: LoraSpec | None) -> float:
    """Parameters the optimizer updates on one GPU of the most-loaded stage (LoRA: the adapters)."""
    if peft is None:
        return _local_params(model, layout, split)
    if not model.has_dense_layers:
        return lora_params_of_layers(model, peft, _busiest_stage_layers(model, layout, split)) / layout.tp
    # the stage with the most adapters: a dense layer's MLP adapters wrap one MLP, an expert layer's every expert's
    return max(lora_params_of_layers(model, peft, n + d, d) for n, d in _stage_mixes(model, layout, split)) / layout.tp


def _trained_groups(work: StageWork, peft: LoraSpec | None) -> list[tuple[float, LoraSpec | None]]:
    """(updates per step, the LoRA spec or None) of the stage's trained models, those alike together: a pass
    with the FROZEN backward trains LoRA adapters (`peft`), a FULL one every weight. PPO with LoRA trains the
    actor's adapters and the whole critic (the nemoc runtime applies no adapters to the critic)."""
    groups: dict[bool, float] = {}
    for p in work.passes:
        if p.backward != FORWARD:
            lora = p.backward == FROZEN and peft is not None
            groups[lora] = groups.get(lora, 0.0) + p.count
    return [(n, peft if lora else None) for lora, n in groups.items()]


def _optimizer_time(layout: Layout, hw: HardwareSpec, trainable: float, updates: float, micro_batches: float,
                    kernels: str) -> float:
    """Adam over the sharded parameters (ADAM_BYTES) + the gradient-norm pass over the local ones,
    `updates` times; on the local spec (no gradient-accumulation fusion) a main_grad add per micro
    batch (`micro_batches` of them per step). Independent of the micro batch size and recompute."""
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    t = updates * (trainable / shard * ADAM_BYTES[kernels] + trainable * 4.0) / hw.hbm_bw
    if kernels == "local":
        t += micro_batches * trainable * LOCAL_GRAD_ACCUM_BYTES / hw.hbm_bw
    return t


def estimate(model: ModelSpec, layout: Layout, *, cluster: ClusterSpec | None = None,
             gpu: HardwareSpec | str | None = None, precision: str = "bf16", attention_backend: str = "flash",
             seq_length: int | None = None, steps: int = 1, stage_kind: str = "pretrain",
             peft: LoraSpec | None = None, params: EfficiencyParams = DEFAULT_PARAMS,
             causal_discount: bool = True, stage_params: object = None, grad_bytes: int = 4,
             split: tuple[int, int, int] | None = None, attention_span: float | None = None,
             overlap_p2p: bool = RUNTIME_OVERLAPS_P2P, p2p_scatter_gather: bool = False,
             overlap_tp: bool = RUNTIME_OVERLAPS_TP, kernels: str = "te",
             overlap_grad_reduce: bool = True, dropout: bool = False,
             overlap_param_gather: bool = RUNTIME_OVERLAPS_PARAM_GATHER, fp8_recipe: str | None = None,
             moe: MoeExecution | None = None, host: HostExecution | None = None,
             cross_entropy: str | None = None, bf16_layers: tuple[int, int] = (0, 0),
             memo: dict | None = None) -> Estimate:
    """Step time and derived figures of one stage (see module docstring). `split`: (first, middle,
    last) transformer layers per pipeline stage when uneven (`rules.PipelineSplit.stage_layers`).
    `overlap_tp`: Transformer Engine's userbuffer TP overlap (`tp_comm_overlap`, NeMo's recipes);
    `overlap_p2p`: the interleaved schedule overlaps its pipeline transfers (`overlap_p2p_comm`, NeMo's
    recipes and the nemoc runtime for every interleaved layout: RUNTIME_OVERLAPS_P2P). `p2p_scatter_gather`:
    Megatron-LM 2021-22 sent 1/tp of each pipeline tensor without SP (calibration rows of that era). `attention_span`: mean packed-sample length (see `layer_times`; the planner passes
    `search.Problem.attention_span`: an `sft` stage with `pack = true` and `sample_tokens`, which the
    runtime runs as variable-length attention). `causal_discount` selects
    the FLOPs formula behind `model_tflops_per_gpu` and `mfu` (True: Megatron-Core / Megatron-Bridge
    form; False: NeMo <= 25.07 `flops_formulas.py`); it does not change the step time. `grad_bytes`:
    the data-parallel gradient dtype (4: fp32, what the nemoc runtime reduces; 2: 16-bit). `kernels`:
    "te" (Transformer Engine's fused kernels and fused Adam, the default) or "local" (Megatron-Core's
    local spec on plain PyTorch: unfused norms, RoPE, SwiGLU, softmax, no gradient-accumulation
    fusion, torch's foreach Adam; see the traffic constants above). `overlap_grad_reduce`: the
    data-parallel reduction overlaps the last backward (Megatron-Core DDP, the nemoc runtime);
    False for Megatron-LM 2021, which reduced after the flush. `dropout`: hidden and attention dropout
    on (see `layer_times`; the planner passes `search.Problem.dropout`, the stage's `dropout` > 0). `fp8_recipe`: the stage's FP8 recipe
    (`tensorwise` adds the amax pass of current scaling, FP8_CURRENT_SCALING_BYTES). `host`: CUDA
    graphs (`cuda_graph_launch_saving`: the captured kernels' host launch gaps removed) and garbage
    collection (`gc_pause`: part `gc_pause`); None: no graphs, Python's automatic collector.
    `cross_entropy`: the loss of the trained model (te | native | none: CROSS_ENTROPY_BYTES_OF; None: the
    default of `kernels`, execution.AUTO_CROSS_ENTROPY). `bf16_layers`: the first / last layers kept in bf16
    under fp8 / mxfp8 / nvfp4 (`_bf16_layers`: part `bf16_layers`, their extra time on a mean stage; the
    stages holding them are slower, `pp_imbalance`).

    The stage's model passes come from `flops.stage_work`: the first (the model the optimizer
    updates) is costed term by term; the others (DPO reference, PPO critic, experience forwards)
    as whole pipelined passes in `other_passes`, the PPO rollout in `rollout`. Model FLOPs (for
    `mfu`) are `flops.stage_model_flops_per_step`: what the stage needs, without recompute."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
    hw = gpu if isinstance(gpu, HardwareSpec) else get_gpu(gpu or (cluster.gpu if cluster else "H100"))
    hw = _node_domain(hw, cluster.gpus_per_node if cluster is not None else None)
    seq = seq_length or model.seq_length
    world = layout.world_size
    work = stage_work(stage_kind, stage_params, peft)
    if not work.passes:  # export
        return Estimate(0.0, 0.0, 0.0, 0.0, steps, 0.0, 0.0, 0.0 if _price(cluster) else None)
    main = work.passes[0]
    train = main.backward != FORWARD
    mb = layout.micro_batch * work.rows  # preference pairs: chosen + rejected rows
    # `memo`: a dict the caller keeps for one problem (every argument fixed but `layout` and `split`; the plan
    # search keeps one per search), holding the layer times by the sizes `layer_times` reads of the layout (TP,
    # CP, EP, ETP, SP, the recompute level, its layers and modules, and PP and VP for block recompute; `moe`
    # follows EP) and the micro batch
    lt = _kept(memo, (layout.tp, layout.cp, layout.ep, layout.etp, layout.sequence_parallel, mb, layout.recompute,
                      layout.recompute_layers, layout.recompute_modules)
               + ((layout.pp, layout.vp) if layout.recompute_layers is not None else ()),
               lambda: layer_times(model, layout, hw, seq=seq, precision=precision, attention_backend=attention_backend,
                                   micro_batch=mb, backward=main.backward, params=params,
                                   attention_span=attention_span, overlap_tp=overlap_tp, kernels=kernels,
                                   dropout=dropout, fp8_recipe=fp8_recipe, moe=moe))
    if host is not None and host.cuda_graph_impl != "none" and train:  # as in step_time_lower_bound
        lt = graphed(lt, params, cuda_graph_share(host, model), 1.0 + main.backward)
    bf16 = _bf16_layers(model, layout, hw, lt, bf16_layers, split, precision, seq=seq,
                        attention_backend=attention_backend, micro_batch=mb, backward=main.backward, params=params,
                        attention_span=attention_span, overlap_tp=overlap_tp, kernels=kernels, dropout=dropout,
                        moe=moe, graph=(cuda_graph_share(host, model), 1.0 + main.backward)
                        if host is not None and host.cuda_graph_impl != "none" and train else None)
    mixed = _dense_layers(model, layout, hw, lt, split, precision, seq=seq, attention_backend=attention_backend,
                          micro_batch=mb, backward=main.backward, params=params, attention_span=attention_span,
                          overlap_tp=overlap_tp, kernels=kernels, dropout=dropout, fp8_recipe=fp8_recipe,
                          moe=moe, bf16_layers=bf16_layers,
                          graph=(cuda_graph_share(host, model), 1.0 + main.backward)
                          if host is not None and host.cuda_graph_impl != "none" and train else None)
    dense, lt_dense, bf16_dense = mixed if mixed is not None else (None, lt, 0.0)
    mtp_layer = None
    if model.mtp_num_layers and layout.recompute == "full" and layout.recompute_layers is not None:
        # block recompute skips the MTP depths (MultiTokenPredictionLayer._checkpointed_forward: "recompute_method
        # == 'block' is not supported for MTP yet"): their layer runs without a replay
        kind = model if model.mtp_layer_is_moe or not model.is_moe else model.dense_layer_model
        mtp_layer = layer_times(kind, replace(layout, recompute="none", recompute_layers=None), hw, seq=seq,
                                precision=precision, attention_backend=attention_backend, micro_batch=mb,
                                backward=main.backward, params=params, attention_span=attention_span,
                                overlap_tp=overlap_tp, kernels=kernels, dropout=dropout, fp8_recipe=fp8_recipe,
                                moe=moe if kind is model else None).total
    slow, mean, output = _stage_times(model, layout, hw, lt, seq=seq, micro_batch=mb, backward=main.backward,
                                      params=params, scalar_head=main.scalar_head, split=split, kernels=kernels,
                                      cross_entropy=cross_entropy, bf16=bf16, dense=dense, mtp_layer=mtp_layer)
    m = layout.num_microbatches
    vp = layout.vp or 1
    # layer passes per step on a mean stage: expert layers (every layer of a dense model) and dense layers
    n_dense = model.layers - model.moe_layer_count if mixed is not None else 0
    per_stage = main.count * m * (model.layers - n_dense) / layout.pp
    per_dense = main.count * m * n_dense / layout.pp

    def both(term) -> float:
        return per_stage * term(lt) + per_dense * term(lt_dense)
    parts: dict[str, float] = {
        "compute": both(lambda t: t.gemm + t.attention) + main.count * m * output / layout.pp,
        "elementwise": both(lambda t: t.elementwise),
        "tp_comm": both(lambda t: t.tp_comm),
        "cp_comm": both(lambda t: t.cp_comm),
        "ep_comm": both(lambda t: t.ep_comm),
    }
    if model.mtp_num_layers and not main.scalar_head:  # the MTP depths on the last stage, spread as `mean` spreads them
        parts["mtp"] = main.count * m * _mtp_time(model, layout, hw, lt, output, seq=seq, micro_batch=mb,
                                                  backward=main.backward, params=params, dense=dense,
                                                  mtp_layer=mtp_layer) / layout.pp
    if lt.host_wait > 0.0 or lt_dense.host_wait > 0.0:
        # the GPU waits for the host (eager kernels shorter than their issue time)
        parts["host_bound"] = both(lambda t: t.host_wait)
    if bf16 is not None:  # the bf16 layers' extra time, spread over the stages as `mean` spreads it
        # (the dense ones among them, a MoE model's, at a dense layer's extra: `_dense_layers`)
        parts["bf16_layers"] = main.count * m * (sum(bf16[0]) * bf16[1] + bf16_dense) / layout.pp
    parts["pp_imbalance"] = main.count * m * (slow - mean)
    saved, drained = _deferred_wgrad(model, layout, hw, lt, seq=seq, micro_batch=mb, backward=main.backward,
                                     params=params, slow=slow, mean=mean, scalar_head=main.scalar_head, split=split,
                                     kernels=kernels, cross_entropy=cross_entropy, bf16=bf16, dense=dense,
                                     mtp_layer=mtp_layer)
    if saved or drained:  # defer_embedding_wgrad_compute: the last stage's output wgrad GEMMs in the drain
        parts["pp_imbalance"] -= main.count * saved
        parts["embedding_wgrad_drain"] = main.count * drained
    parts["pp_bubble"] = main.count * (layout.pp - 1) / vp * mean if layout.pp > 1 else 0.0
    parts["pp_p2p"] = main.count * _pp_p2p(model, layout, hw, seq, mb, m, vp, params, overlap_p2p,
                                           p2p_scatter_gather)
    other = sum(p.count * _pass_time(model, layout, hw, p, seq=seq, precision=precision, backend=attention_backend,
                                     micro_batch=mb, params=params, split=split, overlap_tp=overlap_tp,
                                     kernels=kernels, moe=moe, cross_entropy=cross_entropy, bf16_layers=bf16_layers)
                for p in work.passes[1:])
    if other:
        parts["other_passes"] = other
    rollout = None
    if work.generated:
        rollout = _rollout_phases(model, layout, hw, seq=seq, precision=precision, backend=attention_backend,
                                  micro_batch=mb, new_tokens=work.generated, params=params, overlap_tp=overlap_tp,
                                  kernels=kernels, split=split, bf16_layers=bf16_layers)
        parts["rollout"] = rollout[0] + work.generated * rollout[1]
    if train:
        parts["dp_comm_exposed"] = parts["optimizer"] = 0.0
        for updates, adapters in _trained_groups(work, peft):  # PPO: actor and critic, ppo_epochs times each
            trainable = _trainable_params(model, layout, split, adapters)
            if layout.megatron_fsdp:
                # every trained model's updates (PPO: the critic's too) gather and reduce-scatter per layer
                dense_kind = (lt_dense, n_dense) if n_dense else None  # dense layers hide gathers behind their own time
                parts["dp_comm_exposed"] += updates * fsdp_exposed(model, layout, hw, lt, m, params, trainable,
                                                                   grad_bytes, dense=dense_kind)
                gathers = fsdp_forward_gathers(model, layout, hw, params, trainable, work, lt=lt, micro_batches=m,
                                               rollout=rollout, dense=dense_kind)
                if gathers:
                    parts["fsdp_gathers_outside_updates"] = gathers
            else:
                experts = _expert_params(model, layout, split) if adapters is None else 0.0
                embedding = _embedding_params(model, layout) if adapters is None else 0.0  # LoRA: frozen
                parts["dp_comm_exposed"] += updates * _dp_exposed(
                    model, layout, hw, slow, lt.forward_fraction, params, trainable, grad_bytes, overlap_grad_reduce,
                    overlap_param_gather, experts, embedding)
            parts["optimizer"] += _optimizer_time(layout, hw, trainable, updates, main.count * m, kernels)
    parts["step_overhead"] = params.step_overhead
    if train and hw.generation != "cpu":
        parts["gc_pause"] = gc_pause(host, world)
    step = sum(parts.values())
    tokens = layout.global_batch * seq * work.rows
    model_flops = stage_model_flops_per_step(model, seq, layout.global_batch, stage_kind=stage_kind, peft=peft,
                                             params=stage_params, causal_discount=causal_discount)
    tflops = model_flops / step / world / 1e12 if step else 0.0
    peak = hw.peak(precision if hw.supports(precision) else "bf16")
    wall = step * steps
    gpu_hours = wall * world / 3600.0
    price = _price(cluster)
    return Estimate(
        step_time_s=step, tokens_per_s_per_gpu=tokens / step / world if step else 0.0,
        model_tflops_per_gpu=tflops, mfu=tflops * 1e12 / peak, steps=steps, wall_time_s=wall,
        gpu_hours=gpu_hours, cost_usd=gpu_hours * price if price is not None else None,
        parts=MappingProxyType(parts),
    )


def step_time_lower_bound(model: ModelSpec, layout: Layout, *, micro_batches: tuple[int, int],
                          cluster: ClusterSpec | None = None, gpu: HardwareSpec | str | None = None,
                          precision: str = "bf16", attention_backend: str = "flash", seq_length: int | None = None,
                          stage_kind: str = "pretrain", peft: LoraSpec | None = None,
                          params: EfficiencyParams = DEFAULT_PARAMS, stage_params: object = None,
                          split: tuple[int, int, int] | None = None, overlap_p2p: bool = RUNTIME_OVERLAPS_P2P,
                          overlap_tp: bool = RUNTIME_OVERLAPS_TP, kernels: str = "te",
                          moe: MoeExecution | None = None, host: HostExecution | None = None,
                          attention_span: float | None = None, memo: dict | None = None,
                          cross_entropy: str | None = None, any_vp: bool = False) -> float:
    """A lower bound of `estimate(...).step_time_s` over every micro batch in the range
    `micro_batches` = (smallest, largest) and every recompute level, for the other sizes of `layout`
    (its micro batch and recompute are ignored; `layout.num_microbatches x layout.micro_batch` is the
    rows per data-parallel rank, the same for every micro batch E111 admits). The search uses it to
    skip a whole layout group whose bound is already slower than its top list (branch and bound).

    Why it bounds: every per-micro-batch term of `layer_times` and the output layer is a roofline
    max(a x mb, b x mb + c), a linear term, or a constant per micro batch, so its time per row never
    grows with the micro batch: m x t(mb) >= rows x t(largest) / largest; the steady state runs at
    the slowest stage (`estimate`'s per-layer and output terms are m x the mean stage, pp_imbalance
    adds m x (slowest - mean), so together m x t_slowest(mb); each stage's time per row never grows
    with the micro batch, so neither does their maximum); the bubble (pp - 1) / vp x t_mean(mb) is at least
    that of the smallest micro batch; the pipeline transfers at least the warm-up ones of the
    smallest; recompute only adds time term by term (so recompute = none bounds every level); the
    data-parallel exposure, other passes and rollout are >= 0; optimizer and step overhead do not
    depend on either. tests/compiler/test_search.py checks the bound against `estimate`.

    `memo`: a dict the caller keeps for one problem (every argument fixed but `layout` and
    `micro_batches`; the plan search keeps one per search): what depends on a few sizes only is kept
    in it by those sizes: the stage's passes (on none), the layer times (and a MoE model's dense layer's) by
    (tp, cp, ep, etp, sequence parallelism, largest micro batch) (at recompute = none `layer_times` reads no other size of the
    layout: pp and vp only for block recompute; `moe` follows ep), the stage times by those and (pp,
    split), the trainable parameters by (tp, pp, ep, etp, split). tests/compiler/test_search.py checks
    that every bound with the memo equals the bound without it.

    `any_vp`: a lower bound of the same for every virtual-pipeline size (and so every pipeline split) of
    `layout`'s other sizes: the steady state at the mean stage alone. The mean stage's time is the same
    float for every split (`_stage_times`: all layers, their extras summed over the stages, and the output
    layer, over pp), the slowest stage is never below it (max(..., mean)), and the terms left out (bubble,
    transfers, optimizer) are >= 0; rounding is monotone, so the float bound holds too."""
    hw = gpu if isinstance(gpu, HardwareSpec) else get_gpu(gpu or (cluster.gpu if cluster else "H100"))
    hw = _node_domain(hw, cluster.gpus_per_node if cluster is not None else None)
    seq = seq_length or model.seq_length
    work = _kept(memo, "work", lambda: stage_work(stage_kind, stage_params, peft))
    if not work.passes:
        return 0.0
    main = work.passes[0]
    smallest, largest = micro_batches
    rows = layout.num_microbatches * layout.micro_batch
    if layout.recompute != "none":
        layout = replace(layout, recompute="none")

    def layers() -> LayerTimes:
        lt = layer_times(model, layout, hw, seq=seq, precision=precision, attention_backend=attention_backend,
                         micro_batch=largest * work.rows, backward=main.backward, params=params,
                         overlap_tp=overlap_tp, kernels=kernels, moe=moe, attention_span=attention_span)
        if host is not None and host.cuda_graph_impl != "none" and main.backward != FORWARD:
            # a constant per micro batch, at most the layer's launch overhead, and the host issue time
            # scaled by the uncaptured share: the time per row still never grows with the micro batch
            lt = graphed(lt, params, cuda_graph_share(host, model), 1.0 + main.backward)
        return lt

    key = (layout.tp, layout.cp, layout.ep, layout.etp, layout.sequence_parallel, largest)
    lt = _kept(memo, key, layers)

    has_dense = _kept(memo, "has_dense", lambda: model.has_dense_layers)  # the property sums the layer pattern

    def dense() -> tuple[tuple[int, ...], float] | None:  # a MoE model's dense layers, on their stages
        if not has_dense:
            return None
        graph = ((cuda_graph_share(host, model), 1.0 + main.backward)
                 if host is not None and host.cuda_graph_impl != "none" and main.backward != FORWARD else None)
        layer_kw = dict(seq=seq, attention_backend=attention_backend, micro_batch=largest * work.rows,
                        backward=main.backward, params=params, overlap_tp=overlap_tp, kernels=kernels,
                        attention_span=attention_span)
        # the dense layer's times read the sizes of `key` but EP and ETP (recompute = none): a dense layer has
        # no experts (`layer_times` reads ep / etp only where `model.is_moe`: the expert GEMM shapes, local
        # experts, the busiest rank's load, the token dispatch, and `layer_activations`' expert tensors), so
        # one entry serves every expert layout
        dense_key = ("dense", layout.tp, layout.cp, layout.sequence_parallel, largest)
        mixed = _dense_layers(model, layout, hw, lt, split, precision, graph=graph, **layer_kw,
                              dense_times=lambda: _kept(memo, dense_key, lambda: layer_times(
                                  model.dense_layer_model, layout, hw, precision=precision, fp8_recipe=None,
                                  **layer_kw)))
        return mixed[0] if mixed is not None else None
    # with the output wgrad deferred the steady state can be the last stage without that GEMM (`_deferred_wgrad`)
    slow, mean, _ = _kept(memo, key + (layout.pp, layout.vp, split, layout.defer_embedding_wgrad_compute),
                          lambda: _stage_times(
        model, layout, hw, lt, seq=seq, micro_batch=largest * work.rows, backward=main.backward, params=params,
        scalar_head=main.scalar_head, split=split, kernels=kernels, cross_entropy=cross_entropy,
        deferred_wgrad=True, dense=dense()))
    if any_vp:
        return main.count * rows * mean / largest + params.step_overhead
    per_row = mean / largest  # a mean stage's time per row of a micro batch, at its lowest
    vp = layout.vp or 1
    t = main.count * rows * slow / largest + params.step_overhead  # the slowest stage's, at its lowest
    if layout.pp > 1:
        t += main.count * ((layout.pp - 1) / vp * smallest * per_row
                           + _pp_p2p(model, layout, hw, seq, smallest * work.rows, 1, vp, params, overlap_p2p))
    if main.backward != FORWARD:
        for updates, adapters in _trained_groups(work, peft):
            # vp: which layers a stage holds decides its dense layers (a MoE model's `_busiest_stage_mix`)
            trainable = _kept(memo, ("params", layout.tp, layout.pp, layout.vp if has_dense else None,
                                     layout.ep, layout.etp, split, adapters is None),
                              lambda: _trainable_params(model, layout, split, adapters))
            t += _optimizer_time(layout, hw, trainable, updates, main.count * rows / largest, kernels)
    return t


def _kept(memo: dict | None, key, compute):
    """`compute()`, kept in `memo` under `key` when the caller keeps one (`step_time_lower_bound`)."""
    if memo is None:
        return compute()
    value = memo.get(key)
    if value is None:
        value = memo[key] = compute()
    return value


def _price(cluster: ClusterSpec | None) -> float | None:
    return cluster.usd_per_gpu_hour if cluster is not None else None


def _pp_p2p(model, layout, hw, seq, mb, m, vp, params, overlap: bool = False, scatter_gather: bool = False) -> float:
    """Pipeline point-to-point: each micro batch sends its s x b x h activation forward and its
    gradient backward across each of the vp stage boundaries of this GPU (Narayanan et al. 2021
    Sec. 2.2.2). Stages usually sit on different nodes (rank order puts PP outermost), hence the
    network bandwidth. Megatron-Core overlaps the steady-state transfers with compute only in the
    interleaved schedule with `overlap_p2p_comm` (NeMo / Megatron-Bridge recipes; it excludes
    `batch_p2p_comm`; the nemoc runtime sets it for interleaved layouts): then only the warm-up /
    cool-down transfers are exposed. Otherwise (the 1F1B schedule, or interleaving without the
    overlap) every transfer is a blocking send/recv on the critical path (schedules.py send_forward_recv_backward), each paying its
    latency too. With sequence parallelism each TP rank sends its 1/tp slice; so did Megatron-LM's
    2021-22 scatter/gather optimisation without it (Narayanan et al. 2021 Sec. 4.1, `scatter_gather`)."""
    if layout.pp == 1:
        return 0.0
    sliced = layout.sequence_parallel or scatter_gather
    size = mb * seq / layout.cp * model.hidden * 2.0 / (layout.tp if sliced else 1)
    bw = _link_bw(hw, layout.pp, layout.tp * layout.cp * layout.dp, params)
    return p2p_transfers(layout.pp, vp, m, overlap) * (size / bw + params.ring_step_latency)


def p2p_transfers(pp: int, vp: int, m: int, overlap: bool = RUNTIME_OVERLAPS_P2P) -> float:
    """Pipeline transfers on the critical path of one step (see `_pp_p2p`): the warm-up / cool-down
    ones, 2 (pp - 1) vp, when the interleaved schedule overlaps the rest; every send and receive,
    2 m vp, otherwise."""
    warmup = 2.0 * (pp - 1) * vp
    return warmup if (overlap and vp > 1) else max(warmup, 2.0 * m * vp)


def _pass_time(model, layout, hw, p: ModelPass, *, seq, precision, backend, micro_batch, params,
               split=None, overlap_tp: bool = False, kernels: str = "te", moe: MoeExecution | None = None,
               cross_entropy: str | None = None, loss: bool = True, last_logits: bool = False,
               bf16_layers: tuple[int, int] = (0, 0)) -> float:
    """One pipelined pass of a secondary model over the step's micro batches (1F1B or forward-only
    schedule): m micro batches on the slowest stage plus the bubble, TP/CP/EP communication
    included. A secondary model shares the policy's layout (the nemoc runtime builds it so) and the
    experiment's loss (`cross_entropy`: the DPO reference and PPO's experience forwards call the model with
    `labels=`, so its cross entropy runs); `loss = False`: a pass that only takes the logits (the rollout's
    prefill: generation passes no labels); `last_logits`: only the last position's (`_head_tokens`);
    `bf16_layers`: the first / last layers kept in bf16 (`_bf16_layers`), as in the trained model's pass."""
    layer_kw = dict(seq=seq, attention_backend=backend, micro_batch=micro_batch, backward=p.backward, params=params,
                    overlap_tp=overlap_tp, kernels=kernels, moe=moe)
    lt = layer_times(model, layout, hw, precision=precision, **layer_kw)
    bf16 = _bf16_layers(model, layout, hw, lt, bf16_layers, split, precision, **layer_kw)
    mixed = _dense_layers(model, layout, hw, lt, split, precision, bf16_layers=bf16_layers, **layer_kw)
    slow, mean, _ = _stage_times(model, layout, hw, lt, seq=seq, micro_batch=micro_batch, backward=p.backward,
                                 params=params, scalar_head=p.scalar_head, split=split, kernels=kernels,
                                 cross_entropy=cross_entropy, loss=loss, last_logits=last_logits, bf16=bf16,
                                 dense=mixed[0] if mixed is not None else None)
    bubble = (layout.pp - 1) / (layout.vp or 1) * mean if layout.pp > 1 else 0.0
    return layout.num_microbatches * slow + bubble


def _rollout_time(model, layout, hw, *, seq, precision, backend, micro_batch, new_tokens, params,
                  overlap_tp: bool = False, kernels: str = "te", split=None,
                  bf16_layers: tuple[int, int] = (0, 0)) -> float:
    """The rollout's time: its prefill and `new_tokens` decode steps (`_rollout_phases`)."""
    prefill, step = _rollout_phases(model, layout, hw, seq=seq, precision=precision, backend=backend,
                                    micro_batch=micro_batch, new_tokens=new_tokens, params=params,
                                    overlap_tp=overlap_tp, kernels=kernels, split=split, bf16_layers=bf16_layers)
    return prefill + new_tokens * step


def _rollout_phases(model, layout, hw, *, seq, precision, backend, micro_batch, new_tokens, params,
                    overlap_tp: bool = False, kernels: str = "te", split=None,
                    bf16_layers: tuple[int, int] = (0, 0)) -> tuple[float, float]:
    """(prefill, one decode step) of the PPO rollout with a KV cache: a prefill of the prompts (a forward pass, compute bound) and
    `new_tokens` decode steps. A decode step generates one token for every sequence of the DP rank
    (m x micro batch of them) and is memory-bandwidth bound: each GPU reads its weights and the KV
    cache of its heads once (Pope et al. 2022, "Efficiently Scaling Transformer Inference", Sec. 2);
    the pipeline stages run one after the other for a single batch, so a step costs the whole
    model's reads / TP; plus the per-layer launch overhead of a forward. Decode kernels are tiny, so a
    step is often bound by the host's issue of its kernels instead (`host_issue_time`: one forward's
    kernels over every layer; each step synchronises on its sampled token, so the host cannot run ahead).
    Under pipeline parallelism the batch is decoded stage after stage as one batch (the nemoc
    runtime's generator: no micro-batches, so no stage overlaps another): the prefill costs the
    m micro batches' forward on every stage in turn, m x pp x the mean stage, not the pipelined
    m x slowest + bubble, and every forward (the prefill, each decode step) sends the batch's hidden
    states across the pp - 1 stage boundaries (`_rollout_p2p`). Context parallelism does not split the
    rollout (the nemoc runtime's generator runs the whole rows on every CP rank, which wait for none of
    each other): the prefill, the KV cache reads and the transfers are those of cp = 1. Nor does sequence
    parallelism (the generator switches it off: a decode step's one token per row cannot be split over the
    TP group), so the prefill's TP traffic is all-reduces and every rank computes its whole window. The
    prefill's output GEMM runs on the last position of each row only (`_head_tokens`: what the cached
    generator computes). The prefill runs the trained model's layers on their stages (`split`), the first /
    last `bf16_layers` at bf16's rate (`_bf16_layers`), as the training passes do."""
    batch = layout.num_microbatches * micro_batch
    whole = replace(layout, cp=1, sequence_parallel=False)  # every CP and TP rank decodes the whole rows
    if layout.pp == 1:
        prefill = _pass_time(model, whole, hw, ModelPass("prefill", 1.0, FORWARD), seq=seq, precision=precision,
                             backend=backend, micro_batch=micro_batch, params=params, overlap_tp=overlap_tp,
                             kernels=kernels, loss=False, last_logits=True, split=split, bf16_layers=bf16_layers)
    else:
        layer_kw = dict(seq=seq, attention_backend=backend, micro_batch=micro_batch, backward=FORWARD, params=params,
                        overlap_tp=overlap_tp, kernels=kernels)
        lt = layer_times(model, whole, hw, precision=precision, **layer_kw)
        bf16 = _bf16_layers(model, whole, hw, lt, bf16_layers, split, precision, **layer_kw)
        mixed = _dense_layers(model, whole, hw, lt, split, precision, bf16_layers=bf16_layers, **layer_kw)
        _, mean, _ = _stage_times(model, whole, hw, lt, seq=seq, micro_batch=micro_batch, backward=FORWARD,
                                  params=params, split=split, kernels=kernels, loss=False, last_logits=True,
                                  bf16=bf16, dense=mixed[0] if mixed is not None else None)
        prefill = layout.num_microbatches * layout.pp * mean + _rollout_p2p(model, layout, hw, batch * seq, params)
    counts = param_counts(model)
    gemm_params = counts.gemm_per_token + model.hidden * model.vocab
    experts = (model.layers - counts.dense_layers) * counts.expert  # the expert layers' routed experts
    weight_bytes = (counts.layer_params(model.layers - counts.dense_layers, counts.dense_layers) - experts
                    + model.hidden * model.vocab) / layout.tp * 2.0
    weight_bytes += experts / (layout.ep * layout.etp) * 2.0
    context = seq - new_tokens / 2.0  # mean context length while decoding (prompt fills the rest)
    kv_heads = max(1.0, model.kv_heads / layout.tp)
    kv_bytes = batch * context * model.layers * kv_heads * (model.qk_dim + model.v_dim) * 2.0  # whole rows at any cp
    rate = hw.peak("bf16" if hw.supports("bf16") else precision) * params.gemm_eff(hw.generation, "bf16")
    flops = 2.0 * batch * gemm_params / layout.tp
    # each decode step waits for its sampled token (the host checks every row for its end), so the host
    # cannot run ahead into the next step: a step takes the longer of the device's reads / FLOPs and the
    # host's issue of one forward's kernels over every layer (eager: the rollout captures no CUDA graphs)
    launches = model.layers * (TE_KERNELS_PER_LAYER + (_local_extra_kernels(model) if kernels == "local" else 0.0))
    device = max(flops / rate, (weight_bytes + kv_bytes) / hw.hbm_bw)
    step = max(device, host_issue_time(launches / 3.0, hw)) + model.layers * params.layer_overhead / 3.0
    step += _rollout_p2p(model, layout, hw, batch, params) + _rollout_ep(model, whole, hw, batch, params)
    return prefill, step


def _rollout_p2p(model, layout, hw, tokens: float, params) -> float:
    """One generation forward's pipeline transfers: `tokens` hidden states (16-bit; all of them at any cp and
    under sequence parallelism: every CP and TP rank sends the whole rows) sent across each
    stage boundary in turn, on the critical path (the stages wait for each other), each paying the link
    latency; 0 without a pipeline. With vp virtual stages per rank the hidden states go around the ring vp
    times (chunk 0 on stages 0..pp-1, then chunk 1, ..., as Megatron's interleaved schedule orders the
    chunks), crossing pp x vp - 1 boundaries, not pp - 1."""
    if layout.pp == 1:
        return 0.0
    size = tokens * model.hidden * 2.0
    bw = _link_bw(hw, layout.pp, layout.tp * layout.cp * layout.dp, params)
    return (layout.pp * (layout.vp or 1) - 1) * (size / bw + params.ring_step_latency)


def _rollout_ep(model, layout, hw, tokens: float, params) -> float:
    """One decode step's MoE token exchange under expert parallelism: every layer dispatches and combines
    the step's `tokens` (one per row) over the expert-parallel group (`_ep_comm`'s all-to-all volume,
    forward only), each of the two latency-bound (a few rows of hidden states: the small-message latency `ring_step_latency`
    dominates); 0 for a dense model or ep = 1."""
    if not model.is_moe or layout.ep == 1:
        return 0.0
    per_layer = _ep_comm(model, layout, hw, tokens, 1.5, params) + 2.0 * params.ring_step_latency
    return model.moe_layer_count * per_layer  # every expert layer of every stage, one after another


# ------------------------------------------------------------------ host: CUDA graphs, garbage collection
# CUDA graphs (Megatron-Core `cuda_graph_impl`): a replayed graph launches its kernels back to back
# from the device, without the host's per-kernel launch path (PyTorch dispatch, Transformer Engine's
# Python, cudaLaunchKernel). `layer_overhead` is that per-layer gap over TE_KERNELS_PER_LAYER kernels
# in eager mode; inside a graph each kernel node still costs GRAPHED_KERNEL_GAP on the device (kernel
# nodes of an instantiated graph start ~1 us apart: NVIDIA, "Getting Started with CUDA Graphs", 2019,
# and the CUDA programming guide's graph launch notes), plus one graph launch per captured region and
# pass (GRAPH_LAUNCH). The captured share of a layer's kernels by scope: attention and MLP are about
# half each (norm, QKV, RoPE, core attention, projection vs norm, fc1, activation, fc2), the MoE router
# and its preprocessing a few kernels; [] (the whole layer) and full_iteration all of them.
GRAPHED_KERNEL_GAP = 1.0e-6
GRAPH_LAUNCH = 2.5e-6
# The host's time to issue one eager kernel: Python and the pybind11 entry, autograd recording, the ATen
# dispatcher, Transformer Engine's Python around its kernels, and cudaLaunchKernel itself (~2-4 us of it):
# ~5-25 us per operator (the PyTorch team, "Accelerating PyTorch with CUDA Graphs", 2021: the launch
# overhead graphs remove; NVIDIA, "Getting Started with CUDA Graphs", 2019). Taken at 10 us, inside
# of that range, not fitted: no calibration row is host bound (a layer's issue, ~30 kernels x 10 us =
# 0.3 ms per micro batch, is 10-210x below its device time on every row: docs/calibration.md), so no row
# could fix it. The host issues asynchronously and runs ahead of the GPU, so it bounds a layer only where
# the layer's kernels run shorter than their issue (`LayerTimes.host_wait`): small models and micro
# batches, and the rollout's decode steps, which synchronise every step.
HOST_ISSUE_PER_KERNEL = 10e-6
CUDA_GRAPH_SCOPE_SHARE = MappingProxyType({"attn": 0.5, "mlp": 0.5, "moe_router": 0.1, "moe_preprocess": 0.05,
                                           "moe": 0.5, "full_iteration": 1.0})


def cuda_graph_share(host: HostExecution | None, model: ModelSpec) -> float:
    """The share of a layer's kernels that CUDA graphs capture (0 without graphs)."""
    if host is None or host.cuda_graph_impl == "none":
        return 0.0
    if not host.cuda_graph_scope:
        return 1.0
    return min(1.0, sum(CUDA_GRAPH_SCOPE_SHARE[s] for s in host.cuda_graph_scope))


def host_issue_time(launches: float, hw: HardwareSpec) -> float:
    """Host seconds to issue `launches` eager kernels (HOST_ISSUE_PER_KERNEL each); 0 on a CPU, where the
    host runs the operations themselves (their time is the device time)."""
    return 0.0 if hw.generation == "cpu" else launches * HOST_ISSUE_PER_KERNEL


def graphed(lt: LayerTimes, params: EfficiencyParams, share: float, passes: float) -> LayerTimes:
    """`lt` with the captured `share` of the layer under CUDA graphs: the launch gaps removed
    (`cuda_graph_launch_saving`) and the host no longer issuing the captured kernels one by one (a
    replay is one launch per graph: the host issue of the uncaptured share remains)."""
    return replace(lt, gemm=lt.gemm - cuda_graph_launch_saving(params, share, passes),
                   host_issue=lt.host_issue * (1.0 - share))


def cuda_graph_launch_saving(params: EfficiencyParams, share: float, passes: float) -> float:
    """Seconds per layer and micro batch that CUDA graphs remove: the captured kernels' eager launch
    gaps (`layer_overhead` per TE_KERNELS_PER_LAYER kernels) replaced by the graph's device-side
    gaps, less one graph launch per pass (forward, backward). Never negative."""
    if share <= 0.0:
        return 0.0
    eager_gap = params.layer_overhead / TE_KERNELS_PER_LAYER
    kernels = share * TE_KERNELS_PER_LAYER * passes / 3.0
    saved = kernels * max(eager_gap - GRAPHED_KERNEL_GAP, 0.0) - passes * GRAPH_LAUNCH * (1.0 if share else 0.0)
    return max(saved, 0.0)


# Garbage collection. Python's automatic collector runs young (generation 0 / 1) collections every few
# hundred allocations and a full (generation-2) one only when the long-lived objects grew by a quarter;
# each rank collects at its own time, and the step's collectives wait for the rank that paused: with N
# ranks each starting a full collection in a given step with probability f, some rank pauses in
# 1 - (1 - f)^N of the steps. Manual GC (Megatron `manual_gc`) disables the collector and runs one full
# collection on all ranks together every `manual_gc_interval` steps. Measured with nemoc's runtime on
# CPU (the quickstart, 2 ranks, 120 steps; metrics `gc_collections`, `gc_full_collections`,
# `gc_pause_s`; docs/cost-model.md): a full collection of a training rank (~4.7e5 objects: torch,
# Megatron-Core, transformers and the model) took 0.30-1.18 s wall on the shared, loaded host, and
# 0.22-0.25 s of the process's own CPU time (median 0.23 s of 7, `time.process_time`: what one
# uncontended core spends; GC_FULL_PAUSE); automatic collection ran 0.22 young collections per step, 33 us per step
# (GC_YOUNG_PER_STEP), and no full collection in 120 steps (GC_FULL_PER_STEP = 0: the unsynchronised full
# collection manual GC guards against at scale is not observed, so the plan claims no gain for it).
GC_FULL_PAUSE = 0.23
GC_YOUNG_PER_STEP = 33e-6
GC_FULL_PER_STEP = 0.0


def gc_pause(host: HostExecution | None, world: int) -> float:
    """Expected seconds per step that garbage-collection pauses add to the step (see above)."""
    if host is not None and host.manual_gc:
        return GC_FULL_PAUSE / host.manual_gc_interval if host.manual_gc_interval else 0.0
    return GC_YOUNG_PER_STEP + GC_FULL_PAUSE * (1.0 - (1.0 - GC_FULL_PER_STEP) ** max(world, 1))
