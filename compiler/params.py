"""Typed records generated from the schema: a stage kind's parameters and a scheduler's options.

Input:  `nemoc.dsl.schema`: `STAGE_KIND_TABLE` (each kind's fields) and `CALLS["slurm" | "k8s" | "local"]`.
Output: one small frozen, slotted dataclass per stage kind (`StageParams.of(kind, values)`) and per
        scheduler (`SchedulerOptions.of(name, values)`), each field with the schema's type and default;
        generated here, so a new stage kind or field is one edit of the schema and nothing else.
Invariants: a record holds every field of its kind, defaults filled from the schema (the one place a
default lives); values are plain immutable data (tuples, `MappingProxyType`), so records are equal
after a JSON round trip; an unknown name is refused loudly: by attribute (AttributeError), by
`record["x"]` and by `record.get("x")` (`UnknownParameter`), so a misspelt read cannot fall back to a
default silently. During the transition to attribute access, `record.get(name, default)` of a name
another stage kind declares (e.g. `dropout` read for an `eval` stage by code shared between kinds)
answers `default`, as the untyped mapping did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import ClassVar

from nemoc.dsl.schema import CALLS, STAGE_KIND_TABLE, FieldDef, Type


class UnknownParameter(KeyError):
    """A read of a name the record's kind does not declare."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])


_ANNOTATIONS = {"int": "int", "float": "float", "bool": "bool", "str": "str", "enum": "str", "ref": "str",
                "id": "str", "list": "tuple", "call": "Mapping[str, object] | str"}


def _annotation(f: FieldDef) -> str:
    """The field's Python type as written in the record (strings: records are never introspected
    for types; `_coerce` below is what gives values their type)."""
    base = _ANNOTATIONS.get(f.type.name, "object")
    return base if f.default is not None or f.required else f"{base} | None"


