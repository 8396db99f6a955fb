"""Token dropping, drop-and-pad and the router settings of the MoE performance recipes (model fields
`moe_capacity_factor`, `moe_pad_to_capacity`, `moe_token_drop_policy`, `moe_load_balancing`,
`moe_aux_loss_coeff`, `moe_shared_expert_overlap`, DeepSeek-V3's `moe_router_score`, `moe_expert_bias`,
`moe_router_groups` / `moe_router_group_topk`): the rules that mirror Megatron-Core 0.16.1's
`__post_init__` checks at the user's line (E143-E149, E156, E174's `moe` scope), and their cost and memory
terms (drop-and-pad: every expert exactly c x its mean rows, no busiest-rank factor; dropping only
caps the busiest rank; the shared expert's GEMMs hidden behind the dispatch)."""

from __future__ import annotations

import dataclasses

import pytest

from nemoc.compiler import memory
from nemoc.compiler.catalog import get_gpu
from nemoc.compiler.cost import layer_times, moe_max_load, moe_rows_factor
from nemoc.compiler.execution import moe_execution
from nemoc.compiler.lower import compile_file
from nemoc.compiler.plan import Layout, MoeExecution
from nemoc.compiler.planner import plan_experiment
from nemoc.compiler.spec import ModelSpec
from nemoc.dsl.diagnostics import DiagnosticError

MOE = ModelSpec(name="moe", layers=8, hidden=2048, heads=16, query_groups=4, ffn_hidden=5632, vocab=32000,
                seq_length=4096, experts=16, top_k=2, moe_ffn_hidden=1408)
H100 = get_gpu("H100")
A2A = MoeExecution("alltoall", True, True)


def lay(**kw) -> Layout:
    base = dict(tp=1, pp=1, vp=None, cp=1, ep=8, etp=1, dp=8, micro_batch=1, global_batch=64, num_microbatches=8,
                sequence_parallel=False, distributed_optimizer=True, recompute="none")
    base.update(kw)
    return Layout(**base)


def times(model=MOE, layout=None, moe=A2A):
    return layer_times(model, layout or lay(), H100, seq=4096, precision="bf16", attention_backend="flash",
                       micro_batch=1, moe=moe)


def padded(c):
    return dataclasses.replace(MOE, moe_capacity_factor=c, moe_pad_to_capacity=True)


# ------------------------------------------------------------------------------------- cost and memory


def test_drop_and_pad_runs_exactly_the_capacity_without_a_busiest_rank_factor():
    dropless = moe_max_load(MOE, lay(), 4096)
    assert dropless > 1.0
    assert moe_rows_factor(MOE, lay(), 4096) == dropless
    assert moe_rows_factor(padded(1.0), lay(), 4096) == 1.0
    assert moe_rows_factor(padded(1.25), lay(), 4096) == 1.25
    # dropping without padding only caps the busiest rank (dropped tokens only reduce work)
    dropped = dataclasses.replace(MOE, moe_capacity_factor=1.0)
    assert moe_rows_factor(dropped, lay(), 4096) == 1.0
    assert moe_rows_factor(dataclasses.replace(MOE, moe_capacity_factor=4.0), lay(), 4096) == dropless
    # even at EP 1 (no busiest-rank factor) padding to c > 1 costs c x the rows
    assert moe_rows_factor(padded(2.0), lay(ep=1, dp=64), 4096) == 2.0


def test_the_dispatch_and_the_expert_gemms_scale_with_the_rows_factor():
    base, one, two = times(), times(padded(1.0)), times(padded(2.0))
    # the all-to-all carries the rows: exactly proportional to the factor
    assert one.ep_comm == pytest.approx(base.ep_comm / moe_max_load(MOE, lay(), 4096), rel=1e-12)
    assert two.ep_comm == pytest.approx(2.0 * one.ep_comm, rel=1e-12)
    # padded to c = 1 the expert GEMMs run the mean rows, less than dropless's busiest rank
    assert one.gemm < base.gemm < two.gemm
    assert (one.attention, one.tp_comm) == (base.attention, base.tp_comm)


