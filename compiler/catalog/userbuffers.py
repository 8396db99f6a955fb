"""Transformer Engine userbuffer configurations for `tp_comm_overlap`: reference data and the choice per stage.

Input:  the stage's GPU generation, precision recipe, hidden size, tensor-parallel size, and the buffer's
        shape facts (sequence length, micro batch, context parallelism).
Output: `userbuffers_of(...)` -> `plan.Userbuffers`: what the runtime hands to TE `initialize_ub`
        (transformer_engine/pytorch/module/base.py) before it builds the model.
Invariants: pure data. The per-GEMM settings are Megatron-Bridge's tuned presets
        (src/megatron/bridge/training/comm_overlap.py, the `userbuffers_{bf16,fp8}_{h100,b200}_h*_tp*_*`
        `TransformerLayerTPOverlapCfg`s; read at commit 067f987d, 2026-08-22), which its performance recipes
        pass as `CommOverlapConfig(tp_comm_overlap_cfg=...)` for the model they were tuned on (e.g. the H100
        Llama 3 70B recipe, recipes/llama/h100/llama3.py). A preset applies where the GPU generation (h100
        presets on Hopper, b200 presets on Blackwell), the precision class (fp8 / bf16), the hidden size and the
        tensor-parallel size all match; every other stage gets TE's own default for each GEMM (`ub_cfgs = {}`),
        which is what Bridge's recipes without a preset (Llama 3 8B, GB200) run. The LoRA presets are left
        out: their wgrad entries are absent and the rest of the runtime does not set the matching flags.
"""

from __future__ import annotations

from nemoc.compiler.plan import UbGemm, Userbuffers

# The GEMMs of one transformer layer in the order Bridge's TransformerLayerTPOverlapCfg lists them.
_GEMMS = ("qkv_dgrad", "qkv_wgrad", "fc1_dgrad", "fc1_wgrad", "qkv_fprop", "proj_dgrad", "fc1_fprop",
          "fc2_dgrad", "proj_fprop", "fc2_fprop")


def _bulk(num_sm: int) -> dict:  # Bridge BulkOverlapCfg(num_sm, cga_size=2, set_sm_margin=False)
    return dict(method="bulk", num_sm=num_sm, cga_size=2, set_sm_margin=False)


def _pipe(num_sm: int, fp8_buf: bool = False) -> dict:  # PipelineOverlapCfg(num_sm, cga_size=2, num_splits=4, margin)
    return dict(method="pipeline", num_sm=num_sm, cga_size=2, set_sm_margin=True, num_splits=4, fp8_buf=fp8_buf)


_RING = dict(method="ring_exchange", num_sm=1, cga_size=1, set_sm_margin=False)  # RingExchangeOverlapCfg()
_RING_MARGIN = dict(_RING, set_sm_margin=True)  # RingExchangeOverlapCfg(num_sm=1, set_sm_margin=True)


def _layer(qkv_dgrad: int, qkv_wgrad: int, fc1_dgrad: int, fc1_wgrad: int, proj_fprop: dict, fc2_fprop: dict):
    """A TransformerLayerTPOverlapCfg: four bulk overlaps (SM counts), the all-gather GEMMs and their dgrad
    as ring exchanges (every preset), the two reduce-scatter GEMMs as given."""
    rows = (_bulk(qkv_dgrad), _bulk(qkv_wgrad), _bulk(fc1_dgrad), _bulk(fc1_wgrad), _RING, _RING, _RING, _RING,
            proj_fprop, fc2_fprop)
    return tuple(UbGemm(name=name, **row) for name, row in zip(_GEMMS, rows))


