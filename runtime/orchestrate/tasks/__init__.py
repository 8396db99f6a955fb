"""The registry of task kinds: what the executor does for each node kind of the runtime graph.

A kind either runs **inline** in the `nemoc run` process (`run_inline(ctx) -> dict`, the DONE payload:
tokenizer training, data preparation, small exports) or is **distributed**: the executor writes
`task.json` (docs/graph.md, section 3), lets `build_task(ctx, task_json)` add kind-specific keys, and
hands `python -m <module> task.json` to the launcher with `nproc(ctx)` processes (default: the stage
layout's world size). New kinds plug in without editing this package's existing modules: every module
in this folder is imported on first lookup and registers its kinds at import time, e.g.

    # runtime/orchestrate/tasks/align.py
    from nemoc.runtime.orchestrate.tasks import TaskKind, register
    register(TaskKind(name="sft", module="nemoc.runtime.align.sft"))
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nemoc.compiler.graph import Task
from nemoc.compiler.plan import Plan, StagePlan


class TaskError(RuntimeError):
    """A task cannot run or failed; the message is for the user (no traceback)."""


@dataclass(frozen=True)
class TaskContext:
    task: Task
    plan: Plan
    plan_path: Path
    run_dir: object  # nemoc.runtime.orchestrate.rundir.RunDir
    out_dir: Path
    inputs: Mapping[str, dict]  # upstream task id -> its DONE record + {"artifact", "name"}
    launcher: object | None = None  # nemoc.runtime.orchestrate.launchers.Launcher (distributed kinds)
    log: Callable[[str], None] = print
    options: Mapping[str, object] = field(default_factory=dict)  # e.g. {"workers": 2, "max_steps": None}

    @property
    def stage(self) -> StagePlan | None:
        return self.plan.stage(self.task.stage) if self.task.stage else None

    def inputs_of(self, artifact: str) -> list[tuple[str, dict]]:
        return [(tid, rec) for tid, rec in sorted(self.inputs.items()) if rec.get("artifact") == artifact]


@dataclass(frozen=True)
class TaskKind:
    name: str
    module: str | None = None  # distributed: `python -m module task.json` under the launcher
    run_inline: Callable[[TaskContext], dict] | None = None
    build_task: Callable[[TaskContext, dict], dict] | None = None
    nproc: Callable[[TaskContext], int] | None = None
    host_only: bool = False  # runs on the host CPU even where GPUs are (no GPU asked for, CUDA hidden)

    def __post_init__(self) -> None:
        if (self.module is None) == (self.run_inline is None):
            raise ValueError(f"task kind {self.name!r}: give exactly one of `module` or `run_inline`")


def launch_shape(kind: TaskKind, ctx: TaskContext) -> tuple[int, int, dict[str, str]]:
    """(processes, GPUs per node, extra environment) a distributed kind is started with: the stage
    layout's world size unless the kind says otherwise (export: one process); a host-only kind asks for
    no GPU and hides CUDA (the runtime's CPU path)."""
    nproc = kind.nproc(ctx) if kind.nproc else ctx.stage.layout.world_size
    if kind.host_only:
        return nproc, 0, {"CUDA_VISIBLE_DEVICES": ""}
    return nproc, ctx.plan.cluster.gpus_per_node, {}


_REGISTRY: dict[str, TaskKind] = {}
_discovered = False


def register(kind: TaskKind, *, replace: bool = False) -> None:
    if kind.name in _REGISTRY and not replace and _REGISTRY[kind.name] != kind:
        raise ValueError(f"task kind {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get_kind(name: str) -> TaskKind:
    _discover()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise TaskError(f"no runner for task kind {name!r} in this installation (known: {known})")
    return _REGISTRY[name]


def known_kinds() -> list[str]:
    _discover()
    return sorted(_REGISTRY)
