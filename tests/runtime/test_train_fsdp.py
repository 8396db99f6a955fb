"""Megatron-FSDP (`parallel.megatron_fsdp`, ZeRO-3) on the training core, on CPU/gloo: Megatron-Core 0.16.1's
FullyShardedDataParallel trains as DDP with the distributed optimizer does (the same DP=2 run, losses equal to
fp32 reduction noise), and its `fsdp_dtensor` checkpoints resume exactly (runtime/fsdp_checkpoint.py), also past a
checkpoint that fails half-way through its in-place load, resume at another data-parallel size, initialise FSDP
and DDP stages, and feed `nemoc run`'s later stages (sft at tensor = 2) and the Hugging Face export.

Megatron-Core's FSDP adapter needs einops (an optional dependency of megatron-core): without it the runtime
refuses the plan with that reason (tested in test_model_args) and these runs skip."""

from __future__ import annotations

import shutil
from pathlib import Path
from dataclasses import replace

import pytest

from nemoc.runtime import megatron_args as margs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not margs.have_einops(), reason="Megatron-Core's FSDP adapter needs einops")]

REL = 2e-5  # fp32 reduction-order noise over 6 Adam steps (test_train_parallel); a wrong gradient is off by >1e-2


def _fsdp_layout(kit):
    return replace(kit.layout(dp=2, dist_opt=True), megatron_fsdp=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_trains_as_ddp_with_the_distributed_optimizer(tmp_path, kit, train_data, request, precision):
    """DP=2, same starting weights, same global batches: FSDP's all-gathered weights and reduce-scattered
    gradients give DDP's losses and gradient norms; its checkpoint is fsdp_dtensor (torch.distributed.checkpoint)
    with the manifest naming it. In bf16 both start from the seed (weights initialised on the CPU from the
    global RNG: independent of the wrapper); in fp32 both start from the trained weights of a torch_dist
    checkpoint (`init_checkpoint`, the one-process baseline's iter 3: the FSDP stage copies each rank's shard of
    each full tensor, fsdp_checkpoint.load_full_into_fsdp; a load that missed a tensor would not give DDP's loss)."""
    init = {}
    if precision == "fp32":
        init = dict(init_checkpoint=request.getfixturevalue("baseline").out / "checkpoints" / "iter_0000003")
    ddp_lay = kit.layout(dp=2, dist_opt=True)
    ddp = kit.run_training(tmp_path / "ddp", kit.make_plan(kit.stage_plan(lay=ddp_lay), precision=precision), 2,
                           data_prefix=train_data, **init)
    assert ddp.returncode == 0, ddp.explain()
    fsdp = kit.run_training(tmp_path / "fsdp", kit.make_plan(kit.stage_plan(lay=_fsdp_layout(kit)), precision=precision),
                            2, data_prefix=train_data, **init)
    assert fsdp.returncode == 0, fsdp.explain()
    if init:
        assert [r for r in fsdp.records if r.get("event") == "initialized"]
    assert sorted(fsdp.losses) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert fsdp.losses[step] == pytest.approx(ddp.losses[step], rel=REL), (step, fsdp.losses, ddp.losses)
    grad = {r["step"]: r["grad_norm"] for r in fsdp.records if "grad_norm" in r}
    ddp_grad = {r["step"]: r["grad_norm"] for r in ddp.records if "grad_norm" in r}
    assert grad[1] == pytest.approx(ddp_grad[1], rel=1e-4)
    assert len({round(v, 4) for v in ddp.losses.values()}) == 6  # the compared losses are not one flat value
    if not init:
        assert ddp.losses[6] < ddp.losses[1]  # it learns (from the checkpoint, the re-warmed lr first undoes some)
    from nemoc.runtime import checkpoint as ckpt

    final = fsdp.done["checkpoint"]
    assert ckpt.checkpoint_format(final) == "fsdp_dtensor" and ckpt.verify(final) is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_checkpoint_resumes_exactly(tmp_path, kit, train_data, precision):
    """Six steps with a checkpoint every 3; a run restarted from iter 3 (model shards, Adam moments, scheduler,
    data position, RNG; in bf16 the fp32 main weights too) reproduces steps 4..6 bit for bit. The restart
    first meets an iter 6 whose shard was cut short after its manifest was written (digests updated, so only
    the load finds it): that load fails after DCP has written part of it into the model and optimizer in
    place; the fallback to iter 3 overwrites every loaded tensor, so the steps are still bit for bit."""
    import json

    from nemoc.runtime import checkpoint as ckpt

    plan = kit.make_plan(kit.stage_plan(lay=_fsdp_layout(kit), every=3), precision=precision)
    full = kit.run_training(tmp_path / "full", plan, 2, data_prefix=train_data)
    assert full.returncode == 0, full.explain()
    saved = json.loads((full.out / "checkpoints" / "iter_0000003" / ckpt.MANIFEST).read_text())
    assert saved["dtype"] == dict(fp32="float32", bf16="bfloat16")[precision]  # what its export writes by default
    assert saved["layout"]["etp"] == 1
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    for name in ("iter_0000003", "iter_0000006"):
        shutil.copytree(full.out / "checkpoints" / name, ckdir / name)
    damaged = ckdir / "iter_0000006"
    shard = max(damaged.glob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    manifest = json.loads((damaged / ckpt.MANIFEST).read_text())
    manifest["files"][shard.name] = {"size": shard.stat().st_size, ckpt.DIGEST: ckpt.file_digest(str(shard))}
    (damaged / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify(str(damaged)) is None
    (ckdir / "latest").write_text("iter_0000006\n")
    resumed = kit.run_training(tmp_path / "resumed", plan, 2, data_prefix=train_data, checkpoint_dir=ckdir)
    assert resumed.returncode == 0, resumed.explain()
    assert f"skipping checkpoint {damaged}" in resumed.stdout + resumed.stderr, resumed.explain()
    event = [r for r in resumed.records if r.get("event") == "resumed"]
    assert event and event[0]["iteration"] == 3 and event[0]["optimizer_restored"]
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == full.losses[step], (step, resumed.losses, full.losses)


def _dcp_tensors(path, prefix: str) -> dict:
    """Every tensor of a DCP checkpoint whose key starts with `prefix`, whole (DCP assembles the shards)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in meta.items()
           if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    dcp.load(out, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return out


def test_fsdp_checkpoint_resumes_at_another_data_parallel_size_and_initialises_other_stages(tmp_path, kit, train_data):
    """A DP=2 FSDP run, a checkpoint every step. (a) Resumed from iter 3 by four processes (DP=4): DCP reshards
    the model's and Adam's DTensors. Step 4 (computed from the loaded weights) gives the DP=2 run's loss to
    reduction noise, and the state saved after it (Adam's moments and step, the weights) is the DP=2 run's to
    fp32 reduction noise: a moment lost or misplaced in the resharding would be off by its own size. (b) iter 4
    as the init_checkpoint of an FSDP stage (DCP, model only) and of a DDP stage (read as full tensors): the
    same weights, so the same losses, and lower than from scratch. (DP=1 is not used: Megatron-FSDP at DP=1
    reports a gradient norm ~9x DDP's on this model, tracked separately.)"""
    import torch

    full = kit.run_training(tmp_path / "full", kit.make_plan(kit.stage_plan(lay=_fsdp_layout(kit), every=1, keep=10,
                                                                            steps=4)), 2, data_prefix=train_data)
    assert full.returncode == 0, full.explain()
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    shutil.copytree(full.out / "checkpoints" / "iter_0000003", ckdir / "iter_0000003")
    (ckdir / "latest").write_text("iter_0000003\n")
    four = replace(kit.layout(dp=4, dist_opt=True), megatron_fsdp=True)
    resumed = kit.run_training(tmp_path / "dp4", kit.make_plan(kit.stage_plan(lay=four, every=1, keep=10, steps=4)),
                               4, data_prefix=train_data, checkpoint_dir=ckdir)
    assert resumed.returncode == 0, resumed.explain()
    event = [r for r in resumed.records if r.get("event") == "resumed"]
    assert event and event[0]["iteration"] == 3 and event[0]["optimizer_restored"] and not event[0]["rng_restored"]
    assert sorted(resumed.losses) == [4] and resumed.losses[4] == pytest.approx(full.losses[4], rel=1e-6)
    ours = _dcp_tensors(ckdir / "iter_0000004", "optimizer.state.") | _dcp_tensors(ckdir / "iter_0000004", "model.")
    theirs = _dcp_tensors(full.out / "checkpoints" / "iter_0000004", "optimizer.state.")
    theirs |= _dcp_tensors(full.out / "checkpoints" / "iter_0000004", "model.")
    assert set(ours) == set(theirs) and any(k.endswith(".exp_avg_sq") for k in ours)
    for key, tensor in theirs.items():
        if key.endswith(".step"):
            assert float(ours[key]) == float(tensor), key
        else:
            scale = float(tensor.abs().max())
            torch.testing.assert_close(ours[key], tensor, atol=1e-4 * scale + 1e-12, rtol=1e-3, msg=key)

    init = full.out / "checkpoints" / "iter_0000004"
    fsdp = kit.run_training(tmp_path / "init_fsdp", kit.make_plan(kit.stage_plan(lay=_fsdp_layout(kit), steps=1)), 2,
                            data_prefix=train_data, init_checkpoint=init)
    ddp = kit.run_training(tmp_path / "init_ddp", kit.make_plan(kit.stage_plan(lay=kit.layout(dp=2, dist_opt=True),
                                                                               steps=1)), 2,
                           data_prefix=train_data, init_checkpoint=init)
    assert fsdp.returncode == 0, fsdp.explain()
    assert ddp.returncode == 0, ddp.explain()
    assert sorted(fsdp.losses) == sorted(ddp.losses) == [1]
    assert fsdp.losses[1] == pytest.approx(ddp.losses[1], rel=REL), (fsdp.losses, ddp.losses)
    assert ddp.losses[1] < full.losses[1] - 0.05  # it started from the trained weights, not from scratch


def test_a_torch_dist_checkpoint_does_not_resume_an_fsdp_stage(tmp_path, kit, train_data):
    """A DDP stage's checkpoint under an FSDP stage's directory: skipped with the reason, and the run refuses
    to start over silently (CheckpointError naming it)."""
    ddp = kit.run_training(tmp_path / "ddp", kit.make_plan(kit.stage_plan(lay=kit.layout(dp=2, dist_opt=True),
                                                                         steps=3)), 2, data_prefix=train_data)
    assert ddp.returncode == 0, ddp.explain()
    plan = kit.make_plan(kit.stage_plan(lay=_fsdp_layout(kit)))
    result = kit.run_training(tmp_path / "fsdp", plan, 2, data_prefix=train_data,
                              checkpoint_dir=ddp.out / "checkpoints")
    assert result.returncode != 0
    assert "resumes from its own fsdp_dtensor checkpoints only" in result.stdout + result.stderr, result.explain()


def test_nemoc_run_trains_the_quickstart_with_megatron_fsdp(tmp_path):
    """End to end through the CLI: the quickstart (two CPU workers) with `--set parallel.megatron_fsdp=true`
    plans, prepares its data, trains under FullyShardedDataParallel, validates and checkpoints (fsdp_dtensor)."""
    import json

    from click.testing import CliRunner

    from nemoc.runtime import checkpoint as ckpt
    from nemoc.runtime.cli import cli

    examples = Path(__file__).resolve().parents[2] / "examples"
    shutil.copy(examples / "quickstart.nemo", tmp_path / "quickstart.nemo")
    (tmp_path / "data" / "quickstart").mkdir(parents=True)
    shutil.copy(examples / "data" / "quickstart" / "corpus.jsonl", tmp_path / "data" / "quickstart" / "corpus.jsonl")
    workdir = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "run", str(tmp_path / "quickstart.nemo"), "--workdir", str(workdir), "--workers", "1",
        "--set", "parallel.megatron_fsdp=true", "--set", "stage.pretrain.steps=20",
        "--set", "stage.pretrain.log_every=5", "--set", "stage.pretrain.eval_every=10",
        "--set", "stage.pretrain.checkpoint.every=10"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "dp=2" in result.output and "Megatron-FSDP is using device" not in result.output
    task = workdir / "tasks" / "train_pretrain"
    done = json.loads((task / "DONE.json").read_text())
    assert done["steps"] == 20 and ckpt.checkpoint_format(done["checkpoint"]) == "fsdp_dtensor"
    records = [json.loads(line) for line in (task / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]


FSDP_CHAIN = """
cluster cpu_box {
  gpu = CPU
  gpus_per_node = 2
}

experiment fsdp_chain {
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

  data chat {
    path = "DATA/pipeline/sft.jsonl"
    format = chat
  }

  stage pretrain {
    data = [corpus]
    steps = 4
    global_batch = 4
    optimizer = adam(lr = 1e-3)
    parallel {
      tensor = 1
      megatron_fsdp = true
    }
  }

  stage export_pretrain after pretrain {
    kind = export
  }

  # lr 1e-9: one step moves no weight by more than ~1e-8, so the fine-tuned model is the pretrained one
  # to that precision, and its export must compute what the FSDP checkpoint's export computes
  stage sft after pretrain {
    data = [chat]
    steps = 1
    global_batch = 4
    optimizer = adam(lr = 1e-9, weight_decay = 0.0)
    parallel {
      tensor = 2
    }
  }

  stage export after sft {
    format = huggingface
  }
}
"""


def test_nemoc_run_chains_an_fsdp_pretraining_into_sft_at_another_layout_and_exports_it(tmp_path):
    """`nemoc run` of pretrain (megatron_fsdp, DP=2: an fsdp_dtensor checkpoint) -> sft (DDP, tensor = 2, which
    reads that checkpoint as full tensors and slices it for its layout) -> export, plus an export of the FSDP
    checkpoint itself. The sft model's weights, read back from its torch_dist checkpoint by the exporter's
    reader, are the FSDP checkpoint's (raw DCP read) to Adam's 1e-9 step; both exports load in transformers
    and give the same logits. (Export parity with our GPTModel's logits: tests/runtime/align/
    test_align_fsdp_init.py and test_align_export.py.)"""
    import json
    import os
    import subprocess
    import sys

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    from nemoc.runtime.hf import trained

    examples = Path(__file__).resolve().parents[2] / "examples"
    source = tmp_path / "chain.nemo"
    source.write_text(FSDP_CHAIN.replace("DATA", str(examples / "data")))
    workdir = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "nemoc.runtime.cli", "run", str(source), "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr

    def done(task):
        return json.loads((workdir / "tasks" / task / "DONE.json").read_text())

    pretrained = done("train_pretrain")["checkpoint"]
    manifest = json.loads((Path(pretrained) / "nemoc_checkpoint.json").read_text())
    assert manifest["format"] == "fsdp_dtensor" and manifest["layout"]["dp"] == 2
    sft = done("train_sft")
    assert sft["steps"] == 1
    assert json.loads((Path(sft["checkpoint"]) / "nemoc_checkpoint.json").read_text())["layout"]["tp"] == 2
    assert done("export_export_pretrain")["source_checkpoint"] == pretrained

    tuned = trained.DistCheckpointReader(sft["checkpoint"])
    names = ["embedding.word_embeddings.weight", "decoder.layers.1.self_attention.linear_qkv.weight",
             "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc2.weight", "output_layer.weight"]
    raw = {n: torch.empty(tuple(tuned.get(n).shape)) for n in names}
    dcp.load({f"model.module.{n}": t for n, t in raw.items()}, storage_reader=FileSystemReader(pretrained),
             no_dist=True)
    for name in names:
        assert raw[name].abs().max() > 0
        torch.testing.assert_close(tuned.get(name), raw[name], atol=1e-6, rtol=0, msg=name)

    tokens = torch.randint(0, done("train_sft")["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for task in ("export_export_pretrain", "export_export"):
        hf = AutoModelForCausalLM.from_pretrained(done(task)["export"], dtype=torch.float32).eval()
        assert type(hf).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            logits.append(hf(tokens).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert logits[0].std() > 0.1  # the compared logits are not one flat value


def test_an_fsdp_stage_starts_from_a_hugging_face_checkpoint_as_a_ddp_stage_does(tmp_path, kit, train_data):
    """`init = hf(...)` (task.json `hf_init`: a converted directory) into an FSDP stage (each rank copies its
    shard of each full tensor) and into a DDP stage (runtime/hf/load.py `load_converted`): the same weights, so
    the same first loss, and not the loss of the seed's weights."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemoc.runtime.hf import convert

    tiny = kit.TINY
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=kit.VOCAB, hidden_size=tiny.hidden, intermediate_size=tiny.ffn_hidden,
                                      num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads,
                                      num_key_value_heads=tiny.query_groups, max_position_embeddings=kit.SEQ,
                                      tie_word_embeddings=False, rope_theta=tiny.rotary_base))
    hf.save_pretrained(tmp_path / "hf")
    convert.import_checkpoint(tmp_path / "hf", tmp_path / "converted")

    def run(name, lay, hf_init):
        plan = kit.make_plan(kit.stage_plan(lay=lay, steps=1))
        task = kit.write_task(tmp_path / name, plan, data_prefix=train_data)
        if hf_init:
            raw = json.loads(task.read_text())
            task.write_text(json.dumps(dict(raw, hf_init=str(tmp_path / "converted"))))
        proc = kit.launch(task, 2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in records if r.get("step") == 1 and "loss" in r)

    fsdp = run("fsdp", _fsdp_layout(kit), True)
    ddp = run("ddp", kit.layout(dp=2, dist_opt=True), True)
    seed = run("seed", kit.layout(dp=2, dist_opt=True), False)
    assert fsdp == pytest.approx(ddp, rel=REL), (fsdp, ddp)
    assert abs(ddp - seed) > 1e-3, (ddp, seed)


_DP1_SCRIPT = '''
import dataclasses, json, torch
from nemoc.runtime import mcore_cpu
mcore_cpu.apply()
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from nemoc.compiler.plan import Layout
from nemoc.compiler.spec import ModelSpec
from nemoc.runtime import megatron_args as margs, model as mdl

torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
parallel_state.initialize_model_parallel(1, 1)
spec = ModelSpec(name="t", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=128, vocab=128, seq_length=32)
facts = margs.MachineFacts(cpu=True, have_te=False)
gen = torch.Generator().manual_seed(3)
rows = [torch.randint(0, 128, (2, 33), generator=gen) for _ in range(4)]


def grads(fsdp, batches):
    n = len(batches)
    lay = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=2, global_batch=2 * n, num_microbatches=n,
                 sequence_parallel=False, distributed_optimizer=fsdp, recompute="none", megatron_fsdp=fsdp)
    torch.manual_seed(7); tensor_parallel.model_parallel_cuda_manual_seed(7)
    # the config from the layout without megatron_fsdp (_check_fsdp refuses DP 1); the config reads it for nothing else
    cfg = margs.transformer_config(model=spec, layout=dataclasses.replace(lay, megatron_fsdp=False), precision="fp32",
                                   attention_backend="unfused", facts=facts)
    chunks = mdl.build_model_chunks(config=cfg, model=spec, vocab_size=128, seq_length=32,
                                    attention_backend="unfused", have_te=False)
    wrap = mdl.wrap_fsdp if fsdp else mdl.wrap_ddp
    model = wrap(chunks=chunks, config=cfg, ddp_config=margs.ddp_config(layout=lay, cpu=True))
    model[0].zero_grad_buffer()

    def step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(b[:, :-1], torch.arange(32).unsqueeze(0).expand(2, -1), None, labels=b[:, 1:])
        return out, lambda o: (o.float().mean(), {})

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=model, num_microbatches=n,
                                seq_length=32, micro_batch_size=2, forward_only=False)
    cfg.finalize_model_grads_func(model)
    out = {}
    for name, p in model[0].named_parameters():
        g = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad  # FSDP: a DTensor .grad
        out[name.replace("module.", "")] = getattr(g, "_local_tensor", g).detach().reshape(-1).clone()
    return out


def rel(a, b):  # max over parameters of max |a - b| / max |b|
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


ddp1, fsdp1 = grads(False, rows[:1]), grads(True, rows[:1])
ddp4, fsdp4 = grads(False, rows), grads(True, rows)
per = [grads(False, [r]) for r in rows]  # each micro batch's own gradient
doubled = {k: sum(2 ** (4 - i) * per[i][k] / 4 for i in range(4)) for k in ddp4}
norm = lambda g: sum((v ** 2).sum() for v in g.values()).sqrt().item()
print(json.dumps(dict(same_names=sorted(ddp1) == sorted(fsdp1), one=rel({k: v / 2 for k, v in fsdp1.items()}, ddp1),
                      four=rel(fsdp4, doubled), ratio1=norm(fsdp1) / norm(ddp1), ratio4=norm(fsdp4) / norm(ddp4),
                      ddp4_sum=rel(ddp4, {k: sum(p[k] for p in per) / 4 for k in ddp4}))))
'''


def test_megatron_fsdp_doubles_gradients_at_a_shard_group_of_one_rank():
    """Why `megatron_fsdp` is refused at a shard group of one rank (E181, runtime/megatron_args.py `_check_fsdp`):
    Megatron-Core 0.16.1's FSDP buffer there is not data-distributed, so the bucket its reduce-scatter reads is the
    gradient buffer itself, and `_bucket_group_gradient_reduce` adds the (identity) reduced copy back into it: each
    micro batch's reduce doubles everything accumulated so far. At DP 1 (fp32, same weights and batches) FSDP's
    gradient is exactly 2x DDP's with one micro batch, and with four it is sum_i 2^(4-i+1) g_i / 4 (g_i: micro
    batch i's own gradient; DDP gives the plain mean). If a Megatron-Core upgrade fixes it, this test fails:
    then lift E181 and the runtime's refusal."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _DP1_SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["same_names"]
    assert got["ddp4_sum"] < 1e-5  # DDP: the mean of the micro batches' gradients
    assert got["one"] < 1e-6 and got["ratio1"] == pytest.approx(2.0, rel=1e-6)
    assert got["four"] < 1e-5 and got["ratio4"] > 4  # the 9.1x of the report: 9.07 on this model
