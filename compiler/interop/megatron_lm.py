"""Megatron-LM `pretrain_gpt.py` arguments -> a `Draft`.

Input:  a `shell.Launch` (the launcher's words and the Megatron-LM arguments of a launch script).
Output: a `Draft` whose values are what Megatron-LM would run: a flag the command line leaves out takes
        Megatron-LM's own default (megatron/training/arguments.py: dropout 0.1, LayerNorm, learned absolute
        positions, tied embeddings, linear biases, GELU, Adam betas (0.9, 0.999), weight decay 0.01, a
        linear lr decay, fp32), not nemoc's, so the imported experiment trains the same model.
Invariants: every argument is either mapped or listed in `Draft.dropped` with its value; derived values
(steps from --train-samples, warm-up from --lr-warmup-fraction) carry a comment showing the arithmetic.
"""

from __future__ import annotations

import math

from nemoc.compiler.interop.draft import Call, Draft, Word, moe_layer_freq_value, set_moe_layers
from nemoc.compiler.interop.shell import Launch

# Megatron-LM flag, model field, kind (float | bool | word | int): MoE token dropping and the router.
_MOE_ROUTING = (
    ("--moe-expert-capacity-factor", "moe_capacity_factor", "float"),
    ("--moe-pad-expert-input-to-capacity", "moe_pad_to_capacity", "bool"),
    ("--moe-token-drop-policy", "moe_token_drop_policy", "word"),
    ("--moe-router-load-balancing-type", "moe_load_balancing", "word"),
    ("--moe-aux-loss-coeff", "moe_aux_loss_coeff", "float"),
    ("--moe-shared-expert-overlap", "moe_shared_expert_overlap", "bool"),
    ("--moe-router-score-function", "moe_router_score", "word"),
    ("--moe-router-pre-softmax", "moe_router_pre_softmax", "bool"),
    ("--moe-router-topk-scaling-factor", "moe_topk_scaling_factor", "float"),
    ("--moe-router-enable-expert-bias", "moe_expert_bias", "bool"),
    ("--moe-router-bias-update-rate", "moe_expert_bias_update_rate", "float"),
    ("--moe-router-num-groups", "moe_router_groups", "int"),
    ("--moe-router-group-topk", "moe_router_group_topk", "int"),
)
# Flags this importer reads (the rest are named in Draft.dropped).
_FLAGS = {
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--group-query-attention",
    "--num-query-groups", "--kv-channels", "--seq-length", "--vocab-size", "--swiglu", "--squared-relu",
    "--normalization", "--norm-epsilon", "--layernorm-epsilon", "--position-embedding-type",
    "--use-rotary-position-embeddings", "--no-position-embedding", "--rotary-base",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--add-qkv-bias", "--qk-layernorm",
    "--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size",
    "--moe-layer-freq",
    *(flag for flag, _, _ in _MOE_ROUTING),
    "--mtp-num-layers", "--mtp-loss-scaling-factor",
    "--hidden-dropout", "--attention-dropout",
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage",
    "--num-virtual-stages-per-pipeline-rank", "--context-parallel-size", "--expert-model-parallel-size",
    "--expert-tensor-parallel-size", "--sequence-parallel", "--use-distributed-optimizer",
    "--recompute-activations", "--recompute-granularity", "--recompute-method", "--recompute-num-layers",
    "--recompute-modules", "--checkpoint-activations", "--micro-batch-size", "--global-batch-size",
    "--bf16", "--fp16", "--fp8-format", "--fp8-recipe", "--attention-backend", "--transformer-impl",
    "--fp4-format", "--fp4-recipe", "--manual-gc", "--manual-gc-interval", "--cuda-graph-impl", "--cuda-graph-scope",
    "--use-megatron-fsdp", "--data-parallel-sharding-strategy",
    "--overlap-param-gather", "--overlap-grad-reduce", "--fp8-param-gather", "--tp-comm-overlap",
    "--tp-comm-bootstrap-backend", "--defer-embedding-wgrad-compute", "--wgrad-deferral-limit",
    "--optimizer", "--lr", "--min-lr", "--adam-beta1", "--adam-beta2", "--adam-eps", "--weight-decay",
    "--clip-grad", "--lr-decay-style", "--lr-warmup-iters", "--lr-warmup-fraction", "--lr-warmup-samples",
    "--lr-decay-iters", "--lr-decay-samples", "--train-iters", "--train-samples",
    "--data-path", "--mock-data", "--tokenizer-type", "--tokenizer-model", "--split",
    "--log-interval", "--eval-interval", "--eval-iters", "--save-interval", "--seed",
    *(_MLA_FLAGS := ("--multi-latent-attention", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim",
                     "--qk-pos-emb-head-dim", "--v-head-dim", "--rope-type")),
    *(_YARN_FLAGS := ("--rotary-scaling-factor", "--mscale", "--mscale-all-dim")),
}
# Tokenizer types whose vocabulary size is a fact of the tokenizer (Megatron-LM builds them itself).
_TOKENIZER_VOCAB = {"GPT2BPETokenizer": 50257, "Llama2Tokenizer": 32000}
_DECAY = {"cosine": "cosine", "linear": "linear", "constant": "constant", "WSD": "wsd"}


