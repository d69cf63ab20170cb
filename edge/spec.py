"""Declarative descriptions of BPF programs (bpf/<name>.yaml).

A description says what each map of a program means: which map holds counters,
histograms, profile samples or events; how each key field decodes; which
metric names and help texts to use. User space is generic over these
descriptions, so adding a signal means adding a C file and a YAML file.

Validation happens here (names, help, types, decoders, bounds) and again at
load time against the compiled program's real map layouts (see program.py).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stratoscope.edge.decoders.registry import Decoder, get_decoder
from stratoscope.edge.errors import SpecError
from stratoscope.resources import bpf_dir

FIELD_TYPES: dict[str, int] = {
    "u8": 1, "s8": 1, "u16": 2, "s16": 2, "u32": 4, "s32": 4, "u64": 8, "s64": 8,
}
_ARRAY = re.compile(r"^(char|u8)\[(\d+)\]$")
_METRIC_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

def field_size(type_name: str) -> int:
    """Size in bytes of a field type such as ``u32`` or ``char[16]``."""
    if type_name in FIELD_TYPES:
        return FIELD_TYPES[type_name]
    m = _ARRAY.match(type_name)
    if m:
        return int(m.group(2))
    raise ValueError(f"unknown field type {type_name!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Strict):
    """One field of a map key or event struct, in declaration order."""

    name: str
    type: str
    decoder: str = "uint"
    padding: bool = False
    #: True for fields whose values are not bounded by the kernel (comm, cgroup,
    #: addresses, ports); the top-N bound folds them into "other".
    unbounded: bool = False
    #: For decoder "enum": value -> label.
    values: dict[int, str] = Field(default_factory=dict)
    #: Label name when it differs from the field name.
    label: str | None = None

    @model_validator(mode="after")
    def _check(self) -> FieldSpec:
        try:
            field_size(self.type)
        except ValueError as exc:
            raise ValueError(f"field {self.name!r}: {exc}") from None
        try:
            get_decoder(self.decoder)
        except KeyError as exc:
            raise ValueError(f"field {self.name!r}: {exc.args[0]}") from None
        if self.decoder == "enum" and not self.values:
            raise ValueError(f"field {self.name!r}: decoder 'enum' needs 'values'")
        return self

    @property
    def size(self) -> int:
        return field_size(self.type)

    @property
    def label_name(self) -> str:
        return self.label or self.name

    @cached_property
    def decoder_def(self) -> Decoder:
        """The registered decoder (looked up once per field, not per decoded row)."""
        return get_decoder(self.decoder)

    @cached_property
    def labels(self) -> tuple[str, ...]:
        """Label names this field produces: none for padding and structural fields,
        else its own and the ones its decoder declares (cgroup adds "container")."""
        if self.padding:
            return ()
        return self.decoder_def.labels(self.label_name)


def label_keys(fields: list[FieldSpec]) -> list[str]:
    """Label names a key produces, in order."""
    return [k for f in fields for k in f.labels]


def unbounded_labels(fields: list[FieldSpec]) -> set[str]:
    """Labels whose values the kernel does not bound (folded by the top-N bound)."""
    return {k for f in fields if f.unbounded for k in f.labels}


#: A cross-node roll-up: the labels it keeps (a subset of the series' labels; the
#: regional sums every node's series over the rest, per window). Declared where the
#: metric is, so a new program brings its roll-ups with it.
RollupLabels = list[str]


def _check_rollup(where: str, rollup: RollupLabels | None, keys: list[str]) -> None:
    if rollup is None:
        return
    unknown = [k for k in rollup if k not in keys]
    if unknown:
        raise ValueError(
            f"{where}: roll-up label {unknown[0]!r} is not a label of the key "
            f"({', '.join(keys) or 'none'})"
        )
    if len(set(rollup)) != len(rollup):
        raise ValueError(f"{where}: roll-up names a label twice")


class ValueSpec(_Strict):
    """A counter carried by a map's value (the whole value, or one struct field)."""

    metric: str
    help: str
    unit: str = ""
    field: str | None = None
    kind: Literal["counter", "gauge"] = "counter"
    #: Labels the regional's roll-up across nodes keeps (none: no roll-up).
    rollup: RollupLabels | None = None
    #: A histogram map of the same program whose samples this counter also counts,
    #: per label set (its bucket dropped): the kernel counts an event either here
    #: or as a sample there, so the hot path updates one map, not two. Ignored
    #: when that map does not exist for the program's parameters.
    plus_samples_of: str | None = None


