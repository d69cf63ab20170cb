"""A frame's rows as Arrow tables, one per ClickHouse table.

Why Arrow: clickhouse-connect's row/column insert encodes LowCardinality, Map and
Array columns in Python (~85 % of an insert's time for histogram rows). An Arrow
table is built from the frame's numpy columns without a Python step per row
(strings are one ``take`` from the window's string table), and ClickHouse (the
server or chdb) decodes ``FORMAT Arrow`` natively.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from stratoscope.regional.columns import ragged_index
from stratoscope.regional.frame import Frame, Table
from stratoscope.v1 import batch_pb2 as pb

NS = 1_000_000_000
EVENTS_LOST_METRIC = "stratoscope_events_lost"
#: Edge batches merged into a node's block of a window (the fleet dashboard's batches
#: and nodes reporting).
BATCHES_METRIC = "stratoscope_batches"

#: Insert order: stacks and series before the rows that reference them. Arrow table
#: name -> ClickHouse table (each node's events lost and batches are metric rows of their
#: own insert). Point rows carry ``series_id`` and no labels (migration 0006): a series'
#: labels and unit go to ``series`` once, when this sink has not sent it lately.
INSERT_ORDER = ("profile_stacks", "series", "metric_points", "metrics_node_counters", "histogram_points",
                "profile_samples", "events", "nodes")
TARGET = {"metrics_node_counters": "metric_points"}

#: series_id of a label map (keys sorted): fold over its pairs of
#: h = (h XOR md5_64(key)) * P, then h = (h XOR md5_64(value)) * P, from SERIES_SEED,
#: where md5_64 is the first 8 bytes of MD5, little endian. ClickHouse computes the same
#: (migration 0006, ``metrics_ingest``): ``series_id_sql``.
SERIES_SEED = 0x6A09E667F3BCC908
SERIES_P = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


def md5_64(s: str) -> int:
    return int.from_bytes(hashlib.md5(s.encode(), usedforsecurity=False).digest()[:8], "little")


def series_id(labels: Mapping[str, str]) -> int:
    """The series_id of one label map (what the sink computes column-wise)."""
    h = SERIES_SEED
    for k in sorted(labels):
        h = ((h ^ md5_64(k)) * SERIES_P) & _U64
        h = ((h ^ md5_64(labels[k])) * SERIES_P) & _U64
    return h


def series_id_sql(labels: str = "labels") -> str:
    """ClickHouse SQL for series_id() of a Map(String, String) expression."""
    m = f"mapSort({labels})"
    return (f"arrayFold((acc, k, v) -> bitXor(bitXor(acc, reinterpretAsUInt64(MD5(k))) * {SERIES_P},"
            f" reinterpretAsUInt64(MD5(v))) * {SERIES_P}, mapKeys({m}), mapValues({m}), toUInt64({SERIES_SEED}))")


_SERIES_SCHEMA = pa.schema([
    ("metric", pa.string()), ("series_id", pa.uint64()), ("unit", pa.string()),
    ("labels", pa.map_(pa.string(), pa.string())), ("last_seen", pa.uint32()),
])


def stack_id(frames: Sequence[str]) -> int:
    """Stable 64-bit id of a stack: BLAKE2b-64 (little endian) of the frames joined by NUL.

    Never 0 (0 means "no stack" in profile_samples).
    """
    h = hashlib.blake2b("\x00".join(frames).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") or 1


class _FrameStrings:
    """Per-frame Arrow views that every insert of the frame reuses.

    Holds what it needs of the frame (its string list, stacks and window), never the
    frame itself, so that the cache of these views (``frame_strings``) does not keep
    a delivered frame alive.
    """

    def __init__(self, frame: Frame) -> None:
        self.names = frame.strings
        self.stacks = frame.stacks
        self.resolution_s = frame.resolution_s
        self.start_ns = frame.start_ns
        self.strings = pa.array(frame.strings, pa.string())
        fams = frame.families
        self.fam_name = np.array([f.name for f in fams], dtype=np.int64)
        self.fam_unit = np.array([f.unit for f in fams], dtype=np.int64)
        self.fam_gauge = np.array([f.kind == pb.GAUGE for f in fams], dtype=np.int8)
        self.fam_k = np.array([len(f.label_keys) for f in fams], dtype=np.int64)
        width = max([len(f.label_keys) for f in fams] + [1])
        # Label pairs in key order (series_id folds over them in that order, and the
        # series table stores maps sorted). Per family: the keys in string order, and
        # which of the row's values goes to each position.
        self.fam_keys = np.zeros((max(len(fams), 1), width), dtype=np.int64)
        self.fam_perm = np.zeros((max(len(fams), 1), width), dtype=np.int64)
        for i, f in enumerate(fams):
            names = [frame.strings[k] for k in f.label_keys]
            perm = sorted(range(len(names)), key=names.__getitem__)
            self.fam_keys[i, : len(perm)] = [f.label_keys[j] for j in perm]
            self.fam_perm[i, : len(perm)] = perm
        self.part_node = np.array([p.node for p in frame.parts], dtype=np.int64)
        region, cluster = [], []
        for p in frame.parts:
            labels = {frame.strings[k]: v for k, v in p.labels}
            region.append(labels.get("region", 0))
            cluster.append(labels.get("cluster", 0))
        self.part_region = np.array(region, dtype=np.int64)
        self.part_cluster = np.array(cluster, dtype=np.int64)
        self._stack_ids: npt.NDArray[np.uint64] | None = None
        self._str_md5: npt.NDArray[np.uint64] | None = None

    def take(self, ids: npt.NDArray[np.generic]) -> pa.Array:
        return self.strings.take(pa.array(np.asarray(ids, dtype=np.int64)))

    def str_md5(self) -> npt.NDArray[np.uint64]:
        """md5_64() of every string of the frame (once per frame, not per row)."""
        if self._str_md5 is None:
            self._str_md5 = np.array([md5_64(x) for x in self.names], dtype=np.uint64)
        return self._str_md5

    def stack_ids(self) -> npt.NDArray[np.uint64]:
        """stack_id() of every stack of the frame, plus 0 at index -1 (no stack)."""
        if self._stack_ids is None:
            st = self.stacks
            off = st.offsets("frames").tolist()
            frames = st.values("frames", "values").tolist()
            s = self.names
            ids = [stack_id([s[i] for i in frames[a:b]]) for a, b in zip(off, off[1:], strict=False)]
            self._stack_ids = np.array(ids + [0], dtype=np.uint64)
        return self._stack_ids


class _ViewCache:
    """The ``_FrameStrings`` of the last few frames shaped, while those frames live.

    Why: the delivery queue hands a sink a frame's blocks in several calls (it batches
    by count, and retries), and every call shapes some of the frame's parts; the Arrow
    string table, the strings' hashes and the stack ids are built once per frame, not
    once per call. Keyed by the frame's identity and checked through a weak reference:
    an entry of a frame that is gone never answers for another, and is dropped.
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._items: OrderedDict[int, tuple[weakref.ref[Frame], _FrameStrings]] = OrderedDict()
        self._lock = threading.Lock()  # sinks shape in worker threads

    def __call__(self, frame: Frame) -> _FrameStrings:
        key = id(frame)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0]() is frame:
                self._items.move_to_end(key)
                return hit[1]
            for k in [k for k, (ref, _) in self._items.items() if ref() is None]:
                del self._items[k]
        fs = _FrameStrings(frame)  # numpy and Arrow work: outside the lock
        with self._lock:
            self._items[key] = (weakref.ref(frame), fs)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return fs

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for ref, _ in self._items.values() if ref() is not None)


