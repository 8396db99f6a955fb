"""Precision and kernel rules: FP8 / MXFP8 hardware and Transformer Engine needs, TE on the CPU,
attention cores per precision and head dimension, FP8 GEMM dimensions, fp16 loss scaling.
"""

from __future__ import annotations

from nemoc.dsl.diagnostics import Severity
from nemoc.compiler.rules.base import Env, Sizes, TRAINING_KINDS, Violation, _P
from nemoc.compiler.rules.moe import expert_tp_options


def _local_why(env: Env) -> str | None:
    """Why a training stage runs without Transformer Engine (None when it runs with it)."""
    if env.stage_kernels != "local" or env.stage_kind not in TRAINING_KINDS:
        return None
    if env.model.local_layer_only:
        return "nemoc builds Gemma 3's layer on Megatron-Core's local spec"
    if env.kernels == "local":
        return "kernels = local (no Transformer Engine)"
    return f"{env.target.caps(env.stage_kind).runs}, with Megatron-Core's local spec"


def rule_fp8_needs_te(env: Env, s: Sizes) -> Violation | None:
    """fp8 / mxfp8 / nvfp4 GEMMs are Transformer Engine's (TransformerConfig.fp8 needs TE's layers); with the
    local spec the runtime's Megatron adapter refuses the plan.
    A GPU that cannot run the precision at all is E121's."""
    local = _local_why(env)
    p = env.precision
    if p not in ("fp8", "mxfp8", "nvfp4") or not local or env.gpu_arch == "cpu" or (
            env.gpu_precisions is not None and p not in env.gpu_precisions):
        return None
    return Violation(
        "E127", f"precision = {p} needs Transformer Engine",
        f"precision({p}) but {local}",
        "use precision = bf16" + (", or kernels = te where Transformer Engine is installed"
                                  if env.kernels == "local" else ""),
        anchors=("kernels", "precision") if env.kernels == "local" else ("precision",),
        source="megatron/core/transformer/transformer_config.py (fp8 needs Transformer Engine's layers)",
    )


def rule_cross_entropy_needs_te(env: Env, s: Sizes) -> Violation | None:
    """`cross_entropy_fusion = te` runs Transformer Engine's fused vocab-parallel cross entropy
    (Megatron-Core language_module.py `compute_language_model_loss`: "Trying to use a TE block when it's
    not present." where TE does not import); a stage on the local spec has no TE."""
    local = _local_why(env)
    if env.cross_entropy_fusion != "te" or not local:
        return None
    return Violation(
        "E183", "`cross_entropy_fusion = te` needs Transformer Engine",
        f"cross_entropy_fusion(te) but {local}",
        "use cross_entropy_fusion = native (Megatron-Core's own fused loss) or none, or leave it auto"
        + (", or kernels = te where Transformer Engine is installed" if env.kernels == "local" else ""),
        anchors=("cross_entropy_fusion", "kernels"),
        source="megatron/core/models/common/language_module/language_module.py compute_language_model_loss "
               "(cross_entropy_fusion_impl == 'te' without te_parallel_cross_entropy raises)",
    )


