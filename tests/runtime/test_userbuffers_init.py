"""runtime/userbuffers.py: TE `initialize_ub` with the plan's userbuffers, before the model is built, and
`destroy_ub` at teardown; TransformerConfig's tp_comm_* fields (a differential test against Megatron-Core
0.16.1's real ModelParallelConfig); the refusals on a machine that cannot run them.

Transformer Engine is not installed here: a fake `transformer_engine.pytorch.module.base` with TE's real
`initialize_ub` signature (TE 2.20.0.dev0, commit d0067d0d, transformer_engine/pytorch/module/base.py; the
signature has been the same since `quantization_modes` came in TE 2.8) records the call, and binding the
runtime's arguments to that signature fails on a misspelt or missing argument."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import sys
import types
from typing import List, Optional, Union
from unittest import mock

import megatron.core.utils as mcu  # before the fake TE below: Megatron-Core probes TE at import time
import pytest
import torch
from packaging.version import Version

from nemoc.compiler.catalog.userbuffers import userbuffers_of
from nemoc.compiler.plan import Layout
from nemoc.runtime import megatron_args as margs
from nemoc.runtime import userbuffers
from nemoc.runtime.core import build, dist
from plan_factory import make_execution

GPU_TE = margs.MachineFacts(cpu=False, have_te=True)
CPU = margs.MachineFacts(cpu=True, have_te=False)


class UserBufferQuantizationMode(enum.Enum):  # TE's enum (module/base.py)
    NONE = "none"
    FP8 = "fp8"


def _te_initialize_ub(  # TE's signature, verbatim names, order and defaults
    shape: list,
    tp_size: int,
    use_fp8: bool = False,
    quantization_modes: List[UserBufferQuantizationMode] = None,
    dtype: torch.dtype = torch.bfloat16,
    ub_cfgs: Optional[Union[dict, List[dict]]] = None,
    bootstrap_backend: Union[str, torch.distributed.Backend] = None,
    with_cublasmp: bool = False,
) -> None:
    raise AssertionError("replaced by the recorder")


@pytest.fixture
def fake_te(monkeypatch):
    """A `transformer_engine` package whose module.base records initialize_ub / destroy_ub calls."""
    calls = []
    base = types.ModuleType("transformer_engine.pytorch.module.base")
    base.UserBufferQuantizationMode = UserBufferQuantizationMode

    def initialize_ub(*args, **kwargs):
        bound = inspect.signature(_te_initialize_ub).bind(*args, **kwargs)  # TypeError on a wrong argument
        calls.append(("initialize_ub", dict(bound.arguments)))

    base.initialize_ub = initialize_ub
    base.destroy_ub = lambda: calls.append(("destroy_ub", {}))
    module = types.ModuleType("transformer_engine.pytorch.module")
    module.base = base
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.module = module
    te = types.ModuleType("transformer_engine")
    te.pytorch = pytorch
    for name, mod in (("transformer_engine", te), ("transformer_engine.pytorch", pytorch),
                      ("transformer_engine.pytorch.module", module), ("transformer_engine.pytorch.module.base", base)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(userbuffers, "_initialised", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def _te_version(monkeypatch, version: str) -> None:
    monkeypatch.setattr(mcu, "get_te_version", lambda: Version(version))
    monkeypatch.setattr(mcu, "is_te_min_version", lambda v, check_equality=True: Version(version) >= Version(v))


UB_70B = userbuffers_of(generation="hopper", precision="bf16", params_dtype="bf16", hidden=8192, tp=4, cp=2,
                        seq_length=8192, micro_batch=1)


def test_initialize_ub_gets_the_plans_shape_dtype_mode_configs_and_backend(fake_te, monkeypatch):
    _te_version(monkeypatch, "2.9.0")
    userbuffers.initialize(UB_70B, GPU_TE)
    [(name, args)] = fake_te
    assert name == "initialize_ub"
    assert args["shape"] == [4096, 8192] and args["tp_size"] == 4 and args["dtype"] is torch.bfloat16
    assert args["quantization_modes"] == [UserBufferQuantizationMode.NONE] and "use_fp8" not in args
    assert args["bootstrap_backend"] == "nccl"
    cfgs = args["ub_cfgs"]
    assert set(cfgs) == {"qkv_dgrad", "qkv_wgrad", "fc1_dgrad", "fc1_wgrad", "qkv_fprop", "proj_dgrad", "fc1_fprop",
                         "fc2_dgrad", "proj_fprop", "fc2_fprop"}
    # Bridge's userbuffers_bf16_h100_h8192_tp4_mbs1_seqlen8192, in TE's ub_cfgs keys
    assert cfgs["proj_fprop"] == dict(method="pipeline", num_sm=24, cga_size=2, set_sm_margin=True, num_splits=4,
                                      atomic_gemm=False, fp8_buf=False)
    assert cfgs["qkv_fprop"] == dict(method="ring_exchange", num_sm=1, cga_size=1, set_sm_margin=False,
                                     aggregate=False, atomic_gemm=False, fp8_buf=False)
    assert cfgs["qkv_wgrad"] == dict(method="bulk", num_sm=24, cga_size=2, set_sm_margin=False, atomic_gemm=False,
                                     fp8_buf=False)
    userbuffers.initialize(UB_70B, GPU_TE)  # the same buffers again (a second model of the stage): no new call
    assert len(fake_te) == 1
    other = dataclasses.replace(UB_70B, shape=(8192, 8192))
    with pytest.raises(margs.UnsupportedPlan, match="already holds userbuffers"):
        userbuffers.initialize(other, GPU_TE)
    userbuffers.destroy()
    userbuffers.destroy()  # once only
    assert [n for n, _ in fake_te] == ["initialize_ub", "destroy_ub"]


def test_fp8_and_a_te_before_quantization_modes_use_use_fp8(fake_te, monkeypatch):
    _te_version(monkeypatch, "2.7.0")
    ub = userbuffers_of(generation="hopper", precision="fp8", params_dtype="bf16", hidden=8192, tp=4, cp=1,
                        seq_length=4096, micro_batch=2)
    userbuffers.initialize(ub, GPU_TE)
    [(_, args)] = fake_te
    assert args["use_fp8"] is True and "quantization_modes" not in args and args["shape"] == [8192, 8192]
    assert args["ub_cfgs"]["proj_fprop"]["method"] == "ring_exchange"  # the fp8 preset


def test_fp8_on_a_new_te_is_the_fp8_quantization_mode_and_te_defaults_are_an_empty_config(fake_te, monkeypatch):
    _te_version(monkeypatch, "2.12.0")
    ub = userbuffers_of(generation="blackwell", precision="mxfp8", params_dtype="bf16", hidden=5120, tp=2, cp=1,
                        seq_length=4096, micro_batch=1)
    userbuffers.initialize(ub, GPU_TE)
    [(_, args)] = fake_te
    assert args["quantization_modes"] == [UserBufferQuantizationMode.FP8] and args["ub_cfgs"] == {}


def test_the_cpu_no_te_and_an_old_te_are_refused_with_the_reason(fake_te, monkeypatch):
    with pytest.raises(margs.UnsupportedPlan, match="CPU .gloo."):
        userbuffers.initialize(UB_70B, CPU)
    with pytest.raises(margs.UnsupportedPlan, match="transformer_engine does not import"):
        userbuffers.initialize(UB_70B, margs.MachineFacts(cpu=False, have_te=False))
    _te_version(monkeypatch, "1.8.0")
    with pytest.raises(margs.UnsupportedPlan, match=r"Transformer Engine >= 1\.9\.0.*this one is 1\.8\.0"):
        userbuffers.initialize(UB_70B, GPU_TE)
    assert fake_te == []


def test_no_userbuffers_nothing_happens(fake_te):
    userbuffers.initialize(None, CPU)
    userbuffers.destroy()
    assert fake_te == []


def _layout(**kw) -> Layout:
    base = dict(tp=2, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=4, num_microbatches=4,
                sequence_parallel=True, distributed_optimizer=False, recompute="none", tp_comm_overlap=True)
    base.update(kw)
    return Layout(**base)


def test_transformer_config_fields_against_megatron_cores_own_config():
    """Differential: the tp_comm_* keywords the runtime sets are ModelParallelConfig 0.16.1 fields, and a real
    TransformerConfig built with them keeps them (its __post_init__ accepts the combination)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from test_model_args import LLAMA_ISH, config

    layout = _layout()
    execution = make_execution(LLAMA_ISH, layout, precision="bf16", attention="flash", kernels="te", gpu="H100")
    kwargs = margs._tp_comm_kwargs(layout, execution)
    fields = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    assert set(kwargs) <= fields and kwargs["tp_comm_overlap"] is True
    assert set(kwargs) == {"tp_comm_overlap", "tp_comm_bootstrap_backend", "tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad",
                           "tp_comm_overlap_ag", "tp_comm_overlap_rs", "tp_comm_overlap_rs_dgrad"}
    c = config(layout=layout, facts=GPU_TE)
    for key, value in kwargs.items():
        assert getattr(c, key) == value, key
    assert c.tp_comm_bootstrap_backend == "nccl" and c.sequence_parallel
    assert not config(layout=_layout(tp_comm_overlap=False), facts=GPU_TE).tp_comm_overlap


