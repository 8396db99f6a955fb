"""~1B GPT on one GPU: nemoc's runtime vs a bare Megatron-Core loop, flash (SDPA) vs unfused attention.

Run once on a lent H100/H200 through `bench/gpu_run.sh` (installs the carried megatron-core wheel,
maps `nemoc.*` onto the repository folders, writes everything under $OUT). Locally:
`python bench/gpu_1b.py --smoke --out /tmp/x` runs the same code paths on the CPU with a tiny model.

For attention_backend in (flash, unfused), each in its own process (Megatron keeps module-level
state, and a fresh process gives a clean peak-memory reading):
  * runtime: `torchrun --nproc-per-node 1 -m nemoc.runtime.train task.json` on a synthetic indexed
    dataset (Megatron's GPTDataset pipeline, logging, signal checks: everything a user gets), no
    checkpoints; per-step time = mean over the logged intervals after the first (warm-up) one.
  * bare: the same TransformerConfig/GPTModel/DDP/optimizer (built by the same adapter, so the
    configuration is identical) driven by a minimal get_forward_backward_func loop on
    pre-generated device tensors (Megatron's examples/run_simple_mcore_train_loop.py style), timed
    over the same intervals.
Results: tokens/s, step time, TFLOP/s and MFU (compiler formula, causal discount, the `nemoc plan`
convention), peak allocated memory, the runtime's overhead ratio, and the compiler's predictions
(nemoc.compiler.memory.estimate / cost.estimate) with their errors. Every sub-run is in its own
try/except and the JSON is rewritten after each, so a partial run still leaves results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODEL_1B = dict(name="gpt-1b", layers=24, hidden=2048, heads=16, query_groups=16, ffn_hidden=5632, vocab=32000,
                seq_length=2048, activation="swiglu", norm="rmsnorm", position="rope")
MODEL_SMOKE = dict(name="gpt-smoke", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=128, vocab=256,
                   seq_length=64, activation="swiglu", norm="rmsnorm", position="rope")


def build_plan(*, smoke: bool, backend: str, steps: int, log_every: int, micro_batch: int, num_micro: int,
               gpu: str):
    from nemoc.compiler.plan import Estimate, Layout, MemoryBreakdown, Plan, StagePlan
    from nemoc.compiler.spec import CheckpointSpec, ClusterSpec, DataSpec, ModelSpec, OptimizerSpec, ScheduleSpec

    model = ModelSpec(**(MODEL_SMOKE if smoke else MODEL_1B))
    layout = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=micro_batch,
                    global_batch=micro_batch * num_micro, num_microbatches=num_micro, sequence_parallel=False,
                    distributed_optimizer=False, recompute="none")
    stage = StagePlan(
        name="pretrain", kind="pretrain", after=(), data=("synthetic",), layout=layout,
        memory=MemoryBreakdown(0, 0, 0, 0, 0, 0), estimate=Estimate(0, 0, 0, 0, steps, 0, 0, None),
        seq_length=model.seq_length, steps=steps, optimizer=OptimizerSpec(lr=3e-4),
        schedule=ScheduleSpec(name="cosine", warmup=2, min_lr=3e-5), checkpoint=CheckpointSpec(every=None),
        log_every=log_every, eval_every=None, seed=1234, params={"save_checkpoints": False},
    )
    return Plan(experiment="gpu_1b", model=model, cluster=ClusterSpec(gpu=gpu, nodes=1, gpus_per_node=1),
                precision="fp32" if smoke else "bf16", attention_backend=backend,
                data=(DataSpec(name="synthetic", path="synthetic", split=(1.0, 0.0, 0.0)),), stages=(stage,))


def write_dataset(prefix: Path, *, vocab: int, tokens: int) -> None:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    written = 0
    while written < tokens:
        doc = rng.integers(0, vocab, size=4096, dtype=np.int32)
        builder.add_document(doc, [len(doc)])
        written += len(doc)
    builder.finalize(str(prefix) + ".idx")


def gpu_id() -> str:
    import torch

    if not torch.cuda.is_available():
        return "CPU"
    name = torch.cuda.get_device_name(0)
    return next((g for g in ("B200", "H200", "H100") if g in name), "H100")


def interval_stats(step_times: list[float], tokens_per_step: int, flops_per_step: float | None,
                   peak_flops: float | None) -> dict:
    step = statistics.mean(step_times) if step_times else float("nan")
    out = {"step_time_s": step, "step_time_s_intervals": step_times, "tokens_per_s": tokens_per_step / step}
    if flops_per_step:
        out["tflops_per_gpu"] = flops_per_step / step / 1e12
        if peak_flops:
            out["mfu"] = flops_per_step / step / peak_flops
    return out


# ------------------------------------------------------------------------------------- the runtime


def run_runtime(plan, *, work: Path, prefix: Path, timeout_s: int, smoke: bool) -> dict:
    import shutil

    from nemoc.compiler.plan import to_json

    shutil.rmtree(work, ignore_errors=True)  # metrics.jsonl appends (resume semantics): start clean
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(to_json(plan))
    task = {"version": 1, "plan": str(work / "plan.json"), "stage": "pretrain",
            "datasets": [{"name": "synthetic", "prefix": str(prefix), "weight": 1.0}], "tokenizer": None,
            "vocab_size": plan.model.vocab, "init_checkpoint": None, "output_dir": str(work),
            "checkpoint_dir": str(work / "checkpoints"), "metrics_path": str(work / "metrics.jsonl"),
            "tensorboard_dir": None, "max_steps": None, "timeout_s": 300}
    (work / "task.json").write_text(json.dumps(task))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    started = time.monotonic()
    proc = subprocess.run(torchrun + ["-m", "nemoc.runtime.train", str(work / "task.json")], capture_output=True,
                          text=True, timeout=timeout_s, env=env, cwd=str(REPO))
    (work / "stdout.txt").write_text(proc.stdout)
    (work / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"runtime exited {proc.returncode}: {proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if "loss" in r and "step_time_s" in r]
    measured = steps[1:] or steps  # the first interval holds warm-up (allocator, kernels)
    out = {"wall_s": time.monotonic() - started, "final_loss": steps[-1]["loss"],
           "step_time_s": statistics.mean(r["step_time_s"] for r in measured),
           "step_time_s_intervals": [r["step_time_s"] for r in measured],
           "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in measured)}
    for key in ("tflops_per_gpu", "mfu"):
        if key in measured[-1]:
            out[key] = statistics.mean(r[key] for r in measured)
    if "peak_mem_gib" in steps[-1]:
        out["peak_mem_gib"] = max(r.get("peak_mem_gib", 0.0) for r in steps)
    return out


# ---------------------------------------------------------------------------------------- the bare


def run_bare_subprocess(plan, *, work: Path, timeout_s: int, smoke: bool) -> dict:
    from nemoc.compiler.plan import to_json

    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(to_json(plan))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare", str(work / "plan.json"), "--out", str(work)]
    proc = subprocess.run(cmd + (["--smoke"] if smoke else []), capture_output=True, text=True, timeout=timeout_s,
                          cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1"))
    (work / "stdout.txt").write_text(proc.stdout)
    (work / "stderr.txt").write_text(proc.stderr)
    result = work / "bare.json"
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"bare loop exited {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def bare_main(plan_path: str, out_dir: str, smoke: bool) -> None:
    """A minimal Megatron-Core loop on exactly the runtime's model/optimizer configuration."""
    import torch

    from nemoc.runtime import mcore_cpu

    if smoke:
        mcore_cpu.apply()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemoc.compiler.plan import from_json
    from nemoc.runtime import megatron_args as margs
    from nemoc.runtime import model as mdl

    plan = from_json(Path(plan_path).read_text())
    stage = plan.stages[0]
    lay = stage.layout
    cuda = torch.cuda.is_available() and not mcore_cpu.is_applied()
    if cuda:
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
    parallel_state.initialize_model_parallel(**margs.parallel_kwargs(layout=lay))
    torch.manual_seed(stage.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage.seed)
    facts = margs.MachineFacts(cpu=mcore_cpu.is_applied(), have_te=mdl.have_transformer_engine())
    config = margs.transformer_config(model=plan.model, layout=lay, precision=plan.precision,
                                      attention_backend=plan.attention_backend, facts=facts, deterministic=facts.cpu)
    vocab = margs.padded_vocab_size(plan.model.vocab, lay.tp)
    chunks = mdl.build_model_chunks(config=config, model=plan.model, vocab_size=vocab, seq_length=stage.seq_length,
                                    attention_backend=plan.attention_backend, have_te=facts.have_te)
    model = mdl.wrap_ddp(chunks=chunks, config=config, ddp_config=margs.ddp_config(layout=lay))
    optimizer = get_megatron_optimizer(margs.optimizer_config(optimizer=stage.optimizer, schedule=stage.schedule,
                                                              layout=lay, precision=plan.precision), model)
    scheduler = OptimizerParamScheduler(optimizer, **margs.scheduler_kwargs(
        optimizer=stage.optimizer, schedule=stage.schedule, steps=stage.steps))
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    seq, mb = stage.seq_length, lay.micro_batch
    gen = torch.Generator().manual_seed(0)
    # fresh tokens for every micro-batch, as the runtime reads (repeating one batch lets the model
    # memorise it, and on CPU the shrinking values hit denormal slow paths)
    batches = [torch.randint(0, plan.model.vocab, (mb, seq + 1), generator=gen).to(dev)
               for _ in range(stage.steps * lay.num_microbatches)]
    positions = torch.arange(seq, device=dev).unsqueeze(0).expand(mb, seq)
    loss_mask = torch.ones(mb, seq, device=dev)

    def forward_step(data_iterator, module):
        tokens = next(data_iterator)
        output = module(tokens[:, :-1], positions, None, labels=tokens[:, 1:])

        def loss_func(out):
            loss = (out.float() * loss_mask).sum()
            n = loss_mask.sum()
            return loss, n.to(torch.int), {"lm loss": torch.stack([loss.detach(), n])}

        return output, loss_func

    fwd_bwd = get_forward_backward_func()
    interval_times, interval_start, last_loss = [], None, float("nan")
    peak = 0
    for step in range(1, stage.steps + 1):
        if interval_start is None:
            interval_start = time.perf_counter()
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        step_batches = iter(batches[(step - 1) * lay.num_microbatches: step * lay.num_microbatches])
        losses = fwd_bwd(forward_step_func=forward_step, data_iterator=step_batches, model=model,
                         num_microbatches=lay.num_microbatches, seq_length=seq, micro_batch_size=mb,
                         decoder_seq_length=seq, forward_only=False)
        ok, _, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        if step % stage.log_every == 0 or step == stage.steps:
            if cuda:
                torch.cuda.synchronize()
            total = sum(x["lm loss"] for x in losses)
            last_loss = float(total[0] / total[1])
            interval_times.append((time.perf_counter() - interval_start) / stage.log_every)
            interval_start = None
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    measured = interval_times[1:] or interval_times
    result = {"step_time_s": statistics.mean(measured), "step_time_s_intervals": measured, "final_loss": last_loss}
    if cuda:
        result["peak_mem_gib"] = peak
    Path(out_dir, "bare.json").write_text(json.dumps(result))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------- predictions


