"""task.json helpers shared by every distributed entry point (`nemoc.runtime.train`, `nemoc.runtime.align`).

Input:  the raw task.json of docs/graph.md, section 3.
Output:
* `resolve_upstream(raw)`: the parents' checkpoints filled in from their DONE records. When a cluster
  launcher submits a whole chain at once (Slurm: one sbatch per task, `afterok` dependencies), a task's
  task.json is written before its parents have run, so their checkpoints are not known yet: task.json
  names each such parent under `upstream` (`{stage: {"task", "hash", "done", "init"}}`) and the task
  reads the parent's DONE.json when it starts, after Slurm has let it run.
* `identity(raw)`: the keys a task stamps into its own DONE.json (task id, hash, tokenizer, vocabulary,
  end-of-document id), so a run whose jobs finished with no `nemoc run` watching them (`--detach`) is
  recognised as finished by the next `nemoc run` and by `nemoc status`.
"""

from __future__ import annotations

import json
import time


# 2: `upstream` (parents resolved when the task starts) and the identity a task stamps into DONE.json.
# Version 1 files (no `upstream`) read the same way, so jobs queued before an upgrade still run.
TASK_JSON_VERSION = 2
READABLE_VERSIONS = (1, 2)


class TaskFileError(RuntimeError):
    """task.json cannot be completed (a parent has not finished, or finished with other settings)."""


def load(path: str, required: tuple[str, ...]):
    """Read task.json at `path`: (the raw dict with `upstream` resolved, the plan it names, its stage).
    Every problem is a TaskFileError whose message starts with `path`."""
    from nemoc.compiler.plan import from_json

    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except FileNotFoundError:
        raise TaskFileError(f"{path}: task file not found") from None
    except (OSError, ValueError) as exc:
        raise TaskFileError(f"{path}: not a readable JSON task ({exc})") from None
    if not isinstance(raw, dict) or raw.get("version") not in READABLE_VERSIONS:
        raise TaskFileError(f"{path}: task version {raw.get('version') if isinstance(raw, dict) else '?'} "
                            f"is not supported (this runtime reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")
    for key in required:
        if raw.get(key) in (None, ""):
            raise TaskFileError(f"{path}: field `{key}` is missing")
    try:
        raw = resolve_upstream(raw)
    except TaskFileError as exc:
        raise TaskFileError(f"{path}: {exc}") from None
    try:
        with open(raw["plan"], encoding="utf-8") as handle:
            plan = from_json(handle.read())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TaskFileError(f"{path}: plan {raw['plan']} is unreadable: {exc}") from None
    names = [s.name for s in plan.stages]
    if raw["stage"] not in names:
        raise TaskFileError(f"{path}: stage {raw['stage']!r} is not in the plan (stages: {', '.join(names)})")
    return raw, plan, plan.stage(raw["stage"])


def resolve_upstream(raw: dict) -> dict:
    """`raw` with `parents` (and `init_checkpoint`) completed from the DONE records under `upstream`."""
    upstream = raw.get("upstream") or {}
    if not upstream:
        return raw
    raw = dict(raw, parents=dict(raw.get("parents") or {}))
    if not isinstance(upstream, dict):
        raise TaskFileError("`upstream` is not an object of parent stages")
    for name, entry in sorted(upstream.items()):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("task", "hash", "done")):
            raise TaskFileError(f"`upstream.{name}` needs the strings `task`, `hash` and `done`")
        path = entry["done"]
        try:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        except FileNotFoundError:
            raise TaskFileError(f"stage {raw.get('stage')}: its parent {entry['task']} has not finished "
                                f"(no {path}); it must finish first") from None
        except (OSError, ValueError) as exc:
            raise TaskFileError(f"stage {raw.get('stage')}: the DONE record of its parent {entry['task']} is "
                                f"unreadable ({path}: {exc})") from None
        if not isinstance(record, dict) or record.get("hash") != entry["hash"]:
            found = record.get("hash") if isinstance(record, dict) else None
            raise TaskFileError(f"stage {raw.get('stage')}: its parent {entry['task']} finished with other settings "
                                f"(hash {str(found)[:8]}, expected {entry['hash'][:8]}; {path}); run `nemoc run` "
                                "again to rebuild the chain")
        raw["parents"][name] = record.get("checkpoint")
        if entry.get("init") and not raw.get("init_checkpoint"):
            raw["init_checkpoint"] = record.get("checkpoint")
    return raw


def identity(raw: dict) -> dict:
    """What the task writes into its DONE.json besides its results."""
    return {"task": raw.get("task"), "hash": raw.get("hash"), "tokenizer": raw.get("tokenizer"),
            "vocab_size": raw.get("vocab_size"), "eod": raw.get("eod_id")}


def plan_digest(plan_text: str, stage: str | None) -> str:
    """What a task reads of the plan, as a digest: everything but the other stages (its own stage, with
    its layout, and the stages it runs after). A queued job is attached to only if this is unchanged, so
    editing one stage never disturbs the jobs of the others."""
    import hashlib

    data = json.loads(plan_text)
    if stage is not None:
        stages = {s["name"]: s for s in data.get("stages", [])}
        own = stages.get(stage, {})
        keep = {stage, *own.get("after", [])}
        data["stages"] = [s for s in data.get("stages", []) if s["name"] in keep]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:16]


FATAL = "FATAL.json"


def mark_fatal(task_path: str, message: str) -> None:
    """Record next to task.json that the task cannot succeed as configured (a bad task file, data too
    small, a missing parent): a scheduler's failure policy must not requeue it (the Slurm script reads
    it; under torchrun the entry point's exit status does not reach the script). Best effort."""
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(task_path)), FATAL)
    try:
        from nemoc.runtime.atomic import atomic_write_json

        atomic_write_json(path, {"error": message, "time": time.time()})
    except OSError:
        pass


def done_payload(raw: dict, payload: dict) -> dict:
    """The DONE.json a task writes on success: its identity, its results, the time."""
    return {**identity(raw), **payload, "finished": time.time()}
