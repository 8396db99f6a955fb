"""The stage entrypoint's plumbing: task.json -> data, models, metrics, checkpoints, DONE.json.

Input:  a task.json (docs/graph.md, section 3) whose `stage` names an sft / lora / dpo / reward / ppo /
        rlhf / eval / export stage of the compiled plan; raw JSONL datasets (`path` + `format`), the
        tokenizer, the parents' final checkpoints.
Output: `output_dir/DONE.json` (`checkpoint`, `final_loss`, `steps`, stage metrics, `resident_models`)
        written only on success; metrics.jsonl + TensorBoard; `results.json` for eval; a Hugging Face
        directory for export.
Invariants: every user-facing failure is an `AlignError`/`DataError` message (no traceback), exit 2;
        held-out examples are never trained on (split by the dataset's validation fraction, seeded).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from megatron.core import parallel_state

from nemoc.compiler.plan import Plan, StagePlan
from nemoc.runtime import taskfile
from nemoc.runtime.align import common
from nemoc.runtime.align.common import AlignError
from nemoc.runtime.core import dist
from nemoc.runtime.metrics import open_metrics

SFT_FORMATS = ("chat", "prompt_response")


@dataclass
class StageTask:
    path: str
    plan: Plan
    stage: StagePlan
    datasets: list[dict]
    tokenizer: str | None
    vocab_size: int
    init_checkpoint: str | None
    parents: dict[str, str]
    hf_init: str | None  # a converted Hugging Face checkpoint (`init = hf(DIR)`, the hf_import task's output)
    output_dir: Path
    checkpoint_dir: Path
    metrics_path: str | None
    tensorboard_dir: str | None
    max_steps: int | None
    raw: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return min(self.stage.steps, self.max_steps) if self.max_steps is not None else self.stage.steps

    @property
    def params(self) -> dict:
        return dict(self.stage.params)


def load_task(path: str) -> StageTask:
    try:
        raw, plan, _ = taskfile.load(path, ("plan", "stage", "output_dir", "vocab_size"))
    except taskfile.TaskFileError as exc:
        raise AlignError(str(exc)) from None
    out = Path(raw["output_dir"])
    max_steps = raw.get("max_steps")
    return StageTask(
        path=os.path.abspath(path), plan=plan, stage=plan.stage(raw["stage"]), datasets=list(raw.get("datasets") or []),
        tokenizer=raw.get("tokenizer"), vocab_size=int(raw["vocab_size"]), init_checkpoint=raw.get("init_checkpoint"),
        parents=dict(raw.get("parents") or {}), hf_init=raw.get("hf_init"), output_dir=out,
        checkpoint_dir=Path(raw.get("checkpoint_dir") or out / "checkpoints"),
        metrics_path=raw.get("metrics_path"), tensorboard_dir=raw.get("tensorboard_dir"),
        max_steps=int(max_steps) if max_steps is not None else None, raw=raw,
    )


# ------------------------------------------------------------------------------------------- data


def tokenizer_of(task: StageTask):
    from nemoc.runtime.tokenizer import TokenizerError, load_tokenizer

    if not task.tokenizer:
        raise AlignError(f"stage {task.stage.name}: no tokenizer was handed to this stage (task.json `tokenizer`)")
    try:
        return load_tokenizer(task.tokenizer)
    except TokenizerError as exc:
        raise AlignError(str(exc)) from None


def raw_datasets(task: StageTask, formats: tuple[str, ...]) -> list[dict]:
    found = [d for d in task.datasets if d.get("path") and d.get("format") in formats]
    if not found:
        given = ", ".join(f"{d.get('name')} ({d.get('format', 'text')})" for d in task.datasets) or "none"
        raise AlignError(f"stage {task.stage.name} ({task.stage.kind}) needs a dataset of format "
                         f"{' | '.join(formats)}; it was given: {given}")
    return found


def validation_fraction(entry: dict) -> float:
    """The validation share of a dataset's "train,valid,test" split weights."""
    try:
        weights = [float(x) for x in str(entry.get("split") or "98,2,0").split(",")]
    except ValueError:
        return 0.02
    total = sum(weights) or 1.0
    return weights[1] / total if len(weights) > 1 else 0.0