# (generation, quantization, hidden, tp) -> (Bridge's preset name, per-GEMM configs)
PRESETS: dict[tuple[str, str, int, int], tuple[str, tuple[UbGemm, ...]]] = {
    # Llama 3 70B
    ("hopper", "none", 8192, 4): ("userbuffers_bf16_h100_h8192_tp4_mbs1_seqlen8192",
                                  _layer(4, 24, 2, 4, _pipe(24), _pipe(16))),
    ("hopper", "fp8", 8192, 4): ("userbuffers_fp8_h100_h8192_tp4_mbs1_seqlen8192",
                                 _layer(4, 24, 2, 4, _RING_MARGIN, _RING_MARGIN)),
    ("blackwell", "none", 8192, 2): ("userbuffers_bf16_b200_h8192_tp2_mbs1_seqlen8192",
                                     _layer(16, 24, 2, 4, _pipe(32), _pipe(16))),
    ("blackwell", "fp8", 8192, 2): ("userbuffers_fp8_b200_h8192_tp2_mbs1_seqlen8192",
                                    _layer(4, 24, 2, 4, _RING_MARGIN, _RING_MARGIN)),
    # Llama 3.1 405B
    ("hopper", "none", 16384, 8): ("userbuffers_bf16_h100_h16384_tp8_cp2_mbs1_seqlen8192",
                                   _layer(2, 24, 2, 2, _pipe(24), _pipe(8))),
    ("hopper", "fp8", 16384, 8): ("userbuffers_fp8_h100_h16384_tp8_cp2_mbs1_seqlen8192",
                                  _layer(2, 24, 2, 2, _RING_MARGIN, _RING_MARGIN)),
    ("blackwell", "none", 16384, 4): ("userbuffers_bf16_b200_h16384_tp4_cp2_mbs1_seqlen8192",
                                      _layer(8, 24, 2, 2, _pipe(32), _pipe(8))),
    ("blackwell", "fp8", 16384, 4): ("userbuffers_fp8_b200_h16384_tp4_cp2_mbs1_seqlen8192",
                                     _layer(8, 32, 2, 8, _RING_MARGIN, _RING_MARGIN)),
    # GPT-3 20B
    ("hopper", "none", 6144, 2): ("userbuffers_bf16_h100_h6144_tp2_mbs2_seqlen2048",
                                  _layer(8, 16, 4, 16, _pipe(16), _pipe(24))),
    ("hopper", "fp8", 6144, 2): ("userbuffers_fp8_h100_h6144_tp2_mbs2_seqlen2048",
                                 _layer(8, 16, 4, 16, _pipe(16, fp8_buf=True), _pipe(24, fp8_buf=True))),
    # GPT-3 175B
    ("hopper", "none", 12288, 4): ("userbuffers_bf16_h100_h12288_tp4_mbs1_seqlen2048",
                                   _layer(4, 4, 2, 4, _pipe(24), _RING_MARGIN)),
    ("hopper", "fp8", 12288, 4): ("userbuffers_fp8_h100_h12288_tp4_mbs1_seqlen2048",
                                  _layer(4, 4, 2, 4, _RING_MARGIN, _RING_MARGIN)),
    ("blackwell", "none", 12288, 4): ("userbuffers_bf16_b200_h12288_tp4_mbs1_seqlen2048",
                                      _layer(4, 16, 2, 8, _RING_MARGIN, _RING_MARGIN)),
    ("blackwell", "fp8", 12288, 4): ("userbuffers_fp8_b200_h12288_tp4_mbs1_seqlen2048",
                                     _layer(4, 16, 2, 8, _RING_MARGIN, _RING_MARGIN)),
    # Nemotron-4 15B and 340B
    ("blackwell", "none", 6144, 2): ("userbuffers_bf16_b200_h6144_tp2_mbs1_seqlen4096",
                                     _layer(8, 32, 2, 8, _RING_MARGIN, _RING_MARGIN)),
    ("blackwell", "none", 18432, 8): ("userbuffers_bf16_b200_h18432_tp8_mbs1_seqlen4096",
                                      _layer(8, 32, 2, 8, _RING_MARGIN, _pipe(24))),
    ("blackwell", "fp8", 18432, 8): ("userbuffers_fp8_b200_h18432_tp8_mbs1_seqlen4096",
                                     _layer(8, 32, 2, 8, _RING_MARGIN, _RING_MARGIN)),
}