#: The views of recently shaped frames (see ``_ViewCache``).
frame_strings = _ViewCache()


def _encode(fs: _FrameStrings, ids: Mapping[str, npt.NDArray[Any]]) -> dict[str, pa.Array]:
    """String columns (frame string ids) as dictionary arrays over one compact dictionary.

    The dictionary holds just the strings this insert uses (a bitmap over the frame's
    table, no sort), so the Arrow stream carries each distinct string once per column
    instead of once per row, and ClickHouse reads LowCardinality columns directly.
    """
    used = np.zeros(len(fs.names), dtype=bool)
    for v in ids.values():
        used[v] = True
    dict_ids = np.flatnonzero(used)
    remap = np.zeros(len(used), dtype=np.int32)
    remap[dict_ids] = np.arange(len(dict_ids), dtype=np.int32)
    dictionary = fs.take(dict_ids)
    return {k: pa.DictionaryArray.from_arrays(pa.array(remap[v]), dictionary) for k, v in ids.items()}


def _label_ids(fs: _FrameStrings, rows: Table) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64],
                                                       npt.NDArray[Any]]:
    """Map offsets, key ids and value ids of the rows' label sets."""
    off = rows.offsets("labels")
    values = rows.values("labels", "values")
    fam = rows["fam"]
    k = fs.fam_k[fam]
    row_start = np.repeat(off[:-1], k)
    pos = np.arange(len(values), dtype=np.int64) - row_start
    row_fam = np.repeat(fam, k)
    keys = fs.fam_keys[row_fam, pos]
    values = values[row_start - off[0] + fs.fam_perm[row_fam, pos]]
    return (off - off[0]).astype(np.int32), keys, values


