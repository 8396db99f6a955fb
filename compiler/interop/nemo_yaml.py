"""NeMo 1 YAML configs and Megatron-Bridge `ConfigContainer` dumps -> a `Draft`.

Input:  YAML text: a NeMo 1 config (megatron_gpt_config.yaml style: `trainer:` and `model:` with
        `model.optim`, `model.data`, `model.tokenizer`; also NeMo-Framework-Launcher's training configs) or
        a Megatron-Bridge config dump (`_target_: megatron.bridge.training.config.ConfigContainer` with
        `model`, `train`, `optimizer`, `scheduler`, `ddp`, `mixed_precision`, `dataset`, `tokenizer`, ...).
Output: a `Draft`. OmegaConf interpolations `${a.b}` (absolute) and `${.b}` (relative) are resolved;
        any other (`${data_dir}`, `${multiply:...}`) stays as its text and is named in the output.
Invariants: every non-null leaf of the YAML is either mapped or listed in `Draft.dropped` as `path = value`;
a key the source leaves out takes the source framework's default (NeMo 1: GELU, LayerNorm, learned
positions, tied embeddings, biases) where it decides the architecture.
"""

from __future__ import annotations

import math

import re

import yaml

from nemoc.compiler.interop.draft import Call, Draft, Word, moe_layer_freq_value, set_moe_layers
from nemoc.compiler.interop.megatron_lm import sinkhorn_defaults, split_fractions

_INTERP = re.compile(r"\$\{([^{}]*)\}")
_GPT2_VOCAB = 50257  # the GPT-2 BPE vocabulary NeMo's "megatron" GPT2BPETokenizer loads
_PRECISION = {"16": "fp16", "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16", "32": "fp32", "32-true": "fp32"}
_ACT = {"gelu": "gelu", "fast-geglu": None, "swiglu": "swiglu", "fast-swiglu": "swiglu", "squared-relu": "squared_relu",
        "relu": "relu"}
_SCHED = {"CosineAnnealing": "cosine", "cosine": "cosine", "linear": "linear", "constant": "constant", "WSD": "wsd",
          "WarmupAnnealing": "linear"}


class _Reader:
    """Typed reads of a nested mapping by dotted path; remembers what was read."""

    def __init__(self, root: dict):
        self.root = root
        self.used: set[str] = set()

    def get(self, path: str, default=None):
        node = self.root
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        self.used.add(path)
        return default if node is None else node

    def num(self, path: str, default=None):
        v = self.get(path)
        if v is None or isinstance(v, bool):
            return default
        try:
            x = float(v) if not isinstance(v, int) else v
        except (TypeError, ValueError):
            raise ValueError(f"{path} = {v!r} is not a number") from None
        if not math.isfinite(x):
            raise ValueError(f"{path} = {v!r} is not a finite number")
        return x

    def int(self, path: str, default=None):
        v = self.num(path)
        if v is not None and v != int(v):
            raise ValueError(f"{path} = {v!r} is not a whole number")
        return default if v is None else int(v)

    def leftovers(self) -> list[str]:
        """`path = value` of every non-null leaf never read."""
        out: list[str] = []

        def walk(node, prefix):
            if prefix in self.used:
                return
            if isinstance(node, dict):
                if "_target_" in node and not any(isinstance(v, dict) for v in node.values()) and \
                        set(node) <= {"_target_", "_call_", "_args_", "_partial_", "_name_"}:
                    out.append(f"{prefix} = {node['_target_']}")
                    return
                for k, v in node.items():
                    if k in ("_target_", "_call_"):
                        continue
                    walk(v, f"{prefix}.{k}" if prefix else str(k))
            elif node is not None and node != [] and node != {}:
                text = " ".join((("true" if node else "false") if isinstance(node, bool) else str(node)).split())
                out.append(f"{prefix} = {text[:80]}{'...' if len(text) > 80 else ''}")

        walk(self.root, "")
        return out


