"""The training stage: `python -m nemoc.runtime.train TASK_JSON`, one process per rank (torchrun).

Input:  a task JSON (contract in docs/runtime.md): the compiled plan, the stage name, the tokenized
datasets (Megatron .bin/.idx prefixes + weights), vocabulary size, optional init checkpoint, output,
checkpoint, metrics and TensorBoard paths, optional `max_steps`.
Output: checkpoints (runtime.checkpoint), metrics.jsonl + TensorBoard + console progress
(runtime.metrics), `output_dir/DONE.json` on success. Exit status: 0 done; 143 stopped by
SIGTERM/SIGINT/SIGUSR1 after finishing the step and saving a checkpoint (`output_dir/PREEMPTED.json`
says which); 1 failure (the failing rank prints `[nemoc rank R] error during <phase>: ...`, or a
one-line `[nemoc rank R] error: ...` for a diverged loss, "loss became NaN at step N ...", no usable
checkpoint, or a failed save, "checkpoint save failed at step N: No space left on device (path)");
2 unreadable task.

Everything Megatron-Core sees comes from runtime.megatron_args; the process group, model, optimizer
and the loop on Megatron-Core's schedules are the training core's (runtime/core/: `init_distributed`,
`build_model`, `build_optimizer`, `restore_or_initialize`, `train_loop`, `evaluate`, re-exported here
for existing callers). This module adds what is pretraining's own: the task file, GPTDataset batches
(`micro_batches`) and the next-token forward step (`gpt_forward_step`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from nemoc.runtime import core  # noqa: F401  (the CPU adaptation, before any Megatron import)
from nemoc.runtime.core.build import build_model, build_optimizer, restore_or_initialize, save_final
from nemoc.runtime.core.dist import (  # noqa: F401  (re-exported: the pieces other tools import from here)
    DEFAULT_TIMEOUT_S, StopSignal, TaskError, device, init_distributed, kernel_setup, machine_facts, rank0_print,
    report_failure, set_phase, set_seed, teardown,
)
from nemoc.runtime.core.loop import (  # noqa: F401
    LoopState, ReplayableIterator, Throughput, chunk_iterators, eval_iters, evaluate, throughput_for, train_loop,
    train_step,
)

from megatron.core import parallel_state  # noqa: E402

from nemoc.compiler.plan import Plan, StagePlan  # noqa: E402
from nemoc.runtime import checkpoint as ckpt  # noqa: E402
from nemoc.runtime import faults  # noqa: E402
from nemoc.runtime import megatron_args as margs  # noqa: E402
from nemoc.runtime import model as mdl  # noqa: E402
from nemoc.runtime import mcore_cpu  # noqa: E402
from nemoc.runtime import taskfile  # noqa: E402
from nemoc.runtime.metrics import open_metrics  # noqa: E402
from nemoc.runtime.tracking import target as tracking_target  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_BAD_TASK, EXIT_PREEMPTED = 0, 1, 2, 143


# ------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class DatasetRef:
    name: str
    prefix: str
    weight: float = 1.0


@dataclass(frozen=True)
class Task:
    plan: Plan
    stage: StagePlan
    datasets: tuple[DatasetRef, ...]
    vocab_size: int
    output_dir: str
    checkpoint_dir: str
    metrics_path: str | None = None
    tensorboard_dir: str | None = None
    tokenizer: str | None = None
    eod_id: int | None = None
    init_checkpoint: str | None = None
    hf_init: str | None = None  # a converted Hugging Face checkpoint (`init = hf(DIR)`)
    max_steps: int | None = None
    split: str | None = None  # "98,2,0"; None = the plan's DataSpec.split
    timeout_s: int = DEFAULT_TIMEOUT_S
    path: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # task.json as resolved (DONE identity)

    @property
    def steps(self) -> int:
        """Iterations this invocation trains up to (absolute)."""
        return min(self.stage.steps, self.max_steps) if self.max_steps is not None else self.stage.steps


def load_task(path: str) -> Task:
    try:
        raw, plan, stage = taskfile.load(path, ("plan", "stage", "datasets", "vocab_size", "output_dir",
                                                "checkpoint_dir"))
    except taskfile.TaskFileError as exc:
        raise TaskError(str(exc)) from None
    layout = stage.layout
    if layout.micro_batch * layout.num_microbatches * layout.dp != layout.global_batch:
        raise TaskError(f"{path}: micro_batch({layout.micro_batch}) * num_microbatches({layout.num_microbatches})"
                        f" * dp({layout.dp}) = {layout.micro_batch * layout.num_microbatches * layout.dp}"
                        f" != global_batch({layout.global_batch})")
    datasets = []
    for i, entry in enumerate(raw["datasets"]):
        if not isinstance(entry, dict) or not entry.get("prefix"):
            raise TaskError(f"{path}: datasets[{i}] needs a `prefix`")
        datasets.append(DatasetRef(str(entry.get("name", f"data{i}")), entry["prefix"], float(entry.get("weight", 1.0))))
    if not datasets:
        raise TaskError(f"{path}: `datasets` is empty")
    max_steps = raw.get("max_steps")
    return Task(
        plan=plan, stage=stage, datasets=tuple(datasets), vocab_size=int(raw["vocab_size"]),
        output_dir=raw["output_dir"], checkpoint_dir=raw["checkpoint_dir"],
        metrics_path=raw.get("metrics_path"), tensorboard_dir=raw.get("tensorboard_dir"),
        tokenizer=raw.get("tokenizer"), eod_id=raw.get("eod_id"), init_checkpoint=raw.get("init_checkpoint"),
        hf_init=raw.get("hf_init"), max_steps=int(max_steps) if max_steps is not None else None, split=raw.get("split") or None,
        timeout_s=int(raw.get("timeout_s") or DEFAULT_TIMEOUT_S), path=os.path.abspath(path), raw=raw,
    )


# ------------------------------------------------------------------------------------------- data


class DatasetTokenizer:
    """What GPTDataset needs from a tokenizer: vocabulary size, end-of-document id, pad id.

    The GPT stage uses no EOD-based masking (reset_position_ids / reset_attention_mask /
    eod_mask_loss are off), so an unknown EOD (-1) never matches a token."""

    def __init__(self, *, vocab_size: int, eod: int | None, pad: int | None = None):
        self.vocab_size = vocab_size
        self.eod = -1 if eod is None else int(eod)
        self.pad = -1 if pad is None else int(pad)
        self.unique_identifiers = {"class": "nemoc.DatasetTokenizer", "vocab_size": vocab_size, "eod": self.eod}


def dataset_tokenizer(task: Task) -> DatasetTokenizer:
    eod, pad = task.eod_id, None
    if eod is None and task.tokenizer:
        try:  # the data engineer's wrapper, when present
            from nemoc.runtime import tokenizer as tokmod

            loader = getattr(tokmod, "load_tokenizer", None) or getattr(tokmod, "load", None)
            if loader is not None:
                tok = loader(task.tokenizer)
                eod, pad = getattr(tok, "eod", None), getattr(tok, "pad", None)
        except Exception:  # no wrapper / unreadable: EOD is not needed by this stage (see above)
            eod = None
    return DatasetTokenizer(vocab_size=task.vocab_size, eod=eod, pad=pad)


def split_string(plan: Plan, stage: StagePlan) -> str:
    """Megatron's "train,valid,test" weights from the stage's first data source's DataSpec.split."""
    specs = {d.name: d for d in plan.data}
    spec = next((specs[n] for n in stage.data if n in specs), None)
    split = spec.split if spec is not None else (0.98, 0.02, 0.0)
    return ",".join(f"{x:g}" for x in split)



