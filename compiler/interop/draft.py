"""The importers' common target: a `Draft` of one experiment, and its canonical `.nemo` text.

Input:  a `Draft` filled by an importer (`megatron_lm`, `nemo_yaml`): plain values per `.nemo` block, the
        comments that explain where a value came from or what the user must add, and every source
        setting that was not carried over.
Output: `emit(draft)`: canonical `.nemo` text (built, then parsed and printed by `dsl/format.py`), with a
        comment block naming every setting not carried over.
Invariants: no value is invented silently: a value the source does not give either takes the source
framework's own default (said in a comment) or is left out with a comment saying what to add. A model
whose architecture equals a preset exactly is written as that preset.
"""

from __future__ import annotations

import math

import dataclasses
import re
from dataclasses import dataclass, field

from nemoc.compiler.catalog.hardware import get_gpu
from nemoc.compiler.catalog.models import PRESETS
from nemoc.compiler.spec import ModelSpec, moe_layer_pattern
from nemoc.dsl.format import format_module, quote
from nemoc.dsl.parser import parse


class Word(str):
    """An enum word or a reference (`bf16`, `cosine`), printed without quotes."""


@dataclass
class Call:
    """A call value such as `adam(lr = 3e-4)`."""

    name: str
    args: dict = field(default_factory=dict)


@dataclass
class Draft:
    source: str  # what was read, for the header: "Megatron-LM command line", "NeMo 1 YAML", ...
    path: str
    name: str = "imported"
    cluster: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    parallel: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)  # precision, attention_backend, kernels
    data: list = field(default_factory=list)  # [(name, {field: value})]
    stage_name: str = "pretrain"
    stage: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)
    comments: dict = field(default_factory=dict)  # (block, field) -> trailing comment
    notes: list = field(default_factory=list)  # header comment lines (assumptions, what to add)
    dropped: list = field(default_factory=list)  # "name value" of every source setting not carried over
    warnings: list = field(default_factory=list)  # stderr lines

    def note(self, text: str, warn: bool = False) -> None:
        self.notes.append(text)
        if warn:
            self.warnings.append(text)


# ------------------------------------------------------------------------------- value printing

def value_text(value) -> str:
    if isinstance(value, Word):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return number_text(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, Call):
        # a key "" is the call's leading positional argument: `hf("DIR")`
        return f"{value.name}(" + ", ".join(value_text(v) if k == "" else f"{k} = {value_text(v)}"
                                            for k, v in value.args.items()) + ")"
    raise TypeError(f"cannot print {value!r}")


def number_text(x: float) -> str:
    """Shortest text that reads back as `x`: `6e-05`, `0.9`, `1000000`."""
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


# ------------------------------------------------------------------------- dense layers of a MoE model


MAX_FREQ_TEXT = 4096  # characters of a `--moe-layer-freq` expression (DeepSeek-V3's is 15)
MAX_FREQ_ENTRIES = 1_000_000  # entries of a pattern: a layer count is at most 10,000 (the language's bound)