def _is_num(value) -> bool:
    try:
        float(value)
        return not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def load_yaml(text: str, path: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ValueError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a YAML mapping was expected at the top level")
    return _resolve(data, data, [])


def _resolve(node, root, trail):
    """OmegaConf-style interpolation of `${a.b}` and `${.b}`; unknown ones are left as text."""
    if isinstance(node, dict):
        return {k: _resolve(v, root, trail + [node]) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, trail) for v in node]
    if not isinstance(node, str) or "${" not in node:
        return node

    def lookup(expr: str):
        if ":" in expr:
            return None
        if expr.startswith("."):
            depth = len(expr) - len(expr.lstrip("."))
            base = trail[-depth] if depth <= len(trail) else None
            expr = expr.lstrip(".")
        else:
            base = root
        for part in expr.split("."):
            if not isinstance(base, dict) or part not in base:
                return None
            base = base[part]
        return base if not isinstance(base, (dict, list)) else None

    whole = _INTERP.fullmatch(node)
    if whole:
        value = lookup(whole.group(1))
        return node if value is None else _resolve(value, root, trail)
    return _INTERP.sub(lambda m: str(lookup(m.group(1))) if lookup(m.group(1)) is not None else m.group(0), node)


def import_yaml(text: str, path: str, fmt: str) -> Draft:
    r = _Reader(load_yaml(text, path))
    if fmt == "bridge":
        d = Draft(source="a Megatron-Bridge config dump", path=path)
        _bridge(r, d)
    else:
        d = Draft(source="a NeMo 1 YAML config", path=path)
        _nemo1(r, d)
    d.dropped += r.leftovers()
    return d


# ------------------------------------------------------------------------------------------ NeMo 1

def _nemo1(r: _Reader, d: Draft) -> None:
    m = "model."
    d.cluster.update(nodes=r.int("trainer.num_nodes", 1), gpus_per_node=r.int("trainer.devices", 8))
    act = str(r.get(m + "activation", "gelu"))
    if _ACT.get(act) is None:
        raise ValueError(f"model.activation = {act}: no nemoc equivalent")
    norm = str(r.get(m + "normalization", "layernorm")).lower()
    if norm == "layernorm1p":
        d.note("model.normalization = layernorm1p (zero-centred gamma): imported as layernorm", warn=True)
        norm = "layernorm"
    if norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"model.normalization = {norm}: nemoc has layernorm and rmsnorm")
    tokenizer_type = r.get(m + "tokenizer.type")
    vocab = _GPT2_VOCAB if tokenizer_type == "GPT2BPETokenizer" else None
    heads = r.int(m + "num_attention_heads")
    bias = bool(r.get(m + "bias", True))
    position = {"learned_absolute": "learned", "rope": "rope"}.get(str(r.get(m + "position_embedding_type", "learned_absolute")))
    if position is None:
        raise ValueError(f"model.position_embedding_type = {r.get(m + 'position_embedding_type')}: no nemoc equivalent")
    d.model.update(
        layers=r.int(m + "num_layers"), hidden=r.int(m + "hidden_size"), heads=heads,
        query_groups=r.int(m + "num_query_groups", heads), ffn_hidden=r.int(m + "ffn_hidden_size"),
        vocab=vocab, seq_length=r.int(m + "encoder_seq_length", r.int(m + "data.seq_length")),
        kv_channels=r.int(m + "kv_channels"), activation=Word(_ACT[act]), norm=Word(norm), position=Word(position),
        rotary_base=r.num(m + "rotary_base", 10000.0),
        tie_embeddings=bool(r.get(m + "share_embeddings_and_output_weights", True)),
        add_bias_linear=bias, add_qkv_bias=bias or bool(r.get(m + "qkv_bias", False)),
        qk_layernorm=bool(r.get(m + "qk_layernorm", False)),
        experts=r.int(m + "num_moe_experts", 0) or 0, norm_epsilon=r.num(m + "layernorm_epsilon", 1e-5),
    )
    if d.model["experts"]:
        d.model["top_k"] = r.int(m + "moe_router_topk", 2)
    if vocab is not None:
        d.comments[("model", "vocab")] = "GPT2BPETokenizer's vocabulary"
    tp = r.int(m + "tensor_model_parallel_size", 1)
    _parallel(d, tp=tp, pp=r.int(m + "pipeline_model_parallel_size", 1),
              vp=r.int(m + "virtual_pipeline_model_parallel_size"), cp=r.int(m + "context_parallel_size", 1),
              ep=r.int(m + "expert_model_parallel_size", 1), sp=bool(r.get(m + "sequence_parallel", False)),
              dist_opt=str(r.get(m + "optim.name", "")).startswith("distributed"),
              recompute=r.get(m + "activations_checkpoint_granularity"), micro=r.int(m + "micro_batch_size", 1))
    precision = _PRECISION.get(str(r.get("trainer.precision", 32)))
    if precision is None:
        raise ValueError(f"trainer.precision = {r.get('trainer.precision')}: not 16, bf16 or 32")
    if r.get(m + "fp8"):
        precision = "fp8"
    d.top["precision"] = Word(precision)
    _nemo1_data(r, d, tokenizer=r.get(m + "tokenizer.model"))
    steps = r.int("trainer.max_steps")
    _stage(d, global_batch=r.int(m + "global_batch_size"), steps=steps,
           optimizer=_nemo1_optim(r, d), schedule=_nemo1_sched(r, d, steps),
           dropout=r.num(m + "hidden_dropout"), log_every=r.int("trainer.log_every_n_steps"),
           eval_every=r.int("trainer.val_check_interval") if isinstance(r.get("trainer.val_check_interval"), int) else None,
           eval_iters=r.int("trainer.limit_val_batches") if isinstance(r.get("trainer.limit_val_batches"), int) else None,
           seed=r.int(m + "seed"))


