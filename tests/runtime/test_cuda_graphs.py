"""CUDA graphs in the training loop (runtime/core/graphs.py): which Megatron-Core object each plan builds and
when Transformer Engine's graphs are captured (CPU, with Megatron-Core 0.16.1's own classes), and, on a CUDA
machine with Transformer Engine only, a run per implementation that trains as the eager run does."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from nemoc.compiler.plan import HostExecution
from nemoc.runtime.core import graphs as graphs_mod


def _model(impl: str, scope: tuple[str, ...] = (), warmup: int = 2) -> list:
    """A model chunk as get_model_config sees it: its TransformerConfig, validated by Megatron-Core."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, cuda_graph_impl=impl,
                               cuda_graph_scope=list(scope), cuda_graph_warmup_steps=warmup)
    return [SimpleNamespace(config=config)]


def _schedule(**kwargs):
    return "eager"


def test_no_graphs_run_megatrons_schedule_unwrapped():
    with mock.patch.object(graphs_mod, "get_forward_backward_func", lambda: _schedule):
        for host in (None, HostExecution("none", (), True, 100)):
            g = graphs_mod.StepGraphs(model=[object()], optimizer=None, host=host, seq_length=32, micro_batch=2)
            assert g.forward_backward is _schedule and not g.whole_step
            assert g.before_step() is False


def test_local_per_layer_graphs_are_captured_by_megatron_core_itself():
    """cuda_graph_impl = local with layer scopes: the schedules' CudaGraphManager captures; the loop runs the
    plain schedule (wrapping it would capture twice)."""
    host = HostExecution("local", ("attn",), True, 100)
    with mock.patch.object(graphs_mod, "get_forward_backward_func", lambda: _schedule):
        g = graphs_mod.StepGraphs(model=_model("local", ("attn",)), optimizer=None, host=host, seq_length=32,
                                  micro_batch=2)
    assert g.forward_backward is _schedule and not g.whole_step and g.before_step() is False


def test_full_iteration_wraps_the_schedule_in_megatron_cores_full_cuda_graph_wrapper():
    """[full_iteration]: Megatron-Core 0.16.1's FullCudaGraphWrapper around the schedule, warming up for the
    TransformerConfig's cuda_graph_warmup_steps (Megatron-LM's train())."""
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper

    host = HostExecution("local", ("full_iteration",), True, 100)
    with mock.patch.object(graphs_mod, "get_forward_backward_func", lambda: _schedule):
        g = graphs_mod.StepGraphs(model=_model("local", ("full_iteration",), warmup=5), optimizer=None, host=host,
                                  seq_length=32, micro_batch=2)
    assert isinstance(g.forward_backward, FullCudaGraphWrapper) and g.whole_step
    assert g.forward_backward.forward_backward_func is _schedule
    assert g.forward_backward.cuda_graph_warmup_steps == 5


class _FakeHelper:
    instances: list = []

    def __init__(self, *, model, config, seq_length, micro_batch_size, optimizers):
        self.args = dict(model=model, config=config, seq_length=seq_length, micro_batch_size=micro_batch_size,
                         optimizers=optimizers)
        self.captures = 0
        _FakeHelper.instances.append(self)

    def graphs_created(self):
        return self.captures > 0

    def create_cudagraphs(self):
        self.captures += 1


def test_transformer_engine_graphs_are_captured_once_after_the_warmup_steps():
    """transformer_engine: TECudaGraphHelper(model, config, seq_length, micro_batch_size, [optimizer]) built at
    the start, create_cudagraphs() before step warmup + 1 of this run, once (Megatron-LM training.py)."""
    from megatron.core.transformer import cuda_graphs

    host = HostExecution("transformer_engine", ("attn", "mlp"), True, 100)
    model, optimizer = _model("transformer_engine", ("attn", "mlp"), warmup=3), object()
    with mock.patch.object(cuda_graphs, "TECudaGraphHelper", _FakeHelper), \
            mock.patch.object(graphs_mod, "get_forward_backward_func", lambda: _schedule):
        g = graphs_mod.StepGraphs(model=model, optimizer=optimizer, host=host, seq_length=32, micro_batch=2)
    helper = _FakeHelper.instances[-1]
    assert helper.args == dict(model=model, config=model[0].config, seq_length=32, micro_batch_size=2,
                               optimizers=[optimizer])
    captured_at = []
    for step in range(1, 8):
        if g.before_step():
            captured_at.append(step)
        g.after_step()
    assert captured_at == [4] and helper.captures == 1
    assert g.forward_backward is _schedule  # the layers replay their graphs inside the plain schedule


def test_transformer_engines_helper_needs_te_here():
    """Without TE's make_graphed_callables Megatron-Core's helper asserts; megatron_args refuses such a plan
    before the loop starts (test_model_args), so the loop never meets this."""
    from megatron.core.transformer import cuda_graphs

    if cuda_graphs.HAVE_TE_GRAPHS:
        pytest.skip("Transformer Engine's graphs import here")
    host = HostExecution("transformer_engine", (), True, 100)
    with pytest.raises(AssertionError, match="without TE"), \
            mock.patch.object(graphs_mod, "get_forward_backward_func", lambda: _schedule):
        graphs_mod.StepGraphs(model=_model("transformer_engine"), optimizer=None, host=host, seq_length=32,
                              micro_batch=2)


def _cuda_and_te() -> bool:
    from nemoc.runtime import mcore_cpu
    from nemoc.runtime.model import have_transformer_engine

    return torch.cuda.is_available() and not mcore_cpu.is_applied() and have_transformer_engine()


gpu_only = pytest.mark.skipif(not _cuda_and_te(), reason="CUDA graphs need a CUDA GPU and Transformer Engine")


@gpu_only
@pytest.mark.parametrize("impl,scope", [("transformer_engine", ()), ("local", ("full_iteration",)),
                                        ("local", ())], ids=["te", "full_iteration", "local"])
def test_a_graphed_run_trains_as_the_eager_run(tmp_path, kit, train_data, impl, scope):
    """GPU only: one process, Transformer Engine's layers, no dropout: the graphed run's losses are the eager
    run's (the graphs replay the same kernels on the same static buffers) past the warm-up and capture."""
    def plan_with(host: HostExecution):
        stage = kit.stage_plan(lay=kit.layout(), steps=8)
        plan = dataclasses.replace(kit.make_plan(stage, precision="bf16", attention="auto"), kernels="te")
        stage = plan.stages[0]
        ex = dataclasses.replace(stage.execution, kernels="te", host=host)
        return dataclasses.replace(plan, stages=(dataclasses.replace(stage, execution=ex),))

    eager = kit.run_training(tmp_path / "eager", plan_with(HostExecution("none", (), True, 100)), 1,
                             data_prefix=train_data)
    assert eager.returncode == 0, eager.explain()
    graphed = kit.run_training(tmp_path / impl, plan_with(HostExecution(impl, scope, True, 100)), 1,
                               data_prefix=train_data)
    assert graphed.returncode == 0, graphed.explain()
    for step in range(1, 9):
        assert graphed.losses[step] == pytest.approx(eager.losses[step], rel=2e-2), (step, graphed.losses)
    if impl == "transformer_engine":
        events = [r for r in graphed.records if r.get("event") == "cuda_graphs_captured"]
        assert events and events[0]["step"] == 4  # after Megatron-Core's 3 warm-up steps