def test_padded_expert_activations_hold_the_capacity():
    def mlp(model):
        return memory.layer_activations(model, seq=4096, micro_batch=1, tp=1, sp=False, etp=1,
                                        attention_backend="flash").mlp
    assert mlp(padded(1.0)) == mlp(MOE)
    assert mlp(padded(2.0)) > mlp(MOE)
    assert mlp(dataclasses.replace(MOE, moe_capacity_factor=0.5)) < mlp(MOE)  # dropped rows are not kept
    assert mlp(dataclasses.replace(MOE, moe_capacity_factor=2.0)) == mlp(MOE)  # unpadded: never above the mean
    # the expert tensors (all but router logits and norms) scale with c
    router = 4.0 * 4096 * MOE.experts
    experts = mlp(MOE) - router - 2 * 4096 * MOE.hidden  # the MLP's input (2 bytes x sbh) is not routed
    assert mlp(padded(2.0)) - mlp(MOE) == pytest.approx(experts, rel=1e-9)


def test_padded_dispatch_buffers_hold_the_capacity():
    kw = dict(seq_length=4096, gpu=H100)
    dropless = memory.estimate(MOE, lay(), **kw).parts["moe_dispatch"]
    assert memory.estimate(padded(1.0), lay(), **kw).parts["moe_dispatch"] == dropless
    assert memory.estimate(padded(1.5), lay(), **kw).parts["moe_dispatch"] == pytest.approx(1.5 * dropless, rel=1e-12)


def test_shared_expert_overlap_hides_its_gemms_behind_the_dispatch():
    shared = dataclasses.replace(MOE, shared_expert_ffn_hidden=2816)
    plain, over = times(shared), times(dataclasses.replace(shared, moe_shared_expert_overlap=True))
    hidden = plain.ep_comm - over.ep_comm
    assert hidden > 0 and over.gemm == plain.gemm
    # what is hidden is the shorter of the two: the shared GEMMs' time (or all of the exchange)
    no_shared = times(MOE)
    assert hidden <= plain.gemm - no_shared.gemm + 1e-15 and over.ep_comm >= 0.0
    # the allgather dispatcher has no such overlap (E145 refuses the combination)
    ag = MoeExecution("allgather", True, True)
    assert times(dataclasses.replace(shared, moe_shared_expert_overlap=True), moe=ag).ep_comm == \
        times(shared, moe=ag).ep_comm


def test_shared_expert_overlap_takes_the_alltoall_dispatcher_when_auto():
    shared = dataclasses.replace(MOE, shared_expert_ffn_hidden=2816, moe_shared_expert_overlap=True)
    assert moe_execution(shared, "local", 1).dispatcher == "alltoall"
    assert moe_execution(dataclasses.replace(shared, moe_shared_expert_overlap=False), "local", 1).dispatcher == \
        "allgather"


# ---------------------------------------------------------------------------------------- the rules