def _nemo1_data(r: _Reader, d: Draft, tokenizer) -> None:
    prefix = r.get("model.data.data_prefix")
    split = r.get("model.data.splits_string")
    if isinstance(prefix, str) and prefix != "???":
        pairs = [(1.0, prefix)]
    elif isinstance(prefix, list) and len(prefix) % 2 == 0 and all(isinstance(w, (int, float)) for w in prefix[::2]):
        pairs = [(float(w), str(p)) for w, p in zip(prefix[::2], prefix[1::2])]
    elif isinstance(prefix, list):
        pairs = [(1.0, str(p)) for p in prefix]
    else:
        pairs = [(1.0, "CHANGE-ME")]
        d.note("model.data.data_prefix is not given (`???` or a train/validation/test mapping): set the data path "
               "to your raw JSONL/text", warn=True)
        if isinstance(prefix, dict):
            d.dropped.append(f"model.data.data_prefix = {prefix}")
    _data_blocks(d, pairs, tokenizer, split_fractions(str(split)) if split else None)


def _nemo1_optim(r: _Reader, d: Draft) -> Call:
    o = "model.optim."
    name = str(r.get(o + "name", "fused_adam"))
    kind = "sgd" if name == "sgd" else "adam"
    if kind == "adam" and "adam" not in name:
        d.note(f"model.optim.name = {name}: imported as adam", warn=True)
    args = {"lr": r.num(o + "lr")}
    if kind == "adam":
        betas = r.get(o + "betas")
        if betas is not None:
            if not (isinstance(betas, list) and len(betas) == 2 and all(_is_num(b) for b in betas)):
                raise ValueError(f"model.optim.betas = {betas!r}: two numbers expected")
            args["betas"] = [float(b) for b in betas]
        if r.get(o + "eps") is not None:
            args["eps"] = r.num(o + "eps")
    args["weight_decay"] = r.num(o + "weight_decay", 0.0)
    clip = r.num("trainer.gradient_clip_val")
    if clip is not None:
        args["grad_clip"] = clip
    return Call(kind, {k: v for k, v in args.items() if v is not None})


def _nemo1_sched(r: _Reader, d: Draft, steps) -> Call | None:
    s = "model.optim.sched."
    name = r.get(s + "name")
    if name is None:
        return None
    style = _SCHED.get(str(name))
    if style is None:
        d.note(f"model.optim.sched.name = {name}: no nemoc equivalent, imported as cosine", warn=True)
        style = "cosine"
    args = {"warmup": r.int(s + "warmup_steps", 0), "min_lr": r.num(s + "min_lr", 0.0)}
    constant = r.int(s + "constant_steps", 0)
    if constant:
        d.note(f"model.optim.sched.constant_steps = {constant}: NeMo holds min_lr for the last {constant} steps; "
               "nemoc decays over all the steps after warm-up", warn=True)
    decay = r.int(s + "max_steps")
    if decay is not None and decay != steps:
        args["decay_steps"] = decay
    return Call(style, args)


# ---------------------------------------------------------------------------------- Megatron-Bridge

