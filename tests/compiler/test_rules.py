"""Layout rules: each rule fires exactly on the condition Megatron-Core 0.16.1 checks, with the whole
equation, and is silent otherwise; the pipeline split is checked against an independent
re-implementation of Megatron's own "Uneven PP" validation."""

from __future__ import annotations

import glob
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nemoc.compiler import rules
from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.rules import Env, Sizes, check_spec, layout_violations, padded_vocab, pipeline_split
from nemoc.compiler.spec import ClusterSpec, ExperimentSpec, ModelSpec, ParallelSpec, StageSpec
from nemoc.dsl.diagnostics import Severity, Span
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

LLAMA8B = get_preset("llama3_8b")
MIXTRAL = get_preset("mixtral_8x7b")
H100x2 = ClusterSpec(gpu="H100", nodes=2, gpus_per_node=8)


def env(model=LLAMA8B, cluster=H100x2, **kw) -> Env:
    arch, precisions = rules.gpu_facts(cluster.gpu)
    return Env(model=model, cluster=cluster, gpu_arch=arch, gpu_precisions=precisions, **{"target": NEMOC_RUNTIME, **kw})


def codes(e: Env, s: Sizes) -> set[str]:
    return {v.code for v in rules.violations(e, s)}


VALID = Sizes(tp=4, pp=2, cp=1, dp=2, micro_batch=1, global_batch=64, sequence_parallel=True, seq_length=8192)


def test_a_valid_layout_breaks_no_error_rule():
    assert layout_violations(env(), VALID) is None


@pytest.mark.parametrize("change, code, equation", [
    (dict(dp=3), "E101", "tp(4) * pp(2) * cp(1) * dp(3) = 24 != world size 16 (2 nodes x 8 GPUs)"),
    (dict(tp=3, dp=None), "E102", "heads(32) % tp(3) = 2 != 0"),
    (dict(tp=16, pp=1, dp=1), "E103", None),  # 8 groups vs tp 16 is fine (tp % groups == 0)
    (dict(pp=64, dp=None, tp=1), "E105", "layers(32) < pp(64) * vp(1) = 64"),
    (dict(vp=2, pp=1, dp=4), "E106", "virtual_pipeline(2) > 1 requires pp(1) > 1"),
    (dict(vp=2, micro_batch=4, global_batch=24, dp=2), "E108", None),
    (dict(tp=1, dp=8), "E109", "sequence_parallel = true requires tp(1) > 1"),
    (dict(global_batch=63), "E111", "global_batch(63) % (micro_batch(1) * dp(2) = 2) = 1 != 0"),
    (dict(cp=2, dp=1, seq_length=8190), "E112", "seq_length(8190) % (2 * cp(2)) = 2 != 0"),
    (dict(ep=2), "E114", "expert(2) > 1 but model.experts = 0"),
    (dict(seq_length=16384), "E122", "seq_length(16384) > model.seq_length(8192) (max_position_embeddings)"),
])
def test_each_rule_shows_its_equation(change, code, equation):
    s = replace(VALID, **change)
    found = {v.code: v for v in rules.violations(env(), s)}
    if equation is None and code == "E103":
        assert "E103" not in found  # Megatron 0.16.1 accepts tp a multiple of the query groups
        return
    assert code in found, found
    if equation:
        assert found[code].equation == equation


def test_query_groups_neither_divides():
    m = replace(LLAMA8B, query_groups=6, heads=24, ffn_hidden=12288)
    v = rules.rule_query_groups_tp(env(m), Sizes(tp=4))
    assert v is not None and v.equation == "query_groups(6) % tp(4) = 2 != 0 and tp(4) % query_groups(6) = 4 != 0"


def test_ffn_rule_uses_the_shared_expert_for_moe_and_head_dim_rule():
    moe = env(replace(MIXTRAL, shared_expert_ffn_hidden=1000))
    assert rules.rule_ffn_tp(moe, Sizes(tp=8)) is None
    assert rules.rule_ffn_tp(moe, Sizes(tp=16)).equation == "shared_expert_ffn_hidden(1000) % tp(16) = 8 != 0"
    assert rules.rule_ffn_tp(env(MIXTRAL), Sizes(tp=3)) is None  # routed experts are split by etp (E118)
    odd = env(replace(LLAMA8B, hidden=4100))
    assert rules.rule_head_dim(odd, VALID).equation == "hidden(4100) % heads(32) = 4 != 0"
    assert rules.rule_head_dim(env(replace(LLAMA8B, hidden=4100, kv_channels=128)), VALID) is None


def test_interleaved_microbatches_mirror_schedules_py():
    e = env()
    # M = 64 / (1 * 2) = 32 microbatches, pp = 2: 32 % 2 == 0 -> fine; pp = 4 with M = 6 -> 6 % 4 = 2
    assert rules.rule_interleave_microbatches(e, replace(VALID, vp=2)) is None
    bad = Sizes(tp=1, pp=4, vp=2, cp=1, dp=4, micro_batch=1, global_batch=24, seq_length=8192)
    v = rules.rule_interleave_microbatches(e, bad)
    assert v.code == "E108" and "6 % pp(4) = 2 != 0" in v.equation
    few = replace(bad, global_batch=8)
    assert "= 2 < pp(4)" in rules.rule_interleave_microbatches(e, few).equation


def test_sequence_parallel_needs_the_local_sequence_divisible_by_tp():
    v = rules.rule_sequence_parallel_split(env(), replace(VALID, tp=8, cp=4, dp=None, seq_length=8200))
    assert v.code == "E110" and v.equation == "(seq_length(8200) / cp(4) = 2050) % tp(8) = 2 != 0"


def test_context_parallel_needs_an_attention_core_that_splits_sequences():
    """E113 reads the target: TE's flash / fused cores and the nemoc runtime's SDPA core (the local spec's
    auto / flash / fused, so the CPU's) split sequences; Megatron's and TE's unfused cores do not; bare
    Megatron-Core (MEGATRON_CORE) builds its unfused DotProductAttention on the local spec."""
    from nemoc.compiler.target import MEGATRON_CORE

    cpu = ClusterSpec(gpu="CPU", nodes=1, gpus_per_node=4)
    cp2 = Sizes(tp=1, pp=1, cp=2, dp=2, seq_length=64)
    for backend in ("auto", "flash", "fused"):
        for kind in ("pretrain", "sft", "dpo"):
            assert "E113" not in codes(env(cluster=cpu, kernels="local", attention_backend=backend, stage_kind=kind), cp2)
        assert "E113" not in codes(env(attention_backend=backend, kernels="local"), replace(VALID, cp=2, dp=1))
    cpu_unfused = rules.rule_context_backend(env(cluster=cpu, kernels="local", attention_backend="unfused"), cp2)
    assert cpu_unfused.code == "E113" and "Megatron-Core's unfused DotProductAttention" in cpu_unfused.equation
    assert cpu_unfused.hint == "set attention_backend = auto, flash or fused"
    assert cpu_unfused.anchors[:2] == ("parallel.context", "attention_backend")
    assert "E113" in codes(env(attention_backend="unfused"), replace(VALID, cp=2, dp=1))
    assert "E113" not in codes(env(attention_backend="flash"), replace(VALID, cp=2, dp=1))
    bare = rules.rule_context_backend(env(cluster=cpu, kernels="local", target=MEGATRON_CORE), cp2)
    assert bare.code == "E113" and bare.hint == "set context = 1" and bare.anchors[1] == "kernels"
    bare_gpu = rules.rule_context_backend(env(kernels="local", target=MEGATRON_CORE), replace(VALID, cp=2, dp=1))
    assert bare_gpu.hint == "set context = 1, or kernels = te where Transformer Engine is installed"
    # a stage kind the target never runs context-parallel is E126's alone
    assert rules.rule_context_backend(env(cluster=cpu, kernels="local", stage_kind="export"), cp2) is None


