"""The distributed optimizer's overlapped parameter all-gather (`parallel.overlap_param_gather`) on CPU/gloo.

With the overlap on, the optimizer step updates only this rank's shard of the parameters and the next
forward's pre-hooks (interleaved: the schedule's `param_sync_func`) gather the rest; the gathered values
are the same bytes the synchronous all-gather after the step copies, and the gradient reduce-scatter is
unchanged, so the loss curve, the gradient norms and the validation losses equal the run with the
overlap off bit for bit. A rank that missed a gather would train on stale shards of the other ranks'
parameters and drift at once; a checkpoint saved without the gather would hold stale shards, and the
resumed steps would differ.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from nemoc.runtime.core.param_gather import ParamGather


# ------------------------------------------------------------------ the switch, on stand-in DDP chunks


class _Chunk:
    """What ParamGather uses of Megatron DDP (distributed_data_parallel.py): the pre-hook switch."""

    def __init__(self, log: list, *, align: bool) -> None:
        self.use_forward_hook = True
        self.ddp_config = SimpleNamespace(align_param_gather=align)
        self.remove_forward_pre_hook_handles = {"module": object()}  # DDP registers them in __init__
        self.log = log

    def enable_forward_pre_hook(self):
        assert not self.remove_forward_pre_hook_handles  # DDP asserts the same
        self.remove_forward_pre_hook_handles = {"module": object()}
        self.log.append("on")

    def disable_forward_pre_hook(self, param_sync: bool = True):
        assert self.remove_forward_pre_hook_handles
        self.remove_forward_pre_hook_handles = {}
        self.log.append("off+gather" if param_sync else "off")

    def start_param_sync(self, *unused, force_sync=False):
        pass


@pytest.mark.parametrize("align", [False, True])
def test_hooks_follow_megatron_lms_train_loop(align):
    """hold (no gather) -> first optimizer step that moved -> hooks on (param_sync_func with align) ->
    a save or validation sees gathered parameters and the hooks come back -> the loop's end gathers and
    leaves them off."""
    log: list = []
    chunks = [_Chunk(log, align=align), _Chunk(log, align=align)]
    config = SimpleNamespace(param_sync_func=[c.start_param_sync for c in chunks])
    gather = ParamGather(chunks, config)
    assert gather.active and gather.enabled and gather.aligned == align
    gather.hold()
    assert log == ["off", "off"] and config.param_sync_func is None
    gather.after_step(False)  # a skipped (fp16 overflow) step moved nothing: still held
    assert not gather.enabled and config.param_sync_func is None
    gather.after_step(True)
    assert log[2:] == ["on", "on"] and gather.enabled
    assert (config.param_sync_func == [c.start_param_sync for c in chunks]) if align else config.param_sync_func is None
    with gather.synced():
        assert log[4:] == ["off+gather", "off+gather"] and config.param_sync_func is None
    assert log[6:] == ["on", "on"] and gather.enabled
    gather.release()
    assert log[8:] == ["off+gather", "off+gather"] and not gather.enabled and config.param_sync_func is None
    gather.release()  # idempotent
    assert len(log) == 10


@pytest.mark.parametrize("fails", [False, True])
def test_the_loop_gathers_at_its_normal_end_and_never_on_an_error(monkeypatch, fails):
    """train_loop's end: on a normal return the hooks go off with the all-gather (the final save reads whole
    parameters); when a step raises they go off without it. The gather is a collective: a rank that raised
    alone would hang in it waiting for ranks that never join, instead of failing (Megatron-LM never gathers
    on an exception)."""
    from nemoc.runtime.core import loop

    log: list = []
    chunks = [_Chunk(log, align=False), _Chunk(log, align=False)]

    def steps(*, gather, state, **unused):
        gather.after_step(True)  # one step moved the optimizer: the hooks are on
        if fails:
            raise RuntimeError("a rank's step failed")
        return state

    monkeypatch.setattr(loop, "_train_steps", steps)
    monkeypatch.setattr(loop, "StepGraphs", lambda **unused: None)
    stage = SimpleNamespace(layout=SimpleNamespace(micro_batch=1), seq_length=8, eval_every=0, execution=None)
    state = SimpleNamespace(iteration=0)
    kw = dict(model=chunks, optimizer=None, scheduler=None, stage=stage, forward_step=None, train_iterators=None,
              state=state, end_iteration=1, checkpointer=None, make_checkpoint_state=None)
    if fails:
        with pytest.raises(RuntimeError, match="a rank's step failed"):
            loop.train_loop(**kw)
    else:
        assert loop.train_loop(**kw) is state
    assert log == ["off", "off", "on", "on"] + (["off", "off"] if fails else ["off+gather", "off+gather"])


def test_no_overlap_is_a_no_op():
    chunk = SimpleNamespace(use_forward_hook=False)
    config = SimpleNamespace(param_sync_func=None)
    gather = ParamGather([chunk], config)
    assert not gather.active
    gather.hold()
    gather.after_step(True)
    with gather.synced():
        pass
    gather.release()
    assert not gather.enabled


# ------------------------------------------------------------------ runs on CPU/gloo


def _layout(kit, *, overlap: bool, **sizes):
    return replace(kit.layout(dist_opt=True, **sizes), overlap_param_gather=overlap)


def _run(kit, out, train_data, reference_weights, lay, *, every=3, eval_every=3, **task):
    stage = kit.stage_plan(lay=lay, every=every, eval_every=eval_every)
    plan = kit.make_plan(stage, attention="flash" if lay.cp > 1 else "unfused")  # CP: the local spec's SDPA core
    return kit.run_training(out, plan, lay.world_size, data_prefix=train_data,
                            init_checkpoint=reference_weights, **task)


def _curve(result) -> dict[int, tuple]:
    assert result.returncode == 0, result.explain()
    return {r["step"]: (r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in result.records if "step" in r
            and "event" not in r}


def _overlap_events(result) -> list[dict]:
    return [r for r in result.records if r.get("event") == "param_gather_overlap"]


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [dict(dp=2), dict(dp=2, pp=2, vp=2), dict(cp=2)], ids=["dp2", "dp2-pp2-vp2", "cp2"])
def test_overlapped_gather_equals_the_synchronous_one_bit_for_bit(tmp_path, kit, train_data, reference_weights,
                                                                    sizes):
    """DP 2 with the distributed optimizer (1F1B hooks), PP 2 x VP 2 x DP 2 (the interleaved schedule
    starts the gathers: `align_param_gather`), and DP 1 x CP 2 (DDP reduces and the optimizer shards over the
    DP x CP group): 6 steps, validation and a checkpoint every 3, losses, gradient norms and validation losses
    equal to the overlap-off run's, bit for bit."""
    off = _run(kit, tmp_path / "off", train_data, reference_weights, _layout(kit, overlap=False, **sizes))
    on = _run(kit, tmp_path / "on", train_data, reference_weights, _layout(kit, overlap=True, **sizes))
    curve_off, curve_on = _curve(off), _curve(on)
    assert sorted(k for k, v in curve_on.items() if v[0] is not None) == [1, 2, 3, 4, 5, 6]
    assert curve_on == curve_off
    assert curve_on[3][2] is not None and curve_on[6][2] is not None  # validation ran mid-run and at the end
    assert curve_on[6][0] < curve_on[1][0]  # it learns: the compared values are not one flat curve
    events = _overlap_events(on)
    assert events and events[0]["aligned"] == (sizes.get("vp", 1) > 1)
    assert not _overlap_events(off)