def _ident_ids(fs: _FrameStrings, part: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
    return {"region": fs.part_region[part], "cluster": fs.part_cluster[part], "node": fs.part_node[part]}


def _time(fs: _FrameStrings, n: int) -> dict[str, pa.Array]:
    return {"resolution": pa.array(np.full(n, fs.resolution_s, np.uint32)),
            "ts": pa.array(np.full(n, fs.start_ns // NS, np.uint32))}


def _series_ids(fs: _FrameStrings, off: npt.NDArray[np.int32], keys: npt.NDArray[np.int64],
                vals: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """series_id() of every row, column-wise: one step per label position."""
    n = len(off) - 1
    h = np.full(n, SERIES_SEED, dtype=np.uint64)
    if not len(keys):
        return h
    md5 = fs.str_md5()
    kh, vh = md5[keys], md5[vals]
    width = np.diff(off)
    p = np.uint64(SERIES_P)
    for j in range(int(width.max())):
        rows = np.flatnonzero(width > j)
        at = off[rows] + j
        h[rows] = ((h[rows] ^ kh[at]) * p ^ vh[at]) * p  # uint64 arithmetic wraps
    return h


def _distinct_pairs(metric: npt.NDArray[np.int64], sids: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """One row index per distinct (metric, series_id) pair.

    One sort of a 64-bit mix of both (a sort of the pairs themselves, as a structured
    array, took ~2 s for 660k rows); rows that share a mixed key are checked to share
    the pair too, with an exact two-key sort if two pairs ever collide.
    """
    if not len(sids):
        return np.zeros(0, dtype=np.int64)
    key = sids ^ (metric.astype(np.uint64) * np.uint64(SERIES_P))
    order = np.argsort(key)
    ks, ms, ss = key[order], metric[order], sids[order]
    new_run = ks[1:] != ks[:-1]
    if not np.all(new_run | ((ms[1:] == ms[:-1]) & (ss[1:] == ss[:-1]))):
        order = np.lexsort((sids, metric))
        ms, ss = metric[order], sids[order]
        new_run = (ms[1:] != ms[:-1]) | (ss[1:] != ss[:-1])
    return np.asarray(order[np.concatenate(([0], np.flatnonzero(new_run) + 1))], dtype=np.int64)


class _NewSeries:
    """Series of one insert that the sink has not sent lately: rows for ``series``."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, int]] = []  # (metric, series_id)
        self.tables: list[pa.Table] = []


def _points_table(fs: _FrameStrings, rows: Table, fam: npt.NDArray[Any], values: dict[str, pa.Array],
                  known: Mapping[tuple[str, int], float] | None, new: _NewSeries) -> pa.Table:
    """The rows as narrow points (series_id, no labels); unseen series into ``new``."""
    off, keys, vals = _label_ids(fs, rows)
    sids = _series_ids(fs, off, keys, vals)
    metric = fs.fam_name[fam]
    # one row per distinct (metric, series_id) of the insert, minus what was sent lately
    first = _distinct_pairs(metric, sids)
    strings = fs.names
    pairs = zip(first.tolist(), metric[first].tolist(), sids[first].tolist(), strict=True)
    fresh = [(i, (strings[m], sid)) for i, m, sid in pairs if known is None or (strings[m], sid) not in known]
    if fresh:
        pick = np.asarray([i for i, _ in fresh], dtype=np.int64)
        new.keys.extend(key for _, key in fresh)
        s_off, at = ragged_index(off.astype(np.int64), pick)  # their label pairs, found above
        new.tables.append(pa.table({
            "metric": fs.take(metric[pick]),
            "series_id": pa.array(sids[pick]),
            "unit": fs.take(fs.fam_unit[fam[pick]]),
            "labels": pa.MapArray.from_arrays(pa.array(s_off.astype(np.int32)), fs.take(keys[at]),
                                              fs.take(vals[at])),
            "last_seen": pa.array(np.full(len(pick), fs.start_ns // NS, np.uint32)),
        }, schema=_SERIES_SCHEMA))
    enc = _encode(fs, _ident_ids(fs, rows["part"]) | {"metric": metric})
    return pa.table(_time(fs, len(rows)) | enc | {"series_id": pa.array(sids)} | values)


class Shaped(NamedTuple):
    """What one insert of a frame's parts consists of."""

    tables: dict[str, pa.Table]
    #: stack ids and (metric, series_id) keys sent as new (to remember once written)
    new_stacks: list[int]
    new_series: list[tuple[str, int]]


def arrow_tables(
    frame: Frame, parts: Sequence[int], known_stacks: Mapping[int, float] | None = None,
    known_series: Mapping[tuple[str, int], float] | None = None,
) -> Shaped:
    """Arrow tables of ``parts`` (sorted) of a frame, without the stacks and series
    in ``known_*`` (``None``: send all).

    ``metrics_node_counters`` holds each node's lost-event and batch counters, rows of the metric
    points table inserted separately (their metric name is not a frame string).
    """
    fs = frame_strings(frame)
    out: dict[str, pa.Table] = {}
    new = _NewSeries()

    m = frame.metrics.take(frame.rows_of("metrics", parts))
    fam = m["fam"]
    out["metric_points"] = _points_table(fs, m, fam, {
        "kind": pa.DictionaryArray.from_arrays(pa.array(fs.fam_gauge[fam]), pa.array(["counter", "gauge"])),
        "value": pa.array(m["value"]),
        "gauge": pa.array(m["gauge"]),
    }, known_series, new)
    counters = [(i, metric, v) for i in parts
                for metric, v in ((EVENTS_LOST_METRIC, frame.parts[i].events_lost),
                                  (BATCHES_METRIC, frame.parts[i].batches)) if v]
    if counters:
        part = np.array([i for i, _, _ in counters], dtype=np.int64)
        n = len(counters)
        out["metrics_node_counters"] = pa.table(_time(fs, n) | _encode(fs, _ident_ids(fs, part)) | {
            "metric": pa.array([m for _, m, _ in counters]),
            "kind": pa.array(["counter"] * n),
            "series_id": pa.array(np.full(n, SERIES_SEED, np.uint64)),
            "value": pa.array(np.array([v for _, _, v in counters], dtype=np.uint64)),
        })
        for metric in dict.fromkeys(m for _, m, _ in counters):
            if known_series is None or (metric, SERIES_SEED) not in known_series:
                new.keys.append((metric, SERIES_SEED))
                new.tables.append(pa.table({
                    "metric": [metric], "series_id": [SERIES_SEED], "unit": [""], "labels": [[]],
                    "last_seen": [frame.start_ns // NS],
                }, schema=_SERIES_SCHEMA))

    h = frame.histograms.take(frame.rows_of("histograms", parts))
    boff = pa.array((h.offsets("buckets") - h.offsets("buckets")[0]).astype(np.int32))
    out["histogram_points"] = _points_table(fs, h, h["fam"], {
        "scale": pa.array(np.zeros(len(h), np.int8)),
        "count": pa.array(h["count"]),
        "sum": pa.array(h["sum"]),
        "zero_count": pa.array(h["zero"]),
        "bucket_index": pa.ListArray.from_arrays(boff, pa.array(h.values("buckets", "index"))),
        "bucket_count": pa.ListArray.from_arrays(boff, pa.array(h.values("buckets", "count"))),
    }, known_series, new)
    if new.tables:
        out["series"] = pa.concat_tables(new.tables)

    p = frame.profiles.take(frame.rows_of("profiles", parts))
    sids = fs.stack_ids()
    new_stacks: list[int] = []
    if len(p):
        used = np.unique(np.concatenate([p["kstack"], p["ustack"]]))
        used = used[used >= 0]
        ids = sids[used].tolist()
        fresh = [i for i, sid in enumerate(ids) if known_stacks is None or sid not in known_stacks]
        if fresh:
            st = frame.stacks.take(used[fresh])
            off = st.offsets("frames")
            out["profile_stacks"] = pa.table({
                "stack_id": pa.array(np.array([ids[i] for i in fresh], dtype=np.uint64)),
                "frames": pa.ListArray.from_arrays(pa.array(off.astype(np.int32)),
                                                   fs.take(st.values("frames", "values"))),
                "last_seen": pa.array(np.full(len(fresh), int(time.time()), np.uint32)),
            })
            new_stacks = [ids[i] for i in fresh]
        enc = _encode(fs, _ident_ids(fs, p["part"]) | {"profile": p["name"], "comm": p["comm"],
                                                       "cgroup": p["cgroup"]})
        out["profile_samples"] = pa.table(_time(fs, len(p)) | enc | {
            "period_ns": pa.array(p["period"]),
            "pid": pa.array(p["pid"]),
            "kernel_stack_id": pa.array(sids[p["kstack"]]),
            "user_stack_id": pa.array(sids[p["ustack"]]),
            "samples": pa.array(p["samples"]),
        })

    e = frame.events.take(frame.rows_of("events", parts))
    if len(e):
        enc = _encode(fs, _ident_ids(fs, e["part"]) | {"kind": e["kind"], "comm": e["comm"],
                                                       "cgroup": e["cgroup"], "detail": e["detail"]})
        out["events"] = pa.table({
            "ts": pa.array(e["time"].astype(np.int64)).cast(pa.timestamp("ns", tz="UTC")),
            **enc,
            "pid": pa.array(e["pid"]),
            "ppid": pa.array(e["ppid"]),
            "code": pa.array(e["code"]),
        })

    part = np.asarray(parts, dtype=np.int64)
    label_off = np.zeros(len(parts) + 1, dtype=np.int32)
    label_off[1:] = np.cumsum([len(frame.parts[i].labels) for i in parts])
    keys = np.array([k for i in parts for k, _ in frame.parts[i].labels], dtype=np.int64)
    vals = np.array([v for i in parts for _, v in frame.parts[i].labels], dtype=np.int64)
    enc = _encode(fs, _ident_ids(fs, part) | {"_k": keys, "_v": vals})
    out["nodes"] = pa.table({
        "node_labels": pa.MapArray.from_arrays(pa.array(label_off), enc.pop("_k"), enc.pop("_v")),
        **enc,
        "last_seen": pa.array(np.full(len(parts), frame.end_ns // NS, np.uint32)),
    })
    return Shaped({k: v for k, v in out.items() if v.num_rows}, new_stacks, new.keys)
