"""The userbuffers a `tp_comm_overlap` stage's plan carries (compiler/catalog/userbuffers.py): the buffer
shape, dtype and FP8 mode TE's `initialize_ub` gets, and Megatron-Bridge's per-GEMM preset for the GPU."""

from __future__ import annotations

import subprocess
import sys

from nemoc.compiler.catalog.userbuffers import PRESETS, TE_DEFAULT, userbuffers_of
from nemoc.compiler.lower import load_experiment
from nemoc.compiler.plan import from_json, to_json
from nemoc.compiler.planner import plan_experiment

_LLAMA70B = """
experiment llama3_70b {{
  cluster {{ gpu = {gpu}  nodes = 8  gpus_per_node = 8 }}
  model llama3_70b {{ seq_length = 8192 }}
  parallel {{ tensor = {tp}  pipeline = 4  virtual_pipeline = 5  context = 2  data = auto  micro_batch = 1
             sequence_parallel = true  tp_comm_overlap = {overlap}  distributed_optimizer = true  recompute = none }}
  precision = {precision}
  data web {{ path = "data/web/*.jsonl"  tokenizer = "tokenizer.json" }}
  stage pretrain {{ data = [web]  steps = 100  global_batch = 128  optimizer = adam(lr = 3e-4) }}
}}
"""


def _plan_of(tmp_path, *, gpu="H100", tp=4, precision="bf16", overlap="true"):
    path = tmp_path / "x.nemo"
    path.write_text(_LLAMA70B.format(gpu=gpu, tp=tp, precision=precision, overlap=overlap))
    spec, _ = load_experiment(str(path))
    return plan_experiment(spec).plan


def test_llama3_70b_on_h100_gets_bridges_tuned_preset_and_the_buffer_shape(tmp_path):
    """Bridge's H100 Llama 3 70B recipe: TP4, CP2, micro batch 1, 8k tokens, its bf16 userbuffer preset. The
    buffer holds one layer input with sequence and batch merged, split over CP: 8192 x 1 / 2 rows of 8192."""
    plan = _plan_of(tmp_path)
    ub = plan.stages[0].execution.userbuffers
    assert ub.preset == "userbuffers_bf16_h100_h8192_tp4_mbs1_seqlen8192"
    assert ub.shape == (4096, 8192) and ub.tp == 4 and ub.dtype == "bf16" and ub.quantization == "none"
    assert ub.bootstrap_backend == "nccl"
    gemms = {g.name: g for g in ub.gemms}
    assert len(gemms) == 10
    # Bridge: proj_fprop PipelineOverlapCfg(num_sm=24, cga_size=2, num_splits=4, set_sm_margin=True)
    proj = gemms["proj_fprop"]
    assert (proj.method, proj.num_sm, proj.cga_size, proj.num_splits, proj.set_sm_margin) == \
        ("pipeline", 24, 2, 4, True)
    assert (gemms["qkv_wgrad"].method, gemms["qkv_wgrad"].num_sm) == ("bulk", 24)
    assert gemms["qkv_fprop"].method == "ring_exchange" and not gemms["qkv_fprop"].aggregate
    assert ub.bulk_wgrad and ub.bulk_dgrad and ub.overlap_ag and ub.overlap_rs and not ub.overlap_rs_dgrad
    assert from_json(to_json(plan)) == plan


def test_fp8_takes_the_fp8_preset_and_fp8_buffers(tmp_path):
    ub = _plan_of(tmp_path, precision="fp8").stages[0].execution.userbuffers
    assert ub.preset == "userbuffers_fp8_h100_h8192_tp4_mbs1_seqlen8192"
    assert ub.quantization == "fp8" and ub.dtype == "bf16"  # fp8 keeps bf16 activations outside the GEMMs


def test_a_shape_without_a_preset_runs_tes_defaults(tmp_path):
    """GB200 at TP 8 has no Bridge preset for an 8192-wide model: TE's default per GEMM (`ub_cfgs = {}`), as
    Bridge's recipes without a preset run; the plan names it."""
    ub = _plan_of(tmp_path, gpu="GB200", tp=8).stages[0].execution.userbuffers
    assert ub.preset == TE_DEFAULT and ub.gemms == () and ub.shape == (4096, 8192) and ub.tp == 8


