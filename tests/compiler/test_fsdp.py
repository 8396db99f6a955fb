"""Megatron-FSDP (`parallel.megatron_fsdp`, ZeRO-3): its memory (weights and gradients sharded beside the
optimizer state, two gathered units in flight), its communication (per layer and micro batch: all-gather
before the forward and the backward, reduce-scatter after the backward, overlapped with the
neighbouring layer), the search's use of both, and the rules at the user's line (E176 distributed
optimizer, E177 pipeline = 1; the CPU plans it too)."""

from __future__ import annotations

import pytest

from nemoc.compiler import cost, memory
from nemoc.compiler.catalog import get_gpu
from nemoc.compiler.flops import param_counts
from nemoc.compiler.lower import compile_file
from nemoc.compiler.plan import Layout
from nemoc.compiler.planner import plan_experiment
from nemoc.compiler.catalog.models import get_preset
from nemoc.dsl.diagnostics import DiagnosticError, Severity

H100 = get_gpu("H100")


def lay(**kw) -> Layout:
    base = dict(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=64, micro_batch=1, global_batch=512, num_microbatches=8,
                sequence_parallel=False, distributed_optimizer=True, recompute="none")
    base.update(kw)
    return Layout(**base)


def test_zero3_shards_weights_and_gradients_beside_the_optimizer_state(model8b):
    kw = dict(seq_length=8192, gpu=H100, grad_bytes=4)
    zero1 = memory.estimate(model8b, lay(), **kw)
    zero3 = memory.estimate(model8b, lay(megatron_fsdp=True), **kw)
    assert zero3.weights == pytest.approx(zero1.weights / 64, rel=1e-6)
    assert zero3.gradients == pytest.approx(zero1.gradients / 64, rel=1e-6)
    assert zero3.optimizer == zero1.optimizer
    counts = param_counts(model8b)
    unit = max(counts.per_layer, counts.embedding)
    assert zero3.parts["fsdp_buffers"] == int(memory.FSDP_UNITS_IN_FLIGHT * unit * (2 + 4))
    assert zero3.total < zero1.total
    assert "fsdp_buffers" not in zero1.parts


def test_fsdp_communication_per_layer_and_micro_batch(model8b):
    """2 all-gathers (16-bit) + 1 reduce-scatter (grad dtype) of every layer per micro batch; exposed
    only beyond the neighbouring layer's compute, plus the first gather."""
    layout = lay(megatron_fsdp=True)
    lt = cost.layer_times(model8b, layout, H100, seq=8192, precision="bf16", attention_backend="flash", micro_batch=1)
    p = cost.DEFAULT_PARAMS
    trainable = 8.0e9
    t = cost.fsdp_exposed(model8b, layout, H100, lt, 8, p, trainable, 4)
    bw = cost._link_bw(H100, 64, 1, p)
    gather = trainable / model8b.layers * 2 * 63 / 64 / bw
    assert t >= gather  # at least the first layer's gather
    slow = cost.fsdp_exposed(model8b, layout, H100, lt, 8, p, trainable * 100, 4)  # comm-bound: all of it shows
    unit = trainable * 100 / model8b.layers * 63 / 64 / bw
    expected_layer = (2 * unit - lt.total * lt.forward_fraction) + (2 * unit + 4 * unit - lt.total * (1 - lt.forward_fraction))
    assert slow == pytest.approx(8 * model8b.layers * expected_layer + 2 * unit, rel=1e-9)
    assert cost.fsdp_exposed(model8b, lay(dp=1, global_batch=8, megatron_fsdp=True), H100, lt, 8, p, trainable) == 0.0
    est = cost.estimate(model8b, layout, gpu=H100, seq_length=8192)
    assert est.parts["dp_comm_exposed"] == pytest.approx(
        cost.fsdp_exposed(model8b, layout, H100, lt, 8, p, cost._trainable_params(model8b, layout, None, None), 4))


