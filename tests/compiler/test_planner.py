"""The planner: every example plans into a valid, fitting, serializable Plan; step counts; not-fitting
diagnostics name the overflowing term and the cheapest fix; inference stages get the least model
parallelism."""

from __future__ import annotations

import glob
import math
import sys
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.params import StageParams
from nemoc.compiler.plan import from_json, to_json
from nemoc.compiler.planner import plan_experiment, stage_steps
from nemoc.compiler.rules import TRAINING_KINDS
from nemoc.compiler.spec import ClusterSpec, DataSpec, ExperimentSpec, LoraSpec, ModelSpec, ParallelSpec, StageSpec
from nemoc.dsl.diagnostics import DiagnosticError, Span
from nemoc.runtime.cli.common import load_spec
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

EXAMPLES = sorted(glob.glob("examples/*.nemo"))


@pytest.mark.parametrize("path", EXAMPLES)
def test_every_example_plans_into_a_valid_plan(path):
    spec, _ = load_spec(path)
    result = plan_experiment(spec, target=NEMOC_RUNTIME)
    plan = result.plan
    assert from_json(to_json(plan)) == plan
    assert [s.name for s in plan.stages] == [s.name for s in spec.stages]
    for sp in plan.stages:
        lay = sp.layout
        assert lay.tp * lay.pp * lay.cp * lay.dp == spec.cluster.world_size
        assert sp.memory.total <= sp.memory.capacity * 0.9
        assert lay.global_batch == lay.micro_batch * lay.dp * lay.num_microbatches
        assert sp.resident_models
        if sp.kind in TRAINING_KINDS and sp.steps:
            assert sp.estimate.wall_time_s == pytest.approx(sp.estimate.step_time_s * sp.steps)
    assert result.elapsed_s < 5.0


def _spec(model="llama3_8b", nodes=1, gpu="H100", stages=None, **parallel) -> ExperimentSpec:
    return ExperimentSpec(
        name="t", model=get_preset(model), cluster=ClusterSpec(gpu=gpu, nodes=nodes, usd_per_gpu_hour=2.5),
        parallel=ParallelSpec(**parallel),
        stages=stages or (StageSpec(name="pretrain", kind="pretrain", global_batch=128, tokens=10**10),),
        spans={"parallel": Span("t.nemo", 3, 1, 3, 9), "model": Span("t.nemo", 2, 1, 2, 6),
               "stage.pretrain": Span("t.nemo", 8, 1, 8, 6)},
    )


def test_steps_from_tokens_and_cost_from_price():
    result = plan_experiment(_spec(), target=NEMOC_RUNTIME)
    sp = result.plan.stage("pretrain")
    assert sp.steps == math.ceil(10**10 / (128 * 8192))
    assert sp.estimate.cost_usd == pytest.approx(sp.estimate.gpu_hours * 2.5)
    assert sp.estimate.gpu_hours == pytest.approx(sp.estimate.wall_time_s * 8 / 3600)


def test_steps_from_epochs_use_samples_or_the_data_size(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"x" * 4_000_000)
    spec = replace(_spec(), root=str(tmp_path), data=(DataSpec(name="web", path="*.jsonl"),))
    stage = StageSpec(name="sft", kind="sft", data=("web",), epochs=2.0, global_batch=8)
    steps, note = stage_steps(spec, stage, 8, 1000)
    assert steps == math.ceil(2.0 * (4_000_000 / 4 / 1000) / 8) and "estimated" in note
    exact = replace(stage, params={"samples": 800})
    assert stage_steps(spec, exact, 8, 1000) == (200, "steps = ceil(epochs(2.0) x samples(800) / global_batch(8))")
    unknown = replace(spec, data=(DataSpec(name="web", path="missing/*.jsonl"),))
    assert stage_steps(unknown, stage, 8, 1000)[0] == 0


def test_a_broken_rule_raises_with_every_error_at_the_users_span():
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(_spec(tensor=3), target=NEMOC_RUNTIME)
    codes = {d.code for d in err.value.diagnostics if d.is_error}
    assert {"E102", "E103", "E104"} <= codes


