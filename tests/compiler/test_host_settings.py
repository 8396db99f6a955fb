"""Host-side recipe settings: CUDA graphs (`cuda_graph_impl`, `cuda_graph_scope`), manual garbage
collection (`manual_gc`, `manual_gc_interval`) and the NVFP4 precision: the defaults the plan takes and
says, their cost and memory terms, and the rules that refuse them at the user's line (E173 CUDA graphs
without GPUs / TE, E174 Megatron-Core's scope checks, E175 an interval without manual GC, E121 NVFP4
off Blackwell, E127 NVFP4 without TE)."""

from __future__ import annotations

import dataclasses

import pytest

from nemoc.compiler import cost, memory
from nemoc.compiler.catalog import get_gpu, get_preset
from nemoc.compiler.execution import host_defaults_taken, host_execution, stage_host
from nemoc.compiler.lower import compile_file
from nemoc.compiler.plan import HostExecution, Layout, from_json, to_json
from nemoc.compiler.planner import plan_experiment
from nemoc.compiler.spec import ClusterSpec, ModelSpec
from nemoc.dsl.diagnostics import DiagnosticError, Severity

DENSE = ModelSpec(name="d", layers=8, hidden=2048, heads=16, query_groups=4, ffn_hidden=5632, vocab=32000,
                  seq_length=4096)
H100 = get_gpu("H100")
NO_GRAPHS = HostExecution("none", (), True, 100)


def lay(**kw) -> Layout:
    base = dict(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=8, micro_batch=1, global_batch=64, num_microbatches=8,
                sequence_parallel=False, distributed_optimizer=True, recompute="none")
    base.update(kw)
    return Layout(**base)


def est(host=NO_GRAPHS, layout=None, gpu=H100, precision="bf16", **kw):
    return cost.estimate(DENSE, layout or lay(), gpu=gpu, precision=precision, seq_length=4096, host=host, **kw)


# ------------------------------------------------------------------ defaults


def test_auto_is_megatron_bridges_recipe_and_the_plan_says_so():
    assert host_execution() == HostExecution("none", (), True, 100)
    assert host_execution(manual_gc=False) == HostExecution("none", (), False, 0)
    assert host_execution(manual_gc_interval=10) == HostExecution("none", (), True, 10)
    assert host_execution(cuda_graph_impl="local", cuda_graph_scope=("attn",)).cuda_graph_scope == ("attn",)
    assert host_defaults_taken(cuda_graph_impl=None, manual_gc=None, manual_gc_interval=None) == (
        "cuda_graph_impl = none", "manual_gc = true", "manual_gc_interval = 100")
    assert host_defaults_taken(cuda_graph_impl="local", manual_gc=False, manual_gc_interval=None) == ()
    # a stage on the local spec (alignment, eval) runs no graphs; its GC is the experiment's
    assert stage_host(("transformer_engine", (), None, None), "local") == HostExecution("none", (), True, 100)
    assert stage_host(("transformer_engine", ("attn",), None, None), "te").cuda_graph_impl == "transformer_engine"


# ------------------------------------------------------------------ cost


def test_cuda_graphs_remove_the_captured_kernels_launch_gaps():
    """Per layer and micro batch, forward + backward: share x 30 kernels x (eager gap - graphed gap),
    less one graph launch per pass; half a layer (attn) saves about half of the whole layer."""
    p = cost.DEFAULT_PARAMS
    whole = cost.cuda_graph_launch_saving(p, 1.0, 3.0)
    eager_gap = p.layer_overhead / cost.TE_KERNELS_PER_LAYER
    assert whole == pytest.approx(cost.TE_KERNELS_PER_LAYER * (eager_gap - cost.GRAPHED_KERNEL_GAP)
                                  - 3.0 * cost.GRAPH_LAUNCH)
    assert 0 < whole < p.layer_overhead  # never more than the overhead it replaces
    half = cost.cuda_graph_launch_saving(p, 0.5, 3.0)
    assert 0 < half < whole
    base = est()
    graphed = est(host=HostExecution("local", (), True, 100))
    m = base.parts["compute"] - graphed.parts["compute"]
    per_stage = lay().num_microbatches * DENSE.layers
    assert m == pytest.approx(per_stage * whole, rel=1e-9)
    assert graphed.step_time_s < base.step_time_s
    attn = est(host=HostExecution("transformer_engine", ("attn",), True, 100))
    assert graphed.step_time_s < attn.step_time_s < base.step_time_s
    assert cost.cuda_graph_share(HostExecution("local", ("moe_router", "moe_preprocess"), True, 100), DENSE) == \
        pytest.approx(0.15)