def parse_flags(args: tuple[str, ...]) -> tuple[dict[str, list[str]], list[str]]:
    """`--flag v1 v2 --bool ...` -> ({flag: values}, stray words). A later repeat of a flag wins,
    as in argparse."""
    flags: dict[str, list[str]] = {}
    stray: list[str] = []
    current = None
    for word in args:
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            current = name
            flags[current] = [value] if eq else []
        elif current is not None:
            flags[current].append(word.strip("'\""))
        else:
            stray.append(word)
    return flags, stray


def _launcher_sizes(launcher: tuple[str, ...]) -> dict[str, int]:
    """nodes / gpus_per_node from torchrun's (or torch.distributed.launch's) options."""
    out, words = {}, list(launcher)
    for i, w in enumerate(words):
        name, eq, value = w.partition("=")
        if not eq and i + 1 < len(words):
            value = words[i + 1]
        key = {"--nproc_per_node": "gpus_per_node", "--nproc-per-node": "gpus_per_node", "--nnodes": "nodes"}.get(name)
        if key and value.isdigit():
            out[key] = int(value)
    return out


class _Flags:
    """Typed reads of the parsed flags, remembering which were used."""

    def __init__(self, flags: dict[str, list[str]]):
        self.flags = flags

    def has(self, name: str) -> bool:
        return name in self.flags

    def str(self, name: str, default=None):
        v = self.flags.get(name)
        return v[0] if v else default

    def int(self, name: str, default=None):
        v = self.float(name)
        if v is not None and not v.is_integer():  # Megatron's argparse type=int refuses it too
            raise ValueError(f"{name} {self.str(name)}: not a whole number")
        return default if v is None else int(v)

    def float(self, name: str, default=None):
        v = self.str(name)
        if v is None and self.has(name):  # `--lr-decay-samples` followed by another flag or nothing
            raise ValueError(f"{name} has no value (Megatron-LM's argparse expects a number after it)")
        try:
            x = None if v is None else float(v)
        except ValueError:
            raise ValueError(f"{name} {v}: not a number") from None
        if x is not None and not math.isfinite(x):
            raise ValueError(f"{name} {v}: not a finite number")
        return default if x is None else x


def import_launch(launch: Launch, path: str) -> Draft:
    flags, stray = parse_flags(launch.args)
    f = _Flags(flags)
    d = Draft(source="a Megatron-LM command line", path=path)
    d.warnings += list(launch.warnings)
    d.cluster.update(_launcher_sizes(launch.launcher))
    if "gpus_per_node" not in d.cluster:
        d.note("the launcher gives no --nproc_per_node: cluster.gpus_per_node is nemoc's default (8)", warn=True)
    _model(f, d)
    _parallel(f, d)
    _precision(f, d)
    _data(f, d)
    _stage(f, d)
    d.dropped += [f"{k} {' '.join(v)}".rstrip() for k, v in flags.items() if k not in _FLAGS]
    d.dropped += [f"(stray word) {w}" for w in stray]
    return d


