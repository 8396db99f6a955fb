"""Megatron-FSDP (`parallel.megatron_fsdp`, ZeRO-3): its memory (weights and gradients sharded beside the
optimizer state, two gathered units in flight), its communication (per layer and micro batch: all-gather
before the forward and the backward, reduce-scatter after the backward, overlapped with the
neighbouring layer), the search's use of both, and the rules at the user's line (E176 distributed
optimizer, E177 pipeline = 1, E181 a shard group of more than one rank, E182 tensor > 1 only on Transformer
Engine's layers; the CPU plans it too, with tensor = 1)."""

from __future__ import annotations

from dataclasses import replace

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


_ALIGN_STAGES = """  data chat {
    path = "x/*.jsonl"
    format = chat
  }
  data prefs {
    path = "x/*.jsonl"
    format = preference
  }
  data feedback {
    path = "x/*.jsonl"
    format = unpaired
  }
  stage sft after pretrain {
    data = [chat]
    samples = 10K
    global_batch = 128
    parallel {
      tensor = 1
    }
  }
  stage dpo after sft {
    data = [prefs]
    samples = 10K
    global_batch = 128
    parallel {
      tensor = 1
    }
  }
  stage reward after sft {
    data = [prefs]
    samples = 10K
    global_batch = 128
  }
  stage kto after sft {
    data = [feedback]
    samples = 10K
    global_batch = 128
  }
  data sums {
    path = "x/*.jsonl"
    format = prompt_response
  }
  stage grpo after sft {
    data = [sums]
    samples = 1K
    global_batch = 64
    num_generations = 4
    max_new_tokens = 256
    reward = contains
    beta = 0.04
    parallel {
      tensor = 1
    }
  }
  stage ppo after sft, reward {
    data = [sums]
    samples = 1K
    global_batch = 64
    max_new_tokens = 256
    parallel {
      tensor = 1
    }
  }
  stage lora_sft after pretrain {
    kind = sft
    data = [chat]
    samples = 10K
    global_batch = 128
    peft = lora(rank = 8)
  }
  stage pretrain {"""


def _aligned(tmp_path, parallel=""):
    from nemoc.runtime.target import NEMOC_RUNTIME

    text = SRC.format(gpu="H100", nodes=8, parallel=parallel).replace("  stage pretrain {", _ALIGN_STAGES)
    path = tmp_path / "f.nemo"
    path.write_text(text)
    spec, diags, _ = compile_file(str(path))
    assert [d for d in diags if d.severity == Severity.ERROR] == []
    planned = plan_experiment(spec, target=NEMOC_RUNTIME)
    return planned, {r.name: r.notes for r in planned.stages}


def test_the_alignment_stages_the_runtime_shards_plan_fsdp_with_a_full_reference(tmp_path):
    """megatron_fsdp = true for the experiment: the nemoc runtime wraps the trained model of sft, dpo and reward
    stages in Megatron-FSDP (runtime/align/trainer.py `_wrap`), so they are planned and sized with it: the
    policy's weights and gradients sharded over DP (ZeRO-3), its gathered layers in `fsdp_buffers`, FSDP's
    per-layer all-gathers in the exposed DP communication. DPO's frozen reference is a plain model: its
    weights count in full, so DPO's weights exceed SFT's by exactly one unsharded copy (same layout)."""
    from nemoc.compiler.flops import param_counts
    from nemoc.compiler.memory import weight_bytes

    planned, notes = _aligned(tmp_path)
    plan = planned.plan
    for name in ("sft", "dpo", "reward"):
        stage = plan.stage(name)
        assert stage.layout.megatron_fsdp, name
        assert stage.memory.parts["fsdp_buffers"] > 0 and stage.estimate.parts["dp_comm_exposed"] > 0, name
        assert not any("megatron_fsdp" in n for n in notes[name]), notes[name]
    sft, dpo = plan.stage("sft"), plan.stage("dpo")
    assert plan.stage("dpo").resident_models == ("policy", "reference")
    assert (sft.layout.tp, sft.layout.cp, sft.layout.dp) == (dpo.layout.tp, dpo.layout.cp, dpo.layout.dp) == (1, 1, 64)
    full = param_counts(plan.model).total * weight_bytes(dpo.execution.precision)  # padded vocabulary: ~0.1 %
    assert dpo.memory.weights - sft.memory.weights == pytest.approx(full, rel=0.01)
    assert sft.memory.weights == pytest.approx(full / 64, rel=0.01)