@pytest.fixture
def model8b():
    return get_preset("llama3_8b")


SRC = """experiment f {{
  cluster {{
    gpu = {gpu}
    nodes = {nodes}
    gpus_per_node = 8
  }}
  model llama3_8b {{
    seq_length = 8192
  }}
  parallel {{
    megatron_fsdp = true{parallel}
  }}
  data corpus {{
    path = "x/*.jsonl"
  }}
  stage pretrain {{
    data = [corpus]
    steps = 10
    global_batch = 512
  }}
}}
"""


def _compile(tmp_path, gpu="H100", nodes=8, parallel=""):
    path = tmp_path / "f.nemo"
    text = SRC.format(gpu=gpu, nodes=nodes, parallel=parallel)
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


def test_the_search_plans_fsdp_with_its_memory_and_communication(tmp_path):
    spec, errors, _ = _compile(tmp_path)
    assert errors == []
    stage = plan_experiment(spec).plan.stages[0]
    assert stage.layout.megatron_fsdp and stage.layout.pp == 1 and stage.layout.distributed_optimizer
    assert stage.memory.parts["fsdp_buffers"] > 0
    assert stage.estimate.parts["dp_comm_exposed"] > 0


@pytest.mark.parametrize("parallel, code, needle", [
    ("\n    distributed_optimizer = false", "E176", "distributed_optimizer"),
    ("\n    pipeline = 2", "E177", "pipeline"),
])
def test_fsdp_rules_at_the_users_line(tmp_path, parallel, code, needle):
    d, line = _error(tmp_path, parallel=parallel)
    assert d.code == code and ("megatron_fsdp" in line or needle in line)


def test_fsdp_plans_on_the_cpu(tmp_path):
    """E178 is retired: the runtime runs Megatron-FSDP on gloo (tests/runtime/test_train_fsdp.py); the
    quickstart's two CPU workers plan it with the distributed optimizer and no pipeline."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "examples" / "quickstart.nemo").read_text()
    text = text.replace("    data = auto\n", "    data = auto\n    megatron_fsdp = true\n", 1)
    path = tmp_path / "quickstart.nemo"
    path.write_text(text)
    spec, diags, _ = compile_file(str(path))
    assert [d for d in diags if d.severity == Severity.ERROR] == []
    stage = plan_experiment(spec).plan.stage("pretrain")
    assert stage.layout.megatron_fsdp and stage.layout.pp == 1 and stage.layout.distributed_optimizer
    assert stage.layout.dp == 2


def test_stages_the_target_wraps_in_ddp_plan_without_fsdp_and_say_so(tmp_path):
    """megatron_fsdp = true for the experiment: pretraining runs it; an sft stage, which the nemoc runtime wraps
    in DDP (runtime/target.py `megatron_fsdp=False` for the alignment kinds), is planned and costed without it,
    with a note naming why (plan and runtime agree)."""
    from nemoc.runtime.target import NEMOC_RUNTIME

    text = SRC.format(gpu="H100", nodes=8, parallel="").replace("""  stage pretrain {{""".replace("{{", "{"), """  data chat {
    path = "x/*.jsonl"
    format = chat
  }
  stage sft after pretrain {
    data = [chat]
    samples = 10K
    global_batch = 128
  }
  stage pretrain {""")
    path = tmp_path / "f.nemo"
    path.write_text(text)
    spec, diags, _ = compile_file(str(path))
    assert [d for d in diags if d.severity == Severity.ERROR] == []
    planned = plan_experiment(spec, target=NEMOC_RUNTIME)
    assert planned.plan.stage("pretrain").layout.megatron_fsdp
    sft = planned.plan.stage("sft")
    assert not sft.layout.megatron_fsdp and "fsdp_buffers" not in sft.memory.parts
    [result] = [r for r in planned.stages if r.name == "sft"]
    assert any("megatron_fsdp = false for this sft stage" in n for n in result.notes), result.notes