def _model(f: _Flags, d: Draft) -> None:
    hidden = f.int("--hidden-size")
    heads = f.int("--num-attention-heads")
    if hidden is None or heads is None or not f.has("--num-layers"):
        raise ValueError("--num-layers, --hidden-size and --num-attention-heads are required by Megatron-LM")
    act = "swiglu" if f.has("--swiglu") else "squared_relu" if f.has("--squared-relu") else "gelu"
    # arguments.py: ffn_hidden_size defaults to 4h, or int(4h * 2/3 / 64) * 64 with SwiGLU
    ffn = f.int("--ffn-hidden-size", int(4 * hidden * 2 / 3 / 64) * 64 if act == "swiglu" else 4 * hidden)
    position = f.str("--position-embedding-type")
    if position is None:
        position = "rope" if f.has("--use-rotary-position-embeddings") else \
            "none" if f.has("--no-position-embedding") else "learned_absolute"
    position = {"learned_absolute": "learned", "rope": "rope", "none": "none"}.get(position, position)
    if position not in ("learned", "rope", "none"):
        d.dropped.append(f"--position-embedding-type {position}")
        d.note(f"position embedding {position} has no nemoc equivalent: imported as rope", warn=True)
        position = "rope"
    norm = (f.str("--normalization") or "LayerNorm").lower()
    if norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"--normalization {f.str('--normalization')}: nemoc has LayerNorm and RMSNorm")
    vocab = f.int("--vocab-size")
    if vocab is None:
        vocab = _TOKENIZER_VOCAB.get(f.str("--tokenizer-type") or ("GPT2BPETokenizer" if f.has("--vocab-file") else ""))
        if vocab is not None:
            d.comments[("model", "vocab")] = "the tokenizer's vocabulary (Megatron-LM pads it at build time)"
    experts = f.int("--num-experts", 0) or 0
    d.model.update(
        layers=f.int("--num-layers"), hidden=hidden, heads=heads,
        query_groups=f.int("--num-query-groups", 1) if f.has("--group-query-attention") else heads,
        ffn_hidden=ffn, vocab=vocab, seq_length=f.int("--seq-length"), kv_channels=f.int("--kv-channels"),
        activation=Word(act), norm=Word(norm), position=Word(position),
        rotary_base=f.float("--rotary-base", 10000.0),
        # Megatron-LM's --use-rope-scaling (llama3 scaling) with --rope-scaling-factor, default 8
        rope_scaling_factor=f.float("--rope-scaling-factor", 8.0) if f.has("--use-rope-scaling") else 1.0,
        tie_embeddings=not f.has("--untie-embeddings-and-output-weights"),
        add_bias_linear=not f.has("--disable-bias-linear"),
        add_qkv_bias=f.has("--add-qkv-bias") or not f.has("--disable-bias-linear"),
        qk_layernorm=f.has("--qk-layernorm"),
        experts=experts, top_k=f.int("--moe-router-topk", 2) if experts else 0,
        moe_ffn_hidden=f.int("--moe-ffn-hidden-size") if experts else None,
        shared_expert_ffn_hidden=f.int("--moe-shared-expert-intermediate-size", 0) or 0,
        norm_epsilon=f.float("--norm-epsilon", f.float("--layernorm-epsilon", 1e-5)),
    )
    if f.has("--multi-latent-attention"):
        _mla(f, d)
    else:  # read only with MLA (Megatron-LM's MLATransformerConfig): named as not carried over
        d.dropped += [f"{k} {' '.join(f.flags[k])}".rstrip() for k in (*_MLA_FLAGS, *_YARN_FLAGS) if f.has(k)]
    if f.has("--mtp-num-layers"):  # multi-token prediction (TransformerConfig `mtp_num_layers`, `mtp_loss_scaling_factor`)
        d.model["mtp_num_layers"] = f.int("--mtp-num-layers")
        if f.has("--mtp-loss-scaling-factor"):
            d.model["mtp_loss_scaling_factor"] = f.float("--mtp-loss-scaling-factor")
    elif f.has("--mtp-loss-scaling-factor"):  # read only with --mtp-num-layers
        d.dropped.append(f"--mtp-loss-scaling-factor {f.str('--mtp-loss-scaling-factor')}")
    if experts:  # the routing flags given (the rest stay the language's defaults, which are Megatron's)
        for flag, field, kind in _MOE_ROUTING:
            if f.has(flag):
                d.model[field] = (True if kind == "bool" else f.float(flag) if kind == "float"
                                  else f.int(flag) if kind == "int" else Word(f.str(flag)))
        if f.has("--moe-layer-freq"):  # dense layers among the expert layers (an int or a list expression)
            set_moe_layers(d.model, moe_layer_freq_value(f.str("--moe-layer-freq"), "--moe-layer-freq"))
        if d.model.get("moe_capacity_factor") is not None and d.model["moe_capacity_factor"] < 0:
            # transformer_config.py __post_init__: a negative capacity factor is none (dropless), the language's default
            del d.model["moe_capacity_factor"]
        sinkhorn_defaults(d)


