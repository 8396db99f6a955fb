"""`nemoc run` of a tiny experiment whose PPO and GRPO stages run at pipeline parallelism 2 on the CPU
box's two processes (pretrain -> sft -> reward -> ppo, grpo with LoRA: its reference is the policy with the
adapters off, scored by a forward-only schedule): the plan keeps the stages' pipeline = 2, the runtime
trains them through Megatron's schedules with rollouts decoded across the two stages, and each stage
finishes with finite losses, the models the memory model planned and a final checkpoint. The same with 4
layers and 2 virtual pipeline stages per rank for ppo and grpo (`virtual_pipeline = 2`): the interleaved
schedule trains them and the rollouts go around the two stages twice per decoded token. And at tensor
parallelism 2 (ppo, grpo with LoRA, an eval of the sft model): the planner turns sequence parallelism on,
the steps and scoring passes run split along the sequence, the rollouts and generations decode with it
switched off (runtime/model.py `unsplit_sequence`)."""

from __future__ import annotations

import json

import pytest

from cli_chain import assert_rl_stage_finished, nemoc_run, rl_chain


@pytest.mark.slow
# VP 2 runs PP 2 too (through the interleaved schedule); plain PP 2 (~1.5 min) is `long`, out of CI
@pytest.mark.parametrize("vp", [pytest.param(None, marks=pytest.mark.long), 2])
def test_ppo_and_grpo_run_at_pp2_end_to_end(tmp_path, vp):
    parallel = "pipeline = 2" + (f"\n      virtual_pipeline = {vp}" if vp else "")
    workdir, plan = nemoc_run(tmp_path, rl_chain("rl_pipeline", parallel, layers=4 if vp else 2), "rl_pipeline.nemo")
    for kind in ("ppo", "grpo"):
        assert (plan.stage(kind).layout.pp, plan.stage(kind).layout.dp, plan.stage(kind).layout.vp) == (2, 1, vp)
        assert_rl_stage_finished(workdir, plan, kind)  # rollouts decoded stage after stage


EVAL = """
  stage eval_sft after sft {
    kind = eval
    data = [corpus]
    max_windows = 4
    prompts = ["What is 3 plus 2?"]
    max_new_tokens = 6
    parallel {
      tensor = 2
    }
  }
"""


@pytest.mark.slow
def test_ppo_grpo_and_eval_run_at_tp2_with_sequence_parallelism_end_to_end(tmp_path):
    workdir, plan = nemoc_run(tmp_path, rl_chain("rl_tp", "tensor = 2", extra=EVAL), "rl_tp.nemo")
    for kind in ("ppo", "grpo", "eval_sft"):
        layout = plan.stage(kind).layout
        assert (layout.tp, layout.pp, layout.sequence_parallel) == (2, 1, True), (kind, layout)
    for kind in ("ppo", "grpo"):
        assert_rl_stage_finished(workdir, plan, kind)
    results = next(workdir.glob("tasks/*eval_sft*/results.json"))
    generations = json.loads(results.read_text())["generations"]
    assert generations and all(g["tokens"] > 0 for g in generations)