def split_held_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then the first ceil(fraction * n) records (at least 1 when n >= 2) are held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1 if len(records) >= 2 and fraction > 0 else 0, round(fraction * len(records))))
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    return train, val


def tokenized_once(task: StageTask, what: str, template, build, formats) -> list[dict]:
    """The stage's samples tokenized by rank 0 into a content-hashed cache under the stage's output
    directory (runtime/hf/datasets.py `tokenized_cache`), which every other rank reads after a barrier:
    the key hashes the data files' bytes, their formats and validation fractions, the seed, the chat
    template (its jinja or markers) and the tokenizer's files, so a change of any re-tokenizes."""
    from nemoc.runtime.hf.datasets import content_key, file_digest, tokenized_cache, tokenizer_digest

    entries = raw_datasets(task, formats)
    key = content_key(what, task.stage.seed, template.fingerprint(), tokenizer_digest(task.tokenizer),
                      *[(e["format"], validation_fraction(e), file_digest(e["path"])) for e in entries])
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    writer = not ready or torch.distributed.get_rank() == 0
    return tokenized_cache(task.output_dir / "tokenized", f"{what}-{key}", build, writer=writer,
                           wait=torch.distributed.barrier if ready else None)


# ----------------------------------------------------------------------------------------- models


def init_process_group(task: StageTask, *, single: bool = False) -> None:
    layout = task.stage.layout
    tp, pp, cp = (1, 1, 1) if single else (layout.tp, layout.pp, layout.cp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp * cp * (1 if single else layout.dp):
        if single:
            raise AlignError(f"stage {task.stage.name}: runs in one process, started with {world}")
        raise AlignError(f"stage {task.stage.name}: world size {world} != tp({tp}) * pp({pp}) * cp({cp}) * "
                         f"dp({layout.dp})")
    ep, etp = (1, 1) if single else (layout.ep, layout.etp)  # a MoE model's expert split (1 for dense)
    common.init_distributed(tp=tp, pp=pp, cp=cp, vp=None if single else layout.vp, ep=ep, etp=etp, seed=task.stage.seed,
                            host=task.stage.execution.host if task.stage.execution is not None else None)


@dataclass(frozen=True)
class Start:
    """Where a model's weights come from: a Megatron-Core checkpoint directory (a parent stage's), or a
    converted Hugging Face checkpoint (`hf`: the hf_import task's output, loaded by runtime/hf/load.py)."""

    path: str
    hf: bool = False

    def __str__(self) -> str:
        return self.path


def build(task: StageTask, *, checkpoint: str | Start | None, scalar_head: bool = False, skip_output: bool = False,
          single: bool = False, precision: str | None = None, frozen: bool = False):
    """A chunk for this stage's layout (or TP=1 for single-process kinds), loaded from `checkpoint` (a
    parent's checkpoint directory, or a `Start`: a converted Hugging Face checkpoint). `frozen`: a model that
    never trains (`build_frozen`), built without the layout's embedding weight-gradient deferral."""
    ex = task.stage.execution
    layout = task.stage.layout
    if frozen:  # Megatron-Core 0.16.1 asserts a frozen weight gets no deferral buffer (tensor_parallel/layers.py)
        layout = replace(layout, defer_embedding_wgrad_compute=False, wgrad_deferral_limit=0)
    if single or precision is not None:  # one process (export, eval today): TP=1, the same attention core
        chunk = common.build_gpt(task.plan.model, common.single_layout(), precision=precision or ex.precision,
                                 vocab=task.vocab_size, seq_length=task.stage.seq_length, scalar_head=scalar_head,
                                 attention_backend=ex.attention)
    else:  # the stage's execution as planned: the construction pretraining uses (runtime/core/build.py)
        chunk = common.build_gpt(task.plan.model, layout, execution=ex, vocab=task.vocab_size,
                                 seq_length=task.stage.seq_length, scalar_head=scalar_head,
                                 facts=dist.machine_facts(task.stage.kernels))
    if isinstance(checkpoint, Start) and checkpoint.hf:
        load_hf(chunk, checkpoint.path, vocab=task.vocab_size, skip_output=skip_output)
    elif checkpoint:
        common.load_model(chunk, str(checkpoint), skip_output=skip_output)
    return chunk


def varlen_attention(task: StageTask) -> bool:
    """Whether the stage's attention core takes packed sequences as variable-length segments (TE's, or the
    SDPA core of runtime/model.py); Megatron's unfused core needs an explicit mask instead."""
    return task.stage.execution.attention != "unfused"


def load_hf(chunk, converted: str, *, vocab: int, skip_output: bool = False) -> None:
    from nemoc.runtime.hf.load import LoadError, load_converted

    try:
        for one in common.chunk_list(chunk):  # every virtual-pipeline chunk reads its own layers
            load_converted(one, converted, vocab=vocab, skip_output=skip_output)
    except LoadError as exc:
        raise AlignError(str(exc)) from None


def policy_start(task: StageTask) -> Start:
    """Where the stage's trained model starts: `init = hf(DIR)` when the graph handed the stage a converted
    Hugging Face checkpoint (the stage's own `init`, or the model's for a stage without `after`,
    compiler.graph.stage_init), else the first parent's checkpoint."""
    if task.hf_init:
        return Start(task.hf_init, hf=True)
    return Start(parent_checkpoint(task))


def parent_checkpoint(task: StageTask, *, kind: str | None = None) -> str:
    """The checkpoint of the first parent (or of the first parent stage of `kind`)."""
    for name in task.stage.after:
        if kind is None or task.plan.stage(name).kind == kind:
            path = task.parents.get(name) or (task.init_checkpoint if kind is None else None)
            if path:
                return path
    what = f"a parent stage of kind {kind}" if kind else "a parent stage (`after`)"
    raise AlignError(f"stage {task.stage.name} ({task.stage.kind}) needs {what} with a checkpoint")


def build_frozen(task: StageTask, *, checkpoint: str | Start | None, scalar_head: bool = False):
    """A model the stage only runs forward (a DPO / KTO / PPO / GRPO reference, a reward model, eval's model):
    `build(frozen=True)`, then `freeze`. Its output layer has no weight gradient, so the stage layout's
    `defer_embedding_wgrad_compute` (the policy's) is not passed to it: Megatron-Core 0.16.1's
    ColumnParallelLinear hands a frozen weight's `linear_with_frozen_weight` the deferral's `grad_output_buffer`
    (an empty list), which that function asserts is None (tensor_parallel/layers.py)."""
    return freeze(build(task, checkpoint=checkpoint, scalar_head=scalar_head, frozen=True))


def freeze(chunk):
    for p in chunk.parameters():
        p.requires_grad_(False)
    chunk.eval()  # every virtual-pipeline chunk of a `Chunks`
    return chunk


def open_stage_metrics(task: StageTask, total: int):
    from nemoc.runtime.tracking import TrackingError, target

    try:
        return open_metrics(rank=torch.distributed.get_rank(), metrics_path=task.metrics_path,
                            tensorboard_dir=task.tensorboard_dir, total_steps=total, title=task.stage.name,
                            tracking=target(task.plan, task.stage, task.output_dir))
    except TrackingError as exc:
        raise AlignError(str(exc)) from None


def log_step(metrics, record: dict, *, tokens: int, log_every: int, total: int) -> None:
    step = record["step"]
    if step % max(log_every, 1) and step != total and step != 1:
        return
    rec = dict(record)
    rec.setdefault("loss", rec.get("policy_loss", float("nan")))
    rec["tokens_per_s"] = tokens / max(rec.get("step_time_s", 0.0), 1e-9) if tokens else 0.0
    metrics.log(rec)


def save_final(task: StageTask, chunk, *, extra: dict | None = None) -> str:
    """The stage's final model-only checkpoint (what downstream stages and export load)."""
    path = task.checkpoint_dir / "final"
    common.save_model(chunk, path, extra={"stage": task.stage.name, "kind": task.stage.kind, **(extra or {})})
    return str(path)


def write_done(task: StageTask, payload: dict) -> None:
    payload = {"stage": task.stage.name, "kind": task.stage.kind, **payload}
    common.write_json(task.output_dir / "DONE.json", taskfile.done_payload(task.raw, payload))


def dp_info() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def upstream(task: StageTask, *, including_self: bool = False):
    """The stage plans above this task's stage (transitively through `after`), nearest first (breadth
    first, each once); with `including_self`, this stage first."""
    seen, todo = set(), [task.stage.name] if including_self else list(task.stage.after)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        node = task.plan.stage(name)
        yield node
        todo += list(node.after)


def _hf_source(task: StageTask) -> str | None:
    """The Hugging Face directory the exported model started from: the nearest ancestor stage's own
    `init = hf(DIR)`, else the model's; None for a model trained from scratch."""
    for parent in upstream(task):
        if parent.params.get("init"):
            return _plan_path(task, str(parent.params["init"]))
    return _plan_path(task, task.plan.model.init) if task.plan.model.init else None


def _plan_path(task: StageTask, path: str) -> str:
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.abspath(task.plan.root or "."), path)