class ParamSpec(_Strict):
    default: int
    help: str
    min: int | None = None
    max: int | None = None


class _MapBase(_Strict):
    name: str
    #: Compile-time parameter that must be non-zero for this map to exist.
    when: str | None = None


class _AggregateMap(_MapBase):
    #: True when the C program keeps an overflow series for this map: an
    #: increment that finds the map full goes to ``<name>_other_{0,1}`` (same key
    #: and value layout, unbounded fields set to comm "other" / 0) and is counted
    #: in ``<name>_overflow_{0,1}``, a per-CPU u64 array of OVERFLOW_SLOTS entries
    #: (slot 0: increments that went to the other series; slot 1: increments
    #: lost because the other map was full too). The edge reads both with the map
    #: and exports the counts as stratoscope_edge_map_overflow_total{program,map}.
    overflow: bool = False


#: Entries of a ``<map>_overflow_{0,1}`` array: moved to "other", lost.
OVERFLOW_SLOTS = 2


class CountersMap(_AggregateMap):
    kind: Literal["counters"]
    key: list[FieldSpec]
    values: list[ValueSpec]

    @model_validator(mode="after")
    def _check(self) -> CountersMap:
        if len(self.values) > 1 and any(v.field is None for v in self.values):
            raise ValueError(f"map {self.name!r}: several values need a 'field' each")
        for v in self.values:
            if v.rollup is not None and v.kind == "gauge":
                raise ValueError(f"metric {v.metric!r}: a gauge cannot be summed across nodes")
            _check_rollup(f"metric {v.metric!r}", v.rollup, label_keys(self.key))
        return self


class HistogramMap(_AggregateMap):
    kind: Literal["histogram"]
    metric: str
    help: str
    unit: str = ""
    key: list[FieldSpec]
    #: Labels the regional's roll-up across nodes keeps (none: no roll-up).
    rollup: RollupLabels | None = None

    @model_validator(mode="after")
    def _check(self) -> HistogramMap:
        if [f.decoder for f in self.key].count("bucket") != 1:
            raise ValueError(f"map {self.name!r}: a histogram key needs exactly one 'bucket' field")
        _check_rollup(f"metric {self.metric!r}", self.rollup, label_keys(self.key))
        return self


class ProfileMap(_AggregateMap):
    kind: Literal["profile"]
    metric: str
    help: str
    stack_map: str
    key: list[FieldSpec]


#: Field names an event struct may use; each maps onto a column of EventBlock.
EVENT_FIELDS = frozenset({"time_ns", "kind", "pid", "ppid", "comm", "cgroup", "detail", "code"})


class EventsMap(_MapBase):
    """A ring buffer of rare events; counts of the same events live in a counters map."""

    kind: Literal["events"]
    help: str
    fields: list[FieldSpec]
    #: Per-CPU array counting events dropped in the kernel (rate limit, full buffer).
    lost_map: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EventsMap:
        for f in self.fields:
            if not f.padding and f.label_name not in EVENT_FIELDS:
                raise ValueError(
                    f"events {self.name!r}: field {f.name!r} is not one of "
                    f"{', '.join(sorted(EVENT_FIELDS))}"
                )
        return self


MapSpec = Annotated[CountersMap | HistogramMap | ProfileMap | EventsMap, Field(discriminator="kind")]


class PerfEventSpec(_Strict):
    fn: str
    type: Literal["software"] = "software"
    config: Literal["cpu_clock"] = "cpu_clock"
    #: Parameter holding the sampling frequency (Hz per CPU).
    frequency_param: str


_TRACEPOINT = re.compile(r"^[a-z0-9_]+:[a-z0-9_]+$")


class Requirements(_Strict):
    """Hooks probed before compiling, as "category:event"."""

    raw_tracepoints: list[str] = Field(default_factory=list)
    tracepoints: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Requirements:
        for tp in [*self.raw_tracepoints, *self.tracepoints]:
            if not _TRACEPOINT.match(tp):
                raise ValueError(f"tracepoint {tp!r} must be written category:event")
        return self