def _mla(f: _Flags, d: Draft) -> None:
    """Multi-latent attention (Megatron-LM's `_add_mla_args`, MLATransformerConfig's fields of the same names):
    the flags given, the rest the language's defaults (Megatron-Core's). MLA has no query groups or head
    dimension of its own (`--kv-channels` is what MLA scripts set for the value width, E167 in nemoc)."""
    d.model.update(multi_latent_attention=True, query_groups=d.model["heads"])
    if d.model.get("kv_channels") is not None:
        d.dropped.append(f"--kv-channels {d.model.pop('kv_channels')}")
        d.note("--kv-channels with --multi-latent-attention: MLA's head dimensions are qk_head_dim + "
               "qk_pos_emb_head_dim and v_head_dim (dropped)")
    for flag, field in (("--q-lora-rank", "q_lora_rank"), ("--kv-lora-rank", "kv_lora_rank"),
                        ("--qk-head-dim", "qk_head_dim"), ("--qk-pos-emb-head-dim", "qk_pos_emb_head_dim"),
                        ("--v-head-dim", "v_head_dim")):
        if f.has(flag):
            d.model[field] = f.int(flag)
    if f.has("--rope-type"):
        d.model["rope_type"] = Word(f.str("--rope-type"))
    yarn = d.model.get("rope_type") == "yarn"
    for flag, field in (("--rotary-scaling-factor", "rope_scaling_factor"), ("--mscale", "mscale"),
                        ("--mscale-all-dim", "mscale_all_dim")):
        if f.has(flag) and yarn:
            d.model[field] = f.float(flag)
        elif f.has(flag):  # MLA reads them only with YaRN
            d.dropped.append(f"{flag} {f.str(flag)}")


def sinkhorn_defaults(d: Draft) -> None:
    """Sinkhorn routing takes no auxiliary loss (router.py asserts moe_aux_loss_coeff == 0; rules E144):
    where the source leaves the coefficient at its default (Megatron-Core's is 0), the draft writes 0, not the
    language's default 1e-2."""
    if d.model.get("moe_load_balancing") == "sinkhorn" and "moe_aux_loss_coeff" not in d.model:
        d.model["moe_aux_loss_coeff"] = 0.0
        d.comments[("model", "moe_aux_loss_coeff")] = "Sinkhorn routing takes no auxiliary loss (Megatron's default 0)"