def test_context_parallel_refuses_sliding_windows_on_the_sdpa_core():
    """runtime/model.py SDPAttention refuses a sliding window at cp > 1: E113 says so before the run."""
    cpu = ClusterSpec(gpu="CPU", nodes=1, gpus_per_node=4)
    windowed = replace(LLAMA8B, name="windowed", sliding_window=16, full_attention_every=2)
    v = rules.rule_context_backend(env(windowed, cluster=cpu, kernels="local"), Sizes(tp=1, pp=1, cp=2, dp=2,
                                                                                         seq_length=64))
    assert v.code == "E113" and "sliding-window layers (16 tokens)" in v.equation and v.hint == "set context = 1"
    assert rules.rule_context_backend(env(windowed, cluster=cpu, kernels="local"), Sizes(cp=1)) is None


def test_moe_rules():
    e = env(MIXTRAL, ClusterSpec(gpu="H100", nodes=4, gpus_per_node=8))
    base = Sizes(tp=2, pp=2, cp=1, dp=8, ep=8, etp=1, micro_batch=1, global_batch=64, sequence_parallel=True,
                 seq_length=4096)
    assert layout_violations(e, base) is None
    assert rules.rule_experts_ep(e, replace(base, ep=3)).equation == "experts(8) % ep(3) = 2 != 0"
    grid = rules.rule_expert_grid(e, replace(base, ep=8, etp=4, pp=2))
    assert grid.equation == "world size 32 % (etp(4) * ep(8) * pp(2) = 64) = 32 != 0"
    assert rules.rule_expert_grid(e, replace(base, etp=None, tp=2)) is None  # etp defaults to tp (2*8*2 = 32)
    bad_k = env(replace(MIXTRAL, top_k=9), e.cluster)
    assert rules.rule_top_k(bad_k, base).code == "E117"
    assert rules.rule_ep_fp16(env(MIXTRAL, e.cluster, precision="fp16"), base).code == "E119"
    no_sp = rules.rule_moe_tp_needs_sp(e, replace(base, sequence_parallel=False))
    assert no_sp.code == "E123" and no_sp.equation == "tp(2) > 1 with experts(8) and sequence_parallel = false"
    assert rules.rule_moe_tp_needs_sp(env(MIXTRAL, e.cluster, stage_kind="eval"), replace(base, sequence_parallel=False)) is None
    biased = env(replace(MIXTRAL, add_bias_linear=True), e.cluster)
    assert rules.rule_moe_bias_etp(biased, replace(base, etp=2)).code == "E120"
    assert rules.rule_moe_bias_etp(biased, base) is None


def test_precision_needs_the_right_generation():
    a100 = ClusterSpec(gpu="A100-80GB", nodes=1)
    assert rules.rule_precision_hardware(env(cluster=a100, precision="fp8"), VALID).code == "E121"
    assert rules.rule_precision_hardware(env(precision="fp8"), VALID) is None  # H100
    assert rules.rule_precision_hardware(env(precision="mxfp8"), VALID).code == "E121"
    assert rules.rule_precision_hardware(env(cluster=ClusterSpec(gpu="B200"), precision="mxfp8"), VALID) is None


def test_warnings_say_what_megatron_does():
    e = env()
    vocab = rules.warn_padded_vocab(e, Sizes(tp=8))
    assert vocab.severity is Severity.WARNING
    assert vocab.equation == "padded_vocab = ceil(vocab(128256) / (128 * tp(8))) * 1024 = 129024 (+768 rows)"
    assert rules.warn_tp_crosses_node(e, Sizes(tp=16)).equation == "tp(16) > gpus_per_node(8)"
    assert rules.warn_tp_crosses_node(e, Sizes(tp=8)) is None
    assert rules.warn_ep_without_sp(env(MIXTRAL, stage_kind="eval"), Sizes(tp=2, ep=2, sequence_parallel=False)).code == "W103"
    assert rules.warn_fp16_loss_scaling(env(precision="fp16"), VALID).code == "W105"
    uneven = rules.warn_uneven_pipeline(env(get_preset("llama31_405b")), Sizes(pp=16))
    assert "num_layers_in_first_pipeline_stage=7, num_layers_in_last_pipeline_stage=7" in uneven.equation
    nemo = rules.warn_uneven_pipeline(env(get_preset("llama31_405b")), Sizes(pp=8, vp=8))
    assert "account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True" in nemo.equation


def test_405b_with_pp8_vp8_counts_embedding_and_loss_like_nemo():
    """NeMo's Llama 3.1 405B recipe (PP 8, VP 8): 126 + embedding + loss = 128 = 8 x 8 x 2."""
    split = pipeline_split(126, 8, 8)
    assert split.params() == {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}
    assert split.stage_layers(8) == (15, 16, 15) and split.max_layers == 16
    e = env(get_preset("llama31_405b"), ClusterSpec(gpu="H100", nodes=16))
    assert layout_violations(e, Sizes(tp=8, pp=8, vp=8, cp=2, dp=1, seq_length=8192)) is None


@pytest.mark.parametrize("vocab, tp, padded", [(50257, 1, 50304), (50257, 8, 51200), (128256, 1, 128256),
                                               (128256, 8, 129024), (32000, 4, 32256)])
def test_padded_vocab_matches_megatron(vocab, tp, padded):
    assert padded_vocab(vocab, tp) == padded


# ------------------------------------------------------------------------------- pipeline split