def _coerce(t: Type, value: object) -> object:
    """A value as the record holds it (what lowering gives, or what a JSON plan read back gives)."""
    if value is None:
        return None
    if t.name == "float" and t.unit != "duration" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # (a duration in whole seconds stays an integer, as the dsl lowers it)
    if t.name == "list" and isinstance(value, (list, tuple)):
        return tuple(_coerce(t.item, v) if t.item is not None else v for v in value)
    if isinstance(value, Mapping):  # a call's arguments (`template(...)`)
        return MappingProxyType({str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    return value


class Record(Mapping):
    """A typed record that also reads as a read-only mapping (`dict(record)`, `record["beta"]`)."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[FieldDef, ...]] = ()
    OWNER: ClassVar[str] = ""  # what the record belongs to, for messages: "stage kind `dpo`"
    SIBLINGS: ClassVar[frozenset[str]] = frozenset()  # names other records of the family declare

    @classmethod
    def build(cls, values: Mapping[str, object] | None = None) -> "Record":
        """The record from `values` (written or read back), every other field at its schema default."""
        values = dict(values or {})
        names = {f.name for f in cls.FIELDS}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UnknownParameter(f"{cls.OWNER} has no parameter {', '.join(f'`{u}`' for u in unknown)} "
                                   f"(its parameters: {', '.join(sorted(names)) or 'none'})")
        return cls(**{f.name: _coerce(f.type, values[f.name]) for f in cls.FIELDS if f.name in values})

    def _refuse(self, name: str) -> UnknownParameter:
        names = ", ".join(f.name for f in self.FIELDS) or "none"
        return UnknownParameter(f"{self.OWNER} has no parameter `{name}` (its parameters: {names})")

    def __getitem__(self, name: str) -> object:
        if name not in self.__dataclass_fields__:  # type: ignore[attr-defined]
            raise self._refuse(name)
        return getattr(self, name)

    def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
        if name in self.__dataclass_fields__:  # type: ignore[attr-defined]
            return getattr(self, name)
        if name in self.SIBLINGS:  # declared by another kind: the caller's default (transition)
            return default
        raise self._refuse(name)

    def __iter__(self) -> Iterator[str]:
        return iter(f.name for f in self.FIELDS)

    def __len__(self) -> int:
        return len(self.FIELDS)

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.FIELDS)
        return f"{type(self).__name__}({inner})"


class StageParams(Record):
    """The kind-specific parameters of one stage (`StageSpec.params`, `StagePlan.params`)."""

    __slots__ = ()
    KIND: ClassVar[str] = ""

    @staticmethod
    def of(kind: str, values: Mapping[str, object] | None = None) -> "StageParams":
        """Stage kind `kind`'s record; `values` may already be one (returned as is when it is of `kind`)."""
        if isinstance(values, StageParams) and values.KIND == kind:
            return values
        if isinstance(values, StageParams):  # another kind's (`dataclasses.replace(stage, kind=...)`): the
            # values it shares with `kind` carry over; one `kind` lacks is refused unless at its default
            defaults = {f.name: f.default for f in values.FIELDS}
            names = {f.name for f in _stage_params_type(kind).FIELDS}
            values = {k: v for k, v in values.items() if k in names or v != defaults[k]}
        return _stage_params_type(kind).build(values)  # type: ignore[return-value]


class SchedulerOptions(Record):
    """The options of the cluster's scheduler (`ClusterSpec.scheduler_options`): `slurm(...)`, `k8s(...)`."""

    __slots__ = ()
    SCHEDULER: ClassVar[str] = ""

    @staticmethod
    def of(scheduler: str, values: Mapping[str, object] | None = None) -> "SchedulerOptions":
        if isinstance(values, SchedulerOptions) and values.SCHEDULER == scheduler:
            return values
        if scheduler not in SCHEDULER_OPTIONS_TYPES:
            raise ValueError(f"unknown scheduler `{scheduler}` (known: {', '.join(SCHEDULER_OPTIONS_TYPES)})")
        return SCHEDULER_OPTIONS_TYPES[scheduler].build(values)  # type: ignore[return-value]


def _record_type(base: type[Record], class_name: str, owner: str, fields: tuple[FieldDef, ...],
                 siblings: frozenset[str], **class_vars: str) -> type[Record]:
    """A frozen, slotted dataclass with one field per schema field, default = the schema's default."""
    spec = [(f.name, _annotation(f), dataclasses.field(default=f.default)) for f in fields]
    cls = dataclasses.make_dataclass(class_name, spec, bases=(base,), frozen=True, slots=True,
                                     namespace={"__module__": __name__})
    cls.FIELDS, cls.OWNER, cls.SIBLINGS = fields, owner, siblings - {f.name for f in fields}
    for name, value in class_vars.items():
        setattr(cls, name, value)
    globals()[class_name] = cls  # importable by name (pickle, multiprocessing)
    return cls


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


class _RecordTypes(Mapping):
    """Name -> record type, each type made on its first use: making one is ~1.5 ms (a dataclass), and
    `nemoc plan` of a pretraining file needs one of the thirteen. Read-only; the class of each is also
    a module attribute once made, and `__getattr__` below makes it on a lookup by class name (pickle)."""

    def __init__(self, makers: dict[str, tuple[str, object]]):
        self._makers = makers  # name -> (class name, () -> the record type)
        self._made: dict[str, type[Record]] = {}

    def __getitem__(self, name: str) -> type[Record]:
        cls = self._made.get(name)
        if cls is None:
            cls = self._made[name] = self._makers[name][1]()  # an unknown name: KeyError
        return cls

    def __contains__(self, name: object) -> bool:
        return name in self._makers

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._makers)})"


def _stage_kind_maker(k):
    return lambda: _record_type(StageParams, f"{_camel(k.name)}Params", f"stage kind `{k.name}`", k.params,
                                _ALL_STAGE_PARAMS, KIND=k.name)


_ALL_STAGE_PARAMS = frozenset(f.name for k in STAGE_KIND_TABLE.values() for f in k.params)
# stage kind -> its record type, e.g. STAGE_PARAMS_TYPES["dpo"] is `DpoParams(beta, loss, ...)`
STAGE_PARAMS_TYPES: Mapping[str, type[Record]] = _RecordTypes({
    k.name: (f"{_camel(k.name)}Params", _stage_kind_maker(k)) for k in STAGE_KIND_TABLE.values()})