def _parallel(f: _Flags, d: Draft) -> None:
    tp, pp = f.int("--tensor-model-parallel-size", 1), f.int("--pipeline-model-parallel-size", 1)
    p = d.parallel
    p.update(tensor=tp, pipeline=pp)
    vp = f.int("--num-virtual-stages-per-pipeline-rank")
    per_stage = f.int("--num-layers-per-virtual-pipeline-stage")
    if vp is None and per_stage:
        vp = d.model["layers"] // (pp * per_stage)
        d.comments[("parallel", "virtual_pipeline")] = f"layers({d.model['layers']}) / (pp({pp}) x {per_stage} layers per virtual stage)"
    p["virtual_pipeline"] = vp or 1
    p["context"] = f.int("--context-parallel-size", 1)
    p["expert"] = f.int("--expert-model-parallel-size", 1)
    if d.model["experts"]:
        p["expert_tensor"] = f.int("--expert-tensor-parallel-size", tp)
        if not f.has("--expert-tensor-parallel-size"):
            d.comments[("parallel", "expert_tensor")] = "Megatron-LM's default: the tensor-parallel size"
    sp = f.has("--sequence-parallel")
    if sp and tp == 1:
        d.note("--sequence-parallel at tensor-parallel size 1: Megatron-LM switches it off (arguments.py), "
               "so does this import", warn=True)
        sp = False
    p["sequence_parallel"] = sp
    p["distributed_optimizer"] = f.has("--use-distributed-optimizer")
    strategy = f.str("--data-parallel-sharding-strategy", "optim_grads_params")
    if f.has("--use-megatron-fsdp") and strategy == "optim_grads_params":
        p["megatron_fsdp"] = True
    elif f.has("--use-megatron-fsdp"):
        d.note(f"--use-megatron-fsdp with --data-parallel-sharding-strategy {strategy}: nemoc plans Megatron-FSDP "
               "as optim_grads_params (ZeRO-3) only; planned without it", warn=True)
    granularity = f.str("--recompute-granularity")
    if f.has("--recompute-activations"):
        granularity = "selective"
    if f.has("--checkpoint-activations"):
        granularity = "full"
    if granularity not in (None, "full", "selective"):
        raise ValueError(f"--recompute-granularity {granularity}: full or selective")
    p["recompute"] = Word(granularity or "none")
    method, layers = f.str("--recompute-method", "uniform"), f.int("--recompute-num-layers", 1)
    if granularity == "full" and method == "block":
        p["recompute_layers"] = layers  # Megatron's block method: the first `layers` layers of each chunk
    elif granularity == "full" and (method != "uniform" or layers != 1):
        d.note(f"recompute method {method} x {layers} layers: nemoc recomputes every layer (uniform, 1)", warn=True)
    modules = f.flags.get("--recompute-modules")
    if granularity == "selective" and modules:  # Megatron-LM reads them only with selective granularity
        p["recompute_modules"] = [Word(m) for m in modules]
    p["micro_batch"] = f.int("--micro-batch-size", 1)
    _overlaps(f, d)


def _overlaps(f: _Flags, d: Draft) -> None:
    """The communication overlaps and deferrals of the command line. `--overlap-grad-reduce` has no field: the
    plan overlaps the gradient reduce wherever its DP x CP group has more than one rank; the TP overlap's
    userbuffer bootstrap backend is the plan's choice (`Execution.userbuffers`), named in a note when written."""
    p = d.parallel
    if f.has("--overlap-param-gather"):
        p["overlap_param_gather"] = True
    if f.has("--fp8-param-gather"):
        p["fp8_param_gather"] = True
    if f.has("--tp-comm-overlap"):
        p["tp_comm_overlap"] = True
        if f.has("--tp-comm-bootstrap-backend"):
            d.note(f"--tp-comm-bootstrap-backend {f.str('--tp-comm-bootstrap-backend')}: the plan picks the "
                   "userbuffers' bootstrap backend itself (nemoc plan shows it)")
    if f.has("--defer-embedding-wgrad-compute"):
        p["defer_embedding_wgrad_compute"] = True
        limit = f.int("--wgrad-deferral-limit", 0)
        if limit:
            p["wgrad_deferral_limit"] = limit
    elif f.has("--wgrad-deferral-limit"):  # Megatron-LM reads it only with the deferral (E198)
        d.note(f"--wgrad-deferral-limit {f.str('--wgrad-deferral-limit')} without --defer-embedding-wgrad-compute: "
               "Megatron-LM ignores it, so does this import", warn=True)


def _precision(f: _Flags, d: Draft) -> None:
    if f.has("--fp4-format") and f.str("--fp4-recipe", "nvfp4") == "nvfp4":
        precision = "nvfp4"
        d.comments[("top", "precision")] = f"--fp4-format {f.str('--fp4-format')}"
    elif f.has("--fp8-format"):
        precision = "mxfp8" if f.str("--fp8-recipe") == "mxfp8" else "fp8"
        if f.str("--fp8-recipe") in ("delayed", "tensorwise", "blockwise"):
            d.top["fp8_recipe"] = Word(f.str("--fp8-recipe"))
        d.comments[("top", "precision")] = f"--fp8-format {f.str('--fp8-format')}" + (
            f" --fp8-recipe {f.str('--fp8-recipe')}" if f.has("--fp8-recipe") else "")
    else:
        precision = "bf16" if f.has("--bf16") else "fp16" if f.has("--fp16") else "fp32"
    d.top["precision"] = Word(precision)
    backend = f.str("--attention-backend")
    if backend in ("auto", "flash", "fused", "unfused"):
        d.top["attention_backend"] = Word(backend)
    elif backend is not None:
        d.dropped.append(f"--attention-backend {backend}")
    _host(f, d)
    impl = f.str("--transformer-impl")
    if impl == "local":
        d.top["kernels"] = Word("local")
    elif impl == "transformer_engine":
        d.top["kernels"] = Word("te")