def trained_template(task: StageTask) -> dict | None:
    """The chat template the exported model learned to answer in: the `template` of the nearest stage that
    renders conversations (this one, then its ancestors, breadth first), as the plan resolved it; None when
    no stage of the chain renders conversations (pretraining, an export of an imported checkpoint)."""
    for node in upstream(task, including_self=True):
        if node.params.get("template"):
            return dict(node.params["template"])
    return None


def export_stop_ids(task: StageTask) -> tuple[int, ...]:
    """The ids an exported model's `generate` must stop at (data.stop_ids): EOD, the tokenizer's eos and the
    end-of-turn token of the template a stage of its chain trained it to answer in; () without a
    tokenizer or without such a stage (an export of an imported or pretrained checkpoint keeps its
    source's generation config as it is: a base model is not taught to end turns)."""
    from nemoc.runtime.align.data import stop_ids, template_for
    from nemoc.runtime.tokenizer import TokenizerError, load_tokenizer

    tokenizer = task.tokenizer or _hf_source(task)
    template = trained_template(task)
    if not tokenizer or template is None:
        return ()
    try:
        tok = load_tokenizer(tokenizer)
    except TokenizerError as exc:
        raise AlignError(str(exc)) from None
    return stop_ids(template_for({"template": template}, tokenizer), tok)