def _bridge(r: _Reader, d: Draft) -> None:
    m = "model."
    act_target = str(r.get(m + "activation_func._target_", "torch.nn.functional.gelu"))
    glu = bool(r.get(m + "gated_linear_unit", False))
    act = {"silu": "swiglu" if glu else None, "gelu": None if glu else "gelu", "relu": "relu",
           "squared_relu": "squared_relu"}.get(act_target.rsplit(".", 1)[-1])
    if act is None:
        raise ValueError(f"model.activation_func = {act_target} (gated: {glu}): no nemoc equivalent")
    heads = r.int(m + "num_attention_heads")
    position = {"learned_absolute": "learned", "rope": "rope", "none": "none"}.get(
        str(r.get(m + "position_embedding_type", "learned_absolute")))
    if position is None:
        raise ValueError(f"model.position_embedding_type = {r.get(m + 'position_embedding_type')}: no nemoc equivalent")
    train_seq = r.int("dataset.seq_length", r.int("dataset.sequence_length"))
    model_seq = r.int(m + "seq_length")
    if train_seq and model_seq and train_seq != model_seq:
        d.comments[("model", "seq_length")] = f"the dataset's sequence length (model.seq_length {model_seq} is the maximum)"
    experts = r.int(m + "num_moe_experts", 0) or 0
    d.model.update(
        layers=r.int(m + "num_layers"), hidden=r.int(m + "hidden_size"), heads=heads,
        query_groups=r.int(m + "num_query_groups", heads), ffn_hidden=r.int(m + "ffn_hidden_size"),
        vocab=r.int(m + "vocab_size", r.int("tokenizer.vocab_size")), seq_length=train_seq or model_seq,
        kv_channels=r.int(m + "kv_channels"), activation=Word(act),
        norm=Word(_bridge_norm(r)),
        position=Word(position), rotary_base=r.num(m + "rotary_base", 10000.0),
        tie_embeddings=bool(r.get(m + "share_embeddings_and_output_weights", True)),
        add_bias_linear=bool(r.get(m + "add_bias_linear", True)), add_qkv_bias=bool(r.get(m + "add_qkv_bias", False)),
        qk_layernorm=bool(r.get(m + "qk_layernorm", False)), experts=experts,
        top_k=r.int(m + "moe_router_topk", 2) if experts else 0,
        moe_ffn_hidden=r.int(m + "moe_ffn_hidden_size") if experts else None,
        shared_expert_ffn_hidden=r.int(m + "moe_shared_expert_intermediate_size", 0) or 0,
        norm_epsilon=r.num(m + "layernorm_epsilon", 1e-5),
    )
    if not experts:
        for k in ("moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            r.get(m + k)  # MoE settings of a dense model: defaults that change nothing
    else:
        _moe_routing(r, m, d)
        if r.get(m + "moe_layer_freq") is not None:  # dense layers among the expert layers (int or 0 / 1 list)
            set_moe_layers(d.model, moe_layer_freq_value(r.get(m + "moe_layer_freq"), m + "moe_layer_freq"))
    tp = r.int(m + "tensor_model_parallel_size", 1)
    _parallel(d, tp=tp, pp=r.int(m + "pipeline_model_parallel_size", 1),
              vp=r.int(m + "virtual_pipeline_model_parallel_size"), cp=r.int(m + "context_parallel_size", 1),
              ep=r.int(m + "expert_model_parallel_size", 1), sp=bool(r.get(m + "sequence_parallel", False)),
              dist_opt=bool(r.get("optimizer.use_distributed_optimizer", r.get("ddp.use_distributed_optimizer", False))),
              recompute=r.get(m + "recompute_granularity"), micro=r.int("train.micro_batch_size", 1),
              etp=r.int(m + "expert_tensor_parallel_size") if experts else None)
    r.get("ddp.use_distributed_optimizer")
    _bridge_precision(r, d)
    _bridge_data(r, d)
    steps = r.int("train.train_iters")
    gbs = r.int("train.global_batch_size")
    if steps is None and r.int("train.train_samples") and gbs:
        steps = r.int("train.train_samples") // gbs
        d.comments[("stage", "steps")] = f"train.train_samples / global batch {gbs}"
    eval_every = r.int("validation.eval_interval", r.int("train.eval_interval"))
    eval_iters = r.int("validation.eval_iters", r.int("train.eval_iters"))
    _stage(d, global_batch=gbs, steps=steps, optimizer=_bridge_optim(r), schedule=_bridge_sched(r, d, steps),
           dropout=r.num(m + "hidden_dropout"), log_every=r.int("logger.log_interval"),
           eval_every=eval_every, eval_iters=eval_iters, seed=r.int("rng.seed"))
    if r.get("checkpoint.save_interval") is not None:
        d.checkpoint["every"] = r.int("checkpoint.save_interval")


# Megatron-Core TransformerConfig key -> the model field that states it (token dropping and the router)
_MOE_ROUTING = {
    "moe_expert_capacity_factor": "moe_capacity_factor", "moe_pad_expert_input_to_capacity": "moe_pad_to_capacity",
    "moe_token_drop_policy": "moe_token_drop_policy", "moe_router_load_balancing_type": "moe_load_balancing",
    "moe_aux_loss_coeff": "moe_aux_loss_coeff", "moe_shared_expert_overlap": "moe_shared_expert_overlap",
    "moe_router_score_function": "moe_router_score", "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor": "moe_topk_scaling_factor",
    "moe_router_enable_expert_bias": "moe_expert_bias", "moe_router_bias_update_rate": "moe_expert_bias_update_rate",
    "moe_router_num_groups": "moe_router_groups", "moe_router_group_topk": "moe_router_group_topk",
}


def _moe_routing(r: _Reader, m: str, d: Draft) -> None:
    """The MoE routing keys of the config that differ from the language's defaults (Megatron-Core's), each
    as its model field; a value the language has no word for (a list of balancing types, `noaux_tc`) stays
    unread, so the import names it as not carried over."""
    from nemoc.dsl.schema import MODEL_FIELDS

    fields = {f.name: f for f in MODEL_FIELDS}
    for key, name in _MOE_ROUTING.items():
        raw = _peek(r.root, m + key)
        if raw is None:
            continue
        if key == "moe_expert_capacity_factor" and isinstance(raw, (int, float)) and raw < 0:
            r.get(m + key)  # Megatron-Core reads a negative capacity factor as none (dropless)
            continue
        choices = getattr(fields[name].type, "choices", None)
        if isinstance(raw, (list, dict)) or (choices and raw not in choices):
            continue
        value = r.get(m + key)
        if value == fields[name].default or (name in ("moe_router_groups", "moe_router_group_topk") and not value):
            continue
        d.model[name] = Word(value) if isinstance(value, str) else value
    sinkhorn_defaults(d)


def _peek(root: dict, path: str):
    node = root
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _bridge_norm(r: _Reader) -> str:
    norm = str(r.get("model.normalization", "LayerNorm"))
    if norm not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"model.normalization = {norm}: nemoc has LayerNorm and RMSNorm")
    return norm.lower()