def _host(f: _Flags, d: Draft) -> None:
    """CUDA graphs and manual GC (Megatron-LM `--cuda-graph-impl`, `--cuda-graph-scope`, `--manual-gc`,
    `--manual-gc-interval`). Megatron-LM's own default is automatic GC: a script without `--manual-gc`
    says manual_gc = false (nemoc's auto is Megatron-Bridge's manual collection)."""
    impl = f.str("--cuda-graph-impl")
    if impl in ("none", "local", "transformer_engine"):
        d.top["cuda_graph_impl"] = Word(impl)
        scope = [s for s in f.flags.get("--cuda-graph-scope", []) if s != "full"]
        if scope:
            d.top["cuda_graph_scope"] = [Word(s) for s in scope]
    elif impl is not None:
        d.dropped.append(f"--cuda-graph-impl {impl}")
    d.top["manual_gc"] = f.has("--manual-gc")
    if f.has("--manual-gc") and f.has("--manual-gc-interval"):
        d.top["manual_gc_interval"] = f.int("--manual-gc-interval")


def _data(f: _Flags, d: Draft) -> None:
    values = {}
    paths = flags_data_path(f.flags.get("--data-path"))
    if not paths:
        why = "trains on Megatron's --mock-data" if f.has("--mock-data") else "gives no --data-path"
        paths = [(1.0, "CHANGE-ME")]
        d.note(f"the source {why}: set data.main.path to your corpus (raw JSONL/text; nemoc prepares it)", warn=True)
    else:
        d.note("--data-path names Megatron indexed datasets (.bin/.idx prefixes); nemoc prepares its own from raw "
               "JSONL/text: point each data path at the raw files", warn=False)
    tokenizer = f.str("--tokenizer-model")
    split = f.str("--split")
    for i, (weight, path) in enumerate(paths):
        values = {"path": path}
        if len(paths) > 1:
            values["weight"] = weight
        if tokenizer:
            values["tokenizer"] = tokenizer
        if split:
            values["split"] = split_fractions(split)
        d.data.append(("main" if len(paths) == 1 else f"part{i}", values))
    if not tokenizer and f.has("--vocab-file"):
        d.note("GPT-2 BPE files (--vocab-file/--merge-file) are not a nemoc tokenizer: give data.*.tokenizer a "
               "tokenizer.json (e.g. Hugging Face gpt2), or omit it to train one", warn=False)


def flags_data_path(values: list[str] | None) -> list[tuple[float, str]]:
    """`--data-path P` or `--data-path W1 P1 W2 P2 ...` -> [(weight, prefix)]."""
    if not values:
        return []
    if len(values) % 2 == 0 and all(_is_number(w) for w in values[::2]):
        return [(float(w), p) for w, p in zip(values[::2], values[1::2])]
    return [(1.0, p) for p in values]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def split_fractions(text: str) -> list[float]:
    """Megatron's `--split 949,50,1` (weights, normalised) -> [0.949, 0.05, 0.001]."""
    parts = [float(x) for x in text.strip("'\"").replace("/", ",").split(",") if x.strip()]
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    total = sum(parts) or 1.0
    return [round(p / total, 6) for p in parts]


