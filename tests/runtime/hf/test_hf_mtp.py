"""DeepSeek-V3's multi-token prediction weights through the Hugging Face conversion. transformers builds no MTP
module (DeepseekV3ForCausalLM ignores `model.layers.{num_hidden_layers}.*` at load), so the checkpoint here is
transformers' tiny DeepSeek-V3 plus a depth written as deepseek-ai/DeepSeek-V3 stores it (enorm, hnorm, eh_proj,
one MoE layer, shared_head.norm, and copies of embed_tokens / lm_head): the import maps it to Megatron-Core's
`mtp.layers.0.*`, the export writes it back bit for bit, and a GPTModel built with one MTP depth loads the
converted checkpoint with every name and shape matching (nothing missing, nothing unexpected)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_models import make_hf_model, read_tensors


def _with_mtp(directory) -> dict:
    """Add one MTP depth to the saved tiny DeepSeek-V3 (its layer made from layer 1's tensors, perturbed)."""
    from safetensors.torch import save_file

    tensors = read_tensors(directory)
    config = json.loads((directory / "config.json").read_text())
    n, h = config["num_hidden_layers"], config["hidden_size"]
    torch.manual_seed(3)
    extra = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v + 0.01 * torch.randn_like(v)
             for k, v in tensors.items() if k.startswith(f"model.layers.{n - 1}.")}
    extra |= {f"model.layers.{n}.enorm.weight": 1 + 0.1 * torch.randn(h),
              f"model.layers.{n}.hnorm.weight": 1 + 0.1 * torch.randn(h),
              f"model.layers.{n}.eh_proj.weight": 0.3 * torch.randn(h, 2 * h),
              f"model.layers.{n}.shared_head.norm.weight": 1 + 0.1 * torch.randn(h),
              f"model.layers.{n}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
              f"model.layers.{n}.shared_head.head.weight": tensors["lm_head.weight"].clone()}
    for path in directory.glob("*.safetensors*"):
        path.unlink()
    save_file(tensors | extra, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    return tensors | extra


def test_mtp_depth_round_trips_bit_identical(tmp_path):
    from nemoc.runtime.hf import convert

    make_hf_model("deepseek_v3", tmp_path / "hf")
    before = _with_mtp(tmp_path / "hf")
    manifest = convert.import_checkpoint(tmp_path / "hf", tmp_path / "conv")
    assert manifest["mtp_num_layers"] == 1
    converted = read_tensors(tmp_path / "conv")
    mtp = sorted(k for k in converted if k.startswith("mtp."))
    for name in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
                 "mtp.layers.0.final_layernorm.weight", "mtp.layers.0.transformer_layer.mlp.router.weight",
                 "mtp.layers.0.transformer_layer.self_attention.linear_kv_up_proj.weight"):
        assert name in mtp, (name, mtp)
    assert torch.equal(converted["mtp.layers.0.eh_proj.weight"], before["model.layers.2.eh_proj.weight"])
    convert.export_converted(tmp_path / "conv", tmp_path / "out")
    after = read_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert torch.equal(t, after[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_a_checkpoint_transformers_saved_has_no_depth(tmp_path):
    """transformers writes num_nextn_predict_layers = 1 (DeepseekV3Config's default) and no MTP weights."""
    from nemoc.runtime.hf import convert

    make_hf_model("deepseek_v3", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert convert.import_checkpoint(tmp_path / "hf", tmp_path / "conv")["mtp_num_layers"] == 0


SCRIPT = textwrap.dedent('''
    import dataclasses, json, sys, types, torch
    from nemoc.runtime import mcore_cpu
    mcore_cpu.apply()
    from megatron.core import parallel_state, tensor_parallel
    from nemoc.compiler.hfconfig import architecture, read_config
    from nemoc.compiler.plan import Layout
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import megatron_args as margs, model as mdl
    from nemoc.runtime.hf import load

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    fields = architecture(read_config(sys.argv[1])).fields
    spec = ModelSpec(name="m", **fields, mtp_num_layers=1)
    layout = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=1, num_microbatches=1,
                    sequence_parallel=False, distributed_optimizer=False, recompute="none")
    cfg = margs.transformer_config(model=spec, layout=layout, precision="fp32", attention_backend="unfused",
                                   facts=margs.MachineFacts(cpu=True, have_te=False))
    cfg = dataclasses.replace(cfg, **margs.mtp_kwargs(spec, types.SimpleNamespace(mtp_num_layers=1)))
    (chunk,) = mdl.build_model_chunks(config=cfg, model=spec, vocab_size=spec.vocab, seq_length=spec.seq_length,
                                      attention_backend="unfused", have_te=False)
    load.load_converted(chunk, sys.argv[2], vocab=spec.vocab)
    from safetensors import safe_open
    with safe_open(sys.argv[2] + "/mtp-00000.safetensors", framework="pt") as f:
        same = all(torch.equal(chunk.state_dict()[k], f.get_tensor(k)) for k in f.keys())
    tokens = torch.randint(0, spec.vocab, (1, 16))
    loss = chunk(tokens, torch.arange(16)[None], None, labels=tokens).mean()
    loss.backward()
    print("RESULT " + json.dumps({"same": same, "loss": float(loss)}))
''')


@pytest.mark.slow  # one Megatron subprocess, ~15 s
def test_a_model_with_one_depth_loads_the_converted_checkpoint(tmp_path):
    from nemoc.runtime.hf import convert

    make_hf_model("deepseek_v3", tmp_path / "hf")
    _with_mtp(tmp_path / "hf")
    convert.import_checkpoint(tmp_path / "hf", tmp_path / "conv")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "hf"), str(tmp_path / "conv")],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["same"] and result["loss"] > 0


NEMO = """
experiment e {{
  cluster {{ gpu = H100
    nodes = 1 }}
  model m {{ init = hf("{hf}")
{extra}  }}
  data d {{ path = "x.jsonl"
    tokenizer = "t.json" }}
  stage pretrain {{ data = [d]
    steps = 10
    global_batch = 8 }}
}}
"""


def _lowered(tmp_path, extra: str = ""):
    from nemoc.compiler.lower import compile_file

    path = tmp_path / "e.nemo"
    path.write_text(NEMO.format(hf=tmp_path / "hf", extra=extra))
    spec, diags, _ = compile_file(str(path))
    return spec, [d for d in diags if d.code == "E204"], path


def test_init_takes_the_checkpoints_depth_and_refuses_more(tmp_path):
    make_hf_model("deepseek_v3", tmp_path / "hf")
    spec, e204, _ = _lowered(tmp_path)
    assert spec.model.mtp_num_layers == 0 and not e204  # transformers saved no MTP weights
    spec, e204, path = _lowered(tmp_path, "    mtp_num_layers = 1\n")
    assert len(e204) == 1 and "holds 0 multi-token prediction layers" in e204[0].message
    assert path.read_text().splitlines()[e204[0].span.line - 1].strip() == "mtp_num_layers = 1"
    _with_mtp(tmp_path / "hf")
    spec, e204, _ = _lowered(tmp_path)
    assert spec.model.mtp_num_layers == 1 and not e204
    spec, e204, _ = _lowered(tmp_path, "    mtp_num_layers = 0\n")  # written: trains without the depth
    assert spec.model.mtp_num_layers == 0 and not e204


PRETRAIN = """experiment deepseek_mtp {
  cluster {
    gpu = CPU
    gpus_per_node = 2
  }
  model tiny_deepseek {
    init = hf("ckpt")
  }
  parallel {
    tensor = 1
    pipeline = 2
  }
  precision = fp32
  data web {
    path = "text.jsonl"
    format = jsonl
    text_field = "text"
    tokenizer = "ckpt/tokenizer.json"
  }
  stage pretrain {
    data = [web]
    steps = 4
    global_batch = 4
    seq_length = 48
    log_every = 1
    optimizer = adam(lr = 1e-3, weight_decay = 0.0)
  }
  stage export after pretrain {
  }
}
"""


@pytest.mark.slow  # about a minute on the 2-core box
def test_pretrain_at_pp2_from_a_checkpoint_with_a_depth_and_export(tmp_path):
    """`init = hf(...)` of a DeepSeek-V3 checkpoint holding its MTP depth: the plan takes the depth, the import
    converts it, the pretraining stage at PP 2 loads it on the last stage (with its copy of the embedding) and
    trains it (the `mtp_1 loss` metric), and the export writes the trained depth back under DeepSeek's names."""
    import test_hf_deepseek_run as ds

    ckpt, _ = ds._world(tmp_path)
    before = _with_mtp(ckpt)
    texts = [q + " " + r for q, r in ds.QA] * 4
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    (tmp_path / "mtp.nemo").write_text(PRETRAIN)
    proc = subprocess.run([ds.NEMOC, "run", "mtp.nemo", "--workdir", "runs", "--workers", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tasks = tmp_path / "runs" / "tasks"
    task = json.loads((tasks / "train_pretrain" / "task.json").read_text())
    plan = json.loads(open(task["plan"]).read())
    assert plan["model"]["mtp_num_layers"] == 1 and plan["stages"][0]["layout"]["pp"] == 2
    records = [json.loads(line) for line in (tasks / "train_pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "mtp_1 loss" in r] == [1, 2, 3, 4]
    out = tasks / "export_export" / "hf"
    after = read_tensors(out)
    assert sorted(before) == sorted(after)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    for part in ("model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight",
                 "model.layers.2.self_attn.kv_b_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight"):
        assert not torch.equal(before[part], after[part]), part  # trained