def _bridge_precision(r: _Reader, d: Draft) -> None:
    p = "mixed_precision."
    fp8 = r.get(p + "fp8")
    if fp8:
        recipe = r.get(p + "fp8_recipe")
        precision = "mxfp8" if recipe == "mxfp8" else "fp8"
        d.comments[("top", "precision")] = f"mixed_precision.fp8 = {fp8}, fp8_recipe = {recipe}"
    elif r.get(p + "bf16") or r.get("model.bf16"):
        precision = "bf16"
    elif r.get(p + "fp16") or r.get("model.fp16"):
        precision = "fp16"
    else:
        precision = "fp32"
    d.top["precision"] = Word(precision)
    r.get(p + "fp16"), r.get(p + "fp32"), r.get("model.bf16"), r.get("optimizer.bf16")
    if r.get("model.transformer_impl") == "local":
        d.top["kernels"] = Word("local")


def _bridge_data(r: _Reader, d: Draft) -> None:
    tokenizer = r.get("tokenizer.tokenizer_model")
    r.get("tokenizer.vocab_size"), r.get("tokenizer.tokenizer_type")
    blend = r.get("dataset.blend")
    data_format = None
    if r.get("dataset.dataset_name"):
        name = r.get("dataset.dataset_name")
        d.stage_name = "sft"
        d.note(f"the source fine-tunes on the Hugging Face dataset `{name}` (dataset.dataset_name): export it to "
               "JSONL records {\"prompt\", \"response\"} (Megatron-Bridge's SFT input/output pairs) and set the data "
               "path, or change `format` to chat for conversations", warn=True)
        pairs = [(1.0, str(name))]
        data_format = "prompt_response"
        base = r.get("model.hf_model_id") or r.get("checkpoint.pretrained_checkpoint")
        if base:
            d.stage["init"] = Call("hf", {"": str(base)})
            d.note(f"the source fine-tunes `{base}`: download it to a local Hugging Face directory and point "
                   "`init = hf(...)` at it (nemoc check reports E045 until it exists)", warn=True)
    elif isinstance(blend, list) and blend and isinstance(blend[0], list):
        paths, weights = blend[0], (blend[1] if len(blend) > 1 and blend[1] else [1.0] * len(blend[0]))
        pairs = [(float(w), str(p)) for w, p in zip(weights, paths)]
    else:
        why = "trains on mock data (dataset.mock)" if r.get("dataset.mock") else "gives no dataset.blend"
        d.note(f"the source {why}: set the data path to your corpus (raw JSONL/text; nemoc prepares it)", warn=True)
        pairs = [(1.0, "CHANGE-ME")]
    split = r.get("dataset.split")
    _data_blocks(d, pairs, tokenizer, split_fractions(str(split)) if isinstance(split, str) else None, data_format)