def _stage(f: _Flags, d: Draft) -> None:
    s, c = d.stage, d.comments
    world = d.cluster.get("nodes", 1) * d.cluster.get("gpus_per_node", 8)
    dp = max(1, world // max(1, d.parallel["tensor"] * d.parallel["pipeline"] * d.parallel["context"]))
    gbs = f.int("--global-batch-size")
    if gbs is not None and gbs < 1:  # the sample counts below are divided by it
        raise ValueError(f"--global-batch-size {f.str('--global-batch-size')}: must be at least 1")
    if gbs is None:
        gbs = d.parallel["micro_batch"] * dp
        c[("stage", "global_batch")] = f"Megatron-LM's default: micro batch x data-parallel size ({dp})"
    s["data"] = [Word(name) for name, _ in d.data]
    s["global_batch"] = gbs
    steps = f.int("--train-iters")
    if steps is None and f.has("--train-samples"):
        steps = f.int("--train-samples") // gbs
        c[("stage", "steps")] = f"--train-samples {f.int('--train-samples')} / global batch {gbs}"
    if steps is None:
        d.note("the command line gives neither --train-iters nor --train-samples: add `steps` to the stage", warn=True)
    else:
        s["steps"] = steps
    d.model.setdefault("seq_length", None)
    if d.model["seq_length"] is None:
        raise ValueError("--seq-length is required by Megatron-LM")
    s["optimizer"] = _optimizer(f, d)
    s["schedule"] = _schedule(f, d, steps, gbs)
    dropout_h, dropout_a = f.float("--hidden-dropout", 0.1), f.float("--attention-dropout", 0.1)
    if dropout_h != dropout_a:
        d.note(f"hidden dropout {dropout_h} != attention dropout {dropout_a}: nemoc has one `dropout`; used the "
               "hidden one", warn=True)
    s["dropout"] = dropout_h
    if not (f.has("--hidden-dropout") or f.has("--attention-dropout")):
        c[("stage", "dropout")] = "Megatron-LM's default"
    s["log_every"] = f.int("--log-interval", 100)
    if f.int("--eval-iters", 100) > 0:  # --eval-iters 0: no evaluation
        s["eval_every"] = f.int("--eval-interval", 1000)
        s["eval_iters"] = f.int("--eval-iters", 100)
    s["seed"] = f.int("--seed", 1234)
    if f.has("--save-interval"):
        d.checkpoint["every"] = f.int("--save-interval")


def _optimizer(f: _Flags, d: Draft) -> Call:
    name = f.str("--optimizer", "adam")
    if name not in ("adam", "sgd"):
        d.dropped.append(f"--optimizer {name}")
        d.note(f"optimizer {name} has no nemoc equivalent: imported as adam", warn=True)
        name = "adam"
    args = {"lr": f.float("--lr")}
    if args["lr"] is None:
        raise ValueError("--lr is required by Megatron-LM")
    if name == "adam":
        args["betas"] = [f.float("--adam-beta1", 0.9), f.float("--adam-beta2", 0.999)]
        args["eps"] = f.float("--adam-eps", 1e-8)
    args["weight_decay"] = f.float("--weight-decay", 0.01)
    args["grad_clip"] = f.float("--clip-grad", 1.0)
    return Call(name, args)


def _schedule(f: _Flags, d: Draft, steps: int | None, gbs: int) -> Call:
    style = f.str("--lr-decay-style", "linear")
    if style not in _DECAY:
        d.dropped.append(f"--lr-decay-style {style}")
        d.note(f"lr decay style {style} has no nemoc equivalent: imported as cosine", warn=True)
        style = "cosine"
    decay = f.int("--lr-decay-iters")
    derived = []
    if decay is None and f.has("--lr-decay-samples"):
        decay = f.int("--lr-decay-samples") // gbs
        derived.append(f"decay_steps = --lr-decay-samples / {gbs}")
    warmup = f.int("--lr-warmup-iters")
    if warmup is None and f.has("--lr-warmup-samples"):
        warmup = f.int("--lr-warmup-samples") // gbs
        derived.append(f"warmup = --lr-warmup-samples / {gbs}")
    if derived:
        d.comments[("stage", "schedule")] = "; ".join(derived)
    if warmup is None and f.has("--lr-warmup-fraction"):
        base = decay if decay is not None else steps
        warmup = round(f.float("--lr-warmup-fraction") * base) if base else 0
        d.comments[("stage", "schedule")] = f"warmup = --lr-warmup-fraction {f.str('--lr-warmup-fraction')} x {base} decay steps"
    args = {"warmup": warmup or 0, "min_lr": f.float("--min-lr", 0.0)}
    if decay is not None and decay != steps:
        args["decay_steps"] = decay
    return Call(_DECAY[style], args)