@pytest.mark.slow
def test_resume_from_a_checkpoint_saved_with_the_overlap_on(tmp_path, kit, train_data, reference_weights):
    """The save at step 3 gathers every shard first (one data-parallel rank writes each weight): a run
    resumed from it with the overlap on continues steps 4..6 exactly as the uninterrupted run."""
    lay = _layout(kit, overlap=True, dp=2)
    full = _run(kit, tmp_path / "full", train_data, reference_weights, lay, eval_every=None)
    curve = _curve(full)
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    shutil.copytree(full.out / "checkpoints" / "iter_0000003", ckdir / "iter_0000003")
    (ckdir / "latest").write_text("iter_0000003\n")
    resumed = _run(kit, tmp_path / "resumed", train_data, reference_weights, lay, eval_every=None,
                   checkpoint_dir=ckdir)
    again = _curve(resumed)
    assert [r["iteration"] for r in resumed.records if r.get("event") == "resumed"] == [3]
    assert {k: v for k, v in again.items() if v[0] is not None} == {s: curve[s] for s in (4, 5, 6)}


@pytest.mark.slow
def test_nemoc_run_of_the_quickstart_with_the_overlap_equals_it_without(tmp_path):
    """End to end through the CLI (language, planner, executor, 2 gloo ranks): the quickstart with the
    distributed optimizer, 12 steps, validation and a checkpoint at 6 and 12, once with the overlap off and
    once on (each in its own workdir: in one workdir the second run would resume from the first one's
    checkpoint); the records are equal bit for bit and the second run states the overlap it ran."""
    import json

    from click.testing import CliRunner

    from nemoc.runtime.cli import cli

    examples = Path(__file__).resolve().parents[2] / "examples"
    shutil.copy(examples / "quickstart.nemo", tmp_path / "quickstart.nemo")
    (tmp_path / "data" / "quickstart").mkdir(parents=True)
    shutil.copy(examples / "data" / "quickstart" / "corpus.jsonl", tmp_path / "data" / "quickstart" / "corpus.jsonl")

    def run(overlap: bool) -> list[dict]:
        workdir = tmp_path / ("on" if overlap else "off")
        args = ["run", str(tmp_path / "quickstart.nemo"), "--workdir", str(workdir),
                "--set", "stage.pretrain.steps=12", "--set", "stage.pretrain.log_every=1",
                "--set", "stage.pretrain.eval_every=6", "--set", "stage.pretrain.checkpoint.every=6",
                "--set", "parallel.distributed_optimizer=true",
                "--set", f"parallel.overlap_param_gather={'true' if overlap else 'false'}"]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        metrics = workdir / "tasks" / "train_pretrain" / "metrics.jsonl"
        return [json.loads(line) for line in metrics.read_text().splitlines()]

    def curve(records):
        return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in records
                if "event" not in r and "step" in r]

    off, on = run(False), run(True)
    assert len([c for c in curve(on) if c[1] is not None]) == 12 and curve(on)[-1][3] is not None
    assert curve(on) == curve(off)
    assert [r["aligned"] for r in on if r.get("event") == "param_gather_overlap"] == [False]
    assert not [r for r in off if r.get("event") == "param_gather_overlap"]