def build_gpt_datasets(*, task: Task, stage: StagePlan, seed: int):
    """(train, valid) GPTDatasets (BlendedDataset if several sources) via BlendedMegatronDatasetBuilder.

    Sizes come from the *plan* (steps x global batch), never from max_steps, so an interrupted run
    and its resumption see the very same sample order."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    set_phase("build datasets")
    for ref in task.datasets:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(ref.prefix + ext):
                raise TaskError(f"dataset {ref.name!r}: {ref.prefix + ext} does not exist (was data preparation run?)")
    prefixes = [d.prefix for d in task.datasets]
    weights = [d.weight for d in task.datasets] if len(prefixes) > 1 else None
    split = task.split or split_string(task.plan, stage)
    gb = stage.layout.global_batch
    evals = (stage.steps // stage.eval_every + 1) if stage.eval_every else 0
    valid_needed = float(split.split(",")[1]) > 0 and evals > 0
    sizes = [stage.steps * gb, eval_iters(stage) * gb if valid_needed else 0, 0]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=stage.seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=os.path.join(task.output_dir, "dataset_cache"), tokenizer=dataset_tokenizer(task),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,  # causal masking is done by the attention kernel
        mid_level_dataset_surplus=0.005,
    )
    check_splits_have_tokens(task.datasets, config.split_matrix, sizes, split)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, (valid if valid_needed else None)


def check_splits_have_tokens(datasets, split_matrix, sizes, split: str) -> None:
    """Every split that must yield samples holds at least one token of every dataset; raises TaskError.

    Megatron cuts each dataset's documents by `split` (rounding) and, for a part with no tokens, loops
    forever computing how many epochs it needs; a corpus of a handful of documents gets there."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = ("training", "validation", "test")
    for ref in datasets:
        indexed = IndexedDataset(ref.prefix)  # kept alive while `lengths` (a view of its mmap) is read
        lengths = indexed.sequence_lengths
        count = len(lengths)
        for i, bounds in enumerate(split_matrix):
            if bounds is None or not sizes[i]:
                continue
            begin, end = int(round(bounds[0] * count)), int(round(bounds[1] * count))
            if not np.any(lengths[begin:end]):
                raise TaskError(
                    f"dataset {ref.name!r} ({ref.prefix}) is too small: the {names[i]} part of the split "
                    f"{split} gets {end - begin} of its {count} document(s) and no tokens; add documents, "
                    f"or change the data's `split`" + (" or drop the stage's eval_every" if i == 1 else ""))