def test_a_lora_stage_plans_without_fsdp_and_says_so(tmp_path):
    """A LoRA stage (adapters on a frozen base) runs in DDP: planned and costed without FSDP, with a note naming
    why."""
    planned, notes = _aligned(tmp_path)
    assert planned.plan.stage("pretrain").layout.megatron_fsdp
    stage = planned.plan.stage("lora_sft")
    assert not stage.layout.megatron_fsdp and "fsdp_buffers" not in stage.memory.parts
    assert any("megatron_fsdp = false for this sft stage" in n and "LoRA adapters" in n for n in notes["lora_sft"])


def test_kto_grpo_and_ppo_plan_fsdp_trained_models_sharded_frozen_ones_whole(tmp_path):
    """The nemoc runtime wraps the trained models of kto, grpo and ppo in Megatron-FSDP too (their passes
    outside the schedules run through the wrapper: runtime/target.py), so the plan sizes them so: per GPU each
    trained model holds 1/DP of its weights (PPO: actor and critic), each frozen one all of them (KTO's and
    GRPO's reference; PPO's reference and reward model). Same layout as SFT, whose one trained model is the
    unit: KTO = SFT + one full copy, GRPO (a verifier reward, beta > 0) = SFT + one full copy, PPO = 2 x SFT +
    two full copies less the vocabulary output layer of the critic (its shard) and of the reward model (whole):
    both end in a scalar head (memory.SCALAR_HEAD_MODELS)."""
    from nemoc.compiler.flops import padded_vocab
    from nemoc.compiler.memory import weight_bytes

    planned, notes = _aligned(tmp_path)
    plan = planned.plan
    sft = plan.stage("sft")
    wb = weight_bytes(sft.execution.precision)
    total = param_counts(plan.model).total
    full = total * wb
    assert not plan.model.tie_embeddings
    head = padded_vocab(plan.model.vocab, 1) * plan.model.hidden - plan.model.hidden  # output layer -> scalar head
    for name, frozen, trained, scalar in (("kto", 1, 1, (0, 0)), ("grpo", 1, 1, (0, 0)), ("ppo", 2, 2, (1, 1))):
        stage = plan.stage(name)
        assert stage.layout.megatron_fsdp and stage.memory.parts["fsdp_buffers"] > 0, name
        assert not any("megatron_fsdp" in n for n in notes[name]), notes[name]
        assert (stage.layout.tp, stage.layout.cp, stage.layout.dp) == (1, 1, 64), name
        less = scalar[0] * head * wb / 64 + scalar[1] * head * wb  # the critic's shard, the reward model whole
        assert stage.memory.weights == pytest.approx(trained * sft.memory.weights + frozen * full - less,
                                                     rel=0.01), name
        assert stage.memory.gradients == pytest.approx(
            sft.memory.gradients * (trained - scalar[0] * head / total), rel=0.01), name
        assert stage.estimate.parts["fsdp_gathers_outside_updates"] > 0, name
    assert sorted(plan.stage("ppo").resident_models) == ["actor", "critic", "reference", "reward"]


