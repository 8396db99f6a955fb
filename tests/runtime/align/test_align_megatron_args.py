"""The alignment stages' trained model gets the Megatron configuration of the plan, as pretraining does.

Differential: the same stage plan through the alignment Trainer (runtime/align/runners.py `_trainer`) and
through the training core's builders (runtime/core/build.py `wrap`, `build_optimizer`) passes the same
keywords to `megatron_args.ddp_config` and to `build.optimizer_for` -- the precision, the overlaps, the FP8
recipe (OptimizerConfig.fp8_recipe decides whether FusedAdam owns the master weights) and the MXFP8
gradient-buffer reuse. Before, the Trainer dropped the last two, so an sft/dpo/orpo/reward stage ran another
configuration than its plan (and than the memory the plan sized).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from plan_factory import TINY_MODEL, make_execution, make_layout, make_stage


def _mxfp8_stage(kind: str):
    layout = replace(make_layout(dp=2, micro_batch=1, global_batch=4), distributed_optimizer=True,
                     fp8_param_gather=True, overlap_param_gather=True)
    execution = make_execution(TINY_MODEL, layout, kind=kind, precision="mxfp8", kernels="te", gpu="B200")
    assert execution.reuse_grad_buf_for_mxfp8_param_ag and execution.fp8_recipe == "mxfp8"  # what is checked
    return replace(make_stage(kind, kind=kind, layout=layout), execution=execution)


@pytest.mark.parametrize("kind", ["sft", "dpo", "orpo", "reward"])
def test_the_alignment_trainer_configures_megatron_as_pretraining(monkeypatch, kind):
    from nemoc.runtime import megatron_args as margs
    from nemoc.runtime import model as mmodel
    from nemoc.runtime.align import runners
    from nemoc.runtime.core import build as core_build

    calls: dict[str, list] = {"ddp": [], "optimizer": []}

    def ddp_config(**kw):
        calls["ddp"].append(kw)
        return SimpleNamespace(**kw)

    def optimizer_for(**kw):
        kw.pop("model")
        calls["optimizer"].append(kw)
        return SimpleNamespace(param_groups=[{"lr": 0.0}]), None

    monkeypatch.setattr(margs, "ddp_config", ddp_config)
    monkeypatch.setattr(mmodel, "wrap_ddp", lambda *, chunks, config, ddp_config: list(chunks))
    monkeypatch.setattr(core_build, "optimizer_for", optimizer_for)

    stage = _mxfp8_stage(kind)
    chunk = torch.nn.Linear(4, 4)
    chunk.config = SimpleNamespace()
    runners._trainer(SimpleNamespace(stage=stage), chunk)
    core_build.wrap([chunk], config=chunk.config, stage=stage)
    core_build.build_optimizer(model=[chunk], stage=stage, precision=stage.execution.precision)

    (aligned_ddp, core_ddp), (aligned_opt, core_opt) = calls["ddp"], calls["optimizer"]
    assert aligned_ddp == core_ddp and aligned_ddp["reuse_grad_buf"] is True
    assert aligned_opt == core_opt
    assert (aligned_opt["reuse_grad_buf"], aligned_opt["fp8_recipe"], aligned_opt["precision"]) == (True, "mxfp8",
                                                                                                     "mxfp8")
