"""AST -> `ExperimentSpec`: the only module of the compiler that reads the syntax tree.

Input:  a `nemoc.dsl.loader.Program` (the root file and its imports, parsed) and `--set` overrides.
Output: an `ExperimentSpec` with presets expanded, templates merged, units resolved and `spans` filled
        with dotted paths (`model`, `model.heads`, `cluster.nodes`, `parallel.tensor`, `precision`,
        `data.web`, `data.web.path`, `stage.pretrain`, `stage.pretrain.global_batch`,
        `stage.pretrain.parallel.tensor`, `stage.pretrain.checkpoint.every`,
        `stage.pretrain.optimizer.lr`, ...); or every diagnostic found (E020-E044, W001).
Invariants: pure; collects all problems before raising once; the spec never holds AST nodes; a field
the user did not write has no entry in `spans` except the always-present block anchors `experiment`,
`cluster`, `model`, `parallel` (the experiment header when no parallel block is written) and
`stage.NAME`.

Semantics of top-level blocks: `cluster`, `model`, `parallel` and `data` blocks outside an experiment
(in the root file or an imported one) are named templates. Inside the experiment, `cluster NAME { }`,
`parallel NAME { }`, `model NAME { }` and `data NAME { }` start from the template of that name, and the
fields written override it; `model NAME` falls back to the catalog's presets. A stage may reference a
data template directly (`data = [web]`) without redeclaring it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING
from types import MappingProxyType

from nemoc.compiler import chattemplate, hfdata
from nemoc.compiler.catalog.hardware import GPUS, get_gpu
from nemoc.compiler.catalog.models import PRESETS, get_preset
from nemoc.compiler.params import SchedulerOptions, StageParams
from nemoc.compiler.scheduler import option_problems
from nemoc.compiler.spec import (CheckpointSpec, ClusterSpec, DataSpec, ExperimentSpec, LoraSpec, ModelSpec,
                                 OptimizerSpec, ParallelSpec, ScheduleSpec, StageSpec, TrackingSpec)
from nemoc.dsl import ast
from nemoc.dsl.diagnostics import Diagnostic, DiagnosticError, Note, Severity, Span, has_errors
from nemoc.dsl.loader import Program, load_program
from nemoc.dsl.overrides import apply_overrides
from nemoc.dsl.schema import (BLOCKS, CALLS, DATA_OPTIONS, MODEL_FIELDS, STAGE_KINDS, STAGE_PARAMS, TEMPLATE_KINDS,
                              TRAINING_KINDS)

LENGTH_FIELDS = ("steps", "tokens", "epochs")
# The dtype a stage's trained weights are held in, by the experiment's precision: what export writes by default.
TRAINED_WEIGHT_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16",
                        "mxfp8": "bfloat16", "nvfp4": "bfloat16"}
_DEFAULT_PRECISION = next(f.default for f in dataclasses.fields(ExperimentSpec) if f.name == "precision")
EXPORT_DTYPES = next(f.type.choices for f in STAGE_PARAMS["export"] if f.name == "dtype")
EXPERIMENT_KEYS = ("precision", "fp8_recipe", "attention_backend", "kernels", "moe_dispatcher", "moe_grouped_gemm",
                   "moe_permute_fusion", "cuda_graph_impl", "cuda_graph_scope", "manual_gc",
                   "manual_gc_interval", "cross_entropy_fusion", "bf16_first_layers",
                   "bf16_last_layers")  # the experiment's own fields
from nemoc.dsl.typecheck import CallValue, Checked, check_block, did_you_mean, missing_required, suggest

if TYPE_CHECKING:  # a Hugging Face config is read only for `init = hf(...)`: imported there (`_hf_init`)
    from nemoc.compiler.hfconfig import HfArchitecture


def load_experiment(path: str, sets: tuple[str, ...] = ()) -> tuple[ExperimentSpec, dict[str, str]]:
    """Read, parse, check and lower `path`. Raises `DiagnosticError` (with `.sources`) on any error.

    Warnings are not raised; call `lower_program` to see them.
    """
    spec, diags, sources = compile_file(path, sets)
    if spec is None or has_errors(diags):
        raise DiagnosticError(diags, sources)
    return spec, sources


def compile_file(path: str, sets: tuple[str, ...] = (), text: str | None = None, *, module_ok: bool = False):
    """(spec or None, every diagnostic incl. warnings, sources). Never raises for bad input. `text`: the
    root file's contents when the caller has them (the language server's buffer).

    With `module_ok` (`nemoc check`), a root file without an experiment is checked as a module (see
    `check_module`): the result is then (None, its diagnostics, sources), clean when none is an error."""
    try:
        program, diags = load_program(path, text)
        sources = dict(program.sources)
        if has_errors(diags) or not program.modules:
            return None, tuple(diags), sources
        if module_ok and is_module(program):
            return None, tuple(diags) + tuple(check_module(program)), sources
        spec, more, extra = lower_program(program, sets)
        sources.update(extra)
        return spec, tuple(diags) + tuple(more), sources
    except RecursionError:
        diag = Diagnostic("E004", "nesting is too deep to process", Span(path, 1, 1, 1, 2))
        return None, (diag,), {}


def lower_program(program: Program, sets: tuple[str, ...] = ()):
    """(ExperimentSpec or None, diagnostics, override pseudo-sources)."""
    diags: list[Diagnostic] = []
    templates = _collect_templates(program, diags)
    experiment = _the_experiment(program, diags)
    if experiment is None:
        return None, diags, {}
    experiment, set_sources, set_diags = apply_overrides(experiment, sets, templates)
    diags.extend(set_diags)  # a malformed override is skipped; the others still apply
    experiment = _merge_templates(experiment, templates, diags)
    checked = check_block(experiment, diags)
    spec = _Lowering(checked, templates, program, diags).spec()
    return spec, _unique(diags), set_sources


def _plain(value: object) -> object:
    """A param value as plain data: a call value (`template(...)`) becomes its argument mapping, every
    argument not written at the schema's default."""
    if isinstance(value, CallValue):
        return MappingProxyType({**{a.name: a.default for a in CALLS[value.func]}, **value.args})
    return value


