"""Training metrics sinks, rank 0 only: JSON lines, TensorBoard, and console progress with ETA.

Input:  one dict per logged step (`step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, `step_time_s`,
optionally `val_loss`, `tflops_per_gpu`, `mfu`, `peak_mem_gib`, ...), from runtime.train.
Output: `metrics.jsonl` (one JSON object per line, written and flushed per record, so a killed process
keeps every logged step; fsync'd per record by a background thread, off the training step's path, and
once more at close, so a machine that loses power loses at most the records of the last moments),
TensorBoard scalars under `tensorboard_dir`, and a progress display: rich.progress when stdout is a TTY, plain `step N/M | loss ... | ETA ...` lines otherwise (logs).
Invariants: ranks other than 0 get a `NullMetrics` that does nothing; a sink that fails to open
(no TensorBoard) is reported once and skipped, never fatal; one record per step: a resumed run calls
`rewind(step)`, which drops the records after the checkpoint's step (metrics.jsonl rewritten atomically,
TensorBoard events purged) before the steps are logged again, and `read_records` keeps the last of
any records that still repeat (files written before this rule).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from typing import Any, TextIO

from nemoc.runtime.atomic import atomic_write_text


def read_records(path) -> list[dict]:
    """Every complete JSON record of a metrics.jsonl (a line cut short by a crash, or still being
    written, is skipped); [] when the file does not exist yet. A step record repeated with the same
    fields (a resume that logged a step again) appears once, as its last version, in its last place."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    out = {}
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            key = (record["step"], tuple(sorted(k for k in record if k != "time"))) if "step" in record else i
            out.pop(key, None)
            out[key] = record
    return list(out.values())


def _records_up_to(text: str, step: int) -> str:
    """The lines of a metrics.jsonl without step records after `step` (and without a torn last line)."""
    kept = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step:
            continue
        kept.append(line + "\n")
    return "".join(kept)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class _BackgroundFsync:
    """fsync(2) of an append-only file on a thread of its own: `request()` after a record is flushed,
    and the thread syncs everything written by then (one fsync covers every earlier record, so requests
    that arrive during a sync cost one more sync, not one each). A sync takes milliseconds on a busy
    disk: on the training loop's thread it was billed to every log step. `close()` stops the thread
    and syncs once more on the caller's thread; a failed background sync is raised by the next `check()`."""

    def __init__(self, handle):
        self._handle = handle
        self._wanted = threading.Event()
        self._closing = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="nemoc-metrics-fsync", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def check(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:
                os.fsync(self._handle.fileno())
            except OSError as exc:
                self.error = self.error or exc
            except ValueError:  # closed under us: close() syncs
                return

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join()
        os.fsync(self._handle.fileno())
        self.check()


class NullMetrics:
    """The sink on ranks != 0."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def event(self, name: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Metrics(NullMetrics):
    """JSON lines + TensorBoard + console progress for `total_steps` steps starting at `start_step`."""

    def __init__(self, *, metrics_path: str | None, tensorboard_dir: str | None, total_steps: int,
                 start_step: int = 0, title: str = "train", console: TextIO | None = None,
                 use_rich: bool | None = None, tracking=None):
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.monotonic()
        self.console = console or sys.stdout
        self._jsonl = None
        self._fsync: _BackgroundFsync | None = None
        self._metrics_path = metrics_path
        self._tensorboard_dir = tensorboard_dir
        if metrics_path:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
            self._open_jsonl()
        self._tb = _open_tensorboard(tensorboard_dir, self.console)
        self._sinks = None  # W&B / MLflow (runtime.tracking), when the experiment's tracking block asks
        if tracking is not None:
            from nemoc.runtime.tracking import Sinks, open_sinks

            self._sinks = Sinks(open_sinks(tracking, self.console), self.console)
        if use_rich is None:
            use_rich = bool(getattr(self.console, "isatty", lambda: False)())
        self._progress = _RichProgress(title, total_steps, start_step) if use_rich else None

    def _open_jsonl(self) -> None:
        self._jsonl = open(self._metrics_path, "a", encoding="utf-8")
        self._fsync = _BackgroundFsync(self._jsonl)

    def _close_jsonl(self) -> None:
        try:
            self._fsync.close()
        finally:
            self._jsonl.close()
            self._jsonl = self._fsync = None

    def eta_s(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        elapsed = time.monotonic() - self.start_time
        return elapsed / done * (self.total_steps - step)

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        if self._jsonl is not None:
            self._fsync.check()
            self._jsonl.write(json.dumps(record, sort_keys=True, allow_nan=True) + "\n")
            self._jsonl.flush()
            self._fsync.request()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}",
                                        value, record["step"])
            self._tb.flush()
        if self._sinks is not None:
            self._sinks.log(record)
        if "step" in record:
            self._console_line(record)

    def rewind(self, step: int) -> None:
        """A run resumed from the checkpoint of `step`: drop the records of later steps (an earlier
        attempt logged them; this one logs them again), so that readers see one record per step."""
        if self._jsonl is not None:
            self._close_jsonl()
            with open(self._metrics_path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
            atomic_write_text(self._metrics_path, _records_up_to(text, step))
            self._open_jsonl()
        if self._tb is not None:
            self._tb.close()
            self._tb = _open_tensorboard(self._tensorboard_dir, self.console, purge_step=step + 1)

    def event(self, name: str, **fields: Any) -> None:
        """A one-off event (checkpoint saved, resumed, preempted): JSON line + console line."""
        record = {"time": round(time.time(), 3), "event": name, **fields}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
            self._jsonl.flush()
        text = f"[nemoc] {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items())
        if self._progress is not None:
            self._progress.print(text)
        else:
            print(text, file=self.console, flush=True)

    def _console_line(self, record: dict[str, Any]) -> None:
        step = record["step"]
        parts = [f"step {step}/{self.total_steps}"]
        for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"),
                         ("tokens_per_s", ".0f"), ("step_time_s", ".3f"), ("mfu", ".1%"), ("peak_mem_gib", ".1f")):
            value = record.get(key)
            if isinstance(value, (int, float)) and value is not None:
                parts.append(f"{key} {value:{fmt}}")
        eta = format_duration(self.eta_s(step))
        if self._progress is not None:
            self._progress.update(step, " | ".join(parts[1:]) + f" | ETA {eta}")
        else:
            print(" | ".join(parts) + f" | ETA {eta}", file=self.console, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._jsonl is not None:
            self._close_jsonl()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._sinks is not None:
            self._sinks.close()
            self._sinks = None


def _open_tensorboard(directory: str | None, console: TextIO, purge_step: int | None = None):
    if not directory:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=directory, purge_step=purge_step)
    except Exception as exc:  # tensorboard missing or unwritable: metrics.jsonl still has everything
        print(f"[nemoc] warning: TensorBoard disabled ({type(exc).__name__}: {exc})", file=console, flush=True)
        return None


class _RichProgress:
    def __init__(self, title: str, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        )
        self._progress.start()
        self._task = self._progress.add_task(title, total=total, completed=start, info="")

    def update(self, step: int, info: str) -> None:
        self._progress.update(self._task, completed=step, info=info)

    def print(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self._progress.stop()


def open_metrics(*, rank: int, **kwargs) -> NullMetrics:
    """Metrics on rank 0, NullMetrics elsewhere."""
    return Metrics(**kwargs) if rank == 0 else NullMetrics()