def test_overlap_param_gather_under_fsdp_is_kept_for_every_training_kind(tmp_path):
    """overlap_param_gather = true with megatron_fsdp = true: `nemoc check` accepts it and so does the runtime
    (Megatron-FSDP prefetches its all-gathers whatever the flag says: runtime/megatron_args.py
    `_check_param_gather`), so the planner keeps it, ppo and grpo too (without FSDP their rollouts between steps
    would read the distributed optimizer's stale shards, and the planner turns it off with a note), and the cost
    is FSDP's per-layer gathers either way (`cost.fsdp_exposed`: the flag does not enter it)."""
    planned, notes = _aligned(tmp_path, parallel="\n    overlap_param_gather = true")
    for name in ("pretrain", "sft", "dpo", "kto", "grpo", "ppo"):
        stage = planned.plan.stage(name)
        assert stage.layout.megatron_fsdp and stage.layout.overlap_param_gather, name
        assert not any("overlap_param_gather" in n for n in notes[name]), notes[name]
    off, _ = _aligned(tmp_path)
    for name in ("sft", "ppo"):
        assert off.plan.stage(name).estimate.parts["dp_comm_exposed"] == pytest.approx(
            planned.plan.stage(name).estimate.parts["dp_comm_exposed"], rel=1e-12)


def test_fsdp_gathers_of_the_updates_of_every_trained_model_and_of_its_forwards_outside_them(model8b):
    """PPO under FSDP: the actor's and the critic's updates (ppo_epochs each) gather and reduce-scatter per
    layer; the trained models' forwards outside the updates (old log-probs, values: one per micro batch each) and
    the rollout's (a prefill and one per decoded token, over the whole batch) gather every layer once more. When
    the communication dominates (weights x 1e4), each forward exposes its layers' gathers less the layer compute
    that hides the next one (< 0.1 %): (forwards x m + 1 + new_tokens) x (layers + 1) x one layer's gather."""
    from nemoc.compiler.flops import stage_work

    layout = lay(megatron_fsdp=True)
    p = cost.DEFAULT_PARAMS
    lt = cost.layer_times(model8b, layout, H100, seq=8192, precision="bf16", attention_backend="flash", micro_batch=1)
    work = stage_work("ppo", {"max_new_tokens": 64})
    trainable = cost._trainable_params(model8b, layout, None, None) * 1e4
    gather = trainable / model8b.layers * 2.0 * 63 / 64 / cost._link_bw(H100, 64, 1, p)
    rollout = (1e-9, 1e-9)
    got = cost.fsdp_forward_gathers(model8b, layout, H100, p, trainable, work, lt=lt, micro_batches=8, rollout=rollout)
    fwd = lt.total * lt.forward_fraction  # what one layer's forward hides of the next gather
    hidden = 2 * 8 * model8b.layers * fwd + (1 + 64) * 1e-9
    assert got == pytest.approx((2 * 8 + 1 + 64) * (model8b.layers + 1) * gather - hidden, rel=1e-9)
    assert hidden < 1e-3 * got
    # frozen models gather nothing, a rank with nothing to gather from neither
    kto = stage_work("kto")
    assert cost.fsdp_forward_gathers(model8b, layout, H100, p, trainable, kto, lt=lt, micro_batches=8) == \
        pytest.approx(8 * ((model8b.layers + 1) * gather - model8b.layers * fwd), rel=1e-9)
    assert cost.fsdp_forward_gathers(model8b, layout, H100, p, trainable, stage_work("dpo"), lt=lt, micro_batches=8) == 0
    assert cost.fsdp_forward_gathers(model8b, lay(dp=1, global_batch=8, megatron_fsdp=True), H100, p, trainable, work,
                                     lt=lt, micro_batches=8, rollout=rollout) == 0
    # both trained models' updates in PPO's exposed DP communication
    est = cost.estimate(model8b, layout, gpu=H100, seq_length=8192, stage_kind="ppo",
                        stage_params={"max_new_tokens": 64, "ppo_epochs": 2})
    one = cost.fsdp_exposed(model8b, layout, H100, lt, 8, p, cost._trainable_params(model8b, layout, None, None), 4)
    assert est.parts["dp_comm_exposed"] == pytest.approx(2 * 2 * one, rel=1e-9)
    assert est.parts["fsdp_gathers_outside_updates"] > 0