def test_no_overlap_no_userbuffers(tmp_path):
    assert _plan_of(tmp_path, overlap="false").stages[0].execution.userbuffers is None


def test_every_preset_is_one_transformer_layer_of_bridges_gemms():
    names = {"qkv_dgrad", "qkv_wgrad", "fc1_dgrad", "fc1_wgrad", "qkv_fprop", "proj_dgrad", "fc1_fprop",
             "fc2_dgrad", "proj_fprop", "fc2_fprop"}
    for (generation, quantization, hidden, tp), (name, gemms) in PRESETS.items():
        assert {g.name for g in gemms} == names, name
        assert f"_{quantization if quantization == 'fp8' else 'bf16'}_" in name
        assert f"_{'h100' if generation == 'hopper' else 'b200'}_h{hidden}_tp{tp}_" in name
        assert all(g.method in ("bulk", "pipeline", "ring_exchange") for g in gemms)
        assert all((g.num_splits is not None) == (g.method == "pipeline") for g in gemms)


def test_shape_divides_by_context_and_multiplies_by_micro_batch():
    ub = userbuffers_of(generation="hopper", precision="bf16", params_dtype="bf16", hidden=6144, tp=2, cp=1,
                        seq_length=2048, micro_batch=2)
    assert ub.shape == (4096, 6144) and ub.preset == "userbuffers_bf16_h100_h6144_tp2_mbs2_seqlen2048"
    nvfp4 = userbuffers_of(generation="blackwell", precision="nvfp4", params_dtype="bf16", hidden=4096, tp=2, cp=4,
                           seq_length=8192, micro_batch=1)
    assert nvfp4.shape == (2048, 4096) and nvfp4.quantization == "none"  # TE's FP8 buffers: fp8 / mxfp8 only


def test_the_compiler_emits_it_without_torch():
    """The presets are compiler data: importing them pulls in neither torch nor megatron."""
    code = ("import sys, nemoc.compiler.catalog.userbuffers, nemoc.compiler.execution; "
            "print(any(m.split('.')[0] in ('torch', 'megatron') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_plan_says_which_userbuffers_it_took(tmp_path):
    path = tmp_path / "x.nemo"
    path.write_text(_LLAMA70B.format(gpu="GB200", tp=8, precision="bf16", overlap="true"))
    spec, _ = load_experiment(str(path))
    [stage] = plan_experiment(spec).stages
    [note] = [n for n in stage.notes if "userbuffers" in n]
    assert "4096 x 8192 bf16" in note and "Transformer Engine's default" in note and "blackwell" in note


def test_memory_charges_tes_registered_buffers_instead_of_pytorchs_gathered_input(tmp_path):
    """TE registers one (rows x hidden) buffer per GEMM of a layer (12: eight all-gather, four reduce-scatter),
    a ring-exchange reduce-scatter 2 tp - 1 chunks of rows / tp; FP8 all-gather buffers hold 1-byte values."""
    from nemoc.compiler.catalog.userbuffers import buffer_bytes, userbuffer_bytes

    plan = _plan_of(tmp_path)
    ub = plan.stages[0].execution.userbuffers
    parts = plan.stages[0].memory.parts
    assert parts["tp_comm_userbuffers"] == buffer_bytes(ub) == 12 * 4096 * 8192 * 2
    assert "tp_comm_buffers" not in parts
    assert "tp_comm_userbuffers" not in _plan_of(tmp_path, overlap="false").stages[0].memory.parts
    assert userbuffer_bytes(rows=100, hidden=10, tp=4, fp8=True) == 100 * 10 * (8 * 1 + 4 * 2)
    assert userbuffer_bytes(rows=100, hidden=10, tp=4, ring_reduce_scatter=2) == 100 * 10 * 2 * (10 + 2 * 7 / 4)
    fp8 = _plan_of(tmp_path, precision="fp8").stages[0]  # the fp8 preset: proj / fc2 fprop ring exchanges
    assert fp8.memory.parts["tp_comm_userbuffers"] == 4096 * 8192 * (8 * 1 + 2 * 2 + 2 * 2 * 7 / 4)
