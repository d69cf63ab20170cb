"""How long ClickHouse keeps each resolution: settings, applied as table TTLs.

Why settings and not migrations: a retention is a site's choice, not a schema version.
The defaults are the TTLs the migrations create, so a store whose settings say nothing
is left as it is. At start the sink reads each table's TTL (``system.tables``), compares
it with the one the settings ask for, both formatted by the server (so spelling such as
``INTERVAL 30 DAY`` against ``toIntervalDay(30)`` does not count as a change), and
issues ``ALTER TABLE ... MODIFY TTL`` only where they differ: applying twice changes
nothing.

Derived retentions: a series' label map must outlive every point that refers to it
(``series``: the longest point retention + 1 day), and a stack every sample
(``profile_stacks``: at least ``profiles``, and never less than the 30 days of the
schema). Both are refreshed by the sink while in use (``last_seen``).
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["Retention", "apply_retention", "parse_days", "retention_drift", "ttl_expressions"]

log = logging.getLogger(__name__)

_DAYS = re.compile(r"^\s*(\d+)\s*d?\s*$")
MAX_DAYS = 36500


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
    """Days kept per resolution (``clickhouse.retention``); the defaults are the schema's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Points at the regional's resolution, 60 s and coarser (metric_points, histogram_points).
    raw: Days = 35
    #: Points at resolutions under 60 s (the same tables).
    raw_fine: Days = 7
    #: Hourly roll-ups (metric_points_1h, histogram_points_1h).
    hourly: Days = 400
    #: CPU profile samples (profile_samples).
    profiles: Days = 14
    #: Process events (events).
    events: Days = 30


def ttl_expressions(r: Retention) -> dict[str, str]:
    """Table -> the TTL expression ``r`` asks for."""
    points = f"ts + toIntervalDay(if(resolution < 60, {r.raw_fine}, {r.raw}))"
    hourly = f"ts + INTERVAL {r.hourly} DAY"
    return {
        "metric_points": points,
        "histogram_points": points,
        "metric_points_1h": hourly,
        "histogram_points_1h": hourly,
        "series": f"last_seen + INTERVAL {max(r.raw, r.raw_fine, r.hourly) + 1} DAY",
        "profile_samples": f"ts + INTERVAL {r.profiles} DAY",
        "profile_stacks": f"last_seen + INTERVAL {max(r.profiles, 30)} DAY",
        "events": f"toDateTime(ts) + INTERVAL {r.events} DAY",
    }


_TTL = re.compile(r"\sTTL\s(.+?)(?:\sSETTINGS\s|$)", re.DOTALL)


def _local(table: str, cluster: str | None) -> str:
    return f"{table}_local" if cluster is not None else table


def retention_drift(client: Any, database: str, retention: Retention,
                    cluster: str | None = None) -> dict[str, tuple[str, str]]:
    """Table -> (its TTL now, the TTL ``retention`` asks for), for the tables that differ.

    On a cluster the local tables of the node ``client`` is connected to are read.
    """
    db = database
    wanted = ttl_expressions(retention)
    names = {_local(t, cluster): t for t in wanted}
    found = dict(client.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = {db:String}"
        " AND name IN {names:Array(String)}", parameters={"db": db, "names": list(names)}).result_rows)
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"retention: tables {', '.join(missing)} missing from {db} "
                         "(apply the migrations first)")
    drift: dict[str, tuple[str, str]] = {}
    for local, table in names.items():
        m = _TTL.search(found[local])
        current = m.group(1).strip() if m else ""
        same = client.query(
            "SELECT formatQuery({a:String}) = formatQuery({b:String})",
            parameters={"a": f"ALTER TABLE t MODIFY TTL {current or 'ts'}",
                        "b": f"ALTER TABLE t MODIFY TTL {wanted[table]}"}).result_rows[0][0]
        if not m or not same:
            drift[table] = (current, wanted[table])
    return drift


def apply_retention(client: Any, database: str, retention: Retention,
                    cluster: str | None = None) -> list[str]:
    """Set the TTL of every table whose TTL differs from ``retention``; return those tables.

    The server then recomputes the TTL of the parts already stored
    (``materialize_ttl_after_modify``, a background mutation), so a shorter retention
    frees space without waiting for new data.
    """
    on = f" ON CLUSTER '{cluster}'" if cluster is not None else ""
    changed = []
    for table, (current, wanted) in retention_drift(client, database, retention, cluster).items():
        client.command(f"ALTER TABLE {database}.{_local(table, cluster)}{on} MODIFY TTL {wanted}")
        log.info("retention of %s.%s: TTL %s (was %s)", database, table, wanted, current or "none")
        changed.append(table)
    return changed
