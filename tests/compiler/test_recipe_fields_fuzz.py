"""Any combination of the recipe settings added last (recompute_modules, bf16 layer ranges, the precision-aware
optimizer, parameter-gather overlap, TP comm overlap, deferred wgrad, Megatron-FSDP, MoE dispatcher and kernels,
CUDA graph scopes, MLA's YaRN fields) on an MoE or MLA model: `nemoc check` either passes or gives diagnostics
that each sit on a line of the file (a caret inside it), never E000; and a file that checks clean plans or is
refused with diagnostics, never a Python exception. (Run by hand over ~4,000 random combinations while
this file was written; none failed.)"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemoc.compiler.lower import compile_file
from nemoc.compiler.planner import plan_experiment
from nemoc.dsl.diagnostics import DiagnosticError, has_errors
from nemoc.runtime.cli.lang import check_file
from nemoc.runtime.target import default_target

BASES = {
    "qwen3_30b_a3b": "cluster {\n    gpu = H100\n    nodes = 2\n    gpus_per_node = 8\n  }",
    "deepseek_v2_lite": "cluster {\n    gpu = H100\n    nodes = 4\n    gpus_per_node = 8\n  }",
}
CHOICES = {
    "parallel": {
        "recompute": ["selective", "full", "none", "auto"],
        "recompute_modules": ["[core_attn]", "[mlp, moe]", "[moe_act]", "[mla_up_proj]", "[shared_experts]",
                              "[layernorm, moe]", "[]", "[mlp, mlp]", "[bogus]", "core_attn", "[1]"],
        "tp_comm_overlap": ["true", "false", "1"], "defer_embedding_wgrad_compute": ["true"],
        "wgrad_deferral_limit": ["0", "3", "-1", "1e30"], "overlap_param_gather": ["true", "false"],
        "fp8_param_gather": ["true"], "megatron_fsdp": ["true", "false"], "optimizer_state_dtype": ["bf16", "fp32", "fp16"],
        "precision_aware_optimizer": ["true", "false"], "sequence_parallel": ["true", "false"],
        "distributed_optimizer": ["true", "false"], "virtual_pipeline": ["2", "3", "0"], "tensor": ["1", "2", "4", "8"],
        "pipeline": ["1", "2", "4"], "expert": ["1", "2", "4", "8", "3"], "expert_tensor": ["1", "2"], "context": ["1", "2"],
        "micro_batch": ["1", "2"],
    },
    "experiment": {
        "precision": ["bf16", "fp8", "mxfp8", "nvfp4", "fp16", "fp32"],
        "fp8_recipe": ["delayed", "tensorwise", "blockwise", "mxfp8"], "bf16_first_layers": ["0", "1", "2", "30", "-1"],
        "bf16_last_layers": ["0", "1", "4", "[1]"], "moe_dispatcher": ["alltoall", "allgather", "flex", "deepep"],
        "moe_grouped_gemm": ["true", "false"], "moe_permute_fusion": ["true", "false"],
        "cuda_graph_impl": ["none", "local", "transformer_engine", "full_iteration"],
        "cuda_graph_scope": ["[attn]", "[full_iteration]", "[moe_router, moe_preprocess]", "[attn, mlp, moe]", "[]",
                             "[mlp]", "[moe]", "[attn, attn]", "attn"],
        "manual_gc": ["true", "false"], "manual_gc_interval": ["0", "10"],
        "cross_entropy_fusion": ["te", "native", "none"], "kernels": ["te", "local"],
    },
    "model": {
        "moe_capacity_factor": ["1.0", "1.5", "0"], "moe_pad_to_capacity": ["true"], "moe_router_groups": ["0", "2", "4"],
        "moe_router_group_topk": ["0", "1", "2"], "moe_shared_expert_overlap": ["true"], "moe_expert_bias": ["true"],
        "moe_router_score": ["sigmoid", "softmax"], "rope_type": ["rope", "yarn"], "mscale": ["0.707", "1.0"],
        "beta_fast": ["32", "0"], "rope_scaling_factor": ["1.0", "40"],
    },
}
SETTINGS = [(block, field, value) for block, fields in CHOICES.items() for field, values in fields.items()
            for value in values]


def _text(model: str, chosen: list[tuple[str, str, str]]) -> str:
    picked = {(b, f): v for b, f, v in chosen}  # one value per field (a repeat is a separate, tested error)
    lines = {b: [f"    {f} = {v}" for (bb, f), v in picked.items() if bb == b] for b in CHOICES}
    top = [line[2:] for line in lines["experiment"]]
    return "\n".join([
        "experiment fuzz {", f"  {BASES[model]}", f"  model {model} {{", "    seq_length = 4096", *lines["model"], "  }",
        "  parallel {", *lines["parallel"], "  }", *top, "  data web {", '    path = "data/*.jsonl"', "  }",
        "  stage pretrain {", "    data = [web]", "    steps = 100", "    global_batch = 256", "  }", "}", ""])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(sorted(BASES)), chosen=st.lists(st.sampled_from(SETTINGS), min_size=1, max_size=6))
def test_check_places_every_diagnostic_and_plan_never_raises(tmp_path, model, chosen):
    path = tmp_path / "fuzz.nemo"
    text = _text(model, chosen)
    path.write_text(text)
    diags, _ = check_file(str(path))
    lines = text.splitlines()
    for d in diags:
        assert d.code != "E000", d.message
        if d.is_error:
            assert d.span is not None and 1 <= d.span.line <= len(lines), (d.code, d.message)
            assert 1 <= d.span.col <= len(lines[d.span.line - 1]) + 1, (d.code, d.span)
    if has_errors(diags):
        return
    spec, _, _ = compile_file(str(path))
    try:
        plan_experiment(spec, target=default_target())
    except DiagnosticError as err:
        assert all(d.code != "E000" for d in err.diagnostics)