def _quickstart(tmp_path, **replace) -> tuple:
    """examples/quickstart.nemo (CPU workers, kernels local) with megatron_fsdp = true and `replace`d lines:
    (errors of the check or the plan, the source lines, the planned pretraining layout or None)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "examples" / "quickstart.nemo").read_text()
    text = text.replace("    data = auto\n", "    data = auto\n    megatron_fsdp = true\n", 1)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "quickstart.nemo"
    path.write_text(text)
    spec, diags, _ = compile_file(str(path))
    errors = [d for d in diags if d.severity == Severity.ERROR]
    if errors:
        return errors, text.splitlines(), None
    try:
        return [], text.splitlines(), plan_experiment(spec).plan.stage("pretrain").layout
    except DiagnosticError as err:
        return [d for d in err.diagnostics if d.is_error], text.splitlines(), None


def test_fsdp_at_one_data_parallel_rank_is_refused_at_the_users_line(tmp_path):
    """E181: Megatron-Core 0.16.1's FSDP doubles the gradients at a shard group of one rank
    (tests/runtime/test_train_fsdp.py shows it), and shards nothing there: `data = 1` is refused at the
    megatron_fsdp line with the equation and the hint; left auto on one worker no layout passes, and the
    plan's error names E181."""
    [d], lines, _ = _quickstart(tmp_path, **{"gpus_per_node = 2": "gpus_per_node = 1", "data = auto": "data = 1"})
    assert d.code == "E181" and lines[d.span.line - 1].strip() == "megatron_fsdp = true"
    assert d.equation == "megatron_fsdp = true with data(1) x context(1) = 1 rank to shard over"
    assert d.hint.startswith("FSDP shards over data-parallel ranks: at DP 1 it saves no memory")
    assert "use the distributed optimizer" in d.hint
    [d], _, _ = _quickstart(tmp_path, **{"gpus_per_node = 2": "gpus_per_node = 1"})
    assert d.code == "E131" and "E181" in d.message and "data(1) x context(1) = 1 rank" in d.equation


def test_fsdp_shard_groups_count_context_and_the_experts_group():
    """The dense shard group is DP x CP (the adapter's `get_data_parallel_group(with_context_parallel=True)`):
    DP 1 with CP 2 shards over two ranks. Expert weights shard over the expert data-parallel group, tp x cp
    x dp / (ep x etp): at DP 2 with EP 2 it is one rank, refused the same way."""
    from nemoc.compiler import rules
    from nemoc.compiler.rules.host import rule_fsdp_shard_group
    from nemoc.compiler.spec import ClusterSpec

    cluster = ClusterSpec(gpu="H100", nodes=1, gpus_per_node=8)
    dense = rules.Env(model=get_preset("llama3_8b"), cluster=cluster)
    moe = rules.Env(model=get_preset("mixtral_8x7b"), cluster=cluster)
    fsdp = rules.Sizes(tp=1, pp=1, cp=1, ep=1, etp=1, dp=2, megatron_fsdp=True)
    assert rule_fsdp_shard_group(dense, fsdp) is None
    assert rule_fsdp_shard_group(dense, replace(fsdp, dp=1, cp=2)) is None
    assert rule_fsdp_shard_group(dense, replace(fsdp, dp=1)).code == "E181"
    assert rule_fsdp_shard_group(dense, replace(fsdp, dp=1, megatron_fsdp=False)) is None
    assert rule_fsdp_shard_group(dense, replace(fsdp, dp=None)) is None  # auto: the search decides
    v = rule_fsdp_shard_group(moe, replace(fsdp, ep=2))
    assert v.code == "E181" and v.equation == ("megatron_fsdp = true with the experts' data-parallel group "
                                               "tensor(1) x context(1) x data(2) / (expert(2) x expert_tensor(1)) "
                                               "= 1 rank to shard over")
    assert rule_fsdp_shard_group(moe, replace(fsdp, ep=2, tp=2, dp=2)) is None  # 2 x 1 x 2 / 2 = 2 ranks