def test_a_plan_without_its_userbuffers_is_refused():
    from test_model_args import LLAMA_ISH

    layout = _layout()
    execution = make_execution(LLAMA_ISH, layout, precision="bf16", attention="flash", kernels="te", gpu="H100")
    with pytest.raises(margs.UnsupportedPlan, match="re-plan"):
        margs._tp_comm_kwargs(layout, dataclasses.replace(execution, userbuffers=None))


def test_build_initialises_the_buffers_before_the_layers_and_teardown_destroys_them(monkeypatch):
    """core/build.py calls the initialiser before it builds the chunks; core/dist.py teardown destroys."""
    order = []
    monkeypatch.setattr(userbuffers, "initialize", lambda ub, facts: order.append(("initialize", ub)))
    monkeypatch.setattr(build.margs, "transformer_config", lambda **kw: object())
    monkeypatch.setattr(build.mdl, "build_model_chunks", lambda **kw: order.append(("build", None)) or [])
    from test_model_args import LLAMA_ISH

    layout = _layout()
    execution = make_execution(LLAMA_ISH, layout, precision="bf16", attention="flash", kernels="te", gpu="H100")
    build.build_chunks(model=LLAMA_ISH, layout=layout, vocab_size=1000, seq_length=128, facts=GPU_TE,
                       execution=execution)
    assert order == [("initialize", execution.userbuffers), ("build", None)]
    destroyed = []
    monkeypatch.setattr(userbuffers, "destroy", lambda: destroyed.append(True))
    with mock.patch.object(dist.parallel_state, "model_parallel_is_initialized", lambda: False), \
            mock.patch.object(dist.torch.distributed, "is_initialized", lambda: False):
        dist.teardown()
    assert destroyed == [True]