def _unique(diags: list[Diagnostic]) -> list[Diagnostic]:
    """A template's error is found both where it is declared and where it is merged: report it once."""
    seen, out = set(), []
    for d in diags:
        key = (d.code, d.span, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


# --------------------------------------------------------------------------------------- templates


def _collect_templates(program: Program, diags: list[Diagnostic]) -> dict[tuple[str, str], ast.Block]:
    templates: dict[tuple[str, str], ast.Block] = {}
    for path, module in program.modules.items():
        for block in module.blocks:
            kind = block.kind.value
            if kind == "experiment":
                if path != program.root:
                    diags.append(Diagnostic("E026", "an imported file cannot declare an experiment", block.head,
                                            hint="imported files hold templates: cluster, model, parallel, data"))
                continue
            if kind not in TEMPLATE_KINDS:
                allowed = ("experiment",) + TEMPLATE_KINDS
                hint = did_you_mean(kind, allowed) or "top-level blocks: " + ", ".join(f"`{k}`" for k in allowed)
                if kind in BLOCKS:
                    msg = f"a `{kind}` block must be inside an experiment"
                else:
                    msg = f"unknown top-level block `{kind}`"
                diags.append(Diagnostic("E020", msg, block.kind.span, hint=hint))
                continue
            check_block(block, diags, where="top level")  # report template errors where they are written
            if block.name is None:
                continue
            key = (kind, block.name.value)
            if key in templates:
                diags.append(Diagnostic("E023", f"duplicate template `{kind} {block.name.value}`", block.head,
                                        notes=(Note("first declared here", templates[key].head),)))
                continue
            templates[key] = block
    return templates


def is_module(program: Program) -> bool:
    """The root file declares no experiment: a library of templates that experiments import."""
    module = program.modules.get(program.root)
    return module is not None and not any(b.kind.value == "experiment" for b in module.blocks)


def check_module(program: Program) -> list[Diagnostic]:
    """A file without an experiment, checked on its own: its imports (already loaded), every template's
    fields, types and units, duplicate templates, blocks that belong inside an experiment, and the
    catalog ids its cluster templates name (E043)."""
    diags: list[Diagnostic] = []
    templates = _collect_templates(program, diags)
    for (kind, _name), block in templates.items():
        gpu = next((f.value for f in block.fields if f.key.value == "gpu"), None) if kind == "cluster" else None
        if isinstance(gpu, (ast.Name, ast.String)) and get_gpu(gpu.value) is None:
            diags.append(Diagnostic("E043", f"unknown accelerator `{gpu.value}`", gpu.span,
                                    hint=did_you_mean(gpu.value, GPUS) or "known: " + ", ".join(GPUS)))
    return _unique(diags)


def _the_experiment(program: Program, diags: list[Diagnostic]) -> ast.Block | None:
    module = program.modules.get(program.root)
    experiments = [b for b in module.blocks if b.kind.value == "experiment"] if module else []
    if not experiments:
        span = module.span if module else None
        diags.append(Diagnostic("E026", "no `experiment` block in this file",
                                Span(program.root, 1, 1, 1, 2) if span is None else Span(span.path, 1, 1, 1, 2),
                                hint="write `experiment NAME { cluster { ... } model ... { } stage ... { } }`; "
                                     "a file of templates that experiments import is a module: "
                                     f"check it with `nemoc check {program.root}`"))
        return None
    for extra in experiments[1:]:
        diags.append(Diagnostic("E026", "a file holds exactly one experiment", extra.head,
                                notes=(Note("the first experiment is declared here", experiments[0].head),),
                                hint="move it to its own file; share blocks through `import`"))
    return experiments[0]


def _merge(template: ast.Block, block: ast.Block) -> ast.Block:
    """The template's members, then the block's; a field the block writes replaces the template's."""
    written = {f.key.value for f in block.fields}
    inherited = tuple(m for m in template.members if not (isinstance(m, ast.Field) and m.key.value in written))
    return dataclasses.replace(block, members=inherited + block.members)


def _merge_templates(experiment: ast.Block, templates, diags: list[Diagnostic]) -> ast.Block:
    members = []
    for m in experiment.members:
        if isinstance(m, ast.Block) and m.name is not None and m.kind.value in TEMPLATE_KINDS:
            template = templates.get((m.kind.value, m.name.value))
            if template is not None:
                m = _merge(template, m)
            elif m.kind.value in ("cluster", "parallel"):
                names = [n for k, n in templates if k == m.kind.value]
                diags.append(Diagnostic("E040", f"no `{m.kind.value}` template named `{m.name.value}`",
                                        m.name.span, hint=did_you_mean(m.name.value, names) or
                                        "declare it at top level (here or in an imported file)"))
        members.append(m)
    declared = {m.name.value for m in members if isinstance(m, ast.Block) and m.kind.value == "data" and m.name}
    for name in _referenced_data(members):
        template = templates.get(("data", name))
        if name not in declared and template is not None:
            members.append(template)
            declared.add(name)
    return dataclasses.replace(experiment, members=tuple(members))


def _referenced_data(members) -> list[str]:
    names = []
    for m in members:
        if isinstance(m, ast.Block) and m.kind.value == "stage":
            for f in m.fields:
                if f.key.value == "data" and isinstance(f.value, ast.ListValue):
                    names += [i.value for i in f.value.items if isinstance(i, ast.Name)]
    return names


# ------------------------------------------------------------------------------------------ lowering


class _Lowering:
    def __init__(self, checked: Checked, templates, program: Program, diags: list[Diagnostic]):
        self.exp = checked
        self.templates = templates
        self.program = program
        self.diags = diags
        self.model_dtype: str | None = None  # the dtype of the model's `init = hf(...)` checkpoint
        self.spans: dict[str, Span] = {"experiment": checked.head}

    def _record(self, prefix: str, block: Checked) -> None:
        self.spans[prefix] = block.head
        for key, span in block.spans.items():
            self.spans[f"{prefix}.{key}"] = span
            value = block.values.get(key)
            if isinstance(value, CallValue):
                for arg, arg_span in value.spans.items():
                    self.spans[f"{prefix}.{key}.{arg}"] = arg_span

    def _require(self, kind: str) -> Checked | None:
        block = self.exp.sub(kind)
        if block is None:
            example = {"cluster": "cluster { gpu = H100  nodes = 1 }", "model": "model llama3_8b { }"}[kind]
            self.diags.append(Diagnostic("E025", f"experiment `{self.exp.name}` has no `{kind}` block",
                                         self.exp.head, hint=f"add e.g. `{example}`"))
        return block

    def spec(self) -> ExperimentSpec | None:
        cluster = self._cluster(self._require("cluster"))
        model = self._model(self._require("model"))
        parallel = self._parallel(self.exp.sub("parallel"), ParallelSpec(), "parallel")
        if "parallel" not in self.spans:
            self.spans["parallel"] = self.exp.head
        data = tuple(self._data(b) for b in self.exp.blocks if b.kind == "data" and b.name)
        declared = {b.name for b in self.exp.blocks if b.kind == "data" and b.name}  # invalid ones too
        self.data_specs = {d.name: d for d in data if d is not None}
        self.model_init = model.init if model is not None else None
        stages = self._stages(parallel, declared)
        self._unused_data(data, stages)
        for key in EXPERIMENT_KEYS:
            if key in self.exp.spans:
                self.spans[key] = self.exp.spans[key]
        if has_errors(self.diags) or cluster is None or model is None:
            return None
        values = {k: v for k, v in self.exp.values.items() if k in EXPERIMENT_KEYS}
        return ExperimentSpec(
            name=self.exp.name or "experiment", model=model, cluster=cluster, parallel=parallel,
            data=tuple(d for d in data if d), stages=stages, root=self.program.root_dir,
            tracking=self._tracking(self.exp.sub("tracking")), spans=MappingProxyType(dict(self.spans)), **values)

    # -- cluster

    def _cluster(self, block: Checked | None) -> ClusterSpec | None:
        if block is None:
            return None
        self._record("cluster", block)
        missing_required(block, BLOCKS["cluster"].fields, self.diags, "cluster")
        values = dict(block.values)
        gpu = values.get("gpu")
        hw = get_gpu(gpu) if gpu is not None else None
        if gpu is not None and hw is None:
            self.diags.append(Diagnostic("E043", f"unknown accelerator `{gpu}`", block.spans["gpu"],
                                         hint=did_you_mean(gpu, GPUS) or "known: " + ", ".join(GPUS)))
        if hw is None:
            return None
        values["gpu"] = hw.id
        scheduler = values.pop("scheduler", None)
        if scheduler is not None:
            values["scheduler"] = scheduler.func
            values["scheduler_options"] = options = SchedulerOptions.of(scheduler.func, scheduler.args)
            for arg, message, hint in option_problems(options):
                self.diags.append(Diagnostic("E047", message, self.spans.get(f"cluster.scheduler.{arg}",
                                                                             block.spans["scheduler"]), hint=hint))
        return ClusterSpec(**values)

    # -- model

    def _model(self, block: Checked | None) -> ModelSpec | None:
        if block is None:
            return None
        self._record("model", block)
        name = block.name or "model"
        overrides = dict(block.values)
        init = self._hf_init(overrides.pop("init", None), block.spans.get("init"))
        if "init" in block.written and init is None:
            return None  # reported
        preset = get_preset(name) if ("model", name) not in self.templates else None
        if init is not None:
            return self._model_from_hf(block, name, preset, overrides, init)
        if preset is not None:
            return dataclasses.replace(preset, **overrides)
        missing = [f.name for f in MODEL_FIELDS if f.required and f.name not in block.written]
        if missing:
            self._unknown_model(block, name, missing)
            return None
        if any(f.required and f.name not in overrides for f in MODEL_FIELDS):
            return None  # written but invalid: already reported
        defaults = {f.name: f.default for f in MODEL_FIELDS if f.default is not None and f.name not in overrides}
        values = {**defaults, **overrides}
        values.setdefault("query_groups", values["heads"])
        return ModelSpec(name=name, **values)

    def _hf_init(self, value: CallValue | None, span: Span | None) -> tuple[str, HfArchitecture] | None:
        """`hf("DIR")` -> (absolute directory, its architecture), or E045 at the `init` line."""
        if value is None or span is None:
            return None
        from nemoc.compiler import hfconfig

        raw = str(value.args.get("path", ""))
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = Path(span.path).resolve().parent / path
        try:
            arch = hfconfig.load_architecture(path)
            problem = _outside_schema(arch.fields)
            if problem:
                raise hfconfig.HfConfigError(problem)
            # relative to the experiment's root (as data paths are), so plans and graphs do not depend on
            # where the project is checked out; absolute when the directory lies outside it
            root = Path(self.program.root_dir).resolve()
            resolved = path.resolve()
            return (str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)), arch
        except hfconfig.HfConfigError as exc:
            self.diags.append(Diagnostic("E045", f"init = hf({raw!r}): {exc}", value.spans.get("path", span),
                                         hint="a Hugging Face checkpoint directory: config.json, *.safetensors, "
                                              "tokenizer files (docs/huggingface.md)"))
            return None

    def _model_from_hf(self, block: Checked, name: str, preset: ModelSpec | None, overrides: dict,
                       init: tuple[str, HfArchitecture]) -> ModelSpec | None:
        """The architecture of config.json; a preset's or written field that disagrees is E046 at its line."""
        from nemoc.compiler import hfconfig

        path, arch = init
        self.model_dtype = arch.dtype
        fields = dict(arch.fields)
        given = {**({f.name: getattr(preset, f.name) for f in MODEL_FIELDS if f.name != "init"} if preset else {}),
                 **overrides}
        bad = hfconfig.mismatches(arch, {k: v for k, v in given.items() if v is not None})
        for field_name, ours, theirs in bad:
            where = block.spans.get(field_name, block.head)
            origin = "written" if field_name in overrides else f"preset `{name}`"
            self.diags.append(Diagnostic("E046", f"model.{field_name} = {ours} ({origin}) but {path}/config.json "
                                         f"says {theirs}", where,
                                         hint=f"remove `{field_name}` (the checkpoint decides it) or fix it"))
        if bad:
            return None
        available = self._hf_mtp_depths(path, arch)
        if preset is not None:  # equal to config.json where it matters (checked above)
            model = dataclasses.replace(preset, init=path, **overrides)
        else:
            values = {"mtp_num_layers": available, **fields, **overrides}
            if values.get("kv_channels") is None:
                values.pop("kv_channels", None)
            model = ModelSpec(name=name, init=path, **values)
        if model.mtp_num_layers > available:
            origin = "written" if "mtp_num_layers" in overrides else f"preset `{name}`"
            self.diags.append(Diagnostic(
                "E204", f"model.mtp_num_layers = {model.mtp_num_layers} ({origin}) but {path} holds "
                f"{available} multi-token prediction layer{'s' if available != 1 else ''}",
                block.spans.get("mtp_num_layers", block.head),
                equation=f"mtp_num_layers({model.mtp_num_layers}) > the checkpoint's MTP weights({available}): "
                         "num_nextn_predict_layers with model.layers.{num_hidden_layers + i}.eh_proj.weight present "
                         "(transformers saves none)",
                hint=f"write mtp_num_layers = {available} (train from the checkpoint with the MTP layers it has)"))
            return None
        return model

    def _hf_mtp_depths(self, path: str, arch) -> int:
        """The MTP depths the checkpoint at `path` (relative to the root, or absolute) holds (hfimport.mtp_depths_in)."""
        from nemoc.compiler import hfconfig
        from nemoc.compiler.hfimport import mtp_depths_in

        directory = Path(self.program.root_dir).resolve() / path
        try:
            config = hfconfig.read_config(directory)
        except hfconfig.HfConfigError:
            return 0
        return mtp_depths_in(str(directory), config, arch.family, int(arch.fields["layers"]))

    def _unknown_model(self, block: Checked, name: str, missing: list[str]) -> None:
        close = suggest(name, PRESETS)
        if close or not block.written:
            families = sorted({p.split("_")[0] for p in PRESETS})
            hint = (f"did you mean `{close}`?" if close else
                    "presets: " + ", ".join(f"{f}_*" for f in families) + " (see docs/language.md)")
            self.diags.append(Diagnostic("E042", f"unknown model preset `{name}`", block.head, hint=hint,
                                         notes=(Note("a model that is not a preset must set " +
                                                     ", ".join(f"`{m}`" for m in missing)),)))
            return
        self.diags.append(Diagnostic("E044", f"model `{name}` is not a preset, so it must set "
                                     + ", ".join(f"`{m}`" for m in missing), block.head,
                                     hint="spell out the architecture, or name a preset such as `llama3_8b`"))

    # -- parallel

    def _parallel(self, block: Checked | None, base: ParallelSpec, prefix: str) -> ParallelSpec:
        if block is None:
            return base
        self._record(prefix, block)
        return dataclasses.replace(base, **block.values)

    # -- data

    def _data(self, block: Checked) -> DataSpec | None:
        prefix = f"data.{block.name}"
        self._record(prefix, block)
        missing_required(block, BLOCKS["data"].fields, self.diags, f"data {block.name}")
        values = dict(block.values)
        if "path" not in values:
            return None
        options = {k: values.pop(k) for k in DATA_OPTIONS if k in values}
        if "split" in values:
            self._check_split(values["split"], block.spans["split"])
        columns = self._columns(values.pop("columns", ()), block.spans.get("columns"))
        if columns is None:
            return None
        data = DataSpec(name=block.name, options=MappingProxyType(options), columns=columns, **values)
        self._check_hf_dataset(data, block)
        return data

    def _columns(self, entries: tuple[str, ...], span: Span | None) -> tuple[tuple[str, str], ...] | None:
        """`["source:target", ...]` -> pairs, or E048 at the `columns` line."""
        pairs = []
        for entry in entries:
            source, sep, target = str(entry).partition(":")
            if not sep or not source.strip() or not target.strip():
                self.diags.append(Diagnostic("E048", f"columns entry {entry!r} is not `source:target`", span,
                                             hint='e.g. columns = ["instruction:prompt", "output:response"]'))
                return None
            pairs.append((source.strip(), target.strip()))
        return tuple(pairs)

    def _check_hf_dataset(self, data: DataSpec, block: Checked) -> None:
        """A local Hugging Face dataset that exists: its split and the columns its format reads, at the
        user's line (E048). A path that does not exist yet is the prepare task's to report."""
        path = Path(data.path).expanduser()
        if not path.is_absolute():
            path = Path(self.program.root_dir) / path
        if not (hfdata.is_hf_dataset(path) or data.hf_split or data.columns) or not path.exists():
            return
        where = block.spans.get("hf_split") or block.spans.get("path") or block.head
        try:
            files = hfdata.split_files(path, data.hf_split)
            names = hfdata.columns_of(files)
        except hfdata.SchemaUnreadable as exc:  # the split exists; its columns are checked where pyarrow is
            self.diags.append(Diagnostic(
                "W003", f"data {data.name}: columns not checked: {exc}", block.spans.get("path") or where,
                severity=Severity.WARNING,
                hint="pip install 'nemoc[train]' (or pyarrow) to check them here; `nemoc run` reads them either way"))
            return
        except hfdata.HfDataError as exc:
            self.diags.append(Diagnostic("E048", str(exc), where, hint="hf_split names one of the dataset's splits"))
            return
        renames = dict(data.columns)
        unknown = [s for s in renames if s not in names]
        if unknown:
            self.diags.append(Diagnostic("E048", f"data {data.name}: no column {unknown[0]!r} to rename (columns: "
                                         f"{', '.join(names)})", block.spans.get("columns", where)))
            return
        missing = hfdata.missing_columns(names, data.format, renames, data.text_field)
        if missing:
            self.diags.append(Diagnostic(
                "E048", f"data {data.name} (format {data.format}) needs column{'s' * (len(missing) > 1)} "
                f"{', '.join(missing)}; the dataset has {', '.join(names) or 'no columns'}",
                block.spans.get("columns") or block.spans.get("format") or where,
                hint='map a column onto it: columns = ["SOURCE:' + missing[0] + '"]'))

    def _check_split(self, split: tuple[float, ...], span: Span) -> None:
        total = sum(split)
        if abs(total - 1.0) > 1e-9:
            shown = " + ".join(f"{s:g}" for s in split)
            self.diags.append(Diagnostic("E032", "the train / validation / test split must sum to 1", span,
                                         equation=f"{shown} = {total:g} != 1"))

    def _unused_data(self, data, stages) -> None:
        used = {name for s in stages for name in s.data}
        for d in data:
            if d is not None and d.name not in used and stages:
                self.diags.append(Diagnostic("W001", f"data set `{d.name}` is not used by any stage",
                                             self.spans[f"data.{d.name}"], severity=Severity.WARNING))

    # -- stages

    def _stages(self, parallel: ParallelSpec, data_names: set[str]) -> tuple[StageSpec, ...]:
        blocks = [b for b in self.exp.blocks if b.kind == "stage" and b.name]
        names = {b.name for b in blocks}
        stages = []
        for b in blocks:
            stage = self._stage(b, parallel, data_names, names)
            if stage is not None:
                stages.append(stage)
        self._after_cycles(blocks)
        self._check_ppo(blocks)
        if not blocks:
            self.diags.append(Diagnostic("E025", f"experiment `{self.exp.name}` has no `stage`", self.exp.head,
                                         hint="add e.g. `stage pretrain { data = [web]  steps = 1000 }`"))
        return tuple(stages)

    def _stage(self, b: Checked, parallel: ParallelSpec, data_names: set[str], names: set[str]) -> StageSpec | None:
        prefix = f"stage.{b.name}"
        self._record(prefix, b)
        values = dict(b.values)
        kind = values.pop("kind", b.name if b.name in STAGE_KINDS else None)
        if kind is None:
            if "kind" not in b.written:
                self.diags.append(Diagnostic("E025", f"stage `{b.name}` needs a `kind`", b.head,
                                             hint=f"add `kind = ...`, one of {', '.join(STAGE_KINDS)}"))
            return None
        self._check_length(b, kind)
        self._check_refs(values.get("data", ()), data_names, "data set", "data")
        self._check_refs(b.after, names, "stage", "stage")
        stage_init = self._hf_init(values.pop("init", None), b.spans.get("init"))
        written_template = values.get("template")
        params = {p.name: _plain(values.pop(p.name)) for p in STAGE_PARAMS[kind] if p.name in values}
        if any(p.name == "template" for p in STAGE_PARAMS[kind]):
            params["template"] = self._chat_template(b, written_template, values.get("data", ()),
                                                     stage_init[0] if stage_init else None)
        if stage_init is not None:
            params["init"] = stage_init[0]
        if kind == "export" and "dtype" not in params and not b.after:
            # an export-only experiment (HF -> Megatron-Core -> HF) keeps the checkpoint's own dtype
            source = stage_init[1].dtype if stage_init is not None else self.model_dtype
            if source in EXPORT_DTYPES:
                params["dtype"] = source
        elif kind == "export" and "dtype" not in params:
            # after training: the dtype the trained weights are held in (fp8 recipes keep 16-bit weights)
            precision = self.exp.values.get("precision", _DEFAULT_PRECISION)
            params["dtype"] = TRAINED_WEIGHT_DTYPE.get(str(precision), "float32")
        fields = dict(values)
        fields["data"] = tuple(r.name for r in values.get("data", ()))
        if "optimizer" in values:
            fields["optimizer"] = OptimizerSpec(name=values["optimizer"].func, **values["optimizer"].args)
        if "schedule" in values:
            fields["schedule"] = ScheduleSpec(name=values["schedule"].func, **values["schedule"].args)
        if "peft" in values:
            peft = values["peft"]
            fields["peft"] = LoraSpec(**peft.args) if peft.func == "lora" else None
            if fields["peft"] is not None:
                self._check_lora_targets(fields["peft"], b.spans.get("peft", b.head))
        fields["checkpoint"] = self._checkpoint(b.sub("checkpoint"), prefix)
        stage_parallel = b.sub("parallel")
        if stage_parallel is not None:
            fields["parallel"] = self._parallel(stage_parallel, parallel, f"{prefix}.parallel")
        return StageSpec(name=b.name, kind=kind, after=tuple(r.name for r in b.after),
                         params=StageParams.of(kind, params), **fields)

    def _chat_template(self, b: Checked, written: CallValue | None, data_refs, init: str | None) -> dict:
        """The stage's chat template with its `name` decided (compiler/chattemplate.py), or E049 at the
        `template` line (the stage's line when the default needs a template the tokenizer lacks)."""
        specs = [self.data_specs[r.name] for r in data_refs if r.name in self.data_specs]
        tokenizer = next((d.tokenizer for d in specs if d.tokenizer), None)
        if tokenizer is None:
            tokenizer = init or getattr(self, "model_init", None)
        on_disk = None
        if tokenizer and not str(tokenizer).startswith("tiktoken:"):
            on_disk = Path(str(tokenizer)).expanduser()
            if not on_disk.is_absolute():
                on_disk = Path(self.program.root_dir) / on_disk
        args = _plain(written) if written is not None else {a.name: a.default for a in CALLS["template"]}
        resolved, error = chattemplate.resolve(written.args if written is not None else None, args,
                                               tokenizer, on_disk)
        if error:
            self.diags.append(Diagnostic("E049", error, b.spans.get("template", b.head),
                                         hint="name a built-in (template(name = llama3 | chatml | mistral)) or "
                                              "write role markers (template(user = \"...\", assistant = \"...\"))"))
        return resolved

    def _check_length(self, b: Checked, kind: str) -> None:
        """Exactly one of steps / tokens / epochs sizes a training stage."""
        given = [k for k in b.values if k in LENGTH_FIELDS]  # in the order written
        if len(given) > 1:
            first, *others = given
            self.diags.append(Diagnostic(
                "E027", f"stage `{b.name}` sets both " + " and ".join(f"`{k}`" for k in given), b.spans[others[0]],
                notes=(Note(f"`{first}` set here", b.spans[first]),),
                hint="keep one: steps = tokens / (global_batch x seq_length)"))
        elif not given and kind in TRAINING_KINDS and not (set(LENGTH_FIELDS) & b.written):
            self.diags.append(Diagnostic(
                "W002", f"{kind} stage `{b.name}` has no length", b.head, severity=Severity.WARNING,
                hint="set one of `steps`, `tokens` or `epochs`"))

    def _check_ppo(self, blocks: list[Checked]) -> None:
        """A ppo stage runs after a reward stage (reward model and critic) and a policy stage; a grpo stage
        takes its reward from exactly one of a verifier (`reward = ...`) and a reward stage it runs after."""
        kinds = {b.name: b.values.get("kind", b.name if b.name in STAGE_KINDS else None) for b in blocks}
        for b in blocks:
            if kinds[b.name] != "ppo":
                continue
            parents = [kinds.get(r.name) for r in b.after]
            if "reward" not in parents or all(k == "reward" for k in parents):
                self.diags.append(Diagnostic(
                    "E028", f"ppo stage `{b.name}` must run after a `reward` stage and a policy stage", b.head,
                    equation="after kinds: [" + ", ".join(str(k) for k in parents) + "]",
                    hint="write e.g. `stage rl after sft, rm { kind = ppo ... }` with `rm` a reward stage"))
        for b in blocks:
            if kinds[b.name] != "grpo":
                continue
            parents = [kinds.get(r.name) for r in b.after]
            verifier = b.values.get("reward")
            if verifier is None and ("reward" not in parents or all(k == "reward" for k in parents)):
                self.diags.append(Diagnostic(
                    "E029", f"grpo stage `{b.name}` has no reward: neither a verifier nor a `reward` stage it runs after",
                    b.head, equation="reward = none, after kinds: [" + ", ".join(str(k) for k in parents) + "]",
                    hint="name a built-in verifier (`reward = exact_match`, `contains`, `prefix`), or write e.g. "
                         "`stage rl after sft, rm { kind = grpo ... }` with `rm` a reward stage"))
            elif verifier is not None and "reward" in parents:
                self.diags.append(Diagnostic(
                    "E029", f"grpo stage `{b.name}` has two rewards: the verifier `{verifier}` and a `reward` stage "
                    "it runs after", b.spans.get("reward", b.head),
                    equation=f"reward = {verifier}, after kinds: [" + ", ".join(str(k) for k in parents) + "]",
                    hint="keep one: remove `reward = ...` to score with the reward model, or drop the reward stage "
                         "from `after`"))

    def _check_lora_targets(self, peft: LoraSpec, span) -> None:
        """A fused layer gets one adapter (`qkv`, `fc1`) or one per part (`q k v`, `gate up`), not both
        (the runtime refuses the same when it installs the adapters)."""
        for fused, parts in (("qkv", ("q", "k", "v")), ("fc1", ("gate", "up"))):
            both = [t for t in parts if t in peft.targets]
            if fused in peft.targets and both:
                self.diags.append(Diagnostic(
                    "E037", f"LoRA targets `{fused}` and {', '.join(f'`{t}`' for t in both)} adapt the same layer",
                    span, equation=f"targets = [{', '.join(peft.targets)}]",
                    hint=f"keep `{fused}` (one adapter on Megatron's fused layer, as NeMo) or "
                         f"{', '.join(f'`{t}`' for t in parts)} (one adapter each, as peft)"))

    def _checkpoint(self, block: Checked | None, prefix: str) -> CheckpointSpec:
        if block is None:
            return CheckpointSpec()
        self._record(f"{prefix}.checkpoint", block)
        values = dict(block.values)
        if "async" in values:
            values["async_save"] = values.pop("async")
        return CheckpointSpec(**values)

    def _tracking(self, block: Checked | None) -> TrackingSpec:
        if block is None:
            return TrackingSpec()
        self._record("tracking", block)
        return TrackingSpec(**block.values)

    def _check_refs(self, refs, names: set[str], what: str, kind: str) -> None:
        for ref in refs:
            if ref.name not in names:
                declared = ", ".join(f"`{n}`" for n in sorted(names)) or "none"
                self.diags.append(Diagnostic("E040", f"undefined {what} `{ref.name}`", ref.span,
                                             hint=did_you_mean(ref.name, names) or f"declared {kind}s: {declared}"))

    def _after_cycles(self, blocks: list[Checked]) -> None:
        """E041 for every cycle of `after` edges, shown as `a -> b -> a`."""
        after = {b.name: [r for r in b.after] for b in blocks}
        self._declared = [b.name for b in blocks]
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        reported: set[frozenset[str]] = set()

        def visit(start: str) -> None:
            stack = [(start, iter(after.get(start, ())))]
            path = [start]
            state[start] = 1
            while stack:
                node, edges = stack[-1]
                ref = next(edges, None)
                if ref is None:
                    state[node] = 2
                    stack.pop()
                    path.pop()
                    continue
                if ref.name not in after:
                    continue
                if state.get(ref.name) == 1:
                    self._report_cycle(path[path.index(ref.name):], after, reported)
                elif ref.name not in state:
                    state[ref.name] = 1
                    stack.append((ref.name, iter(after[ref.name])))
                    path.append(ref.name)

        for b in blocks:
            if b.name not in state:
                visit(b.name)

    def _report_cycle(self, cycle: list[str], after, reported: set) -> None:
        key = frozenset(cycle)
        if key in reported:
            return
        reported.add(key)
        # `cycle` follows "runs after" edges; show it in execution order: a -> b means b runs after a.
        order = list(reversed(cycle))
        first_declared = min(range(len(order)), key=lambda i: self._declared.index(order[i]))
        order = order[first_declared:] + order[:first_declared]
        edges = []
        for i, name in enumerate(order):
            successor = order[(i + 1) % len(order)]
            ref = next(r for r in after[successor] if r.name == name)
            edges.append((name, successor, ref))
        text = " -> ".join(order + [order[0]])
        first = edges[-1][2]
        notes = tuple(Note(f"`{succ}` runs after `{name}` here", ref.span) for name, succ, ref in edges[:-1])
        self.diags.append(Diagnostic("E041", f"`after` cycle: {text}", first.span, notes=notes,
                                     hint="remove one `after` so the stages form a chain"))


__all__ = ["load_experiment", "compile_file", "lower_program"]


def _outside_schema(fields: dict) -> str | None:
    """The first model field config.json sets outside the range `nemoc check` allows when it is written
    (`layers <= 10,000`, widths >= 1, |x| <= 10**18): config.json bypasses the typechecker, and an absurd
    value would otherwise reach the planner (a layer count of 10**30 made its pipeline search run forever)."""
    from nemoc.dsl.typecheck import MAX_MAGNITUDE

    types = {f.name: f.type for f in MODEL_FIELDS}
    for name, value in fields.items():
        t = types.get(name)
        if t is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low = t.minimum is not None and (value < t.minimum or (t.exclusive_min and value == t.minimum))
        high = (t.maximum is not None and value > t.maximum) or abs(value) > MAX_MAGNITUDE
        if low or high:
            bound = (f"> {t.minimum:g}" if t.exclusive_min else f">= {t.minimum:g}") if low else \
                f"<= {min(t.maximum or MAX_MAGNITUDE, MAX_MAGNITUDE):,}"
            return f"config.json makes model.{name} = {value:g}, but model.{name} must be {bound}"
    return None