def warn_native_cross_entropy_dtype(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core's native fused cross entropy casts the logits' gradient to bf16 whatever their dtype
    (fusions/fused_cross_entropy.py `calculate_gradients`: `grad_input.to(torch.bfloat16)`); autograd casts
    it back, so an fp32 / fp16 run trains with bf16-rounded logit gradients (measured on CPU, fp32, vocab
    1000: 1.9e-3 max gradient difference from the unfused loss, 4e-6 in bf16)."""
    if env.cross_entropy_fusion != "native" or env.precision not in ("fp32", "fp16"):
        return None
    return Violation(
        "W112", f"`cross_entropy_fusion = native` rounds the logits' gradient to bf16 (precision = {env.precision})",
        f"cross_entropy_fusion(native) with precision({env.precision})",
        "use cross_entropy_fusion = none (or auto) to keep the gradient in the run's precision",
        anchors=("cross_entropy_fusion", "precision"), severity=Severity.WARNING,
        source="megatron/core/fusions/fused_cross_entropy.py calculate_gradients (grad_input.to(torch.bfloat16))",
    )


def rule_gemma_layer_te(env: Env, s: Sizes) -> Violation | None:
    """Gemma 3's (1 + w) RMSNorm, sandwich norms, embedding scale and second RoPE base are nemoc's own modules on
    Megatron-Core's local layer spec: Transformer Engine's GPT layer spec has no post-block
    norm and one rotary embedding, so `kernels = te` cannot build the model (`auto` picks local)."""
    if not env.model.local_layer_only or env.stage_kernels != "te" or env.hf_conversion:
        return None
    return Violation(
        "E179", "this model's layer is built on Megatron-Core's local spec only, not Transformer Engine's",
        "kernels(te) but the model has Gemma 3's zero-centred norms, sandwich norms, embedding scale or local RoPE "
        "base (the nemoc runtime's own modules)",
        "remove `kernels = te` (auto picks local for this model)",
        anchors=("kernels",),
        source="megatron/core/models/gpt/gpt_layer_specs.py get_gpt_layer_with_transformer_engine_spec "
               "(TransformerLayerSubmodules: no post-block norm); megatron/core/transformer/torch_norm.py "
               "(WrappedTorchNorm: no zero-centred gamma)",
    )


def rule_gemma_layer_parts(env: Env, s: Sizes) -> Violation | None:
    """The nemoc runtime builds Gemma 3's layer as one combination: zero-centred RMSNorms everywhere and, with
    post_block_norms, zero-centred post-block norms too. A layernorm, or post-block norms beside plain RMSNorms,
    is a layer it has no module for (the runtime would stop at build time)."""
    m = env.model
    if m.norm_zero_centered and m.norm != "rmsnorm":
        why, anchors = f"norm_zero_centered(true) with norm({m.norm})", ("model.norm_zero_centered", "model.norm")
    elif m.post_block_norms and not m.norm_zero_centered:
        why, anchors = "post_block_norms(true) with norm_zero_centered(false)", ("model.post_block_norms",)
    else:
        return None
    return Violation(
        "E180", "nemoc builds the (1 + w) and post-block norms of Gemma 3's layer only as zero-centred RMSNorms", why,
        "use norm = rmsnorm with norm_zero_centered = true (Gemma 3), or drop post_block_norms",
        anchors=anchors + ("model",),
        source="megatron/core/transformer/torch_norm.py WrappedTorchNorm (no zero-centred gamma); "
               "megatron/core/transformer/transformer_layer.py TransformerLayerSubmodules (no post-block norm)",
    )


FP8_RECIPES = {"fp8": ("delayed", "tensorwise", "blockwise"), "mxfp8": ("mxfp8",)}


def rule_fp8_recipe(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core `TransformerConfig.fp8_recipe` applies only with fp8 on (fp8_utils.py
    `get_fp8_recipe`); the mxfp8 recipe is the MXFP8 precision's (32-element blocks, Blackwell),
    the others scale E4M3/E5M2 tensors of precision = fp8."""
    if env.fp8_recipe is None or env.fp8_recipe in FP8_RECIPES.get(env.precision, ()):
        return None
    fits = [p for p, recipes in FP8_RECIPES.items() if env.fp8_recipe in recipes]
    return Violation(
        "E164", f"fp8_recipe = {env.fp8_recipe} needs precision = {fits[0]}",
        f"fp8_recipe({env.fp8_recipe}) with precision({env.precision}); {fits[0]} takes "
        f"{' | '.join(FP8_RECIPES[fits[0]])}",
        f"set precision = {fits[0]}, or remove fp8_recipe",
        anchors=("fp8_recipe", "precision"),
        source="megatron/core/fp8_utils.py get_fp8_recipe; transformer_config.py fp8_recipe",
    )


def rule_fp8_param_gather(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core TransformerConfig: "fp8_param must be used together with fp8 mode"."""
    if not s.fp8_param_gather or env.precision in ("fp8", "mxfp8"):
        return None
    return Violation(
        "E165", "fp8_param_gather needs an fp8 precision",
        f"fp8_param_gather = true with precision({env.precision})",
        "set precision = fp8 (or mxfp8), or fp8_param_gather = false",
        anchors=(_P + "fp8_param_gather", "precision"),
        source="megatron/core/transformer/transformer_config.py __post_init__ (fp8_param must be used together "
               "with fp8 mode)",
    )


def rule_te_needs_gpu(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine is CUDA-only; on the CPU (gloo) the runtime builds the local spec."""
    if env.gpu_arch != "cpu" or env.kernels != "te":
        return None
    return Violation(
        "E128", "Transformer Engine kernels need a GPU",
        f"kernels = te but cluster.gpu = {env.cluster.gpu}",
        "set kernels = local (or auto)",
        anchors=("kernels", "cluster.gpu", "cluster"),
        source="transformer_engine (CUDA only): the gloo/CPU runtime has no Transformer Engine",
    )


_PRECISION_NEEDS = {"fp8": "Hopper or newer", "mxfp8": "Blackwell", "nvfp4": "Blackwell (B200, B300, GB200, GB300)"}


def rule_precision_hardware(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine: fp8 GEMMs need Hopper (sm_90) or newer; MXFP8 block scaling needs
    Blackwell (sm_100); the catalog lists the precisions each GPU runs (`HardwareSpec.supports`)."""
    p = env.precision
    if env.gpu_precisions is None or p in env.gpu_precisions:
        return None
    need = _PRECISION_NEEDS.get(p, "a GPU that supports it")
    return Violation(
        "E121", f"precision = {p} is not supported on {env.cluster.gpu}",
        f"{p} needs {need}; {env.cluster.gpu} ({env.gpu_arch}) supports {', '.join(env.gpu_precisions)}",
        "use precision = bf16" + (", or a Hopper/Blackwell GPU" if p == "fp8" else ", or a Blackwell GPU"),
        anchors=("precision", "cluster.gpu", "cluster"),
        source="transformer_engine/pytorch/fp8.py check_fp8_support (sm >= 8.9) / check_mxfp8_support / "
               "check_nvfp4_support (sm >= 10.0)",
    )


def uses_te(env: Env) -> bool:
    """The stage runs Transformer Engine's layers (its attention included): kernels te on a GPU."""
    return env.stage_kernels == "te" and env.gpu_arch != "cpu"


_FLASH_CLASS = ("auto", "flash", "fused")  # TE's flash-attn / cuDNN fused attention (auto: TE picks)


def rule_fp32_attention(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine dot_product_attention/utils.py get_attention_backend: a qkv dtype other than
    bf16 / fp16 disables both flash and fused attention; `flash` / `fused` then leave no backend
    (DotProductAttention.forward raises "No dot product attention backend is available"); `auto`
    falls back to TE's unfused core, which the plan then prices (W111), but which has no context
    parallelism: an error only with cp > 1."""
    if env.precision != "fp32" or not uses_te(env) or env.attention_backend not in _FLASH_CLASS:
        return None
    cp = s.cp if s.cp is not None else 1
    if env.attention_backend == "auto" and cp <= 1:
        return None
    auto = env.attention_backend == "auto"
    eq = (f"precision(fp32) with attention_backend({env.attention_backend}) and kernels te: TE's flash and "
          "cuDNN fused attention take bf16 / fp16 only")
    if cp > 1:
        eq += f"; cp({cp}) > 1 rules out TE's unfused core too"
    if auto:  # cp > 1 here: TE's unfused fallback would run fp32 with cp = 1 (priced so, W111)
        hint = "set context = 1 (TE then runs its unfused core in fp32), or precision = bf16"
    else:
        hint = "set precision = bf16" + ("" if cp > 1 else ", or attention_backend = unfused")
    return Violation(
        "E135", "Transformer Engine has no fp32 flash or fused attention",
        eq, hint,
        anchors=("attention_backend", "precision", _P + "context") if not auto
        else ("precision", _P + "context", "attention_backend"),
        source="transformer_engine/pytorch/attention/dot_product_attention/utils.py get_attention_backend "
               "(qkv_dtype not in [bf16, fp16])",
    )


def rule_attention_head_dim(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine get_attention_backend: flash-attn needs head_dim <= 256 and head_dim % 8 == 0;
    cuDNN fused attention needs head_dim % 8 == 0 too. Explicit `flash` / `fused` then have no backend;
    `auto` falls back to TE's unfused core, which the plan then prices (W111), but which has no
    context parallelism: an error only with cp > 1."""
    b = env.attention_backend
    if not uses_te(env) or b not in _FLASH_CLASS:
        return None
    d = max(env.model.qk_dim, env.model.v_dim)  # MLA: the wider of its query/key and value heads
    cp = s.cp if s.cp is not None else 1
    if b == "auto":
        # cp > 1 where TE falls back to its unfused core (`te_auto_unfused`), which has no context
        # parallelism. fp32 is E135's (one error for one cause).
        if cp <= 1 or env.precision == "fp32" or te_auto_unfused(env) is None:
            return None
        if d % 8:
            eq = (f"head_dim({d}) % 8 = {d % 8} != 0 with attention_backend(auto), kernels te and cp({cp}) > 1: "
                  "TE falls back to its unfused core, which has no context parallelism")
            hint = "set context = 1, or a head dimension (kv_channels, or hidden / heads) that is a multiple of 8"
        else:
            eq = (f"head_dim({d}) > 256 with attention_backend(auto), kernels te and cp({cp}) > 1: flash-attn cannot "
                  "take it and TE's unfused fallback has no context parallelism")
            hint = f"set context = 1, or attention_backend = fused if your cuDNN supports head_dim({d})"
        return Violation(
            "E136", "Transformer Engine's flash / fused attention does not support this head dimension",
            eq, hint, anchors=(_P + "context", "attention_backend", "model.kv_channels", "model"),
            source="transformer_engine/pytorch/attention/dot_product_attention/utils.py get_attention_backend "
                   "(head_dim_qk > 256 or head_dim_qk % 8 != 0)",
        )
    if d % 8:
        eq = f"head_dim({d}) % 8 = {d % 8} != 0 with attention_backend({b}) and kernels te"
    elif d > 256 and b == "flash":
        eq = f"head_dim({d}) > 256 with attention_backend(flash) and kernels te"
    else:
        return None
    return Violation(
        "E136", "Transformer Engine's flash / fused attention does not support this head dimension",
        eq, "set attention_backend = unfused, or a head dimension (kv_channels, or hidden / heads) that is a "
        "multiple of 8" + (" and at most 256" if b == "flash" else ""),
        anchors=("attention_backend", "model.kv_channels", "model.heads", "model.hidden", "model"),
        source="transformer_engine/pytorch/attention/dot_product_attention/utils.py get_attention_backend "
               "(head_dim_qk > 256 or head_dim_qk % 8 != 0)",
    )


def te_auto_unfused(env: Env) -> str | None:
    """Why Transformer Engine may run `attention_backend = auto` on its unfused core (None when it
    will not): its flash and fused attention take bf16 / fp16 only and head_dim % 8 == 0; flash-attn
    takes head_dim <= 256 only, and cuDNN fused attention's limit depends on the cuDNN version (256
    for training in cuDNN 9 on Hopper). The plan then costs the unfused core (the s x s scores in
    memory), the safe side of TE's choice (`search.Problem.costed_backend`); with cp > 1 it is an
    error (E135 / E136: the unfused core has no context parallelism)."""
    d = env.model.head_dim
    if env.attention_backend != "auto" or not uses_te(env):
        return None
    if env.precision == "fp32":
        return "precision(fp32): TE's flash and cuDNN fused attention take bf16 / fp16 only"
    if d % 8:
        return f"head_dim({d}) % 8 = {d % 8} != 0: flash-attn and cuDNN fused attention need a multiple of 8"
    if d > 256:
        return f"head_dim({d}) > 256: flash-attn takes at most 256, cuDNN fused attention may not take it either"
    return None


def warn_auto_attention_unfused(env: Env, s: Sizes) -> Violation | None:
    """See `te_auto_unfused`."""
    why = te_auto_unfused(env)
    if why is None or (s.cp is not None and s.cp > 1):  # with cp > 1 it is an error (E135 / E136)
        return None
    if why.startswith("precision"):
        verb, hint, anchors = "runs", "set precision = bf16 to keep flash-class attention", ("precision",)
    elif "% 8" in why:
        verb, hint = "runs", "a head dimension (kv_channels, or hidden / heads) that is a multiple of 8 keeps it flash-class"
        anchors = ("model.kv_channels", "model.heads", "model")
    else:
        verb, hint = "may run", "set attention_backend = fused if your cuDNN supports this head dimension, to plan it flash-class"
        anchors = ("attention_backend", "model.kv_channels", "model")
    return Violation(
        "W111", f"attention_backend = auto {verb} Transformer Engine's unfused attention here",
        f"{why}; planned with the unfused core (s x s scores kept)", hint, anchors=anchors, severity=Severity.NOTE,
        source="transformer_engine/pytorch/attention/dot_product_attention/utils.py get_attention_backend "
               "(qkv dtype, head_dim_qk > 256 or head_dim_qk % 8 != 0)",
    )


_FP8 = ("fp8", "mxfp8")


def _fp8_gemm_dims(env: Env, s: Sizes) -> list[str]:
    """The per-rank GEMM dimensions Transformer Engine's fp8 check rejects, as equations
    (transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec: the input's and the weight's last
    dimension % 16 == 0, their other dimensions' product % 8 == 0)."""
    m = env.model
    bad: list[str] = []
    if m.hidden % 16:
        bad.append(f"hidden({m.hidden}) % 16 = {m.hidden % 16} != 0")
    tp = s.tp
    if tp is not None:
        attn = m.heads * m.head_dim
        if attn % tp == 0 and (attn // tp) % 16:
            bad.append(f"(heads({m.heads}) * head_dim({m.head_dim}) / tp({tp}) = {attn // tp}) % 16 = {attn // tp % 16} != 0")
        qkv = m.head_dim * (m.heads + 2 * m.query_groups)
        if qkv % tp == 0 and (qkv // tp) % 8:
            bad.append(f"(head_dim({m.head_dim}) * (heads({m.heads}) + 2 * query_groups({m.query_groups})) / tp({tp}) "
                       f"= {qkv // tp}) % 8 = {qkv // tp % 8} != 0")
        f, name = (m.shared_expert_ffn_hidden, "shared_expert_ffn_hidden") if m.is_moe else (m.ffn_hidden, "ffn_hidden")
        if f and f % tp == 0 and (f // tp) % 16:
            bad.append(f"({name}({f}) / tp({tp}) = {f // tp}) % 16 = {f // tp % 16} != 0")
    if m.is_moe:
        f = m.moe_ffn_hidden or m.ffn_hidden
        options = [e for e in expert_tp_options(s) if f % e == 0]
        if options and all((f // e) % 16 for e in options):
            e = options[0]
            bad.append(f"(moe_ffn_hidden({f}) / etp({e}) = {f // e}) % 16 = {f // e % 16} != 0")
    return bad


def rule_fp8_dims(env: Env, s: Sizes) -> Violation | None:
    """Transformer Engine fp8 / mxfp8 GEMMs (TransformerConfig.fp8 = "hybrid"): Linear and
    LayerNormLinear call assert_dim_for_fp8_exec(input, weight) per tensor-parallel rank: hidden, the
    attention projection's input heads x head_dim / tp, fc2's input ffn_hidden / tp (experts:
    moe_ffn_hidden / etp) % 16, the QKV weight rows / tp % 8."""
    if env.precision not in _FP8 or not uses_te(env):
        return None
    bad = _fp8_gemm_dims(env, s)
    if not bad:
        return None
    return Violation(
        "E137", f"{env.precision} GEMMs need every per-rank matrix dimension to be a multiple of 16 (rows: 8)",
        "; ".join(bad),
        "use sizes whose per-tensor-parallel-rank shares are multiples of 16 (a smaller tensor size often works), "
        "or precision = bf16",
        anchors=(_P + "tensor", _P + "expert_tensor", "model.ffn_hidden", "model.moe_ffn_hidden", "model.hidden",
                 "precision", "model"),
        source="transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec (module/linear.py, layernorm_linear.py)",
    )


def rule_fp8_tokens(env: Env, s: Sizes) -> Violation | None:
    """assert_dim_for_fp8_exec on a GEMM's input [s, b, h]: s x b % 8 == 0, with s the rank's local
    sequence: seq / cp, and / tp under sequence parallelism (TE checks the shard before the all-gather).
    Depends on the micro batch: the search checks it per micro batch."""
    if (env.precision not in _FP8 or not uses_te(env) or not s.seq_length
            or None in (s.micro_batch, s.cp, s.tp, s.sequence_parallel)):
        return None
    local = s.seq_length // s.cp
    sp = s.sequence_parallel and s.tp > 1
    if sp:
        if local % s.tp:
            return None  # E110 reports it
        local //= s.tp
    tokens = s.micro_batch * local
    if tokens % 8 == 0:
        return None
    split = f" / tp({s.tp}) (sequence parallel)" if sp else ""
    return Violation(
        "E138", f"{env.precision} GEMMs need the tokens per GEMM to be a multiple of 8",
        f"micro_batch({s.micro_batch}) * seq_length({s.seq_length}) / cp({s.cp}){split} = {tokens}; "
        f"{tokens} % 8 = {tokens % 8} != 0",
        "use a sequence length (or micro batch) that makes the tokens per rank a multiple of 8, or precision = bf16",
        anchors=(_P + "micro_batch", "stage.seq_length", "model.seq_length", _P + "sequence_parallel", "precision"),
        source="transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec (prod(shape[:-1]) % 8)",
    )


def warn_fp16_loss_scaling(env: Env, s: Sizes) -> Violation | None:
    """Megatron uses dynamic loss scaling with fp16 and then stops checking for NaN in loss/grads."""
    if env.precision != "fp16":
        return None
    return Violation(
        "W105", "fp16 trains with dynamic loss scaling",
        "precision = fp16 -> loss_scale = dynamic (initial 2**16, halved on overflow after hysteresis 2, doubled after 1000 clean steps, min 1)",
        "prefer bf16 on Ampere or newer",
        anchors=("precision",), severity=Severity.WARNING,
        source="megatron/core/optimizer/grad_scaler.py DynamicGradScaler; the runtime's optimizer_config "
               "(initial_loss_scale=2**16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)",
    )


def warn_selective_recompute_flash(env: Env, s: Sizes) -> Violation | None:
    """transformer_config.py __post_init__ warns that with Transformer Engine's fused / flash core
    attention there is "no need to set 'core_attn' to recompute": it keeps no s x s scores, so
    selective recompute (Megatron's recompute_modules = ["core_attn"]) frees almost nothing and adds an
    attention forward to every backward (the cost model charges it; memory.py frees only the core's
    fp32 softmax statistics, 4 B per query row and head)."""
    if s.recompute != "selective" or not uses_te(env) or env.attention_backend not in _FLASH_CLASS:
        return None
    if s.recompute_modules is not None and "core_attn" not in s.recompute_modules:
        return None  # the core attention is not among the modules recomputed
    if te_auto_unfused(env):  # `auto` that TE runs (and the plan prices) on its unfused core keeps the scores
        return None
    return Violation(
        "W110", "selective recompute with flash-class attention recomputes almost nothing",
        f"recompute = selective with attention_backend({env.attention_backend}) and kernels te: the core attention "
        "keeps no s x s scores; the plan charges one more attention forward per layer and saves ~0 bytes",
        "set recompute = none (or auto), full to save memory, or recompute_modules without core_attn",
        anchors=(_P + "recompute", "attention_backend"), severity=Severity.WARNING,
        source="megatron/core/transformer/transformer_config.py __post_init__ (no need to set 'core_attn' to recompute)",
    )


def rule_tp_comm_overlap(env: Env, s: Sizes) -> Violation | None:
    """Megatron-LM `validate_args`: "Tensor parallel communication/GEMM overlap can happen only when
    sequence parallelism is enabled"; it is Transformer Engine's (userbuffers), so not on the local
    spec; with tp = 1 there is nothing to overlap. Auto sizes are judged once resolved."""
    if not s.tp_comm_overlap:
        return None
    local = _local_why(env)
    if local:
        why, hint = f"tp_comm_overlap = true but {local}", "set tp_comm_overlap = false, or kernels = te"
    elif s.tp == 1:
        why, hint = "tp_comm_overlap = true with tp(1): nothing to overlap", "set tp_comm_overlap = false"
    elif s.tp is not None and s.tp > 1 and s.sequence_parallel is False:
        why, hint = f"tp_comm_overlap = true with tp({s.tp}) and sequence_parallel = false", \
            "set sequence_parallel = true (or leave it auto)"
    else:
        return None
    return Violation("E160", "TP communication overlap needs Transformer Engine, TP > 1 and sequence parallelism",
                     why, hint, anchors=(_P + "tp_comm_overlap", _P + "sequence_parallel", "kernels"),
                     source="megatron/training/arguments.py validate_args (tp_comm_overlap needs sequence_parallel)")


def rule_optimizer_state_dtype_te(env: Env, s: Sizes) -> Violation | None:
    """The precision-aware optimizer (16-bit Adam moments, or `precision_aware_optimizer = true` with fp32 ones)
    is Transformer Engine's FusedAdam (`exp_avg_dtype`, `master_weight_dtype`); Megatron-Core's OptimizerConfig
    raises "--use-precision-aware-optimizer requires FusedAdam from TransformerEngine" without it, so the local
    spec cannot run it."""
    if not s.precision_aware_optimizer:
        return None
    local = _local_why(env)
    if not local:
        return None
    if s.optimizer_state_dtype != "fp32":
        what, field, hint = (f"optimizer_state_dtype = {s.optimizer_state_dtype}", "optimizer_state_dtype",
                             "set optimizer_state_dtype = fp32")
    else:
        what, field, hint = ("precision_aware_optimizer = true", "precision_aware_optimizer",
                             "set precision_aware_optimizer = false (or auto): Megatron-Core's own Adam, same numerics")
    return Violation("E191", f"{what} needs Transformer Engine",
                     f"{what.replace(' = ', '(')}) but {local}",
                     hint + (", or kernels = te where Transformer Engine is installed" if env.kernels == "local" else ""),
                     anchors=(_P + field, "kernels"),
                     source="megatron/core/optimizer/optimizer_config.py __post_init__ (precision-aware optimizer "
                            "requires FusedAdam from TransformerEngine)")


def rule_precision_aware_bf16_moments(env: Env, s: Sizes) -> Violation | None:
    """16-bit Adam moments exist only in the precision-aware optimizer: Megatron-Core's OptimizerConfig asserts
    "exp_avg_dtype can only be fp32 when not using precision-aware optimizer"."""
    if s.optimizer_state_dtype == "fp32" or s.precision_aware_optimizer:
        return None
    return Violation("E184", f"optimizer_state_dtype = {s.optimizer_state_dtype} needs the precision-aware optimizer",
                     f"optimizer_state_dtype({s.optimizer_state_dtype}) with precision_aware_optimizer = false",
                     "remove precision_aware_optimizer = false (auto turns it on), or set optimizer_state_dtype = fp32",
                     anchors=(_P + "precision_aware_optimizer", _P + "optimizer_state_dtype"),
                     source="megatron/core/optimizer/optimizer_config.py __post_init__ (exp_avg_dtype can only be fp32 "
                            "when not using precision-aware optimizer)")


def _bf16_written(env: Env) -> tuple[tuple[str, int], ...]:
    """The bf16 layer counts the experiment wrote, as (field, count), nonzero only."""
    return tuple((f, n) for f, n in zip(("bf16_first_layers", "bf16_last_layers"), env.bf16_layers) if n)


def rule_bf16_layers_delayed(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core TransformerConfig `__post_init__` (fp8): "Delayed scaling does not support first / last layer
    in BF16." (one amax history per recipe cannot skip layers)."""
    written = _bf16_written(env)
    if not written or env.precision not in ("fp8", "mxfp8") or env.fp8_recipe != "delayed":
        return None
    field, n = written[0]
    return Violation("E185", "layers kept in bf16 need a recipe other than fp8_recipe = delayed",
                     f"{field}({n}) with fp8_recipe(delayed)",
                     "use fp8_recipe = tensorwise (or leave it auto), or drop the bf16 layers",
                     anchors=(field, "fp8_recipe"),
                     source="megatron/core/transformer/transformer_config.py __post_init__ (Delayed scaling does not "
                            "support first / last layer in BF16)")


def rule_bf16_layers_per_stage(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core TransformerConfig `__post_init__` (fp8): num_layers_at_start_in_bf16 and
    num_layers_at_end_in_bf16 "must be between 0 and number of layers per pipeline stage" (num_layers //
    pipeline_model_parallel_size). Megatron-Core checks only under fp8 (mxfp8 included), not nvfp4."""
    if env.precision not in ("fp8", "mxfp8") or s.pp is None:
        return None
    most = env.model.layers // s.pp
    over = [(f, n) for f, n in _bf16_written(env) if n > most]
    if not over:
        return None
    field, n = over[0]
    return Violation("E186", "more layers kept in bf16 than a pipeline stage holds",
                     f"{field}({n}) > layers({env.model.layers}) // pp({s.pp}) = {most}",
                     f"set {field} <= {most}, or use fewer pipeline stages",
                     anchors=(field, _P + "pipeline"),
                     source="megatron/core/transformer/transformer_config.py __post_init__ (num_layers_at_start_in_bf16 / "
                            "num_layers_at_end_in_bf16 between 0 and the layers per pipeline stage)")


def rule_bf16_layers_beyond_model(env: Env, s: Sizes) -> Violation | None:
    """A bf16 layer count above the model's layers. Megatron-Core bounds the counts only under fp8 (E186, per
    pipeline stage); under nvfp4 it checks nothing (fp4_utils.py `get_fp4_context` reads
    `is_first_last_bf16_layer`: layer_no < start or >= num_layers - end), so such a count would silently keep
    every layer in bf16 and no GEMM in nvfp4. Also where the pipeline size is still auto (E186 then prunes
    every layout, and the planner would report only that none fits)."""
    if env.precision not in ("fp8", "mxfp8", "nvfp4") or (env.precision != "nvfp4" and s.pp is not None):
        return None
    layers = env.model.layers
    over = [(f, n) for f, n in _bf16_written(env) if n > layers]
    if not over:
        return None
    field, n = over[0]
    return Violation("E200", "more layers kept in bf16 than the model has",
                     f"{field}({n}) > layers({layers})",
                     f"set {field} <= {layers} (and below it for any layer to run in {env.precision})",
                     anchors=(field, "model"),
                     source="megatron/core/fp8_utils.py is_first_last_bf16_layer (layer_no < start or >= "
                            "num_layers - end); megatron/core/fp4_utils.py get_fp4_context (no bound under nvfp4)")


def warn_bf16_layers_overlap(env: Env, s: Sizes) -> Violation | None:
    """The first and last bf16 ranges overlap (bf16_first_layers + bf16_last_layers > layers): Megatron-Core keeps
    a layer in bf16 when it is among the first OR the last (fp8_utils.py `is_first_last_bf16_layer`), so a
    layer in both counts once and fewer layers are in bf16 than the two counts add up to."""
    first, last = env.bf16_layers
    layers = env.model.layers
    if env.precision not in ("fp8", "mxfp8", "nvfp4") or not first or not last or first + last <= layers:
        return None
    if max(first, last) > layers:
        return None  # E200 / E186 name the count itself
    both = first + last - layers
    return Violation("W120", "the bf16 first and last layer ranges overlap",
                     f"bf16_first_layers({first}) + bf16_last_layers({last}) = {first + last} > layers({layers}): "
                     f"{both} layer{'s' if both > 1 else ''} in both ranges, counted once (every layer runs in bf16)",
                     f"lower bf16_first_layers or bf16_last_layers so that they add up to at most {layers}, or use "
                     "precision = bf16",
                     anchors=("bf16_last_layers", "bf16_first_layers"), severity=Severity.WARNING,
                     source="megatron/core/fp8_utils.py is_first_last_bf16_layer (first OR last)")


def warn_bf16_layers_without_low_precision(env: Env, s: Sizes) -> Violation | None:
    """Megatron-Core reads `first_last_layers_bf16` only inside its fp8 / fp4 contexts (fp8_utils.py
    `get_fp8_context`, fp4_utils.py `get_fp4_context`): in a 16-bit or fp32 run every layer already runs
    at the run's precision, so the setting does nothing."""
    written = _bf16_written(env)
    if not written or env.precision in ("fp8", "mxfp8", "nvfp4"):
        return None
    field, n = written[0]
    return Violation("W113", f"{field} has no effect with precision = {env.precision}",
                     f"{field}({n}) with precision({env.precision}): no layer runs below 16 bits",
                     f"remove {field}, or use precision = fp8, mxfp8 or nvfp4",
                     anchors=(field, "precision"), severity=Severity.WARNING,
                     source="megatron/core/fp8_utils.py get_fp8_context; megatron/core/fp4_utils.py get_fp4_context")