@pytest.mark.gpu
def test_real_transformer_engine_initialises_and_destroys_one_rank_of_buffers():
    """Where CUDA and Transformer Engine are installed: TE's own initialize_ub takes the runtime's arguments
    (a one-rank tensor-parallel group over nccl) and destroy_ub frees them."""
    pytest.importorskip("transformer_engine.pytorch")
    import os

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    ub = userbuffers_of(generation="hopper", precision="bf16", params_dtype="bf16", hidden=1024, tp=1, cp=1,
                        seq_length=2048, micro_batch=1)
    os.environ.setdefault("UB_SKIPMC", "1")
    userbuffers.initialize(ub, GPU_TE)
    from transformer_engine.pytorch.module import base

    assert base.is_ub_initialized() if hasattr(base, "is_ub_initialized") else True
    userbuffers.destroy()


def test_the_megatron_lm_command_line_turns_it_on_and_names_the_preset():
    """`nemoc export --megatron-args`: Megatron-LM's --tp-comm-overlap and bootstrap backend; the per-GEMM
    preset is a YAML file there (--tp-comm-overlap-cfg), which the notes name rather than drop silently."""
    from test_model_args import LLAMA_ISH

    layout = _layout()
    execution = make_execution(LLAMA_ISH, layout, precision="bf16", attention="flash", kernels="te", gpu="H100")
    stage = types.SimpleNamespace(layout=layout, execution=dataclasses.replace(execution, userbuffers=UB_70B))
    notes: list[str] = []
    assert margs._lm_tp_comm(stage, notes) == ["--tp-comm-overlap", "--tp-comm-bootstrap-backend nccl"]
    assert len(notes) == 1 and "userbuffers_bf16_h100_h8192_tp4_mbs1_seqlen8192" in notes[0]
    notes.clear()
    assert margs._lm_tp_comm(stage, notes) and not margs._lm_tp_comm(
        types.SimpleNamespace(layout=_layout(tp_comm_overlap=False), execution=execution), notes)


@pytest.mark.slow
def test_nemoc_run_of_a_gpu_plan_with_tp_comm_overlap_on_the_cpu_is_refused_with_the_reason(tmp_path):
    """End to end from the CLI (~45 s): the quickstart planned for two H100s with TE, TP 2, SP and the overlap
    checks and plans (with the userbuffers note); `nemoc run` here (no CUDA, no TE) fails the training task with
    the runtime's reason, not a traceback, and `nemoc check` of the same file on the CPU cluster says E160."""
    import shutil
    from pathlib import Path

    from test_cmd_run import invoke

    examples = Path(__file__).resolve().parents[2] / "examples"
    (tmp_path / "data" / "quickstart").mkdir(parents=True)
    shutil.copy(examples / "data" / "quickstart" / "corpus.jsonl", tmp_path / "data" / "quickstart" / "corpus.jsonl")
    text = (examples / "quickstart.nemo").read_text()
    text = text.replace("gpu = CPU", "gpu = H100").replace(
        "tensor = 1", "tensor = 2\n    sequence_parallel = true\n    tp_comm_overlap = true").replace(
        "precision = fp32  # CPUs train in fp32", "precision = bf16\n  kernels = te").replace(
        "steps = 300", "steps = 2").replace("warmup = 30", "warmup = 1")
    path = tmp_path / "ub.nemo"
    path.write_text(text)
    plan = invoke("plan", str(path))
    assert plan.exit_code == 0 and "tp_comm_overlap userbuffers (2048 x 128 bf16)" in plan.output
    result = invoke("run", str(path), "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 1
    assert "tp_comm_overlap = true needs CUDA GPUs" in result.output and "CPU (gloo)" in result.output
    cpu = invoke("check", str(path), "--set", "cluster.gpu=CPU", "--set", "kernels=local")
    assert cpu.exit_code == 1 and "E160" in cpu.output
