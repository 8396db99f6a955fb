"""A test double for `nemoc.runtime.train` that honours the task.json contract (docs/graph.md, section 3).

Run under torchrun by the local launcher in tests: every rank joins a gloo process group and all-reduces
a "loss"; rank 0 writes metrics.jsonl, a checkpoint with a `latest` marker and, on success, DONE.json.
Behaviour switches (environment): FAKE_FAIL_RANK=<r> makes rank r raise; FAKE_PREEMPT_AT=<step> saves
and exits 143 at that step (once: the next run resumes from `latest`); FAKE_HANG=1 writes `pid.<rank>`
and blocks forever (to test Ctrl-C teardown).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nemoc.runtime import taskfile


def main() -> int:
    task = taskfile.resolve_upstream(json.loads(Path(sys.argv[1]).read_text()))  # parents of a chained run
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stage = json.loads(Path(task["plan"]).read_text())
    steps = next(s for s in stage["stages"] if s["name"] == task["stage"])["steps"]
    ckpt = Path(task["checkpoint_dir"])
    start = int((ckpt / "latest").read_text()) if (ckpt / "latest").exists() else 0
    if os.environ.get("FAKE_FAIL_RANK") == str(rank):
        raise RuntimeError(f"fake failure on rank {rank}")
    for dataset in task["datasets"]:
        assert os.path.exists(dataset.get("prefix", "") + ".idx") or os.path.exists(dataset.get("path", "")), dataset
    if os.environ.get("FAKE_HANG"):  # for the interrupt test: block until killed
        Path(task["output_dir"], f"pid.{rank}").write_text(str(os.getpid()))
        import time

        while True:
            time.sleep(0.2)
    preempt_at = int(os.environ.get("FAKE_PREEMPT_AT", "-1"))
    loss = torch.tensor([10.0])
    for step in range(start + 1, steps + 1):
        value = torch.tensor([10.0 / step])
        dist.all_reduce(value)
        loss = value / dist.get_world_size()
        if rank == 0:
            with open(task["metrics_path"], "a") as f:
                f.write(json.dumps({"step": step, "loss": float(loss), "lr": 1e-3, "tokens_per_s": 100.0}) + "\n")
        if step == preempt_at and start < preempt_at:
            _save(ckpt, step, rank)
            dist.destroy_process_group()
            return 143
    _save(ckpt, steps, rank)
    if rank == 0:
        done = {"checkpoint": str(ckpt / f"iter_{steps:07d}"), "final_loss": float(loss), "steps": steps,
                "resumed_from": start, "world_size": dist.get_world_size(), "init_checkpoint": task["init_checkpoint"]}
        Path(task["output_dir"], "DONE.json").write_text(json.dumps(taskfile.done_payload(task, done)))
    dist.destroy_process_group()
    return 0


def _save(ckpt: Path, step: int, rank: int) -> None:
    dist.barrier()
    if rank == 0:
        (ckpt / f"iter_{step:07d}").mkdir(parents=True, exist_ok=True)
        (ckpt / "latest").write_text(str(step))
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
