"""How long ClickHouse keeps each resolution: settings, applied as table TTLs.

Why settings and not migrations: a retention is a site's choice, not a schema version.
Every key defaults to unset, meaning "leave the table's TTL as it is": a fresh store
gets the migrations' TTLs (:data:`SCHEMA`), and a start whose settings say nothing
never touches a retention a site chose earlier. At start the sink reads each table's
TTL (``system.tables``); for the tables that depend on a key that is set it computes
the wanted TTL (unset keys keep the days the tables hold now), compares both as
formatted by the server (so ``INTERVAL 30 DAY`` against ``toIntervalDay(30)`` is no
change), and issues ``ALTER TABLE ... MODIFY TTL`` only where they differ: applying
twice changes nothing.

A shorter TTL deletes data, so it is refused unless the settings allow it
(``clickhouse.retention_allow_shrink``): a site that once kept 90 days does not lose 55
of them to a start with a forgotten setting. Whether a TTL shortens is asked of the
server: both expressions are evaluated on a probe row (at 60 s and at 1 s resolution).

Derived retentions: a series' label map must outlive every point that refers to it
(``series``: the longest point retention + 1 day), and a stack every sample
(``profile_stacks``: at least ``profiles``, and never less than the 30 days of the
schema). Both are refreshed by the sink while in use (``last_seen``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from stratoscope.regional.sinks.base import PermanentError

__all__ = ["SCHEMA", "Retention", "RetentionShrinkError", "apply_retention", "parse_days",
           "retention_drift", "ttl_expressions"]

log = logging.getLogger(__name__)

_DAYS = re.compile(r"^\s*(\d+)\s*d?\s*$")
MAX_DAYS = 36500
KEYS = ("raw", "raw_fine", "hourly", "profiles", "events")
ALLOW_SETTING = "clickhouse.retention_allow_shrink: true (--clickhouse-retention-allow-shrink)"


def parse_days(value: Any) -> int:
    """``30d``, ``30`` or 30 -> 30 (whole days, 1..36500)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid retention {value!r} (use e.g. 30d)")
    m = _DAYS.match(str(value))
    if not m:
        raise ValueError(f"invalid retention {value!r} (whole days, e.g. 30d)")
    days = int(m.group(1))
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"retention must be 1d..{MAX_DAYS}d, got {value!r}")
    return days


Days = Annotated[int, BeforeValidator(parse_days)]


class Retention(BaseModel):
    """Days kept per resolution (``clickhouse.retention``); unset: the table keeps its TTL."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Points at the regional's resolution, 60 s and coarser (metric_points, histogram_points).
    raw: Days | None = None
    #: Points at resolutions under 60 s (the same tables).
    raw_fine: Days | None = None
    #: Hourly roll-ups (metric_points_1h, histogram_points_1h).
    hourly: Days | None = None
    #: CPU profile samples (profile_samples).
    profiles: Days | None = None
    #: Process events (events).
    events: Days | None = None

    def set_keys(self) -> set[str]:
        """The keys the settings give."""
        return {k for k in KEYS if getattr(self, k) is not None}

    def over(self, base: dict[str, int]) -> dict[str, int]:
        """Every key: this one's where set, else ``base``'s."""
        return {k: getattr(self, k) if getattr(self, k) is not None else base[k] for k in KEYS}


#: The TTLs the migrations create (0002, 0003, 0006).
SCHEMA = Retention(raw=35, raw_fine=7, hourly=400, profiles=14, events=30)
_SCHEMA_DAYS: dict[str, int] = {k: getattr(SCHEMA, k) for k in KEYS}

#: Table -> the keys its TTL is computed from.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "metric_points": ("raw", "raw_fine"),
    "histogram_points": ("raw", "raw_fine"),
    "metric_points_1h": ("hourly",),
    "histogram_points_1h": ("hourly",),
    "series": ("raw", "raw_fine", "hourly"),
    "profile_samples": ("profiles",),
    "profile_stacks": ("profiles",),
    "events": ("events",),
}
#: Key -> (the table its current days are read from, the probe resolution).
_KEY_SOURCE = {"raw": ("metric_points", 60), "raw_fine": ("metric_points", 1),
               "hourly": ("metric_points_1h", 60), "profiles": ("profile_samples", 60),
               "events": ("events", 60)}


def ttl_expressions(r: Retention | dict[str, int]) -> dict[str, str]:
    """Table -> the TTL expression ``r`` asks for (a Retention's unset keys: the schema's)."""
    d = r.over(_SCHEMA_DAYS) if isinstance(r, Retention) else r
    points = f"ts + toIntervalDay(if(resolution < 60, {d['raw_fine']}, {d['raw']}))"
    hourly = f"ts + INTERVAL {d['hourly']} DAY"
    return {
        "metric_points": points,
        "histogram_points": points,
        "metric_points_1h": hourly,
        "histogram_points_1h": hourly,
        "series": f"last_seen + INTERVAL {max(d['raw'], d['raw_fine'], d['hourly']) + 1} DAY",
        "profile_samples": f"ts + INTERVAL {d['profiles']} DAY",
        "profile_stacks": f"last_seen + INTERVAL {max(d['profiles'], 30)} DAY",
        "events": f"toDateTime(ts) + INTERVAL {d['events']} DAY",
    }


class RetentionShrinkError(PermanentError):
    """A retention setting would shorten a table's TTL (delete data) without permission."""


_TTL = re.compile(r"\sTTL\s(.+?)(?:\sSETTINGS\s|$)", re.DOTALL)


