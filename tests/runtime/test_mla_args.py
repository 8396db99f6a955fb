"""Multi-latent attention in runtime.megatron_args: the plan's MLA fields become Megatron-Core's
MLATransformerConfig (and Megatron-LM's MLA flags) mechanically; the models built from it:
tests/runtime/test_mla_layer.py, trained: tests/runtime/test_train_mla.py."""

from __future__ import annotations

import dataclasses

from nemoc.compiler.catalog.models import get_preset
from nemoc.compiler.execution import fusions
from nemoc.compiler.plan import Layout
from nemoc.compiler.spec import ModelSpec
from nemoc.runtime import megatron_args as margs
from plan_factory import make_plan, with_executions

CPU = margs.MachineFacts(cpu=True, have_te=False)
TINY = ModelSpec(name="m", layers=2, hidden=64, heads=4, query_groups=4, ffn_hidden=128, vocab=256, seq_length=64,
                 multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
                 v_head_dim=12, qk_layernorm=True, rope_type="yarn", rope_scaling_factor=40.0,
                 original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707)
LAYOUT = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=4, num_microbatches=4,
                sequence_parallel=False, distributed_optimizer=False, recompute="none")


def test_mla_fields_reach_megatron_cores_mla_config():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    cfg = margs.transformer_config(model=TINY, layout=LAYOUT, precision="fp32", attention_backend="unfused", facts=CPU)
    assert type(cfg) is MLATransformerConfig and cfg.multi_latent_attention
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim) == (
        32, 32, 16, 8, 12)
    assert (cfg.rope_type, cfg.rotary_scaling_factor, cfg.original_max_position_embeddings, cfg.mscale,
            cfg.mscale_all_dim, cfg.beta_fast, cfg.beta_slow) == ("yarn", 40.0, 16, 0.707, 0.707, 32.0, 1.0)
    # no query groups; the local cores size their output by kv_channels = v_head_dim; MLA's own softmax scale
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.softmax_scale) == (4, 12, None)
    # no query latent (DeepSeek-V2-Lite) is Megatron's None
    lite = margs.transformer_config(model=dataclasses.replace(TINY, q_lora_rank=0), layout=LAYOUT, precision="fp32",
                                    attention_backend="unfused", facts=CPU)
    assert lite.q_lora_rank is None
    # a standard model keeps the plain TransformerConfig
    std = dataclasses.replace(TINY, multi_latent_attention=False, rope_type="rope", rope_scaling_factor=1.0)
    assert not type(margs.transformer_config(model=std, layout=LAYOUT, precision="fp32", attention_backend="unfused",
                                             facts=CPU)).__name__.startswith("MLA")


def test_rope_fusion_only_with_yarn_under_mla():
    """MLATransformerConfig.__post_init__: "apply_rope_fusion for MLA only works with YARN RoPE"."""
    assert fusions(TINY, "te").rope
    assert not fusions(dataclasses.replace(TINY, rope_type="rope", rope_scaling_factor=1.0), "te").rope
    assert not fusions(TINY, "local").rope


def test_mla_as_megatron_lm_flags(tmp_path):
    plan = with_executions(make_plan(tmp_path, model=get_preset("deepseek_v3")))
    args, notes = margs.megatron_lm_arguments(plan, "pretrain")
    for flag in ("--multi-latent-attention", "--q-lora-rank 1536", "--kv-lora-rank 512", "--qk-head-dim 128",
                 "--qk-pos-emb-head-dim 64", "--v-head-dim 128", "--rope-type yarn", "--rotary-scaling-factor 40",
                 "--mscale 1", "--mscale-all-dim 1", "--qk-layernorm"):
        assert flag in args, (flag, args)
    assert not any(a.startswith("--use-rope-scaling") or a.startswith("--num-query-groups") for a in args)
    assert any("beta_fast 32" in n for n in notes)
    lite, _ = margs.megatron_lm_arguments(with_executions(make_plan(tmp_path, model=get_preset("deepseek_v2_lite"))),
                                          "pretrain")
    assert "--multi-latent-attention" in lite and not any(a.startswith("--q-lora-rank") for a in lite)