@pytest.mark.slow
def test_mxfp8_gather_through_the_gradient_buffer_trains_and_saves_the_weights_of_the_plain_gather(tmp_path, kit):
    """`reuse_grad_buf_for_mxfp8_param_ag` with the overlapped gather (the plan's MXFP8 default): Megatron-Core
    0.16.1's step writes the updated main parameters nowhere, the loop does (Megatron-LM train_step's
    `_copy_main_params_to_param_buffer` after `zero_grad_buffer`), and a save's or the loop end's forced gather
    copies the buffer into the parameters (the step after it stages nothing: its pre-hooks gather nothing). Without
    that, every weight read 0.0 from step 2 (the gradient buffer, zeroed, was gathered) and the final save held
    zeros. DP 2, 4 steps of the core's train_step: the gradient
    norms, the weights a save at step 2 reads and the final weights equal the plain gather's exactly."""
    out = tmp_path / "weights.pt"
    worker = Path(__file__).parent / "param_gather_reuse_worker.py"
    import subprocess
    import torch

    done = subprocess.run([str(kit.VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(worker), str(out)],
                          capture_output=True, text=True, timeout=240, env=kit.torchrun_env(), cwd=str(kit.REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = torch.load(out)
    plain, reuse = runs["plain"], runs["reuse"]
    assert reuse["steps"] == plain["steps"] and all(g > 0 for g in plain["steps"])
    # nothing staged that no pre-hook gathered and zeroed -- not after the save's forced gather either (under MXFP8
    # the buffer is the gradients': they would accumulate on top of the weights)
    assert reuse["left_in_buffer"] == [False] * 4
    for when in ("saved", "final"):
        assert reuse[when].keys() == plain[when].keys()
        for name, weight in plain[when].items():
            assert torch.equal(reuse[when][name], weight), (when, name)
        assert sum(float(w.norm()) for w in reuse[when].values()) > 1.0  # not the zeroed buffer
    moved = [n for n, w in plain["final"].items() if not torch.equal(w, plain["saved"][n])]
    assert moved  # the last two steps moved the weights: the comparison saw training, not the initial values