def megatron_accepts(layers: int, pp: int, vp: int | None, first: int | None, last: int | None) -> bool:
    """Independent transcription of Megatron-Core 0.16.1's checks (transformer_config.py "Uneven PP"
    and transformer_block.py get_num_layers_to_build) for a given split."""
    if first is None and last is None:
        if layers % pp:
            return False
        return vp is None or pp == 1 or (layers // pp) % vp == 0
    rest, stages = layers, pp
    for n in (first, last):
        if n is not None:
            if n <= 0 or (vp is not None and n % vp):
                return False
            rest -= n
            stages -= 1
    if bool(rest) != bool(stages) or rest < 0:
        return False
    if stages and rest % stages:
        return False
    return not (stages and vp is not None and (rest // stages) % vp)


def megatron_accepts_accounted(layers: int, pp: int, vp: int | None, embedding: bool, loss: bool) -> bool:
    """Megatron-Core 0.16.1 with account_for_embedding/loss_in_pipeline_split (transformer_config.py
    __post_init__; get_num_layers_to_build), and nemoc's own stricter condition: the first / last
    model chunk keeps at least one transformer layer."""
    total = layers + embedding + loss
    if total % pp or (vp is not None and pp > 1 and (total // pp) % vp):
        return False
    return total // pp // (vp or 1) - max(embedding, loss) >= 1


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 140), st.integers(1, 40), st.sampled_from([None, 2, 3, 4]))
def test_pipeline_split_is_valid_and_optimal(layers, pp, vp):
    assume(pp > 1 or vp is None)  # interleaving with one stage is E106, not a split question
    split = pipeline_split(layers, pp, vp)
    uneven = range(1, layers + 1) if pp > 1 else ()  # with one stage, first and last are the same stage
    valid_splits = [(f, l) for f in [None, *uneven] for l in [None, *uneven]
                    if (f is None) == (l is None) and megatron_accepts(layers, pp, vp, f, l)]
    accounted = [(e, lo) for e, lo in ((True, True), (True, False), (False, True))
                 if pp > 1 and megatron_accepts_accounted(layers, pp, vp, e, lo)]
    if split is None:
        assert not valid_splits and not accounted
        return
    if split.embedding or split.loss:
        assert megatron_accepts_accounted(layers, pp, vp, split.embedding, split.loss)
        first, middle, last = split.stage_layers(pp)
        assert first + last + (pp - 2) * middle == layers
        assert all(split.max_layers < max(f or 0, l or 0, (layers - (f or 0) - (l or 0)) // max(1, pp - 2))
                   for f, l in valid_splits if f is not None)
        return
    assert megatron_accepts(layers, pp, vp, split.first, split.last)
    total = (split.first + split.last + (pp - 2) * split.per_stage) if not split.even else pp * split.per_stage
    assert total == layers

    def most_loaded(f, l):
        if f is None:
            return layers // pp
        middle = (layers - f - l) // (pp - 2) if pp > 2 else 0
        return max(f, l, middle)

    assert split.max_layers == min(most_loaded(f, l) for f, l in valid_splits)


def test_405b_on_16_stages_is_split_like_meta():
    split = pipeline_split(126, 16)
    assert (split.first, split.last, split.per_stage, split.max_layers) == (7, 7, 8, 8)


# -------------------------------------------------------------------------------------- check_spec


def _spec(**parallel) -> ExperimentSpec:
    span = Span("x.nemo", 5, 3, 5, 15)
    return ExperimentSpec(
        name="t", model=LLAMA8B, cluster=ClusterSpec(gpu="H100", nodes=1), parallel=ParallelSpec(**parallel),
        stages=(StageSpec(name="pretrain", kind="pretrain", global_batch=64, tokens=10**9),),
        spans={"parallel.tensor": span, "parallel": Span("x.nemo", 4, 1, 4, 9), "model": Span("x.nemo", 2, 1, 2, 6),
               "stage.pretrain": Span("x.nemo", 9, 1, 9, 6)},
    )


def test_check_spec_anchors_at_the_users_line():
    diags = check_spec(_spec(tensor=3), target=NEMOC_RUNTIME)
    e102 = next(d for d in diags if d.code == "E102")
    assert e102.span.line == 5 and e102.equation == "heads(32) % tp(3) = 2 != 0"
    assert check_spec(_spec(), target=NEMOC_RUNTIME) == () or not any(d.is_error for d in check_spec(_spec(), target=NEMOC_RUNTIME))


def test_stage_parallel_overrides_field_by_field_when_spans_say_so():
    spec = _spec(tensor=4)
    stage = replace(spec.stages[0], parallel=ParallelSpec(pipeline=2))
    spans = dict(spec.spans) | {"stage.pretrain.parallel.pipeline": Span("x.nemo", 10, 1, 10, 5)}
    spec = replace(spec, stages=(stage,), spans=spans)
    merged = rules.stage_parallel(spec, stage)
    assert (merged.tensor, merged.pipeline) == (4, 2)
    whole = rules.stage_parallel(replace(spec, spans={}), stage)
    assert (whole.tensor, whole.pipeline) == (None, 2)


def test_every_example_passes_the_rules():
    from nemoc.runtime.cli.common import load_spec

    for path in sorted(glob.glob("examples/*.nemo")):
        spec, _ = load_spec(path)
        errors = [d for d in check_spec(spec, target=NEMOC_RUNTIME) if d.is_error]
        assert not errors, (path, errors)


def test_every_rule_code_is_documented():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    source = "".join(p.read_text() for p in sorted((root / "compiler" / "rules").glob("*.py")))
    source += (root / "compiler" / "planner.py").read_text()
    documented = (root / "docs" / "planning.md").read_text()
    used = set(re.findall(r'"([EW]1\d\d)"', source))
    missing = sorted(c for c in used if c not in documented)
    assert used and not missing, missing


def test_the_code_table_names_the_rule_that_emits_each_code():
    """rules.CODES / STAGE_CODES: every registered rule has its code, and the code is the one it emits."""
    table = {**rules.CODES, **rules.STAGE_CODES}
    assert set(table.values()) == set(rules.RULES) | set(rules.STAGE_RULES) | {rules.rule_stage_count}
    assert len(table) == len(set(table.values()))  # one code per rule
    assert rules.CODES["E126"] is rules.rule_runtime_pipeline
    assert rules.CODES["E102"](env(), replace(VALID, tp=3)).code == "E102"


# ------------------------------------------------------- agreement with Megatron-Core 0.16.1 itself


@st.composite
def _megatron_cases(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    groups = draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0]))
    pp = draw(st.integers(1, 8))
    return dict(heads=heads, groups=groups, layers=draw(st.integers(1, 40)), tp=draw(st.integers(1, 16)), pp=pp,
                vp=draw(st.sampled_from([None, 2, 3])) if pp > 1 else None, sp=draw(st.booleans()))


@settings(max_examples=120, deadline=None)
@given(_megatron_cases())
def test_rules_agree_with_megatron_core(case):
    """Build Megatron-Core's own TransformerConfig (and ask get_num_layers_to_build for every stage)
    for random sizes: it raises exactly when our rules report E102 / E103 / E109, and for every
    layout our rules accept, it builds the split we recorded."""
    torch = pytest.importorskip("torch")
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    heads, groups, layers, tp, pp, vp, sp = (case[k] for k in ("heads", "groups", "layers", "tp", "pp", "vp", "sp"))
    model = ModelSpec(name="m", layers=layers, hidden=heads * 16, heads=heads, query_groups=groups,
                      ffn_hidden=tp * 32, vocab=1000, seq_length=64)
    sizes = Sizes(tp=tp, pp=pp, vp=vp, sequence_parallel=sp, seq_length=64)
    e = env(model, ClusterSpec(gpu="H100", nodes=1))
    ours = {v.code for v in rules.violations(e, sizes, rules.ERROR_RULES)} & {"E102", "E103", "E105", "E109"}
    split = pipeline_split(layers, pp, vp)
    kwargs = dict(num_layers=layers, hidden_size=heads * 16, num_attention_heads=heads, num_query_groups=groups,
                  ffn_hidden_size=tp * 32, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  virtual_pipeline_model_parallel_size=vp, sequence_parallel=sp, pipeline_dtype=torch.bfloat16)
    if split is not None:
        kwargs.update(split.params())
    try:
        config = TransformerConfig(**kwargs)
        per_stage = [sum(get_num_layers_to_build(config, vp_stage=v, pp_rank=r) for v in range(vp or 1))
                     for r in range(pp)]
        megatron_error = None
    except (ValueError, AssertionError) as err:
        megatron_error = err
    if ours & {"E102", "E103", "E109"}:
        assert megatron_error is not None, (ours, case)
        return
    if "E105" in ours:
        assert megatron_error is not None, case  # the even split Megatron would default to is rejected
        return
    assert megatron_error is None, (megatron_error, case)
    assert sum(per_stage) == layers and max(per_stage) == split.max_layers


@pytest.mark.parametrize("etp, bias, raises", [(1, True, False), (2, True, True), (2, False, False)])
def test_moe_bias_rule_agrees_with_megatron_core(etp, bias, raises):
    torch = pytest.importorskip("torch")
    from megatron.core.transformer.transformer_config import TransformerConfig

    model = replace(MIXTRAL, add_bias_linear=bias)
    ours = rules.rule_moe_bias_etp(env(model), Sizes(tp=2, etp=etp)) is not None
    try:
        TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2,
                          moe_ffn_hidden_size=64, add_bias_linear=bias, tensor_model_parallel_size=2,
                          expert_tensor_parallel_size=etp, sequence_parallel=True, pipeline_dtype=torch.bfloat16)
        megatron = False
    except (ValueError, AssertionError):
        megatron = True
    assert ours == megatron == raises


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 8))
def test_global_batch_rule_agrees_with_megatron_core(gb, mb, dp):
    from megatron.core.num_microbatches_calculator import ConstantNumMicroBatchesCalculator

    ours = rules.rule_global_batch(env(), Sizes(global_batch=gb, micro_batch=mb, dp=dp)) is not None
    try:
        ConstantNumMicroBatchesCalculator(gb, mb, dp, decrease_batch_size_if_needed=False, rank=1)
        megatron = False
    except AssertionError:
        megatron = True
    assert ours == megatron