def test_the_lower_bound_still_bounds_with_cuda_graphs():
    host = HostExecution("local", (), True, 100)
    for layout in (lay(), lay(pp=2, dp=4, num_microbatches=16), lay(tp=2, dp=4, sequence_parallel=True)):
        bound = cost.step_time_lower_bound(DENSE, layout, micro_batches=(1, 1), gpu=H100, seq_length=4096, host=host)
        assert bound <= est(host=host, layout=layout).step_time_s * (1 + 1e-9)


TINY = ModelSpec(name="t", layers=4, hidden=256, heads=4, query_groups=4, ffn_hidden=1024, vocab=32000, seq_length=256)


def test_a_layer_is_host_bound_only_where_its_kernels_run_shorter_than_their_issue():
    """Eager: the host issues ~30 kernels per layer and micro batch at HOST_ISSUE_PER_KERNEL each and runs
    ahead of the GPU, so a layer pays max(device, host) and the step shows the difference as
    `host_bound`; a large layer (ms of GPU work) never does. CUDA graphs replay the captured kernels
    without the host: the whole layer graphed removes the wait."""
    issue = cost.TE_KERNELS_PER_LAYER * cost.HOST_ISSUE_PER_KERNEL
    big = cost.layer_times(DENSE, lay(), H100, seq=4096, precision="bf16", attention_backend="flash", micro_batch=1)
    assert big.host_issue == pytest.approx(issue) and big.host_wait == 0.0 and big.device > 5 * issue
    assert "host_bound" not in est().parts
    small = cost.layer_times(TINY, lay(), H100, seq=256, precision="bf16", attention_backend="flash", micro_batch=1)
    assert small.device < small.host_issue == pytest.approx(issue)
    assert small.total == pytest.approx(small.host_issue)
    tiny = dict(seq_length=256, gpu=H100, precision="bf16")
    eager = cost.estimate(TINY, lay(), host=NO_GRAPHS, **tiny)
    per_stage = lay().num_microbatches * TINY.layers
    assert eager.parts["host_bound"] == pytest.approx(per_stage * small.host_wait)
    assert eager.step_time_s == pytest.approx(sum(eager.parts.values()))
    graphed = cost.estimate(TINY, lay(), host=HostExecution("local", (), True, 100), **tiny)
    assert "host_bound" not in graphed.parts
    saved = eager.step_time_s - graphed.step_time_s
    assert saved > per_stage * cost.cuda_graph_launch_saving(cost.DEFAULT_PARAMS, 1.0, 3.0) + 0.9 * eager.parts["host_bound"]
    # half a layer graphed: the other half's kernels are still issued one by one
    attn = cost.estimate(TINY, lay(), host=HostExecution("transformer_engine", ("attn",), True, 100), **tiny)
    assert graphed.step_time_s < attn.step_time_s < eager.step_time_s
    # the local spec launches more kernels (unfused norms, RoPE, SwiGLU): more issue time
    local = cost.layer_times(TINY, lay(), H100, seq=256, precision="bf16", attention_backend="flash", micro_batch=1,
                             kernels="local")
    assert local.host_issue == pytest.approx(issue + cost._local_extra_kernels(TINY) * cost.HOST_ISSUE_PER_KERNEL)
    # full recompute replays the forward's kernels; a forward-only pass issues a third of them
    full = cost.layer_times(TINY, lay(recompute="full"), H100, seq=256, precision="bf16", attention_backend="flash",
                            micro_batch=1)
    assert full.host_issue == pytest.approx(issue * 4 / 3)
    fwd = cost.layer_times(TINY, lay(), H100, seq=256, precision="bf16", attention_backend="flash", micro_batch=1,
                           backward=0.0)
    assert fwd.host_issue == pytest.approx(issue / 3)
    # the CPU runs the operations on the host itself: no separate issue term
    cpu = cost.layer_times(TINY, lay(), get_gpu("cpu"), seq=256, precision="fp32", attention_backend="flash",
                           micro_batch=1)
    assert cpu.host_issue == 0.0


