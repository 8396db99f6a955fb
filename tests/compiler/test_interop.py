"""`nemoc import`: published Megatron-LM command lines, NeMo 1 configs and a Megatron-Bridge dump
(tests/data/interop/, sources in its README) become canonical .nemo files that check and plan; the shell
reader evaluates what bash would; nothing of the source is dropped unnamed."""

from __future__ import annotations

import json

import re
from pathlib import Path

import pytest

from hf_configs import LLAMA3_8B_CONFIG
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemoc.compiler.interop import ImportProblem, detect_format, import_text
from nemoc.compiler.interop.megatron_lm import split_fractions
from nemoc.compiler.interop.shell import ShellError, read_launch
from nemoc.compiler.lower import load_experiment
from nemoc.compiler.planner import plan_experiment
from nemoc.dsl.format import format_module
from nemoc.dsl.parser import parse
from nemoc.runtime.cli import cli
from nemoc.runtime.target import NEMOC_RUNTIME  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "interop"
INPUTS = sorted(p for p in DATA.iterdir() if p.suffix in (".sh", ".yaml"))

# What each published input must become: format, preset (or None), layout, cluster and stage facts.
EXPECTED = {
    "megatron_gpt3_175b.sh": dict(format="megatron-lm", preset="gpt3_175b", tp=8, pp=16, world=128,
                                  precision="fp16", global_batch=1536, steps=500000, plans=True),
    "megatron_gpt_345m_mp.sh": dict(format="megatron-lm", preset="gpt3_350m", tp=2, pp=2, world=8,
                                    precision="fp16", global_batch=16, steps=500000, plans=True),
    "megatron_llama3_8b_h100_fp8.sh": dict(format="megatron-lm", preset=None, tp=1, pp=1, world=8,
                                           precision="fp8", global_batch=128, steps=1953125000 // 128, plans=False),
    "megatron_mixtral_8x7b.sh": dict(format="megatron-lm", preset=None, tp=1, pp=1, world=2, precision="fp32",
                                     global_batch=4, steps=7, plans=True),
    "nemo1_megatron_gpt_config.yaml": dict(format="nemo1", preset="gpt3_126m", tp=1, pp=1, world=1, precision="fp16",
                                           global_batch=8, steps=100000, plans=True),
    "nemo_launcher_llama2_7b.yaml": dict(format="nemo1", preset="llama2_7b", tp=1, pp=1, world=128,
                                         precision="bf16", global_batch=2048, steps=300000, plans=True),
    "bridge_llama3_8b_sft_gb200_fp8_mx.yaml": dict(format="bridge", preset="llama3_8b", tp=1, pp=1, world=8,
                                                   precision="bf16", global_batch=8, steps=50, plans=True,
                                                   init="meta-llama/Meta-Llama-3-8B"),
}



def test_every_stored_input_has_an_expectation_and_a_source():
    assert {p.name for p in INPUTS} == set(EXPECTED)
    readme = (DATA / "README.md").read_text()
    for p in INPUTS:
        assert p.name in readme, p.name
    assert sum(e["format"] == "megatron-lm" for e in EXPECTED.values()) >= 3
    assert sum(e["format"] != "megatron-lm" for e in EXPECTED.values()) >= 2


@pytest.mark.parametrize("path", INPUTS, ids=[p.name for p in INPUTS])
def test_import_checks_and_plans(path, tmp_path):
    want = EXPECTED[path.name]
    result = CliRunner().invoke(cli, ["import", str(path), "-o", str(tmp_path / "x.nemo")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "x.nemo").read_text()
    assert format_module(parse(text, "x"), text) == text  # canonical: `nemoc fmt --check` would pass
    # the not-carried-over settings and the assumptions are named on stderr, each line naming the file
    lines = [line for line in result.stderr.splitlines() if not line.startswith("wrote ")]
    assert lines and all(line.startswith(f"warning: {path}: ") for line in lines), result.stderr
    check = CliRunner().invoke(cli, ["check", str(tmp_path / "x.nemo")])
    if want.get("init"):
        # the source fine-tunes a hub checkpoint: check says E045 until it is a local directory, then passes
        assert check.exit_code == 1 and "E045" in check.output and f'hf("{want["init"]}")' in text, check.output
        local = tmp_path / "hf"
        local.mkdir()
        (local / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
        text = text.replace(f'hf("{want["init"]}")', f'hf("{local}")')
        (tmp_path / "x.nemo").write_text(text)
        check = CliRunner().invoke(cli, ["check", str(tmp_path / "x.nemo")])
    assert check.exit_code == 0, check.output
    spec, _ = load_experiment(str(tmp_path / "x.nemo"))
    assert detect_format(path.read_text()) == want["format"]
    assert (spec.parallel.tensor, spec.parallel.pipeline) == (want["tp"], want["pp"])
    assert spec.cluster.world_size == want["world"] and spec.precision == want["precision"]
    stage = spec.stages[0]
    assert (stage.global_batch, stage.steps) == (want["global_batch"], want["steps"])
    if want["preset"]:
        assert f"model {want['preset']} " in text
    plan = CliRunner().invoke(cli, ["plan", str(tmp_path / "x.nemo")])
    if want["plans"]:
        assert plan.exit_code == 0, plan.output
    else:
        # nemoc's runtime needs more memory than the source's framework here (fp32 gradient reduction
        # where the script asks --grad-reduce-in-bf16; SFT on the local spec's unfused attention): the
        # plan says so at the parallel block, with the change that fits.
        assert plan.exit_code == 1 and "error[E130]" in plan.output and "hint: set" in plan.output, plan.output
        key, value = re.search(r"hint: set (\w+) = (\w+)", plan.output).groups()
        fixed = CliRunner().invoke(cli, ["plan", str(tmp_path / "x.nemo"), "--set", f"parallel.{key}={value}"])
        assert fixed.exit_code == 0, fixed.output  # and the hint's change fits


def test_megatron_defaults_fill_what_the_command_line_leaves_out():
    imported = import_text((DATA / "megatron_gpt_345m_mp.sh").read_text(), "megatron_gpt_345m_mp.sh", gpu="A100-80GB")
    text = imported.text
    # Megatron-LM's defaults, not nemoc's: Adam beta2 0.999, dropout 0.1; --checkpoint-activations = full
    assert "betas = [0.9, 0.999]" in text and "dropout = 0.1" in text and "recompute = full" in text
    assert "gpu = A100-80GB" in text and "split = [0.949, 0.05, 0.001]" in text
    assert 'path = "$DATA_PATH"' in text  # `${DATA_PATH:-<Specify path ...>}`: a placeholder stays a name
    # warm-up from a fraction of the decay steps, with the arithmetic in a comment
    assert "warmup = 3200" in text and "--lr-warmup-fraction .01 x 320000" in text


def test_every_setting_not_carried_over_is_named():
    imported = import_text((DATA / "megatron_llama3_8b_h100_fp8.sh").read_text(), "llama.sh")
    for flag in ("--apply-layernorm-1p", "--decoupled-lr 5.0e-4", "--fp8-amax-history-len 1024",
                 "--rotary-percent 1.0"):
        assert any(d == flag or d.startswith(flag + " ") for d in imported.dropped), flag
        assert f"#   {flag}" in imported.text
    # --manual-gc is the language's (manual_gc), carried over, not dropped
    assert "manual_gc = true" in imported.text and not any(d.startswith("--manual-gc") for d in imported.dropped)
    # the if-branch bash takes ($DTYPE == fp8): fp8 flags are in, and the mock-data branch was taken
    assert "precision = fp8" in imported.text and "vocab = 128256" in imported.text
    nemo = import_text((DATA / "nemo_launcher_llama2_7b.yaml").read_text(), "llama2.yaml")
    assert "model.use_flash_attention = true" in nemo.dropped and "exp_manager.name = megatron_llama" in nemo.dropped


def test_interpolations_and_presets_in_nemo_yaml():
    text = import_text((DATA / "nemo1_megatron_gpt_config.yaml").read_text(), "gpt.yaml").text
    assert "seq_length = 512" in text  # ${model.encoder_seq_length} resolved
    # GPT2BPETokenizer (50257), NeMo 1's defaults (GELU, LayerNorm, learned positions, tied, biases): GPT-3 126M
    assert "model gpt3_126m {" in text
    llama = import_text((DATA / "nemo_launcher_llama2_7b.yaml").read_text(), "llama2.yaml")
    assert "model llama2_7b {}" in llama.text  # fast-swiglu, rmsnorm, rope, untied, no bias: exactly the preset
    assert any("took llama2_7b's 32000" in w for w in llama.warnings)
    assert "weight = 0.0333" in llama.text and '"${data_dir}/my-llama_00_text_document"' in llama.text


def test_shell_reader_evaluates_as_bash():
    script = """
A=4
B=$((A*2))   # arithmetic
ARGS=(--x "$B" --y 'q r')
ARGS+=(--z)
S="--s1 1 \\
   --s2 2"
if [[ "$B" == "8" ]]; then ARGS+=(--yes); else ARGS+=(--no); fi
torchrun --nproc_per_node $A pretrain_gpt.py ${ARGS[@]} $S "${UNSET:-dflt}" $1
"""
    launch = read_launch(script)
    assert launch.launcher == ("torchrun", "--nproc_per_node", "4")
    assert launch.args == ("--x", "8", "--y", "q", "r", "--z", "--yes", "--s1", "1", "--s2", "2", "dflt", "$1")
    with pytest.raises(ShellError, match="no Megatron-LM launch"):
        read_launch("echo hello\n")
    bare = read_launch("# pasted flags\n--num-layers 2 \\\n  --hidden-size 8\n")
    assert bare.args == ("--num-layers", "2", "--hidden-size", "8") and "no launcher line" in bare.warnings[0]
    looped = read_launch("for n in 1 2; do\n  X=$n\ndone\ntorchrun pretrain_gpt.py --x $X\n")
    assert looped.args == ("--x", "$X") and any("`for` is not evaluated" in w for w in looped.warnings)
    with pytest.raises(ShellError, match="line 2: unterminated"):
        read_launch('A=1\nB="oops\n')


def test_bad_inputs_are_one_line_errors_not_tracebacks(tmp_path):
    cases = {"none.sh": "echo nothing here\n", "bad.yaml": "trainer:\n  x: [1\nmodel:\n",
             "noheads.sh": "torchrun pretrain_gpt.py --num-layers 2 --hidden-size 8\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        result = CliRunner().invoke(cli, ["import", str(tmp_path / name)])
        assert result.exit_code == 1 and result.stderr.startswith("error: "), (name, result.output)
        assert str(tmp_path / name) in result.stderr and "Traceback" not in result.output
    missing = CliRunner().invoke(cli, ["import", str(tmp_path / "missing.sh")])
    assert missing.exit_code == 2 and "cannot read" in missing.stderr
    with pytest.raises(ImportProblem, match="--gpu V100"):
        import_text("torchrun pretrain_gpt.py --num-layers 2 --hidden-size 8 --num-attention-heads 2 "
                    "--seq-length 8 --lr 1\n", "x.sh", gpu="V100")
    with pytest.raises(ImportProblem, match="--name 'my run'"):
        import_text("torchrun pretrain_gpt.py --num-layers 2\n", "x.sh", name="my run")
    with pytest.raises(ImportProblem, match="x.sh: --normalization Weird: nemoc has LayerNorm and RMSNorm"):
        import_text("torchrun pretrain_gpt.py --num-layers 2 --hidden-size 8 --num-attention-heads 2 "
                    "--normalization Weird\n", "x.sh")
    with pytest.raises(ImportProblem, match="x.sh: --hidden-size 8x: not a number"):
        import_text("torchrun pretrain_gpt.py --num-layers 2 --hidden-size 8x\n", "x.sh")


def test_split_and_launch_sizes():
    assert split_fractions("'99,1,0'") == [0.99, 0.01, 0.0]
    text = import_text("torchrun --nnodes 2 --nproc_per_node 4 pretrain_gpt.py --num-layers 2 --hidden-size 64 "
                       "--num-attention-heads 4 --seq-length 128 --vocab-size 1000 --lr 1e-3 --train-iters 5 "
                       "--tensor-model-parallel-size 2 --sequence-parallel\n", "h200_run.sh").text
    assert "gpu = H200" in text and "nodes = 2" in text and "gpus_per_node = 4" in text
    assert "sequence_parallel = true" in text and "global_batch = 4" in text  # default: micro 1 x dp 4


def test_plan_of_an_import_is_the_sources_layout():
    imported = import_text((DATA / "megatron_gpt3_175b.sh").read_text(), "gpt3.sh", gpu="A100-80GB")
    assert any("set nodes = 16" in w for w in imported.warnings)  # 1 node cannot hold tp 8 x pp 16
    spec = _spec(imported.text)
    layout = plan_experiment(spec, target=NEMOC_RUNTIME).plan.stages[0].layout
    assert (layout.tp, layout.pp, layout.dp, layout.micro_batch, layout.vp) == (8, 16, 1, 1, None)
    assert layout.recompute == "none" and not layout.distributed_optimizer


def _spec(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.nemo"
        path.write_text(text)
        return load_experiment(str(path))[0]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_inputs_import_or_fail_with_a_message(data):
    """Deleted, repeated or corrupted lines of the real inputs: a .nemo that parses, or an ImportProblem
    that is not an internal error; never a traceback."""
    path = data.draw(st.sampled_from(INPUTS))
    lines = path.read_text().splitlines(True)
    for _ in range(data.draw(st.integers(1, 3))):
        k = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["delete", "repeat", "corrupt"]))
        if op == "delete":
            del lines[k:k + data.draw(st.integers(1, 5))]
        elif op == "repeat":
            lines.insert(k, lines[data.draw(st.integers(0, len(lines) - 1))])
        elif lines[k]:
            j = data.draw(st.integers(0, len(lines[k]) - 1))
            lines[k] = lines[k][:j] + data.draw(st.sampled_from(list("\"'$(){}:[ \\`\t") + ["${", "$((", "-1"])) + \
                lines[k][j + 1:]
        if not lines:
            break
    try:
        imported = import_text("".join(lines), path.name)
    except ImportProblem as exc:
        assert "internal error" not in str(exc), str(exc)
        return
    parse(imported.text, "x.nemo")


def test_virtual_stages_blends_and_recompute_flags():
    text = import_text("torchrun --nproc_per_node 8 pretrain_gpt.py --num-layers 32 --hidden-size 1024 "
                       "--num-attention-heads 16 --seq-length 2048 --vocab-size 32000 --lr 1e-4 --train-iters 10 "
                       "--global-batch-size 64 --pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 2 "
                       "--recompute-activations --data-path 0.3 /d/a_text_document 0.7 /d/b_text_document "
                       "--lr-decay-style WSD --eval-iters 0\n", "b200_x.sh").text
    assert "virtual_pipeline = 4" in text and "layers(32) / (pp(4) x 2 layers per virtual stage)" in text
    assert "recompute = selective" in text and "schedule = wsd(" in text
    assert 'path = "/d/a_text_document"' in text and "weight = 0.3" in text and "data = [part0, part1]" in text
    assert "eval_every" not in text  # --eval-iters 0: Megatron-LM does not evaluate
    spec = _spec(text)
    assert spec.cluster.gpu == "B200" and spec.parallel.virtual_pipeline == 4 and len(spec.data) == 2
    modules = import_text("torchrun --nproc_per_node 8 pretrain_gpt.py --num-layers 32 --hidden-size 1024 "
                          "--num-attention-heads 16 --seq-length 2048 --vocab-size 32000 --lr 1e-4 --train-iters 10 "
                          "--global-batch-size 64 --recompute-granularity selective --recompute-modules mlp layernorm "
                          "--data-path /d/a_text_document\n", "h100_x.sh").text
    assert _spec(modules).parallel.recompute_modules == ("mlp", "layernorm")


def test_bridge_pretraining_dump_with_a_blend():
    dump = """_target_: megatron.bridge.training.config.ConfigContainer
model:
  _target_: megatron.bridge.models.llama.llama_provider.Llama31ModelProvider
  activation_func:
    _call_: false
    _target_: torch.nn.functional.silu
  gated_linear_unit: true
  add_bias_linear: false
  normalization: RMSNorm
  num_layers: 16
  hidden_size: 2048
  ffn_hidden_size: 8192
  num_attention_heads: 32
  num_query_groups: 8
  kv_channels: 64
  position_embedding_type: rope
  rotary_base: 500000.0
  share_embeddings_and_output_weights: true
  seq_length: 8192
  vocab_size: 128256
  tensor_model_parallel_size: 2
  pipeline_model_parallel_size: 2
  virtual_pipeline_model_parallel_size: 2
  sequence_parallel: true
  recompute_granularity: full
  num_moe_experts: null
train:
  global_batch_size: 512
  micro_batch_size: 2
  train_samples: 5120
optimizer:
  optimizer: adam
  lr: 0.0003
  min_lr: 3.0e-05
  use_distributed_optimizer: true
scheduler:
  lr_decay_style: cosine
  lr_warmup_iters: 2
mixed_precision:
  bf16: true
dataset:
  _target_: megatron.bridge.training.config.GPTDatasetConfig
  blend:
  - - /data/a_text_document
    - /data/b_text_document
  - - 0.3
    - 0.7
  split: 99,1,0
  sequence_length: 8192
"""
    imported = import_text(dump, "llama32_1b.yaml", gpu="H100")
    assert imported.format == "bridge"
    text = imported.text
    assert "model llama32_1b_model {" in text and "tie_embeddings = true" in text  # no Llama 3.2 preset
    assert "virtual_pipeline = 2" in text and "sequence_parallel = true" in text and "recompute = full" in text
    assert "steps = 10  # train.train_samples / global batch 512" in text
    assert 'path = "/data/b_text_document"' in text and "weight = 0.7" in text and "split = [0.99, 0.01, 0]" in text
    assert "distributed_optimizer = true" in text and "precision = bf16" in text and "stage pretrain {" in text
    spec = _spec(text)
    assert spec.parallel.tensor == 2 and spec.model.kv_channels in (None, 64) and spec.model.head_dim == 64


def test_moe_token_dropping_and_router_flags_are_carried_over():
    """What `nemoc export` writes for a drop-and-pad, DeepSeek-style router (runtime/megatron_args `_flags`)
    reads back as the same model fields."""
    text = import_text("torchrun --nproc_per_node 8 pretrain_gpt.py --num-layers 4 --hidden-size 1024 "
                       "--num-attention-heads 16 --seq-length 2048 --vocab-size 32000 --lr 1e-4 --train-iters 10 "
                       "--global-batch-size 64 --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 512 "
                       "--moe-shared-expert-intermediate-size 512 --expert-model-parallel-size 8 "
                       "--moe-expert-capacity-factor 1 --moe-pad-expert-input-to-capacity --moe-token-drop-policy "
                       "position --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4 "
                       "--moe-shared-expert-overlap --moe-router-score-function sigmoid --moe-router-pre-softmax "
                       "--moe-router-topk-scaling-factor 2.5 --moe-router-enable-expert-bias "
                       "--moe-router-num-groups 4 --moe-router-group-topk 2\n", "moe.sh").text
    m = _spec(text).model
    assert (m.moe_capacity_factor, m.moe_pad_to_capacity, m.moe_token_drop_policy, m.moe_load_balancing,
            m.moe_aux_loss_coeff, m.moe_shared_expert_overlap) == (1.0, True, "position", "seq_aux_loss", 1e-4, True)
    assert (m.moe_router_score, m.moe_router_pre_softmax, m.moe_topk_scaling_factor, m.moe_expert_bias,
            m.moe_router_groups, m.moe_router_group_topk) == ("sigmoid", True, 2.5, True, 4, 2)
    assert "--moe-expert-capacity-factor" not in text  # carried over, not listed as dropped


def test_bridge_dump_of_a_token_drop_moe_carries_the_routing_over():
    """A Megatron-Bridge dump after `apply_moe_token_drop` (capacity 1.0, padded) with DeepSeek-V3-style
    routing: the model fields that differ from the defaults are written; Bridge's -1 capacity (dropless)
    and a balancing type the language has no word for are not carried over silently."""
    head = """_target_: megatron.bridge.training.config.ConfigContainer
model:
  _target_: megatron.bridge.models.gpt_provider.GPTModelProvider
  activation_func:
    _call_: false
    _target_: torch.nn.functional.silu
  gated_linear_unit: true
  add_bias_linear: false
  normalization: RMSNorm
  num_layers: 4
  hidden_size: 1024
  ffn_hidden_size: 4096
  num_attention_heads: 16
  num_query_groups: 16
  position_embedding_type: rope
  seq_length: 4096
  vocab_size: 32000
  num_moe_experts: 8
  moe_router_topk: 2
  moe_ffn_hidden_size: 512
  expert_model_parallel_size: 8
  moe_token_drop_policy: probs
  moe_aux_loss_coeff: 0.0001
  moe_router_score_function: sigmoid
  moe_router_enable_expert_bias: true
  moe_router_num_groups: 4
  moe_router_group_topk: 2
  moe_router_topk_scaling_factor: 2.5
"""
    tail = """train:
  global_batch_size: 512
  micro_batch_size: 1
  train_iters: 10
optimizer:
  optimizer: adam
  lr: 0.0003
mixed_precision:
  bf16: true
dataset:
  _target_: megatron.bridge.training.config.GPTDatasetConfig
  blend:
  - - /data/a_text_document
  - null
  split: 99,1,0
  sequence_length: 4096
"""
    drop = head + "  moe_expert_capacity_factor: 1.0\n  moe_pad_expert_input_to_capacity: true\n" \
        "  moe_router_load_balancing_type: seq_aux_loss\n" + tail
    imported = import_text(drop, "moe.yaml", gpu="H100")
    m = _spec(imported.text).model
    assert (m.moe_capacity_factor, m.moe_pad_to_capacity, m.moe_load_balancing, m.moe_aux_loss_coeff) == (
        1.0, True, "seq_aux_loss", 1e-4)
    assert (m.moe_router_score, m.moe_expert_bias, m.moe_router_groups, m.moe_router_group_topk,
            m.moe_topk_scaling_factor) == ("sigmoid", True, 4, 2, 2.5)
    assert "moe_token_drop_policy" not in imported.text  # the default: not written
    dropless = head + "  moe_expert_capacity_factor: -1.0\n  moe_router_load_balancing_type: noaux_tc\n" + tail
    imported = import_text(dropless, "moe.yaml", gpu="H100")
    assert _spec(imported.text).model.moe_capacity_factor is None
    assert any(d.startswith("model.moe_router_load_balancing_type = noaux_tc") for d in imported.dropped)


_MOE_LAUNCH = ("torchrun --nproc_per_node 8 pretrain_gpt.py --num-layers 4 --hidden-size 1024 "
               "--num-attention-heads 16 --seq-length 2048 --vocab-size 32000 --lr 1e-4 --train-iters 10 "
               "--global-batch-size 64 --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 512 ")


def test_a_negative_capacity_factor_imports_as_dropless():
    """Megatron-Core reads `--moe-expert-capacity-factor -1` as none (transformer_config.py __post_init__):
    the import checks as a dropless model, not a refused negative capacity."""
    imported = import_text(_MOE_LAUNCH + "--moe-expert-capacity-factor -1\n", "moe.sh")
    assert "moe_capacity_factor" not in imported.text
    assert _spec(imported.text).model.moe_capacity_factor is None


def test_sinkhorn_imports_without_an_auxiliary_loss():
    """Sinkhorn routing takes no auxiliary loss (router.py asserts it; rules E144): where the source gives no
    coefficient (Megatron's default is 0) the import writes 0, not the language's 1e-2, and checks clean;
    a coefficient the source gives is carried over (and E144 then refuses it, as Megatron would)."""
    m = _spec(import_text(_MOE_LAUNCH + "--moe-router-load-balancing-type sinkhorn\n", "moe.sh").text).model
    assert (m.moe_load_balancing, m.moe_aux_loss_coeff) == ("sinkhorn", 0.0)
    text = import_text(_MOE_LAUNCH + "--moe-router-load-balancing-type sinkhorn --moe-aux-loss-coeff 0.02\n",
                       "moe.sh").text
    assert _spec(text).model.moe_aux_loss_coeff == 0.02
    yaml_text = """_target_: megatron.bridge.training.config.ConfigContainer
model:
  _target_: megatron.bridge.models.gpt_provider.GPTModelProvider
  num_layers: 4
  hidden_size: 1024
  ffn_hidden_size: 4096
  num_attention_heads: 16
  seq_length: 4096
  vocab_size: 32000
  num_moe_experts: 8
  moe_router_topk: 2
  moe_ffn_hidden_size: 512
  moe_router_load_balancing_type: sinkhorn
train:
  global_batch_size: 512
  micro_batch_size: 1
  train_iters: 10
optimizer:
  optimizer: adam
  lr: 0.0003
mixed_precision:
  bf16: true
dataset:
  _target_: megatron.bridge.training.config.GPTDatasetConfig
  blend:
  - - /data/a_text_document
  - null
  split: 99,1,0
  sequence_length: 4096
"""
    m = _spec(import_text(yaml_text, "moe.yaml", gpu="H100").text).model
    assert (m.moe_load_balancing, m.moe_aux_loss_coeff) == ("sinkhorn", 0.0)
