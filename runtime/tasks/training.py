"""Built-in distributed kind `pretrain` and the task.json every distributed kind starts from.

`base_task_json(ctx)` builds the contract of docs/graph.md, section 3, from the plan and the upstream
DONE records: datasets (indexed `prefix` or validated raw `path`), weights, split, tokenizer, vocab size,
the parents' final checkpoints, and the output locations inside the task's directory.
"""

from __future__ import annotations

from nemoc.runtime.taskfile import TASK_JSON_VERSION
from nemoc.runtime.tasks import TaskContext, TaskError, TaskKind, register


def _split_string(split) -> str:
    """(0.98, 0.02, 0.0) -> "98,2,0" (Megatron-Core normalises the weights itself)."""
    return ",".join(f"{100 * float(x):g}" for x in split)


def _datasets(ctx: TaskContext) -> list[dict]:
    specs = {d.name: d for d in ctx.plan.data}
    out = []
    for _, record in ctx.inputs_of("dataset"):
        spec = specs[record["name"]]
        entry = {"name": spec.name, "weight": spec.weight, "format": spec.format, "split": _split_string(spec.split)}
        if "prefix" in record:
            entry["prefix"] = record["prefix"]
        else:
            entry.update(path=record["path"], paths=record.get("paths", [record["path"]]))
        out.append(entry)
    return out


def _tokenizer(ctx: TaskContext) -> tuple[str | None, int | None, int | None]:
    """The one tokenizer of the stage's inputs (datasets, else parents); two different ones is an error."""
    records = [r for _, r in ctx.inputs_of("dataset")] or [r for _, r in ctx.inputs_of("checkpoint")]
    found = {(r.get("tokenizer"), r.get("vocab_size"), r.get("eod")) for r in records if r.get("tokenizer")}
    if len(found) > 1:
        names = ", ".join(sorted(str(t) for t, _, _ in found))
        raise TaskError(f"{ctx.task.id}: the stage's inputs use different tokenizers ({names}); one model needs one")
    return next(iter(found), (None, None, None))


def base_task_json(ctx: TaskContext) -> dict:
    stage = ctx.stage
    tokenizer, vocab_size, eod = _tokenizer(ctx)
    if vocab_size is not None and vocab_size > ctx.plan.model.vocab:
        raise TaskError(f"{ctx.task.id}: the tokenizer has {vocab_size} tokens but the model's vocabulary is "
                        f"{ctx.plan.model.vocab}; raise model.vocab or use a smaller tokenizer ({tokenizer})")
    checkpoints = [rec for _, rec in ctx.inputs_of("checkpoint")]
    parents = {rec["name"]: rec.get("checkpoint") for rec in checkpoints if not rec.get("converted")}
    # `init = hf(DIR)`: the hf_import task's converted checkpoint, loaded where a parent's would be
    converted = next((rec["converted"] for rec in checkpoints if rec.get("converted")), None)
    first_parent = stage.after[0] if stage is not None and stage.after else None
    datasets = _datasets(ctx)
    out = ctx.out_dir
    return {
        "version": TASK_JSON_VERSION,
        "task": ctx.task.id,
        "hash": ctx.task.hash,
        "kind": ctx.task.kind,
        "plan": str(ctx.plan_path),
        "stage": ctx.task.stage,
        "datasets": datasets,
        "split": datasets[0]["split"] if datasets else None,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if vocab_size is not None else ctx.plan.model.vocab,
        "eod_id": eod,
        "init_checkpoint": parents.get(first_parent) if first_parent else None,
        "parents": parents,
        "hf_init": converted,
        "output_dir": str(out),
        "checkpoint_dir": str(out / "checkpoints"),
        "metrics_path": str(out / "metrics.jsonl"),
        "tensorboard_dir": str(out / "tensorboard") if ctx.plan.tracking.tensorboard else None,
        "max_steps": ctx.options.get("max_steps"),
    }


register(TaskKind(name="pretrain", module="nemoc.runtime.train"))
