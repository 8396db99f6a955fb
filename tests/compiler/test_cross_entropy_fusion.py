"""`cross_entropy_fusion = te | native | none` (auto: te with Transformer Engine, none on the local spec): the
value the plan records and says it took, the bytes and memory each is priced with, and the rules that refuse
(E183: te without Transformer Engine) or warn (W112: native rounds an fp32 / fp16 run's logit gradient to bf16)
at the user's line. The runtime's Megatron-Core fields: tests/runtime/test_model_args.py."""

from __future__ import annotations

import pytest

from nemoc.compiler import cost, memory
from nemoc.compiler.catalog import PRESETS, get_gpu
from nemoc.compiler.execution import cross_entropy_of
from nemoc.compiler.lower import compile_file
from nemoc.compiler.plan import Layout
from nemoc.compiler.planner import plan_experiment
from nemoc.dsl.diagnostics import DiagnosticError, render_all

SOURCE = """experiment k {{
  cluster {{ gpu = {gpu}  nodes = 1  gpus_per_node = {per_node} }}
  model llama3_8b {{ seq_length = 4096 }}
  {setting}
  stage pretrain {{ steps = 10  global_batch = 64 }}
}}
"""
CPU_SOURCE = """experiment k {{
  cluster {{ gpu = CPU  nodes = 1  gpus_per_node = 2 }}
  model tiny {{ layers = 2  hidden = 64  heads = 4  ffn_hidden = 256  vocab = 1024  seq_length = 128 }}
  precision = {precision}
  {setting}
  stage pretrain {{ steps = 10  global_batch = 4 }}
}}
"""


def _compile(tmp_path, setting: str, gpu: str = "H100"):
    path = tmp_path / "k.nemo"
    path.write_text(SOURCE.format(gpu=gpu, per_node=8, setting=setting))
    return compile_file(str(path))


def _compile_cpu(tmp_path, setting: str, precision: str = "fp32"):
    path = tmp_path / "c.nemo"
    path.write_text(CPU_SOURCE.format(precision=precision, setting=setting))
    return compile_file(str(path))


@pytest.mark.parametrize("value", ["te", "native", "none"])
def test_each_value_is_planned_and_recorded(tmp_path, value):
    spec, diags, _ = _compile(tmp_path, f"cross_entropy_fusion = {value}")
    assert not [d for d in diags if d.is_error] and spec.cross_entropy_fusion == value
    assert spec.span("cross_entropy_fusion").line == 4
    result = plan_experiment(spec)
    assert result.plan.stages[0].execution.fusions.cross_entropy == value
    assert not any("cross_entropy_fusion" in n for n in result.stages[0].notes)  # stated, not a default


def test_auto_takes_te_with_transformer_engine_and_none_on_the_local_spec_and_says_so(tmp_path):
    assert (cross_entropy_of("te", None), cross_entropy_of("local", None)) == ("te", "none")
    spec, _, _ = _compile(tmp_path, "")
    assert spec.cross_entropy_fusion is None
    result = plan_experiment(spec)
    assert result.plan.stages[0].execution.fusions.cross_entropy == "te"
    assert any("loss default taken (Transformer Engine" in n and "cross_entropy_fusion = te" in n
               for n in result.stages[0].notes)
    spec, _, _ = _compile_cpu(tmp_path, "")
    result = plan_experiment(spec)
    assert result.plan.stages[0].execution.fusions.cross_entropy == "none"
    assert any("loss default taken (the local spec): cross_entropy_fusion = none" in n for n in result.stages[0].notes)


def test_te_without_transformer_engine_is_refused_at_the_users_line(tmp_path):
    spec, diags, sources = _compile_cpu(tmp_path, "cross_entropy_fusion = te")
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(spec)
    [d] = [d for d in err.value.diagnostics if d.is_error]
    assert d.code == "E183" and "Transformer Engine" in d.message
    assert (d.span.line, d.span.col) == (5, 3)
    text = render_all([d], sources)
    assert "c.nemo:5:3: error[E183]" in text and "^^^" in text and "cross_entropy_fusion = native" in text
    for setting in ("cross_entropy_fusion = native", "cross_entropy_fusion = none"):  # what the CPU runs
        spec, _, _ = _compile_cpu(tmp_path, setting, precision="bf16")
        assert plan_experiment(spec).plan.stages[0].execution.fusions.cross_entropy == setting.split()[-1]


@pytest.mark.parametrize("precision, warned", [("fp32", True), ("bf16", False)])
def test_native_warns_where_it_rounds_the_gradient_to_bf16(tmp_path, precision, warned):
    spec, diags, _ = _compile_cpu(tmp_path, "cross_entropy_fusion = native", precision=precision)
    result = plan_experiment(spec)
    codes = [d.code for d in (*diags, *result.warnings)]
    assert ("W112" in codes) is warned