_BATCH_DTYPES = (("tokens", torch.int64), ("labels", torch.int64), ("loss_mask", torch.float32),
                 ("position_ids", None))


def collate(samples: list[dict], dev: torch.device) -> dict:
    """GPTDataset samples -> one micro-batch: a stack per key, a dtype conversion only where the samples
    differ from it (GPTDataset's are already int64 / float32; every tensor call costs host time)."""
    batch = {}
    for key, dtype in _BATCH_DTYPES:
        stacked = torch.stack([s[key] if isinstance(s[key], torch.Tensor) else torch.as_tensor(s[key])
                               for s in samples])
        batch[key] = stacked if dtype is None or stacked.dtype == dtype else stacked.to(dtype)
    if dev.type != "cpu":
        # From pinned host memory the copy is asynchronous: the host goes on issuing kernels instead of
        # waiting for the stream to drain before each micro batch, as a copy from pageable memory makes
        # it (docs/runtime.md, "What was wrong with the runtime-vs-bare comparison"). The caching host
        # allocator keeps each pinned buffer until its copy has completed.
        batch = {k: v.pin_memory().to(dev, non_blocking=True) for k, v in batch.items()}
    return batch


def micro_batches(dataset, *, start_sample: int, micro_batch: int, dp_rank: int, dp_size: int,
                  dev: torch.device | None = None) -> Iterator[dict]:
    """This DP rank's micro-batches from global sample `start_sample` on, in Megatron-LM's
    MegatronPretrainingSampler order: each slice of micro_batch * dp consecutive samples is one
    micro-batch per DP rank, so a global batch holds the same samples for every DP size."""
    dev = dev or device()
    index = start_sample
    while True:
        first = index + dp_rank * micro_batch
        yield collate([dataset[(first + k) % len(dataset)] for k in range(micro_batch)], dev)
        index += micro_batch * dp_size


# ------------------------------------------------------------------------------- forward and loss


