"""Load one BPF program from its description, check it, attach it, drain it.

Every check fails with a LoadError that names the program, the map and the
field, so a wrong description is caught at start-up instead of producing
garbage. Draining is race-free: each aggregate map exists twice (``<map>_0``,
``<map>_1``); ``flip_ctl[0]`` selects the copy the kernel writes, and user
space only reads and clears the idle copy after in-flight programs are done.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratoscope.edge.bpfsys import supports_raw_tracepoints
from stratoscope.edge.errors import ConfigError, LoadError
from stratoscope.edge.spec import (
    OVERFLOW_SLOTS,
    CountersMap,
    EventsMap,
    FieldSpec,
    HistogramMap,
    MapSpec,
    ProfileMap,
    ProgramSpec,
)

log = logging.getLogger("stratoscope.edge")

FLIP_MAP = "flip_ctl"


@dataclass
class RawMap:
    """Key/value rows read from one map copy, values already summed over CPUs."""

    spec: MapSpec
    rows: list[tuple[Any, Any]]
    #: Rows of the overflow series (``<map>_other``), when the map declares overflow.
    other_rows: list[tuple[Any, Any]] = field(default_factory=list)
    #: Increments the kernel moved to the overflow series in this window.
    overflowed: int = 0
    #: Increments lost in this window because the overflow map was full too.
    overflow_lost: int = 0


@dataclass
class RawDrain:
    program: str
    maps: list[RawMap]
    stacks: dict[str, dict[int, list[int]]] = field(default_factory=dict)


def resolve_params(spec: ProgramSpec, overrides: dict[str, int]) -> dict[str, int]:
    """Defaults from the description with overrides laid over them, range-checked."""
    unknown = sorted(set(overrides) - set(spec.params))
    if unknown:
        known = ", ".join(sorted(spec.params)) or "none"
        raise ConfigError(
            f"program {spec.program!r}: unknown parameter {unknown[0]!r} (known: {known})"
        )
    params = {k: p.default for k, p in spec.params.items()}
    params.update(overrides)
    for name, value in params.items():
        p = spec.params[name]
        if (p.min is not None and value < p.min) or (p.max is not None and value > p.max):
            raise ConfigError(
                f"program {spec.program!r}: parameter {name}={value} outside [{p.min}, {p.max}]"
            )
    return params


def check_requirements(spec: ProgramSpec) -> None:
    """Probe the kernel for the hooks the program needs (features, not versions)."""
    from bcc import BPF

    # Not BPF.support_raw_tracepoint(): it reads kallsyms through BCC, which refuses any
    # euid but 0, so an edge running as its own user with capabilities would fail it.
    if spec.requires.raw_tracepoints and not supports_raw_tracepoints():
        raise LoadError(spec.program, "this kernel does not support raw tracepoints")
    for tp in [*spec.requires.tracepoints, *spec.requires.raw_tracepoints]:
        category, _, event = tp.partition(":")
        if not BPF.tracepoint_exists(category, event):
            raise LoadError(spec.program, f"tracepoint {tp} does not exist on this kernel")


def _key_check(program: str, map_name: str, ctype: Any, fields: list[FieldSpec]) -> None:
    """The compiled key struct must have exactly the described fields, in order."""
    actual = getattr(ctype, "_fields_", None)
    if actual is None:
        if len(fields) != 1 or ct.sizeof(ctype) != fields[0].size:
            raise LoadError(
                program,
                f"map {map_name!r}: key is a scalar of {ct.sizeof(ctype)} bytes, "
                f"description has {len(fields)} field(s)",
            )
        return
    names = [f[0] for f in actual]
    for i, fs in enumerate(fields):
        if i >= len(names):
            raise LoadError(program, f"map {map_name!r}: field {fs.name!r} is not in the key")
        if names[i] != fs.name:
            raise LoadError(
                program,
                f"map {map_name!r}: field {i} is {names[i]!r} in C, {fs.name!r} in the description",
            )
        size = ct.sizeof(actual[i][1])
        if size != fs.size:
            raise LoadError(
                program,
                f"map {map_name!r}: field {fs.name!r} is {size} bytes in C, "
                f"{fs.size} ({fs.type}) in the description",
            )
    if len(names) != len(fields):
        raise LoadError(
            program, f"map {map_name!r}: field {names[len(fields)]!r} is missing from the description"
        )
    described = sum(f.size for f in fields)
    if described != ct.sizeof(ctype):
        raise LoadError(
            program,
            f"map {map_name!r}: key is {ct.sizeof(ctype)} bytes, fields add up to {described} "
            "(declare padding fields)",
        )


def _sum_cpus(value: Any, percpu: bool) -> Any:
    """Fold a per-CPU value array into one value (int or dict of struct fields)."""
    if not percpu:
        if hasattr(value, "_fields_"):
            return {f[0]: getattr(value, f[0]) for f in value._fields_}
        return int(value.value if hasattr(value, "value") else value)
    first = value[0]
    if hasattr(first, "_fields_"):
        names = [f[0] for f in first._fields_]
        return {n: sum(getattr(v, n) for v in value) for n in names}
    return sum(int(v) for v in value)


_FDINFO_RE = re.compile(r"^(run_time_ns|run_cnt):\s+(\d+)$", re.M)

#: Entries read per BPF_MAP_LOOKUP_AND_DELETE_BATCH call. BCC's own
#: items_lookup_and_delete_batch() allocates (and zeroes) buffers for the map's
#: max_entries on every call: tens of MB per drain for maps sized for a busy
#: node, which showed as collector CPU and RSS swings. A fixed window, kept per
#: map, costs what the entries present cost.
DRAIN_BATCH = 4096


class _Drainer:
    """Reads and deletes a map's entries in fixed-size batches, buffers reused."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.percpu = hasattr(table, "sLeaf")
        self.keys = (table.Key * DRAIN_BATCH)()
        self.values = (table.Leaf * DRAIN_BATCH)()
        self.is_struct = hasattr(table.Key, "_fields_")

    def drain(self) -> list[tuple[Any, Any]]:
        from bcc.libbcc import lib

        rows: list[tuple[Any, Any]] = []
        token = ct.c_uint32(0)
        count = ct.c_uint32(0)
        first = True
        key_type = self.table.Key
        while True:
            count.value = DRAIN_BATCH
            res = lib.bpf_lookup_and_delete_batch(
                self.table.map_fd, None if first else ct.byref(token), ct.byref(token),
                ct.byref(self.keys), ct.byref(self.values), ct.byref(count),
            )
            err = ct.get_errno()
            for i in range(count.value):
                key = self.keys[i]
                rows.append((
                    key_type.from_buffer_copy(key) if self.is_struct else key,
                    _sum_cpus(self.values[i], self.percpu),
                ))
            if res != 0:
                if err == errno.ENOENT:
                    return rows
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(err)}")
            first = False


