"""Megatron-FSDP in the kto, grpo and ppo stages, end to end through `nemoc run` on the CPU box's two processes
(gloo): a tiny pretraining feeds a KTO stage, and with a reward stage a GRPO stage (scored by the reward model) and a
PPO stage,
each KTO / GRPO / PPO stage twice, once with `megatron_fsdp = true` (ZeRO-3 over data(2): runtime/align/trainer.py
`_wrap`) and once with Megatron DDP and the distributed optimizer (same data, seed and initial weights). What
runs a trained model outside the training schedules runs it through the FSDP wrapper (`Trainer.trained`), whose
forward hooks all-gather each layer's shards: KTO's KL baseline (the policy on mismatched pairs) and held-out
scores, GRPO's and PPO's rollouts (KV-cached decoding), their old log-probs and the critic's values. The FSDP KTO
stage also sets `overlap_param_gather = true` (Megatron-FSDP's own prefetch: runtime/megatron_args.py
`_check_param_gather`).

Per step the losses, KL, rewards and grad norms agree to fp32 reduction-order noise (`REL`, as
test_align_fsdp_cli.py: FSDP reduce-scatters each layer's gradient bucket where DDP all-reduces one, ~1e-7
relative per element, carried through Adam). The rollouts sample from softmax(logits / T) with a seeded
generator: the first iteration's weights are bit-identical under both wrappers, so are its samples; after it a
logit moved by ~1e-7 could pick another token only if a uniform draw fell within that of a cumulative-probability
boundary (about 1e-7 per token, a few hundred tokens here), so the samples, rewards and token counts are the
same. The GRPO and PPO stages (PPO: actor and critic), rerun after losing their final checkpoints and DONE.json,
resume from step 2 (fsdp_dtensor) and log the steps the uninterrupted run logged, bit for bit; the KTO stage's final checkpoint exports to Hugging
Face with logits equal to the DDP stage's export.

Megatron-Core's FSDP adapter needs einops (an optional dependency of megatron-core): without it these skip."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_align_fsdp_cli import REPO, _done, _manifest, _run, _same, _steps

from nemoc.runtime import megatron_args as margs

pytestmark = [pytest.mark.slow, pytest.mark.long,
              pytest.mark.skipif(not margs.have_einops(), reason="Megatron-Core's FSDP adapter needs einops")]

# as test_align_fsdp_cli.py: fp32 reduction-order noise through Adam over a few steps; a wrong gradient scale
# doubles the grad norm, a policy that read this rank's shards alone (the bare chunk under FSDP) fails outright
REL = 2e-5

CHAIN = """
cluster cpu_box {
  gpu = CPU
  gpus_per_node = 2
}

experiment fsdp_rl {
  cluster cpu_box {}

  model tiny_llama {
    layers = 2
    hidden = 64
    heads = 4
    query_groups = 2
    ffn_hidden = 128
    vocab = 4096
    seq_length = 64
    activation = swiglu
    norm = rmsnorm
    position = rope
  }

  precision = fp32

  data corpus {
    path = "DATA/quickstart/corpus.jsonl"
    format = jsonl
    text_field = "text"
    vocab_size = 4096
  }

  data feedback {
    path = "DATA/pipeline/unpaired.jsonl"
    format = unpaired
    split = [0.9, 0.1, 0.0]
  }

  data sums {
    path = "DATA/pipeline/sums.jsonl"
    format = prompt_response
    split = [0.9, 0.1, 0.0]
  }

  data prefs {
    path = "DATA/pipeline/prefs.jsonl"
    format = preference
  }

  stage pretrain {
    data = [corpus]
    steps = 4
    global_batch = 4
    optimizer = adam(lr = 1e-3)
    parallel {
      tensor = 1
    }
  }

  stage reward after pretrain {
    data = [prefs]
    steps = 2
    global_batch = 4
    optimizer = adam(lr = 1e-3, weight_decay = 0.0)
    parallel {
      tensor = 1
      micro_batch = 1
    }
  }
STAGES}
"""

STAGE = """
  stage KIND_NAME after PARENTS {
    kind = KIND
    data = [DATA]
    steps = 4
    global_batch = 4
    log_every = 1
    PARAMS
    optimizer = adam(lr = LR, weight_decay = 0.0)
    schedule = constant(warmup = 0)
    checkpoint {
      every = 2
    }
    parallel {
      tensor = 1
      micro_batch = 1
      PARALLEL
    }
  }
