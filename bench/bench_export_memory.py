"""Peak host memory of exporting a trained checkpoint: the streamed export (runtime/hf/trained.py) against
the path it replaced (build the whole one-process model in fp32, load the checkpoint, clone every tensor
into the output dtype, serialise one safetensors file: the removed runtime/align/export.py).

    .venv/bin/python bench/bench_export_memory.py [--layers 8 24 --hidden 512 --ffn 1408 --vocab 32000]

Each side runs in a fresh process; the number is ru_maxrss at the end minus ru_maxrss after the imports
and the process group (the same interpreter, torch and Megatron-Core on both sides). One model per
`--layers` value (same vocabulary): the streamed peak should not grow with the layer count. Writes
bench/results/export_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _spec(a):
    from nemoc.compiler.spec import ModelSpec

    return ModelSpec(name="bench", layers=a.layers, hidden=a.hidden, heads=8, query_groups=8, ffn_hidden=a.ffn,
                     vocab=a.vocab, seq_length=256, activation="swiglu", norm="rmsnorm", position="rope")


def child(mode: str, a) -> dict:
    import torch

    from nemoc.runtime.align import common

    torch.set_num_threads(1)
    common.init_distributed(tp=1, pp=1, seed=1)
    spec = _spec(a)
    ckpt, out = Path(a.work) / "ckpt", Path(a.work) / f"hf_{mode}"
    if mode == "save":
        common.save_model(common.build_gpt(spec, common.single_layout()), ckpt)
        return {}
    base = _rss_mb()
    if mode == "streamed":
        from nemoc.runtime.hf import trained

        trained.export_trained(ckpt, spec, out, vocab=spec.vocab, source=None, tokenizer_dir=None, dtype="float32")
    else:  # the removed path: whole fp32 model + a cloned copy of every tensor + the serialised file
        from safetensors.torch import save_file

        model = common.build_gpt(spec, common.single_layout(), precision="fp32")
        common.load_model(model, ckpt)
        state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in common.unwrap(model).state_dict().items()
                 if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"))
    return {"peak_over_baseline_mb": _rss_mb() - base, "baseline_mb": base}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[8, 24])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--child")
    p.add_argument("--work")
    a = p.parse_args()
    if a.child:
        a.layers = a.layers[0]
        print(json.dumps(child(a.child, a)))
        return
    runs = []
    for layers in a.layers:
        runs.append(_measure(a, layers))
    print(json.dumps(runs, indent=2))
    (ROOT / "bench" / "results" / "export_memory.json").write_text(json.dumps(runs, indent=2) + "\n")


def _measure(a, layers: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        args = ["--layers", str(layers), "--hidden", str(a.hidden), "--ffn", str(a.ffn), "--vocab", str(a.vocab),
                "--work", work]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
        results = {}
        for mode in ("save", "old_whole_model", "streamed"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, *args], capture_output=True, text=True,
                                  env=env, cwd=ROOT)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        model_mb = sum(f.stat().st_size for f in (Path(work) / "hf_streamed").glob("*.safetensors")) / 2**20
    old, new = results["old_whole_model"]["peak_over_baseline_mb"], results["streamed"]["peak_over_baseline_mb"]
    return {"model": {"layers": layers, "hidden": a.hidden, "ffn": a.ffn, "vocab": a.vocab},
            "fp32_model_mb": round(model_mb, 1), "old_peak_over_baseline_mb": round(old, 1),
            "streamed_peak_over_baseline_mb": round(new, 1), "ratio_old_over_streamed": round(old / max(new, 1e-9), 2)}


if __name__ == "__main__":
    main()