def test_nothing_fits_names_the_term_and_the_cheapest_setting_change():
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(_spec(tensor=1, pipeline=1, recompute="none"), target=NEMOC_RUNTIME)
    d = next(d for d in err.value.diagnostics if d.code == "E130")
    assert "activations is the largest term" in d.message
    assert d.equation.startswith("weights ") and "> budget" in d.equation
    assert d.hint == "set recompute = full (instead of none)"
    assert d.span == Span("t.nemo", 3, 1, 3, 9)


def test_nothing_fits_suggests_more_nodes_when_no_setting_helps():
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(_spec(model="llama31_70b", nodes=1, gpu="A100-40GB"), target=NEMOC_RUNTIME)
    d = next(d for d in err.value.diagnostics if d.code == "E130")
    assert d.hint.startswith("needs ") and "more node" in d.hint


def test_nothing_fits_frees_the_model_parallel_sizes_and_adds_nodes():
    """Llama 3 70B on 8 H100 with tensor = 2, pipeline = 1, recompute = none: no single relaxation
    fits, nor more nodes at TP 2 x PP 1; the hint frees the fixed sizes, adds nodes and names what
    must change, and that layout fits there."""
    import re

    stage = (StageSpec(name="pretrain", kind="pretrain", global_batch=64, steps=100, seq_length=4096),)
    spec = _spec(model="llama3_70b", stages=stage, tensor=2, pipeline=1, recompute="none")
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(spec, target=NEMOC_RUNTIME)
    d = next(d for d in err.value.diagnostics if d.code == "E130")
    hint = re.match(r"add (\d+) nodes? \(nodes = (\d+)\) and set (.*): (tp=.*) uses ([\d.]+) GiB$", d.hint)
    assert hint, d.hint
    nodes = int(hint.group(2))
    assert int(hint.group(1)) == nodes - 1 and "tensor = " in hint.group(3) and "(instead of 2)" in hint.group(3)
    assert "recompute" not in hint.group(3)  # kept: the user's recompute = none still fits
    planned = plan_experiment(replace(spec, cluster=replace(spec.cluster, nodes=nodes),
                                      parallel=ParallelSpec(recompute="none")), target=NEMOC_RUNTIME).plan.stages[0]
    assert planned.layout.tp * planned.layout.pp > 2
    smaller = replace(spec, cluster=replace(spec.cluster, nodes=nodes - 1), parallel=ParallelSpec())
    with pytest.raises(DiagnosticError):
        plan_experiment(smaller, target=NEMOC_RUNTIME)  # the fewest nodes: one fewer fits nothing, whatever the layout


def test_inference_stages_use_the_least_model_parallelism():
    stages = (StageSpec(name="pretrain", kind="pretrain", global_batch=128, steps=10),
              StageSpec(name="eval", kind="eval", after=("pretrain",), steps=5, global_batch=8),
              StageSpec(name="export", kind="export", after=("eval",)))
    result = plan_experiment(_spec(stages=stages), target=NEMOC_RUNTIME)
    for name in ("eval", "export"):
        lay = result.plan.stage(name).layout
        assert (lay.tp, lay.pp, lay.recompute, lay.distributed_optimizer) == (1, 1, "none", False)
    assert result.plan.stage("export").estimate.wall_time_s == 0.0
    assert result.plan.stage("eval").estimate.step_time_s > 0


def test_written_recompute_modules_do_not_reach_eval_and_export():
    """Eval / export run no recompute (`_inference_parallel`): the experiment's `recompute_modules` is
    dropped with it, else E192 (modules without recompute = selective) refuses every inference layout.
    The shipped pipeline with `recompute = selective, recompute_modules = [core_attn, mlp]`."""
    spec, _ = load_spec("examples/pipeline.nemo")
    spec = replace(spec, parallel=replace(spec.parallel, recompute="selective", recompute_modules=("core_attn", "mlp")))
    plan = plan_experiment(spec, target=NEMOC_RUNTIME).plan
    assert plan.stage("pretrain").layout.recompute_modules == ("core_attn", "mlp")
    for name in ("eval", "export"):
        lay = plan.stage(name).layout
        assert (lay.recompute, lay.recompute_modules) == ("none", None)


