"""MoE performance settings (`moe_dispatcher`, `moe_grouped_gemm`, `moe_permute_fusion`): the defaults
the plan takes and says, their cost terms, their memory, and the rules that refuse them at the user's
line (E171 on a dense model, E172 on the local layer spec)."""

from __future__ import annotations

import dataclasses

import pytest

from nemoc.compiler.catalog import get_gpu
from nemoc.compiler.cost import (DEFAULT_PARAMS, MOE_UNFUSED_PERMUTE_BYTES, TE_KERNELS_PER_LAYER, MOE_EXPERT_KERNELS,
                                 gemm_time, layer_times, moe_max_load)
from nemoc.compiler.execution import moe_defaults_taken, moe_execution
from nemoc.compiler.lower import compile_file
from nemoc.compiler import memory
from nemoc.compiler.plan import Layout, MoeExecution
from nemoc.compiler.planner import plan_experiment
from nemoc.compiler.spec import ModelSpec
from nemoc.dsl.diagnostics import DiagnosticError, Severity

MOE = ModelSpec(name="moe", layers=8, hidden=2048, heads=16, query_groups=4, ffn_hidden=5632, vocab=32000,
                seq_length=4096, experts=16, top_k=2, moe_ffn_hidden=1408)
DENSE = dataclasses.replace(MOE, experts=0, top_k=0, moe_ffn_hidden=None)
H100 = get_gpu("H100")


def lay(**kw) -> Layout:
    base = dict(tp=1, pp=1, vp=None, cp=1, ep=8, etp=1, dp=8, micro_batch=1, global_batch=64, num_microbatches=8,
                sequence_parallel=False, distributed_optimizer=True, recompute="none")
    base.update(kw)
    return Layout(**base)


def times(model=MOE, layout=None, moe=None, **kw):
    return layer_times(model, layout or lay(), H100, seq=4096, precision="bf16", attention_backend="flash",
                       micro_batch=1, moe=moe, **kw)


def test_auto_is_megatron_bridges_on_te_and_what_the_local_spec_builds():
    assert moe_execution(MOE, "te", 8) == MoeExecution("alltoall", True, True)
    assert moe_execution(MOE, "te", 1) == MoeExecution("alltoall", True, True)
    assert moe_execution(MOE, "local", 8) == MoeExecution("alltoall", False, False)
    assert moe_execution(MOE, "local", 1) == MoeExecution("allgather", False, False)  # Megatron-Core's default
    assert moe_execution(MOE, "te", 8, "flex", False, None) == MoeExecution("flex", False, True)
    assert moe_execution(DENSE, "te", 1) is None
    assert moe_defaults_taken(MOE, "te", 8, None, False, None) == ("moe_dispatcher = alltoall",
                                                                    "moe_permute_fusion = true")
    assert moe_defaults_taken(MOE, "te", 8, "alltoall", True, False) == ()
    assert moe_defaults_taken(DENSE, "te", 1, None, None, None) == ()


def test_te_defaults_cost_what_the_calibration_priced():
    """A caller that passes no MoE settings is costed with the TE defaults (calibration unchanged)."""
    assert times() == times(moe=MoeExecution("alltoall", True, True))
    assert times(model=DENSE) == times(model=DENSE, moe=MoeExecution("allgather", False, False))


def test_allgather_moves_the_whole_group_s_tokens_alltoall_only_the_routed_copies():
    """alltoall: top_k x (ep - 1) / ep of the tokens each way (the busiest rank's share: `moe_max_load`);
    allgather: (ep x etp - 1) x the tokens, whatever top_k and routing: 7 / 1.75 = 4x at ep 8, top_k 2;
    none without an expert group."""
    a2a = times().ep_comm
    ag = times(moe=MoeExecution("allgather", True, True)).ep_comm
    assert ag == pytest.approx(a2a / moe_max_load(MOE, lay(), 4096) * 7 / (2 * 7 / 8), rel=1e-9)
    flex = times(moe=MoeExecution("flex", True, True)).ep_comm
    assert flex == a2a  # DeepEP moves the same bytes (fused kernels, no bandwidth claim)
    assert times(layout=lay(ep=1, dp=64), moe=MoeExecution("allgather", True, True)).ep_comm == 0.0
    # many experts per token over few ranks: allgather is the cheaper one
    wide = dataclasses.replace(MOE, experts=64, top_k=8)
    assert (times(model=wide, layout=lay(ep=2, dp=32), moe=MoeExecution("allgather", True, True)).ep_comm
            < times(model=wide, layout=lay(ep=2, dp=32)).ep_comm)


def test_per_expert_gemms_cost_at_least_the_grouped_gemm_and_launch_per_expert():
    """Without grouped GEMM each local expert's GEMMs run alone: the sum of per-expert rooflines
    (>= one roofline over all rows) plus fc1 / activation / fc2 launched per expert."""
    grouped, seq = times(), times(moe=MoeExecution("alltoall", False, True))
    local = MOE.experts // 8
    launches = DEFAULT_PARAMS.layer_overhead / TE_KERNELS_PER_LAYER * MOE_EXPERT_KERNELS * (local - 1)
    assert seq.gemm >= grouped.gemm + launches * (1 - 1e-9)
    # compute-bound experts: the same FLOPs either way, the launches are the difference
    assert seq.gemm == pytest.approx(grouped.gemm + launches, rel=1e-9)
    # a handful of tokens (memory-bound): both read every local expert's weights once; per expert, each
    # GEMM also pays its own roofline, never less than the grouped one
    tiny = lambda grouped_gemm: layer_times(MOE, lay(), H100, seq=16, precision="bf16", attention_backend="flash",
                                            micro_batch=1, moe=MoeExecution("alltoall", grouped_gemm, True))
    assert tiny(False).gemm >= tiny(True).gemm + launches * (1 - 1e-9)
    # one local expert: nothing to group
    one = lay(ep=16, dp=4)
    assert times(layout=one, moe=MoeExecution("alltoall", False, True)).gemm == times(layout=one).gemm
    # the grouped GEMM's traffic counts every local expert's weights
    f, h = MOE.moe_ffn_hidden, MOE.hidden
    one_w = gemm_time(4, f, h, flops_per_s=1e15, bytes_per_s=H100.hbm_bw, in_bytes=2.0)
    assert gemm_time(4, f, h, flops_per_s=1e15, bytes_per_s=H100.hbm_bw, in_bytes=2.0, weights=2) > 1.9 * one_w