def write_hf(task: StageTask, checkpoint: str, out, *, dtype: str | None = None):
    """A stage checkpoint (any layout) streamed into a Hugging Face directory `out` with the config,
    generation config and tokenizer files of the model it started from: (path, manifest). The generation
    config's `eos_token_id` also lists the chat template's end-of-turn token (`export_stop_ids`)."""
    from nemoc.compiler.hfconfig import HfConfigError
    from nemoc.runtime import fsdp_checkpoint
    from nemoc.runtime.hf import convert, trained

    tokenizer = task.tokenizer
    tokenizer_dir = tokenizer if tokenizer and os.path.isdir(tokenizer) else None
    try:
        path, manifest = trained.export_trained(
            checkpoint, task.plan.model, out, vocab=task.vocab_size, source=_hf_source(task),
            tokenizer_dir=tokenizer_dir, dtype=dtype, stop_ids=export_stop_ids(task),
            special_ids=trained.tokenizer_special_ids(tokenizer_dir, task.raw.get("eod_id")))
    except (trained.TrainedExportError, convert.ConversionError, HfConfigError, OSError,
            fsdp_checkpoint.FullCheckpointError) as exc:  # an FSDP checkpoint's shard unreadable mid-export
        raise AlignError(str(exc)) from None
    if tokenizer and os.path.isfile(tokenizer) and not (path / os.path.basename(tokenizer)).exists():
        (path / os.path.basename(tokenizer)).write_bytes(open(tokenizer, "rb").read())
    trained.write_tokenizer_config(path, task.raw.get("eod_id"))
    return path, manifest