def test_fixed_sizes_must_divide_the_world_even_with_others_auto():
    v = rules.rule_world_size(env(), Sizes(tp=3, pp=None))
    assert v.code == "E101" and v.equation == "world size 16 (2 nodes x 8 GPUs) % tp(3) = 1 != 0"
    v = rules.rule_world_size(env(), Sizes(tp=2, pp=None, cp=1, dp=3))
    assert v.equation == "world size 16 (2 nodes x 8 GPUs) % (tp(2) * dp(3) = 6) = 4 != 0"
    assert rules.rule_world_size(env(), Sizes(tp=4, pp=None, cp=2)) is None


@pytest.mark.parametrize("sizes, breaker", [
    (Sizes(tp=None, pp=3), "parallel.pipeline"),  # tensor = auto, pipeline = 3: pipeline breaks it
    (Sizes(tp=8, pp=None, cp=3), "parallel.context"),
    (Sizes(tp=2, pp=None, cp=1, dp=3), "parallel.data"),
    (Sizes(tp=8, pp=3, cp=1), "parallel.pipeline"),  # all fixed: tp 8 divides 16, tp * pp = 24 does not
    (Sizes(tp=3, pp=2, cp=1), "parallel.tensor"),
])
def test_e101_is_anchored_at_the_size_that_breaks_divisibility(sizes, breaker):
    v = rules.rule_world_size(env(), sizes)
    assert v.code == "E101" and v.anchors[0] == breaker


def test_e101_diagnostic_points_at_the_breaking_field(tmp_path):
    from nemoc.compiler.lower import compile_file

    src = tmp_path / "x.nemo"
    src.write_text("experiment x {\n  cluster {\n    gpu = H100\n    nodes = 2\n  }\n  model llama3_8b {}\n"
                   "  parallel {\n    tensor = auto\n    pipeline = 3\n  }\n"
                   '  data web {\n    path = "w.jsonl"\n  }\n  stage pretrain {\n    data = [web]\n    steps = 10\n  }\n}\n')
    spec, diags, _ = compile_file(str(src))
    assert not diags
    e101 = [d for d in check_spec(spec, target=NEMOC_RUNTIME) if d.code == "E101"]
    assert len(e101) == 1 and e101[0].span.line == 9, e101  # `pipeline = 3`, not `tensor = auto` on line 8


# ------------------------------------------------------------- what the nemoc runtime itself runs


@pytest.mark.parametrize("kind", ["export"])
def test_runtime_pipeline_rule_fires_for_kinds_the_runtime_runs_without_a_pipeline(kind):
    assert not NEMOC_RUNTIME.caps(kind).pipeline
    v = rules.rule_runtime_pipeline(env(stage_kind=kind), replace(VALID, pp=2))
    assert v.code == "E126" and v.anchors[0] == "parallel.pipeline"
    assert f"pp(2) > 1, but stage kind {kind} runs with pp(1)" in v.equation
    assert "pipeline = 1" in v.hint
    vp = rules.rule_runtime_pipeline(env(stage_kind=kind), replace(VALID, pp=1, dp=4, vp=2))
    assert vp.code == "E126" and vp.anchors[0] == "parallel.virtual_pipeline"
    assert rules.rule_runtime_pipeline(env(stage_kind=kind), replace(VALID, pp=1, dp=4)) is None
    assert rules.rule_runtime_pipeline(env(stage_kind=kind), replace(VALID, pp=None)) is None  # auto: the search's


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward", "kto", "orpo", "ppo", "grpo"])
def test_alignment_kinds_pipeline_with_virtual_stages(kind):
    """runtime/align builds a rank's virtual-pipeline chunks and runs the interleaved schedule (PPO's and
    GRPO's rollouts walk the chunks in the interleaved order: runtime/generation.py): pp > 1 and vp > 1 are
    both fine."""
    assert NEMOC_RUNTIME.caps(kind).pipeline and NEMOC_RUNTIME.caps(kind).virtual_pipeline
    assert rules.rule_runtime_pipeline(env(stage_kind=kind), replace(VALID, pp=2, vp=2)) is None


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_rl_kinds_split_their_rows_over_context_parallel_ranks(kind):
    """cp > 1 is fine for PPO and GRPO (the rollout decodes whole rows on every CP rank, the other passes
    split them), with a pipeline and virtual stages too."""
    assert NEMOC_RUNTIME.caps(kind).context_parallel
    assert rules.rule_runtime_pipeline(env(stage_kind=kind), replace(VALID, pp=2, cp=2)) is None
    assert rules.rule_runtime_pipeline(env(stage_kind=kind), replace(VALID, pp=2, vp=2, cp=2)) is None


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward", "kto", "orpo", "ppo", "grpo", "eval"])
def test_every_alignment_kind_runs_moe_models(kind):
    """E141 never fires for the nemoc runtime's kinds now: ppo and grpo keep an expert-parallel group's
    rollouts in step (runtime/generation.py), eval builds MoE models at the layout's expert parallelism
    (a target that builds a kind dense-only still refuses: test_megatron_differential.py)."""
    assert rules.rule_runtime_moe(env(MIXTRAL, stage_kind=kind), VALID) is None and NEMOC_RUNTIME.caps(kind).moe


def _eval_spec(*, own_sp: bool):
    """Pretraining then an eval stage at tensor = 2, `sequence_parallel = true` in the eval stage's own block
    (`own_sp`, anchored at line 14) or inherited from the experiment's."""
    line = Span("x.nemo", 14, 7, 14, 30)
    stages = (StageSpec(name="pretrain", kind="pretrain", global_batch=64, tokens=10**9),
              StageSpec(name="ev", kind="eval", after=("pretrain",), global_batch=8, steps=1,
                        parallel=ParallelSpec(tensor=2, sequence_parallel=True)))
    spans = {"parallel": Span("x.nemo", 4, 1, 4, 9), "model": Span("x.nemo", 2, 1, 2, 6),
             "stage.pretrain": Span("x.nemo", 9, 1, 9, 6), "stage.ev": Span("x.nemo", 12, 3, 12, 9),
             "stage.ev.parallel": Span("x.nemo", 13, 5, 13, 13), "stage.ev.parallel.sequence_parallel": line,
             "stage.ev.parallel.tensor": Span("x.nemo", 15, 7, 15, 17)}
    own = ExperimentSpec(name="t", model=LLAMA8B, cluster=ClusterSpec(gpu="H100", nodes=1), parallel=ParallelSpec(),
                         stages=stages, spans=spans)
    if own_sp:
        return own, line
    return replace(own, parallel=ParallelSpec(tensor=2, sequence_parallel=True),
                   stages=(stages[0], replace(stages[1], parallel=None)),
                   spans={k: v for k, v in spans.items() if not k.startswith("stage.ev.parallel")}), line


def test_eval_runs_sequence_parallelism_its_own_block_or_the_experiments_asks_for():
    """The nemoc runtime's eval decodes with sequence parallelism switched off (runtime/model.py
    `unsplit_sequence`) and runs its loss passes with it, so `sequence_parallel = true` is no error and the
    plan keeps it, from the stage's own block or the experiment's."""
    from nemoc.compiler.planner import plan_experiment

    assert NEMOC_RUNTIME.caps("eval").sequence_parallel
    assert rules.rule_runtime_pipeline(env(stage_kind="eval"), replace(VALID, sequence_parallel=True)) is None
    for own_sp in (True, False):
        spec, _ = _eval_spec(own_sp=own_sp)
        assert not [d for d in check_spec(spec, target=NEMOC_RUNTIME) if d.code == "E126"]
        layout = plan_experiment(spec, target=NEMOC_RUNTIME).plan.stage("ev").layout
        assert layout.tp == 2 and layout.sequence_parallel, layout


