"""Cluster numbers for docs/clusters.md: submission -> first step under Slurm, checkpoint save/restore.

    bash .ci/slurm.sh up && export SLURM_CONF=/tmp/slurm/slurm.conf   # a local 2-node Slurm
    .venv/bin/python bench/bench_clusters.py            # -> bench/results/clusters.json

1. The quickstart (examples/quickstart.nemo) on 2 Slurm nodes x 1 process (gloo) through
   `nemoc run --launcher slurm`, 20 steps, logging every step: the time from `sbatch` to the job's
   start (Slurm's StartTime) and to the first training step (its metrics record), and the seconds of
   every checkpoint save the trainer logged. Without Slurm the same run goes through the local launcher
   and only the checkpoint numbers are reported.
2. Checkpoint save and restore of the quickstart's training state (model, distributed Adam, scheduler,
   RNG) under torchrun with the quickstart's layout: `checkpoint.Checkpointer.save` and
   `checkpoint.resume`, median of 3, timed inside the ranks (no process start-up included).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STEPS = 20


def _quickstart(tmp: Path, slurm: bool) -> Path:
    text = (REPO / "examples" / "quickstart.nemo").read_text()
    text = text.replace('"data/quickstart/', f'"{REPO / "examples" / "data" / "quickstart"}/')
    if slurm:
        text = re.sub(r"nodes = 1\n", "nodes = 2\n", text, count=1)
        text = re.sub(r"gpus_per_node = 2\n",
                      'gpus_per_node = 1\n    scheduler = slurm(partition = "debug", time = 20min)\n', text, count=1)
    path = tmp / "quickstart.nemo"
    path.write_text(text)
    return path


def _slurm_start(job_id: str) -> float | None:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    match = re.search(r" StartTime=(\S+)", shown)
    if not match:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))


def run_quickstart(tmp: Path, slurm: bool) -> tuple[Path, dict]:
    nemo = _quickstart(tmp, slurm)
    run_dir = tmp / "run"
    cmd = [str(VENV_BIN / "nemoc"), "run", str(nemo), "--workdir", str(run_dir), "--launcher",
           "slurm" if slurm else "local", "--set", f"stage.pretrain.steps={STEPS}",
           "--set", "stage.pretrain.checkpoint.every=10", "--set", "stage.pretrain.log_every=1",
           "--set", "stage.pretrain.eval_every=1000"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(f"nemoc run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from nemoc.runtime.metrics import read_records

    task_dir = run_dir / "tasks" / "train_pretrain"
    records = read_records(task_dir / "metrics.jsonl")
    saves = [r["seconds"] for r in records if r.get("event") == "checkpoint"]
    result = {"launcher": "slurm" if slurm else "local", "steps": STEPS, "run_wall_s": round(time.time() - started, 1),
              "checkpoint_save_s_logged": saves}
    if slurm:
        job = json.loads((run_dir / "slurm.json").read_text())["jobs"]["train:pretrain"]
        first = min(r["time"] for r in records if r.get("step") == 1 and "loss" in r)
        start = _slurm_start(job["job_id"])
        result.update(nodes=2, procs_per_node=1,
                      submit_to_job_start_s=round(start - job["submitted_at"], 1) if start else None,
                      submit_to_first_step_s=round(first - job["submitted_at"], 1),
                      step_time_s_median=round(statistics.median(
                          r["step_time_s"] for r in records if "loss" in r and r["step"] > 1), 3))
    return task_dir, result


# ----------------------------------------------------------------------------------- inside torchrun


def worker(task_json: str, repeats: int = 3) -> None:
    import torch

    from nemoc.runtime import checkpoint as ckpt
    from nemoc.runtime import train

    task = train.load_task(task_json)
    stage = task.stage
    train.init_distributed(layout=stage.layout, timeout_s=300)
    try:
        train.set_seed(stage.seed)
        model, _, _ = train.build_model(plan=task.plan, stage=stage, vocab_size=task.vocab_size)
        optimizer, scheduler = train.build_optimizer(model=model, stage=stage, precision=task.plan.precision)
        restores, saves = [], []
        for _ in range(repeats):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            restored = ckpt.resume(root=task.checkpoint_dir, chunks=model, optimizer=optimizer, scheduler=scheduler,
                                   distributed_optimizer=stage.layout.distributed_optimizer, warn=lambda *_: None)
            torch.distributed.barrier()
            restores.append(time.perf_counter() - t0)
            assert restored is not None and restored.iteration == STEPS
        root = tempfile.mkdtemp(prefix="nemoc-ckpt-bench-") if torch.distributed.get_rank() == 0 else None
        holder = [root]
        torch.distributed.broadcast_object_list(holder, src=0)
        root = holder[0]
        checkpointer = ckpt.Checkpointer(root=root, keep=1, async_save=False)
        for i in range(repeats):
            state = ckpt.training_state(chunks=model, optimizer=optimizer, scheduler=scheduler,
                                        iteration=STEPS + i + 1, consumed_samples=0)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            checkpointer.save(state, iteration=STEPS + i + 1)
            torch.distributed.barrier()
            saves.append(time.perf_counter() - t0)
        checkpointer.close()
        if torch.distributed.get_rank() == 0:
            size = sum(f.stat().st_size for f in Path(ckpt.read_latest(root)).iterdir())
            shutil.rmtree(root, ignore_errors=True)
            print("RESULT " + json.dumps({"restore_s": [round(x, 3) for x in restores],
                                          "save_s": [round(x, 3) for x in saves], "checkpoint_bytes": size}), flush=True)
    finally:
        train.teardown()


def measure_checkpoint(task_dir: Path) -> dict:
    task = json.loads((task_dir / "task.json").read_text())
    plan = json.loads(Path(task["plan"]).read_text())
    layout = plan["stages"][0]["layout"]
    nproc = layout["tp"] * layout["pp"] * layout["cp"] * layout["dp"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", str(Path(__file__).resolve()),
           "--worker", str(task_dir / "task.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"checkpoint worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    raw = json.loads(line[len("RESULT "):])
    return {"ranks": nproc, "layout": f"tp{layout['tp']} pp{layout['pp']} dp{layout['dp']}",
            "distributed_optimizer": layout["distributed_optimizer"],
            "save_s_median": statistics.median(raw["save_s"]), "restore_s_median": statistics.median(raw["restore_s"]),
            **raw}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    slurm = shutil.which("sinfo") is not None and bool(os.environ.get("SLURM_CONF"))
    with tempfile.TemporaryDirectory(prefix="nemoc-bench-clusters-") as tmp:
        task_dir, result = run_quickstart(Path(tmp), slurm)
        result["checkpoint"] = measure_checkpoint(task_dir)
    result["machine"] = f"{os.cpu_count()} CPUs, shared; torch gloo"
    out = REPO / "bench" / "results" / "clusters.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
