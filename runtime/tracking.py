"""Metric sinks chosen in the experiment's `tracking` block: Weights & Biases and MLflow (TensorBoard and
metrics.jsonl are runtime.metrics' own).

Input:  the plan's `TrackingSpec`, the stage, the task's output directory (`target`); then one record
per logged step (`Sink.log`), from runtime.metrics.Metrics on rank 0.
Output: a W&B run (offline unless WANDB_MODE says otherwise: no network, files under
`<task>/wandb/`, `wandb sync` uploads them later) and an MLflow run (a local file store when
`mlflow` is a directory, relative to the .nemo file's directory; any tracking URI otherwise), each
with the stage's layout as parameters and every numeric metric at its step.
Invariants: a missing package is a `TrackingError` naming it and how to install it (`missing`, used
by `nemoc run` before anything starts, and again when a task opens its sinks); a sink that fails
while logging is reported once and dropped, never fatal (metrics.jsonl keeps everything).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, TextIO

PACKAGES = {"wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow-skinny")}
SKIPPED = ("step", "time", "event")


class TrackingError(RuntimeError):
    """A tracking sink that cannot start (its package missing): the task stops with this one line."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where one task's metrics go: the sinks the experiment chose and what to name the run."""

    wandb: bool
    mlflow: str | None  # a tracking URI (a local directory already made absolute)
    project: str
    run_name: str
    directory: str  # the task's output directory (W&B files)
    config: dict


def target(plan, stage, output_dir) -> Target | None:
    """The `Target` of `stage` of `plan`, or None when the experiment asks for no W&B / MLflow."""
    spec = plan.tracking
    if not spec.wandb and not spec.mlflow:
        return None
    mlflow = spec.mlflow
    if mlflow and "://" not in mlflow and not mlflow.startswith("databricks"):
        mlflow = os.path.abspath(os.path.join(plan.root, mlflow))
    lay = stage.layout
    config = {"experiment": plan.experiment, "stage": stage.name, "kind": stage.kind, "model": plan.model.name,
              "gpu": plan.cluster.gpu, "world_size": lay.world_size, "precision": plan.precision,
              "tp": lay.tp, "pp": lay.pp, "vp": lay.vp, "cp": lay.cp, "ep": lay.ep, "dp": lay.dp,
              "micro_batch": lay.micro_batch, "global_batch": lay.global_batch, "recompute": lay.recompute,
              "steps": stage.steps, "seq_length": stage.seq_length, "lr": stage.optimizer.lr,
              "predicted_step_time_s": stage.estimate.step_time_s,
              "predicted_tokens_per_s_per_gpu": stage.estimate.tokens_per_s_per_gpu}
    return Target(wandb=spec.wandb, mlflow=mlflow, project=spec.project or plan.experiment,
                  run_name=f"{plan.experiment}-{stage.name}", directory=str(output_dir), config=config)


def missing(tracking) -> str | None:
    """None when every sink `tracking` (a `TrackingSpec`) asks for can be imported here, else the
    error line naming the package and its install command."""
    for name in ("wandb", "mlflow"):
        if getattr(tracking, name) and not _installed(PACKAGES[name][0]):
            field = "wandb = true" if name == "wandb" else f"mlflow = {tracking.mlflow!r}"
            return (f"tracking {{ {field} }} needs the `{PACKAGES[name][0]}` package, which is not installed: "
                    f"{PACKAGES[name][1]}")
    return None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def numeric(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink:
    def __init__(self, t: Target):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user asked for it
        os.environ.setdefault("WANDB_SILENT", "true")
        os.makedirs(t.directory, exist_ok=True)
        self.run = wandb.init(project=t.project, name=t.run_name, dir=t.directory, config=t.config,
                              mode=os.environ["WANDB_MODE"], reinit="finish_previous")

    def log(self, record: dict[str, Any]) -> None:
        values = numeric(record)
        if values and "step" in record:
            self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns once the run is marked done; the wandb-core service may still hold the
        # run file's last writes. teardown() stops the service, which flushes and closes them.
        wandb.teardown()


class MlflowSink:
    def __init__(self, t: Target):
        from mlflow.tracking import MlflowClient

        uri = t.mlflow
        if "://" not in uri and not uri.startswith("databricks"):  # a directory: MLflow's local file store
            os.makedirs(uri, exist_ok=True)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it, in maintenance mode
            uri = "file://" + uri
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(t.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(t.project)
        self.run_id = self.client.create_run(experiment_id, run_name=t.run_name).info.run_id
        for key, value in t.config.items():
            self.client.log_param(self.run_id, key, value)

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if "step" not in record:
            return
        stamp = int(float(record.get("time", 0)) * 1000)
        metrics = [Metric(k, v, stamp, int(record["step"])) for k, v in numeric(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_sinks(t: Target | None, console: TextIO) -> list:
    """The sinks of `t` (rank 0). A missing package raises `TrackingError`; another failure to start
    one is a warning on `console` and that sink is skipped."""
    if t is None:
        return []
    chosen = [(name, cls) for name, cls, on in (("wandb", WandbSink, t.wandb), ("mlflow", MlflowSink, bool(t.mlflow)))
              if on]
    sinks = []
    for name, cls in chosen:
        if not _installed(PACKAGES[name][0]):
            raise TrackingError(f"the experiment's tracking block asks for {name}, but the `{PACKAGES[name][0]}` "
                                f"package is not installed: {PACKAGES[name][1]}")
        try:
            sinks.append(cls(t))
        except Exception as exc:  # a sink is never fatal: metrics.jsonl has every record
            print(f"[nemoc] warning: {name} tracking disabled ({type(exc).__name__}: {exc})", file=console, flush=True)
    return sinks


class Sinks:
    """The open sinks; one that fails while logging is reported once and dropped."""

    def __init__(self, sinks: list, console: TextIO):
        self.sinks, self.console = sinks, console

    def log(self, record: dict[str, Any]) -> None:
        for sink in list(self.sinks):
            try:
                sink.log(record)
            except Exception as exc:
                self._drop(sink, exc)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                self._drop(sink, exc)
        self.sinks = []

    def _drop(self, sink, exc: Exception) -> None:
        print(f"[nemoc] warning: {type(sink).__name__} dropped ({type(exc).__name__}: {exc})", file=self.console,
              flush=True)
        if sink in self.sinks:
            self.sinks.remove(sink)