TE_DEFAULT = "te_default"
# Megatron-Bridge CommOverlapConfig.tp_comm_bootstrap_backend's default (Megatron-Core's too)
BOOTSTRAP_BACKEND = "nccl"
# The precision recipes that run their GEMMs in FP8 (Megatron-LM `args.fp8` set): TE's FP8 buffers
_FP8_PRECISIONS = ("fp8", "mxfp8")


def userbuffers_of(*, generation: str | None, precision: str, params_dtype: str, hidden: int, tp: int, cp: int,
                   seq_length: int, micro_batch: int) -> Userbuffers:
    """The userbuffers of a stage with `tp_comm_overlap`: TE's buffer holds one layer input with the sequence
    and batch dimensions merged, split over context parallelism ((seq x micro batch) / cp rows of `hidden`:
    Megatron-LM `_initialize_tp_communicators`), of the stage's activation dtype, FP8 where the recipe is.
    `micro_batch`: the sequences one micro batch puts through the layers (x 2 for preference pairs)."""
    quantization = "fp8" if precision in _FP8_PRECISIONS else "none"
    preset, gemms = PRESETS.get((generation or "", quantization, hidden, tp), (TE_DEFAULT, ()))
    dgrad = [g for g in gemms if g.name in ("qkv_dgrad", "fc1_dgrad")]
    wgrad = [g for g in gemms if g.name in ("qkv_wgrad", "fc1_wgrad")]
    return Userbuffers(
        shape=(seq_length * micro_batch // cp, hidden), tp=tp, dtype=params_dtype, quantization=quantization,
        bootstrap_backend=BOOTSTRAP_BACKEND, preset=preset, gemms=gemms,
        bulk_wgrad=not gemms or any(g.method == "bulk" for g in wgrad),
        bulk_dgrad=not gemms or any(g.method == "bulk" for g in dgrad),
        overlap_rs_dgrad=any(g.method != "bulk" for g in dgrad),
    )


# TE initialize_ub creates one communicator per GEMM of a layer (module/base.py `methods`): the ten above
# plus proj_wgrad / fc2_wgrad ("external", overlapped by their dgrad's ring exchange); eight all-gather,
# four reduce-scatter (`layers_all_gather_overlap`, `layers_reduce_scatter_overlap`).
_AG_BUFFERS, _RS_BUFFERS = 8, 4
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def userbuffer_bytes(*, rows: float, hidden: int, tp: int, dtype: str = "bf16", fp8: bool = False,
                     ring_reduce_scatter: int = 0) -> float:
    """Bytes TE registers for the userbuffers on each GPU (outside PyTorch's caching allocator): every
    communicator holds one buffer of the whole (rows x hidden) shape (common/comm_gemm_overlap/
    comm_gemm_overlap.cpp `CommOverlapBase::initialize`), a ring-exchange reduce-scatter 2 tp - 1 chunks of
    rows / tp (`CommOverlapP2PBase::initialize`); the all-gather buffers hold FP8 (1 byte) in an FP8 run."""
    elem = _DTYPE_BYTES.get(dtype, 2)
    one = rows * hidden
    ag = _AG_BUFFERS * one * (1 if fp8 else elem)
    rs = (_RS_BUFFERS - ring_reduce_scatter) * one * elem + ring_reduce_scatter * one * elem * (2 * tp - 1) / tp
    return ag + rs


def buffer_bytes(ub: Userbuffers) -> float:
    """`userbuffer_bytes` of a stage's planned userbuffers (its preset's ring-exchange reduce-scatters)."""
    ring = sum(1 for g in ub.gemms if g.name in ("proj_fprop", "fc2_fprop") and g.method == "ring_exchange")
    return userbuffer_bytes(rows=ub.shape[0], hidden=ub.shape[1], tp=ub.tp, dtype=ub.dtype,
                            fp8=ub.quantization == "fp8", ring_reduce_scatter=ring)