def _local(table: str, cluster: str | None) -> str:
    return f"{table}_local" if cluster is not None else table


def _kept_days(client: Any, expression: str, resolution: int) -> float | None:
    """Days a row of ``resolution`` is kept under the TTL ``expression`` (None: the
    server cannot evaluate it, e.g. a hand-written TTL on other columns)."""
    if not expression:
        return None
    try:
        seconds = client.query(
            f"SELECT toInt64(toDateTime({expression})) - toInt64(ts) FROM (SELECT"
            " toDateTime('2020-01-01 00:00:00', 'UTC') AS ts, ts AS last_seen,"
            f" toUInt32({resolution}) AS resolution)").result_rows[0][0]
    except Exception:
        log.debug("TTL %s not evaluated", expression, exc_info=True)
        return None
    return float(seconds) / 86400


def _fmt(days: float | None) -> str:
    if days is None:
        return "an unknown time"
    return f"{days:g} days"


@dataclass(frozen=True)
class _Change:
    table: str
    current: str
    wanted: str
    #: (days kept now, days wanted, resolution) of the probe that shortens; None: longer.
    shrink: tuple[float | None, float, int] | None


def _current_ttls(client: Any, database: str, cluster: str | None) -> dict[str, str]:
    names = {_local(t, cluster): t for t in TABLE_KEYS}
    found = dict(client.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = {db:String}"
        " AND name IN {names:Array(String)}", parameters={"db": database, "names": list(names)}
    ).result_rows)
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"retention: tables {', '.join(missing)} missing from {database} "
                         "(apply the migrations first)")
    out = {}
    for local, table in names.items():
        m = _TTL.search(found[local])
        out[table] = m.group(1).strip() if m else ""
    return out


def _plan(client: Any, database: str, retention: Retention, cluster: str | None) -> list[_Change]:
    """The TTL changes ``retention`` asks for, in table order."""
    given = retention.set_keys()
    if not given:
        return []
    current = _current_ttls(client, database, cluster)
    tables = [t for t, keys in TABLE_KEYS.items() if given & set(keys)]
    needed = {k for t in tables for k in TABLE_KEYS[t]} - given
    now: dict[str, int] = {}
    for key in needed:
        table, resolution = _KEY_SOURCE[key]
        days = _kept_days(client, current[table], resolution)
        if days is None or days != int(days):
            raise PermanentError(
                f"retention of {database}.{table}: cannot read the days of clickhouse.retention."
                f"{key} from its TTL {current[table] or 'none'}; set clickhouse.retention.{key}")
        now[key] = int(days)
    wanted = ttl_expressions(retention.over({**_SCHEMA_DAYS, **now}))
    changes = []
    for table in tables:
        cur, want = current[table], wanted[table]
        same = bool(cur) and client.query(
            "SELECT formatQuery({a:String}) = formatQuery({b:String})",
            parameters={"a": f"ALTER TABLE t MODIFY TTL {cur}",
                        "b": f"ALTER TABLE t MODIFY TTL {want}"}).result_rows[0][0]
        if same:
            continue
        shrink = None
        if cur:
            for resolution in (60, 1):
                before, after = _kept_days(client, cur, resolution), _kept_days(client, want, resolution)
                assert after is not None, want
                if before is None or after < before:
                    shrink = (before, after, resolution)
                    break
        changes.append(_Change(table, cur, want, shrink))
    return changes


def retention_drift(client: Any, database: str, retention: Retention,
                    cluster: str | None = None) -> dict[str, tuple[str, str]]:
    """Table -> (its TTL now, the TTL ``retention`` asks for), for the tables that differ.

    Only tables that depend on a key ``retention`` sets are compared. On a cluster the
    local tables of the node ``client`` is connected to are read.
    """
    return {c.table: (c.current, c.wanted) for c in _plan(client, database, retention, cluster)}


def apply_retention(client: Any, database: str, retention: Retention,
                    cluster: str | None = None, *, allow_shrink: bool = False) -> list[str]:
    """Set the TTL of every table whose TTL differs from ``retention``; return those tables.

    Raises :class:`RetentionShrinkError` before altering anything if a TTL would get
    shorter and ``allow_shrink`` is false. The server then recomputes the TTL of the
    parts already stored (``materialize_ttl_after_modify``, a background mutation), so
    a shorter retention frees space without waiting for new data.
    """
    changes = _plan(client, database, retention, cluster)
    if not allow_shrink:
        for c in changes:
            if c.shrink is not None:
                before, after, resolution = c.shrink
                under = " at resolutions under 60 s" if resolution < 60 else ""
                raise RetentionShrinkError(
                    f"retention of {database}.{c.table}: the settings ask for TTL {c.wanted}"
                    f" ({_fmt(after)}{under}), shorter than its TTL {c.current} ({_fmt(before)}),"
                    f" which deletes data; set {ALLOW_SETTING} to apply it")
    on = f" ON CLUSTER '{cluster}'" if cluster is not None else ""
    for c in changes:
        client.command(f"ALTER TABLE {database}.{_local(c.table, cluster)}{on} MODIFY TTL {c.wanted}")
        if c.shrink is not None:
            log.warning("retention of %s.%s: TTL %s (was %s); shortened, ClickHouse deletes the "
                        "rows past it", database, c.table, c.wanted, c.current)
        else:
            log.info("retention of %s.%s: TTL %s (was %s)", database, c.table, c.wanted,
                     c.current or "none")
    return [c.table for c in changes]
