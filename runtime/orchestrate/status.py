"""The state of a run, read from its run directory: what `nemoc status` shows and `nemoc report` charts.

Input:  a run directory (status.json, each task's DONE.json and metrics.jsonl, slurm.json when its
        tasks were submitted to Slurm, asking squeue once for the jobs that outlive `nemoc run`).
Output: `status_rows(run_dir)`: one dict per task (state, job, hash, progress, last loss, held-out
        metrics), or None when status.json is missing or damaged past reading.
Invariants: reads only; a task whose `nemoc run` is gone is shown `interrupted`, never `running`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def status_rows(run_dir: str | Path) -> list[dict] | None:
    """One row per task of a run directory's status.json, with progress from its metrics.jsonl."""
    from nemoc.runtime.orchestrate.executor import last_metrics, load_status
    from nemoc.runtime.orchestrate.rundir import RunDir

    data = load_status(run_dir)
    tasks = data.get("tasks") if data is not None else None
    if not isinstance(tasks, dict) or not all(isinstance(rec, dict) for rec in tasks.values()):
        return None  # missing, or damaged past reading: not the shape the executor writes
    rd = RunDir(run_dir)
    jobs = _slurm_jobs(Path(run_dir), tasks)
    # status.json says "running" but the `nemoc run` that writes it is gone (SIGKILL, a crash, disk full):
    # nothing runs that task any more (runtime/orchestrate/procs.py: its recorded pid and start time)
    orphaned = not data.get("finished") and any(rec.get("state") == "running" for rec in tasks.values()) \
        and not rd.holder_alive()
    rows = []
    order = data.get("order")
    order = [t for t in order if isinstance(t, str) and t in tasks] if isinstance(order, list) else []
    order += sorted(t for t in tasks if t not in order)
    for task_id in order:
        rec = data["tasks"][task_id]
        task_dir = rd.task_dir(task_id)
        metrics = last_metrics(task_dir / "metrics.jsonl") or {}
        done = rd.done_record(task_id) or {}
        steps_done = metrics.get("step")
        if done.get("hash") == rec.get("hash") and done.get("steps") is not None:
            steps_done = done["steps"]
        state, job_id = rec.get("state", "?"), None
        stale = False
        if task_id in jobs:
            job_id = jobs[task_id]["job_id"]
            state = _live_state(state, jobs[task_id], done.get("hash") == rec.get("hash"))
        elif state == "running" and orphaned:
            state, stale = "interrupted", True
        rows.append({
            "id": task_id,
            "state": state,
            "job_id": job_id,
            "hash": rec.get("hash", ""),
            "steps_done": steps_done,
            "steps_total": rec.get("steps_total"),
            "last_loss": metrics.get("loss", done.get("final_loss")),
            "tokens_per_s": metrics.get("tokens_per_s"),
            "elapsed_s": rec.get("elapsed_s"),
            "error": rec.get("error", ""),
            "held_out": held_out_metrics(done) if done.get("hash") == rec.get("hash") else None,
            **({"stale": True} if stale else {}),
        })
    return rows


def held_out_metrics(done: Mapping) -> dict | None:
    """The held-out metrics an alignment stage's DONE.json reports, as {name: {"before", "after"}}: SFT's
    response loss, DPO's / ORPO's preference (implicit-reward) and likelihood accuracy, KTO's reward AUC
    (desirable over undesirable held-out examples), GRPO's mean held-out reward, a reward model's pair
    accuracy, eval's per-dataset perplexity and preference accuracy."""
    out: dict[str, dict] = {}
    if isinstance(done.get("val_response_loss"), (int, float)):
        out["response_loss"] = {"before": done.get("val_response_loss_before"), "after": done["val_response_loss"]}
    val, before = done.get("val"), done.get("val_before")
    before = before if isinstance(before, dict) else {}
    if isinstance(val, dict):
        for key, name in (("reward_accuracy", "preference_accuracy"), ("accuracy", "pair_accuracy"),
                          ("likelihood_accuracy", "likelihood_accuracy"), ("reward_auc", "reward_auc"),
                          ("reward", "reward")):
            if isinstance(val.get(key), (int, float)):
                out[name] = {"before": before.get(key), "after": val[key]}
    datasets = done.get("datasets")
    if isinstance(datasets, dict):
        for name, m in sorted(datasets.items()):
            for key in ("perplexity", "likelihood_accuracy", "preference_accuracy", "reward_margin", "accuracy"):
                if isinstance(m, dict) and isinstance(m.get(key), (int, float)):
                    out[f"{name}.{key}"] = {"before": None, "after": m[key]}
    return out or None


# Slurm job states as task states (squeue's long names; `nemoc status` of a run whose jobs outlive `nemoc run`)
_SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED",
                 "PREEMPTED", "RESIZING", "SIGNALING", "STAGE_OUT"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING"}


def _slurm_jobs(root: Path, tasks: Mapping[str, dict]) -> dict[str, dict]:
    """slurm.json's task -> {"job_id", "hash", "live": squeue's {"JobState", "Reason"} or None}, for the
    tasks recorded with the job's hash; {} when there is none or Slurm is not reachable from here. One
    squeue call for the whole run; if it fails, the recorded states are shown."""
    import shutil

    if not (root / "slurm.json").is_file() or shutil.which("squeue") is None:
        return {}
    from nemoc.runtime.orchestrate import launch_slurm

    try:
        jobs = launch_slurm.read_record(root).get("jobs") or {}
    except launch_slurm.SlurmError:
        return {}
    jobs = {task: {"job_id": str(rec["job_id"]), "hash": str(rec.get("hash", ""))} for task, rec in jobs.items()
            if task in tasks and str(rec.get("hash", "")) in ("", tasks[task].get("hash"))}
    try:
        live = launch_slurm.job_states(job["job_id"] for job in jobs.values())
    except launch_slurm.SlurmError:
        return {task: dict(job, live=None, unanswered=True) for task, job in jobs.items()}
    return {task: dict(job, live=live.get(job["job_id"], {})) for task, job in jobs.items()}


def _live_state(recorded: str, job: Mapping, done: bool) -> str:
    """The task's state from its job when `nemoc run` is not following it (detached, killed, or it gave
    up following): a job that is queued or running is shown so whatever status.json recorded."""
    if done:
        return recorded if recorded in ("done", "cached") else "done"
    if job.get("unanswered"):
        return recorded
    state, reason = job["live"].get("JobState", ""), job["live"].get("Reason", "")
    if state in _SLURM_QUEUED:
        return f"queued ({reason})" if reason not in ("", "None") else "queued"
    if state in _SLURM_RUNNING:
        return "running"
    if recorded not in ("queued", "running", "pending", "interrupted"):
        return recorded
    if state == "COMPLETED":
        return "failed (job completed without DONE.json)"
    if state:
        return f"failed ({state.lower()})" if state != "CANCELLED" else "cancelled"
    return recorded if recorded != "queued" else "failed (job gone from Slurm without DONE.json)"
