"""examples/hf_finetune_cpu.nemo end to end on the CPU (import -> SFT with a chat template -> DPO -> eval ->
export), then transformers loads the export and chats with it; and examples/llama3_70b_sft_dpo.nemo, which
starts from a checkpoint, is valid end to end in a dry run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
NEMOC = str(Path(sys.executable).parent / "nemoc")


def test_the_llama3_70b_example_starts_from_a_checkpoint_and_dry_runs(tmp_path):
    proc = subprocess.run([NEMOC, "run", "--dry-run", "llama3_70b_sft_dpo.nemo", "--workdir", str(tmp_path / "runs")],
                          cwd=EXAMPLES, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tasks = [line.split()[1] for line in proc.stdout.splitlines() if "would run" in line]
    assert tasks == ["hf_import:llama3_70b_instruct", "prepare:chat", "prepare:prefs", "train:sft", "train:dpo",
                     "export:export"], proc.stdout


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The example copied out of the tree, its checkpoint rebuilt by its build.py, `nemoc run` to the end."""
    root = tmp_path_factory.mktemp("example")
    shutil.copy(EXAMPLES / "hf_finetune_cpu.nemo", root)
    shutil.copytree(EXAMPLES / "common", root / "common")
    shutil.copytree(EXAMPLES / "data" / "hf_finetune", root / "data" / "hf_finetune")
    ckpt = root / "checkpoints" / "tiny_chat_llama"
    shutil.copytree(EXAMPLES / "checkpoints" / "tiny_chat_llama", ckpt,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    build = subprocess.run([sys.executable, str(ckpt / "build.py"), str(ckpt)], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([NEMOC, "run", "hf_finetune_cpu.nemo", "--workdir", "runs", "--workers", "1"], cwd=root,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert "7 done" in run.stdout, run.stdout
    return root


def _chat(model_dir: Path, tokenizer_dir: Path, question: str, eos: int | None = None) -> tuple[list[int], str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs)
    new = out[0][ids.shape[1]:].tolist()
    return new, tok.decode(new)


@pytest.mark.slow
def test_the_finetuned_export_answers_in_the_template_and_stops_at_eos(finetuned):
    records = [json.loads(line) for line in (finetuned / "runs" / "data" / "sums" / "records.jsonl").open()]
    assert len(records) == 56 and set(records[0]) == {"prompt", "response"}  # split train, columns renamed
    sft = json.loads((finetuned / "runs" / "tasks" / "train_sft" / "DONE.json").read_text())
    assert sft["final_loss"] < 1.5  # from ~6 (ln 384): it learned the format
    ckpt = finetuned / "checkpoints" / "tiny_chat_llama"
    eos = json.loads((ckpt / "config.json").read_text())["eos_token_id"]
    new, text = _chat(finetuned / "runs" / "tasks" / "export_export" / "hf", ckpt, "What is 3 plus 4?", eos=eos)
    assert new[-1] == eos and len(new) < 20, (new, text)  # stopped at its end-of-text, not at the length limit
    assert text.startswith("3 plus 4 is "), text


@pytest.mark.slow
def test_the_export_itself_carries_eos_and_the_chat_template(finetuned):
    out = finetuned / "runs" / "tasks" / "export_export" / "hf"
    ckpt = finetuned / "checkpoints" / "tiny_chat_llama"
    eos = json.loads((ckpt / "config.json").read_text())["eos_token_id"]
    assert json.loads((out / "generation_config.json").read_text()).get("eos_token_id") == eos
    source = json.loads((ckpt / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in exported.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in source.items() if k not in ("dtype", "torch_dtype")}  # every field of the source's
    assert exported["dtype"] == "float32"  # the stage trained in fp32 (precision = fp32): the stored dtype
    assert (out / "tokenizer_config.json").read_text() == (ckpt / "tokenizer_config.json").read_text()
    new, text = _chat(out, out, "What is 3 plus 4?")  # the export alone: its tokenizer, template and eos
    assert new[-1] == eos and len(new) < 20, (new, text)
    assert text.startswith("3 plus 4 is "), text