def test_a_lora_stage_plans_without_the_embedding_wgrad_deferral():
    """LoRA freezes the output layer, whose frozen-weight GEMM Megatron-Core 0.16.1 refuses with the deferral's
    buffer (tensor_parallel/layers.py `linear_with_frozen_weight` asserts grad_output_buffer is None): the
    planner drops the setting for a peft stage, says so, and costs and sizes the stage exactly as without it."""
    stages = (StageSpec(name="pretrain", kind="pretrain", global_batch=128, steps=10),
              StageSpec(name="sft", kind="sft", after=("pretrain",), global_batch=128, steps=10, peft=LoraSpec()))
    kw = dict(tensor=4, pipeline=2, data=1, context=1, micro_batch=1, sequence_parallel=True)
    deferred = plan_experiment(_spec(stages=stages, defer_embedding_wgrad_compute=True, wgrad_deferral_limit=4,
                                     **kw), target=NEMOC_RUNTIME)
    plain = plan_experiment(_spec(stages=stages, **kw), target=NEMOC_RUNTIME)
    assert deferred.plan.stage("pretrain").layout.defer_embedding_wgrad_compute
    sft = deferred.plan.stage("sft")
    assert (sft.layout.defer_embedding_wgrad_compute, sft.layout.wgrad_deferral_limit) == (False, 0)
    assert any(n.startswith("defer_embedding_wgrad_compute = false for this sft stage") for n in deferred.stage("sft").notes)
    assert (sft.memory, sft.estimate) == (plain.plan.stage("sft").memory, plain.plan.stage("sft").estimate)
    assert not any("defer_embedding" in n for n in deferred.stage("pretrain").notes)


def test_uneven_pipeline_split_is_recorded_for_the_runtime():
    spec = _spec(model="llama31_405b", nodes=16, tensor=8, pipeline=16, context=1, virtual_pipeline=1)
    spec = replace(spec, stages=(StageSpec(name="pretrain", kind="pretrain", global_batch=64, steps=10),))
    sp = plan_experiment(spec, target=NEMOC_RUNTIME).plan.stage("pretrain")
    split = sp.execution.pipeline  # a typed field of the plan, not Megatron key names in the user's params
    assert (split.first, split.last, split.per_stage) == (7, 7, 8)
    assert split.params() == {"num_layers_in_first_pipeline_stage": 7, "num_layers_in_last_pipeline_stage": 7}
    assert not any(k.startswith("num_layers_in") for k in sp.params)


def test_a_split_heavier_than_even_is_costed_with_its_heaviest_stage():
    from nemoc.compiler import cost
    from nemoc.compiler.catalog.hardware import get_gpu
    from nemoc.compiler.plan import Layout
    from nemoc.compiler.search import Problem, _stage_layers

    auto = ParallelSpec(*(None,) * len(ParallelSpec.__dataclass_fields__))
    p = Problem(model=get_preset("llama31_405b"), cluster=ClusterSpec(gpu="H100", nodes=16), gpu=get_gpu("H100"),
                fixed=auto, global_batch=64, seq_length=8192)
    even = Layout(tp=8, pp=16, vp=None, cp=1, ep=1, etp=8, dp=1, micro_batch=1, global_batch=64, num_microbatches=64,
                  sequence_parallel=True, distributed_optimizer=True, recompute="full")
    assert _stage_layers(p, even) == (7, 8, 7)  # first 7, 14 x 8, last 7: max 8 = ceil(126 / 16)
    assert _stage_layers(p, replace(even, vp=7)) == (14, 7, 14)  # multiples of 7: first 14, 14 x 7, last 14
    assert _stage_layers(p, replace(even, pp=8, vp=8)) == (15, 16, 15)  # embedding and loss counted as layers
    light, heavy = (cost.estimate(p.model, replace(even, vp=7), gpu="H100", split=s) for s in ((7, 8, 7), (14, 7, 14)))
    assert heavy.step_time_s > light.step_time_s and heavy.parts["pp_imbalance"] > light.parts["pp_imbalance"]