def test_a_target_that_keeps_whole_sequences_refuses_its_own_block_and_drops_an_inherited_one():
    """A target whose eval keeps whole sequences on every TP rank (`StageCaps.sequence_parallel = False`):
    `sequence_parallel = true` in the stage's own block is E126 at that line; the experiment's is dropped
    for the eval stage (its plan says sequence_parallel = false)."""
    from types import MappingProxyType

    from nemoc.compiler.planner import plan_experiment

    whole = replace(NEMOC_RUNTIME, name="whole-sequence-eval", stages=MappingProxyType(
        {**NEMOC_RUNTIME.stages, "eval": replace(NEMOC_RUNTIME.caps("eval"), sequence_parallel=False)}))
    v = rules.rule_runtime_pipeline(env(stage_kind="eval", target=whole), replace(VALID, sequence_parallel=True))
    assert v.code == "E126" and v.anchors == ("parallel.sequence_parallel",) and "sequence_parallel = true" in v.equation
    assert rules.rule_runtime_pipeline(env(stage_kind="sft", target=whole), replace(VALID, sequence_parallel=True)) is None
    own, line = _eval_spec(own_sp=True)
    errors = [d for d in check_spec(own, target=whole) if d.code == "E126"]
    assert len(errors) == 1 and errors[0].span == line and errors[0].hint, errors
    inherited, _ = _eval_spec(own_sp=False)
    assert not [d for d in check_spec(inherited, target=whole) if d.code == "E126"]
    layout = plan_experiment(inherited, target=whole).plan.stage("ev").layout
    assert layout.tp == 2 and not layout.sequence_parallel, layout


@pytest.mark.parametrize("kind", ["eval"])
def test_eval_pipelines_without_virtual_stages(kind):
    """Eval's generations decode with one model chunk per pipeline rank (PPO's and GRPO's rollouts walk a
    rank's chunks, runtime/generation.py; eval's runner builds one): pp > 1 is fine, vp > 1 is E126."""
    assert NEMOC_RUNTIME.caps(kind).pipeline and not NEMOC_RUNTIME.caps(kind).virtual_pipeline
    base = VALID
    assert rules.rule_runtime_pipeline(env(stage_kind=kind), replace(base, pp=2)) is None
    v = rules.rule_runtime_pipeline(env(stage_kind=kind), replace(base, pp=2, vp=2))
    assert v.code == "E126" and v.anchors[0] == "parallel.virtual_pipeline"
    assert "cannot run virtual pipeline stages" in v.message and "vp(2) > 1" in v.equation


def test_alignment_kinds_split_rows_of_one_sample_over_context_parallel_ranks():
    """runtime/align shards whole rows over CP ranks (common.on_this_cp_rank); rows packed with several
    samples (sft pack = true) need TE's THD attention with CP: E126 at the stage's `context`."""
    assert rules.rule_runtime_pipeline(env(stage_kind="dpo"), replace(VALID, cp=2)) is None
    assert rules.rule_runtime_pipeline(env(stage_kind="sft"), replace(VALID, cp=2)) is None  # pack = false
    v = rules.rule_runtime_pipeline(replace(env(stage_kind="sft"), packed=True), replace(VALID, cp=2))
    assert v.code == "E126" and v.anchors[0] == "parallel.context"
    assert "cp(2) > 1 with pack = true" in v.equation and "pack = false" in v.hint
    assert rules.rule_runtime_pipeline(replace(env(stage_kind="sft"), packed=True), replace(VALID, cp=1)) is None
    assert rules.rule_runtime_pipeline(replace(env(stage_kind="pretrain"), packed=True), replace(VALID, cp=2)) is None


def test_pretrain_may_pipeline_and_every_stage_kind_has_capabilities():
    from nemoc.dsl.schema import STAGE_KINDS

    assert set(NEMOC_RUNTIME.stages) == set(STAGE_KINDS)
    assert NEMOC_RUNTIME.caps("pretrain").pipeline
    assert rules.rule_runtime_pipeline(env(stage_kind="pretrain"), replace(VALID, vp=3)) is None


def _aligned_spec(kind: str, *, own: bool):
    """A pretrain stage and a `kind` stage; pipeline = 2 fixed in the stage's own block or the experiment's."""
    line = Span("x.nemo", 14, 7, 14, 19)
    pipelined = ParallelSpec(tensor=4, pipeline=2)
    stages = (StageSpec(name="pretrain", kind="pretrain", global_batch=64, tokens=10**9),
              StageSpec(name="align", kind=kind, after=("pretrain",), global_batch=64, steps=10,
                        parallel=pipelined if own else None))
    spans = {"parallel": Span("x.nemo", 4, 1, 4, 9), "model": Span("x.nemo", 2, 1, 2, 6),
             "stage.pretrain": Span("x.nemo", 9, 1, 9, 6), "stage.align": Span("x.nemo", 12, 3, 12, 9)}
    spans |= ({"stage.align.parallel": Span("x.nemo", 13, 5, 13, 13), "stage.align.parallel.pipeline": line,
               "stage.align.parallel.tensor": Span("x.nemo", 15, 7, 15, 17)} if own
              else {"parallel.pipeline": line, "parallel.tensor": Span("x.nemo", 15, 7, 15, 17)})
    return ExperimentSpec(name="t", model=LLAMA8B, cluster=ClusterSpec(gpu="H100", nodes=1),
                          parallel=ParallelSpec() if own else pipelined, stages=stages, spans=spans)


@pytest.mark.parametrize("kind", ["sft", "dpo", "eval", "export"])
@pytest.mark.parametrize("own", [True, False])
def test_a_fixed_pipeline_on_a_stage_the_runtime_runs_without_one_is_an_error_at_the_users_line(kind, own):
    errors = [d for d in check_spec(_aligned_spec(kind, own=own), target=NEMOC_RUNTIME) if d.code == "E126"]
    if kind != "export":  # sft, dpo and eval pipeline (one chunk per rank)
        assert not errors, errors
        return
    if not own:
        # export runs without a pipeline: an inherited pipeline is dropped, not an error
        assert not errors
        return
    assert len(errors) == 1, errors
    e = errors[0]
    assert e.is_error and e.span == Span("x.nemo", 14, 7, 14, 19)
    assert "one process" in e.message
    assert e.equation.startswith(f"pp(2) > 1, but stage kind {kind}") and e.hint


# ---------------------------------------------------- rules from the Megatron-Core 0.16.1 review


def test_query_groups_must_divide_the_heads():
    """attention.py reshapes by heads per group (and TE asserts heads % gqa groups): E134."""
    v = rules.rule_heads_query_groups(env(replace(LLAMA8B, query_groups=6)), Sizes())
    assert v.code == "E134" and v.equation == "heads(32) % query_groups(6) = 2 != 0"
    assert v.anchors[0] == "model.query_groups"
    assert rules.rule_heads_query_groups(env(replace(LLAMA8B, query_groups=64)), Sizes()).equation == \
        "query_groups(64) > heads(32)"
    assert rules.rule_heads_query_groups(env(), Sizes()) is None


def test_the_fused_qkv_projection_splits_over_tp():
    """ColumnParallelLinear divides head_dim x (heads + 2 groups) by tp: E139 (MQA, kv_channels 98, TP 8)."""
    mqa = env(replace(LLAMA8B, query_groups=1, kv_channels=98))
    v = rules.rule_qkv_split(mqa, Sizes(tp=8))
    assert v.code == "E139" and v.equation == "head_dim(98) * (heads(32) + 2 * query_groups(1)) = 3332; 3332 % tp(8) = 4 != 0"
    assert rules.rule_qkv_split(mqa, Sizes(tp=2)) is None and rules.rule_qkv_split(env(), Sizes(tp=8)) is None