def _bridge_optim(r: _Reader) -> Call:
    o = "optimizer."
    name = str(r.get(o + "optimizer", "adam"))
    if name not in ("adam", "sgd"):
        raise ValueError(f"optimizer.optimizer = {name}: nemoc has adam and sgd")
    args = {"lr": r.num(o + "lr")}
    if name == "adam":
        args["betas"] = [r.num(o + "adam_beta1", 0.9), r.num(o + "adam_beta2", 0.999)]
        args["eps"] = r.num(o + "adam_eps", 1e-8)
    args["weight_decay"] = r.num(o + "weight_decay", 0.01)
    args["grad_clip"] = r.num(o + "clip_grad", 1.0)
    return Call(name, {k: v for k, v in args.items() if v is not None})


def _bridge_sched(r: _Reader, d: Draft, steps) -> Call:
    s = "scheduler."
    style = _SCHED.get(str(r.get(s + "lr_decay_style", "linear")))
    if style is None:
        d.note(f"scheduler.lr_decay_style = {r.get(s + 'lr_decay_style')}: no nemoc equivalent, imported as cosine",
               warn=True)
        style = "cosine"
    decay = r.int(s + "lr_decay_iters")
    warmup = r.int(s + "lr_warmup_iters")
    fraction = r.num(s + "lr_warmup_fraction")
    if not warmup and fraction:
        warmup = round(fraction * (decay or steps or 0))
    args = {"warmup": warmup or 0, "min_lr": r.num("optimizer.min_lr", 0.0)}
    if decay is not None and decay != steps:
        args["decay_steps"] = decay
    return Call(style, args)


# ------------------------------------------------------------------------------------------ shared

def _parallel(d: Draft, *, tp, pp, vp, cp, ep, sp, dist_opt, recompute, micro, etp=None) -> None:
    if sp and tp == 1:
        d.note("sequence_parallel at tensor-parallel size 1: Megatron switches it off, so does this import", warn=True)
        sp = False
    d.parallel.update(tensor=tp, pipeline=pp, virtual_pipeline=vp or 1, context=cp, expert=ep)
    if d.model.get("experts"):
        d.parallel["expert_tensor"] = etp or tp
    recompute = str(recompute) if recompute in ("selective", "full") else "none"
    d.parallel.update(sequence_parallel=sp, distributed_optimizer=dist_opt, recompute=Word(recompute),
                      micro_batch=micro)


def _data_blocks(d: Draft, pairs, tokenizer, split, data_format: str | None = None) -> None:
    if any("${" in p for _, p in pairs):
        d.note("a data path keeps an unresolved interpolation (`${...}`): replace it with the real path", warn=True)
    d.note("data paths name Megatron indexed datasets (.bin/.idx prefixes) or a dataset id; nemoc prepares its "
           "own from raw JSONL/text: point each data path at the raw files")
    for i, (weight, path) in enumerate(pairs):
        values = {"path": path}
        if len(pairs) > 1:
            values["weight"] = weight
        if tokenizer:
            values["tokenizer"] = str(tokenizer)
        if split:
            values["split"] = split
        if data_format:
            values["format"] = Word(data_format)
        d.data.append(("main" if len(pairs) == 1 else f"part{i}", values))


def _stage(d: Draft, *, global_batch, steps, optimizer, schedule, dropout, log_every, eval_every, eval_iters,
           seed) -> None:
    s = d.stage
    s["data"] = [Word(name) for name, _ in d.data]
    if global_batch is None:
        raise ValueError("the source gives no global batch size")
    s["global_batch"] = global_batch
    if steps is None:
        d.note("the source gives no number of steps: add `steps` to the stage", warn=True)
    else:
        s["steps"] = steps
    s["optimizer"] = optimizer
    if schedule is not None:
        s["schedule"] = schedule
    for k, v in (("dropout", dropout), ("log_every", log_every), ("eval_every", eval_every),
                 ("eval_iters", eval_iters), ("seed", seed)):
        if v is not None:
            s[k] = v