SRC = """\
experiment e {{
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
    seq_length = 1024
    experts = 8
    top_k = 2
    moe_ffn_hidden = 512
{model}
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


def _plan_error(tmp_path, model, settings="", gpu="H100"):
    path = tmp_path / "m.nemo"
    text = SRC.format(gpu=gpu, model=model, settings=settings)
    path.write_text(text)
    spec, diags, _ = compile_file(str(path))
    assert not [d for d in diags if d.is_error], diags
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(spec)
    errors = [d for d in err.value.diagnostics if d.is_error]
    assert len(errors) == 1, errors
    return errors[0], text.splitlines()


@pytest.mark.parametrize("code,model,settings,line,words", [
    ("E143", "    moe_pad_to_capacity = true", "", "moe_pad_to_capacity", "none (dropless)"),
    ("E144", "    moe_capacity_factor = 1.0\n    moe_load_balancing = sinkhorn", "", "moe_capacity_factor",
     "sinkhorn"),
    ("E145", "    shared_expert_ffn_hidden = 512\n    moe_shared_expert_overlap = true", "  moe_dispatcher = allgather",
     "moe_shared_expert_overlap", "allgather"),
    ("E146", "    moe_capacity_factor = 1.0\n    moe_pad_to_capacity = true", "  moe_dispatcher = flex",
     "moe_pad_to_capacity", "flex"),
    ("E147", "    moe_shared_expert_overlap = true", "", "moe_shared_expert_overlap", "shared_expert_ffn_hidden = 0"),
    ("E149", "    moe_expert_bias = true", "", "moe_expert_bias", "softmax"),
    ("E156", "    moe_router_group_topk = 2", "", "moe_router_group_topk", "moe_router_groups = 0"),
    ("E156", "    moe_router_groups = 4", "", "moe_router_groups", "moe_router_group_topk = 0"),
    ("E156", "    moe_router_groups = 3\n    moe_router_group_topk = 1", "", "moe_router_groups", "experts(8) % "),
    ("E156", "    moe_router_groups = 4\n    moe_router_group_topk = 5", "", "moe_router_group_topk", "> moe_router_groups(4)"),
    ("E156", "    moe_router_groups = 8\n    moe_router_group_topk = 1", "", "moe_router_groups",
     "moe_router_group_topk(1) * (experts(8) / moe_router_groups(8) = 1) = 1 < top_k(2)"),
    ("E144", "    moe_load_balancing = sinkhorn", "", "moe_load_balancing", "moe_aux_loss_coeff(0.01) != 0"),
    ("E144", "    moe_load_balancing = sinkhorn\n    moe_aux_loss_coeff = 1e-3", "", "moe_aux_loss_coeff",
     "moe_aux_loss_coeff(0.001) != 0"),
    ("E174", "", "  cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [moe]", "cuda_graph_scope",
     "drop-and-pad"),
    ("E174", "    moe_capacity_factor = 1.0", "  cuda_graph_impl = transformer_engine\n"
     "  cuda_graph_scope = [moe_router, moe_preprocess]", "cuda_graph_scope", "to the host"),
])
def test_each_megatron_check_is_an_error_at_the_users_line(tmp_path, code, model, settings, line, words):
    d, lines = _plan_error(tmp_path, model, settings)
    assert d.code == code and line in lines[d.span.line - 1], (d, lines[d.span.line - 1])
    assert words in d.message + " " + (d.equation or ""), d


def test_shared_expert_overlap_on_the_cpu_is_an_error_at_its_line(tmp_path):
    d, lines = _plan_error(tmp_path, "    shared_expert_ffn_hidden = 512\n    moe_shared_expert_overlap = true",
                           gpu="CPU")
    assert d.code == "E148" and "moe_shared_expert_overlap" in lines[d.span.line - 1]


def test_drop_and_pad_makes_the_moe_graph_scope_valid_and_the_plan_carries_it(tmp_path):
    from nemoc.compiler.plan import from_json, to_json

    path = tmp_path / "m.nemo"
    path.write_text(SRC.format(gpu="H100", model="    moe_capacity_factor = 1.0\n    moe_pad_to_capacity = true\n"
                                                 "    moe_token_drop_policy = position\n"
                                                 "    moe_load_balancing = seq_aux_loss\n    moe_aux_loss_coeff = 1e-3\n"
                                                 "    moe_router_score = sigmoid\n    moe_expert_bias = true\n"
                                                 "    moe_router_groups = 4\n    moe_router_group_topk = 2\n"
                                                 "    moe_topk_scaling_factor = 2.5",
                               settings="  cuda_graph_impl = transformer_engine\n  cuda_graph_scope = [moe]"))
    spec, diags, _ = compile_file(str(path))
    assert not [d for d in diags if d.is_error], diags
    plan = plan_experiment(spec).plan
    assert plan.stages[0].execution.host.cuda_graph_scope == ("moe",)
    m = from_json(to_json(plan)).model
    assert (m.moe_capacity_factor, m.moe_pad_to_capacity, m.moe_token_drop_policy, m.moe_load_balancing,
            m.moe_aux_loss_coeff) == (1.0, True, "position", "seq_aux_loss", 1e-3)
    assert (m.moe_router_score, m.moe_expert_bias, m.moe_router_groups, m.moe_router_group_topk,
            m.moe_topk_scaling_factor) == ("sigmoid", True, 4, 2, 2.5)
    # the router's scores, bias and groups change no time or memory term (Megatron-Core's alltoall
    # dispatcher sends one row per selected expert whatever groups they come from)
    stage = plan_experiment(spec).plan.stages[0]
    plain = dataclasses.replace(spec, model=dataclasses.replace(
        spec.model, moe_router_score="softmax", moe_expert_bias=False, moe_router_groups=0, moe_router_group_topk=0,
        moe_topk_scaling_factor=None))
    other = plan_experiment(plain).plan.stages[0]
    assert (stage.layout, stage.estimate.step_time_s, stage.memory) == (other.layout, other.estimate.step_time_s,
                                                                        other.memory)


def test_the_searchs_step_time_bound_holds_with_drop_and_pad_and_the_shared_overlap():
    """The branch-and-bound's lower bound (`cost.step_time_lower_bound`) stays below every member's
    estimate: c is a constant per row, and the exposed exchange max(shared GEMMs, ep_comm) per row never
    grows with the micro batch."""
    from nemoc.compiler import cost

    models = (padded(1.0), dataclasses.replace(padded(1.25), shared_expert_ffn_hidden=2816,
                                               moe_shared_expert_overlap=True),
              dataclasses.replace(MOE, moe_capacity_factor=1.0, shared_expert_ffn_hidden=1408,
                                  moe_shared_expert_overlap=True))
    for model in models:
        for layout in (lay(micro_batch=8, num_microbatches=1, global_batch=64),
                       lay(pp=2, dp=4, ep=4, micro_batch=8, num_microbatches=2, global_batch=64)):
            bound = cost.step_time_lower_bound(model, layout, micro_batches=(1, 8), gpu=H100, seq_length=4096,
                                               moe=A2A)
            n = layout.num_microbatches * layout.micro_batch
            for mb in (1, 2, 4, 8):
                for rc in ("none", "full"):
                    member = dataclasses.replace(layout, micro_batch=mb, num_microbatches=n // mb, recompute=rc)
                    t = cost.estimate(model, member, gpu=H100, seq_length=4096, moe=A2A).step_time_s
                    assert bound <= t * (1 + 1e-9), (model, member, bound, t)


def test_routing_fields_on_a_dense_model_are_an_error_at_their_line(tmp_path):
    path = tmp_path / "m.nemo"
    text = SRC.format(gpu="H100", model="    moe_capacity_factor = 1.0", settings="").replace(
        "    experts = 8\n    top_k = 2\n    moe_ffn_hidden = 512\n", "")
    path.write_text(text)
    spec, diags, _ = compile_file(str(path))
    with pytest.raises(DiagnosticError) as err:
        plan_experiment(spec)
    [d] = [d for d in err.value.diagnostics if d.is_error]
    assert d.code == "E171" and "moe_capacity_factor = 1.0" in text.splitlines()[d.span.line - 1]


def test_sinkhorn_without_an_auxiliary_loss_plans(tmp_path):
    path = tmp_path / "m.nemo"
    path.write_text(SRC.format(gpu="H100", settings="",
                               model="    moe_load_balancing = sinkhorn\n    moe_aux_loss_coeff = 0"))
    spec, diags, _ = compile_file(str(path))
    assert not [d for d in diags if d.is_error], diags
    assert plan_experiment(spec).plan.stages[0].layout.world_size == 8

