"""Helpers for the training-core tests: synthetic indexed data, tiny plans, task files, torchrun.

Everything runs on CPU with gloo. Tests build `Plan`s directly from compiler/plan.py types (no
planner), write Megatron indexed datasets with megatron's IndexedDatasetBuilder, and launch
`python -m nemoc.runtime.train TASK` under `torchrun --standalone` (free port per run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nemoc.compiler.plan import Estimate, Layout, MemoryBreakdown, Plan, StagePlan, to_json
from nemoc.compiler.spec import CheckpointSpec, ClusterSpec, DataSpec, ModelSpec, OptimizerSpec, ScheduleSpec
from nemoc.runtime.taskfile import TASK_JSON_VERSION
from plan_factory import make_execution, with_executions

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
VOCAB = 200
SEQ = 32

TINY = ModelSpec(name="tiny-gpt", layers=4, hidden=64, heads=4, query_groups=2, ffn_hidden=128, vocab=VOCAB,
                 seq_length=SEQ, activation="swiglu", norm="rmsnorm", position="rope")


def layout(*, tp=1, pp=1, dp=1, vp=None, cp=1, ep=1, micro_batch=2, global_batch=8, sp=False, dist_opt=False,
           recompute="none", recompute_layers=None, recompute_modules=None) -> Layout:
    return Layout(tp=tp, pp=pp, vp=vp, cp=cp, ep=ep, etp=1, dp=dp, micro_batch=micro_batch,
                  global_batch=global_batch, num_microbatches=global_batch // (micro_batch * dp),
                  sequence_parallel=sp, distributed_optimizer=dist_opt, recompute=recompute,
                  recompute_layers=recompute_layers, recompute_modules=recompute_modules)


def stage_plan(*, lay: Layout, steps=6, every=None, keep=3, async_save=False, eval_every=None, log_every=1,
               lr=3e-3, name="pretrain", params=None) -> StagePlan:
    return StagePlan(
        name=name, kind="pretrain", after=(), data=("web",), layout=lay,
        memory=MemoryBreakdown(weights=0, gradients=0, optimizer=0, activations=0, other=0, capacity=1 << 34),
        estimate=Estimate(step_time_s=0.0, tokens_per_s_per_gpu=0.0, model_tflops_per_gpu=0.0, mfu=0.0,
                          steps=steps, wall_time_s=0.0, gpu_hours=0.0, cost_usd=None),
        seq_length=SEQ, steps=steps, optimizer=OptimizerSpec(lr=lr, weight_decay=0.01),
        schedule=ScheduleSpec(name="cosine", warmup=2, min_lr=lr / 10),
        checkpoint=CheckpointSpec(every=every, keep=keep, async_save=async_save),
        log_every=log_every, eval_every=eval_every, seed=1234, params=params or {"eval_iters": 2},
        execution=make_execution(TINY, lay, seq_length=SEQ),
    )


def make_plan(stage: StagePlan, *, model: ModelSpec = TINY, precision="fp32", attention="unfused") -> Plan:
    return with_executions(Plan(
        experiment="tiny", model=model, cluster=ClusterSpec(gpu="CPU", nodes=1, gpus_per_node=4),
        precision=precision, attention_backend=attention,
        data=(DataSpec(name="web", path="synthetic", split=(0.9, 0.1, 0.0)),), stages=(stage,), kernels="local"))


def write_indexed_dataset(prefix: Path, *, docs=300, seed=0, vocab=VOCAB) -> Path:
    """A learnable synthetic corpus: each document repeats a short random motif, so loss falls."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for _ in range(docs):
        motif = rng.integers(1, vocab - 1, size=int(rng.integers(3, 8)))
        length = int(rng.integers(20, 90))
        doc = np.resize(motif, length).astype(np.int32)
        doc[-1] = vocab - 1  # end of document
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return prefix


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    out: Path
    task_path: Path

    @property
    def records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if "loss" in r}

    @property
    def done(self) -> dict | None:
        path = self.out / "DONE.json"
        return json.loads(path.read_text()) if path.exists() else None

    def explain(self) -> str:
        return f"rc={self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-6000:]}"