def test_sgd_with_the_distributed_optimizer_is_an_error():
    sgd = env(optimizer="sgd")
    v = rules.rule_sgd_distributed_optimizer(sgd, replace(VALID, distributed_optimizer=True))
    assert v.code == "E129" and v.equation == "optimizer = sgd with distributed_optimizer = true"
    assert v.anchors[:2] == ("parallel.distributed_optimizer", "stage.optimizer")
    assert rules.rule_sgd_distributed_optimizer(sgd, replace(VALID, distributed_optimizer=None)) is None
    assert rules.rule_sgd_distributed_optimizer(sgd, replace(VALID, distributed_optimizer=False)) is None
    assert rules.rule_sgd_distributed_optimizer(env(), VALID) is None
    # alignment stages run Megatron's optimizer too (runtime/align/trainer.py)
    assert rules.rule_sgd_distributed_optimizer(env(optimizer="sgd", stage_kind="sft"), VALID).code == "E129"


@pytest.mark.parametrize("backend", ["auto", "flash", "fused"])
def test_fp32_has_no_transformer_engine_flash_or_fused_attention(backend):
    fp32 = env(precision="fp32", attention_backend=backend)
    v = rules.rule_fp32_attention(fp32, VALID)
    if backend == "auto":  # TE falls back to its unfused core: priced so (W111), an error only with cp > 1
        assert v is None and rules.warn_auto_attention_unfused(fp32, VALID).code == "W111"
    else:
        assert v.code == "E135" and "bf16 / fp16 only" in v.equation and "unfused" in v.hint
    with_cp = rules.rule_fp32_attention(fp32, replace(VALID, cp=2, dp=1))
    assert "cp(2) > 1 rules out TE's unfused core too" in with_cp.equation
    # the hint never sends the user to the unfused core with cp > 1 (E113 would refuse it)
    assert "attention_backend = unfused" not in with_cp.hint
    assert ("set context = 1" in with_cp.hint) == (backend == "auto")
    assert rules.rule_fp32_attention(env(precision="fp32", attention_backend="unfused"), VALID) is None
    assert rules.rule_fp32_attention(env(precision="bf16", attention_backend=backend), VALID) is None
    # without TE (local spec, the CPU, export) attention is torch SDPA, which runs fp32; alignment stages
    # build TE's layers like pretraining where the kernels are `te`
    assert rules.rule_fp32_attention(env(precision="fp32", attention_backend=backend, kernels="local"), VALID) is None
    assert rules.rule_fp32_attention(env(precision="fp32", attention_backend=backend, stage_kind="export"), VALID) is None
    sft = rules.rule_fp32_attention(env(precision="fp32", attention_backend=backend, stage_kind="sft"), VALID)
    assert (sft is not None) == (backend != "auto")
    cpu = ClusterSpec(gpu="CPU", nodes=1, gpus_per_node=2)
    assert rules.rule_fp32_attention(env(cluster=cpu, precision="fp32", attention_backend=backend,
                                         kernels="local"), VALID) is None


def test_fp32_unfused_context_parallel_hint_does_not_suggest_flash():
    v = rules.rule_context_backend(env(precision="fp32", attention_backend="unfused"), replace(VALID, cp=2, dp=1))
    assert v.code == "E113" and "no fp32 attention with context parallelism" in v.hint


def test_flash_attention_head_dim_limits():
    """TE: flash-attn needs head_dim <= 256 and % 8; cuDNN fused needs % 8 (auto too, or TE falls back
    to the unfused core the plan does not cost)."""
    big = replace(LLAMA8B, hidden=8192, heads=16, query_groups=8)  # head_dim 512
    v = rules.rule_attention_head_dim(env(big, attention_backend="flash"), VALID)
    assert v.code == "E136" and v.equation == "head_dim(512) > 256 with attention_backend(flash) and kernels te"
    assert rules.rule_attention_head_dim(env(big, attention_backend="auto"), VALID) is None
    assert rules.rule_attention_head_dim(env(big, attention_backend="fused"), VALID) is None
    odd = replace(LLAMA8B, kv_channels=100)
    for backend in ("flash", "fused"):
        v = rules.rule_attention_head_dim(env(odd, attention_backend=backend), VALID)
        assert v.code == "E136" and v.equation.startswith("head_dim(100) % 8 = 4 != 0")
    # auto: TE falls back to its unfused core (priced so, W111); with cp > 1 that core cannot run
    assert rules.rule_attention_head_dim(env(odd, attention_backend="auto"), VALID) is None
    assert rules.warn_auto_attention_unfused(env(odd, attention_backend="auto"), VALID).code == "W111"
    v = rules.rule_attention_head_dim(env(odd, attention_backend="auto"), replace(VALID, cp=2, dp=1))
    assert v.code == "E136" and "cp(2) > 1" in v.equation and "no context parallelism" in v.equation
    assert v.hint.startswith("set context = 1") and "unfused" not in v.hint
    big_cp = rules.rule_attention_head_dim(env(big, attention_backend="auto"), replace(VALID, cp=2, dp=1))
    assert big_cp.code == "E136" and "attention_backend = fused" in big_cp.hint


def test_attention_fallback_diagnostics_agree():
    """One cause, one diagnostic: with auto under TE, fp32 / head_dim % 8 / head_dim > 256 are a note
    (W111, priced unfused) at cp = 1 and one error at cp > 1 (E135 for fp32, else E136), never a
    note and an error together; W110 (selective recompute saves nothing) stays quiet where the core
    keeps its scores."""
    odd = replace(LLAMA8B, kv_channels=100)
    cp1, cp2 = VALID, replace(VALID, cp=2, dp=1)
    for model, precision, error in ((odd, "fp32", "E135"), (odd, "bf16", "E136"), (LLAMA8B, "fp32", "E135")):
        e = env(model, precision=precision, attention_backend="auto")
        at_cp1 = [r(e, cp1) for r in (rules.rule_fp32_attention, rules.rule_attention_head_dim,
                                      rules.warn_auto_attention_unfused)]
        at_cp2 = [r(e, cp2) for r in (rules.rule_fp32_attention, rules.rule_attention_head_dim,
                                      rules.warn_auto_attention_unfused)]
        assert [v.code for v in at_cp1 if v] == ["W111"], (model.head_dim, precision)
        assert [v.code for v in at_cp2 if v] == [error], (model.head_dim, precision)
    selective = replace(VALID, recompute="selective")
    assert rules.warn_selective_recompute_flash(env(precision="fp32", attention_backend="auto"), selective) is None
    assert rules.warn_selective_recompute_flash(env(attention_backend="auto"), selective).code == "W110"
    assert rules.rule_attention_head_dim(env(odd, attention_backend="unfused"), VALID) is None
    assert rules.rule_attention_head_dim(env(odd, attention_backend="flash", kernels="local"), VALID) is None


