"""Dense layers in a mixture-of-experts model (Megatron-Core 0.16.1 `moe_layer_freq`; nemoc's
`moe_first_dense_layers` for a dense prefix): the per-layer pattern must have one entry per layer (E202) and at
least one expert layer (E203), the dense prefix must agree with a written pattern (E205); an integer frequency
above the layer count leaves layer 0 the only expert layer (W121). On a dense model either field is E171
(`moe.rule_moe_settings_dense`).

`get_gpt_decoder_layer_specs` (models/gpt/gpt_layer_specs.py) turns the field into one layer spec per layer:
an int N gives `1 if i % N == 0 else 0`, a list is taken as it is (its length asserted equal to num_layers, every
entry 0 or 1, else "Invalid layer pattern").
"""

from __future__ import annotations

from nemoc.compiler.rules.base import Env, Sizes, Violation
from nemoc.dsl.diagnostics import Severity

_SPECS = "megatron/core/models/gpt/gpt_layer_specs.py get_gpt_decoder_layer_specs"


def _shown(freq: int | tuple[int, ...]) -> str:
    if isinstance(freq, int):
        return str(freq)
    return "[" + ", ".join(str(v) for v in freq[:8]) + (", ..." if len(freq) > 8 else "") + "]"


def rule_moe_layer_freq_length(env: Env, s: Sizes) -> Violation | None:
    """A list pattern has one entry per layer (Megatron asserts `len(moe_layer_pattern) == num_layers`)."""
    m = env.model
    if not m.is_moe or isinstance(m.moe_layer_freq, int) or len(m.moe_layer_freq) == m.layers:
        return None
    n = len(m.moe_layer_freq)
    return Violation(
        "E202", "moe_layer_freq must give one entry per layer",
        f"len(moe_layer_freq) = {n} != layers({m.layers})",
        f"give {m.layers} entries of 0 (dense) / 1 (expert layer), or an integer N (every N-th layer an expert "
        "layer); for a dense prefix write `moe_first_dense_layers = K`",
        anchors=("model.moe_layer_freq", "model.layers", "model"),
        source=_SPECS + " (assert len(moe_layer_pattern) == config.num_layers)")


def rule_moe_layer_some_expert(env: Env, s: Sizes) -> Violation | None:
    """At least one expert layer: a MoE model whose every layer is dense builds experts nobody routes to (and
    nemoc would size expert parallelism for none); write `experts = 0` for a dense model."""
    m = env.model
    if not m.is_moe or m.moe_layer_count > 0 or (not isinstance(m.moe_layer_freq, int)
                                                 and len(m.moe_layer_freq) != m.layers):
        return None
    if m.moe_first_dense_layers >= m.layers:
        why = f"moe_first_dense_layers({m.moe_first_dense_layers}) >= layers({m.layers})"
    elif m.moe_first_dense_layers:
        why = (f"moe_layer_freq = {_shown(m.moe_layer_freq)} after moe_first_dense_layers({m.moe_first_dense_layers}) "
               "leaves no expert layer")
    else:
        why = f"moe_layer_freq = {_shown(m.moe_layer_freq)} has no 1"
    return Violation(
        "E203", "a MoE model needs at least one expert layer",
        f"{why}: every layer is dense, with experts = {m.experts}",
        "mark an expert layer (a 1 in moe_layer_freq, fewer moe_first_dense_layers), or set experts = 0 for a "
        "dense model",
        anchors=("model.moe_first_dense_layers", "model.moe_layer_freq", "model.experts", "model"),
        source=_SPECS + " (a layer spec per entry: 1 the MoE spec, 0 the dense one)")


def rule_moe_first_dense_contradicts(env: Env, s: Sizes) -> Violation | None:
    """`moe_first_dense_layers = K` with a written list: the list's first K entries must be 0 (the two say the
    same thing, or the list would be silently overridden)."""
    m = env.model
    k = m.moe_first_dense_layers
    if not m.is_moe or not k or isinstance(m.moe_layer_freq, int):
        return None
    experts = [i for i, v in enumerate(m.moe_layer_freq[:k]) if v]
    if not experts:
        return None
    return Violation(
        "E205", "moe_first_dense_layers contradicts moe_layer_freq",
        f"moe_first_dense_layers = {k} but moe_layer_freq[{experts[0]}] = 1 (layer {experts[0]} an expert layer)",
        f"write 0 for the first {k} entries of moe_layer_freq, or drop one of the two fields",
        anchors=("model.moe_first_dense_layers", "model.moe_layer_freq", "model"),
        source="nemoc: moe_first_dense_layers is the first entries of Megatron-Core's moe_layer_freq list")


def warn_moe_layer_freq_beyond_layers(env: Env, s: Sizes) -> Violation | None:
    """An integer frequency of at least the layer count makes layer 0 the only expert layer (`i % N == 0`)."""
    m = env.model
    if not m.is_moe or not isinstance(m.moe_layer_freq, int) or m.moe_layer_freq < max(m.layers, 2):
        return None
    return Violation(
        "W121", "moe_layer_freq leaves one expert layer",
        f"moe_layer_freq({m.moe_layer_freq}) >= layers({m.layers}): only layer 0 is an expert layer",
        "an integer N makes layers 0, N, 2N, ... expert layers: use a smaller N or a list",
        anchors=("model.moe_layer_freq", "model"), severity=Severity.WARNING,
        source=_SPECS + " (1 if i % moe_layer_freq == 0)")