_PLUGIN_KINDS: dict[str, type[Record]] = {}


def _stage_params_type(kind: str) -> type[Record]:
    """The record type of `kind`; a kind outside the schema (a task kind registered by a plug-in, which no
    .nemo file can name: the `kind` field is an enum of the schema's) has a record with no parameters."""
    if kind in STAGE_PARAMS_TYPES:
        return STAGE_PARAMS_TYPES[kind]
    if kind not in _PLUGIN_KINDS:
        _PLUGIN_KINDS[kind] = _record_type(StageParams, f"{_camel(kind)}Params", f"stage kind `{kind}` (not in the "
                                           "schema: no parameters)", (), _ALL_STAGE_PARAMS, KIND=kind)
    return _PLUGIN_KINDS[kind]


SCHEDULERS = ("local", "slurm", "k8s")  # the `scheduler` call's functions (dsl/schema.py CLUSTER_FIELDS)


def _scheduler_maker(name: str):
    return lambda: _record_type(SchedulerOptions, f"{_camel(name)}Options", f"scheduler `{name}`", CALLS[name],
                                frozenset(), SCHEDULER=name)


SCHEDULER_OPTIONS_TYPES: Mapping[str, type[Record]] = _RecordTypes({
    name: (f"{_camel(name)}Options", _scheduler_maker(name)) for name in SCHEDULERS})
_BY_CLASS_NAME = {class_name: (types, name) for types in (STAGE_PARAMS_TYPES, SCHEDULER_OPTIONS_TYPES)
                  for name, (class_name, _) in types._makers.items()}


def __getattr__(name: str) -> type[Record]:
    """A record type by its class name (`nemoc.compiler.params.DpoParams`: pickle, multiprocessing),
    made on first use like every record type (`_RecordTypes`)."""
    if name in _BY_CLASS_NAME:
        types, key = _BY_CLASS_NAME[name]
        return types[key]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



class OptionsMismatch(ValueError):
    """A launcher other than the cluster's scheduler, while the cluster sets options of its own."""


def options_for(cluster: object, scheduler: str) -> SchedulerOptions:
    """The compiled options of `scheduler` for `cluster` (a `ClusterSpec`): its own when the cluster names
    that scheduler, else that scheduler's defaults (`nemoc run --launcher slurm` of a `local` cluster).
    Raises `OptionsMismatch` when the cluster's scheduler is another one with options set away from their
    defaults: they were written for that scheduler and would be dropped silently."""
    options = getattr(cluster, "scheduler_options", None)
    if isinstance(options, SchedulerOptions) and options.SCHEDULER == scheduler:
        return options
    if isinstance(options, SchedulerOptions):
        written = [f.name for f in options.FIELDS if getattr(options, f.name) != f.default]
        if written:
            raise OptionsMismatch(f"the cluster's `{options.SCHEDULER}(...)` options ({', '.join(written)}) do not "
                                  f"apply to the {scheduler} launcher: write `scheduler = {scheduler}(...)` in the "
                                  f"cluster block, or launch with --launcher {options.SCHEDULER}")
    return SchedulerOptions.of(scheduler)


__all__ = ["options_for", "OptionsMismatch", "Record", "StageParams", "SchedulerOptions", "UnknownParameter", "STAGE_PARAMS_TYPES",
           "SCHEDULER_OPTIONS_TYPES", "SCHEDULERS"]


def packs_sequences(kind: str, params=None) -> bool:
    """Whether a stage packs several samples into one row (sft's `pack`, default true; `params` None: the
    kind's defaults): its rows are variable-length `thd` sequences, which not every target splits over
    context-parallel ranks."""
    try:
        record = StageParams.of(kind, params)
    except (KeyError, ValueError, TypeError):
        return False
    return bool(getattr(record, "pack", False))