def test_auto_attention_beyond_flash_head_dim_is_planned_unfused():
    """head_dim > 256 with `auto` under TE: flash-attn cannot take it and cuDNN may not, so TE may run
    its unfused core: W111 says so and the search prices the unfused core (s x s scores kept)."""
    from nemoc.compiler.catalog.hardware import get_gpu
    from nemoc.compiler.search import Problem

    big = replace(LLAMA8B, hidden=8192, heads=16, query_groups=8)  # head_dim 512
    v = rules.warn_auto_attention_unfused(env(big, attention_backend="auto"), VALID)
    assert v.code == "W111" and v.equation.startswith("head_dim(512) > 256")
    assert rules.warn_auto_attention_unfused(env(LLAMA8B, attention_backend="auto"), VALID) is None
    assert rules.warn_auto_attention_unfused(env(big, attention_backend="fused"), VALID) is None
    assert rules.warn_auto_attention_unfused(env(big, attention_backend="auto", kernels="local"), VALID) is None

    def costed(model, kernels="te"):
        return Problem(model=model, cluster=ClusterSpec(gpu="H100", nodes=1, gpus_per_node=8), gpu=get_gpu("H100"),
                       fixed=ParallelSpec(), global_batch=64, seq_length=4096, attention_backend="auto",
                       kernels=kernels, target=NEMOC_RUNTIME).costed_backend

    assert costed(big) == "unfused"
    assert costed(LLAMA8B) == "flash"
    assert costed(big, kernels="local") == "flash"  # torch SDPA: no head-dim limit that materialises scores


def test_fp8_gemm_dimensions():
    """TE assert_dim_for_fp8_exec per TP rank (E137); the review's repro: ffn 14000 at TP 2 = 7000."""
    m = replace(LLAMA8B, ffn_hidden=14000)
    v = rules.rule_fp8_dims(env(m, precision="fp8"), replace(VALID, tp=2, dp=4))
    assert v.code == "E137" and v.equation == "(ffn_hidden(14000) / tp(2) = 7000) % 16 = 8 != 0"
    assert rules.rule_fp8_dims(env(m, precision="bf16"), replace(VALID, tp=2, dp=4)) is None
    assert rules.rule_fp8_dims(env(m, precision="fp8", kernels="local"), replace(VALID, tp=2, dp=4)) is None
    assert rules.rule_fp8_dims(env(precision="fp8"), VALID) is None  # Llama 3 8B at TP 4
    assert rules.rule_fp8_dims(env(m, precision="fp8"), Sizes()) is None  # tp auto: only hidden is known
    assert rules.rule_fp8_dims(env(replace(LLAMA8B, hidden=4104, kv_channels=128), precision="mxfp8"),
                               Sizes()).equation == "hidden(4104) % 16 = 8 != 0"
    mqa = replace(LLAMA8B, kv_channels=72, query_groups=1)  # heads x 72 / 8 = 288 is fine, the QKV rows are not
    rows = rules.rule_fp8_dims(env(mqa, precision="fp8"), replace(VALID, tp=8, dp=1))
    assert rows.equation == "(head_dim(72) * (heads(32) + 2 * query_groups(1)) / tp(8) = 306) % 8 = 2 != 0"
    proj = rules.rule_fp8_dims(env(replace(LLAMA8B, kv_channels=36), precision="fp8"), replace(VALID, tp=16, pp=1, dp=1))
    assert proj.equation.startswith("(heads(32) * head_dim(36) / tp(16) = 72) % 16 = 8 != 0; ")
    # MoE experts: moe_ffn_hidden / etp; an auto etp is fine when etp = 1 (or tp) works
    moe = replace(MIXTRAL, moe_ffn_hidden=14000)
    assert rules.rule_fp8_dims(env(moe, precision="fp8"), replace(VALID, tp=2, etp=None, dp=4)) is None
    v = rules.rule_fp8_dims(env(moe, precision="fp8"), replace(VALID, tp=2, etp=2, dp=4))
    assert v.equation == "(moe_ffn_hidden(14000) / etp(2) = 7000) % 16 = 8 != 0"


def test_fp8_tokens_per_gemm():
    """E138: micro_batch x seq / cp (/ tp with SP) % 8; the review's repro: 2052 / 2 = 1026 with SP."""
    s = replace(VALID, tp=2, dp=8, seq_length=2052, sequence_parallel=True)
    e = env(replace(LLAMA8B, seq_length=4096), precision="fp8")
    v = rules.rule_fp8_tokens(e, s)
    assert v.code == "E138"
    assert v.equation == "micro_batch(1) * seq_length(2052) / cp(1) / tp(2) (sequence parallel) = 1026; 1026 % 8 = 2 != 0"
    assert rules.rule_fp8_tokens(e, replace(s, micro_batch=4)) is None
    assert rules.rule_fp8_tokens(e, replace(s, sequence_parallel=False)) is not None  # 2052 % 8 = 4
    assert rules.rule_fp8_tokens(e, replace(s, micro_batch=None)) is None  # auto: the search decides
    assert rules.rule_fp8_tokens(env(precision="bf16"), s) is None


def test_auto_expert_tensor_is_not_assumed_to_be_tp():
    """E116 / E118 / E120 with expert_tensor auto: silent when ETP = 1 (or tp) satisfies the rule."""
    c8 = ClusterSpec(gpu="H100", nodes=1, gpus_per_node=8)
    grid = Sizes(tp=4, pp=1, ep=4, etp=None)
    assert rules.rule_expert_grid(env(MIXTRAL, c8), grid) is None
    assert rules.rule_expert_grid(env(MIXTRAL, c8), replace(grid, etp=4)).code == "E116"
    v = rules.rule_expert_grid(env(MIXTRAL, c8), Sizes(tp=1, pp=2, ep=8, etp=None))
    assert v.equation == "world size 8 % (etp(1, the smallest auto choice) * ep(8) * pp(2) = 16) = 8 != 0"
    odd = replace(MIXTRAL, moe_ffn_hidden=1004)
    assert rules.rule_moe_ffn_etp(env(odd, c8), Sizes(tp=8, etp=None)) is None
    assert rules.rule_moe_ffn_etp(env(odd, c8), Sizes(tp=8, etp=8)).equation == "moe_ffn_hidden(1004) % etp(8) = 4 != 0"
    biased = replace(MIXTRAL, add_bias_linear=True)
    assert rules.rule_moe_bias_etp(env(biased, c8), Sizes(tp=8, etp=None)) is None
    assert rules.rule_moe_bias_etp(env(biased, c8), Sizes(tp=8, etp=8)).code == "E120"


def test_moe_with_linear_biases_is_refused():
    v = rules.rule_moe_bias_runtime(env(replace(MIXTRAL, add_bias_linear=True)), Sizes())
    assert v.code == "E140" and v.anchors[0] == "model.add_bias_linear" and "add_bias_linear = false" in v.hint
    assert rules.rule_moe_bias_runtime(env(replace(LLAMA8B, add_bias_linear=True)), Sizes()) is None
    assert rules.rule_moe_bias_runtime(env(replace(MIXTRAL, add_qkv_bias=True)), Sizes()) is None


def test_selective_recompute_with_flash_class_attention_warns():
    s = replace(VALID, recompute="selective")
    for backend in ("auto", "flash", "fused"):
        v = rules.warn_selective_recompute_flash(env(attention_backend=backend), s)
        assert v.code == "W110" and v.severity is Severity.WARNING and "extra" not in v.message
    assert rules.warn_selective_recompute_flash(env(attention_backend="unfused"), s) is None
    assert rules.warn_selective_recompute_flash(env(kernels="local"), s) is None
    assert rules.warn_selective_recompute_flash(env(), replace(s, recompute="full")) is None


def test_fp16_loss_scale_note_matches_the_runtime():
    assert "initial 2**16" in rules.warn_fp16_loss_scaling(env(precision="fp16"), VALID).equation


