"""The `nemoc plan --json` document (its shape: `nemoc.runtime.cli.plan`'s docstring), shared by `nemoc plan`
and `nemoc plan --sweep` (`nemoc.runtime.cli.sweep`); no click, no rich, no torch."""

from __future__ import annotations

TERMS = ("weights", "gradients", "optimizer", "activations", "other")
LAYOUT_KEYS = ("tp", "pp", "vp", "cp", "ep", "etp", "dp", "micro_batch", "global_batch", "num_microbatches",
               "sequence_parallel", "distributed_optimizer", "recompute")
ESTIMATE_KEYS = ("step_time_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu", "steps", "wall_time_s",
                 "gpu_hours", "cost_usd")


def _memory_json(m) -> dict:
    out = {t: getattr(m, t) for t in TERMS}
    out.update(total=m.total, capacity=m.capacity, parts=dict(m.parts))
    return out


def _estimate_json(e) -> dict:
    out = {k: getattr(e, k) for k in ESTIMATE_KEYS}
    out["parts"] = dict(e.parts)
    return out


def _candidate_json(c) -> dict:
    return {"layout": {k: getattr(c.layout, k) for k in LAYOUT_KEYS}, "step_time_s": c.estimate.step_time_s,
            "memory_total": c.memory.total, "mfu": c.estimate.mfu}


def _sum_cost(values) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def report_json(result, headroom: float, top: int) -> dict:
    """The `--json` document (see module docstring)."""
    from nemoc.compiler.plan import to_dict as plan_dict
    from nemoc.dsl.diagnostics import to_json

    stages = []
    for sp, sr in zip(result.plan.stages, result.stages):
        split = sp.execution.pipeline.params()
        search = sr.search
        stages.append({
            "name": sp.name, "kind": sp.kind,
            "layout": {k: getattr(sp.layout, k) for k in LAYOUT_KEYS} | ({"pipeline_split": split} if split else {}),
            "memory": _memory_json(sp.memory) | {"budget": int(sp.memory.capacity * (1 - headroom))},
            "estimate": _estimate_json(sp.estimate),
            "seq_length": sp.seq_length, "resident_models": list(sp.resident_models), "kernels": sp.kernels,
            "execution": plan_dict(sp.execution),
            "runner_ups": [_candidate_json(c) for c in sr.runner_ups[:top]],
            "rejections": [{"reason": r.reason, "count": r.count, "example": r.example, "layout": r.layout}
                           for r in (search.rejections if search else ())],
            "search": {"evaluated": search.evaluated, "space": search.space, "fitting": search.fitting} if search else None,
            "notes": list(sr.notes),
        })
    return {
        "experiment": result.plan.experiment,
        "cluster": {"gpu": result.plan.cluster.gpu, "nodes": result.plan.cluster.nodes,
                    "gpus_per_node": result.plan.cluster.gpus_per_node},
        "precision": result.plan.precision, "attention_backend": result.plan.attention_backend,
        "kernels": result.plan.kernels, "headroom": headroom,
        "stages": stages,
        "imports": [plan_dict(i) | {"seconds": i.seconds} for i in result.plan.imports],
        "total": report_json_total(result.plan),
        "warnings": [to_json(d) for d in result.warnings],
        "elapsed_s": result.elapsed_s,
    }


def report_json_total(plan) -> dict:
    """Stages plus the hf_import tasks, which run first (on the host, inside the run's allocation)."""
    es = [s.estimate for s in plan.stages]
    imports = sum(i.seconds for i in plan.imports)
    return {"wall_time_s": sum(e.wall_time_s for e in es) + imports, "gpu_hours": sum(e.gpu_hours for e in es),
            "cost_usd": _sum_cost(e.cost_usd for e in es), "import_s": imports}
