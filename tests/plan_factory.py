"""Build small compiled `Plan`s in Python for the graph, executor and data tests (no planner needed).

Importable from any test as `from plan_factory import make_plan, make_stage` (pytest puts `tests/` on
sys.path because `tests/conftest.py` lives there).
"""

from __future__ import annotations

from dataclasses import replace

from nemoc.compiler.execution import stage_execution
from nemoc.compiler.plan import Estimate, Execution, Layout, MemoryBreakdown, Plan, StagePlan
from nemoc.compiler.spec import CheckpointSpec, ClusterSpec, DataSpec, ModelSpec, OptimizerSpec, ScheduleSpec

TINY_MODEL = ModelSpec(name="tiny", layers=2, hidden=64, heads=4, query_groups=4, ffn_hidden=256, vocab=512,
                       seq_length=64)


def make_layout(*, tp=1, pp=1, dp=1, micro_batch=2, global_batch=4) -> Layout:
    return Layout(tp=tp, pp=pp, vp=None, cp=1, ep=1, etp=1, dp=dp, micro_batch=micro_batch,
                  global_batch=global_batch, num_microbatches=global_batch // (micro_batch * dp),
                  sequence_parallel=False, distributed_optimizer=False, recompute="none")


def make_execution(model: ModelSpec, layout: Layout, *, kind="pretrain", precision="fp32", attention="unfused",
                   kernels="local", gpu="CPU", seq_length=64, peft=None, params=None) -> Execution:
    """What the planner would record for a hand-written stage (the compiler's own `stage_execution`)."""
    return stage_execution(model=model, gpu=gpu, layout=layout, split=None, stage_kind=kind, precision=precision,
                           attention_backend=attention, kernels=kernels, seq_length=seq_length, peft=peft,
                           params=params)


def with_executions(plan: Plan) -> Plan:
    """`plan` with every stage's `Execution` recomputed from its layout and the plan's settings (a
    pipeline split the stage's execution already states is kept)."""
    def execution(s):
        ex = make_execution(plan.model, s.layout, kind=s.kind, precision=plan.precision,
                            attention=plan.attention_backend, kernels=plan.kernels, gpu=plan.cluster.gpu,
                            seq_length=s.seq_length, peft=s.peft, params=s.params)
        kept = s.execution.pipeline if s.execution is not None else None
        return replace(ex, pipeline=kept) if kept is not None else ex

    return replace(plan, stages=tuple(replace(s, execution=execution(s)) for s in plan.stages))


def make_stage(name="pretrain", kind="pretrain", *, after=(), data=("web",), steps=20, layout=None, **kw) -> StagePlan:
    layout = layout or make_layout()
    kernels = kw.pop("kernels", "local")
    seq = kw.pop("seq_length", 64)
    return StagePlan(
        name=name, kind=kind, after=tuple(after), data=tuple(data), layout=layout,
        memory=MemoryBreakdown(weights=1, gradients=1, optimizer=1, activations=1, other=1, capacity=1 << 30),
        estimate=Estimate(step_time_s=0.1, tokens_per_s_per_gpu=1.0, model_tflops_per_gpu=0.0, mfu=0.0,
                          steps=steps, wall_time_s=1.0, gpu_hours=0.0, cost_usd=None),
        seq_length=seq, steps=steps, optimizer=kw.pop("optimizer", OptimizerSpec()),
        schedule=kw.pop("schedule", ScheduleSpec()), checkpoint=kw.pop("checkpoint", CheckpointSpec()),
        execution=make_execution(TINY_MODEL, layout, kind=kind, kernels=kernels, seq_length=seq), **kw)


def make_plan(root, *, data=None, stages=None, experiment="exp", model=TINY_MODEL) -> Plan:
    data = data if data is not None else (DataSpec(name="web", path="corpus.jsonl", format="jsonl", vocab_size=300),)
    return with_executions(Plan(
        experiment=experiment, model=model, cluster=ClusterSpec(gpu="CPU", nodes=1, gpus_per_node=2),
        precision="fp32", attention_backend="unfused", data=tuple(data),
        stages=tuple(stages if stages is not None else (make_stage(),)), root=str(root), kernels="local"))


def with_stage(plan: Plan, name: str, **changes) -> Plan:
    return with_executions(
        replace(plan, stages=tuple(replace(s, **changes) if s.name == name else s for s in plan.stages)))