def test_405b_on_pp8_vp8_plans_with_embedding_and_loss_counted_like_nemo():
    """NeMo's Llama 3.1 405B layout (TP 8, PP 8, VP 8, CP 2): 126 layers are not a multiple of
    8 x 8, but 126 + embedding + loss = 128 are; the plan carries the two TransformerConfig flags."""
    spec = _spec(model="llama31_405b", nodes=16, gpu="B200", tensor=8, pipeline=8, context=2, virtual_pipeline=8)
    spec = replace(spec, stages=(StageSpec(name="pretrain", kind="pretrain", global_batch=64, steps=10),),
                   precision="fp8")
    sp = plan_experiment(spec, target=NEMOC_RUNTIME).plan.stage("pretrain")
    assert sp.execution.pipeline.embedding is True and sp.execution.pipeline.loss is True
    assert sp.execution.pipeline.first is None and sp.params == StageParams.of("pretrain")
    assert (sp.layout.pp, sp.layout.vp) == (8, 8)


def test_dpo_and_lora_stages_record_resident_models():
    start = {"init": "checkpoints/hf"}  # a fine-tuning stage starts from a checkpoint (E155)
    stages = (StageSpec(name="dpo", kind="dpo", global_batch=64, steps=10, params=start),
              StageSpec(name="lora", kind="sft", global_batch=64, steps=10, peft=LoraSpec(), params=start))
    plan = plan_experiment(_spec(stages=stages), target=NEMOC_RUNTIME).plan
    assert plan.stage("dpo").resident_models == ("policy", "reference")
    assert plan.stage("lora").resident_models == ("policy",)


def test_attention_backend_auto_stays_auto_and_is_costed_as_flash():
    """`auto` reaches the runtime as Megatron's AttnBackend.auto (TE picks flash-attn or cuDNN fused
    attention), while the memory and cost models price it as the flash class: same layout, memory and
    step time as an explicit `flash`."""
    auto = plan_experiment(_spec(), target=NEMOC_RUNTIME).plan
    flash = plan_experiment(replace(_spec(), attention_backend="flash"), target=NEMOC_RUNTIME).plan
    assert auto.attention_backend == "auto" and flash.attention_backend == "flash"
    assert auto.stages[0].layout == flash.stages[0].layout and auto.stages[0].memory == flash.stages[0].memory
    assert auto.stages[0].estimate == flash.stages[0].estimate
    assert plan_experiment(replace(_spec(), attention_backend="unfused"), target=NEMOC_RUNTIME).plan.attention_backend == "unfused"


