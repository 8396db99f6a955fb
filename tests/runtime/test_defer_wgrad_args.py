"""`defer_embedding_wgrad_compute` / `wgrad_deferral_limit` reach Megatron-Core 0.16.1's real ModelParallelConfig
(a differential test: its __post_init__ accepts them only with pipeline parallelism and gradient-accumulation
fusion), and a machine without the fused wgrad kernel is refused with the reason."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest

from nemoc.runtime import megatron_args as margs
from test_model_args import CPU, GPU_TE, config, lay

_FUSION = "megatron.core.tensor_parallel.layers._grad_accum_fusion_available"


def test_the_real_transformer_config_takes_the_deferral_with_the_fused_wgrad():
    from megatron.core.model_parallel_config import ModelParallelConfig

    fields = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    assert {"defer_embedding_wgrad_compute", "wgrad_deferral_limit"} <= fields
    layout = lay(pp=2, defer_embedding_wgrad_compute=True, wgrad_deferral_limit=22)
    with mock.patch(_FUSION, True):
        c = config(layout=layout, facts=GPU_TE)
    assert c.defer_embedding_wgrad_compute and c.wgrad_deferral_limit == 22 and c.gradient_accumulation_fusion
    with mock.patch(_FUSION, True):
        assert not config(layout=lay(pp=2), facts=GPU_TE).defer_embedding_wgrad_compute


def test_megatron_core_itself_refuses_what_the_rules_refuse():
    """E196 / E197 mirror these two checks of ModelParallelConfig.__post_init__ (0.16.1, l. 425-433)."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    with pytest.raises(ValueError, match="pipeline model parallel is not used"):
        ModelParallelConfig(defer_embedding_wgrad_compute=True, gradient_accumulation_fusion=True)
    with pytest.raises(ValueError, match="gradient accumulation fusion is not used"):
        ModelParallelConfig(defer_embedding_wgrad_compute=True, pipeline_model_parallel_size=2,
                            pipeline_dtype=__import__("torch").bfloat16)


def test_without_the_fused_wgrad_or_on_the_cpu_it_is_refused_with_the_reason():
    layout = lay(pp=2, defer_embedding_wgrad_compute=True)
    with mock.patch(_FUSION, False), pytest.raises(margs.UnsupportedPlan, match="gradient_accumulation_fusion"):
        config(layout=layout, facts=GPU_TE)
    with pytest.raises(margs.UnsupportedPlan, match="defer_embedding_wgrad_compute = true needs"):
        config(layout=layout, facts=CPU)


_SRC = """
experiment d {
  cluster { gpu = H100  nodes = 8  gpus_per_node = 8 }
  model llama3_70b { seq_length = 8192 }
  parallel { tensor = 4  pipeline = 4  context = 2  data = auto  micro_batch = 1  sequence_parallel = true
             defer_embedding_wgrad_compute = true  wgrad_deferral_limit = 22 }
  precision = bf16
  data web { path = "data/web/*.jsonl"  tokenizer = "tokenizer.json" }
  stage pretrain { data = [web]  steps = 100  global_batch = 128  optimizer = adam(lr = 3e-4) }
}
"""


def test_the_plan_and_the_megatron_lm_command_line_carry_it(tmp_path):
    from nemoc.compiler.lower import load_experiment
    from nemoc.compiler.plan import from_json, to_json
    from nemoc.compiler.planner import plan_experiment

    path = tmp_path / "d.nemo"
    path.write_text(_SRC)
    spec, _ = load_experiment(str(path))
    plan = plan_experiment(spec).plan
    layout = plan.stages[0].layout
    assert layout.defer_embedding_wgrad_compute and layout.wgrad_deferral_limit == 22 and layout.pp == 4
    assert from_json(to_json(plan)) == plan
    args, _ = margs.megatron_lm_arguments(plan, "pretrain")
    assert "--defer-embedding-wgrad-compute" in args and "--wgrad-deferral-limit 22" in args
    plain = plan_experiment(dataclasses.replace(spec, parallel=dataclasses.replace(
        spec.parallel, defer_embedding_wgrad_compute=False, wgrad_deferral_limit=0))).plan  # a limit alone: E198
    assert not any("defer" in a for a in margs.megatron_lm_arguments(plain, "pretrain")[0])