def test_unfused_permutation_reads_and_writes_every_routed_element_once_more():
    fused, unfused = times(), times(moe=MoeExecution("alltoall", True, False))
    routed = 4096 * MOE.top_k * MOE.hidden
    assert unfused.elementwise - fused.elementwise == pytest.approx(
        MOE_UNFUSED_PERMUTE_BYTES * routed * 2 / H100.hbm_bw, rel=1e-9)  # forward + backward
    full = dict(layout=lay(recompute="full"))
    assert (times(moe=MoeExecution("alltoall", True, False), **full).elementwise - times(**full).elementwise
            == pytest.approx(MOE_UNFUSED_PERMUTE_BYTES * routed * 3 / H100.hbm_bw, rel=1e-9))
    assert times(moe=MoeExecution("flex", True, False)).elementwise == fused.elementwise  # DeepEP permutes itself


def test_allgather_holds_the_gathered_hidden_states():
    kw = dict(seq_length=4096, gpu=H100)
    a2a = memory.estimate(MOE, lay(), **kw).parts["moe_dispatch"]
    ag = memory.estimate(MOE, lay(), moe_dispatcher="allgather", **kw).parts["moe_dispatch"]
    assert ag - a2a == pytest.approx(2.0 * 2 * 4096 * 8 * MOE.hidden, rel=1e-6)


SRC = """experiment m {{
  cluster {{
    gpu = {gpu}
    nodes = 1
    gpus_per_node = 8
  }}
  model mx {{
    layers = 4
    hidden = 512
    heads = 8
    ffn_hidden = 1024
    vocab = 32000
    seq_length = 1024{moe}
  }}
  parallel {{
    tensor = 1
    pipeline = 1
  }}
{settings}
  data corpus {{
    path = "x/*.jsonl"
  }}
  stage pretrain {{
    data = [corpus]
    steps = 10
    global_batch = 64
  }}
}}
"""
EXPERTS = "\n    experts = 8\n    top_k = 2\n    moe_ffn_hidden = 512"


def _compile(tmp_path, gpu="H100", moe=EXPERTS, settings=""):
    path = tmp_path / "m.nemo"
    text = SRC.format(gpu=gpu, moe=moe, settings=settings)
    path.write_text(text)
    spec, diags, _ = compile_file(str(path))
    return spec, [d for d in diags if d.severity == Severity.ERROR], text.splitlines()


def test_the_plan_records_and_says_the_moe_defaults_it_took(tmp_path):
    spec, errors, _ = _compile(tmp_path)
    assert errors == []
    result = plan_experiment(spec)
    stage = result.plan.stages[0]
    assert stage.execution.moe == MoeExecution("alltoall", True, True)
    assert any("MoE defaults taken" in n and "moe_grouped_gemm = true" in n for n in result.stages[0].notes)
    spec, errors, _ = _compile(tmp_path, settings="  moe_dispatcher = allgather\n  moe_grouped_gemm = false\n"
                                                  "  moe_permute_fusion = false")
    assert errors == [] and (spec.moe_dispatcher, spec.moe_grouped_gemm, spec.moe_permute_fusion) == (
        "allgather", False, False)
    result = plan_experiment(spec)
    assert result.plan.stages[0].execution.moe == MoeExecution("allgather", False, False)
    assert not any("MoE defaults" in n for n in result.stages[0].notes)
    from nemoc.compiler.plan import from_json, to_json

    assert from_json(to_json(result.plan)).stages[0].execution.moe == MoeExecution("allgather", False, False)


def test_moe_settings_on_a_dense_model_are_an_error_at_their_line(tmp_path):
    spec, errors, lines = _compile(tmp_path, moe="", settings="  moe_grouped_gemm = true")
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(spec)
    [d] = [d for d in err.value.diagnostics if d.is_error]
    assert d.code == "E171" and "moe_grouped_gemm = true" in lines[d.span.line - 1]


@pytest.mark.parametrize("setting", ["moe_grouped_gemm = true", "moe_permute_fusion = true", "moe_dispatcher = flex"])
def test_te_only_moe_kernels_are_refused_on_the_local_spec(tmp_path, setting):
    spec, errors, lines = _compile(tmp_path, gpu="CPU", settings="  " + setting)
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(spec)
    [d] = [d for d in err.value.diagnostics if d.is_error]
    assert d.code == "E172" and setting in lines[d.span.line - 1] and "Transformer Engine" in d.message
    # left auto, the local spec plans what it builds
    spec, _, _ = _compile(tmp_path, gpu="CPU")
    stage = plan_experiment(spec).plan.stages[0]
    ep = stage.layout.ep
    assert stage.execution.moe == MoeExecution("alltoall" if ep > 1 else "allgather", False, False)
