"""`nemoc run` of a tiny experiment whose PPO and GRPO stages run at context parallelism 2 on the CPU
box's two processes (pretrain -> sft -> reward -> ppo, grpo with LoRA: its reference is the policy with the
adapters off): `nemoc check` accepts context = 2 for ppo and grpo (the target's caps; the local spec's SDPA
core splits sequences), the plan keeps the stages' context = 2 with the rollout costed unsplit, and the
runtime decodes the whole rows on both ranks, then shards every experience pass and step over the two
ranks; each stage finishes with finite losses, the models the memory model planned and a final checkpoint.
The numbers are proven by tests/runtime/align/test_align_rl_pipeline.py (cp = 2 = one process)."""

from __future__ import annotations

import pytest

from cli_chain import assert_rl_stage_finished, nemoc_run, rl_chain

EXPERIMENT = rl_chain("rl_context", "context = 2")


def test_check_accepts_context_parallel_ppo_and_grpo_and_points_at_context_for_the_unfused_core(tmp_path):
    from click.testing import CliRunner

    from nemoc.runtime.cli import cli

    source = tmp_path / "rl_context.nemo"
    source.write_text(EXPERIMENT)
    ok = CliRunner().invoke(cli, ["check", str(source)])
    assert ok.exit_code == 0 and "error" not in ok.output, ok.output
    bad = CliRunner().invoke(cli, ["check", str(source), "--set", "attention_backend=unfused"])
    assert bad.exit_code == 1, bad.output
    ppo_context = EXPERIMENT.splitlines().index("  stage ppo after sft, reward {") + 1
    ppo_context += EXPERIMENT.splitlines()[ppo_context:].index("      context = 2") + 1
    assert f"rl_context.nemo:{ppo_context}:7: error[E113]" in bad.output, bad.output
    assert "hint: set attention_backend = auto, flash or fused" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_ppo_and_grpo_run_at_cp2_end_to_end(tmp_path):
    workdir, plan = nemoc_run(tmp_path, EXPERIMENT, "rl_context.nemo")
    for kind in ("ppo", "grpo"):
        sp = plan.stage(kind)
        assert (sp.layout.cp, sp.layout.pp, sp.layout.dp) == (2, 1, 1)
        assert sp.execution.attention in ("auto", "flash", "fused")  # the SDPA core, which splits sequences
        assert sp.estimate.parts["cp_comm"] > 0
        assert_rl_stage_finished(workdir, plan, kind)