def masked_lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor, mtp_layers: int = 0):
    """(sum of token losses, token count, report) -- the schedule divides by the token count. `mtp_layers`: the
    multi-token prediction depths this training forward ran (`mtp_reports`)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens.detach()]),
                                        **mtp_reports(mtp_layers)}


def mtp_report_names(layers: int) -> tuple[str, ...]:
    """The metrics of the multi-token prediction losses, named as Megatron-LM logs them
    (MTPLossLoggingHelper.track_mtp_metrics: "mtp_1 loss", ...)."""
    return tuple(f"mtp_{i + 1} loss" for i in range(layers))


def mtp_reports(layers: int) -> dict[str, torch.Tensor]:
    """This micro batch's MTP losses, taken from Megatron-Core's tracker: GPTModel._postprocess adds each depth's
    token-mean loss (the rolled loss mask's tokens, before `mtp_loss_scaling_factor`) to
    `MTPLossLoggingHelper.tracker["values"]` during a training forward, and the schedule calls this loss function
    right after that forward, so the tracker holds exactly this micro batch's; it is zeroed for the next. Each is
    a per-micro-batch scalar, which the loop averages over micro batches and data-parallel (x context-parallel)
    ranks: what Megatron-LM logs (track_mtp_metrics: the DP x CP average, x 1 / num_microbatches)."""
    if not layers:
        return {}
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker.get("values")
    if values is None:
        return {}
    out = {name: values[i].detach().clone() for i, name in enumerate(mtp_report_names(layers))}
    values.zero_()
    return out


def gpt_forward_step(data_iterator, model):
    """Megatron forward_step_func for next-token prediction on GPTDataset batches."""
    batch = next(data_iterator)
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch)
    # the loss mask reaches the model as Megatron-LM's pretrain_gpt.py `forward_step` passes it: GPTModel._postprocess
    # masks (and counts) each multi-token prediction depth's loss with it, rolled; without it every position counts,
    # pad tokens and the positions GPTDataset masks included
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"])
    mtp = (getattr(mdl.unwrap(model).config, "mtp_num_layers", None) or 0) if model.training else 0
    return output, partial(masked_lm_loss, batch["loss_mask"], mtp_layers=mtp)


# ------------------------------------------------------------------------------------ the stage


def _write_json_atomic(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt.write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def run_task(task: Task, *, stop: StopSignal | None = None) -> int:
    """Run one training stage inside an initialised process group. Returns the exit status."""
    stage, plan = task.stage, task.plan
    rank = torch.distributed.get_rank()
    set_seed(stage.seed, stage.execution.host)
    facts, warning = kernel_setup(stage.kernels)
    if warning:
        rank0_print(warning)
    model, config, padded_vocab = build_model(plan=plan, stage=stage, vocab_size=task.vocab_size, facts=facts)
    optimizer, scheduler = build_optimizer(model=model, stage=stage, precision=stage.execution.precision)
    metrics = open_metrics(rank=rank, metrics_path=task.metrics_path, tensorboard_dir=task.tensorboard_dir,
                           total_steps=task.steps, title=stage.name, tracking=tracking_target(plan, stage, task.output_dir))
    checkpointer = None
    try:
        restored = restore_or_initialize(root=task.checkpoint_dir, init_checkpoint=task.init_checkpoint,
                                         distributed_optimizer=stage.layout.distributed_optimizer, model=model, optimizer=optimizer, scheduler=scheduler,
                                         metrics=metrics, hf_init=task.hf_init, vocab_size=task.vocab_size)
        state = LoopState()
        if restored is not None:
            state.iteration, state.consumed_samples = restored.iteration, restored.consumed_samples
        metrics.start_step = state.iteration
        train_ds, valid_ds = build_gpt_datasets(task=task, stage=stage, seed=stage.seed)
        layout = stage.layout
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        batches = partial(micro_batches, micro_batch=layout.micro_batch, dp_rank=dp_rank, dp_size=dp_size)
        train_iterators = chunk_iterators(
            lambda: ReplayableIterator(batches(train_ds, start_sample=state.consumed_samples)), len(model))
        make_valid = (lambda: chunk_iterators(lambda: batches(valid_ds, start_sample=0), len(model))) if valid_ds else None

        def on_saved(record, seconds):
            metrics.event("checkpoint", path=record.path, iteration=record.iteration, seconds=round(seconds, 3),
                          async_save=record.async_save)

        # params.save_checkpoints = false: benchmarks only (no periodic or final checkpoint, DONE has none)
        saving = stage.params.save_checkpoints
        checkpointer = ckpt.Checkpointer(root=task.checkpoint_dir, keep=stage.checkpoint.keep,
                                         async_save=stage.checkpoint.async_save, on_saved=on_saved,
                                         stall_s=task.timeout_s) if saving else None

        def checkpoint_state(loop_state: LoopState) -> dict:
            return ckpt.training_state(chunks=model, optimizer=optimizer, scheduler=scheduler,
                                       iteration=loop_state.iteration, consumed_samples=loop_state.consumed_samples,
                                       extra={"stage": stage.name, "experiment": plan.experiment},
                                       optimizer_format=stage.params.optimizer_checkpoint_format)

        if rank == 0:
            rank0_print(f"stage {stage.name}: {plan.model.name} layout tp={layout.tp} pp={layout.pp} vp={layout.vp} "
                         f"cp={layout.cp} ep={layout.ep} dp={layout.dp} mbs={layout.micro_batch} "
                         f"gbs={layout.global_batch} seq={stage.seq_length} precision={stage.execution.precision} "
                         f"kernels={'te' if facts.have_te else 'local'} "
                         f"attention={mdl.attention_core_name(attention_backend=stage.execution.attention, have_te=facts.have_te, model=plan.model)} "
                         f"vocab={task.vocab_size}->{padded_vocab} steps {state.iteration}->{task.steps}"
                         f"{' (CPU/gloo)' if mcore_cpu.is_applied() else ''}")
        state = train_loop(model=model, optimizer=optimizer, scheduler=scheduler, stage=stage,
                           forward_step=gpt_forward_step, train_iterators=train_iterators, state=state,
                           end_iteration=task.steps, checkpointer=checkpointer, make_checkpoint_state=checkpoint_state,
                           metrics=metrics, make_valid_iterators=make_valid,
                           throughput=throughput_for(plan=plan, stage=stage), stop=stop,
                           reports=("lm loss",) + mtp_report_names(stage.execution.mtp_num_layers))
        final = save_final(checkpointer, checkpoint_state, state, restored) if checkpointer is not None else None
        set_phase("finish")
        if rank == 0:
            if state.preempted_by:
                _write_json_atomic(os.path.join(task.output_dir, "PREEMPTED.json"), dict(
                    checkpoint=final, steps=state.iteration, signal=signal.Signals(state.preempted_by).name))
            else:
                done = dict(checkpoint=final, final_loss=state.last_loss, steps=state.iteration,
                            stage=stage.name, val_loss=state.last_val_loss, consumed_samples=state.consumed_samples)
                _write_json_atomic(os.path.join(task.output_dir, "DONE.json"), taskfile.done_payload(task.raw, done))
        if state.preempted_by:
            metrics.event("preempted", signal=signal.Signals(state.preempted_by).name, checkpoint=final)
            return EXIT_PREEMPTED
        return EXIT_OK
    finally:
        if checkpointer is not None:
            checkpointer.close()
        metrics.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nemoc.runtime.train TASK_JSON", file=sys.stderr)
        return EXIT_BAD_TASK
    try:
        task = load_task(args[0])
    except TaskError as exc:
        print(f"nemoc train: {exc}", file=sys.stderr)
        taskfile.mark_fatal(args[0], str(exc))
        return EXIT_BAD_TASK
    stop = StopSignal()
    stop.install()
    try:
        init_distributed(layout=task.stage.layout, timeout_s=task.timeout_s)
        return run_task(task, stop=stop)
    except TaskError as exc:
        print(f"[nemoc rank {os.environ.get('RANK', '0')}] {exc}", file=sys.stderr, flush=True)
        taskfile.mark_fatal(args[0], str(exc))
        return EXIT_BAD_TASK
    except margs.UnsupportedPlan as exc:
        print(f"[nemoc rank {os.environ.get('RANK', '0')}] unsupported plan: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except (faults.LossDiverged, ckpt.CheckpointError, ckpt.CheckpointSaveError) as exc:
        # a clear one-line verdict, no traceback; divergence and damaged checkpoints need a person
        print(f"[nemoc rank {os.environ.get('RANK', '0')}] error: {exc}", file=sys.stderr, flush=True)
        if not isinstance(exc, ckpt.CheckpointSaveError):
            taskfile.mark_fatal(args[0], str(exc))
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 -- every failure is reported with rank and phase
        report_failure(exc)
        return EXIT_FAILED
    finally:
        stop.uninstall()
        teardown()


if __name__ == "__main__":
    sys.exit(main())