def test_each_loss_is_priced_by_its_passes_over_the_logits():
    """Bytes per logit (forward + backward): TE 6 + 4, Megatron-Core's native fused 22 + 10 (three compiled
    passes forward, one backward writing the fp32 softmax back and the bf16 gradient), unfused 38 + 14; the
    memory the loss keeps: 2 B (TE's in-place 16-bit gradient), 4 B (the fp32 softmax) for native and none."""
    assert cost.CROSS_ENTROPY_BYTES_NATIVE == (22.0, 10.0)
    model = PRESETS["llama3_8b"]
    lay = Layout(tp=2, pp=1, vp=None, cp=1, ep=1, etp=1, dp=4, micro_batch=1, global_batch=64, num_microbatches=16,
                 sequence_parallel=True, distributed_optimizer=True, recompute="none")
    hw, seq = get_gpu("H100"), 4096
    lt = cost.layer_times(model, lay, hw, seq=seq, precision="bf16", attention_backend="flash", micro_batch=1)
    out = {ce: cost._stage_times(model, lay, hw, lt, seq=seq, micro_batch=1, backward=2.0, params=cost.DEFAULT_PARAMS,
                                 kernels="te", cross_entropy=ce)[2] for ce in ("te", "native", "none")}
    logits = seq * cost.padded_vocab(model.vocab, lay.tp) / lay.tp
    assert out["native"] - out["te"] == pytest.approx((32.0 - 10.0) * logits / hw.hbm_bw, rel=1e-9)
    assert out["none"] - out["native"] == pytest.approx((52.0 - 32.0) * logits / hw.hbm_bw, rel=1e-9)
    mem = {ce: memory.estimate(model, lay, seq_length=seq, gpu="H100", cross_entropy=ce).parts["logits"]
           for ce in ("te", "native", "none")}
    assert mem == {"te": 2 * logits, "native": 4 * logits, "none": 4 * logits}


def test_the_plans_step_time_orders_the_losses(tmp_path):
    """The same fixed layout planned with each loss: te < native < none in step time."""
    fixed = "parallel { tensor = 2  pipeline = 1  data = 4  micro_batch = 1  recompute = none }"
    steps = {}
    for value in ("te", "native", "none"):
        spec, _, _ = _compile(tmp_path, f"{fixed}\n  cross_entropy_fusion = {value}")
        steps[value] = plan_experiment(spec).plan.stages[0].estimate.step_time_s
    assert steps["te"] < steps["native"] < steps["none"]


def test_the_other_passes_run_the_experiments_loss_and_the_rollout_none():
    """The DPO reference forward calls the model with `labels=` (runtime/align/common.py `token_logprobs`), so it
    runs the experiment's loss: its pass is priced with that loss's forward bytes per logit (unfused 38, TE 6);
    the PPO rollout's prefill only takes the logits (runtime/generation.py), so no loss is priced there."""
    from nemoc.compiler.flops import stage_work

    model = PRESETS["llama3_8b"]
    lay = Layout(tp=2, pp=1, vp=None, cp=1, ep=1, etp=1, dp=4, micro_batch=1, global_batch=64, num_microbatches=16,
                 sequence_parallel=True, distributed_optimizer=True, recompute="none")
    hw, seq = get_gpu("H100"), 4096
    dpo = {ce: cost.estimate(model, lay, gpu="H100", seq_length=seq, stage_kind="dpo", cross_entropy=ce).parts
           for ce in ("te", "none")}
    work = stage_work("dpo")
    reference = sum(p.count for p in work.passes[1:])
    logits = work.rows * seq * cost.padded_vocab(model.vocab, lay.tp) / lay.tp  # per micro batch
    expected = reference * lay.num_microbatches * (38.0 - 6.0) * logits / hw.hbm_bw
    assert dpo["none"]["other_passes"] - dpo["te"]["other_passes"] == pytest.approx(expected, rel=1e-9)
    ppo = {ce: cost.estimate(model, lay, gpu="H100", seq_length=seq, stage_kind="ppo", cross_entropy=ce).parts
           for ce in ("te", "none")}
    assert ppo["te"]["rollout"] == ppo["none"]["rollout"] > 0


def test_auto_takes_native_under_a_whole_iteration_cuda_graph_and_says_why(tmp_path):
    """Under cuda_graph_scope = [full_iteration] Megatron-Core runs TE's capturable loss, which needs TE >= 2.7;
    the plan does not know the target's TE version, so auto takes native (graph-safe on any TE) with a note
    saying why; a written te stays te (the runtime refuses it on an older TE), and other scopes keep te."""
    graphs = "cuda_graph_impl = local\n  cuda_graph_scope = [full_iteration]"
    spec, _, _ = _compile(tmp_path, graphs)
    result = plan_experiment(spec)
    assert result.plan.stages[0].execution.fusions.cross_entropy == "native"
    assert any("cross_entropy_fusion = native, not te" in n and "Transformer Engine >= 2.7" in n
               for n in result.stages[0].notes)
    spec, _, _ = _compile(tmp_path, graphs + "\n  cross_entropy_fusion = te")
    assert plan_experiment(spec).plan.stages[0].execution.fusions.cross_entropy == "te"
    spec, _, _ = _compile(tmp_path, "cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [attn]")
    assert plan_experiment(spec).plan.stages[0].execution.fusions.cross_entropy == "te"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_auto_under_a_whole_iteration_graph_keeps_an_fp32_or_fp16_gradient(tmp_path, precision):
    """Megatron-Core's native loss rounds the logits' gradient to bf16 (W112), so auto under a whole-iteration
    CUDA graph takes the unfused loss (capturable, exact) with fp32 / fp16, says why, and nothing warns; a
    written native still warns."""
    graphs = f"precision = {precision}\n  cuda_graph_impl = local\n  cuda_graph_scope = [full_iteration]"
    spec, diags, _ = _compile(tmp_path, graphs)
    result = plan_experiment(spec)
    assert result.plan.stages[0].execution.fusions.cross_entropy == "none"
    assert any("not native either" in n and "W112" in n for n in result.stages[0].notes)
    assert "W112" not in [d.code for d in (*diags, *result.warnings)]
    spec, diags, _ = _compile(tmp_path, graphs + "\n  cross_entropy_fusion = native")
    result = plan_experiment(spec)
    assert "W112" in [d.code for d in (*diags, *result.warnings)]