def test_fsdp_with_tensor_parallelism_is_refused_without_transformer_engine(tmp_path):
    """E182: Megatron-Core 0.16.1's FSDP adapter tags tensor-parallel weights through TE's TELinear, so on
    the local spec (the CPU) `tensor = 2` is refused at the megatron_fsdp line (the runtime refuses it too,
    runtime/megatron_args.py `_check_fsdp`); on GPUs with TE's layers it plans."""
    [d], lines, _ = _quickstart(tmp_path, **{"gpus_per_node = 2": "gpus_per_node = 4", "tensor = 1": "tensor = 2"})
    assert d.code == "E182" and lines[d.span.line - 1].strip() == "megatron_fsdp = true"
    assert d.equation == "megatron_fsdp = true with tensor(2) and kernels = local"
    assert d.hint.startswith("set tensor = 1 (or auto")
    spec, errors, _ = _compile(tmp_path, parallel="\n    tensor = 2")
    assert errors == []
    assert plan_experiment(spec).plan.stages[0].layout.tp == 2  # H100: Transformer Engine's layers


def test_the_search_never_picks_tensor_parallelism_for_fsdp_without_transformer_engine(tmp_path):
    """`tensor = auto` with megatron_fsdp on four CPU workers: a wider model at global batch 8 was planned
    tensor 2 x data 2 (which the runtime then refused); through E182 the search keeps tensor = 1 and shards
    over four data-parallel ranks."""
    errors, _, layout = _quickstart(tmp_path, **{"gpus_per_node = 2": "gpus_per_node = 4", "tensor = 1": "tensor = auto",
                                                 "hidden = 128": "hidden = 1024"})
    assert errors == []
    assert (layout.tp, layout.pp, layout.dp, layout.megatron_fsdp) == (1, 1, 4, True)


def test_a_dense_layer_of_a_moe_model_hides_its_gathers_behind_its_own_time():
    """DeepSeek-V2-Lite's first layer is dense (no all-to-all, an MLP of ffn_hidden): under Megatron-FSDP its
    per-layer gather and reduce-scatter hide behind that layer's compute, not an expert layer's."""
    v2 = get_preset("deepseek_v2_lite")
    layout = lay(ep=8, megatron_fsdp=True)
    kw = dict(seq=1024, precision="bf16", attention_backend="flash", micro_batch=1)  # short: gathers show
    lt = cost.layer_times(v2, layout, H100, **kw)
    lt_dense = cost.layer_times(v2.dense_layer_model, layout, H100, **kw)
    assert lt_dense.total < lt.total  # no all-to-all
    p, trainable = cost.DEFAULT_PARAMS, cost._trainable_params(v2, layout, None, None)
    bw = cost._link_bw(H100, 64, 1, p)
    gather, reduce = trainable / v2.layers * 2 * 63 / 64 / bw, trainable / v2.layers * 4 * 63 / 64 / bw

    def per_layer(t):
        fwd = t.total * t.forward_fraction
        return max(0.0, gather - fwd) + max(0.0, gather + reduce - (t.total - fwd))
    want = 8 * (26 * per_layer(lt) + per_layer(lt_dense)) + gather
    assert cost.fsdp_exposed(v2, layout, H100, lt, 8, p, trainable, 4, dense=(lt_dense, 1)) == pytest.approx(want)
    est = cost.estimate(v2, layout, gpu=H100, seq_length=1024, attention_backend="flash")
    assert est.parts["dp_comm_exposed"] == pytest.approx(want, rel=1e-9)
    assert want > cost.fsdp_exposed(v2, layout, H100, lt, 8, p, trainable, 4) * 1.005  # priced as an expert layer