class LoadedProgram:
    """One compiled and attached BPF program plus its description."""

    def __init__(
        self,
        spec: ProgramSpec,
        bpf_dir: Path,
        overrides: dict[str, int] | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.program
        self._overrides = dict(overrides or {})
        self.params = resolve_params(spec, self._overrides)
        #: Why the program runs its fallback build (None: its own build loaded).
        self.fallback_reason: str | None = None
        self.maps = spec.active_maps(self.params)
        self._bpf: Any = None
        self._active = 0
        self._bpf_dir = bpf_dir
        self._event_sink: Callable[[str, bytes], None] | None = None
        self._drainers: dict[str, _Drainer] = {}

    # -- lifecycle -------------------------------------------------------
    def load(self, on_event: Callable[[str, bytes], None] | None = None) -> None:
        """Compile, attach and check; raises LoadError naming what failed."""
        from bcc import PerfSWConfig, PerfType

        check_requirements(self.spec)
        try:
            self._bpf = self._compile(self.params)
        except Exception as exc:  # BCC raises bare Exception for compile/attach errors
            fb = self.spec.fallback
            # Only when no one asked for what the fallback changes: a setting the
            # user chose is never silently replaced.
            if fb is None or set(fb.params) & set(self._overrides):
                raise LoadError(self.name, f"failed to compile or attach: {exc}") from None
            params = resolve_params(self.spec, {**self._overrides, **fb.params})
            try:
                self._bpf = self._compile(params)
            except Exception as exc2:
                raise LoadError(self.name, f"failed to compile or attach: {exc}; and with "
                                f"the fallback {fb.params}: {exc2}") from None
            self.params, self.maps = params, self.spec.active_maps(params)
            self.fallback_reason = f"{fb.needs} unavailable ({str(exc).splitlines()[0][:200]})"
            log.warning("program %s: %s; running its fallback build %s", self.name,
                        self.fallback_reason, fb.params)
        try:
            self._check_maps()
            for pe in self.spec.perf_events:
                self._bpf.attach_perf_event(
                    ev_type=PerfType.SOFTWARE,
                    ev_config=PerfSWConfig.CPU_CLOCK,
                    fn_name=pe.fn.encode(),
                    sample_freq=self.params[pe.frequency_param],
                )
            self._event_sink = on_event
            for m in self.maps:
                if isinstance(m, EventsMap):
                    self._bpf[m.name.encode()].open_ring_buffer(self._ring_callback(m.name))
        except LoadError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise LoadError(self.name, f"failed to attach: {exc}") from None

    def _compile(self, params: dict[str, int]) -> Any:
        """Compile and attach the program's tracepoints with these parameters (BCC)."""
        from bcc import BPF

        cflags = [f"-I{self._bpf_dir}", "-Wno-macro-redefined"]
        cflags += [f"-D{k}={v}" for k, v in sorted(params.items())]
        src = str(self._bpf_dir / self.spec.source).encode()
        with _quiet_stderr():
            return BPF(src_file=src, cflags=cflags)

    def close(self) -> None:
        """Detach and free; safe to call twice or without load()."""
        bpf, self._bpf = self._bpf, None
        if bpf is not None:
            with contextlib.suppress(Exception):
                bpf.cleanup()

    # -- checks ----------------------------------------------------------
    def _table(self, name: str) -> Any:
        try:
            return self._bpf[name.encode()]
        except KeyError:
            raise LoadError(self.name, f"map {name!r} is described but not defined in C") from None

    def _check_maps(self) -> None:
        if any(not isinstance(m, EventsMap) for m in self.maps):
            self._table(FLIP_MAP)
        for m in self.maps:
            if isinstance(m, EventsMap):
                self._table(m.name)
                if m.lost_map:
                    self._table(m.lost_map)
                continue
            overflow = isinstance(m, CountersMap | HistogramMap | ProfileMap) and m.overflow
            names = [m.name, f"{m.name}_other"] if overflow else [m.name]
            for base, copy in [(b, c) for b in names for c in (0, 1)]:
                table = self._table(f"{base}_{copy}")
                _key_check(self.name, f"{base}_{copy}", table.Key, m.key)
                leaf = getattr(table, "sLeaf", table.Leaf)
                if isinstance(m, CountersMap):
                    self._check_values(m, leaf)
                elif isinstance(m, HistogramMap):
                    names = [f[0] for f in getattr(leaf, "_fields_", [])]
                    if names != ["count", "sum"]:
                        raise LoadError(
                            self.name,
                            f"map {m.name!r}: histogram value must be struct strato_hist_val",
                        )
            if overflow:
                for copy in (0, 1):
                    name = f"{m.name}_overflow_{copy}"
                    table = self._table(name)
                    if not hasattr(table, "sLeaf") or len(table) != OVERFLOW_SLOTS:
                        raise LoadError(
                            self.name,
                            f"map {name!r} must be a per-CPU array of {OVERFLOW_SLOTS} u64",
                        )
            if isinstance(m, ProfileMap):
                for copy in (0, 1):
                    self._table(f"{m.stack_map}_{copy}")

    def _check_values(self, m: CountersMap, leaf: Any) -> None:
        fields = [f[0] for f in getattr(leaf, "_fields_", [])]
        for v in m.values:
            if v.field is None:
                if fields:
                    raise LoadError(
                        self.name, f"map {m.name!r}: value is a struct; name a 'field' per value"
                    )
            elif v.field not in fields:
                raise LoadError(
                    self.name, f"map {m.name!r}: value field {v.field!r} not in the C value struct"
                )

    # -- draining ----------------------------------------------------------
    def flip(self) -> None:
        """Point the kernel at the other copy of every aggregate map."""
        if not any(not isinstance(m, EventsMap) for m in self.maps):
            return
        self._active ^= 1
        ctl = self._bpf[FLIP_MAP.encode()]
        ctl[ct.c_int(0)] = ct.c_uint(self._active)

    def read_idle(self) -> RawDrain:
        """Read and clear the copy the kernel stopped writing at the last flip()."""
        idle = self._active ^ 1
        out = RawDrain(program=self.name, maps=[])
        for m in self.maps:
            if isinstance(m, EventsMap):
                continue
            raw = RawMap(spec=m, rows=self._drain(f"{m.name}_{idle}"))
            if isinstance(m, CountersMap | HistogramMap | ProfileMap) and m.overflow:
                raw.other_rows = self._drain(f"{m.name}_other_{idle}")
                # The idle copy is quiescent after the flip, so read-then-zero loses nothing.
                counts = self._bpf[f"{m.name}_overflow_{idle}".encode()]
                per_slot = [sum(int(x) for x in counts[ct.c_int(i)]) for i in range(OVERFLOW_SLOTS)]
                for i in range(OVERFLOW_SLOTS):
                    counts[ct.c_int(i)] = counts.Leaf(*([0] * counts.total_cpu))
                raw.overflowed, raw.overflow_lost = per_slot[0], per_slot[1]
            out.maps.append(raw)
            if isinstance(m, ProfileMap):
                out.stacks[m.name] = self._read_stacks(f"{m.stack_map}_{idle}")
        return out

    def _drain(self, name: str) -> list[tuple[Any, Any]]:
        """Read and delete every entry of one map copy, values summed over CPUs."""
        drainer = self._drainers.get(name)
        if drainer is None:
            drainer = self._drainers[name] = _Drainer(self._bpf[name.encode()])
        return drainer.drain()

    def _read_stacks(self, name: str) -> dict[int, list[int]]:
        """Read one stack table copy and empty it.

        Each entry is deleted here: BCC's ``StackTrace.clear()`` does nothing, and a table
        never emptied fills up until ``bpf_get_stackid`` refuses every new stack whose
        bucket holds an old one (EEXIST), so samples lose their stacks over the edge's life.
        """
        table = self._bpf[name.encode()]
        stacks: dict[int, list[int]] = {}
        keys = []
        for k, v in table.items():
            stacks[k.value] = [a for a in v.ip if a]
            keys.append(k)
        for k in keys:  # after the walk: deleting during it would skip keys
            with contextlib.suppress(KeyError):
                del table[k]
        return stacks

    def lost_events(self) -> int:
        """Events dropped in the kernel since the last call (rate limit or full ring)."""
        total = 0
        for m in self.maps:
            if isinstance(m, EventsMap) and m.lost_map:
                table = self._bpf[m.lost_map.encode()]
                for k, v in table.items():
                    total += sum(int(x) for x in v)
                    table[k] = table.Leaf(*([0] * len(v)))
        return total

    @property
    def has_events(self) -> bool:
        return any(isinstance(m, EventsMap) for m in self.maps)

    def poll_events(self, timeout_ms: int) -> None:
        """Deliver ring-buffer events to the sink, waiting up to timeout_ms."""
        if self.has_events:
            self._bpf.ring_buffer_poll(timeout_ms)

    def consume_events(self) -> None:
        """Deliver whatever is in the ring buffers now, without waiting."""
        if self.has_events:
            self._bpf.ring_buffer_consume()

    def _ring_callback(self, map_name: str) -> Callable[[Any, Any, int], int]:
        def callback(_ctx: Any, data: Any, size: int) -> int:
            if self._event_sink is not None:
                self._event_sink(map_name, ct.string_at(data, size))
            return 0

        return callback

    def run_stats(self) -> tuple[int, int]:
        """(run count, run time ns) over the program's functions, from fdinfo.

        The kernel counts only while kernel.bpf_stats_enabled is 1.
        """
        cnt = ns = 0
        if self._bpf is None:
            return 0, 0
        for fn in self._bpf.funcs.values():
            try:
                text = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
            except OSError:
                continue
            for key, val in _FDINFO_RE.findall(text):
                if key == "run_cnt":
                    cnt += int(val)
                else:
                    ns += int(val)
        return cnt, ns


@contextlib.contextmanager
def _quiet_stderr() -> Any:
    """BCC prints compiler warnings for kernel headers to fd 2; keep them for errors only."""
    if os.environ.get("STRATOSCOPE_BCC_VERBOSE"):
        yield
        return
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except Exception:
            os.dup2(saved, 2)
            tmp.seek(0)
            errors = [
                ln for ln in tmp.read().decode(errors="replace").splitlines() if "error" in ln
            ]
            os.write(2, ("\n".join(errors[:20]) + "\n").encode() if errors else b"")
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