def test_a_larger_micro_batch_amortises_the_host_issue_and_the_bound_still_holds():
    """max(device(mb), host) / mb never grows with mb: a host-bound layer halves its time per row from
    micro batch 1 to 2, and the search's lower bound stays below every member of the group."""
    rows = 8
    per_row = []
    for mb in (1, 2, 4, 8):
        layout = lay(micro_batch=mb, num_microbatches=rows // mb)
        lt = cost.layer_times(TINY, layout, H100, seq=256, precision="bf16", attention_backend="flash", micro_batch=mb)
        per_row.append(lt.total / mb)
    assert per_row == sorted(per_row, reverse=True) and per_row[1] == pytest.approx(per_row[0] / 2, rel=0.05)
    for host in (NO_GRAPHS, HostExecution("local", (), True, 100)):
        for layout in (lay(micro_batch=8, num_microbatches=1), lay(pp=2, dp=4, micro_batch=8, num_microbatches=2,
                                                                       global_batch=64)):
            bound = cost.step_time_lower_bound(TINY, layout, micro_batches=(1, 8), gpu=H100, seq_length=256, host=host)
            n = layout.num_microbatches * layout.micro_batch
            for mb in (1, 2, 4, 8):
                for rc in ("none", "full"):
                    member = dataclasses.replace(layout, micro_batch=mb, num_microbatches=n // mb, recompute=rc)
                    t = cost.estimate(TINY, member, gpu=H100, seq_length=256, host=host).step_time_s
                    assert bound <= t * (1 + 1e-9), (member, bound, t)


def test_a_decode_step_waits_for_the_host_to_issue_one_forward():
    """The rollout synchronises on every sampled token: a decode step of a small model costs the host's
    issue of one forward's kernels over every layer (10 per layer at 10 us), not its microseconds of
    weight reads; a large model's step stays bound by its reads."""
    kw = dict(gpu=H100, seq_length=256, stage_kind="ppo")
    short = cost.estimate(TINY, lay(), stage_params={"max_new_tokens": 16}, **kw)
    long = cost.estimate(TINY, lay(), stage_params={"max_new_tokens": 32}, **kw)
    step = (long.parts["rollout"] - short.parts["rollout"]) / 16
    issue = TINY.layers * cost.TE_KERNELS_PER_LAYER / 3 * cost.HOST_ISSUE_PER_KERNEL
    gaps = TINY.layers * cost.DEFAULT_PARAMS.layer_overhead / 3
    assert step == pytest.approx(issue + gaps, rel=1e-6)
    # Llama 3 8B at TP 1: 16 GB of bf16 weights per step (4.8 ms at 3.35 TB/s) outlast its 3.2 ms of issue
    llama = get_preset("llama3_8b")
    big = dict(gpu=H100, seq_length=4096, stage_kind="ppo")
    b_short = cost.estimate(llama, lay(), stage_params={"max_new_tokens": 16}, **big)
    b_long = cost.estimate(llama, lay(), stage_params={"max_new_tokens": 32}, **big)
    b_step = (b_long.parts["rollout"] - b_short.parts["rollout"]) / 16
    reads = 2.0 * 7.5e9 / H100.hbm_bw  # the transformer layers' and output layer's bf16 weights, at least
    issue = llama.layers * cost.TE_KERNELS_PER_LAYER / 3 * cost.HOST_ISSUE_PER_KERNEL
    gaps = llama.layers * cost.DEFAULT_PARAMS.layer_overhead / 3
    assert reads > issue and b_step > reads + gaps


def test_gc_pauses_automatic_per_step_vs_manual_once_per_interval(monkeypatch):
    """Automatic GC: the young collections of every step, plus a full collection on some rank in
    1 - (1 - f)^N of the steps; manual: one full collection every interval; interval 0: none."""
    auto = HostExecution("none", (), False, 0)
    young = cost.GC_YOUNG_PER_STEP
    assert cost.gc_pause(HostExecution("none", (), True, 100), 16384) == pytest.approx(cost.GC_FULL_PAUSE / 100)
    assert cost.gc_pause(HostExecution("none", (), True, 0), 16384) == 0.0
    assert cost.gc_pause(auto, 1) == pytest.approx(young + cost.GC_FULL_PAUSE * cost.GC_FULL_PER_STEP)
    monkeypatch.setattr(cost, "GC_FULL_PER_STEP", 0.001)  # a rate the measurements did not see: the straggler law
    assert cost.gc_pause(auto, 16384) == pytest.approx(young + cost.GC_FULL_PAUSE, rel=1e-6)
    assert cost.gc_pause(auto, 8) < cost.gc_pause(auto, 64) < cost.gc_pause(auto, 1024)
    assert cost.gc_pause(auto, 1024) > cost.gc_pause(HostExecution("none", (), True, 100), 1024)
    big = lay(dp=1024, global_batch=1024, num_microbatches=1)
    assert est(host=auto, layout=big).parts["gc_pause"] == pytest.approx(cost.gc_pause(auto, 1024))
    assert est(host=auto, layout=big).step_time_s > est(host=NO_GRAPHS, layout=big).step_time_s


# ------------------------------------------------------------------ memory


def test_cuda_graph_static_buffers_hold_the_captured_temporaries():
    kw = dict(seq_length=4096, gpu=H100)
    eager = memory.estimate(DENSE, lay(), **kw)
    whole = memory.estimate(DENSE, lay(), cuda_graph_share=1.0, **kw)
    attn = memory.estimate(DENSE, lay(), cuda_graph_share=0.5, **kw)
    assert "cuda_graph_buffers" not in eager.parts
    assert whole.parts["cuda_graph_buffers"] == int(memory.CUDA_GRAPH_TEMPORARY_SHARE * whole.activations)
    assert attn.parts["cuda_graph_buffers"] == pytest.approx(whole.parts["cuda_graph_buffers"] / 2, rel=1e-6)
    assert whole.total > attn.total > eager.total


# ------------------------------------------------------------------ NVFP4


def test_nvfp4_runs_on_blackwell_at_the_fp4_peak():
    b200, gb300 = get_gpu("B200"), get_gpu("GB300")
    assert b200.supports("nvfp4") and b200.peak("nvfp4") == 9000e12 and gb300.peak("nvfp4") == 15000e12
    assert not H100.supports("nvfp4") and not get_gpu("A100-80GB").supports("nvfp4")
    t = {p: est(gpu=b200, precision=p) for p in ("bf16", "mxfp8", "nvfp4")}
    assert t["nvfp4"].step_time_s < t["mxfp8"].step_time_s < t["bf16"].step_time_s
    assert t["nvfp4"].parts["compute"] < t["mxfp8"].parts["compute"]
    m8 = memory.estimate(DENSE, lay(), precision="mxfp8", seq_length=4096, gpu=b200)
    m4 = memory.estimate(DENSE, lay(), precision="nvfp4", seq_length=4096, gpu=b200)
    assert m4.parts["fp4_weight_cache"] == pytest.approx(m8.parts["fp8_weight_cache"] * memory.NVFP4_BYTES, rel=1e-6)
    assert m4.weights == m8.weights  # bf16 master weights either way


# ------------------------------------------------------------------ the language, the plan, the rules


SRC = """experiment m {{
  cluster {{
    gpu = {gpu}
    nodes = 1
    gpus_per_node = 8
  }}
  model d {{
    layers = 4
    hidden = 512
    heads = 8
    ffn_hidden = 1024
    vocab = 32000
    seq_length = 1024{moe}
  }}
  parallel {{
    tensor = 1
    pipeline = 1{parallel}
  }}
{settings}
  data corpus {{
    path = "x/*.jsonl"
  }}
  stage pretrain {{
    data = [corpus]
    steps = 10
    global_batch = 64
    dropout = {dropout}
  }}
}}
"""
EXPERTS = "\n    experts = 8\n    top_k = 2\n    moe_ffn_hidden = 512"


def _compile(tmp_path, gpu="H100", settings="", moe="", parallel="", dropout="0.0"):
    path = tmp_path / "m.nemo"
    text = SRC.format(gpu=gpu, settings=settings, moe=moe, parallel=parallel, dropout=dropout)
    path.write_text(text)
    spec, diags, _ = compile_file(str(path))
    return spec, [d for d in diags if d.severity == Severity.ERROR], text.splitlines()


def _error(tmp_path, **kw):
    spec, errors, lines = _compile(tmp_path, **kw)
    assert errors == []
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(spec)
    [d] = [d for d in err.value.diagnostics if d.is_error]
    return d, lines[d.span.line - 1]


def test_the_plan_records_the_host_settings_and_round_trips(tmp_path):
    spec, errors, _ = _compile(tmp_path)
    assert errors == []
    result = plan_experiment(spec)
    assert result.plan.stages[0].execution.host == HostExecution("none", (), True, 100)
    assert any("host defaults taken" in n and "manual_gc = true" in n for n in result.stages[0].notes)
    spec, errors, _ = _compile(tmp_path, settings="  cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [attn, mlp]"
                                                  "\n  manual_gc = true\n  manual_gc_interval = 0")
    assert errors == [] and spec.cuda_graph_scope == ("attn", "mlp")
    result = plan_experiment(spec)
    host = result.plan.stages[0].execution.host
    assert host == HostExecution("transformer_engine", ("attn", "mlp"), True, 0)
    assert from_json(to_json(result.plan)).stages[0].execution.host == host
    assert "gc_pause" not in result.plan.stages[0].estimate.parts or \
        result.plan.stages[0].estimate.parts["gc_pause"] == 0.0
    assert result.plan.stages[0].memory.parts["cuda_graph_buffers"] > 0


def test_cuda_graphs_on_the_cpu_are_an_error_at_their_line(tmp_path):
    d, line = _error(tmp_path, gpu="CPU", settings="  cuda_graph_impl = local")
    assert d.code == "E173" and "cuda_graph_impl = local" in line and "GPUs" in d.message


def test_cuda_graphs_without_te_are_an_error(tmp_path):
    d, line = _error(tmp_path, settings="  kernels = local\n  cuda_graph_impl = local")
    assert d.code == "E173" and "cuda_graph_impl" in line


@pytest.mark.parametrize("settings, moe, parallel, needle", [
    ("  cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [full_iteration]", "", "", "local"),
    ("  cuda_graph_impl = local\n  cuda_graph_scope = [moe_router]", "", "", "MoE"),
    ("  cuda_graph_impl = local\n  cuda_graph_scope = [mlp]", EXPERTS, "", "dense"),
    ("  cuda_graph_impl = local\n  cuda_graph_scope = [moe_preprocess]", EXPERTS, "", "moe_router"),
    ("  cuda_graph_impl = local\n  cuda_graph_scope = [moe]", EXPERTS, "", "drop-and-pad"),
    ("  cuda_graph_impl = local\n  cuda_graph_scope = [attn]", "", "\n    recompute = full", "full recompute"),
])
def test_megatron_cores_scope_checks_are_e174_at_the_scope(tmp_path, settings, moe, parallel, needle):
    d, line = _error(tmp_path, settings=settings, moe=moe, parallel=parallel)
    assert d.code == "E174" and "cuda_graph_scope" in line
    assert needle in (d.equation or "") + (d.hint or "")


def test_auto_recompute_avoids_full_recompute_under_layer_graphs(tmp_path):
    spec, errors, _ = _compile(tmp_path, settings="  cuda_graph_impl = local\n  cuda_graph_scope = [attn]")
    assert errors == []
    assert plan_experiment(spec).plan.stages[0].layout.recompute != "full"


def test_an_interval_without_manual_gc_is_e175(tmp_path):
    d, line = _error(tmp_path, settings="  manual_gc = false\n  manual_gc_interval = 10")
    assert d.code == "E175" and "manual_gc_interval = 10" in line


def test_nvfp4_off_blackwell_is_refused_and_planned_on_it(tmp_path):
    d, line = _error(tmp_path, gpu="H100", settings="  precision = nvfp4")
    assert d.code == "E121" and "precision = nvfp4" in line and "Blackwell" in d.equation
    d, line = _error(tmp_path, gpu="B200", settings="  precision = nvfp4\n  kernels = local")
    assert d.code == "E127"
    spec, errors, _ = _compile(tmp_path, gpu="GB200", settings="  precision = nvfp4")
    assert errors == []
    stage = plan_experiment(spec).plan.stages[0]
    assert stage.execution.precision == "nvfp4" and stage.execution.params_dtype == "bf16"
    assert stage.execution.peak_flops_per_gpu == get_gpu("GB200").peak("nvfp4")


def test_the_nemoc_runtime_plans_eval_without_the_graphs_it_does_not_capture(tmp_path):
    """PPO / GRPO step through `Trainer.step` and eval decodes: the nemoc runtime's target captures no CUDA
    graphs for them (`StageCaps.cuda_graphs`), so their plans drop cuda_graph_impl (no graph buffers, no
    launch-gap saving priced) and say so; pretraining keeps it."""
    from nemoc.compiler.spec import StageSpec
    from nemoc.runtime.target import NEMOC_RUNTIME

    assert not NEMOC_RUNTIME.caps("ppo").cuda_graphs and not NEMOC_RUNTIME.caps("grpo").cuda_graphs
    spec, errors, _ = _compile(tmp_path, settings="  cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [attn]")
    assert errors == []
    ev = StageSpec(name="ev", kind="eval", after=("pretrain",), global_batch=8, steps=2, data=spec.stages[0].data)
    result = plan_experiment(dataclasses.replace(spec, stages=spec.stages + (ev,)), target=NEMOC_RUNTIME)
    assert result.plan.stage("pretrain").execution.host.cuda_graph_impl == "transformer_engine"
    assert result.plan.stage("ev").execution.host.cuda_graph_impl == "none"
    assert result.plan.stage("ev").memory.parts.get("cuda_graph_buffers", 0.0) == 0.0
    notes = next(s.notes for s in result.stages if s.name == "ev")
    assert any("cuda_graph_impl = none for this eval stage" in n for n in notes), notes


# ------------------------------------------------------------------ selective recompute under CUDA graphs


_GRAPH_SCOPES = [(), ("attn",), ("mlp",), ("attn", "mlp"), ("full_iteration",), ("moe_router",),
                 ("attn", "moe_router", "moe_preprocess"), ("moe",)]
_MODULES = [None, ("core_attn",), ("mlp",), ("moe",), ("moe_act",), ("core_attn", "mlp"), ("layernorm",)]


def _megatron_refuses(**kw) -> bool:
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        TransformerConfig(**kw)
    except (AssertionError, ValueError):
        return True
    return False


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_graphed_selective_recompute_agrees_with_megatron_cores_transformer_config(moe):
    """A differential test of E174's selective-recompute checks against Megatron-Core 0.16.1's TransformerConfig
    (transformer_config.py l. 1790-1828): `moe` recomputed over a TE-graphed router; attention / hidden dropout
    with a graphed core_attn / mlp / moe recompute, where an empty scope graphs the whole layer. Every
    implementation x scope x modules x dropout whose graph-free config Megatron-Core accepts: E174 fires
    exactly where Megatron-Core refuses the graphed one."""
    from nemoc.compiler.rules import Env, Sizes, gpu_facts, rule_cuda_graph_scope

    model = dataclasses.replace(DENSE, experts=4, top_k=2, moe_ffn_hidden=1024, moe_capacity_factor=1.0,
                                moe_pad_to_capacity=True) if moe else DENSE
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, recompute_granularity="selective")
    if moe:
        base.update(num_moe_experts=4, moe_router_topk=2, add_bias_linear=False, moe_expert_capacity_factor=1.0,
                    moe_pad_expert_input_to_capacity=True, moe_token_dispatcher_type="alltoall")
    arch, precisions = gpu_facts("H100")
    checked = refused = 0
    for impl in ("local", "transformer_engine"):
        for scope in _GRAPH_SCOPES:
            for modules in _MODULES:
                for dropout in (0.0, 0.1):
                    kw = dict(base, hidden_dropout=dropout, attention_dropout=dropout,
                              **({} if modules is None else dict(recompute_modules=list(modules))))
                    if _megatron_refuses(**kw):
                        continue  # refused without graphs: another rule's business
                    env = Env(model=model, cluster=ClusterSpec(gpu="H100"), gpu_arch=arch, gpu_precisions=precisions,
                              host_requested=(impl, scope, None, None), dropout=dropout > 0)
                    ours = rule_cuda_graph_scope(env, Sizes(recompute="selective", recompute_modules=modules))
                    theirs = _megatron_refuses(**kw, cuda_graph_impl=impl, cuda_graph_scope=list(scope))
                    assert (ours is not None) == theirs, (impl, scope, modules, dropout, ours)
                    checked += 1
                    refused += theirs
    assert checked > 100 and 0 < refused < checked


@pytest.mark.parametrize("settings, moe, parallel, dropout, needle", [
    ("  cuda_graph_impl = transformer_engine", "", "\n    recompute = selective", "0.1", "whole layer"),
    ("  cuda_graph_impl = local\n  cuda_graph_scope = [mlp]", "",
     "\n    recompute = selective\n    recompute_modules = [mlp]", "0.1", "hidden dropout"),
    ("  cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [attn, moe_router]", EXPERTS,
     "\n    recompute = selective\n    recompute_modules = [moe]", "0.0", "moe_act"),
])
def test_graphed_recompute_is_e174_at_the_scope(tmp_path, settings, moe, parallel, dropout, needle):
    d, line = _error(tmp_path, settings=settings, moe=moe, parallel=parallel, dropout=dropout)
    assert d.code == "E174" and ("cuda_graph_scope" in line or "recompute" in line)  # the first written of them
    assert needle in (d.equation or "") + (d.hint or "")


def test_graphed_recompute_outside_the_graph_or_without_dropout_plans(tmp_path):
    for settings, parallel, dropout in (
            ("  cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [mlp]", "\n    recompute = selective", "0.1"),
            ("  cuda_graph_impl = transformer_engine", "\n    recompute = selective", "0.0")):
        spec, errors, _ = _compile(tmp_path, settings=settings, parallel=parallel, dropout=dropout)
        assert errors == []
        assert plan_experiment(spec).plan.stages[0].layout.recompute == "selective"


def test_the_overlapped_gather_under_cuda_graphs_is_planned_as_the_target_runs_it(tmp_path):
    """The nemoc runtime does not switch the gather's forward pre-hooks around graph capture (it refuses the
    pair when it builds the model), so its plan gathers after the optimizer step, prices that and says so;
    Megatron-Core's own target (Megatron-LM does the switching) keeps the overlap. Without graphs it stays."""
    from nemoc.runtime.target import NEMOC_RUNTIME

    graphs = "  cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [attn]"
    spec, errors, _ = _compile(tmp_path, settings=graphs, parallel="\n    overlap_param_gather = true")
    assert errors == []
    ours = plan_experiment(spec, target=NEMOC_RUNTIME)
    stage = ours.plan.stages[0]
    assert not stage.layout.overlap_param_gather and not stage.execution.overlaps.param_gather
    assert any(n.startswith("overlap_param_gather = false for this pretrain stage") and "cuda_graph_impl" in n
               for n in ours.stages[0].notes)
    off = plan_experiment(dataclasses.replace(spec, parallel=dataclasses.replace(spec.parallel, overlap_param_gather=False)),
                          target=NEMOC_RUNTIME).plan.stages[0]
    assert stage.estimate == off.estimate
    assert plan_experiment(spec).plan.stages[0].layout.overlap_param_gather  # Megatron-Core's target
    eager, errors, _ = _compile(tmp_path, parallel="\n    overlap_param_gather = true")
    assert plan_experiment(eager, target=NEMOC_RUNTIME).plan.stages[0].layout.overlap_param_gather