def moe_layer_freq_value(raw: object, flag: str = "moe_layer_freq") -> int | tuple[int, ...]:
    """Megatron's `moe_layer_freq` as a script or config writes it: an int, a list, or (Megatron-LM's
    `--moe-layer-freq`, arguments.py `moe_freq_type`) a string of an int or of a Python list expression such as
    `([0]*3+[1]*58)`, read here without evaluating code: only list literals of ints, `+` and `* int`. Hostile
    input is a ValueError naming `flag`: text over MAX_FREQ_TEXT characters, a result over MAX_FREQ_ENTRIES
    entries (checked before each multiplication, so no huge list is built), nesting deep enough for
    RecursionError / MemoryError in Python's parser."""
    import ast

    def bad(why: str = "not an int or a list expression of 0 / 1") -> ValueError:
        shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
        return ValueError(f"{flag} {shown}: {why}")

    if isinstance(raw, bool):
        raise bad("not an int or a 0 / 1 list")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, (list, tuple)):
        if len(raw) > MAX_FREQ_ENTRIES:
            raise bad(f"more than {MAX_FREQ_ENTRIES:,} entries")
        try:
            return tuple(int(v) for v in raw)
        except (TypeError, ValueError, OverflowError):
            raise bad("not an int or a 0 / 1 list") from None
    text = str(raw).strip().strip("'\"")
    if len(text) > MAX_FREQ_TEXT:
        raise bad(f"longer than {MAX_FREQ_TEXT:,} characters")
    if re.fullmatch(r"\d{1,18}", text):
        return int(text)

    def value(node) -> list[int]:
        if isinstance(node, ast.List) and all(isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts):
            return [e.value for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = value(node.left), value(node.right)
            if len(left) + len(right) > MAX_FREQ_ENTRIES:
                raise bad(f"more than {MAX_FREQ_ENTRIES:,} entries")
            return left + right
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            for items, times in ((node.left, node.right), (node.right, node.left)):
                if isinstance(times, ast.Constant) and type(times.value) is int:
                    listed = value(items)
                    if len(listed) * max(times.value, 0) > MAX_FREQ_ENTRIES:  # before building it
                        raise bad(f"more than {MAX_FREQ_ENTRIES:,} entries")
                    return listed * times.value
        raise bad()
    try:
        return tuple(value(ast.parse(text, mode="eval").body))
    except (SyntaxError, RecursionError, MemoryError):  # MemoryError: CPython's parser on deep nesting
        raise bad() from None


def set_moe_layers(model: dict, freq: int | tuple[int, ...]) -> None:
    """The pattern as the language writes it most readably: a dense prefix `[0]*k + [1]*rest` as
    `moe_first_dense_layers = k` (DeepSeek's first_k_dense_replace), every layer MoE as nothing (the default),
    any other int or list as `moe_layer_freq`. A list is shortened only when it is valid for `model`'s layers
    (one 0 / 1 entry per layer): any other is written as given, for `nemoc check` to refuse at its line (E202
    length, E032 an entry not 0 / 1, E203 no expert layer), as Megatron-Core refuses it."""
    if isinstance(freq, int):
        if freq != 1:
            model["moe_layer_freq"] = freq
        return
    if len(freq) != model.get("layers") or not set(freq) <= {0, 1}:
        model["moe_layer_freq"] = list(freq)
        return
    k = next((i for i, v in enumerate(freq) if v), len(freq))
    if 0 < k < len(freq) and all(freq[k:]):
        model["moe_first_dense_layers"] = k
    elif not all(freq):
        model["moe_layer_freq"] = list(freq)


# ------------------------------------------------------------------------------------- presets

_ARCH = ("layers", "hidden", "heads", "query_groups", "ffn_hidden", "vocab", "activation", "norm", "position",
         "rotary_base", "rope_scaling_factor", "tie_embeddings", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "experts", "top_k",
         "moe_ffn_hidden", "shared_expert_ffn_hidden", "norm_epsilon",
         # multi-latent attention (None for standard attention, so a standard model never matches an MLA preset)
         "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
         "rope_type")
_MLA_ARCH = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type")


def _arch(values: dict) -> dict:
    """The architecture facts that decide equality, normalised: qkv bias is implied by linear biases
    (Megatron-Core builds linear_qkv with bias = add_bias_linear or add_qkv_bias), the expert MLP
    defaults to the dense one, the head dimension defaults to hidden / heads."""
    out = {k: values.get(k) for k in _ARCH}
    out["add_qkv_bias"] = bool(values.get("add_bias_linear") or values.get("add_qkv_bias"))
    out["shared_expert_ffn_hidden"] = values.get("shared_expert_ffn_hidden") or 0
    out["experts"] = values.get("experts") or 0
    out["qk_layernorm"] = bool(values.get("qk_layernorm"))
    if out["experts"]:
        out["moe_ffn_hidden"] = values.get("moe_ffn_hidden") or values.get("ffn_hidden")
    else:
        out["moe_ffn_hidden"] = out["top_k"] = None
    # heads = 0 matches no preset; `nemoc check` of the imported file refuses it at its line
    out["head_dim"] = values.get("kv_channels") or (values["hidden"] // values["heads"] if values["heads"] else None)
    out["rope_scaling_factor"] = float(values.get("rope_scaling_factor") or 1.0)
    for k in ("rotary_base", "norm_epsilon"):
        out[k] = float(out[k]) if out[k] is not None else None
    if out["position"] != "rope":
        out["rotary_base"] = out["rope_scaling_factor"] = None
    # which layers are expert layers (a preset's dense prefix is architecture: DeepSeek's first dense layers)
    freq = values.get("moe_layer_freq") or 1
    out["moe_layer_pattern"] = moe_layer_pattern(values["layers"], out["experts"], freq if isinstance(freq, int)
                                                 else tuple(freq), values.get("moe_first_dense_layers") or 0)
    out["multi_latent_attention"] = bool(values.get("multi_latent_attention"))
    if out["multi_latent_attention"]:
        defaults = {k: ModelSpec.__dataclass_fields__[k].default for k in _MLA_ARCH}
        out.update({k: values.get(k) if values.get(k) is not None else defaults[k] for k in _MLA_ARCH})
        out["q_lora_rank"] = out["q_lora_rank"] or 0
        out["head_dim"] = None  # MLA's head dimensions are its own fields
    else:
        out.update({k: None for k in _MLA_ARCH})
    return out


def matching_preset(model: dict, ignore_vocab: bool = False) -> str | None:
    """The preset whose architecture equals `model`'s (every field in `_ARCH`; seq_length may differ;
    with `ignore_vocab`, the vocabulary too, for a source whose tokenizer file decides it)."""
    if any(model.get(k) is None for k in ("layers", "hidden", "heads")):
        return None
    want = _arch(model)
    hits = []
    for name, spec in PRESETS.items():
        have = _arch({k: getattr(spec, k) for k in (*_ARCH, "kv_channels", "moe_layer_freq", "moe_first_dense_layers")})
        if ignore_vocab:
            have["vocab"] = want["vocab"]
        if have == want:
            hits.append(name)
    return hits[0] if len(hits) == 1 or (hits and not ignore_vocab) else None


def complete_vocab(draft: Draft) -> None:
    """A source that leaves the vocabulary to its tokenizer file: take it from the one preset whose
    architecture matches every other field (said in a comment and a warning), else ask for it."""
    if draft.model.get("vocab") is not None:
        return
    preset = matching_preset(draft.model, ignore_vocab=True)
    if preset is None:
        draft.note("the vocabulary size is not in the source (its tokenizer sets it): add `vocab = N` to the model "
                   "block", warn=True)
        return
    draft.model["vocab"] = PRESETS[preset].vocab
    draft.warnings.append(f"the vocabulary size is not in the source (its tokenizer sets it): took {preset}'s "
                          f"{PRESETS[preset].vocab}, the one preset with this architecture")


def explicit_model(model: dict) -> dict:
    """The fields of a non-preset model block worth writing: set, and not nemoc's default (ModelSpec's
    field defaults; query groups = heads, head dim = hidden / heads)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec) if f.default is not dataclasses.MISSING}
    defaults.update(query_groups=model.get("heads"), kv_channels=(model.get("hidden") or 0) // (model.get("heads") or 1))
    out = {}
    for k, v in model.items():
        if v is None or (k in defaults and k not in _REQUIRED and _same(v, defaults[k])):
            continue
        if k == "add_qkv_bias" and v and model.get("add_bias_linear"):
            out[k] = v  # GPT-3 style: both biases, as the presets spell it
            continue
        out[k] = v
    return out


_REQUIRED = ("layers", "hidden", "heads", "ffn_hidden", "vocab", "seq_length")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return b is not None and float(a) == float(b)
    return a == b


# ------------------------------------------------------------------------------------------ GPU

def infer_gpu(draft: Draft, gpu: str | None) -> None:
    """`cluster.gpu`: the `--gpu` option, else a catalog id in the file name (`..._h100_...`), else H100
    with a warning: no launch script or config names its accelerator."""
    if gpu:
        if get_gpu(gpu) is None:
            raise ValueError(f"--gpu {gpu}: not an accelerator in the catalog (A100-80GB, H100, H200, B200, GB200, ...)")
        draft.cluster["gpu"] = Word(get_gpu(gpu).id)
        return
    stem = re.split(r"[/\\]", draft.path)[-1].lower()
    for token in sorted(re.split(r"[^a-z0-9]+", stem), key=len, reverse=True):
        hit = get_gpu(token) if re.fullmatch(r"(gb|[abh])\d{3}", token) else None
        if hit is not None:
            draft.cluster["gpu"] = Word(hit.id)
            draft.comments[("cluster", "gpu")] = f"from the file name ({token})"
            return
    draft.cluster["gpu"] = Word("H100")
    draft.comments[("cluster", "gpu")] = "ASSUMED: the source names no accelerator; set yours (or import with --gpu)"
    draft.warnings.append("the source names no accelerator: assumed gpu = H100 (import with --gpu ID to set it)")


# ----------------------------------------------------------------------------------------- emit

def emit(draft: Draft) -> str:
    """Canonical `.nemo` text of `draft` (through the project's formatter)."""
    complete_vocab(draft)
    _reconcile(draft)
    if "nodes" not in draft.cluster and "gpus_per_node" not in draft.cluster:
        draft.note("the source names no world size: the cluster is nemoc's default, 1 node x 8 GPUs; set yours",
                   warn=True)
    lines = [f"# Imported by `nemoc import` from {draft.source}: {_one_line(draft.path)}"]
    lines += [f"# {_one_line(n)}" for n in draft.notes]
    if draft.dropped:
        lines.append("#")
        lines.append(f"# Not carried over ({len(draft.dropped)} settings of the source with no nemoc field here):")
        lines += [f"#   {_one_line(d)}" for d in draft.dropped]
    lines.append("")
    lines.append(f"experiment {draft.name} {{")
    cluster = {k: draft.cluster[k] for k in ("gpu", "nodes", "gpus_per_node") if k in draft.cluster}
    lines += _block("cluster", None, cluster | draft.cluster, draft, 1)
    preset = matching_preset(draft.model)
    if preset:
        overrides = {"seq_length": draft.model["seq_length"]} if draft.model.get("seq_length") != PRESETS[preset].seq_length else {}
        draft.comments.setdefault(("model", None), f"the source's architecture is exactly the {preset} preset")
        lines += _block("model", preset, overrides, draft, 1, key="model")
    else:
        missing = [k for k in _REQUIRED if k != "vocab" and draft.model.get(k) is None]
        if missing:
            raise ValueError(f"the source gives no {', '.join(missing)} for the model")
        lines += _block("model", f"{draft.name}_model", explicit_model(draft.model), draft, 1, key="model")
    lines += _block("parallel", None, draft.parallel, draft, 1)
    for k, v in draft.top.items():
        lines.append(f"  {k} = {value_text(v)}" + _trailing(draft, "top", k))
    for name, values in draft.data:
        lines += _block("data", name, values, draft, 1, key=f"data.{name}")
    stage = dict(draft.stage)
    head = f"stage {draft.stage_name}"
    lines.append(f"  {head} {{")
    for k, v in stage.items():
        if v is None:
            continue
        lines.append(f"    {k} = {value_text(v)}" + _trailing(draft, "stage", k))
    if draft.checkpoint:
        lines += _block("checkpoint", None, draft.checkpoint, draft, 2)
    lines.append("  }")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    return format_module(parse(text, "<import>"), text)


def _reconcile(draft: Draft) -> None:
    """What the source states but Megatron or nemoc would refuse, adjusted the way the error's own hint
    says, each with a warning: a launch on fewer GPUs than one model replica (scripts that say "change
    for multinode config") gets the fewest nodes that hold one; `virtual_pipeline = 1` is left out at
    pipeline size 1 (nothing to interleave); fp8 in a stage nemoc runs on the local spec becomes bf16."""
    p, c = draft.parallel, draft.cluster
    sizes = [p.get("tensor", 1), p.get("pipeline", 1), p.get("context", 1), c.get("gpus_per_node", 8), c.get("nodes", 1)]
    # a size of 0 or -1 (or one no cluster has) is left as written, for `nemoc check` to refuse at its line
    if all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 10**9 for x in sizes):
        _whole_replicas(draft, sizes[0] * sizes[1] * sizes[2], gpn=sizes[3], nodes=sizes[4])
    if p.get("pipeline", 1) == 1 and p.get("virtual_pipeline") == 1:
        del p["virtual_pipeline"]
    _reconcile_precision(draft)


def _whole_replicas(draft: Draft, replica: int, *, gpn: int, nodes: int) -> None:
    if (nodes * gpn) % replica:
        step = replica // math.gcd(gpn, replica)  # the node counts whose GPUs hold whole replicas
        fixed = -(-nodes // step) * step
        draft.cluster["nodes"] = fixed
        draft.comments[("cluster", "nodes")] = f"the source launches {nodes}; tp x pp x cp = {replica} GPUs need {fixed}"
        draft.warnings.append(f"the source launches {nodes} node(s) x {gpn} GPUs, fewer than one model replica "
                              f"(tp x pp x cp = {replica} GPUs): set nodes = {fixed}")


def _reconcile_precision(draft: Draft) -> None:
    if draft.stage_name != "pretrain" and str(draft.top.get("precision")) in ("fp8", "mxfp8"):
        was = draft.top["precision"]
        draft.top["precision"] = Word("bf16")
        draft.comments[("top", "precision")] = f"the source trains in {was}; nemoc runs {draft.stage_name} stages without fp8"
        draft.warnings.append(f"precision {was}: nemoc's {draft.stage_name} stages build Megatron-Core's local spec "
                              "(no Transformer Engine, no fp8): imported as bf16")


def _trailing(draft: Draft, block: str, key) -> str:
    c = draft.comments.get((block, key))
    return f"  # {_one_line(c)}" if c else ""


def _one_line(text: str) -> str:
    """Comment text: a value from the source may span lines (a quoted multi-line shell word)."""
    return " ".join(str(text).split())


def _block(kind: str, name, values: dict, draft: Draft, depth: int, key: str | None = None) -> list[str]:
    key = key or kind
    pad = "  " * depth
    head = f"{kind} {name}" if name else kind
    out = [f"{pad}{head} {{" + _trailing(draft, key, None)]
    out += [f"{pad}  {k} = {value_text(v)}" + _trailing(draft, key, k) for k, v in values.items() if v is not None]
    return out + [f"{pad}}}"]
