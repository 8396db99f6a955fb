"""Calibrate the cost and memory models against published Megatron / NeMo measurements.

Usage:  .venv/bin/python bench/calibrate.py [--json bench/results/calibrate.json] [--quiet]

Builds every usable row of `compiler/data/published_runs.json` as an experiment with its exact
published layout (model architecture, GPU, precision, TP/PP/VP/CP/EP, micro and global batch),
predicts tokens/s per GPU with `nemoc.compiler.cost.estimate` and compares it with the measured
tokens/s per GPU (the measured quantity; published "model TFLOP/s" use different formulas).
Prints per-row predicted vs measured and error, the median and max absolute error, and the memory
error for the rows with published memory figures (Korthikanti et al. 2022, Fig. 1). Writes JSON.

Assumptions applied to every row of a source (never per row), stated in docs/calibration.md:
NeMo/Megatron-Bridge rows (A, C): sequence parallel when TP > 1, distributed optimizer, flash
attention, no recompute (recipes not in the summary tables). Megatron-LM README rows (E): BF16,
micro batch 1, flash attention, SP. Narayanan 2021 (F) and Korthikanti 2022 (G): 16-bit, unfused
softmax (pre-flash), no distributed optimizer; F: full recompute, micro batch 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from nemoc.compiler import cost, memory
from nemoc.compiler.catalog.hardware import get_gpu
from nemoc.compiler.plan import Layout
from nemoc.compiler.spec import LoraSpec, ModelSpec

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "compiler" / "data" / "published_runs.json"
GIB = 1 << 30


@dataclass(frozen=True)
class Case:
    id: str
    label: str
    model: ModelSpec
    layout: Layout
    gpu: str
    precision: str
    seq: int
    kind: str
    peft: LoraSpec | None
    backend: str
    measured: float
    derived: bool


def load_rows(path: Path = DATA) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def _gpu(text: str) -> str:
    for key, gid in (("GB200", "GB200"), ("B200", "B200"), ("H100", "H100"), ("A100", "A100-80GB")):
        if key in text:
            return gid
    raise ValueError(text)


def _precision(row: dict) -> str:
    p = (row["precision"] or "").upper()
    if "FP8" in p:
        return "fp8"
    return "fp16" if row["source"].startswith("F") else "bf16"


def row_model(row: dict) -> ModelSpec:
    """The row's architecture in nemoc terms, by family (GPT: GELU/LayerNorm/learned positions/biases;
    Llama/Mixtral: SwiGLU/RMSNorm/RoPE; Nemotron: squared ReLU/LayerNorm/RoPE, no biases)."""
    name = row["model"].lower()
    h = row["hidden"]
    heads = row["heads"] or h // 128  # F rows do not publish heads; with MHA a x d = h either way
    groups = row["kv_heads"] or heads
    ffn = row["ffn_hidden"] or 4 * h
    common = dict(name=row["id"], layers=row["layers"], hidden=h, heads=heads, query_groups=groups,
                  ffn_hidden=ffn, vocab=row["vocab"], seq_length=row["seq_len"])
    if "llama" in name or "mixtral" in name:
        extra = dict(experts=8, top_k=2, moe_ffn_hidden=ffn) if "mixtral" in name else {}
        return ModelSpec(**common, **extra)
    if "nemotron" in name:
        return ModelSpec(**common, activation="squared_relu", norm="layernorm")
    return ModelSpec(**common, activation="gelu", norm="layernorm", position="learned", tie_embeddings=True,
                     add_bias_linear=True)


def row_case(row: dict) -> Case | str:
    """A Case, or the reason the row is not usable."""
    name = row["model"].lower()
    if "llama4" in name:
        return "Llama 4 architecture (MoE interleaving, chunked attention) not modelled"
    if row.get("fsdp") == 1:
        return "FSDP layout (parameter sharding inside the step) not modelled"
    if not row["layers"] or not row["hidden"]:
        return "architecture not published"
    src = row["source"][0]
    n = row["num_gpus"]
    tp, pp, cp = row["tp"] or 1, row["pp"] or 1, row["cp"] or 1
    dp = n // (tp * pp * cp)
    mbs = row["mbs"] or 1
    gbs = row["gbs"]
    vp = row["vp"] if row["vp"] and row["vp"] > 1 else None
    rec = (row["recompute"] or "").lower()
    recompute = "full" if (src == "F" or rec.startswith("full")) else ("selective" if rec.startswith("selective") else "none")
    sp = tp > 1 and not (src == "G" and recompute == "full")
    layout = Layout(tp=tp, pp=pp, vp=vp, cp=cp, ep=row["ep"] or 1, etp=1, dp=dp, micro_batch=mbs, global_batch=gbs,
                    num_microbatches=gbs // (mbs * dp), sequence_parallel=sp,
                    distributed_optimizer=src in "ACE", recompute=recompute)
    task = (row["task"] or "pretrain").lower()
    kind, peft = ("sft", LoraSpec(rank=16)) if task == "lora" else (("sft", None) if task == "sft" else ("pretrain", None))
    backend = "unfused" if src in "FG" else "flash"
    label = f"{row['model']} {row['gpu'].split()[0]} x{n} {_precision(row)} {task}"
    return Case(row["id"], label, row_model(row), layout, _gpu(row["gpu"]), _precision(row), row["seq_len"], kind,
                peft, backend, float(row["tokens_per_sec_per_gpu"]), bool(row.get("tokens_derived_from_published_tflops")))


def predict(case: Case, params: cost.EfficiencyParams = cost.DEFAULT_PARAMS) -> float:
    est = cost.estimate(case.model, case.layout, gpu=get_gpu(case.gpu), precision=case.precision,
                        attention_backend=case.backend, seq_length=case.seq, stage_kind=case.kind, peft=case.peft,
                        params=params)
    return est.tokens_per_s_per_gpu


def throughput_errors(rows: list[dict], params: cost.EfficiencyParams = cost.DEFAULT_PARAMS) -> list[dict]:
    out = []
    for row in rows:
        case = row_case(row)
        if isinstance(case, str):
            out.append({"id": row["id"], "model": row["model"], "skipped": case})
            continue
        pred = predict(case, params)
        out.append({"id": case.id, "label": case.label, "measured": case.measured, "predicted": pred,
                    "error": pred / case.measured - 1.0, "derived": case.derived, "task": case.kind,
                    "peft": case.peft is not None})
    return out


# Korthikanti et al. 2022 Fig. 1 (GiB per GPU, as transcribed in the G rows): model states, and
# activations without recompute / SP vs with SP + selective recompute (TP 8, PP as in Table 5).
def memory_errors(rows: list[dict]) -> list[dict]:
    out = []
    import re

    for row in rows:
        if not row["id"].startswith("G") or not row["peak_memory"] or "selective" not in (row["recompute"] or ""):
            continue
        nums = [float(x) for x in re.findall(r"([\d.]+)", row["peak_memory"].split("GiB/GPU):")[1])[:3]]
        states, act_none, act_selsp = nums
        case = row_case(row)
        assert not isinstance(case, str)
        base = case.layout
        for variant, measured, sp, rec in (("activations none", act_none, False, "none"),
                                           ("activations SP+selective", act_selsp, True, "selective")):
            lay = Layout(**{**_asdict(base), "sequence_parallel": sp, "recompute": rec})
            mem = memory.estimate(case.model, lay, precision="bf16", attention_backend="unfused", seq_length=case.seq,
                                  gpu=case.gpu, dropout=True)
            pred = mem.activations / GIB
            out.append({"id": case.id, "label": f"{row['model']} {variant}", "measured_gib": measured,
                        "predicted_gib": pred, "error": pred / measured - 1.0})
        mem = memory.estimate(case.model, base, precision="bf16", attention_backend="unfused", seq_length=case.seq,
                              gpu=case.gpu)
        pred = (mem.weights + mem.gradients + mem.optimizer) / GIB
        out.append({"id": case.id, "label": f"{row['model']} model states", "measured_gib": states,
                    "predicted_gib": pred, "error": pred / states - 1.0})
    return out


def _asdict(layout: Layout) -> dict:
    return {f: getattr(layout, f) for f in layout.__slots__}


def summarize(results: list[dict]) -> dict:
    errs = [abs(r["error"]) for r in results if "error" in r]
    return {"rows": len(errs), "median_abs_error": statistics.median(errs) if errs else None,
            "max_abs_error": max(errs) if errs else None,
            "within_5pct": sum(e <= 0.05 for e in errs), "within_15pct": sum(e <= 0.15 for e in errs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "calibrate.json"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    rows = load_rows()
    tput = throughput_errors(rows)
    mem = memory_errors(rows)
    used = [r for r in tput if "error" in r]
    groups = {
        "all": used,
        "pretrain": [r for r in used if r["task"] == "pretrain"],
        "fine-tuning (SFT/LoRA)": [r for r in used if r["task"] != "pretrain"],
    }
    if not args.quiet:
        print(f"{'id':5s} {'row':52s} {'measured':>10s} {'predicted':>10s} {'error':>8s}")
        for r in tput:
            if "skipped" in r:
                print(f"{r['id']:5s} {r['model'][:52]:52s} skipped: {r['skipped']}")
            else:
                flag = "*" if r["derived"] else " "
                print(f"{r['id']:5s} {r['label'][:52]:52s} {r['measured']:10.1f} {r['predicted']:10.1f} "
                      f"{100 * r['error']:+7.1f}%{flag}")
        print("(* tokens/s derived by the collector from published model TFLOP/s and the stated formula)")
        print("\nmemory (Korthikanti et al. 2022 Fig. 1, GiB/GPU)")
        for r in mem:
            print(f"{r['id']:5s} {r['label'][:52]:52s} {r['measured_gib']:10.2f} {r['predicted_gib']:10.2f} "
                  f"{100 * r['error']:+7.1f}%")
    summary = {name: summarize(g) for name, g in groups.items()}
    summary["memory"] = summarize(mem)
    for name, s in summary.items():
        if s["rows"]:
            print(f"{name:24s} rows {s['rows']:3d}  median |err| {100 * s['median_abs_error']:5.1f}%  "
                  f"max |err| {100 * s['max_abs_error']:5.1f}%  within 5%: {s['within_5pct']}  "
                  f"within 15%: {s['within_15pct']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"summary": summary, "throughput": tput, "memory": mem}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