def test_e105_says_when_only_an_empty_model_chunk_stands_in_the_way():
    """7 layers on PP 4 x VP 2: Megatron builds [[0, 1], [1, 1], [1, 1], [1, 1]] with the embedding
    counted as a layer; nemoc refuses the empty first chunk and says so (not just layers < pp x vp)."""
    v = rules.rule_layers_pipeline(env(replace(LLAMA8B, layers=7)), Sizes(pp=4, vp=2))
    assert v.code == "E105" and v.equation.startswith("layers(7) < pp(4) * vp(2) = 8; counting the embedding as layers")
    assert "0 transformer layers" in v.equation and "every model chunk" in v.hint
    plain = rules.rule_layers_pipeline(env(replace(LLAMA8B, layers=3)), Sizes(pp=8))
    assert plain.equation == "layers(3) < pp(8) * vp(1) = 8"


@pytest.mark.parametrize("kind, costed", [("pretrain", "flash"), ("sft", "flash"), ("dpo", "flash"),
                                          ("eval", "flash"), ("export", "unfused")])
def test_stages_are_costed_with_the_attention_core_the_runtime_builds(kind, costed):
    """runtime/align builds the plan's attention core for sft, dpo, reward, ppo and eval (core.build,
    packed rows as variable-length segments); export computes no attention and is priced unfused."""
    from nemoc.compiler.catalog.hardware import get_gpu
    from nemoc.compiler.search import Problem

    assert NEMOC_RUNTIME.stage_attention(kind, "flash") == costed
    p = Problem(model=LLAMA8B, cluster=ClusterSpec(gpu="H100", nodes=1, gpus_per_node=8), gpu=get_gpu("H100"),
                fixed=ParallelSpec(), global_batch=64, seq_length=4096, attention_backend="auto", stage_kind=kind, target=NEMOC_RUNTIME)
    assert p.costed_backend == costed


def test_an_fp8_experiment_evaluates_in_bf16():
    """eval runs on runtime/align's local spec (no FP8 GEMMs): planned and run in bf16, not refused."""
    t = NEMOC_RUNTIME
    assert t.stage_precision("eval", "fp8") == "bf16" and t.stage_precision("eval", "mxfp8") == "bf16"
    assert t.stage_precision("pretrain", "fp8") == "fp8" and t.stage_precision("eval", "fp32") == "fp32"


# ------------------------------------------------------------------------------ stage rules (E15x)

from tiny_experiment import TINY_CPU  # noqa: E402

_STAGE_EXPERIMENT = "experiment stages {\n" + TINY_CPU + """\
  data text {
    path = "t.jsonl"
    format = jsonl
  }
  data chat {
    path = "c.jsonl"
    format = chat
  }
  data prefs {
    path = "p.jsonl"
    format = preference
  }
STAGES
}
"""


def _stage_spec(tmp_path, stages: str):
    from nemoc.compiler.lower import compile_file

    path = tmp_path / "stages.nemo"
    path.write_text(_STAGE_EXPERIMENT.replace("STAGES", stages))
    spec, diags, _ = compile_file(str(path))
    assert spec is not None, diags
    return spec


def stage_codes(tmp_path, stages: str) -> list[tuple[str, str]]:
    return sorted((d.code, d.equation) for d in rules.stage_diagnostics(_stage_spec(tmp_path, stages)))


PRE = "  stage pre {\n    kind = pretrain\n    data = [text]\n    steps = 10\n    global_batch = 4\n  }\n"


@pytest.mark.parametrize("schedule, expected", [
    ("cosine(min_lr = 1e-3)", [("E150", "min_lr(0.001) > lr(0.0001)")]),
    ("cosine(min_lr = 1e-4)", []),  # equal: a constant tail, as Megatron allows
    ("linear(min_lr = 2e-4)", [("E150", "min_lr(0.0002) > lr(0.0001)")]),
])
def test_min_lr_above_lr_is_e150(tmp_path, schedule, expected):
    stage = PRE.replace("steps = 10", f"steps = 10\n    optimizer = adam(lr = 1e-4)\n    schedule = {schedule}")
    assert stage_codes(tmp_path, stage) == expected


@pytest.mark.parametrize("kind, data, bad", [
    ("sft", "[chat]", False), ("sft", "[text, chat]", False), ("sft", "[prefs]", True), ("sft", "[text]", True),
    ("dpo", "[prefs]", False), ("dpo", "[chat]", True), ("reward", "[text]", True), ("reward", "[prefs]", False),
    ("ppo", "[chat]", False), ("ppo", "[text]", True), ("eval", "[text]", False), ("pretrain", "[text]", False),
])
def test_alignment_data_formats_are_e151(tmp_path, kind, data, bad):
    after = " after pre" if kind != "pretrain" else ""
    extra = "  stage rm after pre {\n    kind = reward\n    data = [prefs]\n    steps = 5\n    global_batch = 4\n  }\n"
    stage = f"  stage s{after}{', rm' if kind == 'ppo' else ''} {{\n    kind = {kind}\n    data = {data}\n" \
            f"    steps = 5\n    global_batch = 4\n  }}\n"
    codes = [c for c, _ in stage_codes(tmp_path, PRE + (extra if kind == "ppo" else "") + stage)]
    assert codes == (["E151"] if bad else [])


def test_export_without_after_is_e152(tmp_path):
    assert stage_codes(tmp_path, PRE + "  stage out {\n    kind = export\n  }\n") == [("E152", "after = []")]
    assert stage_codes(tmp_path, PRE + "  stage out after pre {\n    kind = export\n  }\n") == []


@pytest.mark.parametrize("parents, kind, bad", [
    ("pre", "sft", True), ("pre, keep", "sft", False), ("pre", "export", True), ("pre", "eval", True),
    ("keep", "sft", False),
])
def test_a_stage_after_parents_that_save_no_checkpoint_is_e153(tmp_path, parents, kind, bad):
    pre = PRE.replace("steps = 10", "steps = 10\n    save_checkpoints = false")
    keep = PRE.replace("stage pre", "stage keep")
    data = {"sft": "    data = [chat]\n    steps = 5\n    global_batch = 4\n", "export": "", "eval": "    data = [text]\n"}[kind]
    stage = f"  stage s after {parents} {{\n    kind = {kind}\n{data}  }}\n"
    codes = stage_codes(tmp_path, pre + keep + stage)
    assert codes == ([("E153", "pre.save_checkpoints = false")] if bad else [])


@pytest.mark.parametrize("length, warmup, warned", [
    ("steps = 6", 100, True), ("steps = 100", 100, False), ("steps = 99", 100, True),
    ("tokens = 1536", 7, True),  # 1536 / (4 x 64) = 6 steps
    ("tokens = 1536", 6, False), ("epochs = 1\n    samples = 10", 100, False),  # steps unknown here: silent
])
def test_a_warmup_longer_than_the_stage_is_w150(tmp_path, length, warmup, warned):
    stage = PRE.replace("steps = 10", f"{length}\n    schedule = cosine(warmup = {warmup})")
    codes = stage_codes(tmp_path, stage)
    assert [c for c, _ in codes] == (["W150"] if warned else [])


def test_more_stages_than_any_experiment_has_is_e154_before_any_search(tmp_path):
    from nemoc.compiler.planner import plan_experiment
    from nemoc.dsl.diagnostics import DiagnosticError

    chain = "".join(PRE.replace("stage pre", f"stage s{i}" + (f" after s{i - 1}" if i else ""))
                    for i in range(rules.MAX_STAGES + 1))
    assert stage_codes(tmp_path, chain) == [("E154", f"stages({rules.MAX_STAGES + 1}) > {rules.MAX_STAGES}")]
    spec = _stage_spec(tmp_path, chain)
    assert [d.code for d in check_spec(spec)] == ["E154"]
    assert check_spec(spec)[0].span == spec.span(f"stage.s{rules.MAX_STAGES}")  # the first stage over the limit
    with pytest.raises(DiagnosticError):
        plan_experiment(spec)
    at_limit = "".join(PRE.replace("stage pre", f"stage s{i}") for i in range(rules.MAX_STAGES))
    assert stage_codes(tmp_path, at_limit) == []