def test_the_compiler_never_imports_torch():
    import subprocess

    code = ("import sys, glob\nfrom nemoc.runtime.cli.common import load_spec\n"
            "from nemoc.compiler.planner import plan_experiment\nfrom nemoc.runtime.target import NEMOC_RUNTIME\n"
            "plan_experiment(load_spec('examples/llama3_8b_pretrain.nemo')[0], target=NEMOC_RUNTIME)\n"
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@st.composite
def random_specs(draw) -> ExperimentSpec:
    heads = draw(st.sampled_from([1, 2, 3, 4, 8, 12]))
    model = ModelSpec(name="r", layers=draw(st.integers(1, 12)), hidden=heads * draw(st.sampled_from([16, 64, 128])),
                      heads=heads, query_groups=draw(st.sampled_from([g for g in (1, 2, 3, 4, heads) if heads % g == 0])),
                      ffn_hidden=draw(st.sampled_from([96, 256, 1000, 4096])), vocab=draw(st.integers(100, 60000)),
                      seq_length=draw(st.sampled_from([128, 1024, 4096])),
                      experts=(e := draw(st.sampled_from([0, 0, 4, 6]))), top_k=min(2, e),
                      moe_ffn_hidden=512 if e else None)
    small = st.one_of(st.none(), st.integers(1, 9))
    parallel = ParallelSpec(tensor=draw(small), pipeline=draw(small), virtual_pipeline=draw(st.sampled_from([None, 1, 2, 3])),
                            context=draw(st.sampled_from([None, 1, 2])), expert=draw(st.sampled_from([None, 1, 2, 3])),
                            data=draw(st.sampled_from([None, None, 1, 2, 5])), micro_batch=draw(small),
                            sequence_parallel=draw(st.sampled_from([None, True, False])),
                            distributed_optimizer=draw(st.sampled_from([None, True, False])),
                            recompute=draw(st.sampled_from([None, "none", "selective", "full"])))
    kinds = draw(st.lists(st.sampled_from(["pretrain", "sft", "dpo", "kto", "orpo", "reward", "ppo", "grpo", "eval", "export"]),
                          min_size=1, max_size=3))
    stages = tuple(StageSpec(name=f"s{i}", kind=k, global_batch=draw(st.sampled_from([None, 1, 6, 16, 64])),
                             steps=draw(st.sampled_from([None, 10])), tokens=draw(st.sampled_from([None, 10**8])),
                             seq_length=draw(st.sampled_from([None, 64, 100, 8192])))
                   for i, k in enumerate(kinds))
    cluster = ClusterSpec(gpu=draw(st.sampled_from(["H100", "A100-40GB", "B200", "CPU"])), nodes=draw(st.integers(1, 3)),
                          gpus_per_node=draw(st.sampled_from([1, 2, 4, 8])))
    return ExperimentSpec(name="fuzz", model=model, cluster=cluster, parallel=parallel, stages=stages,
                          precision=draw(st.sampled_from(["bf16", "fp16", "fp32", "fp8", "mxfp8"])),
                          attention_backend=draw(st.sampled_from(["auto", "flash", "unfused"])),
                          kernels=draw(st.sampled_from(["auto", "te", "local"])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_specs())
def test_any_spec_plans_or_fails_with_diagnostics_never_a_traceback(spec):
    try:
        result = plan_experiment(spec, target=NEMOC_RUNTIME)
    except DiagnosticError as err:
        assert err.diagnostics and any(d.is_error for d in err.diagnostics)
        assert all(d.equation or d.hint or d.message for d in err.diagnostics)
        return
    for sp in result.plan.stages:
        assert sp.layout.tp * sp.layout.pp * sp.layout.cp * sp.layout.dp == spec.cluster.world_size
        assert sp.memory.total <= sp.memory.capacity
        assert sp.kernels in ("te", "local") and (sp.kernels == "local" or spec.cluster.gpu != "CPU")
    assert from_json(to_json(result.plan)) == result.plan


def test_an_inherited_pipeline_is_dropped_for_export_and_kept_for_eval():
    """The nemoc runtime's target: export (one process) runs without a pipeline, so the experiment's
    pipeline = 2 (for pretrain) does not reach it; eval runs at its layout with one model chunk per pipeline
    rank, so it keeps pp = 2 without virtual stages; an auto pipeline of a ppo or dpo stage is the search's
    choice (on this 8B model ppo's without virtual stages: their extra rollout hops do not pay here,
    test_ppo_and_grpo_plan_virtual_stages_and_moe_models)."""
    stages = (StageSpec(name="pretrain", kind="pretrain", global_batch=128, steps=10),
              StageSpec(name="ppo", kind="ppo", after=("pretrain",), global_batch=64, steps=10,
                        parallel=ParallelSpec(tensor=None, pipeline=None)),
              StageSpec(name="dpo", kind="dpo", after=("pretrain",), global_batch=64, steps=10,
                        parallel=ParallelSpec(tensor=None, pipeline=None)),
              StageSpec(name="eval", kind="eval", after=("dpo",), steps=5, global_batch=8),
              StageSpec(name="export", kind="export", after=("eval",)))
    plan = plan_experiment(_spec(stages=stages, pipeline=2), target=NEMOC_RUNTIME).plan
    assert plan.stage("pretrain").layout.pp == 2
    assert (plan.stage("eval").layout.pp, plan.stage("eval").layout.vp) == (2, None)
    assert (plan.stage("export").layout.pp, plan.stage("export").layout.vp) == (1, None)
    assert plan.stage("ppo").layout.vp is None


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_ppo_and_grpo_plan_virtual_stages_and_moe_models(kind):
    """The nemoc runtime runs ppo and grpo with virtual pipeline stages and on MoE models (runtime/target.py
    `_PPO`): a fixed virtual_pipeline = 2 plans as written, and a Mixtral stage with its experts split over
    4 ranks plans instead of meeting the runtime's MoE refusal."""
    stages = (StageSpec(name="pretrain", kind="pretrain", global_batch=128, steps=10),
              StageSpec(name="rl", kind=kind, after=("pretrain",), global_batch=64, steps=10,
                        parallel=ParallelSpec(tensor=2, pipeline=2, virtual_pipeline=2)))
    rl = plan_experiment(_spec(stages=stages), target=NEMOC_RUNTIME).plan.stage("rl")
    assert (rl.layout.pp, rl.layout.vp) == (2, 2)
    assert rl.estimate.step_time_s > 0
    moe = (StageSpec(name="pretrain", kind="pretrain", global_batch=128, steps=10),
           StageSpec(name="rl", kind=kind, after=("pretrain",), global_batch=64, steps=10,
                     parallel=ParallelSpec(expert=4)))
    plan = plan_experiment(_spec(model="mixtral_8x7b", nodes=4, stages=moe), target=NEMOC_RUNTIME).plan
    assert plan.stage("rl").layout.ep == 4, plan.stage("rl").layout


def _eval_only(model: str, parallel: ParallelSpec | None = None) -> ExperimentSpec:
    """An eval stage of a preset model started from a Hugging Face checkpoint on one node of 8 H100."""
    stages = (StageSpec(name="eval", kind="eval", steps=5, global_batch=8, parallel=parallel),)
    spec = _spec(model=model, stages=stages)
    return replace(spec, model=replace(spec.model, init="/checkpoints/hf"))


def test_a_large_eval_stage_is_planned_at_a_layout_the_runtime_runs():
    """The nemoc runtime evaluates at the stage's layout with the training stages' kernels: Llama 3 70B
    (140 GB of bf16 weights) on 8 H100 gets the least model parallelism that fits, with TE's layers; a
    pipeline = 4 the user fixes is planned as written (one chunk per rank, no virtual stages); Mixtral
    8x7B (a MoE model, 93 GB) is evaluated pipelined over two stages (tp * pp = 2: pp tried first). Sequence
    parallelism at tp > 1, as the training kinds (the runtime decodes the generations with it switched off:
    runtime/model.py `unsplit_sequence`)."""
    dense = plan_experiment(_eval_only("llama3_70b"), target=NEMOC_RUNTIME).plan.stage("eval")
    assert dense.kernels == "te" and dense.layout.tp * dense.layout.pp == 2, dense.layout
    assert dense.layout.sequence_parallel == (dense.layout.tp > 1)
    assert dense.memory.total <= dense.memory.capacity
    piped = plan_experiment(_eval_only("llama3_70b", ParallelSpec(tensor=1, pipeline=4)),
                            target=NEMOC_RUNTIME).plan.stage("eval")
    assert (piped.layout.tp, piped.layout.pp, piped.layout.vp, piped.layout.dp) == (1, 4, None, 2)
    assert piped.execution.pipeline is not None and piped.memory.total <= piped.memory.capacity
    moe = plan_experiment(_eval_only("mixtral_8x7b"), target=NEMOC_RUNTIME).plan.stage("eval")
    assert (moe.layout.tp, moe.layout.pp, moe.layout.vp) == (1, 2, None), moe.layout
    assert moe.kernels == "te" and moe.execution.precision == "bf16"


def test_eval_and_export_say_how_the_runtime_runs_them():
    """The runtime exports on the host, streaming one layer at a time: the plan says so, with the host
    memory that takes, instead of implying the searched layout is used; eval runs at its searched layout
    (no one-GPU note)."""
    spec, _ = load_spec("examples/llama3_70b_sft_dpo.nemo")
    export = plan_experiment(spec, target=NEMOC_RUNTIME).stage("export")
    note = next(n for n in export.notes if "host CPU" in n)
    gib = float(note.split("about ")[1].split(" GiB")[0].replace(",", ""))
    # Llama 3 70B: a layer is 0.856e9 parameters, the embedding 1.05e9 (128,256 x 8,192); fp32 upper bound
    assert 17 < gib < 19, note  # 2 x 3.19 GiB + 3 x 3.91 GiB, against 263 GiB for a whole fp32 copy
    as_eval = replace(spec, stages=(*spec.stages[:-1], replace(spec.stages[-1], kind="eval", params={})))
    eval_notes = plan_experiment(as_eval, target=NEMOC_RUNTIME).stage("export").notes
    assert not any("one GPU" in n for n in eval_notes), eval_notes
    sharded = plan_experiment(as_eval, target=NEMOC_RUNTIME).plan.stage("export").layout
    assert sharded.tp * sharded.pp > 1, sharded  # 70B: split over tensor or pipeline ranks


def test_recipe_overlaps_apply_to_training_stages_only():
    """`tp_comm_overlap` / `overlap_param_gather` set for the experiment: the pretraining stage plans
    with them; an eval stage (no optimizer, local spec in the runtime) plans without."""
    stages = (StageSpec(name="pretrain", kind="pretrain", global_batch=128, tokens=10**10),
              StageSpec(name="eval", kind="eval", global_batch=8, after=("pretrain",)))
    result = plan_experiment(_spec(stages=stages, tensor=2, tp_comm_overlap=True, overlap_param_gather=True))
    train, ev = result.plan.stage("pretrain").layout, result.plan.stage("eval").layout
    assert train.tp_comm_overlap and train.overlap_param_gather and train.sequence_parallel
    assert not ev.tp_comm_overlap and not ev.overlap_param_gather


def test_the_plan_records_the_fp8_recipe_it_defaulted_to():
    """fp8_recipe auto resolves to Megatron-Bridge's FP8-CS (tensorwise) for precision = fp8 and is
    recorded in the stage's execution (plan.json `execution.fp8_recipe`), the recipe costed; an
    explicit recipe is kept, and tensorwise costs its extra amax pass (never faster than delayed)."""
    spec = replace(_spec(tensor=2, pipeline=1, micro_batch=1), precision="fp8")
    auto = plan_experiment(spec).plan.stages[0]
    assert auto.execution.fp8_recipe == "tensorwise"
    delayed = plan_experiment(replace(spec, fp8_recipe="delayed")).plan.stages[0]
    assert delayed.execution.fp8_recipe == "delayed"
    assert delayed.layout == auto.layout
    assert auto.estimate.step_time_s > delayed.estimate.step_time_s
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(replace(spec, fp8_recipe="mxfp8"))
    assert [d.code for d in err.value.diagnostics if d.is_error] == ["E164"]


def test_a_pipelined_rollout_says_how_it_runs():
    """A ppo stage at pipeline = 2: the plan notes that its rollouts decode stage after stage (the runtime's
    generator does), with the rollout's share of the step from the cost model and the hidden-state
    transfers of a forward (here with virtual stages, which the search picks: pp x vp - 1 of them)."""
    stages = (StageSpec(name="pretrain", kind="pretrain", global_batch=128, steps=10),
              StageSpec(name="ppo", kind="ppo", after=("pretrain",), global_batch=64, steps=10,
                        parallel=ParallelSpec(tensor=None, pipeline=2)))
    result = plan_experiment(_spec(stages=stages), target=NEMOC_RUNTIME)
    ppo = result.plan.stage("ppo")
    assert ppo.layout.pp == 2 and ppo.layout.vp and ppo.layout.vp > 1
    note = next(n for n in next(r for r in result.stages if r.name == "ppo").notes if "stage after stage" in n)
    assert f"rollout {ppo.estimate.parts['rollout']:.3g} s" in note
    assert f"{ppo.layout.vp} virtual stages each" in note and f"plus {2 * ppo.layout.vp - 1} hidden-state" in note


def test_packed_sft_costs_attention_within_the_stated_sample_length():
    """An `sft` stage with `pack = true` and `sample_tokens` runs variable-length attention (each token
    attends within its own sample), so the plan costs attention over the sample, not the sequence: the
    same layout and memory, a shorter step, and a note saying so. Without `sample_tokens`, with
    `pack = false`, or with the unfused core (which masks but computes every score) the whole
    sequence is costed, and pretraining never reads the field."""
    def sft(**params):
        stage = StageSpec(name="sft", kind="sft", global_batch=64, steps=10,
                          params={"init": "checkpoints/hf", **params})
        return _spec(stages=(stage,), tensor=1, pipeline=1, micro_batch=1)

    def planned(spec):
        result = plan_experiment(spec, target=NEMOC_RUNTIME)
        return result.plan.stages[0], result.stages[0].notes

    full, full_notes = planned(sft())
    packed, notes = planned(sft(sample_tokens=256))
    assert packed.layout == full.layout and packed.memory == full.memory
    assert packed.estimate.step_time_s < 0.9 * full.estimate.step_time_s  # 8K tokens: attention is > 10 %
    assert any("within packed samples of 256 tokens" in n for n in notes)
    assert any("set `sample_tokens`" in n for n in full_notes)
    unpacked, _ = planned(sft(sample_tokens=256, pack=False))
    assert unpacked.estimate == full.estimate
    unfused = replace(sft(sample_tokens=256), attention_backend="unfused")
    assert planned(unfused)[0].estimate == planned(replace(sft(), attention_backend="unfused"))[0].estimate
    longer, _ = planned(sft(sample_tokens=10**6))  # a sample never spans more than the sequence
    assert longer.estimate == full.estimate


def test_stage_dropout_is_costed_and_sized():
    """A stage's `dropout` (the runtime's hidden and attention dropout) keeps 1-byte masks for the backward
    and, with the unfused core, drops out every score: the plan charges both (it priced dropout 0 before)."""
    def with_dropout(p, backend):
        stage = StageSpec(name="pretrain", kind="pretrain", global_batch=64, tokens=10**9, seq_length=2048,
                          params={"dropout": p})
        return replace(_spec(stages=(stage,), tensor=4, pipeline=1, micro_batch=1, recompute="selective"),
                       attention_backend=backend)

    for backend in ("flash", "unfused"):
        off = plan_experiment(with_dropout(0.0, backend), target=NEMOC_RUNTIME).plan.stages[0]
        on = plan_experiment(with_dropout(0.1, backend), target=NEMOC_RUNTIME).plan.stages[0]
        assert on.layout == off.layout
        assert on.memory.activations > off.memory.activations
        assert on.estimate.step_time_s > off.estimate.step_time_s


def test_overlap_param_gather_is_dropped_for_the_kinds_that_step_outside_the_training_loop():
    """GRPO and PPO step through their own iteration with rollouts between steps, which the runtime's
    parameter gather (core/param_gather.py) does not cover: their plans gather after the optimizer step and
    say so; the kinds trained on the core loop (sft, dpo, ...) keep the overlap."""
    spec, _ = load_spec("examples/alignment_kinds.nemo")
    spec = replace(spec, parallel=replace(spec.parallel, distributed_optimizer=True, overlap_param_gather=True))
    result = plan_experiment(spec, target=NEMOC_RUNTIME)
    assert not result.plan.stage("grpo").layout.overlap_param_gather
    assert not result.plan.stage("grpo").execution.overlaps.param_gather
    [grpo] = [r for r in result.stages if r.name == "grpo"]
    assert any("overlap_param_gather = false for this grpo stage" in n for n in grpo.notes), grpo.notes
    assert result.plan.stage("sft").layout.overlap_param_gather