def write_task(out: Path, plan: Plan, *, data_prefix: Path, init_checkpoint=None, max_steps=None,
               checkpoint_dir: Path | None = None, timeout_s=120) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan_path.write_text(to_json(plan))
    task = {
        "version": TASK_JSON_VERSION, "plan": str(plan_path), "stage": plan.stages[0].name,
        "datasets": [{"name": "web", "prefix": str(data_prefix), "weight": 1.0}],
        "tokenizer": None, "vocab_size": VOCAB, "eod_id": VOCAB - 1,
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
        "output_dir": str(out), "checkpoint_dir": str(checkpoint_dir or out / "checkpoints"),
        "metrics_path": str(out / "metrics.jsonl"), "tensorboard_dir": str(out / "tb"),
        "max_steps": max_steps, "timeout_s": timeout_s,
    }
    path = out / "task.json"
    path.write_text(json.dumps(task, indent=1))
    return path


def torchrun_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore")
    return env


def launch(task_path: Path, nproc: int, *, timeout=240, extra_env=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m nemoc.runtime.train TASK` (plain python for N=1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "nemoc.runtime.train", str(task_path)]
    else:
        cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}",
               "-m", "nemoc.runtime.train", str(task_path)]
    env = torchrun_env()
    env.update(extra_env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))


def run_training(out: Path, plan: Plan, nproc: int, *, data_prefix: Path, **task_kwargs) -> RunResult:
    task_path = write_task(out, plan, data_prefix=data_prefix, **task_kwargs)
    proc = launch(task_path, nproc)
    return RunResult(proc.returncode, proc.stdout, proc.stderr, out, task_path)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """The executor tests' project: a 200-document corpus, and `fake_train.py` (the test-only task kind
    `faketrain`, registered by test_executor.py / test_executor_chain.py) importable by torchrun's ranks."""
    here = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("FAKE_FAIL_RANK", raising=False)
    monkeypatch.delenv("FAKE_PREEMPT_AT", raising=False)
    lines = [json.dumps({"text": f"Document {i}: the cat sat on the mat number {i % 7}."}) for i in range(200)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    return write_indexed_dataset(tmp_path_factory.mktemp("data") / "web_text_document")


@pytest.fixture(scope="session")
def reference_weights(tmp_path_factory, train_data) -> Path:
    """Initial weights from a world-size-1 run with zero steps: every layout starts from them
    (dist_checkpointing reshards), so the runs differ only in their parallelisation."""
    out = tmp_path_factory.mktemp("reference")
    result = run_training(out, make_plan(stage_plan(lay=layout())), 1, data_prefix=train_data, max_steps=0)
    assert result.returncode == 0, result.explain()
    return Path(result.done["checkpoint"])


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, train_data, reference_weights) -> RunResult:
    """TP=1/PP=1/DP=1, 6 steps, checkpoint every 3."""
    out = tmp_path_factory.mktemp("baseline")
    result = run_training(out, make_plan(stage_plan(lay=layout(), every=3)), 1, data_prefix=train_data,
                          init_checkpoint=reference_weights)
    assert result.returncode == 0, result.explain()
    return result


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (importing `conftest` by name is ambiguous: tests/ has one too)."""
    from types import SimpleNamespace

    return SimpleNamespace(layout=layout, stage_plan=stage_plan, make_plan=make_plan, run_training=run_training,
                           write_task=write_task, launch=launch, write_indexed_dataset=write_indexed_dataset,
                           torchrun_env=torchrun_env, TINY=TINY, VOCAB=VOCAB, SEQ=SEQ, REPO=REPO, VENV_BIN=VENV_BIN)