def predictions(plan) -> dict:
    from nemoc.compiler import cost, memory

    stage = plan.stages[0]
    out = {}
    try:
        mem = memory.estimate(plan.model, stage.layout, precision=plan.precision,
                              attention_backend=plan.attention_backend, seq_length=stage.seq_length,
                              gpu=plan.cluster.gpu, kernels="local")
        out["memory_total_gib"] = mem.total / 2**30
        out["memory_terms_gib"] = {k: getattr(mem, k) / 2**30 for k in ("weights", "gradients", "optimizer",
                                                                        "activations", "other")}
    except Exception as exc:
        out["memory_error"] = f"{type(exc).__name__}: {exc}"
    try:
        est = cost.estimate(plan.model, stage.layout, gpu=plan.cluster.gpu, precision=plan.precision,
                            attention_backend=plan.attention_backend, seq_length=stage.seq_length)
        out.update(step_time_s=est.step_time_s, tokens_per_s=est.tokens_per_s_per_gpu, mfu=est.mfu,
                   tflops_per_gpu=est.model_tflops_per_gpu)
    except Exception as exc:
        out["cost_error"] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "results" / "gpu")))
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the code paths)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--backends", default="flash,unfused")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="seconds for all sub-runs; a sub-run that cannot start with 40 s left is skipped "
                             "(order: flash runtime, flash bare, unfused runtime, unfused bare)")
    parser.add_argument("--bare", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_main(args.bare, args.out, args.smoke)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / ("gpu_1b_smoke.json" if args.smoke else "gpu_1b.json")
    steps = args.steps or (10 if args.smoke else 25)
    log_every = 2 if args.smoke else 5
    micro_batch, num_micro = (2, 2) if args.smoke else (1, 8)
    started = time.monotonic()
    results: dict = {"config": {"steps": steps, "log_every": log_every, "micro_batch": micro_batch,
                                "num_microbatches": num_micro, "model": MODEL_SMOKE if args.smoke else MODEL_1B,
                                "precision": "fp32" if args.smoke else "bf16"}, "runs": {}}

    def save():
        results["wall_s"] = time.monotonic() - started
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    try:
        import torch

        results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        results["torch"] = torch.__version__
        import megatron.core

        results["megatron_core"] = megatron.core.__version__
        from nemoc.runtime.model import have_transformer_engine

        results["transformer_engine"] = have_transformer_engine()
        gpu = "CPU" if args.smoke else gpu_id()
        prefix = out / "data" / "synthetic_text_document"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        model_cfg = MODEL_SMOKE if args.smoke else MODEL_1B
        write_dataset(prefix, vocab=model_cfg["vocab"],
                      tokens=(steps + 2) * micro_batch * num_micro * (model_cfg["seq_length"] + 1) * 2)
    except Exception:
        results["setup_error"] = traceback.format_exc()
        save()
        return 1
    save()
    budget = args.budget if not args.smoke else max(args.budget, 600)
    for backend in args.backends.split(","):
        plan = build_plan(smoke=args.smoke, backend=backend, steps=steps, log_every=log_every,
                          micro_batch=micro_batch, num_micro=num_micro, gpu=gpu)
        tokens_per_step = micro_batch * num_micro * plan.model.seq_length
        entry = results["runs"].setdefault(backend, {})
        try:
            entry["predicted"] = predictions(plan)
        except Exception:
            entry["predicted"] = {"error": traceback.format_exc()}
        for kind in ("runtime", "bare"):
            left = budget - (time.monotonic() - started)
            if left < 40:
                entry[kind] = {"error": f"skipped: {left:.0f} s left of the {budget} s budget"}
                save()
                continue
            try:
                work = out / f"{backend}_{kind}"
                if kind == "runtime":
                    entry[kind] = run_runtime(plan, work=work, prefix=prefix, timeout_s=int(left), smoke=args.smoke)
                else:
                    bare = run_bare_subprocess(plan, work=work, timeout_s=int(left), smoke=args.smoke)
                    from nemoc.compiler.flops import model_flops_per_step

                    flops = model_flops_per_step(plan.model, plan.model.seq_length, micro_batch * num_micro,
                                                 causal_discount=True)
                    peak = None
                    if not args.smoke:
                        from nemoc.compiler.catalog.hardware import get_gpu

                        peak = get_gpu(gpu).peak("bf16")
                    bare.update({k: v for k, v in interval_stats(bare["step_time_s_intervals"], tokens_per_step,
                                                                  flops, peak).items() if k != "step_time_s_intervals"})
                    entry[kind] = bare
            except Exception:
                entry[kind] = {"error": traceback.format_exc()[-4000:]}
            save()
        rt, bare = entry.get("runtime", {}), entry.get("bare", {})
        if "step_time_s" in rt and "step_time_s" in bare:
            entry["runtime_overhead"] = rt["step_time_s"] / bare["step_time_s"] - 1.0
        pred = entry.get("predicted", {})
        if "peak_mem_gib" in rt and "memory_total_gib" in pred:
            entry["memory_prediction_error"] = pred["memory_total_gib"] / rt["peak_mem_gib"] - 1.0
        if "step_time_s" in rt and "step_time_s" in pred:
            entry["step_time_prediction_error"] = pred["step_time_s"] / rt["step_time_s"] - 1.0
        save()
    runs = results["runs"]
    if all("step_time_s" in runs.get(b, {}).get("runtime", {}) for b in ("flash", "unfused")):
        f, u = runs["flash"]["runtime"], runs["unfused"]["runtime"]
        results["flash_vs_unfused"] = {"speedup": u["step_time_s"] / f["step_time_s"],
                                       "peak_mem_gib_saved": u.get("peak_mem_gib", 0) - f.get("peak_mem_gib", 0)}
    save()
    print(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
