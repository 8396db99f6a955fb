"""Hugging Face task kinds (inline): `hf_import` converts a checkpoint directory into Megatron-Core
tensors (runtime/hf/convert.py), `hf_export` writes a converted checkpoint back as a Hugging Face
directory (the export-only experiment: HF -> Megatron-Core -> HF).

DONE records: `hf_import` -> {"converted": DIR, "source": DIR, "family", "bytes", "seconds",
"tokenizer": the source directory when it holds tokenizer files}; `hf_export` -> {"path": DIR}.
A stage starting from the import finds the converted directory under its input `hf`
(`nemoc.runtime.hf.load.load_converted` loads it into a GPTModel chunk at any TP/PP).
"""

from __future__ import annotations

import os
import time

from nemoc.compiler.hfconfig import HfConfigError
from nemoc.runtime.orchestrate.tasks import TaskContext, TaskError, TaskKind, register


def run_hf_import(ctx: TaskContext) -> dict:
    from nemoc.runtime.hf import convert

    source = os.path.join(os.path.abspath(ctx.plan.root), str(ctx.task.settings["path"]))
    # the plan's worker count (compiler/hfimport.py), capped by this host's CPUs; `--workers` overrides
    planned = next((i.workers for i in ctx.plan.imports if i.directory == str(ctx.task.settings["path"])), 1)
    workers = int(ctx.options.get("workers") or min(planned, os.cpu_count() or 1))
    start = time.perf_counter()
    try:
        manifest = convert.import_checkpoint(source, ctx.out_dir / "converted", workers=workers)
    except (HfConfigError, convert.ConversionError, OSError) as exc:
        raise TaskError(f"{ctx.task.id}: {exc}") from None
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (ctx.out_dir / "converted").glob("*.safetensors"))
    ctx.log(f"converted {manifest['family']} checkpoint {source}: {size / 1e9:.3f} GB in {seconds:.1f} s "
            f"({workers} worker{'s' * (workers > 1)})")
    has_tokenizer = os.path.isfile(os.path.join(source, "tokenizer.json"))
    return {"converted": str(ctx.out_dir / "converted"), "source": source, "family": manifest["family"],
            "bytes": size, "seconds": seconds, "tokenizer": source if has_tokenizer else None}


def run_hf_export(ctx: TaskContext) -> dict:
    from nemoc.runtime.hf import convert

    imports = [rec for _, rec in ctx.inputs_of("checkpoint") if rec.get("converted")]
    if not imports:
        raise TaskError(f"{ctx.task.id}: no converted Hugging Face checkpoint upstream")
    dtype = ctx.stage.params.dtype if ctx.stage is not None else None  # resolved at compile time
    try:
        out = convert.export_converted(imports[0]["converted"], ctx.out_dir / "hf", dtype=dtype,
                                       tokenizer_dir=imports[0].get("source"))
    except (convert.ConversionError, OSError) as exc:
        raise TaskError(f"{ctx.task.id}: {exc}") from None
    ctx.log(f"wrote a Hugging Face checkpoint to {out}")
    return {"path": str(out)}


register(TaskKind(name="hf_import", run_inline=run_hf_import))
register(TaskKind(name="hf_export", run_inline=run_hf_export))