"""

KINDS = {  # kind: (data, parents, params)
    "kto": ("feedback", "pretrain", "beta = 0.1"),  # lr 1e-2 (LRS): at 1e-3 the KL baseline z0 stays clamped at 0
    # the reward model's scores (a verifier's would be 0 for every sample of a 4-step model: no advantage, no
    # gradient, nothing to compare)
    "grpo": ("sums", "pretrain, reward", "num_generations = 2\n    max_new_tokens = 6\n    beta = 0.04"),
    "ppo": ("sums", "pretrain, reward", "max_new_tokens = 6"),
}
FSDP = {"kto": "megatron_fsdp = true\n      overlap_param_gather = true"}
LRS = {"kto": "1e-2"}


def _chain() -> str:
    stages = ""
    for kind, (data, parents, params) in KINDS.items():
        for name, parallel in (("fsdp", FSDP.get(kind, "megatron_fsdp = true")), ("ddp", "distributed_optimizer = true")):
            stages += (STAGE.replace("KIND_NAME", f"{kind}_{name}").replace("KIND", kind).replace("DATA", data)
                       .replace("PARENTS", parents).replace("PARAMS", params).replace("PARALLEL", parallel)
                       .replace("LR", LRS.get(kind, "1e-3")))
    stages += "\n  stage export_fsdp after kto_fsdp {\n    kind = export\n  }\n"
    stages += "\n  stage export_ddp after kto_ddp {\n    kind = export\n  }\n"
    return CHAIN.replace("DATA", str(REPO / "examples" / "data")).replace("STAGES", stages)


def test_kto_grpo_and_ppo_stages_train_under_megatron_fsdp_as_under_ddp_resume_and_export(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from nemoc.compiler.plan import from_json

    source = tmp_path / "fsdp_rl.nemo"
    source.write_text(_chain())
    workdir = tmp_path / "run"
    _run(source, workdir)
    plan = from_json((workdir / "plan.json").read_text())
    tasks = workdir / "tasks"
    for kind in KINDS:
        fsdp, ddp = plan.stage(f"{kind}_fsdp"), plan.stage(f"{kind}_ddp")
        assert fsdp.layout.megatron_fsdp and fsdp.layout.dp == 2 and not ddp.layout.megatron_fsdp, kind
        assert "fsdp_buffers" in fsdp.memory.parts and "fsdp_buffers" not in ddp.memory.parts, kind
    assert plan.stage("kto_fsdp").layout.overlap_param_gather

    kto_fsdp, kto_ddp = _steps(tasks / "train_kto_fsdp"), _steps(tasks / "train_kto_ddp")
    assert [r["step"] for r in kto_fsdp] == [1, 2, 3, 4]
    # (reward_margin: NaN in a step whose micro-batches hold one class only; the held-out one below)
    _same(kto_fsdp, kto_ddp, ("loss", "grad_norm", "kl"))
    assert abs(kto_fsdp[-1]["loss"] - kto_fsdp[0]["loss"]) > 1e-3  # the policy moved: the comparison can fail
    assert any(abs(r["kl"]) > 0 for r in kto_fsdp[1:])  # z0 from the policy through the wrapper, not 0 by clamp alone
    done, ref = _done(tasks / "train_kto_fsdp"), _done(tasks / "train_kto_ddp")
    for key in ("reward_margin", "reward_auc"):
        assert done["val"][key] == pytest.approx(ref["val"][key], rel=REL, abs=1e-6), key

    grpo_fsdp, grpo_ddp = _steps(tasks / "train_grpo_fsdp"), _steps(tasks / "train_grpo_ddp")
    assert [r["step"] for r in grpo_fsdp] == [1, 2, 3, 4]
    _same(grpo_fsdp, grpo_ddp, ("loss", "grad_norm", "kl", "reward", "entropy"))
    assert all(r["grad_norm"] > 0 for r in grpo_fsdp) and any(abs(r["kl"]) > 0 for r in grpo_fsdp)
    done, ref = _done(tasks / "train_grpo_fsdp"), _done(tasks / "train_grpo_ddp")
    assert done["val"]["reward"] == pytest.approx(ref["val"]["reward"], rel=REL)  # greedy held-out rollouts
    assert done["val"]["completion_length"] == ref["val"]["completion_length"]

    ppo_fsdp, ppo_ddp = _steps_ppo(tasks / "train_ppo_fsdp"), _steps_ppo(tasks / "train_ppo_ddp")
    assert [r["step"] for r in ppo_fsdp] == [1, 2, 3, 4]
    _same(ppo_fsdp, ppo_ddp, ("policy_loss", "value_loss", "reward", "kl", "entropy"))
    assert abs(ppo_fsdp[-1]["value_loss"] - ppo_fsdp[0]["value_loss"]) > 1e-6  # the critic moved

    for kind in KINDS:
        final = _done(tasks / f"train_{kind}_fsdp")["checkpoint"]
        assert _manifest(final)["format"] == "fsdp_dtensor" and _manifest(final)["layout"]["dp"] == 2, kind
        assert math.isfinite(_done(tasks / f"train_{kind}_fsdp")["final_loss"]), kind

    # the export of the FSDP KTO stage's checkpoint computes what the DDP stage's export computes
    tokens = torch.randint(0, 700, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for name in ("export_fsdp", "export_ddp"):
        hf = AutoModelForCausalLM.from_pretrained(_done(tasks / f"export_{name}")["export"], dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(hf(tokens).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    assert logits[0].std() > 0.1

    # GRPO and PPO killed after step 4 before they finished: their final checkpoints and DONE.json lost, `latest`
    # the periodic one of step 2 (fsdp_dtensor; PPO's actor and critic each); the rerun resumes (model, optimizer,
    # scheduler; the sampling generator is a function of the iteration) and logs steps 3 and 4 as the
    # uninterrupted run did, bit for bit
    first = {"grpo": {r["step"]: r for r in grpo_fsdp}, "ppo": {r["step"]: r for r in ppo_fsdp}}
    for kind in ("grpo", "ppo"):
        periodic = tasks / f"train_{kind}_fsdp" / "checkpoints"
        for part in ("",) if kind == "grpo" else ("actor", "critic"):
            assert (periodic / part / "latest").read_text().strip() == "iter_0000002"
            assert _manifest(periodic / part / "iter_0000002")["format"] == "fsdp_dtensor"
        shutil.rmtree(periodic / "final")
        (tasks / f"train_{kind}_fsdp" / "DONE.json").unlink()
    out = _run(source, workdir)
    keys = {"grpo": ("loss", "grad_norm", "reward", "kl"), "ppo": ("policy_loss", "value_loss", "reward", "kl")}
    for kind, steps in (("grpo", _steps), ("ppo", _steps_ppo)):
        assert f"train:{kind}_fsdp" in out
        assert _done(tasks / f"train_{kind}_fsdp")["resumed_from"] == 2
        resumed = {r["step"]: r for r in steps(tasks / f"train_{kind}_fsdp")}
        assert sorted(resumed) == [1, 2, 3, 4]
        for step in (3, 4):
            for key in keys[kind]:
                assert resumed[step][key] == first[kind][step][key], (kind, step, key)


def _steps_ppo(task) -> list[dict]:
    records = [json.loads(line) for line in (task / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "step" in r and "policy_loss" in r]