class Fallback(_Strict):
    """Parameters to load the program with when it fails to load with its own: a
    simpler build for kernels without a feature the first one needs."""

    #: What the first build needs that the fallback does without (for the log line).
    needs: str
    params: dict[str, int]


class ProgramSpec(_Strict):
    program: str
    help: str
    source: str
    #: Whether the edge runs this program when its configuration names none.
    default: bool = True
    requires: Requirements = Requirements()
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    maps: list[MapSpec]
    perf_events: list[PerfEventSpec] = Field(default_factory=list)
    fallback: Fallback | None = None

    @model_validator(mode="after")
    def _check(self) -> ProgramSpec:
        if self.fallback is not None:
            unknown = sorted(set(self.fallback.params) - set(self.params))
            if unknown:
                raise ValueError(f"fallback: unknown param {unknown[0]!r}")
        names: set[str] = set()
        for m in self.maps:
            metric_names: list[str] = []
            if isinstance(m, CountersMap):
                metric_names = [v.metric for v in m.values]
            elif isinstance(m, HistogramMap | ProfileMap):
                metric_names = [m.metric]
            for n in metric_names:
                if not _METRIC_NAME.match(n):
                    raise ValueError(f"map {m.name!r}: invalid metric name {n!r}")
                if n in names:
                    raise ValueError(f"map {m.name!r}: metric {n!r} defined twice")
                names.add(n)
            if m.when is not None and m.when not in self.params:
                raise ValueError(f"map {m.name!r}: 'when' names unknown param {m.when!r}")
            if isinstance(m, CountersMap):
                for v in m.values:
                    if v.plus_samples_of is not None:
                        self._check_samples_of(m, v)
        for pe in self.perf_events:
            if pe.frequency_param not in self.params:
                raise ValueError(f"perf event {pe.fn!r}: unknown param {pe.frequency_param!r}")
        return self

    def _check_samples_of(self, m: CountersMap, v: ValueSpec) -> None:
        target = next((h for h in self.maps if h.name == v.plus_samples_of), None)
        if not isinstance(target, HistogramMap):
            raise ValueError(
                f"metric {v.metric!r}: plus_samples_of {v.plus_samples_of!r} is not a "
                "histogram map of this program"
            )
        if label_keys(target.key) != label_keys(m.key):
            raise ValueError(
                f"metric {v.metric!r}: histogram {target.name!r} has labels "
                f"({', '.join(label_keys(target.key))}), the counter "
                f"({', '.join(label_keys(m.key))})"
            )

    def active_maps(self, params: dict[str, int]) -> list[MapSpec]:
        """Maps that exist for these compile-time parameters."""
        return [m for m in self.maps if m.when is None or params.get(m.when, 0)]

    def rollups(self) -> dict[str, list[str]]:
        """Metric -> the labels its cross-node roll-up keeps, for every metric that has one."""
        out: dict[str, list[str]] = {}
        for m in self.maps:
            if isinstance(m, CountersMap):
                out.update({v.metric: v.rollup for v in m.values if v.rollup is not None})
            elif isinstance(m, HistogramMap) and m.rollup is not None:
                out[m.metric] = m.rollup
        return out


def load_spec(path: Path) -> ProgramSpec:
    """Parse and validate one description; errors name the file and the bad key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    try:
        spec = ProgramSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise SpecError(f"{path}: {loc}: {first['msg']}") from None
    if spec.program != path.stem:
        raise SpecError(f"{path}: program {spec.program!r} must match the file name {path.stem!r}")
    if not (path.parent / spec.source).is_file():
        raise SpecError(f"{path}: source {spec.source!r} not found beside it")
    return spec


def default_bpf_dir() -> Path:
    """The programs shipped with the package (bpf/ in the source tree)."""
    return bpf_dir()


def discover(bpf_dir: Path | None = None) -> dict[str, Path]:
    """Program name -> description path, for every bpf/*.yaml."""
    d = bpf_dir or default_bpf_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))}


def default_programs(bpf_dir: Path | None = None) -> list[str]:
    """Programs the edge runs when none are named: those whose description says
    ``default: true`` (the default)."""
    return [name for name, path in discover(bpf_dir).items() if load_spec(path).default]
